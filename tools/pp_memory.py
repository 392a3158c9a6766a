"""Peak activation memory and communication volume per rank of a patch-parallel decode (and encode), computed
from the schedule (issue 12, item 5). Not measured: the GPU measurement (torch.cuda.max_memory_allocated per rank)
is the next step; docs/patch_parallel_memory.md has the method, the tables and the assumptions.

    python tools/pp_memory.py            # the tables (markdown) for the SD kl-f8 VAE, batch 1, bf16
    python tools/pp_memory.py --check    # the model against the real units, run in one process on the CPU

How. The VAE is built on the meta device (no weights) and its units are listed with
`sdvae_fast.fast.units.decoder_units` / `encoder_units`, the lists the fast path runs. `RankModel` then walks
those units for one rank of one world size and replays what each unit allocates, tensor by tensor, in the order
the code allocates and frees them (the `Carry` hands an activation to its consumer, which drops it after its last
use): every point where a tensor is allocated is a *phase*, and the bytes of all tensors alive there, plus what
the caller holds (the input), are that phase's total. A rank's peak is its largest phase; the table shows the
largest over all ranks (a middle rank, with halo rows on both sides, when bands are equal). Each collective adds
to the communication count of its kind, with all_gather semantics: a rank sends its part once and receives
every rank's part (world x part, its own included).

The schedule modelled (patch parallelism as docs/patch_parallel.md and `sdvae_fast.parallel` describe it):
- bands: rows of the latents (decode) or of the deepest encoder map (encode), as even as possible, taller first;
  a level at upsampling factor f holds f x band rows;
- before every 3x3 conv (stride 1) each rank all-gathers the first and last row of every rank's band (sends
  2 rows x W x C, receives world x that) and concatenates x_ext = cat(above, x, below), a copy of its band plus
  the halo rows, alive together with x during the conv; the encoder's stride-2 downsample takes 1 row from below
  (same all_gather of 2 edge rows); the upsample (nearest 2x + 3x3 conv fused, no 4x tensor) extends its
  low-resolution input by 1 row each side and crops 2 output rows each side of its output: the crop is a view,
  so the uncropped output stays allocated until the next unit's last use of its input;
- every GroupNorm: an all_gather of the (count, mean, M2) fp32 partials, (N, G) each;
- the mid-block attention: q, k, v of the band's tokens (one (N, T_band, 3 x 512) tensor), K and V padded to the
  tallest band and all-gathered, concatenated to (N, T_all, 2 x 512), flash attention of the band's queries over
  all keys (no T x T matrix), the output projection with the residual;
- after each stage one all_reduce of one int32 flag (`end_stage`); the final result all-gathered (bands padded
  to the tallest) when gather=True.
World 1 is the single-device fast path: the same units, no halos, copies or collectives. Where the code says
more than the design, the model follows the code (`RowParallelHooks` with `gather_tokens` / `end_stage`, the
version `--check` runs): `_all_gather` keeps a channels_last tensor channels_last, so the edge rows, the
received rows and x_ext are channels_last and the conv kernel reads x_ext without another copy; the K/V and
result gathers receive world separate tensors and concatenate them (a copy); every tensor of the attention unit
stays alive until it returns; convs emit the next GroupNorm's band partials (`emit_partials`), and the unit after
an upsample (which emits none under patch parallelism) computes them from its input. `halo_layout="nchw"` models
the NCHW halo rows of the code before commit 63b7381 (`t.contiguous()` in `_all_gather`: an NCHW copy of the edge
rows, the channels_last original freed, an NCHW x_ext that the conv kernel copies into channels_last once more);
it is kept so that `--check` can tell the two layouts apart.

GPU-only allocations the model adds (`gpu=True`; on the CPU the ops run PyTorch references instead): the conv
kernel copies an input whose channels are not innermost (stride(1) != 1) into channels_last once
(`kernels/conv.py::_prepare_input`), and a conv that emits the next GroupNorm's statistics holds a fp32 scratch of
3 floats per (64-pixel tile, group) while it runs. Tensors of a few KiB (GroupNorm statistics, the flag) are left out.

`--check` runs the real units on a tiny VAE on the CPU, one rank at a time in one process (the real
`RowParallelHooks`, every method unchanged, with the all_gather and all_reduce of `torch.distributed`, as
`sdvae_fast.parallel` calls them, replaced by a transport that returns world copies of the rank's own tensor),
follows every activation tensor with a `TorchDispatchMode` and weak references, and compares, per unit and rank,
the bytes alive at the unit's fullest point (also with the GPU-only allocations added from each conv op's actual
inputs), the largest tensor allocated, and the traffic per kind, with the model: they must be equal to the byte.
It also tells which halo layout (channels_last or NCHW) the code has.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ITEMSIZE = 2  # bf16 activations
FP32 = 4
FLAG_BYTES = 4  # the stage-end all_reduce: one int32 flag
SIZE_BYTES = 8  # one int64 band size, all-gathered before the K/V and the result gathers
IMAGE_SIZES = (4096, 8192, 16384)
WORLDS = (1, 2, 4, 8)
KINDS = ("halo", "gn", "kv", "image", "flags")
GIB, MIB = float(2 ** 30), float(2 ** 20)


def _conv_constants() -> Tuple[int, Callable[[int], int]]:
    """(the smallest BLOCK_M of the conv kernel's configs, `stats_run_size`) from `sdvae_fast.kernels.conv`: what
    sizes a conv's emitted-statistics scratch. Falls back to the values of this commit (64, runs of up to 16
    channels) when the kernels cannot be imported (no triton)."""
    try:
        from sdvae_fast.kernels import conv
        return conv._MIN_BLOCK_M, conv.stats_run_size
    except Exception:  # pragma: no cover - triton missing
        def run_size(channels_per_group: int) -> int:
            """Channels per statistics run: the largest power of two dividing it, at most 16."""
            run = 1
            while channels_per_group % (2 * run) == 0 and 2 * run <= 16:
                run *= 2
            return run
        return 64, run_size


MIN_BLOCK_M, STATS_RUN_SIZE = _conv_constants()


def band_heights(rows: int, world: int) -> List[int]:
    """Every rank's band height of a map with `rows` rows: as even as possible, the taller bands first (the rule
    of `sdvae_fast.parallel.row_bands`).

    Raises:
        ValueError: world < 1, or more ranks than rows.
    """
    if world < 1 or world > rows:
        raise ValueError(f"world size {world} must be between 1 and the {rows} rows of the map")
    base, extra = divmod(rows, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


class Buf:
    """One tensor of the schedule.

    Attributes:
        shape: its logical shape, (N, C, H, W) for feature maps or (N, T, D) for token tensors.
        nbytes: bytes of its storage (0 for a view: `root` is the tensor that owns the storage).
        layout: "nhwc" (channels_last, as the ops write), "nchw" (contiguous), or "tokens".
        what: a short description for the report.
        internal: allocated inside a kernel launch (a copy or a scratch), invisible to Python.
    """

    __slots__ = ("shape", "nbytes", "layout", "base", "what", "internal")

    def __init__(self, shape: Sequence[int], layout: str, what: str, *, itemsize: int = ITEMSIZE,
                 base: Optional["Buf"] = None, internal: bool = False, nbytes: Optional[int] = None):
        """shape and layout as the attributes; itemsize: bytes per element; base: the tensor this is a view of;
        nbytes: the storage size when it is not prod(shape) x itemsize (scratch, masks)."""
        self.shape = tuple(int(s) for s in shape)
        self.layout, self.what, self.base, self.internal = layout, what, base, internal
        if base is not None:
            self.nbytes = 0
        else:
            self.nbytes = int(nbytes) if nbytes is not None else math.prod(self.shape) * itemsize

    @property
    def root(self) -> "Buf":
        """The tensor owning the storage (itself unless a view)."""
        return self.base.root if self.base is not None else self

    @property
    def numel(self) -> int:
        """Elements of the logical shape."""
        return math.prod(self.shape)

    def view(self, shape: Sequence[int], what: str) -> "Buf":
        """A view of this tensor's storage with another logical shape (e.g. the upsample's crop)."""
        return Buf(shape, self.layout, what, base=self)


class RankModel:
    """The symbolic run of one rank: replays the units' allocations, records each label's (unit's) peak phase and
    the bytes each collective sends and receives.

    Args:
        world, rank: the world size and this rank (0 = the top band).
        heights: every rank's band height at the base map (latents for decode, deepest encoder map for encode).
        batch: N.
        gpu: add the CUDA kernels' internal allocations (channels_last copy of a non-channels_last input, the
            emitted-statistics scratch); False for what the CPU reference ops allocate (the `--check`).
        halo_layout: "nhwc" (the code since 63b7381: halo rows and x_ext stay channels_last) or "nchw" (the code
            before it: `_all_gather`'s `.contiguous()` made the edge rows NCHW, so the cat with them was NCHW and
            the conv kernel copied it into channels_last again; kept for `--check` to tell the layouts apart).
        halo_copy: False models a conv that reads the halo rows from the received tensors instead of x_ext.
        crop_alloc: False models an upsample that writes only the rows it keeps.
        fp16_guard: model the fp16 overflow policy (each stage's input kept, a finiteness mask at its end).
        emit_stats: `sdvae_fast.fast.EMIT_GN_STATS` (convs emit the next GroupNorm's statistics).
    """

    def __init__(self, world: int, rank: int, heights: Sequence[int], *, batch: int = 1, gpu: bool = True,
                 halo_layout: str = "nhwc", halo_copy: bool = True, crop_alloc: bool = True,
                 fp16_guard: bool = False, emit_stats: bool = True):
        """See the class docstring. Raises ValueError on an unknown halo_layout or a rank outside the world."""
        if halo_layout not in ("nhwc", "nchw"):
            raise ValueError(f"halo_layout must be 'nhwc' or 'nchw', got {halo_layout!r}")
        if not 0 <= rank < world or len(heights) != world:
            raise ValueError(f"rank {rank} of world {world} with {len(heights)} band heights")
        self.world, self.rank, self.heights, self.n = world, rank, list(heights), batch
        self.gpu, self.halo_layout, self.halo_copy = gpu, halo_layout, halo_copy
        self.crop_alloc, self.fp16_guard, self.emit_stats = crop_alloc, fp16_guard, emit_stats
        self.held: List[Buf] = []
        self.label = "input"
        self.peaks: Dict[str, Tuple[int, str, List[Buf]]] = {}
        self.largest: Dict[str, Buf] = {}
        self.comm: Dict[str, List[int]] = {kind: [0, 0] for kind in KINDS}

    # -- bookkeeping ----------------------------------------------------------------------------------------------

    def new(self, shape: Sequence[int], layout: str, what: str, *, internal: bool = False,
            nbytes: Optional[int] = None) -> Buf:
        """A newly allocated tensor of the current label (remembered as the label's largest when it is)."""
        buf = Buf(shape, layout, what, internal=internal, nbytes=nbytes)
        best = self.largest.get(self.label)
        if not internal and (best is None or buf.nbytes > best.nbytes):
            self.largest[self.label] = buf
        return buf

    def phase(self, step: str, live: Sequence[Optional[Buf]]) -> int:
        """Record a point of the schedule where `live` (plus the held tensors) are allocated; returns its bytes.
        Views count once, through the tensor owning their storage."""
        roots: Dict[int, Buf] = {}
        for buf in list(self.held) + [b for b in live if b is not None]:
            roots[id(buf.root)] = buf.root
        total = sum(b.nbytes for b in roots.values())
        if self.label not in self.peaks or total > self.peaks[self.label][0]:
            self.peaks[self.label] = (total, step, list(roots.values()))
        return total

    def gather(self, kind: str, nbytes: int) -> None:
        """Count one all_gather of `nbytes` per rank: sent once, received from every rank (its own included)."""
        self.comm[kind][0] += nbytes
        self.comm[kind][1] += self.world * nbytes

    def gn(self, groups: int) -> None:
        """A GroupNorm under patch parallelism: the (count, mean, M2) fp32 partials, (N, G) each, all-gathered."""
        if self.world > 1:
            self.gather("gn", 3 * self.n * groups * FP32)

    def peak(self, gather: bool = True) -> Tuple[int, str, str, List[Buf]]:
        """(bytes, label, step, live tensors) of the largest phase; without the final gather when `gather` is
        False."""
        best = None
        for label, (total, step, bufs) in self.peaks.items():
            if not gather and label == "gather":
                continue
            if best is None or total > best[0]:
                best = (total, label, step, bufs)
        return best

    # -- the pieces the units are made of ----------------------------------------------------------------------

    def _halo(self, x: Buf, top: int, bottom: int, live: Sequence[Buf]) -> Tuple[Optional[Buf], Optional[Buf]]:
        """`RowParallelHooks._halo`: all_gather of every band's first and last k = max(top, bottom, 1) rows;
        returns the received tensors this rank keeps (above, below), None at the image border or when no row is
        needed on that side."""
        n, c, _, w = x.shape
        k = max(top, bottom, 1)
        send = self.new((n, c, 2 * k, w), x.layout, "edge rows (send)")
        if self.halo_layout == "nchw" and send.layout != "nchw":
            # the code before 63b7381, `t = t.contiguous()` in `_all_gather`: an NCHW copy, and the channels_last
            # original is freed (the callee owns its argument and rebinds it)
            copy = self.new((n, c, 2 * k, w), "nchw", "edge rows, NCHW copy (send)")
            self.phase("halo edge rows to NCHW", list(live) + [x, send, copy])
            send = copy
        received = [self.new((n, c, 2 * k, w), send.layout, "edge rows (received)") for _ in range(self.world)]
        self.phase("halo all_gather", list(live) + [x, send] + received)
        self.gather("halo", send.nbytes)
        above = received[self.rank - 1] if self.rank > 0 and top else None
        below = received[self.rank + 1] if self.rank < self.world - 1 and bottom else None
        return above, below

    def _extend(self, x: Buf, top: int, bottom: int,
                live: Sequence[Buf]) -> Tuple[Optional[Buf], int, int, List[Buf]]:
        """`RowParallelHooks._extend`: (x_ext, rows added on top, rows added below, received tensors the conv
        still reads). x_ext is x itself when no neighbour adds rows, None when `halo_copy` is off (the conv then
        reads x and the received rows)."""
        n, c, rows, w = x.shape
        above, below = self._halo(x, top, bottom, live)
        added_top = top if above is not None else 0
        added_below = bottom if below is not None else 0
        kept = [b for b in (above, below) if b is not None]
        if not kept:
            return x, 0, 0, []
        if not self.halo_copy:
            return None, added_top, added_below, kept
        parts = [b for b in (above, x, below) if b is not None]
        layout = parts[0].layout if all(p.layout == parts[0].layout for p in parts) else "nchw"
        x_ext = self.new((n, c, rows + added_top + added_below, w), layout, "band + halo rows (x_ext)")
        self.phase("halo cat", list(live) + [x] + kept + [x_ext])
        return x_ext, added_top, added_below, []

    def _kernel_extras(self, x_in: Buf, y: Buf, emit_groups: Optional[int], upsample: bool) -> List[Buf]:
        """What a conv kernel launch allocates besides its output (only with `gpu`): a channels_last copy of an
        NCHW input, and the fp32 scratch of emitted statistics (3 floats per 64-pixel tile and channel run)."""
        if not self.gpu:
            return []
        extras = []
        if x_in.layout == "nchw":
            extras.append(self.new(x_in.shape, "nhwc", "channels_last copy of the conv input (in the kernel)",
                                   internal=True))
        if emit_groups:
            n, c_out, h_out, w_out = y.shape
            run = STATS_RUN_SIZE(c_out // emit_groups)
            pixels = (h_out // 2) * (w_out // 2) if upsample else h_out * w_out
            tiles = -(-pixels // MIN_BLOCK_M) * (4 if upsample else 1)
            extras.append(self.new((n * (c_out // run) * tiles * 3,), "tokens", "emitted GroupNorm partials "
                                   "(kernel scratch)", internal=True, nbytes=n * (c_out // run) * tiles * 3 * FP32))
        return extras

    def conv(self, step: str, x: Buf, c_out: int, k: int, stride: int, padding: Sequence[int],
             live: Sequence[Buf], emit_groups: Optional[int]) -> Buf:
        """One `gsc` op: halo exchange and x_ext (k > 1 under patch parallelism), then the conv's output y
        (N, c_out, H_out, W_out) channels_last. `padding` is (left, right, top, bottom); `live` are the other
        tensors the unit keeps alive meanwhile (e.g. the residual). Returns y."""
        n, _, rows, w = x.shape
        left, right, top, bottom = padding
        x_in, kept, rows_in = x, [], rows
        if self.world > 1 and k > 1:
            need_below = max(k - stride - top, 0)
            x_ext, added_top, added_below, kept = self._extend(x, top, need_below, live)
            rows_in = rows + added_top + added_below
            x_in = x if x_ext is None else x_ext
            top = top if added_top == 0 else 0
            bottom = bottom if added_below == 0 else 0
        h_out = (rows_in + top + bottom - k) // stride + 1
        w_out = (w + left + right - k) // stride + 1
        y = self.new((n, c_out, h_out, w_out), "nhwc", f"{_short(self.label)} {step} output")
        extras = self._kernel_extras(x_in, y, emit_groups, upsample=False)
        self.phase(step, list(live) + [x, x_in] + kept + [y] + extras)
        return y

    def _emit(self, unit) -> Optional[int]:
        """The group count a unit's last conv emits statistics for (None when it emits none)."""
        return unit.emit[0] if (self.emit_stats and unit.emit is not None) else None

    # -- the units ----------------------------------------------------------------------------------------------

    def conv_unit(self, unit, x: Buf) -> Buf:
        """A Conv2d unit (post_quant_conv, conv_in): one plain conv."""
        conv = unit.modules[0]
        k = conv.kernel_size[0]
        return self.conv("conv", x, conv.out_channels, k, conv.stride[0], [conv.padding[0]] * 4, [],
                         self._emit(unit))

    def resnet(self, unit, x: Buf) -> Buf:
        """ResnetBlock2D: h = conv1(GN-SiLU(x)) (emits norm2's statistics), the 1x1 shortcut s if any (x is then
        dropped), y = conv2(GN-SiLU(h)) + residual (x or s)."""
        block = unit.modules[0]
        self.gn(block.norm1.num_groups)
        inner = block.norm2.num_groups if self.emit_stats else None
        h = self.conv("conv1", x, block.conv1.out_channels, 3, 1, [1, 1, 1, 1], [], inner)
        if block.conv_shortcut is not None:
            residual = self.conv("shortcut", x, block.conv_shortcut.out_channels, 1, 1, [0, 0, 0, 0], [h], None)
        else:
            residual = x
        self.gn(block.norm2.num_groups)
        return self.conv("conv2", h, block.conv2.out_channels, 3, 1, [1, 1, 1, 1], [residual], self._emit(unit))

    def downsample(self, unit, x: Buf) -> Buf:
        """Downsample2D: a stride-2 3x3 conv padded (0, 1, 0, 1): under patch parallelism 1 row from below."""
        from sdvae_fast.fast.units import downsample_padding

        padding, reason = downsample_padding(unit.modules[0])
        if padding is None:
            raise ValueError(f"{unit.name}: {reason}")
        return self.conv("conv", x, unit.modules[0].conv.out_channels, 3, 2, padding, [], self._emit(unit))

    def upsample(self, unit, x: Buf) -> Buf:
        """Upsample2D: nearest 2x + 3x3 conv in one op. Under patch parallelism the low-resolution band gets one
        halo row each side, the unit rebinds its x to x_ext (the band itself is freed), the op writes
        2 x (rows + halos) rows and a view crops the halo's output rows (the full output stays allocated).
        Emits no statistics under patch parallelism (the next unit computes its partials)."""
        from sdvae_fast.fast.units import upsample_conv

        c_out = upsample_conv(unit.modules[0])[0].out_channels
        n, _, rows, w = x.shape
        if self.world == 1:
            y = self.new((n, c_out, 2 * rows, 2 * w), "nhwc", f"{_short(self.label)} output")
            self.phase("upsample conv", [x, y] + self._kernel_extras(x, y, self._emit(unit), upsample=True))
            return y
        x_ext, added_top, added_below, kept = self._extend(x, 1, 1, [])
        rows_in = rows + added_top + added_below
        sources = [x] + kept if x_ext is None else [x_ext]
        x_in = x if x_ext is None else x_ext
        out_rows = 2 * rows_in if self.crop_alloc else 2 * rows
        y = self.new((n, c_out, out_rows, 2 * w), "nhwc", f"{_short(self.label)} output, uncropped")
        self.phase("upsample conv", sources + [y] + self._kernel_extras(x_in, y, None, upsample=True))
        if out_rows == 2 * rows:
            return y
        return y.view((n, c_out, 2 * rows, 2 * w), f"{_short(self.label)} output, cropped view")

    def attention(self, unit, x: Buf) -> Buf:
        """The mid-block attention (`vae_attention_block`): qkv = GN + one 1x1 projection (N, T_band, 3 x inner);
        under patch parallelism K and V of the band padded to the tallest band (a copy), all-gathered into
        world tensors and concatenated to (N, T_all, 2 x inner); flash attention of the band's queries
        (N, T_band, inner); the output projection + residual. Every tensor stays alive until the unit returns.

        Raises:
            ValueError: more than one head (the SD VAE has one; heads > 1 add a transpose copy not modelled).
        """
        attn = unit.modules[0]
        inner = attn.to_q.weight.shape[0]
        if int(attn.heads) != 1:
            raise ValueError(f"{unit.name}: {attn.heads} heads; the model covers one head")
        if attn.group_norm is not None:
            self.gn(attn.group_norm.num_groups)
        n, c, rows, w = x.shape
        qkv = self.new((n, 3 * inner, rows, w), "nhwc", "q, k, v of the band")
        self.phase("qkv projection", [x, qkv])
        kv = None
        if self.world > 1:
            if rows != self.heights[self.rank]:
                raise ValueError(f"{unit.name}: attention at {rows} rows, not at the band's base map")
            max_tokens, all_tokens = max(self.heights) * w, sum(self.heights) * w
            self.gather("kv", SIZE_BYTES)
            send = self.new((n, max_tokens, 2 * inner), "tokens", "K, V of the band, padded (send)")
            self.phase("K/V pad", [x, qkv, send])
            parts = [self.new((n, max_tokens, 2 * inner), "tokens", "K, V received") for _ in range(self.world)]
            self.phase("K/V all_gather", [x, qkv, send] + parts)
            self.gather("kv", send.nbytes)
            kv = self.new((n, all_tokens, 2 * inner), "tokens", "K, V of all tokens")
            self.phase("K/V concat", [x, qkv] + parts + [kv])
        out = self.new((n, rows * w, inner), "tokens", "attention output")
        self.phase("attention", [x, qkv, kv, out])
        y = self.new((n, c, rows, w), "nhwc", "out projection + residual")
        extras = self._kernel_extras(Buf(out.shape, "nhwc", "view"), y, self._emit(unit), upsample=False)
        self.phase("out projection", [x, qkv, kv, out, y] + extras)
        return y

    def head(self, unit, x: Buf) -> Buf:
        """conv_norm_out + SiLU + conv_out (with the encoder's quant_conv folded in): one GSC op.

        Raises:
            ValueError: a quant_conv that cannot be folded (not modelled).
        """
        norm, _, conv = unit.modules[:3]
        quant = unit.modules[3] if len(unit.modules) > 3 else None
        if quant is not None and (quant.kernel_size != (1, 1) or quant.padding != (0, 0)):
            raise ValueError(f"{unit.name}: quant_conv is not a plain 1x1 conv (not folded; not modelled)")
        c_out = quant.out_channels if quant is not None else conv.out_channels
        self.gn(norm.num_groups)
        return self.conv("conv_out", x, c_out, conv.kernel_size[0], 1, [conv.padding[0]] * 4, [], None)

    def run_unit(self, unit, x: Buf) -> Buf:
        """Dispatch one unit by kind; returns its output.

        Raises:
            ValueError: a unit that runs its module's own forward (the model covers the fused units only).
        """
        self.label = unit.name
        if unit.reason is not None:
            raise ValueError(f"{unit.name} runs its module's forward ({unit.reason}); not modelled")
        runs = {"Conv2d": self.conv_unit, "ResnetBlock2D": self.resnet, "Downsample2D": self.downsample,
                "Upsample2D": self.upsample, "Attention": self.attention, "head": self.head}
        if unit.kind not in runs:
            raise ValueError(f"{unit.name}: unit kind {unit.kind!r} is not modelled")
        return runs[unit.kind](unit, x)

    def run_stages(self, stages, x: Buf) -> Buf:
        """All stages in order; after each, under patch parallelism, the all_reduce of the flag (one int32). With
        `fp16_guard` each stage's input stays alive during the stage and a 1-byte finiteness mask of its output
        is made at its end."""
        for stage in stages:
            stage_input = x
            if self.fp16_guard:
                self.held.append(stage_input)
            for unit in stage:
                x = self.run_unit(unit, x)
            if self.fp16_guard:
                mask = self.new(x.shape, "nhwc", "isfinite mask", nbytes=x.numel)
                self.phase("fp16 overflow check", [x, mask])
                self.held.remove(stage_input)
            if self.world > 1:
                self.gather("flags", FLAG_BYTES)
        return x

    def finish(self, y: Buf, out_heights: Sequence[int]) -> Buf:
        """The end of the call: the result made contiguous NCHW (label "output"), then under patch parallelism
        the gather of every rank's result band (label "gather": padded to the tallest band when shorter,
        all-gathered into world tensors, concatenated). Returns the NCHW band (what gather=False returns)."""
        self.label = "output"
        band = self.new(y.shape, "nchw", "result, contiguous NCHW")
        self.phase(".contiguous()", [y, band])
        if self.world == 1:
            return band
        self.label = "gather"
        n, c, rows, w = band.shape
        tallest = max(out_heights)
        self.gather("image", SIZE_BYTES)
        send = band
        if rows < tallest:
            send = self.new((n, c, tallest, w), "nchw", "result band, padded (send)")
            self.phase("pad", [band, send])
        parts = [self.new((n, c, tallest, w), "nchw", "result bands received") for _ in range(self.world)]
        self.phase("all_gather", [band, send] + parts)
        self.gather("image", send.nbytes)
        full = self.new((n, c, sum(out_heights), w), "nchw", "whole result")
        self.phase("concat", [band] + parts + [full])
        return band


# ---------------------------------------------------------------------------------------------------------------
# Decode and encode of one rank
# ---------------------------------------------------------------------------------------------------------------


def model_decode(vae, latent_rows: int, latent_cols: int, world: int, rank: int, *, batch: int = 1,
                 **options) -> RankModel:
    """The symbolic patch-parallel decode of rank `rank` of `world` (world 1: the single-device fast path).

    Args:
        vae: a VAE with diffusers' AutoencoderKL structure (weights may be on the meta device).
        latent_rows, latent_cols: the latents' h and w; batch: N.
        options: `RankModel` options (gpu, halo_layout, halo_copy, crop_alloc, fp16_guard, emit_stats).
    Returns:
        the RankModel after the run (its `peaks`, `largest`, `comm`).
    Raises:
        ValueError: more ranks than latent rows, or a unit the model does not cover.
    """
    from sdvae_fast.fast.units import decoder_units

    post_quant_conv = getattr(vae, "post_quant_conv", None)
    stages = decoder_units(vae.decoder, post_quant_conv)
    heights = band_heights(latent_rows, world)
    model = RankModel(world, rank, heights, batch=batch, **options)
    channels = (post_quant_conv if post_quant_conv is not None else vae.decoder.conv_in).in_channels
    z = Buf((batch, channels, latent_rows, latent_cols), "nchw", "input latents (whole)")
    model.held.append(z)
    band = z
    if world > 1:
        band = model.new((batch, channels, heights[rank], latent_cols), "nchw", "band of the latents")
        model.phase("band copy", [band])
        model.held.append(band)
    y = model.run_stages(stages, band)
    if world > 1:
        model.held.remove(band)
    factor = y.shape[2] // heights[rank]
    model.finish(y, [h * factor for h in heights])
    return model


def model_encode(vae, image_rows: int, image_cols: int, world: int, rank: int, *, batch: int = 1,
                 **options) -> RankModel:
    """The symbolic patch-parallel encode (to the posterior's moments) of rank `rank` of `world`.

    Bands are rows of the deepest encoder map (image rows // F, F = 2 ** (levels - 1)); rank r encodes F x its
    band of image rows, the last rank also the remainder rows. Args, returns and raises as `model_decode`.
    """
    from sdvae_fast.fast.units import encoder_units

    quant_conv = getattr(vae, "quant_conv", None)
    stages = encoder_units(vae.encoder, quant_conv)
    factor = 2 ** (len(vae.encoder.down_blocks) - 1)
    deep = image_rows // factor
    heights = band_heights(deep, world)
    model = RankModel(world, rank, heights, batch=batch, **options)
    channels = vae.encoder.conv_in.in_channels
    x = Buf((batch, channels, image_rows, image_cols), "nchw", "input images (whole)")
    model.held.append(x)
    band = x
    if world > 1:
        rows = heights[rank] * factor + (image_rows - deep * factor if rank == world - 1 else 0)
        band = model.new((batch, channels, rows, image_cols), "nchw", "band of the images")
        model.phase("band copy", [band])
        model.held.append(band)
    y = model.run_stages(stages, band)
    if world > 1:
        model.held.remove(band)
    model.finish(y, heights)
    return model


def analyse(direction: str, vae, size: int, world: int, **options) -> dict:
    """Every rank of one (direction, square image size, world) case.

    Args:
        direction: "decode" or "encode"; vae: as `model_decode`; size: the image's side in pixels;
        world: the world size; options: `RankModel` options.
    Returns:
        dict with rows (the base map's tallest band), peak / peak_nogather (bytes, the largest over the ranks,
        with and without the final gather), gather_phase (bytes at the fullest point of the gather, 0 for world
        1), attention (bytes at the attention unit's fullest point), where (rank, label, step, live tensors of
        the peak), comm (kind -> [sent, received] bytes per rank, the same on every rank).
    Raises:
        ValueError: direction not "decode"/"encode"; as `model_decode`.
        AssertionError: two ranks communicate different volumes (all_gather volumes cannot depend on the rank).
    """
    if direction not in ("decode", "encode"):
        raise ValueError(f"direction must be 'decode' or 'encode', got {direction!r}")
    factor = 2 ** (len(vae.encoder.down_blocks) - 1)
    latent = size // factor
    peak = nogather = gather_phase = attention = 0
    where, comm = None, None
    for rank in range(world):
        if direction == "decode":
            model = model_decode(vae, latent, latent, world, rank, **options)
        else:
            model = model_encode(vae, size, size, world, rank, **options)
        total, label, step, bufs = model.peak(gather=True)
        if total > peak:
            peak, where = total, (rank, label, step, bufs)
        nogather = max(nogather, model.peak(gather=False)[0])
        gather_phase = max(gather_phase, model.peaks.get("gather", (0,))[0])
        attention = max([attention] + [v[0] for k, v in model.peaks.items() if ".attentions." in k])
        if comm is None:
            comm = model.comm
        elif comm != model.comm:
            raise AssertionError(f"rank {rank} communicates {model.comm}, rank 0 {comm}")
    return {"rows": max(band_heights(latent, world)), "peak": peak, "peak_nogather": nogather,
            "gather_phase": gather_phase, "attention": attention, "where": where, "comm": comm}


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def _mib(nbytes: float) -> str:
    """Bytes as MiB, with fewer decimals the larger the number (2 significant digits below 1 MiB)."""
    value = nbytes / MIB
    if value == 0:
        return "0"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.1f}"
    return f"{value:.2g}"


def _gib(nbytes: float) -> str:
    """Bytes as GiB with 2 decimals."""
    return f"{nbytes / GIB:.2f}"


def _short(label: str) -> str:
    """A unit name shortened for tables: decoder.up_blocks.3.resnets.0 -> up3.res0."""
    for old, new in (("decoder.", ""), ("encoder.", ""), ("up_blocks.", "up"), ("down_blocks.", "down"),
                     ("resnets.", "res"), ("attentions.", "attn"), ("upsamplers.0", "upsample"),
                     ("downsamplers.0", "downsample"), ("mid_block", "mid")):
        label = label.replace(old, new)
    return label


def _storage_bytes(buf: Buf) -> int:
    """A tensor's storage bytes (a sort key)."""
    return buf.nbytes


def _printer(out) -> Callable[..., None]:
    """A function printing one line (default empty) to `out`."""
    def write(line: str = "") -> None:
        """Print `line` to the stream."""
        print(line, file=out)
    return write


def _received(result: dict) -> int:
    """Bytes received per rank, all kinds, of an `analyse` result."""
    return sum(v[1] for v in result["comm"].values())


def _describe(bufs: Sequence[Buf]) -> str:
    """The tensors alive at a peak, largest first: 'what (C x H x W) GiB' (views merged into their owner;
    tensors under 5 MiB left out)."""
    parts = []
    for buf in sorted(bufs, key=_storage_bytes, reverse=True):
        if buf.nbytes < 0.005 * GIB:
            continue
        shape = f" ({' x '.join(str(s) for s in buf.shape[1:])})" if len(buf.shape) > 2 else ""
        parts.append(f"{buf.what}{shape} {_gib(buf.nbytes)}")
    return "; ".join(parts)


def build_vae(preset: str = "sd15"):
    """The preset's VAE on the meta device (no weights, no memory): `sdvae_fast.StandaloneAutoencoderKL`."""
    from sdvae_fast import StandaloneAutoencoderKL

    with torch.device("meta"):
        return StandaloneAutoencoderKL.from_config(preset)


KIND_NAMES = {"halo": "the halo rows", "gn": "the GroupNorm partials", "kv": "the attention's K and V",
              "image": "the final gather of the result", "flags": "the stage flags"}


def report(sizes: Sequence[int] = IMAGE_SIZES, worlds: Sequence[int] = WORLDS, out=sys.stdout) -> None:
    """Print the markdown tables and notes for decode and encode of the SD kl-f8 VAE, batch 1, bf16.

    `worlds` must start with 1 (the baseline the ratios refer to). Raises ValueError otherwise."""
    if not worlds or worlds[0] != 1:
        raise ValueError(f"worlds must start with 1, got {list(worlds)}")
    vae = build_vae("sd15")
    weights = {
        "decode": sum(p.numel() for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters()) * ITEMSIZE,
        "encode": sum(p.numel() for m in (vae.encoder, vae.quant_conv) for p in m.parameters()) * ITEMSIZE,
    }
    write = _printer(out)
    write("Computed from the schedule, not measured (tools/pp_memory.py). SD kl-f8 VAE (block_out_channels "
          "128/256/512/512, layers_per_block 2, 32 groups, 4 latent channels), batch 1, bf16 activations, "
          "GroupNorm partials fp32. Peak = activation bytes alive on one rank at its fullest point, the largest "
          "over the ranks, including the input every rank holds and the conv kernels' own copies and scratch; "
          f"weights excluded (decoder {weights['decode'] / 1e6:.0f} MB + encoder {weights['encode'] / 1e6:.0f} MB "
          f"= {(weights['decode'] + weights['encode']) / MIB:.0f} MiB in bf16, plus the packed copies the conv "
          "kernels cache, about as much again). GiB = 2^30 bytes, MiB = 2^20 bytes. Received counts all_gather "
          "semantics: every rank's part, this rank's own included.")
    for direction in ("decode", "encode"):
        results = {(s, w): analyse(direction, vae, s, w) for s in sizes for w in worlds}
        variants = {(s, w): {
            "nchw": analyse(direction, vae, s, w, halo_layout="nchw")["peak"],
            "nocopy": analyse(direction, vae, s, w, halo_copy=False)["peak"],
            "nocrop": analyse(direction, vae, s, w, halo_copy=False, crop_alloc=False)["peak"],
            "fp16": analyse(direction, vae, s, w, fp16_guard=True)["peak"],
        } for s in sizes for w in worlds}
        both = any(r["peak"] != r["peak_nogather"] for r in results.values())
        base = "latent" if direction == "decode" else "deepest-map"
        peak_cols = "peak GiB, gather=False | peak GiB, gather=True" if both else "peak GiB (either gather)"
        write()
        write(f"### Patch-parallel {direction.upper()}, per rank")
        write()
        write(f"| image | ranks | {base} rows / band | {peak_cols} | vs 1 rank | received MiB | received by kind: "
              f"halo / GN / K,V / result / flags, MiB | sent MiB |")
        write("|---|---|---|---|" + ("---|" if both else "") + "---|---|---|---|")
        for s in sizes:
            single = results[(s, 1)]["peak"]
            for w in worlds:
                r = results[(s, w)]
                comm = r["comm"]
                received = sum(v[1] for v in comm.values())
                sent = sum(v[0] for v in comm.values())
                kinds = " / ".join(_mib(comm[k][1]) for k in KINDS) if w > 1 else "-"
                peaks = f"{_gib(r['peak_nogather'])} | {_gib(r['peak'])}" if both else _gib(r["peak"])
                write(f"| {s}^2 | {w} | {r['rows']} | {peaks} | {r['peak'] / single:.3f} | "
                      f"{_mib(received) if w > 1 else '-'} | {kinds} | {_mib(sent) if w > 1 else '-'} |")
        write()
        s = sizes[-1]
        write(f"Where the peak is ({direction} of {s}^2: rank, unit, step: the tensors alive, GiB):")
        for w in worlds:
            rank, label, step, bufs = results[(s, w)]["where"]
            write(f"- {w} rank{'s' if w > 1 else ''}: rank {rank}, {label}, {step}: {_describe(bufs)}")
        write()
        write(f"Variants ({direction}), peak GiB per rank: the code as it is (the table above: halo rows and x_ext "
              "channels_last); without the x_ext copy (a conv reading the halo rows from the received tensors) and "
              "what that saves; also without the upsample's cropped rows; fp16 with the overflow guard (each "
              "stage's input kept, a 1-byte finiteness mask per stage).")
        write()
        write("| image | ranks | as coded | no x_ext copy (saves) | + no crop rows (saves) | fp16 |")
        write("|---|---|---|---|---|---|")
        for s in sizes:
            for w in worlds:
                coded, v = results[(s, w)]["peak"], variants[(s, w)]
                saved, crop = coded - v["nocopy"], v["nocopy"] - v["nocrop"]
                write(f"| {s}^2 | {w} | {_gib(coded)} | {_gib(v['nocopy'])} "
                      f"({_gib(saved)}, {100 * saved / coded:.0f}%) | {_gib(v['nocrop'])} ({_gib(crop)}) | "
                      f"{_gib(v['fp16'])} |")
        _notes(direction, results, variants, sizes, worlds, both, write)
    flux = build_vae("flux1")
    s, w = sizes[-1], worlds[-1]
    sd, fl = analyse("decode", vae, s, w), analyse("decode", flux, s, w)
    write()
    write(f"FLUX.1 (16 latent channels, no quant convs) changes only conv_in's input (and drops post_quant_conv): "
          f"decode of {s}^2 on {w} ranks peaks {(fl['peak'] - sd['peak']) / MIB:+.1f} MiB from SD's and receives "
          f"{(_received(fl) - _received(sd)) / MIB:+.1f} MiB (the 16-channel latents every rank holds, conv_in's "
          f"halo rows).")


def _notes(direction: str, results: dict, variants: dict, sizes, worlds, both: bool, write) -> None:
    """Print the findings under a direction's tables: what dominates memory and traffic, what the halo copy and
    the former NCHW halo layout cost, what the gather and the attention hold."""
    s, wmax = sizes[-1], worlds[-1]
    r1, rw = results[(s, 1)], results[(s, wmax)]
    comm = rw["comm"]
    received = sum(v[1] for v in comm.values())
    by_kind = {kind: comm[kind][1] for kind in KINDS}
    top = max(by_kind, key=by_kind.get)
    excess = ", ".join(f"{results[(s, w)]['peak'] / r1['peak'] * w:.2f} on {w}" for w in worlds[1:])
    write()
    write(f"Notes ({direction}):")
    write(f"- Memory: per rank the peak is (x / world) of one device's with x = {excess} ranks ({s}^2). The "
          f"excess over 1/world is mostly the x_ext copy at the peak unit (one device has none); the halo rows, "
          f"the input every rank holds whole and the attention's K and V of all tokens do not shrink with the "
          f"world size.")
    saved = [(w, results[(s, w)]["peak"] - variants[(s, w)]["nocopy"]) for w in worlds[1:]]
    write(f"- The x_ext copy (band + halo rows, a second copy of the convolved activation) costs "
          + ", ".join(f"{_gib(b)} GiB on {w} ranks ({100 * b / results[(s, w)]['peak']:.0f}%)" for w, b in saved)
          + f" at {s}^2. A conv kernel that reads its first and last input row from the received edge tensors "
          f"(a second input pointer) instead of a concatenated copy would save exactly that.")
    nchw = variants[(s, wmax)]["nchw"]
    write(f"- The halo rows stay channels_last: `RowParallelHooks._all_gather` keeps a channels_last tensor "
          f"channels_last, so the received rows and x_ext are channels_last and no halo conv's kernel copies its "
          f"input (`--check` finds this layout in the code). The NCHW halo rows of the code before commit "
          f"63b7381 (`.contiguous()`) cost one more copy per halo conv: {_gib(nchw)} instead of "
          f"{_gib(rw['peak'])} GiB at {s}^2 on {wmax} ranks.")
    if direction == "decode":
        crop = variants[(s, wmax)]["nocopy"] - variants[(s, wmax)]["nocrop"]
        write(f"- The upsample's uncropped rows (2 output rows per halo row, kept alive by the cropped view until "
              f"the next resnet is done with its input) cost {_gib(crop)} GiB at {s}^2 on {wmax} ranks: "
              f"negligible.")
    if not both:
        write(f"- gather=True never sets the peak: the gather's fullest point (the result band, every rank's "
              f"band received, the whole result) is {_gib(rw['gather_phase'])} GiB at {s}^2 on {wmax} ranks, "
              f"after the units have freed their activations; gather=False and gather=True peak alike.")
    write(f"- The attention at {s}^2 on {wmax} ranks holds {_gib(rw['attention'])} GiB at its fullest point "
          f"(one device: {_gib(r1['attention'])}): K and V of all {(s // 8) ** 2} tokens are "
          f"{_gib((s // 8) ** 2 * 1024 * ITEMSIZE)} GiB on every rank, twice while the received parts are "
          f"concatenated; gathering into one preallocated tensor (all_gather_into_tensor, usable in place when "
          f"bands are equal) would drop the second copy.")
    write(f"- Traffic: {_mib(received)} MiB received per rank at {s}^2 on {wmax} ranks, "
          f"{100 * comm[top][1] / received:.0f}% of it {KIND_NAMES[top]}; the halo rows "
          f"{100 * comm['halo'][1] / received:.0f}%, the GroupNorm partials {comm['gn'][1] / 1024:.0f} KiB and the "
          f"flags {comm['flags'][1]} bytes (one int32 per stage and rank). K and V of "
          f"all tokens reach every rank whatever the world size. The halo bytes grow with the world size because "
          f"all_gather brings every rank's edge rows although a rank needs its two neighbours': point-to-point "
          f"exchange would receive 2/world of them.")


# ---------------------------------------------------------------------------------------------------------------
# --check: the model against the real units, in one process on the CPU
# ---------------------------------------------------------------------------------------------------------------


class _LiveTracker(TorchDispatchMode):
    """Follows every activation tensor (the model's dtype, 3 or more dimensions) that an op returns, by its
    storage, with weak references: a storage is alive while a Python tensor on it is. After each op that returns
    one it records, per label (the running unit), the bytes alive (`peaks`) and the same plus what the CUDA conv
    kernel would allocate inside that op (`gpu_peaks`: a channels_last copy of an input with stride(1) != 1, the
    emitted-statistics scratch), the largest new allocation (`largest`) and the inputs of conv ops that are not
    channels_last (`nchw_inputs`). The fused ops are custom ops, so their CPU reference internals stay hidden,
    as a kernel's would."""

    CONV_OPS = ("sdvae_fast::gn_silu_conv2d", "sdvae_fast::gn_silu_conv2d_stats",
                "sdvae_fast::gn_silu_conv2d_partials", "sdvae_fast::upsample_conv2d",
                "sdvae_fast::upsample_conv2d_stats", "sdvae_fast::upsample_conv2d_partials")

    def __init__(self, dtype: torch.dtype):
        """dtype: the activations' dtype (tensors of other dtypes are not followed)."""
        super().__init__()
        self.dtype = dtype
        self.entries: Dict[int, list] = {}
        self.label = "input"
        self.peaks: Dict[str, int] = {}
        self.gpu_peaks: Dict[str, int] = {}
        self.largest: Dict[str, Tuple[int, tuple]] = {}
        self.nchw_inputs: List[Tuple[str, tuple]] = []

    def _is_activation(self, t) -> bool:
        """Whether t is followed: a tensor in the activation dtype with >= 3 dimensions and elements."""
        return isinstance(t, torch.Tensor) and t.dtype == self.dtype and t.dim() >= 3 and t.numel() > 0

    def register(self, t: torch.Tensor) -> bool:
        """Follow t's storage; True when it is a new allocation (not a view of a live storage)."""
        storage = t.untyped_storage()
        key = storage.data_ptr()
        entry = self.entries.get(key)
        if entry is not None and self._alive(entry):
            entry[1][id(t)] = weakref.ref(t)
            return False
        self.entries[key] = [storage.nbytes(), {id(t): weakref.ref(t)}]
        return True

    @staticmethod
    def _alive(entry: list) -> bool:
        """Whether a Python tensor on the entry's storage is still alive (weak references, compared by identity:
        a WeakSet would compare tensors with ==)."""
        return any(ref() is not None for ref in entry[1].values())

    def live_bytes(self) -> int:
        """Bytes of the storages a live tensor still refers to."""
        return sum(entry[0] for entry in self.entries.values() if self._alive(entry))

    def _kernel_extra(self, func, args, out) -> int:
        """Bytes a CUDA conv kernel would allocate inside this op (0 for other ops)."""
        name = func._schema.name
        if name not in self.CONV_OPS:
            return 0
        x = args[0]
        y = out[0] if isinstance(out, (tuple, list)) else out
        extra = 0
        if x.stride(1) != 1:
            extra += x.numel() * x.element_size()
            self.nchw_inputs.append((self.label, tuple(x.shape)))
        if name.endswith(("_stats", "_partials")):
            upsample = "upsample" in name
            groups = int(args[3] if upsample else args[9])
            c_out = y.shape[1]
            run = STATS_RUN_SIZE(c_out // groups)
            pixels = x.shape[2] * x.shape[3] if upsample else y.shape[2] * y.shape[3]
            tiles = -(-pixels // MIN_BLOCK_M) * (4 if upsample else 1)
            extra += y.shape[0] * (c_out // run) * tiles * 3 * FP32
        return extra

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """Run the op, follow its activation outputs, update the current label's records."""
        out = func(*args, **(kwargs or {}))
        leaves = [t for t in tree_leaves(out) if self._is_activation(t)]
        if leaves:
            fresh = [t for t in leaves if self.register(t)]
            live = self.live_bytes()
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), live)
            gpu = live + self._kernel_extra(func, args, out)
            self.gpu_peaks[self.label] = max(self.gpu_peaks.get(self.label, 0), gpu)
            for t in fresh:
                nbytes = t.untyped_storage().nbytes()
                if nbytes > self.largest.get(self.label, (0, ()))[0]:
                    self.largest[self.label] = (nbytes, tuple(t.shape))
        return out


@contextlib.contextmanager
def _labelled_units(tracker: _LiveTracker):
    """Have every `Unit` call set the tracker's label to the unit's name ("output" after it returns), by
    wrapping `Unit.__call__` for the duration (restored after)."""
    from sdvae_fast.fast.units import Unit

    original = Unit.__call__

    def call(self, carry, ctx):
        """`Unit.__call__` with the tracker's label set to the unit's name while it runs."""
        tracker.label = self.name
        try:
            return original(self, carry, ctx)
        finally:
            tracker.label = "output"

    Unit.__call__ = call
    try:
        yield
    finally:
        Unit.__call__ = original


class _DoneWork:
    """The work handle of a collective that completed when it was called (`is_completed`, `wait`)."""

    def is_completed(self) -> bool:
        """Always True."""
        return True

    def wait(self, timeout=None) -> bool:
        """Nothing to wait for."""
        return True


def _simulated_hooks(rank: int, world: int, heights: Sequence[int]):
    """`sdvae_fast.parallel.RowParallelHooks` of rank `rank` of `world` without a process group: every method of
    the real class runs unchanged (`_all_gather`, `_sizes`, `_halo`, `_extend`, `conv_input`, `upsample_input`,
    `merge_stats`, `gather_tokens`, `end_stage`, `gather_rows`, so their allocations and memory formats are the
    real ones); the subclass only names the kind of traffic each hook makes (`kind`) and holds the counters
    (`comm`) that `_simulated_transport` fills. Use the hooks inside `_simulated_transport(hooks, heights)`.

    Raises:
        RuntimeError: `RowParallelHooks` lacks those methods (a version before the K/V gather of issue 12).
    """
    from sdvae_fast import parallel

    base = parallel.RowParallelHooks
    needed = ("_all_gather", "_sizes", "_halo", "_extend", "conv_input", "upsample_input", "merge_stats",
              "gather_tokens", "gather_rows", "end_stage")
    missing = [name for name in needed if not hasattr(base, name)]
    if missing:
        raise RuntimeError(f"--check needs sdvae_fast.parallel.RowParallelHooks with {missing} (the K/V design)")

    class SimulatedRowHooks(base):
        """RowParallelHooks in one process (see `_simulated_hooks`)."""

        def __init__(self):
            """No process group, no error store: the rank, world size and traffic counters of the simulation."""
            self.group, self.what, self.rank, self.world_size = None, "simulated", rank, world
            self._store, self._key, self.kind = None, "simulated", "halo"
            self.comm = {kind: [0, 0] for kind in KINDS}

        def count(self, t: torch.Tensor) -> None:
            """One collective of t on this rank, all_gather semantics: sent once, received world times."""
            nbytes = t.numel() * t.element_size()
            self.comm[self.kind][0] += nbytes
            self.comm[self.kind][1] += self.world_size * nbytes

        def conv_input(self, *args, **kwargs):
            """The real halo exchange, counted as halo traffic."""
            self.kind = "halo"
            return super().conv_input(*args, **kwargs)

        def upsample_input(self, *args, **kwargs):
            """The real upsample halo, counted as halo traffic."""
            self.kind = "halo"
            return super().upsample_input(*args, **kwargs)

        def merge_stats(self, *args, **kwargs):
            """The real GroupNorm merge, counted as GN traffic."""
            self.kind = "gn"
            return super().merge_stats(*args, **kwargs)

        def gather_tokens(self, *args, **kwargs):
            """The real K/V gather (its band-size exchange included), counted as K/V traffic."""
            self.kind = "kv"
            return super().gather_tokens(*args, **kwargs)

        def gather_rows(self, *args, **kwargs):
            """The real result gather (its band-size exchange included), counted as result traffic."""
            self.kind = "image"
            return super().gather_rows(*args, **kwargs)

        def end_stage(self, *args, **kwargs):
            """The real stage-end all_reduce of the flag, counted as flag traffic."""
            self.kind = "flags"
            return super().end_stage(*args, **kwargs)

    return SimulatedRowHooks()


@contextlib.contextmanager
def _simulated_transport(hooks, heights: Sequence[int]):
    """Replace `torch.distributed` as `sdvae_fast.parallel` sees it (its module attribute `dist`) for the duration
    (restored after) by a proxy whose `all_gather(out, t)` fills the world `out` tensors the caller allocated
    with copies of this rank's t (the shapes and allocations of an all_gather, not its values) and whose
    `all_reduce(t)` leaves t as it is (this rank's own flag: every band finite); both count t's bytes with
    `hooks.count` and return a completed work handle. A band size (a one-element int64, `_sizes`) comes back as
    every rank's own: this rank's value scaled by the band heights (`heights`, at the base map). Every other
    attribute is torch.distributed's."""
    from sdvae_fast import parallel

    real = parallel.dist

    class Transport:
        """torch.distributed with all_gather and all_reduce simulated (see `_simulated_transport`)."""

        def __getattr__(self, name):
            """torch.distributed's own attribute."""
            return getattr(real, name)

        @staticmethod
        def all_gather(out, t, group=None, async_op=False):
            """World copies of t into `out` (a band size: every rank's own)."""
            if len(out) != hooks.world_size or any(o.shape != t.shape for o in out):
                raise RuntimeError(f"all_gather of {tuple(t.shape)} into {[tuple(o.shape) for o in out]}")
            for r, o in enumerate(out):
                if t.dtype == torch.int64 and t.numel() == 1:
                    o.fill_(int(t) // heights[hooks.rank] * heights[r])
                else:
                    o.copy_(t)
            hooks.count(t)
            return _DoneWork() if async_op else None

        @staticmethod
        def all_reduce(t, op=None, group=None, async_op=False):
            """t unchanged (every rank's value taken to be this rank's)."""
            hooks.count(t)
            return _DoneWork() if async_op else None

    parallel.dist = Transport()
    try:
        yield
    finally:
        parallel.dist = real


def _measure(vae, direction: str, x: torch.Tensor, world: int, rank: int) -> Tuple[_LiveTracker, dict]:
    """Run one rank for real on the CPU under a `_LiveTracker`: world 1 through `decode_sample` /
    `encode_moments`; world > 1 as `sdvae_fast.parallel._run_band` does (the band made contiguous, the stages
    with `RowParallelHooks`, the result made contiguous and gathered), with `_simulated_hooks` and
    `_simulated_transport`. Returns the tracker and the hooks' traffic by kind (empty for world 1)."""
    from sdvae_fast import fast
    from sdvae_fast.fast.units import RunContext

    tracker = _LiveTracker(x.dtype)
    comm: dict = {}
    with torch.no_grad(), _labelled_units(tracker), tracker:
        tracker.register(x)
        if world == 1:
            (fast.decode_sample if direction == "decode" else fast.encode_moments)(vae, x)
        else:
            factor = 2 ** (len(vae.encoder.down_blocks) - 1)
            base_rows = x.shape[2] if direction == "decode" else x.shape[2] // factor
            start, end = _band(base_rows, world, rank)
            if direction == "decode":
                stages = fast.decoder_units(vae.decoder, vae.post_quant_conv)
                band = x[:, :, start:end]
            else:
                stop = x.shape[2] if rank == world - 1 else end * factor
                stages = fast.encoder_units(vae.encoder, vae.quant_conv)
                band = x[:, :, start * factor:stop]
            heights = band_heights(base_rows, world)
            hooks = _simulated_hooks(rank, world, heights)
            ctx = RunContext(emit_stats=fast.EMIT_GN_STATS, parallel=hooks)
            with _simulated_transport(hooks, heights):
                tracker.label = "input"
                y = fast.run_stages(stages, band.contiguous(), ctx)
                tracker.label = "output"
                y = y.contiguous()
                tracker.label = "gather"
                hooks.gather_rows(y)
            comm = hooks.comm
    return tracker, comm


def _band(rows: int, world: int, rank: int) -> Tuple[int, int]:
    """[start, end) of rank's band of `rows` rows (`band_heights`)."""
    heights = band_heights(rows, world)
    start = sum(heights[:rank])
    return start, start + heights[rank]


def _mark(bad: Sequence[str]) -> str:
    """A check cell: "match", or "DIFFER: " and what differs."""
    return "match" if not bad else "DIFFER: " + ", ".join(bad)


def check(out=sys.stdout) -> bool:
    """Compare the model with the real units on a tiny kl-f8 VAE (widths 16/32/64/64, 8 groups, 2 resnets per
    level, random weights, bf16) run on the CPU in one process: for every rank of each case, per unit, the peak
    bytes of live activations (as the CPU allocates them, and with the CUDA kernels' internal copies and scratch
    added from each conv op's actual inputs), the element count of the largest tensor allocated, and the bytes
    sent and received per kind. Prints a table; returns True when everything matches exactly."""
    from sdvae_fast import StandaloneAutoencoderKL

    write = _printer(out)
    torch.manual_seed(0)
    vae = StandaloneAutoencoderKL.from_preset("sd15", block_out_channels=(16, 32, 64, 64), norm_num_groups=8,
                                              dtype=torch.bfloat16)
    cases = [("decode", (1, 4, 7, 6), w) for w in (1, 2, 3)] + [("decode", (1, 4, 8, 6), 2)]
    cases += [("encode", (1, 3, 60, 48), w) for w in (1, 2, 3)] + [("encode", (1, 3, 64, 48), 2)]
    # Warm-up: the derived weights (fused QKV, out projection, folded quant_conv) are cached on the first call.
    for direction, shape, world in cases[:1] + cases[4:5]:
        _measure(vae, direction, torch.randn(shape, dtype=torch.bfloat16), 1, 0)
    write("Check: the model against the real units (tiny kl-f8 VAE: widths 16/32/64/64, 8 groups, 2 resnets per "
          "level, bf16, CPU reference ops, one process; world > 1 runs each rank with the real RowParallelHooks, "
          "whose torch.distributed all_gather returns world copies of the rank's own tensor and whose all_reduce "
          "returns the rank's own flag).")
    write()
    write("| case | ranks | rank | units | peak per unit, CPU | peak per unit, + CUDA kernel copies/scratch | "
          "largest tensor per unit | traffic by kind | halo layout |")
    write("|---|---|---|---|---|---|---|---|---|")
    ok = True
    example = None
    for direction, shape, world in cases:
        x = torch.randn(shape, dtype=torch.bfloat16)
        rows, cols = shape[2], shape[3]
        for rank in range(world):
            tracker, comm = _measure(vae, direction, x, world, rank)
            build = model_decode if direction == "decode" else model_encode
            layouts = {}
            for layout in ("nchw", "nhwc"):
                cpu = build(vae, rows, cols, world, rank, gpu=False, halo_layout=layout)
                gpu = build(vae, rows, cols, world, rank, gpu=True, halo_layout=layout)
                layouts[layout] = (cpu, gpu)
            # The code's halo layout: the variant whose CUDA-equivalent peaks match (identical at world 1); when
            # neither does, the rows are compared with the channels_last one (the code's since 63b7381).
            found = next((name for name, (_, g) in layouts.items()
                          if {k: v[0] for k, v in g.peaks.items()} == tracker.gpu_peaks), None)
            layout = found or "nhwc"
            cpu, gpu = layouts[layout]
            labels = sorted(set(cpu.peaks) | set(tracker.peaks))
            bad_cpu = [lb for lb in labels if cpu.peaks.get(lb, (0,))[0] != tracker.peaks.get(lb, 0)]
            bad_gpu = [lb for lb in labels if gpu.peaks.get(lb, (0,))[0] != tracker.gpu_peaks.get(lb, 0)]
            bad_big = [lb for lb in labels if (cpu.largest[lb].numel if lb in cpu.largest else 0)
                       != math.prod(tracker.largest.get(lb, (0, (0,)))[1])]
            bad_comm = [k for k in KINDS if world > 1 and cpu.comm[k] != comm[k]]
            units = sum(1 for lb in labels if lb not in ("input", "output", "gather"))
            good = not (bad_cpu or bad_gpu or bad_big or bad_comm)
            ok = ok and good
            halo = "-" if world == 1 else {"nchw": "NCHW", "nhwc": "channels_last", None: "neither"}[found]
            write(f"| {direction} {tuple(shape)} | {world} | {rank} | {units} | {_mark(bad_cpu)} | {_mark(bad_gpu)} "
                  f"| {_mark(bad_big)} | {_mark(bad_comm) if world > 1 else '-'} | {halo} |")
            if direction == "decode" and world == 3 and rank == 1:
                example = (cpu, gpu, tracker)
    if example is not None:
        cpu, gpu, tracker = example
        write()
        write("Decode (1, 4, 7, 6) on 3 ranks, rank 1 (a middle band), the five units with the largest peaks "
              "(bytes):")
        write()
        write("| unit | step at the peak | model, CPU | measured, CPU | model, + kernel copies | measured, + kernel "
              "copies | largest tensor (model / measured) |")
        write("|---|---|---|---|---|---|---|")
        gpu_peaks = {label: gpu.peaks[label][0] for label in cpu.peaks}
        top = sorted(gpu_peaks, key=gpu_peaks.get, reverse=True)[:5]
        for lb in top:
            shape = tracker.largest.get(lb, (0, ()))[1]
            write(f"| {lb} | {gpu.peaks[lb][1]} | {cpu.peaks[lb][0]} | {tracker.peaks.get(lb)} | "
                  f"{gpu.peaks[lb][0]} | {tracker.gpu_peaks.get(lb)} | {cpu.largest[lb].shape} / {shape} |")
        copies = sorted({s for _, s in tracker.nchw_inputs})
        write()
        write(f"Conv inputs that are not channels_last in that run (a CUDA kernel copies each): "
              f"{len(tracker.nchw_inputs)} convs, shapes {copies}.")
    write()
    write("All match." if ok else "MISMATCHES: see the rows marked DIFFER.")
    return ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: the report, or `--check`. Returns the exit status (1 when the check fails)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare the model with the real units (CPU)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(IMAGE_SIZES), help="square image sizes")
    parser.add_argument("--worlds", type=int, nargs="+", default=list(WORLDS), help="world sizes (1 first)")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if check() else 1
    if args.worlds[0] != 1:
        parser.error("--worlds must start with 1 (the single-device baseline)")
    report(args.sizes, args.worlds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
