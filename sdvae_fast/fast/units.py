"""The registry of units: the only place that knows which module types the kernels run (docs/design.md, section 4).

A *unit* is the piece of a VAE the fast path runs as a few fused ops: a ResnetBlock2D is two GroupNorm+SiLU+conv
(GSC) ops with the residual in the second's epilogue, an Upsample2D is one 4-phase upsample conv, and so on. This
module maps module types to units:

- `UNIT_TYPES`: class name -> `UnitType` (`why_not(module)`: the reason a module of that class cannot run on the
  kernels, None when it can; `run(module, carry, ctx, emit)`: the fused implementation; `input_norm(module)`: the
  GroupNorm the unit applies to its input first, whose statistics the previous unit can emit). Keyed by class name
  plus structural checks, because diffusers may be absent and our reference classes (`sdvae_fast.reference`)
  carry diffusers' names. `register_unit` adds one; `UNIT_VARIANTS` holds variants of a class selected by a
  predicate (`register_unit(..., variant=, when=)`: the UNet's `ResnetBlock2D[scale_shift]`).
- `BLOCK_TYPES`: class name of a container block (DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D) -> its
  children in the order its forward runs them. `register_block` adds one.
- The output head (conv_norm_out -> conv_act -> conv_out, with the encoder's quant_conv folded in) is a composite
  unit over three modules, built by `head_unit`.

A module whose class is not registered, or that a `why_not` rejects, becomes a unit that runs the module's own
forward (`Unit.reason` says why), so results stay correct and `sdvae-fast parity` reports it by name.

`encoder_units` / `decoder_units` list the units of a diffusers-structured Encoder / Decoder in run order,
`unet_units` those of a diffusers UNet2DModel (the consistency decoder's; skips pushed by down blocks and popped
by up-block resnets through `RunContext.skips`), and
`iter_units(model)` those of a whole VAE with their diffusers module paths as names; the walker
(`sdvae_fast.fast`), `sdvae_fast.parity` and `sdvae_fast.profile` all use these lists, so a new block type is one
registration.

The run context (`RunContext`) carries what a unit may need besides its input: the parameter cast of the fp16
overflow recompute, whether statistics are emitted, `ParallelHooks` for patch parallelism (`sdvae_fast.parallel`:
halo rows before each spatial conv, GroupNorm partials merged across ranks, keys and values of all tokens for the
attention, a check after each stage), and, for the model types still to come, a per-sample time embedding (`temb`), a stack of skip tensors (`skips`, pushed by UNet down blocks and
popped by up blocks) and SpatialNorm's quantised latents (`latents`).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from sdvae_fast import ops
from sdvae_fast.kernels._common import derived_weights

Tensor = torch.Tensor
Stats = Tuple[Tensor, Tensor]  # GroupNorm (mean, rstd), each (N, G) float32

# ---------------------------------------------------------------------------------------------------------------
# The run context
# ---------------------------------------------------------------------------------------------------------------


class ParallelHooks:
    """Where patch parallelism plugs into the units; these defaults are one process holding the whole image.

    `sdvae_fast.parallel.RowParallelHooks` overrides them for ranks that each hold a band of rows; the units call
    them and need no other change. Under patch parallelism the statistics a conv emits for the next GroupNorm are
    its band's raw (count, mean, M2) partials (`ops.GroupNormPartials`), which `merge_stats` merges across ranks.
    """

    def conv_input(self, x: Tensor, padding: List[int], kernel_size: int, stride: int) -> Tuple[Tensor, List[int]]:
        """Before a spatial conv: this rank's band x (N, C, H_band, W), extended by the halo rows its taps need
        from the neighbouring bands, and the (left, right, top, bottom) zero padding still to apply (none on a
        side whose rows came from a neighbour). Default: x and `padding` unchanged."""
        return x, padding

    def merge_stats(self, partials: Tuple[Tensor, Tensor, Tensor], eps: float) -> Stats:
        """GroupNorm (mean, rstd), each (N, G) float32, of the whole image from this rank's (count, mean, M2)
        partials, each (N, G) float32, merged with every rank's in a fixed rank order. Default: this rank's."""
        return ops.merge_group_norm_partials([partials], eps)

    def upsample_input(self, x: Tensor) -> Tuple[Tensor, int, int]:
        """Before the nearest-2x + 3x3 conv: x extended by the neighbours' low-resolution rows, and how many were
        added (top, bottom); the unit crops twice as many output rows. Default: (x, 0, 0)."""
        return x, 0, 0

    def gather_tokens(self, kv: Tensor) -> Tensor:
        """Before attention over all tokens: this band's keys and values (N, T_band, 2*inner), tokens in row-major
        order, -> every band's in image order (N, T_all, 2*inner). Default: kv (this process holds all tokens)."""
        return kv

    def end_stage(self, y: Tensor, check_finite: bool) -> bool:
        """After each stage (the unit of the fp16 overflow guard): whether y (and, under patch parallelism, every
        rank's band of it) is finite when `check_finite`, else True. Default: a local check."""
        return bool(torch.isfinite(y).all()) if check_finite else True


@dataclasses.dataclass
class RunContext:
    """What units read besides their input activation (see the module docstring).

    Attributes:
        dtype: None, or the dtype the activations run in when it differs from the parameters' (`cast`): the
            wider dtype of an fp16 overflow recompute, or the autocast dtype (fp16/bf16) of an fp32 model run
            under `torch.autocast` (docs/design.md, section 6).
        emit_stats: whether convs emit the GroupNorm statistics of their outputs for the next unit.
        temb: per-sample time embedding (N, C_temb) for units with a time-dependent scale/shift, or None.
        skips: stack of skip tensors (N, C, H, W) that UNet down blocks push and up blocks pop.
        latents: SpatialNorm's quantised latents (N, C_z, h, w), or None.
        parallel: `ParallelHooks` of patch parallelism, or None for one process holding the whole image.
        unet_input: `UNetInput` (a UNet's conv_in assembles its input from two sources), or None.
    """

    dtype: Optional[torch.dtype] = None
    emit_stats: bool = True
    temb: Optional[Tensor] = None
    skips: List[Tensor] = dataclasses.field(default_factory=list)
    latents: Optional[Tensor] = None
    parallel: Optional[ParallelHooks] = None
    unet_input: Optional["UNetInput"] = None

    @property
    def emits(self) -> bool:
        """Whether convs emit statistics for the next GroupNorm (under patch parallelism: their band's partials)."""
        return self.emit_stats

    def cast(self, t: Optional[Tensor]) -> Optional[Tensor]:
        """A tensor as a module forward (a fallback unit), `temb` or `latents` uses it: unchanged, or a copy in
        `dtype` (made on every call; None stays None).

        The fused ops do not need it: they take parameters in any float dtype and convert them themselves (conv
        weights are packed into the activation's dtype once per parameter and dtype in `derived_weights`; bias
        and GroupNorm affine terms are read in fp32), so the units hand them the live parameters. A cast copy
        there would be a new tensor on every call and defeat that cache (a rebuild per call).
        """
        if t is None or self.dtype is None or t.dtype == self.dtype:
            return t
        return t.to(self.dtype)

    def widened(self, dtype: torch.dtype) -> "RunContext":
        """This context with parameters cast to `dtype` (and `temb`/`latents` too)."""
        wide = dataclasses.replace(self, dtype=dtype)
        unet_input = self.unet_input
        if unet_input is not None:
            unet_input = dataclasses.replace(unet_input, sample2=wide.cast(unet_input.sample2))
        return dataclasses.replace(wide, temb=wide.cast(self.temb), latents=wide.cast(self.latents),
                                   unet_input=unet_input)


class Carry:
    """The activation between two units and the GroupNorm (mean, rstd) of it that its producer emitted for the
    next unit's first norm (None when it emitted none). The consumer empties it with `take`, so that no caller
    keeps an activation alive after its last consumer has run."""

    __slots__ = ("x", "stats")

    def __init__(self, x: Optional[Tensor] = None, stats: Optional[Stats] = None):
        self.x, self.stats = x, stats

    def take(self) -> tuple:
        x, stats = self.x, self.stats
        self.x = self.stats = None
        return x, stats

    def put(self, x: Tensor, stats: Optional[Stats] = None) -> None:
        self.x, self.stats = x, stats


# ---------------------------------------------------------------------------------------------------------------
# Units and the registry
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UnitType:
    """How the fast path runs modules of one class (see the module docstring)."""

    name: str
    why_not: Callable[[nn.Module], Optional[str]]
    run: Callable[..., tuple]
    input_norm: Callable[[nn.Module], Optional[nn.Module]]


UNIT_TYPES: Dict[str, UnitType] = {}
BLOCK_TYPES: Dict[str, Callable[[nn.Module], List[Tuple[str, nn.Module]]]] = {}
#: class name -> [(predicate, UnitType), ...]: variants of a class that replace its plain registration for the
#: modules their predicate selects (`register_unit(..., variant=..., when=...)`), in registration order.
UNIT_VARIANTS: Dict[str, List[Tuple[Callable[[nn.Module], bool], UnitType]]] = {}


