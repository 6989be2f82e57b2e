"""The `structure` check's documentation (``fmcheck explain structure``, docs/checks/structure.md)."""

from fmcheck.api import CheckDoc

DOC = CheckDoc(
    what=(
        "Three groups of measurements on one fresh, seeded forward of the user's step (no autograd) and the "
        "cached outputs of the measuring batches.\n\n"
        "**Time-conditioning balance.** The velocity net is the pipeline field `velocity`, else the outermost "
        "trainable module (or submodule) whose forward receives the step's `xt` (found with forward pre-hooks "
        "during the step; the report names the module). Its call arguments are captured, and which argument is "
        "x_t (the tensor equal to the step's `xt`, also after a reshape or cast) and which is t (the per-sample "
        "scalar that correlates with the step's `t` at |r| >= 0.99: t itself, 1 - t, t * 1000, "
        "integer timesteps) is identified. The module is then called three times more on the same arguments, "
        "under the step's autocast state and the same RNG state (dropout masks match): as is, with t permuted "
        "across the batch (a random cycle: every sample gets another sample's t) and with x_t permuted across "
        "the batch. Reported: the relative output changes ||f(t permuted) - f|| / ||f|| and "
        "||f(x_t permuted) - f|| / ||f||, their ratio (t over x_t), and the affine map from the step's t to the "
        "argument the net receives (its units and range). Ratio above `time_dominates_ratio` warns (time "
        "dominates: at init t moves the output more than the whole x_t does), below `time_ignored_ratio` warns "
        "(time ignored). If the output moves with neither (a zero-initialised output layer, as torchcfm's UNet), "
        "the same probes are measured at the last hidden activation (the input of the last layer called); "
        "x_t passed packed (Flux-style tokens, the same elements in another layout) is matched to the step's "
        "`xt` by its values. A balance that could not be measured warns with the reason: a probe that did not "
        "measure is never a PASS. A net whose output and last hidden activation do not move with t at all, "
        "while t does reach a layer input that also depends on x_t (t embedded and added, then multiplied by "
        "zero-initialised weights: torchcfm's UNet, adaLN-zero blocks), is judged at its time features "
        "instead: the first layer input that follows t and not x_t must vary across the batch by at least "
        "`time_features_min` (||F - mean|| / ||F||). `fmcheck structure --module "
        "fixtures.libs.torchcfm_sigma01_unet:build` measures 0.0792 at time_embed.0 (PASS); the same net fed "
        "t / 1000 measures 8.0e-05 (WARN: t in the wrong units). A t that never meets x_t (embedded, then "
        "dropped) still warns. The same time features also show t too large for a sinusoidal embedding: with the "
        "samples sorted by t, the smoothest feature's mean squared step over twice its variance is about 1 when "
        "every feature jumps at random between neighbouring t (aliased) and small when some feature follows t "
        "(above `time_features_aliased` warns; judged with at least 16 distinct t). Measured: 0.002-0.013 on "
        "every correct fixture (digits, SD3, Flux, flow_matching, torchcfm), 0.51 for "
        "`fixtures/libs/diffusers_flux_timesteps_not_divided.py` (Flux fed timesteps where it expects "
        "timesteps / 1000).\n\n"
        "Calibration (untrained networks, default init): x_t, a high-dimensional input on the main path, should "
        "move the output more than the scalar t does, while t still moves it by a few percent of that. The "
        "digits velocity net (sinusoidal embedding -> MLP -> per-block scale/shift) gives 0.032-0.047 across "
        "its correct variants; other default-init designs measured 0.02-0.23 (a DDPM-style additive time "
        "embedding, raw t concatenated to the input, an embedding table with std 0.1). The planted bugs: time "
        "embedding 100x too loud 1.5 on digits (1.3-19 on other designs); t divided by 1000 on its way into "
        "the digits net 0.0038; t dropped 0.\n\n"
        "**Precision.** fp16 compute in the velocity forward (autocast with dtype float16 seen from inside the "
        "forward, or float16 parameters, or a float16 `v_pred`) without an enabled `grad_scaler` warns; bf16 "
        "needs none. (x_t built in half precision is the `target` check's finding, "
        "`target.xt_half_precision`.) Any NaN or Inf in any step output, over the measuring batches, fails (the key "
        "and batch are named).\n\n"
        "**Frozen modules.** Every frozen module, the VAE included (the pipeline field `frozen`, plus `vae` "
        "when it is a module not already listed: `Pipeline.frozen_modules()`), inspected before and after the "
        "step; this check owns their hygiene for every other check. Train mode matters only through layers whose "
        "forward differs in it, so fmcheck looks for those "
        "in train mode: dropout with p > 0 (`nn.Dropout*`, `AlphaDropout`), normalisation with running "
        "statistics (`BatchNorm*`, `SyncBatchNorm`, `InstanceNorm` with `track_running_stats`), RNN or "
        "`MultiheadAttention` dropout > 0, stochastic depth (`DropPath`, `StochasticDepth`, `DropBlock`), and "
        "any module holding a numeric `*drop*` probability > 0 (attention layers that apply dropout only in "
        "training). Any such layer active in a frozen module warns, whether the module itself is in train "
        "mode or its parent is in eval; a frozen module in train mode without any is reported in the summary "
        "and measurements, not warned about (diffusers' AutoencoderKL: dropout p = 0, GroupNorm). Parameters "
        "with requires_grad=True warn (named and counted; the `target` check's gradient audit says whether "
        "they actually receive gradient). Parameters in the optimizer fail. Parameters shared with a trainable "
        "module are trained on purpose and counted in neither."
    ),
    why=(
        "The seed's gotchas beyond scale, target and KL. A sinusoidal/MLP time embedding with too large an "
        "amplitude dominates the network (the seed's fix: a LayerNorm or a small initialisation): the net then "
        "learns a function of t first and x_t second. The opposite is as costly and more silent: t in [0, 1] "
        "fed to an embedding built for timesteps in [0, 1000] (or t dropped on the way) gives an embedding "
        "that barely moves, and the net must learn the velocity field without knowing where on the path it "
        "is. fp16 without loss scaling underflows small gradients to zero. A frozen VAE or text encoder left in train "
        "mode keeps "
        "dropout noise (and, for some VAEs, posterior noise or batch statistics) in what should be fixed "
        "targets and conditions; a frozen module in the optimizer is trained after all."
    ),
    bug_example=(
        "emb = self.time_mlp(sinusoidal(t)) * 100        # or a large init of the time MLP: time dominates\n"
        "v = net(x_t, t / 1000, q)                       # t already in [0, 1]: the embedding sees [0, 0.001]\n"
        "with torch.autocast('cuda', dtype=torch.float16): loss = step(batch)   # no GradScaler\n"
        "model.train()                                   # also switches the frozen VAE / text encoder to train"
    ),
    fix=(
        "Time dominates: normalise the time embedding (LayerNorm after the MLP), initialise its last layer "
        "small, or check the sin/cos amplitude. Time ignored: feed t in the units the embedding was built for "
        "(multiply t in [0, 1] by the number of training timesteps, or build the embedding for [0, 1]) and "
        "make sure t reaches the net. fp16: use torch.amp.GradScaler (scaler.scale(loss).backward(), "
        "scaler.step(opt), scaler.update()) and set the pipeline field `grad_scaler`, or use bfloat16. Frozen "
        "modules: call .eval() and .requires_grad_(False) on "
        "frozen modules after any model.train(), and never put them in the optimizer."
    ),
    causes=(
        "a time-embedding MLP or sin/cos features with a large scale (no normalisation after it)",
        "t in [0, 1] divided again by the number of timesteps, or timesteps 0..1000 fed to an embedding that "
        "multiplies by 1000 itself",
        "t dropped or detached into a constant on the way to the net (e.g. t.mean(), a Python float)",
        "torch.autocast(dtype=torch.float16) without torch.amp.GradScaler",
        "a global model.train() that also reaches the frozen VAE / text encoder; frozen modules never given "
        "requires_grad_(False); an optimizer built from every module's parameters",
    ),
    blind_spots=(
        "The balance is measured at the current weights (usually the initialisation): it judges the "
        "architecture's time pathway, not what training will make of it.",
        "t in the wrong units is caught when it leaves the output nearly blind to t (the digits net: ratio "
        "0.0038). Where the x_t path is weak relative to the time path, the same bug may only lower the ratio "
        "about 10x (e.g. 0.23 -> 0.021 in an additive-embedding net) and pass; the t argument's scale and "
        "range are in the report for a human to read.",
        "nn.Embedding's default N(0, 1) initialisation used as a timestep table is louder than default Linear "
        "features and warns as 'time dominates': that is the seed's gotcha, not a false alarm.",
        "A sinusoidal embedding fed t x1000 where it expected [0, 1] aliases rather than saturates: the output "
        "still moves with t and the balance passes; the time-feature roughness catches it when every feature "
        "aliases (not when the embedding's lowest frequencies still resolve the larger t).",
        "t and x_t must be separate, top-level arguments of the velocity module (nested containers and a "
        "tensor that concatenates x_t and t are not taken apart); otherwise the balance is not measured and "
        "warns with the reason.",
        "A net blind to t at initialisation is judged at its time features (flat or aliased); a time embedding "
        "that is not a sinusoid of t (a learned table, raw t concatenated to x_t) has no separate time features "
        "and only the output balance applies. A net blind to t in another way (identical time "
        "parameters, or t meeting x_t beyond the first 64 layer calls) warns `structure.time_blind`, naming both "
        "causes; the balance is not "
        "re-measured after training steps.",
        "Autocast entered inside the velocity module's own forward is seen only through v_pred's dtype.",
        "A frozen module whose own forward branches on self.training (rather than through one of the layers "
        "above) is not seen: such a branch cannot be told from a harmless one (diffusers calls .contiguous() "
        "in training) without running both modes.",
    ),
)
