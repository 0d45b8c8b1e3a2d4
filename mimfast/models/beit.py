"""BEiT masked image modeling (Bao et al. 2022): predict a tokenizer's visual-token ids of block-masked patches.

Semantics follow the official pretraining model (microsoft/unilm ``beit/modeling_pretrain.py``,
``VisionTransformerForMaskedImageModeling`` with ``use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
init_values=0.1``, as its pretraining recipe runs it): every patch enters the encoder; the embeddings of masked
patches are replaced by a learned mask embedding (``x * (1 - w) + m * w``); a class token is prepended; there is no
absolute position embedding, only ONE relative position bias shared by all blocks; blocks have q/v biases (no key
bias) and LayerScale; after the final norm, ``lm_head`` maps the masked positions to vocabulary logits and the loss is
the plain cross-entropy against the tokenizer ids of those positions, averaged over the masked positions.

Two paths over the same parameters, selected by ``fused`` (default True):

* fused: ``where`` in place of the four-op mask blend, attention through :mod:`mimfast.layers.attention`'s default
  backend (SDPA with the relative position bias as ``attn_bias``), and the head on a STATIC number of rows without a
  host sync: per sample the first ``num_mask_patches`` positions of a stable sort that puts masked positions first
  (BEiT's masks may under-fill; rows that are not masked get ``ignore_index``), one ``mimfast::gather_tokens`` launch
  (int32 indices), the final norm on those rows only, then :func:`mimfast.ops.cross_entropy.linear_cross_entropy`
  (no (M, V) logits tensor once that op is fused).
* eager twin (``fused=False``): the official code path, op for op (explicit softmax attention, ``x[bool_masked_pos]``
  boolean indexing, ``lm_head``, ``F.cross_entropy``). It is the oracle for the fused path.

Parameter names are the official ones except the LayerScale vectors (``blocks.N.gamma_1`` / ``gamma_2`` are
``blocks.N.ls1.gamma`` / ``ls2.gamma`` here, timm's names); :meth:`BEiT.load_official_state_dict` and
:meth:`BEiT.official_state_dict` map between the two.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.attention import attention_backend
from ..layers.vit import Block, PatchEmbed, RelativePositionBias
from ..ops.cross_entropy import linear_cross_entropy
from ..ops.tokens import gather_tokens
from .registry import register_model

__all__ = ["BEiT", "BEiTConfig"]

IGNORE_INDEX = -100
"""Target value of the padding rows of the fused head (rows past a sample's masked count); never a token id."""


@dataclass
class BEiTConfig:
    """Architecture of a BEiT pretraining model (defaults: ViT-B/16, 8192-token vocabulary, BEiT's masking)."""

    img_size: int = 224
    """Input resolution (square), a multiple of ``patch_size``."""
    patch_size: int = 16
    """Patch side p; the grid is (img_size / p)^2 = L tokens."""
    in_chans: int = 3
    """Image channels."""
    embed_dim: int = 768
    """Encoder width D."""
    depth: int = 12
    """Encoder blocks."""
    num_heads: int = 12
    """Attention heads (divides embed_dim); also the columns of the relative position bias table."""
    mlp_ratio: float = 4.0
    """MLP hidden width / D."""
    vocab_size: int = 8192
    """Visual-token vocabulary V of the tokenizer (DALL-E's dVAE: 8192); lm_head is Linear(D, V)."""
    init_values: float | None = 0.1
    """LayerScale init (BEiT pretraining: 0.1); None or 0 builds blocks without LayerScale (official: no gamma)."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the last block; block i uses ``linspace(0, drop_path_rate, depth)[i]`` (BEiT's rule)."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon of every norm."""
    init_std: float = 0.02
    """Std of BEiT's truncated-normal init (truncated at +-init_std, as the official pretraining code does)."""
    num_mask_patches: int = 75
    """Block masking target (BEiT: 75 of 196) and the per-image upper bound of masked positions: the fused head runs
    on exactly this many rows per image, and a mask with more masked positions is an error."""
    min_mask_patches: int = 16
    """Smallest block of the block masking (BEiT: 16)."""
    max_mask_patches: int | None = None
    """Largest block of the block masking (None: num_mask_patches, BEiT's default)."""
    min_aspect: float = 0.3
    """Smallest block aspect ratio; the largest is 1 / min_aspect (log-uniform in between)."""

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "vocab_size",
                     "num_mask_patches", "min_mask_patches"):  # fmt: skip
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"BEiTConfig.{name}: expected an int >= 1, got {v!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"BEiTConfig.img_size: expected a multiple of patch_size={self.patch_size}, got {self.img_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"BEiTConfig.embed_dim: expected a multiple of num_heads={self.num_heads}, got {self.embed_dim}"
            )
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0):
            raise ValueError(f"BEiTConfig.mlp_ratio: expected > 0, got {self.mlp_ratio!r}")
        if self.init_values is not None and not (
            isinstance(self.init_values, (int, float)) and math.isfinite(self.init_values) and self.init_values >= 0
        ):
            raise ValueError(f"BEiTConfig.init_values: expected None or a finite float >= 0, got {self.init_values!r}")
        if not (isinstance(self.drop_path_rate, (int, float)) and 0.0 <= self.drop_path_rate < 1.0):
            raise ValueError(f"BEiTConfig.drop_path_rate: expected a float in [0, 1), got {self.drop_path_rate!r}")
        for name in ("layer_norm_eps", "init_std"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"BEiTConfig.{name}: expected a finite float > 0, got {v!r}")
        if self.num_mask_patches > self.num_patches:
            raise ValueError(
                f"BEiTConfig.num_mask_patches: expected <= num_patches={self.num_patches}, got {self.num_mask_patches}"
            )
        if self.min_mask_patches > self.num_mask_patches:
            raise ValueError(
                f"BEiTConfig.min_mask_patches: expected <= num_mask_patches={self.num_mask_patches}, "
                f"got {self.min_mask_patches}"
            )
        if self.max_mask_patches is not None and not (
            isinstance(self.max_mask_patches, int) and self.min_mask_patches <= self.max_mask_patches
        ):
            raise ValueError(
                f"BEiTConfig.max_mask_patches: expected None or an int >= min_mask_patches={self.min_mask_patches}, "
                f"got {self.max_mask_patches!r}"
            )
        if not (isinstance(self.min_aspect, (int, float)) and 0 < self.min_aspect <= 1):
            raise ValueError(f"BEiTConfig.min_aspect: expected a float in (0, 1], got {self.min_aspect!r}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def layer_scale(self) -> bool:
        return self.init_values is not None and self.init_values > 0


def _trunc_normal_(t: torch.Tensor, std: float) -> None:
    # BEiT pretraining's trunc_normal_: truncated at +-std (not timm's default +-2)
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-std, b=std)


