"""The `scale` check's measurements table and details (for --verbose, the JSON and `fmcheck compare`).

Built from the observation and the evidence after the rules ran: a judged measurement's verdict is the worst of the
findings on the same evidence (:data:`.rules.GROUPS`), so the table and the findings cannot disagree.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from fmcheck.judges import at_most, info, ratio_within
from fmcheck.report import Finding, Measurement
from fmcheck.verdict import Verdict

from . import maths as sm
from .evidence import Evidence
from .rules import GROUPS, ScaleThresholds


def measurements(obs: dict[str, Any], ev: Evidence, t: ScaleThresholds, findings: list[Finding]
                 ) -> tuple[list[Measurement], dict[str, Any]]:
    def judged(group: str) -> Verdict:
        return Verdict.worst([Verdict.PASS, *(f.verdict for f in findings if f.code in GROUPS[group])])

    tr, cfg, s = ev.transform, obs["configured"], ev.sampling
    rows: list[Measurement] = []
    details: dict[str, Any] = {}
    notes: list[str] = []

    # encode's map
    verdict = judged("transform")
    details["transform"] = {"method": tr.method, "source": tr.source, "slope": tr.slope, "offset": tr.offset,
                            "per_channel_slope": _list(tr.per_channel_slope),
                            "per_channel_offset": _list(tr.per_channel_offset),
                            "ranking": [list(r) for r in tr.ranking], "tolerance": tr.tolerance,
                            "configured": tr.formula, "slope_ratio": tr.slope_ratio, "mean_error": tr.mean_error}
    details["applied"] = _applied(ev)
    rows.append(Measurement(name="z1 transform", value=tr.best if verdict is Verdict.PASS or tr.matches_other
                            else "unrecognised", expected="once", verdict=verdict))
    rows.append(Measurement(name="z1 distance from configured transform", value=_num(tr.distance), unit="rel. RMS",
                            expected=f"<= {max(t.map_tolerance, tr.tolerance):.3g}", verdict=verdict))
    rows.append(info("z1 slope / configured slope", _num(tr.slope_ratio), "x", "1 when z1 is as configured"))
    rows.append(info("z1 mean - configured mean", _num(tr.mean_error), "", "0 when z1 is as configured"))
    if tr.indistinguishable:
        names = ", ".join(f"{k} ({d:.2g} apart)" for k, d in tr.indistinguishable)
        notes.append(f"blind spot: the configured transform ({tr.formula}) is within {2 * tr.tolerance:.2g} of "
                     f"{names}; this data cannot tell them apart")
        details["indistinguishable"] = [list(x) for x in tr.indistinguishable]
        rows.append(info("indistinguishable conventions", ", ".join(k for k, _ in tr.indistinguishable), "",
                         "conventions this data cannot tell from the configured one (a blind spot)"))

    # the configuration
    m = ratio_within("configured latent std", _num(ev.config.std), warn_factor=t.config_std_warn,
                     fail_factor=t.config_std_fail, unit="")
    rows.append(m.model_copy(update={"verdict": judged("config")}))
    rows.append(info("configured latent mean", _num(ev.config.mean)))
    rows.append(info("configured scaling_factor", cfg.scaling_factor if cfg.scaling_factor is not None else "none"))
    if cfg.shift_factor is not None:
        rows.append(info("configured shift_factor", cfg.shift_factor))
    if cfg.per_channel:
        rows.append(info("configured latents_mean", _short(cfg.latents_mean)))
        rows.append(info("configured latents_std", _short(cfg.latents_std)))
    if not obs["has_config"]:
        notes.append("the VAE has no config: the configured transform is taken as the identity")
    notes.extend(cfg.notes)

    # sampling
    label = {"sample": "posterior sample", "mean": "posterior mean", "own_sample": "mean + noise",
             "unexplained": "not affine", "layout": "other layout"}[s.source]
    if any(f.code == "scale.fixed_noise" for f in findings):
        label = "fixed-noise sample"
    if s.source == "layout":
        notes.append(f"z1 has shape {obs['z1_shape']} and the latent {obs['latent_shape']}: compared by overall mean "
                     "and std only")
    rows.append(Measurement(name="z1 source", value=label, expected="posterior sample", verdict=judged("source")))
    rows.append(info("posterior sigma / latent std", _num(s.sigma_rel), "",
                     f"sample vs mean matters from {t.sigma_negligible:g} (sigma_negligible)"))
    if s.repeat_diff is not None:
        rows.append(info("repeat encode difference", _num(s.repeat_diff), "rel. RMS",
                         "0 for the posterior mean, > 0 for a sample"))

    # the round trip
    # a round trip that fails because encode deviates is shown with the verdict of encode's finding, which names it
    explained = ev.round_trip is not None and ev.round_trip.decode == "inverse"
    rows += _round_trip_rows(obs, ev, t, Verdict.worst([judged("round_trip"), judged("transform")]) if explained
                             else judged("round_trip"), details)

    # the VAE in float16, and the pixels it receives
    half = ev.half
    if half is not None:
        rows.append(Measurement(name="float16 probe finite", value=half.finite, expected="True",
                                verdict=judged("half")))
        if half.latent_error is not None:
            rows.append(info("float16 latent error", _num(half.latent_error), "rel. RMS"))
    rows.append(info("VAE dtype", obs.get("vae_dtype") or "unknown"))
    if ev.pixels is not None:
        low, high = ev.pixels
        value = f"{low:.3g}..{high:.3g}"
        verdict = judged("pixels")
        if verdict is Verdict.PASS:
            rows.append(info("VAE input range", value, "", "diffusers VAEs expect -1..1"))
        else:
            rows.append(Measurement(name="VAE input range", value=value, expected="-1..1", verdict=verdict))

    rows += _raw(obs, details)
    if notes:
        details["notes"] = notes
    return rows, details


def _round_trip_rows(obs: dict[str, Any], ev: Evidence, t: ScaleThresholds, verdict: Verdict,
                     details: dict[str, Any]) -> list[Measurement]:
    raw = obs["round_trip"]
    if raw is None:
        return [info("round trip", "not measured", "", "needs pipeline field 'decode'")]
    rows = []
    if raw["psnr"] is not None:
        rows.append(info("PSNR decode(encode(x)) vs x", _num(raw["psnr"]), "dB", "reported, not judged"))
    rt = ev.round_trip
    if rt is None:
        rows.append(info("round trip", "not measured", "", "decode returned no pixel tensor"
                         if not raw["decoded"] else "decode did not call vae.decode"))
        return rows
    details["round_trip"] = {"method": rt.method, "error": rt.error, "images": rt.images,
                             "resolution": rt.resolution}
    m = at_most("round-trip error", _num(rt.error), warn=max(t.round_trip_warn, rt.resolution),
                fail=max(t.round_trip_fail, rt.resolution), unit="rel. RMS")
    rows.append(m.model_copy(update={"verdict": verdict}))
    if rt.slope is not None:
        rows.append(info("decode(encode(x)) latent slope", _num(rt.slope), "x raw", "1 when decode inverts encode"))
        details["round_trip"].update({"slope": rt.slope, "offset": rt.offset})
    if rt.ranking:
        details["round_trip"]["decode_ranking"] = [list(r) for r in rt.ranking]
    return rows


def _applied(ev: Evidence) -> dict[str, Any]:
    """The scaling as applied, for the report's latent-space fingerprint (`fmcheck compare`): offsets below a
    thousandth of the latent's RMS are float noise and recorded as 0."""
    tr = ev.transform
    norm = tr.norm
    slopes = list(tr.per_channel_slope) if tr.per_channel_slope is not None else [tr.slope]
    offsets = list(tr.per_channel_offset) if tr.per_channel_offset is not None else [tr.offset]
    floor = 1e-3 * (norm if math.isfinite(norm) else 1.0)
    return {"convention": tr.best if tr.matches_correct or tr.matches_other else "unrecognised",
            "source": tr.source, "slope": [float(f"{v:.6g}") for v in slopes],
            "offset": [0.0 if abs(v) < floor else float(f"{v:.6g}") for v in offsets]}


