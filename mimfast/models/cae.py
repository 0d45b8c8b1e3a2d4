"""Context autoencoder (CAE, Chen et al. 2024) with the encoder on visible patches only.

Semantics follow the official PyTorch release (github Atten4Vis/CAE: ``models/modeling_cae.py``,
``models/modeling_cae_helper.py``, ``furnace/engine_for_pretraining.py``), ``model_type="cae"``:

* encoder: ``[cls ; visible patches]`` + fixed 2-D sin-cos positions (zero for cls), ViT blocks with q/v biases (no
  key bias) and layer scale, final LayerNorm. CAE's sin-cos layout puts the grid *row* in the first half of the
  channels and the column in the second (MAE's helper does the opposite); :func:`cae_sincos_pos_embed` follows CAE.
* regressor: ``regressor_depth`` cross-attention blocks. Queries start as the learned mask token; in every block
  ``x = q + ls1(attn(LN_q(q + pos_m), k=LN_k([z_v ; q] + [pos_v ; pos_m]), v=LN_v([z_v ; q])))``, then
  ``x = LN2(x)`` (the residual stream itself is normalised), then ``x + ls2(mlp(x))``; z_v are the encoder's visible
  latents without cls. q and v projections carry biases, k none. A final LayerNorm gives the predicted latents.
* decoder: ``decoder_depth`` self-attention blocks on predicted latents + masked positions, LayerNorm, Linear ->
  vocab. Loss ``CE(logits, ids of the masked patches) + align_weight * MSE(predicted latents, target latents)``.
* alignment target: the encoder (same weights, final norm included) run on ``[cls ; masked patches]`` under no_grad,
  cls dropped. The official model keeps a copy (``alignment_encoder``) whose parameters are re-pointed to the
  encoder's storage after every forward (``param.data = encoder_param.data``), so it always equals the encoder: here
  the encoder itself runs twice. As in the official code the target pass runs in the module's mode, so in training
  stochastic depth applies to it too.

Masks are exact-count (SPEC: 98 of 196): every sample hides the same number M of patches; token order inside each
group is row-major, as the official boolean indexing gives. Two paths over the same parameters (``fused``):

* fused (default): one stable sort of the mask gives int32 visible / masked index lists; ``mimfast::gather_tokens``
  does gather + positions + cls prefix for the encoder and for the alignment pass (which reuses the patch
  embedding), attention runs on the default backend (FlashAttention / SDPA), the token head is
  :func:`mimfast.ops.cross_entropy.linear_cross_entropy` on the M masked rows (no M x V logits kept), and nothing
  syncs with the host unless ``validate`` asks for checks (CPU tensors are checked by default; elsewhere the mask
  count and target range are asserted on the device).
* eager twin (``fused=False``): the official code path op for op (boolean-mask indexing, patch embedding run twice,
  explicit softmax attention, Linear head + ``F.cross_entropy`` on fp32 logits). It is the oracle of the fused path.

Not supported: ``decoder_embed_dim != embed_dim`` (the official ``encoder_to_regresser`` projection; every released
configuration keeps the widths equal) and CAE v2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.attention import attention, attention_backend
from ..layers.vit import Block, DropPath, LayerScale, Mlp, PatchEmbed, get_2d_sincos_pos_embed
from ..ops.cross_entropy import linear_cross_entropy
from ..ops.masking import cae_block_masking
from ..ops.tokens import gather_tokens
from .registry import register_model

__all__ = ["CAE", "CAEConfig", "CrossAttention", "RegressorBlock", "cae_sincos_pos_embed"]


@dataclass
class CAEConfig:
    """Architecture, loss weight and masking of a CAE (defaults: CAE-base, ViT-B/16, the 800-epoch recipe)."""

    img_size: int = 224
    """Input resolution (square), a multiple of ``patch_size``."""
    patch_size: int = 16
    """Patch side p."""
    in_chans: int = 3
    """Image channels."""
    embed_dim: int = 768
    """Width D of the encoder, regressor and decoder (CAE's ``decoder_embed_dim`` equals it in every release)."""
    depth: int = 12
    """Encoder blocks."""
    num_heads: int = 12
    """Encoder attention heads (divides embed_dim)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / block width, in all three stacks."""
    regressor_depth: int = 4
    """Cross-attention blocks of the latent regressor."""
    decoder_depth: int = 4
    """Self-attention blocks of the token decoder."""
    decoder_num_heads: int | None = None
    """Heads of the regressor and decoder blocks; None = num_heads (official: 12 for base, 16 for large)."""
    vocab_size: int = 8192
    """Tokenizer vocabulary V (the decoder head's outputs; DALL-E's 8192)."""
    init_values: float = 0.1
    """Encoder layer-scale init (official ``--layer_scale_init_value``: 0.1 base, 1e-5 large; 0 = no layer scale)."""
    decoder_init_values: float | None = None
    """Regressor / decoder layer-scale init; None = init_values (official ``--decoder_layer_scale_init_value``). 0
    gives the decoder no layer scale and the regressor fixed ones, as the official blocks do."""
    drop_path_rate: float = 0.1
    """Stochastic depth, linear from 0 to this over each stack's blocks (the pretraining recipe uses 0.1)."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon of every norm."""
    init_std: float = 0.02
    """Std of the truncated-normal inits (cls / mask tokens, patch embedding; all Linears with fix_init_weight)."""
    fix_init_weight: bool = False
    """BEiT-style init: truncated-normal Linears with proj / fc2 rescaled by 1/sqrt(2 * layer). Off (xavier Linears)
    for CAE-base, on for CAE-large, as in the official scripts."""
    align_weight: float = 2.0
    """Weight of the alignment MSE (official ``--align_loss_weight``)."""
    mask_generator: str = "block"
    """Masks the training task draws: "block" (exact-count block-wise) or "random" (uniform, same count)."""
    num_mask_patches: int = 98
    """Masked patches per sample M (exact for both generators); forward expects this count unless told otherwise."""
    min_mask_patches: int = 16
    """Smallest block of the block-wise generator (official ``--min_mask_patches_per_block``)."""
    max_mask_patches: int | None = None
    """Largest block; None = num_mask_patches (official ``--max_mask_patches_per_block``)."""
    min_aspect: float = 0.3
    """Smallest block aspect ratio, in (0, 1]; the largest is its inverse."""

    def __post_init__(self):
        def check(name: str, ok: bool, want: str) -> None:
            if not ok:
                raise ValueError(f"CAEConfig.{name}: expected {want}, got {getattr(self, name)!r}")

        def num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "regressor_depth",
                     "decoder_depth", "vocab_size", "num_mask_patches", "min_mask_patches"):  # fmt: skip
            v = getattr(self, name)
            check(name, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1")
        check("img_size", self.img_size % self.patch_size == 0, f"a multiple of patch_size={self.patch_size}")
        for name in ("num_heads", "decoder_num_heads"):
            h = getattr(self, name)
            ok = isinstance(h, int) and h >= 1 and self.embed_dim % h == 0
            check(
                name,
                ok or (h is None and name == "decoder_num_heads"),
                f"an int >= 1 dividing embed_dim={self.embed_dim}",
            )
        check("embed_dim", self.embed_dim % 4 == 0, "a multiple of 4 (2-D sin-cos)")
        for name in ("mlp_ratio", "init_std", "layer_norm_eps"):
            check(name, num(getattr(self, name)) and getattr(self, name) > 0, "a number > 0")
        for name in ("init_values", "decoder_init_values", "align_weight"):
            v, opt = getattr(self, name), name == "decoder_init_values"
            check(name, (v is None and opt) or (num(v) and 0 <= v < math.inf), "a number >= 0")
        check("drop_path_rate", num(self.drop_path_rate) and 0.0 <= self.drop_path_rate < 1.0, "a float in [0, 1)")
        check("mask_generator", self.mask_generator in ("block", "random"), "'block' or 'random'")
        n = self.num_patches
        check("num_mask_patches", self.num_mask_patches < n, f"1 .. {n - 1} (at least one of {n} patches visible)")
        check("min_mask_patches", self.min_mask_patches <= self.num_mask_patches, "<= num_mask_patches")
        mx = self.max_mask_patches
        check("max_mask_patches", mx is None or (isinstance(mx, int) and self.min_mask_patches <= mx),
              "None or an int >= min_mask_patches")  # fmt: skip
        check("min_aspect", num(self.min_aspect) and 0.0 < self.min_aspect <= 1.0, "a float in (0, 1]")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_heads(self) -> int:
        """Heads of the regressor and decoder blocks."""
        return self.num_heads if self.decoder_num_heads is None else self.decoder_num_heads


def cae_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """CAE's fixed position table (1 + G*G, D), float32, zero cls row. Channels: ``[sin(i w), cos(i w), sin(j w),
    cos(j w)]`` for grid row i, column j, ``w_k = 10000^(-k / (D/4))`` (``build_2d_sincos_position_embedding``;
    computed in float64 here, float32 there)."""
    emb = get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True, dtype=torch.float64)
    half = embed_dim // 2  # MAE's layout is [column ; row]: swap the halves
    return torch.cat([emb[:, half:], emb[:, :half]], dim=1).float()


