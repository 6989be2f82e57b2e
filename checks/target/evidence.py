"""`target`'s evidence: typed, frozen views of the observation ``measure`` returns, built once by
:meth:`Evidence.from_observation`. Rules and the measurement table read these, never the raw dict and never a label:
what a target resembles is a :class:`Candidate`, which audit decides is a :class:`Subject`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

ZERO_REL = 1e-8  # a gradient norm below this fraction of the largest one in its term counts as none
HALF = ("torch.float16", "torch.bfloat16")
FULL = ("torch.float32", "torch.float64")


class Candidate(enum.Enum):
    """The quantities a target is compared with (``_path_fit.candidate_targets``)."""

    VELOCITY = "velocity"
    FLIPPED = "flipped"
    X1_MINUS_X0 = "x1_minus_x0"
    X0_MINUS_X1 = "x0_minus_x1"
    X0 = "x0"
    X1 = "x1"
    XT = "xt"
    SCORE = "score"
    EPS = "eps"
    MINUS_EPS = "minus_eps"
    WITHOUT_NOISE_TERM = "without_noise_term"


# _path_fit.candidate_targets' keys, read once here: the one place a candidate's name is looked at
CANDIDATE_NAMES = {
    "the path velocity": Candidate.VELOCITY,
    "minus the path velocity (flipped sign)": Candidate.FLIPPED,
    "x1 - x0": Candidate.X1_MINUS_X0,
    "x0 - x1": Candidate.X0_MINUS_X1,
    "x0": Candidate.X0,
    "x1": Candidate.X1,
    "x_t": Candidate.XT,
    "score-like -x0/a(t)": Candidate.SCORE,
    "eps (the reparam noise)": Candidate.EPS,
    "-eps": Candidate.MINUS_EPS,
    "a'(t) x0 + b'(t) x1 without the noise term": Candidate.WITHOUT_NOISE_TERM,
}
PATH_VELOCITY = (Candidate.VELOCITY, Candidate.FLIPPED)  # the path velocity itself, either sign
NOISE_SOURCE_X0 = "x0 (the source noise: an eps target)"  # what x0 is called when the source is plain noise


class Subject(enum.Enum):
    """Which target is judged: the step's returned v_target, or the loss's implied target."""

    V_TARGET = "v_target"
    IMPLIED = "implied target"

    @property
    def label(self) -> str:
        return "v_target" if self is Subject.V_TARGET else "the loss's implied target"


class Prediction(enum.Enum):
    """The pipeline's declared `prediction`: what the output is meant to be."""

    VELOCITY = "velocity"
    EPSILON = "epsilon"
    SAMPLE = "sample"


DECLARED = {Prediction.EPSILON: (Candidate.X0, "x0", "the source noise x0"),
            Prediction.SAMPLE: (Candidate.X1, "x1", "the data x1")}


class KlPath(enum.Enum):
    ABSENT = "absent"  # no kl output
    NO_GRAPH = "no_graph"  # a kl without autograd history
    GRAPH = "graph"
    UNMEASURED = "unmeasured"  # a kl with a graph, but no parameter requires grad: no gradient map


@dataclass(frozen=True)
class Resemblance:
    kind: Candidate
    name: str  # as the report prints it
    cos: float
    ratio: float


@dataclass(frozen=True)
class Match:
    """A target (v_target or the implied one) against the path velocity: medians, per-sample cosines, and the
    candidates it resembles, best first."""

    cos_median: float
    ratio_median: float
    cos_p05: float
    cos_samples: tuple[float, ...]
    candidates: tuple[Resemblance, ...]

    @classmethod
    def of(cls, found: dict[str, Any], source_is_noise: bool) -> "Match":
        candidates = []
        for c in found.get("candidates", ()):
            kind = CANDIDATE_NAMES[c["name"]]
            name = NOISE_SOURCE_X0 if kind is Candidate.X0 and source_is_noise else c["name"]
            candidates.append(Resemblance(kind, name, float(c["cos"]), float(c["ratio"])))
        return cls(float(found["cos_median"]), float(found["ratio_median"]), float(found["cos_p05"]),
                   tuple(found.get("cos_samples", ())), tuple(candidates))

    def share_below(self, cos: float) -> float:
        samples = self.cos_samples
        return sum(1 for c in samples if c < cos) / len(samples) if samples else 0.0

    def candidate(self, kind: Candidate) -> Optional[Resemblance]:
        return next((c for c in self.candidates if c.kind is kind), None)


