"""The fast forward of the SD VAE: walks a diffusers-structured module tree and runs it on `sdvae_fast.ops`.

One module tree, two forwards (see DESIGN.md section 6). Our `sdvae_fast.AutoencoderKL` and a live
`diffusers.AutoencoderKL` carry the same module names (`encoder.down_blocks[i].resnets[j].norm1`, ...), so the
functions here serve both: the model calls `encode_moments` / `decode_sample` when `use_fast_path` says so, and
`sdvae_fast.patching.patch` routes a diffusers VAE's `encoder` / `decoder` through `run_encoder` / `run_decoder`.

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
embedding, dropout while training, LoRA-wrapped or dilated convs, custom attention processors, unknown block
classes) runs that unit's own module forward, so results stay correct. When autograd is needed (grad enabled and
the input or a parameter requires grad) the whole forward is the module's own, since the ops have no backward.

Statistics from the producer (`EMIT_GN_STATS`, on by default). Every tensor a GroupNorm normalises here is written
by one of our convs (conv_in, a ResNet's convs, Downsample2D, Upsample2D, the attention's out projection). That
conv's epilogue reduces each output tile, as stored, to per-channel-run (count, mean, M2) partials, and one small
kernel merges them per (sample, group) with Chan's formula in a fixed order (`kernels/conv.py`,
`kernels/group_norm.py`): the next unit gets its (mean, rstd) without reading the tensor again (one full read of
every normalised activation saved; the partials are about 3 floats per 128-pixel tile and channel run). `_link`
tells each unit which GroupNorm (num_groups, eps) its successor applies first. Deterministic and batch invariant
like the separate statistics pass (tiles never span two images), but a different summation order, so the two agree
to fp32 rounding, not bitwise. Set `EMIT_GN_STATS = False` to compute every statistic with
`ops.group_norm_stats` instead; `bench/gpu_check.sh` times the decode both ways.

Layout and memory: the public functions take NCHW tensors in any memory format and return contiguous NCHW.
Between units activations are channels_last (NHWC in memory), as the ops write them. Each unit takes its input
out of a `_Carry` (with the statistics emitted for it) so that no caller keeps it alive: an activation is freed as
soon as its last consumer has run (for a ResNet with a shortcut, before its second conv).

Prepared weights (the folded quant_conv here, the fused QKV projection in `ops`) are cached per module, keyed by weak
references to the source parameters together with their `tensor_stamp` (version, storage, dtype, device), so
`.to()`, `load_state_dict` and in-place edits invalidate them. Under `torch.compile` they are computed inside the
graph instead (a few small matmuls per call), which keeps the traced graph free of Python-side caches.

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
extra pass). Measure the cost on a GPU by timing `decode_sample` on fp16 latents with `FP16_GUARD` True and False
(CUDA events, same latents, eager and compiled), and on a VAE whose weights overflow fp16 (the recompute path).
"""
from __future__ import annotations

import inspect
import weakref
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from sdvae_fast import ops
from sdvae_fast.kernels._common import kernels_available, tensor_stamp

Tensor = torch.Tensor

VALID_BACKENDS = ("auto", "triton", "torch")

#: Check each stage of an fp16 forward for overflow and recompute it wider (see the module docstring).
FP16_GUARD = True
#: The dtype an overflowing fp16 stage and everything after it are recomputed in.
FP16_OVERFLOW_DTYPE = torch.float32
#: Have each conv emit the GroupNorm statistics of its output for the next unit (see the module docstring).
EMIT_GN_STATS = True

_FP16_MAX = 65504.0


