"""GPU benchmark (not a test): fmcheck's `scale` and `overfit` checks on a DiT-B-size reference pipeline, side by side
with the raw work they wrap, in one run, on one H100/H200 in under 5 minutes.

    python bench/gpu.py [--device cuda] [--repeats 3] [--overhead-steps 40] [--time-budget 60] [--out gpu.json]
    python bench/gpu.py --smoke [--out smoke.json]     # tiny sizes on the CPU: every code path, no goal judged

The reference, built on the device with random weights and fixed random data:

    q (B, 384), random, fixed per sample -> text head (3 Linear) -> (mu, logvar) -> z0 = mu + sigma * eps
    images (B, 3, 256, 256), smooth, fixed -> SD-geometry AutoencoderKL (random weights, SD 1.x config)
        -> z1 = latent_dist.sample() * scaling_factor, encoded once and cached (the overfit set is fixed)
    x_t = (1 - t) z0 + t z1,  v* = (z1 - z0).detach(),  v_pred = DiT-B/2 (x_t, t, q) on 4x32x32 latents (~130M)
    loss = MSE(v_pred, v*) + kl_weight * KL;  AdamW lr 3e-4;  batch 128, 128 samples;  bf16 autocast on CUDA

It is a plain fmcheck pipeline dict (`fmcheck.runner.run(coerce(pipeline), settings, only=[...])`). Measured, with
repeats interleaved so that load hits both sides alike, medians reported:

1. scale: `ScaleCheck.measure` + `judge` against a plain encode + decode of the same images (same batches); also
   ms/image of the VAE's encode and decode.
2. overfit overhead: the same N steps as a raw loop and inside the overfit check (rules that never decide), wall
   time ratio (`bench/overfit_overhead.py`'s `raw_loop` / `check_loop`).
3. overfit verdict: the real check with default thresholds from the initial weights: verdict, steps, seconds.
4. peak memory (`torch.cuda.max_memory_allocated`): fmcheck running scale + overfit (and overfit alone, both for
   `--memory-steps` overfit steps) against a raw training loop of as many steps. Not measured on a CPU.

Goals (the performance issue): scale at most 1.2x the plain encode + decode; overfit loop at most 1.02x the raw loop;
a correct (PASS) verdict on the reference in under 30 s of overfit; peak memory at most 1.3x the raw training loop.
Reference figures measured without fmcheck on an H200 (torch 2.11, bf16 autocast): VAE 1.34 ms/image encode and
3.11 ms/image decode at 256 px; raw overfit loop 81.9 ms/step; cos >= 0.9 after 775 steps (64 s) at lr 3e-4.
The results table is printed as markdown rows (as in bench/README.md) and, with `--out`, written as JSON.

The scale check's own verdict is reported, not a goal: with SD's 0.18215 a random-weight VAE's latents have std ~0.2,
so the check rightly fails the config ("does not fit this VAE"); `--calibrate-scale` sets the factor to 1/std.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import time
import traceback
from pathlib import Path
from statistics import median
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from overfit_overhead import NEVER, check_loop, raw_loop  # noqa: E402  (after the path set-up)

# Figures from the performance issue, measured without fmcheck on an H200: printed next to ours for comparison.
REFERENCE_ENCODE_MS, REFERENCE_DECODE_MS, REFERENCE_STEP_MS = 1.34, 3.11, 81.9
GOAL_SCALE_RATIO, GOAL_LOOP_RATIO, GOAL_VERDICT_S, GOAL_MEMORY_RATIO = 1.2, 1.02, 30.0, 1.3
SD_SCALING_FACTOR = 0.18215


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Model and data sizes: the GPU reference, or the CPU smoke run."""

    width: int = 768  # DiT-B
    depth: int = 12
    heads: int = 12
    patch: int = 2
    text_dim: int = 384
    head_hidden: int = 1024
    vae_channels: tuple[int, ...] = (128, 256, 512, 512)  # SD 1.x
    vae_layers_per_block: int = 2
    image_size: int = 256
    batch: int = 128
    samples: int = 128

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


REFERENCE = Sizes()
# 32 px: the scale check's float16 probe runs float16 convolutions, which are slow on a CPU (5 s at 64 px).
SMOKE = Sizes(width=64, depth=2, heads=4, head_hidden=64, vae_channels=(32, 64), vae_layers_per_block=1,
              image_size=32, batch=8, samples=8)


