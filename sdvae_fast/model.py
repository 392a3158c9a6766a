"""`sdvae_fast.AutoencoderKL`: a drop-in for `diffusers.AutoencoderKL` (the kl-f8 Stable Diffusion VAE).

Two forwards share one module tree, chosen per call by `backend` (docs/design.md, section 3):
- "auto" (default, or env `SDVAE_FAST_BACKEND`): the fast path of `sdvae_fast.fast` (Triton kernels) on CUDA when
  `backends.use_fast_path` agrees, the PyTorch modules elsewhere (on CPU `sdvae_fast.fast` is never imported);
- "triton": always the fast path (errors come from `backends.use_fast_path`, e.g. no CUDA and no interpreter);
- "torch": always the PyTorch modules.
The fast path is inference-only: under autograd, with parameters on another device or dtype than the input
(offloading and layerwise-casting hooks), a call runs the PyTorch modules instead.

Which class `AutoencoderKL` is depends on whether diffusers is installed (`HAS_DIFFUSERS`):
- with diffusers: a subclass of `diffusers.AutoencoderKL`. Its modules, config (`FrozenDict`, `register_to_config`),
  constructor signature, `from_pretrained` (Hub ids through huggingface_hub, variants, shards, `device_map`, ...),
  `save_pretrained`, gradient checkpointing, attention processors, layerwise casting, group offload and pipeline
  integration are diffusers' own; the torch backend is diffusers' forward, bit for bit. `DecoderOutput` and
  `AutoencoderKLOutput` are diffusers' classes. In a pipeline's `model_index.json` the VAE is entered as
  ("diffusers", "AutoencoderKL"): the saved `vae/` folder is diffusers' format, so diffusers alone loads the
  pipeline back; ask for ours with `vae=sdvae_fast.AutoencoderKL.from_pretrained(folder, subfolder="vae")` or
  `sdvae_fast.patch(pipe)`.
- without diffusers: `StandaloneAutoencoderKL`, the same API on the reference modules of `sdvae_fast.reference`
  (which compute diffusers' numbers), loading through `sdvae_fast.loading` (Hub ids through huggingface_hub).
  Features only diffusers provides (group offload, layerwise casting, attention processors) raise ImportError
  naming diffusers.
Both add, identically: `backend` / `set_backend`, validation of every input (errors name the argument and the
expected shape), `from_preset`, `from_single_file` (every checkpoint layout, `sdvae_fast.loading`), the bundled
"sdvae-fast/tiny", and tiling that keeps output shapes exact (`enable_tiling`). `StandaloneAutoencoderKL` is
importable (and tested) with diffusers installed too.

Tensors: images (N, in_channels, H, W) in [-1, 1]; latents (N, latent_channels, H // f, W // f) with
f = 2 ** (len(block_out_channels) - 1) (8 for every public VAE), unscaled: pipelines multiply by
`config.scaling_factor` (after subtracting `config.shift_factor`) themselves.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from sdvae_fast.backends import BACKEND_ENV, HAS_DIFFUSERS, check_backend, parameters_match
from sdvae_fast.configs import DEFAULTS, PRESETS, ConfigLike, normalize_config, resolve_config
from sdvae_fast.reference import Decoder, Encoder, GeneratorArg
from sdvae_fast.reference import DiagonalGaussianDistribution as _ReferencePosterior

#: Whether diffusers is installed: `AutoencoderKL` is then a subclass of `diffusers.AutoencoderKL`.


# ---------------------------------------------------------------------------------------------------------------
# Outputs and config
# ---------------------------------------------------------------------------------------------------------------

if HAS_DIFFUSERS:
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as _DiffusersPosterior
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    class DiagonalGaussianDistribution(_ReferencePosterior, _DiffusersPosterior):
        """The posterior `encode` returns: `sdvae_fast.reference.DiagonalGaussianDistribution` (diffusers' numbers;
        `sample()` compiles with dynamic shapes) that is also an instance of diffusers' class."""

else:
    DiagonalGaussianDistribution = _ReferencePosterior

    class _ModelOutput:
        """Dataclass output readable like diffusers' `BaseOutput`: `out.sample`, `out["sample"]`, `out[0]`."""

        def to_tuple(self) -> tuple:
            """The fields that are not None, in declaration order."""
            return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

        def __getitem__(self, key: Union[int, str, slice]):
            if isinstance(key, str):
                return getattr(self, key)
            return self.to_tuple()[key]

        def __iter__(self) -> Iterator:
            return iter(self.to_tuple())

        def __len__(self) -> int:
            return len(self.to_tuple())

        def keys(self):
            """Names of the fields that are not None (dict access as on diffusers' `BaseOutput`)."""
            return [f.name for f in fields(self) if getattr(self, f.name) is not None]

        def values(self):
            """Values of the fields that are not None."""
            return list(self.to_tuple())

        def items(self):
            """(name, value) of the fields that are not None."""
            return list(zip(self.keys(), self.values()))

    @dataclass
    class DecoderOutput(_ModelOutput):
        """Output of `AutoencoderKL.decode`: `sample`, the decoded images (N, out_channels, H, W) in the model's
        dtype, nominally in [-1, 1] (not clamped). `commit_loss` exists for diffusers compatibility (None here)."""

        sample: torch.Tensor
        commit_loss: Optional[torch.Tensor] = None

    @dataclass
    class AutoencoderKLOutput(_ModelOutput):
        """Output of `AutoencoderKL.encode`: `latent_dist`, the posterior `DiagonalGaussianDistribution` over
        (N, latent_channels, h, w) latents."""

        latent_dist: DiagonalGaussianDistribution