class BEiT(nn.Module):
    """BEiT pretraining model: ViT encoder over all patches (masked ones replaced), shared relative position bias,
    LayerScale, final norm and a visual-token head.

    ``forward(images (B, C, H, W), bool_masked_pos (B, L) bool, target (B, L) int) -> (loss (), metrics {})``.

    Args:
        config: a :class:`BEiTConfig` (or its fields as keyword arguments).
        fused: run the static-shape fused head and the default attention backend (True) or the official code
            path (False).
    """

    task = "beit"
    """The training task (``mimfast.train.tasks``) that knows how to train and evaluate this model."""

    def __init__(self, config: BEiTConfig | None = None, *, fused: bool = True, **kwargs):
        super().__init__()
        if config is None:
            config = BEiTConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        self.fused = fused
        ln = lambda d: nn.LayerNorm(d, eps=c.layer_norm_eps)  # noqa: E731
        dpr = [x.item() for x in torch.linspace(0, c.drop_path_rate, c.depth, device="cpu")]

        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.rel_pos_bias = RelativePositionBias(c.grid_size, c.num_heads)
        ls = c.init_values if c.layer_scale else None
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias="qv", drop_path=dpr[i], norm_layer=ln, init_values=ls)
            for i in range(c.depth)
        )
        self.norm = ln(c.embed_dim)
        self.lm_head = nn.Linear(c.embed_dim, c.vocab_size)
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------------ weights
    def initialize_weights(self) -> None:
        """BEiT's init: truncated normal (std ``init_std``, cut at +-std) on every Linear / the patch conv / the
        tokens, zero biases, LayerNorm (1, 0), zero relative position table, LayerScale ``init_values``; then
        ``fix_init_weight``: block i's ``attn.proj`` and ``mlp.fc2`` weights divided by sqrt(2 (i + 1))."""
        if self.cls_token.device.type == "meta":
            return
        std = self.config.init_std
        with torch.no_grad():
            for t in (self.cls_token, self.mask_token):
                _trunc_normal_(t, std)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    _trunc_normal_(m.weight, std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            nn.init.zeros_(self.rel_pos_bias.relative_position_bias_table)
            for i, blk in enumerate(self.blocks):
                nn.init.zeros_(blk.attn.q_bias)
                nn.init.zeros_(blk.attn.v_bias)
                if self.config.layer_scale:
                    blk.ls1.gamma.fill_(self.config.init_values)
                    blk.ls2.gamma.fill_(self.config.init_values)
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def no_weight_decay(self) -> set[str]:
        """BEiT's ``no_weight_decay`` (``pos_embed`` does not exist here); 1-D parameters and biases are exempt too."""
        return {"cls_token"}

    # ------------------------------------------------------------------------------------ official checkpoints
    @staticmethod
    def _to_official(key: str) -> str:
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "blocks" and parts[2] in ("ls1", "ls2") and parts[3] == "gamma":
            return f"blocks.{parts[1]}.gamma_{parts[2][-1]}"
        return key

    @staticmethod
    def _from_official(key: str) -> str:
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "blocks" and parts[2] in ("gamma_1", "gamma_2"):
            return f"blocks.{parts[1]}.ls{parts[2][-1]}.gamma"
        return key

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the official key names (``blocks.N.gamma_1`` ...), the inverse of
        :meth:`load_official_state_dict`; includes the ``rel_pos_bias.relative_position_index`` buffer."""
        return {self._to_official(k): v for k, v in self.state_dict().items()}

    def load_official_state_dict(self, state_dict: dict, *, strict: bool = True) -> list[str]:
        """Load an official BEiT pretraining checkpoint (its ``torch.load`` result, or that dict's ``["model"]``).

        Keys: a DDP ``module.`` prefix is removed, ``blocks.N.gamma_1`` / ``gamma_2`` become ``blocks.N.ls1.gamma``
        / ``ls2.gamma``; every other name (``patch_embed.proj``, ``cls_token``, ``mask_token``,
        ``rel_pos_bias.relative_position_bias_table``, ``blocks.N.attn.{qkv.weight, q_bias, v_bias, proj}``,
        ``blocks.N.{norm1, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``lm_head``) is the same. The checkpoint's
        ``rel_pos_bias.relative_position_index`` buffer, when present, is VERIFIED against this model's (a mismatch
        raises) and never loaded; it may be absent. A checkpoint without ``lm_head`` / ``mask_token`` (the encoder
        of a pretraining run kept for fine-tuning) loads with a warning, those keys keep their initialisation and are
        returned. Any other missing key (unless ``strict=False``, then returned too), any unexpected key (e.g. an
        absolute ``pos_embed`` or per-block relative position tables of a fine-tuned model) or a shape mismatch
        raises, naming the key.

        Returns:
            the list of this model's state-dict keys the checkpoint did not provide.
        """
        sd = state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict: expected a dict of tensors (or {{'model': ...}}), got {type(sd).__name__}")
        sd = {self._from_official(k.removeprefix("module.")): v for k, v in sd.items()}
        own = self.state_dict()
        index_key = "rel_pos_bias.relative_position_index"
        per_block = sorted(k for k in sd if k.startswith("blocks.") and ".relative_position_" in k)
        if per_block:
            raise KeyError(
                f"state_dict: per-block relative position bias keys {per_block[:2]} (a use_rel_pos_bias model, e.g. "
                "fine-tuned); this model has BEiT pretraining's one shared table rel_pos_bias.*"
            )
        unexpected = sorted(set(sd) - set(own))
        missing = sorted(set(own) - set(sd) - {index_key})
        head = ("lm_head.", "mask_token")
        encoder_only = bool(missing) and all(k.startswith(head) for k in missing)
        if unexpected or (missing and strict and not encoder_only):
            off = self._to_official
            raise KeyError(
                f"state_dict: unexpected keys {[off(k) for k in unexpected[:8]]}, missing keys "
                f"{[off(k) for k in missing[:8]]} (official names)"
            )
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"state_dict[{k!r}]: expected a tensor, got {type(v).__name__}")
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(
                    f"state_dict[{self._to_official(k)!r}]: expected shape {tuple(own[k].shape)}, got "
                    f"{tuple(v.shape)} (a different image size or architecture?)"
                )
        if index_key in sd:
            if not torch.equal(sd.pop(index_key).to("cpu", torch.long), own[index_key].to("cpu")):
                raise ValueError(
                    f"state_dict[{index_key!r}]: differs from BEiT's index for a {self.config.grid_size}x"
                    f"{self.config.grid_size} grid; the checkpoint's relative position layout is not BEiT's"
                )
        self.load_state_dict(sd, strict=False)
        if missing:
            what = "no lm_head / mask_token" if encoder_only else f"missing keys (strict=False): {missing[:4]}"
            warnings.warn(
                f"BEiT checkpoint has {what} ({len(missing)} keys); they keep their initialisation", stacklevel=2
            )
        return missing

    # ------------------------------------------------------------------------------------------------ checks
    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        want = (c.in_chans, c.img_size, c.img_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != want:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected shape (B, {', '.join(map(str, want))}), got {got}")
        if not images.is_floating_point():
            raise TypeError(f"images: expected a floating-point tensor (normalised pixels), got {images.dtype}")

    def _check_mask(self, images: torch.Tensor, bool_masked_pos: torch.Tensor) -> None:
        want = (images.shape[0], self.config.num_patches)
        if not isinstance(bool_masked_pos, torch.Tensor):
            raise TypeError(f"bool_masked_pos: expected a bool tensor of shape {want}, got {type(bool_masked_pos)}")
        if bool_masked_pos.dtype != torch.bool:
            raise TypeError(f"bool_masked_pos: expected dtype torch.bool (True = masked), got {bool_masked_pos.dtype}")
        if tuple(bool_masked_pos.shape) != want:
            raise ValueError(
                f"bool_masked_pos: expected shape (B, L) = {want} (flattened row-major grid), "
                f"got {tuple(bool_masked_pos.shape)}"
            )
        if bool_masked_pos.device != images.device:
            raise ValueError(f"bool_masked_pos: device {bool_masked_pos.device} differs from images' {images.device}")

    def _check_target(self, bool_masked_pos: torch.Tensor, target: torch.Tensor) -> None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target: expected an int64 tensor of token ids, got {type(target).__name__}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target: expected integer token ids (int64), got {target.dtype}")
        if target.shape != bool_masked_pos.shape:
            raise ValueError(
                f"target: expected shape (B, L) = {tuple(bool_masked_pos.shape)} (one token id per patch), "
                f"got {tuple(target.shape)}"
            )
        if target.device != bool_masked_pos.device:
            raise ValueError(f"target: device {target.device} differs from bool_masked_pos' {bool_masked_pos.device}")

    def _check_values(self, bool_masked_pos: torch.Tensor, target: torch.Tensor) -> None:
        """Value checks: on the host for CPU tensors (free); as ``torch._assert_async`` (no sync) on a device."""
        k, v = self.config.num_mask_patches, self.config.vocab_size
        count = bool_masked_pos.sum(dim=1)
        bad_target = bool_masked_pos & ((target < 0) | (target >= v))
        too_many = (
            f"bool_masked_pos: a sample has more masked positions than num_mask_patches={k} (the fused head's "
            "per-image bound); build the masks with num_masking_patches <= num_mask_patches"
        )
        out_of_range = f"target: token ids at masked positions must lie in [0, vocab_size={v})"
        empty = "bool_masked_pos: no position is masked in the whole batch (the loss would be 0 / 0)"
        if bool_masked_pos.device.type != "cpu":
            if bool_masked_pos.numel():
                torch._assert_async(count.any(), empty)
            if self.fused and bool_masked_pos.numel():  # only the fused head has the bound (the twin indexes any count)
                torch._assert_async(count.max() <= k, too_many)
            torch._assert_async(~bad_target.any(), out_of_range)
            return
        if bool_masked_pos.numel() and not bool(count.any()):
            raise ValueError(empty)
        if self.fused and bool_masked_pos.numel() and int(count.max()) > k:
            raise ValueError(f"{too_many}; got {int(count.max())}")
        if bool(bad_target.any()):
            bad = target[bad_target]
            raise ValueError(f"{out_of_range}; got range [{int(bad.min())}, {int(bad.max())}]")

    # ----------------------------------------------------------------------------------------------- forward
    def _backend(self):
        return attention_backend(None if self.fused else "eager")

    def _encode(self, images: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> torch.Tensor:
        """images (B, C, H, W), bool_masked_pos (B, L) | None -> last block's output (B, 1 + L, D), before norm."""
        x = self.patch_embed(images)
        bsz, seq, _ = x.shape
        if bool_masked_pos is not None:
            if self.fused:
                x = torch.where(bool_masked_pos.unsqueeze(-1), self.mask_token, x)
            else:
                mask_token = self.mask_token.expand(bsz, seq, -1)
                w = bool_masked_pos.unsqueeze(-1).type_as(mask_token)
                x = x * (1 - w) + mask_token * w
        x = torch.cat((self.cls_token.expand(bsz, -1, -1), x), dim=1)
        bias = self.rel_pos_bias().unsqueeze(0)  # (1, H, 1 + L, 1 + L), one table for every block
        with self._backend():
            for blk in self.blocks:
                x = blk(x, bias)
        return x

    def forward_features(self, images: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, C, H, W), optional bool_masked_pos (B, L) -> final-normed hidden states (B, 1 + L, D).

        Row 0 is the class token, rows 1.. the patches in row-major grid order (for a linear probe: ``[:, 0]`` and
        ``[:, 1:].mean(1)``). Without ``bool_masked_pos`` no patch is replaced.
        """
        self._check_images(images)
        if bool_masked_pos is not None:
            self._check_mask(images, bool_masked_pos)
        return self.norm(self._encode(images, bool_masked_pos))

    def masked_rows(self, bool_masked_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused head's static row selection: bool_masked_pos (B, L) -> (ids (B, K) int32, valid (B, K) bool).

        ids = the first K = ``num_mask_patches`` positions of a stable sort with masked positions first (masked ones
        in increasing order, then unmasked ones as padding); valid marks the masked ones. No host sync.
        """
        k = self.config.num_mask_patches
        order = torch.argsort((~bool_masked_pos).to(torch.uint8), dim=1, stable=True)[:, :k]
        return order.to(torch.int32), bool_masked_pos.gather(1, order)

    def forward(
        self, images: torch.Tensor, bool_masked_pos: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """BEiT's masked-image-modeling loss.

        Args:
            images: (B, C, H, W) normalised pixels (BEiT: the 224 px view).
            bool_masked_pos: (B, L) bool, True = masked, row-major over the patch grid; at most ``num_mask_patches``
                per sample on the fused path (checked: on the host for CPU tensors, ``torch._assert_async`` on GPU).
            target: (B, L) int64 tokenizer ids of every patch; only masked positions are read and must lie in
                [0, vocab_size).

        Returns:
            (loss, metrics): loss () = mean cross-entropy of ``lm_head`` over the masked positions of the batch;
            metrics = {} (masked-token accuracy would need the logits, which the fused head never materialises).
        """
        self._check_images(images)
        self._check_mask(images, bool_masked_pos)
        self._check_target(bool_masked_pos, target)
        self._check_values(bool_masked_pos, target)
        x = self._encode(images, bool_masked_pos)
        if not self.fused:  # the official model + engine_for_pretraining.py
            x = self.norm(x)
            x = x[:, 1:]
            logits = self.lm_head(x[bool_masked_pos])
            return F.cross_entropy(logits, target[bool_masked_pos].long()), {}
        ids, valid = self.masked_rows(bool_masked_pos)
        rows = self.norm(gather_tokens(x[:, 1:], ids, validate=False))  # (B, K, D): LayerNorm is per row
        tgt = torch.where(valid, target.gather(1, ids.long()), IGNORE_INDEX).long()
        weight, bias, dev = self.lm_head.weight, self.lm_head.bias, rows.device.type
        if torch.is_autocast_enabled(dev):  # what nn.Linear does under autocast (a custom op is not autocast)
            dt = torch.get_autocast_dtype(dev)
            rows, weight, bias = rows.to(dt), weight.to(dt), bias.to(dt)
        loss = linear_cross_entropy(
            rows.reshape(-1, rows.shape[-1]), weight, tgt.reshape(-1), bias, ignore_index=IGNORE_INDEX
        )
        return loss, {}

    @torch.no_grad()
    def mlm_accuracy(self, images: torch.Tensor, bool_masked_pos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Masked-token accuracy () as BEiT logs it (``argmax(logits) == target`` over the masked positions), for
        evaluation: it materialises the (M, V) logits, which the fused training loss avoids."""
        self._check_images(images)
        self._check_mask(images, bool_masked_pos)
        self._check_target(bool_masked_pos, target)
        x = self.norm(self._encode(images, bool_masked_pos))[:, 1:]
        pred = self.lm_head(x[bool_masked_pos]).argmax(dim=-1)
        return (pred == target[bool_masked_pos]).float().mean()

    # ------------------------------------------------------------------------------------------------ metrics
    def flops_per_image(self, *, training: bool = True) -> float:
        """Matmul FLOPs for one image (2 per multiply-add; backward = 2x forward when ``training``).

        Counts the patch embedding (L tokens), every Linear of each block and the two attention matmuls at 1 + L
        tokens, and ``lm_head`` on ``num_mask_patches`` rows (the rows the fused head runs; the eager twin runs it on
        the actual masked count, at most that). Not counted: norms, softmax, the bias gather, the loss. ViT-B/16:
        about 36 GFLOP forward, 108 training.
        """
        c = self.config
        seq, n, d = c.num_patches, c.num_patches + 1, c.embed_dim
        hidden = int(d * c.mlp_ratio)
        linear = 2 * n * d * (4 * d + 2 * hidden)  # qkv (3 d^2) + proj (d^2) + fc1 + fc2
        attn = 2 * 2 * n * n * d  # q k^T and p v
        fwd = 2 * seq * (c.patch_size**2 * c.in_chans) * d
        fwd += c.depth * (linear + attn)
        fwd += 2 * c.num_mask_patches * d * c.vocab_size
        return float(fwd * (3 if training else 1))


# ----------------------------------------------------------------------------------------------------- registry
@register_model
def beit_base_patch16_224(**kwargs) -> BEiT:
    """BEiT-B/16 (768-d, 12 blocks, 12 heads), 8192-token vocabulary, 75 of 196 patches masked."""
    cfg = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return BEiT(**{**cfg, **kwargs})


@register_model
def beit_large_patch16_224(**kwargs) -> BEiT:
    """BEiT-L/16 (1024-d, 24 blocks, 16 heads), 8192-token vocabulary, 75 of 196 patches masked."""
    cfg = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return BEiT(**{**cfg, **kwargs})


@register_model
def beit_tiny_patch4_debug(**kwargs) -> BEiT:
    """A tiny BEiT for tests and CPU runs: 32 px images, 4 px patches (64 tokens), 96-d x 4 blocks, 3 heads, the
    128-code debug tokenizer's vocabulary, 24 of 64 patches masked in blocks of >= 4."""
    cfg = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, vocab_size=128, num_mask_patches=24,
               min_mask_patches=4)  # fmt: skip
    return BEiT(**{**cfg, **kwargs})
