"""Loading and saving VAE weights: diffusers folders, single-file checkpoints of every common layout, inspection.

Public functions (the `AutoencoderKL` classmethods `from_pretrained` / `from_single_file` and the method
`save_pretrained` delegate here; `cls` is the model class to build, ours or diffusers' `AutoencoderKL`):

- `load_pretrained(cls, path, subfolder=None, torch_dtype=None, variant=None, **overrides)`: a diffusers folder
  (`config.json` + `diffusion_pytorch_model.safetensors`, or `.bin`), or the bundled name "sdvae-fast/tiny".
- `save_pretrained(model, folder, safe_serialization=True, variant=None)`: the same diffusers layout, readable by
  `diffusers.AutoencoderKL.from_pretrained`.
- `load_single_file(cls, path, config=None, torch_dtype=None, **overrides)`: one `.safetensors` / `.ckpt` / `.pt` /
  `.bin` file in any layout below; the architecture is inferred from the weight shapes and the scaling factor from
  the model family.
- `inspect_checkpoint(path)`: what `load_single_file` would detect, as a dict (the CLI's `info` command), with
  where each value that weights cannot tell came from.
- `infer_architecture(shapes)`: the architecture config fields that diffusers-named weight shapes imply.
- `safetensors_metadata(config)`: the metadata our writers store in safetensors files (the config, as JSON).
- `load_vae(path, subfolder=None, **kwargs)`: a folder (or Hub id) as the class its config.json's `_class_name`
  names (`MODEL_CLASSES`): `sdvae_fast.AutoencoderKL`, or `sdvae_fast.ConsistencyDecoderVAE` for DALL-E 3's
  consistency decoder (`openai/consistency-decoder`'s layout) through `load_consistency_decoder(cls, path, ...)`,
  which checks every key first: missing or mis-shaped weights raise a CheckpointError listing them, where
  diffusers' `from_pretrained` (without accelerate) initialises missing ones at random and only logs their names.
  `folder_class_name(folder)` reads the `_class_name`; `load_pretrained` with an AutoencoderKL class (and, with
  diffusers, `sdvae_fast.AutoencoderKL.from_pretrained`) refuses a ConsistencyDecoderVAE, AutoencoderKLFlux2 or
  VQModel folder, naming the class that loads it (`_refuse_other_model_type`).

All loaders take `unsafe_pickle=False` (see Pickles below) and return the model in eval mode, on CPU, in float32
unless `torch_dtype` says otherwise. Local paths only: Hub repository ids are not downloaded.

Layouts recognised in one file (detected from the key names, never from the file name):

| layout | example key |
|---|---|
| `diffusers` | `encoder.down_blocks.0.resnets.0.conv1.weight`, `encoder.mid_block.attentions.0.to_q.weight` |
| `diffusers-old-attention` | `encoder.mid_block.attentions.0.query.weight` (also `key`, `value`, `proj_attn`) |
| `ldm` (original CompVis / Stability names) | `encoder.down.0.block.0.norm1.weight`, `encoder.mid.attn_1.q.weight` |

Any of them may sit under a prefix beside other components (`first_stage_model.` in whole-model SD 1.x/2.x/SDXL/SD3
checkpoints, `vae.` in some others) and inside a pickle's `state_dict` entry beside EMA bookkeeping (`model_ema.*`)
and training-loss weights (`loss.*`); every key outside the VAE is ignored. EMA copies stored by LDM's `LitEma`
under `model_ema.*` are not used: the main weights are loaded (pruned releases already hold the EMA values there).

LDM -> diffusers naming (facts of the two code bases, written out here): `down.{i}.block.{j}` ->
`down_blocks.{i}.resnets.{j}`; `down.{i}.downsample.conv` -> `down_blocks.{i}.downsamplers.0.conv`;
`up.{i}` -> `up_blocks.{n-1-i}` (LDM numbers decoder levels by resolution, `up.0` being the full-resolution level
that runs last; diffusers numbers them in execution order, `up_blocks.0` being the lowest resolution);
`upsample.conv` -> `upsamplers.0.conv`;
`mid.block_{1,2}` -> `mid_block.resnets.{0,1}`; `mid.attn_1.{norm,q,k,v,proj_out}` ->
`mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` with 1x1-conv weights `[C, C, 1, 1]` squeezed to
linear `[C, C]`; `nin_shortcut` -> `conv_shortcut`; `norm_out` -> `conv_norm_out`.

Model family and scaling factor (pipelines encode `(z - shift_factor) * scaling_factor`):

| evidence | family | scaling_factor | shift_factor |
|---|---|---|---|
| 4 latent channels + `conditioner.embedders.*` keys (SDXL whole model) | `sdxl` | 0.13025 | none |
| 4 latent channels + `cond_stage_model.*` keys (SD 1.x / 2.x whole model) | `sd15` | 0.18215 | none |
| 16 latent channels + `joint_blocks` / `text_encoders.*` keys (SD3 whole model) | `sd3` | 1.5305 | 0.0609 |
| 16 latent channels + `double_blocks` keys (FLUX.1 whole model) | `flux1` | 0.3611 | 0.1159 |
| 4 latent channels + `edm_mean` / `edm_std` keys (Playground v2.5) | `sdxl`, those as `latents_mean/std` | 0.5 | none |
| VAE-only file, 4 latent channels | `sd15` (commoner), with an `AmbiguousFamilyWarning` | 0.18215 | none |
| VAE-only file, 16 latent channels | `flux1` (commoner), with an `AmbiguousFamilyWarning` | 0.3611 | 0.1159 |

The weights of SD 1.x and SDXL VAEs (and of SD3 and FLUX.1 VAEs) have identical shapes, so a VAE-only file cannot be
told apart; the warning names the override (`scaling_factor=`, or `config="sdxl"` / `config="sd3"`). An explicit
`scaling_factor=` (directly, or through a preset, a folder's config.json or a dict given as `config=`) always wins,
and no warning is given then; a value equal to a candidate family's also selects that family's `shift_factor`.

What weight shapes cannot tell (`norm_num_groups`: GroupNorm stores one weight per channel; `scaling_factor`,
`shift_factor`, `latents_mean/std`, `force_upcast`, `sample_size`, `act_fn`) is taken, in increasing precedence,
from: the detected family's preset (diffusers' default `norm_num_groups=32`, the value of every public SD VAE);
a diffusers `config.json` in the same folder as the file (when its `_class_name` is AutoencoderKL); the file's
own safetensors metadata (a JSON `config` entry, and entries named like fields, e.g. `norm_num_groups` = "8";
`save_pretrained` and the trainer write both); then `config=`; then keyword overrides. A file-side config whose
architecture contradicts the weights describes another model: it is ignored with a warning.
`inspect_checkpoint` reports in `config_sources` where `norm_num_groups` and `scaling_factor` came from, and says
"assumed" when nothing stated them (the CLI's `info` prints that word).

A checkpoint trained with other groups but loaded with an assumed 32 computes a different function without any
error. When 32 does not divide the widths, loading fails with a `CheckpointError` that lists the counts that
would and names `norm_num_groups=` / `config=` (the CLI says `--norm-num-groups N` / `--config config.json`).
When 32 does divide them, an `AssumedNormGroupsWarning` naming the override is given, except for the published
SD architectures (widths 128/256/512/512 as in the `sd15`/`sdxl`/`sd3`/`flux1` presets): every public SD VAE
file lacks the metadata and uses 32 groups, and a warning on each of them would be noise that teaches users to
ignore it; for those `inspect_checkpoint` (and `info`) still report the value as assumed.

Pickles (`.ckpt`, `.pt`, `.bin`) are opened with `torch.load(weights_only=True)`: only tensors and plain
containers are built. A file that needs other Python objects is refused with a `CheckpointError` naming them;
`unsafe_pickle=True` opts in to a full unpickle, which can run arbitrary code: use it only for files you trust.

Every failure about a file's content is one `CheckpointError` (a `ValueError`) naming the file: unreadable,
truncated or corrupt files, refused pickles, and missing or mis-shaped keys (all listed together). Weights are
assigned only after every key and shape has been checked, so no half-loaded model is ever returned.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import inspect
import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors import safe_open

from sdvae_fast.configs import CONFIG_FIELDS, PRESETS, resolve_config

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
SAFETENSORS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# The bundled tiny VAE trained by `sdvae-fast train`: `load_pretrained(cls, "sdvae-fast/tiny")` (or "tiny").
TINY_NAMES = ("sdvae-fast/tiny", "tiny")
TINY_FOLDER = Path(__file__).resolve().parent / "data" / "tiny"

# Written as `_diffusers_version` when diffusers is not installed: the version this layout was checked against.
DIFFUSERS_VERSION_FALLBACK = "0.42.1"

# The fields that decide parameter names and shapes (inferred from the weights of a single file).
ARCHITECTURE_FIELDS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "latent_channels", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
)

# Families a VAE-only file may belong to, by latent channel count; the first is taken when nothing tells them apart.
FAMILIES_BY_LATENT_CHANNELS = {4: ("sd15", "sdxl"), 16: ("flux1", "sd3")}
FAMILY_NAMES = {"sd15": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3", "flux1": "FLUX.1"}

# Prefixes of a VAE inside a whole-model checkpoint, preferred in this order when several VAEs are present.
KNOWN_PREFIXES = ("", "first_stage_model.", "vae.")
# A shape error lists at most this many keys of each kind (missing, mis-shaped), then a count of the rest.
MAX_LISTED_KEYS = 40
VAE_TOP_LEVEL = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be loaded; the message names the file and says what is wrong."""


