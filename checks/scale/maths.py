"""Pure maths of the `scale` check: latent statistics, per-channel affine fits, and naming a latent convention.

Everything that names a convention works on small per-channel affine maps ``z = slope[c] * x + offset[c]`` in plain
Python (a VAE has a handful of latent channels); :mod:`.tensors` reduces the latents to these numbers. Nothing here
touches a tensor, a pipeline or a VAE.

A *configured* transform follows diffusers' conventions (``vae.config``):

- ``latents_mean`` / ``latents_std`` given (SDXL-style configs, Wan, Qwen-Image): ``z = (x - mean[c]) * s / std[c]``
- ``shift_factor`` given (SD3, Flux): ``z = (x - shift) * s``
- else (SD 1.x/2.x, SDXL): ``z = x * s``

with ``s = scaling_factor`` (1 when the config has none, as in Wan's and Qwen-Image's VAEs), and decoding applies the
inverse. The user's transform is measured as the least-squares affine map from the raw latent to their ``z1``, and
compared with that configured map and with the ways it is commonly got wrong (applied twice, missing, inverted,
shift/mean ignored, ...) by a distance in the units of correctly scaled latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

# ---------------------------------------------------------------------------------------------- affine maps


@dataclass(frozen=True)
class ChannelMap:
    """A per-channel affine map ``z[c] = slope[c] * x[c] + offset[c]``."""

    slope: tuple[float, ...]
    offset: tuple[float, ...]

    @classmethod
    def identity(cls, channels: int) -> "ChannelMap":
        return cls((1.0,) * channels, (0.0,) * channels)

    @classmethod
    def uniform(cls, slope: float, offset: float, channels: int) -> "ChannelMap":
        return cls((float(slope),) * channels, (float(offset),) * channels)

    @property
    def channels(self) -> int:
        return len(self.slope)

    def after(self, inner: "ChannelMap") -> "ChannelMap":
        """``self(inner(x))``."""
        return ChannelMap(tuple(a * k for a, k in zip(self.slope, inner.slope)),
                          tuple(a * m + b for a, m, b in zip(self.slope, inner.offset, self.offset)))

    def inverse(self) -> "ChannelMap":
        return ChannelMap(tuple(1.0 / a if a != 0 else math.inf for a in self.slope),
                          tuple(-b / a if a != 0 else math.inf for a, b in zip(self.slope, self.offset)))

    def mean_slope(self) -> float:
        return sum(self.slope) / len(self.slope)

    def mean_offset(self) -> float:
        return sum(self.offset) / len(self.offset)


@dataclass(frozen=True)
class Moments:
    """Per-channel mean and variance of a latent (every channel holds the same number of elements)."""

    mean: tuple[float, ...]
    var: tuple[float, ...]

    @property
    def channels(self) -> int:
        return len(self.mean)

    def overall_mean(self) -> float:
        return sum(self.mean) / len(self.mean)

    def overall_var(self) -> float:
        """Variance over all elements (within-channel variance plus the spread of the channel means)."""
        mean = self.overall_mean()
        return sum(v + (m - mean) ** 2 for m, v in zip(self.mean, self.var)) / len(self.mean)

    def overall_std(self) -> float:
        return math.sqrt(max(self.overall_var(), 0.0))

    def rms(self) -> float:
        return math.sqrt(sum(v + m * m for m, v in zip(self.mean, self.var)) / len(self.mean))

    def std(self) -> tuple[float, ...]:
        return tuple(math.sqrt(max(v, 0.0)) for v in self.var)

    def plus_variance(self, extra: Sequence[float]) -> "Moments":
        return Moments(self.mean, tuple(v + e for v, e in zip(self.var, extra)))

    def mapped(self, fmap: ChannelMap) -> "Moments":
        """The moments of ``fmap(x)``."""
        return Moments(tuple(k * m + b for k, m, b in zip(fmap.slope, self.mean, fmap.offset)),
                       tuple(k * k * v for k, v in zip(fmap.slope, self.var)))


def map_distance(a: ChannelMap, b: ChannelMap, inputs: Moments, norm: float) -> float:
    """RMS of ``a(x) - b(x)`` over inputs with these per-channel moments, divided by ``norm``.

    For one channel, E[((ka - kb) x + (ma - mb))^2] = (ka - kb)^2 var + ((ka - kb) mean + ma - mb)^2.
    """
    total = 0.0
    for ka, ma, kb, mb, mean, var in zip(a.slope, a.offset, b.slope, b.offset, inputs.mean, inputs.var):
        dk, dm = ka - kb, ma - mb
        total += dk * dk * var + (dk * mean + dm) ** 2
    value = math.sqrt(total / max(len(a.slope), 1))
    return value / norm if norm > 0 else math.inf


def moment_distance(observed: tuple[float, float], candidate: ChannelMap, inputs: Moments, norm: float) -> float:
    """Distance of an observed overall (mean, std) from what ``candidate`` makes of the inputs (layout-free)."""
    out = inputs.mapped(candidate)
    mean, std = observed
    value = math.hypot(std - out.overall_std(), mean - out.overall_mean())
    return value / norm if norm > 0 else math.inf


# ------------------------------------------------------------------------------------------ the configuration


@dataclass(frozen=True)
class Configured:
    """The latent normalisation a VAE config declares (diffusers field names)."""

    channels: int
    scaling_factor: Optional[float] = None
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple[float, ...]] = None
    latents_std: Optional[tuple[float, ...]] = None
    notes: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Any, channels: int) -> "Configured":
        """Read the fields from a diffusers config (FrozenDict, dict or object); ignore malformed per-channel lists."""

        def get(name: str) -> Any:
            if isinstance(config, dict):
                return config.get(name)
            return getattr(config, name, None)

        notes: list[str] = []

        def number(name: str) -> Optional[float]:
            value = get(name)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                notes.append(f"config {name}={value!r} is not a finite number; ignored")
                return None
            return float(value)

        def per_channel(name: str) -> Optional[tuple[float, ...]]:
            value = get(name)
            if value is None:
                return None
            values = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else ()
            if len(values) != channels:
                notes.append(f"config {name} has {len(values)} values for {channels} latent channels; ignored")
                return None
            return values

        scaling, shift = number("scaling_factor"), number("shift_factor")
        mean, std = per_channel("latents_mean"), per_channel("latents_std")
        if (mean is None) != (std is None):
            present = "latents_mean" if mean is not None else "latents_std"
            notes.append(f"config has {present} without its partner; the pair is ignored")
            mean = std = None
        if std is not None and any(v <= 0 for v in std):
            notes.append("config latents_std has a non-positive value; latents_mean/latents_std ignored")
            mean = std = None
        return cls(channels, scaling, shift, mean, std, tuple(notes))

    @property
    def scale(self) -> float:
        return self.scaling_factor if self.scaling_factor is not None else 1.0

    @property
    def per_channel(self) -> bool:
        return self.latents_mean is not None

    def center(self) -> tuple[float, ...]:
        """What is subtracted before scaling, per channel."""
        mean = self.latents_mean or (0.0,) * self.channels
        return tuple(m + (self.shift_factor or 0.0) for m in mean)

    def divisor(self) -> tuple[float, ...]:
        return self.latents_std or (1.0,) * self.channels

    def map(self) -> ChannelMap:
        """The configured encode-side transform raw -> z."""
        s = self.scale
        slope = tuple(s / d for d in self.divisor())
        return ChannelMap(slope, tuple(-c * k for c, k in zip(self.center(), slope)))

    def formula(self) -> str:
        s = f"{self.scale:.4g}"
        if self.per_channel:
            shift = f" - {self.shift_factor:.4g}" if self.shift_factor else ""
            return f"z = (x - latents_mean{shift}) * {s} / latents_std"
        if self.shift_factor:
            return f"z = (x - {self.shift_factor:.4g}) * {s}"
        return f"z = x * {s}"

    def as_dict(self) -> dict[str, Any]:
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "latents_mean": list(self.latents_mean) if self.latents_mean else None,
                "latents_std": list(self.latents_std) if self.latents_std else None}


@dataclass(frozen=True)
class Candidate:
    key: str  # stable identifier, e.g. "twice"
    label: str  # what the user's code does, for the summary
    map: ChannelMap
    correct: bool = False


def _close(a: ChannelMap, b: ChannelMap) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a.slope + a.offset, b.slope + b.offset))


def _dedupe(candidates: list[Candidate]) -> list[Candidate]:
    """Drop a mistake whose map equals an earlier mistake's. One equal to the correct map is kept: with this config
    that mistake is invisible (e.g. 'missing' when scaling_factor is 1), and ``identify`` reports it as such."""
    correct = next(c for c in candidates if c.correct)
    kept: list[Candidate] = []
    for candidate in candidates:
        if candidate.correct or _close(candidate.map, correct.map) or \
                not any(_close(candidate.map, k.map) for k in kept if not k.correct):
            kept.append(candidate)
    return kept


def encode_candidates(cfg: Configured) -> list[Candidate]:
    """The configured transform and the usual ways of getting it wrong, as maps raw -> z1."""
    once = cfg.map()
    n = cfg.channels
    s = cfg.scale
    zero = (0.0,) * n
    candidates = [
        Candidate("once", "scaling applied once (the configured transform)", once, correct=True),
        Candidate("missing", "scaling missing: z1 is the raw latent", ChannelMap.identity(n)),
        Candidate("twice", "scaling applied twice", once.after(once)),
        Candidate("inverted", "scaling inverted: the decode-side transform (divide) used in encode", once.inverse()),
    ]
    centre = cfg.center()
    if cfg.per_channel:
        candidates += [
            Candidate("std_ignored", "latents_std ignored: centred and scaled but not divided by latents_std",
                      ChannelMap((s,) * n, tuple(-c * s for c in centre))),
            Candidate("scalar_only", "latents_mean/latents_std ignored: only scaling_factor applied",
                      ChannelMap((s,) * n, zero)),
        ]
    if any(c != 0 for c in centre):
        what = ("shift_factor" if not cfg.per_channel else
                "latents_mean" if not cfg.shift_factor else "latents_mean/shift_factor")
        candidates += [
            Candidate("shift_missing", f"{what} ignored: scaled but not centred", ChannelMap(once.slope, zero)),
            Candidate("shift_sign", f"{what} added instead of subtracted",
                      ChannelMap(once.slope, tuple(-m for m in once.offset))),
            Candidate("shift_after_scale", f"{what} subtracted after scaling instead of before",
                      ChannelMap(once.slope, tuple(-c for c in centre))),
            Candidate("scale_missing_shift_applied", f"{what} subtracted but the scaling missing",
                      ChannelMap((1.0,) * n, tuple(-c for c in centre))),
        ]
    return _dedupe(candidates)


def decode_candidates(cfg: Configured) -> list[Candidate]:
    """The configured inverse and the usual ways of getting it wrong, as maps z1 -> the latent fed to vae.decode."""
    once = cfg.map()
    inverse = once.inverse()
    n = cfg.channels
    candidates = [
        Candidate("inverse", "decode inverts the configured transform", inverse, correct=True),
        Candidate("forward", "decode applies the encode-side transform (multiplies instead of divides)", once),
        Candidate("none", "decode feeds z1 to the VAE unchanged (no unscaling)", ChannelMap.identity(n)),
        Candidate("twice", "decode unscales twice", inverse.after(inverse)),
    ]
    if any(c != 0 for c in cfg.center()):
        candidates += [
            Candidate("shift_missing", "decode does not add the shift/mean back",
                      ChannelMap(inverse.slope, (0.0,) * n)),
            Candidate("shift_sign", "decode subtracts the shift/mean instead of adding it back",
                      ChannelMap(inverse.slope, tuple(-m for m in inverse.offset))),
        ]
    return _dedupe(candidates)


def rank(candidates: list[Candidate], distance) -> list[tuple[Candidate, float]]:
    """Candidates with their distance to the observation, closest first (stable for ties)."""
    scored = [(c, float(distance(c.map))) for c in candidates]
    return sorted(scored, key=lambda item: item[1])


@dataclass(frozen=True)
class Identification:
    best: str  # candidate key
    label: str
    distance_best: float
    distance_correct: float
    tolerance: float
    # Candidates the data cannot tell apart from the configured transform (blind spot), with their separation.
    indistinguishable: tuple[tuple[str, float], ...] = ()
    ranking: tuple[tuple[str, float], ...] = ()

    @property
    def matches_correct(self) -> bool:
        return self.distance_correct <= self.tolerance

    @property
    def matches_other(self) -> bool:
        """A named wrong convention explains the data clearly better than the configured one."""
        return (not self.matches_correct and self.best not in ("once", "inverse")
                and self.distance_best <= max(self.tolerance, 0.25 * self.distance_correct))


def identify(candidates: list[Candidate], distance, separation, tolerance: float) -> Identification:
    """Name the candidate closest to the observation.

    ``distance(map)``: the observation's distance to a candidate map; ``separation(map)``: a candidate's distance to
    the correct one, in the same units. Candidates within ``2 * tolerance`` of the correct map cannot be told apart
    from it by this data: they are listed as indistinguishable instead of being named.
    """
    correct = next(c for c in candidates if c.correct)
    indistinguishable = tuple((c.key, float(separation(c.map))) for c in candidates
                              if not c.correct and separation(c.map) <= 2 * tolerance)
    hidden = {key for key, _ in indistinguishable}
    ranked = rank([c for c in candidates if c.key not in hidden], distance)
    best, best_distance = ranked[0]
    return Identification(best=best.key, label=best.label, distance_best=best_distance,
                          distance_correct=float(distance(correct.map)), tolerance=tolerance,
                          indistinguishable=indistinguishable,
                          ranking=tuple((c.key, d) for c, d in ranked))


@dataclass(frozen=True)
class Fit:
    """An affine fit per channel and over all elements, in plain numbers."""

    per_channel: ChannelMap
    overall: tuple[float, float]  # slope, offset
    resid: tuple[float, ...]  # residual variance per channel
    resid_overall: float
    x: Moments
    y: Moments
    count: int  # elements per channel

    @classmethod
    def from_rows(cls, per_channel_rows: list[list[float]], overall_rows: list[list[float]]) -> "Fit":
        slope, offset, resid, var_x, mean_x, var_y, mean_y, count = per_channel_rows
        o = [row[0] for row in overall_rows]
        return cls(ChannelMap(tuple(slope), tuple(offset)), (o[0], o[1]), tuple(resid), o[2],
                   Moments(tuple(mean_x), tuple(var_x)), Moments(tuple(mean_y), tuple(var_y)), int(count[0]))

    def unexplained(self) -> float:
        """Share of y's variance the per-channel affine map leaves unexplained."""
        var_y = sum(self.y.var) / len(self.y.var)
        return sum(self.resid) / len(self.resid) / var_y if var_y > 0 else 0.0

    def map_standard_error(self, inputs: Optional[Moments] = None) -> float:
        """RMS standard error of the fitted map's predictions over inputs with these moments (default: the fit's x).

        OLS: the prediction at x has variance resid / n * (1 + (x - mean_x)^2 / var_x); averaged over inputs of
        mean m and variance v that is resid / n * (1 + (v + (m - mean_x)^2) / var_x). Inputs wider than the fit's x
        (posterior samples, when the fit is against the posterior mean) widen it.
        """
        inputs = inputs or self.x
        total = 0.0
        for resid, var_x, mean_x, mean, var in zip(self.resid, self.x.var, self.x.mean, inputs.mean, inputs.var):
            spread = (var + (mean - mean_x) ** 2) / var_x if var_x > 0 else 0.0
            total += resid / max(self.count, 1) * (1.0 + spread)
        return math.sqrt(total / len(self.resid))


