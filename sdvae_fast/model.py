"""`sdvae_fast.AutoencoderKL`: a drop-in for `diffusers.AutoencoderKL` (the kl-f8 Stable Diffusion VAE).

Same constructor fields, config, module tree and `state_dict()` keys as diffusers, and the API that pipelines use:
`encode(x).latent_dist`, `decode(z).sample`, `forward`, slicing, tiling, `quant_conv` / `post_quant_conv`,
`.dtype`, `.device`, `from_pretrained` / `save_pretrained` / `from_single_file` (in `sdvae_fast.loading`).

Two forwards share one module tree: the reference modules of `sdvae_fast.reference` (plain PyTorch, the oracle)
and the fast path of `sdvae_fast.fast` (Triton kernels, CUDA), chosen per call by `backend`:

- "auto" (default, or env `SDVAE_FAST_BACKEND`): the fast path on CUDA when `fast.use_fast_path` agrees,
  the reference modules elsewhere (on CPU `sdvae_fast.fast` is never imported);
- "triton": always the fast path (errors come from `fast.use_fast_path`, e.g. no CUDA and no interpreter);
- "torch": always the reference modules.

Tensors: images (N, in_channels, H, W) in [-1, 1]; latents (N, latent_channels, H // f, W // f) with
f = 2 ** (len(block_out_channels) - 1) (8 for every public VAE), unscaled: pipelines multiply by
`config.scaling_factor` (after subtracting `config.shift_factor`) themselves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from sdvae_fast.backends import BACKEND_ENV, BACKENDS, check_backend
from sdvae_fast.configs import PRESETS, ConfigLike, normalize_config, resolve_config
from sdvae_fast.reference import Decoder, DiagonalGaussianDistribution, Encoder, GeneratorArg


# ---------------------------------------------------------------------------------------------------------------
# Outputs and config
# ---------------------------------------------------------------------------------------------------------------


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


@dataclass
class DecoderOutput(_ModelOutput):
    """Output of `AutoencoderKL.decode`: `sample`, the decoded images (N, out_channels, H, W) in the model's dtype,
    nominally in [-1, 1] (not clamped). `commit_loss` exists for diffusers compatibility and is always None."""

    sample: torch.Tensor
    commit_loss: Optional[torch.Tensor] = None


@dataclass
class AutoencoderKLOutput(_ModelOutput):
    """Output of `AutoencoderKL.encode`: `latent_dist`, the posterior `DiagonalGaussianDistribution` over
    (N, latent_channels, h, w) latents."""

    latent_dist: DiagonalGaussianDistribution


class VAEConfig(Mapping):
    """Read-only config with diffusers' field names, readable as attributes and as a mapping.

    `config.scaling_factor`, `config["latent_channels"]`, `dict(config)`, `config.get("shift_factor")` all work;
    `AutoencoderKL(**dict(config))` rebuilds the same architecture. Assigning raises AttributeError (build a new
    model, or pass overrides to the constructor / loader, instead).
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", dict(data))

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"AutoencoderKL config has no field {name!r}; fields: {list(self._data)}") from None

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"AutoencoderKL config is read-only (tried to set {name!r})")

    def __getitem__(self, key: str):
        try:
            return self._data[key]
        except KeyError:
            raise KeyError(f"AutoencoderKL config has no field {key!r}; fields: {list(self._data)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __reduce__(self):
        return (VAEConfig, (self._data,))

    def __repr__(self) -> str:
        return f"VAEConfig({self._data!r})"


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
# The model
# ---------------------------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """The Stable Diffusion VAE with diffusers' `AutoencoderKL` API, weights layout and config.

    Construction (fields are diffusers' `AutoencoderKL.__init__` arguments, see `sdvae_fast.configs.DEFAULTS`):

        AutoencoderKL(**diffusers_vae.config)         # same architecture; load_state_dict(diffusers sd) works
        AutoencoderKL(config="sdxl")                   # a preset ("sd15", "sdxl", "sd3", "flux1", "diffusers_test")
        AutoencoderKL(config="path/to/vae", scaling_factor=0.13025)   # a diffusers folder, fields overridden
        AutoencoderKL.from_preset("sd15", seed=0)      # preset with seeded random weights (deterministic)

    Keys starting with "_" (`_class_name`, `_diffusers_version`) are ignored; unknown fields raise TypeError.
    Like diffusers' constructor this builds randomly initialised weights (PyTorch's default init).

    Attributes: `encoder`, `decoder` (`sdvae_fast.reference`), `quant_conv` (1x1 conv 2c -> 2c, or None when
    `use_quant_conv` is false), `post_quant_conv` (1x1 c -> c, or None), `config` (`VAEConfig`), `use_slicing`,
    `use_tiling`, `tile_sample_min_size` (pixels), `tile_latent_min_size` (latents), `tile_overlap_factor`,
    `backend` ("auto" | "triton" | "torch").
    """

    def __init__(self, config: Optional[ConfigLike] = None, **kwargs):
        super().__init__()
        base = resolve_config(config) if config is not None else {}
        cfg = normalize_config({**base, **kwargs}, source="AutoencoderKL()")
        self.config = VAEConfig(cfg)
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

        self.backend = "auto"
        self.set_backend(os.environ.get(BACKEND_ENV) or "auto", _source=f"environment variable {BACKEND_ENV}")

    # -- construction helpers ------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, *, dtype: Optional[torch.dtype] = None,
                    device: Union[str, torch.device, None] = None, **overrides) -> "AutoencoderKL":
        """A preset's architecture with deterministic random weights: PyTorch's default init drawn from
        `torch.manual_seed(seed)` in a forked RNG state (the global RNG is left untouched). Same seed, same torch
        version: bitwise the same weights. `overrides` replace config fields (e.g. narrow `block_out_channels`
        for tests). The model is returned in eval mode, moved to `dtype` / `device` when given.

        Such weights decode to no meaningful image: they exist for tests, benchmarks and demos.
        Raises ValueError listing the presets for an unknown name.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid preset names: {sorted(PRESETS)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config=name, **overrides)
        return model.eval().to(device=device, dtype=dtype)

    @classmethod
    def from_config(cls, config: ConfigLike, **overrides) -> "AutoencoderKL":
        """Build from a config (preset name, dict such as another model's `.config`, or folder) with random
        weights, as diffusers' `from_config` does; `overrides` replace fields."""
        return cls(config=config, **overrides)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "AutoencoderKL":
        """Load a diffusers-layout folder (config.json + safetensors); see `sdvae_fast.loading.load_pretrained`."""
        from sdvae_fast import loading

        return loading.load_pretrained(cls, path, **kwargs)

    @classmethod
    def from_single_file(cls, path, config: Optional[ConfigLike] = None, **overrides) -> "AutoencoderKL":
        """Load one checkpoint file of any known layout (diffusers or LDM names, whole-model checkpoints, pickles);
        see `sdvae_fast.loading.load_single_file`. `config` (preset, folder or dict) and `overrides` win over the
        architecture and scaling factor inferred from the file."""
        from sdvae_fast import loading

        return loading.load_single_file(cls, path, config=config, **overrides)

    def save_pretrained(self, folder, **kwargs) -> None:
        """Write `folder` in diffusers' layout (config.json + safetensors); see `sdvae_fast.loading.save_pretrained`."""
        from sdvae_fast import loading

        loading.save_pretrained(self, folder, **kwargs)

    # -- properties and switches -----------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the parameters (of the first one; `.to(dtype)` keeps them uniform)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: f = 2 ** (len(block_out_channels) - 1) (8 for every public VAE)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def set_backend(self, name: str, *, _source: str = "backend") -> None:
        """Choose the forward: "auto" (fast path on CUDA when available, else PyTorch), "triton" (always the fast
        path), or "torch" (always the reference modules). Raises ValueError for any other name."""
        self.backend = check_backend(name, _source)

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
            raise TypeError(
                f"{name} must be a floating-point tensor ({what}), got {tensor.dtype}; convert uint8 images to "
                f"float in [-1, 1] first"
            )
        device = self.device
        if tensor.device != device:
            raise ValueError(
                f"{name} is on {tensor.device} but the model is on {device}; move one of them with .to()"
            )
        return tensor.to(self.dtype)

    # -- core: untiled encode / decode with the backend hook --------------------------------------------------

    def _fast(self, device: torch.device):
        """The `sdvae_fast.fast` module when the fast path should run on `device`, else None."""
        if self.backend == "torch" or (self.backend == "auto" and device.type != "cuda"):
            return None
        try:
            from sdvae_fast import fast
        except ModuleNotFoundError as e:
            if e.name == "sdvae_fast.fast" and self.backend == "auto":
                return None
            raise
        return fast if fast.use_fast_path(self.backend, device) else None

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Moments `quant_conv(encoder(x))`, (N, 2c, H // f, W // f), without tiling. x is validated already."""
        fast = self._fast(x.device)
        if fast is not None:
            return fast.encode_moments(self, x, validate=False)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images `decoder(post_quant_conv(z))`, (N, out_channels, f*h, f*w), without tiling (a tensor, not a
        DecoderOutput as in diffusers). z is validated already."""
        fast = self._fast(z.device)
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
        return self._run_tiled(x, self._encode, tile, overlap, align=f, scale=1.0 / f)

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, out_channels, f*h, f*w) from tiles of `tile_latent_min_size` latents (approximate)."""
        tile = max(1, int(self.tile_latent_min_size))
        overlap = min(tile - 1, int(tile * self._check_tile_overlap()))
        return self._run_tiled(z, self._decode, tile, overlap, align=1, scale=self.downsample_factor)

    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        size = self.tile_sample_min_size
        if self.use_tiling and (x.shape[-1] > size or x.shape[-2] > size):
            return self._tiled_encode(x)
        return self._encode(x)

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        size = self.tile_latent_min_size
        if self.use_tiling and (z.shape[-1] > size or z.shape[-2] > size):
            return self._tiled_decode(z)
        return self._decode(z)

    # -- public API ----------------------------------------------------------------------------------------

    def _check_image(self, x) -> torch.Tensor:
        return self._check_input(x, "x", self.config.in_channels, self.downsample_factor, "images")

    def _check_latents(self, z) -> torch.Tensor:
        return self._check_input(z, "z", self.config.latent_channels, 1, "latents")

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Encode images into the posterior over latents.

        Args:
            x: images (N, in_channels, H, W) in [-1, 1], any float dtype (cast to the model's dtype), on the model's
                device, H and W >= f (f = 8 for SD); sides that are not multiples of f give floor(H / f) latent rows
                (the encoder's stride-2 arithmetic, as in diffusers: 468 rows give 58).
            return_dict: return `AutoencoderKLOutput(latent_dist=...)` if True, else the tuple `(latent_dist,)`.

        The posterior's moments are (N, 2c, H // f, W // f) in the model's dtype. Raises TypeError / ValueError
        (naming the expected shape) for a non-tensor, wrong rank or channel count, too small or empty input,
        integer dtype, or a device other than the model's.
        """
        x = self._check_image(x)
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode_one(part) for part in x.split(1)])
        else:
            moments = self._encode_one(x)
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: GeneratorArg = None):
        """Decode latents into images.

        Args:
            z: unscaled latents (N, latent_channels, h, w), h, w >= 1, any float dtype (cast to the model's dtype),
                on the model's device. Pipelines pass `latents / scaling_factor + shift_factor`.
            return_dict: return `DecoderOutput(sample=...)` if True, else the tuple `(sample,)`.
            generator: accepted for diffusers compatibility; the KL decoder is deterministic and ignores it.

        `sample` is (N, out_channels, f*h, f*w) in the model's dtype, nominally in [-1, 1]. Raises as `encode`.
        """
        z = self._check_latents(z)
        if self.use_slicing and z.shape[0] > 1:
            sample = torch.cat([self._decode_one(part) for part in z.split(1)])
        else:
            sample = self._decode_one(z)
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

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
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"block_out_channels={list(cfg.block_out_channels)}, latent_channels={cfg.latent_channels}, "
                f"scaling_factor={cfg.scaling_factor}, shift_factor={cfg.shift_factor}, backend={self.backend!r}")
