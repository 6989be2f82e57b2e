"""Benchmark of the `scale` check (not a test): its cost against a plain encode + decode of the same images.

    python bench/scale_overhead.py [--pipeline digits|shifted|channel] [--repeats 5] [--device cpu|cuda]
                                   [--threads N]

Plain: the pipeline's own `encode` then `decode` of every measured batch (`measure_batches`, default 4 batches of
64 digits), under no_grad. Check: `ScaleCheck.measure` + `judge` on the same, already fetched batches (one encode
of every batch, a second encode and one decode of 16 images, a float16 encode+decode of 4 images), also without the
float16 probe. Repeats alternate the two to even out a shared machine's load; medians are reported. The target is a
ratio of at most ~1.2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def build(name: str):
    if name == "digits":
        from fixtures.digits import DigitsPipeline as cls
    elif name == "shifted":
        from fixtures.correct.scale_shifted_vae import ShiftedVae as cls
    else:
        from fixtures.correct.scale_per_channel_vae import PerChannelVae as cls
    return cls().to_pipeline()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="digits", choices=("digits", "shifted", "channel"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()

    import torch

    from fmcheck.checks.scale import ScaleCheck
    from fmcheck.config import Settings
    from fmcheck.context import Context
    from fmcheck.contract import coerce

    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = coerce(build(args.pipeline))
    device = torch.device(args.device)
    for module in [*pipeline.trainable_modules().values(), *pipeline.frozen_modules().values()]:
        module.to(device)
    settings = {"with probe": Settings(device=args.device),
                "no probe": Settings(device=args.device, thresholds={"scale": {"half_probe": "off"}})}
    contexts = {name: Context(pipeline, s, device) for name, s in settings.items()}
    for ctx in contexts.values():
        ctx.batches()  # fetched and moved once, outside the timings
    batches = contexts["with probe"].batches()
    images = sum(pipeline.pixels_of(b).shape[0] for b in batches)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> float:
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                pipeline.decode(pipeline.encode(pipeline.pixels_of(batch)))
        sync()
        return time.perf_counter() - start

    def check(name: str) -> float:
        ctx = contexts[name]
        thresholds = ScaleCheck.Thresholds(**ctx.settings.thresholds.get("scale", {}))
        ctx.thresholds = thresholds  # what the runner hands measure
        sync()
        start = time.perf_counter()
        ScaleCheck().judge(ScaleCheck().measure(ctx), thresholds)
        sync()
        return time.perf_counter() - start

    plain(), check("with probe"), check("no probe")  # warm-up
    times: dict[str, list[float]] = {"plain": [], "with probe": [], "no probe": []}
    for _ in range(args.repeats):
        times["plain"].append(plain())
        times["with probe"].append(check("with probe"))
        times["no probe"].append(check("no probe"))
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.pipeline} pipeline, {images} images, device {device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats (medians)")
    print(f"  plain encode+decode   {median['plain'] * 1000:8.1f} ms")
    for name in ("with probe", "no probe"):
        print(f"  scale check ({name:10s}) {median[name] * 1000:8.1f} ms   ratio {median[name] / median['plain']:.2f}")


if __name__ == "__main__":
    main()