# ---------------------------------------------------------------------------------------------- recommendations


@dataclass(frozen=True)
class Recommendation:
    scaling_factor: float  # 1 / std of posterior samples (the latent-diffusion recipe)
    shift_factor: Optional[float]  # the samples' mean, when it matters (None otherwise)
    shift_relative: float  # |mean| / std
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    per_channel_advised: bool
    channel_std_spread: float  # max / min channel std
    channel_mean_spread: float  # (max - min) channel mean / overall std
    images: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def snippet(self) -> str:
        """What to put in the VAE's config.json: the JSON lines are indented, ready to paste."""
        fmt = lambda v: f"{v:.5g}"  # noqa: E731
        shift = fmt(self.shift_factor) if self.shift_factor is not None else "null"
        per_channel = "advised: the channels differ" if self.per_channel_advised else "optional"
        return "\n".join([
            f"recommended for the VAE's config.json (from {self.images} images; z = (x - shift_factor) * "
            "scaling_factor then has std 1):",
            f'  "scaling_factor": {fmt(self.scaling_factor)},',
            f'  "shift_factor": {shift}',
            f"or per channel ({per_channel}; z = (x - latents_mean) * scaling_factor / latents_std):",
            '  "scaling_factor": 1.0,',
            '  "latents_mean": [' + ", ".join(fmt(v) for v in self.latents_mean) + "],",
            '  "latents_std": [' + ", ".join(fmt(v) for v in self.latents_std) + "]",
        ])


