"""The `structure` check's rules on hand-written evidence: no user code, no torch forward."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fmcheck.checks.structure import StructureCheck
from fmcheck.checks.structure.evidence import (Balance, FrozenModule, NonFinite, Precision, StructureEvidence,
                                               StructureThresholds, TimeFeatures)
from fmcheck.findings import evaluate
from fmcheck.verdict import Verdict

TH = StructureThresholds()
# a correct balance: t moves the output by 4% of what x_t does (the digits net measures 0.032-0.047)
BALANCED = Balance(measured=True, state="measured", ratio=0.04, t_change=0.02, x_change=0.5, noise=0.0,
                   t_slot="argument 1", t_slope=1.0, t_offset=0.0, t_range=(0.01, 0.99),
                   features=TimeFeatures(module="time.0", spread=0.3, mixes="inp", roughness=0.01))
FLOAT32 = Precision(autocast=False, param_dtype="torch.float32", v_pred="torch.float32")


def evidence(**changes) -> StructureEvidence:
    return replace(StructureEvidence(balance=BALANCED, precision=FLOAT32), **changes)


def findings(ev: StructureEvidence, th: StructureThresholds = TH):
    return evaluate(StructureCheck.rules, ev, th)


def fired(ev: StructureEvidence, th: StructureThresholds = TH) -> dict[str, Verdict]:
    found = findings(ev, th)
    assert all(f.verdict is not Verdict.ERROR for f in found), [f.message for f in found]
    return {f.code: f.verdict for f in found}


def only(ev: StructureEvidence, th: StructureThresholds = TH):
    found = findings(ev, th)
    assert len(found) == 1, [f.code for f in found]
    return found[0]


def test_a_correct_pipeline_concludes_nothing():
    assert fired(evidence()) == {}


def test_from_observation_reads_what_measure_returns():
    obs = {"balance": {"measured": True, "state": "measured", "ratio": 0.04, "t_change": 0.02, "x_change": 0.5,
                       "noise": 0.0, "where": "output", "t_slot": "argument 1", "t_slope": 1.0, "t_offset": 0.0,
                       "t_range": [0.01, 0.99], "features": None},
           "precision": {"autocast": False, "autocast_dtype": "", "autocast_device": "cpu",
                         "param_dtype": "torch.float32", "v_pred": "torch.float32", "scaler": False,
                         "scaler_enabled": False},
           "non_finite": [{"batch": 1, "key": "kl", "count": 3}],
           "modes": {"vae": {"training": True, "switched_by_step": False, "active": {"dropout": 2, "batch-norm": 0},
                             "tensors": 4, "grad_tensors": 0, "grad_elements": 0, "grad_names": [],
                             "grad_by_step": False, "optimizer_tensors": 0, "optimizer_elements": 0}}}
    ev = StructureEvidence.from_observation(obs)
    assert ev.balance.ratio == 0.04 and ev.balance.t_range == (0.01, 0.99)
    assert ev.non_finite == (NonFinite(1, "kl", 3),)
    assert ev.frozen[0].active == (("dropout", 2),)  # kinds with no active layer dropped
    assert fired(ev) == {"structure.non_finite": Verdict.FAIL, "structure.frozen_train_mode": Verdict.WARN}


# -- time balance -------------------------------------------------------------------------------------------------

def test_balance_not_measured_warns_with_the_reason():
    finding = only(evidence(balance=Balance(measured=False, reason="cannot tell which argument is t")))
    assert finding.code == "structure.balance_not_measured" and finding.verdict is Verdict.WARN
    assert "cannot tell which argument is t" in finding.message


def test_a_net_that_moves_with_neither_input_warns_and_is_not_judged_further():
    flat = replace(BALANCED, state="both flat", ratio=None, t_change=1e-8, x_change=2e-8, noise=1e-9,
                   features=TimeFeatures(module="time.0", spread=0.3, mixes=None, roughness=0.9))
    finding = only(evidence(balance=flat))  # the aliasing of its time features is not judged either
    assert finding.code == "structure.inputs_ignored" and finding.verdict is Verdict.WARN
    assert finding.bound == "> 1e-06"


@pytest.mark.parametrize("ratio, fires", [(1.5, True), (1.01, True), (1.0, False), (0.5, False)])
def test_time_embedding_loud_above_the_ratio(ratio, fires):
    ev = evidence(balance=replace(BALANCED, ratio=ratio, t_change=ratio * 0.5))
    assert fired(ev) == ({"structure.time_embedding_loud": Verdict.WARN} if fires else {})
    if fires:
        finding = only(ev)
        assert finding.observed == ratio and finding.bound == "<= 1" and finding.unit == "x"


def test_time_embedding_loud_follows_its_threshold():
    ev = evidence(balance=replace(BALANCED, ratio=0.5, t_change=0.25))
    assert "structure.time_embedding_loud" in fired(ev, StructureThresholds(time_dominates_ratio=0.3))


def test_an_x_t_that_moves_nothing_makes_time_dominate():
    ev = evidence(balance=replace(BALANCED, state="x flat", ratio=float("inf"), x_change=0.0))
    assert fired(ev) == {"structure.time_embedding_loud": Verdict.WARN}


@pytest.mark.parametrize("ratio, fires", [(0.0038, True), (0.0099, True), (0.01, False), (0.02, False)])
def test_time_ignored_below_the_ratio_names_the_units(ratio, fires):
    ev = evidence(balance=replace(BALANCED, ratio=ratio, t_change=ratio * 0.5, t_slope=0.001, t_range=(0.0, 0.001)))
    assert fired(ev) == ({"structure.time_ignored": Verdict.WARN} if fires else {})
    if fires:
        finding = only(ev)
        assert finding.observed == ratio and finding.bound == ">= 0.01"
        assert "the net receives 0.001 * t, range 0..0.001" in finding.message


def test_time_blind_when_permuting_t_changes_nothing_and_no_feature_meets_x_t():
    blind = replace(BALANCED, ratio=0.0, t_change=0.0, noise=0.0, t_slope=None,
                    features=TimeFeatures(module="time.0", spread=0.3, mixes=None, roughness=0.01))
    finding = only(evidence(balance=blind))
    assert finding.code == "structure.time_blind" and finding.verdict is Verdict.WARN
    assert "changes nothing" in finding.message and "range" not in finding.message  # no step t: no units phrase
    # a change within 10x the repeat-call noise is no change
    noisy = replace(blind, t_change=5e-5, noise=1e-5, ratio=1e-4)
    assert fired(evidence(balance=noisy)) == {"structure.time_blind": Verdict.WARN}
    # just above the noise floor: t moves the output a little, the ratio says ignored
    assert fired(evidence(balance=replace(noisy, t_change=2e-4, ratio=4e-4))) == {"structure.time_ignored":
                                                                                  Verdict.WARN}


@pytest.mark.parametrize("spread, code", [(8.0e-05, "structure.time_units"), (0.0099, "structure.time_units"),
                                          (0.01, None), (0.0792, None)])
def test_a_net_blind_at_init_is_judged_at_its_time_features(spread, code):
    blind = replace(BALANCED, ratio=0.0, t_change=0.0, noise=0.0,
                    features=TimeFeatures(module="time_embed.0", spread=spread, mixes="input_blocks.1",
                                          roughness=0.01))
    assert fired(evidence(balance=blind)) == ({code: Verdict.WARN} if code else {})
    if code:
        finding = only(evidence(balance=blind))
        assert finding.observed == spread and finding.bound == ">= 0.01" and "time_embed.0" in finding.message


@pytest.mark.parametrize("roughness, fires", [(0.51, True), (0.26, True), (0.25, False), (0.013, False)])
def test_time_features_aliased_above_the_roughness(roughness, fires):
    ev = evidence(balance=replace(BALANCED, features=replace(BALANCED.features, roughness=roughness)))
    assert fired(ev) == ({"structure.time_features_aliased": Verdict.WARN} if fires else {})


def test_aliasing_is_judged_alongside_the_ratio():
    ev = evidence(balance=replace(BALANCED, ratio=2.0, t_change=1.0,
                                  features=replace(BALANCED.features, roughness=0.6)))
    assert fired(ev) == {"structure.time_features_aliased": Verdict.WARN, "structure.time_embedding_loud": Verdict.WARN}


# -- precision -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision, fires", [
    (Precision(autocast=True, autocast_dtype="torch.float16", autocast_device="cuda"), True),
    (Precision(param_dtype="torch.float16"), True),
    (Precision(v_pred="torch.float16"), True),
    (Precision(autocast=True, autocast_dtype="torch.float16", autocast_device="cuda", scaler=True), True),
    (Precision(autocast=True, autocast_dtype="torch.float16", autocast_device="cuda", scaler=True,
               scaler_enabled=True), False),
    (Precision(autocast=True, autocast_dtype="torch.bfloat16", autocast_device="cuda"), False),
    (FLOAT32, False),
])
def test_fp16_without_an_enabled_grad_scaler(precision, fires):
    ev = evidence(precision=precision)
    assert fired(ev) == ({"structure.fp16_no_grad_scaler": Verdict.WARN} if fires else {})
    if fires:
        assert "without loss scaling" in only(ev).message


def test_fp16_names_where_and_the_scaler_state():
    finding = only(evidence(precision=Precision(autocast=True, autocast_dtype="torch.float16",
                                                autocast_device="cuda", scaler=True)))
    assert finding.code == "structure.fp16_no_grad_scaler"
    assert "cuda autocast float16" in finding.message and "grad_scaler disabled" in finding.message


def test_non_finite_outputs_fail_naming_the_keys():
    ev = evidence(non_finite=(NonFinite(0, "kl", 1), NonFinite(1, "loss", 32), NonFinite(1, "kl", 2)))
    finding = only(ev)
    assert finding.code == "structure.non_finite" and finding.verdict is Verdict.FAIL
    assert "'kl', 'loss'" in finding.message and "(1 in 'kl' on batch 0)" in finding.message


# -- frozen modules ------------------------------------------------------------------------------------------------

def test_frozen_modules_in_eval_without_grad_conclude_nothing():
    quiet = (FrozenModule("vae", tensors=10), FrozenModule("text_encoder", training=True, tensors=4))
    assert fired(evidence(frozen=quiet)) == {}  # train mode without mode-dependent layers is harmless


def test_frozen_train_mode_fires_once_per_module_with_active_layers():
    frozen = (FrozenModule("vae", training=True, switched_by_step=True, active=(("dropout", 2),)),
              FrozenModule("text_encoder", training=False, active=(("batch-norm", 1),)),
              FrozenModule("clip", training=True))
    found = findings(evidence(frozen=frozen))
    assert [(f.code, f.verdict) for f in found] == [("structure.frozen_train_mode", Verdict.WARN)] * 2
    assert "frozen module 'vae' in train mode (switched by the step)" in found[0].message
    assert "2 dropout" in found[0].message and found[0].observed == 2
    assert "'text_encoder' in eval with submodules in train mode" in found[1].message


def test_frozen_requires_grad_warns_per_module():
    frozen = (FrozenModule("vae", tensors=10, grad_tensors=10, grad_elements=12345, grad_names=("enc.weight",),
                           grad_by_step=True), FrozenModule("text_encoder", tensors=4))
    finding = only(evidence(frozen=frozen))
    assert finding.code == "structure.frozen_requires_grad" and finding.verdict is Verdict.WARN
    assert finding.observed == 10 and finding.bound == "0"
    assert "'vae'" in finding.message and "12,345 values" in finding.message and "turned on by the step" in \
        finding.message


def test_frozen_in_optimizer_warns_while_nothing_there_requires_grad():
    # torch's optimizers skip parameters without a gradient: nothing moves yet, the contradiction is a WARN
    frozen = (FrozenModule("vae", tensors=10, optimizer_tensors=10, optimizer_elements=100,
                           optimizer_grad_elements=0),)
    finding = only(evidence(frozen=frozen))
    assert finding.code == "structure.frozen_in_optimizer" and finding.verdict is Verdict.WARN
    assert "nothing moves yet" in finding.message


def test_frozen_in_optimizer_fails():
    frozen = (FrozenModule("vae", tensors=10, optimizer_tensors=10, optimizer_elements=83_653_863,
                           optimizer_grad_elements=83_653_863),)
    finding = only(evidence(frozen=frozen))
    assert finding.code == "structure.frozen_in_optimizer" and finding.verdict is Verdict.FAIL
    assert finding.observed == 83_653_863 and "83,653,863 parameters of frozen module 'vae'" in finding.message
    assert fired(evidence(frozen=(FrozenModule("vae", tensors=10, optimizer_tensors=0),))) == {}


def test_every_rule_is_exercised_here():
    declared = {rule.code for rule in StructureCheck.rules}
    assert declared == {
        "structure.balance_not_measured", "structure.inputs_ignored", "structure.time_features_aliased",
        "structure.time_embedding_loud", "structure.time_units", "structure.time_blind", "structure.time_ignored",
        "structure.fp16_no_grad_scaler", "structure.non_finite", "structure.frozen_train_mode",
        "structure.frozen_requires_grad", "structure.frozen_in_optimizer"}


# -- the measurements table agrees with the findings -----------------------------------------------------------------

# which rules back a non-PASS row of the measurements table
BACKED_BY = {
    "t / x_t sensitivity": {"structure.balance_not_measured", "structure.inputs_ignored",
                            "structure.time_embedding_loud", "structure.time_units", "structure.time_blind",
                            "structure.time_ignored"},
    "time features follow t smoothly": {"structure.time_features_aliased"},
    "fp16 without loss scaling": {"structure.fp16_no_grad_scaler"},
    "non-finite step outputs": {"structure.non_finite"},
    "mode-dependent layers active in frozen modules": {"structure.frozen_train_mode"},
    "frozen parameters with requires_grad": {"structure.frozen_requires_grad"},
    "frozen parameters in the optimizer": {"structure.frozen_in_optimizer"},
}


def observation(balance: dict, **changes) -> dict:
    module = {"training": False, "switched_by_step": False, "active": {}, "tensors": 4, "grad_tensors": 0,
              "grad_elements": 0, "grad_names": [], "grad_by_step": False, "optimizer_tensors": 0,
              "optimizer_elements": 0}
    obs = {"velocity": "velocity", "velocity_class": "Net", "velocity_how": "pipeline field 'velocity'",
           "balance": balance, "notes": [], "non_finite": [],
           "precision": {"autocast": False, "autocast_dtype": "", "autocast_device": "cpu",
                         "param_dtype": "torch.float32", "v_pred": "torch.float32", "scaler": False,
                         "scaler_enabled": False},
           "modes": {"vae": dict(module)}}
    for key, value in changes.items():
        if key in ("precision",):
            obs[key] = {**obs[key], **value}
        elif key == "vae":
            obs["modes"]["vae"].update(value)
        else:
            obs[key] = value
    return obs


MEASURED = {"measured": True, "state": "measured", "ratio": 0.04, "t_change": 0.02, "x_change": 0.5, "noise": 0.0,
            "where": "output", "t_slot": "argument 1", "t_slope": 1.0, "t_offset": 0.0, "t_range": [0.01, 0.99],
            "features": {"module": "time.0", "spread": 0.3, "mixes": "inp", "roughness": 0.01}}


@pytest.mark.parametrize("obs", [
    observation(MEASURED),
    observation({"measured": False, "reason": "no pipeline field 'velocity' and no step output 'xt'"}),
    observation({**MEASURED, "state": "both flat", "ratio": None, "t_change": 0.0, "x_change": 0.0}),
    observation({**MEASURED, "ratio": 2.0, "t_change": 1.0,
                 "features": {**MEASURED["features"], "roughness": 0.6}}),
    observation({**MEASURED, "ratio": 0.0, "t_change": 0.0, "features": {**MEASURED["features"], "spread": 1e-4}}),
    observation({**MEASURED, "ratio": 0.0, "t_change": 0.0, "features": None}),
    observation({**MEASURED, "ratio": 0.003, "t_change": 0.0015}),
    observation(MEASURED, precision={"autocast": True, "autocast_dtype": "torch.float16"},
                non_finite=[{"batch": 0, "key": "loss", "count": 1}]),
    observation(MEASURED, vae={"training": True, "active": {"dropout": 3}, "grad_tensors": 2, "grad_elements": 20,
                               "grad_names": ["w"], "optimizer_tensors": 2, "optimizer_elements": 20}),
], ids=["correct", "not_measured", "flat", "loud_aliased", "units", "blind", "ignored", "fp16_nan", "frozen"])
def test_every_non_pass_measurement_is_backed_by_a_finding(obs):
    judgement = StructureCheck().judge(obs, TH)
    codes = {f.code for f in judgement.findings}
    for m in judgement.measurements:
        if m.verdict in (Verdict.WARN, Verdict.FAIL):
            backing = [f for f in judgement.findings if f.code in BACKED_BY[m.name]]
            assert backing, f"{m.name} is {m.verdict} but no finding says why: {codes}"
            assert m.verdict in {f.verdict for f in backing}, (m.name, m.verdict, [f.verdict for f in backing])
    flagged = {m.name for m in judgement.measurements if m.verdict in (Verdict.WARN, Verdict.FAIL)}
    for code in codes:  # and no finding without its row
        assert any(code in BACKED_BY[name] for name in flagged), code
    assert (not codes) == (not flagged)
