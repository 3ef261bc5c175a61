"""Networks of the semi-supervised diffusion autoencoder (Ijishakin et al., Appendix D).

Three parts, trained together:

* ``SemanticEncoder`` s_phi(x0) -> z_sem: a half U-Net (down path + middle block) pooled to a vector;
* ``ConditionalUNet`` eps_theta(x_t, t, z_sem): a noise predictor whose every residual block is modulated by the
  timestep embedding and by z_sem (diffae's adaptive group norm);
* ``AgeHead`` f_psi(z_sem) -> age in years.

The design follows diffae (Preechakul et al. 2022) as configured by the paper's authors (their fork
``Contrast-DiffAE``: ``templates.py`` + diffae's defaults): base width 32, channel multipliers (1, 2, 3, 4), two
residual blocks per level in the U-Net (+1 on the way up) and in the encoder, residual up/down-sampling blocks,
attention at 16x16 and in the middle, 512-d time and semantic embeddings. With these defaults the model has
exactly 10,611,394 parameters, the count the authors' code prints as "10.12 M" (= 10.12 * 2**20, age head
included). The paper's "(32,32,32) -> (32,32,32) -> (64,64,64) -> (96,96,96) -> (128,128,128)" lists these blocks'
output widths: conv_in + two blocks at 32, then at each coarser level a down-sampling block and two blocks.

Every size is a constructor argument so configs can shrink the model (tests) or change the input (k slices).
The encoder + age-head path is TorchScript-scriptable (``AgePredictor``) for export; everything runs under
``torch.autocast("cpu", dtype=torch.bfloat16)`` and with ``channels_last`` inputs.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from scripts.cli import BundleError

__all__ = [
    "AgeHead",
    "AgePredictor",
    "AgeRegressor",
    "ArchitectureMismatchError",
    "ConditionalUNet",
    "DiffusionAutoencoder",
    "RecordsArchitecture",
    "SemanticEncoder",
    "check_architecture",
    "count_parameters",
    "unwrap",
]

LATENT_NORMS = ("batch", "layer", "none")
HEAD_NORMS = ("batch", "layer", "none")

# diffae/guided-diffusion normalisation: 32 groups, or one group per channel below 32 channels.
MAX_NORM_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(MAX_NORM_GROUPS, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer that ends a residual branch so every block starts as the identity (diffae, BigGAN)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Parameter-free 2x resampling used inside the residual up/down blocks (diffae: avg-pool / nearest)."""
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a faster CPU path: the mask from 16-bit slices of 64-bit random words.

    PyTorch's CPU dropout draws one Bernoulli sample per element and took ~16% of a training step of the paper
    model (bench_train_step); random 64-bit words cut into four 16-bit uniforms give the same mask distribution
    (``p`` rounded to 1/65536) at a fraction of the cost. Same semantics: identity in eval mode, kept elements
    scaled by 1/(1 - p), seeded by the global torch generator. Other devices use the stock kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.training
            and self.p > 0.0
            and x.device.type == "cpu"
            and not self.inplace
            and not torch.jit.is_scripting()
        ):
            return self._cpu_dropout(x)
        return F.dropout(x, self.p, self.training, self.inplace)

    @torch.jit.unused
    def _cpu_dropout(self, x: torch.Tensor) -> torch.Tensor:
        levels = 1 << 16
        dropped = round(self.p * levels)  # this many of the 65536 16-bit values drop an element
        words = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        uniform16 = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform on [-32768, 32767]
        scale = torch.tensor(levels / (levels - dropped), dtype=x.dtype)
        keep_scale = torch.where(uniform16 >= dropped - levels // 2, scale, torch.zeros((), dtype=x.dtype))
        return x * keep_scale


class EncoderResBlock(nn.Module):
    """Unconditioned residual block of the semantic encoder: GN -> SiLU -> [resample] -> conv, plus skip.

    As in diffae, an encoder block without a conditioning signal has a single convolution (diffae builds the second,
    modulated half only when there is a condition); keeping this is what reproduces the authors' parameter count.
    """

    def __init__(self, in_channels: int, out_channels: int, updown: str = "none") -> None:
        super().__init__()
        self.updown = updown
        self.norm = group_norm(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = resample(F.silu(self.norm(x)), self.updown)
        return self.skip(resample(x, self.updown)) + self.conv(h)


class ConditionedResBlock(nn.Module):
    """Residual block of the noise predictor, modulated by time and by z_sem (diffae "two_cond" ResBlock).

    out = skip(x) + conv(dropout(silu((GN(h) * (1 + s_t) + b_t) * (1 + s_z)))), h = conv(silu(GN(x))).
    The two modulations and GN's own affine are folded into one per-(sample, channel) scale and shift, so the
    feature map is touched by one ``addcmul`` instead of five elementwise passes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embed_dim: int,
        cond_dim: int,
        dropout: float = 0.0,
        updown: str = "none",
    ) -> None:
        super().__init__()
        self.updown = updown
        self.in_norm = group_norm(in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        # Linear projections of the (already SiLU-activated, see ConditionalUNet.forward) embeddings:
        # time -> (scale, shift), z_sem -> scale only, as in diffae.
        self.time_proj = nn.Linear(embed_dim, 2 * out_channels)
        self.cond_proj = nn.Linear(cond_dim, out_channels)
        self.out_norm = group_norm(out_channels)
        self.dropout = Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, time_act: torch.Tensor, cond_act: torch.Tensor) -> torch.Tensor:
        h = resample(F.silu(self.in_norm(x)), self.updown)
        x = resample(x, self.updown)
        h = self.in_conv(h)

        time_scale, time_shift = self.time_proj(time_act).chunk(2, dim=1)
        cond_scale = 1.0 + self.cond_proj(cond_act)
        scale = self.out_norm.weight * (1.0 + time_scale) * cond_scale
        shift = (self.out_norm.bias * (1.0 + time_scale) + time_shift) * cond_scale
        normed = F.group_norm(h, self.out_norm.num_groups, eps=self.out_norm.eps)
        # (B, C) factors in the feature map's dtype: under bf16 autocast the map stays bf16 (half the memory
        # traffic); the CPU group-norm kernel accumulates its statistics in float32 either way.
        dtype = normed.dtype
        h = torch.addcmul(shift.to(dtype)[:, :, None, None], normed, scale.to(dtype)[:, :, None, None])
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection, computed with ``scaled_dot_product_attention``.

    The q/k/v and output projections are per-pixel linear maps (the 1x1 convolutions of diffae, same parameters);
    tokens are laid out (B, H*W, C) which is a free view of a ``channels_last`` feature map.
    """

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = self.qkv(tokens).reshape(b, height * width, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, C/heads)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, height * width, c)
        out = self.proj(attended).transpose(1, 2).reshape(b, c, height, width)
        return x + out


def _resolutions(image_size: int, num_levels: int) -> list[int]:
    """Feature-map side length at each level (halved between levels)."""
    return [image_size // 2**level for level in range(num_levels)]


class SemanticEncoder(nn.Module):
    """s_phi: image (B, C, H, W) -> z_sem (B, z_dim); a diffae half U-Net without time conditioning.

    Layout: conv_in; per level ``num_res_blocks`` blocks (+ attention where the resolution is listed) and a
    down-sampling residual block between levels; middle = res / attention / res; GN -> SiLU -> global average
    pool -> linear to ``z_dim`` (diffae's "adaptivenonzero" pooling, whose 1x1 conv is this linear layer) ->
    ``latent_norm``.

    ``latent_norm="batch"`` (default) standardises every latent dimension over the batch (BatchNorm without
    affine parameters; running statistics at evaluation), so z_sem has an O(1) between-subject scale by
    construction, at initialisation and throughout training. Without it (``"none"``, the paper's and diffae's
    plain linear output) the between-subject spread is ~1-5 % of |z| at initialisation and the denoising loss
    shrinks it further, so the decoder ignores z and the age head reads a vanishing signal (docs/latent.md).
    ``"layer"`` normalises each latent on its own, which fixes |z| but not the spread between subjects.
    ``latent_gain`` scales the output layer at initialisation (an alternative measured in docs/latent.md).
    With ``float32`` (default) the whole encoder runs in float32 under any autocast (see ``_features_fp32``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        image_size: int = 128,
        num_heads: int = 1,
        z_dim: int = 512,
        latent_norm: str = "batch",
        latent_gain: float = 1.0,
        float32: bool = True,
    ) -> None:
        super().__init__()
        self.float32 = float32
        if latent_norm not in LATENT_NORMS:
            raise ValueError(f"latent_norm must be one of {LATENT_NORMS}, got {latent_norm!r}")
        resolutions = _resolutions(image_size, len(channel_mult))
        ch = base_channels * channel_mult[0]
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(EncoderResBlock(ch, base_channels * mult))
                ch = base_channels * mult
                if resolutions[level] in attention_resolutions:
                    blocks.append(AttentionBlock(ch, num_heads))
            if level != len(channel_mult) - 1:
                blocks.append(EncoderResBlock(ch, ch, updown="down"))
        blocks += [EncoderResBlock(ch, ch), AttentionBlock(ch, num_heads), EncoderResBlock(ch, ch)]
        self.blocks = nn.Sequential(*blocks)
        self.out_norm = group_norm(ch)
        self.out = nn.Linear(ch, z_dim)
        if latent_gain != 1.0:
            with torch.no_grad():
                self.out.weight.mul_(latent_gain)
                self.out.bias.mul_(latent_gain)
        if latent_norm == "batch":
            self.latent_norm: nn.Module = nn.BatchNorm1d(z_dim, affine=False)
        elif latent_norm == "layer":
            self.latent_norm = nn.LayerNorm(z_dim, elementwise_affine=False)
        else:
            self.latent_norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.latent_norm(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The latent before its standardisation, (B, z_dim) in float32 (what ``latent_norm`` normalises)."""
        if torch.jit.is_scripting():
            return self._features(x)
        if not self.float32:  # the autocast dtype of the caller (wave-1 behaviour, kept for the comparison)
            return self._features(x).float()
        return self._features_fp32(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.out_norm(self.blocks(x)))
        return self.out(h.mean(dim=(2, 3)))

    @torch.jit.unused
    def _features_fp32(self, x: torch.Tensor) -> torch.Tensor:
        # float32 under any autocast: between subjects, the pooled features differ by ~1 % of their size, the order
        # of bf16 rounding; with a bf16 encoder, predicted ages moved by 0.5 years on average (docs/latent.md).
        # The encoder is ~10 % of a training step's FLOPs; the U-Net keeps the autocast dtype.
        with torch.autocast(x.device.type, enabled=False):
            return self._features(x.to(torch.promote_types(x.dtype, torch.float32)))


class UNetStage(nn.Module):
    """One step of the U-Net: a conditioned residual block, optional attention, optional second residual block.

    A small module instead of a heterogeneous list so the whole network stays TorchScript-scriptable.
    """

    def __init__(
        self,
        block: ConditionedResBlock,
        attention: AttentionBlock | None = None,
        second_block: ConditionedResBlock | None = None,
    ) -> None:
        super().__init__()
        self.block = block
        self.attention = attention if attention is not None else nn.Identity()
        self.second_block = second_block

    def forward(self, h: torch.Tensor, time_act: torch.Tensor, cond_act: torch.Tensor) -> torch.Tensor:
        h = self.attention(self.block(h, time_act, cond_act))
        if self.second_block is not None:
            h = self.second_block(h, time_act, cond_act)
        return h


class ConditionalUNet(nn.Module):
    """eps_theta(x_t, t, z_sem): diffae's conditioned U-Net.

    Down path: conv_in; per level ``num_res_blocks`` conditioned blocks (+ attention at ``attention_resolutions``)
    then a down-sampling residual block. Middle: res / attention / res. Up path: per level ``num_res_blocks + 1``
    blocks, each fed the matching down-path activation (concatenated skip), with an up-sampling residual block
    closing every level but the top. GN -> SiLU -> zero-initialised conv to ``out_channels``.
    With the defaults the down path reads 32 (conv_in), 32, 32 | 32, 64, 64 | 64, 96, 96 | 96, 128, 128 (the first
    block of each coarser level is the down-sampling one), then the middle at 128, and back up.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        image_size: int = 128,
        num_heads: int = 1,
        embed_dim: int = 512,
        z_dim: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.base_channels = base_channels
        resolutions = _resolutions(image_size, len(channel_mult))
        self.time_embed = nn.Sequential(nn.Linear(base_channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

        def res_block(c_in: int, c_out: int, updown: str = "none") -> ConditionedResBlock:
            return ConditionedResBlock(c_in, c_out, embed_dim, z_dim, dropout, updown)

        def attention_at(level: int, channels: int) -> AttentionBlock | None:
            return AttentionBlock(channels, num_heads) if resolutions[level] in attention_resolutions else None

        ch = base_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = res_block(ch, base_channels * mult)
                ch = base_channels * mult
                self.down.append(UNetStage(block, attention_at(level, ch)))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(UNetStage(res_block(ch, ch, "down")))
                skip_channels.append(ch)

        self.middle = UNetStage(res_block(ch, ch), AttentionBlock(ch, num_heads), res_block(ch, ch))

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                block = res_block(ch + skip_channels.pop(), base_channels * mult)
                ch = base_channels * mult
                upsample = res_block(ch, ch, "up") if level and i == num_res_blocks else None
                self.up.append(UNetStage(block, attention_at(level, ch), upsample))

        self.out_norm = group_norm(ch)
        self.out_conv = zero_init(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, z_sem: torch.Tensor) -> torch.Tensor:
        # SiLU of both embeddings is shared by every block's projection (diffae applies it inside each block).
        time_act = F.silu(self.time_embed(get_timestep_embedding(timesteps, self.base_channels).to(x.dtype)))
        cond_act = F.silu(z_sem)

        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, time_act, cond_act)
            skips.append(h)
        h = self.middle(h, time_act, cond_act)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), time_act, cond_act)
        return self.out_conv(F.silu(self.out_norm(h)))


class AgeHead(nn.Module):
    """f_psi: z_sem -> age in years; MLP 512 -> 128 -> 32 -> 1 with ReLU, a normalisation and dropout between layers.

    ``norm="batch"`` is the paper's BatchNorm (Appendix D); on a standardised z_sem the head measures better
    without it (``"none"``, the default of the bundle's configs; docs/latent.md): BatchNorm is scale-invariant,
    so it amplified whatever small signal reached it, and its batch statistics over the few labelled images
    of a training batch are noisy. The head runs in float32 under any autocast.

    The last layer predicts a standardised age; ``age_mean``/``age_std`` buffers (saved with the weights) map it
    back to years so every consumer of the model sees years, and the loss uses the same buffers to standardise
    targets. The default statistics are the paper's training set (56 +/- 20.9 years); set them from the data.
    """

    def __init__(
        self,
        in_features: int = 512,
        hidden_features: Sequence[int] = (128, 32),
        dropout: float = 0.5,
        age_mean: float = 56.0,
        age_std: float = 20.9,
        norm: str = "none",
    ) -> None:
        super().__init__()
        if norm not in HEAD_NORMS:
            raise ValueError(f"head norm must be one of {HEAD_NORMS}, got {norm!r}")
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_features:
            if norm == "batch":
                normalise: nn.Module = nn.BatchNorm1d(hidden)
            elif norm == "layer":
                normalise = nn.LayerNorm(hidden)
            else:
                normalise = nn.Identity()
            layers += [nn.Linear(width, hidden), nn.ReLU(), normalise, nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("age_mean", torch.tensor(float(age_mean)))
        self.register_buffer("age_std", torch.tensor(float(age_std)))

    @property
    def has_batchnorm(self) -> bool:
        """Whether the head normalises over the batch (the paper's ``norm="batch"``)."""
        return any(isinstance(m, nn.BatchNorm1d) for m in self.mlp)

    def set_age_stats(self, mean: float, std: float) -> None:
        """Set the standardisation statistics (training-label mean and std), e.g. before training starts."""
        if not std > 0:
            raise ValueError(f"age std must be positive, got {std}")
        self.age_mean.fill_(float(mean))
        self.age_std.fill_(float(std))

    def forward(self, z_sem: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.years(z_sem)
        return self._years_fp32(z_sem)

    def years(self, z_sem: torch.Tensor) -> torch.Tensor:
        standardised = self.mlp(z_sem).squeeze(1)
        # at least float32 before mapping to years (bf16 years would be rounded to 0.25-year steps at age 60)
        standardised = standardised.to(torch.promote_types(standardised.dtype, torch.float32))
        return standardised * self.age_std + self.age_mean

    @torch.jit.unused
    def _years_fp32(self, z_sem: torch.Tensor) -> torch.Tensor:
        # the head in float32 under any autocast: a bf16 latent or hidden layer would move the age
        with torch.autocast(z_sem.device.type, enabled=False):
            return self.years(z_sem.to(torch.promote_types(z_sem.dtype, torch.float32)))


class RecordsArchitecture(nn.Module):
    """A module whose state dict carries its architecture settings (``self.architecture``), checked on loading.

    Shapes alone let weights load into another architecture when every shape fits (``num_heads`` splits the same
    attention weights differently), and MONAI's ``copy_model_state`` (``ckpt_export``) copies only the entries
    whose shapes match, leaving the others at their random initialisation. The record is the state dict's
    ``_extra_state`` entry; a state dict without one (saved before the record existed) loads with a warning, as
    BatchNorm loads one without ``num_batches_tracked``.
    """

    __jit_ignored_attributes__ = ["architecture"]
    architecture: dict | None = None

    @torch.jit.unused
    def get_extra_state(self) -> torch.Tensor:
        return _architecture_record(self.architecture)

    @torch.jit.unused
    def set_extra_state(self, state: torch.Tensor) -> None:
        check_architecture(_read_architecture_record(state), self.architecture)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "_extra_state" not in state_dict:
            warnings.warn(
                "weights without an architecture record: check that the configured architecture settings are "
                "those they were trained with (settings such as num_heads change no weight's shape)"
            )
            state_dict[prefix + "_extra_state"] = self.get_extra_state()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DiffusionAutoencoder(RecordsArchitecture):
    """The full model: semantic encoder, conditional U-Net and age head sharing one z_sem.

    ``forward(x0)`` is plain age prediction in years, (B, 1) (what bundle verification, inference and export call);
    ``forward(x0, x_t, timesteps, labelled)`` is the training pass, one encoder pass feeding both the U-Net and the
    age head; ``encode``/``denoise``/``predict_age`` are the parts on their own (analyses, DDIM).
    Constructor arguments are shared by encoder and U-Net where the paper ties them (encoder = the U-Net's down
    path + middle block); the ``encoder_*`` arguments default to the U-Net's values.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        image_size: int = 128,
        num_heads: int = 1,
        embed_dim: int = 512,
        z_dim: int = 512,
        dropout: float = 0.1,
        encoder_channel_mult: Sequence[int] | None = None,
        encoder_num_res_blocks: int = 2,
        encoder_attention_resolutions: Sequence[int] | None = None,
        head_hidden_features: Sequence[int] = (128, 32),
        head_dropout: float = 0.5,
        age_mean: float = 56.0,
        age_std: float = 20.9,
        latent_norm: str = "batch",
        latent_gain: float = 1.0,
        head_norm: str = "none",
        encoder_fp32: bool = True,
    ) -> None:
        super().__init__()
        encoder_channel_mult = encoder_channel_mult or channel_mult
        if encoder_attention_resolutions is None:
            encoder_attention_resolutions = attention_resolutions
        # every constructor argument but the age statistics (buffers, saved with the weights anyway)
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__", "age_mean", "age_std")}
        self.architecture = _architecture(**arguments)
        self.encoder = SemanticEncoder(
            in_channels=in_channels,
            base_channels=base_channels,
            channel_mult=encoder_channel_mult,
            num_res_blocks=encoder_num_res_blocks,
            attention_resolutions=encoder_attention_resolutions,
            image_size=image_size,
            num_heads=num_heads,
            z_dim=z_dim,
            latent_norm=latent_norm,
            latent_gain=latent_gain,
            float32=encoder_fp32,
        )
        self.unet = ConditionalUNet(
            in_channels=in_channels,
            base_channels=base_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            image_size=image_size,
            num_heads=num_heads,
            embed_dim=embed_dim,
            z_dim=z_dim,
            dropout=dropout,
        )
        self.age_head = AgeHead(z_dim, head_hidden_features, head_dropout, age_mean, age_std, head_norm)

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """z_sem = s_phi(x0), shape (B, z_dim)."""
        return self.encoder(x0)

    def denoise(self, x_t: torch.Tensor, timesteps: torch.Tensor, z_sem: torch.Tensor) -> torch.Tensor:
        """eps_hat = eps_theta(x_t, t, z_sem), shape of ``x_t``."""
        return self.unet(x_t, timesteps, z_sem)

    def predict_age(self, x0: torch.Tensor) -> torch.Tensor:
        """Predicted age in years, shape (B,)."""
        return self.age_head(self.encoder(x0))

    def forward(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        labelled: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Age in years as (B, 1) from ``x0`` alone; given ``x_t`` and ``timesteps``, the training outputs.

        The channel axis is what MONAI's ``verify_net_in_out`` and regression metrics expect. Training goes through
        ``forward`` (not ``encode``/``denoise``) so a ``DistributedDataParallel`` wrapper sees the pass and
        synchronises gradients.
        """
        if x_t is None or timesteps is None:
            return self.predict_age(x0)[:, None]
        return self.training_outputs(x0, x_t, timesteps, labelled)

    def training_outputs(
        self, x0: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor, labelled: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One encoder pass serving both losses: ``{"eps": eps_hat, "age": years (B,), NaN where not predicted}``.

        The head runs on the labelled images only (``labelled`` mask, all if None), as the paper's "without
        producing an age prediction" for unlabelled ones: with the paper's BatchNorm head its batch statistics come
        from labelled images alone. (The encoder, latent standardisation included, sees every image: it is what
        the diffusion arm trains.) A BatchNorm head in training mode cannot normalise a single item, so a batch
        with one labelled image then gets no age prediction (warned). A batch without an age prediction leaves the
        head unused: under DistributedDataParallel wrap with ``find_unused_parameters=True``.
        """
        if self.training and x0.shape[0] < 2 and isinstance(self.encoder.latent_norm, nn.BatchNorm1d):
            raise ValueError(
                "a training batch needs at least 2 images: z_sem is standardised over the batch "
                "(latent_norm='batch')"
            )
        z_sem = self.encoder(x0)
        eps = self.unet(x_t, timesteps, z_sem)
        if labelled is None:
            labelled = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
        # the head's output dtype: at least float32 (see AgeHead.forward)
        age_dtype = torch.promote_types(x0.dtype, torch.float32)
        age = torch.full((x0.shape[0],), float("nan"), dtype=age_dtype, device=x0.device)
        n_labelled = int(labelled.sum())
        batch_statistics = self.age_head.training and self.age_head.has_batchnorm
        if n_labelled > 1 or (n_labelled == 1 and not batch_statistics):
            age = age.masked_scatter(labelled, self.age_head(z_sem[labelled]))
        elif n_labelled == 1:
            warnings.warn(
                "a batch with a single labelled image gets no age prediction (the head's BatchNorm needs >= 2)"
            )
        return {"eps": eps, "age": age}

    def age_predictor(self) -> AgePredictor:
        """The encoder + head sub-network (shares parameters) for export and fast inference."""
        return AgePredictor(self.encoder, self.age_head, self.architecture)

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set every BatchNorm statistic to its exact value over ``batches`` of ``(images, labelled)``.

        "Precise BN" for the weights as they are (the EMA weights validation uses never produced running
        statistics of their own): the latent standardisation gets the mean and variance of the encoder's
        features over every image, labelled or not (the population its training batches come from); the head's
        BatchNorm layers, if any, get theirs layer by layer over the labelled images (the only ones the head
        trains on), with dropout off, as evaluation will see them. Pass un-augmented images.
        """
        was_training = self.training
        self.eval()
        try:
            features, labelled = [], []
            for images, mask in batches:
                features.append(self.encoder.features(images).float())
                labelled.append(mask.to(torch.bool).reshape(-1))
            if not features:
                return
            features, labelled = torch.cat(features), torch.cat(labelled)
            _set_batchnorm_statistics(self.encoder.latent_norm, features)
            hidden = self.encoder.latent_norm(features)[labelled]
            for layer in self.age_head.mlp:
                _set_batchnorm_statistics(layer, hidden)
                hidden = layer(hidden)
        finally:
            self.train(was_training)


class AgePredictor(RecordsArchitecture):
    """Encoder + age head only: x0 (B, C, H, W) -> age in years (B, 1), as ``DiffusionAutoencoder.forward``.

    Scriptable and traceable; what export and inference run (the U-Net is not needed to predict an age). Made by
    ``DiffusionAutoencoder.age_predictor()``, it checks a checkpoint's architecture as the full model does.
    """

    def __init__(self, encoder: SemanticEncoder, age_head: AgeHead, architecture: Mapping | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.age_head = age_head
        self.architecture = dict(architecture) if architecture is not None else None

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.age_head(self.encoder(x0))[:, None]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also takes a whole ``DiffusionAutoencoder`` state dict (the trained ``models/model.pt``): its U-Net
        weights are not part of the age predictor and are left out, so ``ckpt_export`` loads it strictly."""
        own = {key: value for key, value in state_dict.items() if not key.startswith("unet.")}
        return super().load_state_dict(own, strict=strict, assign=assign)


class AgeRegressor(nn.Module):
    """A plain image -> age regressor (the paper's baselines, e.g. MONAI ``DenseNet121``) with the age scale built in.

    The backbone predicts a standardised age; ``age_mean``/``age_std`` buffers (saved with the weights, like
    ``AgeHead``'s) map it to years, so it is a drop-in for ``DiffusionAutoencoder`` in evaluation, inference and
    export: ``forward(x0)`` -> (B, 1) years, and ``age_std`` is what the loss standardises with.
    """

    def __init__(self, backbone: nn.Module, age_mean: float = 56.0, age_std: float = 20.9) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("age_mean", torch.tensor(float(age_mean)))
        self.register_buffer("age_std", torch.tensor(float(age_std)))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        standardised = self.backbone(x0).reshape(x0.shape[0], 1)
        standardised = standardised.to(torch.promote_types(standardised.dtype, torch.float32))
        return standardised * self.age_std + self.age_mean

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Precise BN (Wu & Johnson 2021): every BatchNorm's running statistics recomputed as the average over
        ``batches`` of ``(images, labelled)`` of its batch statistics, weighted by batch size, for the weights as
        they are: the mean is the exact mean over all images, the variance the average within-batch variance.

        The EMA model validation uses shares the online model's BatchNorm buffers (ignite's ``EMAHandler`` copies
        them), which describe other weights; this makes them its own. The rest of the network stays in eval mode
        (no dropout). Pass un-augmented images.
        """
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms:
            return
        was_training = self.training
        momenta = [m.momentum for m in norms]
        self.eval()
        try:
            for m in norms:
                m.reset_running_stats()
                m.train()
            seen = 0
            for images, _ in batches:
                seen += len(images)
                for m in norms:
                    m.momentum = len(images) / seen  # running = the average of the batches so far, by size
                self.backbone(images)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            self.train(was_training)


def _set_batchnorm_statistics(module: nn.Module, inputs: torch.Tensor) -> None:
    """Store the exact batch statistics of ``inputs`` in a BatchNorm layer (no-op for other layers)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats and len(inputs) > 1:
        module.running_mean.copy_(inputs.mean(0))
        module.running_var.copy_(inputs.var(0))  # unbiased, as BatchNorm's running estimate
        module.num_batches_tracked.add_(1)


#: Bytes of the architecture record in a state dict: a fixed length, so MONAI's ``copy_model_state`` (used by
#: ``ckpt_export``), which copies only entries of equal shape, always copies it and the check always runs.
ARCHITECTURE_RECORD_BYTES = 1024


class ArchitectureMismatchError(BundleError, ValueError):
    """Weights trained with other architecture settings than the network configured to load them (a user's
    setting, so a one-line error wherever it surfaces)."""


def _architecture(**arguments) -> dict:
    """Constructor arguments as plain JSON values (sequences as lists), comparable after a round trip."""
    return {
        key: list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
        for key, value in arguments.items()
    }


def _architecture_record(architecture: Mapping | None) -> torch.Tensor:
    """``architecture`` as JSON in a fixed-length uint8 tensor (space-padded): a tensor is what
    ``torch.load(weights_only=True)`` and ``copy_model_state`` handle; an empty record means "unknown"."""
    text = json.dumps(architecture, sort_keys=True).encode() if architecture is not None else b""
    if len(text) > ARCHITECTURE_RECORD_BYTES:
        raise ValueError(f"architecture record of {len(text)} bytes exceeds {ARCHITECTURE_RECORD_BYTES}")
    return torch.tensor(list(text.ljust(ARCHITECTURE_RECORD_BYTES)), dtype=torch.uint8)


def _read_architecture_record(record: torch.Tensor) -> dict | None:
    text = bytes(record.to(torch.uint8).tolist()).strip()
    return json.loads(text) if text else None


#: Settings a trained model's ages do not depend on: regularisation and initialisation used only in training,
#: and the encoder's precision (fp32 and bf16 ages agree, docs/benchmarks.md); they may differ when loading.
UNCHECKED_SETTINGS = ("dropout", "head_dropout", "latent_gain", "encoder_fp32")


def check_architecture(recorded: Mapping | None, configured: Mapping | None) -> None:
    """:class:`ArchitectureMismatchError` naming every setting (but :data:`UNCHECKED_SETTINGS`) where
    ``recorded`` (the checkpoint's) and ``configured`` differ; nothing when either is unknown."""
    if recorded is None or configured is None:
        return
    differences = [
        f"{key} {recorded.get(key)!r} (configured {configured.get(key)!r})"
        for key in sorted(set(recorded) | set(configured))
        if key not in UNCHECKED_SETTINGS and recorded.get(key) != configured.get(key)
    ]
    if differences:
        raise ArchitectureMismatchError(
            "trained with " + ", ".join(differences) + "; pass the architecture settings it was trained with"
        )


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper, or ``module`` itself: where
    the model's own methods (``encode``, ``recalibrate_batchnorm``) and buffers (``age_std``) are."""
    return getattr(module, "module", module)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