def recommend(samples: Moments, images: int, shift_threshold: float = 0.1, channel_spread: float = 1.5,
              mean_spread: float = 0.25) -> Recommendation:
    """Recommend a normalisation from the moments of posterior samples (per channel).

    ``scaling_factor = 1 / std`` over all elements (as the latent-diffusion paper derived 0.18215); a
    ``shift_factor`` (the mean) only when ``|mean| / std > shift_threshold``; per-channel ``latents_mean/std``
    are advised when the channel stds differ by more than ``channel_spread`` times, or the channel means spread over
    more than ``mean_spread`` overall stds.
    """
    std = samples.overall_std()
    mean = samples.overall_mean()
    stds = samples.std()
    shift_relative = abs(mean) / std if std > 0 else math.inf
    std_spread = max(stds) / min(stds) if min(stds) > 0 else math.inf
    mean_spread_value = (max(samples.mean) - min(samples.mean)) / std if std > 0 else math.inf
    notes = []
    if std <= 0:
        notes.append("the latents have no variance on these images: no factor can be derived")
    return Recommendation(
        scaling_factor=1.0 / std if std > 0 else math.inf,
        shift_factor=mean if shift_relative > shift_threshold else None,
        shift_relative=shift_relative,
        latents_mean=tuple(samples.mean),
        latents_std=stds,
        per_channel_advised=std_spread > channel_spread or mean_spread_value > mean_spread,
        channel_std_spread=std_spread,
        channel_mean_spread=mean_spread_value,
        images=images,
        notes=tuple(notes),
    )
