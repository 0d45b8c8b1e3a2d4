"""A VQGAN-style image tokenizer (Esser et al. 2021): a convolutional encoder, a pluggable quantizer, a decoder.

The architecture and parameter names follow taming-transformers' ``VQModel`` (``encoder.down.{i}.block.{j}...``,
``encoder.mid.attn_1``, ``quant_conv``, ``post_quant_conv``, ``decoder.up.{i}...``), so a taming checkpoint loads
through :meth:`VQGAN.load_taming_state_dict`, which maps the quantizer's keys and drops the training loss's. The
quantizer is chosen by ``VQGANConfig.quantizer``: ``"vq"`` (learnable codebook, commitment loss), ``"ema"`` (EMA
codebook with dead-code restart), ``"gumbel"`` (taming's Gumbel quantizer: a 1x1 projection to K logits, Gumbel-softmax
with a temperature the launcher anneals, KL to the uniform prior) or ``"regvq"`` (Regularized VQ: usage-prior KL,
stochastic argmax / Gumbel mask, PCL weights); every quantizer keeps mimfast's drop-in call shape
``quantizer(z (B, D, h, w)) -> (z_q, indices (B, h, w), loss)``.

Token API (what BEiT / CAE / MAGE use): ``encode(images) -> ids (B, h, w)``, ``decode(ids) -> images``,
``get_codebook_entry(ids) -> (B, D, h, w)``. Images are the loader's normalised tensors; the decoder predicts the same
normalised space.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.gumbel_quantizer import GumbelQuantizer
from ..layers.quantizer import VectorQuantizer
from ..layers.regularized_quantizer import RegularizedQuantizer
from .registry import register_model

__all__ = ["VQGAN", "VQGANConfig"]

QUANTIZERS = ("vq", "ema", "gumbel", "regvq")


@dataclass
class VQGANConfig:
    """Architecture of a VQGAN tokenizer (defaults: taming's ImageNet f16 model with 1024 codes of dim 256)."""

    img_size: int = 256
    """Input resolution (square), a multiple of the downsampling factor ``2 ** (len(ch_mult) - 1)``."""
    in_chans: int = 3
    """Image channels."""
    ch: int = 128
    """Base width of the encoder / decoder (a multiple of ``num_groups``)."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Width multiplier per resolution level; ``len(ch_mult) - 1`` downsamplings (f16 for five levels)."""
    num_res_blocks: int = 2
    """Residual blocks per level (the decoder has one more per level, as in taming)."""
    attn_resolutions: tuple[int, ...] = (16,)
    """Feature-map sides at which a self-attention block follows each residual block."""
    z_channels: int = 256
    """Encoder output channels (before ``quant_conv``)."""
    embed_dim: int = 256
    """Code dimension D (after ``quant_conv``)."""
    codebook_size: int = 1024
    """Number of codes K."""
    quantizer: str = "vq"
    """``"vq"`` (learnable codebook), ``"ema"`` (EMA codebook, dead-code restart), ``"gumbel"`` or ``"regvq"``."""
    beta: float = 0.25
    """Commitment weight of the quantizer loss."""
    legacy_beta: bool = False
    """Put beta on the codebook term as taming's quantizer does by default (to reproduce a taming run's loss)."""
    ema_decay: float = 0.99
    """EMA decay (``quantizer="ema"``)."""
    dead_code_threshold: float = 0.0
    """``quantizer="ema"``: restart codes whose EMA cluster size falls below this (0 = never)."""
    kl_weight: float | None = None
    """``gumbel`` / ``regvq``: weight of the KL to the uniform prior (None: the quantizer's default, taming's 5e-4 for
    Gumbel, 0.1 for Regularized VQ)."""
    mask_ratio: float = 0.4
    """``regvq``: share of positions Gumbel-sampled in training (the paper's 0.4)."""
    distance_temperature: float = 1.0
    """``regvq``: T in logits = -||z - e||^2 / T."""
    num_groups: int = 32
    """GroupNorm groups (taming: 32)."""
    dropout: float = 0.0
    """Dropout inside the residual blocks."""
    extra: dict = field(default_factory=dict)
    """Reserved for quantizer-specific options."""

    def __post_init__(self):
        for name in ("img_size", "in_chans", "ch", "num_res_blocks", "z_channels", "embed_dim", "codebook_size",
                     "num_groups"):  # fmt: skip
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"VQGANConfig.{name}: expected an int >= 1, got {v!r}")
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        if not self.ch_mult or not all(isinstance(m, int) and m >= 1 for m in self.ch_mult):
            raise ValueError(f"VQGANConfig.ch_mult: expected a non-empty tuple of ints >= 1, got {self.ch_mult!r}")
        if self.img_size % self.factor:
            raise ValueError(f"VQGANConfig.img_size: expected a multiple of the downsampling factor {self.factor}, "
                             f"got {self.img_size}")  # fmt: skip
        widths = {self.ch * m for m in self.ch_mult} | {self.z_channels}
        if any(w % self.num_groups for w in widths):
            raise ValueError(f"VQGANConfig.num_groups: expected a divisor of every width {sorted(widths)}, "
                             f"got {self.num_groups}")  # fmt: skip
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"VQGANConfig.quantizer: expected one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"VQGANConfig.dropout: expected a float in [0, 1), got {self.dropout!r}")
        if not (0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"VQGANConfig.ema_decay: expected a float in [0, 1), got {self.ema_decay!r}")
        if not self.beta >= 0:
            raise ValueError(f"VQGANConfig.beta: expected a float >= 0, got {self.beta!r}")
        if self.kl_weight is not None and not (isinstance(self.kl_weight, (int, float)) and self.kl_weight >= 0):
            raise ValueError(f"VQGANConfig.kl_weight: expected None or a float >= 0, got {self.kl_weight!r}")

    @property
    def factor(self) -> int:
        """Downsampling factor f: tokens per side = img_size / f."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.factor


# ------------------------------------------------------------------------------------------------ building blocks
def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3, twice, with a 1x1 shortcut (``nin_shortcut``) when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions with 1x1-conv q, k, v and output projection."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v, as taming computes it
        return x + self.proj_out(o.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Conv 3x3 stride 2 after a (0, 1, 0, 1) zero pad (taming's asymmetric padding)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling, then conv 3x3."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (residual blocks), ``attn`` (after each block, maybe empty), a resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block, self.attn = nn.ModuleList(blocks), nn.ModuleList(attns)

    def forward(self, x):
        for i, blk in enumerate(self.block):
            x = blk(x)
            if self.attn:
                x = self.attn[i](x)
        return x


class _Mid(nn.Module):
    def __init__(self, c: int, groups: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups, dropout)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups, dropout)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, z_channels, H/f, W/f)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        g, res = c.num_groups, c.img_size
        self.conv_in = nn.Conv2d(c.in_chans, c.ch, 3, padding=1)
        widths = [c.ch * m for m in (1, *c.ch_mult)]
        self.down = nn.ModuleList()
        for i in range(len(c.ch_mult)):
            cin, cout = widths[i], widths[i + 1]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, g, c.dropout) for j in range(c.num_res_blocks)]
            attns = [AttnBlock(cout, g) for _ in blocks] if res in c.attn_resolutions else []
            level = _Level(blocks, attns)
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(cout)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(widths[-1], g, c.dropout)
        self.norm_out = _norm(widths[-1], g)
        self.conv_out = nn.Conv2d(widths[-1], c.z_channels, 3, padding=1)

    def forward(self, x, features: bool = False):
        """``features=True``: the list of every level's output and the middle's (perceptual / contrastive
        features) instead of the latents."""
        h = self.conv_in(x)
        feats = []
        for level in self.down:
            h = level(h)
            feats.append(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        if features:
            return [*feats, h]
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, C, h*f, w*f). ``up`` is indexed like the encoder's levels (``up[0]`` is the
    full-resolution level and runs last), as in taming."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        g = c.num_groups
        top = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, top, 3, padding=1)
        self.mid = _Mid(top, g, c.dropout)
        levels: list[nn.Module] = []
        cin, res = top, c.grid_size
        for i in reversed(range(len(c.ch_mult))):
            cout = c.ch * c.ch_mult[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, g, c.dropout) for j in range(c.num_res_blocks + 1)]
            attns = [AttnBlock(cout, g) for _ in blocks] if res in c.attn_resolutions else []
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(cout)
                res *= 2
            levels.insert(0, level)
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, c.in_chans, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight VQGAN's adaptive GAN weight is measured on."""
        return self.conv_out.weight

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------------------ the model
class VQGAN(nn.Module):
    """Encoder -> ``quant_conv`` -> quantizer -> ``post_quant_conv`` -> decoder.

    ``forward(images (B, C, H, W)) -> (reconstruction (B, C, H, W), quantizer loss (), indices (B, h, w))``.
    """

    task = "tokenizer"
    """The training task (``mimfast.train.tasks``)."""

    def __init__(self, config: VQGANConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = VQGANConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        if c.quantizer == "vq":
            self.quantize = VectorQuantizer(c.embed_dim, c.codebook_size, commitment_weight=c.beta,
                                            legacy_beta=c.legacy_beta, ema_update=False,
                                            accept_image_fmap=True)  # fmt: skip
            with torch.no_grad():  # taming's init: uniform(-1/K, 1/K)
                self.quantize.embed.uniform_(-1.0 / c.codebook_size, 1.0 / c.codebook_size)
        elif c.quantizer == "ema":
            self.quantize = VectorQuantizer(c.embed_dim, c.codebook_size, commitment_weight=c.beta, ema_update=True,
                                            decay=c.ema_decay, threshold_ema_dead_code=c.dead_code_threshold,
                                            accept_image_fmap=True)  # fmt: skip
        elif c.quantizer == "gumbel":
            kl = {} if c.kl_weight is None else {"kl_weight": c.kl_weight}
            self.quantize = GumbelQuantizer(c.embed_dim, c.codebook_size, accept_image_fmap=True, **kl)
        else:
            kl = {} if c.kl_weight is None else {"kl_weight": c.kl_weight}
            self.quantize = RegularizedQuantizer(c.embed_dim, c.codebook_size, mask_ratio=c.mask_ratio,
                                                 distance_temperature=c.distance_temperature,
                                                 commitment_weight=c.beta, accept_image_fmap=True, **kl)  # fmt: skip

    # --------------------------------------------------------------------------------------------------- paths
    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        if images.ndim != 4 or images.shape[1] != c.in_chans or images.shape[-2:] != (c.img_size, c.img_size):
            raise ValueError(f"images: expected (B, {c.in_chans}, {c.img_size}, {c.img_size}), got "
                             f"{tuple(images.shape)}")  # fmt: skip

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> continuous latents (B, D, h, w) before quantization."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, D, h, w) -> images (B, C, H, W)."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, images: torch.Tensor, *, return_info: bool = False):
        """``return_info=True`` adds the quantizer's info dict (Regularized VQ: ``pcl_weights`` (B, h, w), the
        sampled / best-match codes, ``kl``...; empty for the other quantizers)."""
        z = self.encode_latent(images)
        if hasattr(self.quantize, "forward_with_info"):
            z_q, indices, qloss, info = self.quantize.forward_with_info(z)
        else:
            (z_q, indices, qloss), info = self.quantize(z), {}
        rec = self.decode_latent(z_q)
        return (rec, qloss, indices, info) if return_info else (rec, qloss, indices)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids (B, h, w) int64 of images (B, C, H, W) (nearest codes; no codebook update)."""
        was = self.quantize.training
        self.quantize.eval()
        try:
            _, ids, _ = self.quantize(self.encode_latent(images))
        finally:
            self.quantize.train(was)
        return ids.long()

    def get_codebook_entry(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes of token ids (B, h, w) as latents (B, D, h, w)."""
        if ids.ndim != 3:
            raise ValueError(f"ids: expected (B, h, w), got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.codebook_size):
            raise ValueError(f"ids: expected values in [0, {self.config.codebook_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")  # fmt: skip
        return self.quantize.get_output_from_indices(ids.long())

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) from token ids (B, h, w)."""
        return self.decode_latent(self.get_codebook_entry(ids))

    # ---------------------------------------------------------------------------------------------- checkpoints
    def load_taming_state_dict(self, state_dict: dict, *, strict: bool = True) -> list[str]:
        """Load a taming-transformers ``VQModel`` state dict (``"state_dict"`` of its Lightning checkpoint).

        The encoder / decoder / ``quant_conv`` / ``post_quant_conv`` keys are the same; ``quantize.embedding.weight``
        becomes the codebook (``quantizer="vq"``; use ``legacy_beta=True`` to keep taming's loss); a ``GumbelVQ``'s
        ``quantize.proj`` / ``quantize.embed`` load as they are (``quantizer="gumbel"``); the training loss's keys
        (``loss.*``: LPIPS, discriminator) are dropped and returned.
        """
        if self.config.quantizer not in ("vq", "gumbel"):
            raise ValueError(f"load_taming_state_dict: taming's VQModel / GumbelVQ have a learnable codebook / Gumbel "
                             f"quantizer; build the model with quantizer='vq' or 'gumbel', not "
                             f"{self.config.quantizer!r}")  # fmt: skip
        sd = state_dict.get("state_dict", state_dict)
        mapped, ignored = {}, []
        for k, v in sd.items():
            if k.startswith("loss."):
                ignored.append(k)
            elif k == "quantize.embedding.weight" and self.config.quantizer == "vq":
                mapped["quantize.embed"] = v
            else:
                mapped[k] = v
        own = self.state_dict()
        if self.config.quantizer == "vq":
            for k in ("quantize.cluster_size", "quantize.embed_avg", "quantize.initted"):  # EMA-only state: keep ours
                mapped.setdefault(k, own[k])
            if "quantize.embed" in mapped:
                mapped["quantize.embed_avg"] = mapped["quantize.embed"].clone()
        missing = [k for k in own if k not in mapped]
        unexpected = [k for k in mapped if k not in own]
        if strict and (missing or unexpected):
            raise ValueError(f"state_dict: not a taming VQModel of this architecture (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")  # fmt: skip
        self.load_state_dict(mapped, strict=strict)
        return ignored

    # ------------------------------------------------------------------------------------------------ metrics
    def flops_per_image(self, *, training: bool = True) -> float:
        """Convolution / matmul FLOPs of one image's forward (x3 when ``training``), counted once on the meta
        device with torch's FLOP counter."""
        if not hasattr(self, "_flops"):
            from torch.utils.flop_counter import FlopCounterMode

            c = self.config
            with torch.device("meta"):
                meta = VQGAN(dataclasses.replace(c, quantizer="ema"))  # same convs; quantizer FLOPs are small
                x = torch.empty(1, c.in_chans, c.img_size, c.img_size)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                meta.decode_latent(meta.encode_latent(x))
            self._flops = float(counter.get_total_flops())
        return self._flops * (3 if training else 1)


# ----------------------------------------------------------------------------------------------------- registry
@register_model
def vqgan_f16_k1024(**kwargs) -> VQGAN:
    """taming's ImageNet VQGAN: 256 px -> 16x16 tokens, 1024 codes of dim 256 (MAGE's tokenizer size)."""
    return VQGAN(**kwargs)


@register_model
def vqgan_f8_k8192(**kwargs) -> VQGAN:
    """f8 with 8192 codes of dim 256, 112 px -> 14x14 tokens (BEiT's / CAE's vocabulary and token grid)."""
    cfg = dict(img_size=112, ch_mult=(1, 2, 2, 4), attn_resolutions=(14,), codebook_size=8192)
    return VQGAN(**{**cfg, **kwargs})


@register_model
def vqgan_f4_k128_debug(**kwargs) -> VQGAN:
    """A tiny tokenizer for tests and CPU runs: 32 px -> 8x8 tokens, 128 codes of dim 32, width 16."""
    cfg = dict(img_size=32, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=32,
               embed_dim=32, codebook_size=128, num_groups=8)  # fmt: skip
    return VQGAN(**{**cfg, **kwargs})
