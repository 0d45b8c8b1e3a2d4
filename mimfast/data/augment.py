"""Fine-tuning augmentations as DALI graph pieces: timm's RandAugment (``rand-m9-mstd0.5-inc1``) and random erasing.

Both are called by :class:`mimfast.data.MIMLoader` while it builds a train pipeline (``DataConfig.rand_n`` /
``DataConfig.reprob``); every random draw is a DALI random operator, so it is seeded from the pipeline's seed (derived
from ``(seed, epoch, rank)``) and saved by DALI's checkpoints like the crop and the flip.

RandAugment (timm ``rand_augment_transform`` with ``inc1``, as MAE / BEiT fine-tuning use it)
    Per image, ``n`` operations are drawn uniformly with replacement from timm's 15 "increasing" operations
    (:data:`RA_OPS`); each is applied with probability 0.5 (timm's ``AugmentOp`` default) at the magnitude
    ``N(m, mstd)`` clipped to [0, 10] (timm's level scale, one draw per operation, continuous). The level ->
    parameter maps are timm's: rotate 3 l degrees, shear 0.03 l, translate 0.045 l of the side, enhance factors
    1 +- 0.09 l, posterize to 4 - int(0.4 l) bits, solarize above 256 - int(25.6 l), solarize-add int(11 l); the
    sign of the geometric and enhance operations is random. Parameters are computed per sample with DALI arithmetic;
    the operations are DALI operators (several are the kernels of ``nvidia.dali.auto_aug.augmentations``),
    dispatched per sample by ``nvidia.dali.auto_aug.core.select``, which needs a pipeline built with
    ``enable_conditionals=True``. Checked against Pillow on every operation (tests/test_augment.py).
    Differences from timm (Pillow): geometric operations interpolate bilinearly (timm: bicubic in MAE's recipe) and
    fill uncovered pixels with one grey value (DALI's warps take a scalar; timm uses the per-channel mean); equalize
    follows OpenCV's histogram formula (mean difference ~8 levels of 255); sharpness also filters the 1-pixel border
    Pillow leaves alone; posterize keeps at least 1 bit (timm's level-10 value of 0 bits is rejected by Pillow >= 13
    and blackened the image before); the operations run before the flip instead of after it (the same distribution:
    every geometric sign is random).
Random erasing (timm ``RandomErasing``, count 1)
    With probability ``prob``, one rectangle of area fraction ``U(0.02, 1/3)`` and aspect ratio log-uniform in
    ``[0.3, 1/0.3]`` (side lengths rounded; up to 10 attempts for a rectangle that fits strictly inside, none erased
    if all fail) is placed uniformly and filled with per-pixel ``N(0, 1)`` noise (``"pixel"``) or 0 (``"const"``)
    in the normalised space. Pixels outside the rectangle are untouched, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["RA_LEVEL_MAX", "RA_OPS", "REMODES", "rand_augment", "random_erasing"]

RA_LEVEL_MAX = 10.0  # timm's _LEVEL_DENOM: magnitudes (levels) live in [0, 10]
RA_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
          "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
          "TranslateXRel", "TranslateYRel")  # fmt: skip
REMODES = ("pixel", "const")
_RE_AREA = (0.02, 1 / 3)
_RE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
_RE_ATTEMPTS = 10


# ------------------------------------------------------------------------------------------------ RandAugment
def _ops(fill: int, size: int, gpu: bool) -> list:
    """timm's ``_RAND_INCREASING_TRANSFORMS`` in :data:`RA_OPS` order, then the identity (the "not applied" draw).

    Each op is ``op(x, level, sign)``: ``x`` uint8 HWC, ``level`` the float magnitude in [0, 10], ``sign`` +-1 (used
    by the operations timm negates at random). Parameters are computed per sample with DALI arithmetic, so magnitudes
    are continuous. The PIL-like kernels of contrast, auto-contrast, invert, posterize, solarize(-add), shear and
    translation are DALI's ``nvidia.dali.auto_aug.augmentations`` ones (their ``.op``)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.pipeline import do_not_convert

    warp = dict(fill_value=fill, interp_type=types.INTERP_LINEAR)
    x_axis, y_axis = types.Constant(np.array([1, 0], np.float32)), types.Constant(np.array([0, 1], np.float32))
    blur = types.Constant(np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13)  # PIL's SMOOTH filter
    ident = types.Constant(np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32))
    # keep 4 - int(0.4 level) most significant bits, at least 1: at level 10 timm's formula gives 0 bits, which old
    # Pillow turned into a black image and Pillow >= 13 rejects (the RandAugment paper's reference keeps 1)
    masks = types.Constant(np.array([0x80, 0x80, 0xC0, 0xE0, 0xF0], np.uint8))

    def dev(p):  # a per-sample parameter that meets the images in arithmetic lives where they do
        return p.gpu() if gpu else p

    def enhance(level, sign):  # 1 +- 0.9 at level 10
        return 1.0 + 0.09 * level * sign

    def auto_contrast(x, level, sign):
        return a.auto_contrast.op(x, None)

    def equalize(x, level, sign):
        return fn.equalize(x)

    def invert(x, level, sign):
        return a.invert.op(x, None)

    def rotate(x, level, sign):
        return fn.rotate(x, angle=3.0 * level * sign, keep_size=True, **warp)  # up to 30 degrees

    def posterize(x, level, sign):
        bits = 4 - fn.cast(dmath.floor(level / RA_LEVEL_MAX * 4), dtype=types.INT32)
        return a.posterize.op(x, dev(masks[bits]))

    def solarize(x, level, sign):  # invert pixels >= 256 - int(25.6 level)
        return a.solarize.op(x, dev(256.0 - dmath.floor(level / RA_LEVEL_MAX * 256)))

    def solarize_add(x, level, sign):  # add int(11 level) to pixels < 128
        return a.solarize_add.op(x, dev(fn.cast(dmath.floor(level / RA_LEVEL_MAX * 110), dtype=types.UINT8)))

    def color(x, level, sign):
        return fn.saturation(x, saturation=enhance(level, sign))

    def contrast(x, level, sign):
        return a.contrast.op(x, dev(enhance(level, sign)))

    def brightness(x, level, sign):
        return fn.brightness(x, brightness=enhance(level, sign))

    def sharpness(x, level, sign):  # PIL: blend(smoothed, x, factor) as one 3x3 kernel
        f = enhance(level, sign)
        return fn.filter(x, dev((1.0 - f) * blur + f * ident))

    def shear_x(x, level, sign):
        return a.shear_x.op(x, 0.03 * level * sign * x_axis, **warp)  # shear factor up to 0.3

    def shear_y(x, level, sign):
        return a.shear_y.op(x, 0.03 * level * sign * y_axis, **warp)

    def translate_x(x, level, sign):  # up to 0.45 of the side
        return a.translate_x.op(x, 0.045 * level * sign * x_axis, shape=(size, size), **warp)

    def translate_y(x, level, sign):
        return a.translate_y.op(x, 0.045 * level * sign * y_axis, shape=(size, size), **warp)

    def identity(x, level, sign):
        return x

    ops = [auto_contrast, equalize, invert, rotate, posterize, solarize, solarize_add, color, contrast, brightness,
           sharpness, shear_x, shear_y, translate_x, translate_y, identity]  # fmt: skip
    return [do_not_convert(op) for op in ops]  # no data-dependent branches: spare AutoGraph the transpiling


