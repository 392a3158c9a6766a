"""`sdvae-fast parity`: the fast path against the fp32 PyTorch reference, unit by unit and end to end.

The VAE is cut into *units*, the pieces the fast path fuses: `conv_in`, every ResnetBlock2D, every Downsample2D
and Upsample2D, the mid-block attention, the output head (GroupNorm -> SiLU -> conv_out) and the quant convs.
Names are diffusers' module paths (`decoder.up_blocks.1.resnets.2`), so the same code serves our
`AutoencoderKL` and a diffusers one. A consistency decoder (`ConsistencyDecoderVAE`, issue 13) adds its decoder
UNet's units (`units.unet_units`: `decoder_unet.conv_in`, every scale/shift ResnetBlock2D, the head
`decoder_unet.conv_out*`); each runs once per decode step, so its rows carry the call number (`[call 2]`), and
the time embedding each resnet received is handed to its unit. Every decode of a consistency decoder draws its
noise from a generator seeded with 0 (`decode_kwargs`), so all decodes compared see the same noise.

A VQ model (`sdvae_fast.VQModel`: VQ-f4 / VQ-f8, MoVQ; issue 14) has the same units, plus the attention inside
its attention levels (`encoder.down_blocks.3.attentions.0`, `decoder.up_blocks.0.attentions.1`). Its encoder's
latents are the unquantised `encode(x).latents` (an AutoencoderKL's are `encode(x).latent_dist.mean`;
`encoder_latents` owns that choice). MoVQ (`norm_type="spatial"`): every SpatialNorm-conditioned unit
(ResnetBlockCondNorm2D, attention with `spatial_norm`, the SpatialNorm head) runs its module's own forward on the
fast path too (listed in `report.unsupported`); it is still compared teacher-forced, handed the quantised latents
its module received in the reference run (`RunContext.latents` on the fast path, the module's own argument on the
PyTorch one), so the rows check that the fallback runs in the tested dtype as PyTorch does.

The quantiser (VQ only) gets a row of its own, first in the decode table: the tested path's quantiser (the
`ops.vector_quantize` kernel on the fast path, diffusers' cdist + argmin otherwise) on the reference's latents in
the tested dtype, `quantize: z_q`, against the reference's z_q. A code (index) may legitimately differ where the
two best codebook distances are within the tested dtype's rounding of each other (a near tie): such a position's
z_q differs by a whole codebook step, which says nothing about the arithmetic. So the z_q error is taken over the
positions whose code equals the reference's (each path its own), and the codes are checked apart: the row also
gives the fraction of codes equal to the reference's (and PyTorch's fraction in the same dtype), and fails when a
differing code is not a near tie (`near_tie_margin`: its excess squared distance, in fp64 on the reference's
fp32 latents and codebook, exceeds what rounding the latents and codebook to the tested dtype and an fp32
distance computation can change it by, times 2).

The VQ decode end to end (`decode: sample` and the `decode` image check) decodes the reference's quantised
latents with `force_not_quantize=True` (for `lookup_from_codebook` models: the reference's codes, looked up in
each model's own codebook; `decode_quantized`), in the reference run that records the decoder's units too. A
code that flips in low precision (a near tie, legitimate) moves a whole latent pixel by a codebook step and would
dominate the image comparison, hiding the decoder's arithmetic that this row is there to check; the quantiser
row checks the codes. The encode image check still decodes the tested latents with the reference's whole decode
(quantiser included): that is the image the tested encoder leads to, code flips and all.

Method:
1. Run the reference (fp32, backend "torch", TF32 off) with forward hooks on every unit, recording each unit's
   inputs and output.
2. Feed each unit of the model under test (the same weights in the chosen dtype) the reference's own inputs, cast
   to that dtype: teacher forcing, so one unit's error does not hide in the next one's. On the fast path a unit
   runs through the same unit function `sdvae_fast.fast` chains in a forward (the kernels); the whole forward
   then also fuses `quant_conv` into the encoder's head, which the end-to-end rows cover.
3. Do the same with PyTorch in that dtype, whose error is the yardstick: a check passes when
   `rel_l2 <= tol_factor * torch_rel_l2 + tol_floor` (the project's rule: at most 2x PyTorch's own
   low-precision error plus a small floor).
4. Run the whole encode and decode, and compare the decoded 8-bit images by PSNR (skimage.metrics); for a VQ
   model the quantiser row comes first in the decode table and the decode runs on the reference's codes
   (see above).

`relative L2 error` is `||a - b|| / ||b||` with b the reference, computed in float64.
"""
from __future__ import annotations