def register_unit(class_name: str, *, why_not: Callable[[nn.Module], Optional[str]],
                  input_norm: Callable[[nn.Module], Optional[nn.Module]] = lambda module: None,
                  variant: Optional[str] = None, when: Optional[Callable[[nn.Module], bool]] = None):
    """Decorator: register `run(module, carry, ctx, emit) -> (y, stats of y or None)` for modules of `class_name`.

    `why_not(module)` returns why a module of that class cannot run on the kernels (None when it can);
    `input_norm(module)` the GroupNorm the unit applies to its input first (or None).
    With `variant` (a name) and `when` (a predicate on the module), the registration is a variant of the class:
    modules for which `when(module)` is true are handled by it alone (its `why_not` decides, its units have kind
    `"<class_name>[<variant>]"`), the others by the plain registration, which stays unchanged. The first
    matching variant in registration order wins. Example: diffusers' ResnetBlock2D with a scale/shift time
    embedding (the consistency decoder's UNet) next to the VAE's ResnetBlock2D without one.
    Raises ValueError when `class_name` (or that variant of it) is registered already, or when only one of
    `variant` and `when` is given.
    """
    if (variant is None) != (when is None):
        raise ValueError("register_unit: give both `variant` and `when`, or neither")

    def decorate(run):
        if variant is None:
            if class_name in UNIT_TYPES:
                raise ValueError(f"a unit for class {class_name!r} is registered already")
            UNIT_TYPES[class_name] = UnitType(class_name, why_not, run, input_norm)
            return run
        key = f"{class_name}[{variant}]"
        variants = UNIT_VARIANTS.setdefault(class_name, [])
        if any(unit_type.name == key for _, unit_type in variants):
            raise ValueError(f"a unit for class {class_name!r}, variant {variant!r}, is registered already")
        variants.append((when, UnitType(key, why_not, run, input_norm)))
        return run

    return decorate


def register_block(class_name: str):
    """Decorator: register `children(block) -> [(relative name, module), ...]` in run order for a container block.

    Raises ValueError when `class_name` is registered already.
    """
    def decorate(children):
        if class_name in BLOCK_TYPES:
            raise ValueError(f"a block for class {class_name!r} is registered already")
        BLOCK_TYPES[class_name] = children
        return children

    return decorate


class Unit:
    """One unit bound to its module(s): `unit(carry, ctx) -> (y, stats of y or None)`.

    Attributes:
        name: the diffusers module path (`decoder.up_blocks.1.resnets.2`; the head is `encoder.conv_out*`).
        kind: the registered type it runs as ("ResnetBlock2D", "head", ...), or "module" for a module's own forward.
        modules: the modules it covers; hooks on `modules[0]` (input) and `modules[-1]` (output) see its
            input and output.
        reason: None when the kernels run it, else why the module's own forward runs instead.
        input_norm: the GroupNorm applied to the input first, whose statistics the previous unit may emit.
        emit: (num_groups, eps) of the next unit's first GroupNorm, set by `link`, or None.
    """

    __slots__ = ("name", "kind", "modules", "reason", "input_norm", "emit", "_run", "_reference")

    def __init__(self, name: str, kind: str, modules: tuple, run: Callable, reference: Callable,
                 reason: Optional[str] = None, input_norm: Optional[nn.Module] = None):
        self.name, self.kind, self.modules, self.reason = name, kind, modules, reason
        self.input_norm, self.emit = input_norm, None
        self._run, self._reference = run, reference

    def __call__(self, carry: Carry, ctx: RunContext) -> tuple:
        emit = self.emit if ctx.emits else None
        return self._run(carry, ctx, emit)

    def run_alone(self, x: Tensor, ctx: Optional[RunContext] = None) -> Tensor:
        """This unit alone on x (N, C, H, W): what parity compares and profile times. Returns its output."""
        return self(Carry(x), ctx or RunContext())[0]

    def reference(self, *args, **kwargs) -> Tensor:
        """The PyTorch forward of the module(s) on the given arguments (the yardstick of parity and profile)."""
        return self._reference(*args, **kwargs)

    def __repr__(self) -> str:
        how = "kernels" if self.reason is None else f"module forward: {self.reason}"
        return f"Unit({self.name!r}, {self.kind}, {how})"


def _call_module(module: nn.Module, x: Tensor, ctx: "RunContext", *args, **kwargs) -> Tensor:
    """The module's own forward on x (the per-unit fallback), its parameters cast to `ctx.dtype` when that is set."""
    if ctx.dtype is None:
        return module(x, *args, **kwargs)
    cast = ctx.cast
    tensors = {name: cast(p) if p.is_floating_point() else p for name, p in module.named_parameters()}
    tensors.update({name: cast(b) if b.is_floating_point() else b for name, b in module.named_buffers()})
    return torch.func.functional_call(module, tensors, (x, *args), kwargs)


def spatially_conditioned(module: nn.Module) -> bool:
    """Whether `module` is or holds a SpatialNorm (MoVQ's decoder: ResnetBlockCondNorm2D, Attention with
    `spatial_norm`, the blocks holding them, SpatialNorm itself): its forward needs the quantised latents."""
    return any(type(m).__name__ == "SpatialNorm" for m in module.modules())


def _latent_arguments(module: nn.Module, ctx: "RunContext") -> Tuple[tuple, dict]:
    """(args, kwargs) that hand `ctx.latents` (N, C_z, h, w) to a spatially conditioned module's forward:
    diffusers' Attention takes them as `temb=`, SpatialNorm, ResnetBlockCondNorm2D and the decoder's blocks as
    their second positional argument. Raises ValueError when the run context has no latents."""
    if ctx.latents is None:
        raise ValueError(f"{type(module).__name__} is conditioned on SpatialNorm's quantised latents, but the run "
                         "context has none (pass latent_embeds to run_decoder)")
    if getattr(module, "spatial_norm", None) is not None:
        return (), {"temb": ctx.latents}
    return (ctx.latents,), {}


def _forward_args(module: nn.Module) -> tuple:
    """Extra positional arguments the module's forward needs as a unit: diffusers' ResnetBlock2D.forward(x, temb)
    takes temb, our reference block may not."""
    if type(module).__name__ == "ResnetBlock2D" and "temb" in inspect.signature(module.forward).parameters:
        return (None,)
    return ()


def _wants_temb(module: nn.Module) -> bool:
    """Whether a module-forward unit hands the run context's `temb` to the module: a diffusers ResnetBlock2D
    with a time embedding projection (inside a UNet); the VAE's ResnetBlock2D gets None, as before."""
    return _forward_args(module) == (None,) and getattr(module, "time_emb_proj", None) is not None


def module_unit(name: str, module: nn.Module, reason: str) -> Unit:
    """A unit that runs `module`'s own forward, for the reason given (a ResnetBlock2D with a time embedding
    projection gets `ctx.temb`, (N, C_temb) in the activation dtype, as its second argument)."""
    extra = _forward_args(module)
    wants_temb = _wants_temb(module)
    wants_latents = spatially_conditioned(module)

    def run(carry, ctx, emit):
        if wants_latents:
            args, kwargs = _latent_arguments(module, ctx)
            return _call_module(module, carry.take()[0], ctx, *args, **kwargs), None
        return _call_module(module, carry.take()[0], ctx, *((ctx.temb,) if wants_temb else extra)), None

    return Unit(name, "module", (module,), run, module, reason=reason)


def _unit_type(module: nn.Module) -> Optional[UnitType]:
    """The registration that handles `module`: the first variant whose predicate selects it, else the plain one."""
    kind = type(module).__name__
    for when, unit_type in UNIT_VARIANTS.get(kind, ()):
        if when(module):
            return unit_type
    return UNIT_TYPES.get(kind)


def make_unit(name: str, module: nn.Module) -> Unit:
    """The unit for one module: its registered type (or variant, see `register_unit`) when `why_not` accepts
    it, else the module's own forward."""
    kind = type(module).__name__
    unit_type = _unit_type(module)
    if unit_type is None:
        return module_unit(name, module, f"no unit is registered for class {kind}")
    reason = unit_type.why_not(module)
    if reason is not None:
        return module_unit(name, module, reason)

    def run(carry, ctx, emit):
        return unit_type.run(module, carry, ctx, emit)

    return Unit(name, unit_type.name, (module,), run, module, input_norm=unit_type.input_norm(module))


def _parameterised_children(block: nn.Module) -> List[str]:
    """Relative names of a block's children that hold parameters (the elements of a ModuleList one by one)."""
    names = []
    for name, child in block.named_children():
        parts = child.named_children() if isinstance(child, nn.ModuleList) else [(None, child)]
        for index, part in parts:
            if part is not None and any(True for _ in part.parameters()):
                names.append(name if index is None else f"{name}.{index}")
    return names


def block_units(name: str, block: nn.Module) -> List[Unit]:
    """The units of a container block in run order, or one module unit when its class is not registered or its
    registered children leave out a child that holds parameters (so a registration that forgets, say, the
    upsamplers falls back to the block's own forward instead of silently skipping them)."""
    kind = type(block).__name__
    children = BLOCK_TYPES.get(kind)
    if children is None:
        return [module_unit(name, block, f"no block is registered for class {kind}")]
    listed = list(children(block))
    missing = sorted(set(_parameterised_children(block)) - {child_name for child_name, _ in listed})
    if missing:
        return [module_unit(name, block, f"the children registered for class {kind} leave out {missing}")]
    return [make_unit(f"{name}.{child_name}", child) for child_name, child in listed]


def norm_key(norm: Optional[nn.Module]) -> Optional[tuple]:
    """(num_groups, eps) to emit statistics for `norm`, or None when it is not a GroupNorm."""
    if type(norm) is not nn.GroupNorm:
        return None
    return norm.num_groups, norm.eps


