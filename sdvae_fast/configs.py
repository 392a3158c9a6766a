"""Configs of the shipped SD VAEs, in diffusers' `config.json` field names, and `resolve_config`.

`PRESETS` maps a preset name to a complete config dict (every field of `diffusers.AutoencoderKL.__init__`):

| preset | model | latent_channels | scaling_factor | shift_factor | quant convs |
|---|---|---|---|---|---|
| `sd15` | SD 1.x / 2.x (also `vae-ft-mse-840000-ema`) | 4 | 0.18215 | None | yes |
| `sdxl` | SDXL | 4 | 0.13025 | None | yes |
| `sd3` | SD3 / SD3.5 | 16 | 1.5305 | 0.0609 | no |
| `flux1` | FLUX.1 | 16 | 0.3611 | 0.1159 | no |
| `tiny` | the shipped `sdvae-fast/tiny` (widths 16/32/64/64, 8 groups) | 4 | 0.18215 (its own is measured) | None | yes |
| `diffusers_test` | diffusers' own unit-test VAE (widths [2, 4], 2 groups) | 4 | 0.18215 | None | yes |

The four real ones share the kl-f8 architecture (widths 128/256/512/512, two resnets per encoder level, 32 groups);
values are those of the published diffusers `vae/config.json` files (docs/design.md, section 1).
Pipelines encode `(x - shift_factor) * scaling_factor` and decode `z / scaling_factor + shift_factor`.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Any, Mapping, Union

# diffusers' AutoencoderKL constructor fields and their defaults (diffusers 0.42 `AutoencoderKL.__init__`).
DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

CONFIG_FIELDS = tuple(DEFAULTS)

_SD_WIDTHS = (128, 256, 512, 512)


def _kl_f8(**fields) -> dict[str, Any]:
    """The kl-f8 SD VAE architecture with `fields` overriding diffusers' defaults."""
    config = dict(DEFAULTS)
    config.update(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=_SD_WIDTHS,
        layers_per_block=2,
    )
    config.update(fields)
    return config