class _SharedNoisePosterior(DiagonalGaussianDistribution):
    """The posterior under patch parallelism: `sample()` without a generator draws the noise on the group's first
    rank and broadcasts it, so every rank gets the same latents (with a generator each rank draws from its own,
    as pipelines seed them alike)."""

    def __init__(self, parameters: torch.Tensor, group=None):
        super().__init__(parameters)
        self._group = group

    def sample(self, generator: GeneratorArg = None) -> torch.Tensor:
        """A draw `mean + std * eps`: (N, c, h, w); eps from `generator`, else drawn on rank 0 and broadcast."""
        if generator is not None:
            return super().sample(generator)
        import torch.distributed as dist

        noise = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype)
        source = 0 if self._group is None else dist.get_global_rank(self._group, 0)
        dist.broadcast(noise, src=source, group=self._group)
        return self.mean + self.std * noise


class VAEConfig(dict):
    """The standalone model's config: a read-only dict with diffusers' field names, also readable as attributes.

    `config.scaling_factor`, `config["latent_channels"]`, `dict(config)` and `diffusers.AutoencoderKL.from_config
    (config)` all work. Assigning or mutating raises TypeError (build a new model, or pass overrides to
    `from_config` / the loaders, instead).
    """

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"AutoencoderKL config has no field {name!r}; fields: {list(self)}") from None

    def _read_only(self, *args, **kwargs):
        raise TypeError("AutoencoderKL config is read-only; build a new model with from_config(config, field=...)")

    __setattr__ = __setitem__ = __delitem__ = _read_only
    update = pop = popitem = clear = setdefault = _read_only

    def __reduce__(self):
        return (VAEConfig, (dict(self),))

    def __repr__(self) -> str:
        return f"VAEConfig({dict.__repr__(self)})"


def _bind_fields(signature: inspect.Signature, args: tuple, kwargs: dict, source: str) -> dict[str, Any]:
    """The config fields given to a constructor with `signature` (self excluded): positional and keyword arguments
    by name, "_"-prefixed keys dropped. Raises TypeError naming the valid fields for unknown or extra arguments."""
    public = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    unknown = sorted(k for k in public if k not in signature.parameters or k == "self")
    if unknown:
        raise TypeError(f"{source}: unknown AutoencoderKL config field(s) {unknown}; valid fields: {list(DEFAULTS)}")
    try:
        bound = signature.bind(None, *args, **public)
    except TypeError as e:
        raise TypeError(f"{source}: {e}; valid fields: {list(DEFAULTS)}") from None
    return {k: v for k, v in bound.arguments.items() if k != "self"}


# ---------------------------------------------------------------------------------------------------------------
# Tiling geometry
# ---------------------------------------------------------------------------------------------------------------


