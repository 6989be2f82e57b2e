"""Watching the raw VAE while the user's own ``encode``/``decode`` run: what it was given and what it produced.

:class:`VaeRecorder` wraps ``vae.encode``, ``vae.decode`` (instance attributes) and the posteriors ``encode`` returns
for the duration of a ``with`` block, and restores them on exit. Torch is imported inside functions only.
"""

from __future__ import annotations

from typing import Any, Optional

class RawLatent:
    """What the raw VAE produced for one batch of the user's encode: posterior mean, sigma, the drawn sample."""

    def __init__(self, mean, std, sample=None, vae_input=None):
        self.mean, self.std, self.sample, self.vae_input = mean, std, sample, vae_input


class VaeRecorder:
    """Wraps ``vae.encode`` / ``vae.decode`` (instance attributes) and the posteriors they return; restores on exit.

    Records, per ``vae.encode`` call, the posterior mean and std and every tensor its ``sample()`` returned, and,
    per ``vae.decode`` call, the latent it was given.
    """

    def __init__(self, vae):
        self.vae = vae
        self.encodes: list[dict[str, Any]] = []
        self.decodes: list[Any] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> "VaeRecorder":
        for name, wrapper in (("encode", self._wrap_encode), ("decode", self._wrap_decode)):
            original = getattr(self.vae, name, None)
            if original is None:
                continue
            self._saved[name] = self.vae.__dict__.get(name, _ABSENT)
            object.__setattr__(self.vae, name, wrapper(original))
        return self

    def __exit__(self, *exc) -> None:
        for name, saved in self._saved.items():
            if saved is _ABSENT:
                self.vae.__dict__.pop(name, None)
            else:
                object.__setattr__(self.vae, name, saved)

    def _wrap_encode(self, original):
        def encode(x, *args, **kwargs):
            out = original(x, *args, **kwargs)
            self._record_encode(x, out)
            return out

        return encode

    def _wrap_decode(self, original):
        def decode(z, *args, **kwargs):
            self.decodes.append(z.detach() if hasattr(z, "detach") else z)
            return original(z, *args, **kwargs)

        return decode

    def _record_encode(self, x, out) -> None:
        dist = getattr(out, "latent_dist", None)
        if dist is None and isinstance(out, (tuple, list)) and out:
            dist = out[0]
        mean = getattr(dist, "mean", None)
        if dist is None or not hasattr(mean, "detach"):
            return
        std = getattr(dist, "std", None)
        if not hasattr(std, "detach"):
            logvar = getattr(dist, "logvar", None)
            std = (0.5 * logvar).exp() if hasattr(logvar, "exp") else mean * 0
        entry = {"mean": mean.detach(), "std": std.detach(), "samples": [],
                 "input": x.detach() if hasattr(x, "detach") else None}
        self.encodes.append(entry)
        original_sample = getattr(dist, "sample", None)
        if callable(original_sample):
            def sample(*args, **kwargs):
                value = original_sample(*args, **kwargs)
                if hasattr(value, "detach"):
                    entry["samples"].append(value.detach())
                return value

            try:
                dist.sample = sample
            except AttributeError:  # a posterior object without instance attributes: no sample recorded
                pass

    def encode_result(self, batch: int) -> Optional[RawLatent]:
        """The raw latent of the user's call: every vae.encode in it concatenated, or the last one alone."""
        import torch

        if not self.encodes:
            return None
        for entries in (self.encodes, self.encodes[-1:]):
            if sum(e["mean"].shape[0] for e in entries) == batch:
                mean = torch.cat([e["mean"] for e in entries]).float()
                std = torch.cat([e["std"] for e in entries]).float()
                sample = None
                if all(len(e["samples"]) >= 1 and e["samples"][-1].shape == e["mean"].shape for e in entries):
                    sample = torch.cat([e["samples"][-1] for e in entries]).float()
                inputs = [e["input"] for e in entries]
                vae_input = torch.cat(inputs) if all(i is not None for i in inputs) else None
                return RawLatent(mean, std, sample, vae_input)
        return None

    def input_range(self) -> Optional[tuple[float, float]]:
        import torch

        inputs = [e["input"].float() for e in self.encodes if isinstance(e["input"], torch.Tensor)]
        if not inputs:
            return None
        low, high = torch.stack([torch.stack([i.min(), i.max()]) for i in inputs]).T.cpu().tolist()
        return float(min(low)), float(max(high))

    def decode_input(self, batch: int):
        import torch

        latents = [z for z in self.decodes if hasattr(z, "shape")]
        if latents and sum(z.shape[0] for z in latents) == batch:
            return torch.cat(latents).float()
        if latents and latents[-1].shape[0] == batch:
            return latents[-1].float()
        return None


_ABSENT = object()

