"""`VQModel`: VQ-regularised autoencoders (latent diffusion's VQ-f4/VQ-f8, MoVQ) with sdvae-fast's backends (issue 14).

    from sdvae_fast import VQModel
    vq = VQModel.from_pretrained("path/to/vq-f8")             # a diffusers folder (_class_name "VQModel")
    h = vq.encode(images).latents                              # (N, latent_channels, H/f, W/f), not yet quantised
    out = vq.decode(h)                                         # quantised on one kernel, then decoded
    images, commit_loss = out.sample, out.commit_loss

With diffusers installed, `VQModel` is a subclass of `diffusers.VQModel`: constructor arguments, `config`,
state-dict names (`quantize.embedding.weight`, ...), `from_pretrained` / `save_pretrained` (folders
interchangeable with diffusers', `_class_name` "VQModel"), `encode(x, return_dict=True)` -> `VQEncoderOutput
(latents=...)`, `decode(h, force_not_quantize=False, return_dict=True, shape=None)` -> `DecoderOutput(sample=...,
commit_loss=...)` and `forward` keep diffusers' meaning. Added: `backend` / `set_backend("auto" | "triton" |
"torch")` (`sdvae_fast.backends`), config validation in the constructor (`validate_vq_fields`: unknown fields,
block type / width counts, group counts, non-positive sizes, named in the error), input validation with clear
errors, and the fast path when the backend says
so (CUDA for "auto"; CUDA or CPU under TRITON_INTERPRET=1 for "triton"), the parameters are in the input's dtype
and device and no autograd is needed:

- encode: `fast.run_encoder(encoder, x, quant_conv)`: the units of the KL encoder (GSC ops, 4-phase upsample,
  emitted statistics, quant_conv folded into conv_out), plus the attention inside `AttnDownEncoderBlock2D`
  (VQ-f8) on the same fused attention unit as the mid block (flash kernel for head dims that are multiples of 16
  up to 512, PyTorch's SDPA inside the op otherwise).
- quantise: `ops.vector_quantize` (`kernels/vector_quantize.py`: distances as an fp32 GEMM, the argmin in its
  epilogue, the codebook row gathered in the same launch; never the pixels x codebook matrix). Its values are
  diffusers' `z + (z_q - z)` bitwise in fp32; indices equal `argmin(cdist)` except where the two best distances
  are within fp32 rounding. `commit_loss` uses diffusers' formula on the chosen rows.
- decode: `fast.run_decoder(decoder, quant, post_quant_conv, latent_embeds=...)`; `AttnUpDecoderBlock2D`'s
  attention as in the encoder. MoVQ (`norm_type="spatial"`): every SpatialNorm-conditioned module
  (ResnetBlockCondNorm2D, Attention with `spatial_norm`, the SpatialNorm head) runs its own module forward per
  unit with the quantised latents from the run context (`RunContext.latents`); the rest (conv_in, upsamplers)
  on the kernels. A GSC prologue mode for SpatialNorm's per-pixel scale and shift is future work (issue 14).

Backend "torch" runs diffusers' code unchanged (cdist + argmin included), the oracle the kernels are tested
against (tests/test_vq.py). Without diffusers, constructing or loading `VQModel` raises ImportError.

Loading: `VQModel.from_pretrained` is diffusers' (folders with `_class_name` "VQModel"); `VQModel.from_single_file`
reads latent-diffusion's original VQ checkpoints (`first_stage_model.` prefix or none, `.ckpt` or
`.safetensors`, `quantize.embedding.weight`, attention in down/up levels as `down.{i}.attn.{j}.{q,k,v,proj_out}`
1x1 convs) and infers the architecture from the tensor shapes (`vq_config_from_ldm_keys`); norm_num_groups is not
in the file (32 assumed unless given). A single file in diffusers' names is refused (its folder loads with
`from_pretrained`, which also has the config the weights cannot tell).
"""
from __future__ import annotations