def link(units: List[Unit]) -> List[Unit]:
    """Have each unit emit the statistics its successor's first GroupNorm needs; returns `units`."""
    for unit, successor in zip(units, units[1:]):
        unit.emit = norm_key(successor.input_norm)
    return units


# ---------------------------------------------------------------------------------------------------------------
# Structural checks: the reasons a module cannot run on the kernels
# ---------------------------------------------------------------------------------------------------------------


def _first(checks) -> Optional[str]:
    """The message of the first failed (ok, message) check, or None when all pass."""
    return next((message for ok, message in checks if not ok), None)


def conv_why_not(conv, kernel_sizes=(1, 3), stride: int = 1) -> Optional[str]:
    """Why `conv` is not a plain nn.Conv2d the GSC kernel runs (square kernel in `kernel_sizes`, `stride`,
    symmetric zero padding, no groups or dilation), or None."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    return _first([
        (conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] in kernel_sizes,
         f"kernel {conv.kernel_size} is not one of {[(k, k) for k in kernel_sizes]}"),
        (conv.stride == (stride, stride), f"stride {conv.stride} is not {(stride, stride)}"),
        (conv.dilation == (1, 1), f"dilation {conv.dilation}"),
        (conv.groups == 1, f"groups={conv.groups}"),
        (conv.padding_mode == "zeros", f"padding_mode={conv.padding_mode!r}"),
        (isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1], f"padding {conv.padding!r}"),
    ])


def _conv3_same(conv) -> Optional[str]:
    """Why `conv` is not a plain 3x3 stride-1 conv with padding 1 (keeping the spatial size), or None."""
    reason = conv_why_not(conv, (3,))
    if reason is None and conv.padding != (1, 1):
        reason = f"padding {conv.padding} is not (1, 1)"
    return reason


def _group_norm_why_not(norm, name: str) -> Optional[str]:
    return None if type(norm) is nn.GroupNorm else f"{name} is {type(norm).__name__}, not nn.GroupNorm"


def _dropout_inactive(module) -> bool:
    return module is None or not module.training or getattr(module, "p", 0.0) == 0.0


def resampling(block) -> Optional[str]:
    """"up" for a ResnetBlock2D with a nearest-2x `Upsample2D` without conv (diffusers' `up=True`), "down" for
    one with an average-pooling `Downsample2D` (`down=True`: AvgPool2d(2, 2)), None for neither. Other
    resamplers (FIR kernels, convs, functions) give "other"."""
    up, down = getattr(block, "upsample", None), getattr(block, "downsample", None)
    if up is None and down is None:
        return None
    if (type(up).__name__ == "Upsample2D" and not getattr(up, "use_conv", True)
            and not getattr(up, "use_conv_transpose", True) and getattr(up, "interpolate", False)
            and getattr(up, "norm", None) is None):
        return "up"
    pool = getattr(down, "conv", None)
    if (type(down).__name__ == "Downsample2D" and not getattr(down, "use_conv", True)
            and type(pool) is nn.AvgPool2d and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
            and pool.padding in (0, (0, 0)) and not pool.ceil_mode and getattr(down, "norm", None) is None):
        return "down"
    return "other"


def _resnet_checks(block, time_check: tuple, resample: bool = False) -> list:
    """The (ok, message) checks of a ResnetBlock2D on the kernels, with `time_check` in the time embedding's place;
    `resample`: nearest-2x / average-pool resampling without a shortcut conv is accepted too (`resampling`)."""
    mode = resampling(block)
    resample_ok = mode is None or (resample and mode in ("up", "down") and block.conv_shortcut is None)
    return [
        (_group_norm_why_not(block.norm1, "norm1") is None, _group_norm_why_not(block.norm1, "norm1")),
        (_group_norm_why_not(block.norm2, "norm2") is None, _group_norm_why_not(block.norm2, "norm2")),
        (type(getattr(block, "nonlinearity", None)) is nn.SiLU, "nonlinearity is not SiLU"),
        (resample_ok, "it resamples (up=True or down=True)" if not resample else
         "it resamples other than by nearest-2x / 2x2 average pool, or with a shortcut conv"),
        time_check,
        (getattr(block, "output_scale_factor", 1.0) == 1.0, "output_scale_factor != 1"),
        (_dropout_inactive(getattr(block, "dropout", None)), "dropout is active (training)"),
        (_conv3_same(block.conv1) is None, f"conv1: {_conv3_same(block.conv1)}"),
        (_conv3_same(block.conv2) is None, f"conv2: {_conv3_same(block.conv2)}"),
        (block.conv_shortcut is None or (conv_why_not(block.conv_shortcut, (1,)) is None
                                         and block.conv_shortcut.padding == (0, 0)),
         "conv_shortcut is not a plain 1x1 conv"),
    ]


def resnet_why_not(block) -> Optional[str]:
    """Why a ResnetBlock2D is not the VAE's (no time embedding, no up/down, scale factor 1, SiLU, 3x3 convs), or None."""
    return _first(_resnet_checks(
        block, (getattr(block, "time_emb_proj", None) is None, "it has a time embedding projection")))


def resnet_scale_shift_why_not(block) -> Optional[str]:
    """Why a ResnetBlock2D with a time embedding projection is not the fused scale/shift unit, or None.

    Accepted: diffusers' `time_embedding_norm == "scale_shift"` with `time_emb_proj` an nn.Linear(C_temb, 2*C)
    over norm2's C channels, and otherwise what `resnet_why_not` accepts (SiLU, `output_scale_factor` 1, 3x3
    convs, a plain 1x1 shortcut), plus the UNet's resampling resnets (`resampling`: nearest-2x up or 2x2
    average-pool down, no shortcut conv). Rejected, so run as module forwards: the "default" norm (temb added
    before norm2), "ada_group"/"spatial" (ResnetBlockCondNorm2D, another class), FIR / conv resamplers.
    """
    proj = getattr(block, "time_emb_proj", None)
    mode = getattr(block, "time_embedding_norm", None)
    channels = getattr(getattr(block, "norm2", None), "num_channels", None)
    time_check = _first([
        (mode == "scale_shift", f"time_embedding_norm is {mode!r}, only 'scale_shift' is fused"),
        (type(proj) is nn.Linear, f"time_emb_proj is {type(proj).__name__}, not nn.Linear"),
        (type(proj) is not nn.Linear or channels is None or proj.out_features == 2 * channels,
         f"time_emb_proj has {getattr(proj, 'out_features', None)} outputs, not 2 * {channels}"),
    ])
    return _first(_resnet_checks(block, (time_check is None, time_check), resample=True))


# Processors whose math is plain scaled-dot-product self-attention with diffusers' default scale.
STANDARD_PROCESSORS = frozenset(
    {"AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor"}
)
_ATTENTION_ATTRIBUTES = ("group_norm", "to_q", "to_k", "to_v", "to_out", "heads")


def attention_why_not(attn) -> Optional[str]:
    """Why a diffusers `Attention` is not the VAE's mid-block self-attention with a standard processor, or None."""
    missing = [name for name in _ATTENTION_ATTRIBUTES if not hasattr(attn, name)]
    if missing:
        return f"{type(attn).__name__} lacks {missing}"
    processor = getattr(attn, "processor", None)
    linears = [getattr(attn, n) for n in ("to_q", "to_k", "to_v")]
    if not all(type(lin) is nn.Linear for lin in linears) or type(attn.to_out[0]) is not nn.Linear:
        return "to_q, to_k, to_v and to_out[0] must be nn.Linear"
    inner, channels = attn.to_q.weight.shape
    heads = int(attn.heads)
    head_dim = inner // heads if heads > 0 else 0
    return _first([
        (processor is None or type(processor).__name__ in STANDARD_PROCESSORS,
         f"processor {type(processor).__name__} is not one of {sorted(STANDARD_PROCESSORS)}"),
        (attn.group_norm is None or (type(attn.group_norm) is nn.GroupNorm
                                     and attn.group_norm.num_channels == channels),
         f"group_norm must be nn.GroupNorm over C={channels} channels, got {attn.group_norm}"),
        (getattr(attn, "spatial_norm", None) is None, "spatial_norm is set"),
        (getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None, "norm_q/norm_k are set"),
        (not getattr(attn, "is_cross_attention", False), "it is cross-attention"),
        (all(tuple(lin.weight.shape) == (inner, channels) for lin in linears),
         f"to_q, to_k, to_v must all be nn.Linear({channels}, {inner})"),
        (tuple(attn.to_out[0].weight.shape) == (channels, inner), f"to_out[0] must be nn.Linear({inner}, {channels})"),
        (heads >= 1 and inner % heads == 0, f"heads ({heads}) must divide the projection width ({inner})"),
        (all(_dropout_inactive(m) for m in list(attn.to_out)[1:]), "dropout is active (training)"),
        (head_dim == 0 or getattr(attn, "scale", head_dim ** -0.5) == head_dim ** -0.5,
         "scale is not head_dim ** -0.5"),
    ])


def downsample_padding(down) -> Tuple[Optional[List[int]], Optional[str]]:
    """((left, right, top, bottom) padding of a supported Downsample2D, None) or (None, why it is not supported).

    diffusers pads (0, 1, 0, 1) itself when `padding == 0` and its conv then has no padding of its own.
    """
    conv = getattr(down, "conv", None)
    reason = _first([
        (getattr(down, "use_conv", False), "use_conv=False (average pooling)"),
        (getattr(down, "norm", None) is None, "it has a norm"),
        (conv_why_not(conv, (3,), stride=2) is None, f"conv: {conv_why_not(conv, (3,), stride=2)}"),
    ])
    if reason is not None:
        return None, reason
    if getattr(down, "padding", None) == 0:
        return ([0, 1, 0, 1], None) if conv.padding == (0, 0) else (None, "padding=0 with a padded conv")
    return [conv.padding[0]] * 4, None


def upsample_conv(up) -> Tuple[Optional[nn.Conv2d], Optional[str]]:
    """(the 3x3 conv of a supported Upsample2D (nearest 2x, then conv), None) or (None, why it is not supported)."""
    conv = up.conv if getattr(up, "name", "conv") == "conv" else getattr(up, "Conv2d_0", None)
    reason = _first([
        (getattr(up, "use_conv", False), "use_conv=False"),
        (not getattr(up, "use_conv_transpose", False), "it uses a transposed conv"),
        (getattr(up, "interpolate", True), "interpolate=False"),
        (getattr(up, "norm", None) is None, "it has a norm"),
        (getattr(up, "interpolate_mode", "nearest") == "nearest", "interpolation is not nearest"),
        (conv_why_not(conv, (3,)) is None, f"conv: {conv_why_not(conv, (3,))}"),
        (conv is None or conv.padding == (1, 1), "conv padding is not (1, 1)"),
    ])
    return (None, reason) if reason is not None else (conv, None)


# ---------------------------------------------------------------------------------------------------------------
# Running a GSC op from modules
# ---------------------------------------------------------------------------------------------------------------


def _with_stats(result) -> tuple:
    """An op's result as (y, what to carry to the next GroupNorm): ops return a tuple only when asked to emit
    statistics; (y, (mean, rstd)), or under patch parallelism (y, (mean, rstd), partials) whose band partials
    are carried instead (the consumer merges them across ranks)."""
    if not isinstance(result, tuple):
        return result, None
    return (result[0], result[2]) if len(result) == 3 else result


def input_stats(x: Tensor, norm: nn.GroupNorm, carried, ctx: RunContext) -> Optional[Stats]:
    """The GroupNorm (mean, rstd) of x for `norm`: those its producer emitted, or None (the op computes them).
    Under patch parallelism: the band's partials (emitted by the producer, else computed here from x) merged
    across ranks by `ctx.parallel`."""
    if ctx.parallel is None:
        return carried
    partials = carried if carried is not None else ops.group_norm_partials(x, norm.num_groups)
    return ctx.parallel.merge_stats(partials, norm.eps)


def gsc(x: Tensor, conv: Optional[nn.Conv2d], ctx: RunContext, norm: Optional[nn.GroupNorm] = None, *,
        silu: bool = True, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, stride: int = 1,
        padding=None, residual: Optional[Tensor] = None, stats: Optional[Stats] = None,
        emit: Optional[tuple] = None) -> tuple:
    """`conv(act(norm(x))) + residual` as one `ops.gn_silu_conv2d`; a plain conv when `norm` is None.

    Args:
        x: (N, C_in, H, W) activation. conv: the module whose weight, bias and padding are used (unless given).
        ctx: the run context (parameter cast, parallel hooks). norm: the GroupNorm in the prologue, or None.
        weight, bias: prepared weights that replace the conv's. padding: int or (left, right, top, bottom).
        residual: (N, C_out, H_out, W_out) added in the epilogue. stats: x's (mean, rstd) for `norm` if known.
        emit: (num_groups, eps) to emit the output's statistics for, or None.
    Returns:
        (y (N, C_out, H_out, W_out) channels_last, y's statistics or None).
    """
    # Parameters go to the op uncast, whatever ctx.dtype is: the op packs the weight into x's dtype (cached per
    # parameter and dtype) and reads bias and norm affine terms in fp32 (see RunContext.cast).
    if weight is None:
        weight, bias = conv.weight, conv.bias
    if padding is None:
        padding = conv.padding[0]
    norm_weight = norm_bias = None
    num_groups, eps = 1, 1e-6
    if norm is not None:
        num_groups, eps = norm.num_groups, norm.eps
        stats = input_stats(x, norm, stats, ctx)
        if norm.affine:
            norm_weight, norm_bias = norm.weight, norm.bias
        else:
            norm_weight = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
            norm_bias = torch.zeros_like(norm_weight)
    if ctx.parallel is not None and weight.shape[-1] > 1:
        pad = [padding] * 4 if isinstance(padding, int) else list(padding)
        x, padding = ctx.parallel.conv_input(x, pad, weight.shape[-1], stride)
    return _with_stats(ops.gn_silu_conv2d(
        x, weight, bias, norm_weight=norm_weight, norm_bias=norm_bias, num_groups=num_groups,
        eps=eps, silu=silu and norm is not None, stride=stride, padding=padding, residual=residual,
        stats=stats if norm is not None else None, emit_stats=emit,
        emit_partials=emit is not None and ctx.parallel is not None,
    ))


# ---------------------------------------------------------------------------------------------------------------
# The registered units
# ---------------------------------------------------------------------------------------------------------------


@register_unit("Conv2d", why_not=lambda conv: conv_why_not(conv))
def _run_conv(conv, carry, ctx, emit):
    """A conv on its own (conv_in, post_quant_conv, quant_conv): a plain GSC op."""
    x, _ = carry.take()
    return gsc(x, conv, ctx, emit=emit)


@register_unit("ResnetBlock2D", why_not=resnet_why_not, input_norm=lambda block: block.norm1)
def _run_resnet(block, carry, ctx, emit):
    """ResnetBlock2D: `GSC(conv2)(GSC(conv1)(x)) + shortcut(x)` in two GSC ops (plus one for a 1x1 shortcut).

    The first op emits the statistics of its output for norm2, the second those for the next unit."""
    x, stats = carry.take()
    inner_emit = norm_key(block.norm2) if ctx.emits else None
    h, h_stats = gsc(x, block.conv1, ctx, block.norm1, stats=stats, emit=inner_emit)
    residual = x if block.conv_shortcut is None else gsc(x, block.conv_shortcut, ctx)[0]
    del x  # the input is no longer needed unless it is the residual itself
    return gsc(h, block.conv2, ctx, block.norm2, residual=residual, stats=h_stats, emit=emit)


@register_unit("Downsample2D", why_not=lambda down: downsample_padding(down)[1])
def _run_downsample(down, carry, ctx, emit):
    """Downsample2D: a stride-2 3x3 conv with diffusers' (0, 1, 0, 1) padding, as a plain GSC op."""
    x, _ = carry.take()
    return gsc(x, down.conv, ctx, stride=2, padding=downsample_padding(down)[0], emit=emit)


@register_unit("Upsample2D", why_not=lambda up: upsample_conv(up)[1])
def _run_upsample(up, carry, ctx, emit):
    """Upsample2D: nearest 2x + 3x3 conv as `ops.upsample_conv2d` (the 4x tensor is never written)."""
    x, _ = carry.take()
    conv = upsample_conv(up)[0]
    # Uncast parameters: the op folds and packs the weight into x's dtype once per parameter and dtype.
    if ctx.parallel is not None:  # a band: one halo row each side in, the rows they produced cropped out
        x, top, bottom = ctx.parallel.upsample_input(x)
        y = ops.upsample_conv2d(x, conv.weight, conv.bias)
        return y[:, :, 2 * top: y.shape[2] - 2 * bottom], None
    return _with_stats(ops.upsample_conv2d(x, conv.weight, conv.bias, emit_stats=emit))


@register_unit("Attention", why_not=attention_why_not, input_norm=lambda attn: attn.group_norm)
def _run_attention(attn, carry, ctx, emit):
    """Mid-block Attention: `vae_attention_block` (GroupNorm+QKV, flash attention, out-projection+residual)."""
    x, stats = carry.take()
    if attn.group_norm is not None:
        stats = input_stats(x, attn.group_norm, stats, ctx)
    # vae_attention_block casts the module's weights to x's dtype itself (cached derived weights). Under patch
    # parallelism this band's queries attend to every band's keys and values (`gather_tokens`).
    return _with_stats(vae_attention_block(
        x, attn, stats=stats, emit_stats=emit, emit_partials=emit is not None and ctx.parallel is not None,
        gather_kv=None if ctx.parallel is None else ctx.parallel.gather_tokens))


@register_block("DownEncoderBlock2D")
def _down_block_children(block):
    return ([(f"resnets.{i}", r) for i, r in enumerate(block.resnets)]
            + [(f"downsamplers.{i}", d) for i, d in enumerate(block.downsamplers or [])])


@register_block("UpDecoderBlock2D")
def _up_block_children(block):
    return ([(f"resnets.{i}", r) for i, r in enumerate(block.resnets)]
            + [(f"upsamplers.{i}", u) for i, u in enumerate(block.upsamplers or [])])


def _interleaved_children(block, resamplers: str):
    """resnets.i then attentions.i for each i, then the resamplers: diffusers' AttnDownEncoderBlock2D and
    AttnUpDecoderBlock2D (VQ-f8) run `attn(resnet(x))` per layer, then their downsamplers / upsamplers."""
    children = []
    for i, (resnet, attn) in enumerate(zip(block.resnets, block.attentions)):
        children += [(f"resnets.{i}", resnet), (f"attentions.{i}", attn)]
    return children + [(f"{resamplers}.{i}", r) for i, r in enumerate(getattr(block, resamplers, None) or [])]


@register_block("AttnDownEncoderBlock2D")
def _attn_down_block_children(block):
    return _interleaved_children(block, "downsamplers")


@register_block("AttnUpDecoderBlock2D")
def _attn_up_block_children(block):
    return _interleaved_children(block, "upsamplers")


@register_block("UNetMidBlock2D")
def _mid_block_children(block):
    children = [("resnets.0", block.resnets[0])]
    for i, (attn, resnet) in enumerate(zip(block.attentions, block.resnets[1:])):
        if attn is not None:
            children.append((f"attentions.{i}", attn))
        children.append((f"resnets.{i + 1}", resnet))
    return children


# ---------------------------------------------------------------------------------------------------------------
# The mid-block attention on the ops
# ---------------------------------------------------------------------------------------------------------------


def fused_qkv_weights(module: nn.Module, dtype: torch.dtype, device) -> Tuple[Tensor, Tensor]:
    """The q/k/v projections of an `Attention` concatenated into one 1x1 conv, a cached derived weight.

    `to_q`, `to_k`, `to_v` are Linear layers (inner, C); their weights stack row-wise into (3*inner, C) so one
    GEMM computes [q | k | v] per pixel (missing biases count as zeros). Cached in `derived_weights` under the six
    source tensors, `dtype` and `device`: a changed weight is re-concatenated on the next call, an unchanged one
    never is (the same tensor objects come back).

    Returns:
        (weight (3*inner, C, 1, 1), bias (3*inner,)), in `dtype` on `device`, contiguous.
    """
    linears = (module.to_q, module.to_k, module.to_v)

    def build():
        weight = torch.cat([lin.weight for lin in linears], dim=0)  # (3*inner, C)
        bias = torch.cat([
            lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0]) for lin in linears
        ])  # (3*inner,)
        weight = weight.to(device=device, dtype=dtype)[:, :, None, None].contiguous()  # (3*inner, C, 1, 1)
        return weight, bias.to(device=device, dtype=dtype).contiguous()

    sources = tuple(t for lin in linears for t in (lin.weight, lin.bias))
    return derived_weights.get(sources, ("fused_qkv", dtype, torch.device(device)), build)