def use_fast_path(backend: str, device) -> bool:
    """Whether a forward on `device` should run the fast path for the backend named `backend`.

    Args:
        backend: "torch" (always the reference modules), "auto" (the kernels on CUDA devices, the reference
            elsewhere) or "triton" (always the kernels; on CPU that needs TRITON_INTERPRET=1 set before import).
        device: a `torch.device` or device string, where the input tensor lives.
    Returns:
        True to run the fast path, False to run the reference modules.
    Raises:
        ValueError: unknown backend name (the message lists the valid ones).
        RuntimeError: backend "triton" where the kernels cannot run (CPU without the interpreter); there is no
            silent fallback.
    """
    if backend not in VALID_BACKENDS:
        raise ValueError(f"backend must be one of {VALID_BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and kernels_available(device)
    if not kernels_available(device):
        raise RuntimeError(
            f"backend 'triton' cannot run on {device}: the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 "
            "set before importing sdvae_fast for CPU tensors. Use backend 'auto' or 'torch' instead."
        )
    return True


# ---------------------------------------------------------------------------------------------------------------
# Prepared-weight cache and the precision cast
# ---------------------------------------------------------------------------------------------------------------

_PREPARED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _source_key(t: Optional[Tensor]):
    """What must be unchanged for a weight derived from `t` to stay valid (None for None)."""
    return None if t is None else tensor_stamp(t)


def _prepared(owner: nn.Module, tag: str, sources: Sequence[Optional[Tensor]], build: Callable[[], object]):
    """`build()` cached on `owner` under `tag` while every tensor in `sources` is the same, unchanged tensor.

    Not cached under `torch.compile` (the build then becomes part of the graph).
    """
    if torch.compiler.is_compiling():
        with torch.no_grad():
            return build()
    refs = tuple(None if t is None else weakref.ref(t) for t in sources)
    key = tuple(_source_key(t) for t in sources)
    slot = _PREPARED.setdefault(owner, {})
    hit = slot.get(tag)
    if hit is not None:
        hit_refs, hit_key, value = hit
        same = all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(hit_refs, sources))
        if same and hit_key == key:
            return value
    with torch.no_grad():
        value = build()
    slot[tag] = (refs, key, value)
    return value


