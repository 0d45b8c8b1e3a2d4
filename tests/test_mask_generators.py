"""Mask generators: mimfast::block_mask (kernel through the interpreter on CPU) against its reference bit for bit,
the reference against a line-by-line Python port of BEiT's / CAE's generator, BEiT's statistics with Python's own
``random``, the exact-count fallback, seeding, errors; random_masking against MAE's formulation; mage_masking
against MAGE's formulation and the truncated normal's analytic moments; no host synchronisation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import DEVICE
from mimfast.kernels._common import use_triton
from mimfast.kernels.block_mask import block_mask, block_mask_ref, default_max_attempts
from mimfast.ops.masking import (
    beit_block_masking,
    block_masking,
    cae_block_masking,
    mage_masking,
    random_masking,
)


# ------------------------------------------------------------------------------------- BEiT's generator, ported
class _OutOfAttempts(Exception):
    pass


class AttemptRandom:
    """Stands in for Python's ``random`` in the port: attempt k reads row k of the uniforms, (area, log-aspect)
    through ``uniform`` and (top, left) through ``randint``, which is how mimfast's op consumes them."""

    def __init__(self, rows):
        self.rows, self.uniform_calls, self.randint_calls = rows, 0, 0

    def uniform(self, a, b):
        k, slot = divmod(self.uniform_calls, 2)
        if k >= len(self.rows):
            raise _OutOfAttempts
        self.uniform_calls += 1
        return a + (b - a) * self.rows[k][slot]  # random.uniform's formula

    def randint(self, a, b):
        k, slot = (self.uniform_calls - 1) // 2, 2 + self.randint_calls % 2
        self.randint_calls += 1
        return a + min(int(math.floor(self.rows[k][slot] * (b - a + 1))), b - a)

    @property
    def attempts(self):
        return (self.uniform_calls + 1) // 2


class BeitMaskingGenerator:
    """BEiT's MaskingGenerator (CAE's loop when ``exact``), written out with plain lists and an injectable rng."""

    def __init__(self, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None, min_aspect=0.3,
                 max_aspect=None, exact=False, rng=random):  # fmt: skip
        self.height, self.width = input_size
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.exact, self.rng = exact, rng

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _attempt in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                num_masked = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i][j] == 0:
                                mask[i][j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self):
        self.mask = mask = [[0] * self.width for _ in range(self.height)]
        mask_count = 0
        if self.exact:  # CAE: until the count is exactly the target
            while mask_count != self.num_masking_patches:
                max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
                mask_count += self._mask(mask, max_mask_patches)
        else:  # BEiT: stop at the first block that adds nothing
            while mask_count < self.num_masking_patches:
                max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
                delta = self._mask(mask, max_mask_patches)
                if delta == 0:
                    break
                mask_count += delta
        return mask


def port_masks(uniforms, noise, *, height, width, num_masking_patches, min_num_patches=16, max_num_patches=None,
               min_aspect=0.3, max_aspect=None, exact=False):  # fmt: skip
    """The port on every sample of ``uniforms``, with the documented budget rule; returns (mask bool, attempts)."""
    target = num_masking_patches
    masks, used = [], []
    rows_all = uniforms.tolist()
    noise_all = noise.tolist() if noise is not None else None
    for b, rows in enumerate(rows_all):
        rng = AttemptRandom(rows)
        gen = BeitMaskingGenerator((height, width), target, min_num_patches, max_num_patches, min_aspect, max_aspect,
                                   exact, rng)  # fmt: skip
        try:
            gen()
        except _OutOfAttempts:
            pass
        flat = [v for r in gen.mask for v in r]
        if exact:  # budget spent: the free cells with the smallest noise, ties to the lowest index
            free = sorted((i for i in range(len(flat)) if not flat[i]), key=lambda i: (noise_all[b][i], i))
            for i in free[: target - sum(flat)]:
                flat[i] = 1
        masks.append(flat)
        used.append(rng.attempts)
    return torch.tensor(masks, dtype=torch.bool).reshape(len(rows_all), height * width), torch.tensor(used)


