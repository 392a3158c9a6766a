"""The Stable Diffusion VAE (kl-f8 `AutoencoderKL`) in plain PyTorch: the parity oracle for every kernel.

Module names, nesting and parameter shapes follow diffusers (`diffusers.models.autoencoders.vae`,
`diffusers.models.resnet`, `diffusers.models.attention_processor`), so `state_dict()` keys and shapes equal those
of `diffusers.AutoencoderKL` built from the same config, and code that walks a diffusers VAE (the fast path in
`sdvae_fast.fast`) walks this one the same way. The architecture facts are in docs/design.md, section 1.

Every module here runs in any float dtype (fp64 for oracles, fp32, fp16, bf16) and in NCHW or channels_last
memory format. Tensors are `(N, C, H, W)` unless said otherwise; images are in [-1, 1], latents unscaled
(the encoder's own units, before `scaling_factor`).

Layout: building blocks (activation, ResnetBlock2D, Attention, Downsample2D, Upsample2D), blocks (DownEncoderBlock2D,
UpDecoderBlock2D, UNetMidBlock2D), Encoder and Decoder, and DiagonalGaussianDistribution.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

# diffusers' `get_activation` names; every public VAE uses "silu".
_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}

# GroupNorm epsilon of every norm in the kl-f8 VAE (diffusers' `resnet_eps`).
NORM_EPS = 1e-6


def get_activation(act_fn: str) -> nn.Module:
    """The activation module for diffusers' `act_fn` name ("silu" = "swish", "mish", "gelu", "relu").

    Raises ValueError naming the supported names for anything else.
    """
    try:
        return _ACTIVATIONS[act_fn]()
    except KeyError:
        raise ValueError(f"act_fn must be one of {sorted(_ACTIVATIONS)}, got {act_fn!r}") from None


def _check_groups(name: str, num_channels: int, num_groups: int) -> None:
    if num_groups <= 0 or num_channels % num_groups != 0:
        raise ValueError(
            f"{name}: num_channels ({num_channels}) must be divisible by norm_num_groups ({num_groups})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    """Pre-activation residual block: `out = (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))) / s`.

    `shortcut` is the 1x1 `conv_shortcut` when in_channels != out_channels, else identity; `s` is
    `output_scale_factor` (1 in every public VAE). No time embedding, dropout 0 at inference.

    Args:
        in_channels, out_channels: C_in and C_out (out_channels defaults to in_channels).
        num_groups: GroupNorm groups of both norms; must divide C_in and C_out.
        eps: GroupNorm epsilon (1e-6 in the VAE).
        act_fn: diffusers' activation name ("silu").
        output_scale_factor: divisor of the sum.
        dropout: dropout probability between norm2's activation and conv2 (0 in the VAE).

    forward(hidden_states: (N, C_in, H, W)) -> (N, C_out, H, W), same dtype.
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, *, num_groups: int = 32,
                 eps: float = NORM_EPS, act_fn: str = "silu", output_scale_factor: float = 1.0,
                 dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        _check_groups("ResnetBlock2D.norm1", in_channels, num_groups)
        _check_groups("ResnetBlock2D.norm2", out_channels, num_groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = get_activation(act_fn)
        # diffusers' slots that the VAE leaves empty: no time embedding, no resampling inside the block.
        self.time_emb_proj = None
        self.upsample = None
        self.downsample = None
        self.use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if self.use_in_shortcut else None

    def forward(self, hidden_states: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        if temb is not None:  # diffusers' signature; the VAE's resnets have no time embedding
            raise ValueError("temb must be None: the VAE's ResnetBlock2D has no time-embedding projection")
        residual = hidden_states
        hidden_states = self.conv1(self.nonlinearity(self.norm1(hidden_states)))
        hidden_states = self.conv2(self.dropout(self.nonlinearity(self.norm2(hidden_states))))
        if self.conv_shortcut is not None:
            residual = self.conv_shortcut(residual)
        return (residual + hidden_states) / self.output_scale_factor


class Attention(nn.Module):
    """Single-head spatial self-attention of the VAE mid block, with its own GroupNorm and residual.

    Over the N = H*W positions as tokens: `h = group_norm(x)`; `q, k, v = to_q(h), to_k(h), to_v(h)` (Linear
    C->C with bias, applied to channel vectors); `a = softmax(q k^T * scale) v` per head with
    `scale = dim_head ** -0.5`; `out = to_out[0](a)` (then `to_out[1]`, a Dropout); `+ x` when
    `residual_connection`; `/ rescale_output_factor`. In the VAE `heads = 1` and `dim_head = C` (512 in SD),
    so the scale is 1/sqrt(C). Names and semantics follow diffusers' `Attention` with `AttnProcessor2_0`.

    Args:
        query_dim: C.
        heads: number of heads (1 in the VAE); `dim_head` defaults to C // heads.
        num_groups, eps: the GroupNorm (`group_norm`) before the projections.
        rescale_output_factor, residual_connection: as above (1.0 and True in the VAE).

    forward(hidden_states: (N, C, H, W)) -> (N, C, H, W), same dtype. Uses
    `torch.nn.functional.scaled_dot_product_attention` (which on CPU may materialise the (H*W)^2 scores).
    """

    def __init__(self, query_dim: int, *, heads: int = 1, dim_head: Optional[int] = None, num_groups: int = 32,
                 eps: float = NORM_EPS, rescale_output_factor: float = 1.0, residual_connection: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        dim_head = query_dim // heads if dim_head is None else dim_head
        _check_groups("Attention.group_norm", query_dim, num_groups)
        self.query_dim = query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.inner_dim = heads * dim_head
        self.scale = dim_head ** -0.5
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        self.group_norm = nn.GroupNorm(num_groups, query_dim, eps=eps, affine=True)
        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=True)
        self.to_k = nn.Linear(query_dim, self.inner_dim, bias=True)
        self.to_v = nn.Linear(query_dim, self.inner_dim, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, query_dim, bias=True), nn.Dropout(dropout)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        n, c, h, w = hidden_states.shape
        tokens = self.group_norm(hidden_states).reshape(n, c, h * w).transpose(1, 2)  # (N, H*W, C)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)  # (N, H*W, heads*dim_head)
        # Split heads: (N, H*W, heads*d) -> (N, heads, H*W, d)
        q, k, v = (t.reshape(n, h * w, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (N, heads, H*W, d)
        out = out.transpose(1, 2).reshape(n, h * w, self.inner_dim)  # (N, H*W, heads*d)
        out = self.to_out[1](self.to_out[0](out))  # (N, H*W, C)
        out = out.transpose(1, 2).reshape(n, c, h, w)  # (N, C, H, W)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


class Downsample2D(nn.Module):
    """Encoder downsampling: zero-pad right and bottom by one (pad (0, 1, 0, 1)), then 3x3 conv, stride 2, no padding.

    An H-row input gives floor(H / 2) rows for H >= 2 (468 -> 234 -> 117 -> 58); H = 1 is too small and raises.
    forward(hidden_states: (N, C, H, W)) -> (N, C_out, H // 2, W // 2).
    """

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.channels = channels
        self.out_channels = out_channels
        # diffusers' flags for this configuration (code that walks either tree reads them): a conv, no norm,
        # padding 0 meaning "pad (0, 1, 0, 1) in forward"; DownEncoderBlock2D names it "op" (the conv stays `conv`).
        self.use_conv = True
        self.name = "op"
        self.norm = None
        self.padding = 0
        self.conv = nn.Conv2d(channels, out_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if min(hidden_states.shape[-2:]) < 2:
            raise ValueError(
                f"Downsample2D needs height and width >= 2, got {tuple(hidden_states.shape[-2:])}"
            )
        return self.conv(F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample2D(nn.Module):
    """Decoder upsampling: nearest-neighbour 2x interpolation, then 3x3 conv, stride 1, padding 1.

    forward(hidden_states: (N, C, H, W)) -> (N, C_out, 2H, 2W).
    """

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.channels = channels
        self.out_channels = out_channels
        # diffusers' flags for this configuration: nearest interpolation then a conv named "conv", no norm.
        self.use_conv = True
        self.use_conv_transpose = False
        self.interpolate = True
        self.name = "conv"
        self.norm = None
        self.conv = nn.Conv2d(channels, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------


class DownEncoderBlock2D(nn.Module):
    """`num_layers` ResnetBlock2D (the first maps C_in -> C_out), then an optional Downsample2D.

    forward: (N, C_in, H, W) -> (N, C_out, H // 2, W // 2) with the downsampler, (N, C_out, H, W) without.
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, num_groups: int,
                 act_fn: str = "silu", add_downsample: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, num_groups=num_groups,
                          act_fn=act_fn)
            for i in range(num_layers)
        ])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        for downsampler in self.downsamplers or ():
            hidden_states = downsampler(hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """`num_layers` ResnetBlock2D (the first maps C_in -> C_out), then an optional Upsample2D.

    forward: (N, C_in, H, W) -> (N, C_out, 2H, 2W) with the upsampler, (N, C_out, H, W) without.
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, num_groups: int,
                 act_fn: str = "silu", add_upsample: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, num_groups=num_groups,
                          act_fn=act_fn)
            for i in range(num_layers)
        ])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        for upsampler in self.upsamplers or ():
            hidden_states = upsampler(hidden_states)
        return hidden_states


def _checkpoint(fn, *args):
    """`fn(*args)` with its activations recomputed in the backward pass (`torch.utils.checkpoint`, non-reentrant)."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def _run_block(owner: nn.Module, block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`block(hidden_states)`, through `owner._gradient_checkpointing_func` when gradient checkpointing is on
    (`owner.gradient_checkpointing`, set by `enable_gradient_checkpointing`) and autograd is recording."""
    if owner.gradient_checkpointing and torch.is_grad_enabled():
        return owner._gradient_checkpointing_func(block, hidden_states)
    return block(hidden_states)


class UNetMidBlock2D(nn.Module):
    """The mid block: resnet, attention, resnet (`resnets[0]`, `attentions[0]`, `resnets[1]`).

    With `add_attention=False` the attention slot holds None (as in diffusers) and the block is two resnets.
    Attention is single-head over all channels (diffusers sets `attention_head_dim = C`).
    forward: (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, channels: int, *, num_groups: int, act_fn: str = "silu", add_attention: bool = True):
        super().__init__()
        self.add_attention = add_attention
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = _checkpoint
        # Registration order (attentions, then resnets) matches diffusers, so state_dict() keys come in its order.
        attention = Attention(channels, heads=1, dim_head=channels, num_groups=num_groups) if add_attention else None
        self.attentions = nn.ModuleList([attention])
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, num_groups=num_groups, act_fn=act_fn) for _ in range(2)
        ])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            if attention is not None:
                hidden_states = attention(hidden_states)
            hidden_states = _run_block(self, resnet, hidden_states)
        return hidden_states


# ---------------------------------------------------------------------------------------------------------------
# Encoder and decoder
# ---------------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Image -> latent moments: conv_in, down blocks, mid block, GroupNorm + activation + conv_out.

    Level i has `layers_per_block` resnets at `block_out_channels[i]` channels and downsamples by 2 after every
    level but the last, so an (H, W) image gives (H // f, W // f) latents with f = 2 ** (levels - 1) (for H, W >= f).

    Args:
        in_channels: image channels (3).
        out_channels: latent channels c; conv_out writes 2c channels (mean, logvar) when double_z.
        block_out_channels: widths per level, e.g. (128, 256, 512, 512).
        layers_per_block: resnets per level (2 in SD).
        norm_num_groups: GroupNorm groups everywhere (32 in SD).
        act_fn: activation name ("silu").
        double_z: emit 2c channels (always True for AutoencoderKL).
        mid_block_add_attention: whether the mid block has its attention.

    forward(sample: (N, in_channels, H, W)) -> (N, 2c or c, H // f, W // f).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 4, *,
                 block_out_channels: Sequence[int] = (128, 256, 512, 512), layers_per_block: int = 2,
                 norm_num_groups: int = 32, act_fn: str = "silu", double_z: bool = True,
                 mid_block_add_attention: bool = True):
        super().__init__()
        self.layers_per_block = layers_per_block
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = _checkpoint
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList()
        prev_channels = block_out_channels[0]
        for i, channels in enumerate(block_out_channels):
            self.down_blocks.append(DownEncoderBlock2D(
                prev_channels, channels, num_layers=layers_per_block, num_groups=norm_num_groups, act_fn=act_fn,
                add_downsample=i < len(block_out_channels) - 1,
            ))
            prev_channels = channels
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], num_groups=norm_num_groups, act_fn=act_fn,
                                        add_attention=mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[-1], eps=NORM_EPS, affine=True)
        self.conv_act = get_activation(act_fn)
        conv_out_channels = 2 * out_channels if double_z else out_channels
        self.conv_out = nn.Conv2d(block_out_channels[-1], conv_out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for down_block in self.down_blocks:
            sample = _run_block(self, down_block, sample)
        sample = _run_block(self, self.mid_block, sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """Latents -> image: conv_in, mid block, up blocks, GroupNorm + activation + conv_out.

    The up blocks run the widths in reverse (512, 512, 256, 128 in SD) with `layers_per_block + 1` resnets each and
    upsample by 2 after every level but the last, so (h, w) latents give an (f*h, f*w) image, f = 2 ** (levels - 1).

    Args: as for `Encoder`, with in_channels = latent channels c and out_channels = image channels (3).

    forward(sample: (N, c, h, w)) -> (N, out_channels, f*h, f*w).
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 3, *,
                 block_out_channels: Sequence[int] = (128, 256, 512, 512), layers_per_block: int = 2,
                 norm_num_groups: int = 32, act_fn: str = "silu", mid_block_add_attention: bool = True):
        super().__init__()
        self.layers_per_block = layers_per_block
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = _checkpoint
        reversed_channels = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(in_channels, reversed_channels[0], kernel_size=3, stride=1, padding=1)
        # up_blocks is registered before mid_block, as in diffusers (state_dict() key order).
        self.up_blocks = nn.ModuleList()
        prev_channels = reversed_channels[0]
        for i, channels in enumerate(reversed_channels):
            self.up_blocks.append(UpDecoderBlock2D(
                prev_channels, channels, num_layers=layers_per_block + 1, num_groups=norm_num_groups,
                act_fn=act_fn, add_upsample=i < len(reversed_channels) - 1,
            ))
            prev_channels = channels
        self.mid_block = UNetMidBlock2D(reversed_channels[0], num_groups=norm_num_groups, act_fn=act_fn,
                                        add_attention=mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=NORM_EPS, affine=True)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        sample = _run_block(self, self.mid_block, sample)
        for up_block in self.up_blocks:
            sample = _run_block(self, up_block, sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


# ---------------------------------------------------------------------------------------------------------------
# Posterior
# ---------------------------------------------------------------------------------------------------------------

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]


def randn_like_diffusers(shape: Sequence[int], generator: GeneratorArg, device: torch.device,
                         dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn the way diffusers' `randn_tensor` draws it.

    Args:
        shape: the noise's shape, e.g. (N, c, h, w); sizes may be symbolic under `torch.compile`.
        generator: None (the global RNG of `device`), a torch.Generator, or a list of N generators (sample i of
            the batch is drawn from generator i).
        device, dtype: where and in which float dtype the noise is returned.
    Returns:
        A `shape` tensor of `dtype` on `device`. With a CPU generator and a non-CPU `device` the noise is drawn on
        the CPU and moved, so a seed gives the same latents on every device; with a generator the numbers are
        bitwise those of diffusers' `randn_tensor` for the same generator state.
    Raises:
        ValueError: a list whose length is not shape[0], or a non-CPU generator for another device type.

    Under `torch.compile`: without a generator the draw is `torch.randn(shape)` traced into the graph (dynamic
    sizes allowed; the numbers come from the compiled graph's RNG, which for inductor is its own Philox stream
    unless `torch._inductor.config.fallback_random` is set, as for any `torch.randn` under inductor). With a
    generator the draw runs eagerly (`torch.compiler.disable`): one graph break, exactly here, because a
    torch.Generator cannot be traced; the numbers stay diffusers'.
    """
    shape = tuple(shape)
    if generator is None:
        # No `generator=None` keyword: torch.randn's generator overload rejects symbolic sizes under compile.
        return torch.randn(shape, device=device, dtype=dtype)
    return _randn_with_generators(shape, generator, device, dtype)


@torch.compiler.disable
def _randn_with_generators(shape: tuple, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """randn_like_diffusers for a generator or a list of them, always eager (see there); shape is concrete."""
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {shape[0]}")
        if len(generator) == 1:
            generator = generator[0]
        else:
            parts = [_randn_with_generators((1,) + shape[1:], g, device, dtype) for g in generator]
            return torch.cat(parts, dim=0)
    rand_device = torch.device(device)
    if generator.device.type != rand_device.type:
        if generator.device.type != "cpu":
            raise ValueError(f"generator: a {generator.device} generator cannot draw noise for {device}")
        rand_device = torch.device("cpu")
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


class DiagonalGaussianDistribution:
    """The encoder's posterior q(z|x): a Gaussian with diagonal covariance, as diffusers defines it.

    Args:
        parameters: moments (N, 2c, h, w): channels [0, c) are the mean, [c, 2c) the log-variance.
        deterministic: if True, std and var are zero (sample() returns the mean; kl and nll are zero).

    Attributes (each (N, c, h, w), parameters' dtype and device): `mean`, `logvar` (clamped to [-30, 20]),
    `std = exp(logvar / 2)`, `var = exp(logvar)`; `parameters` is the input.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if parameters.dim() < 2 or parameters.shape[1] % 2 != 0:
            raise ValueError(
                f"parameters must be (N, 2c, ...) with an even channel count, got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: GeneratorArg = None) -> torch.Tensor:
        """A draw `mean + std * eps`, eps ~ N(0, I) from `generator` (drawn as diffusers draws it): (N, c, h, w) in
        the parameters' dtype and device.

        `generator`: None, a torch.Generator, or a list of N generators (one per sample); ValueError for a list of
        another length. Bitwise diffusers' draw for the same generator state, also under `torch.compile` (where a
        generator costs one graph break at the draw; without one the draw is traced: `randn_like_diffusers`).
        """
        noise = randn_like_diffusers(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The mode (= mean) of the distribution: (N, c, h, w)."""
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL(self || other) summed over (c, h, w), shape (N,); `other=None` means the standard normal N(0, I).

        KL of diagonal Gaussians: 0.5 * sum((mu1 - mu2)^2 / var2 + var1 / var2 - 1 - logvar1 + logvar2).
        Zero for a deterministic distribution.
        """
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = ((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                     - 1.0 - self.logvar + other.logvar)
        return 0.5 * terms.sum(dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample` (N, c, h, w) in nats, summed over `dims`:

        0.5 * sum(log(2 pi) + logvar + (sample - mean)^2 / var). Zero for a deterministic distribution.
        """
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=list(dims))
