"""`AutoencoderKLFlux2`: FLUX.2's VAE (diffusers' class) with sdvae-fast's backends (issue 14).

    from sdvae_fast import AutoencoderKLFlux2
    vae = AutoencoderKLFlux2.from_pretrained("path/to/flux2", subfolder="vae")    # diffusers' folder
    z = vae.encode(images).latent_dist.mode()               # (N, 32, H/8, W/8), unnormalised
    tokens = vae.normalize_latents(vae.patchify_latents(z)) # what FLUX.2 pipelines hand the transformer
    images = vae.decode(vae.unpatchify_latents(vae.denormalize_latents(tokens))).sample

The model is the kl-f8 stack (docs/design.md, section 1) with 32 latent channels and both quant convs, plus a
BatchNorm `bn` (no affine terms, running statistics over the 4 * 32 = 128 channels of 2x2-patchified latents).
`bn` is not part of `encode` / `decode`: FLUX.2 pipelines patchify the encoder's latents and normalise them with
`bn.running_mean` and `sqrt(bn.running_var + config.batch_norm_eps)` themselves, and undo both before `decode`.
There is no `scaling_factor` / `shift_factor` in its config. `decoder_block_out_channels` gives the decoder other
widths than the encoder: FLUX.2's small decoder has 96/192/384/384 (3, 6 and 12 channels per GroupNorm group;
a mid-block attention of head dim 384, which the attention kernel runs without padding it to 512).

With diffusers installed `AutoencoderKLFlux2` is a subclass of `diffusers.AutoencoderKLFlux2`: constructor
arguments, `config`, state-dict names (`bn.running_mean`, `bn.running_var`, `bn.num_batches_tracked` included),
`from_pretrained` / `save_pretrained` (folders interchangeable with diffusers', `_class_name`
"AutoencoderKLFlux2") are diffusers' own. `encode` / `decode` / tiling / slicing / validation / `backend` are
those of `sdvae_fast.AutoencoderKL` (`model.FastVAEMixin`): backend "torch" runs diffusers' modules, "triton" (and
"auto" on CUDA) the fast path's units, which walk the encoder and decoder as they walk any AutoencoderKL.
Without diffusers the class raises ImportError (a standalone FLUX.2 model is not provided).

Original single files: `AutoencoderKLFlux2.from_single_file(path)` loads black-forest-labs' own checkpoints of the
VAE (`ae.safetensors` / `flux2-vae.safetensors` of FLUX.2, the small-decoder variant with decoder widths
96/192/384/384), `.safetensors` or a `.ckpt` / `.pt` pickle, the VAE at the top level or under a prefix
(`vae.`, `first_stage_model.`, as `sdvae_fast.loading` finds them; keys outside the VAE are ignored). Their layout,
as diffusers' conversion script `scripts/convert_flux2_to_diffusers.py` (`convert_flux2_vae_checkpoint_to_diffusers`)
reads it: latent-diffusion (LDM) names, those of FLUX.1's `ae.safetensors` (`encoder.down.{i}.block.{j}.*`,
`encoder.mid.attn_1.{norm,q,k,v,proj_out}` with 1x1-conv projections, `decoder.up.{i}` numbered from the lowest
resolution, ...; renamed by `sdvae_fast.loading`'s LDM rules), except that the quant convs sit inside the encoder
and the decoder: `encoder.quant_conv.*` -> `quant_conv.*`, `decoder.post_quant_conv.*` -> `post_quant_conv.*`;
and the latent BatchNorm's statistics `bn.running_mean` / `bn.running_var` keep their names (`bn.num_batches_tracked`
is taken when the file has it, else the model keeps its own, 0; it plays no part in eval mode or in the pipelines'
normalisation). `flux2_state_dict` does the renaming, `flux2_config_from_keys` reads the architecture from the
shapes (encoder and decoder widths, resnets per level, latent channels, quant convs, mid-block attention, the
patch size from `bn`'s size); the file does not store `norm_num_groups` and `batch_norm_eps`, which are FLUX.2's
32 and 1e-4 unless given. Every key is checked before anything is assigned: missing, mis-shaped and unused keys
are listed in one `CheckpointError`. A file without `bn` (an AutoencoderKL: SD, SDXL, SD3, FLUX.1's
`ae.safetensors`) is refused with a message naming `sdvae_fast.AutoencoderKL.from_single_file`; a single file in
diffusers' names with a message naming `from_pretrained` (a folder with its config.json).
"""
from __future__ import annotations

import functools
import inspect
import math
import os
import re
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch

from sdvae_fast.backends import HAS_DIFFUSERS, needs_diffusers
from sdvae_fast.configs import DEFAULTS, FLUX2_PRESETS, normalize_config


#: The `_class_name` of FLUX.2 VAE folders (config.json), as diffusers writes it.
CLASS_NAME = "AutoencoderKLFlux2"

__all__ = ["AutoencoderKLFlux2", "CLASS_NAME", "HAS_DIFFUSERS", "flux2_config_from_keys", "flux2_file_prefix",
           "flux2_state_dict", "inspect_single_file", "parameter_count", "patchify_latents", "unpatchify_latents"]