def rand_augment(images, *, n: int, m: float, mstd: float, size: int, fill: int):
    """timm's RandAugment ``rand-m{m}-n{n}-mstd{mstd}-inc1`` on a DALI batch; call it inside a pipeline built with
    ``enable_conditionals=True`` (the operations are dispatched per sample with ``nvidia.dali.auto_aug.core.select``).

    Args:
        images: DALI node, uint8 HWC images of ``size`` x ``size`` (CPU or GPU; the operations run where it lives).
        n: operations drawn per image (>= 1); each is applied with probability 0.5.
        m: magnitude on timm's level scale [0, 10].
        mstd: standard deviation of the per-operation magnitude noise (0: exactly ``m``).
        size: the images' side, for the relative translations.
        fill: grey value (0-255) for the pixels that geometric operations uncover.

    Returns:
        DALI node, uint8 HWC images of the same shape.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali.auto_aug.core import select

    ops = _ops(fill, size, images.device == "gpu")
    k = len(RA_OPS)  # ops[k] is the identity: drawn with probability 1/2, each operation with 1/(2k)
    which = fn.random.uniform(values=list(range(k)) + [k] * k, shape=(n,), dtype=types.INT32)
    level = dmath.clamp(m + mstd * fn.random.normal(shape=(n,)), 0.0, RA_LEVEL_MAX)
    sign = fn.random.coin_flip(shape=(n,)) * 2.0 - 1.0
    for i in range(n):
        images = select(ops, which[i], images, level=level[i], sign=sign[i])
    return images


# ------------------------------------------------------------------------------------------------ random erasing
def random_erasing(images, *, prob: float, mode: str, size: int):
    """timm's ``RandomErasing(probability=prob, mode=mode, max_count=1)`` on a DALI batch.

    Args:
        images: DALI node, float32 CHW normalised images of ``size`` x ``size`` (CPU or GPU).
        prob: probability that an image gets a rectangle.
        mode: ``"pixel"`` (per-pixel N(0, 1) noise) or ``"const"`` (zeros).
        size: the images' side.

    Returns:
        DALI node, float32 CHW images of the same shape, on the same device.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    t, s = _RE_ATTEMPTS, float(size)
    # t candidate rectangles per image; the first one that fits strictly inside wins (timm's retry loop)
    area = fn.random.uniform(range=list(_RE_AREA), shape=(t,)) * (s * s)
    ratio = dmath.exp(fn.random.uniform(range=list(_RE_LOG_RATIO), shape=(t,)))
    h = dmath.floor(dmath.sqrt(area * ratio) + 0.5)
    w = dmath.floor(dmath.sqrt(area / ratio) + 0.5)
    fits = (h < s) & (w < s)
    rank = fits * types.Constant(np.arange(t, 0, -1, dtype=np.float32))  # t - attempt where it fits, else 0
    best = fn.reductions.max(rank)
    first = (rank == best) & fits  # one-hot of the first fitting attempt (all False if none fits)
    erase = fn.random.coin_flip(probability=prob, dtype=types.BOOL) & (best > 0)
    h = fn.reductions.sum(h * first) * erase  # 0 x 0 when the image is left alone
    w = fn.reductions.sum(w * first) * erase
    top = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (s - h + 1))  # randint(0, size - h)
    left = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (s - w + 1))
    out = fn.erase(images, anchor=fn.stack(top, left), shape=fn.stack(h, w), axis_names="HW", fill_value=0.0)
    if mode == "pixel":
        # noise of the rectangle's size only, zero-padded to the image: erased + placed changes the rectangle alone
        box = fn.cast(fn.stack(types.Constant(3.0), h, w), dtype=types.INT32)
        noise = fn.random.normal(shape=box, device=images.device)
        out = out + fn.slice(noise, start=fn.cast(fn.stack(-top, -left), dtype=types.INT32), shape=[size, size],
                             axes=[1, 2], out_of_bounds_policy="pad", fill_values=0.0)  # fmt: skip
    return out