class AmbiguousFamilyWarning(UserWarning):
    """The model family (hence `scaling_factor` / `shift_factor`) of a VAE-only file was guessed; see the message."""


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------


def _is_safetensors(path: Path) -> bool:
    """True when the file starts like safetensors: an 8-byte little-endian header length, then a JSON object."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + header_len <= size


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """Names of the Python globals a pickle needs beyond what `weights_only=True` allows."""
    names: list[str] = []
    if zipfile.is_zipfile(path):
        try:
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # an unreadable archive: fall back to the error text
            names = []
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    return sorted(set(names))


def _load_pickle(path: Path, unsafe_pickle: bool) -> Any:
    """`torch.load` on CPU, weights only unless `unsafe_pickle`; every failure becomes a CheckpointError."""
    is_zip = zipfile.is_zipfile(path)
    try:
        # mmap keeps a multi-GB whole-model checkpoint out of RAM; only the zip format supports it.
        return torch.load(path, map_location="cpu", weights_only=not unsafe_pickle, mmap=is_zip)
    except pickle.UnpicklingError as e:
        needed = _unsafe_globals(path, e) if not unsafe_pickle else []
        if needed:
            raise CheckpointError(
                f"{path}: refusing to unpickle: the file needs the Python objects {', '.join(needed)}, which "
                f"torch.load(weights_only=True) does not build. Unpickling them can run arbitrary code; pass "
                f"unsafe_pickle=True only if you trust this file (or convert it to .safetensors)."
            ) from e
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or not a PyTorch pickle): {e}") from e
    except Exception as e:  # truncated zip archives, wrong magic numbers, EOF in the middle of a pickle...
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def _tensor_dicts(obj: Any) -> list[dict[str, torch.Tensor]]:
    """The flat {name: tensor} dicts a loaded pickle holds: itself and its `state_dict` / `model` / `module`."""
    found = []
    candidates = [obj]
    if isinstance(obj, Mapping):
        candidates += [obj[k] for k in ("state_dict", "model", "module") if isinstance(obj.get(k), Mapping)]
    for candidate in candidates:
        if isinstance(candidate, Mapping):
            tensors = {k: v for k, v in candidate.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if tensors:
                found.append(tensors)
    return found


class _Checkpoint:
    """The tensor names of one file and a way to read a subset of them (safetensors reads only those)."""

    def __init__(self, path: Path, unsafe_pickle: bool = False):
        self.path = path
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: the file is empty")
        # Sniffed from the content (a .ckpt may hold safetensors); a damaged .safetensors still gets its own error.
        self.format = "safetensors" if _is_safetensors(path) or path.suffix == ".safetensors" else "pickle"
        self._tensors: Optional[dict[str, torch.Tensor]] = None
        if self.format == "safetensors":
            try:
                with safe_open(path, framework="pt") as f:
                    self.keys = list(f.keys())
                    self.metadata: dict[str, str] = dict(f.metadata() or {})
            except Exception as e:  # SafetensorError: bad header, truncated data section, ...
                raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
        else:
            self.metadata = {}
            dicts = _tensor_dicts(_load_pickle(path, unsafe_pickle))
            # Prefer the dict that holds a VAE (a `state_dict` entry), else the largest.
            with_vae = [d for d in dicts if _vae_prefixes(d.keys())]
            chosen = with_vae or sorted(dicts, key=len, reverse=True)
            self._tensors = chosen[0] if chosen else {}
            self.keys = list(self._tensors)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{name: tensor} on CPU for the given names (all present in `self.keys`)."""
        if self._tensors is not None:
            return {n: self._tensors[n] for n in names}
        try:
            with safe_open(self.path, framework="pt") as f:
                return {n: f.get_tensor(n) for n in names}
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensors (truncated or corrupt?): {e}") from e


# ---------------------------------------------------------------------------------------------------------------
# Key names: finding the VAE, LDM -> diffusers, old attention names
# ---------------------------------------------------------------------------------------------------------------


def _vae_prefixes(keys) -> list[str]:
    """Prefixes p such that p + 'encoder.conv_in.weight' or p + 'decoder.conv_in.weight' is a key."""
    prefixes = set()
    for key in keys:
        for anchor in ("encoder.conv_in.weight", "decoder.conv_in.weight"):
            if key.endswith(anchor):
                prefix = key[: -len(anchor)]
                if prefix == "" or prefix.endswith("."):
                    prefixes.add(prefix)
    return sorted(prefixes)


def _choose_prefix(keys: list[str], path: Path) -> str:
    prefixes = _vae_prefixes(keys)
    if not prefixes:
        sample = ", ".join(keys[:5]) or "(no tensors)"
        raise CheckpointError(
            f"{path}: no VAE weights found (no key ends in 'encoder.conv_in.weight' or 'decoder.conv_in.weight'; "
            f"{len(keys)} tensors, first: {sample})"
        )
    for known in KNOWN_PREFIXES:
        if known in prefixes:
            return known
    if len(prefixes) == 1:
        return prefixes[0]
    raise CheckpointError(f"{path}: several VAEs found, under the prefixes {prefixes}; extract one first")


# LDM names -> diffusers names. Each rule: (pattern on the LDM key, function of the match and the level count).
_LDM_RESNET_PART = r"(norm1|conv1|norm2|conv2|nin_shortcut)"
_LDM_ATTENTION_PART = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _resnet_part(part: str) -> str:
    return "conv_shortcut" if part == "nin_shortcut" else part