@dataclass(frozen=True)
class PathEvidence:
    """The path audit of the step's outputs (or, for a loss-only step, the path inferred around the module)."""

    problem: Optional[str] = None
    inferred: bool = False
    prediction: Prediction = Prediction.VELOCITY
    source_is_noise: bool = False
    t_scale: Optional[float] = None
    t_raw_min: float = 0.0
    t_raw_max: float = 0.0
    samples: int = 0
    batches: int = 0
    extra_batches: int = 0
    distinct_t: int = 0
    t_range: float = 0.0
    xt_residual: float = 0.0
    noise_term: Optional[dict[str, Any]] = None  # share, describe, log_slope_rms, residual_without (context only)
    fit_ok: bool = False
    fit_reason: str = ""
    fit_residual: float = 0.0
    describe: str = ""
    direction: str = ""
    end_t: Optional[float] = None  # normalised t of the fit's far end
    end_a: Optional[float] = None
    end_b: Optional[float] = None
    velocity_combination: Optional[tuple[float, float]] = None  # median a'(t), b'(t)
    v_combination: Optional[tuple[float, float, float]] = None  # v_target ~ c x0 + d x1, and its off-span share
    v_target_returned: bool = True
    v_target: Optional[Match] = None

    @classmethod
    def of(cls, path: dict[str, Any]) -> "PathEvidence":
        prediction = Prediction(path.get("prediction") or "velocity")
        if "problem" in path:
            return cls(problem=path["problem"], prediction=prediction)
        fit = path.get("fit") or {}
        if path.get("inferred"):
            return cls(inferred=True, prediction=prediction, source_is_noise=True, fit_ok=True,
                       describe=fit.get("describe", ""), direction=fit.get("direction", ""))
        ends = fit.get("ends") or {}
        combo = path.get("velocity_combination")
        v_combo = path.get("v_combination")
        source_is_noise = bool(path.get("source_is_noise"))
        return cls(
            prediction=prediction, source_is_noise=source_is_noise, t_scale=path.get("t_scale"),
            t_raw_min=path.get("t_raw_min", 0.0), t_raw_max=path.get("t_raw_max", 0.0),
            samples=path.get("samples", 0), batches=path.get("batches", 0),
            extra_batches=path.get("extra_batches", 0), distinct_t=path.get("distinct_t", 0),
            t_range=path.get("t_range", 0.0), xt_residual=path["xt_residual"],
            noise_term=path.get("noise_term") if "describe" in (path.get("noise_term") or {}) else None,
            fit_ok=bool(fit.get("ok")), fit_reason=fit.get("reason") or "", fit_residual=fit.get("residual", 0.0),
            describe=fit.get("describe", ""), direction=fit.get("direction", ""),
            end_t=ends["t"][1] if ends else None, end_a=ends["a"][1] if ends else None,
            end_b=ends["b"][1] if ends else None,
            velocity_combination=(combo["x0"], combo["x1"]) if combo else None,
            v_combination=(v_combo["x0"], v_combo["x1"], v_combo["residual"]) if v_combo else None,
            v_target_returned=path.get("v_target_returned", True),
            v_target=Match.of(path, source_is_noise) if "cos_median" in path else None)