def draw(bsz, attempts, cells, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(bsz, attempts, 4, generator=g), torch.rand(bsz, cells, generator=g)


def ref_block_masking(bsz, height=14, width=14, num_masking_patches=75, *, exact=False, seed=0, **kw):
    """block_masking's draws (test_block_masking_uses_the_kernel_path) through the reference: large batches on CPU
    without the interpreter."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(bsz, default_max_attempts(exact), 4, generator=g)
    noise = torch.rand(bsz, height * width, generator=g) if exact else None
    return block_mask_ref(u, noise, height=height, width=width, num_masking_patches=num_masking_patches, exact=exact,
                          return_attempts=True, **kw)  # fmt: skip


# ------------------------------------------------------------------------------------------- kernel == reference
# (B, H, W, target, exact, attempts, extra kwargs): BEiT / CAE on 14 x 14, 16 x 16, an awkward 7 x 5, 1 x 1 edges,
# tiny budgets (under-fill / fallback), a block cap, other aspect ranges, and small min blocks.
KERNEL_CASES = [
    (6, 14, 14, 75, False, 48, {}),
    (4, 14, 14, 98, True, 64, {}),
    (2, 16, 16, 98, False, 24, {}),
    (1, 16, 16, 98, True, 24, {}),
    (3, 7, 5, 12, False, 20, dict(min_num_patches=4)),
    (3, 7, 5, 12, True, 30, dict(min_num_patches=4)),
    (2, 7, 5, 20, True, 2, dict(min_num_patches=4)),  # budget runs out: the noise fallback fills the rest
    (2, 1, 1, 1, True, 3, {}),  # BEiT's rule never fits a block in a 1-wide grid: all fallback
    (2, 1, 1, 1, False, 3, {}),
    (2, 1, 1, 0, True, 3, {}),
    (1, 14, 14, 75, False, 12, dict(max_num_patches=20, min_aspect=0.1, max_aspect=2.0)),
    (2, 9, 11, 30, True, 16, dict(min_num_patches=1, min_aspect=0.5)),
    (1, 32, 32, 200, False, 24, {}),  # a 1024-cell block
    (2, 13, 7, 40, True, 12, dict(min_num_patches=5, max_num_patches=12)),
    (1, 128, 128, 2000, False, 12, {}),  # the largest grid: 16 warps, 32 cells per thread on a GPU
    (1, 64, 256, 300, True, 3, dict(min_num_patches=16)),  # a wide grid; the budget runs out: chunked fallback
]


@pytest.mark.parametrize(
    "case", KERNEL_CASES, ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}-t{c[3]}-{'cae' if c[4] else 'beit'}-A{c[5]}"
)
def test_kernel_matches_reference(case):
    bsz, h, w, target, exact, attempts, kw = case
    u, noise = draw(bsz, attempts, h * w, seed=hash(case[:6]) % 1000)
    u, noise = u.to(DEVICE), noise.to(DEVICE)
    if not use_triton(u):
        pytest.skip("no Triton backend here (no CUDA and no interpreter)")
    args = dict(height=h, width=w, num_masking_patches=target, exact=exact, return_attempts=True, **kw)
    mask, used = block_mask(u, noise, **args)
    ref_mask, ref_used = block_mask_ref(u, noise, **args)
    assert mask.dtype == torch.bool and mask.shape == (bsz, h * w) and used.dtype == torch.int32
    assert torch.equal(mask.cpu(), ref_mask.cpu()), (mask.sum(1), ref_mask.sum(1))
    assert torch.equal(used.cpu(), ref_used.cpu())
    counts = mask.sum(1)
    assert bool((counts <= target).all())
    if exact:
        assert bool((counts == target).all())
    port_mask, port_used = port_masks(u.cpu(), noise.cpu(), **{k: v for k, v in args.items() if k != "return_attempts"})
    assert torch.equal(mask.cpu(), port_mask) and torch.equal(used.cpu().long(), port_used)


def test_kernel_extreme_uniforms():
    """Uniforms of exactly 0, 1/2 and 1 (torch.rand never gives 1, a caller's tensor may): randint clamps to b."""
    g = torch.Generator().manual_seed(2)
    u = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (3, 24, 4), generator=g)]
    noise = torch.rand(3, 35, generator=g)
    for exact in (False, True):
        kw = dict(height=7, width=5, num_masking_patches=12, min_num_patches=4, exact=exact)
        mask, used = block_mask(u.to(DEVICE), noise.to(DEVICE), return_attempts=True, **kw)
        ref_mask, ref_used = block_mask_ref(u, noise, return_attempts=True, **kw)
        port_mask, port_used = port_masks(u, noise, **kw)
        assert torch.equal(mask.cpu(), ref_mask) and torch.equal(used.cpu(), ref_used)
        assert torch.equal(ref_mask, port_mask) and torch.equal(ref_used.long(), port_used)
        assert int(ref_mask.sum(1).max()) <= 12 and int(ref_mask.sum(1).max()) > 0


