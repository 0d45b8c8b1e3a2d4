"""``mimfast demo``: the codebook search and the quantizers on a built-in batch (no download, CPU is fine).

1. Speed of ``mimfast.vq_search`` against the eager N x K search most VQ code uses, and their agreement.
2. An EMA ``mimfast.VectorQuantizer`` with k-means init and dead-code restart trained on the batch, usage printed.
3. The three quantizer families side by side (``--compare-steps``): the same tiny autoencoder (linear encoder,
   quantizer, linear decoder) trained on the same clustered features with plain VQ (learnable codebook, no
   dead-code restart), ``mimfast.GumbelQuantizer`` (temperature annealed 1 -> 0.1) and
   ``mimfast.RegularizedQuantizer``; printed: reconstruction error, codebook perplexity and codes used.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn as nn

from . import __version__

__all__ = ["cmd_demo", "compare_quantizers"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up (compiles Triton kernels on first call)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _eager_search(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """What taming-style VQ code does: the full N x K fp32 distance matrix, then argmin."""
    xf, ef = x.float(), e.float()
    d = (xf * xf).sum(1, keepdim=True) + (ef * ef).sum(1)[None, :] - 2 * xf @ ef.T
    return d.argmin(dim=1)


def _mixture(n: int, dim: int, clusters: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    centres = torch.randn(clusters, dim, generator=gen) * 3
    which = torch.randint(0, clusters, (n,), generator=gen)
    return (centres[which] + 0.5 * torch.randn(n, dim, generator=gen)).to(device)


def compare_quantizers(x: torch.Tensor, *, steps: int = 300, codebook_size: int = 256, latent: int = 16,
                       batch: int = 1024, seed: int = 0) -> dict[str, dict[str, float]]:  # fmt: skip
    """Train ``Linear(D, latent) -> quantizer -> Linear(latent, D)`` on ``x (N, D)`` with each quantizer family for
    ``steps`` Adam steps (same data order and init); returns ``{name: {"mse", "perplexity", "used_fraction"}}``
    measured on all of ``x`` in eval mode (argmax codes)."""
    import mimfast

    def make(name: str) -> nn.Module:
        if name == "vq (no restart)":
            return mimfast.VectorQuantizer(latent, codebook_size, ema_update=False)
        if name == "gumbel":
            return mimfast.GumbelQuantizer(latent, codebook_size)
        return mimfast.RegularizedQuantizer(latent, codebook_size)

    out = {}
    n, d = x.shape
    for name in ("vq (no restart)", "gumbel", "regularized"):
        torch.manual_seed(seed)
        enc, dec = nn.Linear(d, latent).to(x.device), nn.Linear(latent, d).to(x.device)
        q = make(name).to(x.device)
        params = [*enc.parameters(), *dec.parameters(), *q.parameters()]
        opt = torch.optim.Adam(params, lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for step in range(steps):
            if hasattr(q, "tau"):  # anneal the Gumbel temperature as taming does, 1 -> 0.1
                q.tau = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps - 1, 1)))
            xb = x[torch.randint(0, n, (min(batch, n),), generator=gen).to(x.device)]
            zq, _, qloss = q(enc(xb))
            loss = ((dec(zq) - xb) ** 2).mean() + qloss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        q.eval()
        with torch.no_grad():
            zq, idx, _ = q(enc(x))
            mse = float(((dec(zq) - x) ** 2).mean())
            counts = torch.bincount(idx.reshape(-1).long().cpu(), minlength=codebook_size).double()
            p = counts / counts.sum()
            perplexity = math.exp(-float((p[p > 0] * p[p > 0].log()).sum()))
        out[name] = {"mse": mse, "perplexity": perplexity, "used_fraction": float((counts > 0).double().mean())}
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    import mimfast

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was asked for but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    n = args.n or (65536 if device.type == "cuda" else 16384)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    path = "Triton kernel" if mimfast.kernels.use_triton(torch.empty(0, device=device)) else "PyTorch reference path"
    print(f"mimfast {__version__} demo | device={device} ({path}) | torch {torch.__version__}")
    print(f"batch: N={n} vectors of D={args.dim} ({args.dtype}), codebook K={args.codebook_size}, seed {args.seed}")

    x = _mixture(n, args.dim, args.clusters, gen, device).to(dtype)
    codebook = torch.randn(args.codebook_size, args.dim, generator=gen).to(device).to(dtype)

    # 1) speed of the search itself, against the eager path, plus agreement of the two
    t_fast = _time(lambda: mimfast.kernels.vq_search(x, codebook), device, args.reps)
    nk_bytes = n * args.codebook_size * 4
    t_eager = _time(lambda: _eager_search(x, codebook), device, args.reps)
    idx, _, _ = mimfast.vq_search(x, codebook)
    agree = (idx == _eager_search(x, codebook)).float().mean().item()
    print(f"search  mimfast {t_fast * 1e3:8.2f} ms  ({n / t_fast / 1e6:7.2f} M vectors/s)")
    print(f"search  eager   {t_eager * 1e3:8.2f} ms  (builds a {nk_bytes / 2**20:.0f} MiB N x K fp32 matrix)"
          f"  -> speed-up {t_eager / t_fast:5.2f}x, index agreement {agree:.4%}")  # fmt: skip

    # 2) train an EMA quantizer on the batch: usage should rise from the random init to most codes in use
    vq = mimfast.VectorQuantizer(
        args.dim, args.codebook_size, decay=0.9, kmeans_init=True, kmeans_iters=5, threshold_ema_dead_code=0.5
    ).to(device)
    with torch.no_grad():
        _, _, loss0 = mimfast.quantize(x, vq.embed.to(dtype), codebook_loss=False)
    print(f"random codebook: commitment loss {loss0.item():.4f}")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = x[torch.randint(0, n, (min(n, args.batch),), generator=gen).to(device)]
        _, _, loss = vq(batch)
        if step == 1 or step % max(1, args.steps // 5) == 0 or step == args.steps:
            u = vq.usage()
            print(f"  step {step:4d}/{args.steps}  loss {loss.item():.4f}  perplexity {u['perplexity'].item():8.1f}"
                  f"  codes used {u['used_fraction'].item():6.1%}")  # fmt: skip
    _sync(device)
    dt = time.perf_counter() - t0
    vq.eval()
    with torch.no_grad():
        _, _, loss1 = vq(x)
    u = vq.usage()
    print(f"trained codebook: commitment loss {loss1.item():.4f} (was {loss0.item():.4f}), perplexity "
          f"{u['perplexity'].item():.1f} of {args.codebook_size}, codes used {u['used_fraction'].item():.1%}, "
          f"{args.steps * min(n, args.batch) / dt / 1e3:.1f}k vectors/s in training")  # fmt: skip

    # 3) the quantizer families side by side on the same autoencoder and data
    if args.compare_steps:
        k = min(256, args.codebook_size)
        print(f"quantizers side by side: Linear({args.dim}, 16) -> quantizer ({k} codes) -> Linear(16, {args.dim}), "
              f"{args.compare_steps} Adam steps each on the batch (fp32), eval on all of it:")  # fmt: skip
        t0 = time.perf_counter()
        res = compare_quantizers(x.float(), steps=args.compare_steps, codebook_size=k, seed=args.seed)
        print(f"  {'quantizer':<18}{'recon MSE':>11}{'perplexity':>12}{'codes used':>12}")
        for name, m in res.items():
            print(f"  {name:<18}{m['mse']:11.4f}{m['perplexity']:12.1f}{m['used_fraction']:12.1%}")
        print(f"  ({time.perf_counter() - t0:.1f} s)")
    return 0