@dataclass(frozen=True)
class ImpliedEvidence:
    """What the loss trains the velocity module's raw output toward, read from the loss gradient."""

    ok: bool = False
    reason: str = ""
    module: str = ""
    how: str = ""
    declared: bool = False  # the module is the pipeline field 'velocity' (else found by forward hooks)
    v_pred_is_raw: Optional[bool] = None
    calls: int = 1
    negative_share: float = 0.0
    weight_describe: str = ""
    weight_spread: float = float("nan")
    zero_weight_share: float = 0.0
    compared: bool = False
    not_compared: str = ""
    match: Optional[Match] = None
    inferred: tuple[str, ...] = ()  # for a loss-only step: what was inferred from where
    describe: str = ""
    direction: str = ""

    @classmethod
    def of(cls, implied: dict[str, Any], source_is_noise: bool) -> "ImpliedEvidence":
        if not implied.get("ok"):
            return cls(reason=implied.get("reason", "?"))
        weight = implied["weight"]
        compared = bool(implied.get("compared"))
        return cls(ok=True, module=implied["module"], how=implied["how"], declared=bool(implied.get("declared")),
                   v_pred_is_raw=implied.get("v_pred_is_raw"), calls=implied.get("calls", 1),
                   negative_share=weight["negative_share"], weight_describe=weight["describe"],
                   weight_spread=weight.get("spread", float("nan")),
                   zero_weight_share=implied["zero_weight_share"], compared=compared,
                   not_compared=implied.get("not_compared", ""),
                   match=Match.of(implied, source_is_noise) if compared else None,
                   inferred=tuple(implied.get("inferred", ())), describe=implied.get("describe", ""),
                   direction=implied.get("direction", ""))


@dataclass(frozen=True)
class GradientEvidence:
    """The gradient paths of one fresh step (module -> gradient norm per loss term)."""

    modules: dict[str, str]  # module key -> 'trainable' or 'frozen'
    grads: dict[str, dict[str, Any]]  # loss term (and 'fm_loss via xt' ...) -> {"modules", "roles"}
    velocity: tuple[str, ...]
    head: tuple[str, ...]
    has_head: bool
    has_mu: bool
    xt_returned: bool
    fm_key: Optional[str]
    moving: tuple[str, ...]  # trainable parameters v_target's graph reaches
    notes: tuple[str, ...]  # what kept the gradient map from being taken
    notes_info: tuple[str, ...]
    terms_without_graph: tuple[str, ...]
    kl: KlPath

    @classmethod
    def of(cls, grad: dict[str, Any]) -> "GradientEvidence":
        without = tuple(grad["terms_without_graph"])
        kl = KlPath.GRAPH if "kl" in grad["grads"] else (
            KlPath.NO_GRAPH if "kl" in without else KlPath.ABSENT if "kl" in grad["terms_absent"]
            else KlPath.UNMEASURED)
        return cls(modules=dict(grad["modules"]), grads=grad["grads"], velocity=tuple(grad["roles"]["velocity"]),
                   head=tuple(grad["roles"]["head"]), has_head=bool(grad["has_head"]), has_mu=bool(grad["has_mu"]),
                   xt_returned=bool(grad.get("xt_returned", True)), fm_key=grad["fm_key"],
                   moving=tuple(grad["moving_target"]), notes=tuple(grad["notes"]),
                   notes_info=tuple(grad.get("notes_info", ())), terms_without_graph=without, kl=kl)

    def trainable(self, module: str) -> bool:
        return self.modules.get(module) == "trainable"

    @property
    def fm(self) -> Optional[dict[str, Any]]:
        return self.grads.get(self.fm_key) if self.fm_key is not None else None

    def fm_tiny(self) -> float:
        fm = self.fm
        return ZERO_REL * max([*fm["modules"].values(), 0.0]) if fm else 0.0

    def through_target(self) -> dict[str, float]:
        """Modules fm_loss's gradient reaches through v_target (the target is not detached)."""
        via = self.grads.get(f"{self.fm_key} via v_target") if self.fm_key is not None else None
        tiny = self.fm_tiny()
        return {m: n for m, n in via["modules"].items() if n > tiny and n > 0} if via is not None else {}

    def velocity_norm(self) -> Optional[float]:
        """fm_loss's gradient norm into the velocity net (None: no fm term or no velocity role)."""
        return self.fm["roles"]["velocity"] if self.fm is not None and self.velocity else None

    def head_via_xt(self) -> Optional[float]:
        """fm_loss's gradient into the head through x_t (None: not measurable here)."""
        if self.fm is None or not self.has_head or not self.xt_returned:
            return None
        via = self.grads.get(f"{self.fm_key} via xt")
        return via["roles"]["head"] if via else 0.0

    def kl_others(self) -> dict[str, float]:
        """Trainable modules other than the head that kl sends gradient into."""
        if self.kl is not KlPath.GRAPH:
            return {}
        kl = self.grads["kl"]
        tiny = ZERO_REL * max([*kl["modules"].values(), 0.0])
        return {m: n for m, n in kl["modules"].items()
                if self.trainable(m) and m not in self.head and n > tiny and n > 0}

    def kl_to_head(self) -> Optional[float]:
        return self.grads["kl"]["roles"]["head"] if self.kl is KlPath.GRAPH and self.has_head else None

    def frozen_hits(self) -> dict[str, float]:
        """Frozen modules any loss term sends gradient into (the largest norm per module)."""
        hits: dict[str, float] = {}
        for label in ("loss", "fm_loss", "kl"):
            entry = self.grads.get(label)
            if entry:
                for module, norm in entry["modules"].items():
                    if self.modules.get(module) == "frozen" and norm > 0:
                        hits[module] = max(hits.get(module, 0.0), norm)
        return hits

    def silent(self) -> Optional[list[str]]:
        """Trainable modules (besides the velocity net and the head) no loss term reaches; None without a map."""
        if not self.grads:
            return None
        silent = [m for m, group in self.modules.items() if group == "trainable"
                  and sum(self.grads[k]["modules"].get(m, 0.0) for k in ("loss", "fm_loss", "kl")
                          if k in self.grads) <= 0]
        already = set(self.velocity) | (set(self.head) if self.has_head else set())
        return [m for m in silent if m not in already]