class _Cast:
    """Casts parameters for a unit: the identity, or to a wider dtype while recomputing an fp16 overflow."""

    def __init__(self, dtype: Optional[torch.dtype] = None):
        self.dtype = dtype

    def __call__(self, t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None or self.dtype is None or t.dtype == self.dtype:
            return t
        return t.to(self.dtype)


_IDENTITY = _Cast()


def _call_module(module: nn.Module, x: Tensor, cast: _Cast, *args) -> Tensor:
    """The module's own forward on x (the per-unit fallback), with its parameters cast by `cast` if widening."""
    if cast.dtype is None:
        return module(x, *args)
    tensors = {name: cast(p) if p.is_floating_point() else p for name, p in module.named_parameters()}
    tensors.update({name: cast(b) if b.is_floating_point() else b for name, b in module.named_buffers()})
    return torch.func.functional_call(module, tensors, (x, *args))


# ---------------------------------------------------------------------------------------------------------------
# Which modules the kernels cover
# ---------------------------------------------------------------------------------------------------------------


def _plain_conv(conv, kernel: int, stride: int = 1) -> bool:
    """An nn.Conv2d with a kernel x kernel filter, the given stride, symmetric zero padding, no groups/dilation."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (kernel, kernel)
        and conv.stride == (stride, stride)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and conv.padding[0] == conv.padding[1]
    )


def _is_group_norm(norm) -> bool:
    return type(norm) is nn.GroupNorm


def _is_silu(act) -> bool:
    return type(act) is nn.SiLU


def _inactive_dropout(module) -> bool:
    return module is None or not module.training or getattr(module, "p", 0.0) == 0.0


def _resnet_supported(block) -> bool:
    """A diffusers ResnetBlock2D in the VAE's configuration (no time embedding, no up/down, scale factor 1)."""
    return (
        type(block).__name__ == "ResnetBlock2D"
        and _is_group_norm(block.norm1)
        and _is_group_norm(block.norm2)
        and _is_silu(getattr(block, "nonlinearity", None))
        and getattr(block, "upsample", None) is None
        and getattr(block, "downsample", None) is None
        and getattr(block, "time_emb_proj", None) is None
        and getattr(block, "output_scale_factor", 1.0) == 1.0
        and _inactive_dropout(getattr(block, "dropout", None))
        and _plain_conv(block.conv1, 3)
        and block.conv1.padding == (1, 1)
        and _plain_conv(block.conv2, 3)
        and block.conv2.padding == (1, 1)
        and (block.conv_shortcut is None
             or (_plain_conv(block.conv_shortcut, 1) and block.conv_shortcut.padding == (0, 0)))
    )


def _attention_supported(attn, x: Tensor) -> bool:
    """A diffusers Attention used as the VAE's mid-block self-attention with a standard processor."""
    processor = getattr(attn, "processor", None)
    to_out = getattr(attn, "to_out", None)
    if type(attn).__name__ != "Attention" or x.dim() != 4 or to_out is None:
        return False
    head_dim = attn.to_q.out_features // attn.heads
    return (
        (processor is None or type(processor).__name__ in _STANDARD_PROCESSORS)
        and (attn.group_norm is None or _is_group_norm(attn.group_norm))
        and getattr(attn, "spatial_norm", None) is None
        and getattr(attn, "norm_q", None) is None
        and getattr(attn, "norm_k", None) is None
        and not getattr(attn, "is_cross_attention", False)
        and all(type(getattr(attn, n)) is nn.Linear for n in ("to_q", "to_k", "to_v"))
        and attn.to_q.in_features == x.shape[1]
        and attn.to_k.out_features == attn.to_q.out_features == attn.to_v.out_features
        and type(to_out[0]) is nn.Linear
        and to_out[0].out_features == x.shape[1]
        and all(_inactive_dropout(m) for m in list(to_out)[1:])
        and getattr(attn, "scale", head_dim**-0.5) == head_dim**-0.5
    )


# Processors whose math is plain scaled-dot-product self-attention with diffusers' default scale.
_STANDARD_PROCESSORS = frozenset(
    {"AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor"}
)


def _downsample_padding(down) -> Optional[List[int]]:
    """(left, right, top, bottom) padding of a supported Downsample2D, or None when it is not supported."""
    conv = getattr(down, "conv", None)
    if (
        type(down).__name__ != "Downsample2D"
        or not getattr(down, "use_conv", False)
        or getattr(down, "norm", None) is not None
        or not _plain_conv(conv, 3, stride=2)
    ):
        return None
    if getattr(down, "padding", None) == 0:
        # diffusers pads (0, 1, 0, 1) itself and the conv has no padding of its own.
        return [0, 1, 0, 1] if conv.padding == (0, 0) else None
    return [conv.padding[0]] * 4


def _upsample_conv(up) -> Optional[nn.Conv2d]:
    """The 3x3 conv of a supported Upsample2D (nearest 2x, then conv), or None when it is not supported."""
    if type(up).__name__ != "Upsample2D":
        return None
    conv = up.conv if getattr(up, "name", "conv") == "conv" else getattr(up, "Conv2d_0", None)
    if (
        not getattr(up, "use_conv", False)
        or getattr(up, "use_conv_transpose", False)
        or not getattr(up, "interpolate", True)
        or getattr(up, "norm", None) is not None
        or not _plain_conv(conv, 3)
        or conv.padding != (1, 1)
    ):
        return None
    return conv


# ---------------------------------------------------------------------------------------------------------------
# Units. Each takes its input (and the GroupNorm statistics the previous unit emitted for it) out of a `_Carry`,
# so that no caller keeps the activation alive, and returns (output, statistics of the output or None): NCHW
# logically, channels_last in memory for the fast units.
# ---------------------------------------------------------------------------------------------------------------


class _Carry:
    """The activation between two units, and the GroupNorm (mean, rstd) of it that its producer emitted for the
    next unit's first norm (None when it emitted none). The consumer empties it with `take`."""

    __slots__ = ("x", "stats")

    def __init__(self, x: Optional[Tensor] = None, stats: Optional[tuple] = None):
        self.x, self.stats = x, stats

    def take(self) -> tuple:
        x, stats = self.x, self.stats
        self.x = self.stats = None
        return x, stats

    def put(self, x: Tensor, stats: Optional[tuple] = None) -> None:
        self.x, self.stats = x, stats


class _Unit:
    """One unit of the fast forward: `unit(carry, cast) -> (y, stats of y or None)`.

    `input_norm` is the GroupNorm the unit applies to its input first (or None): the previous unit emits that
    norm's statistics from its epilogue when `_link` sets its `emit` to `(num_groups, eps)`.
    """

    __slots__ = ("fn", "input_norm", "emit")

    def __init__(self, fn: Callable, input_norm: Optional[nn.Module] = None):
        self.fn, self.input_norm, self.emit = fn, input_norm, None

    def __call__(self, carry: _Carry, cast: "_Cast") -> tuple:
        return self.fn(carry, cast, self.emit)


def _norm_key(norm) -> Optional[tuple]:
    """(num_groups, eps) to emit statistics for `norm`, or None (not a GroupNorm, or EMIT_GN_STATS is off)."""
    if not EMIT_GN_STATS or not _is_group_norm(norm):
        return None
    return norm.num_groups, norm.eps


def _with_stats(result) -> tuple:
    """An op's result as (y, stats): ops return the pair only when asked to emit statistics."""
    return result if isinstance(result, tuple) else (result, None)


def _gsc(x: Tensor, conv: Optional[nn.Conv2d], cast: _Cast, norm: Optional[nn.GroupNorm] = None, *, silu: bool = True,
         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, stride: int = 1, padding=None,
         residual: Optional[Tensor] = None, stats: Optional[tuple] = None, emit: Optional[tuple] = None) -> tuple:
    """`conv(act(norm(x))) + residual` as one `ops.gn_silu_conv2d`; a plain conv when `norm` is None.

    `weight`/`bias` override the conv's parameters (prepared weights); `padding` defaults to the conv's own.
    `stats`: x's (mean, rstd) for `norm` if already known; `emit`: (num_groups, eps) to emit the output's
    statistics for. Returns (y, y's statistics or None).
    """
    if weight is None:
        weight, bias = conv.weight, conv.bias
    if padding is None:
        padding = conv.padding[0]
    norm_weight = norm_bias = None
    num_groups, eps = 1, 1e-6
    if norm is not None:
        num_groups, eps = norm.num_groups, norm.eps
        if norm.affine:
            norm_weight, norm_bias = cast(norm.weight), cast(norm.bias)
        else:
            norm_weight = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
            norm_bias = torch.zeros_like(norm_weight)
    return _with_stats(ops.gn_silu_conv2d(
        x, cast(weight), cast(bias), norm_weight=norm_weight, norm_bias=norm_bias, num_groups=num_groups,
        eps=eps, silu=silu and norm is not None, stride=stride, padding=padding, residual=residual,
        stats=stats if norm is not None else None, emit_stats=emit,
    ))


def _conv_unit(conv) -> _Unit:
    """A conv on its own (conv_in, post_quant_conv): a plain GSC op when it is a plain conv, else its forward."""

    def run(carry, cast, emit):
        x, stats = carry.take()
        if conv is None:
            return x, stats
        if _plain_conv(conv, 3) or _plain_conv(conv, 1):
            return _gsc(x, conv, cast, emit=emit)
        return _call_module(conv, x, cast), None

    return _Unit(run)


def _resnet_unit(block) -> _Unit:
    """ResnetBlock2D: `GSC(conv2)(GSC(conv1)(x)) + shortcut(x)` in two GSC ops (plus one for a 1x1 shortcut).

    The first GSC op emits the statistics of its output for norm2, the second those for the next unit."""

    def run(carry, cast, emit):
        x, stats = carry.take()
        if not _resnet_supported(block):
            # diffusers' ResnetBlock2D.forward(input_tensor, temb) needs temb; a reference block may not take it.
            temb = (None,) if "temb" in inspect.signature(block.forward).parameters else ()
            return _call_module(block, x, cast, *temb), None
        h, h_stats = _gsc(x, block.conv1, cast, block.norm1, stats=stats, emit=_norm_key(block.norm2))
        residual = x if block.conv_shortcut is None else _gsc(x, block.conv_shortcut, cast)[0]
        del x  # the input is no longer needed unless it is the residual itself
        return _gsc(h, block.conv2, cast, block.norm2, residual=residual, stats=h_stats, emit=emit)

    return _Unit(run, block.norm1 if _resnet_supported(block) else None)


def _downsample_unit(down) -> _Unit:
    """Downsample2D: a stride-2 3x3 conv with diffusers' (0, 1, 0, 1) padding, as a plain GSC op."""

    def run(carry, cast, emit):
        x, _ = carry.take()
        padding = _downsample_padding(down)
        if padding is None:
            return _call_module(down, x, cast), None
        return _gsc(x, down.conv, cast, stride=2, padding=padding, emit=emit)

    return _Unit(run)


def _upsample_unit(up) -> _Unit:
    """Upsample2D: nearest 2x + 3x3 conv as `ops.upsample_conv2d` (the 4x tensor is never written)."""

    def run(carry, cast, emit):
        x, _ = carry.take()
        conv = _upsample_conv(up)
        if conv is None:
            return _call_module(up, x, cast), None
        return _with_stats(ops.upsample_conv2d(x, cast(conv.weight), cast(conv.bias), emit_stats=emit))

    return _Unit(run)


def _attention_unit(attn) -> _Unit:
    """Mid-block Attention: `ops.vae_attention_block` (GroupNorm+QKV, flash attention, out-projection+residual)."""

    def run(carry, cast, emit):
        x, stats = carry.take()
        if not _attention_supported(attn, x):
            return _call_module(attn, x, cast), None
        # vae_attention_block casts the module's weights to x's dtype itself (the cast of the fused QKV is cached).
        return _with_stats(ops.vae_attention_block(x, attn, stats=stats, emit_stats=emit))

    return _Unit(run, getattr(attn, "group_norm", None))


def _module_unit(module, *args) -> _Unit:
    """Any module's own forward as a unit (the per-unit fallback for blocks the walker does not know)."""

    def run(carry, cast, emit):
        return _call_module(module, carry.take()[0], cast, *args), None

    return _Unit(run)


def _out_unit(norm, act, conv, quant_conv=None) -> _Unit:
    """conv_norm_out + conv_act + conv_out (+ the encoder's quant_conv folded in) as one GSC op."""
    supported = _is_group_norm(norm) and _is_silu(act) and (_plain_conv(conv, 3) or _plain_conv(conv, 1))

    def run(carry, cast, emit):
        x, stats = carry.take()
        fold = quant_conv is not None and _plain_conv(quant_conv, 1) and quant_conv.padding == (0, 0)
        if not supported:
            for module in (norm, act, conv, quant_conv):
                if module is not None:
                    x = _call_module(module, x, cast)
            return x, None
        if quant_conv is None:
            return _gsc(x, conv, cast, norm, stats=stats)
        if not fold:
            y = _gsc(x, conv, cast, norm, stats=stats)[0]
            del x
            return _call_module(quant_conv, y, cast), None
        weight, bias = _folded_quant_conv(conv, quant_conv)
        return _gsc(x, conv, cast, norm, weight=weight, bias=bias, stats=stats)

    return _Unit(run, norm if supported else None)


def _folded_quant_conv(conv: nn.Conv2d, quant_conv: nn.Conv2d) -> tuple[Tensor, Optional[Tensor]]:
    """quant_conv (1x1, Wq (C2, C1)) after conv (Wc (C1, C_in, k, k)) as one conv, cached on quant_conv.

    `W = einsum(Wq, Wc)`, `b = Wq @ bc + bq`, computed in fp64 and stored in the conv's dtype.
    """
    sources = (conv.weight, conv.bias, quant_conv.weight, quant_conv.bias)

    def build():
        wq = quant_conv.weight[:, :, 0, 0].double()  # (C2, C1)
        weight = torch.einsum("oc,cikl->oikl", wq, conv.weight.double())  # (C2, C_in, k, k)
        bias = None
        if conv.bias is not None:
            bias = wq @ conv.bias.double()
        if quant_conv.bias is not None:
            bias = quant_conv.bias.double() if bias is None else bias + quant_conv.bias.double()
        dtype = conv.weight.dtype
        return weight.to(dtype), None if bias is None else bias.to(dtype)

    return _prepared(quant_conv, "folded_quant_conv", sources, build)


# ---------------------------------------------------------------------------------------------------------------
# Blocks and stages
# ---------------------------------------------------------------------------------------------------------------


_UNIT_KINDS = {"resnets": _resnet_unit, "attentions": _attention_unit, "downsamplers": _downsample_unit,
               "upsamplers": _upsample_unit, "conv": _conv_unit}


def run_unit(kind: str, module: nn.Module, x: Tensor) -> Tensor:
    """Run one unit of the fast path alone (what `sdvae_fast.parity` and `sdvae_fast.profile` compare and time).

    Args:
        kind: "resnets" (ResnetBlock2D), "attentions" (mid-block Attention), "downsamplers", "upsamplers", or
            "conv" (a plain conv such as conv_in or post_quant_conv).
        module: that unit's module (diffusers' names).
        x: its input (N, C, H, W), any memory format.
    Returns:
        The unit's output (N, C', H', W'), channels_last, in x's dtype.
    Raises:
        ValueError naming `kind` when it is not one of the above.
    """
    if kind not in _UNIT_KINDS:
        raise ValueError(f"kind must be one of {sorted(_UNIT_KINDS)}, got {kind!r}")
    return _UNIT_KINDS[kind](module)(_Carry(x), _IDENTITY)[0]


def run_head(norm: nn.Module, act: nn.Module, conv: nn.Module, x: Tensor) -> Tensor:
    """Run the output unit (conv_norm_out -> conv_act -> conv_out) alone on x (N, C, H, W), as one GSC op."""
    return _out_unit(norm, act, conv)(_Carry(x), _IDENTITY)[0]


def _block_units(block) -> List[_Unit]:
    """The units of a down/up/mid block, or the block's own forward when its class is not one the walker knows."""
    name = type(block).__name__
    if name == "DownEncoderBlock2D":
        units = [_resnet_unit(r) for r in block.resnets]
        units += [_downsample_unit(d) for d in (block.downsamplers or [])]
        return units
    if name == "UpDecoderBlock2D":
        units = [_resnet_unit(r) for r in block.resnets]
        units += [_upsample_unit(u) for u in (block.upsamplers or [])]
        return units
    if name == "UNetMidBlock2D":
        units = [_resnet_unit(block.resnets[0])]
        for attn, resnet in zip(block.attentions, block.resnets[1:]):
            if attn is not None:
                units.append(_attention_unit(attn))
            units.append(_resnet_unit(resnet))
        return units
    return [_module_unit(block)]


def _encoder_stages(encoder, quant_conv=None) -> List[List[_Unit]]:
    """conv_in, each down block, the mid block, and the output unit (with quant_conv folded in), linked."""
    stages = [[_conv_unit(encoder.conv_in)]]
    stages += [_block_units(block) for block in encoder.down_blocks]
    stages.append(_block_units(encoder.mid_block))
    stages.append([_out_unit(encoder.conv_norm_out, encoder.conv_act, encoder.conv_out, quant_conv)])
    return _link(stages)


def _decoder_stages(decoder, post_quant_conv=None) -> List[List[_Unit]]:
    """post_quant_conv + conv_in, the mid block, each up block, and the output unit, linked."""
    stages = [[_conv_unit(post_quant_conv), _conv_unit(decoder.conv_in)]]
    stages.append(_block_units(decoder.mid_block))
    stages += [_block_units(block) for block in decoder.up_blocks]
    stages.append([_out_unit(decoder.conv_norm_out, decoder.conv_act, decoder.conv_out)])
    return _link(stages)


def _link(stages: List[List[_Unit]]) -> List[List[_Unit]]:
    """Have each unit emit the statistics its successor's first GroupNorm needs (see EMIT_GN_STATS)."""
    units = [unit for stage in stages for unit in stage]
    for unit, successor in zip(units, units[1:]):
        unit.emit = _norm_key(successor.input_norm)
    return stages


def _run_units(units: List[_Unit], carry: _Carry, cast: _Cast) -> None:
    """Run units in order on the activation in `carry`, leaving the last output (and its statistics) there."""
    for unit in units:
        carry.put(*unit(carry, cast))


def _run_all(stages: List[List[_Unit]], x: Tensor, cast: _Cast) -> Tensor:
    """Run every stage in order, unguarded."""
    carry = _Carry(x)
    del x
    for stage in stages:
        _run_units(stage, carry, cast)
    return carry.take()[0]


def _narrow_to_fp16(y: Tensor) -> Tensor:
    """A wider result back to fp16, clamped to fp16's finite range (NaN stays NaN)."""
    return y.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)


