"""The `overfit` check's documentation: what `fmcheck explain overfit` and docs/checks/overfit.md say."""

from __future__ import annotations

from fmcheck.api import CheckDoc

DOC = CheckDoc(
    what=(
        "Takes the first training batches holding `--samples` samples (default 128; whole batches, so the "
        "actual count is reported) and trains on them, cycling through them, with the user's own `step`, "
        "`loss.backward()` (`grad_scaler.scale(loss).backward()`, `scaler.step`, `scaler.update` when the "
        "pipeline has a grad scaler) and the user's own optimizer as it is: its learning rate, its state "
        "(the trainable modules in train mode, as training runs). The pipeline's optional training extras run "
        "where a training loop runs them: `before_optimizer_step()` after backward (after "
        "`grad_scaler.unscale_(optimizer)` when there is a scaler) and before `optimizer.step()`, which is where "
        "gradient clipping goes; `lr_scheduler.step()` after each optimizer step.\n\n"
        "**The replayed set.** Before every call of the step on batch k of the set, python's, numpy's and "
        "torch's RNGs (CPU and every CUDA device, through the seeding all checks share) are seeded from "
        "(seed, k), so batch k draws the same t, source noise and reparameterisation eps on every pass, in the "
        "first pass and in training alike: the set is a fixed regression problem that a working pipeline can "
        "memorise, not a new one each pass. This is verified, not assumed: after the first pass, batch 0 runs "
        "once more at the same weights and the same seed, with the second pass's step_index; if any of x0, x1, "
        "t, eps, xt, v_target, mu, logvar or v_pred differs, the step draws from something the seeding does not "
        "reach (a generator fmcheck does not find, a sampler that keeps state, a re-pairing), the report names the "
        "outputs that changed, and the run is judged as a fresh-randomness run.\n\n"
        "**Two regimes.** With the randomness replayed, all of the loss is reducible: a pass needs the relative "
        "fm_loss (below) down by `loss_drop` (50%) and cos(v_pred, v_target) at `cos_pass` (0.8). With fresh "
        "randomness each pass the best prediction is a conditional mean: the loss has a floor of unknown "
        "height and cos a ceiling below 1, so a pass needs a fall of `fresh_loss_drop` (25%) and cos closing "
        "`fresh_cos_gain` (40%) of its initial gap to 1, i.e. cos >= cos0 + 0.4 (1 - cos0); the trend rule "
        "below forecasts against those. In both, no pass comes before `min_steps` (32) steps: a head's scale "
        "drift under a weak KL takes tens of steps to show.\n\n"
        "A step that returns only its `loss` (no `v_pred`, `v_target`) is judged on the loss alone: its fall "
        "relative to the start, by the same regime's share, with no cos; the report says so.\n\n"
        "**What is recorded.** First one pass over the set without autograd gives the initial values, at the "
        "weights as given. Then every step records on the device, without a host sync: fm_loss (the `fm_loss` "
        "output, else MSE(v_pred, v_target)) and the target's power mean(v_target^2), the batch mean of the "
        "per-sample cos(v_pred, v_target), the unweighted `kl`, the mean per-sample norms ||x0||, ||x1|| and "
        "||v_target||, the gradient norm of every trainable module, and the largest |value| of every step "
        "output (NaN/Inf show there). The host reads them at fixed checkpoints, every `window` steps (at least "
        "8, whole passes over the set), and evaluates the rules on window means there. The loss is judged "
        "relative to the target's power, fm_loss / mean(v_target^2) (the share of the target not yet "
        "explained), because v_target = x1 - x0 grows when the head inflates x0: the absolute fm_loss can then "
        "rise while the fit improves, or fall while it does not. The scale is watched as ||x0||/||x1||; its "
        "drift is how far it leaves the band between its start and 1 (moving towards the balanced ratio 1 is "
        "not drift).\n\n"
        "**The stop rule, in order, at each checkpoint.** Training stops at the first checkpoint where one of "
        "these holds, and the outcome recorded there is what the findings read. FAIL, each on evidence counted "
        "in steps: a non-finite step output (or, without a grad scaler, gradient), naming the first in "
        "data-flow order (x1, mu, logvar, eps, x0, t, xt, v_target, v_pred, fm_loss, kl, loss) and its step "
        "(`overfit.nonfinite`); a scale drift beyond `scale_fail` (3x) (`overfit.scale_drift`); fm_loss above "
        "`diverge` (10) x its start (`overfit.diverged`); at the first checkpoint, a trainable module with "
        "parameters the optimizer does not hold (`overfit.not_in_optimizer`), or one whose gradient norm was 0 "
        "in every step (`overfit.no_gradient`); and *hopeless* (`overfit.stalled`): from `trend_after` (30%) "
        "of `--max-steps` on, the recent slopes of the relative fm_loss and of cos (least squares over the "
        "later half of the checkpoints), extrapolated `trend_optimism` (2) times faster to the end of "
        "`--max-steps`, bring less than `trend_reach` (50%) of the improvement a pass needs on both measures. "
        "PASS: the regime's thresholds met with the scale settled (the drift's recent trend, continued for as "
        "many steps again, stays within `scale_fail`); a drift beyond `scale_warn` (2x) on the way makes it a "
        "WARN (`overfit.scale_loose`), and thresholds met at the end of the step budget with the scale not "
        "settled a WARN too (`overfit.scale_moving`). WARN, never FAIL, when the budget ends first "
        "(`overfit.inconclusive`): `--max-steps` spent undecided (the fix says `--max-steps 2N`) or the "
        "`--time-budget` spent (the fix gives a larger `--time-budget`); and a step still running when the "
        "time budget plus a grace (a quarter of the budget, 1 to 30 s) has passed is interrupted "
        "(`overfit.step_hung`, \"a step exceeded the time budget\"). Under torchrun, a rank that stopped "
        "before training because another rank's output was non-finite warns (`overfit.rank_stopped`).\n\n"
        "**Counted in steps, not seconds.** The run stops exactly at the checkpoint that decides, so the "
        "steps run, the curves and the verdict are the same on every run with the same seed on any machine; "
        "only the durations (the measurements in seconds and `details.timing`) differ. The clock only ends a "
        "run, as a warning. The per-check time limit is the time budget plus that grace plus 60 s, unless "
        "`--timeout` is given; a `--timeout` too short for the budget caps it, and the `time budget` "
        "measurement says so.\n\n"
        "Step indices: the overfit runs at step_index = total_steps // 2 onwards (100000 when total_steps is "
        "unknown; `start_step` overrides), i.e. past any KL warmup, so the KL term acts at the weight it has "
        "for most of training: at step 0 a warmed-up KL weight is 0, and a head that runs away under a weak KL "
        "would go unnoticed. Under torchrun all ranks step together and stop together at a checkpoint. "
        "Afterwards the runner restores the modules, the optimizer, grad scaler and LR scheduler state, the RNG "
        "states, modes and requires_grad flags, bit for bit, however the check ended."
    ),
    why=(
        "If a model cannot memorise 128 samples it will not learn a data set: something in scale, target or "
        "gradients is broken. The seed waits hours for this signal; most broken pipelines show it within a "
        "hundred steps, provided the set is really fixed. When each pass draws fresh t and noise, the 128 "
        "samples are a new regression problem every pass, the loss has a floor far above zero and small nets "
        "creep towards it: correct pipelines then fail an absolute bar. Measured with the replay switched off "
        "(every pass reseeded anew) and on, the same nets and optimizers, 400 steps, the thresholds set out of "
        "reach (`python scripts/overfit_regimes.py [--fresh] --never --max-steps 400 --at 40,72,144,400 "
        "SPEC`; fixtures.libs.* are the library fixtures):\n\n"
        "| pipeline | fresh randomness each pass | randomness replayed per batch |\n"
        "|---|---|---|\n"
        "| flow_matching CondOT, MLP velocity (`fixtures.libs.flow_matching_condot_mlp`) | fm_loss/mean(v*^2) "
        "1.00 -> 0.47, cos 0.73 | 1.00 -> 0.038, cos 0.98 |\n"
        "| torchcfm exact OT, MLP velocity (`fixtures.libs.torchcfm_exact_ot`) | 1.00 -> 0.47, cos 0.725 | "
        "1.00 -> 0.015, cos 0.99 |\n"
        "| diffusers SD3 loss, small SD3Transformer2DModel (`fixtures.libs.diffusers_sd3_plain`) | 1.10 -> "
        "0.083, cos 0.96 | 1.09 -> 0.056, cos 0.97 |\n"
        "| fmcheck's digits pipeline, cos at steps 40 / 72 / 144 | 0.68 / 0.69 / 0.77 | 0.88 / 0.975 / 1.00 |\n\n"
        "With the replay, every correct fixture (digits, its six correct variants, 18 library pipelines) "
        "passes with the default thresholds, in 32 to 144 steps on a 2-core CPU; with fresh randomness forced "
        "(`--fresh`), digits and 16 of the library pipelines pass the fresh-regime thresholds, in 32 to 136 "
        "steps.\n\n"
        "In this design the text head gets gradient through x_t while the target v* = x1 - x0 is detached, so "
        "with a weak KL the head can inflate z0: on a small DiT with a KL weight of 1e-2, ||z0||/||z1|| went "
        "from 0.99 to 100x by step 120 while cos(u, v*) still rose to 0.9 and the MSE grew ten-thousandfold: "
        "once x0 dominates v*, v* is easy to predict from x_t and cos rises for the wrong reason. A rising cos "
        "alone must not pass such a run, hence the scale watch. On the digits pipeline a KL weight of 1e-6 "
        "instead of 1.0 sends the ratio from 0.99 to 3.06x by step 56 with the randomness replayed, and to "
        "4.1x by step 24 with fresh randomness."
    ),
    bug_example=(
        "```python\n"
        "optimizer = AdamW(head.parameters(), lr=1e-3)          # the velocity net is never stepped\n"
        "\n"
        "@torch.no_grad()                                        # pasted from the sampler\n"
        "def predict_velocity(self, xt, t, q): return self.velocity(xt, t, q)\n"
        "\n"
        "loss = fm_loss + 1e-6 * kl                              # KL too weak to hold the head's scale\n"
        "kl = 0.5 * (mu**2 + var - 1 - torch.log(var)).mean()    # var = logvar: log of a negative\n"
        "```\n"
        "fmcheck reports, on the digits pipeline with each of these bugs (fixtures/bugs/overfit_*.py): the "
        "optimizer does not hold 'velocity' (1365760 of 1365760 parameters), at the first checkpoint (8 "
        "steps); 'velocity' received no gradient in any of the first 8 steps; scale drift, ||x0||/||x1|| "
        "0.99 -> 3.06 by step 56 while cos had reached 0.89; NaN/Inf, 'kl' non-finite at the first forward. "
        "The correct pipeline passes in 32 steps: relative loss 1.14 -> 0.30, cos 0.01 -> 0.84, "
        "||x0||/||x1|| 0.99 -> 1.01."
    ),
    fix=(
        "Follow the failure: a non-finite output names where to look (log/sqrt of a non-positive value, a "
        "division by zero, exp of an unclamped logvar); scale drift needs a stronger KL (its weight, or a warmup "
        "that ends) or a bounded head output scale (a smaller init of its last layer, a lower head learning "
        "rate, a logvar clamp), never a ratio correction; divergence needs a lower learning rate or gradient "
        "clipping (hand your clipping over as `before_optimizer_step`); a run that does not learn: put every "
        "trainable module in the optimizer, make sure v_pred is computed with autograd from the velocity net "
        "(no torch.no_grad, .detach() or .data), then go back to scale, target and gradients (`fmcheck all`). "
        "An inconclusive run says which option gives it more room (`--max-steps`, `--time-budget`). The "
        "pipeline's own generators that fmcheck finds (a DataLoader's, the step's closure or object; the report "
        "lists them) are reseeded per batch with the global RNGs. Randomness fmcheck cannot reach (a generator "
        "seeded from step_index, one held in an opaque object, a stateful sampler) makes the run a "
        "fresh-randomness one; hand such generators over in the pipeline field `generators`, or seed them from "
        "the global RNG, and the set is replayed."
    ),
    causes=(
        "trainable parameters missing from the optimizer (reported per module)",
        "v_pred cut from the velocity net's parameters (no_grad, detach, .data): the module gets no gradient",
        "KL weight too weak (or still warming up) for the head's output scale: ||x0||/||x1|| runs away",
        "NaN/Inf from a log or sqrt of a non-positive value, a division by zero, exp overflow of logvar",
        "learning rate too high (divergence) or too low for the budget (inconclusive; raise --max-steps)",
        "the optimizer's learning rate is 0 in every group and no lr_scheduler is handed over: skipped",
    ),
    blind_spots=(
        "A flipped target sign or a moving (non-detached) target still overfits: the model learns whatever "
        "target it is given. Those are the `target` check's to catch, not this one's.",
        "A pass shows the pipeline can memorise a small set at this learning rate, not that it generalises.",
        "An LR scheduler is stepped only when the pipeline hands it over (`lr_scheduler`); otherwise the "
        "optimizer's current learning rate is used. A very small learning rate can need more steps than the "
        "default budget (inconclusive, not a failure).",
        "Whole batches: a batch size above --samples overfits one whole batch (the count is reported).",
        "The replay verification compares one extra call of batch 0; randomness that only changes on later "
        "calls (a sampler that cycles after several calls) goes unnoticed and is judged as replayed.",
        "Fresh-randomness thresholds are looser (a fall, not memorisation): a pipeline that learns slowly "
        "for a wrong reason can pass them.",
        "Drift is measured against the scale at the start of the overfit: a pipeline whose ||x0||/||x1|| is "
        "already far from 1 is the `norms` check's finding.",
        "An `lr_scheduler` whose step() needs a metric (ReduceLROnPlateau) cannot be stepped here: leave it "
        "out of the pipeline.",
        "The hopeless rule is a forecast: a run stuck far from both thresholds that would later rise "
        "steeply can be failed; raise `trend_after` or lower `trend_reach` if you see that.",
    ),
)
