"""MAGE, masked generative encoder (Li et al. 2023), on a frozen VQ tokenizer's token ids; and MAGE-C.

Semantics follow the official code (LTH14/mage ``models_mage.py``, ``MaskedGenerativeEncoderViT``; SPEC.md):
vocabulary = codebook (1024) + classes (1000) + 1, mask id = vocab - 1; a class token (MAGE's *fake class label*
``codebook_size + 1100 - 1024``, i.e. class slot 76) is prepended and never masked; one truncated-normal mask ratio
per batch; per sample ceil(L * mask_ratio_min) tokens are dropped and ceil(L * ratio) masked (the dropped ones plus
some kept tokens replaced by the mask id); encoder input = BERT embeddings (word + learned position, LayerNorm eps
1e-6, dropout 0.1) of [cls ; kept tokens]; the decoder puts the decoder-embedded class-token feature at every masked
position (dropped or not), adds a learned position embedding; MLM head Linear -> GELU -> LayerNorm (torch's default
eps 1e-5, as official) -> ``h @ E^T + b`` with the input word embedding E tied but detached; loss = label-smoothed
(0.1) CE over ``logits[..., :codebook_size]``, averaged over the masked positions only (official ``forward_loss``).

Two paths over the same parameters, selected by ``fused`` (default True):

* fused: ``mimfast::gather_tokens`` (kept tokens + position embedding + class-token prefix, int32 indices),
  ``mimfast::restore_tokens`` with the per-sample class-token feature as the filler (kept-but-masked positions are
  pointed at a filler slot of the restore index, so one launch does scatter + padding + position add), attention on
  the default backend, and :func:`~mimfast.ops.cross_entropy.linear_cross_entropy` over the first ``codebook_size``
  rows of the detached embedding with label smoothing. No host synchronisation: the number of masked tokens lives on
  the device, so the head scores all L rows with ``ignore_index`` on the unmasked ones (exactly the mean over masked
  positions; at most 50% extra head rows, under 1% of the step's FLOPs) instead of a data-dependent row count.
* eager twin (``fused=False``): the official code path op for op: full-vocabulary logits, boolean ``nonzero``
  indexing for the drop and the padding, ``torch.where``, explicit softmax attention (one difference: the official
  ``Attention`` computes q k^T in fp32 under autocast; the shared :class:`~mimfast.layers.vit.Block` uses the
  autocast dtype), ``F.cross_entropy(label_smoothing)`` = MAGE's ``LabelSmoothingCrossEntropy`` on sliced logits.

Masks come from :func:`mimfast.ops.masking.mage_masking` (on the device); pass ``mask=`` (or a seeded
``generator=``) to give both paths the same drop / mask decision.

MAGE-C (``contrastive=True``) has NO public code (the repository ships converted checkpoints only): it is built
from the paper's description, a SimCLR InfoNCE loss (weight 0.1) on the average-pooled encoder output through a
2-layer MLP. Our choices are documented on :meth:`MAGE.contrastive_loss` and the config fields.
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
from ..layers.vit import Block
from ..ops.cross_entropy import linear_cross_entropy
from ..ops.masking import MageMask, mage_masking
from ..ops.tokens import gather_tokens, restore_tokens
from .registry import register_model

__all__ = ["MAGE", "MAGEConfig"]

IGNORE_INDEX = -100
"""Target of the fused head's unmasked rows (never a token id)."""
OFFICIAL_FAKE_CLASS_ID = 1100 - 1024
"""MAGE's ``fake_class_label = codebook_size + 1100 - 1024``: the unconditional class token is class slot 76."""
_OFFICIAL_UNUSED = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}  # + patch_embed.*, decoder_pred.*