def _run_guarded_fp16(stages: List[List[_Unit]], x: Tensor) -> Tensor:
    """Eager fp16 policy: check each stage's output; from the first non-finite one on, recompute wider."""
    carry = _Carry(x)
    del x
    for i, stage in enumerate(stages):
        stage_input = carry.x  # kept for the recompute
        _run_units(stage, carry, _IDENTITY)
        if not bool(torch.isfinite(carry.x).all()):  # one host sync per stage
            carry.take()
            wide = stage_input.to(FP16_OVERFLOW_DTYPE)
            del stage_input
            return _narrow_to_fp16(_run_all(stages[i:], wide, _Cast(FP16_OVERFLOW_DTYPE)))
        del stage_input
    return carry.take()[0]


def _run_compiled_fp16(stages: List[List[_Unit]], x: Tensor) -> Tensor:
    """Traceable fp16 policy: the fp16 pass, then `torch.cond` on its finiteness keeps it or runs a whole pass at
    FP16_OVERFLOW_DTYPE (both branches are in the graph; only one runs)."""
    wide = _Cast(FP16_OVERFLOW_DTYPE)

    def keep(y: Tensor, x: Tensor) -> Tensor:
        return y.clone()

    def widen(y: Tensor, x: Tensor) -> Tensor:
        return _narrow_to_fp16(_run_all(stages, x.to(FP16_OVERFLOW_DTYPE), wide)).contiguous()

    y = _run_all(stages, x, _IDENTITY).contiguous()
    return torch.cond(torch.isfinite(y).all(), keep, widen, (y, x))