_LDM_RULES: list[tuple[re.Pattern, Callable[[re.Match, int], str]]] = [
    (re.compile(r"^(quant_conv|post_quant_conv)\.(weight|bias)$"), lambda m, n: m.group(0)),
    (re.compile(r"^(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)$"), lambda m, n: m.group(0)),
    (re.compile(r"^(encoder|decoder)\.norm_out\.(weight|bias)$"),
     lambda m, n: f"{m[1]}.conv_norm_out.{m[2]}"),
    (re.compile(rf"^encoder\.down\.(\d+)\.block\.(\d+)\.{_LDM_RESNET_PART}\.(weight|bias)$"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet_part(m[3])}.{m[4]}"),
    (re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
    (re.compile(rf"^decoder\.up\.(\d+)\.block\.(\d+)\.{_LDM_RESNET_PART}\.(weight|bias)$"),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_resnet_part(m[3])}.{m[4]}"),
    (re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$"),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
    (re.compile(rf"^(encoder|decoder)\.mid\.block_([12])\.{_LDM_RESNET_PART}\.(weight|bias)$"),
     lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet_part(m[3])}.{m[4]}"),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$"),
     lambda m, n: f"{m[1]}.mid_block.attentions.0.{_LDM_ATTENTION_PART[m[2]]}.{m[3]}"),
]

# Attention projection names of diffusers before 0.14 -> today's.
_OLD_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_OLD_ATTENTION_PART = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_LINEAR = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _detect_layout(keys: list[str], path: Path) -> str:
    """'ldm', 'diffusers-old-attention' or 'diffusers', from VAE keys without prefix."""
    ldm = any(re.match(r"^(encoder|decoder)\.(down|up|mid)\.", k) for k in keys)
    diffusers = any(re.match(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.", k) for k in keys)
    if ldm and diffusers:
        raise CheckpointError(f"{path}: the VAE keys mix LDM names (encoder.down.*) and diffusers names "
                              f"(encoder.down_blocks.*); cannot tell which to use")
    if ldm:
        return "ldm"
    if any(_OLD_ATTENTION.match(k) for k in keys):
        return "diffusers-old-attention"
    return "diffusers"


def _to_diffusers_names(tensors: dict[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename VAE tensors (keys without prefix) to diffusers' names; returns (state dict, keys left unmapped).

    Attention projections stored as 1x1 convs `[C_out, C_in, 1, 1]` become linear weights `[C_out, C_in]`.
    """
    state: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    if layout == "ldm":
        levels = {int(m[1]) for k in tensors if (m := re.match(r"^(?:decoder\.up|encoder\.down)\.(\d+)\.", k))}
        num_levels = max(levels) + 1 if levels else 0
        for key, value in tensors.items():
            for pattern, rename in _LDM_RULES:
                if m := pattern.match(key):
                    state[rename(m, num_levels)] = value
                    break
            else:
                unmapped.append(key)
    else:
        for key, value in tensors.items():
            m = _OLD_ATTENTION.match(key)
            state[f"{m[1]}{_OLD_ATTENTION_PART[m[2]]}.{m[3]}" if m else key] = value
    for key, value in state.items():
        if _ATTENTION_LINEAR.search(key) and value.dim() == 4 and value.shape[2:] == (1, 1):
            state[key] = value[:, :, 0, 0]  # (C_out, C_in, 1, 1) conv -> (C_out, C_in) linear
    return state, unmapped


# ---------------------------------------------------------------------------------------------------------------
# Architecture and family inference
# ---------------------------------------------------------------------------------------------------------------


def infer_architecture(shapes: Mapping[str, torch.Size]) -> dict:
    """Architecture config fields read from diffusers-named weight shapes; fields that cannot be read are left out.

    `shapes`: {diffusers parameter name: shape}. Returns a subset of ARCHITECTURE_FIELDS:
    block_out_channels[i] = output channels of `encoder.down_blocks.{i}.resnets.0.conv1` (or of the decoder's
    mirrored level); layers_per_block = resnets per encoder level (the decoder has one more);
    latent_channels = input channels of `decoder.conv_in` (or half the encoder's `conv_out` outputs: mean and
    logvar); quant convs and the mid-block attention are present when their weights are.
    """
    def levels(side: str) -> list[int]:
        pattern = re.compile(rf"^{side}\.(\d+)\.")
        return sorted({int(m[1]) for k in shapes if (m := pattern.match(k))})

    def count(prefix: str) -> int:
        pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
        return len({m[1] for k in shapes if (m := pattern.match(k))})

    config: dict[str, Any] = {}
    down, up = levels("encoder.down_blocks"), levels("decoder.up_blocks")
    num_levels = len(down) or len(up)
    widths = []
    for i in range(num_levels):
        # Level i of the encoder mirrors level n-1-i of the decoder; conv1's weight is (width, C_in, 3, 3).
        conv1 = (shapes.get(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")
                 or shapes.get(f"decoder.up_blocks.{num_levels - 1 - i}.resnets.0.conv1.weight"))
        widths.append(int(conv1[0]) if conv1 else None)
    if num_levels and None not in widths:
        config["block_out_channels"] = tuple(widths)
        config["down_block_types"] = ("DownEncoderBlock2D",) * num_levels
        config["up_block_types"] = ("UpDecoderBlock2D",) * num_levels
    if down:
        config["layers_per_block"] = count("encoder.down_blocks.0.resnets.")
    elif up:
        config["layers_per_block"] = count("decoder.up_blocks.0.resnets.") - 1
    if "decoder.conv_in.weight" in shapes:
        config["latent_channels"] = int(shapes["decoder.conv_in.weight"][1])
    elif "encoder.conv_out.weight" in shapes:
        config["latent_channels"] = int(shapes["encoder.conv_out.weight"][0]) // 2  # mean and logvar
    if "encoder.conv_in.weight" in shapes:
        config["in_channels"] = int(shapes["encoder.conv_in.weight"][1])
    if "decoder.conv_out.weight" in shapes:
        config["out_channels"] = int(shapes["decoder.conv_out.weight"][0])
    config["use_quant_conv"] = "quant_conv.weight" in shapes
    config["use_post_quant_conv"] = "post_quant_conv.weight" in shapes
    config["mid_block_add_attention"] = any(".mid_block.attentions." in k for k in shapes)
    return config


def _family_from_keys(keys: list[str]) -> Optional[tuple[str, str]]:
    """(family, reason) from the other components of a whole-model checkpoint, or None for a VAE-only file."""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl", "whole-model checkpoint with conditioner.embedders.* (SDXL's text encoders)"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd15", "whole-model checkpoint with cond_stage_model.* (SD 1.x/2.x's text encoder)"
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") or k.startswith("text_encoders.") for k in keys):
        return "sd3", "whole-model checkpoint with joint_blocks / text_encoders.* (SD3's MMDiT)"
    if any(".double_blocks." in k or k.startswith("double_blocks.") for k in keys):
        return "flux1", "whole-model checkpoint with double_blocks (FLUX.1's transformer)"
    return None


def _preset(name: str) -> dict:
    """A copy of the named preset of `sdvae_fast.configs` (full diffusers config dict)."""
    return copy.deepcopy(dict(PRESETS[name]))


def _detect_family(keys: list[str], latent_channels: Optional[int], scaling_factor: Optional[float]):
    """(family or None, certain, reason). An explicit scaling_factor equal to a candidate's picks that family."""
    candidates = FAMILIES_BY_LATENT_CHANNELS.get(latent_channels, ())
    if not candidates:
        return None, False, f"no known family has {latent_channels} latent channels"
    hint = _family_from_keys(keys)
    if hint is not None and hint[0] in candidates:
        return hint[0], True, hint[1]
    if scaling_factor is not None:
        for family in candidates:
            if _preset(family)["scaling_factor"] == scaling_factor:
                return family, True, f"scaling_factor={scaling_factor} given"
    names = " or ".join(FAMILY_NAMES[f] for f in candidates)
    return candidates[0], False, f"VAE-only file with {latent_channels} latent channels: {names}"


def _ambiguity_message(path: Path, family: str, reason: str, latent_channels: int) -> str:
    chosen = _preset(family)
    others = [f for f in FAMILIES_BY_LATENT_CHANNELS[latent_channels] if f != family]
    hints = []
    for other in others:
        p = _preset(other)
        shift = f", shift_factor={p['shift_factor']}" if p.get("shift_factor") is not None else ""
        hints.append(f"config={other!r} (or scaling_factor={p['scaling_factor']}{shift}) for {FAMILY_NAMES[other]}")
    shift = f", shift_factor={chosen['shift_factor']}" if chosen.get("shift_factor") is not None else ""
    return (f"{path}: {reason}; the weights cannot tell them apart. Using {FAMILY_NAMES[family]} "
            f"(scaling_factor={chosen['scaling_factor']}{shift}), the commoner family. Pass "
            + "; ".join(hints) + " if that is what this VAE belongs to.")


# ---------------------------------------------------------------------------------------------------------------
# Config handling and model construction
# ---------------------------------------------------------------------------------------------------------------


def _read_config_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object of config fields, got {type(config).__name__}")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _config_from_argument(config: Union[str, os.PathLike, Mapping, None]) -> dict:
    """The fields a `config=` argument sets: all of them for a preset name or a diffusers folder (see
    `sdvae_fast.configs.resolve_config`), only its own keys for a dict (the rest is still inferred)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        fields = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
        unknown = sorted(k for k in fields if k not in CONFIG_FIELDS)
        if unknown:
            raise TypeError(f"config: unknown AutoencoderKL config field(s) {unknown}; valid: {list(CONFIG_FIELDS)}")
        return fields
    return resolve_config(config)


def _accepted_fields(cls) -> Optional[set]:
    """Keyword names `cls.__init__` accepts, or None when it takes **kwargs."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {name for name in params if name != "self"}


def _check_overrides(cls, overrides: Mapping) -> None:
    accepted = _accepted_fields(cls)
    allowed = set(CONFIG_FIELDS) | (accepted or set())
    unknown = sorted(k for k in overrides if k not in allowed)
    if unknown:
        raise TypeError(f"unknown config override(s) {unknown}; expected diffusers AutoencoderKL config fields: "
                        f"{', '.join(CONFIG_FIELDS)}")


def _resolve_dtype(torch_dtype) -> Optional[torch.dtype]:
    aliases = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
               "fp64": torch.float64, "float64": torch.float64, "double": torch.float64}
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        if torch_dtype is not None and not torch_dtype.is_floating_point:
            raise ValueError(f"torch_dtype must be a floating-point dtype, got {torch_dtype}")
        return torch_dtype
    if isinstance(torch_dtype, str) and torch_dtype.removeprefix("torch.") in aliases:
        return aliases[torch_dtype.removeprefix("torch.")]
    raise ValueError(f"torch_dtype must be a torch.dtype or one of {sorted(aliases)}, got {torch_dtype!r}")


def _check_groups(config: dict, path: Path, assumed: bool = False) -> None:
    """Raise CheckpointError when norm_num_groups does not divide every width; the message lists the counts
    that would, says whether the value was assumed, and names `norm_num_groups=` and `config=`."""
    groups = config.get("norm_num_groups", 32)
    widths = list(config.get("block_out_channels", ()))
    bad = [c for c in widths if c % groups]
    if bad:
        how = (" (assumed: GroupNorm groups cannot be read from the weights, and neither the file's metadata nor "
               "a config.json beside it states them)") if assumed else ""
        raise CheckpointError(
            f"{path}: norm_num_groups={groups}{how} does not divide the widths {bad} of block_out_channels="
            f"{widths}. Pass norm_num_groups=N with the value the VAE was trained with (one of "
            f"{allowed_group_counts(widths)}), or config='path/to/config.json'"
        )


def _shape_errors(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor]) -> tuple[list, list]:
    missing = sorted(k for k in expected if k not in state)
    misshaped = sorted(
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k])}"
        for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])
    )
    return missing, misshaped


