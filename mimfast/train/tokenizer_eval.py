"""``mimfast evaluate-tokenizer``: how well a trained tokenizer reconstructs and how much of its codebook it uses.

On every image of the validation split (eval transform): the L1 distance between the image and the decoded tokens
(in the loader's normalised space, the training loss's ``rec_l1``), and the distribution of the token ids over the
whole split: the fraction of codes used at least once and the perplexity ``exp(entropy)`` (K when all codes are
used equally, 1 when one code takes everything). The same numbers for the run's initialisation (the same seed,
before any step) put them in context.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from .evaluate import _device, _eval_loaders, load_pretrained

__all__ = ["evaluate_tokenizer", "tokenizer_metrics"]


@torch.no_grad()
def tokenizer_metrics(model, loader, device: torch.device) -> dict[str, float]:
    """``{"l1", "used_fraction", "perplexity", "num_images"}`` of ``model`` (with ``encode`` / ``decode``) over one
    epoch of an eval ``loader`` (padding slots excluded)."""
    model = model.to(device).eval()
    k = model.config.codebook_size
    counts = torch.zeros(k, dtype=torch.float64)
    l1_sum, n = 0.0, 0
    for batch in loader:
        imgs = batch.images.to(device)
        keep = batch.valid.to(torch.bool).to(device)
        ids = model.encode(imgs)
        rec = model.decode(ids)
        err = (rec.float() - imgs.float()).abs().mean(dim=(1, 2, 3))
        l1_sum += float(err[keep].sum())
        n += int(keep.sum())
        counts += torch.bincount(ids[keep].reshape(-1).cpu(), minlength=k).double()
    p = counts / counts.sum()
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    return {"l1": l1_sum / max(n, 1), "used_fraction": float((counts > 0).double().mean()),
            "perplexity": math.exp(entropy), "num_images": n}  # fmt: skip


def evaluate_tokenizer(checkpoint, *, data_root=None, batch_size: int = 64, device=None,
                       compare_init: bool = True) -> dict:  # fmt: skip
    """Metrics of a tokenizer checkpoint (a ``ckpt_*.pt`` file or run directory) on its validation split:
    ``{"trained": {...}, "init": {...}, "step": ..., "model": ..., "quantizer": ...}`` (see :func:`tokenizer_metrics`;
    ``init`` = the same architecture at the run's seed before training, when ``compare_init``)."""
    dev = _device(device) if not isinstance(device, torch.device) else device
    model, cfg, step = load_pretrained(checkpoint)
    if getattr(model, "task", None) != "tokenizer":
        raise ValueError(f"checkpoint: {checkpoint} holds a {cfg.model.name} ({getattr(model, 'task', None)} task), "
                         "not a tokenizer; use mimfast probe / reconstruct")  # fmt: skip
    _, _, val = _eval_loaders(cfg, data_root, batch_size, dev)
    out = {"checkpoint": str(checkpoint), "step": step, "model": cfg.model.name,
           "quantizer": model.config.quantizer, "data": str(data_root or cfg.data.root),
           "trained": tokenizer_metrics(model, val, dev)}  # fmt: skip
    if compare_init:
        init, _, _ = load_pretrained(checkpoint, random_init=True, seed=cfg.train.seed)
        out["init"] = tokenizer_metrics(init, val, dev)
    return out


def add_evaluate_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a tokenizer run directory or ckpt_*.pt file")
    p.add_argument("--data-root", default=None, help="dataset with a val/ split (default: the run's data.root)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-init", action="store_true", help="skip the comparison with the initialisation")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def cmd_evaluate_tokenizer(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    res = evaluate_tokenizer(args.checkpoint, data_root=args.data_root, batch_size=args.batch_size,
                             device=args.device, compare_init=not args.no_init)  # fmt: skip
    t = res["trained"]
    print(f"tokenizer {res['model']} ({res['quantizer']} quantizer) at step {res['step']}, val split of "
          f"{res['data']} ({t['num_images']} images):")  # fmt: skip
    print(f"  {'':12}{'L1':>10}{'codes used':>14}{'perplexity':>14}")
    for name in ("trained", "init"):
        if name in res:
            m = res[name]
            print(f"  {name:12}{m['l1']:10.4f}{m['used_fraction']:14.1%}{m['perplexity']:14.1f}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(f"  results: {path}")
    return 0