def _run_stages(stages: List[List[_Unit]], x: Tensor) -> Tensor:
    """Run the stages in order, with the fp16 overflow policy of the module docstring for fp16 inputs."""
    if x.dtype != torch.float16 or not FP16_GUARD:
        return _run_all(stages, x, _IDENTITY)
    if torch.compiler.is_compiling():
        return _run_compiled_fp16(stages, x)
    return _run_guarded_fp16(stages, x)


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


def run_encoder(encoder: nn.Module, sample: Tensor, quant_conv: Optional[nn.Module] = None) -> Tensor:
    """A diffusers-structured `Encoder` forward on the ops, optionally followed by `quant_conv` (folded in).

    Args:
        encoder: an Encoder with diffusers' attribute names (conv_in, down_blocks, mid_block, conv_norm_out,
            conv_act, conv_out).
        sample: images (N, C_in, H, W) in [-1, 1], the encoder's dtype and device, any memory format.
        quant_conv: the VAE's 1x1 quant_conv, or None.
    Returns:
        (N, 2*latent_channels, ceil-halved H and W per downsample) moments, contiguous NCHW, sample's dtype.
        Falls back to `encoder(sample)` (+ quant_conv) when autograd is needed.
    Raises:
        ValueError / TypeError on a wrong shape, channel count, dtype or device (naming the expected shape).
    """
    _check_input("sample", sample, encoder.conv_in, "images")
    if needs_autograd(encoder, sample) or (quant_conv is not None and needs_autograd(quant_conv, sample)):
        moments = encoder(sample)
        return moments if quant_conv is None else quant_conv(moments)
    return _run_stages(_encoder_stages(encoder, quant_conv), sample).contiguous()


