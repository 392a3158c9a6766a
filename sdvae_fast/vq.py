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
"torch")` (`sdvae_fast.backends`), input validation with clear errors, and the fast path when the backend says
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
1x1 convs) and infers the architecture from the tensor shapes (`vq_config_from_ldm_keys`).
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from sdvae_fast.backends import BACKEND_ENV, HAS_DIFFUSERS, check_backend, needs_diffusers, parameters_match
from sdvae_fast.configs import VQ_PRESETS


__all__ = ["VQModel", "HAS_DIFFUSERS", "VQ_PRESETS", "ldm_vq_state_dict", "quantize_like_diffusers",
           "vq_config_from_ldm_keys"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_images(name: str, x, channels: int, device) -> None:
    """Raise naming `name` unless x is a float (N, channels, H, W) tensor on `device`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be 4-D (N, {channels}, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the model's parameters are on {device}")


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

    class VQModel(_DiffusersVQModel):
        """`diffusers.VQModel` with sdvae-fast's backends (see the module docstring).

        Constructor arguments, config, state-dict names, `from_pretrained` / `save_pretrained` and `forward` are
        diffusers'. `encode` / `decode` validate their input and run the kernels per `backend` (initially
        $SDVAE_FAST_BACKEND or "auto"); on backend "torch" they are diffusers' code bit for bit.
        """

        @functools.wraps(_DiffusersVQModel.__init__)
        def __init__(self, *args, **kwargs):
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
            _check_images("x", x, self.config.in_channels, self.quant_conv.weight.device)
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
                _check_images("h", h, channels, device)
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
        def from_preset(cls, name: str, seed: int = 0, **overrides):
            """A model of preset `name` (`VQ_PRESETS`: "vq-f4", "vq-f8") with weights drawn from `seed` (diffusers'
            initialisation under `torch.manual_seed(seed)`, restoring the global RNG): not a trained model.
            Raises ValueError for an unknown name."""
            if name not in VQ_PRESETS:
                raise ValueError(f"unknown VQ preset {name!r}; choose one of {sorted(VQ_PRESETS)}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return cls(**dict(VQ_PRESETS[name], **overrides)).eval()

        @classmethod
        def from_single_file(cls, path, config=None, torch_dtype=None, unsafe_pickle: bool = False, **overrides):
            """A VQModel from latent-diffusion's original single file (see the module docstring).

            Args:
                path: `.ckpt` / `.pt` (pickle, read with `weights_only=True` unless `unsafe_pickle`) or
                    `.safetensors`; the VQ model under `first_stage_model.` (a whole LDM checkpoint) or no prefix.
                config: a dict of VQModel fields that replaces the inferred config (else inferred from shapes).
                torch_dtype: dtype of the returned model (float32 when None).
                overrides: VQModel fields on top (e.g. `scaling_factor`, `norm_num_groups`).
            Returns:
                the model in eval mode on CPU.
            Raises:
                FileNotFoundError; CheckpointError (a ValueError) for an unreadable file, no VQ weights, or
                weights that do not fit the config (listing missing, mis-shaped and unused keys).
            """
            from sdvae_fast.loading import CheckpointError, _Checkpoint, _choose_prefix

            path = Path(path)
            checkpoint = _Checkpoint(path, unsafe_pickle=unsafe_pickle)
            prefix = _choose_prefix(checkpoint.keys, path)
            names = [k for k in checkpoint.keys if k.startswith(prefix)]
            tensors = {k[len(prefix):]: v for k, v in checkpoint.read(names).items()}
            if _LDM_CODEBOOK not in tensors:
                raise CheckpointError(f"{path}: no codebook {prefix}{_LDM_CODEBOOK}: not a VQ model (an "
                                      f"AutoencoderKL file loads with sdvae_fast.AutoencoderKL.from_single_file)")
            fields = dict(config) if config is not None else vq_config_from_ldm_keys(
                {k: v.shape for k, v in tensors.items()})
            fields.update(overrides)
            state, unmapped = ldm_vq_state_dict(tensors)
            model = cls(**fields)
            expected = model.state_dict()
            missing = sorted(set(expected) - set(state))
            misshaped = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
            unused = sorted(set(unmapped) | (set(state) - set(expected)))
            if missing or misshaped or unused:
                raise CheckpointError(
                    f"{path}: the checkpoint does not fit VQModel({fields}): missing {missing[:8]}, mis-shaped "
                    f"{misshaped[:8]}, unused {unused[:8]} (first 8 of each)")
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