def _misfit_message(path: Path, model: str, missing: list, misshaped: list, hint: str = "", unused: list = (),
                    naming: str = "") -> str:
    """The CheckpointError text for weights that do not fit `model` (a description such as
    "AutoencoderKL(latent_channels=4, ...)"): every missing, mis-shaped and unused key, up to MAX_LISTED_KEYS of
    each; `naming` (how the listed names relate to the file's) follows the first line, `hint` ends it."""
    lines = [f"{path}: the checkpoint does not fit {model}" + (f"; {naming}" if naming else ".")]
    for what, keys in (("missing", missing), ("mis-shaped", misshaped), ("unused", unused)):
        if keys:
            more = f"\n  ... and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else ""
            lines.append(f"{len(keys)} {what} key(s):\n  " + "\n  ".join(keys[:MAX_LISTED_KEYS]) + more)
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def _build_and_load(cls, config: dict, state: dict[str, torch.Tensor], path: Path, torch_dtype, hint: str = ""):
    """Construct `cls(**config)` and load `state` into it, after checking every key and shape.

    Raises CheckpointError listing all missing and mis-shaped keys (nothing is built or returned then). Keys of
    `state` the model does not have are ignored. The model is returned in eval mode, on CPU, in `torch_dtype`
    (float32 when None).
    """
    dtype = _resolve_dtype(torch_dtype) or torch.float32
    accepted = _accepted_fields(cls)
    # Only diffusers' fields (config.json files of newer diffusers versions may carry more) that `cls` takes.
    kwargs = {k: v for k, v in config.items() if k in CONFIG_FIELDS and (accepted is None or k in accepted)}
    _check_groups(kwargs, path)
    try:
        # Construct on the meta device: no memory, no random init; the checked weights are assigned below.
        with torch.device("meta"):
            model = cls(**kwargs)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot build {cls.__name__} from the config {kwargs}: {e}") from e
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, misshaped = _shape_errors(expected, state)
    if missing or misshaped:
        raise CheckpointError(_misfit_message(path, f"{cls.__name__}({_short_config(kwargs)})", missing,
                                              misshaped, hint))
    return assign_weights(model, lambda: cls(**kwargs), state, dtype)


def assign_weights(model, build: Callable[[], torch.nn.Module], state: Mapping[str, torch.Tensor],
                   dtype: torch.dtype) -> torch.nn.Module:
    """Load the checked `state` (a superset of `model`'s keys, shapes already checked) into `model`, built on the
    meta device, by assignment: floating tensors in `dtype`, others (e.g. BatchNorm's num_batches_tracked) as
    they are; always copies, since tensors of a memory-mapped file must not stay tied to it (a later overwrite
    would change them). Buffers outside the state dict (non-persistent) would stay on meta: then the model is
    rebuilt for real with `build()` and the weights copied in. Returns the model in eval mode."""
    weights = {k: state[k].to(dtype=dtype if state[k].is_floating_point() else state[k].dtype, copy=True)
               .contiguous() for k in model.state_dict()}
    model.load_state_dict(weights, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model = build()
        model.load_state_dict(weights, strict=True)
        model.to(dtype)
    return model.eval()


def _short_config(config: dict) -> str:
    return ", ".join(f"{k}={config[k]!r}" for k in ARCHITECTURE_FIELDS + ("norm_num_groups",)
                     if k in config and k not in ("down_block_types", "up_block_types"))


def _frozen(value):
    """Lists as tuples, so that values from JSON, presets and inference compare equal."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _model_config(model) -> dict:
    """The model's config as a plain dict of diffusers fields (diffusers' FrozenDict, a dataclass or an object)."""
    config = model.config
    if isinstance(config, Mapping):
        fields = dict(config)
    elif dataclasses.is_dataclass(config):
        fields = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):
        fields = dict(config.to_dict())
    else:
        fields = dict(vars(config))
    return {k: v for k, v in fields.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def _resolve_folder(path: PathLike, subfolder: Optional[str], **hub_options) -> Path:
    """The local folder of a model: the bundled tiny VAE for its names (unless a local path of that name exists),
    a local folder, or a Hub repository id through `sdvae_fast.hub.resolve_folder` (cache first)."""
    if not Path(path).exists() and str(path) in TINY_NAMES:
        folder = TINY_FOLDER / subfolder if subfolder else TINY_FOLDER
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"the bundled VAE {str(path)!r} is not installed: {folder} has no {CONFIG_NAME} (the package was "
                f"installed without its data files; reinstall sdvae-fast, or pass a local folder)"
            )
        return folder
    from sdvae_fast import hub

    return hub.resolve_folder(path, subfolder=subfolder, **hub_options)


def _find_weights(folder: Path, variant: Optional[str], use_safetensors: Optional[bool] = None) -> list[Path]:
    """The weight files of a diffusers folder (one file, or the shards of an index); see `hub.find_weights`."""
    from sdvae_fast import hub

    return hub.find_weights(folder, variant, use_safetensors)


def _read_weights(paths: list[Path], unsafe_pickle: bool) -> dict[str, torch.Tensor]:
    """Every tensor of one weights file or of all shards, renamed to diffusers' current names."""
    tensors: dict[str, torch.Tensor] = {}
    for weights_path in paths:
        checkpoint = _Checkpoint(weights_path, unsafe_pickle)
        tensors.update(checkpoint.read(checkpoint.keys))
    state, _ = _to_diffusers_names(tensors, _detect_layout(list(tensors), paths[0]))
    return state


def _placement(device_map) -> Optional[torch.device]:
    """The one device a `device_map` names: None, a device string ("cpu", "cuda:0"), an index (0 = "cuda:0"), a
    torch.device, or {"": one of those}. Raises ValueError for a name that is not a device, for maps that split
    the model ("auto", "balanced", per-module dicts: those need diffusers and accelerate), and for a CUDA device
    this torch cannot use."""
    if device_map is None:
        return None
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"device_map={device_map!r} splits the model across devices, which needs diffusers and "
                         f"accelerate; the standalone loader places the whole model on one device ('cpu', 'cuda:0')")
    if isinstance(device_map, dict):
        raise ValueError(f"device_map={device_map!r}: a per-module map needs diffusers and accelerate; the standalone "
                         f"loader takes one device ('cpu', 'cuda:0', 0, or {{'': device}})")
    try:
        device = torch.device("cuda", device_map) if isinstance(device_map, int) else torch.device(device_map)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device_map={device_map!r} is not a device; expected e.g. 'cpu', 'cuda:0' or 0") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map={device_map!r}: this torch has no usable CUDA device")
    return device


def load_pretrained(cls, path: PathLike, subfolder: Optional[str] = None, torch_dtype=None,
                    variant: Optional[str] = None, unsafe_pickle: bool = False, *, dtype=None,
                    use_safetensors: Optional[bool] = None, local_files_only: bool = False, cache_dir=None,
                    revision: Optional[str] = None, token=None, force_download: bool = False,
                    low_cpu_mem_usage: bool = True, device_map=None, output_loading_info: bool = False,
                    ignore_mismatched_sizes: bool = False, **overrides):
    """Build `cls` (an AutoencoderKL class) from a diffusers model folder or Hub repository: `config.json` + weights.

    Args:
        cls: the model class; `cls(**config_fields)` must build it with diffusers' parameter names.
        path: a local folder holding `config.json` and `diffusion_pytorch_model.safetensors` (or the pickle
            `diffusion_pytorch_model.bin`, read with `weights_only=True`, or shards listed by
            `diffusion_pytorch_model.safetensors.index.json`); a Hub repository id "org/name" (read from the local
            Hugging Face cache, downloaded when missing and allowed: `sdvae_fast.hub.resolve_folder`); or the
            bundled name "sdvae-fast/tiny" ("tiny"; an existing local path of that name wins). A single file is
            passed to `load_single_file`.
        subfolder: folder inside `path`, e.g. "vae" for a pipeline folder or repository.
        variant: read `diffusion_pytorch_model.{variant}.safetensors` (or `.bin`, or its shards), e.g. "fp16".
        torch_dtype (or its alias `dtype`): dtype of the returned parameters (torch.dtype or "fp16"/"bf16"/"fp32"/
            "fp64"); float32 if None.
        unsafe_pickle: allow a `.bin` that needs arbitrary Python objects (runs code from the file).
        use_safetensors: True reads only safetensors, False only `.bin`, None prefers safetensors (diffusers').
        local_files_only, cache_dir, revision, token, force_download: Hub options (`huggingface_hub`).
        low_cpu_mem_usage: accepted for diffusers compatibility; the weights are assigned once either way.
        device_map: one device for the whole model ("cpu", "cuda:0", {"": "cuda:0"}); None keeps it on the CPU.
        output_loading_info: also return {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}
            (always empty lists: anything missing or mis-shaped raises instead).
        ignore_mismatched_sizes: only False (mis-shaped weights always raise, listed); True raises ValueError.
        **overrides: config fields that win over config.json (e.g. `scaling_factor=0.13025`).

    Returns the model in eval mode (or `(model, loading_info)`). Old diffusers attention names
    (query/key/value/proj_attn) are renamed.
    Raises OSError (no such folder, repository or cached snapshot; no weights file, e.g. only a variant: the
    message names it), FileNotFoundError (bundled VAE absent), CheckpointError (unreadable config or weights,
    missing or mis-shaped keys: all listed; a folder whose config.json `_class_name` is "ConsistencyDecoderVAE",
    "AutoencoderKLFlux2" or "VQModel" while `cls` is no such class: the message names that class's
    `from_pretrained` and `load_vae`, which load it), TypeError (unknown override
    names), ValueError (`torch_dtype` and `dtype` disagree, a device_map that splits the model).
    """
    if dtype is not None:
        if torch_dtype is not None and torch_dtype != dtype:
            raise ValueError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree; pass one of them")
        torch_dtype = dtype
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes=True is not supported: the standalone loader never loads a "
                         "checkpoint whose shapes differ from the config (it lists them instead)")
    device = _placement(device_map)
    _check_overrides(cls, overrides)
    if Path(path).is_file():
        if subfolder:
            raise ValueError(f"subfolder={subfolder!r} given but path {str(path)!r} is a file, not a folder")
        model = load_single_file(cls, path, torch_dtype=torch_dtype, unsafe_pickle=unsafe_pickle, **overrides)
    else:
        folder = _resolve_folder(path, subfolder, revision=revision, cache_dir=cache_dir,
                                 local_files_only=local_files_only, token=token, force_download=force_download)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(f"{folder}: no {CONFIG_NAME} (a diffusers model folder holds {CONFIG_NAME} and "
                                  f"{SAFETENSORS_WEIGHTS_NAME}; for a pipeline folder pass subfolder='vae')")
        _refuse_other_model_type(folder, cls, subfolder=subfolder)
        config = {**_read_config_json(config_path), **overrides}
        paths = _find_weights(folder, variant, use_safetensors)
        model = _build_and_load(cls, config, _read_weights(paths, unsafe_pickle), paths[0], torch_dtype)
    if device is not None:
        model = model.to(device)
    if output_loading_info:
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model