def out_projection_weight(linear: nn.Linear, dtype: torch.dtype, device) -> Tensor:
    """The attention's output projection (an nn.Linear (C, inner)) as a 1x1 conv weight, a cached derived weight.

    One tensor object per (parameter, dtype, device) while the parameter is unchanged, so the conv op's packed
    weight (cached under this tensor) is reused across calls instead of being rebuilt for a fresh view each
    time. A copy, not a view: a view would keep the parameter alive through the cache (an entry dies with its
    source only if its value does not reference it).

    Returns:
        weight (C, inner, 1, 1) in `dtype` on `device`, contiguous.
    """
    def build():
        return linear.weight.detach().to(device=device, dtype=dtype, copy=True)[:, :, None, None].contiguous()

    return derived_weights.get((linear.weight,), ("out_proj_1x1", dtype, torch.device(device)), build)


def vae_attention_block(x: Tensor, module: nn.Module, *, stats: Optional[Stats] = None,
                        emit_stats: Optional[Tuple[int, float]] = None, emit_partials: bool = False,
                        gather_kv: Optional[Callable[[Tensor], Tensor]] = None):
    """The VAE mid-block attention unit, fused: `x + out_proj(attention(qkv(group_norm(x))))`.

    Three registered ops, no N x N tensor and no copies between them:
    1. `ops.gn_silu_conv2d(x, W_qkv, b_qkv, norm_weight=gamma, norm_bias=beta, silu=False, padding=0)`: GroupNorm
       fused into ONE 1x1 projection with the q/k/v weights concatenated (`fused_qkv_weights`)
       -> (N, 3*inner, H, W) channels_last, i.e. (N, H*W, 3*inner) in memory.
    2. `ops.attention` on strided (N, H*W, inner) views of it (heads > 1: (N, heads, H*W, inner/heads) views).
    3. `ops.gn_silu_conv2d(attn, W_out, b_out, norm_weight=None, padding=0, residual=x)`: the out projection as a
       1x1 conv with the residual added in its epilogue.
    This follows diffusers' `AttnProcessor2_0` for 4-D input: `(proj + residual) / rescale_output_factor` (the
    division runs only when the factor is not 1; it is 1 in every public VAE), no residual when
    `residual_connection` is False; the softmax scale is `module.scale` (head_dim**-0.5 in every VAE).

    Args:
        x: hidden_states (N, C, H, W), fp16/bf16/fp32/fp64, any strides. The module's weights are cast to x's
            dtype and device (the fused q/k/v and the output projection weights are cached derived weights).
        module: a diffusers-named mid-block attention (`diffusers.models.attention_processor.Attention` or ours):
            group_norm (nn.GroupNorm over C, or None), to_q/to_k/to_v nn.Linear(C, inner), to_out[0]
            nn.Linear(inner, C), heads; spatial_norm, norm_q and norm_k None (`attention_why_not` lists the rules).
        stats: precomputed GroupNorm (mean, rstd) of x for module.group_norm, each (N, G), or None.
        emit_stats: (num_groups, eps) of the GroupNorm applied to the output next (see `ops.gn_silu_conv2d`).
        emit_partials: with `emit_stats`, also the output's raw `GroupNormPartials` (patch parallelism).
        gather_kv: for patch parallelism, x being one band of rows of the image: maps this band's keys and
            values (N, H*W, 2*inner) to every band's, in image order (N, T_all, 2*inner); the band's queries then
            attend to all tokens. None: x is the whole image.
    Returns:
        (N, C, H, W) in x's dtype, channels_last memory format; with `emit_stats` the pair (output, (mean, rstd)),
        with `emit_partials` too the triple (output, (mean, rstd), partials).
    Raises:
        TypeError: x is not a float tensor, or the module lacks the attributes above.
        ValueError: x is not 4-D, or the module's shapes do not fit x (the message names the attribute).
    """
    ops.check_image("x", x)
    n, c, h, w = x.shape
    reason = attention_why_not(module)
    if reason is not None:
        raise (TypeError if "lacks" in reason else ValueError)(f"module: {reason}")
    if module.to_q.weight.shape[1] != c:
        raise ValueError(f"module.group_norm / to_q expect {module.to_q.weight.shape[1]} channels, x has C={c}")
    inner, heads = module.to_q.weight.shape[0], int(module.heads)
    head_dim = inner // heads
    w_qkv, b_qkv = fused_qkv_weights(module, x.dtype, x.device)
    gn = module.group_norm
    if gn is not None:
        gamma = gn.weight if gn.weight is not None else torch.ones(c, device=x.device, dtype=x.dtype)
        beta = gn.bias if gn.bias is not None else torch.zeros(c, device=x.device, dtype=x.dtype)
        qkv = ops.gn_silu_conv2d(
            x, w_qkv, b_qkv, norm_weight=gamma, norm_bias=beta, num_groups=gn.num_groups, eps=gn.eps,
            silu=False, padding=0, stats=stats,
        )  # (N, 3*inner, H, W) channels_last
    else:
        qkv = ops.gn_silu_conv2d(x, w_qkv, b_qkv, norm_weight=None, padding=0)
    tokens = qkv.permute(0, 2, 3, 1).reshape(n, h * w, 3 * inner)  # (N, H*W, 3*inner), a view for NHWC
    q, k, v = tokens.split(inner, dim=-1)  # each (N, H*W, inner), row stride 3*inner
    if gather_kv is not None:
        k, v = gather_kv(tokens[..., inner:]).split(inner, dim=-1)  # each (N, T_all, inner), row stride 2*inner
    if heads > 1:
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in (q, k, v))  # (N, heads, H*W, d)
    scale = float(getattr(module, "scale", head_dim ** -0.5))
    attn = ops.attention(q, k, v, scale)  # same shape as q, contiguous
    if heads > 1:
        attn = attn.transpose(1, 2).reshape(n, h * w, inner)  # (N, H*W, inner)
    attn = attn.view(n, h, w, inner).permute(0, 3, 1, 2)  # (N, inner, H, W) channels_last view
    out_proj = module.to_out[0]
    w_out = out_projection_weight(out_proj, x.dtype, x.device)  # (C, inner, 1, 1)
    b_out = None if out_proj.bias is None else out_proj.bias.to(device=x.device, dtype=x.dtype)
    residual = x if getattr(module, "residual_connection", False) else None
    rescale = float(getattr(module, "rescale_output_factor", 1.0))
    if rescale == 1.0:
        return ops.gn_silu_conv2d(attn, w_out, b_out, norm_weight=None, padding=0, residual=residual,
                                  emit_stats=emit_stats, emit_partials=emit_partials)
    y = ops.gn_silu_conv2d(attn, w_out, b_out, norm_weight=None, padding=0, residual=residual) / rescale
    if emit_stats is None:
        return y
    stats = ops.group_norm_stats(y, int(emit_stats[0]), float(emit_stats[1]))
    return (y, stats, ops.group_norm_partials(y, int(emit_stats[0]))) if emit_partials else (y, stats)