def test_kernel_batch_of_zero():
    u, noise = draw(0, 8, 196, seed=0)
    for exact in (False, True):
        mask, used = block_mask(u.to(DEVICE), noise.to(DEVICE), exact=exact, return_attempts=True)
        assert mask.shape == (0, 196) and used.shape == (0,)
    assert block_masking(0, device=DEVICE).shape == (0, 196)


def test_round_half_to_even():
    """sqrt(area * aspect) = 2.5 must round to 2 (a 2 x 2 block; half-up would give 3 x 3) and 3.5 to 4, as Python's
    round does. aspect = exp(0) = 1 exactly for min_aspect 0.5 / max_aspect 2 and u1 = 0.5; area = 1 + (t - 1) * u0.
    """
    for target, u0, side in ((9, 0.65625, 2), (16, 0.75, 4)):
        u = torch.tensor([[[u0, 0.5, 0.0, 0.0]]], device=DEVICE)
        kw = dict(height=6, width=6, num_masking_patches=target, min_num_patches=1, min_aspect=0.5, max_aspect=2.0)
        for fn in (block_mask, block_mask_ref):
            m = fn(u, **kw).reshape(6, 6).cpu()
            want = torch.zeros(6, 6, dtype=torch.bool)
            want[:side, :side] = True
            assert torch.equal(m, want), (fn.__name__, target, m.sum())
        assert round(math.sqrt(1 + (target - 1) * u0)) == side  # the rule is Python's


# ------------------------------------------------------------------------------- reference == BEiT's Python code
@pytest.mark.parametrize(
    "h,w,target,exact,attempts,kw",
    [
        (14, 14, 75, False, 64, {}),
        (14, 14, 98, True, 128, {}),
        (14, 14, 98, True, 24, {}),  # many samples run out: fallback
        (16, 16, 98, False, 64, {}),
        (7, 5, 12, True, 48, dict(min_num_patches=4)),
        (7, 5, 25, False, 48, dict(min_num_patches=3, max_num_patches=6, min_aspect=0.2)),
    ],
)
def test_reference_matches_beit_port(h, w, target, exact, attempts, kw):
    bsz = 1500
    u, noise = draw(bsz, attempts, h * w, seed=target + attempts)
    args = dict(height=h, width=w, num_masking_patches=target, exact=exact, **kw)
    port_mask, port_used = port_masks(u, noise, **args)
    mask, used = block_mask_ref(u, noise, return_attempts=True, **args)
    assert torch.equal(mask, port_mask)
    assert torch.equal(used.long(), port_used)
    counts = mask.sum(1)
    assert int(counts.max()) <= target
    if exact:
        assert bool((counts == target).all())


