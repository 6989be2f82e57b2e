"""What `structure` can conclude: one rule per cause, each a pure test over the evidence (evidence.py) and the
thresholds, with its message, fix and doc."""

from __future__ import annotations

from typing import Optional

from fmcheck.api import Hit, Rule
from fmcheck.verdict import Verdict

from . import maths
from .evidence import StructureEvidence, StructureThresholds


# -- the rules' tests ----------------------------------------------------------------------------------------------

def _ratio_bound(th: StructureThresholds) -> str:
    return f"{th.time_ignored_ratio:g}..{th.time_dominates_ratio:g}"


def _not_measured(ev: StructureEvidence, th: StructureThresholds) -> Optional[Hit]:
    b = ev.balance
    if b.state_under(th) != maths.NOT_MEASURED:
        return None
    return Hit.of(bound="measured", reason=b.reason)


def _inputs_ignored(ev: StructureEvidence, th: StructureThresholds) -> Optional[Hit]:
    b = ev.balance
    if b.state_under(th) != maths.FLAT:
        return None
    return Hit.of(observed=b.x_change, bound=f"> {maths.noise_floor(b.noise):.3g}", unit="rel",
                  t_change=f"{b.t_change:.3g}")


def _aliased(ev: StructureEvidence, th: StructureThresholds) -> Optional[Hit]:
    b = ev.balance
    f = b.features
    if b.state_under(th) == maths.FLAT or f is None or f.roughness is None \
            or not f.roughness > th.time_features_aliased:
        return None
    return Hit.of(observed=f.roughness, bound=f"<= {th.time_features_aliased:g}", unit="rel", module=f.module,
                  t_range=f"{b.t_range[0]:.4g}..{b.t_range[1]:.4g}")


def _dominates(ev: StructureEvidence, th: StructureThresholds) -> Optional[Hit]:
    b = ev.balance
    if b.state_under(th) != maths.DOMINATES:
        return None
    return Hit.of(observed=b.ratio, bound=f"<= {th.time_dominates_ratio:g}", unit="x",
                  t_change=f"{b.t_change:.3g}", x_change=f"{b.x_change:.3g}")


def _units(ev: StructureEvidence, th: StructureThresholds) -> Optional[Hit]:
    b = ev.balance
    if b.state_under(th) != maths.UNITS:
        return None
    return Hit.of(observed=b.features.spread, bound=f">= {th.time_features_min:g}", unit="rel",
                  module=b.features.module, units=b.units)


def _blind(ev: StructureEvidence, th: StructureThresholds) -> Optional[Hit]:
    b = ev.balance
    if b.state_under(th) != maths.BLIND:
        return None
    return Hit.of(observed=b.ratio, bound=f">= {th.time_ignored_ratio:g}", unit="x", t_change=f"{b.t_change:.3g}",
                  x_change=f"{b.x_change:.3g}", units=b.units)


def _ignored(ev: StructureEvidence, th: StructureThresholds) -> Optional[Hit]:
    b = ev.balance
    if b.state_under(th) != maths.IGNORED:
        return None
    return Hit.of(observed=b.ratio, bound=f">= {th.time_ignored_ratio:g}", unit="x", t_change=f"{b.t_change:.3g}",
                  x_change=f"{b.x_change:.3g}", units=b.units)


def _fp16_unscaled(ev: StructureEvidence, th: StructureThresholds) -> Optional[Hit]:
    p = ev.precision
    where = p.fp16
    if not where or p.scaler_enabled:
        return None
    return Hit.of(observed=", ".join(where), bound="an enabled grad_scaler", scaler=p.scaler_state)


def _non_finite(ev: StructureEvidence, th: StructureThresholds) -> Optional[Hit]:
    if not ev.non_finite:
        return None
    first = ev.non_finite[0]
    names = set(f.key for f in ev.non_finite)
    keys = ", ".join(repr(k) for k in dict.fromkeys(f.key for f in ev.non_finite))
    # only the kl and the loss that adds it: the kl's own finding (kl.nonfinite) names the cause
    subject = "kl" if names <= {"kl", "loss"} and "kl" in names else f"outputs {keys}"
    return Hit.of(observed=first.count, bound="0", unit="values", subject=subject, keys=keys, key=first.key,
                  batch=first.batch)


def _train_mode(ev: StructureEvidence, th: StructureThresholds) -> list[Hit]:
    hits = []
    for m in ev.frozen:
        if not m.active:
            continue
        state = ("in train mode (switched by the step)" if m.switched_by_step and m.training else
                 "in train mode" if m.training else "in eval with submodules in train mode")
        hits.append(Hit.of(observed=sum(n for _, n in m.active), bound="0", unit="layers", module=m.name,
                           state=state, layers=m.layers))
    return hits