def _patch_pair(patch_size, name: str = "patch_size") -> Tuple[int, int]:
    """(ph, pw) of a patch size given as an int or a pair of positive ints; ValueError naming `name` otherwise."""
    pair = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if len(pair) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {patch_size!r}")
    return pair


def _check_latents_4d(latents, name: str) -> None:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, C, H, W), got {type(latents).__name__}")
    if latents.dim() != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got shape {tuple(latents.shape)}")


def patchify_latents(latents: torch.Tensor, patch_size: Union[int, Sequence[int]] = (2, 2)) -> torch.Tensor:
    """Fold each ph x pw patch of latents into channels, as FLUX.2 pipelines do before normalising.

    Args:
        latents: (N, C, H, W), any dtype, device and strides; H divisible by ph and W by pw.
        patch_size: (ph, pw) or one int; FLUX.2's `config.patch_size` is (2, 2).
    Returns:
        (N, C * ph * pw, H / ph, W / pw), a new contiguous tensor of latents' dtype: output channel
        c * ph * pw + i * pw + j holds input channel c at offset (i, j) inside each patch (the channel order of
        `bn`'s running statistics).
    Raises:
        TypeError / ValueError naming `latents` or `patch_size` for a non-tensor, a rank other than 4, a side that
        the patch does not divide, or a bad patch size.
    """
    ph, pw = _patch_pair(patch_size)
    _check_latents_4d(latents, "latents")
    n, c, h, w = latents.shape
    if h % ph or w % pw:
        raise ValueError(f"latents: height and width must be multiples of the patch size {(ph, pw)}, got shape "
                         f"{tuple(latents.shape)}")
    patches = latents.reshape(n, c, h // ph, ph, w // pw, pw)  # (N, C, H/ph, ph, W/pw, pw)
    patches = patches.permute(0, 1, 3, 5, 2, 4)  # (N, C, ph, pw, H/ph, W/pw)
    return patches.reshape(n, c * ph * pw, h // ph, w // pw)


def unpatchify_latents(latents: torch.Tensor, patch_size: Union[int, Sequence[int]] = (2, 2)) -> torch.Tensor:
    """The inverse of `patchify_latents`: (N, C * ph * pw, h, w) -> (N, C, h * ph, w * pw), contiguous.

    Raises TypeError / ValueError naming `latents` or `patch_size` for a non-tensor, a rank other than 4, a channel
    count that ph * pw does not divide, or a bad patch size.
    """
    ph, pw = _patch_pair(patch_size)
    _check_latents_4d(latents, "latents")
    n, cp, h, w = latents.shape
    if cp % (ph * pw):
        raise ValueError(f"latents: the channel count must be a multiple of ph * pw = {ph * pw} (patchified "
                         f"latents), got shape {tuple(latents.shape)}")
    c = cp // (ph * pw)
    patches = latents.reshape(n, c, ph, pw, h, w)  # (N, C, ph, pw, h, w)
    patches = patches.permute(0, 1, 4, 2, 5, 3)  # (N, C, h, ph, w, pw)
    return patches.reshape(n, c, h * ph, w * pw)


def _validate_flux2_fields(fields: dict, defaults: dict, source: str) -> None:
    """Raise ValueError (naming `source` and the field) for a config diffusers' class would build wrongly or
    fail on deep inside: the AutoencoderKL fields as `configs.normalize_config` checks them (any block type names),
    then decoder_block_out_channels (None, or as many positive widths as block_out_channels, each divisible by
    norm_num_groups), batch_norm_eps > 0, batch_norm_momentum None or in [0, 1], patch_size."""
    config = {**defaults, **fields}
    shared = {k: v for k, v in config.items() if k in DEFAULTS}
    normalize_config(shared, source=source, check_block_types=False)
    widths = tuple(config["block_out_channels"]) if not isinstance(config["block_out_channels"], int) \
        else (config["block_out_channels"],)
    decoder = config.get("decoder_block_out_channels")
    if decoder is not None:
        decoder = (decoder,) if isinstance(decoder, int) else tuple(decoder)
        groups = config["norm_num_groups"]
        if len(decoder) != len(widths) or not all(isinstance(w, int) and w > 0 and w % groups == 0
                                                  for w in decoder):
            raise ValueError(
                f"{source}: decoder_block_out_channels must be None or {len(widths)} positive ints (one per "
                f"block_out_channels entry) divisible by norm_num_groups ({groups}), got {list(decoder)}"
            )
    eps = config["batch_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{source}: batch_norm_eps must be a positive number, got {eps!r}")
    momentum = config["batch_norm_momentum"]
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"{source}: batch_norm_momentum must be None or a number in [0, 1], got {momentum!r}")
    _patch_pair(config["patch_size"], f"{source}: patch_size")


# ---------------------------------------------------------------------------------------------------------------
# Original single files (black-forest-labs' layout; see the module docstring)
# ---------------------------------------------------------------------------------------------------------------

#: The latent BatchNorm's statistics: the same names in original files and in diffusers' model.
_BN_STATISTICS = ("bn.running_mean", "bn.running_var")
#: diffusers' BatchNorm step counter; original files may lack it (the model then keeps its own value).
_BN_COUNTER = "bn.num_batches_tracked"
#: Original quant convs (inside the encoder / decoder) -> diffusers' top-level modules.
_QUANT_CONV_KEY = re.compile(r"^(encoder\.quant_conv|decoder\.post_quant_conv)\.(weight|bias)$")
_QUANT_CONV_NAME = {"encoder.quant_conv": "quant_conv", "decoder.post_quant_conv": "post_quant_conv"}
#: Top-level names of a FLUX.2 VAE's tensors under its prefix (everything else in a file is another component).
_VAE_TOP_LEVEL = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn.")
#: Fields the file cannot tell, with FLUX.2's values (`configs.FLUX2_PRESETS`, diffusers' defaults).
_UNSTORED_FIELDS = ("norm_num_groups", "batch_norm_eps", "batch_norm_momentum", "act_fn", "sample_size")
#: Fields that follow from the widths' count (left out of messages that compare configs with the weights).
_BLOCK_TYPES = ("down_block_types", "up_block_types")


def flux2_file_prefix(keys) -> Optional[str]:
    """The prefix under which a file's tensor names `keys` hold a FLUX.2 VAE, else None.

    A prefix p qualifies when p + "bn.running_mean" is a key beside p + "encoder.conv_in.weight" or
    p + "decoder.conv_in.weight" (the latent BatchNorm that no AutoencoderKL has). Among several: "" first, then
    "first_stage_model.", "vae.", then the shortest. Looks at names only (either naming, original or diffusers');
    never raises for a list of strings.
    """
    from sdvae_fast.loading import KNOWN_PREFIXES, _vae_prefixes

    names = set(keys)
    found = [p for p in _vae_prefixes(names) if p + _BN_STATISTICS[0] in names]
    if not found:
        return None
    known = [p for p in KNOWN_PREFIXES if p in found]
    return known[0] if known else min(found, key=lambda p: (len(p), p))


def flux2_state_dict(tensors: Mapping[str, torch.Tensor]) -> Tuple[dict, list]:
    """Original FLUX.2 VAE tensors (names without prefix) -> (diffusers AutoencoderKLFlux2 state dict, unmapped keys).

    `encoder.quant_conv.{weight,bias}` -> `quant_conv.*`, `decoder.post_quant_conv.{weight,bias}` ->
    `post_quant_conv.*`; `bn.running_mean`, `bn.running_var` (and `bn.num_batches_tracked` when present) as they
    are; everything else by `sdvae_fast.loading`'s LDM rules (`encoder.down.{i}.block.{j}` ->
    `encoder.down_blocks.{i}.resnets.{j}`, `decoder.up.{i}` -> `decoder.up_blocks.{L-1-i}`, `mid.attn_1.q` ->
    `mid_block.attentions.0.to_q`, `nin_shortcut` -> `conv_shortcut`, `norm_out` -> `conv_norm_out`, ...), with the
    attention projections' 1x1-conv weights (C, C, 1, 1) squeezed to linear (C, C).

    Args:
        tensors: {original name: tensor}; any dtypes and devices (values are passed through, not copied, except
            the attention weights, which become views (C, C) of the (C, C, 1, 1) tensors).
    Returns:
        (state, unmapped): {diffusers name: tensor}, and the sorted names no rule maps (or that map onto a name
        another key already gave). Raises nothing; whether the state fits a model is the caller's check.
    """
    from sdvae_fast.loading import _to_diffusers_names

    state, rest = {}, {}
    for key, value in tensors.items():
        m = _QUANT_CONV_KEY.match(key)
        if m:
            state[f"{_QUANT_CONV_NAME[m[1]]}.{m[2]}"] = value
        elif key in _BN_STATISTICS or key == _BN_COUNTER:
            state[key] = value
        else:
            rest[key] = value
    mapped, unmapped = _to_diffusers_names(rest, "ldm")
    for key, value in mapped.items():
        if key in state:  # e.g. a top-level quant_conv beside encoder.quant_conv
            unmapped.append(key)
        else:
            state[key] = value
    return state, sorted(unmapped)


def _levels(shapes: Mapping, side: str) -> list:
    pattern = re.compile(rf"^{re.escape(side)}\.(\d+)\.block\.0\.conv1\.weight$")
    return sorted(int(m[1]) for k in shapes if (m := pattern.match(k)))


def flux2_config_from_keys(shapes: Mapping[str, Sequence[int]]) -> dict:
    """Every AutoencoderKLFlux2 config field for original FLUX.2 VAE tensors of these shapes (names without prefix).

    Read from the shapes: `block_out_channels` (the output channels of each `encoder.down.{i}.block.0.conv1`),
    `decoder_block_out_channels` (those of `decoder.up.{i}.block.0.conv1`, LDM level i being diffusers' decoder
    width i; None when they equal the encoder's), `layers_per_block` (resnets in `encoder.down.0`),
    `down_block_types` / `up_block_types` (one plain block per level), `latent_channels` (`decoder.conv_in`'s input
    channels), `in_channels` / `out_channels` (`encoder.conv_in`, `decoder.conv_out`), `use_quant_conv` /
    `use_post_quant_conv` (`encoder.quant_conv` / `decoder.post_quant_conv`, or top-level `quant_conv` /
    `post_quant_conv`, present), `mid_block_add_attention` (`mid.attn_1` present) and `patch_size` (p, p) with
    p * p = len(bn.running_mean) / latent_channels. Not stored in the file, so FLUX.2's values
    (`configs.FLUX2_PRESETS["flux2"]`): norm_num_groups 32, batch_norm_eps 1e-4, batch_norm_momentum 0.1, act_fn
    "silu", sample_size 1024.

    Args:
        shapes: {original name: shape (torch.Size or a sequence of ints)}.
    Returns:
        a new dict of AutoencoderKLFlux2 fields (tuples for the sequences).
    Raises:
        CheckpointError (a ValueError): a key it needs is missing (all such listed), the encoder's and the
            decoder's level counts differ or skip a level, or bn's size is not latent_channels times a square.
    """
    from sdvae_fast.loading import CheckpointError

    needed = ["encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight",
              "decoder.conv_out.weight", "encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight",
              _BN_STATISTICS[0]]
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise CheckpointError(f"not an original FLUX.2 VAE: missing {missing}")
    down, up = _levels(shapes, "encoder.down"), _levels(shapes, "decoder.up")
    if down != list(range(len(down))) or up != list(range(len(down))):
        raise CheckpointError(f"the encoder's levels {down} and the decoder's levels {up} (encoder.down.{{i}} / "
                              f"decoder.up.{{i}}.block.0.conv1) must both be 0..n-1 for the same n")
    widths = tuple(int(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]) for i in down)
    decoder = tuple(int(shapes[f"decoder.up.{i}.block.0.conv1.weight"][0]) for i in up)
    per_level = len({m[1] for k in shapes if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))})
    latent = int(shapes["decoder.conv_in.weight"][1])
    features = int(shapes[_BN_STATISTICS[0]][0])
    side = math.isqrt(features // latent) if latent and features % latent == 0 else 0
    if side == 0 or side * side * latent != features:
        raise CheckpointError(f"bn.running_mean has {features} entries: not latent_channels ({latent}) times a "
                              f"square patch size")
    config = dict(FLUX2_PRESETS["flux2"])
    config.update(
        in_channels=int(shapes["encoder.conv_in.weight"][1]),
        out_channels=int(shapes["decoder.conv_out.weight"][0]),
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        decoder_block_out_channels=None if decoder == widths else decoder,
        layers_per_block=per_level,
        latent_channels=latent,
        use_quant_conv="encoder.quant_conv.weight" in shapes or "quant_conv.weight" in shapes,
        use_post_quant_conv="decoder.post_quant_conv.weight" in shapes or "post_quant_conv.weight" in shapes,
        mid_block_add_attention=any(k.startswith(("encoder.mid.attn_1.", "decoder.mid.attn_1.")) for k in shapes),
        patch_size=(side, side),
    )
    return config


def _read_single_file(path: Path, unsafe_pickle: bool):
    """(checkpoint, prefix, {name without prefix: tensor}) of the FLUX.2 VAE in an original single file; raises
    FileNotFoundError, or CheckpointError for a folder, an unreadable file, no VAE, no `bn` (naming the loader of
    AutoencoderKL / VQModel files instead) or diffusers' names (naming `from_pretrained`)."""
    from sdvae_fast.loading import CheckpointError, _Checkpoint, _choose_prefix, _detect_layout

    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: load diffusers folders with AutoencoderKLFlux2.from_pretrained")
    checkpoint = _Checkpoint(path, unsafe_pickle=unsafe_pickle)
    prefix = flux2_file_prefix(checkpoint.keys)
    if prefix is None:
        prefix = _choose_prefix(checkpoint.keys, path)  # CheckpointError when there is no VAE at all
        if prefix + "quantize.embedding.weight" in checkpoint.keys:
            raise CheckpointError(f"{path}: no {prefix}bn.running_mean (FLUX.2's latent BatchNorm) but a codebook: a "
                                  f"VQ model, which loads with sdvae_fast.VQModel.from_single_file")
        raise CheckpointError(
            f"{path}: no {prefix}bn.running_mean / {prefix}bn.running_var (FLUX.2's latent BatchNorm): not a FLUX.2 "
            f"VAE file. AutoencoderKL files (SD 1.x/2.x, SDXL, SD3, FLUX.1's ae.safetensors) load with "
            f"sdvae_fast.AutoencoderKL.from_single_file")
    names = [k for k in checkpoint.keys if k.startswith(prefix) and k[len(prefix):].startswith(_VAE_TOP_LEVEL)]
    tensors = {k[len(prefix):]: v for k, v in checkpoint.read(names).items()}
    if _detect_layout(list(tensors), path) != "ldm":
        raise CheckpointError(
            f"{path}: FLUX.2's VAE in diffusers' names (encoder.down_blocks.*), not black-forest-labs' original "
            f"layout: put it in a folder beside its config.json and load it with AutoencoderKLFlux2.from_pretrained")
    return checkpoint, prefix, tensors


def _single_file_fields(path: Path, shapes: Mapping, config, overrides: Mapping) -> Tuple[dict, dict]:
    """(fields, given): the inferred config, then `config` (a preset name or a mapping; "_" keys dropped), then
    `overrides`; `given` holds the fields config / overrides set. ValueError for an unknown preset name,
    CheckpointError naming `path` when the shapes tell no architecture."""
    from sdvae_fast.loading import CheckpointError

    if isinstance(config, (str, os.PathLike)):
        name = os.fspath(config)
        if name not in FLUX2_PRESETS:
            raise ValueError(f"config: unknown FLUX.2 preset {name!r}; valid preset names: {sorted(FLUX2_PRESETS)} "
                             f"(or a dict of AutoencoderKLFlux2 fields)")
        config = FLUX2_PRESETS[name]
    given = {k: v for k, v in dict(config or {}).items() if not k.startswith("_")}
    given.update(overrides)
    try:
        inferred = flux2_config_from_keys(shapes)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return {**inferred, **given}, given


def _frozen(value):
    """Lists as tuples, so that values of presets, JSON and inference compare equal."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _short(fields: Mapping) -> str:
    """The architecture fields of a config, for messages."""
    names = ("block_out_channels", "decoder_block_out_channels", "layers_per_block", "latent_channels",
             "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "patch_size")
    return ", ".join(f"{k}={fields[k]!r}" for k in names if k in fields)


def _family(config: Mapping) -> Optional[str]:
    """"flux2" / "flux2-small" when the architecture (widths, latent channels, groups) is a preset's, else None."""
    fields = ("block_out_channels", "decoder_block_out_channels", "latent_channels", "norm_num_groups",
              "layers_per_block", "patch_size")
    return next((name for name, preset in FLUX2_PRESETS.items()
                 if all(_frozen(config.get(k)) == _frozen(preset.get(k)) for k in fields)), None)


def _check_groups(fields: Mapping, path: Path, assumed: bool) -> None:
    """CheckpointError when norm_num_groups does not divide every encoder and decoder width (listing the counts
    that would); AssumedNormGroupsWarning when 32 was assumed for widths of no FLUX.2 preset that other counts
    divide too (a VAE trained with other groups would load and compute another function)."""
    from sdvae_fast.loading import AssumedNormGroupsWarning, CheckpointError, allowed_group_counts

    groups = fields.get("norm_num_groups")
    widths = list(fields["block_out_channels"]) + list(fields.get("decoder_block_out_channels") or ())
    allowed = allowed_group_counts(widths)
    how = " (assumed: the file does not store GroupNorm's group count)" if assumed else ""
    if not isinstance(groups, int) or isinstance(groups, bool) or groups not in allowed:
        raise CheckpointError(f"{path}: norm_num_groups={groups!r}{how} does not divide the widths {widths}. Pass "
                              f"norm_num_groups=N with the value the VAE was trained with (one of {allowed})")
    if assumed and _family(fields) is None and len(allowed) > 1:
        warnings.warn(f"{path}: norm_num_groups={groups} is assumed (FLUX.2's value; the file does not store "
                      f"GroupNorm's group count); the widths {widths} also allow "
                      f"{[g for g in allowed if g != groups]}. Pass norm_num_groups=N if this VAE was trained with "
                      f"other groups.", AssumedNormGroupsWarning, stacklevel=3)


def _groups_note(fields: Mapping, assumed: bool) -> Optional[str]:
    """`inspect_single_file`'s note when norm_num_groups does not divide every encoder and decoder width (what
    `_check_groups` refuses at load time), else None."""
    from sdvae_fast.loading import allowed_group_counts

    groups = fields.get("norm_num_groups")
    widths = list(fields["block_out_channels"]) + list(fields.get("decoder_block_out_channels") or ())
    allowed = allowed_group_counts(widths)
    if isinstance(groups, int) and not isinstance(groups, bool) and groups in allowed:
        return None
    how = (" (assumed: FLUX.2's value; the file does not store GroupNorm's group count)" if assumed
           else " (given)")
    return (f"norm_num_groups={groups!r}{how} does not divide the widths {widths}: loading this file with it "
            f"fails. Pass norm_num_groups=N (on the command line --norm-num-groups N) with the value the VAE was "
            f"trained with, one of {allowed}")


def parameter_count(state: Mapping[str, torch.Tensor]) -> int:
    """The parameters of an AutoencoderKLFlux2 state dict (diffusers' names), as
    `sum(p.numel() for p in model.parameters())` counts them: every tensor except the latent BatchNorm's buffers
    (`bn.running_mean`, `bn.running_var`, `bn.num_batches_tracked`; `bn` has no affine terms)."""
    return sum(t.numel() for k, t in state.items() if not k.startswith("bn."))


def inspect_single_file(path, config=None, unsafe_pickle: bool = False, **overrides) -> dict:
    """Describe an original FLUX.2 VAE file without building the model (the command line's `info`).

    Args:
        path: the file (see `AutoencoderKLFlux2.from_single_file`); config / overrides as there.
    Returns:
        a dict: `model` "AutoencoderKLFlux2"; `path`; `format` ("safetensors" or "pickle"); `layout`
        ("flux2-original"); `prefix` of the VAE's keys ("" for a VAE-only file); `family` ("flux2", "flux2-small"
        or "FLUX.2 (widths of no preset)"), `family_certain` (True), `family_reason`; `ignored_keys` (tensors
        outside the VAE); `config` (every field `from_single_file` would use); `config_sources`
        ({"norm_num_groups": "argument" or "assumed FLUX.2 default (the file does not store it)"});
        `notes` (sentences: a norm_num_groups, assumed or given, that does not divide the widths, so that
        `from_single_file` refuses the file with it; else empty); `parameter_count` (parameters, without bn's
        statistics: `parameter_count`, as `sum(p.numel() for p in model.parameters())`); `dtypes` (sorted dtype names of
        the VAE tensors, e.g. ["bfloat16", "int64"]); `latent_normalization` (a sentence).
    Raises:
        FileNotFoundError, CheckpointError (as `from_single_file`, except that the weights are not checked against
        the model), ValueError for an unknown preset name.
    """
    path = Path(path)
    checkpoint, prefix, tensors = _read_single_file(path, unsafe_pickle)
    fields, given = _single_file_fields(path, {k: v.shape for k, v in tensors.items()}, config, overrides)
    state, unmapped = flux2_state_dict(tensors)
    family = _family(fields)
    notes = []
    groups_note = _groups_note(fields, assumed="norm_num_groups" not in given)
    if groups_note:
        notes.append(groups_note)
    return {
        "model": CLASS_NAME, "path": str(path), "format": checkpoint.format, "layout": "flux2-original",
        "prefix": prefix, "family": family or "FLUX.2 (widths of no preset)", "family_certain": True,
        "family_reason": f"{prefix}bn.running_mean (FLUX.2's latent BatchNorm) beside the VAE's LDM-named weights",
        "ignored_keys": len(checkpoint.keys) - len(tensors) + len(unmapped),
        "config": fields,
        "config_sources": {"norm_num_groups": "argument" if "norm_num_groups" in given
                           else "assumed FLUX.2 default (the file does not store it)"},
        "notes": notes,
        "parameter_count": parameter_count(state),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "latent_normalization": (f"BatchNorm statistics (bn.running_mean, bn.running_var, batch_norm_eps "
                                 f"{fields['batch_norm_eps']}) over {list(fields['patch_size'])}-patchified latents, "
                                 f"applied by pipelines around encode/decode; no scaling_factor"),
    }


if HAS_DIFFUSERS:
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2 as _DiffusersFlux2
    from diffusers.utils.accelerate_utils import apply_forward_hook

    from sdvae_fast.model import FastVAEMixin

    _SIGNATURE = inspect.signature(_DiffusersFlux2.__init__)
    _FIELD_DEFAULTS = {k: p.default for k, p in _SIGNATURE.parameters.items() if k != "self"}

    class AutoencoderKLFlux2(FastVAEMixin, _DiffusersFlux2):
        """`diffusers.AutoencoderKLFlux2` with sdvae-fast's backends (see the module docstring).

        Constructor arguments, `config`, state-dict names, `from_pretrained` / `save_pretrained` are diffusers'.
        Added: `backend` / `set_backend`, input validation (errors name the argument and the expected shape),
        exact-shape tiling, `from_preset("flux2" | "flux2-small")`, `from_config` of a preset name or folder,
        `patchify_latents` / `unpatchify_latents` (the model's `config.patch_size`) and `normalize_latents` /
        `denormalize_latents` (the pipelines' BatchNorm arithmetic, bitwise).

            AutoencoderKLFlux2.from_pretrained("black-forest-labs/FLUX.2-dev", subfolder="vae")
            AutoencoderKLFlux2.from_preset("flux2-small", seed=0)   # the small decoder's architecture, seeded
        """

        @functools.wraps(_DiffusersFlux2.__init__)
        def __init__(self, *args, **kwargs):
            public = {k: v for k, v in kwargs.items() if not k.startswith("_")}
            unknown = sorted(k for k in public if k not in _FIELD_DEFAULTS)
            if unknown:
                raise TypeError(f"AutoencoderKLFlux2(): unknown config field(s) {unknown}; valid fields: "
                                f"{list(_FIELD_DEFAULTS)}")
            try:
                bound = _SIGNATURE.bind(None, *args, **public)
            except TypeError as e:
                raise TypeError(f"AutoencoderKLFlux2(): {e}; valid fields: {list(_FIELD_DEFAULTS)}") from None
            fields = {k: v for k, v in bound.arguments.items() if k != "self"}
            _validate_flux2_fields(fields, _FIELD_DEFAULTS, "AutoencoderKLFlux2()")
            super().__init__(*args, **kwargs)
            self._init_backend()
            # Read by diffusers' pipelines for their model_index.json: diffusers' class loads the saved folder.
            self.__dict__["__module__"] = "diffusers"

        encode = apply_forward_hook(FastVAEMixin.encode)
        decode = apply_forward_hook(FastVAEMixin.decode)

        # -- construction ------------------------------------------------------------------------------------

        @classmethod
        def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
            """diffusers' `from_config` (random weights); `config` may also be a preset name ("flux2",
            "flux2-small") or a diffusers folder (its config.json, or vae/config.json)."""
            if isinstance(config, (str, os.PathLike)):
                name = os.fspath(config)
                if name in FLUX2_PRESETS:
                    config = dict(FLUX2_PRESETS[name])
                else:
                    config = cls.load_config(name, subfolder="vae" if _has_vae_subfolder(name) else None)
            return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

        @classmethod
        def from_preset(cls, name: str, seed: int = 0, *, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None, **overrides):
            """A FLUX.2 preset's architecture ("flux2", "flux2-small") with deterministic random weights.

            PyTorch's default init drawn from `torch.manual_seed(seed)` in a forked RNG state (the global RNG is
            untouched); `bn` keeps its initial running statistics (mean 0, variance 1). `overrides` replace
            config fields (e.g. narrow widths for tests). Returned in eval mode, moved to `dtype` / `device` when
            given. Such weights decode to no meaningful image. Raises ValueError listing the presets for an
            unknown name; TypeError / ValueError for bad overrides.
            """
            if name not in FLUX2_PRESETS:
                raise ValueError(f"unknown FLUX.2 preset {name!r}; valid preset names: {sorted(FLUX2_PRESETS)}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = cls(**{**FLUX2_PRESETS[name], **overrides})
            if device is not None or dtype is not None:
                model = model.to(device=device, dtype=dtype)
            return model.eval()

        @classmethod
        def from_single_file(cls, path, config=None, torch_dtype=None, unsafe_pickle: bool = False, **overrides):
            """FLUX.2's VAE from black-forest-labs' original single file (layout: the module docstring).

                vae = AutoencoderKLFlux2.from_single_file("flux2-vae.safetensors")      # or ae.safetensors
                small = AutoencoderKLFlux2.from_single_file("full_encoder_small_decoder.safetensors")

            Args:
                path: a `.safetensors` file, or a `.ckpt` / `.pt` pickle (read with `torch.load(weights_only=True)`
                    unless `unsafe_pickle`); the format is sniffed from the content. The VAE at the top level or
                    under one prefix (`vae.`, `first_stage_model.`, ...); tensors outside it are ignored.
                config: None (the architecture read from the shapes, `flux2_config_from_keys`), a preset name
                    ("flux2", "flux2-small") or a dict of AutoencoderKLFlux2 fields; its fields win over the
                    inferred ones.
                torch_dtype: dtype of the returned parameters and bn statistics (torch.dtype or "fp16" / "bf16" /
                    "fp32" / "fp64"); float32 when None. `bn.num_batches_tracked` stays int64.
                unsafe_pickle: unpickle a file that needs arbitrary Python objects (only for files you trust).
                **overrides: AutoencoderKLFlux2 fields on top of everything, e.g. `norm_num_groups=` or
                    `batch_norm_eps=` (not stored in the file: FLUX.2's 32 and 1e-4 are used otherwise).
            Returns:
                the model in eval mode on CPU, backend from $SDVAE_FAST_BACKEND or "auto" as every constructor.
            Raises:
                FileNotFoundError: no such file.
                CheckpointError (a ValueError): a folder, an unreadable / truncated / refused file, no VAE in it, no
                    `bn.running_mean` (an AutoencoderKL or VQ file: the message names the loader to use), diffusers'
                    names instead of the original ones, a norm_num_groups that does not divide the widths (listing
                    those that would), a config that cannot be built, or weights that do not fit: every missing
                    and mis-shaped key (diffusers' names) and every unused key in one message. Nothing is assigned
                    before all keys and shapes are checked.
                TypeError: an override that is no AutoencoderKLFlux2 field. ValueError: an unknown preset name or
                    torch_dtype.
            """
            from sdvae_fast.loading import (CheckpointError, _misfit_message, _resolve_dtype, _shape_errors,
                                            assign_weights)

            unknown = sorted(k for k in overrides if k not in _FIELD_DEFAULTS)
            if unknown:
                raise TypeError(f"AutoencoderKLFlux2.from_single_file: unknown config field(s) {unknown}; valid "
                                f"fields: {list(_FIELD_DEFAULTS)}")
            dtype = _resolve_dtype(torch_dtype) or torch.float32
            path = Path(path)
            _, _, tensors = _read_single_file(path, unsafe_pickle)
            shapes = {k: v.shape for k, v in tensors.items()}
            fields, given = _single_file_fields(path, shapes, config, overrides)
            _check_groups(fields, path, assumed="norm_num_groups" not in given)
            try:
                with torch.device("meta"):  # no memory, no random init: the checked weights are assigned below
                    model = cls(**fields)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot build AutoencoderKLFlux2 from the config {fields}: {e}") from e
            state, unmapped = flux2_state_dict(tensors)
            expected = {k: v.shape for k, v in model.state_dict().items()}
            if _BN_COUNTER in expected and _BN_COUNTER not in state:
                state[_BN_COUNTER] = torch.zeros((), dtype=torch.long)  # a new BatchNorm's count
            missing, misshaped = _shape_errors(expected, state)
            unused = sorted(set(unmapped) | (set(state) - set(expected)))
            if missing or misshaped or unused:
                inferred = flux2_config_from_keys(shapes)
                differs = [f"{k}={inferred[k]!r} (config has {v!r})" for k, v in given.items()
                           if k in inferred and k not in _UNSTORED_FIELDS + _BLOCK_TYPES
                           and _frozen(v) != _frozen(inferred[k])]
                hint = (f"The weights imply {', '.join(differs)}; omit config= / the override (on the command "
                        f"line: --preset) to infer them." if differs else "")
                raise CheckpointError(_misfit_message(
                    path, f"AutoencoderKLFlux2({_short(fields)})", missing, misshaped, hint, unused,
                    naming="keys in diffusers' names (the file's original names map as "
                           "sdvae_fast.flux2.flux2_state_dict maps them)."))
            return assign_weights(model, lambda: cls(**fields), state, dtype)

        # -- FLUX.2's latent normalisation (what pipelines apply around encode / decode) --------------------

        @property
        def patch_size(self) -> Tuple[int, int]:
            """(ph, pw) of the latent patches `bn` normalises (`config.patch_size`, (2, 2) for FLUX.2)."""
            return _patch_pair(self.config.patch_size)

        def patchify_latents(self, latents: torch.Tensor) -> torch.Tensor:
            """`patchify_latents(latents, self.patch_size)`: (N, 32, h, w) -> (N, 128, h/2, w/2) for FLUX.2.

            Raises TypeError / ValueError naming `latents` for a non-tensor, a rank other than 4, a channel count
            other than `config.latent_channels` (the encoder's latents; e.g. already patchified ones) or sides
            that the patch does not divide. (The module-level `patchify_latents` takes any channel count.)"""
            _check_latents_4d(latents, "latents")
            channels = self.config.latent_channels
            if latents.shape[1] != channels:
                hint = (" (these look patchified already: unpatchify_latents undoes that)"
                        if latents.shape[1] == self.bn.num_features else "")
                raise ValueError(f"latents must be unpatchified latents (N, {channels}, H, W) (the encoder's "
                                 f"latents), got shape {tuple(latents.shape)}{hint}")
            return patchify_latents(latents, self.patch_size)

        def unpatchify_latents(self, latents: torch.Tensor) -> torch.Tensor:
            """`unpatchify_latents(latents, self.patch_size)`: (N, 128, h, w) -> (N, 32, 2h, 2w) for FLUX.2.

            Raises TypeError / ValueError naming `latents` for a non-tensor, a rank other than 4 or a channel count
            other than `bn.num_features` (= latent_channels * ph * pw: patchified latents; e.g. (N, 32, H, W)
            latents, which are not patchified). (The module-level `unpatchify_latents` takes any multiple of
            ph * pw.)"""
            self._check_patchified(latents, "latents", floating=False)
            return unpatchify_latents(latents, self.patch_size)

        def latents_bn_mean_std(self, device=None, dtype: Optional[torch.dtype] = None):
            """(mean, std) of the latent BatchNorm, each (1, C * ph * pw, 1, 1): `bn.running_mean` and
            `sqrt(bn.running_var + config.batch_norm_eps)` (computed in the buffers' dtype, then moved to
            `device` / `dtype` when given), as FLUX.2 pipelines compute them."""
            mean = self.bn.running_mean.view(1, -1, 1, 1).to(device, dtype)
            std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.config.batch_norm_eps).to(device, dtype)
            return mean, std

        def _check_patchified(self, latents, name: str, floating: bool = True) -> None:
            _check_latents_4d(latents, name)
            channels = self.bn.num_features
            if latents.shape[1] != channels:
                hint = (" (these look unpatchified: patchify_latents makes them patchified)"
                        if latents.shape[1] == self.config.latent_channels else "")
                raise ValueError(f"{name} must be patchified latents (N, {channels}, h, w) (see patchify_latents), "
                                 f"got shape {tuple(latents.shape)}{hint}")
            if floating and not latents.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {latents.dtype}")

        def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
            """`(latents - mean) / std` with `latents_bn_mean_std` in latents' device and dtype: what FLUX.2
            pipelines do to patchified encoder latents (N, C * ph * pw, h, w). Returns a new tensor, same shape
            and dtype. Raises TypeError / ValueError naming `latents` for a wrong shape or an integer dtype."""
            self._check_patchified(latents, "latents")
            mean, std = self.latents_bn_mean_std(latents.device, latents.dtype)
            return (latents - mean) / std

        def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
            """`latents * std + mean`: the inverse of `normalize_latents`, which pipelines apply to the
            transformer's patchified latents before `unpatchify_latents` and `decode`. Raises as
            `normalize_latents`."""
            self._check_patchified(latents, "latents")
            mean, std = self.latents_bn_mean_std(latents.device, latents.dtype)
            return latents * std + mean

        def extra_repr(self) -> str:
            cfg = self.config
            decoder = cfg.decoder_block_out_channels
            return (f"block_out_channels={list(cfg.block_out_channels)}, decoder_block_out_channels="
                    f"{list(decoder) if decoder is not None else None}, latent_channels={cfg.latent_channels}, "
                    f"batch_norm_eps={cfg.batch_norm_eps}, backend={self.backend!r}")

else:
    AutoencoderKLFlux2 = needs_diffusers(
        "AutoencoderKLFlux2", ("from_pretrained", "from_config", "from_preset", "from_single_file"))


def _has_vae_subfolder(folder: str) -> bool:
    """Whether `folder` is a pipeline folder (config.json in vae/, none at its top)."""
    return (not os.path.isfile(os.path.join(folder, "config.json"))
            and os.path.isfile(os.path.join(folder, "vae", "config.json")))

