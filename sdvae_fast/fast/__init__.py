"""The fast forward of the SD VAE: walks a diffusers-structured module tree and runs it on `sdvae_fast.ops`.

One module tree, two forwards (docs/design.md, section 3). Our `sdvae_fast.AutoencoderKL` and a live
`diffusers.AutoencoderKL` carry the same module names (`encoder.down_blocks[i].resnets[j].norm1`, ...), so the
functions here serve both: the model calls `encode_moments` / `decode_sample` when `use_fast_path` says so, and
`sdvae_fast.patching.patch` routes a diffusers VAE's `encoder` / `decoder` through `run_encoder` / `run_decoder`.

This package is the only place that knows module types: `sdvae_fast.fast.units` holds the registry (which class
runs as which fused unit, and why a module cannot); this module runs the units' stages in order with the fp16
overflow policy below. `iter_units(model)` lists the units of a VAE by module path, the same list `parity` and
`profile` use.

Units (each reads the module's own parameters; nothing is copied):
- GSC unit (GroupNorm -> SiLU -> conv) = one `ops.gn_silu_conv2d`, GroupNorm statistics in fp32 over the whole
  (sample, group), emitted by the conv that wrote the tensor (below) or computed by the op.
- ResnetBlock2D: `conv1(GSC(x))` and `conv2(GSC(h)) + shortcut(x)` as two GSC ops, the residual added in the
  second op's epilogue; the 1x1 `conv_shortcut` is a plain `gn_silu_conv2d(norm_weight=None, padding=0)` whose
  output is that residual.
- Downsample2D: `gn_silu_conv2d(norm_weight=None, stride=2, padding=(0, 1, 0, 1))` (diffusers pads right and
  bottom by one when `padding == 0`).
- Upsample2D: `ops.upsample_conv2d` (nearest 2x + 3x3 conv without the 4x tensor).
- Mid-block Attention: `ops.vae_attention_block(x, module)`: GroupNorm + fused QKV 1x1 conv as one
  `gn_silu_conv2d(silu=False)`, `ops.attention` (flash, no N x N tensor), and the output projection as a 1x1
  `gn_silu_conv2d` with the residual in its epilogue.
- conv_norm_out + conv_act + conv_out: one GSC op. In the encoder, `quant_conv` (1x1) is folded into `conv_out`
  (3x3): `W = Wq @ Wout`, `b = Wq @ bout + bq`, exact because the 1x1 conv has no padding. The decoder's
  `post_quant_conv` stays a separate 1x1 op: folded into the zero-padded `conv_in` its bias would leak into the
  border.

Anything the kernels do not cover (`output_scale_factor != 1`, a non-SiLU activation, SpatialNorm, a time
embedding other than scale/shift, dropout while training, LoRA-wrapped or dilated convs, custom attention
processors, unknown block classes) runs that unit's own module forward, so results stay correct; `unsupported_units(model)` lists them
with the reason. When autograd is needed (grad enabled and
the input or a parameter requires grad) the whole forward is the module's own, since the ops have no backward.

Statistics from the producer (`EMIT_GN_STATS`, on by default). Every tensor a GroupNorm normalises here is written
by one of our convs (conv_in, a ResNet's convs, Downsample2D, Upsample2D, the attention's out projection). That
conv's epilogue reduces each output tile, as stored, to per-channel-run (count, mean, M2) partials, and one small
kernel merges them per (sample, group) with Chan's formula in a fixed order (`kernels/conv.py`,
`kernels/group_norm.py`): the next unit gets its (mean, rstd) without reading the tensor again (one full read of
every normalised activation saved; the partials are about 3 floats per 128-pixel tile and channel run).
`units.link` tells each unit which GroupNorm (num_groups, eps) its successor applies first. Deterministic and batch invariant
like the separate statistics pass (tiles never span two images), but a different summation order, so the two agree
to fp32 rounding, not bitwise. Set `EMIT_GN_STATS = False` to compute every statistic with
`ops.group_norm_stats` instead; `bench/gpu_check.sh` times the decode both ways.

Layout and memory: the public functions take NCHW tensors in any memory format and return contiguous NCHW.
Between units activations are channels_last (NHWC in memory), as the ops write them. Each unit takes its input
out of a `_Carry` (with the statistics emitted for it) so that no caller keeps it alive: an activation is freed as
soon as its last consumer has run (for a ResNet with a shortcut, before its second conv).

Derived weights (the folded quant_conv, the fused QKV projection, the packed conv weights) live in the one
`derived_weights` cache of `kernels/_common.py`: keyed by weak references to the source parameters together with
their `tensor_stamp` (version, storage, dtype, device), so `.to()`, `load_state_dict` and in-place edits
invalidate them. Under `torch.compile` they are computed inside the graph instead (a few small matmuls per call),
which keeps the traced graph free of Python-side caches.

Precision policy (fp16). fp32 statistics and accumulation everywhere; activations are stored in the model's dtype.
bf16 and fp32 keep fp32's range; fp16 does not (SDXL's VAE overflows it), and `force_upcast` marks no particular
model, so the fast path checks instead: for an fp16 input, each stage (conv_in, each down/up block, the mid
block, the output unit) ends with one `torch.isfinite(y).all()`. If a stage's output is not finite, that stage is
recomputed from its kept input with parameters cast to `FP16_OVERFLOW_DTYPE` (fp32 by default, bf16 is the faster
choice) and every later stage runs in that dtype; the result is cast back to fp16 (clamped to +-65504). So an fp16
run never returns NaN/Inf unless the fp32 run would (or its result itself exceeds fp16's range). Cost when nothing
overflows: one extra read of each stage's output and one host sync per stage (7 per encode or decode); when a
stage overflows, that stage runs twice and the rest at the wider dtype. Under `torch.compile` the per-stage syncs
cannot be traced; there the fp16 pass runs whole, and `torch.cond` on the finiteness of its output either keeps
it or runs the whole forward at the wider dtype (one check, no sync inside the graph; an overflow costs a full
extra pass). Under patch parallelism (`sdvae_fast.parallel`) each rank checks its band and the flags are
all-reduced after every stage, so all ranks take the same decision. Measure the cost on a GPU by timing `decode_sample` on fp16 latents with `FP16_GUARD` True and False
(CUDA events, same latents, eager and compiled), and on a VAE whose weights overflow fp16 (the recompute path).

Precision policy (autocast). Under `torch.autocast(device_type, dtype=float16 or bfloat16)` an fp32 model's
fast path follows autocast like the reference does: the input is cast to the autocast dtype, every unit runs in
it (the ops convert the fp32 parameters themselves: conv weights are packed into the autocast dtype once per
parameter and cached in `derived_weights`, so repeated calls neither rebuild nor keep anything extra; bias and
GroupNorm affine terms are read in fp32), and the result is in the autocast dtype. An fp16 autocast run gets the
fp16 overflow guard above (the reference's would return NaN/Inf). Autocast is switched off inside the walker, so
fallback units run their module forwards in the autocast dtype with parameters cast per call (`RunContext.cast`).
fp16/bf16/fp64 models ignore autocast here and run in their own dtype. docs/design.md, section 6, has the table
of both backends.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from sdvae_fast.backends import BACKENDS as VALID_BACKENDS
from sdvae_fast.backends import use_fast_path
from sdvae_fast.fast.units import (
    Carry,
    ParallelHooks,
    RunContext,
    Unit,
    UNetInput,
    decoder_units,
    encoder_units,
    folded_quant_conv,
    fused_qkv_weights,
    iter_units,
    register_block,
    unet_units,
    unet_why_not,
    register_unit,
    unsupported_units,
    vae_attention_block,
)

Tensor = torch.Tensor

__all__ = [
    "EMIT_GN_STATS", "FP16_GUARD", "FP16_OVERFLOW_DTYPE", "VALID_BACKENDS", "ParallelHooks", "RunContext", "Unit",
    "autocast_dtype", "decode_sample", "encode_moments", "folded_quant_conv", "fused_qkv_weights", "iter_units",
    "needs_autograd", "register_block", "register_unit", "run_decoder", "run_encoder", "run_unet",
    "unet_units", "unet_why_not", "unsupported_units", "use_fast_path", "vae_attention_block",
]

#: Check each stage of an fp16 forward for overflow and recompute it wider (see the module docstring).
FP16_GUARD = True
#: The dtype an overflowing fp16 stage and everything after it are recomputed in.
FP16_OVERFLOW_DTYPE = torch.float32
#: Have each conv emit the GroupNorm statistics of its output for the next unit (see the module docstring).
EMIT_GN_STATS = True

_FP16_MAX = 65504.0

Stages = List[List[Unit]]


# ---------------------------------------------------------------------------------------------------------------
# Running stages, with the fp16 overflow policy
# ---------------------------------------------------------------------------------------------------------------


def _run_units(units: List[Unit], carry: Carry, ctx: RunContext) -> None:
    """Run units in order on the activation in `carry`, leaving the last output (and its statistics) there."""
    for unit in units:
        carry.put(*unit(carry, ctx))


def _run_all(stages: Stages, x: Tensor, ctx: RunContext) -> Tensor:
    """Run every stage in order, unguarded (under patch parallelism with the ranks' check after each stage)."""
    carry = Carry(x)
    del x
    for stage in stages:
        _run_units(stage, carry, ctx)
        if ctx.parallel is not None:
            ctx.parallel.end_stage(carry.x, check_finite=False)
    return carry.take()[0]


def _narrow_to_fp16(y: Tensor) -> Tensor:
    """A wider result back to fp16, clamped to fp16's finite range (NaN stays NaN)."""
    return y.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)