def _tile_starts(length: int, tile: int, stride: int, align: int = 1) -> list[int]:
    """Start offsets of overlapping tiles covering [0, length): 0, stride, 2*stride, ... and a last tile pulled
    back to end at `length` (its start rounded down to a multiple of `align`, so it may be up to align-1 longer).
    One tile [0] when length <= tile."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    last = (length - tile) // align * align
    if last > starts[-1]:
        starts.append(last)
    return starts


def _blend_weights(spans: list[tuple[int, int]], dtype: torch.dtype, device) -> list[torch.Tensor]:
    """1-D blending weights for output spans [a_k, b_k) of consecutive tiles: linear ramps (0, 1] across each
    overlap with a neighbour, 1 elsewhere. Dividing the weighted sum by the summed weights blends the tiles."""
    weights = []
    for k, (a, b) in enumerate(spans):
        pos = torch.arange(a, b, dtype=dtype, device=device) + 0.5  # pixel centres
        w = torch.ones(b - a, dtype=dtype, device=device)
        if k > 0 and spans[k - 1][1] > a:
            w = torch.minimum(w, (pos - a) / (spans[k - 1][1] - a))
        if k + 1 < len(spans) and spans[k + 1][0] < b:
            w = torch.minimum(w, (b - pos) / (b - spans[k + 1][0]))
        weights.append(w)
    return weights



# ---------------------------------------------------------------------------------------------------------------
# What sdvae-fast adds to the AutoencoderKL API (both classes)
# ---------------------------------------------------------------------------------------------------------------


class FastVAEMixin:
    """Backends, validation, exact-shape tiling, presets and single-file loading on an AutoencoderKL-structured
    module (`encoder`, `decoder`, `quant_conv`, `post_quant_conv`, `config`, `use_slicing`, `use_tiling`,
    `tile_sample_min_size`, `tile_latent_min_size`, `tile_overlap_factor`). Listed first among the bases, so
    these methods take precedence over diffusers' of the same name."""

    backend: str = "auto"
    #: (process group, gather) while patch parallelism is on (`enable_patch_parallel`), else None.
    _patch_parallel: Optional[tuple] = None
    #: With `gather=False`: the first row, in the output, of the band the last encode / decode returned.
    patch_parallel_offset: Optional[int] = None

    def _init_backend(self) -> None:
        self.backend = check_backend(os.environ.get(BACKEND_ENV) or "auto", f"environment variable {BACKEND_ENV}")

    # -- construction helpers ------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, *, dtype: Optional[torch.dtype] = None,
                    device: Union[str, torch.device, None] = None, **overrides):
        """A preset's architecture with deterministic random weights.

        The weights are PyTorch's default init of the reference module tree (`StandaloneAutoencoderKL`) drawn
        from `torch.manual_seed(seed)` in a forked RNG state (the global RNG is left untouched), then loaded into
        `cls`: same seed and torch version, bitwise the same weights, with or without diffusers installed.
        `overrides` replace config fields (e.g. narrow `block_out_channels` for tests). Returned in eval mode,
        moved to `dtype` / `device` when given. Such weights decode to no meaningful image: they exist for tests,
        benchmarks and demos.

        Raises ValueError listing the presets for an unknown name; TypeError / ValueError for bad overrides.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid preset names: {sorted(PRESETS)}")
        config = normalize_config({**PRESETS[name], **overrides}, source=f"from_preset({name!r})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            source = StandaloneAutoencoderKL(**config)
        if device is not None or dtype is not None:
            source = source.to(device=device, dtype=dtype)
        if cls is StandaloneAutoencoderKL:
            return source.eval()
        with torch.device("meta"):
            model = cls.from_config(config)
        model.load_state_dict(source.state_dict(), assign=True)  # the weights, in their dtype and device
        return model.eval()

    @classmethod
    def from_single_file(cls, path, config: Optional[ConfigLike] = None, **overrides):
        """Load one checkpoint file of any known layout (diffusers or LDM names, whole-model checkpoints, pickles);
        see `sdvae_fast.loading.load_single_file`. `config` (preset, folder or dict) and `overrides` win over the
        architecture and scaling factor inferred from the file."""
        from sdvae_fast import loading

        return loading.load_single_file(cls, path, config=config, **overrides)

    # -- properties and switches -----------------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: f = 2 ** (len(block_out_channels) - 1) (8 for every public VAE)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def set_backend(self, name: str) -> None:
        """Choose the forward: "auto" (fast path on CUDA when available, else PyTorch), "triton" (always the fast
        path), or "torch" (always the PyTorch modules). Raises ValueError for any other name."""
        self.backend = check_backend(name, "backend")

    def enable_slicing(self) -> None:
        """Encode / decode a batch one sample at a time (lower peak memory; results equal the batched call)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        """Encode / decode the whole batch in one call (the default)."""
        self.use_slicing = False

    def enable_tiling(self, use_tiling: bool = True) -> None:
        """Encode / decode large inputs in overlapping tiles blended together (opt-in).

        Tiling is APPROXIMATE: each tile normalises its activations with its own GroupNorm statistics and sees no
        context beyond its border, so results differ from the untiled model (seams are hidden by linear blending,
        not removed). Images larger than `tile_sample_min_size` pixels are encoded in tiles of that size; latents
        larger than `tile_latent_min_size` are decoded in tiles of that size; neighbours overlap by
        `tile_overlap_factor` of a tile. Output shapes always equal the untiled ones ((N, 3, f*h, f*w) for any
        h, w >= 1), unlike diffusers, which can drop the edge of sizes that are not whole tiles.
        """
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        """Encode / decode in one pass, exactly (the default)."""
        self.use_tiling = False

    def enable_patch_parallel(self, group=None, *, gather: bool = True) -> None:
        """Split every encode / decode by rows over the ranks of a `torch.distributed` process group, exactly.

        Every rank calls `encode` / `decode` with the same full input (as pipelines do); each computes its band
        of rows (`sdvae_fast.parallel`: halo rows before every conv, whole-image GroupNorm statistics merged in
        rank order, attention over all tokens) and returns the full result (`gather=True`) or only its band, whose
        first output row is then `patch_parallel_offset`. `latent_dist.sample()` without a generator draws on the
        first rank and broadcasts. Runs the fast path's units whatever `backend` says (the ops use the Triton
        kernels on CUDA or under the interpreter, the PyTorch references elsewhere); inference only; fp32, bf16 and
        fp16 (the overflow guard decided by all ranks together).
        Tiling is turned off (bands and tiles do not combine: turning it on again makes encode / decode raise);
        slicing still splits the batch.

        Raises RuntimeError when torch.distributed is not initialised.
        """
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("enable_patch_parallel needs an initialised torch.distributed process group: call "
                               "torch.distributed.init_process_group('nccl' or 'gloo') first (torchrun only sets "
                               "the environment it reads)")
        self.use_tiling = False
        self._patch_parallel = (group, bool(gather))

    def disable_patch_parallel(self) -> None:
        """Encode / decode the whole image in this process again (the default)."""
        self._patch_parallel = None
        self.patch_parallel_offset = None

    def _validated(self, check: Callable, tensor, name: str):
        """check(tensor); under patch parallelism on every rank together (`parallel.agree`: a bad input on one
        rank raises the same ValueError on all, instead of leaving the others in a collective), and refusing
        tiling, which does not combine with bands."""
        if self._patch_parallel is None:
            return check(tensor)
        from sdvae_fast import parallel

        def check_all():
            if self.use_tiling:
                raise ValueError("tiling and patch parallelism do not combine (tiles would change the exact "
                                 "result): call disable_tiling() or disable_patch_parallel()")
            return check(tensor)

        return parallel.agree(check_all, self._patch_parallel[0], f"patch parallel {name}")

    def _parallel(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Run `parallel.encode_patch_parallel` / `decode_patch_parallel` on one validated batch."""
        from sdvae_fast import parallel

        group, gather = self._patch_parallel
        function = parallel.encode_patch_parallel if name == "encode" else parallel.decode_patch_parallel
        result = function(self, tensor, group, gather=gather)
        if gather:
            return result
        band, self.patch_parallel_offset = result
        return band

    # -- input validation ------------------------------------------------------------------------------------

    def _check_input(self, tensor, name: str, channels: int, min_size: int, what: str) -> torch.Tensor:
        """Validate a (N, channels, H, W) input and cast it to the model's dtype (pipelines pass other floats)."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of {what}, got {type(tensor).__name__}")
        if tensor.dim() != 4 or tensor.shape[1] != channels:
            raise ValueError(
                f"{name} must be {what} of shape (N, {channels}, H, W), got shape {tuple(tensor.shape)}"
            )
        n, _, h, w = tensor.shape
        if n == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(tensor.shape)})")
        if h < min_size or w < min_size:
            raise ValueError(f"{name}: height and width must be at least {min_size}, got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            hint = "convert uint8 images to float in [-1, 1] first" if what == "images" else "pass float latents"
            raise TypeError(f"{name} must be a floating-point tensor ({what}), got {tensor.dtype}; {hint}")
        device = self.device
        if tensor.device != device and not _offloaded(self):
            raise ValueError(f"{name} is on {tensor.device} but the model is on {device}; move one of them with .to()")
        return tensor.to(self.dtype)

    def _check_image(self, x) -> torch.Tensor:
        return self._check_input(x, "x", self.config.in_channels, self.downsample_factor, "images")

    def _check_latents(self, z) -> torch.Tensor:
        return self._check_input(z, "z", self.config.latent_channels, 1, "latents")

    # -- core: untiled encode / decode with the backend hook --------------------------------------------------

    def _fast(self, x: torch.Tensor, modules: tuple):
        """The `sdvae_fast.fast` module when the fast path should run `modules` on `x`, else None: not for
        backend "torch", nor "auto" off CUDA, nor when a parameter's device or dtype differs from x's (offloading
        and layerwise-casting hooks keep the modules' own forwards, which know how to run them)."""
        if self.backend == "torch" or (self.backend == "auto" and x.device.type != "cuda"):
            return None
        if not parameters_match(modules, x):
            return None
        try:
            from sdvae_fast import fast
        except ModuleNotFoundError as e:
            if e.name == "sdvae_fast.fast" and self.backend == "auto":
                return None
            raise
        return fast if fast.use_fast_path(self.backend, x.device) else None

    def _encode_untiled(self, x: torch.Tensor) -> torch.Tensor:
        """Moments `quant_conv(encoder(x))`, (N, 2c, H // f, W // f), without tiling. x is validated already."""
        if self._patch_parallel is not None:
            return self._parallel("encode", x)
        fast = self._fast(x, (self.encoder, self.quant_conv))
        if fast is not None:
            return fast.encode_moments(self, x, validate=False)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments

    def _decode_untiled(self, z: torch.Tensor) -> torch.Tensor:
        """Images `decoder(post_quant_conv(z))`, (N, out_channels, f*h, f*w), without tiling. z is validated."""
        if self._patch_parallel is not None:
            return self._parallel("decode", z)
        fast = self._fast(z, (self.decoder, self.post_quant_conv))
        if fast is not None:
            return fast.decode_sample(self, z, validate=False)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # -- tiling ------------------------------------------------------------------------------------------------

    def _check_tile_overlap(self) -> float:
        factor = float(self.tile_overlap_factor)
        if not 0.0 <= factor < 1.0:
            raise ValueError(f"tile_overlap_factor must be in [0, 1), got {self.tile_overlap_factor!r}")
        return factor

    def _run_tiled(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int, overlap: int,
                   align: int, scale: float) -> torch.Tensor:
        """Apply `fn` to overlapping tiles of x (N, C, H, W) and blend the results.

        Tiles are `tile` input pixels square with starts every `tile - overlap` (multiples of `align`); the last
        tile on each axis ends at the border. `fn` maps a tile of size (th, tw) to (th * scale, tw * scale)
        (floor for the encoder), and results are blended with linear ramps across overlaps, accumulated in fp32
        (fp64 for fp64 models), then cast to x's dtype.
        """
        height, width = x.shape[-2:]
        stride = tile - overlap

        def axis(length: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
            starts = _tile_starts(length, tile, stride, align)
            ends = [s + tile for s in starts[:-1]] + [length]  # the last tile runs to the border
            inputs = list(zip(starts, ends))
            outputs = [(int(s * scale), int(s * scale) + int((e - s) * scale)) for s, e in inputs]
            return inputs, outputs

        rows_in, rows_out = axis(height)
        cols_in, cols_out = axis(width)
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        wy = _blend_weights(rows_out, acc_dtype, x.device)
        wx = _blend_weights(cols_out, acc_dtype, x.device)
        out = weight_sum = None
        for (y0, y1), (oy0, oy1), w_row in zip(rows_in, rows_out, wy):
            for (x0, x1), (ox0, ox1), w_col in zip(cols_in, cols_out, wx):
                result = fn(x[:, :, y0:y1, x0:x1])
                if out is None:
                    out_shape = (x.shape[0], result.shape[1], rows_out[-1][1], cols_out[-1][1])
                    out = torch.zeros(out_shape, dtype=acc_dtype, device=x.device)
                    weight_sum = torch.zeros(out_shape[-2:], dtype=acc_dtype, device=x.device)
                w = w_row[:, None] * w_col[None, :]  # (oy1 - oy0, ox1 - ox0)
                out[:, :, oy0:oy1, ox0:ox1] += result.to(acc_dtype) * w
                weight_sum[oy0:oy1, ox0:ox1] += w
        return (out / weight_sum).to(x.dtype)

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Moments (N, 2c, H // f, W // f) from tiles of `tile_sample_min_size` pixels (approximate)."""
        f = self.downsample_factor
        tile = max(f, int(self.tile_sample_min_size) // f * f)
        overlap = int(tile * self._check_tile_overlap()) // f * f
        return self._run_tiled(x, self._encode_untiled, tile, overlap, align=f, scale=1.0 / f)

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, out_channels, f*h, f*w) from tiles of `tile_latent_min_size` latents (approximate)."""
        tile = max(1, int(self.tile_latent_min_size))
        overlap = min(tile - 1, int(tile * self._check_tile_overlap()))
        return self._run_tiled(z, self._decode_untiled, tile, overlap, align=1, scale=self.downsample_factor)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Moments (N, 2c, H // f, W // f) of one validated batch, tiled when tiling is on and x is larger than a
        tile (diffusers' `_encode` contract)."""
        size = self.tile_sample_min_size
        if self.use_tiling and (x.shape[-1] > size or x.shape[-2] > size):
            return self._tiled_encode(x)
        return self._encode_untiled(x)

    def _decode(self, z: torch.Tensor, return_dict: bool = True):
        """Images of one validated batch as `DecoderOutput` (or `(sample,)`), tiled when tiling is on and z is
        larger than a tile (diffusers' `_decode` contract)."""
        size = self.tile_latent_min_size
        if self.use_tiling and (z.shape[-1] > size or z.shape[-2] > size):
            sample = self._tiled_decode(z)
        else:
            sample = self._decode_untiled(z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    # -- public API ----------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Encode images into the posterior over latents.

        Args:
            x: images (N, in_channels, H, W) in [-1, 1], any float dtype (cast to the model's dtype), on the model's
                device, H and W >= f (f = 8 for SD); sides that are not multiples of f give floor(H / f) latent rows
                (the encoder's stride-2 arithmetic, as in diffusers: 468 rows give 58).
            return_dict: return `AutoencoderKLOutput(latent_dist=...)` if True, else the tuple `(latent_dist,)`.

        The posterior (`sdvae_fast.DiagonalGaussianDistribution`, diffusers' API; its `sample()` compiles with
        dynamic shapes) has moments (N, 2c, H // f, W // f) in the model's dtype. Raises TypeError / ValueError
        (naming the expected shape) for a non-tensor, wrong rank or channel count, too small or empty input,
        integer dtype, or a device other than the model's.
        """
        x = self._validated(self._check_image, x, "encode")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(part) for part in x.split(1)])
        else:
            moments = self._encode(x)
        if self._patch_parallel is not None and self._patch_parallel[1]:
            posterior = _SharedNoisePosterior(moments, self._patch_parallel[0])
        else:
            posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: GeneratorArg = None):
        """Decode latents into images.

        Args:
            z: unscaled latents (N, latent_channels, h, w), h, w >= 1, any float dtype (cast to the model's dtype),
                on the model's device. Pipelines pass `latents / scaling_factor + shift_factor`.
            return_dict: return `DecoderOutput(sample=...)` if True, else the tuple `(sample,)`.
            generator: accepted for diffusers compatibility; the KL decoder is deterministic and ignores it.

        `sample` is (N, out_channels, f*h, f*w) in the model's dtype, nominally in [-1, 1]. Raises as `encode`.
        """
        z = self._validated(self._check_latents, z, "decode")
        if self.use_slicing and z.shape[0] > 1:
            sample = torch.cat([self._decode(part).sample for part in z.split(1)])
        else:
            sample = self._decode(z).sample
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def tiled_encode(self, x: torch.Tensor, return_dict: bool = True):
        """`encode` in tiles regardless of `use_tiling` (approximate; see `enable_tiling`)."""
        posterior = DiagonalGaussianDistribution(self._tiled_encode(self._check_image(x)))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True):
        """`decode` in tiles regardless of `use_tiling` (approximate; see `enable_tiling`)."""
        sample = self._tiled_decode(self._check_latents(z))
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: GeneratorArg = None):
        """Reconstruct images: decode(posterior.sample(generator) if sample_posterior else posterior.mode()).

        Args:
            sample: images (N, in_channels, H, W) in [-1, 1] (as for `encode`).
            sample_posterior: draw z from the posterior instead of taking its mean.
            return_dict: return `DecoderOutput(sample=...)` if True, else `(sample,)`.
            generator: torch.Generator (or one per sample) for the posterior draw, drawn as diffusers draws it.

        Returns images (N, out_channels, f*(H // f), f*(W // f)) in the model's dtype.
        """
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z).sample
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"block_out_channels={list(cfg.block_out_channels)}, latent_channels={cfg.latent_channels}, "
                f"scaling_factor={cfg.scaling_factor}, shift_factor={cfg.shift_factor}, backend={self.backend!r}")


def _offloaded(module: nn.Module) -> bool:
    """Whether an offloading hook manages `module`'s weights (accelerate's `_hf_hook` on it or a child, or a
    diffusers hook registry): the weights then move to the input's device at call time."""
    return any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in module.modules())


# ---------------------------------------------------------------------------------------------------------------
# Without diffusers: the same API on the reference modules
# ---------------------------------------------------------------------------------------------------------------

_P = inspect.Parameter
#: diffusers' `AutoencoderKL.__init__` signature (field names and defaults from `sdvae_fast.configs.DEFAULTS`).
_STANDALONE_SIGNATURE = inspect.Signature(
    [_P("self", _P.POSITIONAL_OR_KEYWORD)] + [_P(k, _P.POSITIONAL_OR_KEYWORD, default=v) for k, v in DEFAULTS.items()]
)


def _needs_diffusers(feature: str):
    """A method that raises ImportError: `feature` is provided by diffusers, which is not installed."""

    def method(self, *args, **kwargs):
        raise ImportError(
            f"{feature} is a diffusers feature that StandaloneAutoencoderKL does not have: with diffusers installed "
            f"(pip install diffusers), sdvae_fast.AutoencoderKL is a subclass of diffusers.AutoencoderKL and has it"
        )

    method.__name__ = feature
    method.__doc__ = f"Raises ImportError: {feature} needs diffusers (not installed)."
    return method


class StandaloneAutoencoderKL(FastVAEMixin, nn.Module):
    """The Stable Diffusion VAE with diffusers' `AutoencoderKL` API on the reference modules, without diffusers.

    `sdvae_fast.AutoencoderKL` is this class when diffusers is not installed. Constructor arguments, config
    fields, module tree and `state_dict()` keys are diffusers' (`sdvae_fast.configs.DEFAULTS`):

        StandaloneAutoencoderKL(**diffusers_vae.config)      # same architecture; load_state_dict(diffusers sd) works
        StandaloneAutoencoderKL.from_config("sdxl")          # a preset, a config dict or a folder; fields overridable
        StandaloneAutoencoderKL.from_preset("sd15", seed=0)  # preset with seeded random weights (deterministic)
        StandaloneAutoencoderKL.from_pretrained("org/repo", subfolder="vae")   # folder or Hub id (sdvae_fast.loading)

    "_"-prefixed keys (`_class_name`, `_diffusers_version`) are ignored; unknown fields raise TypeError naming the
    valid ones; impossible values raise ValueError naming the field. Like diffusers' constructor this builds
    randomly initialised weights (PyTorch's default init).

    Attributes: `encoder`, `decoder` (`sdvae_fast.reference`), `quant_conv` (1x1 conv 2c -> 2c, or None when
    `use_quant_conv` is false), `post_quant_conv` (1x1 c -> c, or None), `config` (`VAEConfig`), `use_slicing`,
    `use_tiling`, `tile_sample_min_size` (pixels), `tile_latent_min_size` (latents), `tile_overlap_factor`,
    `backend` ("auto" | "triton" | "torch").
    Gradient checkpointing (`enable_gradient_checkpointing`) recomputes the encoder's and decoder's blocks and the
    mid blocks in the backward pass, as diffusers does.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True
    _keep_in_fp32_modules = None

    def __init__(self, *args, **kwargs):
        super().__init__()
        fields = _bind_fields(_STANDALONE_SIGNATURE, args, kwargs, "AutoencoderKL()")
        cfg = normalize_config(fields, source="AutoencoderKL()")
        object.__setattr__(self, "config", VAEConfig(cfg))
        common = dict(block_out_channels=cfg["block_out_channels"], layers_per_block=cfg["layers_per_block"],
                      norm_num_groups=cfg["norm_num_groups"], act_fn=cfg["act_fn"],
                      mid_block_add_attention=cfg["mid_block_add_attention"])
        self.encoder = Encoder(cfg["in_channels"], cfg["latent_channels"], double_z=True, **common)
        self.decoder = Decoder(cfg["latent_channels"], cfg["out_channels"], **common)
        c = cfg["latent_channels"]
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, kernel_size=1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(c, c, kernel_size=1) if cfg["use_post_quant_conv"] else None

        self.use_slicing = False
        self.use_tiling = False
        # Tile sizes as diffusers sets them: the config's sample_size in pixels, divided by f in latents.
        sample_size = cfg["sample_size"]
        sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = int(sample_size)
        self.tile_latent_min_size = int(sample_size / self.downsample_factor)
        self.tile_overlap_factor = 0.25
        self._init_backend()

    __init__.__signature__ = _STANDALONE_SIGNATURE

    # -- construction, loading, saving ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ConfigLike, **overrides) -> "StandaloneAutoencoderKL":
        """Build from a config (preset name, dict such as another model's `.config`, or folder) with random
        weights, as diffusers' `from_config` does; `overrides` replace fields. Raises as the constructor."""
        return cls(**{**resolve_config(config), **overrides})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "StandaloneAutoencoderKL":
        """Load a diffusers-layout folder or Hub repository id (config.json + safetensors, sharded or not), or the
        bundled "sdvae-fast/tiny"; diffusers' keyword arguments. See `sdvae_fast.loading.load_pretrained`."""
        from sdvae_fast import loading

        return loading.load_pretrained(cls, pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write `save_directory` in diffusers' layout (config.json + safetensors, sharded above `max_shard_size`);
        see `sdvae_fast.loading.save_pretrained`."""
        from sdvae_fast import loading

        loading.save_pretrained(self, save_directory, **kwargs)

    # -- properties ----------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the parameters (of the first one; `.to(dtype)` keeps them uniform)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters (those with requires_grad when `only_trainable`); the VAE has no embeddings."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    # -- gradient checkpointing (reference modules) ----------------------------------------------------------

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether any block recomputes its activations in the backward pass."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Optional[Callable] = None) -> None:
        """Recompute the encoder's and decoder's blocks (and the mid blocks) in the backward pass instead of
        keeping their activations. `gradient_checkpointing_func(fn, *args)` defaults to
        `torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)`. Training only: the fast path is
        inference-only and is not used under autograd anyway."""
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
                if gradient_checkpointing_func is not None:
                    module._gradient_checkpointing_func = gradient_checkpointing_func

    def disable_gradient_checkpointing(self) -> None:
        """Keep activations again (the default)."""
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    # -- features that only diffusers provides ----------------------------------------------------------------

    enable_layerwise_casting = _needs_diffusers("enable_layerwise_casting")
    enable_group_offload = _needs_diffusers("enable_group_offload")
    set_attn_processor = _needs_diffusers("set_attn_processor")
    set_default_attn_processor = _needs_diffusers("set_default_attn_processor")
    fuse_qkv_projections = _needs_diffusers("fuse_qkv_projections")
    unfuse_qkv_projections = _needs_diffusers("unfuse_qkv_projections")
    enable_xformers_memory_efficient_attention = _needs_diffusers("enable_xformers_memory_efficient_attention")
    set_attention_backend = _needs_diffusers("set_attention_backend")
    load_lora_adapter = _needs_diffusers("load_lora_adapter")


# ---------------------------------------------------------------------------------------------------------------
# With diffusers: a subclass of diffusers' own class
# ---------------------------------------------------------------------------------------------------------------

if HAS_DIFFUSERS:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL as _DiffusersAutoencoderKL
    from diffusers.utils.accelerate_utils import apply_forward_hook

    _DIFFUSERS_SIGNATURE = inspect.signature(_DiffusersAutoencoderKL.__init__)
    #: (path, subfolder) while `AutoencoderKL.from_pretrained` runs: its `load_config` then checks `_class_name`.
    _CHECK_CLASS_NAME: contextvars.ContextVar = contextvars.ContextVar("sdvae_fast_check_class_name", default=None)

    class AutoencoderKL(FastVAEMixin, _DiffusersAutoencoderKL):
        """`diffusers.AutoencoderKL` with sdvae-fast's backends (see the module docstring for what is added).

        Everything diffusers' class has works unchanged: constructor arguments, `config` (`FrozenDict`),
        `from_config`, `from_pretrained` (folders and Hub ids, variants, shards, `device_map`, ...),
        `save_pretrained`, gradient checkpointing, attention processors, layerwise casting, group offload,
        pipelines. Added or changed: `backend` / `set_backend`, input validation, `from_preset`,
        `from_single_file` (every checkpoint layout), `from_config` / `from_pretrained` also take a preset name
        and the bundled "sdvae-fast/tiny", and tiling keeps output shapes exact (`enable_tiling`).

            AutoencoderKL.from_pretrained("stabilityai/sdxl-vae")     # Hub id or folder, as in diffusers
            AutoencoderKL.from_config("sdxl")                          # preset, random weights
            AutoencoderKL.from_preset("sd15", seed=0)                  # preset, seeded weights
        """

        @functools.wraps(_DiffusersAutoencoderKL.__init__)
        def __init__(self, *args, **kwargs):
            fields = _bind_fields(_DIFFUSERS_SIGNATURE, args, kwargs, "AutoencoderKL()")
            normalize_config({k: v for k, v in fields.items() if k in DEFAULTS}, source="AutoencoderKL()",
                             check_block_types=False)
            super().__init__(*args, **kwargs)
            self._init_backend()
            # Read by diffusers' pipelines for their model_index.json (see the module docstring): diffusers'
            # AutoencoderKL loads the saved folder, so the entry names it and the pipeline loads without sdvae_fast.
            self.__dict__["__module__"] = "diffusers"

        encode = apply_forward_hook(FastVAEMixin.encode)
        decode = apply_forward_hook(FastVAEMixin.decode)

        @classmethod
        def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
            """diffusers' `from_config` (random weights); `config` may also be a preset name or a folder
            (`sdvae_fast.configs.resolve_config`)."""
            if isinstance(config, (str, os.PathLike)):
                config = resolve_config(config)
            return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
            """diffusers' `from_pretrained` (folder or Hub id, `subfolder`, `variant`, `torch_dtype`/`dtype`,
            `local_files_only`, `revision`, `cache_dir`, shards, `device_map`, `output_loading_info`, ...; its errors),
            plus the bundled name "sdvae-fast/tiny" (also "tiny") when no local path of that name exists.

            A folder (or repository, or its `subfolder`) whose config.json's `_class_name` is another of
            sdvae_fast's model types ("AutoencoderKLFlux2", "VQModel", "ConsistencyDecoderVAE") raises a
            `loading.CheckpointError` naming the class that loads it, before any weight is read: diffusers' own
            loader would build an AutoencoderKL from it and only log the weights it drops (FLUX.2's `bn`
            statistics, a codebook). Folders of "AutoencoderKL", or without `_class_name`, load as before."""
            from sdvae_fast.loading import TINY_FOLDER, TINY_NAMES

            name = pretrained_model_name_or_path
            if isinstance(name, str) and name in TINY_NAMES and not os.path.exists(name):  # a local path wins
                pretrained_model_name_or_path = str(TINY_FOLDER)
            # diffusers' from_pretrained reads config.json through cls.load_config (local folders and Hub ids
            # alike); the override below checks its _class_name while this call is in progress.
            token = _CHECK_CLASS_NAME.set((pretrained_model_name_or_path, kwargs.get("subfolder")))
            try:
                return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
            finally:
                _CHECK_CLASS_NAME.reset(token)

        @classmethod
        def load_config(cls, pretrained_model_name_or_path, *args, **kwargs):
            """diffusers' `load_config`; inside `from_pretrained` it also refuses a config.json whose
            `_class_name` names another model type (`loading._refuse_other_model_type`)."""
            result = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
            loading_call = _CHECK_CLASS_NAME.get()
            if loading_call is not None:
                from sdvae_fast.loading import _refuse_other_model_type

                config = result[0] if isinstance(result, tuple) else result
                class_name = config.get("_class_name") if isinstance(config, Mapping) else None
                if isinstance(class_name, str):
                    path, subfolder = loading_call
                    where = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
                    _refuse_other_model_type(where, cls, name=class_name, subfolder=subfolder)
            return result

else:
    AutoencoderKL = StandaloneAutoencoderKL