# ------------------------------------------------------------------------------------------- regressor block
class CrossAttention(nn.Module):
    """CAE's cross-attention: separate q / k / v projections without Linear biases, learned ``q_bias`` and
    ``v_bias`` (no key bias), output ``proj``.

    Shapes: ``forward(x (B, Lq, D), k (B, Lk, D), v (B, Lk, D)) -> (B, Lq, D)``; attention runs through
    :func:`mimfast.layers.attention.attention` on the default backend.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):  # fmt: skip
        super().__init__()
        if not (isinstance(num_heads, int) and num_heads >= 1 and dim % num_heads == 0):
            raise ValueError(f"num_heads: expected an int >= 1 dividing dim={dim}, got {num_heads!r}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self._heads(F.linear(x, self.q.weight, self.q_bias))
        k = self._heads(F.linear(k, self.k.weight))
        v = self._heads(F.linear(v, self.v.weight, self.v_bias))
        p = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, dropout_p=p, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class RegressorBlock(nn.Module):
    """CAE's regressor block (official ``RegressorBlock``; layer scale as ``ls1`` / ``ls2``).

    ``x = x_q + ls1(cross_attn(norm1_q(x_q + pos_q), norm1_k(x_kv + pos_kv), norm1_v(x_kv)))``;
    ``x = norm2_cross(x)``; ``out = x + ls2(mlp_cross(x))`` (drop path on both branches).

    Shapes: ``forward(x_q (B, M, D), x_kv (B, N, D), pos_q (B, M, D), pos_kv (B, N, D)) -> (B, M, D)``.
    With ``init_values == 0`` the scales are fixed ones (no gradient), as the official block's.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, drop_path: float = 0.0,
                 init_values: float = 0.1, eps: float = 1e-6):  # fmt: skip
        super().__init__()
        self.norm1_q, self.norm1_k, self.norm1_v = (nn.LayerNorm(dim, eps=eps) for _ in range(3))
        self.cross_attn = CrossAttention(dim, num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim, init_values if init_values > 0 else 1.0)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2_cross = nn.LayerNorm(dim, eps=eps)
        self.mlp_cross = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values if init_values > 0 else 1.0)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if not init_values > 0:
            self.ls1.gamma.requires_grad_(False)
            self.ls2.gamma.requires_grad_(False)

    def forward(self, x_q, x_kv, pos_q, pos_kv) -> torch.Tensor:
        attn = self.cross_attn(self.norm1_q(x_q + pos_q), self.norm1_k(x_kv + pos_kv), self.norm1_v(x_kv))
        x = self.norm2_cross(x_q + self.drop_path1(self.ls1(attn)))
        return x + self.drop_path2(self.ls2(self.mlp_cross(x)))