@dataclass
class MAGEConfig:
    """Architecture and loss of MAGE (defaults: ViT-B/16 encoder, 768-d 8-block decoder, VQGAN f16 with 1024 codes)."""

    img_size: int = 256
    """Image resolution the tokenizer takes (square); the token grid is img_size / patch_size per side."""
    patch_size: int = 16
    """The tokenizer's downsampling factor (MAGE's VQGAN: 16, so 256 px -> 16 x 16 = 256 tokens)."""
    codebook_size: int = 1024
    """Tokenizer codes; token ids are in [0, codebook_size) and the loss scores only these logits."""
    num_classes: int = 1000
    """Class-token slots (vocabulary = codebook_size + num_classes + 1; class c is id codebook_size + c)."""
    fake_class_id: int | None = None
    """Class slot of the unconditional class token. None: MAGE's 76 (id 1100 for 1024 codes) when num_classes > 76,
    else num_classes - 1. It shares its slot with a real class, as in the official code."""
    embed_dim: int = 768
    """Encoder width D (also the word-embedding width the MLM head scores against)."""
    depth: int = 12
    """Encoder blocks."""
    num_heads: int = 12
    """Encoder attention heads (divides embed_dim)."""
    decoder_embed_dim: int = 768
    """Decoder width."""
    decoder_depth: int = 8
    """Decoder blocks."""
    decoder_num_heads: int = 16
    """Decoder attention heads (divides decoder_embed_dim)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / block width."""
    dropout: float = 0.1
    """Dropout of the BERT embeddings and of every block's projection / MLP outputs (official: 0.1 everywhere)."""
    attn_dropout: float = 0.1
    """Dropout on the attention weights of every block (official: 0.1)."""
    mask_ratio_min: float = 0.5
    """Lower bound of the truncated-normal mask ratio; ceil(L * mask_ratio_min) tokens are dropped."""
    mask_ratio_max: float = 1.0
    """Upper bound of the mask ratio."""
    mask_ratio_mu: float = 0.55
    """Mean of the (untruncated) normal of the mask ratio."""
    mask_ratio_std: float = 0.25
    """Std of the (untruncated) normal of the mask ratio."""
    label_smoothing: float = 0.1
    """Label smoothing of the CE, spread over the codebook_size code logits only (official 0.1)."""
    layer_norm_eps: float = 1e-6
    """Epsilon of the embedding, block, encoder and decoder norms (official partial(LayerNorm, eps=1e-6))."""
    mlm_layer_norm_eps: float = 1e-5
    """Epsilon of the MLM head's LayerNorm (official ``nn.LayerNorm(word_emb_dim)``: torch's default 1e-5)."""
    contrastive: bool = False
    """MAGE-C: add the InfoNCE loss on two views (forward needs ``token_ids_view2``); adds ``projector.*``."""
    contrastive_weight: float = 0.1
    """Weight of the contrastive loss (paper: 0.1)."""
    contrastive_temperature: float = 0.1
    """InfoNCE temperature. The paper gives no value in its text; 0.1 is SimCLR's ImageNet setting, whose loss MAGE-C
    says it follows."""
    proj_hidden_dim: int = 2048
    """Hidden width of the 2-layer projection MLP (SimCLR: 2048)."""
    proj_dim: int = 256
    """Output width of the projection MLP."""

    def __post_init__(self):
        def bad(name: str, want: str):
            return ValueError(f"MAGEConfig.{name}: expected {want}, got {getattr(self, name)!r}")

        def real(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        ints = ("img_size", "patch_size", "codebook_size", "num_classes", "embed_dim", "depth", "num_heads",
                "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "proj_hidden_dim", "proj_dim")  # fmt: skip
        for name in ints:
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise bad(name, "an int >= 1")
        if self.img_size % self.patch_size:
            raise bad("img_size", f"a multiple of patch_size={self.patch_size} (the tokenizer's factor)")
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise bad(dim, f"a multiple of {heads}={getattr(self, heads)}")
        if self.fake_class_id is None:
            n = self.num_classes
            self.fake_class_id = OFFICIAL_FAKE_CLASS_ID if n > OFFICIAL_FAKE_CLASS_ID else n - 1
        elif not (isinstance(self.fake_class_id, int) and 0 <= self.fake_class_id < self.num_classes):
            raise bad("fake_class_id", f"None or an int in [0, num_classes={self.num_classes})")
        if not (real(self.mlp_ratio) and self.mlp_ratio > 0):
            raise bad("mlp_ratio", "a float > 0")
        for name in ("dropout", "attn_dropout", "mask_ratio_min", "mask_ratio_max"):
            if not (real(getattr(self, name)) and 0.0 <= getattr(self, name) <= 1.0):
                raise bad(name, "a float in [0, 1]")
        if self.dropout == 1.0 or self.attn_dropout == 1.0:
            raise bad("dropout" if self.dropout == 1.0 else "attn_dropout", "a float in [0, 1)")
        if self.mask_ratio_min <= 0.0:
            raise bad("mask_ratio_min", "a float in (0, 1] (MAGE drops ceil(L * mask_ratio_min) >= 1 tokens)")
        if self.mask_ratio_max < self.mask_ratio_min:
            raise bad("mask_ratio_max", f"a float >= mask_ratio_min={self.mask_ratio_min}")
        if not real(self.mask_ratio_mu):
            raise bad("mask_ratio_mu", "a finite float")
        if not (real(self.mask_ratio_std) and self.mask_ratio_std >= 0):
            raise bad("mask_ratio_std", "a finite float >= 0")
        if not (real(self.label_smoothing) and 0.0 <= self.label_smoothing < 1.0):
            raise bad("label_smoothing", "a float in [0, 1)")
        for name in ("layer_norm_eps", "mlm_layer_norm_eps", "contrastive_temperature"):
            if not (real(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "a finite float > 0")
        if not isinstance(self.contrastive, bool):
            raise bad("contrastive", "a bool")
        if not (real(self.contrastive_weight) and self.contrastive_weight >= 0):
            raise bad("contrastive_weight", "a finite float >= 0")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """L, tokens per image."""
        return self.grid_size**2

    @property
    def num_dropped(self) -> int:
        """ceil(L * mask_ratio_min), tokens dropped before the encoder (MAGE's ``int(np.ceil(...))``)."""
        return int(math.ceil(self.num_tokens * self.mask_ratio_min))

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 1


class BertEmbeddings(nn.Module):
    """MAGE's ``BertEmbeddings`` (same names): word + learned position embedding, LayerNorm, dropout.

    The official module also holds a ``position_ids`` buffer (``arange(L + 1)``); it carries no information, so it is
    not registered here (the checkpoint loader verifies and drops it; :meth:`MAGE.official_state_dict` writes it).
    """

    def __init__(self, vocab_size: int, dim: int, num_positions: int, eps: float, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(num_positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, 1 + L) -> (B, 1 + L, D), positions 0 .. L (the official forward)."""
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[: input_ids.shape[1]]
        return self.dropout(self.LayerNorm(x))


class MlmLayer(nn.Module):
    """MAGE's ``MlmLayer`` (same names): ``LN(GELU(fc(x))) @ E^T + bias``; ``bias`` is (1, 1, V) as official."""

    def __init__(self, feat_dim: int, word_dim: int, vocab_size: int, eps: float):
        super().__init__()
        self.fc = nn.Linear(feat_dim, word_dim)
        self.gelu = nn.GELU()
        self.ln = nn.LayerNorm(word_dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(..., Dd) -> (..., D), the rows the logits are scored from."""
        return self.ln(self.gelu(self.fc(x)))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """x (B, N, Dd), word_embeddings (V, D) -> logits (B, N, V)."""
        return torch.matmul(self.hidden(x), word_embeddings.transpose(0, 1)) + self.bias


class ProjectionHead(nn.Module):
    """MAGE-C's 2-layer projection MLP (our design, from the paper's "2-layer MLP"): fc1 -> ReLU -> fc2."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MAGE(nn.Module):
    """MAGE pretraining model on token ids (the training task tokenizes with a frozen tokenizer).

    ``forward(token_ids (B, L) int64, *, class_ids=None, token_ids_view2=None, mask=None, generator=None)
    -> (loss (), metrics {"loss_mlm", "mask_ratio"[, "loss_contrastive"]})``.

    Attributes used by the MaskGIT sampler: ``mask_token_id``, ``config.codebook_size``, ``config.num_classes``,
    ``grid_size``, :meth:`predict_logits`. Also ``vocab_size`` and ``fake_class_label`` (official names).

    Args:
        config: a :class:`MAGEConfig` (or its fields as keyword arguments).
        fused: fused kernels and the default attention backend (True) or the official code path (False).
    """

    task = "mage"
    """The training task (``mimfast.train.tasks``) that knows how to train and evaluate this model."""

    def __init__(self, config: MAGEConfig | None = None, *, fused: bool = True, **kwargs):
        super().__init__()
        if config is None:
            config = MAGEConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        self.fused = fused
        self.grid_size = c.grid_size
        self.vocab_size = c.vocab_size
        self.mask_token_id = c.vocab_size - 1
        self.fake_class_label = c.codebook_size + c.fake_class_id
        ln = lambda d: nn.LayerNorm(d, eps=c.layer_norm_eps)  # noqa: E731
        seq = c.num_tokens

        def block(d, h):
            return Block(d, h, c.mlp_ratio, qkv_bias=True, drop=c.dropout, attn_drop=c.attn_dropout, norm_layer=ln)

        self.token_emb = BertEmbeddings(c.vocab_size, c.embed_dim, seq + 1, c.layer_norm_eps, c.dropout)
        self.blocks = nn.ModuleList(block(c.embed_dim, c.num_heads) for _ in range(c.depth))
        self.norm = ln(c.embed_dim)
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq + 1, c.decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(block(c.decoder_embed_dim, c.decoder_num_heads)
                                            for _ in range(c.decoder_depth))  # fmt: skip
        self.decoder_norm = ln(c.decoder_embed_dim)
        self.mlm_layer = MlmLayer(c.decoder_embed_dim, c.embed_dim, c.vocab_size, c.mlm_layer_norm_eps)
        self.projector = ProjectionHead(c.embed_dim, c.proj_hidden_dim, c.proj_dim) if c.contrastive else None
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------------ weights
    def initialize_weights(self) -> None:
        """MAGE's init: embeddings and the learned decoder position N(0, 0.02), Linear xavier-uniform with zero bias,
        LayerNorm (1, 0), MLM bias 0."""
        if self.decoder_pos_embed_learned.device.type == "meta":
            return
        nn.init.normal_(self.token_emb.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.token_emb.position_embeddings.weight, std=0.02)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)
        nn.init.zeros_(self.mlm_layer.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------ official checkpoints
    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the official names (identical to ours) plus ``token_emb.position_ids``. The official
        model also holds the frozen VQGAN (``vqgan.*``) and parameters its forward never uses (``cls_token``,
        ``pos_embed``, ``patch_embed.*``, ``mask_token``, ``decoder_pos_embed``, ``decoder_pred.*``): load this into
        it with ``strict=False``."""
        sd = dict(self.state_dict())
        ref = self.token_emb.position_embeddings.weight
        sd["token_emb.position_ids"] = torch.arange(ref.shape[0], device=ref.device).unsqueeze(0)
        return sd

    def load_official_state_dict(self, state_dict: dict, *, strict: bool = True) -> dict[str, list[str]]:
        """Load a released MAGE / MAGE-C checkpoint (its ``torch.load`` result ``{"model": ...}`` or the inner dict).

        Names are the official ones. Dropped (never loaded, listed under ``"ignored"``): the frozen tokenizer
        ``vqgan.*`` (load it with :mod:`mimfast.models.mage_vqgan`), the parameters the official forward never uses
        (``cls_token``, ``pos_embed``, ``patch_embed.*``, ``mask_token``, ``decoder_pos_embed``, ``decoder_pred.*``)
        and ``token_emb.position_ids`` (verified to be ``arange``). A DDP ``module.`` prefix is removed. A missing
        ``projector.*`` (a MAGE checkpoint into a MAGE-C model) keeps its initialisation with a warning; ``projector.*``
        keys into a non-contrastive model are ignored. Other unexpected keys (e.g. a converted MAGE-C checkpoint's own
        projection-head names, unknown to us) raise unless ``strict=False``, which ignores them; other missing keys
        raise unless ``strict=False`` (then they keep their initialisation). A shape mismatch always raises.

        Returns:
            ``{"missing": our keys not loaded, "ignored": checkpoint keys not loaded}``.
        """
        sd = state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict: expected a dict of tensors (or {{'model': ...}}), got {type(sd).__name__}")
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        own = self.state_dict()
        dropped = ("vqgan.", "patch_embed.", "decoder_pred.")
        ignored = sorted(k for k in sd if k in _OFFICIAL_UNUSED or k.startswith(dropped))
        pid = sd.get("token_emb.position_ids")
        if pid is not None:
            want = torch.arange(self.config.num_tokens + 1).unsqueeze(0)
            if not (isinstance(pid, torch.Tensor) and torch.equal(pid.to("cpu", torch.long), want)):
                raise ValueError("state_dict['token_emb.position_ids']: expected arange(L + 1) of shape "
                                 f"{tuple(want.shape)} (a {self.grid_size}x{self.grid_size} token grid)")  # fmt: skip
            ignored.append("token_emb.position_ids")
        if self.projector is None:
            ignored += [k for k in sd if k.startswith("projector.")]
        rest = {k: v for k, v in sd.items() if k not in set(ignored)}
        unexpected = sorted(set(rest) - set(own))
        missing = sorted(set(own) - set(rest))
        other_missing = [k for k in missing if not k.startswith("projector.")]
        if strict and (unexpected or other_missing):
            raise KeyError(
                f"state_dict: unexpected keys {unexpected[:8]}, missing keys {other_missing[:8]} "
                "(official names; strict=False ignores unexpected keys, keeps missing ones initialised)"
            )
        ignored += unexpected
        for k in unexpected:
            rest.pop(k)
        for k, v in rest.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"state_dict[{k!r}]: expected a tensor, got {type(v).__name__}")
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"state_dict[{k!r}]: expected shape {tuple(own[k].shape)}, got {tuple(v.shape)} "
                                 "(a different codebook / class count / token grid or architecture?)")  # fmt: skip
        self.load_state_dict(rest, strict=False)
        if missing:
            what = "no projection head (a MAGE checkpoint)" if not other_missing else f"missing keys {missing[:4]}"
            warnings.warn(f"MAGE checkpoint has {what}: {len(missing)} keys keep their initialisation", stacklevel=2)
        return {"missing": missing, "ignored": sorted(ignored)}

    # ------------------------------------------------------------------------------------------------ checks
    def _check_ids(self, ids, name: str, *, allow_mask: bool, validate: bool | None, bsz: int | None = None):
        c = self.config
        want = f"({'B' if bsz is None else bsz}, {c.num_tokens})"
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name}: expected an int64 tensor {want} of token ids, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}: expected integer token ids (int64 or int32), got {ids.dtype}")
        if ids.dim() != 2 or ids.shape[1] != c.num_tokens or (bsz is not None and ids.shape[0] != bsz):
            raise ValueError(f"{name}: expected shape {want} ({self.grid_size}x{self.grid_size} tokens, row-major), "
                             f"got {tuple(ids.shape)}")  # fmt: skip
        if ids.shape[0] == 0:
            raise ValueError(f"{name}: empty batch")
        hi = c.codebook_size
        ok = (ids >= 0) & (ids < hi)
        if allow_mask:
            ok |= ids == self.mask_token_id
        what = f"{name}: expected token ids in [0, codebook_size={hi})" + (
            f" or the mask id {self.mask_token_id}" if allow_mask else "")  # fmt: skip
        if (ids.device.type == "cpu") if validate is None else validate:
            if not bool(ok.all()):
                bad = ids[~ok]
                raise ValueError(f"{what}, got {int(bad[0])} (range [{int(ids.min())}, {int(ids.max())}])")
        else:  # no host sync: a bad batch fails on the device instead of training on garbage
            torch._assert_async(ok.all(), what)
        return ids.long()

    def _class_labels(self, class_ids, bsz: int, device, validate: bool | None) -> torch.Tensor | None:
        """(B,) vocabulary ids of the class token, or None for the fake class label of every sample."""
        if class_ids is None:
            return None
        n = self.config.num_classes
        if not isinstance(class_ids, torch.Tensor) or class_ids.dtype not in (torch.int64, torch.int32):
            got = class_ids.dtype if isinstance(class_ids, torch.Tensor) else type(class_ids).__name__
            raise TypeError(f"class_ids: expected an int64 tensor of shape ({bsz},), got {got}")
        if tuple(class_ids.shape) != (bsz,):
            raise ValueError(f"class_ids: expected shape ({bsz},) (one class per sample), got {tuple(class_ids.shape)}")
        if class_ids.device != torch.device(device):
            raise ValueError(f"class_ids: device {class_ids.device} differs from token_ids' {device}")
        ok = (class_ids >= 0) & (class_ids < n)
        if (class_ids.device.type == "cpu") if validate is None else validate:
            if not bool(ok.all()):
                raise ValueError(f"class_ids: expected class ids in [0, num_classes={n}), got range "
                                 f"[{int(class_ids.min())}, {int(class_ids.max())}]")  # fmt: skip
        else:
            torch._assert_async(ok.all(), f"class_ids: expected class ids in [0, num_classes={n})")
        return class_ids.long() + self.config.codebook_size

    def _check_mask(self, m, n: int, device) -> MageMask:
        seq, lk = self.config.num_tokens, self.config.num_tokens - self.config.num_dropped
        if not isinstance(m, MageMask):
            raise TypeError(f"mask: expected a MageMask from mimfast.ops.masking.mage_masking, got {type(m).__name__}")
        shapes = dict(drop_mask=(n, seq), token_all_mask=(n, seq), ids_keep=(n, lk), ids_restore=(n, seq))
        for name, want in shapes.items():
            t = getattr(m, name)
            if tuple(t.shape) != want or t.device != torch.device(device):
                raise ValueError(
                    f"mask.{name}: expected shape {want} on {device} (B = {n} rows, "
                    f"mask_ratio_min={self.config.mask_ratio_min}), got {tuple(t.shape)} on {t.device}"
                )
        return m

    def sample_mask(self, batch_size: int, *, device=None, generator: torch.Generator | None = None) -> MageMask:
        """One batch's drop / mask decision (:func:`mage_masking` with this config's ratio distribution, int32)."""
        c = self.config
        return mage_masking(batch_size, c.num_tokens, ratio_mean=c.mask_ratio_mu, ratio_std=c.mask_ratio_std,
                            ratio_min=c.mask_ratio_min, ratio_max=c.mask_ratio_max, device=device,
                            generator=generator, index_dtype=torch.int32)  # fmt: skip

    def _attn(self):
        return attention_backend(None if self.fused else "eager")

    def _run(self, blocks, norm, x):
        for blk in blocks:
            x = blk(x)
        return norm(x)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, token_ids: torch.Tensor, *, class_ids: torch.Tensor | None = None,
                token_ids_view2: torch.Tensor | None = None, mask: MageMask | None = None,
                generator: torch.Generator | None = None, validate: bool | None = None):  # fmt: skip
        """One MAGE (or MAGE-C) pretraining loss.

        Args:
            token_ids: (B, L) int64 tokenizer ids in [0, codebook_size), row-major over the grid.
            class_ids: optional (B,) class ids in [0, num_classes) for class-conditional training (class token =
                codebook_size + class id); None puts MAGE's fake class label in every sample (unconditional).
            token_ids_view2: (B, L) the second view's ids, required iff ``config.contrastive`` (MAGE-C).
            mask: optional :class:`MageMask` for the (B, L) batch, or (2B, L) with the view-2 rows last under MAGE-C
                (from :meth:`sample_mask`); None draws one with ``generator``.
            generator: torch.Generator for the mask ratio and noise when ``mask`` is None.
            validate: check id ranges on the host (a sync): None = for CPU tensors only; otherwise asserted on the
                device (the error surfaces asynchronously).

        Returns:
            (loss (), metrics) with ``loss_mlm`` (label-smoothed CE over masked positions), ``mask_ratio`` (this
            batch's draw) and, with MAGE-C, ``loss_contrastive`` (unweighted InfoNCE), all detached.
        """
        c = self.config
        ids = self._check_ids(token_ids, "token_ids", allow_mask=False, validate=validate)
        bsz = ids.shape[0]
        labels = self._class_labels(class_ids, bsz, ids.device, validate)
        if token_ids_view2 is None and c.contrastive:
            raise ValueError("token_ids_view2: MAGE-C (config.contrastive=True) needs the second view's token ids")
        if token_ids_view2 is not None and not c.contrastive:
            raise ValueError("token_ids_view2: given, but config.contrastive is False (plain MAGE)")
        if token_ids_view2 is not None:
            ids2 = self._check_ids(token_ids_view2, "token_ids_view2", allow_mask=False, validate=validate, bsz=bsz)
            if ids2.device != ids.device:
                raise ValueError(f"token_ids_view2: device {ids2.device} differs from token_ids' {ids.device}")
            ids = torch.cat([ids, ids2])
            labels = None if labels is None else torch.cat([labels, labels])
        n = ids.shape[0]
        m = self.sample_mask(n, device=ids.device, generator=generator) if mask is None else mask
        m = self._check_mask(m, n, ids.device)
        with self._attn():
            if self.fused:
                latent, loss_mlm = self._forward_fused(ids, labels, m)
            else:
                latent, logits = self._forward_official(ids, labels, m)
                loss_mlm = self._official_loss(ids, logits, m.token_all_mask.float())
        metrics = {"loss_mlm": loss_mlm.detach(), "mask_ratio": m.ratio.detach().float()}
        loss = loss_mlm
        if c.contrastive:
            loss_con = self.contrastive_loss(latent)
            loss = loss + c.contrastive_weight * loss_con
            metrics["loss_contrastive"] = loss_con.detach()
        return loss, metrics

    def _cls_prefix(self, labels: torch.Tensor | None) -> torch.Tensor:
        """(1, D) shared or (N, 1, D) per-sample class-token embedding before the LayerNorm (word + position 0)."""
        w, p0 = self.token_emb.word_embeddings.weight, self.token_emb.position_embeddings.weight[:1]
        if labels is None:
            return w[self.fake_class_label].unsqueeze(0) + p0
        return (F.embedding(labels, w) + p0).unsqueeze(1)

    def _forward_fused(self, ids: torch.Tensor, labels: torch.Tensor | None, m: MageMask):
        c = self.config
        emb = self.token_emb
        inp = torch.where(m.token_all_mask, self.mask_token_id, ids)
        x = gather_tokens(emb.word_embeddings(inp), m.ids_keep, pos=emb.position_embeddings.weight[1:],
                          prefix=self._cls_prefix(labels), ids_restore=m.ids_restore, validate=False)  # fmt: skip
        latent = self._run(self.blocks, self.norm, emb.dropout(emb.LayerNorm(x)))  # (N, 1 + Lk, D)
        y = self.decoder_embed(latent)
        # every masked slot takes the sample's class-token feature: dropped slots already point past the Lk kept rows
        # (the filler), kept-but-masked ones are pointed there too (lk < L since at least one token is dropped)
        lk = c.num_tokens - c.num_dropped
        ids_dec = torch.where(m.token_all_mask, m.ids_restore.clamp_min(lk), m.ids_restore)
        y = restore_tokens(y, ids_dec, y[:, 0], pos=self.decoder_pos_embed_learned[0], num_prefix=1,
                           covers_all=False, validate=False)  # fmt: skip
        h = self._run(self.decoder_blocks, self.decoder_norm, y)[:, 1:]  # (N, L, Dd): the class row is never scored
        rows = self.mlm_layer.hidden(h).reshape(-1, c.embed_dim)
        target = torch.where(m.token_all_mask, ids, IGNORE_INDEX).reshape(-1)
        loss = linear_cross_entropy(rows, self.token_emb.word_embeddings.weight.detach(), target,
                                    self.mlm_layer.bias.reshape(-1), label_smoothing=c.label_smoothing,
                                    vocab_size=c.codebook_size, validate=False)  # fmt: skip
        return latent, loss

    def _forward_official(self, ids: torch.Tensor, labels: torch.Tensor | None, m: MageMask):
        """The official ``forward_encoder`` + ``forward_decoder`` -> (latent (N, 1 + Lk, D), logits (N, 1 + L, V))."""
        n = ids.shape[0]
        token_indices = ids.clone()
        token_all_mask, token_drop_mask = m.token_all_mask.float(), m.drop_mask.float()
        token_indices[token_all_mask.nonzero(as_tuple=True)] = self.mask_token_id
        token_indices = torch.cat([torch.zeros(n, 1, device=ids.device, dtype=ids.dtype), token_indices], dim=1)
        token_indices[:, 0] = self.fake_class_label if labels is None else labels
        zero = torch.zeros(n, 1, device=ids.device)
        token_drop_mask = torch.cat([zero, token_drop_mask], dim=1)
        token_all_mask = torch.cat([zero, token_all_mask], dim=1)
        input_embeddings = self.token_emb(token_indices)
        bsz, _, emb_dim = input_embeddings.shape
        token_keep_mask = 1 - token_drop_mask
        x = input_embeddings[token_keep_mask.nonzero(as_tuple=True)].reshape(bsz, -1, emb_dim)
        latent = self._run(self.blocks, self.norm, x)
        return latent, self._official_decoder(latent, token_drop_mask, token_all_mask)

    def _official_decoder(self, x, token_drop_mask, token_all_mask) -> torch.Tensor:
        """Official ``forward_decoder`` (pad_with_cls_token=True): (N, 1 + Lk, D) -> logits (N, 1 + L, V)."""
        x = self.decoder_embed(x)
        mask_tokens = x[:, 0:1].repeat(1, token_all_mask.shape[1], 1)
        x_after_pad = mask_tokens.clone()
        x_after_pad[(1 - token_drop_mask).nonzero(as_tuple=True)] = x.reshape(x.shape[0] * x.shape[1], x.shape[2])
        x_after_pad = torch.where(token_all_mask.unsqueeze(-1).bool(), mask_tokens, x_after_pad)
        x = self._run(self.decoder_blocks, self.decoder_norm, x_after_pad + self.decoder_pos_embed_learned)
        return self.mlm_layer(x, self.token_emb.word_embeddings.weight.data.detach())

    def _official_loss(self, gt_indices: torch.Tensor, logits: torch.Tensor, token_all_mask: torch.Tensor):
        """Official ``forward_loss``: label-smoothed CE on ``logits[:, 1:, :codebook_size]``, mean over masked."""
        bsz, seq_len = gt_indices.shape
        cb = self.config.codebook_size
        loss = F.cross_entropy(logits[:, 1:, :cb].reshape(bsz * seq_len, -1).float(), gt_indices.reshape(-1),
                               reduction="none", label_smoothing=self.config.label_smoothing)  # fmt: skip
        mask = token_all_mask.reshape(bsz, seq_len)
        return (loss.reshape(bsz, seq_len) * mask).sum() / mask.sum()

    def contrastive_loss(self, latent: torch.Tensor) -> torch.Tensor:
        """MAGE-C's InfoNCE (SimCLR's NT-Xent) of a (2B, 1 + Lk, D) encoder output, rows [view 1 ; view 2].

        Our choices (no official code): pool = mean of the encoder output over the kept tokens, class token excluded
        (with the fake label its input is the same for every image; the official linear probe's global pool also
        excludes it); head Linear -> ReLU -> Linear (SimCLR without its BatchNorm); z = normalize(head(pool)),
        logits = z z^T / temperature in fp32 without self-similarity; each view's positive is the other view of its
        image, its negatives the other 2B - 2 views of this per-rank batch (no cross-rank gather); CE averaged over
        the 2B anchors. Both views run as one 2B batch sharing the step's one mask ratio, each with its own drop /
        mask noise, so the MLM loss is the mean over both views' masked positions (= the mean of the two views').
        """
        n = latent.shape[0]
        if self.projector is None or n % 2:
            raise ValueError(f"latent: expected 2B rows of a MAGE-C model (config.contrastive=True), got {n}")
        b = n // 2
        z = F.normalize(self.projector(latent[:, 1:].mean(dim=1)).float(), dim=-1)
        sim = (z @ z.t()) / self.config.contrastive_temperature
        eye = torch.eye(n, dtype=torch.bool, device=z.device)
        sim = sim.masked_fill(eye, float("-inf"))
        target = torch.cat([torch.arange(b, n), torch.arange(0, b)]).to(z.device)
        return F.cross_entropy(sim, target)

    # -------------------------------------------------------------------------------------- features / sampling
    def _embed_all(self, ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """[cls ; ids] -> BERT embeddings (N, 1 + L, D), nothing dropped."""
        cls = torch.full((ids.shape[0], 1), self.fake_class_label, dtype=torch.long, device=ids.device)
        if labels is not None:
            cls = labels.unsqueeze(1)
        return self.token_emb(torch.cat([cls, ids], dim=1))

    def forward_features(self, token_ids: torch.Tensor, class_ids: torch.Tensor | None = None, *,
                         validate: bool | None = None) -> torch.Tensor:  # fmt: skip
        """The encoder on all tokens, unmasked (the official linear probe's input): token_ids (B, L) in
        [0, codebook_size) -> (B, 1 + L, D) after the final norm; row 0 is the class token."""
        ids = self._check_ids(token_ids, "token_ids", allow_mask=False, validate=validate)
        labels = self._class_labels(class_ids, ids.shape[0], ids.device, validate)
        with self._attn():
            return self._run(self.blocks, self.norm, self._embed_all(ids, labels))

    def predict_logits(self, token_ids: torch.Tensor, class_ids: torch.Tensor | None = None, *,
                       validate: bool | None = None) -> torch.Tensor:  # fmt: skip
        """MAGE's generation forward (official ``gen_image`` step): nothing dropped, unknown positions carry the mask
        id into the encoder and the class-token feature into the decoder. Call ``model.eval()`` first (dropout).

        Args:
            token_ids: (B, L) ids in [0, codebook_size), ``mask_token_id`` at the unknown positions.
            class_ids: optional (B,) class ids (class-conditional models); None = the fake class label.

        Returns:
            (B, L, codebook_size) fp32 logits of the codes (the class / mask logits are never computed).
        """
        ids = self._check_ids(token_ids, "token_ids", allow_mask=True, validate=validate)
        labels = self._class_labels(class_ids, ids.shape[0], ids.device, validate)
        cb = self.config.codebook_size
        with self._attn():
            latent = self._run(self.blocks, self.norm, self._embed_all(ids, labels))
            unknown = torch.cat([torch.zeros_like(ids[:, :1], dtype=torch.bool), ids == self.mask_token_id], dim=1)
            if not self.fused:  # the official decoder with an all-zero drop mask
                zeros = torch.zeros(ids.shape[0], ids.shape[1] + 1, device=ids.device)
                return self._official_decoder(latent, zeros, unknown.float())[:, 1:, :cb].float()
            y = self.decoder_embed(latent)
            y = torch.where(unknown.unsqueeze(-1), y[:, :1], y) + self.decoder_pos_embed_learned
            h = self.mlm_layer.hidden(self._run(self.decoder_blocks, self.decoder_norm, y)[:, 1:])
            w = self.token_emb.word_embeddings.weight.detach()[:cb]
            return F.linear(h, w, self.mlm_layer.bias.reshape(-1)[:cb]).float()

    @torch.no_grad()
    def generate(self, num_images: int, steps: int = 12, temperature: float = 4.5, *, class_ids=None,
                 generator: torch.Generator | None = None, tokenizer=None, batch_size: int | None = None,
                 autocast_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
        """MaskGIT decoding on the model's device (:func:`mimfast.models.maskgit.maskgit_sample`: SPEC.md's cosine
        schedule, ``temperature`` = the choice temperature of the Gumbel confidence, seeded by ``generator``).

        Args:
            num_images: N >= 1. steps: T >= 1 (MAGE: 12; 20 for FID). temperature: >= 0 (MAGE: 4.5; 6.0 for FID).
            class_ids: None (unconditional), one int, or N ints in [0, num_classes) (class-conditional models).
            generator: a ``torch.Generator`` of the model's device. tokenizer: decodes the ids to images (default:
                the tokenizer the MAGE task attached when the run was loaded, if any; ``False``, or None and none
                attached, returns the ids). batch_size: images per sampling call. autocast_dtype: e.g.
                torch.bfloat16 on CUDA.

        Returns:
            images (N, 3, H, W) float32 on the CPU in the tokenizer's (the run's normalised) space, or token ids
            (N, G, G) int64 on the model's device without a tokenizer. Switches the model to eval mode.
        """
        from .maskgit import generate as _generate
        from .maskgit import maskgit_sample

        self.eval()
        if tokenizer is None:
            ref = getattr(self, "_mimfast_tokenizer", None)
            tokenizer = ref[0] if ref else None
        if tokenizer is not False and tokenizer is not None and callable(getattr(tokenizer, "decode", None)):
            return _generate(self, tokenizer, num_images, steps=steps, choice_temperature=temperature,
                             class_ids=class_ids, batch_size=batch_size, generator=generator,
                             autocast_dtype=autocast_dtype)  # fmt: skip
        if isinstance(class_ids, int):
            class_ids = [class_ids] * num_images
        device = self.token_emb.word_embeddings.weight.device
        cls = None if class_ids is None else torch.as_tensor(class_ids, dtype=torch.long, device=device)
        amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

        def logits_fn(ids, c=None):
            with amp:
                return self.predict_logits(ids, c)

        g = self.grid_size
        ids = maskgit_sample(logits_fn, num_images, g * g, mask_id=int(self.mask_token_id), steps=steps,
                             choice_temperature=temperature, generator=generator, device=device, class_ids=cls,
                             num_classes=self.config.num_classes)  # fmt: skip
        return ids.view(num_images, g, g)

    # ------------------------------------------------------------------------------------------------ metrics
    def flops_per_image(self, *, training: bool = True) -> float:
        """Matmul FLOPs for one image (2 per multiply-add; backward = 2x forward when ``training``), as the fused
        path runs: encoder on 1 + Lk tokens, decoder on 1 + L, MLM fc and the codebook_size logits on L rows; MAGE-C
        doubles it (two views) and adds the projection head. ViT-B/16 MAGE: about 162 GFLOP per training image."""
        c = self.config
        seq = c.num_tokens
        n_enc, n_dec = 1 + seq - c.num_dropped, 1 + seq

        def blocks(n, d, depth):
            return depth * (2 * n * d * d * (4 + 2 * c.mlp_ratio) + 4 * n * n * d)

        fwd = blocks(n_enc, c.embed_dim, c.depth) + 2 * n_enc * c.embed_dim * c.decoder_embed_dim
        fwd += blocks(n_dec, c.decoder_embed_dim, c.decoder_depth)
        fwd += 2 * seq * c.embed_dim * (c.decoder_embed_dim + c.codebook_size)
        if c.contrastive:
            fwd = 2 * (fwd + 2 * c.proj_hidden_dim * (c.embed_dim + c.proj_dim))
        return float(fwd * (3 if training else 1))


# ----------------------------------------------------------------------------------------------------- registry
@register_model
def mage_vit_base_patch16(**kwargs) -> MAGE:
    """MAGE ViT-B/16: 768-d encoder (12 blocks, 12 heads), 768-d 8-block decoder (16 heads), VQGAN f16 with 1024
    codes at 256 px (16 x 16 tokens), 1000 classes (the official ``mage_vit_base_patch16``)."""
    cfg = dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_depth=8, decoder_num_heads=16)
    return MAGE(**{**cfg, **kwargs})


@register_model
def mage_vit_large_patch16(**kwargs) -> MAGE:
    """MAGE ViT-L/16: 1024-d encoder (24 blocks, 16 heads), 1024-d 8-block decoder (16 heads)."""
    cfg = dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=8, decoder_num_heads=16)
    return MAGE(**{**cfg, **kwargs})


@register_model
def mage_tiny_patch4_debug(**kwargs) -> MAGE:
    """A CPU-sized MAGE for tests and CI: 32 px / factor 4 (8 x 8 = 64 tokens), 128 codes (the debug tokenizer),
    10 classes (the built-in dataset; fake class slot 9), 96-d x 4 encoder (3 heads), 64-d x 2 decoder (4 heads),
    projection MLP 128 -> 32."""
    cfg = dict(img_size=32, patch_size=4, codebook_size=128, num_classes=10, embed_dim=96, depth=4, num_heads=3,
               decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, proj_hidden_dim=128,
               proj_dim=32)  # fmt: skip
    return MAGE(**{**cfg, **kwargs})
