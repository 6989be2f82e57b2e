"""`fmcheck scale --vae DIR_OR_ID [--images DIR] [--resolution N]`: a VAE's latent normalisation, with no pipeline.

Loads a diffusers VAE (a local folder, or a model id already in the Hugging Face cache; never the network) with the
class its config names, encodes images (the user's folder, else photos that ship with scikit-learn, else
scikit-learn's digits), and reports the raw latent statistics, the recommended ``scaling_factor`` / ``shift_factor``
(and per-channel ``latents_mean`` / ``latents_std``) as a config snippet, and the verdict on the configured values.
Imported lazily by the CLI: nothing here runs for ``fmcheck --help``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from fmcheck.errors import UsageError
from fmcheck.report import CheckResult, Measurement
from fmcheck.verdict import Verdict

MAX_IMAGES = 64  # images taken from a --images folder (the first, in name order)
BATCH = 8  # images per encode
DECODE_IMAGES = 4  # images decoded for the VAE's own round-trip PSNR
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ------------------------------------------------------------------------------------------------ loading the VAE


def locate(spec: str) -> Path:
    """The folder holding the VAE's config.json: ``spec`` itself, its ``vae/`` subfolder, or the local HF cache."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.name == "config.json":
                return path.parent
            raise UsageError(f"--vae {spec}: expected a folder with a config.json (a diffusers VAE), got a file")
        for folder in (path, path / "vae"):
            if (folder / "config.json").is_file():
                return folder
        raise UsageError(f"--vae {spec}: no config.json in {path} (nor in {path / 'vae'}): not a diffusers VAE folder")
    folder = _cached(spec)
    if folder is None:
        raise UsageError(f"--vae {spec}: no such folder, and no model with this id in the local Hugging Face cache "
                         "(fmcheck never downloads: fetch it first, e.g. `huggingface-cli download ID`)")
    return folder


def _cached(spec: str) -> Optional[Path]:
    """A model id (``org/name`` or ``org/name/subfolder``) already in the local Hugging Face cache."""
    if spec.startswith((".", "/", "~", "\\")) or os.sep in spec.replace("/", ""):
        return None  # a path, not an id
    parts = [p for p in spec.strip("/").split("/") if p]
    if len(parts) < 2:
        return None
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        from huggingface_hub import try_to_load_from_cache  # reads the cache folder only: never the network
    except ImportError:
        return None
    for sub in ([subfolder] if subfolder else [None, "vae"]):
        try:
            # A subfolder goes into the file name: huggingface_hub 1.x has a `subfolder` argument, 2.x does not.
            found = try_to_load_from_cache(repo_id, f"{sub}/config.json" if sub else "config.json")
        except ValueError:  # not a valid repository id
            return None
        if isinstance(found, str) and Path(found).is_file():
            return Path(found).parent
    return None


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if not isinstance(config.get("_class_name"), str):
        raise UsageError(f"{path}: no '_class_name' naming the diffusers VAE class")
    return config