@dataclass(frozen=True)
class PrecisionEvidence:
    dtypes: dict[str, Optional[str]]  # x0, x1, xt, v_target, v_pred -> 'torch.float32' ...
    half_exact: dict[str, dict[str, float]]  # x0, x1, xt -> share of values exact in float16 / bfloat16

    @classmethod
    def of(cls, prec: dict[str, Any]) -> "PrecisionEvidence":
        return cls(dtypes=dict(prec["dtypes"]), half_exact=dict(prec["half_exact_share"]))

    def xt_half_dtype(self) -> bool:
        d = self.dtypes
        return d["xt"] in HALF and d["x0"] in FULL and d["x1"] in FULL

    def xt_quantised(self) -> Optional[tuple[str, float, float]]:
        """(half, share of x_t exact in it, the same share of x0/x1) for a float x_t computed in half precision."""
        if "xt" not in self.half_exact or self.dtypes["xt"] not in FULL:
            return None
        for half in ("float16", "bfloat16"):
            xt_share = self.half_exact["xt"][half]
            base = max(self.half_exact.get("x0", {}).get(half, 0.0), self.half_exact.get("x1", {}).get(half, 0.0))
            if xt_share >= 0.99 and xt_share - base >= 0.5:
                return half, xt_share, base
        return None

    def dtypes_differ(self) -> bool:
        d = self.dtypes
        return d["v_pred"] is not None and d["v_target"] is not None and d["v_pred"] != d["v_target"]

    def target_half(self) -> bool:
        return self.dtypes_differ() and self.dtypes["v_target"] in HALF and self.dtypes["x0"] in FULL


@dataclass(frozen=True)
class Evidence:
    path: PathEvidence
    implied: ImpliedEvidence
    gradients: GradientEvidence
    precision: PrecisionEvidence

    @classmethod
    def from_observation(cls, obs: dict[str, Any]) -> "Evidence":
        path = PathEvidence.of(obs["path"])
        implied = ImpliedEvidence.of(obs.get("implied", {"ok": False, "reason": "not run"}), path.source_is_noise)
        return cls(path=path, implied=implied, gradients=GradientEvidence.of(obs["autograd"]),
                   precision=PrecisionEvidence.of(obs["precision"]))
