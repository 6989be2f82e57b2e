"""`target`'s rules on the gradient paths of one fresh step (moving target, frozen modules, the reparameterisation
path, the KL path) and on the precision of the path tensors: pure tests of the evidence (:mod:`.evidence`)."""

from __future__ import annotations

from typing import Any, Optional

from fmcheck.findings import Hit, Rule
from fmcheck.verdict import Verdict

from .evidence import Evidence, KlPath

DETACH_FIX = ("Detach the target: v_target = (x1 - x0).detach() (or build it from x0.detach(), x1.detach()). Only "
              "u_theta(x_t, t) may carry gradient; the head gets its gradient through x_t (the reparameterised z0).")
KL_FIX = "Compute kl from the head's mu and logvar with autograd (not detached)."


def rule(code: str, verdict: Verdict, title: str, message: str, fix: str, test: Any, doc: str) -> Rule:
    return Rule(code=f"target.{code}", verdict=verdict, title=title, message=message, fix=fix, test=test, doc=doc)


def _moving(ev: Evidence, th: Any) -> Optional[Hit]:
    g = ev.gradients
    through = g.through_target()
    if not g.moving and not through:
        return None
    parts = []
    if g.moving:
        names = ", ".join(g.moving[:4]) + (", ..." if len(g.moving) > 4 else "")
        parts.append(f"v_target carries autograd history into {len(g.moving)} trainable parameter(s) ({names})")
    if through:
        parts.append(f"gradient flows through the target into {', '.join(sorted(through))} "
                     f"(|grad| {', '.join(f'{n:.3g}' for n in through.values())})")
    if g.moving:
        return Hit.of(len(g.moving), "0", "trainable parameters", detail="; ".join(parts))
    return Hit.of(max(through.values()), "0", "|grad| through v_target", detail="; ".join(parts))


def _gradients_not_audited(ev: Evidence, th: Any) -> list[Hit]:
    return [Hit.of(note, note=note) for note in ev.gradients.notes]


def _loss_without_graph(ev: Evidence, th: Any) -> list[Hit]:
    return [Hit.of(False, "a graph", key=key) for key in ev.gradients.terms_without_graph if key != "kl"]


def _velocity_no_gradient(ev: Evidence, th: Any) -> Optional[Hit]:
    g = ev.gradients
    norm = g.velocity_norm()
    if norm is None or (norm > g.fm_tiny() and norm > 0):
        return None
    return Hit.of(norm, "> 0", "|grad|", modules=", ".join(g.velocity), fm_key=g.fm_key)


def _reparam_closed(ev: Evidence, th: Any) -> Optional[Hit]:
    g = ev.gradients
    via = g.head_via_xt()
    if via is None or (via > g.fm_tiny() and via > 0):
        return None
    return Hit.of(via, "> 0", "|grad|", modules=", ".join(g.head), fm_key=g.fm_key,
                  total=f"{g.fm['roles']['head']:.3g}")


def _kl_no_head_gradient(ev: Evidence, th: Any) -> Optional[Hit]:
    g = ev.gradients
    if g.kl is KlPath.GRAPH and g.has_head and not g.kl_to_head() > 0:
        return Hit.of(g.kl_to_head(), "> 0", "|grad|", how=" to the head")
    if g.kl is KlPath.NO_GRAPH and g.has_head:
        return Hit.of(False, "a graph to the head",
                      how=" (computed under no_grad, detached, or a Python number): the KL term does not train "
                          "the head")
    return None


def _kl_reaches_other(ev: Evidence, th: Any) -> Optional[Hit]:
    others = ev.gradients.kl_others()
    return Hit.of(", ".join(sorted(others)), "none", modules=", ".join(sorted(others))) if others else None


def _frozen_gradient(ev: Evidence, th: Any) -> list[Hit]:
    # one per module, the module's key its subject: structure's requires_grad finding on it names the same cause
    return [Hit.of(norm, "0", "|grad|", subject=module, module=module, norm=f"{norm:.3g}")
            for module, norm in sorted(ev.gradients.frozen_hits().items())]


def _trainable_without_gradient(ev: Evidence, th: Any) -> Optional[Hit]:
    silent = ev.gradients.silent()
    return Hit.of(", ".join(silent), "none", modules=", ".join(silent)) if silent else None


def _xt_half_precision(ev: Evidence, th: Any) -> Optional[Hit]:
    p = ev.precision
    dtype = p.dtypes["xt"]
    if p.xt_half_dtype():
        return Hit.of(dtype, "float32 like x0, x1", dtype=dtype,
                      detail=" while x0 and x1 are float32: the path is built in half precision")
    quantised = p.xt_quantised()
    if quantised is None:
        return None
    half, share, base = quantised
    return Hit.of(share, f"about the share of x0, x1 ({base:.2g})", "exact in " + half, dtype=dtype,
                  detail=f" but {share:.1%} of its values are exact {half} numbers (x0, x1: {base:.1%}): it was "
                         f"computed in {half} and cast back")


def _target_half_precision(ev: Evidence, th: Any) -> Optional[Hit]:
    p = ev.precision
    return Hit.of(p.dtypes["v_target"], "float32", dtype=p.dtypes["v_target"]) if p.target_half() else None