# ---------------------------------------------------------------------------------------------------------------
# The output head and the quant_conv fold
# ---------------------------------------------------------------------------------------------------------------


def folded_quant_conv(conv: nn.Conv2d, quant_conv: nn.Conv2d) -> Tuple[Tensor, Optional[Tensor]]:
    """quant_conv (1x1, Wq (C2, C1)) after conv (Wc (C1, C_in, k, k)) as one conv, a cached derived weight.

    `W = einsum(Wq, Wc)`, `b = Wq @ bc + bq` (exact: the 1x1 conv has no padding), computed in fp64 and stored in
    the conv's dtype. Returns (weight (C2, C_in, k, k), bias (C2,) or None).
    """
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

    sources = (conv.weight, conv.bias, quant_conv.weight, quant_conv.bias)
    return derived_weights.get(sources, "folded_quant_conv", build)


def leading_channels(conv: nn.Conv2d, channels: int) -> Tuple[Tensor, Optional[Tensor]]:
    """conv's weight (channels, C_in, k, k) and bias (channels,) restricted to its first `channels` outputs,
    cached in `derived_weights` (so the packed weight is cached too). Raises ValueError for a count outside
    1..C_out."""
    if not 1 <= channels <= conv.weight.shape[0]:
        raise ValueError(f"out_channels must be in 1..{conv.weight.shape[0]}, got {channels}")

    def build():
        bias = None if conv.bias is None else conv.bias[:channels].contiguous()
        return conv.weight[:channels].contiguous(), bias

    return derived_weights.get((conv.weight, conv.bias), ("leading_channels", channels), build)


