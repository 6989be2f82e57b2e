"""`target`'s documentation: what `fmcheck explain target` and docs/checks/target.md print."""

from fmcheck.api import CheckDoc

DOC = CheckDoc(
    what=(
        "**Implied-target audit** (the primary verdict whenever the velocity module's raw output can be found: "
        "the pipeline field `velocity`, else the outermost trainable module called with the step's `xt`, "
        "found through forward hooks as `structure` does). The step's own labels can be in another "
        "parameterisation than the network's output, so the loss is asked instead. The step runs twice more "
        "on batch 0 with its randomness replayed (the same seed as the cached outputs); a forward hook "
        "replaces the module's output by a leaf tensor holding the output itself (raw), then raw + delta "
        "(delta: seeded Gaussian noise of the output's RMS). For a loss that is a per-sample weighted squared "
        "error of any affine function of the output (plain MSE, diffusers' `precondition_outputs`, any loss "
        "weighting) the gradient is g_i = k_i (raw_i - target_i), so per sample k_i = <g1 - g0, delta> / "
        "||delta||^2 is the implied loss weight and target_i = raw_i - g0_i / k_i the implied target. The "
        "implied target is compared with the fitted path velocity exactly as v_target is below (median cosine, "
        "norm ratio, the candidate it resembles); a negative k_i for any sample fails (the loss trains the "
        "output away from its target there); the weight's shape in t is reported (k / median k, a power law "
        "k ~ t^p (1 - t)^q when one fits) and drawn by `--plot` (`target-weight.png`). The audit is not used, "
        "and says why, when the two probes' raw outputs differ (randomness not replayed: a private generator "
        "that advances), when g1 - g0 misses k delta by more than 2% (an L1 or Huber loss, weights varying "
        "inside a sample), when the loss has no gradient to the output, or when the output's layout cannot be "
        "matched to x0 (Flux-style packed tokens are unpacked through the module's x_t input). If the module "
        "was only found by hooks, the step's `v_pred` is not its output and the step's `v_target` matches the "
        "path velocity while the implied target does not, the audits disagree and the verdict is at most WARN "
        "(declaring `velocity` settles it). With the implied audit deciding, the step's v_target comparison "
        "is reported as a cross-check (a preconditioned target, e.g. the latents, is expected there); a step "
        "that returns no `v_target` (nor `v_pred`: a loss module that keeps them as locals) is audited by the "
        "implied target alone, and warns that the target is not audited when that cannot run. A step that "
        "returns only `loss` with a declared `velocity` module is audited too, and the report lists what was "
        "inferred: x_t and t from the module's arguments (the argument shaped like its output; the only "
        "per-sample scalar), x1 from the pipeline's `encode` (seeded like the step), v_pred from its output, "
        "the target from the loss gradient, and the path from x_t and x1 alone: for a source independent of "
        "the data, B(t), a smooth fit of <x_t, x1> / ||x1||^2, is b(t), A(t), a fit of ||x_t - B(t) x1||, is "
        "a(t) up to a factor, and the path velocity is (A'/A)(x_t - B x1) + B' x1. The "
        "optional pipeline field `prediction` (`velocity`, the default; `epsilon`; `sample`) says what the "
        "output is meant to be: with `epsilon` the target must be the source noise x0, with `sample` the data "
        "x1.\n\n"
        "Worked example, diffusers' SD3 DreamBooth loss with `precondition_outputs`: x_t = (1 - sigma) x1 + "
        "sigma noise, model_pred = raw * (-sigma) + x_t, target = x1, so the loss is "
        "sigma^2 ||raw - (noise - x1)||^2: the raw output is trained toward noise - x1 = d x_t / d sigma, the "
        "path velocity, with weight sigma^2. `fmcheck target --module fixtures.bugs._target_sd3:build` (a "
        "one-layer SD3Transformer2DModel, logit-normal sigma, no weighting) reports `median cos(implied target, "
        "path velocity)` 1.0, norm ratio 1.0, `implied weight k(t) / median` ~ t^2.00 (spread 9.86x), and "
        "notes that the step's v_target (the latents) is a relabelled target (median cos -0.709 with the path "
        "velocity). With the `sigma_sqrt` weighting (sigma^-2) the implied weight is constant in t; with the "
        "wrong sign of sigma (`fixtures/libs/diffusers_sd3_precondition_wrong_sign.py`) the implied target "
        "has the flipped sign: median cos -1.000, FAIL.\n\n"
        "**Path audit** (cached outputs of the first `measure_batches` batches, pooled; more batches, up to "
        "`max_batches`, while t has fewer than 8 distinct values). Per sample, least squares of x_t on "
        "(x0, x1) gives the mix x_t ~ a_i x0 + b_i x1 and the residual: the share of ||x_t|| outside "
        "span(x0, x1) (`x_t off span(x0, x1)`). `t` is read as one time per sample ((B,), (B, 1, 1, 1), a "
        "scalar); a t above 1.5 is in timestep units (diffusers' 0..1000) and is divided by the next power of "
        "ten (999 -> 1000), reported, not warned about. Over the batch, a(t) and b(t) are fitted as smooth "
        "curves: Legendre polynomials of "
        "degree 1-12 in t (or in sqrt(t) / sqrt(1-t), which hold VP paths' square-root ends), the simplest "
        "whose leave-one-out error over the distinct t values is within 1.5x of the best. The scatter of the "
        "(a_i, b_i) around the curves (`(a, b) off the fitted a(t), b(t)`) shows whether x_t was built with "
        "the returned t. The expected velocity is d x_t / dt = a'(t) x0 + b'(t) x1; per sample, the cosine "
        "and the norm ratio ||v_target|| / ||a' x0 + b' x1|| are computed, judged on their medians, and the "
        "share of samples with cos < `cos_fail` is reported. A path with a noise term, x_t = a(t) x0 + b(t) x1 "
        "+ s(t) noise, is modelled when the step returns that noise as the output `noise` (torchcfm's "
        "`return_noise=True`): x_t is regressed per sample on (x0, x1, noise), s(t)^2 is fitted as a smooth "
        "curve and the path velocity gains the term s'(t)/s(t) (x_t - mu_t) (zero for torchcfm's constant "
        "sigma, (1 - 2t) / (2t (1 - t)) for the Schrodinger bridge); a target without a needed term fails as "
        "`a'(t) x0 + b'(t) x1 without the noise term`. Noise the step does not return stays in the span "
        "residual. A wrong candidate that matches the target at cos >= 0.999 turns a near-miss WARN into a "
        "FAIL. Nothing assumes a convention: linear, reversed "
        "(t=1 at the source), cosine/trig, VP and sigma_min paths all pass when the target is their "
        "derivative. When the target fails, it is compared with the usual wrong targets (x0 - x1, x1 - x0, "
        "x0, x1, eps, -eps, the score-like -x0/a(t), x_t, the scaled path velocity) and the summary says which "
        "it is. v_target is also expressed as c x0 + d x1 per sample (medians reported).\n\n"
        "**Detach and gradient paths** (one fresh forward of batch 0, step_index 0, with autograd). The "
        "autograd graph of v_target is walked to its leaves (AccumulateGrad nodes): any trainable parameter "
        "it reaches is a moving target and fails, by name. The roles come from the graph: the velocity net "
        "is the pipeline's `velocity` module (else the parameters v_pred reaches but x_t does not), the head "
        "the trainable parameters x0, mu or logvar reach. For each loss term (`fm_loss`, `kl`, `loss`), "
        "torch.autograd.grad gives the gradient norm of every trainable and frozen module; fm_loss's "
        "gradient is also split into the part through x_t and the part through v_target (the upstream "
        "gradient at those nodes pulled back to the parameters). Expected: fm_loss reaches the velocity net "
        "(else fail) and the head through x_t (else warn: the reparameterisation path is closed); nothing "
        "through v_target (else fail); kl reaches the head (else warn) and nothing else (else warn); no "
        "frozen parameter (the `frozen` modules and the `vae`) that requires grad receives any (else fail); "
        "with reentrant gradient checkpointing (torch.utils.checkpoint, use_reentrant=True), where "
        "torch.autograd.grad raises or silently skips the parameters inside, the gradients are taken with "
        "backward() and tensor hooks instead (and the parameters' .grad restored), and a note says so; "
        "every other trainable module gets some gradient (else warn). Without kl (plain N(0, I) source) the "
        "KL path is not audited and says so.\n\n"
        "**Precision** (batch 0). x_t in float16/bfloat16 while x0 and x1 are float32 warns; so does a float32 "
        "x_t whose values are (almost) all exact half-precision numbers when those of x0 and x1 are not "
        "(computed in half, cast back). A half-precision v_target next to float32 x0 warns; v_pred and "
        "v_target dtypes are reported when they differ. (Shapes that disagree are rejected before any check "
        "runs.)"
    ),
    why=(
        "The model learns whatever the target says. In noise-free flow matching the target is the velocity of "
        "the path, v* = d x_t / dt (x1 - x0 for the linear path, constant in t). An epsilon (DDPM) target, a "
        "score, x0 or x1, a flipped sign or an extra factor all still train (the loss falls) but the sampler, "
        "which integrates v from the source to the data, goes somewhere else. A target that is not detached "
        "moves: the head's gradient then also pulls z0 towards what the net predicts, and the head and KL "
        "collapse. Conversely the head must receive gradient through x_t via the reparameterised z0, or it is "
        "trained by the KL alone. Frozen modules (VAE, text encoder) that receive gradient waste memory and, "
        "with a careless optimizer, drift. An x_t built in half precision loses 3 significant digits of the "
        "interpolation that the velocity net must undo."
    ),
    bug_example=(
        "```python\n"
        "xt = (1 - t) * x0 + t * x1\n"
        "v_target = x0 - x1                      # flipped sign (the path's velocity is x1 - x0)\n"
        "v_target = eps                          # DDPM habit: predicts the noise\n"
        "v_target = x1 - x0                      # not detached: x0 carries the head's graph\n"
        "xt = (1 - t) * x0.detach() + t * x1     # reparam path closed: the head gets no FM gradient\n"
        "z1 = vae.encode(x).latent_dist.sample() # without torch.no_grad(), VAE not frozen\n"
        "model_pred = raw * sigmas + noisy       # SD3 precondition_outputs with the wrong sign (-sigmas)\n"
        "loss = (torch.log(sigmas / (1 - sigmas)) * (model_pred - target) ** 2).mean()  # negative weight\n"
        "```\n"
        "fmcheck reports, for the first: `v_target has the flipped sign (it is x0 - x1): median cos -1.000 with "
        "the path velocity`; for the third: `moving target: v_target carries autograd history into 6 trainable "
        "parameter(s) (head.layers.0.weight, ...)`."
    ),
    fix=(
        "v_target = d x_t / dt of your own path, detached: for x_t = (1-t) x0 + t x1, v_target = "
        "(x1 - x0).detach(); for t=1 at the source, (x0 - x1).detach(); for the cosine path, "
        "pi/2 (cos(pi t/2) x1 - sin(pi t/2) x0). Keep x0 = mu + sigma * eps un-detached inside x_t so the head "
        "is trained through it. Freeze the VAE and text encoder (requires_grad_(False)) and encode under "
        "torch.no_grad(). Build x_t in float32 and cast afterwards. Return t in [0, 1] as the network sees it."
    ),
    causes=(
        "sign convention mixed up between papers (t=1 at the data vs at the noise)",
        "a DDPM/score codebase's target kept (eps, -eps/sigma, x0-prediction)",
        "a weighting folded into the target (0.5 (x1 - x0), sigma-scaled targets)",
        "missing .detach() on the target or on x0/x1 inside it",
        "z0 detached before x_t (or a no_grad region around the source sample)",
        "the VAE encode outside torch.no_grad() with its parameters not frozen",
        "x_t computed under an autocast region or from .half() tensors",
        "t warped (shifted, logit-normal) after x_t was built, or extra noise added to x_t",
        "precondition_outputs with the wrong sign of sigma, or a loss weighting that goes negative",
        "a stochastic path (Schrodinger bridge) trained on the plain x1 - x0 without its noise term",
    ),
    blind_spots=(
        "The path is identified from x0, x1 and x_t as returned: if the step returns other tensors than the "
        "ones the loss uses (e.g. a detached copy of a non-detached target), the audit sees the copies.",
        "Noise in x_t that the step does not return as `noise` fails the span residual even where it is a "
        "constant-std noise term whose target needs no extra term (torchcfm's sigma > 0 written without "
        "return_noise): nothing in (x0, x1, t, x_t) tells it from a stray term.",
        "A loss-only step's path is inferred from one batch with low-degree curves: exact for linear paths "
        "(rectified flow, SD3), approximate for trigonometric ones (a correct cosine path measured median cos "
        "0.92 on 32 samples of 64 values: WARN); a source correlated with the data (OT pairing) biases b(t).",
        "The implied-target audit assumes the velocity module's first call in the step is the one the loss "
        "trains (self-conditioning or a second call is noted, not audited) and a per-sample weighted squared "
        "error; other losses fall back to the step's v_target.",
        "A target deliberately expressed in another time variable (v-prediction w.r.t. phi = pi t / 2) is "
        "reported as mis-scaled: return that variable as t.",
        "Timestep units are normalised by the next power of ten above max(t) (1000 for 0..999). When t spans "
        "another range (0..500) and the path reaches its end inside it, a target that is right per t / 500 "
        "but not per t / 1000 warns with both readings instead of failing; where the path does not reach its "
        "end, the power of ten is used.",
        "The gradient map is taken at step_index 0 on one batch: a loss term switched on later (KL warmup) is "
        "still audited through its unweighted `kl` output; behaviour that changes with the step is not.",
    ),
)
