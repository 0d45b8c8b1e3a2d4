"""Block-wise (BEiT / CAE) mask generation for a whole batch in one launch: ``mimfast::block_mask``.

BEiT's ``MaskingGenerator`` draws one mask per sample with Python's ``random`` on the CPU, inside the data loader.
This op draws B masks on the device in one launch (one Triton program per sample, the sample's H x W mask held as a
2-D tile in registers) with no host synchronisation. All randomness is drawn beforehand with torch (so it
is seeded by a ``torch.Generator``) and the kernel and the reference consume it identically, which makes them
bit-identical:

* ``uniforms`` (B, A, 4) fp32 in [0, 1): row k of sample b is that sample's k-th *attempt* (area, log-aspect, top,
  left). A is the attempt budget (``max_attempts``).
* ``noise`` (B, H*W) fp32, exact mode only: the fallback order when the budget runs out (below).

The algorithm is BEiT's, exactly (``min_aspect``/``max_aspect`` bound a log-uniform aspect ratio, ``max_num`` is
``max_num_patches`` or the target)::

    count = 0
    while count < target:                       # one "block"
        max_mask = min(target - count, max_num)
        for attempt in range(10):               # each attempt consumes the next uniforms row (u0, u1, u2, u3)
            area   = min_num + (max_mask - min_num) * u0        # random.uniform(min_num, max_mask), either order
            aspect = exp(log(min_aspect) + (log(max_aspect) - log(min_aspect)) * u1)
            h = round(sqrt(area * aspect)); w = round(sqrt(area / aspect))   # round half to even, as Python's round
            if w < W and h < H:
                top  = min(floor(u2 * (H - h + 1)), H - h)      # random.randint(0, H - h)
                left = min(floor(u3 * (W - w + 1)), W - w)
                new = h * w - (cells already masked in the rectangle)
                if 0 < new <= max_mask: mask the rectangle; count += new; break
        else:                                   # 10 attempts added nothing
            BEiT mode (exact=False): stop (the mask may hold fewer than target cells, as BEiT's does)
            CAE mode (exact=True): start another block (CAE loops until the count is exactly the target)

Arithmetic is float64 with correctly rounded *, /, sqrt (IEEE on every backend), the aspect ratio is computed once
by torch for both paths, and ``round`` is half-to-even, so every decision equals the one BEiT's Python code takes on
the same uniforms. The masked count never exceeds the target.

Attempt budget: a sample stops after A attempts in total. BEiT mode then keeps what it has (an under-fill, which
BEiT allows anyway). Exact mode then masks the ``target - count`` unmasked cells with the smallest ``noise`` (ties,
and NaN read as +inf, go to the lowest cell index), so its count is always exactly the target. With the default
budgets of ``mimfast.ops.block_masking`` this is very rare (measurements at DEFAULT_MAX_ATTEMPTS); grids where
BEiT's rule can never place a block (a side of length 1: blocks need h < H and w < W) always take it in exact mode.

Outputs: mask (B, H*W) bool, True = masked, row-major over the grid; attempts (B,) int32, the uniforms rows used.

Layout of this file (STYLE.md): Triton kernel, the validating launcher, the ``torch.library`` binding with its CPU
kernel, and ``block_mask_ref``, the plain-PyTorch reference.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from ._common import (
    HAS_TRITON,
    check_same_device,
    check_tensor,
    device_guard,
    interpret_mode,
    new_output,
    next_pow2,
    use_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

ATTEMPTS_PER_BLOCK = 10  # BEiT's ``for attempt in range(10)``
# Attempt budgets, from the reference over 10^6 samples per setting (14 x 14, min 16 patches, aspect [0.3, 1/0.3]):
#   BEiT 75 (exact=False): attempts per sample mean 11.2, median 11, p99 26, p99.99 36, p99.999 42, max 51;
#                          P(> 32) = 6e-4, P(> 48) = 1e-6 (each failing block costs 10 attempts, one ends the mask)
#   CAE 98 (exact=True):   mean 17.4, median 13, p99 76, p99.9 121, p99.99 174, p99.999 232, max 300;
#                          P(> 64) = 1.8e-2, P(> 128) = 7e-4, P(> 192) = 4.5e-5, P(> 256) = 5e-6 (a remainder below
#                          16 cells needs a small block, which few draws give; the tail falls ~4x per 32 attempts)
# Defaults: 128 for BEiT mode (> 2.5x the largest seen) and 512 for exact mode (fallback rate extrapolated ~1e-10).
# The kernel's loop stops when a sample is done, so the budget costs uniforms memory (16 bytes per attempt), not time.
DEFAULT_MAX_ATTEMPTS = 128
DEFAULT_MAX_ATTEMPTS_EXACT = 512


def default_max_attempts(exact: bool) -> int:
    """The attempt budget ``mimfast.ops.block_masking`` uses when none is given (see the measurements above)."""
    return DEFAULT_MAX_ATTEMPTS_EXACT if exact else DEFAULT_MAX_ATTEMPTS


# One program holds the grid in registers as a next_pow2(H) x next_pow2(W) tile: at most 16384 tile cells (128 x 128,
# 1 x 16384, 64 x 256 ...: 32 cells per thread at 16 warps, no spills on sm_90); a 127 x 129 grid would need a
# 128 x 256 tile and spill.
MAX_CELLS = 16384
MAX_MIN_NUM = 1 << 20  # keeps (max_mask - min_num) * u exact in float64 (20 + 24 bits)
_ROUND_CLAMP = 1.0e9  # sqrt results are clamped here before rounding (any such side already fails h < H)


def _block_mask_config(height: int, width: int) -> dict:
    """Launch heuristics (shape dims only). The sample's grid is a (BLOCK_H, BLOCK_W) tile whose rows and columns
    are implicit in the layout, so a cell costs one register (its mask byte) in the attempt loop; at most 32 cells
    per thread keep a 128 x 128 grid (16 warps) free of spills, and one warp keeps a 14 x 14 / 16 x 16 grid's
    reductions inside the warp. One program per sample: the grid is the batch."""
    bh, bw = next_pow2(height), next_pow2(width)
    warps = max(1, min(16, bh * bw // 512))
    return dict(BLOCK_H=bh, BLOCK_W=bw, FB_BLOCK=min(bh * bw, 256 * warps), num_warps=warps)


# =================================================================================================== 1. kernels
if HAS_TRITON:

    @triton.jit
    def _rint_nonneg(x):
        """Round a float64 in [0, 2^52) half to even (Python's round), as int32."""
        t = x.to(tl.int64)  # truncation = floor for x >= 0
        frac = x - t.to(tl.float64)  # exact
        up = (frac > 0.5) | ((frac == 0.5) & ((t & 1) == 1))
        return (t + up.to(tl.int64)).to(tl.int32)

    @triton.jit
    def _block_mask_fwd_kernel(
        u_ptr,  # (B, A, 4) fp32 uniforms (area, log-aspect, top, left), contiguous
        aspect_ptr,  # (B, A) fp64 aspect ratios exp(lerp(log lo, log hi, u1)), contiguous
        noise_ptr,  # (B, H*W) fp32 fallback order, contiguous (EXACT only)
        mask_ptr,  # (B, H*W) bool out, contiguous
        att_ptr,  # (B,) int32 out: attempts used
        A,  # attempt budget (uniforms rows per sample)
        H,  # grid height
        W,  # grid width
        target,  # cells to mask
        min_num,  # smallest block area drawn (min_num_patches)
        max_num,  # largest block (max_num_patches)
        EXACT: tl.constexpr,  # CAE: loop until exactly target cells, then the noise fallback
        TRIES: tl.constexpr,  # attempts per block (10)
        ROUND_CLAMP: tl.constexpr,  # sqrt results are clamped here before rounding
        BLOCK_H: tl.constexpr,  # next_pow2(H)
        BLOCK_W: tl.constexpr,  # next_pow2(W)
        FB_BLOCK: tl.constexpr,  # cells per chunk of the exact-mode fallback
    ):
        b = tl.program_id(0).to(tl.int64)
        cells = H * W
        row = tl.arange(0, BLOCK_H)
        col = tl.arange(0, BLOCK_W)
        valid = (row < H)[:, None] & (col < W)[None, :]
        mask = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.int8)

        count = tl.zeros([], dtype=tl.int32)  # masked cells so far
        k = tl.zeros([], dtype=tl.int32)  # uniforms rows consumed
        tries = tl.zeros([], dtype=tl.int32)  # attempts in the current block
        live = (tl.zeros([], dtype=tl.int32) + target) > 0
        u_row = u_ptr + b * A * 4
        a_row = aspect_ptr + b * A
        while live & (k < A):
            max_mask = tl.minimum(target - count, max_num)
            u0 = tl.load(u_row + k * 4).to(tl.float64)
            u2 = tl.load(u_row + k * 4 + 2).to(tl.float64)
            u3 = tl.load(u_row + k * 4 + 3).to(tl.float64)
            aspect = tl.load(a_row + k)
            # exact product (an int below 2^21 times a 24-bit fraction): a fused multiply-add rounds it the same
            area = min_num + (max_mask - min_num).to(tl.float64) * u0
            h = _rint_nonneg(tl.minimum(tl.sqrt(area * aspect), ROUND_CLAMP))
            w = _rint_nonneg(tl.minimum(tl.sqrt(area / aspect), ROUND_CLAMP))
            fits = (h < H) & (w < W)
            h = tl.where(fits, h, 0)
            w = tl.where(fits, w, 0)
            top = tl.minimum((u2 * (H - h + 1).to(tl.float64)).to(tl.int32), H - h)  # exact product, then floor
            left = tl.minimum((u3 * (W - w + 1).to(tl.float64)).to(tl.int32), W - w)
            in_rows = (row >= top) & (row < top + h)  # the rectangle as a row range x a column range
            in_cols = (col >= left) & (col < left + w)
            rect = in_rows[:, None] & in_cols[None, :]
            already = tl.sum(tl.sum((rect & (mask != 0)).to(tl.int32), axis=1), axis=0)
            new = h * w - already
            accept = fits & (new > 0) & (new <= max_mask)
            mask = mask | (rect & accept).to(tl.int8)
            count += tl.where(accept, new, 0)
            k += 1
            tries = tl.where(accept, 0, tries + 1)
            failed = tries == TRIES  # a whole block added nothing
            if not EXACT:
                live = live & (tries != TRIES)
            tries = tl.where(failed, 0, tries)
            live = live & (count < target)

        cell = row[:, None] * W + col[None, :]  # row-major cell index
        tl.store(mask_ptr + b * cells + cell, mask != 0, mask=valid)
        if EXACT:  # budget spent: the unmasked cells with the smallest noise (ties: lowest index) fill the rest
            # Rare (see DEFAULT_MAX_ATTEMPTS), so it works on the stored mask in FB_BLOCK-cell chunks, one pick per
            # pass, instead of holding the noise in registers next to the mask.
            for _ in range(target - count):
                tl.debug_barrier()  # the previous stores are visible to every thread of the program
                best = tl.full([], float("inf"), tl.float32)
                for c0 in range(0, cells, FB_BLOCK):
                    offs = c0 + tl.arange(0, FB_BLOCK)
                    inside = offs < cells
                    free = inside & (tl.load(mask_ptr + b * cells + offs, mask=inside, other=1) == 0)
                    key = tl.load(noise_ptr + b * cells + offs, mask=free, other=float("inf"))
                    key = tl.where(key != key, float("inf"), key)  # NaN reads as +inf
                    best = tl.minimum(best, tl.min(key, axis=0))
                pick = tl.full([], 2147483647, tl.int32)
                for c0 in range(0, cells, FB_BLOCK):
                    offs = c0 + tl.arange(0, FB_BLOCK)
                    inside = offs < cells
                    free = inside & (tl.load(mask_ptr + b * cells + offs, mask=inside, other=1) == 0)
                    key = tl.load(noise_ptr + b * cells + offs, mask=free, other=float("inf"))
                    key = tl.where(key != key, float("inf"), key)
                    pick = tl.minimum(pick, tl.min(tl.where(free & (key == best), offs, 2147483647), axis=0))
                tl.debug_barrier()
                tl.store(mask_ptr + b * cells + pick, tl.full([], 1, tl.int1), mask=pick < cells)

        tl.store(att_ptr + b, k)