PRESETS: dict[str, dict[str, Any]] = {
    "sd15": _kl_f8(sample_size=512, scaling_factor=0.18215),
    "sdxl": _kl_f8(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "sd3": _kl_f8(sample_size=1024, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                  use_quant_conv=False, use_post_quant_conv=False),
    "flux1": _kl_f8(sample_size=1024, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                    use_quant_conv=False, use_post_quant_conv=False),
    # The architecture of the embedded default `sdvae-fast/tiny` (trained by `sdvae-fast train`, shipped in
    # sdvae_fast/data/tiny): SD's kl-f8 structure with 1/8 of the widths and one resnet per encoder block (two per
    # decoder block); 0.98 M parameters.
    "tiny": _kl_f8(sample_size=256, block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                   force_upcast=False),
    # diffusers' tests/models/autoencoders `get_autoencoder_kl_config()`: two levels, widths [2, 4], 2 groups.
    "diffusers_test": dict(DEFAULTS, block_out_channels=(2, 4), norm_num_groups=2,
                           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
}

ConfigLike = Union[str, os.PathLike, Mapping[str, Any]]


def _freeze(value):
    """Lists (as JSON gives them) become tuples, so configs compare equal and cannot be mutated in place."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def normalize_config(fields: Mapping[str, Any], *, source: str = "config", strict: bool = True,
                     check_block_types: bool = True) -> dict[str, Any]:
    """A complete, validated config: diffusers' defaults updated with `fields`.

    Keys starting with "_" (`_class_name`, `_diffusers_version`, `_name_or_path`, ...) are ignored. Unknown public
    keys raise TypeError listing them and the valid fields when `strict`, else they are dropped with a warning
    (used for config.json files, which newer diffusers versions may extend). Sequences become tuples.

    Raises ValueError (naming `source` and the field) for values that cannot describe an AutoencoderKL: block
    types other than DownEncoderBlock2D/UpDecoderBlock2D, block type lists whose length differs from
    block_out_channels, widths not divisible by norm_num_groups, non-positive sizes, an unknown act_fn.
    `check_block_types=False` accepts any block type names (diffusers' own class builds more kinds; the fast path
    runs the ones it knows and falls back per unit for the others).
    """
    unknown = sorted(k for k in fields if not str(k).startswith("_") and k not in DEFAULTS)
    if unknown:
        message = f"{source}: unknown AutoencoderKL config field(s) {unknown}; valid fields: {list(CONFIG_FIELDS)}"
        if strict:
            raise TypeError(message)
        warnings.warn(message + " (ignored)", stacklevel=3)
    config = dict(DEFAULTS)
    config.update({k: _freeze(v) for k, v in fields.items() if k in DEFAULTS})
    _validate(config, source, check_block_types)
    return config


def _validate(config: dict[str, Any], source: str, check_block_types: bool = True) -> None:
    widths = config["block_out_channels"]
    if isinstance(widths, int):
        widths = config["block_out_channels"] = (widths,)
    if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"{source}: block_out_channels must be a non-empty list of positive ints, got {widths!r}")
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
        value = config[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{source}: {name} must be a positive int, got {value!r}")
    groups = config["norm_num_groups"]
    bad = [w for w in widths if w % groups]
    if bad:
        raise ValueError(
            f"{source}: every block_out_channels entry must be divisible by norm_num_groups ({groups}); "
            f"{bad} are not"
        )
    for name, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = config[name]
        if isinstance(types, str):
            types = config[name] = (types,)
        if len(types) != len(widths) or (check_block_types and any(t != block for t in types)):
            raise ValueError(
                f"{source}: {name} must be {len(widths)} x {block!r} (one per block_out_channels entry), "
                f"got {list(types)}"
            )
    from sdvae_fast.reference import _ACTIVATIONS

    if config["act_fn"] not in _ACTIVATIONS:
        raise ValueError(f"{source}: act_fn must be one of {sorted(_ACTIVATIONS)}, got {config['act_fn']!r}")
    if not isinstance(config["scaling_factor"], (int, float)) or config["scaling_factor"] == 0:
        raise ValueError(f"{source}: scaling_factor must be a non-zero number, got {config['scaling_factor']!r}")
    for name in ("latents_mean", "latents_std"):
        value = config[name]
        if value is not None and len(value) != config["latent_channels"]:
            raise ValueError(
                f"{source}: {name} must have latent_channels ({config['latent_channels']}) entries, got {len(value)}"
            )


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid JSON config ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config.json must hold a JSON object, got {type(data).__name__}")
    return data


def resolve_config(config: ConfigLike) -> dict[str, Any]:
    """A complete, validated config dict (diffusers' field names) from any of:

    - a preset name: one of `PRESETS` ("sd15", "sdxl", "sd3", "flux1", "diffusers_test");
    - a mapping of config fields (missing fields take diffusers' defaults; "_"-prefixed keys are ignored;
      unknown keys raise TypeError);
    - a diffusers model folder holding `config.json`, a folder whose `vae/` subfolder holds one (a pipeline
      folder), or the path of a `config.json` itself (unknown keys there are dropped with a warning).

    Returns a new dict each call (sequences as tuples). Raises ValueError listing the valid preset names for a
    string that is neither a preset nor an existing path, FileNotFoundError for a folder without config.json.
    """
    if isinstance(config, Mapping):
        return normalize_config(config, source="config")
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(
            f"config must be a preset name, a dict of config fields or a path, got {type(config).__name__}"
        )
    name = os.fspath(config)
    if name in PRESETS:
        return copy.deepcopy(PRESETS[name])
    if os.path.isdir(name):
        for candidate in (os.path.join(name, "config.json"), os.path.join(name, "vae", "config.json")):
            if os.path.isfile(candidate):
                return normalize_config(_read_config_file(candidate), source=candidate, strict=False)
        raise FileNotFoundError(f"{name}: folder has no config.json (nor vae/config.json)")
    if os.path.isfile(name):
        return normalize_config(_read_config_file(name), source=name, strict=False)
    raise ValueError(
        f"config {name!r} is neither a preset nor an existing path; valid preset names: {sorted(PRESETS)}"
    )


# Presets that exist for tests only (not offered by the command line, not listed in README.md).
TEST_PRESETS = ("diffusers_test",)
# The presets `sdvae-fast --preset` (and `train --preset`) offer, in PRESETS' order: the public SD VAE families and
# the shipped tiny VAE. The one list the command line's help and README.md show (tests/test_cli.py checks README).
PUBLIC_PRESETS = tuple(name for name in PRESETS if name not in TEST_PRESETS)


def config_dict(vae) -> dict:
    """The model's config as a plain dict of diffusers field names (FrozenDict, dataclass or namespace)."""
    cfg = vae.config
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    import dataclasses

    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(vars(cfg))


def scaling_of(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a VAE's config; a missing or None shift_factor is 0."""
    cfg = config_dict(vae)
    shift = cfg.get("shift_factor")
    return float(cfg["scaling_factor"]), float(shift) if shift is not None else 0.0


def family_of(scaling: float, shift: float) -> str:
    """The public preset whose scaling_factor / shift_factor these are ("sd3", ...), or "" when none is."""
    for name in PUBLIC_PRESETS:
        preset = PRESETS[name]
        if preset["scaling_factor"] == scaling and float(preset.get("shift_factor") or 0.0) == shift:
            return name
    return ""


# FLUX.2's VAE (`sdvae_fast.AutoencoderKLFlux2`, diffusers' `AutoencoderKLFlux2`): its own config fields, so its
# presets live apart from `PRESETS` (AutoencoderKL fields only). Values: the defaults of diffusers 0.42.1's
# `AutoencoderKLFlux2.__init__`, which are the published FLUX.2 `vae/config.json` (kl-f8, 32 latent channels, quant
# convs, BatchNorm eps 1e-4 and momentum 0.1 over 2x2-patchified latents, no scaling_factor / shift_factor); the
# small decoder (black-forest-labs/FLUX.2-small-decoder, diffusers pull request 13428 added
# `decoder_block_out_channels` for it) has decoder widths 96/192/384/384 with the full encoder.
_FLUX2 = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": _SD_WIDTHS,
    "decoder_block_out_channels": None,
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 32,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": (2, 2),
}

FLUX2_PRESETS: dict[str, dict[str, Any]] = {
    "flux2": dict(_FLUX2),
    "flux2-small": dict(_FLUX2, decoder_block_out_channels=(96, 192, 384, 384)),
}
# The presets the command line's `--preset` of the VAE commands offers: the AutoencoderKL ones, then FLUX.2's
# (`train --preset` keeps PUBLIC_PRESETS: it trains AutoencoderKLs only).
CLI_PRESETS = PUBLIC_PRESETS + tuple(FLUX2_PRESETS)
# ---------------------------------------------------------------------------------------------------------------
# VQ autoencoders (issue 14): diffusers VQModel fields, used by `sdvae_fast.VQModel.from_preset` and the CLI
# ---------------------------------------------------------------------------------------------------------------

_VQ_LEVELS = dict(layers_per_block=2, in_channels=3, out_channels=3, norm_num_groups=32)
#: Architectures of latent diffusion's VQ first stages (its configs `vq-f4` and `vq-f8`: ch 128, ch_mult
#: (1, 2, 4) / (1, 2, 2, 4), 2 resnets per level, attention at resolution 32 of 256 for f8, i.e. the lowest
#: level), as diffusers VQModel fields. scaling_factor 1.0: latent diffusion's default `scale_factor`, which its
#: VQ LDM configs keep. Not in `PRESETS` (those are AutoencoderKL configs).
VQ_PRESETS = {
    "vq-f4": dict(_VQ_LEVELS, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(128, 256, 512), latent_channels=3, num_vq_embeddings=8192, scaling_factor=1.0),
    "vq-f8": dict(_VQ_LEVELS, down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
                  up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
                  block_out_channels=(128, 256, 256, 512), latent_channels=4, num_vq_embeddings=16384,
                  scaling_factor=1.0),
}
