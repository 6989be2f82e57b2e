"""Judge tests of the ``ranks`` check's rules on hand-written evidence (no process group, no torch forward)."""

from __future__ import annotations

from fmcheck.checks.ranks import RanksCheck, RanksEvidence, RanksThresholds
from fmcheck.findings import evaluate
from fmcheck.verdict import Verdict

TH = RanksThresholds()
RANK0 = {"vae": {"scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None},
         "params": "a1b2c3d4e5f60718", "z1_mean": 0.01, "z1_std": 1.0, "t_min": 0.01, "t_max": 0.98,
         "kl_schedule": [0.0, 0.01, 0.05, 0.1, 0.1]}


def rank(**changes):
    return {**RANK0, **changes}


def findings(*records, th=TH):
    return evaluate(RanksCheck.rules, RanksEvidence.from_observation(list(records)), th)


def codes(*records, th=TH):
    return {f.code: f.verdict for f in findings(*records, th=th)}


def test_ranks_that_agree_give_no_finding_and_shards_may_differ_in_data():
    assert codes(RANK0, rank(z1_std=1.19, z1_mean=0.2, t_min=0.2, t_max=0.8)) == {}


def test_another_vae_config_on_a_rank_fails_with_both_factors():
    other = rank(vae={**RANK0["vae"], "scaling_factor": 0.29144}, z1_std=1.6)
    found = findings(RANK0, other)
    assert {f.code: f.verdict for f in found} == {"ranks.vae_differs": Verdict.FAIL,
                                                   "ranks.z1_units_differ": Verdict.FAIL}
    vae = next(f for f in found if f.code == "ranks.vae_differs")
    assert "VAE scaling config on rank 1" in vae.message and "0.29144 vs 0.18215 on rank 0" in vae.message


def test_z1_units_fail_beyond_the_relative_tolerance_only():
    assert codes(RANK0, rank(z1_std=1.2)) == {}
    hit = findings(RANK0, rank(z1_std=1.25), rank())[0]
    assert hit.code == "ranks.z1_units_differ" and hit.verdict is Verdict.FAIL and "rank 1 " in hit.message
    assert "1.25 vs 1; expected within 20% of 1" in hit.message
    assert codes(RANK0, rank(z1_std=1.25), th=RanksThresholds(z1_std_rtol=0.3)) == {}


def test_different_start_weights_fail():
    assert codes(RANK0, rank(), rank(params="ffff0000ffff0000")) == {"ranks.params_differ": Verdict.FAIL}
    hit = findings(RANK0, rank(), rank(params="ffff0000ffff0000"))[0]
    assert "rank 2" in hit.message and "ffff0000ffff0000" in hit.message


def test_another_kl_schedule_fails():
    assert codes(RANK0, rank(kl_schedule=[0.1] * 5)) == {"ranks.kl_schedule_differs": Verdict.FAIL}
    assert codes(RANK0, rank(kl_schedule=None)) == {"ranks.kl_schedule_differs": Verdict.FAIL}  # not measured


def test_another_t_range_fails_once_for_either_end():
    assert codes(RANK0, rank(t_min=0.26)) == {}  # within 0.25
    both = findings(RANK0, rank(t_min=0.3, t_max=999.0))
    assert [f.code for f in both] == ["ranks.t_range_differs"]
    assert "[0.3, 999] vs [0.01, 0.98]" in both[0].message


def test_nothing_is_compared_that_rank_0_did_not_measure():
    bare = {"vae": {}, "params": "x"}
    assert codes(bare, {"vae": {}, "params": "x", "z1_std": 3.0, "t_min": 0.0, "t_max": 1.0}) == {}