def save_pretrained(model, folder: PathLike, safe_serialization: bool = True, variant: Optional[str] = None,
                    is_main_process: bool = True, max_shard_size=None, push_to_hub: bool = False,
                    **kwargs) -> Path:
    """Write `model` as a diffusers folder: `config.json` and `diffusion_pytorch_model.safetensors`.

    config.json holds `_class_name: "AutoencoderKL"`, `_diffusers_version` (the installed diffusers', else
    DIFFUSERS_VERSION_FALLBACK) and every config field of the model; the weights are its `state_dict()` on CPU in
    the model's dtype. `diffusers.AutoencoderKL.from_pretrained(folder)` loads the result, and `load_pretrained`
    loads folders diffusers wrote. Creates `folder` (and parents); overwrites those files. Returns the folder.

    The keyword arguments are those diffusers' `save_pretrained` takes (pipelines pass them to every component):
    `safe_serialization=False` writes the pickle `diffusion_pytorch_model.bin` instead; `variant="fp16"` names the
    file `diffusion_pytorch_model.fp16.safetensors`; `is_main_process=False` writes nothing (distributed
    training); weights larger than `max_shard_size` (bytes or "10GB"-style, default diffusers' "10GB") are split
    into shards with an index file, as diffusers names them (`sdvae_fast.hub.write_weights`). Other keyword
    arguments diffusers' pipelines pass (`save_function`, `use_flashpack`, ...) are accepted and ignored.
    Raises ValueError when the model's config lacks an architecture field, NotImplementedError for push_to_hub.
    """
    if push_to_hub:
        raise NotImplementedError("save_pretrained(push_to_hub=True): uploading is not supported; save locally")
    folder = Path(folder)
    config = _model_config(model)
    absent = [k for k in ARCHITECTURE_FIELDS + ("norm_num_groups", "scaling_factor") if k not in config]
    if absent:
        raise ValueError(f"model.config lacks the field(s) {absent}; cannot write a loadable config.json")
    if not is_main_process:
        return folder
    try:
        version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        version = DIFFUSERS_VERSION_FALLBACK
    config_json = {"_class_name": "AutoencoderKL", "_diffusers_version": version, **config}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config_json, f, indent=2, sort_keys=True)  # tuples are written as JSON lists
        f.write("\n")
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    from sdvae_fast import hub

    # The config also goes into the file's metadata, so the weights file alone loads exactly (from_single_file).
    hub.write_weights(weights, folder, variant=variant, safe_serialization=safe_serialization,
                      max_shard_size=max_shard_size, metadata=safetensors_metadata(config))
    return folder


def _playground_statistics(checkpoint: _Checkpoint, latent_channels: Optional[int]) -> dict:
    """Playground v2.5 whole-model checkpoints store per-channel latent statistics as `edm_mean` / `edm_std`
    (shape (1, C, 1, 1)) and use scaling_factor 0.5 (diffusers' PLAYGROUND_VAE_SCALING_FACTOR); {} otherwise."""
    if not {"edm_mean", "edm_std"} <= set(checkpoint.keys):
        return {}
    stats = checkpoint.read(["edm_mean", "edm_std"])
    mean, std = (stats[k].detach().double().flatten().tolist() for k in ("edm_mean", "edm_std"))
    if len(mean) != latent_channels or len(std) != latent_channels:
        return {}
    return {"latents_mean": tuple(mean), "latents_std": tuple(std), "scaling_factor": 0.5}


# Config fields that weight shapes cannot tell; a file's metadata or a config.json beside it may supply them.
NON_ARCHITECTURE_FIELDS = tuple(k for k in CONFIG_FIELDS if k not in ARCHITECTURE_FIELDS)
# Where a config value came from, as `inspect_checkpoint` reports it in `config_sources`.
SOURCE_METADATA = "file metadata"
SOURCE_BESIDE = "config.json beside the file"
SOURCE_ARGUMENT = "argument"
SOURCE_FOLDER = "config.json"
ASSUMED = "assumed"


class AssumedNormGroupsWarning(UserWarning):
    """`norm_num_groups` of a single file was assumed (32) although its widths allow other group counts."""