def _requires_grad(ev: StructureEvidence, th: StructureThresholds) -> list[Hit]:
    return [Hit.of(observed=m.grad_tensors, bound="0", unit="tensors", subject=m.name, module=m.name,
                   tensors=m.tensors,
                   values=f"{m.grad_elements:,}", example=m.grad_names[0] if m.grad_names else "?",
                   by_step="; turned on by the step" if m.grad_by_step else "")
            for m in ev.frozen if m.grad_tensors]


def _in_optimizer(ev: StructureEvidence, th: StructureThresholds) -> list[Hit]:
    # FAIL when the optimizer will update them (they require grad); parameters without requires_grad get no
    # gradient, and torch's optimizers skip those: a WARN, the contradiction is still worth removing
    return [Hit.of(observed=m.optimizer_elements, bound="0", unit="parameters", module=m.name,
                   count=f"{m.optimizer_elements:,}", tensors=m.optimizer_tensors,
                   updated=("training moves a module declared frozen (for the VAE, the latent space the flow learns "
                            "to hit)") if m.optimizer_grad_elements else
                           "none requires grad, so nothing moves yet, but one requires_grad_(True) trains it",
                   verdict=Verdict.FAIL if m.optimizer_grad_elements else Verdict.WARN)
            for m in ev.frozen if m.optimizer_elements]


FIX_UNITS = ("Feed t in the units its embedding was built for (e.g. t in [0, 1] times the number of training "
             "timesteps for a DDPM-style sinusoidal embedding, or no extra division by it) and check that t reaches "
             "the net per sample.")

