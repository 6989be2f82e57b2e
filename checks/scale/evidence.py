"""The `scale` check's evidence: what the analysis concluded from the observation, in plain typed numbers.

:func:`.analysis.analyse` builds it from what ``measure`` returned; the rules (:mod:`.rules`) read it and nothing
else. Judge tests build it by hand. No torch, no user code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

IDENTICAL = 1e-5  # relative difference under which two encodes of the same pixels are the same


@dataclass(frozen=True)
class Transform:
    """Encode's side: which convention the map from the raw latent to the user's z1 is.

    ``best`` is the key of the closest candidate (``once`` for the configured transform, else a mistake:
    ``missing``, ``twice``, ``inverted``, ``shift_missing``, ...); ``label`` its words. ``matches_correct``: within
    ``tolerance`` of the configured transform; ``matches_other``: a named mistake explains z1 clearly better.
    ``distance`` is z1's distance from the configured transform (RMS of the difference over the latents, in units of
    the correctly scaled latent's RMS)."""

    best: str
    label: str
    matches_correct: bool
    matches_other: bool
    distance: float
    tolerance: float
    source: str = "sample"  # the raw latent z1 is a map of: sample, mean, own_sample, unexplained, layout
    description: str = ""  # "z1 = 0.03 x, config: z = x * 0.18215", for the messages
    formula: str = ""  # the configured transform, e.g. "z = x * 0.18215"
    z1_finite: bool = True
    z1_std: float = 1.0
    z1_mean: float = 0.0
    raw_std: float = 1.0  # std of posterior samples: 1 / raw_std is the implied scaling_factor
    configured_std: float = 1.0  # std of the latents under the configured transform
    slope: float = math.nan  # z1's overall slope and offset against the raw latent
    offset: float = math.nan
    slope_ratio: float = math.nan  # z1's slope / the configured slope (mean over channels)
    mean_error: float = math.nan  # z1's mean - the configured latent's mean
    method: str = "per-channel affine fit"
    indistinguishable: tuple[tuple[str, float], ...] = ()  # mistakes this data cannot tell from the configured one
    ranking: tuple[tuple[str, float], ...] = ()
    per_channel_slope: Optional[tuple[float, ...]] = None
    per_channel_offset: Optional[tuple[float, ...]] = None
    norm: float = 1.0  # RMS of the correctly scaled latent: the unit of the distances


@dataclass(frozen=True)
class ConfigFit:
    """How the VAE's configured transform fits this VAE's latents: their std (and mean) under it, and what the raw
    latents imply instead. ``snippet``: the config lines to paste (`fmcheck scale --vae` computes them), or empty."""

    formula: str
    std: float
    mean: float
    raw_mean: float
    recommended_scale: float
    images: int
    snippet: str = ""


@dataclass(frozen=True)
class Sampling:
    """Whether z1 is a fresh posterior sample: its source, the posterior's sigma relative to the latent's std, the
    difference between two encodes of the same pixels, and (source ``unexplained``) the share of z1's variance no
    affine map of the latent explains."""

    source: str
    sigma_rel: float
    repeat_diff: Optional[float] = None
    unexplained: float = math.nan

    @property
    def identical(self) -> bool:
        return self.repeat_diff is not None and self.repeat_diff <= IDENTICAL


@dataclass(frozen=True)
class RoundTrip:
    """decode(encode(x)): the relative RMS error of the latent decode hands ``vae.decode`` against the raw latent
    (or of decode's pixels against the VAE's own, when decode bypasses it); ``resolution`` is the smallest error the
    fit can call. ``decode`` names decode's own map when it could be identified: ``inverse`` (it inverts the
    configured transform: encode is what deviates), a mistake's key (``forward``, ``none``, ``twice``,
    ``shift_missing``, ``shift_sign``), or None."""

    error: float
    resolution: float = 0.0
    slope: Optional[float] = None  # decode(encode(x)) feeds vae.decode slope * raw + offset
    offset: Optional[float] = None
    decode: Optional[str] = None
    decode_label: str = ""
    method: str = "latent fed to vae.decode vs the raw latent"
    images: int = 0
    ranking: tuple[tuple[str, float], ...] = ()  # decode's candidates, closest first (when decode's map is known)


@dataclass(frozen=True)
class HalfProbe:
    """A float16 copy of the VAE on a few images: are its latents and decoded pixels finite?"""

    images: int
    latent_finite: bool
    decode_finite: bool
    latent_error: Optional[float] = None

    @property
    def finite(self) -> bool:
        return self.latent_finite and self.decode_finite


@dataclass(frozen=True)
class Evidence:
    """Everything the `scale` rules read. ``round_trip`` is None when decode was not measured; ``half`` when the
    float16 probe did not run; ``pixels`` (low, high) when the VAE's input was not seen. ``standalone`` marks
    `fmcheck scale --vae` (no pipeline: only the configuration and the float16 probe are judged)."""

    config: ConfigFit
    transform: Optional[Transform] = None
    sampling: Optional[Sampling] = None
    round_trip: Optional[RoundTrip] = None
    half: Optional[HalfProbe] = None
    pixels: Optional[tuple[float, float]] = None
    standalone: bool = False
