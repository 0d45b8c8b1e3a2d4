"""Masked-token gather / restore: the public functional API over ``mimfast::gather_tokens`` / ``restore_tokens``.

Typical MAE use (``ids_keep``/``ids_restore`` from :func:`mimfast.ops.random_masking`)::

    tokens = patch_embed(images)                                        # (B, L, D)
    x = gather_tokens(tokens, ids_keep, pos=pos_embed[1:], prefix=cls + pos_embed[:1], ids_restore=ids_restore)
    ...                                                                 # encoder on (B, 1 + Lk, D)
    y = decoder_embed(x)                                                # (B, 1 + Lk, Dd)
    y = restore_tokens(y, ids_restore, fill=mask_token, pos=decoder_pos_embed, num_prefix=1)   # (B, 1 + L, Dd)

Each call is one kernel launch forward and one backward, with no host synchronisation unless ``validate`` asks for
it (the default validates only CPU tensors, where a check costs no device round trip).
"""

from __future__ import annotations

import torch

from ..kernels._common import check_same_device, check_tensor
from ..kernels.token_gather import INDEX_DTYPES, _promote

__all__ = ["gather_tokens", "inverse_index", "restore_tokens"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _check_index(name: str, ids, bsz: int) -> None:
    check_tensor(name, ids, ndim=2, dtypes=INDEX_DTYPES)
    if ids.shape[0] != bsz:
        raise ValueError(
            f"{name}: expected batch size {bsz} (the tokens' first dimension), got shape {tuple(ids.shape)}"
        )


def _check_rows(name: str, t, rows: int, dim: int, *, allow_batch: int | None = None) -> torch.Tensor:
    """Accept (rows, D), (1, rows, D) or, when allow_batch is given, (B, rows, D); return the 2-D / 3-D form."""
    check_tensor(name, t, dtypes=_FLOATS)
    if t.dim() == 3 and t.shape[0] == 1 and allow_batch != 1:
        t = t[0]
    ok = (t.dim() == 2 and tuple(t.shape) == (rows, dim)) or (
        allow_batch is not None and t.dim() == 3 and tuple(t.shape) == (allow_batch, rows, dim)
    )
    if not ok:
        want = f"({rows}, {dim}) or (1, {rows}, {dim})"
        if allow_batch is not None:
            want += f" or ({allow_batch}, {rows}, {dim})"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    return t


def inverse_index(ids_keep: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Restore index of a keep index: ``inv[b, ids_keep[b, j]] = j``, every other entry Lk.

    ids_keep: (B, Lk) distinct positions in [0, seq_len). Returns (B, seq_len) of ids_keep's dtype. One scatter
    launch, no host sync; out-of-range entries of ids_keep are ignored (never a memory fault).
    """
    bsz, lk = ids_keep.shape
    idx = ids_keep.long()
    idx = torch.where((idx >= 0) & (idx < seq_len), idx, seq_len)  # a spare column absorbs bad entries
    inv = torch.full((bsz, seq_len + 1), lk, dtype=ids_keep.dtype, device=ids_keep.device)
    src = torch.arange(lk, dtype=ids_keep.dtype, device=ids_keep.device).expand(bsz, lk)
    return inv.scatter_(1, idx, src)[:, :seq_len]


def _should_validate(validate: bool | None, t: torch.Tensor) -> bool:
    return t.device.type == "cpu" if validate is None else bool(validate)


def _validate_keep(ids_keep: torch.Tensor, ids_restore: torch.Tensor | None, seq_len: int) -> None:
    if ids_keep.numel() == 0:
        return
    lo, hi = int(ids_keep.min()), int(ids_keep.max())
    if lo < 0 or hi >= seq_len:
        raise ValueError(f"ids_keep: values must lie in [0, {seq_len}) (positions in x), got range [{lo}, {hi}]")
    srt = ids_keep.sort(dim=1).values
    if (srt[:, 1:] == srt[:, :-1]).any():
        raise ValueError("ids_keep: every row must hold distinct positions (a subset of the tokens, as MAE's)")
    if ids_restore is not None:
        lk = ids_keep.shape[1]
        back = ids_restore.long().gather(1, ids_keep.long())
        if not torch.equal(back, torch.arange(lk, device=back.device).expand_as(back)):
            raise ValueError("ids_restore: must be the inverse of ids_keep (ids_restore[b, ids_keep[b, j]] == j)")
        dropped = torch.ones_like(ids_restore, dtype=torch.bool).scatter_(1, ids_keep.long(), False)
        if (ids_restore[dropped] < lk).any():
            raise ValueError(f"ids_restore: positions not in ids_keep must map to values >= Lk={lk}")


def _validate_restore(ids_restore: torch.Tensor, lk: int, covers_all: bool) -> None:
    if ids_restore.numel() == 0:
        return
    seq = ids_restore.shape[1]
    lo, hi = int(ids_restore.min()), int(ids_restore.max())
    if lo < 0 or hi >= seq:
        raise ValueError(f"ids_restore: values must lie in [0, {seq}) (MAE's restore index), got range [{lo}, {hi}]")
    vis = ids_restore.long().clamp(max=lk)  # value lk collects every filled slot
    hits = torch.zeros(ids_restore.shape[0], lk + 1, dtype=torch.long, device=ids_restore.device)
    hits.scatter_add_(1, vis, torch.ones_like(vis))
    hits = hits[:, :lk]
    if (hits > 1).any():
        raise ValueError("ids_restore: a visible row (value < Lk) is referenced more than once in a row")
    if covers_all and (hits == 0).any():
        raise ValueError(
            "ids_restore: some visible rows are never placed; pass covers_all=False if that is intended "
            "(their gradient is then zero)"
        )


def gather_tokens(
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    *,
    pos: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    ids_restore: torch.Tensor | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Keep the visible tokens, add their position embedding and prepend prefix tokens, in one pass.

    ``out = cat([prefix, x[b, ids_keep[b]] + pos[ids_keep[b]]], dim=1)``

    Args:
        x: (B, L, D) fp32 / bf16 / fp16 (fp64 runs the reference); any strides.
        ids_keep: (B, Lk) int32 or int64, Lk <= L distinct positions per row (MAE's ``ids_shuffle[:, :Lk]``).
        pos: optional (L, D) or (1, L, D) position embedding of the L positions (e.g. ``pos_embed[:, 1:]``).
        prefix: optional (P, D) / (1, P, D) tokens shared by all samples, or (B, P, D) per sample, placed first
            (e.g. ``cls_token + pos_embed[:, :1]``).
        ids_restore: optional (B, L) inverse of ids_keep (MAE returns it); computed when absent. The backward pass
            uses it to scatter the gradient without atomics.
        validate: check index values (a host sync): None checks CPU tensors only; True always; False never. An
            unchecked out-of-range index yields a NaN row, never a memory fault.

    Returns:
        (B, P + Lk, D), dtype = torch's promotion of (x, pos, prefix).
    """
    check_tensor("x", x, ndim=3, dtypes=_FLOATS)
    bsz, seq, dim = x.shape
    _check_index("ids_keep", ids_keep, bsz)
    if ids_keep.shape[1] > seq:
        raise ValueError(f"ids_keep: keeps {ids_keep.shape[1]} tokens but x has only L={seq} (expected Lk <= L)")
    if pos is not None:
        pos = _check_rows("pos", pos, seq, dim)
    if prefix is not None:
        check_tensor("prefix", prefix, dtypes=_FLOATS)
        rows = prefix.shape[-2] if prefix.dim() >= 2 else -1
        prefix = _check_rows("prefix", prefix, rows, dim, allow_batch=bsz)
    if ids_restore is not None:
        check_tensor("ids_restore", ids_restore, ndim=2, dtypes=INDEX_DTYPES)
        if tuple(ids_restore.shape) != (bsz, seq):
            raise ValueError(f"ids_restore: expected shape ({bsz}, {seq}), got {tuple(ids_restore.shape)}")
    check_same_device(x=x, ids_keep=ids_keep, pos=pos, prefix=prefix, ids_restore=ids_restore)
    if _should_validate(validate, x):
        _validate_keep(ids_keep, ids_restore, seq)
    if ids_restore is None:
        ids_restore = inverse_index(ids_keep, seq)
    out_dtype = _promote(x, pos, prefix)
    return torch.ops.mimfast.gather_tokens(x, ids_keep, ids_restore, pos, prefix, _dtype_name(out_dtype))


def restore_tokens(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    fill: torch.Tensor | None = None,
    *,
    pos: torch.Tensor | None = None,
    num_prefix: int = 0,
    covers_all: bool = True,
    validate: bool | None = None,
) -> torch.Tensor:
    """Put visible tokens back in image order, fill the removed slots, add the position embedding, in one pass.

    With x = [prefix rows ; visible rows] (MAE's decoder input: cls then Lk visible tokens)::

        out[:, :P]    = x[:, :P] + pos[:P]
        out[:, P + l] = (x[:, P + r] if r < Lk else fill) + pos[P + l],   r = ids_restore[:, l]

    Args:
        x: (B, P + Lk, D) fp32 / bf16 / fp16 (fp64 runs the reference); any strides.
        ids_restore: (B, L) int32 / int64, MAE's restore index (values in [0, L); < Lk selects a visible row).
        fill: the removed slots' content: (D,) / (1, 1, D) shared (MAE's mask token), (B, D) per sample (MAGE's
            class-token feature) or None for zeros.
        pos: optional (P + L, D) or (1, P + L, D) position embedding of the output rows (MAE's decoder_pos_embed).
        num_prefix: P, rows at the front of x that pass through (MAE: 1, the cls token).
        covers_all: every visible row is placed exactly once (true for MAE). False allows rows that are not placed
            (MAGE replaces some visible tokens with the filler): their gradient is then zero-filled.
        validate: check index values (a host sync): None checks CPU tensors only; True always; False never.

    Returns:
        (B, P + L, D), dtype = torch's promotion of (x, fill, pos).
    """
    check_tensor("x", x, ndim=3, dtypes=_FLOATS)
    bsz, rows, dim = x.shape
    _check_index("ids_restore", ids_restore, bsz)
    if not isinstance(num_prefix, int) or num_prefix < 0 or num_prefix > rows:
        raise ValueError(f"num_prefix: expected an int in [0, {rows}] (x has {rows} rows), got {num_prefix!r}")
    seq, lk = ids_restore.shape[1], rows - num_prefix
    if lk > seq:
        raise ValueError(
            f"x: holds {lk} visible rows after {num_prefix} prefix rows, more than ids_restore's L={seq} positions"
        )
    if fill is not None:
        check_tensor("fill", fill, dtypes=_FLOATS)
        if fill.dim() == 3 and fill.shape[:2] == (1, 1):
            fill = fill.reshape(fill.shape[-1])
        if not ((fill.dim() == 1 and fill.shape[0] == dim) or (fill.dim() == 2 and tuple(fill.shape) == (bsz, dim))):
            raise ValueError(
                f"fill: expected shape ({dim},) / (1, 1, {dim}) shared or ({bsz}, {dim}) per sample, "
                f"got {tuple(fill.shape)}"
            )
    if pos is not None:
        pos = _check_rows("pos", pos, num_prefix + seq, dim)
    check_same_device(x=x, ids_restore=ids_restore, fill=fill, pos=pos)
    if _should_validate(validate, x):
        _validate_restore(ids_restore, lk, covers_all)
    out_dtype = _promote(x, fill, pos)
    return torch.ops.mimfast.restore_tokens(
        x, ids_restore, fill, pos, num_prefix, bool(covers_all), _dtype_name(out_dtype)
    )