def head_unit(name: str, norm: nn.Module, act: nn.Module, conv: nn.Module,
              quant_conv: Optional[nn.Module] = None, out_channels: Optional[int] = None) -> Unit:
    """conv_norm_out -> conv_act -> conv_out (-> quant_conv, folded in when it is a plain 1x1) as one GSC op;
    with `out_channels` (no quant_conv), only conv_out's first `out_channels` channels are computed."""
    reason = _first([
        (_group_norm_why_not(norm, "conv_norm_out") is None, _group_norm_why_not(norm, "conv_norm_out")),
        (type(act) is nn.SiLU, f"conv_act is {type(act).__name__}, not nn.SiLU"),
        (conv_why_not(conv) is None, f"conv_out: {conv_why_not(conv)}"),
    ])
    fold = quant_conv is not None and conv_why_not(quant_conv, (1,)) is None and quant_conv.padding == (0, 0)
    modules = tuple(m for m in (norm, act, conv, quant_conv) if m is not None)

    def reference(x):
        for module in modules:
            x = module(x)
        return x

    def run(carry, ctx, emit):
        x, stats = carry.take()
        if reason is not None:
            for module in modules:
                args, kwargs = _latent_arguments(module, ctx) if spatially_conditioned(module) else ((), {})
                x = _call_module(module, x, ctx, *args, **kwargs)
            return (x, None) if out_channels is None else (x[:, :out_channels], None)
        if out_channels is not None:
            weight, bias = leading_channels(conv, out_channels)
            return gsc(x, conv, ctx, norm, weight=weight, bias=bias, stats=stats)
        if quant_conv is None:
            return gsc(x, conv, ctx, norm, stats=stats)
        if not fold:
            y = gsc(x, conv, ctx, norm, stats=stats)[0]
            del x
            return _call_module(quant_conv, y, ctx), None
        weight, bias = folded_quant_conv(conv, quant_conv)
        return gsc(x, conv, ctx, norm, weight=weight, bias=bias, stats=stats)

    return Unit(name, "head", modules, run, reference, reason=reason, input_norm=norm if reason is None else None)


# ---------------------------------------------------------------------------------------------------------------
# The units of an Encoder, a Decoder and a whole VAE
# ---------------------------------------------------------------------------------------------------------------


def encoder_units(encoder: nn.Module, quant_conv: Optional[nn.Module] = None,
                  prefix: str = "encoder") -> List[List[Unit]]:
    """Stages of a diffusers-structured Encoder: conv_in, each down block, the mid block, and the head (with
    quant_conv folded in when given), linked for emitted statistics."""
    stages = [[make_unit(f"{prefix}.conv_in", encoder.conv_in)]]
    stages += [block_units(f"{prefix}.down_blocks.{i}", b) for i, b in enumerate(encoder.down_blocks)]
    stages.append(block_units(f"{prefix}.mid_block", encoder.mid_block))
    stages.append([head_unit(f"{prefix}.conv_out*", encoder.conv_norm_out, encoder.conv_act, encoder.conv_out,
                             quant_conv)])
    link([unit for stage in stages for unit in stage])
    return stages


def decoder_units(decoder: nn.Module, post_quant_conv: Optional[nn.Module] = None,
                  prefix: str = "decoder") -> List[List[Unit]]:
    """Stages of a diffusers-structured Decoder: post_quant_conv + conv_in, the mid block, each up block, and
    the head, linked for emitted statistics."""
    first = [make_unit("post_quant_conv", post_quant_conv)] if post_quant_conv is not None else []
    stages = [first + [make_unit(f"{prefix}.conv_in", decoder.conv_in)]]
    stages.append(block_units(f"{prefix}.mid_block", decoder.mid_block))
    stages += [block_units(f"{prefix}.up_blocks.{i}", b) for i, b in enumerate(decoder.up_blocks)]
    stages.append([head_unit(f"{prefix}.conv_out*", decoder.conv_norm_out, decoder.conv_act, decoder.conv_out)])
    link([unit for stage in stages for unit in stage])
    return stages


def iter_units(model: nn.Module) -> List[Unit]:
    """Every unit of a VAE with diffusers' AutoencoderKL structure, named by module path, in run order: the
    encoder's, `quant_conv`, then `post_quant_conv` and the decoder's (quant_conv as a unit of its own; a whole
    encode folds it into the head), or a consistency decoder's `decoder_unet` units (`unet_units`, which need
    `RunContext.temb`). What `sdvae-fast parity` compares and `sdvae-fast profile` times.

    Raises:
        TypeError: `model` has neither an `encoder` nor a `decoder`.
    """
    if not hasattr(model, "encoder") and not hasattr(model, "decoder"):
        raise TypeError(f"model must have diffusers' AutoencoderKL structure (.encoder/.decoder), got "
                        f"{type(model).__name__}")
    units: List[Unit] = []
    if getattr(model, "encoder", None) is not None:
        units += [u for stage in encoder_units(model.encoder) for u in stage]
        if getattr(model, "quant_conv", None) is not None:
            units.append(make_unit("quant_conv", model.quant_conv))
    if getattr(model, "decoder", None) is not None:
        units += [u for stage in decoder_units(model.decoder, getattr(model, "post_quant_conv", None))
                  for u in stage]
    if getattr(model, "decoder_unet", None) is not None and unet_why_not(model.decoder_unet) is None:
        units += [u for stage in unet_units(model.decoder_unet) for u in stage]  # the consistency decoder
    return units


def unsupported_units(model: nn.Module) -> List[Tuple[str, str]]:
    """(name, reason) of every unit of `model` that runs its module's own forward instead of the kernels."""
    return [(u.name, u.reason) for u in iter_units(model) if u.reason is not None]


# ---------------------------------------------------------------------------------------------------------------
# The consistency decoder's UNet (diffusers' UNet2DModel; issue 13): scale/shift ResNets, skip stack, blocks
# ---------------------------------------------------------------------------------------------------------------


def time_scale_shift(block: nn.Module, temb: Tensor, ctx: RunContext) -> Tuple[Tensor, Tensor]:
    """The time embedding's per-(sample, channel) scale and shift of a scale/shift ResnetBlock2D.

    diffusers' ResnetBlock2D.forward: `temb = time_emb_proj(nonlinearity(temb))` (no nonlinearity when
    `skip_time_act`), then `scale, shift = temb.chunk(2, dim=1)`. A (N, C_temb) @ (C_temb, 2C) product, so it
    runs in PyTorch (the module's own Linear, parameters cast to `ctx.dtype` when set).

    Args:
        block: a ResnetBlock2D accepted by `resnet_scale_shift_why_not`.
        temb: (N, C_temb) time embedding in the activation dtype.
        ctx: the run context (parameter cast).
    Returns:
        (scale, shift), each (N, C) in temb's dtype, C = norm2's channel count.
    """
    if not getattr(block, "skip_time_act", False):
        temb = block.nonlinearity(temb)
    proj = _call_module(block.time_emb_proj, temb, ctx)  # (N, 2C)
    return proj.chunk(2, dim=1)