@pytest.mark.parametrize("exact", [False, True], ids=["beit", "cae"])
def test_statistics_match_beit_with_python_random(exact):
    """mimfast's masks have BEiT's distribution: the port driven by Python's own ``random`` (BEiT exactly) against
    block_masking with torch's generator. Count, under-fill rate, attempts and per-cell frequency agree."""
    n, target = 3000, (98 if exact else 75)
    gen = BeitMaskingGenerator((14, 14), target, 16, exact=exact, rng=random.Random(1234))
    beit = torch.tensor([[v for r in gen() for v in r] for _ in range(n)], dtype=torch.float64)
    ours = ref_block_masking(n, num_masking_patches=target, exact=exact, seed=7)[0].double()
    c_beit, c_ours = beit.sum(1), ours.sum(1)
    assert int(c_ours.max()) <= target
    se = math.sqrt(c_beit.var().item() / n + c_ours.var().item() / n) + 1e-9
    assert abs(c_beit.mean().item() - c_ours.mean().item()) < 5 * se
    if not exact:  # BEiT under-fills about a third of its masks (75 of 196)
        f_beit, f_ours = (c_beit < target).double().mean().item(), (c_ours < target).double().mean().item()
        assert 0.25 < f_ours < 0.42 and abs(f_beit - f_ours) < 5 * math.sqrt(2 * 0.25 / n)
    p_beit, p_ours = beit.mean(0), ours.mean(0)
    cell_se = (p_beit * (1 - p_beit) * 2 / n).sqrt().clamp_min(1e-3)
    assert float(((p_beit - p_ours).abs() / cell_se).max()) < 5.5
    # blocks, not scattered cells: most masked cells have a masked 4-neighbour
    m = ours.reshape(n, 14, 14)
    nb = torch.zeros_like(m)
    nb[:, 1:] += m[:, :-1]
    nb[:, :-1] += m[:, 1:]
    nb[:, :, 1:] += m[:, :, :-1]
    nb[:, :, :-1] += m[:, :, 1:]
    assert ((nb > 0) & (m > 0)).sum() / m.sum() > 0.99


def test_block_masking_counts_and_defaults():
    assert default_max_attempts(False) == 128 and default_max_attempts(True) == 512
    m, used = ref_block_masking(1000, num_masking_patches=98, exact=True, seed=3)
    assert m.shape == (1000, 196) and m.dtype == torch.bool
    assert bool((m.sum(1) == 98).all()) and bool((used <= 512).all())
    m, used = ref_block_masking(1000, seed=4)
    assert bool((m.sum(1) <= 75).all()) and int(m.sum(1).min()) >= 16 and int(used.max()) < 128
    m, _ = ref_block_masking(200, 16, 16, 98, exact=True, seed=5)
    assert m.shape == (200, 256) and bool((m.sum(1) == 98).all())
    # the wrappers: BEiT / CAE settings and modes, through the op on DEVICE
    g = torch.Generator().manual_seed(3)
    m = cae_block_masking(2, 7, 5, 12, min_num_patches=4, generator=g, device=DEVICE)
    assert m.shape == (2, 35) and bool((m.sum(1) == 12).all())
    m, used = beit_block_masking(2, 7, 5, 12, min_num_patches=4, generator=g, return_attempts=True, device=DEVICE)
    assert bool((m.sum(1) <= 12).all()) and used.dtype == torch.int32


def test_exact_fallback_fills_smallest_noise():
    """One attempt only: exact mode = BEiT mode's mask plus the free cells of smallest noise (ties, NaN last)."""
    bsz, h, w, target = 4, 7, 5, 20
    u, noise = draw(bsz, 1, h * w, seed=11)
    noise[:, :10] = 0.25  # ties: lowest index first
    noise[0, 3] = float("nan")  # NaN reads as +inf
    u, noise = u.to(DEVICE), noise.to(DEVICE)
    kw = dict(height=h, width=w, num_masking_patches=target, min_num_patches=4)
    base = block_mask_ref(u, **kw).cpu()
    for fn in (block_mask, block_mask_ref):
        m = fn(u, noise, exact=True, **kw).cpu()
        assert bool((m.sum(1) == target).all())
        for b in range(bsz):
            free = [i for i in range(h * w) if not base[b, i]]
            key = [math.inf if math.isnan(v) else v for v in noise[b].tolist()]
            pick = sorted(free, key=lambda i: (key[i], i))[: target - int(base[b].sum())]
            want = base[b].clone()
            want[pick] = True
            assert torch.equal(m[b], want), (fn.__name__, b)


