"""A minimal, correct flow-matching pipeline for testing the core (fast: no VAE, no text encoder)."""

from __future__ import annotations

import torch
from torch import nn

LATENT = 16


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 2 * LATENT))

    def forward(self, q):
        mu, logvar = self.net(q).chunk(2, dim=-1)
        return mu, logvar


class Velocity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(LATENT + 1 + 8, 64), nn.SiLU(), nn.Linear(64, LATENT))

    def forward(self, xt, t, q):
        return self.net(torch.cat([xt, t[:, None], q], dim=-1))


def build(seed: int = 0, total_steps: int = 1000) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head, velocity = Head(), Velocity()
    q_all = torch.randn(256, 8, generator=gen)
    x1_all = torch.randn(256, LATENT, generator=gen)
    batches = [{"q": q_all[i:i + 32], "x1": x1_all[i:i + 32]} for i in range(0, 256, 32)]

    def step(batch, step_index):
        mu, logvar = head(batch["q"])
        logvar = logvar.clamp(-6, 6)
        eps = torch.randn_like(mu)
        x0 = mu + torch.exp(0.5 * logvar) * eps
        x1 = batch["x1"]
        t = torch.rand(x0.shape[0])
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        v_target = (x1 - x0).detach()
        v_pred = velocity(xt, t, batch["q"])
        fm_loss = ((v_pred - v_target) ** 2).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1).mean()
        kl_weight = 1e-3 * min(1.0, step_index / (0.1 * total_steps))
        loss = fm_loss + kl_weight * kl
        return {"loss": loss, "x0": x0, "x1": x1, "t": t, "xt": xt, "v_target": v_target, "v_pred": v_pred,
                "mu": mu, "logvar": logvar, "kl": kl, "kl_weight": kl_weight, "fm_loss": fm_loss, "eps": eps}

    params = [*head.parameters(), *velocity.parameters()]
    return {"step": step, "batches": batches, "trainable": {"head": head, "velocity": velocity},
            "optimizer": torch.optim.AdamW(params, lr=1e-3), "total_steps": total_steps, "velocity": velocity}
