"""MAGE's released VQGAN tokenizer (``vqgan_jax_strongaug.ckpt``): the architecture, a key map, a frozen loader.

MAGE (Li et al. 2023, github.com/LTH14/mage) tokenises with a PyTorch port of MaskGIT's JAX VQGAN, built by its
``taming/models/vqgan.py`` (``VQModel``) from ``taming/modules/diffusionmodules/model.py`` (``Encoder`` / ``Decoder``)
and ``taming/modules/vqvae/quantize.py`` (``VectorQuantizer2``) with ``config/vqgan.yaml``: ch 128, ch_mult
(1, 1, 2, 2, 4), two residual blocks per level, z_channels = embed_dim = 256, 1024 codes, 256 px -> 16 x 16 tokens.
It is *not* taming's VQGAN (:mod:`mimfast.models.vqgan`), although the parameter names look alike:

* no attention anywhere (``attn_resolutions`` is in the config but unused; MaskGIT removed the non-local layers);
* the encoder downsamples by 2x2 average pooling (no parameters), the decoder upsamples by nearest + conv 3x3;
* the residual block's convolutions have no bias, and when the width changes the 1x1 shortcut (``nin_shortcut``,
  (C_out, C_out, 1, 1), no bias) is applied to the residual branch's output, not to the block input:
  ``out = h + nin_shortcut(h)`` (a faithful port of MaskGIT's ResBlock);
* the encoder's ``conv_in`` has no bias and its ``conv_out`` is 1x1; the decoder has ``num_res_blocks`` blocks per
  level (taming has one more);
* no ``quant_conv`` / ``post_quant_conv``: the encoder's output is the code space.

Input range: MAGE feeds ``transforms.ToTensor()`` images, **RGB in [0, 1]** with no mean/std normalisation
(``main_pretrain.py``; its fine-tuning script de-normalises ImageNet-normalised batches back to [0, 1] before the
model), and its generation script clips decoded images to [0, 1]. :class:`MAGEVQGAN` built with ``input_mean`` /
``input_std`` instead takes images normalised as ``(x - mean) / std`` (mimfast's loader), maps them back to [0, 1]
before the encoder, and returns decoded images in the same normalised space.

Key map: every official name is kept except the codebook, ``quantize.embedding.weight`` (K, D) <-> ``codebook``. The
checkpoint is loaded as MAGE's ``VQModel.init_from_ckpt`` does (``{"state_dict": ...}`` or a bare state dict); a
``{"model": ...}`` wrapper, a DDP ``module.`` prefix and a whole MAGE model checkpoint (the tokenizer under
``vqgan.``) are accepted too. Nothing is ever downloaded.

The model is a frozen tokenizer: ``task = None``. mimfast's tokenizer task cannot train it (it has no reconstruction
/ perceptual / GAN loss, no straight-through estimator nor codebook loss; MAGE never trains it either).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.quantize import vq_search
from .registry import register_model
from .vqgan import Upsample, _Level, _norm

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LoadReport", "MAGEVQGAN", "MAGEVQGANConfig", "load_mage_vqgan"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""ImageNet channel means (the values of ``mimfast.data.IMAGENET_MEAN``, repeated so models need not import data)."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet channel standard deviations (``mimfast.data.IMAGENET_STD``)."""

_CODEBOOK_KEY = ("quantize.embedding.weight", "codebook")  # (official name, mimfast name): the only renamed tensor