def load_vae(folder: Path, config: dict[str, Any], device: Any):
    """Instantiate the class the config names, from local files only."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = folder / "config.json"
    try:
        import diffusers
    except ImportError as exc:
        raise UsageError("--vae needs diffusers: pip install 'fmcheck[vae]'") from exc
    name = config["_class_name"]
    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type) or not all(callable(getattr(cls, m, None)) for m in ("from_pretrained", "encode",
                                                                                        "decode")):
        raise UsageError(f"{path}: _class_name '{name}' is not a diffusers VAE class (diffusers "
                         f"{diffusers.__version__})")
    try:
        from diffusers.utils import is_accelerate_available

        vae = cls.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=is_accelerate_available())
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--vae {folder}: cannot load {name} ({first})") from exc
    return vae.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ images


def load_images(images: Optional[str], channels: int, resolution: int):
    """(pixels (N, C, R, R) in [-1, 1], description of the source)."""
    if channels not in (1, 3):
        raise UsageError(f"the VAE takes {channels}-channel input; only grayscale (1) and RGB (3) images are supported")
    if images is not None:
        return _folder_images(Path(images), channels, resolution)
    photos = _sample_photos(channels, resolution)
    if photos is not None:
        return photos
    digits = _digits(channels, resolution)
    if digits is not None:
        return digits
    raise UsageError("no images: pass --images DIR (scikit-learn, whose sample images are the default, is not "
                     "installed)")


def _to_tensor(image, channels: int, resolution: int):
    """A PIL image -> (C, R, R) float tensor in [-1, 1], centre-cropped to a square first."""
    import numpy as np
    import torch
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1)


def _folder_images(folder: Path, channels: int, resolution: int):
    import torch

    if not folder.is_dir():
        raise UsageError(f"--images {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"--images {folder}: no PNG or JPEG files in it")
    from PIL import Image, UnidentifiedImageError

    tensors = []
    for path in files[:MAX_IMAGES]:
        try:
            with Image.open(path) as image:
                tensors.append(_to_tensor(image, channels, resolution))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UsageError(f"{path}: cannot read the image ({exc})") from exc
    used = len(tensors)
    note = f"{used} images from {folder}" + (f" (the first {used} of {len(files)})" if len(files) > used else "")
    return torch.stack(tensors), note


def _sample_photos(channels: int, resolution: int):
    """scikit-learn's two sample photos, cut into 18 square tiles: 3 full-height crops and 6 half-height tiles each."""
    import torch

    try:
        from PIL import Image
        from sklearn.datasets import load_sample_images
    except ImportError:
        return None
    photos = load_sample_images().images  # two 427 x 640 RGB photos, shipped with scikit-learn
    tensors = []
    for array in photos:
        photo = Image.fromarray(array)
        width, height = photo.size
        boxes = [(x, 0, x + height, height) for x in (0, (width - height) // 2, width - height)]
        half = height // 2
        columns = (0, (width - half) // 2, width - half)
        boxes += [(x, y, x + half, y + half) for y in (0, height - half) for x in columns]
        tensors += [_to_tensor(photo.crop(box), channels, resolution) for box in boxes]
    return torch.stack(tensors), f"{len(tensors)} tiles of scikit-learn's 2 sample photos (no --images given)"


def _digits(channels: int, resolution: int):
    import torch
    import torch.nn.functional as F

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    small = torch.from_numpy(load_digits().images[:MAX_IMAGES].astype("float32"))[:, None] / 16.0 * 2 - 1
    pixels = F.interpolate(small, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(-1, 1)
    return pixels.expand(-1, channels, -1, -1).contiguous(), f"{len(pixels)} of scikit-learn's 8x8 digits, upscaled"


# --------------------------------------------------------------------------------------------------- measuring


def _resolution(config: dict[str, Any], requested: Optional[int]) -> int:
    if requested is not None:
        if requested < 8 or requested % 8:
            raise UsageError(f"--resolution {requested}: expected a positive multiple of 8")
        return requested
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)) and size:
        size = size[0]
    return int(size) if isinstance(size, int) and size >= 8 else 256


def measure(vae, pixels) -> dict[str, Any]:
    """Raw posterior statistics of the VAE on the pixels, a round trip of a few images and a float16 probe."""
    import torch

    from . import tensors as tn
    from .measure import _half_probe, _pixels_from

    param = next(iter(vae.parameters()))
    device, dtype = param.device, param.dtype
    video = isinstance(getattr(getattr(vae, "encoder", None), "conv_in", None), torch.nn.Conv3d)
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(pixels), BATCH):
            x = pixels[start:start + BATCH].to(device, dtype)
            dist = vae.encode(x[:, :, None] if video else x).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        mean, std = torch.cat(means), torch.cat(stds)
        n = min(DECODE_IMAGES, len(pixels))
        decoded = _pixels_from(vae.decode(mean[:n].to(dtype)))
    if decoded is not None and video:
        decoded = decoded[:, :, 0]
    channels = int(mean.shape[1])
    mu_mean, mu_var = tn.moments_of(mean, channels)
    sigma2 = tn.channels_first(std, channels).pow(2).mean(1)
    numbers = torch.stack([mu_mean, mu_var, sigma2]).cpu().tolist()
    reference = pixels[:n].to(device)
    psnr = tn.psnr(reference, decoded) if decoded is not None and decoded.shape == reference.shape else None
    probe_pixels = pixels[:4].to(device, dtype)
    half = _half_probe(vae, probe_pixels[:, :, None] if video else probe_pixels, mean[:4])
    return {"channels": channels, "latent_shape": list(mean.shape[1:]), "mu_mean": numbers[0], "mu_var": numbers[1],
            "sigma2": numbers[2], "psnr": psnr, "half": half, "video": video}


# ----------------------------------------------------------------------------------------------------- judging


def judge(obs: dict[str, Any], config: dict[str, Any], thresholds: Any, images: int, source: str) -> CheckResult:
    """The standalone result: the rules of the `scale` table that need no pipeline (the configuration, the float16
    probe) on the same kind of evidence. Its findings carry the verdict (``run`` settles it, as the runner does)."""
    from fmcheck.findings import evaluate
    from fmcheck.judges import at_most, info, ratio_within

    from . import maths as sm
    from .analysis import config_fit, half_probe
    from .evidence import Evidence
    from .rules import MEAN_WARN, STANDALONE_RULES

    cfg = sm.Configured.from_config(config, obs["channels"])
    samples = sm.Moments(tuple(obs["mu_mean"]), tuple(obs["mu_var"])).plus_variance(obs["sigma2"])
    rec = sm.recommend(samples, images)
    snippet = rec.snippet()
    fit = config_fit(cfg, samples, images, snippet)
    half = obs["half"] if thresholds.half_probe != "off" else None
    evidence = Evidence(config=fit, half=half_probe(half), standalone=True)
    findings = evaluate(STANDALONE_RULES, evidence, thresholds)

    def verdict_of(code: str) -> Verdict:
        return Verdict.worst([Verdict.PASS, *(f.verdict for f in findings if f.code == code)])

    std, mean = fit.std, fit.mean
    m_std = ratio_within("configured latent std", std, warn_factor=thresholds.config_std_warn,
                         fail_factor=thresholds.config_std_fail, unit="")
    m_mean = at_most("configured latent |mean| / std", abs(mean) / std if std > 0 else math.inf, warn=MEAN_WARN,
                     fail=None)
    measurements: list[Measurement] = [
        m_std.model_copy(update={"verdict": verdict_of("scale.config_std_off")}),
        m_mean.model_copy(update={"verdict": verdict_of("scale.config_mean_off")}),
        info("images", images, "", source),
        info("raw latent std", samples.overall_std()),
        info("raw latent mean", samples.overall_mean()),
        info("posterior sigma / latent std", math.sqrt(sum(obs["sigma2"]) / len(obs["sigma2"])) /
             samples.overall_std() if samples.overall_std() > 0 else math.nan),
        info("recommended scaling_factor", rec.scaling_factor, "", "1 / raw std"),
        info("recommended shift_factor", rec.shift_factor if rec.shift_factor is not None else "none",
             "", f"the raw mean when |mean| / std > 0.1 (here {rec.shift_relative:.3g})"),
        info("per-channel latents_mean/std advised", rec.per_channel_advised, "",
             f"channel std spread {rec.channel_std_spread:.3g}x, mean spread {rec.channel_mean_spread:.3g} std"),
        info("configured scaling_factor", cfg.scaling_factor if cfg.scaling_factor is not None else "none"),
        info("configured shift_factor", cfg.shift_factor if cfg.shift_factor is not None else "none"),
        info("configured latent mean", mean),
    ]
    if cfg.per_channel:
        measurements.append(info("configured latents_mean/std", "per channel", "", cfg.formula()))
    if obs["psnr"] is not None:
        measurements.append(info("VAE round-trip PSNR", obs["psnr"], "dB", "reported, not judged"))
    if evidence.half is not None:
        measurements.append(Measurement(name="float16 probe finite", value=evidence.half.finite, expected="True",
                                        verdict=verdict_of("scale.half_overflow")))
        if evidence.half.latent_error is not None:
            measurements.append(info("float16 latent error", evidence.half.latent_error, "rel. RMS"))
    details = {"config_snippet": snippet, "images": {"count": images, "source": source},
               "configured": cfg.as_dict(),
               "recommended": {"scaling_factor": rec.scaling_factor, "shift_factor": rec.shift_factor,
                               "latents_mean": list(rec.latents_mean), "latents_std": list(rec.latents_std),
                               "per_channel_advised": rec.per_channel_advised},
               "raw": {"channel_mean": list(samples.mean), "channel_std": list(samples.std()),
                       "latent_shape": obs["latent_shape"]}}
    if cfg.notes:
        details["notes"] = list(cfg.notes)
    # What the row says when no finding counts: what was measured.
    summary = (f"the configured transform ({cfg.formula()}) gives latents of std {std:.3g}, mean {mean:.3g} on "
               f"{images} images; recommended scaling_factor {rec.scaling_factor:.4g}"
               + (f", shift_factor {rec.shift_factor:.4g}" if rec.shift_factor is not None else ""))
    return CheckResult(id="scale", title="VAE latent scaling (standalone)", verdict=Verdict.PASS, summary=summary,
                       measurements=measurements, details=details, findings=findings)


# ---------------------------------------------------------------------------------------------------------- run


def run(vae_spec: str, *, images: Optional[str], resolution: Optional[int], settings: Any,
        origins: Optional[dict[str, str]] = None):
    """The standalone report. Raises UsageError (one line, exit 2) for a missing folder, broken config, bad image."""
    import time

    import torch

    from fmcheck.config import thresholds_for
    from fmcheck.isolate import capture, describe
    from fmcheck.registry import discover
    from fmcheck.runner import assemble, error_result
    from fmcheck.settle import check_ignores, settle

    from . import ScaleCheck

    thresholds = thresholds_for(ScaleCheck, settings, origins or {})
    check_ignores(settings.ignore, discover())  # a config's ignore list may name any check's codes
    device = torch.device(settings.device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {settings.device}: CUDA is not available on this machine")
    started = time.perf_counter()
    folder = locate(vae_spec)
    config = read_config(folder)
    side = _resolution(config, resolution)
    vae = load_vae(folder, config, device)
    channels = int(config.get("in_channels") or getattr(vae.config, "in_channels", 3))
    pixels, source = load_images(images, channels, side)
    torch.manual_seed(settings.seed)
    # The VAE's own code runs here: a crash in it is an ERROR row, as in any check the runner isolates.
    measured = capture(measure, vae, pixels)
    judged = capture(judge, measured.value, dict(vae.config), thresholds, len(pixels), source) if measured.ok \
        else measured
    if judged.ok:
        result = settle(judged.value, judged.value.summary, settings.ignore, settings.strict)
        result.duration_s = time.perf_counter() - started
    else:
        result = error_result(ScaleCheck, judged.exc, settings.debug, time.perf_counter() - started)
        if measured.ok:
            result.summary = f"judging failed: {describe(judged.exc)}"
    return assemble([result], settings, device, f"--vae {vae_spec}")
