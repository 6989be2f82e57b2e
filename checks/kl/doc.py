"""The ``kl`` check's documentation (`fmcheck explain kl`, docs/checks/kl.md)."""

from __future__ import annotations

from fmcheck.api import CheckDoc

DOC = CheckDoc(
    what=(
        "For a text head that outputs a Gaussian q(z0 | text) = N(mu, diag(exp(logvar))) trained with a KL to "
        "N(0, I), on the step outputs `mu`, `logvar`, `kl`, `kl_weight`, `fm_loss`:\n\n"
        "- **logvar health**: min, max, mean of logvar, sigma statistics, and the share of logvar values sitting "
        "at the bound (a hard clamp holding them passes no gradient).\n"
        "- **stress probe**: the module that produces mu/logvar is found from the step itself (forward hooks "
        "record which trainable module's output holds the step's mu and logvar values; a candidate counts when "
        "pushing its output changes logvar), whether it returns one tensor chunked later, a tuple, a dict or "
        "separate layers. For one step (no autograd) its output o is pushed to sign * (100 * o + 100), once "
        "with each sign, and the step's logvar must stay within +-`logvar_bound` and its `kl` finite. An "
        "untrained head has |logvar| ~ 0.1, so only this probe reveals a missing bound.\n"
        "- **formula**: the user's `kl` against the analytic KL = 0.5 * (mu^2 + exp(logvar) - 1 - logvar) "
        "under every usual reduction (sum over latent dims then mean over the batch, mean over all elements, "
        "sum over everything, per channel, per sample, ...) times 1, 2 (a missing 1/2), -1 (a flipped sign): "
        "which one it is, on every measured batch, to 1e-3 relative. A negative `kl` fails.\n"
        "- **warmup**: `kl_weight` (a float or a 0-d tensor) read from the step at 0, 1%, 5%, 10% and 50% of "
        "`total_steps`.\n"
        "- **balance**: the weighted KL at the target weight (the largest probed `kl_weight`) against `fm_loss`.\n"
        "- **collapse**: whether mu differs between the captions of a batch at all (the share of mu's energy "
        "that varies across samples), with the between-caption variance of mu against the mean sigma^2 and the "
        "KL per element. Batches of one sample cannot show it: with no batch of two or more, collapse is "
        "reported as not measurable, without a verdict."
    ),
    why=(
        "Noise-free flow matching from a text head starts the flow at z0 ~ N(mu, sigma^2). If logvar is "
        "unbounded, the KL's -logvar term and the exp(logvar) term explode as soon as the head's outputs grow "
        "(sigma -> 0 makes the KL huge, sigma -> inf makes z0 meaningless), and the run stalls or diverges long "
        "after the pre-flight looked fine. A KL at full weight from step 0 crushes the head onto the prior "
        "before the flow has learned anything; a KL term whose normalisation does not match the FM loss "
        "(summed over 16k latent dims against a per-element MSE) drowns the other term; a flipped sign rewards "
        "the head for moving AWAY from the prior; a head whose mu ignores the text makes z0 plain noise."
    ),
    bug_example=(
        "```python\n"
        "mu, logvar = head(q).chunk(2, dim=-1)          # no clamp\n"
        "z0 = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)\n"
        "kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum()   # sums over the batch too\n"
        "loss = fm_loss + 0.1 * kl                     # full weight from step 0\n"
        "```\n"
        "fmcheck reports: max |logvar| under the stress probe 130 (bound 20), kl = sum over everything "
        "(scales with batch size), kl_weight 0.1 at step 0 = 100% of target."
    ),
    fix=(
        "```python\n"
        "mu, logvar = head(q).chunk(2, dim=-1)\n"
        "logvar = logvar.clamp(-6, 6)                   # or 6 * torch.tanh(logvar / 6)\n"
        "kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).mean()   # same normalisation as the MSE\n"
        "beta = beta_max * min(1.0, step / (0.1 * total_steps))  # linear warmup over the first 10%\n"
        "loss = fm_loss + beta * kl\n"
        "```"
    ),
    causes=(
        "logvar used raw (no clamp, no smooth bound), or the clamp applied after the KL is computed",
        "KL written as 0.5 * (1 + logvar - mu^2 - exp(logvar)) without the leading minus (a negative KL)",
        "KL summed over the batch (`.sum()`) while the FM loss is a mean: the KL weight grows with the batch size",
        "the KL weight read from a config at its final value from step 0; a warmup keyed on epochs that never "
        "advance",
        "the head fed a constant (a padding token, a detached zero tensor, the batch mean of the text "
        "embeddings) so mu is the same for every caption",
    ),
    blind_spots=(
        "The probe pushes a trainable module's OUTPUT: a logvar that is a free nn.Parameter, or computed "
        "outside the trainable modules, is not probed (the check warns that it could not locate the module).",
        "A bound wider than `logvar_bound` (e.g. logvar = 0.01 * raw) can pass if the pushed values stay inside "
        "it; the probe moves raw outputs to about +-100.",
        "The step's returned `logvar` is taken to be the one training uses: a pipeline that returns the raw "
        "logvar but clamps a copy internally reads as unbounded.",
        "A Monte Carlo KL estimate, a free-bits floor, or a KL to a non-standard prior matches none of the "
        "analytic reductions (warns with the closest one and the ratio).",
        "At initialisation the head sits at the prior (KL ~ 0.001 nats per element), so a weighted KL much "
        "smaller than fm_loss is only judged once the KL per element exceeds `balance_informative_kl`.",
        "Collapse means mu identical for every caption of a batch: a head whose mu depends on the text only "
        "weakly is not flagged, a batch whose captions are all the same is; a zero-initialised head (mu exactly "
        "0 with a gradient path) is reported, not flagged.",
        "Without `total_steps` the warmup is not probed; without `kl_weight` neither warmup nor balance is "
        "judged.",
    ),
)
