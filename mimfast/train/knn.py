"""Weighted k-NN evaluation of a frozen encoder (``mimfast knn``), as DINO's ``eval_knn.py`` defines it.

Features of the train and val splits are extracted once with the eval transform (resize + centre crop) and
L2-normalised. For every val image the ``k`` train images of highest cosine similarity ``s`` vote for their class
with weight ``exp(s / T)``; the class with the largest vote is the prediction (top-1), the five largest give top-5.
DINO's defaults: ``k = 20``, ``T = 0.07``, the class token.

:func:`knn_classify` is chunked on both sides: a block of ``test_chunk`` val rows is compared with ``train_chunk`` train
rows at a time and a running top-k is merged across the train blocks, so memory beyond the inputs is
O(test_chunk x train_chunk + test_chunk x (k + classes)) however large the bank is (never M x N, nor test_chunk x N).
It runs on the features' device.

Determinism: neighbours are ranked by similarity, then by train index (ties go to the lower index, like
``torch.argmin``), whatever the chunk sizes; classes are ranked by vote, ties to the lower class index. A class
that none of the ``k`` neighbours belongs to is never a top-5 hit (DINO takes the first ``min(5, k)`` of its sorted
votes instead); with fewer than five classes top-5 is top-``num_classes``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .evaluate import (
    POOLS,
    _compare_with_random,
    _device,
    _eval_loaders,
    _pct,
    _pool_name,
    extract_pooled_features,
    load_pretrained,
)

__all__ = ["add_knn_arguments", "cmd_knn", "knn_classify", "knn_evaluate"]


def _check_inputs(train_feats, train_labels, test_feats, test_labels, k, temperature, num_classes, chunks):
    for name, x in (("train_feats", train_feats), ("test_feats", test_feats)):
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
            got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected a floating-point tensor (rows, D), got {got}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{name}: expected at least one row and one feature, got shape {tuple(x.shape)}")
    if test_feats.shape[1] != train_feats.shape[1]:
        raise ValueError(f"test_feats: expected {train_feats.shape[1]} features per row like train_feats, got "
                         f"{test_feats.shape[1]}")  # fmt: skip
    if test_feats.device != train_feats.device:
        raise ValueError(f"test_feats: on {test_feats.device} but train_feats on {train_feats.device}")
    for name, y, x in (("train_labels", train_labels, train_feats), ("test_labels", test_labels, test_feats)):
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer tensor, got {getattr(y, 'dtype', type(y).__name__)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"{name}: expected shape ({x.shape[0]},) (one label per row), got {tuple(y.shape)}")
        if int(y.min()) < 0:
            raise ValueError(f"{name}: expected labels >= 0, got {int(y.min())}")
    for name, x in (("train_feats", train_feats), ("test_feats", test_feats)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: holds NaN or inf")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    if k > train_feats.shape[0]:
        raise ValueError(f"k: expected at most the {train_feats.shape[0]} training rows, got {k}")
    finite = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and math.isfinite(temperature)
    if not (finite and temperature > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    top = max(int(train_labels.max()), int(test_labels.max()))
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= top:
            raise ValueError(f"num_classes: expected an int above every label (> {top}), got {num_classes!r}")
    for name, c in chunks:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {c!r}")
    return top + 1 if num_classes is None else num_classes


def _chunk_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of every row of ``sims (B, T)`` with ties at the cut going to the lower column:
    ``(values (B, k), columns (B, k))``, in no particular order. ``torch.topk`` is used where the cut is unambiguous,
    a stable sort on the rows whose k-th value is shared with a column left out."""
    vals, cols = sims.topk(k, dim=1, largest=True, sorted=False)
    kth = vals.min(dim=1, keepdim=True).values
    tied = (sims == kth).sum(1) > (vals == kth).sum(1)  # some column equal to the cut value was left out
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        s_vals, s_cols = sims[rows].sort(dim=1, descending=True, stable=True)
        vals[rows], cols[rows] = s_vals[:, :k], s_cols[:, :k]
    return vals, cols