import copy
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

DEFAULT_PHOTOS = ("skimage:chelsea", "skimage:coffee", "skimage:astronaut")
# Floors added to the allowed relative L2 error, per compute dtype (see the module docstring).
TOL_FLOOR = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 5e-3}
PSNR_ALWAYS_OK = 50.0  # dB: an image this close to the reference passes whatever PyTorch achieves

@dataclass
class Capture:
    """One unit's recorded call on the reference: positional args, keyword args, output (all detached)."""

    name: str
    args: tuple
    kwargs: dict
    output: torch.Tensor


#: Seed of the generator every decode of a consistency decoder gets here (its decode draws noise).
DECODE_SEED = 0
#: Names of UNet up-block resnets: in a forward their unit pops its skip and concatenates; alone it gets the
#: recorded concatenation (`_alone`).
_POPPING = re.compile(r"\.up_blocks\.\d+\.resnets\.\d+$")


def model_units(model: torch.nn.Module) -> list:
    """Every unit of `model`, in run order: `fast.iter_units` (the AutoencoderKL structure: encoder, quant
    convs, decoder), then, for a consistency decoder (a `decoder_unet`), its UNet's units
    (`units.unet_units(model.decoder_unet)`, named `decoder_unet.*`; none when `units.unet_why_not` gives a
    reason, since the UNet's own forward then runs). Raises TypeError as `iter_units` for other models."""
    from sdvae_fast.fast import iter_units, units

    found = list(iter_units(model))
    unet = getattr(model, "decoder_unet", None)
    if unet is not None and units.unet_why_not(unet) is None:
        listed = {u.name for u in found}
        found += [u for stage in units.unet_units(unet) for u in stage if u.name not in listed]
    return found


def units_by_name(model: torch.nn.Module) -> dict:
    """{name: `sdvae_fast.fast.units.Unit`} of every unit of `model` (`model_units`), in run order."""
    return {unit.name: unit for unit in model_units(model)}


def decode_kwargs(model: torch.nn.Module, device, seed: int = DECODE_SEED) -> dict:
    """Keyword arguments for `model.decode` besides the latents: a fresh generator on `device` seeded with
    `seed` for a consistency decoder (a `decoder_unet`; its decode draws noise), nothing for an AutoencoderKL."""
    if getattr(model, "decoder_unet", None) is None:
        return {}
    return {"generator": torch.Generator(device=device).manual_seed(seed)}


