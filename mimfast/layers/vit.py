"""Vision Transformer building blocks with the official MAE / timm 0.3.2 parameter names.

``Block`` state-dict keys are exactly those of the checkpoints MAE released (``norm1``, ``attn.qkv``, ``attn.proj``,
``norm2``, ``mlp.fc1``, ``mlp.fc2``), plus timm's ``ls1.gamma`` / ``ls2.gamma`` when layer scale is on (BEiT, CAE).
Attention runs through :func:`mimfast.layers.attention.attention`, so one switch picks FlashAttention, SDPA,
xFormers or the eager reference for every block.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "RelativePositionBias",
    "drop_path",
    "get_1d_sincos_pos_embed",
    "get_2d_sincos_pos_embed",
    "init_patch_embed_weights",
    "init_vit_weights",
]


def _pair(x) -> tuple[int, int]:
    t = tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    if len(t) != 2 or not all(isinstance(i, int) and i >= 1 for i in t):
        raise ValueError(f"expected an int >= 1 or a pair of them, got {x!r}")
    return t


# ------------------------------------------------------------------------------------------------ patch embed
class PatchEmbed(nn.Module):
    """Image to patch embeddings: a Conv2d with kernel = stride = patch size, flattened row-major over the grid.

    Args:
        img_size: input height and width (int or (H, W)); inputs must have exactly this size.
        patch_size: patch height and width (int or (p_h, p_w)); must divide ``img_size``.
        in_chans: input channels C.
        embed_dim: output width D.

    Shapes: ``forward(x (B, C, H, W)) -> (B, L, D)`` with ``L = (H / p_h) * (W / p_w)``; token ``i * (W / p_w) + j``
    is the patch at grid row i, column j (the order of MAE's ``patchify``).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True):
        super().__init__()
        try:
            img, patch = _pair(img_size), _pair(patch_size)
        except ValueError as exc:
            raise ValueError(f"img_size / patch_size: {exc}") from None
        if img[0] % patch[0] or img[1] % patch[1]:
            raise ValueError(f"patch_size: {patch} must divide img_size {img}")
        if not (isinstance(in_chans, int) and in_chans >= 1):
            raise ValueError(f"in_chans: expected an int >= 1, got {in_chans!r}")
        if not (isinstance(embed_dim, int) and embed_dim >= 1):
            raise ValueError(f"embed_dim: expected an int >= 1, got {embed_dim!r}")
        self.img_size, self.patch_size, self.in_chans = img, patch, in_chans
        self.grid_size = (img[0] // patch[0], img[1] // patch[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x: expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"x: expected {self.in_chans} channels, got {c} (shape {tuple(x.shape)})")
        if (h, w) != self.img_size:
            raise ValueError(f"x: expected image size {self.img_size}, got ({h}, {w}); resize or build with img_size")
        return self.proj(x).flatten(2).transpose(1, 2)


# -------------------------------------------------------------------------------------- sin-cos embeddings
def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding in float64: ``[sin(pos * omega), cos(pos * omega)]`` with
    ``omega_i = 1 / 10000^(i / (embed_dim / 2))``, ``i = 0 .. embed_dim/2 - 1``.

    Shapes: ``pos (M,) -> (M, embed_dim)``.
    """
    if not (isinstance(embed_dim, int) and embed_dim >= 2 and embed_dim % 2 == 0):
        raise ValueError(f"embed_dim: expected an even int >= 2, got {embed_dim!r}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000.0**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: int, cls_token: bool = False, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding, computed in float64 and cast to ``dtype``.

    Layout (as in MAE's ``get_2d_sincos_pos_embed``, which builds ``meshgrid(w, h)``): token ``n = i * G + j``
    (grid row i, column j); channels ``[0, D/2)`` hold the 1-D embedding of the column j, channels ``[D/2, D)``
    that of the row i, each as ``[sin (D/4 dims), cos (D/4 dims)]``.

    Returns:
        (G*G, D), or (1 + G*G, D) with a leading zero row for the class token when ``cls_token``. Add a batch dim
        (``.unsqueeze(0)``) to copy into a ``(1, L, D)`` ``pos_embed`` parameter.
    """
    if not (isinstance(embed_dim, int) and embed_dim >= 4 and embed_dim % 4 == 0):
        raise ValueError(f"embed_dim: expected a multiple of 4 (two axes x [sin, cos]), got {embed_dim!r}")
    if not (isinstance(grid_size, int) and grid_size >= 1):
        raise ValueError(f"grid_size: expected an int >= 1, got {grid_size!r}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each; [i, j] -> (i, j)
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, col), get_1d_sincos_pos_embed(embed_dim // 2, row)], 1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], 0)
    return emb.to(dtype)


# -------------------------------------------------------------------------------------------- small modules
class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop (timm 0.3.2 names). Shapes: ``(..., in) -> (..., out)``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` with ``gamma = init_values * ones(dim)`` (CaiT; BEiT / CAE use 0.1).

    Shapes: ``(..., dim) -> (..., dim)``.
    """

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"dim={self.gamma.numel()}"


def drop_path(
    x: torch.Tensor,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stochastic depth per sample: each sample (dim 0) is zeroed with probability ``drop_prob``, and survivors are
    scaled by ``1 / (1 - drop_prob)`` when ``scale_by_keep``. Identity when not training or ``drop_prob == 0``.

    Shapes: ``(B, ...) -> (B, ...)``.
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob: expected a float in [0, 1], got {drop_prob!r}")
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep, generator=generator)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (active in ``train()`` only)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob: expected a float in [0, 1], got {drop_prob!r}")
        self.drop_prob, self.scale_by_keep = float(drop_prob), scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


# ------------------------------------------------------------------------------------------ attention / block
DEFAULT_NORM = partial(nn.LayerNorm, eps=1e-6)  # MAE's norm_layer


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm 0.3.2 names ``qkv``, ``proj``).

    Args:
        dim: model width D (divisible by ``num_heads``).
        num_heads: H; head dim d = D / H.
        qkv_bias: bias on the qkv projection: True (one ``qkv.bias`` of 3D, timm / MAE), False (none), or ``"qv"``
            (BEiT / CAE: learned ``q_bias`` and ``v_bias`` of D each, no key bias; ``qkv`` itself has no bias).
        qk_scale: logit scale override (timm 0.3.2); None = d ** -0.5.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        backend: attention backend name for this module (see :mod:`mimfast.layers.attention`); None = the default.

    Shapes: ``forward(x (B, L, D), attn_bias (B|1, H|1, L, L) | None) -> (B, L, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool | str = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str | None = None,
    ):
        super().__init__()
        if qkv_bias not in (True, False, "qv"):
            raise ValueError(f"qkv_bias: expected True, False or 'qv', got {qkv_bias!r}")
        if not (isinstance(num_heads, int) and num_heads >= 1):
            raise ValueError(f"num_heads: expected an int >= 1, got {num_heads!r}")
        if not (isinstance(dim, int) and dim >= 1 and dim % num_heads == 0):
            raise ValueError(f"dim: expected a positive multiple of num_heads={num_heads}, got {dim!r}")
        if not 0.0 <= attn_drop <= 1.0:
            raise ValueError(f"attn_drop: expected a float in [0, 1], got {attn_drop!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias is True)
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected (B, L, {self.dim}), got shape {tuple(x.shape)}")
        b, n, c = x.shape
        # (B, L, 3, H, d) -> 3 x (B, H, L, d) strided views; flash/xformers transpose them back without a copy
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:  # BEiT's (q_bias, 0, v_bias): the key bias cancels in the softmax
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.attn_drop.p if self.training else 0.0
        out = attention(q, k, v, backend=self.backend, dropout_p=p, scale=self.scale, attn_bias=attn_bias)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, backend={self.backend!r}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(ls1(attn(norm1(x))))``, then ``x + drop_path(ls2(mlp(norm2(x))))``.

    Defaults are MAE's (qkv bias, LayerNorm eps 1e-6, MLP 4x with exact GELU). With ``init_values=None`` the
    parameters are exactly the official MAE / timm 0.3.2 ones (``ls1`` / ``ls2`` are parameter-free identities);
    with ``init_values`` set, ``ls1.gamma`` / ``ls2.gamma`` are added as in timm's later ``Block``.

    Shapes: ``forward(x (B, L, D), attn_bias broadcastable to (B, H, L, L) | None) -> (B, L, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool | str = True,
        *,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = DEFAULT_NORM,
        attn_backend: str | None = None,
    ):
        super().__init__()
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio: expected > 0, got {mlp_ratio!r}")
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop,
            backend=attn_backend,
        )  # fmt: skip
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_bias)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class RelativePositionBias(nn.Module):
    """BEiT's learned relative position bias over a ``[cls ; G_h x G_w patches]`` sequence, one table per head.

    Table: ``((2 G_h - 1) (2 G_w - 1) + 3, H)`` (zero init as BEiT), one entry per patch-to-patch offset plus three
    for cls-to-patch, patch-to-cls and cls-to-cls. ``relative_position_index`` ((L+1, L+1) int64 buffer, BEiT's
    layout) picks the entry of each pair. BEiT shares one module across all blocks (``use_shared_rel_pos_bias``).

    Shapes: ``forward() -> (H, L + 1, L + 1)`` (add a batch dim to use it as an ``attn_bias``).
    """

    def __init__(self, window_size, num_heads: int):
        super().__init__()
        gh, gw = _pair(window_size)
        if not (isinstance(num_heads, int) and num_heads >= 1):
            raise ValueError(f"num_heads: expected an int >= 1, got {num_heads!r}")
        self.window_size, self.num_heads = (gh, gw), num_heads
        self.num_relative_distance = (2 * gh - 1) * (2 * gw - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        self.register_buffer("relative_position_index", self.build_index(gh, gw), persistent=True)

    @staticmethod
    def build_index(gh: int, gw: int) -> torch.Tensor:
        """BEiT's index: ``(dy + G_h - 1) (2 G_w - 1) + (dx + G_w - 1)`` for patch pairs; the last three table rows
        are cls-to-patch (row 0), patch-to-cls (column 0) and cls-to-cls."""
        n = (2 * gh - 1) * (2 * gw - 1) + 3
        row, col = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        coords = torch.stack((row.flatten(), col.flatten()))  # (2, L)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (L, L, 2)
        idx = (rel[..., 0] + gh - 1) * (2 * gw - 1) + (rel[..., 1] + gw - 1)
        out = torch.zeros(gh * gw + 1, gh * gw + 1, dtype=torch.long)
        out[1:, 1:] = idx
        out[0, :] = n - 3
        out[:, 0] = n - 2
        out[0, 0] = n - 1
        return out

    def forward(self) -> torch.Tensor:
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, self.num_heads).permute(2, 0, 1).contiguous()

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, num_heads={self.num_heads}"


# ---------------------------------------------------------------------------------------------------- init
def init_vit_weights(module: nn.Module) -> None:
    """MAE's ``_init_weights``, for ``model.apply(init_vit_weights)``: Linear weights xavier-uniform (the fused qkv
    weight as one (3D, D) matrix, as MAE does) with zero bias; LayerNorm weight 1, bias 0. Other modules untouched.
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_patch_embed_weights(patch_embed: PatchEmbed) -> None:
    """MAE's patch-embedding init: xavier-uniform on the conv weight viewed as a (D, C*p*p) matrix (bias kept)."""
    w = patch_embed.proj.weight
    with torch.no_grad():
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