def _rank(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` best of each row by (value descending, index ascending), in that order."""
    order = idx.sort(dim=1, stable=True).indices
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = vals.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return vals.gather(1, order), idx.gather(1, order)


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    test_chunk: int = 1024,
    train_chunk: int = 32768,
    return_neighbors: bool = False,
) -> dict:
    """DINO's weighted k-NN classifier: top-1 / top-5 of ``test_feats`` against the bank ``train_feats``.

    Args:
        train_feats: (N, D) floating point; rows are L2-normalised here (an all-zero row stays zero: similarity 0).
        train_labels: (N,) integer class ids >= 0.
        test_feats: (M, D), same device as ``train_feats``.
        test_labels: (M,) integer class ids >= 0.
        k: neighbours per test row, 1 <= k <= N (a larger k is an error, not clamped: the protocol would change).
        temperature: T > 0 of the vote weights exp(similarity / T).
        num_classes: C, above every label; default: the largest label + 1.
        test_chunk, train_chunk: rows of each side per block (any sizes >= 1; they do not change the result).
        return_neighbors: also return per-row detail (below).

    Similarities are computed in float32 (float64 for float64 inputs). Returns ``{"top1", "top5"}`` (fractions in
    [0, 1]); with ``return_neighbors`` also ``"neighbors"`` (M, k) int64 train indices and ``"similarities"`` (M, k),
    both ranked by (similarity descending, index ascending), and ``"predictions"`` (M, min(5, C)) class ids ranked by
    vote (ties to the lower id; -1 where fewer classes got a vote).
    """
    num_classes = _check_inputs(train_feats, train_labels, test_feats, test_labels, k, temperature, num_classes,
                                (("test_chunk", test_chunk), ("train_chunk", train_chunk)))  # fmt: skip
    dev = train_feats.device
    work = torch.promote_types(train_feats.dtype, torch.float32)
    train_labels, test_labels = train_labels.to(dev, torch.int64), test_labels.to(dev, torch.int64)
    n, m = train_feats.shape[0], test_feats.shape[0]
    top = min(5, num_classes)
    hits1 = hits5 = 0
    details = {"neighbors": [], "similarities": [], "predictions": []}
    for t0 in range(0, m, test_chunk):
        q = F.normalize(test_feats[t0 : t0 + test_chunk].to(work), dim=1)
        best_v = torch.full((q.shape[0], 0), -math.inf, dtype=work, device=dev)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=dev)
        for s0 in range(0, n, train_chunk):
            bank = F.normalize(train_feats[s0 : s0 + train_chunk].to(work), dim=1)
            vals, cols = _chunk_topk(q @ bank.T, min(k, bank.shape[0]))
            best_v, best_i = _rank(torch.cat([best_v, vals], 1), torch.cat([best_i, cols + s0], 1), k)
        # votes: sum over neighbours of exp(s / T), shifted by the row's best s (same ranking, no overflow)
        w = torch.exp((best_v - best_v[:, :1]) / temperature)
        nb_labels = train_labels[best_i]
        votes = torch.zeros((q.shape[0], num_classes), dtype=work, device=dev).scatter_add_(1, nb_labels, w)
        voted = torch.zeros_like(votes, dtype=torch.bool).scatter_(1, nb_labels, True)
        votes = torch.where(voted, votes, -1.0)  # a class without a neighbour ranks below every voted one
        order = votes.sort(dim=1, descending=True, stable=True).indices[:, :top]
        order = torch.where(voted.gather(1, order), order, -1)
        hit = order == test_labels[t0 : t0 + test_chunk, None]
        hits1 += int(hit[:, 0].sum())
        hits5 += int(hit.any(1).sum())
        if return_neighbors:
            details["neighbors"].append(best_i)
            details["similarities"].append(best_v)
            details["predictions"].append(order)
    out = {"top1": hits1 / m, "top5": hits5 / m}
    if return_neighbors:
        out.update({key: torch.cat(v) for key, v in details.items()})
    return out


def knn_evaluate(
    checkpoint: str | Path,
    *,
    pools=POOLS,
    k: int = 20,
    temperature: float = 0.07,
    data_root: str | None = None,
    random_init: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    device=None,
    progress: bool = True,
    loaders=None,
) -> dict[str, dict]:
    """Weighted k-NN (:func:`knn_classify`) of the frozen encoder of a pretraining checkpoint (or of a seeded random
    encoder of the same architecture) on the run's dataset (or ``data_root``): ``{pool: {"top1", "top5"}}`` for each
    pooling in ``pools``, from one feature-extraction pass per split. ``loaders`` = ``(train, val)`` eval loaders
    reuses them; the classification runs on ``device``."""
    dev = _device(device) if not isinstance(device, torch.device) else device
    model, cfg, _ = load_pretrained(checkpoint, random_init=random_init, seed=seed)
    train, val = loaders if loaders is not None else _eval_loaders(cfg, data_root, batch_size, dev)[1:]
    tf, ty = extract_pooled_features(model, train, pools=pools, device=dev, progress=progress)
    vf, vy = extract_pooled_features(model, val, pools=pools, device=dev, progress=progress)
    return {p: knn_classify(tf[p].to(dev), ty, vf[p].to(dev), vy, k=k, temperature=temperature) for p in tf}


# --------------------------------------------------------------------------------------------------- the CLI
def add_knn_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a ckpt_*.pt file or a run directory (its newest checkpoint)")
    p.add_argument("--data-root", default=None, help="dataset with train/ and val/ (default: the run's data.root)")
    p.add_argument("--pool", choices=("cls", "mean", "both"), default="both",
                   help="feature: the class token (DINO's), the mean of patch tokens, or both (default)")  # fmt: skip
    p.add_argument("--k", type=int, default=20, help="neighbours (DINO: 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="T of the vote weights exp(cos / T) (DINO: 0.07)")
    p.add_argument("--compare-random", action="store_true", help="also evaluate randomly initialised encoders")
    p.add_argument("--random-seeds", type=int, default=3, help="random inits to evaluate (seeds seed..seed+N-1)")
    p.add_argument("--random-init", action="store_true", help="evaluate only randomly initialised encoders")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature-extraction batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="where features are extracted and classified")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def cmd_knn(args: argparse.Namespace) -> int:
    if args.random_seeds < 1 or args.batch_size < 1 or args.k < 1:
        print(f"error: --k, --random-seeds and --batch-size must be >= 1, got {args.k}, {args.random_seeds}, "
              f"{args.batch_size}", file=sys.stderr)  # fmt: skip
        return 2
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        print(f"error: --temperature must be a finite number > 0, got {args.temperature}", file=sys.stderr)
        return 2
    dev = _device(args.device)  # errors are reported by mimfast.cli.main (one line, exit 2)
    _, cfg, step = load_pretrained(args.checkpoint)
    data_cfg, train, val = _eval_loaders(cfg, args.data_root, args.batch_size, dev)
    if args.k > train.num_samples:
        print(f"error: --k {args.k} exceeds the {train.num_samples} training images of {data_cfg.root}",
              file=sys.stderr)  # fmt: skip
        return 2
    pools = POOLS if args.pool == "both" else (args.pool,)
    runs = [] if args.random_init else [(False, args.seed)]
    if args.random_init or args.compare_random:
        runs += [(True, args.seed + i) for i in range(args.random_seeds)]
    print(f"weighted k-NN (k={args.k}, T={args.temperature:g}, cosine, DINO's): {cfg.model.name} from "
          f"{args.checkpoint} (step {step}), data {data_cfg.root}, {train.num_samples} train / {val.num_samples} val "
          "images (eval transform); val top-1 (top-5) by feature:")  # fmt: skip
    print(f"  {'encoder':<22}" + "".join(f"{_pool_name(p):>22}" for p in pools))
    rows = []
    for is_random, seed in runs:
        t0 = time.perf_counter()
        res = knn_evaluate(args.checkpoint, pools=pools, k=args.k, temperature=args.temperature,
                           random_init=is_random, seed=seed, device=dev, progress=False,
                           loaders=(train, val))  # fmt: skip
        label = f"random init (seed {seed})" if is_random else f"pretrained (step {step})"
        cells = "".join(f"{_pct(res[p]['top1'])} ({_pct(res[p]['top5'])})".rjust(22) for p in pools)
        print(f"  {label:<22}{cells}   {time.perf_counter() - t0:.1f} s", flush=True)
        rows.append({"encoder": "random" if is_random else "pretrained", "seed": seed, **res})
    summary = _compare_with_random(rows, pools)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": str(args.checkpoint), "step": step, "model": cfg.model.name, "data": data_cfg.root,
                  "num_train": train.num_samples, "num_val": val.num_samples, "k": args.k,
                  "temperature": args.temperature, "runs": rows, "summary": summary}  # fmt: skip
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"  results: {out}")
    return 0