RULES = (
    Rule(
        code="structure.balance_not_measured", verdict=Verdict.WARN,
        title="The time balance probe could not run on this pipeline",
        message="time balance not measured: {reason}",
        fix="Let the check find the velocity net and its x_t and t arguments: declare the pipeline field "
            "'velocity', return the step's 'xt' and 't', and pass x_t and t to it as separate arguments.",
        test=_not_measured,
        doc="The balance needs the velocity net (the pipeline field `velocity`, or the trainable module called with "
            "the step's `xt`), its x_t argument and its t argument (the per-sample scalar correlating with the "
            "step's `t` at |r| >= 0.99), and a batch of at least 2 samples with distinct t. When any is missing the "
            "probe does not measure, and a probe that did not measure is never a PASS: a t x 1000 bug would go "
            "unnoticed. The message names what was missing. On a correct pipeline that packs x_t and t into one "
            "tensor or a nested container, declare `velocity` and pass them separately, or `--ignore` the code."),
    Rule(
        code="structure.inputs_ignored", verdict=Verdict.WARN,
        title="The velocity net moves with neither t nor x_t",
        message="time balance not measurable: the velocity net's output and last hidden activation move with "
                "neither t nor x_t (x_t permuted {observed}, t permuted {t_change}; expected {bound}, above the noise)",
        fix="Check that x_t and t reach the net (no detach into constants); a zero-initialised net is measured at "
            "its last hidden activation, so this one ignores both.",
        test=_inputs_ignored,
        doc="The balance permutes t and x_t across the batch and measures the relative output change. When neither "
            "moves the output above the repeat-call noise floor (10x the change between two identical calls, at "
            "least 1e-6), the same probes are repeated at the last hidden activation (the input of the last layer "
            "called: a zero-initialised output layer is expected). If that does not move either, the net ignores "
            "its inputs: x_t and t detached into constants, or a net whose every path is zeroed at these weights."),
    Rule(
        code="structure.time_features_aliased", verdict=Verdict.WARN,
        title="t is too large for its sinusoidal time embedding (every time feature aliases)",
        message="the time embedding aliases t: no time feature at {module} varies smoothly across the batch "
                "(smoothest {observed}, expected {bound}; the net receives {t_range}): t is too large for its "
                "embedding",
        fix="Feed t in the units the embedding was built for: e.g. diffusers' Flux transformer takes timesteps / "
            "1000 (it multiplies by 1000 itself), SD3 takes timesteps.",
        test=_aliased,
        doc="With the samples sorted by t, each time feature's (the first layer input that follows t and not x_t) "
            "mean squared step between neighbours over twice its variance is about 1 when it jumps at random "
            "between neighbouring t and small when it follows t; the smoothest feature is compared with "
            "`time_features_aliased` (judged with at least 16 distinct t). Measured 0.002-0.013 on the correct "
            "fixtures, 0.51 for Flux fed timesteps where it expects timesteps / 1000. An embedding whose lowest "
            "frequency is deliberately high can warn on correct code: raise the threshold or `--ignore` the code."),
    Rule(
        code="structure.time_embedding_loud", verdict=Verdict.WARN,
        title="The time conditioning dominates the velocity net at init",
        message="time dominates the velocity net: permuting t moves its output {t_change} vs {x_change} for x_t "
                "(ratio {observed}, expected {bound})",
        fix="Normalise the time embedding (LayerNorm after its MLP) or initialise its last layer small; check the "
            "amplitude of the sin/cos features and of the t argument.",
        test=_dominates,
        doc="The ratio ||f(t permuted) - f|| / ||f(x_t permuted) - f|| of the velocity net's relative output "
            "changes, at the current weights. x_t, a high-dimensional input on the main path, should move the "
            "output more than the scalar t: correct default-init designs measured 0.02-0.23, the digits net "
            "0.032-0.047; a time embedding 100x too loud measured 1.5 on digits (1.3-19 on other designs). Above "
            "`time_dominates_ratio` (1) warns. nn.Embedding's N(0, 1) default used as a timestep table is louder "
            "than default Linear features and also warns: that is the gotcha, not a false alarm."),
    Rule(
        code="structure.time_units", verdict=Verdict.WARN,
        title="t is in the wrong units for its time embedding (its features barely vary)",
        message="time ignored by the velocity net, and its time features at {module} barely vary across the batch "
                "({observed}, expected {bound}){units}: t is in the wrong units for its embedding",
        fix="Feed t in the units its embedding was built for (e.g. no extra division by the number of timesteps) "
            "and check that t reaches the net per sample.",
        test=_units,
        doc="A net whose output and last hidden activation do not move with t while t does reach a layer input "
            "that also depends on x_t (t embedded and added, then multiplied by zero-initialised weights: torchcfm's "
            "UNet, adaLN-zero blocks) is judged at its time features: the first layer input that follows t and not "
            "x_t must vary across the batch by at least `time_features_min` (||F - mean|| / ||F||). torchcfm's UNet "
            "measures 0.0792 at time_embed.0; the same net fed t / 1000 measures 8.0e-05."),
    Rule(
        code="structure.time_blind", verdict=Verdict.WARN,
        title="Permuting t changes nothing: t is dropped, or the net is blind to t at these weights",
        message="time ignored by the velocity net: permuting t changes nothing ({t_change} vs {x_change} for x_t)"
                "{units}: t is dropped on the way, or the net is blind to t at these weights (zero-initialised "
                "residual branches, identical time parameters)",
        fix="Check that t reaches the net per sample; if the architecture starts blind to t (e.g. torchcfm's UNet "
            "zero-initialises every residual branch), rerun `structure` on a checkpoint after some training steps, "
            "where the balance means something.",
        test=_blind,
        doc="Permuting t across the batch leaves the output (and the last hidden activation) within the repeat-call "
            "noise, and no time feature that meets x_t could be found within the first 64 layer calls: t is dropped "
            "or detached into a constant on the way (t.mean(), a Python float), or the architecture is blind to t "
            "at initialisation in a way the time-feature probe cannot see. On a correct net blind at init, run the "
            "check on a checkpoint after some training steps, or `--ignore` the code."),
    Rule(
        code="structure.time_ignored", verdict=Verdict.WARN,
        title="The velocity net barely depends on t (t in the wrong units, most often)",
        message="time ignored by the velocity net: permuting t moves its output {t_change} vs {x_change} for x_t "
                "(ratio {observed}, expected {bound}){units}",
        fix=FIX_UNITS,
        test=_ignored,
        doc="The same ratio as `structure.time_embedding_loud`, below `time_ignored_ratio` (0.01): t moves the "
            "output, but by under 1% of what x_t moves it. t divided by 1000 on its way into the digits net "
            "measured 0.0038 (correct variants 0.032-0.047). Where the x_t path is weak relative to the time path "
            "the same bug may only lower the ratio about 10x and pass; the t argument's scale and range are in the "
            "measurements for a human to read."),
    Rule(
        code="structure.fp16_no_grad_scaler", verdict=Verdict.WARN,
        title="float16 compute without loss scaling",
        message="fp16 compute ({observed}) without loss scaling (grad_scaler {scaler}): small gradients underflow "
                "to zero",
        fix="Use torch.amp.GradScaler with float16 autocast (scaler.scale(loss).backward(); scaler.step(optimizer); "
            "scaler.update()) and pass it as the pipeline field 'grad_scaler', or switch to bfloat16.",
        test=_fp16_unscaled,
        doc="float16 compute in the velocity forward (autocast with dtype float16 seen from inside the forward, "
            "float16 parameters, or a float16 `v_pred`) without an enabled pipeline field `grad_scaler`. float16's "
            "smallest normal is 6e-5: gradients below it underflow to zero without loss scaling. bfloat16 has "
            "float32's range and needs none. A correct pipeline that scales its loss by hand (no GradScaler) warns: "
            "`--ignore` the code."),
    Rule(
        code="structure.non_finite", verdict=Verdict.FAIL,
        title="NaN or Inf in the step's outputs",
        message="non-finite values in step output {keys} ({observed} in '{key}' on batch {batch})",
        fix="Find the first output that turns NaN/Inf (logvar.exp() without a clamp, a division by a norm, float16 "
            "overflow above 65504) and bound it.",
        test=_non_finite,
        covered_by=("kl.nonfinite",),
        doc="Every floating-point tensor (and float) the step returns, over the measuring batches, is scanned for "
            "NaN and Inf; the message names the keys and the first batch. A non-finite loss or prediction at step 0 "
            "poisons every gradient: there is no correct pipeline on which this fires. When only the kl (and the "
            "loss that adds it) are non-finite, the `kl` check's kl.nonfinite names the cause and this finding is "
            "listed as covered by it."),
    Rule(
        code="structure.frozen_train_mode", verdict=Verdict.WARN,
        title="A frozen module has mode-dependent layers (dropout, batch-norm) active in train mode",
        message="frozen module '{module}' {state} with mode-dependent layers active ({layers}): its outputs are "
                "noised or use batch statistics",
        fix="Call .eval() on every frozen module as a whole after any model.train(), and keep frozen modules out "
            "of it.",
        test=_train_mode,
        doc="The frozen modules (pipeline field `frozen`, plus the `vae`), before and after the step. Train mode "
            "matters only through layers whose forward differs in it: dropout with p > 0, normalisation with "
            "running statistics, RNN or MultiheadAttention dropout, stochastic depth, any module holding a `*drop*` "
            "probability > 0 (checks/_modes.py). Any such layer in train mode fires, whether the module is in train "
            "mode or only its parts are; a frozen module in train mode without any (diffusers' AutoencoderKL) does "
            "not. A module whose own forward branches on self.training is not seen."),
    Rule(
        code="structure.frozen_requires_grad", verdict=Verdict.WARN,
        title="A frozen module's parameters require grad",
        message="frozen module '{module}' has parameters that require grad ({observed}/{tensors} tensors, {values} "
                "values, e.g. {example}{by_step})",
        fix="Call .requires_grad_(False) on frozen modules (the target check's gradient audit says whether they "
            "actually receive gradient).",
        test=_requires_grad,
        covered_by=("target.frozen_gradient",),
        doc="Parameters of a frozen module (pipeline field `frozen`, plus the `vae`) with requires_grad=True, before "
            "or after the step; parameters shared with a trainable module are trained on purpose and not counted. "
            "Harmless when no loss reaches them, but autograd then keeps their graph and memory, and a later change "
            "that lets the loss reach them trains a module declared frozen. When the loss's gradient does reach "
            "the module, the `target` check's target.frozen_gradient on it is the finding, and this one is listed "
            "as covered by it."),
    Rule(
        code="structure.frozen_in_optimizer", verdict=Verdict.FAIL,
        title="A frozen module's parameters are in the optimizer",
        message="{count} parameters of frozen module '{module}' ({tensors} tensors) are in the optimizer: {updated}",
        fix="Build the optimizer from the trainable modules' parameters only (not from every module's), and "
            "freeze the module (.requires_grad_(False)).",
        test=_in_optimizer,
        doc="The optimizer's param_groups are compared with the parameters of every frozen module (pipeline field "
            "`frozen`, plus the `vae`); parameters shared with a trainable module are not counted. A frozen "
            "parameter in the optimizer is updated as soon as it receives gradient (requires_grad left on, or turned "
            "on later): for the VAE, its latent space drifts under the targets. Declaring the module frozen and "
            "optimizing it is a contradiction; if it is meant to train, list it as trainable instead. FAIL when any "
            "of those parameters requires grad (the optimizer updates it); WARN when none does (torch's optimizers "
            "skip parameters without a gradient, so nothing moves until one is unfrozen)."),
)