@dataclass
class MAGEVQGANConfig:
    """Architecture of MAGE's VQGAN (defaults: the released ``vqgan_jax_strongaug.ckpt``, MAGE's config/vqgan.yaml)."""

    img_size: int = 256
    """Input resolution (square; official ``resolution``), a multiple of ``2 ** (len(ch_mult) - 1)``."""
    in_chans: int = 3
    """Image channels (official ``in_channels`` = ``out_ch``)."""
    ch: int = 128
    """Base width of the encoder / decoder."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Width multiplier per resolution level; ``len(ch_mult) - 1`` halvings (f16 for five levels)."""
    num_res_blocks: int = 2
    """Residual blocks per level, in the encoder and in the decoder alike."""
    embed_dim: int = 256
    """Code dimension D = the encoder's output channels (the official ``z_channels`` and ``embed_dim``, equal: the
    architecture has no ``quant_conv``)."""
    codebook_size: int = 1024
    """Number of codes K (official ``n_embed``)."""
    num_groups: int = 32
    """GroupNorm groups (official: 32, eps 1e-6)."""
    input_mean: tuple[float, ...] | None = None
    """Per-channel mean of the images ``encode`` receives (e.g. ImageNet's); None: images are in the tokenizer's own
    range, RGB in [0, 1]. Set with ``input_std``."""
    input_std: tuple[float, ...] | None = None
    """Per-channel std of the images ``encode`` receives; None with ``input_mean``."""
    precision: str | None = "ieee"
    """Products of the nearest-code search (:func:`mimfast.vq_search`): "ieee" (default: full fp32, the official
    torch search's arithmetic), "tf32x3", "tf32", "bf16", or None to follow autocast."""

    def __post_init__(self):
        for name in ("img_size", "in_chans", "ch", "num_res_blocks", "embed_dim", "codebook_size", "num_groups"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"MAGEVQGANConfig.{name}: expected an int >= 1, got {v!r}")
        self.ch_mult = tuple(self.ch_mult)
        if not self.ch_mult or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in self.ch_mult):
            raise ValueError(f"MAGEVQGANConfig.ch_mult: expected a non-empty tuple of ints >= 1, got {self.ch_mult!r}")
        if self.img_size % self.factor:
            raise ValueError(f"MAGEVQGANConfig.img_size: expected a multiple of the downsampling factor {self.factor}, "
                             f"got {self.img_size}")  # fmt: skip
        widths = sorted({self.ch * m for m in self.ch_mult} | {self.embed_dim})
        if any(w % self.num_groups for w in widths):
            raise ValueError(f"MAGEVQGANConfig.num_groups: expected a divisor of every width {widths}, "
                             f"got {self.num_groups}")  # fmt: skip
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError(f"MAGEVQGANConfig.input_mean / input_std: give both or neither, got "
                             f"input_mean={self.input_mean!r}, input_std={self.input_std!r}")  # fmt: skip
        for name in ("input_mean", "input_std"):
            v = getattr(self, name)
            if v is None:
                continue
            try:
                v = tuple(float(t) for t in v)
            except (TypeError, ValueError):
                raise ValueError(f"MAGEVQGANConfig.{name}: expected {self.in_chans} floats, got {v!r}") from None
            if len(v) != self.in_chans or not all(t == t and abs(t) != float("inf") for t in v):
                raise ValueError(f"MAGEVQGANConfig.{name}: expected {self.in_chans} finite floats, got {v!r}")
            if name == "input_std" and not all(t > 0 for t in v):
                raise ValueError(f"MAGEVQGANConfig.input_std: expected positive values, got {v!r}")
            setattr(self, name, v)
        if self.precision not in (None, "ieee", "tf32", "tf32x3", "bf16", "fp16"):
            raise ValueError(f"MAGEVQGANConfig.precision: expected None, 'ieee', 'tf32', 'tf32x3', 'bf16' or 'fp16', "
                             f"got {self.precision!r}")  # fmt: skip

    @property
    def factor(self) -> int:
        """Downsampling factor f: tokens per side = img_size / f."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Tokens per side (16 for the released model)."""
        return self.img_size // self.factor


# ------------------------------------------------------------------------------------------------ building blocks
class ResBlock(nn.Module):
    """MaskGIT's residual block: GroupNorm -> swish -> conv3x3 (no bias), twice; when the width changes, a bias-free
    1x1 ``nin_shortcut`` (C_out -> C_out) on the branch output replaces the identity: ``h + nin_shortcut(h)``.

    ``forward(x (B, C_in, H, W)) -> (B, C_out, H, W)``.
    """

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(h))


