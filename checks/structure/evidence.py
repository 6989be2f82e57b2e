"""What `structure` judges: its thresholds and its typed evidence, built from the observation ``measure`` returns
(judge tests build it by hand)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pydantic import Field

from fmcheck.api import Thresholds

from .._modes import describe
from . import maths


class StructureThresholds(Thresholds):
    time_dominates_ratio: float = Field(
        1.0, gt=0, description="(output change with t permuted) / (output change with x_t permuted) above this "
                               "warns: at init the time conditioning moves the velocity more than the whole x_t does")
    time_ignored_ratio: float = Field(
        0.01, ge=0, description="the same ratio below this warns: the velocity barely depends on t (t in the wrong "
                                "units for its embedding, or t dropped)")
    time_features_aliased: float = Field(
        0.25, gt=0, le=1, description="the smoothest time feature's mean squared step between samples adjacent in t, "
                                     "over twice its variance, above this warns: every feature jumps at random "
                                     "between neighbouring t (t too large for a sinusoidal embedding)")
    time_features_min: float = Field(
        0.01, ge=0, description="when the net is blind to t at its current weights (zero-initialised blocks), its "
                                "time features (the first layer input that follows t) must vary across the batch "
                                "by at least this (||F - mean|| / ||F||); below, t is in the wrong units")


# -- evidence ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TimeFeatures:
    """The first layer input that follows t and not x_t: how much it varies across the batch, how rough it is along
    t, and where it meets x_t (None: it never does within the layers looked at)."""

    module: str
    spread: float
    mixes: Optional[str] = None
    roughness: Optional[float] = None


@dataclass(frozen=True)
class Balance:
    """The relative output changes with t and with x_t permuted across the batch, and what t the net receives."""

    measured: bool
    reason: Optional[str] = None
    state: Optional[str] = None  # maths.FLAT when the output moves with neither
    ratio: Optional[float] = None
    t_change: float = 0.0
    x_change: float = 0.0
    noise: float = 0.0
    where: str = "output"
    t_slot: Optional[str] = None
    t_slope: Optional[float] = None
    t_offset: Optional[float] = None
    t_range: tuple[float, float] = (0.0, 0.0)
    features: Optional[TimeFeatures] = None

    @classmethod
    def from_observation(cls, b: dict[str, Any]) -> "Balance":
        if not b.get("measured"):
            return cls(measured=False, reason=b.get("reason"))
        f = b.get("features")
        features = TimeFeatures(f["module"], f["spread"], f.get("mixes"), f.get("roughness")) if f else None
        return cls(measured=True, state=b["state"], ratio=b["ratio"], t_change=b["t_change"],
                   x_change=b["x_change"], noise=b["noise"], where=b.get("where", "output"), t_slot=b.get("t_slot"),
                   t_slope=b.get("t_slope"), t_offset=b.get("t_offset"), t_range=tuple(b["t_range"]),
                   features=features)

    def state_under(self, th: StructureThresholds) -> str:
        f = self.features
        return maths.time_state(self.measured, self.state, self.ratio, self.t_change, self.noise,
                                f.spread if f else None, bool(f and f.mixes is not None),
                                th.time_dominates_ratio, th.time_ignored_ratio, th.time_features_min)

    @property
    def units(self) -> str:
        """What the net receives for t, as a phrase appended to a message ('' when the step returns no t)."""
        if self.t_slope is None:
            return ""
        return f"; the net receives {self.t_slope:.4g} * t, range {self.t_range[0]:.3g}..{self.t_range[1]:.3g}"


@dataclass(frozen=True)
class Precision:
    autocast: Optional[bool] = None
    autocast_dtype: Optional[str] = None
    autocast_device: Optional[str] = None
    param_dtype: Optional[str] = None
    v_pred: Optional[str] = None
    scaler: bool = False
    scaler_enabled: bool = False

    @property
    def fp16(self) -> list[str]:
        return maths.fp16_sources(self.autocast, self.autocast_dtype, self.autocast_device, self.param_dtype,
                                  self.v_pred)

    @property
    def scaler_state(self) -> str:
        return "enabled" if self.scaler_enabled else ("disabled" if self.scaler else "none")


@dataclass(frozen=True)
class NonFinite:
    batch: int
    key: str
    count: int


@dataclass(frozen=True)
class FrozenModule:
    """One frozen module (``Pipeline.frozen_modules``: declared ``frozen`` and the VAE), seen before and after the
    step. ``active``: its mode-dependent layers in train mode, by kind (checks/_modes.py)."""

    name: str
    training: bool = False
    switched_by_step: bool = False
    active: tuple[tuple[str, int], ...] = ()
    tensors: int = 0
    grad_tensors: int = 0
    grad_elements: int = 0
    grad_names: tuple[str, ...] = ()
    grad_by_step: bool = False
    optimizer_tensors: int = 0
    optimizer_elements: int = 0
    optimizer_grad_elements: int = 0  # of those, the ones that require grad: the optimizer updates these

    @classmethod
    def from_observation(cls, name: str, m: dict[str, Any]) -> "FrozenModule":
        return cls(name=name, training=m["training"], switched_by_step=m.get("switched_by_step", False),
                   active=tuple((k, n) for k, n in m["active"].items() if n), tensors=m["tensors"],
                   grad_tensors=m["grad_tensors"], grad_elements=m["grad_elements"],
                   grad_names=tuple(m["grad_names"]), grad_by_step=m.get("grad_by_step", False),
                   optimizer_tensors=m.get("optimizer_tensors", 0), optimizer_elements=m.get("optimizer_elements", 0),
                   optimizer_grad_elements=m.get("optimizer_grad_elements", m.get("optimizer_elements", 0)))

    @property
    def layers(self) -> str:
        return describe(dict(self.active))


@dataclass(frozen=True)
class StructureEvidence:
    balance: Balance
    precision: Precision
    non_finite: tuple[NonFinite, ...] = ()
    frozen: tuple[FrozenModule, ...] = ()

    @classmethod
    def from_observation(cls, obs: dict[str, Any]) -> "StructureEvidence":
        p = obs["precision"]
        precision = Precision(**{k: p.get(k) for k in ("autocast", "autocast_dtype", "autocast_device",
                                                       "param_dtype", "v_pred")},
                              scaler=bool(p.get("scaler")), scaler_enabled=bool(p.get("scaler_enabled")))
        return cls(balance=Balance.from_observation(obs["balance"]), precision=precision,
                   non_finite=tuple(NonFinite(f["batch"], f["key"], f["count"]) for f in obs["non_finite"]),
                   frozen=tuple(FrozenModule.from_observation(n, m) for n, m in obs["modes"].items()))
