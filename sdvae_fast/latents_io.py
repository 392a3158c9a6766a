"""The latents file of `sdvae-fast encode` / `decode`: one safetensors file of scaled latents plus metadata.

Layout: one float32 tensor per image, (1, C, h, w) scaled latents `(z - shift_factor) * scaling_factor`, keyed by
the image's name. Metadata (all strings): `format` (`LATENTS_FORMAT`), `scaling_factor` and `shift_factor`
(Python reprs), `posterior` ("mode" or "sample"), `config` (the VAE config as JSON), `images` (JSON list of
{"key", "source", "height", "width"}: the original size, so decoding can crop the padding away), `model` (the
class that encoded them: "AutoencoderKL", "AutoencoderKLFlux2", or "VQModel" whose latents are unquantised;
absent in older files: AutoencoderKL) and `normalization` ("scaling", or `FLUX2_BATCH_NORM` for FLUX.2's
(1, 128, h/2, w/2) patchified latents normalised by its BatchNorm; files without it are "scaling"). `decode` also
reads plain safetensors files of (N, C, h, w) or (C, h, w) scaled latents without metadata.

Torch-free at import (safetensors is imported when a file is read or written).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

LATENTS_FORMAT = "sdvae-fast latents v1"
#: The `normalization` metadata of FLUX.2 latents: `normalize_latents(patchify_latents(z))` of
#: `sdvae_fast.AutoencoderKLFlux2`, what FLUX.2 pipelines hand their transformer.
FLUX2_BATCH_NORM = "flux2_batch_norm"


class LatentsError(ValueError):
    """A latents file that cannot be used: missing, unreadable, empty, weights instead of latents, bad shapes."""


def write_latents(path: Union[str, Path], tensors: dict, *, scaling: float, shift: float, posterior: str,
                  config: dict, entries: list[dict[str, Any]], model: str = "AutoencoderKL",
                  normalization: str = "scaling") -> Path:
    """Write scaled latents and their metadata; returns the path (its folder is created).

    Args:
        path: the output file.
        tensors: {key: (1, C, h, w) float32 CPU contiguous tensor} of scaled latents.
        scaling, shift: the `scaling_factor` / `shift_factor` applied.
        posterior: "mode" or "sample".
        config: the VAE config (plain dict; values JSON can't encode are written with str()).
        entries: one {"key", "source", "height", "width"} per image.
        model: the class of the model that encoded them ("AutoencoderKL", "AutoencoderKLFlux2", "VQModel";
            `decode` checks it).
        normalization: how the latents were normalised: "scaling" (`(z - shift) * scaling`) or `FLUX2_BATCH_NORM`
            (FLUX.2: 2x2-patchified, then normalised by the VAE's BatchNorm statistics; scaling 1, shift 0).
    """
    from safetensors.torch import save_file

    metadata = {
        "format": LATENTS_FORMAT,
        "scaling_factor": repr(scaling),
        "shift_factor": repr(shift),
        "posterior": posterior,
        "config": json.dumps(config, default=str),
        "images": json.dumps(entries),
        "model": model,
        "normalization": normalization,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_latents(path) -> tuple[dict, dict]:
    """Read a latents file: ({key: tensor}, metadata). Raises LatentsError when it is missing or not safetensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LatentsError(f"latents file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise LatentsError(f"cannot read latents file {path}: {exc}") from exc
    if not tensors:
        raise LatentsError(f"latents file {path} holds no tensors")
    return tensors, metadata


def json_field(metadata: dict, field: str, default, path):
    """A JSON-encoded metadata field of a latents file (`default` when absent); LatentsError when it is not JSON."""
    try:
        return json.loads(metadata[field]) if field in metadata else default
    except json.JSONDecodeError as exc:
        raise LatentsError(f"{path}: metadata field {field!r} is not valid JSON ({exc})") from exc


def check_latents(tensors: dict, metadata: dict, path) -> dict:
    """Check a latents file's tensors before any model is built: {key: (N, C, h, w) tensor}.

    Raises:
        LatentsError: the file holds model weights (names such as `encoder.conv_in.weight`) rather than latents,
        or a tensor is neither (C, h, w) nor (N, C, h, w).
    """
    weight_like = [k for k in tensors if k.startswith(("encoder.", "decoder.", "first_stage_model.", "vae."))
                   or k.endswith((".weight", ".bias"))]
    if metadata.get("format") != LATENTS_FORMAT and weight_like:
        raise LatentsError(f"{path} looks like model weights (tensor {weight_like[0]!r}), not a latents file: decode "
                           f"takes what `sdvae-fast encode` writes, or scaled latents (N, C, h, w); pass weights "
                           f"with --vae")
    batches = {}
    for key, latents in tensors.items():
        if latents.dim() == 3:
            latents = latents[None]  # (1, C, h, w)
        if latents.dim() != 4 or not latents.is_floating_point():
            raise LatentsError(f"{path}: tensor {key!r} has shape {tuple(latents.shape)} and dtype "
                               f"{str(latents.dtype).removeprefix('torch.')}; latents are float (N, C, h, w) or "
                               f"(C, h, w)")
        batches[key] = latents
    return batches