# ------------------------------------------------------------------------------------------------ the reference
def velocity_net(sizes: Sizes, latent_channels: int = 4):
    """DiT/2 velocity net: patch embedding + fixed 2D sin-cos positions, adaLN blocks (shift, scale, gate for
    attention and MLP), conditioned on time + text; default init (no zero-init, so gradients reach the text head
    from the first step). At the reference sizes it has ~130M parameters, as DiT-B/2."""
    import torch
    from torch import nn

    width, grid, patch = sizes.width, sizes.latent_size // sizes.patch, sizes.patch

    def sincos(positions, dim: int):
        steps = torch.arange(dim // 2, dtype=torch.float32, device=positions.device)
        frequencies = torch.exp(-math.log(10_000.0) * steps / (dim // 2))
        angles = positions.float()[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.attn = nn.MultiheadAttention(width, sizes.heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"),
                                     nn.Linear(4 * width, width))
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

        def forward(self, h, c):
            shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).unsqueeze(1).chunk(6, dim=-1)
            x = self.norm1(h) * (1 + scale1) + shift1
            h = h + gate1 * self.attn(x, x, x, need_weights=False)[0]
            return h + gate2 * self.mlp(self.norm2(h) * (1 + scale2) + shift2)

    class DiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patchify = nn.Conv2d(latent_channels, width, patch, patch)
            rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
            positions = torch.cat([sincos(rows.flatten(), width // 2), sincos(cols.flatten(), width // 2)], dim=1)
            self.register_buffer("positions", positions[None], persistent=False)
            self.time = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
            self.text = nn.Linear(sizes.text_dim, width)
            self.blocks = nn.ModuleList(Block() for _ in range(sizes.depth))
            self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
            self.out = nn.Linear(width, patch * patch * latent_channels)

        def forward(self, xt, t, q):
            b = xt.shape[0]
            h = self.patchify(xt).flatten(2).transpose(1, 2) + self.positions
            c = self.time(sincos(1000 * t, 256)) + self.text(q)
            for block in self.blocks:
                h = block(h, c)
            shift, scale = self.final_modulation(c).unsqueeze(1).chunk(2, dim=-1)
            out = self.out(self.final_norm(h) * (1 + scale) + shift)
            out = out.view(b, grid, grid, latent_channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
            return out.reshape(b, latent_channels, grid * patch, grid * patch)

    return DiT()


def text_head(sizes: Sizes, latent_numel: int):
    """q (B, text_dim) -> (mu, logvar) of z0, three Linear layers with SiLU between, as the digits pipeline's."""
    from torch import nn

    return nn.Sequential(nn.Linear(sizes.text_dim, sizes.head_hidden), nn.SiLU(),
                         nn.Linear(sizes.head_hidden, sizes.head_hidden), nn.SiLU(),
                         nn.Linear(sizes.head_hidden, 2 * latent_numel))


def sd_vae(sizes: Sizes, scaling_factor: float):
    """An AutoencoderKL of Stable Diffusion 1.x's geometry (at the reference sizes) with random weights, frozen."""
    from diffusers import AutoencoderKL

    levels = len(sizes.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=sizes.vae_channels,
                        layers_per_block=sizes.vae_layers_per_block, latent_channels=4, norm_num_groups=32,
                        sample_size=sizes.image_size, scaling_factor=scaling_factor)
    return vae.eval().requires_grad_(False)


def smooth_images(count: int, size: int, generator):
    """Fixed synthetic images in [-1, 1]: coarse noise upsampled bicubically, so they have image-like smoothness."""
    import torch
    import torch.nn.functional as F

    coarse = torch.randn(count, 3, 8, 8, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).tanh()


def build_reference(sizes: Sizes, device: str, *, lr: float = 3e-4, kl_weight: float = 1.0,
                    scaling_factor: Optional[float] = SD_SCALING_FACTOR, autocast: bool = True,
                    seed: int = 0) -> dict:
    """The reference as an fmcheck pipeline dict. ``scaling_factor=None`` calibrates it to 1/std of the raw
    latents of these images (what SD's 0.18215 is for its trained VAE), so that z1 has unit std."""
    import torch

    on_cuda = torch.device(device).type == "cuda"
    bf16 = dict(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast and on_cuda)
    latent_shape = (4, sizes.latent_size, sizes.latent_size)
    with torch.random.fork_rng(devices=[]):  # the same weights every run, without touching the caller's RNG
        torch.manual_seed(seed)
        head = text_head(sizes, math.prod(latent_shape)).to(device)
        dit = velocity_net(sizes).to(device)
        vae = sd_vae(sizes, scaling_factor or SD_SCALING_FACTOR).to(device)
    generator = torch.Generator().manual_seed(seed)
    count = math.ceil(sizes.samples / sizes.batch)
    images = [smooth_images(sizes.batch, sizes.image_size, generator).to(device) for _ in range(count)]
    texts = [torch.randn(sizes.batch, sizes.text_dim, generator=generator).to(device) for _ in range(count)]

    def encode(pixels):
        with torch.no_grad(), torch.autocast(**bf16):
            raw = vae.encode(pixels.to(device)).latent_dist.sample()
        return raw.float() * vae.config.scaling_factor

    def decode(z1):
        with torch.no_grad(), torch.autocast(**bf16):
            return vae.decode(z1.to(device) / vae.config.scaling_factor).sample.float()

    with torch.random.fork_rng(devices=[torch.device(device)] if on_cuda else []):
        torch.manual_seed(seed)
        if scaling_factor is None:
            raw_std = torch.cat([encode(px) for px in images]).std().item() / vae.config.scaling_factor
            vae.register_to_config(scaling_factor=1.0 / raw_std)
        cached = [encode(px) for px in images]  # z1 of the fixed overfit set, encoded once
    batches = [{"pixels": px, "q": q, "x1": z1} for px, q, z1 in zip(images, texts, cached)]

    def step(batch, step_index):
        mu, logvar = head(batch["q"]).view(-1, 2, *latent_shape).unbind(1)
        logvar = logvar.clamp(-6, 6)
        eps = torch.randn_like(mu)
        x0 = mu + (0.5 * logvar).exp() * eps
        x1 = batch["x1"]
        t = torch.rand(x0.shape[0], device=x0.device)
        t_ = t.view(-1, 1, 1, 1)
        xt = (1 - t_) * x0 + t_ * x1
        v_target = (x1 - x0).detach()
        with torch.autocast(**bf16):
            v_pred = dit(xt, t, batch["q"]).float()
        fm_loss = (v_pred - v_target).pow(2).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
        return {"loss": fm_loss + kl_weight * kl, "x0": x0, "x1": x1, "t": t, "xt": xt, "v_target": v_target,
                "v_pred": v_pred, "mu": mu, "logvar": logvar, "kl": kl, "kl_weight": kl_weight, "fm_loss": fm_loss,
                "eps": eps}

    optimizer = torch.optim.AdamW([*head.parameters(), *dit.parameters()], lr=lr)
    return {"step": step, "batches": batches, "trainable": {"head": head, "velocity": dit}, "optimizer": optimizer,
            "frozen": {"vae": vae}, "vae": vae, "encode": encode, "decode": decode, "pixels": lambda b: b["pixels"],
            "total_steps": 200_000, "velocity": dit}


# ---------------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(device: str, work: Callable[[], Any]) -> float:
    sync(device)
    began = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - began


def peak_memory(device: str, work: Callable[[], Any]) -> Optional[int]:
    """Peak bytes allocated on the GPU while ``work`` runs (weights and optimizer state included); None on CPU."""
    import torch

    if torch.device(device).type != "cuda":
        work()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    work()
    sync(device)
    return torch.cuda.max_memory_allocated()


# ---------------------------------------------------------------------------------------------------- sections
def bench_scale(pipeline: dict, device: str, repeats: int) -> dict:
    """Scale check (measure + judge) against a plain encode, then decode, of the same already-fetched batches."""
    import torch

    from fmcheck.checks.scale import ScaleCheck
    from fmcheck.config import Settings
    from fmcheck.context import Context
    from fmcheck.contract import coerce

    wrapped = coerce(pipeline)
    ctx = Context(wrapped, Settings(device=device), torch.device(device))
    batches = ctx.batches()  # fetched once, outside the timings
    pixels = [wrapped.pixels_of(b) for b in batches]
    images = sum(px.shape[0] for px in pixels)
    thresholds = ScaleCheck.Thresholds(**ctx.settings.thresholds.get("scale", {}))
    ctx.thresholds = thresholds  # what the runner hands measure

    def plain() -> tuple[float, float]:
        latents: list = []
        encode_s = timed(device, lambda: latents.extend(wrapped.encode(px) for px in pixels))
        decode_s = timed(device, lambda: [wrapped.decode(z) for z in latents])
        return encode_s, decode_s

    def check():
        return ScaleCheck().judge(ScaleCheck().measure(ctx), thresholds)

    plain(), check()  # warm-up: kernels, autotuning, allocator
    plains, checks, judgements = [], [], []
    for _ in range(repeats):
        plains.append(plain())
        checks.append(timed(device, lambda: judgements.append(check())))
    from fmcheck.findings import conclude

    verdict, summary, _ = conclude(judgements[-1].findings, judgements[-1].summary)
    encode_s, decode_s = median(p[0] for p in plains), median(p[1] for p in plains)
    return {"images": images, "plain_s": median(sum(p) for p in plains), "check_s": median(checks),
            "encode_ms_per_image": 1000 * encode_s / images, "decode_ms_per_image": 1000 * decode_s / images,
            "plain_runs_s": [round(sum(p), 4) for p in plains], "check_runs_s": [round(c, 4) for c in checks],
            "verdict": verdict.value, "summary": summary}


def bench_overfit_overhead(pipeline: dict, device: str, steps: int, repeats: int) -> dict:
    """The same ``steps`` steps as a raw loop and inside the overfit check, alternating, wall-clock medians."""
    start = pipeline["total_steps"] // 2  # the overfit check's own first step_index
    raw, checked = [], []
    for _ in range(repeats):
        raw.append(raw_loop(pipeline, steps, device, start)[0])
        checked.append(check_loop(pipeline, steps, device)[0])
    return {"steps": steps, "raw_s": median(raw), "check_s": median(checked),
            "raw_ms_per_step": 1000 * median(raw) / steps, "raw_runs_s": [round(r, 3) for r in raw],
            "check_runs_s": [round(c, 3) for c in checked]}


def bench_verdict(pipeline: dict, device: str, samples: int, max_steps: int, time_budget: float) -> dict:
    """The real overfit check, default thresholds, from the weights the caller restored."""
    from fmcheck.config import Settings
    from fmcheck.contract import coerce
    from fmcheck.runner import run

    settings = Settings(device=device, samples=samples, max_steps=max_steps, time_budget=time_budget)
    result = run(coerce(pipeline), settings, only=["overfit"]).check("overfit")
    measured = {m.name: m.value for m in result.measurements}
    return {"verdict": result.verdict.value, "steps": measured.get("steps to verdict"),
            "seconds": measured.get("seconds to verdict"), "cos_final": measured.get("cos final"),
            "max_steps": max_steps, "time_budget": time_budget, "check_s": result.duration_s,
            "summary": result.summary, "error": result.error}


def bench_memory(pipeline: dict, device: str, samples: int, steps: int) -> dict:
    """Peak GPU memory: a raw training loop against fmcheck running scale + overfit (overfit for ``steps`` steps
    under rules that never decide: its peak is reached within the first steps), and overfit alone."""
    from fmcheck.config import Settings
    from fmcheck.contract import coerce
    from fmcheck.runner import run

    settings = Settings(device=device, samples=samples, max_steps=steps, time_budget=1e6, timeout=1e6,
                        thresholds={"overfit": NEVER})

    def checks(only):
        return lambda: run(coerce(pipeline), settings, only=only)

    start = pipeline["total_steps"] // 2
    raw = peak_memory(device, lambda: raw_loop(pipeline, steps, device, start))
    both = peak_memory(device, checks(["scale", "overfit"]))
    # on a CPU nothing is measured: the run above already exercised the code path
    overfit = peak_memory(device, checks(["overfit"])) if both is not None else None
    return {"steps": steps, "raw_bytes": raw, "fmcheck_bytes": both, "overfit_only_bytes": overfit}


# ----------------------------------------------------------------------------------------------------- report
@dataclasses.dataclass
class Row:
    goal: str
    measured: str
    ratio: str = ""
    verdict: str = ""

    def markdown(self) -> str:
        return f"| {self.goal} | {self.measured} | {self.ratio} | {self.verdict} |"


def judged(ok: bool, smoke: bool) -> str:
    if smoke:
        return "not judged (smoke)"
    return "met" if ok else "**missed**"


def gib(value: Optional[int]) -> str:
    return f"{value / 2**30:.2f} GiB" if value is not None else "n/a"


def scale_rows(scale: dict, results: dict, smoke: bool) -> list[Row]:
    ratio = scale["check_s"] / scale["plain_s"]
    return [Row(f"`scale` check at most {GOAL_SCALE_RATIO}x a plain encode+decode of the same {scale['images']} "
                "images", f"{1000 * scale['check_s']:.1f} ms vs {1000 * scale['plain_s']:.1f} ms", f"{ratio:.2f}x",
                judged(ratio <= GOAL_SCALE_RATIO, smoke)),
            Row(f"VAE encode / decode at {results['sizes']['image_size']} px (reference H200: {REFERENCE_ENCODE_MS} / "
                f"{REFERENCE_DECODE_MS} ms/image)",
                f"{scale['encode_ms_per_image']:.2f} / {scale['decode_ms_per_image']:.2f} ms/image")]


def overhead_rows(loop: dict, results: dict, smoke: bool) -> list[Row]:
    ratio = loop["check_s"] / loop["raw_s"]
    return [Row(f"overfit loop at most {GOAL_LOOP_RATIO}x a raw loop of the same {loop['steps']} steps",
                f"wall {loop['check_s']:.2f} s vs {loop['raw_s']:.2f} s", f"{ratio:.3f}x",
                judged(ratio <= GOAL_LOOP_RATIO, smoke)),
            Row(f"raw loop ms/step (reference H200: {REFERENCE_STEP_MS} ms/step)", f"{loop['raw_ms_per_step']:.1f} ms")]


def verdict_rows(verdict: dict, results: dict, smoke: bool) -> list[Row]:
    seconds = verdict["seconds"]
    measured = (f"{verdict['verdict']} after {verdict['steps']} steps, {seconds:.1f} s" if seconds is not None
                else f"{verdict['verdict']}: {verdict['summary']}")
    met = verdict["verdict"] == "pass" and seconds is not None and seconds <= GOAL_VERDICT_S
    return [Row(f"overfit verdict on the reference: pass in under {GOAL_VERDICT_S:g} s of overfit", measured, "",
                judged(met, smoke))]


def memory_rows(memory: dict, results: dict, smoke: bool) -> list[Row]:
    if memory["raw_bytes"] is None:
        return [Row(f"peak memory at most {GOAL_MEMORY_RATIO}x a raw training loop (max_memory_allocated)",
                    "n/a: no CUDA device", "", "not run")]
    rows = []
    for label, key in (("scale+overfit", "fmcheck_bytes"), ("overfit only", "overfit_only_bytes")):
        ratio = memory[key] / memory["raw_bytes"]
        rows.append(Row(f"peak memory, fmcheck {label}, at most {GOAL_MEMORY_RATIO}x a raw training loop "
                        f"({memory['steps']} steps, max_memory_allocated)",
                        f"{gib(memory[key])} vs {gib(memory['raw_bytes'])}", f"{ratio:.2f}x",
                        judged(ratio <= GOAL_MEMORY_RATIO, smoke)))
    return rows


SECTION_ROWS = {"scale": scale_rows, "overhead": overhead_rows, "verdict": verdict_rows, "memory": memory_rows}


def table(results: dict, smoke: bool) -> list[Row]:
    """The results as rows in the order of bench/README.md's goals; a section that raised is one error row."""
    rows = []
    for name in ("scale", "overhead", "verdict", "memory"):
        section = results[name]
        if "raised" in section:
            rows.append(Row(f"{name} section", f"raised {section['raised']}", "", "**error**"))
        else:
            rows += SECTION_ROWS[name](section, results, smoke)
    return rows


def environment(device: str) -> dict:
    import torch

    name = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "cpu"
    return {"device": device, "device_name": name, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (DiT width 64 depth 2, VAE (32, 64), 32 px, batch 8): every code path on "
                             "the CPU in seconds; goals are not judged")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; 1 with --smoke)")
    parser.add_argument("--overhead-steps", type=int, default=None,
                        help="steps per side in the overfit overhead comparison (default 40; 3 with --smoke)")
    parser.add_argument("--memory-steps", type=int, default=None,
                        help="training steps per side in the peak memory comparison (default 10; 2 with --smoke)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="overfit verdict step budget (default: fmcheck's, 400; 16 with --smoke)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="overfit verdict time budget, s (default 60; 20 with --smoke)")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4, the reference's)")
    parser.add_argument("--kl-weight", type=float, default=1.0, help="weight of the KL term in the loss (default 1)")
    parser.add_argument("--calibrate-scale", action="store_true",
                        help=f"set the random VAE's scaling_factor to 1/std of its raw latents instead of SD's "
                             f"{SD_SCALING_FACTOR} (z1 then has unit std, as SD latents do)")
    parser.add_argument("--no-autocast", action="store_true", help="float32 throughout (default: bf16 autocast on "
                                                                   "CUDA for the DiT and the VAE)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the fixed data")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    smoke_defaults = {"device": "cpu", "repeats": 1, "overhead_steps": 3, "memory_steps": 2, "max_steps": 16,
                      "time_budget": 20.0}
    gpu_defaults = {"device": "cuda", "repeats": 3, "overhead_steps": 40, "memory_steps": 10, "max_steps": None,
                    "time_budget": 60.0}
    for key, value in (smoke_defaults if args.smoke else gpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.max_steps is None:
        from fmcheck.config import Settings

        args.max_steps = Settings().max_steps
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from fmcheck.contract import coerce
    from fmcheck.state import StateSnapshot

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available here; `python bench/gpu.py --smoke` runs on the CPU")
    sizes = SMOKE if args.smoke else REFERENCE
    began = time.perf_counter()
    pipeline = build_reference(sizes, args.device, lr=args.lr, kl_weight=args.kl_weight, autocast=not args.no_autocast,
                               scaling_factor=None if args.calibrate_scale else SD_SCALING_FACTOR, seed=args.seed)
    initial = StateSnapshot(coerce(pipeline))
    params = {name: sum(p.numel() for p in module.parameters())
              for name, module in {**pipeline["trainable"], **pipeline["frozen"]}.items()}
    results: dict[str, Any] = {**environment(args.device), "smoke": args.smoke, "sizes": dataclasses.asdict(sizes),
                               "parameters": params, "lr": args.lr, "kl_weight": args.kl_weight,
                               "scaling_factor": float(pipeline["vae"].config.scaling_factor),
                               "autocast_bf16": not args.no_autocast and torch.device(args.device).type == "cuda"}
    print(f"{results['device_name']} ({args.device}), torch {results['torch']}, {results['date']}"
          f"{'  [SMOKE: tiny sizes, goals not judged]' if args.smoke else ''}")
    print(f"reference: velocity net {params['velocity'] / 1e6:.1f}M, head {params['head'] / 1e6:.1f}M, VAE "
          f"{params['vae'] / 1e6:.1f}M params; batch {sizes.batch}, {sizes.samples} samples, latents 4x"
          f"{sizes.latent_size}x{sizes.latent_size}, images {sizes.image_size} px, lr {args.lr}, scaling_factor "
          f"{results['scaling_factor']:.5g}, bf16 autocast {results['autocast_bf16']}; built in "
          f"{time.perf_counter() - began:.1f} s", flush=True)

    def verdict_from_initial_weights() -> dict:
        initial.restore()  # weights, optimizer state and RNGs as built: the timings above trained the model
        return bench_verdict(pipeline, args.device, sizes.samples, args.max_steps, args.time_budget)

    start = pipeline["total_steps"] // 2
    raw_loop(pipeline, 3, args.device, start)  # warm-up: kernels, allocator, optimizer state
    sections = (("scale", lambda: bench_scale(pipeline, args.device, args.repeats)),
                ("overhead", lambda: bench_overfit_overhead(pipeline, args.device, args.overhead_steps, args.repeats)),
                ("memory", lambda: bench_memory(pipeline, args.device, sizes.samples, args.memory_steps)),
                ("verdict", verdict_from_initial_weights))
    failed = []
    for name, section in sections:
        section_began = time.perf_counter()
        try:
            results[name] = section()
        except Exception as exc:  # one section's failure must not cost the other results of a device run
            traceback.print_exc()
            results[name] = {"raised": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            failed.append(name)
        print(f"  {name}: {time.perf_counter() - section_began:.1f} s", flush=True)
    initial.restore()

    rows = table(results, args.smoke)
    results["rows"] = [dataclasses.asdict(row) for row in rows]
    results["seconds_total"] = round(time.perf_counter() - began, 1)
    print()
    print("| goal | measured | ratio | verdict |")
    print("|---|---|---|---|")
    for row in rows:
        print(row.markdown())
    print()
    if "summary" in results["scale"]:
        print(f"scale check verdict on the reference: {results['scale']['verdict']}: {results['scale']['summary']}")
    if "summary" in results["verdict"]:
        print(f"overfit verdict: {results['verdict']['verdict']}: {results['verdict']['summary']}")
    if args.smoke:
        print("smoke run: tiny models; the numbers exercise the code paths and say nothing about the goals")
    print(f"total {results['seconds_total']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {args.out}")
    if failed:
        sys.exit(f"sections that raised: {', '.join(failed)} (tracebacks above and in the JSON)")
    return results


if __name__ == "__main__":
    main()