def test_block_masking_seeded():
    kw = dict(height=7, width=5, num_masking_patches=12, min_num_patches=4, exact=True, device=DEVICE)
    a = block_masking(4, generator=torch.Generator().manual_seed(5), **kw)
    b = block_masking(4, generator=torch.Generator().manual_seed(5), **kw)
    c = block_masking(4, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.device.type == torch.device(DEVICE).type


def test_block_masking_uses_the_kernel_path():
    """block_masking on DEVICE runs the kernel (interpreter on CPU) and gives the reference's masks."""
    g = torch.Generator().manual_seed(9)
    m = block_masking(2, 6, 6, 10, min_num_patches=4, max_attempts=8, device=DEVICE, generator=g)
    g = torch.Generator().manual_seed(9)
    u = torch.rand(2, 8, 4, generator=g).to(DEVICE)
    assert torch.equal(m, block_mask_ref(u, height=6, width=6, num_masking_patches=10, min_num_patches=4))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_masking_patches=197), ValueError, "num_masking_patches"),
        (dict(num_masking_patches=-1), ValueError, "num_masking_patches"),
        (dict(num_masking_patches=75.0), TypeError, "num_masking_patches"),
        (dict(min_num_patches=0), ValueError, "min_num_patches"),
        (dict(min_num_patches=1 << 21), ValueError, "min_num_patches"),
        (dict(max_num_patches=0), ValueError, "max_num_patches"),
        (dict(min_aspect=0.0), ValueError, "min_aspect"),
        (dict(min_aspect=-0.3), ValueError, "min_aspect"),
        (dict(min_aspect=float("inf")), ValueError, "min_aspect"),
        (dict(max_aspect=0.2), ValueError, "max_aspect"),
        (dict(height=14.0), TypeError, "height"),
        (dict(width=0), ValueError, "width"),
        (dict(height=True), TypeError, "height"),
        (dict(height=200, width=100), ValueError, "height \\* width"),
        (dict(height=127, width=129), ValueError, r"padded tile .* \(a 128 x 256 tile\)"),  # 16383 cells, 32768 padded
        (dict(max_attempts=0), ValueError, "max_attempts"),
        (dict(batch_size=-1), ValueError, "batch_size"),
        (dict(generator=3), TypeError, "generator"),
    ],
)
def test_block_masking_errors(kwargs, exc, match):
    kwargs = {"batch_size": 2, **kwargs}
    with pytest.raises(exc, match=match):
        block_masking(**kwargs)


def test_block_mask_op_input_errors():
    u, noise = draw(2, 4, 196, seed=0)
    with pytest.raises(TypeError, match="uniforms"):
        block_mask(u.double())
    with pytest.raises(ValueError, match="uniforms"):
        block_mask(u[..., :3])
    with pytest.raises(ValueError, match="noise"):
        block_mask(u, exact=True)
    with pytest.raises(ValueError, match="noise"):
        block_mask(u, noise[:, :100], exact=True)
    with pytest.raises(TypeError, match="noise"):
        block_mask(u, noise.double(), exact=True)


def test_block_mask_opcheck():
    u, noise = draw(2, 3, 12, seed=1)
    u, noise = u.to(DEVICE), noise.to(DEVICE)
    for exact in (False, True):
        args = (u, noise if exact else None, 3, 4, 5, 2, 5, 0.3, 1 / 0.3, exact)
        torch.library.opcheck(torch.ops.mimfast.block_mask.default, args)


