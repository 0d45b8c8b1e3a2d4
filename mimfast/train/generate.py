"""``mimfast generate``: images from a trained MAGE run by MaskGIT decoding on the device, written as a PNG grid.

The run (a run directory or a ``ckpt_*.pt`` file) is rebuilt with :func:`mimfast.train.evaluate.load_pretrained`;
its tokenizer comes from the run's own ``model.loss.tokenizer`` key (the one the MAGE task trained with; the task
attaches it when it rebuilds the model, else :func:`~mimfast.train.tasks.token_prediction.load_tokenizer` loads it
here), and must have the model's ``codebook_size`` codes. Token ids are sampled by
:func:`mimfast.models.maskgit.generate` (bf16 autocast on CUDA by default), decoded in fp32 and mapped back to
[0, 1] pixels with the run's ``data.mean / std``. The printed images/s counts the token sampling and the decoding.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.maskgit import generate
from .evaluate import _device, load_pretrained

__all__ = ["add_generate_arguments", "cmd_generate", "generate_grid", "load_generator", "save_image_grid"]

PRECISIONS = ("auto", "fp32", "bf16")


def _decoder(tok, spec: str):
    """The tokenizer as something with ``decode(ids (B, G, G)) -> images (B, 3, H, W)`` in the run's space."""
    if callable(getattr(tok, "decode", None)):
        return tok
    raise ValueError(f"model.loss.tokenizer={spec!r}: the tokenizer ({type(tok).__name__}) has no decode(ids); "
                     "generation needs a tokenizer that decodes token ids to images")  # fmt: skip


def load_generator(checkpoint: str | Path):
    """A MAGE run and its tokenizer: ``(model, decoder, cfg, step)``; the model is in eval mode on the CPU and
    ``decoder.decode(ids (B, G, G))`` gives images in the run's normalised space.

    Raises ValueError when the checkpoint is not a MAGE run, its tokenizer cannot be loaded or decode, or the
    tokenizer's vocabulary / grid differs from the model's (CheckpointError for an unreadable checkpoint).
    """
    from .tasks.token_prediction import check_token_grid, load_tokenizer, vocab_size

    model, cfg, step = load_pretrained(checkpoint)
    task = getattr(model, "task", None)
    if not (callable(getattr(model, "predict_logits", None)) and hasattr(model, "mask_token_id")):
        raise ValueError(f"checkpoint: {checkpoint} holds a {cfg.model.name} ({task} task), not a MAGE run; "
                         "mimfast generate needs a MAGE run (e.g. mimfast pretrain --config mage_debug)")  # fmt: skip
    spec = str((cfg.model.loss or {}).get("tokenizer", ""))
    tok = None
    try:
        from .tasks.mage import attached_tokenizer

        tok = attached_tokenizer(model)
    except ImportError:  # pragma: no cover - a mimfast without the MAGE task
        pass
    if tok is None:
        tok = load_tokenizer(spec, cfg.data)
    k_model = int(model.config.codebook_size)
    k_tok = vocab_size(tok)
    if k_tok != k_model:
        raise ValueError(f"model.loss.tokenizer={spec!r} has {k_tok} codes but the MAGE model {cfg.model.name} "
                         f"predicts codebook_size={k_model}: the run's tokenizer must be the one it trained "
                         "with")  # fmt: skip
    check_token_grid(tok, int(model.grid_size), cfg.model.name, f"model.loss.tokenizer={spec!r}")
    dec = _decoder(tok, spec)
    if isinstance(dec, nn.Module):
        dec.eval()
    return model, dec, cfg, step