def _run_guarded_fp16(stages: Stages, x: Tensor, ctx: RunContext) -> Tensor:
    """Eager fp16 policy: check each stage's output; from the first non-finite one on, recompute wider."""
    carry = Carry(x)
    del x
    for i, stage in enumerate(stages):
        stage_input = carry.x  # kept for the recompute
        saved_skips = list(ctx.skips)  # a UNet stage pushes/pops skips: the recompute starts from these
        _run_units(stage, carry, ctx)
        # One host sync per stage; under patch parallelism the ranks decide together (any rank's overflow).
        finite = ctx.parallel.end_stage(carry.x, True) if ctx.parallel else bool(torch.isfinite(carry.x).all())
        if not finite:
            carry.take()
            ctx.skips[:] = saved_skips
            wide = stage_input.to(FP16_OVERFLOW_DTYPE)
            del stage_input
            return _narrow_to_fp16(_run_all(stages[i:], wide, ctx.widened(FP16_OVERFLOW_DTYPE)))
        del stage_input
    return carry.take()[0]


def _run_compiled_fp16(stages: Stages, x: Tensor, ctx: RunContext) -> Tensor:
    """Traceable fp16 policy: the fp16 pass, then `torch.cond` on its finiteness keeps it or runs a whole pass at
    FP16_OVERFLOW_DTYPE (both branches are in the graph; only one runs)."""
    wide = ctx.widened(FP16_OVERFLOW_DTYPE)

    def keep(y: Tensor, x: Tensor) -> Tensor:
        return y.clone()

    def widen(y: Tensor, x: Tensor) -> Tensor:
        return _narrow_to_fp16(_run_all(stages, x.to(FP16_OVERFLOW_DTYPE), wide)).contiguous()

    y = _run_all(stages, x, ctx).contiguous()
    return torch.cond(torch.isfinite(y).all(), keep, widen, (y, x))


