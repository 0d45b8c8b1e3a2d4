"""The ViT classifier that every pretrained MAE / BEiT / CAE / MAGE encoder becomes for fine-tuning (issue 16).

One model covers the four official fine-tuning networks (MAE ``models_vit.py``, BEiT / CAE ``modeling_finetune.py``,
MAGE ``models_vit_mage.py``): pixels (patch embedding + class token + optional absolute position table) or MAGE's
token ids (BERT embeddings over ``[class id ; tokens]``), ViT blocks with q/v or full qkv biases, optional LayerScale
and a per-block relative position bias (BEiT layout), then the pooled feature -- ``fc_norm(mean of the patch tokens)``
(``global_pool``, what all four recipes fine-tune with) or ``norm(class token)`` -- dropout and a Linear head.
Parameter names are timm's (``blocks.N.attn.qkv``, ``fc_norm``, ``head``; LayerScale ``blocks.N.ls1.gamma``); the
relative position tables are ``blocks.N.rel_pos_bias.*``. :meth:`ViTClassifier.load_official_state_dict` maps the
official fine-tuned names onto these.

Family rules for turning a pretrained mimfast model into the classifier (:func:`classifier_overrides` gives the
config fields, :meth:`ViTClassifier.load_pretrained_encoder` copies the weights), as the official fine-tuning does:

* MAE: qkv bias, no LayerScale, ``pos_embed="learned"`` initialised from the pretrained (fixed) sin-cos table, which
  fine-tuning then trains (timm's ``pos_embed`` is a Parameter). With ``global_pool`` the pretrained final ``norm`` is
  dropped and ``fc_norm`` starts fresh (MAE: ``del self.norm``; its loader asserts exactly head + fc_norm missing).
* BEiT: q/v biases, LayerScale, no absolute position table, ``rel_pos_bias=True``: every block's table starts as a
  copy of the shared pretrained table (``run_class_finetuning.py``); the pretrained ``norm`` is dropped under
  ``global_pool`` (BEiT's ``norm`` is an Identity then).
* CAE: q/v biases, LayerScale, ``pos_embed="fixed"``: the pretrained sin-cos table, frozen (CAE fine-tunes with
  ``--sin_pos_emb``, a ``requires_grad=False`` table), and ``rel_pos_bias=True`` with zero tables (its script's
  default; CAE pretrains none). Under ``global_pool`` the pretrained ``norm`` becomes ``fc_norm`` (CAE renames
  ``norm.`` to ``fc_norm.`` when it loads an encoder).
* MAGE: ``input="tokens"``, ``token_emb`` copied (word + position embeddings, LayerNorm), qkv bias, the fake class
  id at position 0; the pretrained ``norm`` is dropped under ``global_pool`` (as MAE).
* With ``global_pool=False`` every family copies the pretrained ``norm`` into ``norm`` (the official MAE / BEiT /
  MAGE behaviour; CAE's loader would leave it fresh: we copy it, so the class token starts equal to the pretrained
  encoder's).

Two paths over the same parameters (``fused``): the default attention backend (FlashAttention / SDPA, the relative
position bias as ``attn_bias``) and the final norm on the class row only; or (``fused=False``) the official code
path: explicit softmax attention and ``norm`` over every token before taking row 0.

Deviations from the official code: ``drop_rate`` is a dropout before the head only (timm's ``head_drop``; the
recipes run with 0); a from-scratch model uses MAE's fine-tuning init (timm's truncated normal, head std 2e-5 --
BEiT's ``trunc_normal(.02) * init_scale=0.001`` draws the same distribution) without BEiT's ``fix_init_weight``;
:meth:`no_weight_decay` exempts the relative position tables (timm's Beit does; BEiT's script needs
``--disable_weight_decay_on_rel_pos_bias``); no position-table interpolation for another resolution.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layers.attention import attention_backend
from ..layers.vit import Block, PatchEmbed, RelativePositionBias, get_2d_sincos_pos_embed
from .beit import BEiT
from .cae import CAE
from .mae import MaskedAutoencoderViT
from .mage import MAGE, BertEmbeddings
from .registry import register_model

__all__ = [
    "ViTClassifier",
    "ViTClassifierConfig",
    "classifier_overrides",
    "encoder_state_for_classifier",
    "layer_decay_param_groups",
]

BUILTIN_NUM_CLASSES = 10
"""``len(mimfast.data.BUILTIN_CLASSES)``, the debug classifier's classes (models do not import mimfast.data)."""


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class ViTClassifierConfig:
    """Architecture of a ViT classifier (defaults: ViT-B/16 at 224 px, 1000 classes, MAE's fine-tuning)."""

    img_size: int = 224
    """Input resolution (square), a multiple of ``patch_size``; with token input, the tokenizer's image size."""
    patch_size: int = 16
    """Patch side p (token input: the tokenizer's downsampling factor); L = (img_size / p)^2 tokens."""
    in_chans: int = 3
    """Image channels (pixel input)."""
    embed_dim: int = 768
    """Width D."""
    depth: int = 12
    """Transformer blocks."""
    num_heads: int = 12
    """Attention heads (divides embed_dim)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / D."""
    num_classes: int = 1000
    """Classes C of the head."""
    qkv_bias: bool | str = True
    """True: one qkv bias (MAE, MAGE); "qv": learned q and v biases, no key bias (BEiT, CAE); False: none."""
    init_values: float | None = None
    """LayerScale init (BEiT / CAE: the pretrained gammas replace it); None = no LayerScale (MAE, MAGE)."""
    pos_embed: str | None = None
    """Absolute position table (1, 1 + L, D): "learned" (MAE), "fixed" (sin-cos, frozen; CAE) or "none" (BEiT; token
    input, whose embeddings carry positions). None = "learned" for pixels, "none" for tokens."""
    rel_pos_bias: bool = False
    """One BEiT relative position bias per block (BEiT and CAE fine-tuning), zero-initialised."""
    global_pool: bool = True
    """Pool = ``fc_norm(mean of the patch tokens)`` (all four recipes); False: ``norm(class token)``."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the last block; block i uses ``drop_path_rate * i / (depth - 1)`` (timm's linspace)."""
    drop_rate: float = 0.0
    """Dropout on the pooled feature before the head (timm's ``head_drop``)."""
    attn_drop_rate: float = 0.0
    """Dropout on the attention weights."""
    layer_norm_eps: float = 1e-6
    """Epsilon of every LayerNorm (including MAGE's embedding LayerNorm)."""
    head_init_std: float = 2e-5
    """Std of the head weight's truncated-normal init, bias 0 (MAE / MAGE: ``trunc_normal_(head.weight, std=2e-5)``;
    BEiT / CAE's ``trunc_normal(.02) * init_scale 0.001`` is the same distribution)."""
    input: str = "pixels"
    """"pixels": images (B, C, H, W); "tokens": tokenizer ids (B, L), MAGE."""
    vocab_size: int | None = None
    """Token input: rows of the word embedding (MAGE: codebook + classes + 1 = 2025). Pixels: None."""
    fake_class_id: int | None = None
    """Token input: the VOCABULARY id put at position 0 (MAGE's ``fake_class_label`` = codebook_size + class slot,
    1100 for ImageNet MAGE), in [0, vocab_size). Pixels: None."""
    codebook_size: int | None = None
    """Token input: ids must lie in [0, codebook_size) (the tokenizer's codes); None = vocab_size. Pixels: None."""
    token_dropout: float = 0.1
    """Token input: dropout of the BERT embeddings (MAGE's fine-tuning: 0.1)."""

    def __post_init__(self):
        def bad(name: str, want: str):
            return ValueError(f"ViTClassifierConfig.{name}: expected {want}, got {getattr(self, name)!r}")

        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "num_classes"):
            if not (_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "an int >= 1")
        if self.img_size % self.patch_size:
            raise bad("img_size", f"a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise bad("embed_dim", f"a multiple of num_heads={self.num_heads}")
        if not (_real(self.mlp_ratio) and self.mlp_ratio > 0):
            raise bad("mlp_ratio", "a float > 0")
        if not (self.qkv_bias is True or self.qkv_bias is False or self.qkv_bias == "qv"):
            raise bad("qkv_bias", "True, False or 'qv'")
        if self.init_values is not None and not (_real(self.init_values) and self.init_values > 0):
            raise bad("init_values", "None (no LayerScale) or a float > 0")
        if self.input not in ("pixels", "tokens"):
            raise bad("input", "'pixels' or 'tokens'")
        tokens = self.input == "tokens"
        if self.pos_embed is None:
            self.pos_embed = "none" if tokens else "learned"
        if self.pos_embed not in ("learned", "fixed", "none"):
            raise bad("pos_embed", "'learned', 'fixed', 'none' or None")
        if tokens and self.pos_embed != "none":
            raise bad("pos_embed", "'none' with input='tokens' (the token embeddings carry the positions)")
        if self.pos_embed == "fixed" and self.embed_dim % 4:
            raise bad("embed_dim", "a multiple of 4 with pos_embed='fixed' (2-D sin-cos)")
        for name in ("rel_pos_bias", "global_pool"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        for name in ("drop_path_rate", "drop_rate", "attn_drop_rate", "token_dropout"):
            if not (_real(getattr(self, name)) and 0.0 <= getattr(self, name) < 1.0):
                raise bad(name, "a float in [0, 1)")
        if not (_real(self.layer_norm_eps) and self.layer_norm_eps > 0):
            raise bad("layer_norm_eps", "a finite float > 0")
        if not (_real(self.head_init_std) and self.head_init_std >= 0):
            raise bad("head_init_std", "a finite float >= 0")
        if not tokens:
            for name in ("vocab_size", "fake_class_id", "codebook_size"):
                if getattr(self, name) is not None:
                    raise bad(name, "None with input='pixels' (a token-input field)")
            return
        if not (_int(self.vocab_size) and self.vocab_size >= 2):
            raise bad("vocab_size", "an int >= 2 with input='tokens' (MAGE: codebook + classes + 1)")
        if not (_int(self.fake_class_id) and 0 <= self.fake_class_id < self.vocab_size):
            raise bad("fake_class_id", f"a vocabulary id in [0, vocab_size={self.vocab_size}) with input='tokens'")
        if self.codebook_size is not None and not (_int(self.codebook_size) and 1 <= self.codebook_size):
            raise bad("codebook_size", "None or an int >= 1")
        if self.codebook_size is not None and self.codebook_size > self.vocab_size:
            raise bad("codebook_size", f"<= vocab_size={self.vocab_size}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """L, patches (or tokens) per image."""
        return self.grid_size**2


class _RelPosBlock(Block):
    """A :class:`~mimfast.layers.vit.Block` with its own relative position bias (BEiT fine-tuning's
    ``use_rel_pos_bias``), added to every head's attention logits. Shapes: ``(B, 1 + L, D) -> (B, 1 + L, D)``."""

    def __init__(self, *args, grid: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rel_pos_bias = RelativePositionBias(grid, self.attn.num_heads)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, self.rel_pos_bias().unsqueeze(0))


class ViTClassifier(nn.Module):
    """ViT classifier for fine-tuning: ``forward(x) -> logits (B, num_classes)``.

    ``x``: images (B, C, H, W) float (``input="pixels"``) or token ids (B, L) int64 in [0, codebook_size)
    (``input="tokens"``; the fake class id is prepended inside, as MAGE's ``models_vit_mage.py`` does).

    Args:
        config: a :class:`ViTClassifierConfig` (or its fields as keyword arguments).
        fused: default attention backend and the class-row-only final norm (True) or the official path (False).
    """

    task = "finetune"
    """The training task (``mimfast.train.tasks``) that knows how to train and evaluate this model."""

    def __init__(self, config: ViTClassifierConfig | None = None, *, fused: bool = True, **kwargs):
        super().__init__()
        if config is None:
            config = ViTClassifierConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        self.fused = fused
        ln = lambda d: nn.LayerNorm(d, eps=c.layer_norm_eps)  # noqa: E731
        d, n = c.embed_dim, c.num_patches
        if c.input == "pixels":
            self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, d)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        else:
            self.token_emb = BertEmbeddings(c.vocab_size, d, n + 1, c.layer_norm_eps, c.token_dropout)
        if c.pos_embed != "none":
            self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d), requires_grad=c.pos_embed == "learned")
        dpr = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]  # torch.linspace(0, rate, depth)
        block = _RelPosBlock if c.rel_pos_bias else Block
        extra = {"grid": c.grid_size} if c.rel_pos_bias else {}
        self.blocks = nn.ModuleList(
            block(d, c.num_heads, c.mlp_ratio, qkv_bias=c.qkv_bias, attn_drop=c.attn_drop_rate, drop_path=r,
                  init_values=c.init_values, norm_layer=ln, **extra)
            for r in dpr
        )  # fmt: skip
        self.norm = nn.Identity() if c.global_pool else ln(d)
        self.fc_norm = ln(d) if c.global_pool else nn.Identity()
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = nn.Linear(d, c.num_classes)
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------------ weights
    def initialize_weights(self) -> None:
        """MAE's fine-tuning init: timm's (truncated normal std .02 on Linears, ``cls_token`` and a learned
        ``pos_embed``, zero biases, LayerNorm (1, 0), PyTorch's default patch conv), a sin-cos table for
        ``pos_embed="fixed"``, MAGE's N(0, .02) token embeddings, zero relative position tables, LayerScale
        ``init_values``; then the head: truncated normal with std ``head_init_std``, bias 0."""
        c = self.config
        if self.head.weight.device.type == "meta":
            return
        tn = lambda t, std=0.02: nn.init.trunc_normal_(t, std=std)  # noqa: E731  (timm's: cut at +-2 absolute)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    tn(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            if c.input == "pixels":
                tn(self.cls_token)
            else:
                nn.init.normal_(self.token_emb.word_embeddings.weight, std=0.02)
                nn.init.normal_(self.token_emb.position_embeddings.weight, std=0.02)
            if c.pos_embed == "learned":
                tn(self.pos_embed)
            elif c.pos_embed == "fixed":
                self.pos_embed.copy_(get_2d_sincos_pos_embed(c.embed_dim, c.grid_size, cls_token=True)[None])
            tn(self.head.weight, c.head_init_std)

    @property
    def num_layers(self) -> int:
        """depth + 1: the layer ids of :meth:`layer_id` run from 0 (embeddings) to depth + 1 (norms, head)."""
        return self.config.depth + 1

    def layer_id(self, name: str) -> int:
        """Layer of a parameter name for layer-wise lr decay (MAE ``get_layer_id_for_vit``, BEiT
        ``get_num_layer_for_vit``, MAGE's with ``token_emb``): ``cls_token``, ``pos_embed``, ``patch_embed.*``,
        ``token_emb.*`` -> 0; ``blocks.i.*`` -> i + 1; everything else (``norm``, ``fc_norm``, ``head``) ->
        depth + 1. A DDP ``module.`` / compiled ``_orig_mod.`` prefix is ignored."""
        name = re.sub(r"^(module\.|_orig_mod\.)+", "", name)
        if name in ("cls_token", "pos_embed") or name.startswith(("patch_embed.", "token_emb.")):
            return 0
        if name.startswith("blocks."):
            i = name.split(".")[1]
            if not (i.isdigit() and int(i) < self.config.depth):
                raise ValueError(f"layer_id: {name!r} names no block of this {self.config.depth}-block model")
            return int(i) + 1
        return self.config.depth + 1

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay besides the 1-D ones: ``cls_token``, ``pos_embed`` (timm / MAE / BEiT)
        and every ``relative_position_bias_table`` (timm's Beit)."""
        names = {n for n, _ in self.named_parameters()}
        return {n for n in names if n in ("cls_token", "pos_embed") or n.endswith("relative_position_bias_table")}

    # ------------------------------------------------------------------------------------------------ forward
    def _check_input(self, x) -> torch.Tensor:
        c = self.config
        if c.input == "pixels":
            want = (c.in_chans, c.img_size, c.img_size)
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"x: expected images of shape (B, {', '.join(map(str, want))}), got {got}")
            if not x.is_floating_point():
                raise TypeError(f"x: expected a floating-point image tensor (normalised pixels), got {x.dtype}")
            if x.shape[0] == 0:
                raise ValueError("x: empty batch")
            return x
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int64, torch.int32):
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x: expected integer token ids (int64) of shape (B, {c.num_patches}), got {got}")
        if x.dim() != 2 or x.shape[1] != c.num_patches or x.shape[0] == 0:
            raise ValueError(f"x: expected token ids of shape (B >= 1, {c.num_patches}) ({c.grid_size}x{c.grid_size} "
                             f"tokens, row-major), got {tuple(x.shape)}")  # fmt: skip
        hi = c.vocab_size if c.codebook_size is None else c.codebook_size
        ok = ((x >= 0) & (x < hi)).all()
        if x.device.type == "cpu":
            if not bool(ok):
                raise ValueError(f"x: expected token ids in [0, {hi}), got range [{int(x.min())}, {int(x.max())}]")
        else:  # no host sync
            torch._assert_async(ok, f"x: expected token ids in [0, {hi})")
        return x.long()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (images or token ids, see the class) -> token states after the last block (B, 1 + L, D), before any
        final norm; row 0 is the class position."""
        x = self._check_input(x)
        if self.config.input == "tokens":
            cls = torch.full_like(x[:, :1], self.config.fake_class_id)
            t = self.token_emb(torch.cat([cls, x], dim=1))
        else:
            t = self.patch_embed(x)
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
            if self.config.pos_embed != "none":
                t = t + self.pos_embed
        with attention_backend(None if self.fused else "eager"):
            for blk in self.blocks:
                t = blk(t)
        return t

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1 + L, D) from :meth:`forward_features` -> the pre-head feature (B, D):
        ``fc_norm(mean of rows 1..L)`` with ``global_pool``, else ``norm`` of row 0."""
        if self.config.global_pool:
            return self.fc_norm(tokens[:, 1:].mean(dim=1))
        return self.norm(tokens[:, 0]) if self.fused else self.norm(tokens)[:, 0]  # LayerNorm is per row

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        """feat (B, D) -> logits (B, num_classes) (dropout ``drop_rate`` in training, then ``head``)."""
        return self.head(self.head_drop(feat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: images (B, C, H, W) or token ids (B, L) -> logits (B, num_classes)."""
        return self.forward_head(self.pool(self.forward_features(x)))

    # ------------------------------------------------------------------------------------------------ metrics
    def flops_per_image(self, *, training: bool = True) -> float:
        """Matmul FLOPs for one image (2 per multiply-add; backward = 2x forward when ``training``): the patch
        embedding (pixels), every block's Linears and both attention matmuls at 1 + L tokens, the head. Not
        counted: norms, softmax, embeddings lookups. ViT-B/16 at 224: about 35 GFLOP forward, 105 training."""
        c = self.config
        n, d = c.num_patches + 1, c.embed_dim
        hidden = int(d * c.mlp_ratio)
        block = 2 * n * d * (4 * d + 2 * hidden) + 2 * 2 * n * n * d  # qkv + proj + fc1 + fc2; q k^T and p v
        fwd = c.depth * block + 2 * d * c.num_classes
        if c.input == "pixels":
            fwd += 2 * c.num_patches * c.patch_size**2 * c.in_chans * d
        return float(fwd * (3 if training else 1))

    # ------------------------------------------------------------------------------------ pretrained encoders
    def load_pretrained_encoder(self, pretrained: nn.Module) -> list[str]:
        """Copy the encoder of a pretrained mimfast MAE / BEiT / CAE / MAGE model into this classifier, following
        the family rules of the module docstring (:func:`encoder_state_for_classifier`).

        Raises ValueError (one line) when ``pretrained`` is not one of those families (e.g. a tokenizer) or its
        architecture does not fit this classifier's config (naming the field, both values, and the preset /
        overrides that fit). Returns the pretrained state-dict entries that were not used (decoder, heads, mask
        token, a dropped final norm), grouped as ``"decoder_blocks.*"``; the head (and per the rules ``fc_norm``,
        relative position tables without a pretrained source) keep their initialisation.
        """
        state, dropped = _convert(pretrained, self)
        own = self.state_dict()
        missing = sorted(k for k in set(own) - set(state) if not k.startswith(("head.", "fc_norm.")) and
                         ".rel_pos_bias." not in k)  # fmt: skip
        if missing:  # pragma: no cover - _convert covers every key of a checked architecture
            raise RuntimeError(f"load_pretrained_encoder: no source for {missing[:4]}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"load_pretrained_encoder: {k!r} has shape {tuple(v.shape)} in the pretrained model "
                                 f"but {tuple(own[k].shape)} here")  # fmt: skip
        self.load_state_dict(state, strict=False)
        return dropped

    # ------------------------------------------------------------------------------------ official checkpoints
    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the official fine-tuned names (inverse of :meth:`load_official_state_dict`):
        ``blocks.N.gamma_1`` / ``gamma_2``, ``blocks.N.attn.relative_position_bias_table`` / ``_index`` (BEiT / CAE)
        and, for token input, ``token_emb.position_ids`` (MAGE)."""
        out = {}
        for k, v in self.state_dict().items():
            k = re.sub(r"^(blocks\.\d+)\.ls([12])\.gamma$", r"\1.gamma_\2", k)
            out[re.sub(r"^(blocks\.\d+)\.rel_pos_bias\.", r"\1.attn.", k)] = v
        if self.config.input == "tokens":
            out["token_emb.position_ids"] = torch.arange(self.config.num_patches + 1).unsqueeze(0)
        return out

    def load_official_state_dict(self, state_dict: dict, *, strict: bool = True) -> list[str]:
        """Load a classifier checkpoint of the official code (or an encoder checkpoint, with ``strict=False``).

        Accepted names: timm / MAE / MAGE fine-tuned (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
        ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm`` or ``fc_norm``, ``head``), BEiT /
        CAE fine-tuned (``blocks.N.gamma_1`` / ``gamma_2`` -> ``ls1`` / ``ls2.gamma``, ``attn.q_bias`` / ``v_bias``,
        ``blocks.N.attn.relative_position_bias_table`` -> ``blocks.N.rel_pos_bias.*``), MAGE fine-tuned
        (``token_emb.*``). ``{"model"|"state_dict"|"module": sd}`` wrappers, a DDP ``module.`` prefix and CAE's
        ``encoder.`` prefix are removed; BEiT's shared pretraining table ``rel_pos_bias.*`` is copied into every block.

        Always dropped and reported: ``*.relative_position_index`` and ``token_emb.position_ids`` (verified against
        ours; a mismatch raises), ``vqgan.*`` and, for token input, the ``cls_token`` / ``pos_embed`` /
        ``patch_embed.*`` that MAGE's timm model holds but never uses. Other unexpected keys and missing keys raise
        ``KeyError`` unless ``strict=False``: then unexpected ones are dropped and reported, missing ones keep their
        initialisation (a warning lists them), and a ``head`` of another class count is dropped too (MAE's rule).
        A shape mismatch raises ``ValueError`` naming the key and both shapes.

        Returns:
            the dropped checkpoint keys (official names), grouped as ``"vqgan.*"``.
        """
        sd = unwrap_state_dict(state_dict)
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict: expected a dict of tensors (or {{'model': ...}}), got {type(sd).__name__}")
        sd = {re.sub(r"^module\.", "", k): v for k, v in sd.items()}
        c, own = self.config, self.state_dict()
        cae = any(k.startswith("encoder.") for k in sd) and not any(k.startswith("blocks.") for k in sd)
        mapped, origin, dropped, unexpected = {}, {}, [], []
        for key, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"state_dict[{key!r}]: expected a tensor, got {type(v).__name__}")
            ours = self._official_to_ours(key, cae)
            if ours is None:
                unexpected.append(key)
            elif ours.endswith("relative_position_index") or ours == "token_emb.position_ids":
                self._verify_index(key, ours, v)
                dropped.append(key)
            elif ours.startswith("vqgan.") or (c.input == "tokens" and re.match(r"cls_token$|pos_embed$|patch_embed\.",
                                                                               ours)):  # fmt: skip
                dropped.append(key)
            elif ours == "rel_pos_bias.relative_position_bias_table":  # BEiT pretraining: one shared table
                if not c.rel_pos_bias:
                    raise ValueError(f"state_dict[{key!r}]: the checkpoint has a relative position bias but "
                                     "config.rel_pos_bias=False; build with rel_pos_bias=True")  # fmt: skip
                for i in range(c.depth):
                    mapped[f"blocks.{i}.rel_pos_bias.relative_position_bias_table"] = v
                    origin[f"blocks.{i}.rel_pos_bias.relative_position_bias_table"] = key
            else:
                mapped[ours], origin[ours] = v, key
        unexpected = sorted(unexpected + [origin[k] for k in set(mapped) - set(own)])
        missing = sorted(k for k in set(own) - set(mapped) if not k.endswith("relative_position_index"))
        if unexpected or missing:
            if strict:
                hint = ""
                if "norm.weight" in mapped and "fc_norm.weight" not in mapped and c.global_pool:
                    hint = " (the checkpoint pools the class token: build with global_pool=False)"
                elif "fc_norm.weight" in mapped and not c.global_pool:
                    hint = " (the checkpoint pools the patch tokens: build with global_pool=True)"
                raise KeyError(f"state_dict: unexpected keys {unexpected[:6]}, missing keys {missing[:6]}{hint}; "
                               "strict=False drops unexpected keys and keeps missing ones initialised")  # fmt: skip
            dropped += unexpected
            mapped = {k: v for k, v in mapped.items() if k in own}
        for k, v in list(mapped.items()):
            if tuple(v.shape) == tuple(own[k].shape):
                continue
            classes = k.startswith("head.") and v.shape[1:] == own[k].shape[1:]  # another class count
            if classes and not strict:  # a fresh head, as MAE's main_finetune does
                dropped.append(origin[k])
                missing.append(k)
                del mapped[k]
                continue
            hint = f" (the checkpoint has {v.shape[0]} classes: set num_classes={v.shape[0]})" if classes else ""
            raise ValueError(f"state_dict[{origin[k]!r}]: expected shape {tuple(own[k].shape)}, got "
                             f"{tuple(v.shape)}{hint}")  # fmt: skip
        self.load_state_dict(mapped, strict=False)
        if missing:
            warnings.warn(f"ViTClassifier: the checkpoint lacks {len(missing)} keys ({', '.join(sorted(missing)[:4])}"
                          "...); they keep their initialisation", stacklevel=2)  # fmt: skip
        return _group(dropped, list(sd))

    def _official_to_ours(self, key: str, cae: bool) -> str | None:
        """Our name of an official key (None: not part of a classifier); ``cae``: a CAE pretraining checkpoint."""
        if cae:
            if not key.startswith("encoder."):
                return None
            key = key[len("encoder.") :]
            if self.config.global_pool and key.startswith("norm."):  # CAE's fine-tuning loader: norm -> fc_norm
                key = "fc_norm." + key[len("norm.") :]
        key = re.sub(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma", key)
        return re.sub(r"^(blocks\.\d+)\.attn\.(relative_position_)", r"\1.rel_pos_bias.\2", key)

    def _verify_index(self, key: str, ours: str, v: torch.Tensor) -> None:
        c = self.config
        if ours == "token_emb.position_ids":
            want, what = torch.arange(c.num_patches + 1).unsqueeze(0), "arange(L + 1)"
        else:
            want, what = RelativePositionBias.build_index(c.grid_size, c.grid_size), "BEiT relative position index"
        got = v.detach().to("cpu", torch.long)
        if got.shape != want.shape or not torch.equal(got, want):
            raise ValueError(f"state_dict[{key!r}]: expected the {c.grid_size}x{c.grid_size} grid's {what} of shape "
                             f"{tuple(want.shape)}, got another {tuple(got.shape)} tensor (another image or patch "
                             "size?)")  # fmt: skip


def _group(keys: list[str], all_keys: list[str]) -> list[str]:
    """Report dropped keys compactly: ``"X.*"`` when every key under the top-level name X was dropped, else the key
    with block indices starred (``"blocks.*.attn.relative_position_index"``)."""
    dropped, out, under = set(keys), set(), {}
    for a in all_keys:
        under.setdefault(a.split(".")[0], []).append(a)
    for k in keys:
        top = k.split(".")[0]
        if "." in k and all(a in dropped for a in under.get(top, [k])):
            out.add(top + ".*")
        else:
            out.add(re.sub(r"\.\d+\.", ".*.", k))
    return sorted(out)


def unwrap_state_dict(sd):
    """The state dict inside a ``{"model" | "state_dict" | "module": sd}`` checkpoint wrapper (else ``sd`` itself)."""
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            return sd[wrapper]
    return sd


# ------------------------------------------------------------------------------------------ conversion
_SHAPE = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def _family(model: nn.Module) -> str:
    for cls, name in ((MaskedAutoencoderViT, "MAE"), (BEiT, "BEiT"), (CAE, "CAE"), (MAGE, "MAGE")):
        if isinstance(model, cls):
            return name
    what = type(model).__name__
    if isinstance(model, ViTClassifier):
        raise ValueError(f"the pretrained model is a {what}, already a classifier: load its state_dict instead")
    kind = " (a tokenizer)" if getattr(model, "task", "") == "tokenizer" or "VQGAN" in what else ""
    raise ValueError(f"the pretrained model is a {what}{kind}, not a ViT encoder; fine-tuning needs an MAE, BEiT, "
                     "CAE or MAGE checkpoint")  # fmt: skip


def classifier_overrides(pretrained: nn.Module) -> dict:
    """The :class:`ViTClassifierConfig` fields a pretrained MAE / BEiT / CAE / MAGE model implies (the family rules
    of the module docstring): shape (img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, layer_norm_eps,
    in_chans for pixels), qkv_bias, init_values, pos_embed, rel_pos_bias, input and, for MAGE, vocab_size,
    fake_class_id (the vocabulary id ``codebook_size + MAGEConfig.fake_class_id``) and codebook_size. Training
    choices (num_classes, global_pool, drop rates) are not included. Raises ValueError for other models."""
    fam, c = _family(pretrained), pretrained.config
    out = {k: getattr(c, k) for k in _SHAPE + ("layer_norm_eps",)}
    if fam == "MAGE":
        return {**out, "input": "tokens", "qkv_bias": True, "init_values": None, "pos_embed": "none",
                "rel_pos_bias": False, "vocab_size": c.vocab_size, "fake_class_id": c.codebook_size + c.fake_class_id,
                "codebook_size": c.codebook_size}  # fmt: skip
    out.update(in_chans=c.in_chans, input="pixels")
    if fam == "MAE":
        return {**out, "qkv_bias": True, "init_values": None, "pos_embed": "learned", "rel_pos_bias": False}
    ls = c.init_values if c.init_values else None
    pos = "none" if fam == "BEiT" else "fixed"
    return {**out, "qkv_bias": "qv", "init_values": ls, "pos_embed": pos, "rel_pos_bias": True}


def _check_fits(pretrained: nn.Module, clf: ViTClassifier) -> str:
    fam, want, c = _family(pretrained), classifier_overrides(pretrained), clf.config
    bad = []
    for k, v in want.items():
        ours = getattr(c, k)
        if k == "codebook_size":
            continue  # an input-range check, not architecture
        if k == "init_values":
            same = (ours is None) == (v is None)
        elif k == "pos_embed":
            same = (ours == "none") == (v == "none")
        elif k == "rel_pos_bias":
            same = ours or fam != "BEiT"  # tables without a pretrained source start at zero
        else:
            same = type(ours) is type(v) and ours == v if isinstance(v, (bool, str)) else ours == v
        if not same:
            bad.append(f"ViTClassifierConfig.{k}={ours!r} but the pretrained {fam} has {v!r}")
    if bad:
        fit = [n for n, p in _PRESETS.items() if all(p.get(k, getattr(_DEFAULT, k)) == want[k] for k in _SHAPE)]
        base = {**vars(_DEFAULT), **_PRESETS[fit[0]]} if fit else {}
        over = {k: v for k, v in want.items() if k not in base or base[k] != v}
        args = "".join(f", {k}={v!r}" for k, v in over.items())
        use = f"create_model({fit[0]!r}{args})" if fit else f"model.overrides={over!r}"
        what = fam if type(pretrained).__name__ == fam else f"{fam} ({type(pretrained).__name__})"
        raise ValueError(f"the pretrained {what} does not fit this classifier: {'; '.join(bad)}; build the "
                         f"classifier with {use}")  # fmt: skip
    return fam


def _convert(pretrained: nn.Module, clf: ViTClassifier) -> tuple[dict[str, torch.Tensor], list[str]]:
    fam = _check_fits(pretrained, clf)
    src = {k: v.detach() for k, v in pretrained.state_dict().items()}
    gp, out, used, own = clf.config.global_pool, {}, set(), clf.state_dict()
    enc = ("token_emb.",) if fam == "MAGE" else ("patch_embed.", "cls_token", "pos_embed")
    for k, v in src.items():
        if k.startswith(enc + ("blocks.",)) and k in own:
            out[k] = v
            used.add(k)
        elif k.startswith("norm.") and not (gp and fam != "CAE"):  # MAE / BEiT / MAGE drop it under global_pool
            out[("fc_norm." if gp else "norm.") + k[len("norm.") :]] = v
            used.add(k)
    if fam == "BEiT":
        table = src["rel_pos_bias.relative_position_bias_table"]
        for i in range(clf.config.depth):
            out[f"blocks.{i}.rel_pos_bias.relative_position_bias_table"] = table.clone()
        used.add("rel_pos_bias.relative_position_bias_table")
        used.add("rel_pos_bias.relative_position_index")  # BEiT's layout for the same grid, rebuilt per block
    return out, _group([k for k in src if k not in used], list(src))


def encoder_state_for_classifier(pretrained: nn.Module, classifier: ViTClassifier) -> dict[str, torch.Tensor]:
    """The classifier state-dict entries (our names) that ``pretrained``'s encoder provides, per the family rules of
    the module docstring (detached tensors of ``pretrained``; BEiT's shared table cloned per block). Entries absent
    from the result keep their initialisation: ``head``; ``fc_norm`` unless CAE; relative position tables without a
    pretrained source. Raises ValueError as :meth:`ViTClassifier.load_pretrained_encoder`."""
    return _convert(pretrained, classifier)[0]


# --------------------------------------------------------------------------------------------- optimizer
def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float, *,
                             no_weight_decay_list=None) -> list[dict]:  # fmt: skip
    """AdamW parameter groups with layer-wise lr decay (MAE's ``param_groups_lrd``, after BEiT / ELECTRA).

    Each trainable parameter goes to the group of its ``(layer id, decay | no_decay)``; groups are in the order
    their first parameter appears. A group is ``{"params": [...], "weight_decay": w, "lr_scale": s}`` with
    ``s = layer_decay ** (model.num_layers - model.layer_id(name))`` (embeddings: ``layer_decay ** (depth + 1)``,
    block i: ``layer_decay ** (depth - i)``, norms and head: 1) and ``w = 0`` for 1-D parameters, biases and the
    names in ``no_weight_decay_list`` (default ``model.no_weight_decay()``), else ``weight_decay``. Frozen
    parameters (a fixed ``pos_embed``) are left out. The training loop must set each group's lr to
    ``lr * group["lr_scale"]`` (MAE's ``adjust_learning_rate``).

    Args:
        model: a :class:`ViTClassifier` (or anything with ``num_layers`` and ``layer_id``), possibly DDP-wrapped.
        weight_decay: >= 0. layer_decay: in (0, 1]; 1 = no decay.
    """
    inner = model
    while not hasattr(inner, "layer_id") and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if not (hasattr(inner, "layer_id") and hasattr(inner, "num_layers")):
        raise TypeError(f"model: expected a ViTClassifier (num_layers, layer_id), got {type(model).__name__}")
    if not (_real(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay: expected a finite float >= 0, got {weight_decay!r}")
    if not (_real(layer_decay) and 0 < layer_decay <= 1):
        raise ValueError(f"layer_decay: expected a float in (0, 1] (1 = no decay), got {layer_decay!r}")
    skip = set(inner.no_weight_decay() if no_weight_decay_list is None else no_weight_decay_list)
    n, groups = inner.num_layers, {}
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in skip
        lid = inner.layer_id(name)
        g = groups.setdefault((lid, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                "lr_scale": layer_decay ** (n - lid)})  # fmt: skip
        g["params"].append(p)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------------- registry
_DEFAULT = ViTClassifierConfig()
_PRESETS = {
    "vit_base_patch16_224_cls": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224_cls": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224_cls": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_tiny_patch4_32_cls_debug": dict(
        img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=BUILTIN_NUM_CLASSES
    ),
}


@register_model
def vit_base_patch16_224_cls(**kwargs) -> ViTClassifier:
    """ViT-B/16 classifier (768-d, 12 blocks, 12 heads) at 224 px, 1000 classes (MAE's ``vit_base_patch16``)."""
    return ViTClassifier(**{**_PRESETS["vit_base_patch16_224_cls"], **kwargs})


@register_model
def vit_large_patch16_224_cls(**kwargs) -> ViTClassifier:
    """ViT-L/16 classifier (1024-d, 24 blocks, 16 heads) at 224 px, 1000 classes."""
    return ViTClassifier(**{**_PRESETS["vit_large_patch16_224_cls"], **kwargs})


@register_model
def vit_huge_patch14_224_cls(**kwargs) -> ViTClassifier:
    """ViT-H/14 classifier (1280-d, 32 blocks, 16 heads) at 224 px, 1000 classes."""
    return ViTClassifier(**{**_PRESETS["vit_huge_patch14_224_cls"], **kwargs})


@register_model
def vit_tiny_patch4_32_cls_debug(**kwargs) -> ViTClassifier:
    """A CPU-sized classifier matching the tiny debug encoders (``mae_vit_tiny_patch4_dec64d2b_debug``,
    ``beit_tiny_patch4_debug``, ``cae_tiny_patch4_debug``, ``mage_tiny_patch4_debug``): 32 px, 4 px patches (64
    tokens), 96-d x 4 blocks, 3 heads, the built-in dataset's 10 classes. Add the family's fields
    (:func:`classifier_overrides`) as overrides for BEiT / CAE / MAGE."""
    return ViTClassifier(**{**_PRESETS["vit_tiny_patch4_32_cls_debug"], **kwargs})