def safetensors_metadata(config: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors metadata our writers store beside VAE weights: {"format": "pt", "config": JSON of every
    public config field, "norm_num_groups": str(int)}, so `load_single_file` reads back what shapes cannot tell.

    `config`: a model's config (mapping of diffusers field names; "_"-prefixed keys are left out). Returns a
    str -> str dict (safetensors metadata holds strings only). Raises TypeError for values JSON cannot hold.
    """
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()
              if not str(k).startswith("_") and k in CONFIG_FIELDS}
    metadata = {"format": "pt", "config": json.dumps(fields, sort_keys=True)}
    if fields.get("norm_num_groups") is not None:
        metadata["norm_num_groups"] = str(int(fields["norm_num_groups"]))
    return metadata


def _metadata_config(checkpoint: "_Checkpoint") -> dict:
    """Config fields a safetensors file's `__metadata__` states: a JSON `config` entry (a dict of diffusers
    fields) and entries named like config fields (`norm_num_groups`, `scaling_factor`, ... as JSON values);
    a named entry wins over the same field inside `config`. Unknown names are ignored; {} for pickles.

    Raises CheckpointError naming the file and the entry when a known entry is not valid JSON of the right kind.
    """
    metadata = checkpoint.metadata
    fields: dict[str, Any] = {}
    if "config" in metadata:
        try:
            value = json.loads(metadata["config"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{checkpoint.path}: metadata entry 'config' is not JSON ({e})") from e
        if not isinstance(value, dict):
            raise CheckpointError(f"{checkpoint.path}: metadata entry 'config' must be a JSON object of config "
                                  f"fields, got {type(value).__name__}")
        fields.update({k: v for k, v in value.items() if k in CONFIG_FIELDS})
    for name in CONFIG_FIELDS:
        if name in metadata and name != "config":
            try:
                fields[name] = json.loads(metadata[name])
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{checkpoint.path}: metadata entry {name!r}={metadata[name]!r} is not a "
                                      f"JSON value ({e})") from e
    groups = fields.get("norm_num_groups")
    if groups is not None and (not isinstance(groups, int) or isinstance(groups, bool) or groups <= 0):
        raise CheckpointError(f"{checkpoint.path}: metadata says norm_num_groups={groups!r}; expected a positive "
                              f"integer")
    return fields


def _beside_config(path: Path) -> tuple[dict, Optional[Path]]:
    """The fields of a diffusers `config.json` in the file's folder when it describes an AutoencoderKL
    (`_class_name` "AutoencoderKL", or no class name but `latent_channels`), else ({}, None)."""
    candidate = path.parent / CONFIG_NAME
    if not candidate.is_file():
        return {}, None
    try:
        with open(candidate, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}, None  # not ours to judge: some other tool's file
    if not isinstance(data, dict):
        return {}, None
    if data.get("_class_name", "AutoencoderKL") != "AutoencoderKL" or "latent_channels" not in data:
        return {}, None
    return {k: v for k, v in data.items() if k in CONFIG_FIELDS}, candidate


def _contradiction(fields: Mapping, inferred: Mapping) -> list[str]:
    """Architecture fields of `fields` that differ from what the weights imply, as "name=value (weights: v)"."""
    return [f"{k}={_plain(fields[k])} (weights: {_plain(v)})" for k, v in inferred.items()
            if k in fields and _frozen(fields[k]) != _frozen(v)]


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def allowed_group_counts(widths) -> list[int]:
    """Every GroupNorm group count that divides all of `widths` (a sequence of positive ints), ascending."""
    widths = [int(w) for w in widths]
    return [g for g in range(1, min(widths) + 1) if all(w % g == 0 for w in widths)] if widths else []


def _is_public_architecture(config: Mapping) -> bool:
    """Whether the architecture fields equal those of a published SD VAE preset (all of which use 32 groups)."""
    return any(all(_frozen(config.get(k)) == _frozen(PRESETS[name].get(k)) for k in ARCHITECTURE_FIELDS)
               for name in ("sd15", "sdxl", "sd3", "flux1"))


def _groups_message(path: Path, config: Mapping) -> str:
    groups = config.get("norm_num_groups", 32)
    others = [g for g in allowed_group_counts(config.get("block_out_channels", ())) if g != groups]
    return (f"{path}: norm_num_groups={groups} is assumed (GroupNorm groups cannot be read from the weights, and "
            f"neither the file's metadata nor a config.json beside it states them); the widths "
            f"{list(config.get('block_out_channels', ()))} also allow {others}. A VAE trained with another count "
            f"loads without error but computes a different function. Pass norm_num_groups=N (or "
            f"config='path/to/config.json') if this VAE was trained with other groups.")



#: Tensors beside a VAE's that make it another model than AutoencoderKL: (name under the VAE's prefix, model, loader).
_OTHER_MODELS = (("bn.running_mean", "FLUX.2's VAE (its latent BatchNorm)", "AutoencoderKLFlux2.from_single_file"),
                 ("quantize.embedding.weight", "a VQ autoencoder (its codebook)", "VQModel.from_single_file"))


def _refuse_other_single_file(keys: list[str], prefix: str, path: Path) -> None:
    """Raise CheckpointError naming the right loader when the VAE under `prefix` is FLUX.2's or a VQ model:
    loading only its AutoencoderKL part would silently drop the BatchNorm or the quantiser."""
    names = set(keys)
    for key, model, loader in _OTHER_MODELS:
        if prefix + key in names:
            raise CheckpointError(f"{path}: {prefix}{key} marks {model}, not an AutoencoderKL; load it with "
                                  f"sdvae_fast.{loader}")


def _read_single_file(path: PathLike, config, overrides: Mapping, unsafe_pickle: bool) -> tuple[dict, dict, dict]:
    """Shared by load_single_file and inspect_checkpoint: (diffusers-named state, full config, report).

    The report holds `config_sources` ({"norm_num_groups": source, "scaling_factor": source}) and `notes`
    (messages about a file-side config that was ignored because it contradicts the weights).
    """
    path = Path(path)
    checkpoint = _Checkpoint(path, unsafe_pickle)
    prefix = _choose_prefix(checkpoint.keys, path)
    _refuse_other_single_file(checkpoint.keys, prefix, path)
    vae_keys = [k for k in checkpoint.keys if k.startswith(prefix) and k[len(prefix):].startswith(VAE_TOP_LEVEL)]
    tensors = {k[len(prefix):]: v for k, v in checkpoint.read(vae_keys).items()}
    layout = _detect_layout(list(tensors), path)
    state, unmapped = _to_diffusers_names(tensors, layout)
    inferred = infer_architecture({k: v.shape for k, v in state.items()})

    # What the file side states (its own metadata, then a diffusers config.json in the same folder). Only the
    # fields shapes cannot tell are taken; a source whose architecture contradicts the weights describes another
    # model and is ignored, with a note.
    notes: list[str] = []
    file_sources: list[tuple[str, dict]] = []
    beside, beside_path = _beside_config(path)
    for label, fields in ((SOURCE_BESIDE, beside), (SOURCE_METADATA, _metadata_config(checkpoint))):
        if not fields:
            continue
        differs = _contradiction(fields, inferred)
        where = f"{beside_path}" if label == SOURCE_BESIDE else f"the metadata of {path}"
        if differs:
            notes.append(f"{where} was ignored: it describes another architecture ({', '.join(differs)})")
            continue
        file_sources.append((label, {k: v for k, v in fields.items() if k in NON_ARCHITECTURE_FIELDS}))
    stated: dict[str, Any] = {}
    for _, fields in file_sources:
        stated.update(fields)

    given = {**_config_from_argument(config), **overrides}
    latent_channels = given.get("latent_channels", inferred.get("latent_channels"))
    known_scaling = given.get("scaling_factor", stated.get("scaling_factor"))
    family, certain, reason = _detect_family(checkpoint.keys, latent_channels, known_scaling)
    if "scaling_factor" in stated and "scaling_factor" not in given:
        certain = True
        reason = f"scaling_factor={stated['scaling_factor']} from " + next(
            label for label, fields in reversed(file_sources) if "scaling_factor" in fields)
    latent_statistics = _playground_statistics(checkpoint, latent_channels)
    if latent_statistics:
        family, certain = "sdxl", True
        reason = "Playground v2.5 checkpoint (SDXL architecture; edm_mean/edm_std keys give latents_mean/latents_std)"
    # Precedence: the family preset (or diffusers' defaults), then the weights' architecture and latent statistics,
    # then a config.json beside the file, then the file's metadata, then config=, then keyword overrides.
    merged = _preset(family) if family else _preset("sd15")
    merged.update(inferred)
    merged.update(latent_statistics)
    merged.update(stated)
    merged.update(given)

    def source(name: str, fallback: str) -> str:
        if name in given:
            return SOURCE_ARGUMENT
        for label, fields in reversed(file_sources):
            if name in fields:
                return label
        return fallback

    if latent_statistics:
        scaling_fallback = "model family (Playground v2.5 statistics in the file)"
    elif certain:
        scaling_fallback = f"model family ({reason})"
    else:
        scaling_fallback = f"{ASSUMED} (model family guessed: {reason})"
    sources = {
        "norm_num_groups": source("norm_num_groups", f"{ASSUMED} default (weights cannot tell)"),
        "scaling_factor": source("scaling_factor", scaling_fallback),
    }
    report = {
        "path": str(path), "format": checkpoint.format, "layout": layout, "prefix": prefix, "family": family,
        "family_certain": certain or "scaling_factor" in given, "family_reason": reason,
        "ignored_keys": len(checkpoint.keys) - len(vae_keys) + len(unmapped), "inferred": inferred,
        "config_sources": sources, "notes": notes,
    }
    return state, merged, report


def load_single_file(cls, path: PathLike, config=None, torch_dtype=None, unsafe_pickle: bool = False, **overrides):
    """Build `cls` (an AutoencoderKL class) from one checkpoint file of any layout listed in this module's docstring.

    Args:
        cls: the model class; `cls(**config_fields)` must build it with diffusers' parameter names.
        path: a `.safetensors`, `.ckpt`, `.pt` or `.bin` file (format sniffed from the content): a VAE alone or a
            whole-model checkpoint; a folder is passed to `load_pretrained`.
        config: a preset name ("sd15", "sdxl", "sd3", "flux1", ...), a diffusers folder or a dict. Its fields win
            over what is inferred from the weights; None infers the architecture and the family.
        torch_dtype: dtype of the returned parameters (torch.dtype or "fp16"/"bf16"/"fp32"/"fp64"); float32 if None.
        unsafe_pickle: unpickle a file that needs arbitrary Python objects (only for files you trust).
        **overrides: config fields that win over everything (`scaling_factor=`, `norm_num_groups=`, ...).

    Returns the model in eval mode on CPU. Fields the weights cannot tell are also read from the file's
    safetensors metadata and a diffusers config.json beside the file (module docstring). Warns
    (AmbiguousFamilyWarning) when the family of a VAE-only file is guessed and nothing states scaling_factor;
    (AssumedNormGroupsWarning) when norm_num_groups=32 is assumed for a non-public architecture whose widths
    allow other counts; (UserWarning) when a file-side config contradicts the weights and is ignored.
    Raises FileNotFoundError (no file), CheckpointError (unreadable/truncated/corrupt file, refused pickle, no VAE
    in the file, FLUX.2's VAE or a VQ model (naming their loader), a malformed metadata entry, a norm_num_groups
    that does not divide the widths (listing those that would), missing or mis-shaped keys: all listed in one
    message naming the file), TypeError (unknown override names).
    """
    _check_overrides(cls, overrides)
    if Path(path).is_dir():
        if config is not None:
            raise ValueError(f"config= given but {str(path)!r} is a folder; its config.json is used")
        return load_pretrained(cls, path, torch_dtype=torch_dtype, unsafe_pickle=unsafe_pickle, **overrides)
    state, merged, report = _read_single_file(path, config, overrides, unsafe_pickle)
    for note in report["notes"]:
        warnings.warn(note, UserWarning, stacklevel=3)
    if not report["family_certain"] and report["family"] is not None:
        warnings.warn(_ambiguity_message(Path(path), report["family"], report["family_reason"],
                                         merged["latent_channels"]), AmbiguousFamilyWarning, stacklevel=3)
    elif not report["family_certain"]:
        warnings.warn(f"{path}: {report['family_reason']}; using scaling_factor={merged['scaling_factor']} "
                      f"(diffusers' default). Pass scaling_factor= with the right value.", AmbiguousFamilyWarning,
                      stacklevel=3)
    # When config= or an override contradicts the weights, the shape error below also says what they imply.
    differs = [f"{k}={v!r} (config has {merged.get(k)!r})" for k, v in report["inferred"].items()
               if _frozen(merged.get(k)) != _frozen(v)]
    hint = f"The weights imply {', '.join(differs)}; omit config= / the override to infer them." if differs else ""
    groups_assumed = report["config_sources"]["norm_num_groups"].startswith(ASSUMED)
    _check_groups(merged, Path(path), assumed=groups_assumed)
    # Quiet for the published SD architectures (every public SD VAE uses 32 groups; a warning on each of them
    # would teach users to ignore it); `inspect_checkpoint` / `info` still say "assumed" for those.
    if (groups_assumed and not _is_public_architecture(merged)
            and len(allowed_group_counts(merged.get("block_out_channels", ()))) > 1):
        warnings.warn(_groups_message(Path(path), merged), AssumedNormGroupsWarning, stacklevel=3)
    return _build_and_load(cls, merged, state, Path(path), torch_dtype, hint)


#: State-dict names of buffers, not parameters: a BatchNorm's statistics (FLUX.2's latent `bn`).
_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


def _parameter_count(state: Mapping[str, torch.Tensor]) -> int:
    """The parameters among a state dict's tensors, as `sum(p.numel() for p in model.parameters())` counts them:
    BatchNorm statistics (FLUX.2's `bn.running_mean`, `bn.running_var`, `bn.num_batches_tracked`) are buffers."""
    return sum(t.numel() for k, t in state.items() if not k.endswith(_BUFFER_SUFFIXES))


def inspect_checkpoint(path: PathLike, config=None, unsafe_pickle: bool = False, **overrides) -> dict:
    """Describe a checkpoint file or diffusers folder without building a model (the CLI's `info` command).

    Returns a dict: `path`; `format` ("safetensors", "pickle" or "diffusers-folder"); `layout` ("diffusers",
    "diffusers-old-attention", "ldm"); `prefix` of the VAE keys ("" for a VAE-only file); `family` ("sd15",
    "sdxl", "sd3", "flux1" or None); `family_certain` (False when guessed) and `family_reason`; `config` (every
    config field `load_single_file` would use); `parameter_count` (VAE parameters, buffers such as a FLUX.2
    folder's BatchNorm statistics not counted: `sum(p.numel() for p in model.parameters())`); `dtypes` (sorted
    dtype names of the VAE tensors, e.g. ["float16"]); `ignored_keys` (tensors in the file outside the VAE);
    `config_sources`: where `norm_num_groups` and `scaling_factor` came from, one of "file metadata",
    "config.json beside the file", "argument" (config= or an override), "config.json" (a folder's),
    "model family (...)" (decided by the checkpoint's other components), or a text starting with "assumed" (the
    documented default, or the guessed family's value); `notes`: file-side configs that were ignored because
    they contradict the weights. A folder whose config.json names a ConsistencyDecoderVAE is reported with
    `model` "ConsistencyDecoderVAE", no family, and config.json's own fields as `config` (every report has
    `model`: "AutoencoderKL" otherwise). Raises as `load_single_file` does for unreadable files.
    """
    path = Path(path)
    if path.is_dir() and folder_class_name(path) == CONSISTENCY_CLASS_NAME:
        weights_path = _find_weights(path, None)[0]
        checkpoint = _Checkpoint(weights_path, unsafe_pickle)
        tensors = checkpoint.read(checkpoint.keys)
        merged = {**_read_config_json(path / CONFIG_NAME), **overrides}
        return {"model": CONSISTENCY_CLASS_NAME, "path": str(path), "format": "diffusers-folder",
                "layout": _detect_layout(list(tensors), weights_path), "prefix": "", "family": None,
                "family_certain": True, "family_reason": "a consistency decoder, not a Stable Diffusion VAE family",
                "ignored_keys": 0,
                "config_sources": {"scaling_factor": SOURCE_ARGUMENT if "scaling_factor" in overrides
                                   else SOURCE_FOLDER},
                "notes": [], "config": merged, "parameter_count": sum(t.numel() for t in tensors.values()),
                "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})}
    if path.is_dir() or str(path) in TINY_NAMES:
        folder = _resolve_folder(path, None)
        weights_path = _find_weights(folder, None)[0]
        checkpoint = _Checkpoint(weights_path, unsafe_pickle)
        tensors = checkpoint.read(checkpoint.keys)
        layout = _detect_layout(list(tensors), weights_path)
        state, unmapped = _to_diffusers_names(tensors, layout)
        merged = {**_read_config_json(folder / CONFIG_NAME), **_config_from_argument(config), **overrides}
        family = next((f for f in FAMILY_NAMES if _preset(f)["scaling_factor"] == merged.get("scaling_factor")
                       and _preset(f)["latent_channels"] == merged.get("latent_channels")), None)
        given = {**_config_from_argument(config), **overrides}
        report = {"path": str(folder), "format": "diffusers-folder", "layout": layout, "prefix": "",
                  "family": family, "family_certain": True, "family_reason": f"scaling_factor in {CONFIG_NAME}",
                  "ignored_keys": len(unmapped),
                  "config_sources": {k: SOURCE_ARGUMENT if k in given else SOURCE_FOLDER
                                     for k in ("norm_num_groups", "scaling_factor")},
                  "notes": []}
    else:
        state, merged, report = _read_single_file(path, config, overrides, unsafe_pickle)
        report.pop("inferred")
    report = {"model": "AutoencoderKL", **report}
    report["config"] = {k: merged[k] for k in CONFIG_FIELDS if k in merged}
    report["parameter_count"] = _parameter_count(state)
    report["dtypes"] = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    return report


# ---------------------------------------------------------------------------------------------------------------
# The model type of a folder (config.json's `_class_name`): load_vae and the consistency decoder
# ---------------------------------------------------------------------------------------------------------------

#: config.json `_class_name` of DALL-E 3's consistency decoder (`openai/consistency-decoder`).
CONSISTENCY_CLASS_NAME = "ConsistencyDecoderVAE"
#: The `_class_name` values `load_vae` builds, and the sdvae_fast class ("module.name") each becomes. A folder
#: without `_class_name` is an AutoencoderKL (what older writers produced).
MODEL_CLASSES = {"AutoencoderKL": "sdvae_fast.model.AutoencoderKL",
                 CONSISTENCY_CLASS_NAME: "sdvae_fast.consistency.ConsistencyDecoderVAE",
                 "AutoencoderKLFlux2": "sdvae_fast.flux2.AutoencoderKLFlux2",
                 "VQModel": "sdvae_fast.vq.VQModel"}
#: The consistency decoder's config fields that the key-mismatch message shows.
CONSISTENCY_SHORT_FIELDS = ("latent_channels", "encoder_block_out_channels", "encoder_layers_per_block",
                            "decoder_block_out_channels", "decoder_layers_per_block", "decoder_in_channels",
                            "decoder_out_channels")
_HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token", "force_download")


def folder_class_name(folder: PathLike) -> str:
    """The model type a diffusers model folder declares: its config.json's `_class_name` ("AutoencoderKL" when
    the file has none).

    Raises:
        CheckpointError: no config.json in `folder`, unreadable JSON, not a JSON object, or a `_class_name`
            that is not a string.
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} (a diffusers model folder holds {CONFIG_NAME} and "
                              f"{SAFETENSORS_WEIGHTS_NAME}; for a pipeline folder pass subfolder='vae')")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object of config fields, got {type(data).__name__}")
    name = data.get("_class_name", "AutoencoderKL")
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: _class_name must be a string such as 'AutoencoderKL', got {name!r}")
    return name


def model_class(class_name: str, folder: PathLike = "") -> type:
    """sdvae_fast's class for a config.json `_class_name` (`MODEL_CLASSES`): `sdvae_fast.AutoencoderKL`,
    `ConsistencyDecoderVAE`, `AutoencoderKLFlux2` or `VQModel`.

    Raises:
        CheckpointError: any other class name (the message names `folder`, the class and the supported ones).
    """
    import importlib

    if class_name not in MODEL_CLASSES:
        raise CheckpointError(f"{folder}: config.json's _class_name is {class_name!r}; sdvae_fast loads "
                              f"{', '.join(MODEL_CLASSES)} folders")
    module, _, name = MODEL_CLASSES[class_name].rpartition(".")
    return getattr(importlib.import_module(module), name)


def _is_consistency_class(cls) -> bool:
    """Whether `cls` is (a subclass of) a class named ConsistencyDecoderVAE (ours or diffusers')."""
    return any(base.__name__ == CONSISTENCY_CLASS_NAME for base in getattr(cls, "__mro__", ()))


def _refuse_other_model_type(folder, cls, name: Optional[str] = None, subfolder: Optional[str] = None) -> None:
    """A CheckpointError naming the class that loads `folder` when its config.json's `_class_name` (`name`, read
    from `folder` when None) is one of sdvae_fast's other model types (`MODEL_CLASSES`: AutoencoderKLFlux2,
    VQModel, ConsistencyDecoderVAE) and `cls` is not (a subclass of) a class of that name: an AutoencoderKL would
    otherwise be built from a foreign config, its extra weights (FLUX.2's `bn` statistics, a codebook) dropped
    or its missing ones listed. Used by `load_pretrained` (sdvae_fast.AutoencoderKL without diffusers) and by
    `sdvae_fast.AutoencoderKL.from_pretrained` (with diffusers, whose loader only logs the unused weights).
    "AutoencoderKL", no `_class_name`, and names sdvae_fast does not know pass (the caller's business)."""
    if name is None:
        name = folder_class_name(folder)
    if name == "AutoencoderKL" or name not in MODEL_CLASSES:
        return
    if any(base.__name__ == name for base in getattr(cls, "__mro__", ())):
        return
    target = MODEL_CLASSES[name].rpartition(".")[2]
    how = f"sdvae_fast.{target}.from_pretrained"
    if subfolder:
        how += f"(..., subfolder={subfolder!r})"
    if name == CONSISTENCY_CLASS_NAME:
        how += " (sdvae_fast.loading.load_consistency_decoder)"
    raise CheckpointError(f"{folder}: config.json's _class_name is {name!r}, not {cls.__name__}: load it with "
                          f"{how}, or with sdvae_fast.loading.load_vae, which builds the class the folder names")


def load_vae(path: PathLike, subfolder: Optional[str] = None, **kwargs):
    """Load the VAE of a diffusers model folder (or Hub repository id) as the sdvae_fast class its config.json's
    `_class_name` names (`MODEL_CLASSES`).

    "AutoencoderKL" (or no `_class_name`) gives `sdvae_fast.AutoencoderKL.from_pretrained(folder)` (diffusers'
    loader when diffusers is installed, else `load_pretrained`); "ConsistencyDecoderVAE"
    (`openai/consistency-decoder`'s layout) gives `sdvae_fast.ConsistencyDecoderVAE` through
    `load_consistency_decoder` (every key checked, missing ones listed); "AutoencoderKLFlux2" and "VQModel" give
    those classes' `from_pretrained`. A single checkpoint file is an AutoencoderKL
    (`AutoencoderKL.from_single_file`), and so is the bundled "sdvae-fast/tiny".

    Args:
        path: a local folder, a Hub repository id "org/name", a single file, or "sdvae-fast/tiny".
        subfolder: folder inside `path`, e.g. "vae" of a pipeline (folders only).
        **kwargs: keyword arguments of the chosen loader (torch_dtype, variant, Hub options, config overrides).
    Returns:
        The model in eval mode.
    Raises:
        CheckpointError: a `_class_name` other than those, a consistency-decoder checkpoint that lacks
            weights or has mis-shaped ones (all listed); otherwise what the chosen loader raises.
    """
    AutoencoderKL = model_class("AutoencoderKL")  # imported by name: sdvae_fast.model imports this module

    if Path(path).is_file():
        if subfolder:
            raise ValueError(f"subfolder={subfolder!r} given but path {str(path)!r} is a file, not a folder")
        return AutoencoderKL.from_single_file(str(path), **kwargs)
    if not Path(path).exists() and str(path) in TINY_NAMES:
        return AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, **kwargs)
    folder = _resolve_folder(path, subfolder, **{k: kwargs.pop(k) for k in _HUB_OPTIONS if k in kwargs})
    cls = model_class(folder_class_name(folder), folder)
    if _is_consistency_class(cls):
        return load_consistency_decoder(cls, folder, **kwargs)
    return cls.from_pretrained(str(folder), **kwargs)


def load_consistency_decoder(cls, path: PathLike, subfolder: Optional[str] = None, torch_dtype=None,
                             variant: Optional[str] = None, unsafe_pickle: bool = False, *, dtype=None,
                             use_safetensors: Optional[bool] = None, local_files_only: bool = False,
                             cache_dir=None, revision: Optional[str] = None, token=None,
                             force_download: bool = False, low_cpu_mem_usage: bool = True, device_map=None,
                             output_loading_info: bool = False, ignore_mismatched_sizes: bool = False,
                             **overrides):
    """Build `cls` (`sdvae_fast.ConsistencyDecoderVAE`, or diffusers' class) from a consistency-decoder folder:
    config.json with `_class_name` "ConsistencyDecoderVAE" + `diffusion_pytorch_model.safetensors` (or `.bin`,
    shards, a variant), the layout of `openai/consistency-decoder` and of diffusers' `save_pretrained`.

    Unlike diffusers' `from_pretrained`, which (without accelerate) initialises weights missing from the file at
    random and only logs their names, every key and shape is checked first: a file that lacks any of the model's
    weights, or holds one of another shape, raises a CheckpointError listing them all, and nothing is built.
    Weights the model does not have are ignored. Old diffusers attention names (query/key/value/proj_attn) of
    the encoder's mid block are renamed.

    Args: as `load_pretrained` (path a local folder or Hub repository id, subfolder, torch_dtype or dtype,
        variant, use_safetensors, unsafe_pickle, the Hub options, device_map on one device, output_loading_info;
        low_cpu_mem_usage is accepted and has no effect: the model is built on the CPU and the weights copied in);
        `**overrides`: constructor arguments of `cls` that win over config.json's.
    Returns:
        The model in eval mode on the CPU (or `device_map`'s device) in `torch_dtype` (float32 when None), its
        backend as `cls` sets it; or `(model, loading_info)` with empty lists.
    Raises:
        CheckpointError: no or unreadable config.json; its `_class_name` is not "ConsistencyDecoderVAE"; unreadable
            weights; missing or mis-shaped keys (all listed, up to MAX_LISTED_KEYS of each); a config `cls`
            cannot be built from.
        OSError: no such folder or repository; no weights file (e.g. only a variant: the message names it).
        TypeError: an override `cls` does not take. ValueError: `torch_dtype` and `dtype` disagree,
            ignore_mismatched_sizes=True, a device_map that splits the model.
        ImportError: diffusers is not installed (`cls` is then sdvae_fast's placeholder).
    """
    if dtype is not None:
        if torch_dtype is not None and torch_dtype != dtype:
            raise ValueError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree; pass one of them")
        torch_dtype = dtype
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes=True is not supported: a checkpoint whose shapes differ from the "
                         "config is never loaded (its keys are listed instead)")
    device = _placement(device_map)
    target = _resolve_dtype(torch_dtype) or torch.float32
    folder = _resolve_folder(path, subfolder, revision=revision, cache_dir=cache_dir,
                             local_files_only=local_files_only, token=token, force_download=force_download)
    name = folder_class_name(folder)
    if name != CONSISTENCY_CLASS_NAME:
        raise CheckpointError(f"{folder}: config.json's _class_name is {name!r}, not {CONSISTENCY_CLASS_NAME!r}; "
                              f"sdvae_fast.loading.load_vae loads a folder as the class it names")
    accepted = _accepted_fields(cls)
    unknown = sorted(k for k in overrides if accepted is not None and k not in accepted)
    if unknown:
        raise TypeError(f"unknown config override(s) {unknown}; {cls.__name__} takes {sorted(accepted)}")
    config = {**_read_config_json(folder / CONFIG_NAME), **overrides}
    # Fields the constructor does not take (diffusers registers `block_out_channels` and `force_upcast` itself).
    kwargs = {k: v for k, v in config.items() if accepted is None or k in accepted}
    paths = _find_weights(folder, variant, use_safetensors)
    state = _read_weights(paths, unsafe_pickle)
    description = ", ".join(f"{k}={kwargs[k]!r}" for k in CONSISTENCY_SHORT_FIELDS if k in kwargs)
    try:
        # The expected names and shapes, without memory or random init (the model is built for real below,
        # because the scheduler's tables and non-persistent buffers are made by the constructor).
        with torch.device("meta"):
            expected = {k: v.shape for k, v in cls(**kwargs).state_dict().items()}
    except ImportError:
        raise
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot build {cls.__name__} from the config {kwargs}: {e}") from e
    missing, misshaped = _shape_errors(expected, state)
    if missing or misshaped:
        where = paths[0] if len(paths) == 1 else folder
        raise CheckpointError(_misfit_message(
            where, f"{cls.__name__}({description})", missing, misshaped,
            "diffusers' from_pretrained would initialise missing weights at random; sdvae_fast refuses: use the "
            "folder's own config.json, or a complete checkpoint"))
    model = cls(**kwargs)
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    del state
    # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast (about fp32 modules this class has none of)
    model = torch.nn.Module.to(model, dtype=target).eval()
    if device is not None:
        model = model.to(device)
    if output_loading_info:
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model