def save_image_grid(images: torch.Tensor, out: str | Path, *, ncols: int | None = None, pad: int = 2,
                    scale: int = 1) -> Path:  # fmt: skip
    """Write images (N, 3, H, W) with pixels in [0, 1] (clamped) as one PNG grid, ``ncols`` per row (default
    ceil(sqrt(N))), ``pad`` white pixels between tiles, nearest-neighbour ``scale``; atomically (a temporary file
    renamed into place). Returns the path."""
    from PIL import Image

    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images: expected (N >= 1, 3, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    th, tw = h * scale, w * scale
    canvas = torch.ones(3, nrows * (th + pad) + pad, ncols * (tw + pad) + pad)
    for i in range(n):
        t = images[i].float().cpu().clamp(0, 1)
        if scale > 1:
            t = F.interpolate(t[None], scale_factor=scale, mode="nearest")[0]
        y, x = pad + (i // ncols) * (th + pad), pad + (i % ncols) * (tw + pad)
        canvas[:, y : y + th, x : x + tw] = t
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arr = (canvas.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    tmp = out.with_name(out.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(out)
    return out


def _check_args(num_images, steps, temperature, batch_size) -> None:
    for name, v in (("--num-images", num_images), ("--steps", steps), ("--batch-size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature: expected a finite number >= 0 (the choice temperature), got {temperature!r}")


def generate_grid(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    num_images: int = 16,
    steps: int = 12,
    temperature: float = 4.5,
    class_ids: list[int] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device=None,
    precision: str = "auto",
) -> dict:
    """Generate ``num_images`` images from a MAGE run and write them as a PNG grid.

    ``class_ids`` are assigned to the images in turn (image i gets ``class_ids[i % len]``); None is unconditional.
    ``precision``: "auto" (bf16 autocast for the model on CUDA, fp32 on the CPU), "fp32" or "bf16". ``out``
    defaults to ``generated.png`` beside the checkpoint. Returns ``{"path", "images_per_s", "seconds", "num_images",
    "step", "model"}``.
    """
    from ..data import denormalize

    _check_args(num_images, steps, temperature, batch_size)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = _device(device) if not isinstance(device, torch.device) else device
    model, dec, cfg, step = load_generator(checkpoint)
    num_classes = int(getattr(model.config, "num_classes", 0) or 0)
    cls = None
    if class_ids:
        for c in class_ids:
            if not 0 <= c < num_classes:
                known = f"class ids 0..{num_classes - 1}" if num_classes else "no classes (unconditional)"
                raise ValueError(f"--class-id: {c} is not a class of {cfg.model.name} (it has {known})")
        if not (cfg.model.loss or {}).get("class_conditional", False):
            warnings.warn(f"{checkpoint} was trained unconditionally (model.loss.class_conditional=false): its "
                          "class tokens never carried a label, so --class-id does not select a class",
                          stacklevel=2)  # fmt: skip
        cls = [class_ids[i % len(class_ids)] for i in range(num_images)]
    use_bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    model = model.to(dev).eval()
    if isinstance(dec, nn.Module):
        dec.to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    images = generate(model, dec, num_images, steps=steps, choice_temperature=temperature, class_ids=cls,
                      batch_size=batch_size, generator=gen,
                      autocast_dtype=torch.bfloat16 if use_bf16 else None)  # fmt: skip
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    pixels = denormalize(images, cfg.data)
    if out is None:
        run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        out = run_dir / "generated.png"
    h = pixels.shape[-2]
    path = save_image_grid(pixels, out, scale=max(1, round(128 / h)))
    return {"path": path, "images_per_s": num_images / seconds, "seconds": seconds, "num_images": num_images,
            "step": step, "model": cfg.model.name, "precision": "bf16" if use_bf16 else "fp32",
            "device": str(dev)}  # fmt: skip


# --------------------------------------------------------------------------------------------------- the CLI
def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a MAGE run directory or ckpt_*.pt file")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--steps", type=int, default=12, help="MaskGIT decoding steps T (MAGE: 12; 20 for FID runs)")
    p.add_argument("--temperature", type=float, default=4.5,
                   help="choice temperature of the re-masking noise (MAGE: 4.5; 6.0 for FID runs)")  # fmt: skip
    p.add_argument("--class-id", type=int, nargs="+", default=None, dest="class_ids", metavar="N",
                   help="class ids given to the images in turn (conditional runs); default: unconditional")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="model precision: auto = bf16 autocast on CUDA, else fp32 (decoding is fp32)")  # fmt: skip
    p.add_argument("--out", default=None, help="PNG to write (default: generated.png beside the checkpoint)")


def cmd_generate(args: argparse.Namespace) -> int:
    res = generate_grid(args.checkpoint, args.out, num_images=args.num_images, steps=args.steps,
                        temperature=args.temperature, class_ids=args.class_ids, seed=args.seed,
                        batch_size=args.batch_size, device=args.device, precision=args.precision)  # fmt: skip
    print(f"generated {res['num_images']} images with {res['model']} (step {res['step']}, {args.steps} steps, "
          f"{res['precision']} on {res['device']}) in {res['seconds']:.2f} s: {res['images_per_s']:.1f} images/s "
          "(sampling + decoding)")  # fmt: skip
    print(f"grid: {res['path']}")
    return 0
