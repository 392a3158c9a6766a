"""The `sdvae-fast` command line: reconstruct, encode, decode, info, parity, profile, bench and train.

Every subcommand that runs a VAE takes the model options `--vae`, `--preset`, `--config`, `--seed`,
`--scaling-factor`, `--shift-factor`, `--norm-num-groups`, `--unsafe-pickle` and the run options `--device`,
`--dtype fp32|fp16|bf16`, `--backend`, `-q`; `info` takes the model options that describe a checkpoint
(`--preset`, `--config`, the scaling options, `--norm-num-groups`, `--unsafe-pickle`).
Errors meant for users (a missing file, a wrong shape, no GPU) are printed as one line starting with
`sdvae-fast CMD: error:` and exit with code 2; with `SDVAE_FAST_DEBUG=1` the traceback is printed too (still exit
code 2). The loader's warnings are printed as one `sdvae-fast: warning:` line each, in the CLI's option names. Each
`cmd_*` function takes the parsed arguments and returns the exit code (0 ok, 1 a parity check failed); it raises
`CLIError`, or the library's ValueError/OSError/RuntimeError, for what the user can fix, and `main` turns those
into the one-line message. Anything else (a bug) keeps its traceback. A closed stdout (`info --json | head`)
ends the command quietly with exit code 141, as a shell reports a process killed by SIGPIPE.

Import order matters here: Triton reads `TRITON_INTERPRET` when kernels are defined, so this module imports
nothing that defines kernels at load time. When a command runs the kernels on CPU tensors (`parity` on CPU, or
`--backend triton` on CPU) the interpreter is switched on before `sdvae_fast.ops` is first imported, or, if
kernels were already imported without it, the command is re-run in a child interpreter with it set.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

# Backend names and the variable the model reads for its default backend; `--backend` wins over it.
from sdvae_fast.backends import BACKEND_ENV, BACKENDS
from sdvae_fast.configs import (CLI_PRESETS, FLUX2_PRESETS, PUBLIC_PRESETS, VQ_PRESETS, config_dict, family_of,
                                scaling_of)
from sdvae_fast.latents_io import FLUX2_BATCH_NORM, check_latents, json_field, read_latents, write_latents

PROG = "sdvae-fast"
DTYPE_NAMES = ("fp32", "fp16", "bf16")
# The config fields that decide parameter shapes, compared when `--preset` does not fit a file's weights.
ARCHITECTURE_FIELDS = ("latent_channels", "block_out_channels", "layers_per_block", "in_channels", "out_channels",
                       "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
DEFAULT_VAE = "sdvae-fast/tiny"


class CLIError(Exception):
    """An error the user can fix (bad argument, missing file, no GPU): printed as one line, exit code 2."""


# Exceptions that carry a message for the user rather than a bug in this program; anything else keeps its
# traceback. RuntimeError covers CUDA out-of-memory and the kernels' "needs a CUDA device" errors.
USER_ERRORS = (CLIError, OSError, ValueError, RuntimeError, ImportError)


def _torch():
    import torch

    return torch


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


#: The start of the message diffusers' `from_pretrained` logs (five lines, on every folder load) when accelerate is
#: not installed; loading works the same without it, so the CLI does not print it.
_ACCELERATE_NOTICE = "Cannot initialize model with low cpu memory usage because `accelerate` was not found"


class _DropAccelerateNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ACCELERATE_NOTICE)


@contextmanager
def _without_accelerate_notice():
    """Drop diffusers' "Cannot initialize model with low cpu memory usage because `accelerate` was not found ..."
    message while the CLI loads a folder (that one message only: every other diffusers log record, such as weights
    missing from a folder, is printed as before)."""
    log = logging.getLogger("diffusers.models.modeling_utils")  # where ModelMixin.from_pretrained logs it
    notice_filter = _DropAccelerateNotice()
    log.addFilter(notice_filter)
    try:
        yield
    finally:
        log.removeFilter(notice_filter)


def _a(name: str) -> str:
    """`name` with its indefinite article: "an AutoencoderKL", "a VQModel"."""
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


# ---------------------------------------------------------------------------------------------------------------
# Devices, dtypes and the VAE
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(name: Optional[str]):
    """`--device` as a `torch.device`: CUDA when available and nothing was asked for, else CPU.

    Raises:
        CLIError: the name is not a device torch knows, or CUDA was asked for on a machine without it.
    """
    torch = _torch()
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name!r} is not a device torch knows (try cpu or cuda)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def resolve_dtype(name: Optional[str], device):
    """`--dtype` as a torch dtype; by default bf16 on CUDA and fp32 on CPU."""
    torch = _torch()
    if name is None:
        name = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def resolve_backend(name: Optional[str]) -> str:
    """`--backend` as a backend name; None (the default) is the model's own default: env SDVAE_FAST_BACKEND, else auto.

    Raises:
        CLIError: SDVAE_FAST_BACKEND holds something other than auto, triton or torch (checked even when
        `--backend` is given, because the model reads the variable whenever it is built).
    """
    env = os.environ.get(BACKEND_ENV)
    if env and env not in BACKENDS:
        raise CLIError(f"environment variable {BACKEND_ENV}={env!r} is not a backend: set it to one of "
                       f"{', '.join(BACKENDS)}, or unset it")
    return name or env or "auto"


def _overrides(args) -> dict:
    """The config fields that `--scaling-factor` / `--shift-factor` / `--norm-num-groups` set (only those given)."""
    fields = {"scaling_factor": args.scaling_factor, "shift_factor": args.shift_factor,
              "norm_num_groups": getattr(args, "norm_num_groups", None)}
    return {key: value for key, value in fields.items() if value is not None}


def _config_argument(args) -> Optional[str]:
    """The `config=` a single file is read with: `--preset NAME` or `--config PATH|PRESET` (at most one), or None.

    Raises:
        CLIError: both were given, or `--config` names neither a preset nor an existing file or folder.
    """
    from sdvae_fast.configs import PRESETS

    config = getattr(args, "config", None)
    if config is None:
        return args.preset
    if args.preset:
        raise CLIError(f"give --preset or --config, not both (got --preset {args.preset} --config {config})")
    if config not in PRESETS and not Path(config).exists():
        raise CLIError(f"--config {config}: no such file or folder, and not a preset "
                       f"(presets: {', '.join(PUBLIC_PRESETS)})")
    return config


# The loader's messages name Python arguments; the CLI prints its own options instead. Applied only to the advice
# after "Pass"/"pass", so that descriptions such as "Using FLUX.1 (scaling_factor=0.3611)" stay as they are.
_CLI_WORDING = (
    (re.compile(r"config=(['\"])(\w+)\1"), r"--preset \2"),
    (re.compile(r"config=(['\"])([^'\"]+)\1"), r"--config \2"),
    (re.compile(r"\bnorm_num_groups=N\b"), "--norm-num-groups N"),
    (re.compile(r"\bnorm_num_groups=(\d+)"), r"--norm-num-groups \1"),
    (re.compile(r"\bunsafe_pickle=True"), "--unsafe-pickle"),
    (re.compile(r"\bscaling_factor=([-+.\deE]+), shift_factor=([-+.\deE]+)"),
     r"--scaling-factor \1 --shift-factor \2"),
    (re.compile(r"\bscaling_factor=([-+.\deE]+)"), r"--scaling-factor \1"),
    (re.compile(r"\bscaling_factor=(?!\S)"), "--scaling-factor"),
)


def cli_wording(message: str) -> str:
    """`message` (a loader warning or error) on one line, its advice in CLI options: `config='sd3'` becomes
    `--preset sd3`, `config='path/config.json'` `--config path/config.json`, `scaling_factor=X`
    `--scaling-factor X`, `norm_num_groups=N` `--norm-num-groups N`, `unsafe_pickle=True` `--unsafe-pickle`."""
    message = " ".join(message.split())
    match = re.search(r"\b[Pp]ass ", message)
    if match is None:
        return message
    head, advice = message[:match.start()], message[match.start():]
    for pattern, replacement in _CLI_WORDING:
        advice = pattern.sub(replacement, advice)
    return head + advice


def _plain(value):
    """Config values as JSON shows them (tuples as lists), for comparing and printing."""
    return list(value) if isinstance(value, (list, tuple)) else value


def preset_mismatch(path, preset: str, unsafe_pickle: bool = False, option: str = "--preset") -> Optional[str]:
    """A short message when `--preset`'s (or `--config`'s) architecture differs from the one the weights of `path`
    imply, else None.

    `preset`: a preset name or a config.json path (as `sdvae_fast.configs.resolve_config` takes it); `option`:
    the flag to name in the message ("--preset" or "--config"). Compares ARCHITECTURE_FIELDS with what
    `inspect_checkpoint` infers from the weight shapes, and names the public presets that would fit (or says to
    omit the option).
    """
    from sdvae_fast.configs import PRESETS, resolve_config
    from sdvae_fast.loading import inspect_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the family guess is not the point here
        inferred = inspect_checkpoint(str(path), unsafe_pickle=unsafe_pickle)["config"]
    wanted = resolve_config(preset)
    differs = [k for k in ARCHITECTURE_FIELDS if _plain(inferred.get(k)) != _plain(wanted.get(k))]
    if not differs:
        return None
    has = ", ".join(f"{k}={_plain(inferred.get(k))}" for k in differs)
    says = ", ".join(f"{k}={_plain(wanted.get(k))}" for k in differs)
    fitting = [name for name in PUBLIC_PRESETS
               if all(_plain(PRESETS[name].get(k)) == _plain(inferred.get(k)) for k in ARCHITECTURE_FIELDS)]
    if fitting:
        advice = f"Use --preset {' or --preset '.join(fitting)}, or omit {option}"
    else:
        advice = (f"Omit {option} (the architecture is then read from the weights) and give --scaling-factor / "
                  "--shift-factor if the family guess is wrong")
    what = "the preset" if option == "--preset" else "the config"
    return f"{option} {preset} does not fit {path}: the weights have {has}; {what} says {says}. {advice}."


def _flux2_subfolder(path: Path) -> Optional[str]:
    """"" (config.json at the top) or "vae" (a pipeline folder) when `path` is a diffusers folder of FLUX.2's VAE
    (`_class_name` "AutoencoderKLFlux2"), else None."""
    for sub in ("", "vae"):
        candidate = path / sub / "config.json"
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError):
                return None
            return sub if isinstance(data, dict) and data.get("_class_name") == "AutoencoderKLFlux2" else None
    return None


def is_flux2_checkpoint(path: Path, unsafe_pickle: bool = False) -> bool:
    """Whether `path` is a single file holding FLUX.2's VAE: a `bn.running_mean` tensor beside the VAE's weights
    under the same prefix (`sdvae_fast.flux2.flux2_file_prefix`: "", "vae.", ...). Folders are not files: False.
    Raises CheckpointError for an unreadable file."""
    if not path.is_file():
        return False
    from sdvae_fast.flux2 import flux2_file_prefix
    from sdvae_fast.loading import _Checkpoint

    return flux2_file_prefix(_Checkpoint(path, unsafe_pickle).keys) is not None


def _build_flux2(args, overrides: dict):
    """FLUX.2's VAE (`sdvae_fast.AutoencoderKLFlux2`) when `--preset flux2|flux2-small` or `--vae` names a folder
    whose config's `_class_name` is AutoencoderKLFlux2, or a single file with FLUX.2's latent BatchNorm
    (`is_flux2_checkpoint`: black-forest-labs' original layout, `AutoencoderKLFlux2.from_single_file`; with
    `--preset`, the preset's architecture instead of the one read from the shapes); None otherwise (see
    `load_vae`).

    Raises:
        CLIError: scaling options (FLUX.2's latents are normalised by its BatchNorm, not scaled), `--preset` or
        `--config` with such a folder, `--config` with a FLUX.2 file. The loader's CheckpointError for a file
        whose keys do not fit (or, with a FLUX.2 preset, a file that is no FLUX.2 VAE).
    """
    preset = args.preset if args.preset in FLUX2_PRESETS else None
    path = Path(args.vae) if args.vae else None
    subfolder = _flux2_subfolder(path) if path is not None and path.is_dir() else None
    single = path is not None and subfolder is None and path.is_file() and (
        preset is not None or is_flux2_checkpoint(path, args.unsafe_pickle))
    if preset is None and subfolder is None and not single:
        return None
    from sdvae_fast.flux2 import AutoencoderKLFlux2

    what = f"--preset {preset}" if subfolder is None and not single else f"--vae {args.vae} (FLUX.2's VAE)"
    scaling = [f"--{k.replace('_', '-')}" for k in ("scaling_factor", "shift_factor") if k in overrides]
    if scaling:
        raise CLIError(f"{' / '.join(scaling)} do not apply to {what}: FLUX.2's latents are normalised by the VAE's "
                       f"BatchNorm statistics, not scaled")
    if subfolder is not None:
        if args.preset or getattr(args, "config", None):
            option = "--preset" if args.preset else "--config"
            raise CLIError(f"{option} applies to single files and seeded weights; the diffusers folder {args.vae} "
                           f"carries its own config.json")
        return AutoencoderKLFlux2.from_pretrained(str(args.vae), subfolder=subfolder or None, **overrides)
    if single:
        if getattr(args, "config", None):
            raise CLIError(f"--config reads AutoencoderKL files; the architecture of FLUX.2's VAE in {args.vae} is "
                           f"read from its weights (or give --preset flux2 / flux2-small)")
        return AutoencoderKLFlux2.from_single_file(str(path), config=preset, unsafe_pickle=args.unsafe_pickle,
                                                   **overrides)
    if path is not None and path.is_dir():
        raise CLIError(f"--preset {preset} applies to single files and seeded weights; the diffusers folder "
                       f"{args.vae} carries its own config.json (and it names no AutoencoderKLFlux2)")
    if path is not None:
        raise CLIError(f"--vae {args.vae}: no such file or folder")
    if getattr(args, "config", None):
        raise CLIError(f"--config {args.config} describes how to read a single checkpoint file; give it with "
                       f"--vae FILE (for seeded random weights use --preset)")
    vae = AutoencoderKLFlux2.from_preset(preset, seed=args.seed, **overrides)
    _warn(f"no --vae given: preset {preset!r} with seeded random weights (seed {args.seed}); its output is not a "
          f"meaningful image. Pass --vae PATH for real weights.")
    return vae


def _is_flux2(vae) -> bool:
    """Whether `vae` is FLUX.2's VAE (latents normalised by its BatchNorm `bn`, no scaling_factor)."""
    return type(vae).__name__ == "AutoencoderKLFlux2"


# ---------------------------------------------------------------------------------------------------------------
# VQ autoencoders (issue 14): detected from a folder's `_class_name`, a file's codebook, or `--preset vq-f4|vq-f8`
# ---------------------------------------------------------------------------------------------------------------


#: The commands that take VQ models: parity adds the quantiser's row and decodes the reference's codes
#: (`sdvae_fast.parity`), profile times a VQ model's units as a KL's. bench and warmup time AutoencoderKL posteriors.
VQ_COMMANDS = ("reconstruct", "encode", "decode", "info", "parity", "profile")


def is_vq_checkpoint(path: Path, unsafe_pickle: bool = False) -> bool:
    """Whether `path` holds a VQ autoencoder: a folder whose config.json says `_class_name` "VQModel", or a single
    file with a `quantize.embedding.weight` tensor (any prefix)."""
    if path.is_dir():
        config = path / "config.json"
        try:
            return config.is_file() and json.loads(config.read_text()).get("_class_name") == "VQModel"
        except (OSError, ValueError):
            return False
    from sdvae_fast.loading import _Checkpoint

    return any(key.endswith("quantize.embedding.weight") for key in _Checkpoint(path, unsafe_pickle).keys)


def _vq_overrides(args) -> dict:
    """The VQModel fields the scaling options set; VQModel has no shift_factor (CLIError when it is given)."""
    overrides = _overrides(args)
    if "shift_factor" in overrides:
        raise CLIError("--shift-factor does not apply to VQ models (VQModel has no shift_factor)")
    return overrides


def _build_vq(args, path: Optional[Path] = None):
    """The VQModel `--vae` (or `path`, info's checkpoint) / `--preset` name, or None when they name an
    AutoencoderKL (see `_build_vae`)."""
    preset = args.preset if args.preset in VQ_PRESETS else None
    if path is None and getattr(args, "vae", None):
        path = Path(args.vae)
    if path is not None and not (path.exists() and (preset or is_vq_checkpoint(path, args.unsafe_pickle))):
        return None
    if path is None and preset is None:
        return None
    if args.preset and preset is None:
        raise CLIError(f"--preset {args.preset} does not fit {path}: it holds a VQ model (VQModel); omit --preset, "
                       f"or give --preset vq-f4|vq-f8 with a single file")
    command = getattr(args, "command", None)
    if command not in VQ_COMMANDS:
        raise CLIError(f"{command} does not take VQ models yet ({', '.join(VQ_COMMANDS)} do)")
    if getattr(args, "config", None):
        raise CLIError("--config reads AutoencoderKL files; a VQ model's architecture comes from its weights, "
                       "its folder or --preset vq-f4|vq-f8")
    from sdvae_fast.vq import VQModel

    overrides = _vq_overrides(args)
    if path is None:
        seed = getattr(args, "seed", 0)
        _warn(f"no --vae given: preset {preset!r} with seeded random weights (seed {seed}); its output is not "
              f"a meaningful image. Pass --vae PATH for real weights.")
        return VQModel.from_preset(preset, seed=seed, **overrides)
    if path.is_dir():
        if preset:
            raise CLIError(f"--preset {preset} applies to single files and seeded weights; the diffusers folder "
                           f"{path} carries its own config.json")
        return VQModel.from_pretrained(str(path), **overrides)
    config = dict(VQ_PRESETS[preset]) if preset else None
    return VQModel.from_single_file(str(path), config=config, unsafe_pickle=args.unsafe_pickle, **overrides)


def encoded_latents(output, generator=None, sample: bool = False):
    """The latents of an `encode` output: an AutoencoderKL posterior's mode (or a draw with `sample`), or a
    VQModel's unquantised `latents` (deterministic: `sample` does not apply)."""
    if hasattr(output, "latent_dist"):
        dist = output.latent_dist
        return dist.sample(generator=generator) if sample else dist.mode()
    return output.latents


def decoder_channels(vae) -> int:
    """The channel count `vae.decode` takes: latent_channels, or a VQModel's vq_embed_dim (its codebook width);
    `sdvae_fast.parity.decoder_channels` (profile draws its latents with it too)."""
    from sdvae_fast.parity import decoder_channels as channels

    return channels(vae)


def _build_vae(args):
    """The model `--vae`/`--preset`/scaling options name, on CPU in float32 (see `load_vae`)."""
    from sdvae_fast.loading import TINY_FOLDER, TINY_NAMES, CheckpointError
    from sdvae_fast.model import AutoencoderKL

    vq = _build_vq(args)
    if vq is not None:
        return vq

    overrides = _overrides(args)
    flux2 = _build_flux2(args, overrides)
    if flux2 is not None:
        return flux2
    if args.vae:
        path = Path(args.vae)
        if not path.exists() and args.vae in TINY_NAMES:
            path = TINY_FOLDER  # the shipped VAE by name, as from_pretrained("sdvae-fast/tiny") takes it
        if not path.exists():
            raise CLIError(f"--vae {path}: no such file or folder")
        config = _config_argument(args)
        option = "--config" if getattr(args, "config", None) else "--preset"
        if path.is_dir():
            if config:
                raise CLIError(f"{option} {config} applies to single files and seeded weights; "
                               f"the diffusers folder {path} carries its own config.json")
            from sdvae_fast import loading

            if loading.folder_class_name(path) == loading.CONSISTENCY_CLASS_NAME:
                extra = [f"--{k.replace('_', '-')}" for k in overrides if k != "scaling_factor"]
                if extra:
                    raise CLIError(f"{' and '.join(extra)} do not apply to the consistency decoder in {path} (a "
                                   f"ConsistencyDecoderVAE has no such config field)")
            # The class config.json's _class_name names: AutoencoderKL or ConsistencyDecoderVAE.
            return loading.load_vae(path, unsafe_pickle=args.unsafe_pickle, **overrides)
        try:
            return AutoencoderKL.from_single_file(str(path), config=config, unsafe_pickle=args.unsafe_pickle,
                                                  **overrides)
        except CheckpointError as exc:
            # The loader lists every key that does not fit; the CLI says which architecture fields differ.
            mismatch = preset_mismatch(path, config, args.unsafe_pickle, option) if config else None
            if mismatch:
                raise CLIError(mismatch) from exc
            raise
    if getattr(args, "config", None):
        raise CLIError(f"--config {args.config} describes how to read a single checkpoint file; give it with "
                       f"--vae FILE (for seeded random weights use --preset)")
    if args.preset:
        vae = AutoencoderKL.from_preset(args.preset, seed=args.seed, **overrides)
        _warn(f"no --vae given: preset {args.preset!r} with seeded random weights (seed {args.seed}); "
              f"its output is not a meaningful image. Pass --vae PATH for real weights.")
        return vae
    try:
        return AutoencoderKL.from_pretrained(DEFAULT_VAE, **overrides)
    except Exception as exc:  # the shipped VAE is optional; say why it is not used
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 100 else reason[:97] + "..."
        _warn(f"the shipped VAE {DEFAULT_VAE!r} is not available ({reason}); using preset "
              f"'sd15' with seeded random weights: the output is not a meaningful image. "
              f"Pass --vae PATH for real weights.")
        return AutoencoderKL.from_preset("sd15", seed=args.seed, **overrides)


def load_vae(args, *, device=None, dtype=None, backend: Optional[str] = None):
    """Build the VAE that `--vae`/`--preset` name, on `device` in `dtype`, with `backend` (default `--backend`).

    `--vae PATH`: a diffusers folder (config.json + safetensors; its `_class_name` decides the model:
    AutoencoderKL, or ConsistencyDecoderVAE for DALL-E 3's consistency decoder, `sdvae_fast.loading.load_vae`)
    or a single checkpoint file in any layout that `AutoencoderKL.from_single_file` detects (`--preset` then
    names the config family to use; its architecture must fit the weights). `--preset NAME` alone: that
    architecture with seeded random weights (`--seed`), whose output is not a meaningful image. Neither: the
    small VAE shipped with the package (`sdvae-fast/tiny`), or, when it is not installed, the sd15 preset with
    seeded weights. `--config PATH|PRESET` (single files only) is a diffusers config.json (or preset) to read the
    file with, instead of `--preset`. `--scaling-factor` / `--shift-factor` / `--norm-num-groups` override the
    config in every case (a consistency decoder takes only `--scaling-factor`); `--unsafe-pickle` lets pickled
    checkpoints build arbitrary Python objects. Warnings (meaningless output, a guessed model family) go to
    stderr as one `sdvae-fast: warning:` line each.

    Raises:
        CLIError: the path does not exist, `--preset`/`--config` is combined with a diffusers folder (or both are
        given, or `--config` without `--vae`), their architecture does not fit the file's weights, or
        `--shift-factor` / `--norm-num-groups` is given with a consistency decoder. The loader's CheckpointError
        (a ValueError) for files it cannot read or whose keys do not fit (listed).
    """
    device = resolve_device(args.device) if device is None else device
    dtype = resolve_dtype(args.dtype, device) if dtype is None else dtype
    backend = resolve_backend(backend or args.backend)
    with warnings.catch_warnings(record=True) as caught, _without_accelerate_notice():
        vae = _build_vae(args)
    for warning in caught:
        _warn(cli_wording(str(warning.message)))
    vae = vae.to(device=device)
    if vae.dtype != dtype:  # (diffusers warns on every dtype cast, even to the same dtype)
        vae = vae.to(dtype=dtype)
    vae.set_backend(backend)
    vae.eval()
    return vae


# ---------------------------------------------------------------------------------------------------------------
# Several processes for one image: `torchrun --nproc-per-node N -m sdvae_fast decode|reconstruct ...`
# ---------------------------------------------------------------------------------------------------------------

#: The commands that split each image by rows over the processes torchrun starts.
PARALLEL_COMMANDS = ("decode", "reconstruct")


def launched_world_size() -> int:
    """The number of processes torchrun started (env WORLD_SIZE), 1 without torchrun.

    Raises:
        CLIError: WORLD_SIZE is not a positive integer.
    """
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise CLIError(f"environment variable WORLD_SIZE={value!r} is not a positive process count (torchrun sets it)")
    return int(value)


def start_patch_parallel(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group torchrun describes (env RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) with NCCL on CUDA, each rank on GPU LOCAL_RANK (`torch.cuda.set_device`), or gloo
    on CPU; returns (device, rank). Without torchrun: (`--device` resolved, 0).

    `main` has refused the other commands under torchrun already (`check_launch`).
    """
    torch = _torch()
    device = resolve_device(args.device)
    if launched_world_size() == 1:
        return device, 0
    import torch.distributed as dist

    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() == 0:
        print(f"{PROG}: each image split by rows over {dist.get_world_size()} processes ({dist.get_backend()}, "
              f"{device.type})", file=sys.stderr)
    return device, dist.get_rank()


_TORCHRUN_NOTE = ("Under torchrun (`torchrun --nproc-per-node N -m sdvae_fast ...`) each image is split by rows over "
                  "the N processes, exactly (patch parallelism: NCCL with one GPU per process, gloo on CPU); rank 0 "
                  "writes the files and prints.")


def check_launch(command: str) -> None:
    """Under torchrun, only the commands that split images by rows may run (the others would run N times over).

    Raises:
        CLIError: WORLD_SIZE > 1 and `command` is not in PARALLEL_COMMANDS.
    """
    if launched_world_size() > 1 and command not in PARALLEL_COMMANDS:
        raise CLIError(f"{command} does not split work over processes; under torchrun only "
                       f"{' and '.join(PARALLEL_COMMANDS)} do (run {command} without torchrun)")


def _end_patch_parallel() -> None:
    """Leave the process group `start_patch_parallel` joined (a no-op without torchrun)."""
    if launched_world_size() > 1 and "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def is_consistency_decoder(vae) -> bool:
    """Whether `vae` is a consistency decoder (diffusers' ConsistencyDecoderVAE structure: a `decoder_unet`)."""
    return hasattr(vae, "decoder_unet")


def decode_options(vae, args, device) -> dict:
    """Keyword arguments of `vae.decode` beyond the latents: for a consistency decoder, whose decode draws
    noise, a fresh `torch.Generator` on `device` seeded with `--seed` (so every decode of the same latents,
    warm-up or timed, gives the same image); nothing for an AutoencoderKL."""
    from sdvae_fast.parity import decode_kwargs

    return decode_kwargs(vae, device, seed=args.seed)


def _model_for(args, device, dtype):
    """`load_vae`, with patch parallelism on when torchrun started several processes.

    Raises:
        CLIError: several processes with a consistency decoder (patch parallelism splits AutoencoderKLs only).
    """
    vae = load_vae(args, device=device, dtype=dtype)
    if launched_world_size() > 1 and is_consistency_decoder(vae):
        raise CLIError("the consistency decoder does not split images over processes (patch parallelism covers "
                       "AutoencoderKL VAEs); run it without torchrun")
    if launched_world_size() > 1:
        from sdvae_fast.patching import enable_patch_parallel

        enable_patch_parallel(vae)
    return vae


def _sync(device) -> None:
    if device.type == "cuda":
        _torch().cuda.synchronize(device)


def _unique_names(sources: Sequence[str]) -> list[str]:
    """Output stems for image sources: the file stem or skimage name, suffixed `_2`, `_3` on repeats."""
    names, seen = [], {}
    for src in sources:
        stem = src.split(":", 1)[1] if src.startswith("skimage:") else Path(src).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def _load_images(sources: Sequence[str]):
    """Load every image first, so that a bad path fails before the model is built; the loader's warnings (an
    alpha channel composited over white) are printed as `sdvae-fast: warning:` lines."""
    from sdvae_fast.images import load_image

    images = []
    for src in sources:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                images.append(load_image(src))
        except FileNotFoundError as exc:
            raise CLIError(str(exc)) from exc
        for warning in caught:  # e.g. transparent pixels composited over white
            _warn(" ".join(str(warning.message).split()))
    return images


# ---------------------------------------------------------------------------------------------------------------
# reconstruct / encode / decode / info
# ---------------------------------------------------------------------------------------------------------------


def cmd_reconstruct(args) -> int:
    """Encode and decode each image; write `OUT/NAME.png` (input size) and print PSNR, SSIM and ms per image.

    A consistency decoder (`--vae` folder with `_class_name` ConsistencyDecoderVAE) decodes with its noise drawn
    from a generator seeded with `--seed`, fresh for every decode: the same command writes the same images.

    Timing excludes warm-up: the first time an image size (after padding) is seen, one untimed encode + decode
    of that image runs first (on a GPU that is where kernels compile and autotune), so each printed time is a
    steady-state run. The summary's median is over the timed runs, one per image, and says how many.
    """
    torch = _torch()
    from tqdm import tqdm

    from sdvae_fast.images import format_ssim, image_metrics, pad_to_multiple, to_pil, to_uint8

    images = _load_images(args.images)
    device, rank = start_patch_parallel(args)
    out_dir = Path(args.out)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(args.dtype, device)
    vae = _model_for(args, device, dtype)

    def run(padded, h, w):
        z = encoded_latents(vae.encode(padded))  # (1, C, H8/8, W8/8), unscaled (VQ: not yet quantised)
        return vae.decode(z, **decode_options(vae, args, device)).sample[..., :h, :w]  # (1, 3, H, W), cropped

    rows, warmed = [], set()
    with torch.no_grad():
        bar = tqdm(list(zip(_unique_names(args.images), images)), desc="reconstruct", unit="img",
                   file=sys.stderr, disable=args.quiet or rank != 0)
        for name, x in bar:
            padded, (h, w) = pad_to_multiple(x, 8)  # (1, 3, H8, W8), edge-replicated
            padded = padded.to(device=device, dtype=dtype)
            if tuple(padded.shape) not in warmed:  # untimed warm-up at each new size
                run(padded, h, w)
                warmed.add(tuple(padded.shape))
            _sync(device)
            start = time.perf_counter()
            y = run(padded, h, w)
            _sync(device)
            ms = (time.perf_counter() - start) * 1e3
            if rank != 0:  # rank 0 writes and prints
                continue
            psnr, ssim = image_metrics(to_uint8(x)[0], to_uint8(y)[0])
            path = out_dir / f"{name}.png"
            to_pil(y)[0].save(path)
            rows.append((psnr, ssim, ms))
            tqdm.write(f"{path}  {w}x{h}  PSNR {psnr:.2f} dB  SSIM {format_ssim(ssim)}  {ms:.1f} ms",
                       file=sys.stdout)
    if len(rows) > 1:
        psnrs, ssims, times = zip(*rows)
        median = statistics.median(times)
        ssims = [v for v in ssims if v is not None]  # images under 7 px on a side have no SSIM
        mean_ssim = sum(ssims) / len(ssims) if ssims else None
        print(f"mean PSNR {sum(psnrs) / len(psnrs):.2f} dB  mean SSIM {format_ssim(mean_ssim)}  "
              f"median {median:.1f} ms per image over {len(times)} timed runs (one per image; warm-up excluded: "
              f"one untimed run at each of {len(warmed)} image size(s))")
    return 0


def cmd_encode(args) -> int:
    """Encode images to scaled latents `(z - shift_factor) * scaling_factor` in one safetensors file.

    One tensor per image, (1, C, H8/8, W8/8) float32, keyed by the image's name. The metadata holds
    `scaling_factor`, `shift_factor`, the VAE config (JSON) and each image's source and size, so `decode` can
    undo the scaling and crop the padding away.
    """
    torch = _torch()
    from tqdm import tqdm

    from sdvae_fast.images import pad_to_multiple

    images = _load_images(args.images)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    vae = load_vae(args, device=device, dtype=dtype)
    flux2 = _is_flux2(vae)
    # FLUX.2: latents are patchified (2x2), so images are padded to 16 pixels, and normalised by the BatchNorm.
    scaling, shift = (1.0, 0.0) if flux2 else scaling_of(vae)
    multiple = vae.downsample_factor * max(vae.patch_size) if flux2 else 8
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.sample else None

    tensors, entries = {}, []
    with torch.no_grad():
        for name, src, x in tqdm(list(zip(_unique_names(args.images), args.images, images)), desc="encode",
                                 unit="img", file=sys.stderr, disable=args.quiet):
            padded, (h, w) = pad_to_multiple(x, multiple)
            z = encoded_latents(vae.encode(padded.to(device=device, dtype=dtype)), generator, args.sample)
            if flux2:  # (1, 4C, h/2, w/2): what FLUX.2 pipelines hand their transformer
                tensors[name] = vae.normalize_latents(vae.patchify_latents(z.float())).cpu().contiguous()
            else:
                tensors[name] = ((z.float() - shift) * scaling).cpu().contiguous()  # (1, C, h, w) scaled
            entries.append({"key": name, "source": src, "height": h, "width": w})
    out = write_latents(args.output, tensors, scaling=scaling, shift=shift,
                        posterior="sample" if args.sample else "mode", config=config_dict(vae), entries=entries,
                        model=type(vae).__name__, normalization=FLUX2_BATCH_NORM if flux2 else "scaling")
    for entry in entries:
        shape = tuple(tensors[entry["key"]].shape)
        print(f"{entry['key']}: {entry['width']}x{entry['height']} -> latents {shape}")
    if flux2:
        print(f"wrote {out} (FLUX.2: patchified 2x2, normalised by the VAE's BatchNorm statistics)")
    else:
        print(f"wrote {out} (scaled: (z - {shift}) * {scaling})")
    return 0


def cmd_decode(args) -> int:
    """Decode every tensor of a latents file to PNGs in `--out`, undoing `(z - shift) * scaling` first.

    The scaling stored in the file wins (it is what was applied); without it the VAE's config is used. Tensors
    may be (C, h, w) or (N, C, h, w); images written by `encode` are cropped back to their original size.
    Everything is checked before the first image is decoded: latents of a VAE with another channel count are an
    error naming that VAE's family; a different scaling (same channels) is a warning, since the latent spaces of
    different VAEs (e.g. SD 1.x and SDXL) are not interchangeable. A file whose metadata names another model class
    is an error; a file without that record (any safetensors file of latents) is decoded by any model whose
    channel count fits.
    """
    torch = _torch()
    from tqdm import tqdm

    from sdvae_fast.images import to_pil

    tensors, metadata = read_latents(args.latents)
    batches = check_latents(tensors, metadata, args.latents)
    entries = json_field(metadata, "images", [], args.latents)
    sizes = {e["key"]: (e["height"], e["width"]) for e in entries if isinstance(e, dict) and "key" in e}
    file_config = json_field(metadata, "config", {}, args.latents)
    device, rank = start_patch_parallel(args)
    dtype = resolve_dtype(args.dtype, device)
    vae = _model_for(args, device, dtype)
    normalization = metadata.get("normalization", "scaling")
    if _is_flux2(vae) or normalization == FLUX2_BATCH_NORM:
        return _decode_flux2(args, vae, batches, metadata, sizes, device, dtype, rank, tensors)
    model_scaling, model_shift = scaling_of(vae)
    scaling = float(metadata.get("scaling_factor", model_scaling))
    shift = float(metadata.get("shift_factor", model_shift))
    family = family_of(scaling, shift)
    made_by = f"a VAE with scaling_factor={scaling}, shift_factor={shift}"
    made_by += f" (the {family} family)" if family else ""
    channels = decoder_channels(vae)
    # A file without a "model" key (not written by `encode`: any safetensors file of latents) names no model: any
    # model whose channel count fits decodes it (checked below).
    file_model = metadata.get("model")
    # The consistency decoder decodes the SD kl-f8 latent space an AutoencoderKL encodes (and encodes with it).
    kl_f8 = {"AutoencoderKL", "ConsistencyDecoderVAE"}
    model = type(vae).__name__
    if file_model is not None and file_model != model and not {file_model, model} <= kl_f8:
        raise CLIError(f"{args.latents} was written by {_a(file_model)}; this model is {_a(model)}. "
                       f"Decode with the model that encoded it (--vae PATH or --preset)")
    file_channels = file_config.get("latent_channels") if isinstance(file_config, dict) else None
    if file_model == "VQModel" and isinstance(file_config, dict):
        file_channels = file_config.get("vq_embed_dim") or file_channels
    if file_channels is not None and int(file_channels) != channels:
        raise CLIError(f"{args.latents} was encoded by {made_by} with {file_channels} latent channels; this VAE "
                       f"has {channels}. Decode with the VAE that encoded it (--vae PATH, or --preset "
                       f"{family or 'NAME'})")
    for key, latents in batches.items():
        if latents.shape[1] != channels:
            raise CLIError(f"{args.latents}: tensor {key!r} has shape {tuple(tensors[key].shape)}; this VAE "
                           f"expects (N, {channels}, h, w) or ({channels}, h, w) latents")
    if (scaling, shift) != (model_scaling, model_shift) and rank == 0:
        _warn(f"{args.latents} was encoded by {made_by}; this VAE's config says scaling_factor={model_scaling}, "
              f"shift_factor={model_shift}, so it is probably another VAE, whose latent space differs. Unscaling "
              f"with the file's values; decode with the VAE that encoded it for meaningful images.")
    out_dir = Path(args.out)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    with torch.no_grad():
        for key, latents in tqdm(batches.items(), desc="decode", unit="tensor", file=sys.stderr,
                                 disable=args.quiet or rank != 0):
            z = latents.to(device=device, dtype=torch.float32) / scaling + shift  # (N, C, h, w) unscaled
            y = vae.decode(z.to(dtype), **decode_options(vae, args, device)).sample  # (N, 3, 8h, 8w)
            if rank != 0:  # rank 0 writes and prints
                continue
            if key in sizes:
                h, w = sizes[key]
                y = y[..., :h, :w]
            for j, img in enumerate(to_pil(y)):
                path = out_dir / (f"{key}.png" if y.shape[0] == 1 else f"{key}_{j}.png")
                img.save(path)
                print(f"{path}  {img.width}x{img.height}")
    return 0


def _decode_flux2(args, vae, batches: dict, metadata: dict, sizes: dict, device, dtype, rank: int,
                  tensors: Optional[dict] = None) -> int:
    """`decode` of FLUX.2 latents: each (N, 4C, h, w) tensor denormalised with the VAE's BatchNorm statistics and
    unpatchified to (N, C, 2h, 2w) before `decode`, as FLUX.2 pipelines do. A file marked
    `normalization: scaling` (another VAE's scaled latents) or FLUX.2 latents with another VAE are CLI errors,
    as are tensors whose channel count is not the BatchNorm's (reported with their shape in the file, `tensors`:
    (C, h, w) stays three-dimensional)."""
    torch = _torch()
    from tqdm import tqdm

    from sdvae_fast.images import to_pil

    normalization = metadata.get("normalization", "scaling" if "scaling_factor" in metadata else FLUX2_BATCH_NORM)
    if not _is_flux2(vae):
        raise CLIError(f"{args.latents} holds FLUX.2 latents (normalised by its BatchNorm); decode them with "
                       f"FLUX.2's VAE (--vae FOLDER of an AutoencoderKLFlux2, or --preset flux2 / flux2-small)")
    if normalization != FLUX2_BATCH_NORM:
        raise CLIError(f"{args.latents} holds latents scaled by scaling_factor={metadata.get('scaling_factor')} "
                       f"(model {metadata.get('model', 'AutoencoderKL')}), not FLUX.2's BatchNorm-normalised "
                       f"latents; decode them with the VAE that encoded them")
    channels = vae.bn.num_features
    for key, latents in batches.items():
        if latents.shape[1] != channels:
            shape = tuple((tensors or batches)[key].shape)  # as stored: a (C, h, w) tensor is not shown batched
            raise CLIError(f"{args.latents}: tensor {key!r} has shape {shape}; FLUX.2's VAE expects "
                           f"patchified latents (N, {channels}, h, w) or ({channels}, h, w)")
    out_dir = Path(args.out)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for key, latents in tqdm(batches.items(), desc="decode", unit="tensor", file=sys.stderr,
                                 disable=args.quiet or rank != 0):
            tokens = latents.to(device=device, dtype=torch.float32)  # (N, 4C, h, w) normalised
            z = vae.unpatchify_latents(vae.denormalize_latents(tokens))  # (N, C, 2h, 2w)
            y = vae.decode(z.to(dtype)).sample  # (N, 3, 16h, 16w)
            if rank != 0:
                continue
            if key in sizes:
                h, w = sizes[key]
                y = y[..., :h, :w]
            for j, img in enumerate(to_pil(y)):
                path = out_dir / (f"{key}.png" if y.shape[0] == 1 else f"{key}_{j}.png")
                img.save(path)
                print(f"{path}  {img.width}x{img.height}")
    return 0


def _flux2_info(info: dict, config_path: Path) -> None:
    """Correct `inspect_checkpoint`'s report of a FLUX.2 VAE folder in place: the model class, the family
    ("flux2", "flux2-small", or FLUX.2 with other widths), the whole config.json (decoder widths and BatchNorm
    fields included), no scaling_factor source, and how its latents are normalised."""
    data = json.loads(config_path.read_text())
    public = {k: v for k, v in data.items() if not k.startswith("_")}
    family = next((name for name, preset in FLUX2_PRESETS.items()
                   if all(json.dumps(public.get(k)) == json.dumps(list(v) if isinstance(v, tuple) else v)
                          for k, v in preset.items() if k in ("block_out_channels", "decoder_block_out_channels",
                                                               "latent_channels", "norm_num_groups"))), None)
    info["model"] = "AutoencoderKLFlux2"
    info["family"] = family or "FLUX.2 (widths of no preset)"
    info["family_certain"] = True
    info["family_reason"] = "_class_name AutoencoderKLFlux2 in config.json"
    info["config"] = public
    info["config_sources"] = {"norm_num_groups": "config.json"}
    info["latent_normalization"] = (f"BatchNorm statistics (bn.running_mean, bn.running_var, batch_norm_eps "
                                    f"{public.get('batch_norm_eps')}) over {public.get('patch_size')}-patchified "
                                    f"latents, applied by pipelines around encode/decode; no scaling_factor")


def _flux2_file_info(args, path: Path) -> dict:
    """`info`'s report of a single file of FLUX.2's VAE (`sdvae_fast.flux2.inspect_single_file`): model
    AutoencoderKLFlux2, the config read from the shapes (or `--preset flux2|flux2-small`'s), `--norm-num-groups`
    on top. Raises CLIError for `--config` or scaling options; CheckpointError for a file that is no FLUX.2 VAE."""
    from sdvae_fast.flux2 import inspect_single_file

    if args.config:
        raise CLIError(f"--config reads AutoencoderKL files; the architecture of FLUX.2's VAE in {path} is read from "
                       f"its weights (or give --preset flux2 / flux2-small)")
    overrides = _overrides(args)
    scaling = [f"--{k.replace('_', '-')}" for k in ("scaling_factor", "shift_factor") if k in overrides]
    if scaling:
        raise CLIError(f"{' / '.join(scaling)} do not apply to {path} (FLUX.2's VAE): its latents are normalised by "
                       f"the VAE's BatchNorm statistics, not scaled")
    preset = args.preset if args.preset in FLUX2_PRESETS else None
    return inspect_single_file(path, config=preset, unsafe_pickle=args.unsafe_pickle, **overrides)


def cmd_info(args) -> int:
    """Print what `inspect_checkpoint` detects: layout, model family, config, parameter count and dtype.

    `--preset` or `--config` (single files only; the architecture must fit the weights), `--scaling-factor`,
    `--shift-factor` and `--norm-num-groups` change the family and config shown, as they change what
    `reconstruct` loads. Each config value that nothing stated (not the file's metadata, a config.json beside it
    or an option) is marked "(assumed: ...)", and `config sources` says where norm_num_groups and scaling_factor
    came from. A single file of FLUX.2's VAE (`is_flux2_checkpoint`, or `--preset flux2|flux2-small`) is reported
    as AutoencoderKLFlux2 with the config `AutoencoderKLFlux2.from_single_file` would use (`_flux2_file_info`).
    """
    from sdvae_fast.loading import TINY_FOLDER, TINY_NAMES, inspect_checkpoint

    path = Path(args.checkpoint)
    if not path.exists() and args.checkpoint in TINY_NAMES:
        path = TINY_FOLDER
    if not path.exists():
        raise CLIError(f"checkpoint not found: {path}")
    if args.preset in VQ_PRESETS or is_vq_checkpoint(path, args.unsafe_pickle):
        return _vq_info(args, path)
    if path.is_file() and (args.preset in FLUX2_PRESETS or is_flux2_checkpoint(path, args.unsafe_pickle)):
        return _print_info(args, path, _flux2_file_info(args, path), "--preset")
    config = _config_argument(args)
    option = "--config" if args.config else "--preset"
    if config:
        if path.is_dir():
            raise CLIError(f"{option} {config} applies to single files; the diffusers folder {path} carries "
                           f"its own config.json")
        mismatch = preset_mismatch(path, config, args.unsafe_pickle, option)
        if mismatch:
            raise CLIError(mismatch)
    info = inspect_checkpoint(str(path), config=config, unsafe_pickle=args.unsafe_pickle, **_overrides(args))
    subfolder = _flux2_subfolder(path) if path.is_dir() else None
    if subfolder is not None:
        _flux2_info(info, path / subfolder / "config.json")
    if args.preset:
        info["family"], info["family_certain"], info["family_reason"] = args.preset, True, f"--preset {args.preset}"
    return _print_info(args, path, info, option)


def _print_info(args, path: Path, info: dict, option: str) -> int:
    """Print an `info` report (`--json`: as JSON); config sources the loader calls "argument" are named by the
    option that gave them (`--norm-num-groups`, ... or `option`, the --preset / --config flag)."""
    sources = info.get("config_sources", {})
    for field_name, source in sources.items():  # the loader says "argument"; the CLI names its flag
        if source == "argument":
            flag = "--" + field_name.replace("_", "-")
            sources[field_name] = flag if field_name in _overrides(args) else option
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{path}")
    for key, value in info.items():
        label = key.replace("_", " ")
        if key == "notes":
            for note in value:
                print(f"  note: {note}")
        elif key == "config":
            print(f"  {label}:")
            for field_name, field_value in value.items():
                source = sources.get(field_name, "")
                # Values nothing stated are marked, with the option that sets them.
                mark = (f"  (assumed: {source.removeprefix('assumed').strip(' :')}; set with "
                        f"--{field_name.replace('_', '-')})") if source.startswith("assumed") else ""
                print(f"    {field_name}: {json.dumps(field_value, default=str)}{mark}")
        elif key == "config_sources":
            print(f"  {label}:")
            for field_name, source in value.items():
                print(f"    {field_name}: {source}")
        elif isinstance(value, dict):
            print(f"  {label}:")
            for field_name, field_value in value.items():
                print(f"    {field_name}: {json.dumps(field_value, default=str)}")
        elif isinstance(value, int) and not isinstance(value, bool) and "param" in key:
            print(f"  {label}: {value:,} ({value / 1e6:.2f} M)")
        elif isinstance(value, (list, tuple)):
            print(f"  {label}: {', '.join(map(str, value))}")
        else:
            print(f"  {label}: {value if value != '' else '(none)'}")
    return 0


def _vq_info(args, path: Path) -> int:
    """`info` for a VQ model: its class, config (the folder's, or inferred from a single file's shapes, or the
    preset) and parameter count; `--json` prints the same as JSON."""
    with _without_accelerate_notice():
        vae = _build_vq(args, path)
    if vae is None:
        raise CLIError(f"{path}: --preset {args.preset} names a VQ model, but the checkpoint is not one")
    info = {"model": "VQModel", "layout": "diffusers folder" if path.is_dir() else "latent-diffusion single file",
            "parameters": sum(p.numel() for p in vae.parameters()),
            "config": {k: v for k, v in config_dict(vae).items() if not k.startswith("_")}}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{path}")
    print(f"  model: {info['model']}\n  layout: {info['layout']}")
    print(f"  parameters: {info['parameters']:,} ({info['parameters'] / 1e6:.2f} M)\n  config:")
    for field_name, value in info["config"].items():
        print(f"    {field_name}: {json.dumps(value, default=str)}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# parity / profile / bench / train
# ---------------------------------------------------------------------------------------------------------------


def cmd_parity(args) -> int:
    """Compare the fast path with the fp32 reference unit by unit; exit 1 when a tolerance is exceeded."""
    from sdvae_fast import parity

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or "bf16", device)
    backend = "triton" if args.backend == "auto" else args.backend
    res = args.res or (512 if device.type == "cuda" else 64)
    reference = load_vae(args, device=device, dtype=_torch().float32, backend="torch")
    parts = [p for p, on in (("encode", args.encode), ("decode", args.decode)) if on] or ["encode", "decode"]
    report = parity.run_parity(reference, device=device, dtype=dtype, backend=backend, res=res,
                               batch=args.batch, images=args.image, parts=parts, tol_factor=args.tol_factor,
                               tol_floor=args.tol_floor, psnr_margin=args.psnr_margin, quiet=args.quiet,
                               on_row=lambda row: print(row.line(), flush=True))
    text = report.format()
    if any("*" in row.name for rows in report.rows.values() for row in rows):
        # The legend of the `*` in `encoder.conv_out*` goes under the tables, before the verdict (still the last line).
        tables, _, verdict = text.rpartition("\n")
        legend = ("*: the output head, conv_norm_out -> conv_act -> conv_out (GroupNorm, SiLU, conv), compared as "
                  "one unit")
        text = f"{tables}\n{legend}\n\n{verdict}" if tables else f"{legend}\n{verdict}"
    print(text)
    if args.out:
        report.write(Path(args.out))
    return 0 if report.passed else 1


def _require_cuda(command: str, device) -> None:
    if device.type != "cuda":
        raise CLIError(f"{command} times GPU kernels and needs a CUDA device; none is available here "
                       f"(torch {_torch().__version__}). On CPU, `sdvae-fast parity` checks correctness "
                       f"through the Triton interpreter.")


def cmd_profile(args) -> int:
    """Per-unit time, FLOPs, TFLOP/s, bytes and peak memory on a CUDA device, plus a chrome trace."""
    from sdvae_fast import profile

    device = resolve_device(args.device)
    _require_cuda("profile", device)
    dtype = resolve_dtype(args.dtype or "bf16", device)
    vae = load_vae(args, device=device, dtype=dtype)
    parts = [p for p, on in (("encode", args.encode), ("decode", args.decode)) if on] or ["encode", "decode"]
    profile.run_profile(vae, device=device, dtype=dtype, res=args.res, batch=args.batch, parts=parts,
                        out_dir=Path(args.out))
    return 0


def cmd_bench(args) -> int:
    """End-to-end encode/decode against diffusers eager and torch.compile; CSV, markdown and PNG to --out."""
    from sdvae_fast import bench

    device = resolve_device(args.device)
    _require_cuda("bench", device)
    dtype = resolve_dtype(args.dtype or "bf16", device)
    vae = load_vae(args, device=device, dtype=dtype, backend=args.backend)
    bench.run_bench(vae, device=device, dtype=dtype, resolutions=args.res, batch=args.batch,
                    out_dir=Path(args.out), name=args.name, compile_res=args.compile_res,
                    peers=not args.no_peers, budget_s=args.budget_s, quiet=args.quiet)
    return 0


def _run_train(argv: list[str]) -> int:
    """`sdvae-fast train ...`: arguments and behaviour belong to `sdvae_fast.train` (imported only here)."""
    from sdvae_fast.train import add_train_arguments, run_from_args

    parser = argparse.ArgumentParser(prog=f"{PROG} train", description="Fine-tune or train a VAE.")
    add_train_arguments(parser)
    result = run_from_args(parser.parse_args(argv))
    return int(result or 0)


# ---------------------------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------------------------

_PAD_NOTE = ("Images whose sides are not multiples of 8 are padded at the bottom and right by repeating the edge "
             "pixels, encoded, and the decoded image is cropped back to the input's size.")
_IMAGE_NOTE = "IMAGE is a file Pillow reads, or skimage:NAME for a photo scikit-image ships (e.g. skimage:chelsea)."


def _checkpoint_options(parser: argparse.ArgumentParser, *, with_vae: bool) -> None:
    """The options that say how a checkpoint is read: `--preset`, the scaling options, `--unsafe-pickle` (and,
    for commands that run a VAE, `--vae` and `--seed`)."""
    group = parser.add_argument_group("model")
    if with_vae:
        group.add_argument("--vae", metavar="PATH",
                           help="a diffusers VAE folder (config.json + safetensors; an AutoencoderKL, or DALL-E "
                                "3's consistency decoder when config.json's _class_name is ConsistencyDecoderVAE) "
                                "or a single checkpoint file "
                                "(.safetensors/.ckpt/.pt, any layout: diffusers, LDM, whole-model; FLUX.2's VAE in "
                                "black-forest-labs' original layout, found by its bn.running_mean); auto-detected. "
                                f"Default: the shipped {DEFAULT_VAE}, else preset sd15 with seeded weights")
    alone = "alone, seeded random weights; " if with_vae else ""
    presets = CLI_PRESETS + tuple(VQ_PRESETS)  # info reads FLUX.2 and VQ files with them too
    group.add_argument("--preset", metavar="NAME", choices=presets,
                       help=f"architecture and scaling preset ({', '.join(presets)}; vq-f4 / vq-f8: latent "
                            f"diffusion's VQ autoencoders): {alone}with a single "
                            "checkpoint file, the model family to read it as (SD 1.x and SDXL VAEs, and SD3 and "
                            "FLUX.1 VAEs, have the same weight shapes); the preset's architecture must fit the "
                            f"weights. flux2 / flux2-small (FLUX.2's VAE and its small decoder): "
                            f"{'seeded weights, or ' if with_vae else ''}"
                            "the architecture to read an original FLUX.2 file with (else read from its shapes); a "
                            "FLUX.2 diffusers folder is detected from its config's _class_name")
    group.add_argument("--scaling-factor", type=float, metavar="X",
                       help="the config's scaling_factor (latents are scaled (z - shift_factor) * scaling_factor); "
                            "default: the checkpoint's or preset's")
    group.add_argument("--shift-factor", type=float, metavar="X",
                       help="the config's shift_factor (default: the checkpoint's or preset's; none for SD 1.x/SDXL)")
    group.add_argument("--config", metavar="CONFIG",
                       help="a diffusers config.json (or a folder holding one, or a preset name) to read a single "
                            "checkpoint file with, instead of --preset: its architecture must fit the weights, and "
                            "it supplies what the weights cannot tell (norm_num_groups, scaling_factor, ...). "
                            "Default: the file's metadata, a config.json beside the file, else the family guess")
    group.add_argument("--norm-num-groups", type=int, metavar="N",
                       help="GroupNorm groups of the VAE (cannot be read from the weights). Default: the file's "
                            "metadata or a config.json beside it, else 32 (every public SD VAE), which info marks "
                            "as assumed")
    group.add_argument("--unsafe-pickle", action="store_true",
                       help="let a pickled checkpoint (.ckpt/.pt/.bin) build arbitrary Python objects, which can "
                            "run code from the file: only for files you trust (by default only tensors are "
                            "unpickled)")
    if with_vae:
        group.add_argument("--seed", type=int, default=0,
                           help="seed for preset weights, --sample and the consistency decoder's noise (default 0)")


def _common_options() -> argparse.ArgumentParser:
    """The parent parser of the commands that run a VAE: model options, then device, dtype, backend, quiet."""
    common = argparse.ArgumentParser(add_help=False)
    _checkpoint_options(common, with_vae=True)
    group = common.add_argument_group("device")
    group.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cuda when available)")
    group.add_argument("--dtype", choices=DTYPE_NAMES,
                       help="compute dtype (default: bf16 on CUDA, fp32 on CPU; parity: bf16 everywhere)")
    group.add_argument("--backend", choices=BACKENDS,
                       help="auto: Triton kernels on CUDA, PyTorch elsewhere; triton: kernels everywhere (the "
                            "interpreter on CPU, slow); torch: the PyTorch reference (default: the environment "
                            f"variable {BACKEND_ENV}, else auto)")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `sdvae-fast` (every subcommand except `train`, which `sdvae_fast.train` defines)."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog=PROG, description="A fast Stable Diffusion VAE (Triton kernels, diffusers-compatible AutoencoderKL).",
        epilog="Run `sdvae-fast COMMAND --help` for a command's options; `sdvae-fast train --help` for training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, func, help_text, description=None, parents=(common,)):
        p = sub.add_parser(name, parents=list(parents), help=help_text, description=description or help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("reconstruct", cmd_reconstruct, "encode and decode images; print PSNR, SSIM and ms per image",
            "Encode and decode each IMAGE through the VAE, write OUT/NAME.png at the input's size, and print PSNR "
            "and SSIM (skimage.metrics, on the 8-bit images) and milliseconds per image. SSIM uses a 7x7 window, "
            "so it is n/a for images smaller than 7 pixels on a side. Times exclude warm-up: each new image size "
            "is first run once untimed; the summary gives the median over the timed runs (one per image).\n\n"
            f"{_PAD_NOTE}\n{_IMAGE_NOTE}\n{_TORCHRUN_NOTE}")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="folder for the PNGs (created)")

    p = add("encode", cmd_encode, "encode images to scaled latents in a safetensors file",
            "Encode each IMAGE and store its latents scaled as diffusion pipelines use them, "
            "(z - shift_factor) * scaling_factor, one tensor per image, with the scaling and the VAE config in "
            f"the file's metadata.\n\n{_PAD_NOTE.replace('the decoded image is cropped', '`decode` crops')}\n"
            f"{_IMAGE_NOTE}")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, metavar="LATENTS", help="output .safetensors file")
    p.add_argument("--sample", action="store_true",
                   help="draw z from the posterior (seeded by --seed) instead of taking its mode (the mean)")

    p = add("decode", cmd_decode, "decode a latents file to PNGs",
            "Decode every tensor in LATENTS (written by `encode`, or any safetensors file of scaled latents "
            "(N, C, h, w) or (C, h, w)) to PNGs, unscaling with z / scaling_factor + shift_factor. FLUX.2's VAE: "
            "latents written by `encode` of a FLUX.2 VAE record normalization (its BatchNorm), and decode undoes "
            "the BatchNorm normalisation and the 2x2 patchify (N, 4C, h, w) -> (N, C, 2h, 2w) before decoding. A VQ "
            "model (--vae of a VQModel, --preset vq-f4|vq-f8) takes latents of its codebook width (vq_embed_dim), "
            "quantised to the nearest codebook entries in decode.\n\n" + _TORCHRUN_NOTE)
    p.add_argument("latents", metavar="LATENTS")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="folder for the PNGs (created)")

    p = add("info", cmd_info, "show a checkpoint's layout, family, config, parameters and dtype",
            "Show what the loader detects in CHECKPOINT without building a model: layout, model family (guessed "
            "for VAE-only files: --preset or the scaling options change it, as they change what reconstruct "
            "loads), config, parameter count and dtypes.", parents=())
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file or diffusers folder")
    _checkpoint_options(p, with_vae=False)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("parity", cmd_parity, "compare the fast path with the fp32 reference, unit by unit",
            "Run the fast path (Triton kernels; through the interpreter on CPU) and the fp32 PyTorch reference on "
            "the same weights and inputs. Each unit (conv_in, every resnet, downsample, upsample, attention, the "
            "output head) is fed the reference's own input, so errors do not compound; the table shows max abs "
            "error, relative L2 error ||a-b||/||b||, the worst index and PyTorch's own error in the same dtype. "
            "Then the whole encode and decode, with the decoded image's PSNR against the reference image.\n\n"
            "A check passes when rel_l2 <= TOL_FACTOR * torch_rel_l2 + TOL_FLOOR, and the image PSNR is at least "
            "PyTorch's PSNR minus PSNR_MARGIN dB (or 50 dB). Exit code 1 when any check fails. parity runs in "
            "bf16 unless --dtype says otherwise, on CPU too. On CPU it is slow: the Triton interpreter took "
            "about 11 minutes for one 64x64 sd15 image (the CPU default; encode and decode, 2-core machine), and "
            "a smaller --res saves far less than its pixel count, since the cost is mostly per kernel launch "
            "and channel count (at --res 16 the encoder alone took about 4.5 CPU-minutes). --encode or "
            "--decode runs only one half; a narrow --vae is much faster.\n\n"
            "A VQ model (--vae of a VQModel, --preset vq-f4|vq-f8) is compared on its unquantised latents; the "
            "decode table starts with the quantiser's row (quantize: z_q, with the share of codes equal to the "
            "reference's: a differing code must be a near tie), and the decoders are fed the reference's "
            "quantised latents (force_not_quantize), so that a code flipped by rounding does not decide the image "
            "comparison.")
    p.add_argument("--res", type=int, help="image side in pixels (default 512 on CUDA, 64 on CPU)")
    p.add_argument("--batch", type=int, default=1, help="images per batch (default 1)")
    p.add_argument("--image", nargs="+", metavar="IMAGE",
                   help="encoder inputs (default: scikit-image photos chelsea, coffee, astronaut), "
                        "center-cropped and resized to --res")
    p.add_argument("--encode", action="store_true", help="compare only the encoder")
    p.add_argument("--decode", action="store_true", help="compare only the decoder (fed the reference's latents)")
    p.add_argument("--tol-factor", type=float, default=2.0,
                   help="allowed multiple of PyTorch's own error (default 2.0)")
    p.add_argument("--tol-floor", type=float, help="added to the allowed rel L2 error "
                                                      "(default 1e-4 fp32, 2e-3 fp16, 5e-3 bf16)")
    p.add_argument("--psnr-margin", type=float, default=6.0,
                   help="allowed PSNR shortfall against PyTorch in the same dtype, dB (default 6, i.e. 2x error)")
    p.add_argument("--out", metavar="DIR", help="also write the tables as markdown to DIR/parity.md")
    p.set_defaults(dtype=None)

    p = add("profile", cmd_profile, "per-unit GPU time, FLOPs, TFLOP/s, bytes and memory (CUDA only)",
            "Time every unit of the fast path with CUDA events and report FLOPs (torch.utils.flop_counter, the "
            "reference's arithmetic), TFLOP/s, percent of this device's measured bf16 matmul rate, the minimum "
            "bytes moved (inputs, outputs, weights) and peak memory; write a chrome trace (torch.profiler).")
    p.add_argument("--res", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--batch", type=int, default=1, help="images per batch (default 1)")
    p.add_argument("--encode", action="store_true", help="profile only the encoder")
    p.add_argument("--decode", action="store_true", help="profile only the decoder")
    p.add_argument("--out", default="profile", metavar="DIR", help="folder for tables and traces (default profile)")

    p = add("bench", cmd_bench, "end-to-end encode/decode timings against diffusers (CUDA only)",
            "Median time of encode and decode per resolution after warm-up (CUDA events) for sdvae-fast, "
            "diffusers eager (SDPA attention) and torch.compile of diffusers' decode (compiled once, at "
            "--compile-res, where sdvae-fast's decode is also timed with a separate GroupNorm statistics pass "
            "instead of the statistics its convs emit), all in one run; prints ratios, TFLOP/s, percent of the "
            "790 TFLOP/s floor and peak memory; writes NAME.csv, NAME.md and NAME.png (matplotlib) to --out.")
    p.add_argument("--res", type=int, nargs="+", default=[512, 1024, 2048],
                   help="image sides in pixels (default 512 1024 2048)")
    p.add_argument("--batch", type=int, default=1, help="images per batch (default 1)")
    p.add_argument("--compile-res", type=int, default=1024,
                   help="the one resolution at which diffusers' decode is also run under torch.compile and "
                        "ours without emitted statistics (0: never; default 1024)")
    p.add_argument("--no-peers", action="store_true", help="time sdvae-fast only (no diffusers needed)")
    p.add_argument("--budget-s", type=float, default=2.0,
                   help="timed seconds per measurement at most (default 2.0)")
    p.add_argument("--out", default="bench/results", metavar="DIR", help="folder for the results "
                                                                          "(default bench/results)")
    p.add_argument("--name", help="file stem of the results (default: DATE-GPU-e2e)")

    from sdvae_fast import warmup as _warmup  # torch-free at import, like this module

    p = add("warmup", lambda args: _warmup.run_command(args),
            "precompile every kernel variant in parallel and settle autotuning (cold start)",
            _warmup.DESCRIPTION, parents=())
    _warmup.add_arguments(p)

    sub.add_parser("train", help="fine-tune or train a VAE (see `sdvae-fast train --help`)", add_help=False)
    sub.add_parser("kernel-report", add_help=False,
                   help="static sm_90 cost model of the kernels from their SASS, no GPU needed "
                        "(see `sdvae-fast kernel-report --help`)")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def _needs_interpreter(args) -> bool:
    """Whether the command will launch Triton kernels on CPU tensors (parity on CPU, or backend triton)."""
    if args.command in ("profile", "bench", "info", "warmup"):
        return False
    backend = resolve_backend(args.backend)  # --backend, else SDVAE_FAST_BACKEND, else auto
    if backend == "torch" or (args.command != "parity" and backend != "triton"):
        return False
    return resolve_device(args.device).type == "cpu"


def _switch_on_interpreter(argv: list[str]) -> Optional[int]:
    """Make sure kernels are defined under TRITON_INTERPRET=1; returns a child's exit code if one had to run.

    If no kernel module is imported yet, setting the variable now is enough. Otherwise the kernels were defined
    for the GPU, and the command is re-run in a child process with the variable set.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if "sdvae_fast.kernels._common" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return None
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "sdvae_fast.cli", *argv], env=env)


#: An error's indented list (e.g. missing keys) up to this many lines is printed inline, a longer one is left out.
INLINE_LIST_LINES = 4


def _one_line(exc: BaseException) -> str:
    """The error message on one line, in CLI wording; an indented list (e.g. every missing key) is inlined,
    comma-separated, when it has at most INLINE_LIST_LINES lines, else left out."""
    lines = str(exc).splitlines()
    listed = [line for line in lines[1:] if line.startswith(" ")]
    if listed and len(listed) <= INLINE_LIST_LINES:
        joined: list[str] = []
        for line in lines:
            if line.startswith(" ") and joined:
                joined[-1] += (" " if joined[-1].endswith(":") else ", ") + line.strip()
            else:
                joined.append(line)
        lines = joined
    elif listed:
        lines = [line for line in lines if not line.startswith(" ")]
        lines.append(f"(set SDVAE_FAST_DEBUG=1 for the {len(listed)} lines listed)")
    text = cli_wording("\n".join(lines)) or type(exc).__name__
    return f"{text} ({type(exc).__name__})" if isinstance(exc, (RuntimeError, ImportError)) else text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `sdvae-fast` with `argv` (default `sys.argv[1:]`); returns the exit code (0 ok, 1 check failed, 2 error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command == "train":
            return _run_train(argv[1:])
        if command == "kernel-report":
            from sdvae_fast import kernel_report

            return kernel_report.main(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        check_launch(args.command)
        if hasattr(args, "backend"):
            args.backend = resolve_backend(args.backend)  # None: SDVAE_FAST_BACKEND, else auto
        if _needs_interpreter(args):
            code = _switch_on_interpreter(argv)
            if code is not None:
                return code
        code = int(args.func(args) or 0)
        _end_patch_parallel()
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`info --json | head`): send the rest of stdout nowhere, so that the interpreter's
        # final flush does not fail again, and end quietly.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (e.g. captured by a test)
            pass
        return 141
    except USER_ERRORS as exc:
        if os.environ.get("SDVAE_FAST_DEBUG") == "1":
            traceback.print_exc()
        print(f"{PROG} {command or ''}: error: {_one_line(exc)}".replace("  ", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