def norm_scale_shift(x: Tensor, norm: nn.GroupNorm, ctx: RunContext, stats: Optional[Stats] = None,
                     x2: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """GroupNorm `norm` of x (or of `cat([x, x2], dim=1)`) as per-(sample, channel) `x * scale + shift`.

    Statistics: `stats` (emitted by x's producer) when given, else computed (`ops.group_norm_stats`, or
    `ops.group_norm_stats_two_sources` over the concatenation without writing it); merged across ranks under
    patch parallelism (one source only). Returns (scale, shift), each (N, C) float32 (float64 for fp64 x)."""
    if x2 is None:
        stats = input_stats(x, norm, stats, ctx)
        if stats is None:
            stats = ops.group_norm_stats(x, norm.num_groups, norm.eps)
    else:
        stats = ops.group_norm_stats_two_sources(x, x2, norm.num_groups, norm.eps)
    mean, rstd = stats
    c = norm.num_channels
    if norm.affine:
        gamma, beta = norm.weight, norm.bias
    else:
        gamma = torch.ones(c, dtype=mean.dtype, device=x.device)
        beta = torch.zeros_like(gamma)
    return ops.gn_scale_shift(mean, rstd, gamma, beta)


def _fused(x: Tensor, conv: nn.Conv2d, *, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
           emit: Optional[tuple] = None, **kwargs) -> tuple:
    """`ops.fused_conv2d` with a conv module's weight, bias and padding (unless given): (y, y's stats or None)."""
    weight = conv.weight if weight is None else weight
    bias = conv.bias if weight is conv.weight else bias
    if not kwargs.get("upsample", False):
        kwargs.setdefault("padding", conv.padding[0])
    result = ops.fused_conv2d(x, weight, bias, emit_stats=emit, **kwargs)
    return result if emit is not None else (result, None)


def modulated_gsc(x: Tensor, conv: nn.Conv2d, ctx: RunContext, norm: nn.GroupNorm, time_scale: Tensor,
                  time_shift: Tensor, *, residual: Optional[Tensor] = None, stats: Optional[Stats] = None,
                  emit: Optional[tuple] = None, residual_upsample: int = 1) -> tuple:
    """`conv(silu(group_norm(x) * (1 + time_scale) + time_shift)) + residual` as ONE `gn_silu_conv2d` op.

    The kernel's prologue applies `x * scale[n, c] + shift[n, c]` per (sample, channel) (the custom op
    `torch.ops.sdvae_fast.gn_silu_conv2d(x, weight, bias, scale, shift, residual, silu, stride, padding)`, whose
    public wrapper builds scale/shift from GroupNorm alone, `ops.gn_scale_shift`). GroupNorm is
    `x * a + b` with `a = rstd * gamma`, `b = beta - mean * a` (per sample and channel), so with the time
    embedding's `s`, `t`:  `(x * a + b) * (1 + s) + t = x * a(1 + s) + (b(1 + s) + t)`, i.e.
    `scale' = a * (1 + s)`, `shift' = b * (1 + s) + t`, composed in fp32 (fp64 for fp64 x). No extra pass over x.
    Source of the arithmetic: diffusers' ResnetBlock2D.forward, `time_embedding_norm == "scale_shift"`.

    Args:
        x: (N, C, H, W) activation, any strides. conv: a 3x3 or 1x1 nn.Conv2d over C channels (its padding).
        ctx: the run context (parallel hooks). norm: nn.GroupNorm over C (affine or not).
        time_scale, time_shift: (N, C), any float dtype. residual: (N, C_out, H, W) added in the epilogue,
            or (N, C_out, H/2, W/2) nearest-upsampled by indexing with `residual_upsample=2`.
        stats: x's GroupNorm (mean, rstd), each (N, G), or None (computed here; merged across ranks when
            `ctx.parallel`). emit: (num_groups, eps) to emit the output's statistics for, or None.
    Returns:
        (y (N, C_out, H, W) channels_last in x's dtype, y's statistics or None), as `gsc`.
    Raises:
        ValueError: time_scale / time_shift are not (N, C).
    """
    n, c = x.shape[0], x.shape[1]
    for label, t in (("time_scale", time_scale), ("time_shift", time_shift)):
        if tuple(t.shape) != (n, c):
            raise ValueError(f"{label} must be ({n}, {c}), got shape {tuple(t.shape)}")
    gn_scale, gn_shift = norm_scale_shift(x, norm, ctx, stats)  # (N, C) fp32 (fp64 for fp64 x)
    one_plus = 1.0 + time_scale.to(gn_scale.dtype)
    scale = (gn_scale * one_plus).contiguous()
    shift = (gn_shift * one_plus + time_shift.to(gn_scale.dtype)).contiguous()
    if residual_upsample != 1:
        # An upsampling ResNet's conv2: the residual is the block's input, nearest-upsampled by indexing.
        return _fused(x, conv, scale=scale, shift=shift, residual=residual, residual_upsample=residual_upsample,
                      emit=emit)
    padding = conv.padding[0]
    pad = [padding] * 4
    if ctx.parallel is not None and conv.weight.shape[-1] > 1:
        x, pad = ctx.parallel.conv_input(x, pad, conv.weight.shape[-1], 1)
    pad = [int(p) for p in pad]
    if residual is not None and residual.shape[0] != n:
        raise ValueError(f"residual must have {n} samples, got shape {tuple(residual.shape)}")
    args = (x, conv.weight, conv.bias, scale, shift, residual, True, 1, pad)
    if emit is None:
        return torch.ops.sdvae_fast.gn_silu_conv2d(*args), None
    groups, eps = int(emit[0]), float(emit[1])
    if ctx.parallel is not None:
        y, _, _, *partials = torch.ops.sdvae_fast.gn_silu_conv2d_partials(*args, groups, eps)
        return y, ops.GroupNormPartials(*partials)
    y, mean_y, rstd_y = torch.ops.sdvae_fast.gn_silu_conv2d_stats(*args, groups, eps)
    return y, (mean_y, rstd_y)


def _resnet_takes_time(block) -> bool:
    """Selects the scale/shift variant of ResnetBlock2D: the block has a time embedding projection."""
    return getattr(block, "time_emb_proj", None) is not None


@register_unit("ResnetBlock2D", variant="scale_shift", when=_resnet_takes_time,
               why_not=resnet_scale_shift_why_not, input_norm=lambda block: block.norm1)
def _run_resnet_scale_shift(block, carry, ctx, emit):
    """ResnetBlock2D with `time_embedding_norm="scale_shift"` (the UNet's): three ops at most.

    1. `GSC(conv1)(x)` (norm1 + SiLU in the prologue), emitting its output's statistics for norm2;
    2. the 1x1 `conv_shortcut` as a plain conv when present (its output is the residual, else x is);
    3. `conv2(SiLU(norm2(h) * (1 + s) + t)) + residual` as ONE op (`modulated_gsc`), s, t from
       `time_scale_shift(block, ctx.temb)`.
    Raises ValueError when `ctx.temb` is None (diffusers raises too: scale_shift needs a time embedding)."""
    x, stats = carry.take()
    return scale_shift_resnet(block, x, ctx, emit, stats=stats)


def scale_shift_resnet(block: nn.Module, x: Tensor, ctx: RunContext, emit: Optional[tuple], *,
                       stats: Optional[Stats] = None, skip: Optional[Tensor] = None) -> tuple:
    """A scale/shift ResnetBlock2D (`resnet_scale_shift_why_not` accepts it) on x, or on `cat([x, skip])`.

    Three ops at most, by the block's resampling (`resampling`):
    - none: `GSC(conv1)` (norm1 + SiLU in the prologue, emitting norm2's statistics), the 1x1 shortcut as a plain
      conv when present, and `conv2(SiLU(norm2(h) * (1 + s) + t)) + residual` as ONE op (`modulated_gsc`). With
      `skip` (an up block's resnet), norm1, conv1 and the shortcut read `cat([x, skip], dim=1)` from the two
      tensors (two-source mode; statistics by `ops.group_norm_stats_two_sources`), never concatenated.
    - "up": conv1 on the nearest-2x upsampled `SiLU(norm1(x))` in the 4-phase form with norm1 + SiLU in its
      prologue (at low resolution), and conv2's residual `up2(x)` read at half resolution in its epilogue.
    - "down": `avg_pool2d(SiLU(norm1(x)), 2)` and `avg_pool2d(x, 2)` in PyTorch (the statistics by our kernel,
      no aten GroupNorm), then the two convs as above.
    s, t come from `time_scale_shift(block, ctx.temb)`. Raises ValueError when `ctx.temb` is None (diffusers
    raises too: scale_shift needs a time embedding). Returns (y, y's statistics for `emit` or None)."""
    if ctx.temb is None:
        raise ValueError("a ResnetBlock2D with time_embedding_norm='scale_shift' needs the run context's temb")
    inner_emit = norm_key(block.norm2) if ctx.emits else None
    mode = resampling(block)
    residual_upsample = 1
    if skip is not None:
        scale, shift = norm_scale_shift(x, block.norm1, ctx, x2=skip)
        h, h_stats = _fused(x, block.conv1, x2=skip, scale=scale, shift=shift, emit=inner_emit)
        if block.conv_shortcut is not None:
            residual = _fused(x, block.conv_shortcut, x2=skip)[0]
        else:
            residual = torch.cat([x, skip], dim=1)
    elif mode == "up":
        scale, shift = norm_scale_shift(x, block.norm1, ctx, stats)
        h, h_stats = _fused(x, block.conv1, scale=scale, shift=shift, upsample=True, emit=inner_emit)
        residual, residual_upsample = x, 2
    elif mode == "down":
        scale, shift = norm_scale_shift(x, block.norm1, ctx, stats)
        act = torch.nn.functional.silu(x.to(scale.dtype) * scale[:, :, None, None] + shift[:, :, None, None])
        h, h_stats = gsc(torch.nn.functional.avg_pool2d(act, 2).to(x.dtype), block.conv1, ctx, emit=inner_emit)
        del act
        residual = block.downsample(x)
    else:
        h, h_stats = gsc(x, block.conv1, ctx, block.norm1, stats=stats, emit=inner_emit)
        residual = x if block.conv_shortcut is None else gsc(x, block.conv_shortcut, ctx)[0]
    del x, skip
    time_scale, time_shift = time_scale_shift(block, ctx.temb, ctx)
    return modulated_gsc(h, block.conv2, ctx, block.norm2, time_scale, time_shift, residual=residual,
                         stats=h_stats, emit=emit, residual_upsample=residual_upsample)


@register_block("ResnetDownsampleBlock2D")
def _resnet_down_block_children(block):
    return ([(f"resnets.{i}", r) for i, r in enumerate(block.resnets)]
            + [(f"downsamplers.{i}", d) for i, d in enumerate(block.downsamplers or [])])


@register_block("ResnetUpsampleBlock2D")
def _resnet_up_block_children(block):
    return ([(f"resnets.{i}", r) for i, r in enumerate(block.resnets)]
            + [(f"upsamplers.{i}", u) for i, u in enumerate(block.upsamplers or [])])


#: How UNet2DModel's forward treats a down / up block's children (diffusers' ResnetDownsampleBlock2D returns
#: every resnet's and the downsampler's output as skips; ResnetUpsampleBlock2D concatenates one popped skip
#: onto the input of each resnet, channels [x | skip]).
UNET_DOWN_BLOCKS = frozenset({"ResnetDownsampleBlock2D", "DownBlock2D"})
UNET_UP_BLOCKS = frozenset({"ResnetUpsampleBlock2D", "UpBlock2D"})


def _wrapped(unit: Unit, run: Callable, input_norm: Optional[nn.Module]) -> Unit:
    return Unit(unit.name, unit.kind, unit.modules, run, unit.reference, reason=unit.reason, input_norm=input_norm)


def pushing_unit(unit: Unit) -> Unit:
    """`unit`, then its output pushed onto `ctx.skips` (a UNet down block's residual sample)."""
    def run(carry, ctx, emit):
        y, stats = unit._run(carry, ctx, emit)
        ctx.skips.append(y)
        return y, stats

    return _wrapped(unit, run, unit.input_norm)


def popping_unit(unit: Unit) -> Unit:
    """`unit` on `cat([x, ctx.skips.pop()], dim=1)` (a UNet up block's resnet). A scale/shift ResnetBlock2D on
    the kernels reads the two tensors in its convs' prologues (`scale_shift_resnet` with `skip`); any other
    unit gets the concatenation materialised. The statistics over the concatenation are computed from both
    tensors, so the previous unit emits none for it (input_norm None)."""
    block = unit.modules[0]
    two_sources = unit.reason is None and unit.kind == "ResnetBlock2D[scale_shift]" and resampling(block) is None

    def run(carry, ctx, emit):
        x, _ = carry.take()
        skip = ctx.skips.pop().to(x.dtype)
        if two_sources:
            return scale_shift_resnet(block, x, ctx, emit, skip=skip)
        cat = torch.cat([x, skip], dim=1)
        del x, skip
        return unit._run(Carry(cat), ctx, emit)

    return _wrapped(unit, run, None)


@dataclasses.dataclass
class UNetInput:
    """How a UNet's `conv_in` input is assembled inside the conv (the consistency decoder's decode): the
    conv reads `cat([x, nearest_up(sample2, upsample)], dim=1) * scale + shift` per (sample, channel), with x
    the units' input (N, C1, H, W), sample2 (N, C2, H/upsample, W/upsample) in x's dtype, scale and shift
    (N, C1 + C2) float32 (no SiLU); nothing of it is written."""

    sample2: Tensor
    upsample: int
    scale: Tensor
    shift: Tensor

    def assemble(self, x: Tensor) -> Tensor:
        """The input `conv_in` reads, materialised (for a conv_in that runs its module forward)."""
        up = torch.nn.functional.interpolate(self.sample2.to(self.scale.dtype), scale_factor=float(self.upsample),
                                             mode="nearest")
        a = torch.cat([x.to(self.scale.dtype), up], dim=1)
        return (a * self.scale[:, :, None, None] + self.shift[:, :, None, None]).to(x.dtype)


def unet_conv_in_unit(name: str, conv: nn.Module) -> Unit:
    """The UNet's conv_in as a unit that pushes its output (the first skip); with `ctx.unet_input` set, its input
    is assembled inside the conv (`UNetInput`: two sources, the second upsampled by indexing, an affine
    prologue without SiLU), else it is the plain conv unit."""
    base = make_unit(name, conv)

    def run(carry, ctx, emit):
        extra = ctx.unet_input
        if extra is None:
            y, stats = base._run(carry, ctx, emit)
        elif base.reason is not None:
            x, _ = carry.take()
            y, stats = base._run(Carry(extra.assemble(x)), ctx, emit)
        else:
            x, _ = carry.take()
            y, stats = _fused(x, conv, x2=extra.sample2, x2_upsample=extra.upsample, scale=extra.scale,
                              shift=extra.shift, silu=False, emit=emit)
        ctx.skips.append(y)
        return y, stats

    return _wrapped(base, run, None)


def _unet_block_fallback(name: str, block: nn.Module, reason: str, role: str) -> Unit:
    """A whole UNet block as its module forward, with UNet2DModel's calling convention for `role`:
    "down": `block(x, temb) -> (y, res_samples)`, res_samples pushed; "up": `block(x, res, temb)` with the
    last `len(block.resnets)` skips popped; "mid": `block(x, temb)`."""
    def run(carry, ctx, emit):
        x, _ = carry.take()
        if role == "down":
            y, res = _call_module(block, x, ctx, ctx.temb)
            ctx.skips.extend(res)
            return y, None
        if role == "up":
            count = len(block.resnets)
            res = tuple(ctx.skips[-count:])
            del ctx.skips[-count:]
            return _call_module(block, x, ctx, res, ctx.temb), None
        return _call_module(block, x, ctx, ctx.temb), None

    return Unit(name, "module", (block,), run, block, reason=reason)


def unet_why_not(unet: nn.Module) -> Optional[str]:
    """Why a UNet2DModel cannot run as units at all (then its own forward runs), or None.

    The walker covers diffusers' UNet2DModel without class conditioning, without `center_input_sample`, with a
    "learned" or "positional" time embedding and no Skip* blocks (their skip_sample path)."""
    missing = [a for a in ("conv_in", "time_proj", "time_embedding", "down_blocks", "up_blocks",
                           "conv_norm_out", "conv_act", "conv_out") if not hasattr(unet, a)]
    if missing:
        return f"{type(unet).__name__} lacks {missing}"
    config = getattr(unet, "config", {})
    get = config.get if hasattr(config, "get") else lambda key, default=None: getattr(config, key, default)
    blocks = list(unet.down_blocks) + list(unet.up_blocks)
    return _first([
        (getattr(unet, "class_embedding", None) is None, "it has a class embedding"),
        (not get("center_input_sample", False), "center_input_sample=True"),
        (get("time_embedding_type", "positional") in ("learned", "positional"),
         f"time_embedding_type={get('time_embedding_type', None)!r}"),
        (not any(hasattr(b, "skip_conv") for b in blocks), "it has Skip* blocks (skip_sample)"),
    ])


def unet_units(unet: nn.Module, prefix: str = "decoder_unet", out_channels: Optional[int] = None
               ) -> List[List[Unit]]:
    """Stages of a diffusers UNet2DModel's forward after the time embedding, as units, linked for emitted
    statistics: [conv_in (pushes)], each down block (every child pushes its output), the mid block, each up
    block (each resnet pops a skip and runs on the concatenation), and the head
    (conv_norm_out -> conv_act -> conv_out, one GSC op; computing only the first `out_channels` channels when
    given). The units need `RunContext.temb` (N, C_temb); conv_in reads `RunContext.unet_input` when set.

    A block whose class is not registered becomes one unit running its own forward with UNet2DModel's calling
    convention (`_unet_block_fallback`); a child the kernels cannot run, its own forward (with temb).
    Raises TypeError when `unet_why_not(unet)` gives a reason.
    """
    reason = unet_why_not(unet)
    if reason is not None:
        raise TypeError(f"unet: {reason}")
    stages = [[unet_conv_in_unit(f"{prefix}.conv_in", unet.conv_in)]]

    def block_stage(name, block, role):
        units = block_units(name, block)
        if len(units) == 1 and units[0].modules[0] is block and units[0].reason is not None:
            return [_unet_block_fallback(name, block, units[0].reason, role)]
        kind = type(block).__name__
        if role == "down" and kind not in UNET_DOWN_BLOCKS:
            return [_unet_block_fallback(name, block, f"{kind} is not a UNet down block", role)]
        if role == "up" and kind not in UNET_UP_BLOCKS:
            return [_unet_block_fallback(name, block, f"{kind} is not a UNet up block", role)]
        if role == "down":
            return [pushing_unit(u) for u in units]
        if role == "up":
            return [popping_unit(u) if u.name.startswith(f"{name}.resnets.") else u for u in units]
        return units

    stages += [block_stage(f"{prefix}.down_blocks.{i}", b, "down") for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        stages.append(block_stage(f"{prefix}.mid_block", unet.mid_block, "mid"))
    stages += [block_stage(f"{prefix}.up_blocks.{i}", b, "up") for i, b in enumerate(unet.up_blocks)]
    stages.append([head_unit(f"{prefix}.conv_out*", unet.conv_norm_out, unet.conv_act, unet.conv_out,
                             out_channels=out_channels)])
    link([unit for stage in stages for unit in stage])
    return stages
