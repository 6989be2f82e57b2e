"""`target`'s comparison of a target with the path velocity: which audit decides, the verdicts of its cosine, norm
ratio and disagreeing share, and what a mismatch is. Pure functions of the evidence and the thresholds, shared by
the rules (the findings) and the measurement table, so the two always agree.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

from fmcheck.judges import at_least, at_most, ratio_within
from fmcheck.verdict import Verdict

from .evidence import (DECLARED, PATH_VELOCITY, Candidate, Evidence, Match, PathEvidence, Prediction, Resemblance,
                       Subject)

IDENTIFIED = 0.999  # a wrong candidate this close to the target names it: a near-miss WARN becomes a FAIL
TIE = 0.005  # candidates whose median cosine is within this of the best are reported together


class Mismatch(enum.Enum):
    """What a target that is not the path velocity is (each is its own finding)."""

    SIGN_FLIPPED = "sign_flipped"
    EPSILON = "epsilon"
    X0 = "x0"
    X1 = "x1"
    XT = "xt_as_target"
    SCORE = "score"
    WRONG_PATH = "wrong_path"  # the linear difference x1 - x0 on a path that is not linear
    NOISE_TERM_MISSING = "noise_term_missing"
    OTHER = "not_velocity"


NAMED = {Candidate.EPS: Mismatch.EPSILON, Candidate.MINUS_EPS: Mismatch.EPSILON, Candidate.X0: Mismatch.X0,
         Candidate.X1: Mismatch.X1, Candidate.XT: Mismatch.XT, Candidate.SCORE: Mismatch.SCORE,
         Candidate.X1_MINUS_X0: Mismatch.WRONG_PATH, Candidate.X0_MINUS_X1: Mismatch.WRONG_PATH,
         Candidate.WITHOUT_NOISE_TERM: Mismatch.NOISE_TERM_MISSING}


def worst(*verdicts: Verdict) -> Verdict:
    return max(verdicts, key=lambda v: v.severity)


@dataclass(frozen=True)
class Judged:
    """The target comparison that decides: the implied target when the loss gradient gave one, else v_target."""

    subject: Subject
    match: Match
    path: PathEvidence
    cap: Verdict = Verdict.FAIL  # at most WARN when the two audits disagree and the module was found by hooks
    caveat: str = ""


def judged(ev: Evidence, th: Any) -> Optional[Judged]:
    path, implied = ev.path, ev.implied
    if path.problem is not None:
        return None
    if implied.ok and implied.compared and implied.match is not None:
        step = path.v_target
        adapter_ok = step is not None and step.cos_median >= th.cos_warn and \
            1 / th.norm_ratio_warn <= step.ratio_median <= th.norm_ratio_warn
        if not implied.declared and implied.v_pred_is_raw is False and adapter_ok:
            # found by hooks, the step's v_pred is not its output and v_target matches the path: the audits disagree
            # and fmcheck cannot tell which output the sampler integrates, so the implied audit only warns
            return Judged(Subject.IMPLIED, implied.match, path, Verdict.WARN,
                          f" (while the step's v_target matches the path velocity; {implied.module} was found by "
                          "forward hooks: declare the pipeline field 'velocity' to settle which output the sampler "
                          "uses)")
        return Judged(Subject.IMPLIED, implied.match, path)
    if not path.inferred and path.fit_ok and path.v_target_returned and path.v_target is not None:
        return Judged(Subject.V_TARGET, path.v_target, path)
    return None


def implied_decides(ev: Evidence) -> bool:
    return ev.path.problem is None and ev.implied.ok and ev.implied.compared


def path_end(path: PathEvidence) -> Optional[float]:
    """For t in timestep units: the normalised t where the fitted path reaches its far end (x1 for t=1 at the data,
    x0 for t=1 at the source), when that is well inside [0, 1] (t over 0..500 read as 0..0.5); else None."""
    if not path.t_scale or path.end_t is None:
        return None
    a_hi, b_hi = path.end_a, path.end_b
    reached = (abs(b_hi - 1) < 0.05 and abs(a_hi) < 0.05) or (abs(a_hi - 1) < 0.05 and abs(b_hi) < 0.05)
    return path.end_t if reached and 0.05 < path.end_t < 0.9 else None


@dataclass(frozen=True)
class Assessment:
    """A velocity target against the path velocity, with the verdicts the measurements and the findings share."""

    cos: Verdict
    ratio: Verdict
    share: float  # share of samples with cos < cos_fail
    share_verdict: Verdict
    end: Optional[float]  # where the path reaches its end, for t in timestep units (else None)
    in_span_units: bool  # right per t / (the span of t), wrong per t / (the power of ten)

    @property
    def verdict(self) -> Verdict:
        return worst(self.cos, self.ratio)


def assess(j: Judged, th: Any) -> Assessment:
    m = j.match
    cos = at_least("", m.cos_median, warn=th.cos_warn, fail=th.cos_fail).verdict
    identified = next((c for c in m.candidates if c.cos >= IDENTIFIED and c.kind not in PATH_VELOCITY), None)
    if cos is Verdict.WARN and identified is not None:
        cos = Verdict.FAIL  # not a near miss: the target IS another quantity (e.g. without its noise term)
    ratio = ratio_within("", m.ratio_median, warn_factor=th.norm_ratio_warn, fail_factor=th.norm_ratio_fail).verdict
    end = path_end(j.path)
    in_span = end is not None and ratio is not Verdict.PASS and ratio_within(
        "", m.ratio_median / end, warn_factor=th.norm_ratio_warn,
        fail_factor=th.norm_ratio_fail).verdict is Verdict.PASS
    if in_span:
        ratio = Verdict.WARN
    cos, ratio = (v if v.severity <= j.cap.severity else j.cap for v in (cos, ratio))
    share = m.share_below(th.cos_fail)
    share_verdict = at_most("", share, warn=th.disagree_share_warn, fail=None).verdict
    return Assessment(cos, ratio, share, share_verdict, end, in_span)


@dataclass(frozen=True)
class Classified:
    """What a target that fails the cosine is: the finding, the candidate named, and the runner-up candidates."""

    mismatch: Mismatch
    best: Resemblance
    concrete: Optional[str]  # for a flipped sign: the wrong quantity it equals (x0 - x1), if any
    near: tuple[Resemblance, ...]


def classify(m: Match, th: Any, source_is_noise: bool) -> Classified:
    best = m.candidates[0]
    alike = [c for c in m.candidates if c.cos >= best.cos - TIE]
    best = next((c for c in alike if c.kind is Candidate.WITHOUT_NOISE_TERM), best)
    concrete = next((c.name for c in alike if c.kind not in PATH_VELOCITY), None)
    near = tuple(m.candidates[:3])
    if any(c.kind is Candidate.FLIPPED for c in alike):
        return Classified(Mismatch.SIGN_FLIPPED, best, concrete, near)
    if best.cos >= th.cos_warn and best.kind is not Candidate.VELOCITY:
        mismatch = NAMED.get(best.kind, Mismatch.OTHER)
        if mismatch is Mismatch.X0 and source_is_noise:
            mismatch = Mismatch.EPSILON  # x0 is the source noise: what a DDPM codebase calls eps
        return Classified(mismatch, best, None, near)
    return Classified(Mismatch.OTHER, best, None, near)


@dataclass(frozen=True)
class DeclaredAssessment:
    """A target against what the declared `prediction` means (the source noise for epsilon, the data for sample)."""

    prediction: Prediction
    key: str
    name: str
    entry: Resemblance
    cos: Verdict
    ratio: Verdict

    @property
    def verdict(self) -> Verdict:
        return worst(self.cos, self.ratio)


def assess_declared(j: Judged, th: Any) -> DeclaredAssessment:
    kind, key, name = DECLARED[j.path.prediction]
    entry = j.match.candidate(kind)
    cos = at_least("", entry.cos, warn=th.cos_warn, fail=th.cos_fail).verdict
    ratio = ratio_within("", entry.ratio, warn_factor=th.norm_ratio_warn, fail_factor=th.norm_ratio_fail).verdict
    return DeclaredAssessment(j.path.prediction, key, name, entry, cos, ratio)


def velocity_text(path: PathEvidence) -> str:
    text = ""
    if path.velocity_combination:
        text = f"median a'(t) = {path.velocity_combination[0]:.3g}, b'(t) = {path.velocity_combination[1]:.3g}"
    if path.describe:
        text += f"; path fitted as {path.describe}, {path.direction}"
    return text