# ================================================================================================== 2. launcher
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def resolve_block_params(height, width, num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect):
    """Validate the generator's settings; returns (H, W, target, min_num, max_num, min_aspect, max_aspect)."""
    for name, v, lo in (("height", height, 1), ("width", width, 1), ("num_masking_patches", num_masking_patches, 0),
                        ("min_num_patches", min_num_patches, 1)):  # fmt: skip
        if not _is_int(v):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        if v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
    height, width, target, min_num = int(height), int(width), int(num_masking_patches), int(min_num_patches)
    cells = height * width
    tile = next_pow2(height) * next_pow2(width)
    if tile > MAX_CELLS:
        raise ValueError(
            f"height * width: expected a grid whose padded tile next_pow2(height) * next_pow2(width) is at most "
            f"{MAX_CELLS} cells (e.g. 128 x 128), got {height} x {width} (a {next_pow2(height)} x "
            f"{next_pow2(width)} tile)"
        )
    if target > cells:
        raise ValueError(f"num_masking_patches: expected at most height * width = {cells}, got {target}")
    if min_num > MAX_MIN_NUM:
        raise ValueError(f"min_num_patches: expected at most {MAX_MIN_NUM}, got {min_num}")
    if max_num_patches is None:
        max_num = target
    elif not _is_int(max_num_patches):
        raise TypeError(f"max_num_patches: expected an int or None, got {type(max_num_patches).__name__}")
    elif max_num_patches < 1:
        raise ValueError(f"max_num_patches: expected an int >= 1 or None, got {max_num_patches}")
    else:
        max_num = min(int(max_num_patches), max(target, 1))  # a block never exceeds the remainder anyway
    for name, v in (("min_aspect", min_aspect), ("max_aspect", max_aspect)):
        if v is None and name == "max_aspect":
            continue
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: expected a finite float > 0, got {v}")
    min_aspect = float(min_aspect)
    max_aspect = 1.0 / min_aspect if max_aspect is None else float(max_aspect)
    if max_aspect < min_aspect:
        raise ValueError(f"max_aspect: expected >= min_aspect = {min_aspect}, got {max_aspect}")
    return height, width, target, min_num, max_num, min_aspect, max_aspect