def run_decoder(decoder: nn.Module, sample: Tensor, post_quant_conv: Optional[nn.Module] = None) -> Tensor:
    """`post_quant_conv` (if given) and a diffusers-structured `Decoder` forward on the ops.

    Args:
        decoder: a Decoder with diffusers' attribute names (conv_in, mid_block, up_blocks, conv_norm_out,
            conv_act, conv_out).
        sample: latents (N, latent_channels, h, w), unscaled (already divided by scaling_factor), in the
            decoder's dtype and device, any memory format.
        post_quant_conv: the VAE's 1x1 post_quant_conv, or None.
    Returns:
        (N, 3, 8h, 8w) images (for the usual 4-block VAE), contiguous NCHW, sample's dtype.
        Falls back to the modules' own forwards when autograd is needed.
    Raises:
        ValueError / TypeError on a wrong shape, channel count, dtype or device (naming the expected shape).
    """
    first = post_quant_conv if post_quant_conv is not None else decoder.conv_in
    _check_input("z", sample, first, "latents")
    if needs_autograd(decoder, sample) or (post_quant_conv is not None and needs_autograd(post_quant_conv, sample)):
        return decoder(sample if post_quant_conv is None else post_quant_conv(sample))
    return _run_stages(_decoder_stages(decoder, post_quant_conv), sample).contiguous()