import functools
import inspect
import os
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from sdvae_fast.backends import BACKEND_ENV, HAS_DIFFUSERS, check_backend, needs_diffusers, parameters_match
from sdvae_fast.configs import DEFAULTS, VQ_PRESETS, normalize_config


__all__ = ["VQModel", "HAS_DIFFUSERS", "VQ_PRESETS", "ldm_vq_state_dict", "quantize_like_diffusers",
           "validate_vq_fields", "vq_config_from_ldm_keys"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_images(name: str, x, channels: int, device, what: str) -> None:
    """Raise naming `name` unless x is a float (N, channels, H, W) tensor on `device`; `what` says where the
    channel count comes from (e.g. "the codebook width vq_embed_dim")."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, {channels}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels ({what}): (N, {channels}, H, W), got shape "
                         f"{tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the model's parameters are on {device}")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _as_tuple(value) -> tuple:
    return (value,) if isinstance(value, (int, str)) else tuple(value)


#: SpatialNorm's GroupNorm group count (diffusers hard-codes 32, whatever norm_num_groups says).
_SPATIAL_NORM_GROUPS = 32


def validate_vq_fields(fields: Mapping, defaults: Mapping, source: str) -> None:
    """Raise ValueError (naming `source` and the field) for a VQModel config diffusers' class would build wrongly
    or fail on deep inside (IndexError, torch's GroupNorm error):

    - block_out_channels and down_block_types / up_block_types of different lengths (the message gives both);
    - norm_num_groups that does not divide every width (listing the counts that would,
      `loading.allowed_group_counts`); norm_type "spatial" (MoVQ) with widths that are not multiples of 32
      (SpatialNorm's fixed group count); norm_type other than "group" / "spatial";
    - the AutoencoderKL fields as `configs.normalize_config` checks them (any block type names): non-positive
      in_channels, out_channels, latent_channels, layers_per_block, norm_num_groups or widths, an unknown act_fn,
      a zero scaling_factor;
    - num_vq_embeddings not a positive int, vq_embed_dim neither None nor a positive int.
    """
    from sdvae_fast.loading import allowed_group_counts

    config = {**defaults, **fields}
    widths, groups = config["block_out_channels"], config["norm_num_groups"]
    widths = _as_tuple(widths) if isinstance(widths, (int, list, tuple)) else widths
    if isinstance(widths, tuple) and widths and all(_is_positive_int(w) for w in widths):
        for name in ("down_block_types", "up_block_types"):
            if not isinstance(config[name], (str, list, tuple)):
                raise ValueError(f"{source}: {name} must be a list of block type names (one per "
                                 f"block_out_channels entry), got {config[name]!r}")
            types = _as_tuple(config[name])
            if len(types) != len(widths):
                raise ValueError(
                    f"{source}: block_out_channels has {len(widths)} entries {list(widths)} but {name} has "
                    f"{len(types)} {list(types)}: give one width per block (expected {len(types)} widths, or "
                    f"{len(widths)} block types)")
        if _is_positive_int(groups):
            bad = [w for w in widths if w % groups]
            if bad:
                raise ValueError(
                    f"{source}: norm_num_groups={groups} does not divide every block_out_channels entry "
                    f"{list(widths)} ({bad} are not multiples of it; GroupNorm needs channels divisible by its "
                    f"groups). Pass norm_num_groups=N, one of {allowed_group_counts(widths)}")
        if config["norm_type"] == "spatial":
            bad = [w for w in widths if w % _SPATIAL_NORM_GROUPS]
            if bad:
                raise ValueError(
                    f"{source}: norm_type='spatial' (MoVQ) normalises the decoder with SpatialNorm, whose GroupNorm "
                    f"has {_SPATIAL_NORM_GROUPS} groups whatever norm_num_groups says: every block_out_channels "
                    f"entry must be a multiple of {_SPATIAL_NORM_GROUPS}, got {list(widths)} ({bad} are not)")
    normalize_config({k: v for k, v in config.items() if k in DEFAULTS}, source=source, check_block_types=False)
    if config["norm_type"] not in ("group", "spatial"):
        raise ValueError(f"{source}: norm_type must be 'group' or 'spatial' (MoVQ), got {config['norm_type']!r}")
    if not _is_positive_int(config["num_vq_embeddings"]):
        raise ValueError(f"{source}: num_vq_embeddings (the codebook's size) must be a positive int, got "
                         f"{config['num_vq_embeddings']!r}")
    dim = config["vq_embed_dim"]
    if dim is not None and not _is_positive_int(dim):
        raise ValueError(f"{source}: vq_embed_dim (the codebook's width) must be None (latent_channels) or a "
                         f"positive int, got {dim!r}")


#: latent-diffusion names of a VQ model that the KL rules of `sdvae_fast.loading` do not cover: the codebook and
#: attention inside down / up levels (`_LDM_ATTENTION_PART` gives the diffusers names of the parts).
_LDM_CODEBOOK = "quantize.embedding.weight"
_LDM_LEVEL_ATTENTION = re.compile(
    r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.(norm|q|k|v|proj_out)\.(weight|bias)$")


def ldm_vq_state_dict(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, list]:
    """latent-diffusion VQ tensors (keys without prefix) -> (diffusers VQModel state dict, keys left unmapped).

    The KL part (resnets, mid block, norms, convs, quant convs) maps by `sdvae_fast.loading`'s rules; here:
    `quantize.embedding.weight` as is, `encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}` ->
    `encoder.down_blocks.{i}.attentions.{j}.{group_norm,to_q,to_k,to_v,to_out.0}`, and the decoder's
    `up.{i}.attn.{j}` -> `up_blocks.{L-1-i}.attentions.{j}` (latent-diffusion numbers decoder levels from the
    lowest resolution up); 1x1 conv projections (C_out, C_in, 1, 1) become linear weights (C_out, C_in).
    """
    from sdvae_fast.loading import _LDM_ATTENTION_PART, _to_diffusers_names

    levels = {int(m[1]) for k in tensors if (m := re.match(r"^(?:decoder\.up|encoder\.down)\.(\d+)\.", k))}
    num_levels = max(levels) + 1 if levels else 0
    rest, state = {}, {}
    for key, value in tensors.items():
        m = _LDM_LEVEL_ATTENTION.match(key)
        if key == _LDM_CODEBOOK:
            state[key] = value
        elif m:
            side = "encoder.down_blocks" if m[1] == "encoder.down" else "decoder.up_blocks"
            level = int(m[2]) if m[1] == "encoder.down" else num_levels - 1 - int(m[2])
            if m[4] != "norm" and m[5] == "weight" and value.dim() == 4:
                value = value[:, :, 0, 0]  # (C_out, C_in, 1, 1) conv -> (C_out, C_in) linear
            state[f"{side}.{level}.attentions.{m[3]}.{_LDM_ATTENTION_PART[m[4]]}.{m[5]}"] = value
        else:
            rest[key] = value
    mapped, unmapped = _to_diffusers_names(rest, "ldm")
    state.update(mapped)
    return state, unmapped


def vq_config_from_ldm_keys(shapes: Mapping[str, torch.Size]) -> dict:
    """diffusers VQModel config fields inferred from latent-diffusion tensor shapes (keys without prefix).

    block_out_channels from each encoder level's first conv, layers_per_block from the encoder's resnets per level,
    AttnDownEncoderBlock2D / AttnUpDecoderBlock2D where a level has `attn` tensors, latent_channels from
    `encoder.conv_out`, vq_embed_dim and num_vq_embeddings from the codebook, in/out channels from the outer convs,
    mid_block_add_attention from `mid.attn_1`. Not in the file, so diffusers' defaults unless given:
    norm_num_groups 32 (latent-diffusion's), scaling_factor. Raises CheckpointError when a needed key is missing.
    """
    from sdvae_fast.loading import CheckpointError

    needed = ["encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight", _LDM_CODEBOOK]
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise CheckpointError(f"not a latent-diffusion VQ checkpoint: missing {missing}")
    levels = sorted({int(m[1]) for k in shapes if (m := re.match(r"^encoder\.down\.(\d+)\.block\.0\.conv1\.", k))})
    if not levels:
        raise CheckpointError("not a latent-diffusion VQ checkpoint: no encoder.down.{i}.block.0.conv1.weight (the "
                              "encoder levels' first convs, which give block_out_channels)")
    widths = [int(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]) for i in levels]
    per_level = len({m[1] for k in shapes if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))})

    def attends(side: str, level: int) -> bool:
        return any(k.startswith(f"{side}.{level}.attn.") for k in shapes)

    count = len(widths)
    return {
        "in_channels": int(shapes["encoder.conv_in.weight"][1]),
        "out_channels": int(shapes["decoder.conv_out.weight"][0]),
        "down_block_types": tuple("AttnDownEncoderBlock2D" if attends("encoder.down", i) else "DownEncoderBlock2D"
                                  for i in range(count)),
        "up_block_types": tuple("AttnUpDecoderBlock2D" if attends("decoder.up", count - 1 - i) else "UpDecoderBlock2D"
                                for i in range(count)),
        "block_out_channels": tuple(widths),
        "layers_per_block": per_level,
        "latent_channels": int(shapes["encoder.conv_out.weight"][0]),
        "num_vq_embeddings": int(shapes[_LDM_CODEBOOK][0]),
        "vq_embed_dim": int(shapes[_LDM_CODEBOOK][1]),
        "mid_block_add_attention": any(k.startswith("encoder.mid.attn_1.") for k in shapes),
    }


def _check_codebook_width(tensors: Mapping[str, torch.Tensor], path, prefix: str = "") -> None:
    """CheckpointError when the codebook `quantize.embedding.weight` (K, D) is not as wide as the quant convs
    (quant_conv (D, C, 1, 1) and post_quant_conv (C, D, 1, 1)): vq_embed_dim is read from the codebook, so a
    mismatch is the file's, not the config's; the message gives expected and actual shapes."""
    from sdvae_fast.loading import CheckpointError

    codebook = tuple(tensors[_LDM_CODEBOOK].shape)
    if len(codebook) != 2:
        raise CheckpointError(f"{path}: the codebook {prefix}{_LDM_CODEBOOK} must be 2-D (K, D) = (num_vq_embeddings, "
                              f"vq_embed_dim), got shape {codebook}")
    dim = codebook[1]
    wrong = []
    for name, axis in (("quant_conv.weight", 0), ("quant_conv.bias", 0), ("post_quant_conv.weight", 1)):
        shape = tuple(tensors[name].shape) if name in tensors else None
        if shape is not None and len(shape) > axis and shape[axis] != dim:
            want = shape[:axis] + (dim,) + shape[axis + 1:]
            wrong.append(f"{prefix}{name} {shape} (expected {want})")
    if wrong:
        raise CheckpointError(
            f"{path}: the codebook {prefix}{_LDM_CODEBOOK} (K, D) = {codebook} is {dim} wide (vq_embed_dim {dim}) "
            f"but the quant convs are not: {', '.join(wrong)}. quant_conv maps latent_channels -> vq_embed_dim and "
            f"post_quant_conv back, so both must be as wide as the codebook: the file's VQ weights do not belong "
            f"together")


def quantize_like_diffusers(quantizer: torch.nn.Module, h: torch.Tensor):
    """diffusers' `VectorQuantizer.forward(h)` with the nearest-row search on `ops.vector_quantize` (one kernel).

    Args:
        quantizer: a diffusers VectorQuantizer (`embedding` nn.Embedding(K, D), `beta`, `legacy`, `remap`,
            `sane_index_shape`).
        h: latents (N, D, h, w), any float dtype (the codebook is used in h's dtype).
    Returns:
        z_q (N, D, h, w) contiguous in h's dtype (`h + (e - h)` per element, diffusers' values), commit_loss (0-d,
        diffusers' formula `mean((e - h)^2) + beta * mean((e - h)^2)`, terms swapped when `legacy=False`),
        indices (N*h*w,) int64 (remapped and shaped as diffusers' VectorQuantizer does with `remap` /
        `sane_index_shape`). No gradients (the kernel has no backward; callers check autograd first).
    Raises:
        ValueError: the codebook's width is not h's channel count (or h is not 4-D).
    """
    from sdvae_fast import ops

    ops.check_image("h", h)
    codebook = quantizer.embedding.weight
    if codebook.shape[1] != h.shape[1]:
        raise ValueError(f"quantize.embedding.weight must be (num_vq_embeddings, {h.shape[1]}) to match the "
                         f"latents' channels, got shape {tuple(codebook.shape)}")
    z_q, indices = ops.vector_quantize(h, codebook.to(h.dtype))  # (N, D, h, w), (N, h, w)
    hl = h.permute(0, 2, 3, 1).contiguous()  # (N, h, w, D): diffusers' loss terms, same arithmetic
    rows = quantizer.embedding(indices)  # (N, h, w, D)
    first, second = torch.mean((rows - hl) ** 2), quantizer.beta * torch.mean((rows - hl) ** 2)
    commit_loss = first + second if quantizer.legacy else second + first
    flat = indices.reshape(-1)
    if quantizer.remap is not None:
        flat = quantizer.remap_to_used(flat.reshape(h.shape[0], -1)).reshape(-1, 1)
    if quantizer.sane_index_shape:
        flat = flat.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
    return z_q, commit_loss, flat


if HAS_DIFFUSERS:
    from diffusers import VQModel as _DiffusersVQModel
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.autoencoders.vq_model import VQEncoderOutput
    from diffusers.utils.accelerate_utils import apply_forward_hook

    _SIGNATURE = inspect.signature(_DiffusersVQModel.__init__)
    _FIELD_DEFAULTS = {k: p.default for k, p in _SIGNATURE.parameters.items() if k != "self"}

    class VQModel(_DiffusersVQModel):
        """`diffusers.VQModel` with sdvae-fast's backends (see the module docstring).

        Constructor arguments, config, state-dict names, `from_pretrained` / `save_pretrained` and `forward` are
        diffusers'. The constructor (hence also `from_config`, `from_pretrained`, `from_preset`) checks the config
        first: TypeError listing the valid fields for an unknown one, ValueError naming the field for values
        diffusers would fail on deep inside (`validate_vq_fields`). `encode` / `decode` validate their input and
        run the kernels per `backend` (initially $SDVAE_FAST_BACKEND or "auto"); on backend "torch" they are
        diffusers' code bit for bit.
        """

        @functools.wraps(_DiffusersVQModel.__init__)
        def __init__(self, *args, **kwargs):
            public = {k: v for k, v in kwargs.items() if not k.startswith("_")}
            unknown = sorted(k for k in public if k not in _FIELD_DEFAULTS)
            if unknown:
                raise TypeError(f"VQModel(): unknown config field(s) {unknown}; valid fields: "
                                f"{list(_FIELD_DEFAULTS)}")
            try:
                bound = _SIGNATURE.bind(None, *args, **public)
            except TypeError as e:
                raise TypeError(f"VQModel(): {e}; valid fields: {list(_FIELD_DEFAULTS)}") from None
            validate_vq_fields({k: v for k, v in bound.arguments.items() if k != "self"}, _FIELD_DEFAULTS,
                               "VQModel()")
            super().__init__(*args, **kwargs)
            self.backend = check_backend(os.environ.get(BACKEND_ENV) or "auto", f"environment variable {BACKEND_ENV}")
            # Read by diffusers' pipelines for their model_index.json: diffusers' class loads the saved folder.
            self.__dict__["__module__"] = "diffusers"

        @property
        def backend(self) -> str:
            """"auto", "triton" or "torch" (`sdvae_fast.backends`): which forward encode and decode run."""
            return self.__dict__.get("_sdvae_fast_backend", "auto")

        @backend.setter
        def backend(self, name: str) -> None:
            self.__dict__["_sdvae_fast_backend"] = check_backend(name, "backend")

        def set_backend(self, name: str) -> None:
            """Choose the forward: "auto" (the kernels on CUDA, else PyTorch), "triton" (always the kernels; on CPU
            only under TRITON_INTERPRET=1, else encode/decode raise RuntimeError), or "torch" (diffusers' code).
            Raises ValueError for any other name."""
            self.backend = name

        def extra_repr(self) -> str:
            return f"backend={self.backend!r}"

        def _fast(self, x: torch.Tensor, modules: tuple):
            """The `sdvae_fast.fast` module when the kernels should run `modules` on x, else None (backend
            "torch", "auto" off CUDA, parameters in another dtype or device, or autograd needed)."""
            if self.backend == "torch" or (self.backend == "auto" and x.device.type != "cuda"):
                return None
            if not parameters_match(modules, x):
                return None
            from sdvae_fast import fast

            if any(fast.needs_autograd(m, x) for m in modules):
                return None
            return fast if fast.use_fast_path(self.backend, x.device) else None

        @apply_forward_hook
        def encode(self, x: torch.Tensor, return_dict: bool = True):
            """Encode images into unquantised latents `quant_conv(encoder(x))`.

            Args:
                x: images (N, in_channels, H, W) in [-1, 1], the model's dtype and device.
                return_dict: return `VQEncoderOutput(latents=...)` if True, else `(latents,)`.
            Returns:
                latents (N, vq_embed_dim, H / f, W / f) in x's dtype (f = 2 ** (number of down blocks - 1)).
            Raises:
                TypeError / ValueError: x is not a float tensor of shape (N, in_channels, H, W) on the model's
                    device (the message names the expected shape), or is empty.
            """
            _check_images("x", x, self.config.in_channels, self.quant_conv.weight.device, "in_channels")
            fast = self._fast(x, (self.encoder, self.quant_conv))
            if fast is None:
                return super().encode(x, return_dict=return_dict)
            h = fast.run_encoder(self.encoder, x, self.quant_conv)
            return VQEncoderOutput(latents=h) if return_dict else (h,)

        def quantize_latents(self, h: torch.Tensor):
            """diffusers' `self.quantize(h)` on the kernel: (z_q, commit_loss, indices), as
            `quantize_like_diffusers` documents (h: (N, vq_embed_dim, h, w); ValueError for a codebook of the
            wrong width)."""
            return quantize_like_diffusers(self.quantize, h)

        @apply_forward_hook
        def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True, shape=None):
            """Quantise (unless `force_not_quantize`) and decode latents, as diffusers' VQModel.decode.

            Args:
                h: latents (N, vq_embed_dim, h, w) in the model's dtype and device; with `force_not_quantize`
                    and `config.lookup_from_codebook`, codebook indices (any integer shape holding
                    batch * height * width entries in [0, num_vq_embeddings)).
                force_not_quantize: skip the quantiser (decode h as given, or look the indices up).
                return_dict: return `DecoderOutput(sample=..., commit_loss=...)` if True, else
                    `(sample, commit_loss)`.
                shape: (batch, height, width, vq_embed_dim) for the index lookup.
            Returns:
                sample (N, out_channels, f*h, f*w) in the model's dtype; commit_loss a 0-d tensor (quantised)
                or zeros (N,) (not quantised), as diffusers.
            Raises:
                TypeError / ValueError: latents of the wrong rank, channel count, dtype or device; indices that
                    are not integers, out of range, or without a matching `shape`.
            """
            channels = self.post_quant_conv.in_channels
            device = self.post_quant_conv.weight.device
            lookup = force_not_quantize and self.config.lookup_from_codebook
            if lookup:
                self._check_indices(h, shape)
                quant = self.quantize.get_codebook_entry(h, shape)
            else:
                _check_images("h", h, channels, device, "the codebook width vq_embed_dim")
                quant = None
            fast = self._fast(quant if lookup else h, (self.decoder, self.post_quant_conv, self.quantize))
            if fast is None:
                return super().decode(h, force_not_quantize=force_not_quantize, return_dict=return_dict,
                                      shape=shape)
            if lookup or force_not_quantize:
                quant = quant if lookup else h
                commit_loss = torch.zeros((h.shape[0])).to(h.device, dtype=h.dtype)  # diffusers' (its dtype too)
            else:
                quant, commit_loss, _ = self.quantize_latents(h)
            latent_embeds = quant if self.config.norm_type == "spatial" else None
            dec = fast.run_decoder(self.decoder, quant, self.post_quant_conv, latent_embeds=latent_embeds)
            return DecoderOutput(sample=dec, commit_loss=commit_loss) if return_dict else (dec, commit_loss)

        @classmethod
        def from_preset(cls, name: str, seed: int = 0, *, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None, **overrides):
            """A model of preset `name` (`VQ_PRESETS`: "vq-f4", "vq-f8") with deterministic random weights.

            diffusers' initialisation drawn from `torch.manual_seed(seed)` in a forked RNG state (the global RNG
            is untouched): not a trained model, its decodes are no meaningful image. `overrides` replace config
            fields (e.g. narrow widths for tests: `from_preset("vq-f8", block_out_channels=(8, 8, 16, 16),
            norm_num_groups=4, num_vq_embeddings=64)`). Returned in eval mode, moved to `dtype` / `device` when
            given. Raises ValueError listing the presets for an unknown name; TypeError (unknown field) /
            ValueError (bad value, naming the field) for bad overrides, as the constructor.
            """
            if name not in VQ_PRESETS:
                raise ValueError(f"unknown VQ preset {name!r}; choose one of {sorted(VQ_PRESETS)}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = cls(**{**VQ_PRESETS[name], **overrides})
            if device is not None or dtype is not None:
                model = model.to(device=device, dtype=dtype)
            return model.eval()

        @classmethod
        def from_single_file(cls, path, config=None, torch_dtype=None, unsafe_pickle: bool = False, **overrides):
            """A VQModel from latent-diffusion's original single file (see the module docstring).

            Args:
                path: `.ckpt` / `.pt` (pickle, read with `weights_only=True` unless `unsafe_pickle`) or
                    `.safetensors`; the VQ model under `first_stage_model.` (a whole LDM checkpoint) or no prefix.
                config: a dict of VQModel fields that replaces the inferred config (else inferred from shapes).
                torch_dtype: dtype of the returned model (float32 when None).
                overrides: VQModel fields on top (e.g. `scaling_factor`, `norm_num_groups`: the file does not
                    store GroupNorm's group count, 32 (latent diffusion's) is assumed unless given).
            Returns:
                the model in eval mode on CPU.
            Raises:
                FileNotFoundError; TypeError for an override that is no VQModel field; CheckpointError (a
                ValueError) for an unreadable file, no VQ weights, a VQ model in diffusers' names (load its folder
                with `from_pretrained`), a codebook whose width differs from the quant convs', a norm_num_groups
                that does not divide the widths (listing those that would), a config that cannot be built, or
                weights that do not fit the config (listing missing and mis-shaped keys, file vs model shapes,
                and unused keys).
            """
            from sdvae_fast.loading import (CheckpointError, _Checkpoint, _choose_prefix, _detect_layout,
                                            _misfit_message, _shape_errors, allowed_group_counts)

            unknown = sorted(k for k in overrides if k not in _FIELD_DEFAULTS)
            if unknown:
                raise TypeError(f"VQModel.from_single_file: unknown config field(s) {unknown}; valid fields: "
                                f"{list(_FIELD_DEFAULTS)}")
            path = Path(path)
            if path.is_dir():
                raise CheckpointError(f"{path} is a folder: load diffusers folders with VQModel.from_pretrained")
            checkpoint = _Checkpoint(path, unsafe_pickle=unsafe_pickle)
            prefix = _choose_prefix(checkpoint.keys, path)
            names = [k for k in checkpoint.keys if k.startswith(prefix)]
            tensors = {k[len(prefix):]: v for k, v in checkpoint.read(names).items()}
            if _LDM_CODEBOOK not in tensors:
                raise CheckpointError(f"{path}: no codebook {prefix}{_LDM_CODEBOOK}: not a VQ model (an "
                                      f"AutoencoderKL file loads with sdvae_fast.AutoencoderKL.from_single_file)")
            vae_keys = [k for k in tensors if k.startswith(("encoder.", "decoder."))]
            if vae_keys and _detect_layout(vae_keys, path) != "ldm":
                raise CheckpointError(
                    f"{path}: a VQ model in diffusers' names (encoder.down_blocks.*, e.g. a diffusers folder's "
                    f"diffusion_pytorch_model.safetensors), not latent-diffusion's original layout (encoder.down.*) "
                    f"that from_single_file reads. Put the file in a folder beside its config.json and load it "
                    f"with VQModel.from_pretrained(folder)")
            _check_codebook_width(tensors, path, prefix)
            shapes = {k: v.shape for k, v in tensors.items()}
            given = {k: v for k, v in dict(config or {}).items() if not str(k).startswith("_")}
            given.update(overrides)
            if config is not None:
                fields = dict(given)
            else:
                try:
                    fields = {**vq_config_from_ldm_keys(shapes), **overrides}
                except CheckpointError as e:
                    raise CheckpointError(f"{path}: {e}") from e
            if "norm_num_groups" not in given and isinstance(fields.get("block_out_channels"), (list, tuple)):
                widths = list(fields["block_out_channels"])
                groups = _FIELD_DEFAULTS["norm_num_groups"]
                if widths and all(_is_positive_int(w) for w in widths) and any(w % groups for w in widths):
                    raise CheckpointError(
                        f"{path}: norm_num_groups={groups} (assumed: the file cannot tell) does not divide the "
                        f"widths {widths}. Pass norm_num_groups=N (one of {allowed_group_counts(widths)}) with "
                        f"the value the model was trained with")
            try:
                model = cls(**fields)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot build VQModel from the config {fields}: {e}") from e
            state, unmapped = ldm_vq_state_dict(tensors)
            expected = {k: v.shape for k, v in model.state_dict().items()}
            missing, misshaped = _shape_errors(expected, state)
            unused = sorted(set(unmapped) | (set(state) - set(expected)))
            if missing or misshaped or unused:
                raise CheckpointError(_misfit_message(
                    path, f"VQModel({fields})", missing, misshaped, unused=unused,
                    naming="keys in diffusers' names (the file's latent-diffusion names map as "
                           "sdvae_fast.vq.ldm_vq_state_dict maps them)."))
            model.load_state_dict(state, strict=True)
            if torch_dtype is not None:
                model.to(torch_dtype)
            return model.eval()

        def _check_indices(self, indices, shape) -> None:
            """Clear errors for the `lookup_from_codebook` path (indices and their `shape`)."""
            if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
                raise TypeError(f"h must be an integer tensor of codebook indices with force_not_quantize and "
                                f"lookup_from_codebook, got {getattr(indices, 'dtype', type(indices).__name__)}")
            dim = self.quantize.vq_embed_dim
            if shape is None or len(shape) != 4 or int(shape[3]) != dim \
                    or int(shape[0]) * int(shape[1]) * int(shape[2]) != indices.numel():
                raise ValueError(f"shape must be (batch, height, width, {dim}) with batch * height * width == "
                                 f"h.numel() ({indices.numel()}), got {shape}")
            count = self.quantize.embedding.num_embeddings
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= count):
                raise ValueError(f"h: codebook indices must lie in [0, {count}), got [{int(indices.min())}, "
                                 f"{int(indices.max())}]")

else:
    VQModel = needs_diffusers("VQModel", ("from_pretrained", "from_config", "from_preset", "from_single_file"))