# --------------------------------------------------------------------------------------------------------- MAE
def mae_random_masking(noise, mask_ratio):
    """MAE's official masking (index side), written out."""
    n, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([n, length], device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask, ids_shuffle


@pytest.mark.parametrize("bsz,seq,ratio", [(8, 196, 0.75), (3, 7, 0.6), (2, 256, 0.5), (4, 13, 0.0), (4, 13, 1.0),
                                           (1, 1, 0.75), (5, 49, 0.9)])  # fmt: skip
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_random_masking_matches_mae(bsz, seq, ratio, index_dtype):
    g = torch.Generator().manual_seed(bsz * seq)
    noise = torch.stack([torch.randperm(seq, generator=g) for _ in range(bsz)]).float().div(seq).to(DEVICE)  # no ties
    got = random_masking(bsz, seq, ratio, noise=noise, index_dtype=index_dtype)
    want = mae_random_masking(noise, ratio)
    for name, a, b in zip(("ids_keep", "ids_restore", "mask", "ids_shuffle"), got, want, strict=True):
        assert a.device == noise.device, name
        if name == "mask":
            assert a.dtype == torch.float32 and torch.equal(a, b), name
        else:
            assert a.dtype == index_dtype and torch.equal(a.long(), b), name
    # the drawn-noise path: the same noise as torch.rand with the same seed
    got = random_masking(bsz, seq, ratio, generator=torch.Generator().manual_seed(1), device=DEVICE)
    noise = torch.rand(bsz, seq, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    if bool((noise.sort(1).values.diff(dim=1) > 0).all()):
        assert all(torch.equal(a.long(), b.long()) for a, b in zip(got, mae_random_masking(noise, ratio), strict=True))


def test_random_masking_ties_and_seeding():
    noise = torch.tensor([[0.5, 0.1, 0.5, 0.1, 0.5]], device=DEVICE)
    r = random_masking(1, 5, 0.4, noise=noise)  # keep int(5 * 0.6) = 3: positions 1, 3, then the first 0.5 (0)
    assert r.ids_keep.tolist() == [[1, 3, 0]] and r.mask.tolist() == [[0.0, 0.0, 1.0, 0.0, 1.0]]
    a = random_masking(4, 196, generator=torch.Generator().manual_seed(0))
    b = random_masking(4, 196, generator=torch.Generator().manual_seed(0))
    c = random_masking(4, 196, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and not torch.equal(a.mask, c.mask)
    assert random_masking(0, 196).ids_keep.shape == (0, 49)
    assert r.mask.sum().item() == 2


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(mask_ratio=1.5), ValueError, "mask_ratio"),
        (dict(mask_ratio=float("nan")), ValueError, "mask_ratio"),
        (dict(seq_len=0), ValueError, "seq_len"),
        (dict(batch_size=2.0), TypeError, "batch_size"),
        (dict(index_dtype=torch.float32), ValueError, "index_dtype"),
        (dict(noise=torch.rand(3, 196)), ValueError, "noise"),
        (dict(noise=torch.zeros(2, 196, dtype=torch.int64)), TypeError, "noise"),
    ],
)
def test_random_masking_errors(kwargs, exc, match):
    kwargs = {"batch_size": 2, "seq_len": 196, **kwargs}
    with pytest.raises(exc, match=match):
        random_masking(**kwargs)


# -------------------------------------------------------------------------------------------------------- MAGE
def mage_official_masks(noise, mask_rate, ratio_min):
    """MAGE's masking (sorted-noise cutoffs and ``<=``), written out, without its redraw loop."""
    bsz, seq_len = noise.shape
    num_dropped_tokens = int(math.ceil(seq_len * ratio_min))
    num_masked_tokens = int(math.ceil(seq_len * mask_rate))
    sorted_noise, _ = torch.sort(noise, dim=1)
    cutoff_drop = sorted_noise[:, num_dropped_tokens - 1 : num_dropped_tokens]
    cutoff_mask = sorted_noise[:, num_masked_tokens - 1 : num_masked_tokens]
    token_drop_mask = (noise <= cutoff_drop).float()
    token_all_mask = (noise <= cutoff_mask).float()
    token_keep_mask = 1 - token_drop_mask
    ids_keep = token_keep_mask.nonzero(as_tuple=True)[1].reshape(bsz, -1)  # MAGE gathers x[keep.nonzero()]
    return token_drop_mask.bool(), token_all_mask.bool(), ids_keep