def _check_inputs(uniforms, noise, cells: int, exact: bool) -> None:
    check_tensor("uniforms", uniforms, ndim=3, dtypes=(torch.float32,))
    if uniforms.shape[2] != 4 or uniforms.shape[1] < 1:
        got = tuple(uniforms.shape)
        raise ValueError(f"uniforms: expected shape (B, max_attempts >= 1, 4) (area, log-aspect, top, left), got {got}")
    if noise is not None:
        check_tensor("noise", noise, ndim=2, dtypes=(torch.float32,))
        if tuple(noise.shape) != (uniforms.shape[0], cells):
            raise ValueError(
                f"noise: expected shape ({uniforms.shape[0]}, {cells}) (B, H * W), got {tuple(noise.shape)}"
            )
    elif exact:
        raise ValueError("noise: exact=True needs the (B, H * W) fallback noise, got None")
    check_same_device(uniforms=uniforms, noise=noise)


def _aspects(uniforms: torch.Tensor, min_aspect: float, max_aspect: float) -> torch.Tensor:
    """(B, A) float64 aspect ratios, exp(random.uniform(log lo, log hi)) written as Python's a + (b - a) * u.

    Computed by torch for the kernel and the reference alike (one definition of the transcendental)."""
    lo, hi = math.log(min_aspect), math.log(max_aspect)
    return torch.exp(uniforms[..., 1].double() * (hi - lo) + lo)