FAIL, WARN = Verdict.FAIL, Verdict.WARN
GRADIENT_RULES = (
    rule("moving", FAIL, "The target is not detached: gradient flows into v_target (a moving target)",
          "moving target: {detail}", DETACH_FIX, _moving,
          "The autograd graph of v_target is walked to its leaves: any trainable parameter it reaches fails, and "
          "so does any gradient of fm_loss that flows back through v_target (pulled back to the parameters). The "
          "head then also pulls z0 toward what the net predicts. A correct pipeline never gives it."),
    rule("frozen_gradient", FAIL, "The loss's gradient reaches a frozen module (VAE, text encoder)",
          "frozen module '{module}' receives gradient (|grad| {norm})",
          "Freeze them (module.requires_grad_(False)) and run them under torch.no_grad() (e.g. the VAE encode that "
          "makes z1): they are not trained, and their graph costs memory and time.",
          _frozen_gradient,
          "torch.autograd.grad of loss, fm_loss and kl with respect to every parameter that requires grad: any "
          "gradient into a frozen module (the pipeline's `frozen` modules and its `vae`) fails. Typical cause: the "
          "VAE encode outside torch.no_grad() with its parameters not frozen."),
    rule("velocity_no_gradient", FAIL, "The velocity net gets no gradient from the flow-matching loss",
          "the velocity net ({modules}) gets no gradient from {fm_key}",
          "Compute v_pred with autograd (no torch.no_grad(), .detach() or .data on the way from the velocity net "
          "to the loss).",
          _velocity_no_gradient,
          "fm_loss's gradient norm into the velocity net's parameters (the pipeline's `velocity`, else the "
          "parameters v_pred reaches but x_t does not) must be > 0: otherwise nothing trains the velocity."),
    rule("loss_without_graph", FAIL, "A loss term carries no autograd graph",
          "'{key}' carries no gradient at all (computed under no_grad, detached, or a Python number)",
          "Compute '{key}' from tensors with autograd history; training calls loss.backward() on it.",
          _loss_without_graph,
          "Each loss output (loss, fm_loss) of a fresh step with autograd must be a tensor that requires grad. "
          "One that does not trains nothing (a no_grad region, .item(), a detached sum). kl is judged apart."),
    rule("reparam_closed", WARN, "The head gets no flow-matching gradient through x_t (z0 detached)",
          "the head ({modules}) gets no gradient from {fm_key} through x_t (total {total}): the "
          "reparameterisation path is closed (z0 detached before x_t)",
          "Build x_t from the reparameterised sample z0 = mu + sigma * eps without .detach(): the FM loss must "
          "train the head through x_t (only the target is detached).",
          _reparam_closed,
          "fm_loss's gradient is pulled back through x_t to the head's parameters (the trainable ones x0, mu or "
          "logvar reach). None warns: the head is then trained by the KL alone. A design that trains the head "
          "apart on purpose gives it: `--ignore target.reparam_closed`."),
    rule("kl_no_head_gradient", WARN, "The KL term does not train the head",
          "kl carries no gradient{how}", KL_FIX, _kl_no_head_gradient,
          "With a head (a trainable module x0, mu or logvar reach), kl's gradient norm into it must be > 0: a kl "
          "under no_grad, detached or a Python number leaves the posterior unregularised."),
    rule("kl_reaches_other", WARN, "The KL term sends gradient into modules other than the head",
          "kl sends gradient into {modules}, not only the head",
          "The KL of q(z0|text) against N(0, I) depends on the head's mu and logvar only.",
          _kl_reaches_other,
          "kl's gradient, per trainable module: only the head should receive any (above 1e-8 of the largest). "
          "A text encoder trained jointly with the head on purpose gives it: `--ignore target.kl_reaches_other`."),
    rule("trainable_without_gradient", WARN, "A trainable module gets no gradient from any loss term",
          "trainable module(s) {modules} get no gradient from loss, fm_loss or kl at step 0",
          "Every module the optimizer trains must be reached by the loss; check for detach/no_grad, or drop the "
          "module from `trainable`.",
          _trainable_without_gradient,
          "The gradient norm of loss, fm_loss and kl into each trainable module besides the velocity net and the "
          "head, at step 0. A module switched on later in training gives it: `--ignore "
          "target.trainable_without_gradient`."),
    rule("gradients_not_audited", WARN, "The gradient map could not be taken",
          "{note}", "Make the step compute its loss with autograd enabled for the trainable modules.",
          _gradients_not_audited,
          "An inconclusive audit: the gradient paths need parameters that require grad in the trainable or frozen "
          "modules and a loss with autograd history; the message says what was missing."),
    rule("xt_half_precision", WARN, "x_t is built in half precision",
          "x_t is {dtype}{detail}",
          "Build x_t in float32 from float32 x0, x1 ((1 - t) * x0 + t * x1 outside autocast, or with explicit "
          ".float()), then cast where the network needs it (autocast does this for its inputs).",
          _xt_half_precision,
          "x_t in float16/bfloat16 while x0 and x1 are float32 warns; so does a float32 x_t whose values are "
          ">= 99% exact half-precision numbers when those of x0, x1 are 50 points fewer (computed in half, cast "
          "back). Half precision loses 3 significant digits of the interpolation the velocity net must undo."),
    rule("target_half_precision", WARN, "v_target is rounded to half precision",
          "v_target is {dtype}: the target itself is rounded to half precision",
          "Compute v_target in float32 and the loss in float32 (F.mse_loss(v_pred.float(), v_target)).",
          _target_half_precision,
          "v_target in float16/bfloat16 next to float32 x0 warns: the regression target carries ~3 significant "
          "digits. v_pred and v_target dtypes that differ otherwise are reported, not judged."),
)