@pytest.mark.parametrize("bsz,seq,ratio", [(4, 256, 0.55), (3, 256, 1.0), (2, 256, 0.5), (5, 17, 0.73), (1, 1, 0.8)])
def test_mage_masking_matches_mage(bsz, seq, ratio):
    g = torch.Generator().manual_seed(seq)
    noise = torch.stack([torch.randperm(seq, generator=g) for _ in range(bsz)]).float().div(seq).to(DEVICE)
    got = mage_masking(bsz, seq, noise=noise, ratio=ratio)
    drop, allm, ids_keep = mage_official_masks(noise, ratio, 0.5)
    assert torch.equal(got.drop_mask, drop) and torch.equal(got.token_all_mask, allm)
    assert torch.equal(got.ids_keep, ids_keep)
    assert got.num_masked.item() == math.ceil(seq * ratio) and got.ratio.dtype == torch.float64
    # ids_restore puts [kept ; dropped] back in place
    lk = ids_keep.shape[1]
    slots = got.ids_restore
    assert bool((slots[~drop].reshape(bsz, -1) == torch.arange(lk, device=DEVICE)).all())
    assert torch.equal(slots.sort(1).values, torch.arange(seq, device=DEVICE).expand(bsz, seq))


def test_mage_masking_ties_exact_counts():
    seq = 16
    noise = torch.tensor([[0.3] * 8 + [0.1] * 8, [0.7, 0.2] * 8], device=DEVICE)
    got = mage_masking(2, seq, noise=noise, ratio=0.8)  # drop ceil(8) = 8, mask ceil(12.8) = 13
    for b in range(2):
        order = sorted(range(seq), key=lambda i: (noise[b, i].item(), i))
        want_drop = torch.zeros(seq, dtype=torch.bool)
        want_drop[order[:8]] = True
        want_all = torch.zeros(seq, dtype=torch.bool)
        want_all[order[:13]] = True
        assert torch.equal(got.drop_mask[b].cpu(), want_drop) and torch.equal(got.token_all_mask[b].cpu(), want_all)
    assert got.drop_mask.sum(1).tolist() == [8, 8] and got.token_all_mask.sum(1).tolist() == [13, 13]


def _truncnorm_moments(mu, sd, lo, hi):
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    cdf = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))
    a, b = (lo - mu) / sd, (hi - mu) / sd
    zz = cdf(b) - cdf(a)
    mean = mu + sd * (pdf(a) - pdf(b)) / zz
    var = sd * sd * (1 + (a * pdf(a) - b * pdf(b)) / zz - ((pdf(a) - pdf(b)) / zz) ** 2)
    return mean, var, lambda x: (cdf((x - mu) / sd) - cdf(a)) / zz