# ---------------------------------------------------------------------------------------------------- model
class CAE(nn.Module):
    """CAE pretraining model: encoder on visible patches, latent regressor, token decoder, latent alignment.

    ``forward(images (B, C, H, W), bool_masked_pos (B, L) bool, target (B, L) int64) -> (loss (), metrics)`` with
    metrics ``{"loss_ce", "loss_align"}`` (detached; ``loss_align`` is the weighted term, ``loss = loss_ce +
    loss_align``). ``forward_features(images) -> (B, 1 + L, D)`` is the encoder on all patches (linear probe).

    Args:
        config: a :class:`CAEConfig` (or its fields as keyword arguments).
        fused: fused kernels and the default attention backend (True) or the official code path (False).
    """

    task = "cae"
    """The training task (``mimfast.train.tasks``) that knows how to train and evaluate this model."""

    def __init__(self, config: CAEConfig | None = None, *, fused: bool = True, **kwargs):
        super().__init__()
        if config is None:
            config = CAEConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        self.fused = fused
        d, eps = c.embed_dim, c.layer_norm_eps
        ln = lambda dim: nn.LayerNorm(dim, eps=eps)  # noqa: E731
        dec_init = c.init_values if c.decoder_init_values is None else c.decoder_init_values

        def dpr(n):
            return [c.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # torch.linspace(0, rate, n)

        def vit_block(heads, r, init):  # official helper Block: q / v biases, layer scale unless init == 0
            return Block(d, heads, c.mlp_ratio, qkv_bias="qv", drop_path=r, init_values=init or None, norm_layer=ln)

        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, d), requires_grad=False)
        self.blocks = nn.ModuleList(vit_block(c.num_heads, r, c.init_values) for r in dpr(c.depth))
        self.norm = ln(d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.regressor_blocks = nn.ModuleList(
            RegressorBlock(d, c.head_heads, c.mlp_ratio, drop_path=r, init_values=dec_init, eps=eps)
            for r in dpr(c.regressor_depth)
        )
        self.regressor_norm = ln(d)
        self.decoder_blocks = nn.ModuleList(vit_block(c.head_heads, r, dec_init) for r in dpr(c.decoder_depth))
        self.decoder_norm = ln(d)
        self.lm_head = nn.Linear(d, c.vocab_size)
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------------ weights
    def initialize_weights(self) -> None:
        """The official init: truncated normal (std init_std, cut at +-std as CAE's wrapper does) for tokens and the
        patch embedding; xavier Linears, or with ``fix_init_weight`` truncated-normal Linears with each stack's
        ``proj`` / ``fc2`` divided by sqrt(2 * layer); LayerNorm 1 / 0; q / v biases 0; layer scales init_values."""
        c = self.config
        if self.pos_embed.device.type == "meta":
            return
        std = c.init_std
        tn = lambda t: nn.init.trunc_normal_(t, std=std, a=-std, b=std)  # noqa: E731
        with torch.no_grad():
            self.pos_embed.copy_(cae_sincos_pos_embed(c.embed_dim, c.grid_size).unsqueeze(0))
            tn(self.cls_token)
            tn(self.mask_token)
            tn(self.patch_embed.proj.weight)
            nn.init.zeros_(self.patch_embed.proj.bias)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    (tn if c.fix_init_weight else nn.init.xavier_uniform_)(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            if c.fix_init_weight:
                stacks = ((self.blocks, "attn", "mlp"), (self.regressor_blocks, "cross_attn", "mlp_cross"),
                          (self.decoder_blocks, "attn", "mlp"))  # fmt: skip
                for stack, attn, mlp in stacks:
                    for i, blk in enumerate(stack):
                        getattr(blk, attn).proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                        getattr(blk, mlp).fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    # official name -> ours, per prefix; the rest of each key is unchanged
    _OFFICIAL = (("encoder.blocks.", "blocks."), ("encoder.", ""), ("regresser.regressor_blocks.", "regressor_blocks."),
                 ("regresser.norm.", "regressor_norm."), ("decoder.decoder_blocks.", "decoder_blocks."),
                 ("decoder.norm.", "decoder_norm."), ("decoder.head.", "lm_head."))  # fmt: skip
    _GAMMA = ((".gamma_1_cross", ".ls1.gamma"), (".gamma_2_cross", ".ls2.gamma"), (".gamma_1", ".ls1.gamma"),
              (".gamma_2", ".ls2.gamma"))  # fmt: skip
    _ENCODER = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")

    @classmethod
    def official_to_ours(cls, key: str) -> str | None:
        """Our name of an official CAE state-dict key; None for keys that are dropped (``alignment_encoder.*``,
        ``teacher.*``, ``rd_pos_embed``: copies of the encoder / its position table)."""
        if key.startswith(("alignment_encoder.", "teacher.")) or key == "rd_pos_embed":
            return None
        for src, dst in cls._OFFICIAL:
            if key.startswith(src):
                key = dst + key[len(src) :]
                break
        for src, dst in cls._GAMMA:
            if key.endswith(src):
                return key[: -len(src)] + dst
        return key

    @classmethod
    def ours_to_official(cls, key: str) -> str:
        """The official CAE name of one of our state-dict keys (inverse of :meth:`official_to_ours`)."""
        for n in (1, 2):
            if key.endswith(f".ls{n}.gamma"):
                cross = "_cross" if key.startswith("regressor_blocks.") else ""
                key = key[: -len(".ls1.gamma")] + f".gamma_{n}{cross}"
        for src, dst in cls._OFFICIAL:
            if dst and key.startswith(dst):
                return src + key[len(dst) :]
        return "encoder." + key if key.startswith(cls._ENCODER) else key

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the official CAE key names (the inverse of :meth:`load_official_state_dict`),
        with ``alignment_encoder.*`` and ``rd_pos_embed`` written as copies of the encoder's, as the official model
        saves them."""
        out = {}
        for key, v in self.state_dict().items():
            name = self.ours_to_official(key)
            out[name] = v
            if name.startswith("encoder."):
                out["alignment_encoder." + name[len("encoder.") :]] = v.clone()
        out["rd_pos_embed"] = self.pos_embed.detach().clone()
        return out

    def load_official_state_dict(self, state_dict: dict, *, strict: bool = True) -> list[str]:
        """Load an official CAE checkpoint (its ``torch.load`` result, or that dict's ``["model"]``).

        Unwraps ``{"model": ...}`` and a DDP ``module.`` prefix, maps the official names (``encoder.*``,
        ``regresser.regressor_blocks.N.*``, ``regresser.norm``, ``mask_token``, ``decoder.decoder_blocks.N.*``,
        ``decoder.norm``, ``decoder.head``; ``gamma_1`` / ``gamma_2`` / ``gamma_*_cross`` -> ``ls1`` / ``ls2``) to
        ours and drops ``alignment_encoder.*`` (a copy of the encoder, see the module docstring), ``teacher.*`` and
        ``rd_pos_embed`` (the encoder's table again, since the widths are equal). An encoder-only checkpoint
        (``encoder.*`` keys, or bare ViT keys ``blocks.N.*`` as fine-tuning code holds them) loads the encoder: the
        rest keeps its initialisation, a warning says so, and the missing keys are returned; a fine-tuned
        classifier's ``head.*`` / ``fc_norm.*`` are dropped with a warning. Other missing keys raise unless
        ``strict=False`` (then they are returned); unexpected keys and shape mismatches always raise.
        """
        sd = state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict: expected a dict of tensors (or {{'model': ...}}), got {type(sd).__name__}")
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        bare = not any(k.startswith("encoder.") for k in sd) and any(k.startswith("blocks.") for k in sd)
        if bare:  # a fine-tuning-style encoder: no "encoder." prefix
            dropped = sorted(k for k in sd if k.startswith(("head.", "fc_norm.")))
            if dropped:
                warnings.warn(f"CAE checkpoint: ignoring classifier keys {dropped}", stacklevel=2)
            sd = {"encoder." + k: v for k, v in sd.items() if k not in dropped}
        own = self.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            ours = self.official_to_ours(k)
            if ours is None:
                if k == "rd_pos_embed" and tuple(v.shape) != tuple(self.pos_embed.shape):
                    raise ValueError(f"state_dict[{k!r}]: expected shape {tuple(self.pos_embed.shape)}, got "
                                     f"{tuple(v.shape)} (a different width or image size?)")  # fmt: skip
                continue
            mapped[ours] = v
        unexpected = sorted(k for k in sd if (o := self.official_to_ours(k)) is not None and o not in own)
        missing = sorted(set(own) - set(mapped) - {"pos_embed"})  # the fixed sin-cos table may be absent
        encoder_only = set(missing) == {k for k in own if not k.startswith(self._ENCODER)}  # all but the encoder
        if unexpected or (missing and strict and not encoder_only):
            raise KeyError(f"state_dict: unexpected keys {unexpected[:8]}, missing keys {missing[:8]} "
                           "(official CAE names expected)")  # fmt: skip
        for k, v in mapped.items():
            if tuple(v.shape) != tuple(own[k].shape):
                src = next(o for o in sd if self.official_to_ours(o) == k)
                raise ValueError(f"state_dict[{src!r}]: expected shape {tuple(own[k].shape)}, got {tuple(v.shape)} "
                                 "(a different image size or architecture?)")  # fmt: skip
        self.load_state_dict(mapped, strict=False)
        if missing:
            warnings.warn(f"CAE checkpoint lacks {len(missing)} keys (e.g. {missing[0]}); those keep their "
                          "initialisation", stacklevel=2)  # fmt: skip
        return missing

    # -------------------------------------------------------------------------------------------------- masks
    def sample_masks(self, batch_size: int, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) bool masks with exactly ``num_mask_patches`` True per row, from the configured generator."""
        c = self.config
        if c.mask_generator == "block":
            return cae_block_masking(batch_size, c.grid_size, c.grid_size, c.num_mask_patches,
                                     min_num_patches=c.min_mask_patches, max_num_patches=c.max_mask_patches,
                                     min_aspect=c.min_aspect, device=device, generator=generator)  # fmt: skip
        noise = torch.rand(batch_size, c.num_patches, generator=generator, device=device)
        return noise.argsort(dim=1).argsort(dim=1) < c.num_mask_patches

    # ------------------------------------------------------------------------------------------------- checks
    def _check_images(self, images) -> None:
        c = self.config
        want = (c.in_chans, c.img_size, c.img_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != want:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected shape (B, {', '.join(map(str, want))}), got {got}")
        if not images.is_floating_point():
            raise TypeError(f"images: expected a floating-point tensor (normalised pixels), got {images.dtype}")

    def _check_inputs(self, images, bool_masked_pos, target, num_masked, validate) -> int:
        self._check_images(images)
        c = self.config
        bsz, seq = images.shape[0], c.num_patches
        for name, t, dt in (("bool_masked_pos", bool_masked_pos, torch.bool), ("target", target, torch.int64)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (bsz, seq):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape ({bsz}, {seq}) (batch, patches), got {got}")
            if t.dtype != dt:
                raise TypeError(f"{name}: expected dtype {dt}, got {t.dtype}")
            if t.device != images.device:
                raise ValueError(f"{name}: device {t.device} differs from images' {images.device}")
        m = c.num_mask_patches if num_masked is None else num_masked
        if not (isinstance(m, int) and 1 <= m < seq):
            raise ValueError(f"num_masked: expected an int in [1, {seq}), got {m!r}")
        if bsz == 0:
            raise ValueError("images: empty batch")
        if (images.device.type == "cpu") if validate is None else validate:
            counts = bool_masked_pos.sum(dim=1)
            lo, hi = int(counts.min()), int(counts.max())
            if lo != hi:
                raise ValueError(f"bool_masked_pos: CAE needs the same number of masked patches in every sample, "
                                 f"got counts from {lo} to {hi} (use an exact-count generator)")  # fmt: skip
            if lo != m:
                raise ValueError(f"bool_masked_pos: expected {m} masked patches per sample (num_masked, default "
                                 f"config.num_mask_patches), got {lo}")  # fmt: skip
            tlo, thi = int(target.min()), int(target.max())
            if tlo < 0 or thi >= c.vocab_size:
                raise ValueError(f"target: expected token ids in [0, {c.vocab_size}), got range [{tlo}, {thi}]")
        else:  # no host sync: a bad batch fails on the device instead of training on garbage
            torch._assert_async((bool_masked_pos.sum(dim=1) == m).all(), f"bool_masked_pos: expected {m} masked "
                                "patches in every sample (CAE's exact count)")  # fmt: skip
            torch._assert_async(((target >= 0) & (target < c.vocab_size)).all(),
                                f"target: expected token ids in [0, {c.vocab_size})")  # fmt: skip
        return m

    # ------------------------------------------------------------------------------------------------- encoder
    def _attn_ctx(self):
        return contextlib.nullcontext() if self.fused else attention_backend("eager")

    def _run_encoder(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> (B, 1 + L, D): the encoder on [cls ; all patches], final-normed."""
        self._check_images(images)
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        with self._attn_ctx():
            return self._run_encoder(torch.cat([cls, x], dim=1))

    def _encode_official(self, images: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """The official ``VisionTransformerEncoder.forward_features``: [cls ; patches where ~bool_masked_pos]."""
        x = self.patch_embed(images)
        b, _, d = x.shape
        x_unmasked = torch.cat((self.cls_token.expand(b, -1, -1), x[~bool_masked_pos].reshape(b, -1, d)), dim=1)
        pos = self.pos_embed.expand(b, -1, -1)
        pos_unmasked = torch.cat((pos[:, :1], pos[:, 1:][~bool_masked_pos].reshape(b, -1, d)), dim=1)
        return self._run_encoder(x_unmasked + pos_unmasked)

    # ------------------------------------------------------------------------------------------------ regressor
    def regress(self, latent_visible: torch.Tensor, pos_visible: torch.Tensor, pos_masked: torch.Tensor):
        """latent_visible (B, Lv, D) (encoder output without cls), pos_visible (B, Lv, D), pos_masked (B, M, D) ->
        predicted latents (B, M, D): mask-token queries through the cross-attention blocks, keys / values
        ``[visible latents ; current queries]``, then the regressor norm."""
        b, m, d = pos_masked.shape
        x = self.mask_token.expand(b, m, d)
        pos_kv = torch.cat([pos_visible, pos_masked], dim=1)
        for blk in self.regressor_blocks:
            x = blk(x, torch.cat([latent_visible, x], dim=1), pos_masked, pos_kv)
        return self.regressor_norm(x)

    def _decode(self, latent_pred: torch.Tensor, pos_masked: torch.Tensor) -> torch.Tensor:
        x = latent_pred + pos_masked
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, bool_masked_pos: torch.Tensor, target: torch.Tensor, *,
                num_masked: int | None = None, validate: bool | None = None):  # fmt: skip
        """One CAE pretraining loss.

        Args:
            images: (B, C, H, W) normalised pixels.
            bool_masked_pos: (B, L) bool, True = masked, the same count M in every row (row-major over the grid).
            target: (B, L) int64 tokenizer ids of every patch (only the masked ones are used).
            num_masked: M; None = ``config.num_mask_patches``.
            validate: check counts and target range on the host (a sync): None = for CPU tensors only; otherwise
                they are asserted on the device (an error surfaces asynchronously).

        Returns:
            (loss (), {"loss_ce": (), "loss_align": ()} detached).
        """
        m = self._check_inputs(images, bool_masked_pos, target, num_masked, validate)
        with self._attn_ctx():
            if self.fused:
                loss_ce, mse = self._forward_fused(images, bool_masked_pos, target, m)
            else:
                loss_ce, mse = self._forward_official(images, bool_masked_pos, target)
        loss_align = self.config.align_weight * mse
        loss = loss_ce + loss_align
        return loss, {"loss_ce": loss_ce.detach(), "loss_align": loss_align.detach()}

    def _forward_official(self, images, bool_masked_pos, target):
        b, d = images.shape[0], self.config.embed_dim
        z = self._encode_official(images, bool_masked_pos)
        with torch.no_grad():
            latent_target = self._encode_official(images, ~bool_masked_pos)[:, 1:, :]
        z_vis = z[:, 1:, :]
        pos = self.pos_embed.expand(b, -1, -1)
        pos_masked = pos[:, 1:][bool_masked_pos].reshape(b, -1, d)
        pos_unmasked = pos[:, 1:][~bool_masked_pos].reshape(b, -1, d)
        latent_pred = self.regress(z_vis, pos_unmasked, pos_masked)
        logits = self.lm_head(self._decode(latent_pred, pos_masked))
        logits = logits.view(-1, logits.shape[2])
        loss_ce = F.cross_entropy(logits.float(), target[bool_masked_pos])
        return loss_ce, F.mse_loss(latent_pred.float(), latent_target.detach().float())

    def _forward_fused(self, images, bool_masked_pos, target, m):
        c = self.config
        b, seq, lv = images.shape[0], c.num_patches, c.num_patches - m
        ids = torch.argsort(bool_masked_pos.to(torch.int8), dim=1, stable=True)  # visible first, row-major in each
        inv = torch.empty_like(ids).scatter_(1, ids, torch.arange(seq, device=ids.device).expand(b, seq))
        ids32, inv32 = ids.to(torch.int32), inv.to(torch.int32)
        ids_vis, ids_msk = ids32[:, :lv], ids32[:, lv:]
        pos = self.pos_embed[0, 1:]
        prefix = (self.cls_token + self.pos_embed[:, :1]).reshape(1, -1)
        x = self.patch_embed(images)
        z = gather_tokens(x, ids_vis, pos=pos, prefix=prefix, ids_restore=inv32, validate=False)
        z = self._run_encoder(z)
        with torch.no_grad():  # alignment target: same weights, [cls ; masked patches], cls dropped
            inv_msk = torch.remainder(inv - lv, seq).to(torch.int32)
            t = gather_tokens(x.detach(), ids_msk, pos=pos, prefix=prefix.detach(), ids_restore=inv_msk, validate=False)
            latent_target = self._run_encoder(t)[:, 1:, :]
        pos_vis, pos_msk = F.embedding(ids[:, :lv], pos), F.embedding(ids[:, lv:], pos)
        latent_pred = self.regress(z[:, 1:, :], pos_vis, pos_msk)
        h = self._decode(latent_pred, pos_msk)
        labels = torch.gather(target, 1, ids[:, lv:])
        w, bias = self.lm_head.weight, self.lm_head.bias  # targets were checked above (host or device)
        loss_ce = linear_cross_entropy(h.reshape(b * m, -1), w, labels.reshape(-1), bias, validate=False)
        return loss_ce, F.mse_loss(latent_pred.float(), latent_target.float())

    # ------------------------------------------------------------------------------------------------ metrics
    def flops_per_image(self, num_masked: int | None = None, *, training: bool = True) -> float:
        """Matmul FLOPs for one image (2 per multiply-add; backward = 2x forward when ``training``).

        Counts the patch embedding (once, as the fused path runs it), every Linear and both attention matmuls at
        the token counts the model runs: encoder on 1 + Lv tokens, the no_grad alignment pass on 1 + M tokens
        (forward only, also when training), regressor queries M over keys Lv + M, decoder on M tokens, the head
        on M rows. CAE-base at 98 of 196: about 110 GFLOP per training image.
        """
        c = self.config
        m = c.num_mask_patches if num_masked is None else num_masked
        lv, d, r = c.num_patches - m, c.embed_dim, c.mlp_ratio

        def vit(n, depth):
            return depth * (2 * n * d * d * (4 + 2 * r) + 4 * n * n * d)

        regressor = c.regressor_depth * (2 * m * d * d * (2 + 2 * r) + 2 * 2 * (lv + m) * d * d + 4 * m * (lv + m) * d)
        fwd = 2 * c.num_patches * c.patch_size**2 * c.in_chans * d + vit(1 + lv, c.depth) + regressor
        fwd += vit(m, c.decoder_depth) + 2 * m * d * c.vocab_size
        target = vit(1 + m, c.depth)
        return float(fwd * (3 if training else 1) + target)


# ----------------------------------------------------------------------------------------------------- registry
@register_model
def cae_base_patch16_224(**kwargs) -> CAE:
    """CAE-base: ViT-B/16 encoder (768-d, 12 blocks, 12 heads), 4 regressor and 4 decoder blocks, vocab 8192."""
    return CAE(**{**dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs})


@register_model
def cae_large_patch16_224(**kwargs) -> CAE:
    """CAE-large: ViT-L/16 (1024-d, 24 blocks, 16 heads), 4 + 4 blocks of 16 heads, layer scale 1e-5, BEiT init
    (the official ``cae_large_1600e`` script)."""
    cfg = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, fix_init_weight=True)
    return CAE(**{**cfg, **kwargs})


@register_model
def cae_tiny_patch4_debug(**kwargs) -> CAE:
    """A CPU-sized CAE for tests and CI: 32 px images, 4 px patches (8 x 8 = 64 tokens), 96-d x 4 blocks, 3 heads,
    2 regressor and 2 decoder blocks, vocab 128 (the debug tokenizer), 32 of 64 patches masked."""
    cfg = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, regressor_depth=2, decoder_depth=2,
               vocab_size=128, num_mask_patches=32, min_mask_patches=4)  # fmt: skip
    return CAE(**{**cfg, **kwargs})