def decode(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """`model.decode(z).sample` with `decode_kwargs`: (N, 3, f*h, f*w) for latents z (N, C, h, w), f the model's
    `downscale_factor` (a VQ model quantises z first)."""
    return model.decode(z, **decode_kwargs(model, z.device)).sample


def is_vq(model: torch.nn.Module) -> bool:
    """Whether `model` is a VQ autoencoder (a `quantize` codebook: `sdvae_fast.VQModel` or diffusers' VQModel)."""
    return hasattr(getattr(model, "quantize", None), "embedding")


def latents_field(model: torch.nn.Module) -> str:
    """Which field of `model.encode(x)` holds the encoder's latents (`encoder_latents`): "latents" for a VQ model
    (unquantised), "latent_dist.mean" for an AutoencoderKL-like posterior."""
    return "latents" if is_vq(model) else "latent_dist.mean"


def encoder_latents(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder's latents of `model` for images x (N, 3, H, W): `encode(x).latents` (VQ, not yet quantised) or
    `encode(x).latent_dist.mean`, as `latents_field` names them; (N, C, H/f, W/f). What parity compares and decodes
    and profile times."""
    out = model.encode(x)
    return out.latents if latents_field(model) == "latents" else out.latent_dist.mean


def decoder_channels(model: torch.nn.Module) -> int:
    """The channel count `model.decode` takes: latent_channels, or a VQ model's vq_embed_dim (its codebook width,
    latent_channels when unset)."""
    from sdvae_fast.configs import config_dict

    config = config_dict(model)
    if is_vq(model):
        return int(config.get("vq_embed_dim") or config["latent_channels"])
    return int(config["latent_channels"])


def downscale_factor(model: torch.nn.Module) -> int:
    """Image pixels per latent pixel along a side: 2 ** (number of the encoder's down blocks with a downsampler),
    8 for a model without such an encoder (VQ-f4: 4; AutoencoderKL, VQ-f8: 8)."""
    blocks = getattr(getattr(model, "encoder", None), "down_blocks", None)
    if blocks is None:
        return 8
    return 2 ** sum(1 for block in blocks if getattr(block, "downsamplers", None))


def quantize(model: torch.nn.Module, h: torch.Tensor, fast_path: bool) -> tuple:
    """A VQ model's quantiser on latents h (N, D, h, w): (z_q (N, D, h, w) in h's dtype, codes (N*h*w,) int64 in
    (n, y, x) order). The kernel (`VQModel.quantize_latents`, `ops.vector_quantize`) when `fast_path`, else
    diffusers' VectorQuantizer (cdist + argmin), as `model.decode` runs them."""
    if fast_path:
        z_q, _, codes = model.quantize_latents(h)
    else:
        z_q, _, (_, _, codes) = model.quantize(h)
    return z_q, codes.reshape(-1)


def decode_quantized(model: torch.nn.Module, z_q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A VQ model's decode of already quantised latents, skipping its quantiser (`force_not_quantize=True`):
    z_q (N, D, h, w) as given, or, for a `lookup_from_codebook` model (whose decode then takes codes), the codes
    (N*h*w,) looked up in the model's own codebook. Returns the images (N, 3, f*h, f*w)."""
    if model.config.lookup_from_codebook:
        n, d, height, width = z_q.shape
        return model.decode(codes, force_not_quantize=True, shape=(n, height, width, d)).sample
    return model.decode(z_q, force_not_quantize=True).sample


#: Safety factor on the rounding bound of `near_tie_margin`.
TIE_SAFETY = 2.0


def near_tie_margin(h: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, ref_codes: torch.Tensor,
                    dtype: torch.dtype) -> tuple:
    """How much worse each tested code is than the reference's, and how much worse a near tie may be.

    Args:
        h: the reference's latents (N, D, h, w), fp32. codebook: the reference's (K, D), fp32.
        codes, ref_codes: (N*h*w,) the tested and the reference's codes, in (n, y, x) order.
        dtype: the tested dtype (the quantiser saw h and the codebook rounded to it).
    Returns:
        (excess, margin), each (N*h*w,) float64: `excess = ||h - e_tested||^2 - ||h - e_ref||^2` in fp64 (0 where
        the codes agree), `margin = TIE_SAFETY * (2u + D * 2^-24) * (||h|| + ||e_tested|| + ||e_ref||)^2` with u the
        unit roundoff of `dtype`: rounding h and the codebook to `dtype` (relative error u each) changes the
        difference of the two squared distances by at most 2u times that square, and an fp32 distance over D
        channels by about D * 2^-24 times it. A differing code with `excess <= margin` is a near tie.
    """
    d = h.shape[1]
    flat = h.detach().permute(0, 2, 3, 1).reshape(-1, d).to(torch.float64)  # (N*h*w, D)
    table = codebook.detach().to(device=flat.device, dtype=torch.float64)
    mine, theirs = table[codes.to(flat.device)], table[ref_codes.to(flat.device)]
    excess = ((flat - mine) ** 2).sum(1) - ((flat - theirs) ** 2).sum(1)
    unit_roundoff = torch.finfo(dtype).eps / 2
    scale = (flat.norm(dim=1) + mine.norm(dim=1) + theirs.norm(dim=1)) ** 2
    return excess, TIE_SAFETY * (2 * unit_roundoff + d * 2.0 ** -24) * scale


def unit_names(model: torch.nn.Module) -> list[str]:
    """The unit names of a VAE tree (diffusers module paths; the heads are `encoder.conv_out*`), in run order."""
    return list(units_by_name(model))


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


@contextmanager
def record_units(model: torch.nn.Module, captures: list):
    """Forward hooks on every unit of `model`; appends a `Capture` per call, in execution order.

    A unit over one module is hooked on it; the head (conv_norm_out -> conv_act -> conv_out) by a pre-hook on its
    first module and a hook on its last.
    """
    handles, pending = [], {}
    for name, unit in units_by_name(model).items():
        first, last = unit.modules[0], unit.modules[-1]
        if first is not last:
            def pre(module, args, _name=name):
                pending[_name] = _detach(args)

            def post(module, args, output, _name=name):
                captures.append(Capture(_name, pending.pop(_name), {}, _detach(output)))

            handles += [first.register_forward_pre_hook(pre), last.register_forward_hook(post)]
        else:
            def hook(module, args, kwargs, output, _name=name):
                captures.append(Capture(_name, _detach(args), _detach(kwargs), _detach(output)))

            handles.append(first.register_forward_hook(hook, with_kwargs=True))
    try:
        yield captures
    finally:
        for handle in handles:
            handle.remove()


def _alone(unit):
    """The unit to run alone on a recorded input: `unit`, except a UNet up block's resnet, whose unit pops its
    skip in a forward; its recorded input is the concatenation [x | skip] already, so its plain unit runs."""
    if unit.name.startswith("decoder_unet.") and _POPPING.search(unit.name):
        from sdvae_fast.fast import units

        return units.make_unit(unit.name, unit.modules[0])
    return unit


def _spatially_conditioned(unit) -> bool:
    """Whether a unit's modules hold a SpatialNorm (MoVQ's decoder): they take the quantised latents."""
    from sdvae_fast.fast import units

    return any(units.spatially_conditioned(module) for module in unit.modules)


def _modules_in_turn(modules, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A head's modules' own forwards in turn, SpatialNorm handed the quantised latents (MoVQ's decoder head)."""
    from sdvae_fast.fast import units

    for module in modules:
        x = module(x, latents) if units.spatially_conditioned(module) else module(x)
    return x


def unit_call(unit, args: tuple, kwargs: dict, fast_path: bool) -> Callable[[], torch.Tensor]:
    """A call of `unit` on recorded inputs, without arguments (what `run_unit` runs and `profile` times).

    The recorded conditioning is the unit's second argument or its `temb=` keyword: a UNet resnet's time embedding
    (N, C_temb), or, for a SpatialNorm-conditioned unit (MoVQ's decoder), the quantised latents (N, C_z, h, w).
    `fast_path`: the unit of `sdvae_fast.fast` (the kernels) fed `args[0]` (N, C, H, W), the conditioning as the
    run context's `temb` or `latents`; else the module's own forward with `args`/`kwargs` (for the head:
    conv_norm_out, conv_act, conv_out in turn; a SpatialNorm conv_norm_out gets the recorded latents).
    """
    cond = kwargs.get("temb", args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None)
    spatial = _spatially_conditioned(unit)
    if not fast_path:
        if spatial and len(unit.modules) > 1:
            return lambda: _modules_in_turn(unit.modules, args[0], cond)
        return lambda: unit.reference(*args, **kwargs)
    from sdvae_fast.fast import units

    alone = _alone(unit)
    if spatial:
        return lambda: alone.run_alone(args[0], units.RunContext(latents=cond))
    return lambda: alone.run_alone(args[0], units.RunContext(temb=cond))


def run_unit(model: torch.nn.Module, name: str, args: tuple, kwargs: dict, fast_path: bool) -> torch.Tensor:
    """Run unit `name` of `model` on the given inputs (`unit_call`).

    Raises KeyError naming the unit when `model` has no unit of that name.
    """
    units = units_by_name(model)
    if name not in units:
        raise KeyError(f"{type(model).__name__} has no unit named {name!r}; its units are {list(units)}")
    return unit_call(units[name], args, kwargs, fast_path)()


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def error_stats(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """{'max_abs', 'rel_l2', 'worst_index', 'nonfinite'} of `actual` against the reference `expected`.

    Computed in float64 on the tensors' device (the GPU for a GPU run): only five scalars come back to the host,
    in one copy. `rel_l2 = ||a - b|| / ||b||` (plain ||a - b|| when b is all zero); non-finite entries of `actual`
    count as infinite error. Raises ValueError on a shape mismatch.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        raise ValueError(f"shape mismatch: {tuple(actual.shape)} vs reference {tuple(expected.shape)}")
    if actual.numel() == 0:
        return {"max_abs": 0.0, "rel_l2": 0.0, "worst_index": (), "nonfinite": 0}
    a = actual.detach().to(torch.float64)
    b = expected.detach().to(device=a.device, dtype=torch.float64)
    diff = (a - b).abs()
    finite = torch.isfinite(diff)
    diff = torch.where(finite, diff, math.inf)
    max_abs, flat = diff.reshape(-1).max(0)
    scalars = torch.stack([(~finite).sum().to(torch.float64), max_abs, flat.to(torch.float64),
                           torch.where(finite, diff, 0.0).norm(), b.norm()]).tolist()
    nonfinite, max_abs, flat, diff_norm, denom = int(scalars[0]), scalars[1], int(scalars[2]), scalars[3], scalars[4]
    worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
    rel = math.inf if nonfinite else diff_norm / (denom if denom > 0 else 1.0)
    return {"max_abs": max_abs, "rel_l2": rel, "worst_index": worst, "nonfinite": nonfinite}


class _StreamingRows(list):
    """A list of `Row`s that also hands each appended row to a callback (rows printed as they are computed)."""

    def __init__(self, on_row: Callable[["Row"], None]):
        super().__init__()
        self._on_row = on_row

    def append(self, row) -> None:
        super().append(row)
        self._on_row(row)


@dataclass
class Row:
    """One compared tensor: the model under test and PyTorch in the same dtype, both against the reference."""

    name: str
    shape: tuple
    stats: dict
    torch_rel_l2: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.stats["nonfinite"] == 0 and self.stats["rel_l2"] <= self.tolerance

    def line(self) -> str:
        """The row on one line (what the CLI streams while parity runs)."""
        s = self.stats
        return (f"{self.name}: rel_l2 {s['rel_l2']:.3e} (torch {self.torch_rel_l2:.3e}, tol {self.tolerance:.2e}) "
                f"max_abs {s['max_abs']:.3e} at {s['worst_index']} {'ok' if self.passed else 'FAIL'}")


@dataclass
class QuantizerRow(Row):
    """The quantiser's row (VQ models): z_q against the reference's over the positions whose code equals the
    reference's (`stats`, `torch_rel_l2`, each path over its own agreeing positions), and the codes themselves:
    `equal` of `count` equal to the reference's (`torch_equal` for PyTorch in the same dtype), `beyond` of the
    differing ones not near ties (`near_tie_margin`). Passes when the row's rule holds and `beyond` is 0."""

    equal: int = 0
    count: int = 0
    torch_equal: int = 0
    beyond: int = 0

    @property
    def passed(self) -> bool:
        return super().passed and self.beyond == 0

    def codes(self) -> str:
        """The code agreement in words."""
        differing = self.count - self.equal
        return (f"codes {self.equal}/{self.count} ({100 * self.equal / max(self.count, 1):.1f}%) equal to the "
                f"reference's (torch {self.torch_equal}/{self.count}); of {differing} differing, "
                f"{differing - self.beyond} near ties, {self.beyond} beyond the near-tie margin")

    def line(self) -> str:
        head, verdict = super().line().rsplit(" ", 1)
        return f"{head} {self.codes()} {verdict}"


@dataclass
class ImageCheck:
    """PSNR (dB) of the tested path's decoded 8-bit images, and of PyTorch's in the same dtype, vs the reference."""

    name: str
    psnr: float
    torch_psnr: float
    margin: float

    @property
    def passed(self) -> bool:
        return self.psnr >= min(self.torch_psnr - self.margin, PSNR_ALWAYS_OK)


@dataclass
class ParityReport:
    """Tables per part ("encode", "decode"): unit rows, end-to-end rows and the image PSNR checks."""

    title: str
    rows: dict = field(default_factory=dict)  # part -> list[Row]
    images: list = field(default_factory=list)  # list[ImageCheck]
    unsupported: list = field(default_factory=list)  # (unit name, reason) of units run by their module's forward

    @property
    def passed(self) -> bool:
        return all(r.passed for rows in self.rows.values() for r in rows) and all(i.passed for i in self.images)

    def markdown(self) -> str:
        """The report as markdown tables (also what `format` prints)."""
        lines = [f"# {self.title}", ""]
        for part, rows in self.rows.items():
            lines += [f"## {part}", "",
                      "| unit | shape | max abs | rel L2 | torch rel L2 | tol | worst index | ok |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                s = r.stats
                lines.append(f"| {r.name} | {'x'.join(map(str, r.shape))} | {s['max_abs']:.3e} | "
                             f"{s['rel_l2']:.3e} | {r.torch_rel_l2:.3e} | {r.tolerance:.2e} | "
                             f"{s['worst_index']} | {'ok' if r.passed else 'FAIL'} |")
            lines.append("")
        quantizers = [r for rows in self.rows.values() for r in rows if isinstance(r, QuantizerRow)]
        if quantizers:
            lines += ["## quantiser codes (vs the reference's; z_q above is compared where they agree)", "",
                      "| row | codes equal | torch codes equal | differing: near ties | differing: beyond | ok |",
                      "|---|---|---|---|---|---|"]
            for r in quantizers:
                lines.append(f"| {r.name} | {r.equal}/{r.count} | {r.torch_equal}/{r.count} | "
                             f"{r.count - r.equal - r.beyond} | {r.beyond} | {'ok' if r.passed else 'FAIL'} |")
            lines.append("")
        if self.images:
            lines += ["## images (8-bit, vs the reference decoder's output)", "",
                      "| check | PSNR dB | torch PSNR dB | ok |", "|---|---|---|---|"]
            for i in self.images:
                lines.append(f"| {i.name} | {i.psnr:.2f} | {i.torch_psnr:.2f} | {'ok' if i.passed else 'FAIL'} |")
            lines.append("")
        if self.unsupported:
            lines += ["## units not on the kernels (their module's own forward runs)", "",
                      "| unit | reason |", "|---|---|"]
            lines += [f"| {name} | {reason} |" for name, reason in self.unsupported]
            lines.append("")
        lines.append(f"**{'PASS' if self.passed else 'FAIL'}**")
        return "\n".join(lines)

    def format(self) -> str:
        return self.markdown()

    def write(self, out_dir: Path) -> Path:
        """Write `out_dir/parity.md` (folder created); returns its path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "parity.md"
        path.write_text(self.markdown() + "\n", encoding="utf-8")
        return path


def load_photos(sources: Sequence[str], res: int, batch: int) -> torch.Tensor:
    """`batch` images as (batch, 3, res, res) float32 in [-1, 1]: each center-cropped square, resized (Lanczos).

    Sources are cycled when `batch` exceeds their number. Raises ValueError when res is not a positive multiple
    of 8 or batch < 1.
    """
    from PIL import Image

    from sdvae_fast.images import load_image, to_pil

    if res < 8 or res % 8:
        raise ValueError(f"--res must be a positive multiple of 8, got {res}")
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    out = []
    for i in range(batch):
        img = to_pil(load_image(sources[i % len(sources)]))[0]
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((res, res), Image.LANCZOS)
        out.append(load_image(img))
    return torch.cat(out)  # (batch, 3, res, res)


@contextmanager
def _exact_fp32():
    """Turn TF32 off for the reference (cuDNN convs use TF32 by default on Ampere and later)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _in_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` in `dtype`. diffusers' `ModelMixin.to` warns on every dtype cast of a class that declares
    `_keep_in_fp32_modules` (VQModel: an empty list) that it "should be kept in float32"; parity casts on
    purpose, so that warning is held back here (and no cast happens when the dtype is already `dtype`)."""
    model = copy.deepcopy(model)
    if all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        return model
    logger = logging.getLogger("diffusers.models.modeling_utils")
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return model.to(dtype=dtype)
    finally:
        logger.setLevel(saved)


def _psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    from sdvae_fast.images import to_uint8

    a, b = to_uint8(images), to_uint8(reference)
    if (a == b).all():
        return math.inf
    return float(peak_signal_noise_ratio(b, a, data_range=255))


def call_labels(captures) -> list[str]:
    """Row names of captures: the unit name, with `[call k]` when the unit ran more than once (a consistency
    decoder's UNet runs once per decode step)."""
    total: dict = {}
    for cap in captures:
        total[cap.name] = total.get(cap.name, 0) + 1
    seen: dict = {}
    labels = []
    for cap in captures:
        seen[cap.name] = seen.get(cap.name, 0) + 1
        labels.append(cap.name if total[cap.name] == 1 else f"{cap.name} [call {seen[cap.name]}]")
    return labels


def _compare_units(captures, fast, fast_path, lowp, dtype, tolerance, rows):
    """Teacher-forced unit comparison: each unit of `fast` and `lowp` gets the reference's inputs."""
    fast_units, lowp_units = units_by_name(fast), units_by_name(lowp)  # once, not per capture
    for cap, label in zip(captures, call_labels(captures)):
        args, kwargs = _cast(cap.args, dtype), _cast(cap.kwargs, dtype)
        got = unit_call(fast_units[cap.name], args, kwargs, fast_path)()
        base = unit_call(lowp_units[cap.name], args, kwargs, False)()
        torch_rel = error_stats(base, cap.output)["rel_l2"]
        rows.append(Row(label, tuple(cap.output.shape), error_stats(got, cap.output), torch_rel,
                        tolerance(torch_rel)))


def _compare_quantizer(reference, fast, lowp, fast_path, ref_latents, ref_zq, ref_codes, dtype, tolerance, rows):
    """The quantiser's row (`QuantizerRow`): each path's quantiser on the reference's latents in `dtype`."""
    h = ref_latents.to(dtype)
    codebook = reference.quantize.embedding.weight

    def masked(z_q, codes):
        # z_q where the code equals the reference's (or is not finite), the reference's value elsewhere
        same = (codes == ref_codes).reshape(z_q.shape[0], 1, *z_q.shape[2:])
        return torch.where(same | ~torch.isfinite(z_q), z_q, ref_zq.to(z_q.dtype)), int(same.sum())

    got, codes = quantize(fast, h, fast_path)
    base, base_codes = quantize(lowp, h, False)
    got_masked, equal = masked(got, codes)
    base_masked, torch_equal = masked(base, base_codes)
    excess, margin = near_tie_margin(ref_latents, codebook, codes, ref_codes, dtype)
    beyond = int(((codes != ref_codes).to(excess.device) & (excess > margin)).sum())
    torch_rel = error_stats(base_masked, ref_zq)["rel_l2"]
    rows.append(QuantizerRow("quantize: z_q", tuple(ref_zq.shape), error_stats(got_masked, ref_zq), torch_rel,
                             tolerance(torch_rel), equal=equal, count=ref_codes.numel(), torch_equal=torch_equal,
                             beyond=beyond))


def run_parity(reference, *, device, dtype: torch.dtype, backend: str, res: int, batch: int = 1,
               images: Optional[Sequence[str]] = None, parts: Sequence[str] = ("encode", "decode"),
               tol_factor: float = 2.0, tol_floor: Optional[float] = None, psnr_margin: float = 6.0,
               quiet: bool = False, on_row: Optional[Callable[["Row"], None]] = None) -> ParityReport:
    """Compare `backend` in `dtype` against `reference` (fp32, backend "torch"), unit by unit and end to end.

    Args:
        reference: an `AutoencoderKL`, `AutoencoderKLFlux2`, `ConsistencyDecoderVAE` or `VQModel` (ours) in
            float32 on `device`; copies of it make the tested model and the PyTorch low-precision yardstick.
            Whatever its backend, the reference runs the PyTorch modules (a copy set to "torch"; the caller's
            model is left as it is).
        device: torch.device of all runs. dtype: compute dtype of the tested path (float32/float16/bfloat16).
        backend: "triton" or "torch" (or "auto") for the tested copy.
        res: image side in pixels (a multiple of 8 and of the model's `downscale_factor`); the decoder gets the
            reference encoder's latents of the images (a VQ model: the reference's quantised latents, decoded
            with `force_not_quantize`; see the module docstring).
        batch: images per batch. images: encoder inputs (paths or skimage:NAME; default scikit-image photos).
        parts: "encode" and/or "decode", the halves to compare (a VQ model's quantiser row is in "decode").
        tol_factor, tol_floor: a tensor passes when rel_l2 <= tol_factor * torch_rel_l2 + tol_floor
            (tol_floor defaults to TOL_FLOOR[dtype]).
        psnr_margin: dB the tested images may fall short of PyTorch's in the same dtype.
        on_row: called with each `Row` as soon as it is computed (the CLI prints it, so a run cut short keeps
            the rows it reached).
    Returns:
        A ParityReport; `.passed` is False when any check failed.
    Raises:
        ValueError: bad res, batch or parts. RuntimeError: backend "triton" where the kernels cannot run.
    """
    from tqdm import tqdm

    from sdvae_fast.fast import use_fast_path

    if not parts or set(parts) - {"encode", "decode"}:
        raise ValueError(f"parts must be a non-empty subset of ('encode', 'decode'), got {tuple(parts)}")
    factor = downscale_factor(reference)
    if res % factor:
        raise ValueError(f"--res must be a multiple of {factor} for this model (its encoder downsamples "
                         f"{factor}x), got {res}")
    floor = TOL_FLOOR[dtype] if tol_floor is None else tol_floor

    def tolerance(torch_rel: float) -> float:
        return tol_factor * torch_rel + floor

    def compare(rows, name, got, base, expected):
        torch_rel = error_stats(base, expected)["rel_l2"]
        rows.append(Row(name, tuple(expected.shape), error_stats(got, expected), torch_rel, tolerance(torch_rel)))

    x = load_photos(list(images or DEFAULT_PHOTOS), res, batch).to(device)  # (B, 3, res, res) fp32
    fast_path = use_fast_path(backend, device)  # raises for "triton" where the kernels cannot run
    if getattr(reference, "backend", "torch") != "torch":
        # On CUDA "auto" would run the reference on the fast path too: no unit hooks fire, and the kernels
        # would be compared with themselves. Record and decode with the PyTorch modules instead.
        reference = copy.deepcopy(reference)
        reference.set_backend("torch")
    vq = is_vq(reference)
    fast = _in_dtype(reference, dtype)
    fast.set_backend(backend)
    lowp = _in_dtype(reference, dtype)
    lowp.set_backend("torch")
    dtype_name = str(dtype).replace("torch.", "")
    report = ParityReport(f"parity: {backend} {dtype_name} vs fp32 reference, {batch}x3x{res}x{res} on {device}")
    if fast_path:
        report.unsupported = [(u.name, u.reason) for u in units_by_name(fast).values() if u.reason is not None]

    steps = tqdm(total=2 * len(parts), desc="parity", disable=quiet)
    with torch.no_grad(), _exact_fp32():
        # The reference run, recording every unit's inputs and output (TF32 off throughout).
        enc_caps: list = []
        with record_units(reference, enc_caps):
            ref_latents = encoder_latents(reference, x)  # (B, C, res/f, res/f) fp32
        dec_caps: list = []
        if vq:
            ref_zq, ref_codes = quantize(reference, ref_latents, False)  # diffusers' quantiser
            # The whole decode (quantiser included): what the encode image check compares with.
            ref_image = decode(reference, ref_latents) if "encode" in parts else None
            with record_units(reference, dec_caps):
                ref_dec_image = decode_quantized(reference, ref_zq, ref_codes)  # (B, 3, res, res) fp32
        else:
            with record_units(reference, dec_caps):
                ref_image = ref_dec_image = decode(reference, ref_latents)  # (B, 3, res, res) fp32

    with torch.no_grad():
        if "encode" in parts:
            rows = report.rows.setdefault("encode", [] if on_row is None else _StreamingRows(on_row))
            _compare_units(enc_caps, fast, fast_path, lowp, dtype, tolerance, rows)
            steps.update()
            fast_latents = encoder_latents(fast, x.to(dtype))
            lowp_latents = encoder_latents(lowp, x.to(dtype))
            compare(rows, f"encode: {latents_field(reference)}", fast_latents, lowp_latents, ref_latents)
            with _exact_fp32():
                # The encoder's error in image space: the reference decoder on the tested latents.
                enc_image = decode(reference, fast_latents.float())
                enc_image_lowp = decode(reference, lowp_latents.float())
            report.images.append(ImageCheck("encode (reference decoder on tested latents)",
                                            _psnr(enc_image, ref_image), _psnr(enc_image_lowp, ref_image),
                                            psnr_margin))
            steps.update()
        if "decode" in parts:
            rows = report.rows.setdefault("decode", [] if on_row is None else _StreamingRows(on_row))
            if vq:
                _compare_quantizer(reference, fast, lowp, fast_path, ref_latents, ref_zq, ref_codes, dtype,
                                   tolerance, rows)
            _compare_units(dec_caps, fast, fast_path, lowp, dtype, tolerance, rows)
            steps.update()
            if vq:  # the reference's codes, each model's decoder (see the module docstring)
                fast_image = decode_quantized(fast, ref_zq.to(dtype), ref_codes)
                lowp_image = decode_quantized(lowp, ref_zq.to(dtype), ref_codes)
            else:
                fast_image = decode(fast, ref_latents.to(dtype))
                lowp_image = decode(lowp, ref_latents.to(dtype))
            compare(rows, "decode: sample", fast_image, lowp_image, ref_dec_image)
            report.images.append(ImageCheck("decode (the reference's codes)" if vq else "decode",
                                            _psnr(fast_image, ref_dec_image), _psnr(lowp_image, ref_dec_image),
                                            psnr_margin))
            steps.update()
    steps.close()
    return report