def test_mage_ratio_distribution():
    n, seq = 3000, 256
    g = torch.Generator().manual_seed(0)
    draws = [mage_masking(2, seq, generator=g, device=DEVICE) for _ in range(n)]
    ratios = torch.stack([d.ratio for d in draws]).cpu()
    assert float(ratios.min()) >= 0.5 and float(ratios.max()) <= 1.0
    mean, var, cdf = _truncnorm_moments(0.55, 0.25, 0.5, 1.0)
    assert abs(ratios.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(ratios.var().item() - var) < 0.15 * var
    for x in (0.55, 0.65, 0.8, 0.95):  # empirical CDF within Kolmogorov-Smirnov-sized bands
        assert abs((ratios <= x).double().mean().item() - cdf(x)) < 1.8 / math.sqrt(n)
    for d in draws[:50]:
        k = math.ceil(seq * d.ratio.item())
        assert d.num_masked.item() == k
        assert d.drop_mask.sum(1).tolist() == [128, 128] and d.token_all_mask.sum(1).tolist() == [k, k]
        assert bool((d.token_all_mask | ~d.drop_mask).all())  # drop ⊂ mask
        assert d.ids_keep.shape == (2, 128) and bool((d.ids_keep.diff(dim=1) > 0).all())


def test_mage_masking_edges_and_seeding():
    a = mage_masking(3, generator=torch.Generator().manual_seed(4))
    b = mage_masking(3, generator=torch.Generator().manual_seed(4))
    c = mage_masking(3, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and not torch.equal(a.drop_mask, c.drop_mask)
    d = mage_masking(2, 10, ratio_std=0.0, ratio_mean=0.3, ratio_min=0.5, ratio_max=0.9)
    assert d.ratio.item() == 0.5 and d.num_masked.item() == 5
    e = mage_masking(2, 10, ratio_mean=-5.0, ratio_std=0.01)  # all mass at the lower bound (tails underflow)
    assert e.ratio.item() == 0.5
    g = torch.Generator().manual_seed(0)
    up = torch.stack([mage_masking(1, 8, ratio_mean=0.0, ratio_std=0.1, generator=g).ratio for _ in range(200)])
    assert float(up.min()) >= 0.5 and float(up.max()) < 0.75  # bounds 5 and 10 sd above: the upper-tail branch
    assert abs(up.mean().item() - _truncnorm_moments(0.0, 0.1, 0.5, 1.0)[0]) < 0.005
    f = mage_masking(2, 10, ratio_mean=0.95, ratio_std=0.01, ratio_min=0.5, ratio_max=0.6)  # bounds 35-45 sd below
    assert 0.59 < f.ratio.item() <= 0.6
    t = mage_masking(2, 10, ratio=torch.tensor(0.3))  # a tensor ratio below ratio_min is clamped to the drop count
    assert t.num_masked.item() == 5 and bool((t.token_all_mask == t.drop_mask).all())
    z = mage_masking(0, 256)
    assert z.drop_mask.shape == (0, 256) and z.ids_keep.shape == (0, 128)
    i32 = mage_masking(2, 16, index_dtype=torch.int32)
    assert i32.ids_keep.dtype == torch.int32 and i32.ids_restore.dtype == torch.int32


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(ratio_min=0.8, ratio_max=0.6), ValueError, "ratio_max"),
        (dict(ratio_std=-0.1), ValueError, "ratio_std"),
        (dict(ratio_max=1.5), ValueError, "ratio_max"),
        (dict(ratio=0.3), ValueError, "ratio"),
        (dict(ratio=torch.tensor([0.6])), ValueError, "ratio"),
        (dict(seq_len=0), ValueError, "seq_len"),
        (dict(noise=torch.rand(2, 255)), ValueError, "noise"),
    ],
)
def test_mage_masking_errors(kwargs, exc, match):
    kwargs = {"batch_size": 2, **kwargs}
    with pytest.raises(exc, match=match):
        mage_masking(**kwargs)


# ---------------------------------------------------------------------------------------------------- no sync
def test_no_host_reads_in_torch_paths(monkeypatch):
    """random_masking and mage_masking never read a tensor on the host (the CUDA check below is the real one)."""

    def forbidden(*_a, **_k):
        raise AssertionError("host read of a tensor in a mask generator")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    g = torch.Generator().manual_seed(0)
    random_masking(4, 196, generator=g, index_dtype=torch.int32)
    mage_masking(4, 256, generator=g)
    mage_masking(4, 256, ratio=0.7, generator=g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs CUDA")
def test_no_sync_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    # warm up (Triton compile, allocator) outside the checked region
    block_masking(8, exact=True, device="cuda", generator=g)
    block_masking(8, device="cuda", generator=g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        random_masking(64, 196, device="cuda", generator=g)
        mage_masking(64, 256, device="cuda", generator=g)
        block_masking(64, device="cuda", generator=g)
        cae_block_masking(64, device="cuda", generator=g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