def _raw(obs: dict[str, Any], details: dict[str, Any]) -> list[Measurement]:
    cfg = obs["configured"]
    raw = sm.Moments(tuple(obs["mu_mean"]), tuple(obs["mu_var"])).plus_variance(obs["sigma2"])
    rec = sm.recommend(raw, obs["images"])
    details["raw"] = {"channel_mean": list(raw.mean), "channel_std": list(raw.std()),
                      "posterior_sigma_rms": [math.sqrt(v) for v in obs["sigma2"]], "images": obs["images"],
                      "latent_shape": obs["latent_shape"], "capture": obs["capture"],
                      "sample_recorded": obs["sample_recorded"]}
    details["z1"] = {"mean": obs["z1_mean"], "std": obs["z1_std"], "channel_std": obs["z1_channel_std"],
                     "shape": obs["z1_shape"]}
    details["configured"] = cfg.as_dict()
    details["recommended"] = {"scaling_factor": rec.scaling_factor, "shift_factor": rec.shift_factor,
                              "latents_mean": list(rec.latents_mean), "latents_std": list(rec.latents_std),
                              "per_channel_advised": rec.per_channel_advised}
    return [info("raw latent std", _num(raw.overall_std())), info("raw latent mean", _num(raw.overall_mean())),
            info("implied scaling_factor", _num(rec.scaling_factor), "", "1 / raw std"),
            info("implied shift", _num(raw.overall_mean()), "", "raw mean"),
            info("z1 std", _num(obs["z1_std"])), info("z1 mean", _num(obs["z1_mean"]))]


def passed(ev: Evidence, obs: dict[str, Any]) -> str:
    """What the row says when no finding counts: what was measured."""
    tr = ev.transform
    text = f"scaling applied once ({tr.formula}, within {tr.distance:.2g}); z1 std {obs['z1_std']:.3g}"
    if ev.round_trip is not None:
        text += f"; decode inverts encode (error {ev.round_trip.error:.2g})"
    if tr.indistinguishable:
        names = "/".join(k for k, _ in tr.indistinguishable)
        text += (f"; blind spot: the configured transform ({tr.formula}) is ~identity, so {names} would look the "
                 "same here")
    return text


def _list(values: Optional[tuple[float, ...]]) -> Optional[list[float]]:
    return list(values) if values is not None else None


def _num(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _short(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