def _block_mask_triton(uniforms, noise, height, width, target, min_num, max_num, min_aspect, max_aspect, exact):
    bsz, attempts = uniforms.shape[0], uniforms.shape[1]
    cells = height * width
    dev = uniforms.device
    mask = new_output((bsz, cells), torch.bool, dev)
    used = new_output(bsz, torch.int32, dev)
    if bsz == 0:
        return mask, used
    uniforms = uniforms.contiguous()
    aspect = _aspects(uniforms, min_aspect, max_aspect)
    noise = noise.contiguous() if noise is not None else uniforms
    cfg = _block_mask_config(height, width)
    with device_guard(dev):
        _block_mask_fwd_kernel[(bsz,)](
            uniforms, aspect, noise, mask, used, attempts, height, width, target, min_num, max_num,
            EXACT=exact, TRIES=ATTEMPTS_PER_BLOCK, ROUND_CLAMP=_ROUND_CLAMP, BLOCK_H=cfg["BLOCK_H"],
            BLOCK_W=cfg["BLOCK_W"], FB_BLOCK=cfg["FB_BLOCK"], num_warps=cfg["num_warps"],
        )  # fmt: skip
    return mask, used


# =================================================================================================== 3. binding
@torch.library.custom_op("mimfast::block_mask", mutates_args=(), device_types="cuda")
def _block_mask_op(
    uniforms: torch.Tensor,
    noise: torch.Tensor | None,
    height: int,
    width: int,
    target: int,
    min_num: int,
    max_num: int,
    min_aspect: float,
    max_aspect: float,
    exact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (uniforms, noise, height, width, target, min_num, max_num, min_aspect, max_aspect, exact)
    if not use_triton(uniforms):
        warnings.warn("mimfast: triton is not importable; block_mask runs its PyTorch reference", stacklevel=2)
        return _block_mask_ref_impl(*args)
    return _block_mask_triton(*args)


@_block_mask_op.register_kernel("cpu")
def _block_mask_cpu(uniforms, noise, height, width, target, min_num, max_num, min_aspect, max_aspect, exact):
    args = (uniforms, noise, height, width, target, min_num, max_num, min_aspect, max_aspect, exact)
    if interpret_mode() and use_triton(uniforms):
        return _block_mask_triton(*args)
    return _block_mask_ref_impl(*args)


@_block_mask_op.register_fake
def _block_mask_fake(uniforms, noise, height, width, target, min_num, max_num, min_aspect, max_aspect, exact):
    bsz = uniforms.shape[0]
    return uniforms.new_empty((bsz, height * width), dtype=torch.bool), uniforms.new_empty(bsz, dtype=torch.int32)


def block_mask(
    uniforms: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    height: int = 14,
    width: int = 14,
    num_masking_patches: int = 75,
    min_num_patches: int = 16,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    exact: bool = False,
    return_attempts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-wise masks for a batch from pre-drawn uniforms (see the module docstring for the exact algorithm).

    Args:
        uniforms: (B, A, 4) fp32 in [0, 1): per sample, one row per attempt (area, log-aspect, top, left); A >= 1 is
            the attempt budget. B may be 0.
        noise: (B, H * W) fp32, the exact-mode fallback order (required when ``exact``; ignored otherwise).
        height, width: the patch grid (next_pow2(H) * next_pow2(W) <= 16384, e.g. 128 x 128).
        num_masking_patches: cells to mask (BEiT 75, CAE 98 of 196), 0 <= target <= H * W.
        min_num_patches: smallest block area drawn (>= 1). max_num_patches: largest block (None: the target).
        min_aspect, max_aspect: aspect-ratio range, log-uniform (max_aspect None: 1 / min_aspect).
        exact: False = BEiT (stop when a block fails 10 times; may under-fill), True = CAE (exactly the target).
        return_attempts: also return the (B,) int32 number of uniforms rows each sample used.

    Returns:
        mask (B, H * W) bool, True = masked, row-major; and attempts (B,) int32 when ``return_attempts``.
    """
    p = resolve_block_params(height, width, num_masking_patches, min_num_patches, max_num_patches, min_aspect,
                             max_aspect)  # fmt: skip
    _check_inputs(uniforms, noise, p[0] * p[1], exact)
    mask, used = torch.ops.mimfast.block_mask(uniforms, noise if exact else None, *p, bool(exact))
    return (mask, used) if return_attempts else mask


# ================================================================================================= 4. reference
def _block_mask_ref_impl(uniforms, noise, height, width, target, min_num, max_num, min_aspect, max_aspect, exact):
    """Live samples step through their attempts together; a sample leaves the working set when it is done."""
    bsz, attempts = uniforms.shape[0], uniforms.shape[1]
    cells = height * width
    dev = uniforms.device
    mask = torch.zeros(bsz, cells, dtype=torch.bool, device=dev)
    used = torch.zeros(bsz, dtype=torch.int32, device=dev)
    count = torch.zeros(bsz, dtype=torch.int64, device=dev)
    uniforms = uniforms.contiguous()  # the same tensor layout as the kernel path, so torch.exp gives the same bits
    aspect = _aspects(uniforms, min_aspect, max_aspect)
    cell = torch.arange(cells, device=dev)
    row, col = (cell // width)[None], (cell % width)[None]
    act = torch.arange(bsz if target > 0 else 0, device=dev)  # live samples
    tries = torch.zeros(act.shape[0], dtype=torch.int64, device=dev)  # attempts in their current block
    for k in range(attempts):
        if act.shape[0] == 0:  # a host read: the reference is the CPU path and the oracle, not a GPU hot path
            break
        m, c, u = mask[act], count[act], uniforms[act, k].double()
        max_mask = torch.clamp(target - c, max=max_num)
        area = (max_mask - min_num).double() * u[:, 0] + min_num  # exact
        h = torch.round(torch.sqrt(area * aspect[act, k]).clamp(max=_ROUND_CLAMP)).long()  # half to even
        w = torch.round(torch.sqrt(area / aspect[act, k]).clamp(max=_ROUND_CLAMP)).long()
        fits = (h < height) & (w < width)
        h, w = torch.where(fits, h, 0), torch.where(fits, w, 0)
        top = torch.minimum((u[:, 2] * (height - h + 1).double()).long(), height - h)  # exact product, floor
        left = torch.minimum((u[:, 3] * (width - w + 1).double()).long(), width - w)
        rect = (row >= top[:, None]) & (row < (top + h)[:, None]) & (col >= left[:, None]) & (col < (left + w)[:, None])
        new = h * w - (rect & m).sum(1)
        accept = fits & (new > 0) & (new <= max_mask)
        c = c + torch.where(accept, new, 0)
        mask[act] = m | (rect & accept[:, None])
        count[act] = c
        used[act] += 1
        tries = torch.where(accept, 0, tries + 1)
        still = c < target
        if not exact:
            still &= tries < ATTEMPTS_PER_BLOCK  # a block failed 10 times: BEiT stops
        tries = torch.where(tries == ATTEMPTS_PER_BLOCK, 0, tries)  # CAE starts another block
        act, tries = act[still], tries[still]
    if exact and bsz > 0:
        # fallback order: free cells first, then noise (NaN as +inf), then cell index (two stable sorts)
        key = torch.nan_to_num(noise.float(), nan=float("inf"))
        order = torch.argsort(key, dim=1, stable=True)
        order = order.gather(1, torch.argsort(mask.gather(1, order).to(torch.uint8), dim=1, stable=True))
        rank = torch.empty_like(order).scatter_(1, order, cell.expand(bsz, cells))
        mask |= rank < (target - count)[:, None]
    return mask, used


def block_mask_ref(
    uniforms: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    height: int = 14,
    width: int = 14,
    num_masking_patches: int = 75,
    min_num_patches: int = 16,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    exact: bool = False,
    return_attempts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference of :func:`block_mask` (same arguments, same results, bit for bit): the spec and the
    test oracle. Vectorised over the batch; it checks ``live.any()`` once per attempt, so on a GPU it synchronises.
    """
    p = resolve_block_params(height, width, num_masking_patches, min_num_patches, max_num_patches, min_aspect,
                             max_aspect)  # fmt: skip
    _check_inputs(uniforms, noise, p[0] * p[1], exact)
    mask, used = _block_mask_ref_impl(uniforms, noise if exact else None, *p, bool(exact))
    return (mask, used) if return_attempts else mask
