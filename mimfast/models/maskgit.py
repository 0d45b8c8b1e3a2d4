"""MaskGIT iterative decoding (Chang et al. 2022) as MAGE generates images (Li et al. 2023), on the device.

The contract (SPEC.md, MAGE; the official ``gen_image`` of LTH14/mage ``gen_img_uncond.py``), for L token positions and
T steps::

    ids = [mask_id] * L                                     every position unknown
    for t in 0 .. T-1:
        logits  = logits_fn(ids)                            (B, L, K), K = the tokenizer's codebook
        sampled = Categorical(logits) at unknown positions, ids elsewhere (known tokens never change)
        r       = (t + 1) / T
        n_t     = max(1, min(unknown_t - 1, floor(L * cos(pi / 2 * r))))   unknown_t = mask ids at the start of step t
        conf    = log p(sampled) + choice_temperature * (1 - r) * Gumbel    known positions: +inf
        ids     = sampled with the n_t lowest-confidence positions set to mask_id
    return sampled (of the last step)                       no mask id left

The clamp is the official one, in its order: ``min`` with ``unknown - 1`` first, then ``max`` with 1, so one position
is always kept and one re-masked, and when a single position is unknown (possible only when T is large against L) it
stays unknown until the last step. The official loop computes a mask at the last step too (r = 1, n = 1) but returns
that step's samples, so the result has no mask id; :func:`mask_len_schedule` lists that last value as the official
code computes it and :func:`maskgit_sample` skips the unused re-masking. ``log p`` is the log-softmax of the logits at
temperature 1 (the official ``probs``), whatever the sampling temperature.

Two samplers over the same ``logits_fn``:

* :func:`maskgit_sample`: everything on the logits' device with no host synchronisation inside the loop (the
  schedule is a list of Python ints computed up front: the counts do not depend on the data because exactly ``n_t``
  positions are re-masked), seeded by one ``torch.Generator``. Tokens are drawn by Gumbel-max through mimfast's fused
  ``gumbel_quantize`` (indices only: the kernel adds Philox noise in registers and writes one index per row, never a
  (B, L, K) noise tensor). The choice noise uses torch's RNG on the same generator, see its docstring.
* :func:`official_sampler`: a faithful port of the official loop, numpy Gumbel noise drawn on the host at every step
  and copied to the device, host reads of the mask length and ``<=`` cut-off masking: the benchmark's baseline.

:func:`generate` runs a MAGE model (``predict_logits``, ``mask_token_id``, ``config.codebook_size``,
``config.num_classes``, ``grid_size``) through :func:`maskgit_sample` in batches and decodes the ids with a tokenizer.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable

import numpy as np
import torch

from ..ops.gumbel import gumbel_quantize

__all__ = [
    "cosine_schedule",
    "generate",
    "mask_len_schedule",
    "maskgit_sample",
    "official_sampler",
    "unknown_schedule",
]

LogitsFn = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------------------------- validation
def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value}")
    return int(value)


def _check_temperature(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a finite number >= 0, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
    return float(value)


def _resolve_device(device, generator, class_ids) -> torch.device:
    if device is not None:
        return torch.device(device)
    if generator is not None and isinstance(generator, torch.Generator):
        return generator.device
    if isinstance(class_ids, torch.Tensor):
        return class_ids.device
    return torch.device("cpu")


def _check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    g = generator.device
    if g.type != device.type or (g.index is not None and device.index is not None and g.index != device.index):
        raise ValueError(f"generator: lives on {g} but the sampling runs on {device}; pass "
                         f"torch.Generator(device={str(device)!r})")  # fmt: skip


def _class_tensor(class_ids, batch_size: int, device: torch.device, num_classes: int | None) -> torch.Tensor | None:
    """class_ids (None, an int, a sequence of B ints or a (B,) integer tensor) -> (B,) int64 on ``device`` or None.
    A tensor's range is checked with one host read, before the loop."""
    if class_ids is None:
        return None
    if num_classes is not None and num_classes < 1:
        raise ValueError("class_ids: the model has no classes (num_classes=0, unconditional); pass class_ids=None")
    if isinstance(class_ids, torch.Tensor):
        if class_ids.dtype in (torch.bool,) or class_ids.is_floating_point() or class_ids.is_complex():
            raise TypeError(f"class_ids: expected an integer tensor, got {class_ids.dtype}")
        if class_ids.dim() == 0:
            class_ids = class_ids.expand(batch_size)
        if tuple(class_ids.shape) != (batch_size,):
            raise ValueError(f"class_ids: expected shape ({batch_size},) (one class per image), "
                             f"got {tuple(class_ids.shape)}")  # fmt: skip
        ids = class_ids.to(device=device, dtype=torch.int64)
        if num_classes is not None and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())  # one host read, outside the sampling loop
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(f"class_ids: {bad} is out of range, expected class ids in [0, {num_classes})")
        return ids
    values = [class_ids] * batch_size if isinstance(class_ids, numbers.Integral) else list(class_ids)
    if len(values) != batch_size:
        raise ValueError(f"class_ids: expected {batch_size} class ids (one per image) or one int, got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"class_ids: expected ints, got {type(v).__name__} {v!r}")
        if v < 0 or (num_classes is not None and v >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise ValueError(f"class_ids: {v} is out of range, expected class ids in {bound}")
    return torch.tensor(values, dtype=torch.int64, device=device)


def _check_logits(logits, batch_size: int, seq_len: int, device: torch.device, step: int) -> int:
    """Shape / dtype / device of logits_fn's output (metadata only: no host sync). Returns K."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits_fn: expected it to return a torch.Tensor, got {type(logits).__name__} (step {step})")
    if logits.dim() != 3 or logits.shape[0] != batch_size or logits.shape[1] != seq_len or logits.shape[2] < 1:
        raise ValueError(f"logits_fn: expected logits of shape ({batch_size}, {seq_len}, K >= 1), got "
                         f"{tuple(logits.shape)} (step {step})")  # fmt: skip
    if not logits.is_floating_point():
        raise TypeError(f"logits_fn: expected floating-point logits, got {logits.dtype} (step {step})")
    if logits.device != device and not (logits.device.type == device.type and device.index is None):
        raise ValueError(f"logits_fn: returned logits on {logits.device}, the sampling runs on {device}")
    return int(logits.shape[2])


# -------------------------------------------------------------------------------------------------- schedule
def cosine_schedule(ratio: float) -> float:
    """MaskGIT's cosine mask schedule: the fraction of the L positions left masked after ratio r = (t + 1) / T of
    the steps, ``cos(pi / 2 * r)`` (1 at r = 0, 0 at r = 1), in float64 as the official ``np.cos``."""
    return math.cos(math.pi / 2.0 * ratio)


def mask_len_schedule(seq_len: int, steps: int) -> list[int]:
    """The official number of positions re-masked at the end of each step: a list of ``steps`` ints.

    ``n_t = max(1, min(unknown_t - 1, floor(seq_len * cos(pi / 2 * (t + 1) / steps))))`` with ``unknown_0 = seq_len``
    and ``unknown_{t+1} = n_t`` (exactly ``n_t`` positions are re-masked). The last value (r = 1: floor(...) = 0,
    clamped to 1) is computed by the official loop but unused: it returns that step's samples, so the final ids
    hold no mask id. E.g. L = 256, T = 12: [253, 247, 236, 221, 203, 181, 155, 128, 97, 66, 33, 1].
    """
    seq_len = _check_int("seq_len", seq_len, 1)
    steps = _check_int("steps", steps, 1)
    out, unknown = [], seq_len
    for t in range(steps):
        ratio = (t + 1) / steps
        n = math.floor(seq_len * cosine_schedule(ratio))
        n = max(1, min(unknown - 1, n))  # the official order: min with unknown - 1, then max with 1
        out.append(n)
        unknown = n
    return out


def unknown_schedule(seq_len: int, steps: int) -> list[int]:
    """Mask ids in the input of each step: ``[seq_len, n_0, ..., n_{T-2}]`` (see :func:`mask_len_schedule`)."""
    return [_check_int("seq_len", seq_len, 1)] + mask_len_schedule(seq_len, steps)[:-1]


# --------------------------------------------------------------------------------------------------- sampler
def _call(logits_fn, ids, class_ids):
    return logits_fn(ids) if class_ids is None else logits_fn(ids, class_ids)


def _common_args(logits_fn, batch_size, seq_len, mask_id, steps, choice_temperature):
    if not callable(logits_fn):
        raise TypeError(
            f"logits_fn: expected a callable ids (B, L) -> logits (B, L, K), got {type(logits_fn).__name__}"
        )
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    steps = _check_int("steps", steps, 1)
    if isinstance(mask_id, bool) or not isinstance(mask_id, numbers.Integral):
        raise TypeError(f"mask_id: expected an int, got {type(mask_id).__name__} {mask_id!r}")
    return batch_size, seq_len, int(mask_id), steps, _check_temperature("choice_temperature", choice_temperature)


def _check_mask_id(mask_id: int, k: int) -> None:
    if 0 <= mask_id < k:
        raise ValueError(f"mask_id: {mask_id} is one of the {k} token ids logits_fn scores; the mask id must lie "
                         f"outside [0, {k}) (MAGE: codebook_size + num_classes)")  # fmt: skip


@torch.no_grad()
def maskgit_sample(
    logits_fn: LogitsFn,
    batch_size: int,
    seq_len: int,
    *,
    mask_id: int,
    steps: int = 12,
    choice_temperature: float = 4.5,
    sample_temperature: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
    class_ids=None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """MaskGIT decoding of ``batch_size`` sequences of ``seq_len`` tokens in ``steps`` steps, on the device.

    Args:
        logits_fn: ``logits_fn(ids (B, L) int64) -> (B, L, K)`` floating logits over the K token ids (e.g. a MAGE
            model's ``predict_logits``); called as ``logits_fn(ids, class_ids)`` when ``class_ids`` is given. Unknown
            positions of ``ids`` hold ``mask_id``. K must not include ``mask_id``.
        batch_size: B >= 1.
        seq_len: L >= 1 (MAGE: 256 = 16 x 16).
        mask_id: the id of unknown positions, outside [0, K).
        steps: T >= 1.
        choice_temperature: >= 0, scale of the Gumbel noise added to the confidence (annealed by 1 - r).
        sample_temperature: >= 0, tokens are drawn from softmax(logits / sample_temperature); 0 takes the argmax.
            The confidence always uses log softmax(logits) (temperature 1, as the official code).
        generator: a ``torch.Generator`` of the sampling device (default: torch's default generator there); the
            same seed reproduces the same ids.
        device: where the ids live (default: the generator's device, else the class ids', else the CPU).
        class_ids: None, an int, B ints or a (B,) integer tensor; passed to ``logits_fn``.
        num_classes: when given, class ids must lie in [0, num_classes).

    Returns:
        ids (B, L) int64 in [0, K) on ``device``, no mask id left.

    Noise: tokens are Gumbel-max samples from mimfast's fused ``gumbel_quantize`` (indices only, Philox noise in
    registers, seed and offset drawn from ``generator`` on the device). The confidence noise, B x L Gumbel variates
    per step, comes from ``torch.rand(..., generator=generator)``: mimfast.ops exposes Gumbel noise only through
    an argmax over codes, while this choice needs the noise values themselves (the kept positions are a Gumbel-top-k
    over positions, not an argmax); it is B x L numbers, one fused RNG kernel, on the same generator and device, so
    the whole call stays reproducible and free of host syncs.

    The loop reads nothing back to the host; one host read after it checks that no row of logits was non-finite
    (a NaN / +inf logit makes a row unsamplable: ValueError naming logits_fn).
    """
    batch_size, seq_len, mask_id, steps, choice_temperature = _common_args(
        logits_fn, batch_size, seq_len, mask_id, steps, choice_temperature
    )
    sample_temperature = _check_temperature("sample_temperature", sample_temperature)
    if num_classes is not None:
        num_classes = _check_int("num_classes", num_classes, 0)
    device = _resolve_device(device, generator, class_ids)
    _check_generator(generator, device)
    cls = _class_tensor(class_ids, batch_size, device, num_classes)
    remask = mask_len_schedule(seq_len, steps)

    ids = torch.full((batch_size, seq_len), mask_id, dtype=torch.int64, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    k = None
    for t in range(steps):
        logits = _call(logits_fn, ids, cls)
        kt = _check_logits(logits, batch_size, seq_len, device, t)
        if k is None:
            _check_mask_id(mask_id, kt)
            k = kt
        elif kt != k:
            raise ValueError(f"logits_fn: returned {kt} token scores at step {t}, {k} before")
        unknown = ids == mask_id
        flat = logits.reshape(batch_size * seq_len, k)
        if sample_temperature == 0.0:
            sampled = flat.argmax(dim=-1)
        else:
            scaled = flat if sample_temperature == 1.0 else flat.float() / sample_temperature
            # Gumbel-max over the K codes: argmax(logits + g) is a Categorical(softmax(logits)) draw; index -1
            # marks a non-finite row ("propagate": no per-step host check, flagged below and checked once after)
            _, sampled = gumbel_quantize(scaled, 1.0, indices_only=True, generator=generator, nan_policy="propagate")
            bad |= (sampled < 0).any()
            sampled = sampled.clamp_min(0)
        sampled = sampled.view(batch_size, seq_len)
        sampled = torch.where(unknown, sampled, ids)  # known tokens never change
        if t == steps - 1:
            ids = sampled  # the official loop returns the last samples; its last re-mask is unused
            break
        ratio = (t + 1) / steps
        lf = logits.float()
        logp = lf.gather(-1, sampled.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lf, dim=-1)
        tau = choice_temperature * (1.0 - ratio)
        if tau > 0:
            u = torch.rand((batch_size, seq_len), generator=generator, device=device).clamp_min_(1e-30)
            logp = logp - tau * torch.log(-torch.log(u))  # + tau * Gumbel(0, 1)
        # known positions +inf; a NaN confidence (non-finite logits, flagged) sorts first rather than onto a known one
        conf = torch.where(unknown, logp.nan_to_num(nan=-float("inf")), float("inf"))
        # exactly n lowest (n <= unknown: only unknown positions can be picked); the official `<= cut-off` can take
        # more on exact ties
        low = torch.topk(conf, remask[t], dim=1, largest=False, sorted=False).indices
        ids = sampled.scatter(1, low, mask_id)
    if bool(bad):  # the one host read of the call
        raise ValueError("logits_fn: returned logits with a NaN / +inf entry or a row of -inf (no token can be "
                         "sampled there); check the model's outputs")  # fmt: skip
    return ids


@torch.no_grad()
def official_sampler(
    logits_fn: LogitsFn,
    batch_size: int,
    seq_len: int,
    *,
    mask_id: int,
    steps: int = 12,
    choice_temperature: float = 4.5,
    generator: torch.Generator | None = None,
    device=None,
    class_ids=None,
    num_classes: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """The official MAGE sampler's loop (``gen_image`` / ``mask_by_random_topk`` of LTH14/mage), ported faithfully
    over ``logits_fn``: the benchmark's baseline. Same arguments and result as :func:`maskgit_sample` (no sampling
    temperature: the official code samples at 1).

    As the official code: tokens from ``torch.distributions.Categorical(logits=...)`` (here ``torch.multinomial`` on
    the softmax with ``generator``, which is what ``Categorical.sample`` runs), probabilities gathered and compared
    in float64 / float32, the mask length built on the host and copied to the device each step, the confidence noise
    drawn by numpy (``temperature * np.random.gumbel(size=(B, L))``) on the CPU each step and copied to the device,
    a host read of the mask length for the cut-off slice, and ``confidence <= cut_off`` masking (which can re-mask
    more than ``n`` positions on exact ties). The numpy noise comes from ``np.random.RandomState(seed)``, ``seed``
    defaulting to ``generator.initial_seed()`` (else numpy's global state, as the official ``np.random.seed``).
    """
    batch_size, seq_len, mask_id, steps, choice_temperature = _common_args(
        logits_fn, batch_size, seq_len, mask_id, steps, choice_temperature
    )
    if num_classes is not None:
        num_classes = _check_int("num_classes", num_classes, 0)
    device = _resolve_device(device, generator, class_ids)
    _check_generator(generator, device)
    cls = _class_tensor(class_ids, batch_size, device, num_classes)
    if seed is None and generator is not None:
        seed = generator.initial_seed() % 2**32
    rng = np.random.RandomState(seed) if seed is not None else np.random

    def mask_by_random_topk(mask_len, probs, temperature):
        mask_len = mask_len.squeeze()
        noise = torch.Tensor(temperature * rng.gumbel(size=probs.shape)).to(device)  # host noise, copied each step
        confidence = torch.log(probs) + noise
        sorted_confidence, _ = torch.sort(confidence, dim=-1)
        n = int(mask_len.long())  # host read (the official slices with the tensor, which reads it too)
        cut_off = sorted_confidence[:, n - 1 : n]
        return confidence <= cut_off

    token_indices = torch.full((batch_size, seq_len), float(mask_id), device=device)
    sampled_ids = None
    k = None
    for step in range(steps):
        cur_ids = token_indices.clone().long()
        logits = _call(logits_fn, cur_ids, cls)
        kt = _check_logits(logits, batch_size, seq_len, device, step)
        if k is None:
            _check_mask_id(mask_id, kt)
            k = kt
        logits = logits.float()
        probs_all = torch.softmax(logits, dim=-1)
        # Categorical(logits=...).sample() is multinomial(probs, 1, replacement=True)
        sampled_ids = torch.multinomial(probs_all.reshape(-1, k), 1, True, generator=generator)
        sampled_ids = sampled_ids.view(batch_size, seq_len)
        unknown_map = cur_ids == mask_id
        sampled_ids = torch.where(unknown_map, sampled_ids, cur_ids)
        ratio = 1.0 * (step + 1) / steps
        mask_ratio = np.cos(math.pi / 2.0 * ratio)
        selected_probs = torch.squeeze(torch.gather(probs_all, dim=-1, index=torch.unsqueeze(sampled_ids, -1)), -1)
        selected_probs = torch.where(unknown_map, selected_probs.double(), np.inf).float()
        mask_len = torch.Tensor([np.floor(seq_len * mask_ratio)]).to(device)
        mask_len = torch.maximum(
            torch.Tensor([1]).to(device), torch.minimum(torch.sum(unknown_map, dim=-1, keepdim=True) - 1, mask_len)
        )
        masking = mask_by_random_topk(mask_len[0], selected_probs, choice_temperature * (1 - ratio))
        token_indices = torch.where(masking, mask_id, sampled_ids)
    return sampled_ids


# -------------------------------------------------------------------------------------------------- generate
def _vocab(tokenizer) -> int | None:
    v = getattr(tokenizer, "codebook_size", None)
    if v is None:
        v = getattr(tokenizer, "vocab_size", None)
    return None if v is None else int(v)


def _module_device(m) -> torch.device | None:
    if isinstance(m, torch.nn.Module):
        p = next(iter(m.parameters()), None)
        if p is None:
            p = next(iter(m.buffers()), None)
        return None if p is None else p.device
    return None


@torch.no_grad()
def generate(
    model,
    tokenizer,
    num_images: int,
    *,
    steps: int = 12,
    choice_temperature: float = 4.5,
    class_ids=None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    sample_temperature: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    return_ids: bool = False,
):
    """Generate ``num_images`` images with a MAGE model: MaskGIT decoding of token ids, then ``tokenizer.decode``.

    Args:
        model: a MAGE model (``predict_logits(ids (B, L), class_ids (B,) | None) -> (B, L, codebook_size)``,
            ``mask_token_id``, ``config.codebook_size``, ``config.num_classes``, ``grid_size`` G with L = G * G),
            on the device generation runs on (its parameters' device).
        tokenizer: ``decode(ids (B, G, G)) -> images (B, 3, H, W)`` with ``codebook_size`` (or ``vocab_size``)
            equal to the model's ``codebook_size``; moved to the model's device when it is a module.
        num_images: N >= 1.
        steps, choice_temperature, sample_temperature: see :func:`maskgit_sample`.
        class_ids: None (unconditional: the model's fake class token), one int for every image, or N ints / an (N,)
            tensor, each in [0, model.config.num_classes).
        batch_size: images per :func:`maskgit_sample` call (default min(N, 64)).
        generator: a ``torch.Generator`` of the model's device; the same seed gives the same images.
        autocast_dtype: run ``predict_logits`` under ``torch.autocast`` in this dtype (e.g. torch.bfloat16 on CUDA);
            decoding is fp32.
        return_ids: also return the token ids.

    Returns:
        images (N, 3, H, W) float32 on the CPU, in the tokenizer's output space (a mimfast run's normalised space:
        ``mimfast.data.denormalize`` maps it to [0, 1]); with ``return_ids``, ``(images, ids (N, G, G) int64)``.
    """
    num_images = _check_int("num_images", num_images, 1)
    batch_size = min(num_images, 64) if batch_size is None else _check_int("batch_size", batch_size, 1)
    cfg = model.config
    k_model, k_tok = int(cfg.codebook_size), _vocab(tokenizer)
    if k_tok is not None and k_tok != k_model:
        raise ValueError(f"tokenizer: has {k_tok} codes but the model predicts codebook_size={k_model}; use the "
                         "tokenizer the model was trained with")  # fmt: skip
    if not callable(getattr(tokenizer, "decode", None)):
        raise ValueError(f"tokenizer: a {type(tokenizer).__name__} has no decode(ids) method")
    num_classes = int(getattr(cfg, "num_classes", 0) or 0)
    device = _module_device(model) or torch.device("cpu")
    _check_generator(generator, device)
    cls_all = _class_tensor(class_ids, num_images, device, num_classes)
    if _module_device(tokenizer) not in (None, device):
        tokenizer.to(device)
    g = int(model.grid_size)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()

    def logits_fn(ids, cls=None):
        with amp:
            return model.predict_logits(ids, cls)

    images, all_ids = [], []
    for start in range(0, num_images, batch_size):
        b = min(batch_size, num_images - start)
        cls = None if cls_all is None else cls_all[start : start + b]
        ids = maskgit_sample(logits_fn, b, g * g, mask_id=int(model.mask_token_id), steps=steps,
                             choice_temperature=choice_temperature, sample_temperature=sample_temperature,
                             generator=generator, device=device, class_ids=cls)  # fmt: skip
        ids = ids.view(b, g, g)
        with torch.autocast(device.type, enabled=False):
            images.append(tokenizer.decode(ids).float().cpu())
        if return_ids:
            all_ids.append(ids.cpu())
    out = torch.cat(images)
    return (out, torch.cat(all_ids)) if return_ids else out