def run_stages(stages: Stages, x: Tensor, ctx: Optional[RunContext] = None) -> Tensor:
    """Run the stages in order on x, with the fp16 overflow policy of the module docstring for fp16 inputs.

    Args:
        stages: lists of units (from `units.encoder_units` / `decoder_units`); a stage is what the fp16 guard
            checks and recomputes as one piece.
        x: the first unit's input (N, C, H, W), any memory format.
        ctx: the run context; default: identity cast, statistics emitted when `EMIT_GN_STATS`.
    Returns:
        The last unit's output (N, C', H', W'), channels_last for the fused units, x's dtype.
    """
    if ctx is None:
        ctx = RunContext(emit_stats=EMIT_GN_STATS)
    if x.dtype != torch.float16 or not FP16_GUARD:
        return _run_all(stages, x, ctx)
    if torch.compiler.is_compiling():
        return _run_compiled_fp16(stages, x, ctx)
    return _run_guarded_fp16(stages, x, ctx)


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------


def _check_input(name: str, x, conv, what: str) -> None:
    """Clear errors for a wrong rank, channel count, dtype or device of the tensor entering `conv`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    channels = conv.in_channels if hasattr(conv, "in_channels") else conv.weight.shape[1]
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be {what} of shape (N, {channels}, H, W), got shape {tuple(x.shape)}")
    weight = conv.weight
    if x.dtype != weight.dtype:
        raise TypeError(
            f"{name} is {x.dtype} but the VAE's parameters are {weight.dtype}; cast it first, e.g. {name}.to(vae.dtype)"
        )
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but the VAE's parameters are on {weight.device}")


def needs_autograd(module: nn.Module, x: Tensor) -> bool:
    """True when grad mode is on and `x` or a parameter of `module` requires grad: a backward through this
    forward may be wanted, and the ops have no backward, so the modules' own forwards must run."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype the fast path runs an input `x` in under `torch.autocast`, or None to run it in x's own dtype.

    The autocast dtype when autocast is enabled for x's device type with a float16/bfloat16 dtype and x (hence
    the model, which the entry points have checked) is float32; None otherwise: no autocast, another autocast
    dtype, or an fp16/bf16/fp64 model (run in its own dtype, as autocast leaves fp64 alone).
    """
    device_type = x.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # a device type autocast does not know
        return None
    dtype = torch.get_autocast_dtype(device_type)
    if x.dtype != torch.float32 or dtype not in (torch.float16, torch.bfloat16):
        return None
    return dtype


def _run_fast(stages: Stages, x: Tensor, temb: Optional[Tensor] = None, latents: Optional[Tensor] = None,
              unet_input: Optional[UNetInput] = None) -> Tensor:
    """Run the stages on x with the precision policy: under `torch.autocast` (fp16/bf16, fp32 model) the
    activations run in the autocast dtype, parameters are converted by the ops (packed weights cached per dtype)
    and the result is in the autocast dtype, as the reference's last conv returns it; an fp16 autocast run is
    guarded against overflow like an fp16 model. Autocast itself is switched off inside, so that module-forward
    fallback units and the ops' PyTorch fallbacks compute in the dtypes given to them. `temb` (N, C_temb), a
    UNet's time embedding, and `latents` (N, C_z, h, w), SpatialNorm's quantised latents (MoVQ), go into the run
    context (cast with the activations). Returns contiguous NCHW."""
    dtype = autocast_dtype(x)
    ctx = RunContext(emit_stats=EMIT_GN_STATS, temb=temb, latents=latents, unet_input=unet_input)
    if dtype is not None:
        x = x.to(dtype)
        ctx = ctx.widened(dtype)
    device_type = x.device.type
    try:
        autocast_on = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        autocast_on = False
    if not autocast_on:
        return run_stages(stages, x, ctx).contiguous()
    with torch.autocast(device_type, enabled=False):
        return run_stages(stages, x, ctx).contiguous()


def _encode(encoder: nn.Module, sample: Tensor, quant_conv: Optional[nn.Module]) -> Tensor:
    """run_encoder without validation (the caller has validated `sample`)."""
    if needs_autograd(encoder, sample) or (quant_conv is not None and needs_autograd(quant_conv, sample)):
        moments = encoder(sample)
        return moments if quant_conv is None else quant_conv(moments)
    return _run_fast(encoder_units(encoder, quant_conv), sample)


def _decode(decoder: nn.Module, sample: Tensor, post_quant_conv: Optional[nn.Module],
            latent_embeds: Optional[Tensor] = None) -> Tensor:
    """run_decoder without validation (the caller has validated `sample` and `latent_embeds`)."""
    if needs_autograd(decoder, sample) or (post_quant_conv is not None and needs_autograd(post_quant_conv, sample)):
        h = sample if post_quant_conv is None else post_quant_conv(sample)
        return decoder(h) if latent_embeds is None else decoder(h, latent_embeds)
    return _run_fast(decoder_units(decoder, post_quant_conv), sample, latents=latent_embeds)


def run_encoder(encoder: nn.Module, sample: Tensor, quant_conv: Optional[nn.Module] = None) -> Tensor:
    """A diffusers-structured `Encoder` forward on the ops, optionally followed by `quant_conv` (folded in).

    Args:
        encoder: an Encoder with diffusers' attribute names (conv_in, down_blocks, mid_block, conv_norm_out,
            conv_act, conv_out).
        sample: images (N, C_in, H, W) in [-1, 1], the encoder's dtype and device, any memory format.
        quant_conv: the VAE's 1x1 quant_conv, or None.
    Returns:
        (N, 2*latent_channels, ceil-halved H and W per downsample) moments, contiguous NCHW, sample's dtype
        (under `torch.autocast` with an fp32 model: the autocast dtype, see `autocast_dtype`). Falls back to
        `encoder(sample)` (+ quant_conv) when autograd is needed.
    Raises:
        ValueError / TypeError on a wrong shape, channel count, dtype or device (naming the expected shape).
    """
    _check_input("sample", sample, encoder.conv_in, "images")
    return _encode(encoder, sample, quant_conv)


def run_decoder(decoder: nn.Module, sample: Tensor, post_quant_conv: Optional[nn.Module] = None,
                latent_embeds: Optional[Tensor] = None) -> Tensor:
    """`post_quant_conv` (if given) and a diffusers-structured `Decoder` forward on the ops.

    Args:
        decoder: a Decoder with diffusers' attribute names (conv_in, mid_block, up_blocks, conv_norm_out,
            conv_act, conv_out).
        sample: latents (N, latent_channels, h, w), unscaled (already divided by scaling_factor), in the
            decoder's dtype and device, any memory format.
        post_quant_conv: the VAE's 1x1 post_quant_conv, or None.
        latent_embeds: SpatialNorm's conditioning (MoVQ: diffusers' `Decoder(sample, latent_embeds)`), the
            quantised latents (N, C_z, h', w') in sample's dtype and device, or None. Required when the decoder
            holds SpatialNorm layers; those units run their module forwards with it (docs/design.md, "VQ").
    Returns:
        (N, 3, 8h, 8w) images (for the usual 4-block VAE), contiguous NCHW, sample's dtype (under
        `torch.autocast` with an fp32 model: the autocast dtype, see `autocast_dtype`). Falls back to the
        modules' own forwards when autograd is needed.
    Raises:
        ValueError / TypeError on a wrong shape, channel count, dtype or device (naming the expected shape).
    """
    first = post_quant_conv if post_quant_conv is not None else decoder.conv_in
    _check_input("z", sample, first, "latents")
    if latent_embeds is not None:
        if not isinstance(latent_embeds, torch.Tensor) or latent_embeds.dim() != 4:
            raise ValueError(f"latent_embeds must be a 4-D tensor (N, C_z, h, w), got "
                             f"{getattr(latent_embeds, 'shape', type(latent_embeds).__name__)}")
        if latent_embeds.shape[0] != sample.shape[0] or latent_embeds.dtype != sample.dtype \
                or latent_embeds.device != sample.device:
            raise ValueError(f"latent_embeds must have z's batch size {sample.shape[0]}, dtype {sample.dtype} and "
                             f"device {sample.device}, got shape {tuple(latent_embeds.shape)}, "
                             f"{latent_embeds.dtype} on {latent_embeds.device}")
    return _decode(decoder, sample, post_quant_conv, latent_embeds)


def encode_moments(vae, x: Tensor, *, validate: bool = True) -> Tensor:
    """`quant_conv(encoder(x))` on the fast path: the parameters of the latent distribution.

    Args:
        vae: any object with diffusers' AutoencoderKL structure (`.encoder`, `.quant_conv` possibly None), e.g.
            our AutoencoderKL or a live `diffusers.AutoencoderKL`.
        x: images (N, 3, H, W) in [-1, 1], the VAE's dtype and device, NCHW or channels_last.
        validate: False when the caller has validated x already (our AutoencoderKL does, once, at its boundary).
    Returns:
        moments (N, 2*latent_channels, h, w), contiguous NCHW, x's dtype (the autocast dtype under
        `torch.autocast` with an fp32 model, see `autocast_dtype`): mean then logvar (unclamped; the
        latent distribution clamps logvar to [-30, 20]), h = H/8 rounded as diffusers' Downsample2D does.
    Raises:
        ValueError / TypeError on a wrong shape, channel count, dtype or device.
    """
    quant_conv = getattr(vae, "quant_conv", None)
    if validate:
        return run_encoder(vae.encoder, x, quant_conv)
    return _encode(vae.encoder, x, quant_conv)


def decode_sample(vae, z: Tensor, *, validate: bool = True) -> Tensor:
    """`decoder(post_quant_conv(z))` on the fast path.

    Args:
        vae: any object with diffusers' AutoencoderKL structure (`.decoder`, `.post_quant_conv` possibly None).
        z: latents (N, latent_channels, h, w), already divided by scaling_factor (and shifted), the VAE's dtype
            and device, NCHW or channels_last.
        validate: False when the caller has validated z already (our AutoencoderKL does, once, at its boundary).
    Returns:
        images (N, 3, 8h, 8w) in about [-1, 1], contiguous NCHW, z's dtype (the autocast dtype under
        `torch.autocast` with an fp32 model, see `autocast_dtype`).
    Raises:
        ValueError / TypeError on a wrong shape, channel count, dtype or device.
    """
    post_quant_conv = getattr(vae, "post_quant_conv", None)
    if validate:
        return run_decoder(vae.decoder, z, post_quant_conv)
    return _decode(vae.decoder, z, post_quant_conv)


def unet_time_embedding(unet: nn.Module, timestep, batch: int, device) -> Tensor:
    """UNet2DModel's time embedding `time_embedding(time_proj(timesteps))`, (N, C_temb), in the UNet's dtype.

    The arithmetic of diffusers' UNet2DModel.forward: a Python number becomes a long tensor, a 0-d tensor a 1-d
    one, broadcast to `batch` samples by multiplying with ones of the timestep's dtype; `time_proj`'s output is
    cast to the UNet's dtype before `time_embedding` (a 2-layer MLP). (N, C) only, so PyTorch runs it.
    """
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.long, device=device)
    elif timesteps.dim() == 0:
        timesteps = timesteps[None].to(device)
    timesteps = timesteps * torch.ones(batch, dtype=timesteps.dtype, device=timesteps.device)
    dtype = unet.conv_in.weight.dtype
    return unet.time_embedding(unet.time_proj(timesteps).to(dtype=dtype))


def run_unet(unet: nn.Module, sample: Tensor, timestep, *, sample2: Optional[Tensor] = None,
             sample2_upsample: int = 1, input_scale: Optional[Tensor] = None, input_shift: Optional[Tensor] = None,
             out_channels: Optional[int] = None) -> Tensor:
    """A diffusers UNet2DModel forward (the consistency decoder's `decoder_unet`) on the units.

    The time embedding runs in PyTorch (`unet_time_embedding`); everything after it runs as the units of
    `units.unet_units` (scale/shift ResNets fused, the rest per unit as module forwards, see
    docs/design.md, "The consistency decoder"), with the fp16 overflow policy and autocast handling of the
    VAE walker (stages: conv_in, each block, the head). Falls back to the UNet's own forward when autograd is
    needed or `units.unet_why_not(unet)` gives a reason.

    The consistency decoder's decode passes its UNet input in pieces (`sample2` and after): conv_in then reads
    `cat([sample, nearest_up(sample2, sample2_upsample)], dim=1) * input_scale + input_shift` inside the conv
    (units.UNetInput; nothing of it is written), and `out_channels` restricts conv_out to its first channels.

    Args:
        unet: a UNet2DModel with diffusers' attribute names.
        sample: (N, in_channels, H, W) (with sample2: (N, C1, H, W)), the UNet's dtype and device, H and W
            divisible by 2**(blocks - 1).
        timestep: a Python number, a 0-d tensor, or an (N,) / (1,) tensor of timesteps.
        sample2: (N, in_channels - C1, H / sample2_upsample, W / sample2_upsample) in sample's dtype, or None.
        sample2_upsample: a power of two. input_scale, input_shift: (N, in_channels) float32, with sample2 only.
        out_channels: compute only conv_out's first `out_channels` channels (None: all).
    Returns:
        (N, out_channels, H, W) contiguous NCHW in sample's dtype (the autocast dtype under `torch.autocast`
        with an fp32 model): what `unet(sample, timestep).sample` (or `unet(cat(...) * scale + shift,
        timestep).sample[:, :out_channels]`) returns.
    Raises:
        ValueError / TypeError on a wrong shape, channel count, dtype or device of `sample` or `sample2`, or
        input_scale / input_shift without sample2 or of the wrong shape.
    """
    unet_input = None
    if sample2 is None:
        if input_scale is not None or input_shift is not None or sample2_upsample != 1:
            raise ValueError("input_scale, input_shift and sample2_upsample need sample2")
        _check_input("sample", sample, unet.conv_in, "a UNet input")
    else:
        unet_input = _unet_input(unet, sample, sample2, sample2_upsample, input_scale, input_shift)
    if needs_autograd(unet, sample) or unet_why_not(unet) is not None:
        x = sample if unet_input is None else unet_input.assemble(sample)
        y = type(unet).forward(unet, x, timestep).sample  # the class's forward: not an instance override
        return y if out_channels is None else y[:, :out_channels]
    temb = unet_time_embedding(unet, timestep, sample.shape[0], sample.device)
    return _run_fast(unet_units(unet, out_channels=out_channels), sample, temb=temb, unet_input=unet_input)


def _unet_input(unet: nn.Module, sample: Tensor, sample2: Tensor, upsample: int, scale, shift) -> UNetInput:
    """Validate run_unet's pieces of a UNet input and bundle them (see `run_unet`)."""
    weight = unet.conv_in.weight
    for name, t in (("sample", sample), ("sample2", sample2)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got {getattr(t, 'shape', t)}")
        if t.dtype != weight.dtype or t.device != weight.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device}, the UNet's parameters are {weight.dtype} on "
                            f"{weight.device}")
    n, c1, h, w = sample.shape
    c_in = unet.conv_in.in_channels
    if sample2.shape[1] + c1 != c_in:
        raise ValueError(f"sample ({c1} channels) and sample2 ({sample2.shape[1]}) must have {c_in} together")
    if (not isinstance(upsample, int) or upsample < 1 or upsample & (upsample - 1) or sample2.shape[0] != n
            or sample2.shape[2] * upsample != h or sample2.shape[3] * upsample != w):
        raise ValueError(f"sample2 must be ({n}, {c_in - c1}, {h}/u, {w}/u) with sample2_upsample u a power of "
                         f"two, got shape {tuple(sample2.shape)} and u={upsample!r}")
    for name, t in (("input_scale", scale), ("input_shift", shift)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, c_in):
            raise ValueError(f"{name} must be a ({n}, {c_in}) tensor, got {getattr(t, 'shape', t)}")
    return UNetInput(sample2, upsample, scale.to(device=sample.device, dtype=torch.float32).contiguous(),
                     shift.to(device=sample.device, dtype=torch.float32).contiguous())