class _Mid(nn.Module):
    """Two residual blocks at the lowest resolution (no attention)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1, self.block_2 = ResBlock(c, c, groups), ResBlock(c, c, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> latents (B, D, H/f, W/f)."""

    def __init__(self, c: MAGEVQGANConfig):
        super().__init__()
        g = c.num_groups
        self.conv_in = nn.Conv2d(c.in_chans, c.ch, 3, padding=1, bias=False)
        widths = [c.ch * m for m in (1, *c.ch_mult)]
        self.down = nn.ModuleList()
        for i in range(len(c.ch_mult)):
            cin, cout = widths[i], widths[i + 1]
            level = _Level([ResBlock(cin if j == 0 else cout, cout, g) for j in range(c.num_res_blocks)], [])
            if i != len(c.ch_mult) - 1:
                level.downsample = nn.AvgPool2d(2, 2)  # no parameters: no key in the checkpoint
            self.down.append(level)
        self.mid = _Mid(widths[-1], g)
        self.norm_out = _norm(widths[-1], g)
        self.conv_out = nn.Conv2d(widths[-1], c.embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Code latents (B, D, h, w) -> images (B, C, h*f, w*f) in [0, 1] (not clamped). ``up[0]`` is the full-resolution
    level and runs last, as in the official code."""

    def __init__(self, c: MAGEVQGANConfig):
        super().__init__()
        g = c.num_groups
        cin = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.embed_dim, cin, 3, padding=1)
        self.mid = _Mid(cin, g)
        levels: list[nn.Module] = []
        for i in reversed(range(len(c.ch_mult))):
            cout = c.ch * c.ch_mult[i]
            level = _Level([ResBlock(cin if j == 0 else cout, cout, g) for j in range(c.num_res_blocks)], [])
            if i != 0:
                level.upsample = Upsample(cout)  # nearest x2 + conv3x3 with bias, as taming's
            levels.insert(0, level)
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, c.in_chans, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LoadReport(NamedTuple):
    """What :meth:`MAGEVQGAN.load_official_state_dict` did not load."""

    missing_keys: list[str]
    """Official keys absent from the state dict (only with ``strict=False``; those tensors keep their values)."""
    unexpected_keys: list[str]
    """Keys of the given dict that are not the tokenizer's (a MAGE model checkpoint's transformer; others only with
    ``strict=False``)."""


# ------------------------------------------------------------------------------------------------------ the model
class MAGEVQGAN(nn.Module):
    """MAGE's VQGAN: encoder -> nearest code (l2, ties to the lowest index) -> decoder. Inference only.

    ``encode(images (B, C, S, S)) -> ids (B, G, G)``, ``decode(ids) -> images (B, C, S, S)``, with S = ``img_size``
    and G = ``grid_size``; images are in [0, 1], or normalised by ``config.input_mean / input_std`` when set.
    ``forward(images) -> (reconstruction (B, C, S, S), ids (B, G, G))``.
    """

    task = None
    """Not trainable by a mimfast task: a frozen tokenizer without a training loss (see the module docstring)."""

    def __init__(self, config: MAGEVQGANConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = MAGEVQGANConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        # (K, D) the codes: official ``quantize.embedding.weight``, taming's uniform(-1/K, 1/K) initialisation
        k = c.codebook_size
        self.codebook = nn.Parameter(torch.empty(k, c.embed_dim).uniform_(-1.0 / k, 1.0 / k))
        if c.input_mean is not None:  # non-persistent: they follow .to(device) but stay out of the state dict
            v = lambda t: torch.tensor(t, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
            self.register_buffer("input_mean", v(c.input_mean), persistent=False)
            self.register_buffer("input_std", v(c.input_std), persistent=False)
        else:
            self.input_mean = self.input_std = None

    # ------------------------------------------------------------------------------------------- attributes
    @property
    def codebook_size(self) -> int:
        """K, the vocabulary (what the BEiT / CAE / MAGE tasks read)."""
        return self.config.codebook_size

    @property
    def grid_size(self) -> int:
        """Tokens per side, G."""
        return self.config.grid_size

    @property
    def img_size(self) -> int:
        """Input side, S."""
        return self.config.img_size

    # ---------------------------------------------------------------------------------------- normalisation
    def to_tokenizer_range(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in this module's input space -> the official tokenizer's [0, 1] range."""
        if self.input_mean is None:
            return images
        return images * self.input_std.to(images.dtype) + self.input_mean.to(images.dtype)

    def from_tokenizer_range(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> this module's input space (``(x - input_mean) / input_std``)."""
        if self.input_mean is None:
            return images
        return (images - self.input_mean.to(images.dtype)) / self.input_std.to(images.dtype)

    # --------------------------------------------------------------------------------------------------- paths
    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images: expected a float tensor (B, {c.in_chans}, {c.img_size}, {c.img_size}), got "
                            f"{getattr(images, 'dtype', type(images).__name__)}")  # fmt: skip
        if images.ndim != 4 or images.shape[1] != c.in_chans or tuple(images.shape[-2:]) != (c.img_size, c.img_size):
            raise ValueError(f"images: expected (B, {c.in_chans}, {c.img_size}, {c.img_size}), got "
                             f"{tuple(images.shape)}")  # fmt: skip

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, G, G) or (B, G*G) integer -> (B, G, G) int64, values checked."""
        g, k = self.config.grid_size, self.config.codebook_size
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ids: expected an integer tensor (B, {g}, {g}), got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")  # fmt: skip
        if ids.ndim == 2 and ids.shape[1] == g * g:
            ids = ids.reshape(ids.shape[0], g, g)
        if ids.ndim != 3 or tuple(ids.shape[1:]) != (g, g):
            raise ValueError(f"ids: expected (B, {g}, {g}) or (B, {g * g}), got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k):
            raise ValueError(f"ids: expected values in [0, {k}), got [{int(ids.min())}, {int(ids.max())}]")
        return ids.long()

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in this module's input space -> continuous latents (B, D, G, G) before the search."""
        self._check_images(images)
        return self.encoder(self.to_tokenizer_range(images.to(self.codebook.dtype)))

    def quantize_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, D, h, w) -> ids (B, h, w) int64 of the nearest codes (squared l2; ties to the lowest index), by
        the fused :func:`mimfast.vq_search` (its plain-torch reference on the CPU)."""
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"z: expected latents (B, {self.config.embed_dim}, h, w), got "
                             f"{tuple(getattr(z, 'shape', ()))}")  # fmt: skip
        b, d, h, w = z.shape
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, d)
        ids, _, _ = vq_search(flat, self.codebook.detach().to(flat.dtype), precision=self.config.precision)
        return ids.view(b, h, w)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids (B, G, G) int64 of images (B, C, S, S) (in [0, 1], or normalised by ``input_mean / input_std``).

        Equals the official ``vqgan.encode(imgs)[2][2]`` reshaped to (B, G, G) (MAGE's ``token_indices``).
        """
        return self.quantize_latent(self.encode_latent(images))

    def get_codebook_entry(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes of token ids (B, G, G) (or (B, G*G)) as latents (B, D, G, G)."""
        return F.embedding(self._check_ids(ids), self.codebook).permute(0, 3, 1, 2).contiguous()

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """Code latents (B, D, h, w) -> images (B, C, h*f, w*f) in this module's input space."""
        return self.from_tokenizer_range(self.decoder(z_q))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) from token ids (B, G, G) (or (B, G*G)): [0, 1] (not clamped), or normalised by
        ``input_mean / input_std`` when set. The official ``vqgan.decode_code`` / ``decode(get_codebook_entry)``."""
        return self.decode_latent(self.get_codebook_entry(ids))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, S, S) -> (reconstruction (B, C, S, S), ids (B, G, G)); no gradient reaches the encoder."""
        ids = self.encode(images)
        return self.decode(ids), ids

    # ---------------------------------------------------------------------------------------------- checkpoints
    @staticmethod
    def official_to_mimfast_key(key: str) -> str:
        """The key map: an official ``VQModel`` parameter name -> this module's (identity but for the codebook)."""
        return _CODEBOOK_KEY[1] if key == _CODEBOOK_KEY[0] else key

    @staticmethod
    def mimfast_to_official_key(key: str) -> str:
        """The inverse key map."""
        return _CODEBOOK_KEY[0] if key == _CODEBOOK_KEY[1] else key

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's tensors under the official ``VQModel`` names (what MAGE's ``VQModel.load_state_dict``
        takes; the inverse of :meth:`load_official_state_dict`)."""
        own = self.state_dict()
        out = {k: v for k, v in own.items() if k != _CODEBOOK_KEY[1]}  # the official order: encoder, decoder, codes
        out[_CODEBOOK_KEY[0]] = own[_CODEBOOK_KEY[1]]
        return out

    def load_official_state_dict(self, state_dict: dict, *, strict: bool = True) -> LoadReport:
        """Load MAGE's released VQGAN (``torch.load("vqgan_jax_strongaug.ckpt")``).

        Accepts what the official ``VQModel.init_from_ckpt`` accepts (``{"state_dict": sd}`` or a bare ``sd``), a
        ``{"model": sd}`` wrapper, a DDP ``module.`` prefix, and a MAGE model checkpoint (its tokenizer's keys under
        ``vqgan.``; the transformer's keys are reported as unexpected and skipped).

        Raises KeyError naming the keys when one is unknown or missing (``strict=False``: unknown keys are skipped,
        missing ones keep their values), ValueError naming the key on a shape mismatch, TypeError on a non-tensor.
        Returns the :class:`LoadReport` of missing / skipped keys.
        """
        sd = state_dict
        for wrapper in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
                break
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict: expected a dict of tensors (or {{'state_dict': ...}}), got "
                            f"{type(sd).__name__}")  # fmt: skip
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        skipped = []
        if any(k.startswith("vqgan.") for k in sd) and not any(k.startswith("encoder.") for k in sd):
            skipped = sorted(k for k in sd if not k.startswith("vqgan."))  # a whole MAGE model: take its tokenizer
            sd = {k.removeprefix("vqgan."): v for k, v in sd.items() if k.startswith("vqgan.")}
        own = self.state_dict()
        mapped = {self.official_to_mimfast_key(k): (k, v) for k, v in sd.items()}
        unexpected = sorted(key for mine, (key, _) in mapped.items() if mine not in own)
        missing = sorted(self.mimfast_to_official_key(k) for k in own if k not in mapped)
        if strict and (unexpected or missing):
            raise KeyError(f"state_dict: not MAGE's VQGAN of this configuration: unexpected keys {unexpected[:8]}"
                           f"{' ...' if len(unexpected) > 8 else ''}, missing keys {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}")  # fmt: skip
        load = {}
        for mine, (key, v) in mapped.items():
            if mine not in own:
                continue
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"state_dict[{key!r}]: expected a tensor, got {type(v).__name__}")
            if tuple(v.shape) != tuple(own[mine].shape):
                raise ValueError(f"state_dict[{key!r}]: expected shape {tuple(own[mine].shape)}, got "
                                 f"{tuple(v.shape)} (a different configuration?)")  # fmt: skip
            load[mine] = v
        self.load_state_dict(load, strict=False)
        return LoadReport(missing, skipped + unexpected)

    @classmethod
    def from_official(
        cls,
        path: str | os.PathLike,
        *,
        input_mean: tuple[float, ...] | None = None,
        input_std: tuple[float, ...] | None = None,
        weights_only: bool = True,
        **config,
    ) -> MAGEVQGAN:
        """The released tokenizer from its checkpoint file, in eval mode on the CPU.

        Args:
            path: the local ``vqgan_jax_strongaug.ckpt`` (or a MAGE model checkpoint holding it); never downloaded.
            input_mean / input_std: the normalisation of the images ``encode`` will receive and ``decode`` returns
                (e.g. ImageNet's for mimfast's loader); None: the tokenizer's own [0, 1] range.
            weights_only: ``torch.load``'s safe unpickler; pass False only for a file you trust that holds objects
                besides tensors.
            config: overrides of :class:`MAGEVQGANConfig` (default: the released size).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no MAGE VQGAN checkpoint at {path!r} (download vqgan_jax_strongaug.ckpt "
                                    "from the MAGE README yourself; mimfast never downloads)")  # fmt: skip
        try:
            sd = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as e:  # the unpickler's and the zip reader's errors have no common base class
            raise ValueError(f"path: cannot read {path!r} as a torch checkpoint ({type(e).__name__}: {e})") from None
        model = cls(MAGEVQGANConfig(input_mean=input_mean, input_std=input_std, **config))
        try:
            model.load_official_state_dict(sd)
        except (KeyError, ValueError, TypeError) as e:
            msg = e.args[0] if e.args else e  # KeyError's str() would quote the message
            raise ValueError(f"path: {path!r} is not MAGE's VQGAN: {msg}") from None
        return model.eval()

    # ------------------------------------------------------------------------------------------------ metrics
    def flops_per_image(self, *, decode: bool = False) -> float:
        """Convolution and search FLOPs of encoding one image (plus decoding it when ``decode``), counted once on the
        meta device with torch's FLOP counter; the search adds 2 K D per token."""
        key = "_flops_dec" if decode else "_flops_enc"
        if not hasattr(self, key):
            from torch.utils.flop_counter import FlopCounterMode

            c = self.config
            with torch.device("meta"):
                meta = MAGEVQGAN(dataclasses.replace(c, input_mean=None, input_std=None))
                x = torch.empty(1, c.in_chans, c.img_size, c.img_size)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                z = meta.encoder(x)
                if decode:
                    meta.decoder(z)
            search = 2.0 * c.codebook_size * c.embed_dim * c.grid_size**2
            setattr(self, key, float(counter.get_total_flops()) + search)
        return getattr(self, key)


def load_mage_vqgan(
    path: str | os.PathLike,
    *,
    input_mean: tuple[float, ...] | None = IMAGENET_MEAN,
    input_std: tuple[float, ...] | None = IMAGENET_STD,
    weights_only: bool = True,
) -> MAGEVQGAN:
    """MAGE's released VQGAN as a frozen tokenizer (eval mode, ``requires_grad=False``, CPU) for mimfast's loader.

    ``encode(images (B, 3, 256, 256)) -> ids (B, 16, 16)`` takes images normalised by ``input_mean / input_std``
    (default ImageNet's, as mimfast's loader yields them; None for both: raw [0, 1]) and ``decode`` returns that
    space. The loader of a ``mage_vqgan:/path/to/vqgan_jax_strongaug.ckpt`` tokenizer spec; nothing is downloaded.
    """
    model = MAGEVQGAN.from_official(path, input_mean=input_mean, input_std=input_std, weights_only=weights_only)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------------------------------- registry
@register_model
def mage_vqgan_f16_k1024(**kwargs) -> MAGEVQGAN:
    """MAGE's released VQGAN (vqgan_jax_strongaug.ckpt): 256 px -> 16x16 tokens, 1024 codes of dim 256."""
    return MAGEVQGAN(**kwargs)


@register_model
def mage_vqgan_tiny_debug(**kwargs) -> MAGEVQGAN:
    """The same architecture, tiny, for tests: 32 px -> 8x8 tokens, 64 codes of dim 32, widths 32 / 32 / 64."""
    cfg = dict(img_size=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, embed_dim=32, codebook_size=64)
    return MAGEVQGAN(**{**cfg, **kwargs})