def encode_moments(vae, x: Tensor) -> Tensor:
    """`quant_conv(encoder(x))` on the fast path: the parameters of the latent distribution.

    Args:
        vae: any object with diffusers' AutoencoderKL structure (`.encoder`, `.quant_conv` possibly None), e.g.
            our AutoencoderKL or a live `diffusers.AutoencoderKL`.
        x: images (N, 3, H, W) in [-1, 1], the VAE's dtype and device, NCHW or channels_last.
    Returns:
        moments (N, 2*latent_channels, h, w), contiguous NCHW, x's dtype: mean then logvar (unclamped; the
        latent distribution clamps logvar to [-30, 20]), h = H/8 rounded as diffusers' Downsample2D does.
    Raises:
        ValueError / TypeError on a wrong shape, channel count, dtype or device.
    """
    return run_encoder(vae.encoder, x, getattr(vae, "quant_conv", None))


def decode_sample(vae, z: Tensor) -> Tensor:
    """`decoder(post_quant_conv(z))` on the fast path.

    Args:
        vae: any object with diffusers' AutoencoderKL structure (`.decoder`, `.post_quant_conv` possibly None).
        z: latents (N, latent_channels, h, w), already divided by scaling_factor (and shifted), the VAE's dtype
            and device, NCHW or channels_last.
    Returns:
        images (N, 3, 8h, 8w) in about [-1, 1], contiguous NCHW, z's dtype.
    Raises:
        ValueError / TypeError on a wrong shape, channel count, dtype or device.
    """
    return run_decoder(vae.decoder, z, getattr(vae, "post_quant_conv", None))
