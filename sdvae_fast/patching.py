"""`patch` / `unpatch`: run a live `diffusers.AutoencoderKL` or `diffusers.ConsistencyDecoderVAE` (or a
pipeline's `.vae`) on the fast path, in place. `diffusers.AutoencoderKLFlux2` and `diffusers.VQModel` have an
AutoencoderKL's encoder and decoder and are patched as one (plus a VQModel's quantiser, below); FLUX.2's latent
BatchNorm is outside `encode` / `decode` and stays diffusers' code.

    import sdvae_fast
    sdvae_fast.patch(pipe)        # pipe.vae.decode / encode now run the Triton kernels on CUDA
    sdvae_fast.unpatch(pipe)      # back to diffusers' own forwards, bit for bit

What patching changes: three instance attributes (four on a VQModel), nothing else (two more, `vae.encode` and `vae.decode`, only
while patch parallelism is on: `enable_patch_parallel`, below).
- `vae.encoder.forward` and `vae.decoder.forward` become `sdvae_fast.fast.run_encoder` / `run_decoder` on the
  encoder's / decoder's own parameters. Everything above them is diffusers' own code, so `config`, `dtype`,
  `post_quant_conv` (still its own 1x1 conv), `enable_slicing` and `enable_tiling` (whose tiled paths call
  `self.encoder` / `self.decoder` per tile) work unchanged, and `.to()` casts apply to the shared parameters.
- `vae._encode` (when the class has one) runs `fast.encode_moments`, which folds `quant_conv` into the
  encoder's conv_out; with tiling enabled it defers to diffusers' `_encode` (whose tiles then use the fast
  encoder).
- A `diffusers.VQModel`'s `vae.quantize.forward` (a VectorQuantizer) runs the quantiser kernel
  (`sdvae_fast.vq.quantize_like_diffusers`); its decoder's `latent_embeds` (MoVQ's SpatialNorm) go to
  `fast.run_decoder`.
No parameter is copied (prepared weights such as the folded quant_conv are small derived tensors cached per
module and rebuilt when a parameter changes). Each patched forward falls back to the one it replaced (diffusers'
class method, or an instance override such as an accelerate hook that was there before) when the backend says
so (`sdvae_fast.fast.use_fast_path`), when any parameter's dtype or device differs from the input's (offloading
hooks, mixed-dtype modules and mismatched inputs keep diffusers' own behaviour and errors), when extra arguments
are passed, or when autograd is needed.

A live `diffusers.ConsistencyDecoderVAE` (DALL-E 3's consistency decoder) gets two instance attributes:
`vae.encoder.forward` as above, and `vae.decoder_unet.forward`, which becomes `sdvae_fast.fast.run_unet` (the
UNet's units) under the same fallback rules (and the UNet's own forward whenever `class_labels` are passed or
`fast.unet_why_not` gives a reason). `quant_conv`, the scheduler steps and the noise draws stay diffusers' code,
so a fixed generator gives diffusers' image to fp32 rounding. `sdvae_fast.ConsistencyDecoderVAE` runs the same
units and, in its own `decode`, also assembles the UNet input inside conv_in and computes only the 3 output
channels decode keeps; a patched live object keeps diffusers' `decode`. Patch parallelism does not apply to it.

`patch` twice is idempotent (the second call only updates the backend); `unpatch` of an object that is not
patched is a no-op; both return their argument. `unpatch` restores exactly the instance attributes that were
there before `patch` (or their absence), so the module's behaviour is bit-identical to before. An override that
someone else installed *after* `patch` is left in place by `unpatch` (its wrapped call then reaches diffusers'
own forward).

`enable_patch_parallel` / `disable_patch_parallel` live here too, since on a live diffusers VAE they patch it:
the patched encoder and decoder forwards then run `sdvae_fast.parallel`'s band-split calls (on our own
AutoencoderKL they call its methods of the same names).
"""
from __future__ import annotations

import types

import torch

from sdvae_fast import fast
from sdvae_fast.backends import check_backend, parameters_match

_STATE = "_sdvae_fast_patch"


class _Missing:
    """Marks an attribute that had no instance entry before patching; survives copy/deepcopy/pickle as itself."""

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_MISSING"

    def __repr__(self):
        return "<no instance entry>"


_MISSING = _Missing()


class _PatchState:
    """What `patch` installed: the backend name and, per (module, attribute), the instance entry it replaced."""

    def __init__(self, backend: str):
        self.backend = backend
        self.saved: list[tuple[torch.nn.Module, str, object]] = []
        #: (process group, gather, the VAE) while patch parallelism is on (`enable_patch_parallel`), else None.
        self.parallel: "tuple | None" = None
        #: whether `enable_patch_parallel` patched the VAE itself (then `disable_patch_parallel` unpatches it).
        self.patched_for_parallel = False

    def previous(self, module: torch.nn.Module, name: str):
        """The callable that `module.<name>` was before patching: the replaced instance entry or the class method."""
        for owner, attr, entry in self.saved:
            if owner is module and attr == name and entry is not _MISSING:
                return entry
        return getattr(type(module), name).__get__(module, type(module))


def _is_vae(obj) -> bool:
    """Whether obj looks like an AutoencoderKL (encoder and decoder) or a ConsistencyDecoderVAE (encoder and
    decoder_unet)."""
    return hasattr(obj, "encoder") and (hasattr(obj, "decoder") or hasattr(obj, "decoder_unet"))


def _is_consistency(vae) -> bool:
    """Whether a VAE `_find_vae` returned is a consistency decoder (its decoder is a UNet, `decoder_unet`)."""
    return hasattr(vae, "decoder_unet") and not hasattr(vae, "decoder")


def _find_vae(obj):
    """obj itself when it looks like an AutoencoderKL or a ConsistencyDecoderVAE (`_is_vae`), else obj.vae."""
    if _is_vae(obj):
        return obj
    vae = getattr(obj, "vae", None)
    if vae is not None and _is_vae(vae):
        return vae
    raise TypeError(
        f"patch/unpatch expects a diffusers AutoencoderKL (with .encoder and .decoder) or ConsistencyDecoderVAE "
        f"(with .encoder and .decoder_unet), or a pipeline holding one as .vae, got {type(obj).__name__}"
    )


def _state_of(module) -> "_PatchState | None":
    return module.__dict__.get(_STATE)


def _runs_fast(state: "_PatchState | None", modules, sample) -> bool:
    """Whether a patched forward running `modules` (a tuple, None entries allowed) takes the fast path for `sample`."""
    if state is None or not isinstance(sample, torch.Tensor) or sample.dim() != 4:
        return False
    if not parameters_match(modules, sample):
        return False
    if any(module is not None and fast.needs_autograd(module, sample) for module in modules):
        return False
    return fast.use_fast_path(state.backend, sample.device)


def _encoder_forward(self, sample, *args, **kwargs):
    """Patched `Encoder.forward(sample)`: `fast.run_encoder`, or the replaced forward (see module docstring)."""
    state = _state_of(self)
    if args or kwargs or not _runs_fast(state, (self,), sample):
        original = state.previous(self, "forward") if state is not None else type(self).forward.__get__(self)
        return original(sample, *args, **kwargs)
    return fast.run_encoder(self, sample)


def _in_parallel(state: "_PatchState | None", args, kwargs) -> bool:
    """Whether a patched forward runs split by rows (patch parallelism on, and no extra arguments)."""
    return state is not None and state.parallel is not None and not args and not kwargs


def _parallel_call(function, module, x, state: _PatchState):
    """`function` (`parallel.encode_patch_parallel` / `decode_patch_parallel`) on `module` with the VAE's
    setting; a band's first row goes to the VAE's `patch_parallel_offset`."""
    group, gather, vae = state.parallel
    result = function(module, x, group, gather=gather)
    if gather:
        return result
    band, vae.patch_parallel_offset = result
    return band


def _decoder_forward(self, sample, latent_embeds=None, *args, **kwargs):
    """Patched `Decoder.forward(sample, latent_embeds=None)`: `fast.run_decoder` unless latent_embeds is given;
    split by rows under patch parallelism."""
    state = _state_of(self)
    if latent_embeds is None and _in_parallel(state, args, kwargs):
        from sdvae_fast import parallel

        return _parallel_call(parallel.decode_patch_parallel, self, sample, state)
    if args or kwargs or not _runs_fast(state, (self,), sample) or not (
            latent_embeds is None or _runs_fast(state, (), latent_embeds)):
        original = state.previous(self, "forward") if state is not None else type(self).forward.__get__(self)
        if latent_embeds is None:
            return original(sample, *args, **kwargs)
        return original(sample, latent_embeds, *args, **kwargs)
    return fast.run_decoder(self, sample, latent_embeds=latent_embeds)


def _quantizer_forward(self, z, *args, **kwargs):
    """Patched `VectorQuantizer.forward(z)` of a diffusers VQModel: the nearest codebook rows on one kernel
    (`sdvae_fast.vq.quantize_like_diffusers`: diffusers' values, commit loss and index layout; perplexity and
    min_encodings None, as diffusers returns them), or the replaced forward (see the module docstring)."""
    state = _state_of(self)
    if args or kwargs or not _runs_fast(state, (self,), z):
        original = state.previous(self, "forward") if state is not None else type(self).forward.__get__(self)
        return original(z, *args, **kwargs)
    from sdvae_fast.vq import quantize_like_diffusers

    z_q, loss, indices = quantize_like_diffusers(self, z)
    return z_q, loss, (None, None, indices)


def _unet_forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
    """Patched `UNet2DModel.forward(sample, timestep, class_labels=None, return_dict=True)` of a consistency
    decoder's `decoder_unet`: `fast.run_unet` (returning `UNet2DOutput(sample=(N, C_out, H, W))` or a 1-tuple, as
    diffusers), or the replaced forward when class_labels are given, `fast.unet_why_not` gives a reason, or the
    module docstring's rules say so."""
    state = _state_of(self)
    if class_labels is not None or not _runs_fast(state, (self,), sample) or fast.unet_why_not(self) is not None:
        original = state.previous(self, "forward") if state is not None else type(self).forward.__get__(self)
        return original(sample, timestep, class_labels=class_labels, return_dict=return_dict)
    from diffusers.models.unets.unet_2d import UNet2DOutput

    y = fast.run_unet(self, sample, timestep)  # (N, C_out, H, W)
    return UNet2DOutput(sample=y) if return_dict else (y,)


def _vae_encode(self, x, *args, **kwargs):
    """Patched `AutoencoderKL._encode(x)`: `fast.encode_moments` (quant_conv folded) unless tiling is enabled;
    split by rows under patch parallelism."""
    state = _state_of(self)
    if _in_parallel(state, args, kwargs):
        from sdvae_fast import parallel

        return _parallel_call(parallel.encode_patch_parallel, self, x, state)
    modules = (self.encoder, getattr(self, "quant_conv", None))
    if args or kwargs or getattr(self, "use_tiling", False) or not _runs_fast(state, modules, x):
        original = state.previous(self, "_encode") if state is not None else type(self)._encode.__get__(self)
        return original(x, *args, **kwargs)
    return fast.encode_moments(self, x)


def _input_problem(vae, x, first: torch.nn.Module) -> None:
    """Raise ValueError / TypeError when `x` cannot enter `first` (the VAE's first module of encode or decode),
    or when tiling is on: what each rank checks together under patch parallelism."""
    if getattr(vae, "use_tiling", False):
        raise ValueError("tiling and patch parallelism do not combine (tiles would change the exact result): call "
                         "disable_tiling() or disable_patch_parallel()")
    fast._check_input("the input", x, first, "a tensor")


def _agreed(self, name: str, x, first) -> None:
    """Every rank validates its input for `name` together (`parallel.agree`)."""
    from sdvae_fast import parallel

    parallel.agree(lambda: _input_problem(self, x, first), _state_of(self).parallel[0], f"patch parallel {name}")


def _vae_encode_parallel(self, x, return_dict: bool = True, *args, **kwargs):
    """`AutoencoderKL.encode` under patch parallelism: the ranks validate the images together first, and with
    gather the posterior's `sample()` without a generator draws on the group's first rank and broadcasts
    (`model._SharedNoisePosterior`), so every rank agrees."""
    state = _state_of(self)
    _agreed(self, "encode", x, self.encoder.conv_in)
    out = state.previous(self, "encode")(x, return_dict, *args, **kwargs)
    if state.parallel is None or not state.parallel[1]:
        return out
    from sdvae_fast.model import _SharedNoisePosterior

    posterior = out.latent_dist if return_dict else out[0]
    shared = _SharedNoisePosterior(posterior.parameters, state.parallel[0])
    return type(out)(latent_dist=shared) if return_dict else (shared,)


def _vae_decode_parallel(self, z, *args, **kwargs):
    """`AutoencoderKL.decode` under patch parallelism: the ranks validate the latents together first (so that
    `post_quant_conv`, which runs on the whole latents before the split decoder, never fails on one rank only)."""
    first = self.post_quant_conv if getattr(self, "post_quant_conv", None) is not None else self.decoder.conv_in
    _agreed(self, "decode", z, first)
    return _state_of(self).previous(self, "decode")(z, *args, **kwargs)


_OURS = (_encoder_forward, _decoder_forward, _unet_forward, _vae_encode, _vae_encode_parallel,
         _vae_decode_parallel, _quantizer_forward)


def _install(state: _PatchState, module, name: str, function) -> None:
    """Replace `module.<name>` by `function` bound to it, remembering the instance entry it replaces."""
    state.saved.append((module, name, module.__dict__.get(name, _MISSING)))
    # A bound method in the instance dict shadows the class method; copy.deepcopy rebinds it to the copy.
    module.__dict__[name] = types.MethodType(function, module)


def _restore(module, name: str, entry) -> None:
    """Put back the instance entry `entry` of `module.<name>` if the current one is still ours."""
    current = module.__dict__.get(name, _MISSING)
    if not (isinstance(current, types.MethodType) and current.__self__ is module and current.__func__ in _OURS):
        return  # replaced by someone else after patch(): leave their override in place
    if entry is _MISSING:
        del module.__dict__[name]
    else:
        module.__dict__[name] = entry


def _set_patch_parallel(vae, group, gather: bool) -> None:
    """Route a live diffusers VAE's encode and decode through `sdvae_fast.parallel` (patching it first when it
    is not patched; `_clear_patch_parallel` then unpatches it again). Used by `enable_patch_parallel`.

    Installs, besides `patch`'s three entries, `encode` and `decode` overrides while it is on: the ranks
    validate their inputs together before anything else, and the posterior's `sample()` agrees across ranks.
    Turns diffusers' tiling off (bands and tiles do not combine: turning it on again makes the calls raise).
    """
    state = _state_of(vae)
    if state is None:
        patch(vae)
        state = _state_of(vae)
        state.patched_for_parallel = True
    state.parallel = (group, bool(gather), vae)
    vae.use_tiling = False
    vae.patch_parallel_offset = None
    for name, function in (("encode", _vae_encode_parallel), ("decode", _vae_decode_parallel)):
        if hasattr(type(vae), name) and not any(m is vae and n == name for m, n, _ in state.saved):
            _install(state, vae, name, function)


def _clear_patch_parallel(vae) -> None:
    """Undo `_set_patch_parallel` (a no-op when patch parallelism is off)."""
    state = _state_of(vae)
    if state is None or state.parallel is None:
        return
    state.parallel = None
    vae.__dict__.pop("patch_parallel_offset", None)
    for entry in [e for e in state.saved if e[0] is vae and e[1] in ("encode", "decode")]:
        _restore(*entry)
        state.saved.remove(entry)
    if state.patched_for_parallel:
        unpatch(vae)


def patch(obj, backend: str = "auto"):
    """Route a live diffusers `AutoencoderKL`'s encoder and decoder (a `ConsistencyDecoderVAE`'s encoder and
    decoder UNet) through the fast path, in place.

    Args:
        obj: a `diffusers.AutoencoderKL` or `diffusers.ConsistencyDecoderVAE` (or any module with one's
            structure: `AutoencoderKLFlux2`, `VQModel`), or a pipeline or other object holding one as `.vae`.
        backend: "auto" (kernels on CUDA tensors, diffusers' forwards elsewhere), "triton" (always the kernels;
            on CPU that needs TRITON_INTERPRET=1, else each call raises RuntimeError) or "torch" (diffusers'
            forwards; patched but inert). Read at every call, so the VAE may move between devices.
    Returns:
        obj, patched (the same object; parameters shared, nothing copied).
    Our own `sdvae_fast.AutoencoderKL` and `sdvae_fast.ConsistencyDecoderVAE` (which have the fast path built
    in) are not patched: `patch` only calls their `set_backend(backend)`.
    Raises:
        ValueError: unknown backend name.
        TypeError: obj is neither an AutoencoderKL- or ConsistencyDecoderVAE-like module nor holds one as `.vae`.
    """
    check_backend(backend)
    vae = _find_vae(obj)
    if callable(getattr(vae, "set_backend", None)):  # sdvae_fast's own AutoencoderKL: the backend is its switch
        vae.set_backend(backend)
        return obj
    state = _state_of(vae)
    if state is not None:
        state.backend = backend
        return obj
    state = _PatchState(backend)
    if _is_consistency(vae):
        targets = [(vae.encoder, "forward", _encoder_forward), (vae.decoder_unet, "forward", _unet_forward)]
    else:
        targets = [(vae.encoder, "forward", _encoder_forward), (vae.decoder, "forward", _decoder_forward)]
        if hasattr(type(vae), "_encode"):
            targets.append((vae, "_encode", _vae_encode))
        if type(getattr(vae, "quantize", None)).__name__ == "VectorQuantizer":  # a VQModel's quantiser (issue 14)
            targets.append((vae.quantize, "forward", _quantizer_forward))
    for module, name, function in targets:
        _install(state, module, name, function)
    for module in {id(m): m for m in [vae] + [m for m, _, _ in targets]}.values():
        module.__dict__[_STATE] = state  # the vae too: `is_patched` reads the state there
    return obj


def unpatch(obj):
    """Undo `patch(obj)`: restore the instance attributes exactly as they were; a no-op when not patched.

    Args:
        obj: what was given to `patch` (the VAE or an object holding it as `.vae`).
    Returns:
        obj.
    Raises:
        TypeError: obj is neither an AutoencoderKL- or ConsistencyDecoderVAE-like module nor holds one as `.vae`.
    """
    vae = _find_vae(obj)
    state = _state_of(vae)
    if state is None:
        return obj
    for module, name, entry in reversed(state.saved):
        _restore(module, name, entry)
    for module in [vae] + [m for m, _, _ in state.saved]:
        module.__dict__.pop(_STATE, None)
    return obj


def is_patched(obj) -> bool:
    """Whether obj (or its `.vae`) runs the fast path when its backend allows: `patch` applied and not undone,
    or sdvae_fast's own AutoencoderKL (the fast path built in; `patch` only sets its backend)."""
    vae = _find_vae(obj)
    return callable(getattr(vae, "set_backend", None)) or _state_of(vae) is not None


def enable_patch_parallel(vae_or_pipe, group=None, *, gather: bool = True):
    """Split every encode and decode of a VAE (or a pipeline's `.vae`) by rows over the ranks of `group`.

    Every rank must then call `encode` / `decode` with the same full input (pipelines do); each computes its band
    (`sdvae_fast.parallel`: halo rows, whole-image GroupNorm statistics, keys and values of all tokens) and
    gets the full result (`gather=True`) or only its band, whose first row is then `vae.patch_parallel_offset`.
    `latent_dist.sample()` without a generator draws on the group's first rank and broadcasts. The ranks validate
    their inputs together (a bad input on one rank raises the same ValueError on all). Inference only (the
    output does not require grad). Tiling is turned off (bands and tiles do not combine: turning it on again
    makes the calls raise); slicing still splits the batch.

    Args:
        vae_or_pipe: sdvae_fast's AutoencoderKL, a live `diffusers.AutoencoderKL`, or a pipeline holding one as
            `.vae`. A diffusers VAE that is not patched yet is patched first (`sdvae_fast.patch`: its encoder and
            decoder forwards run the fast path's units, which split by rows), and `disable_patch_parallel`
            unpatches it again; one that was patched before stays patched.
        group: a `torch.distributed` process group (default: the world), NCCL on GPUs or gloo on CPU.
        gather: full results on every rank (True) or each rank's band only.
    Returns:
        vae_or_pipe.
    Raises:
        TypeError: the object is neither a VAE nor holds one as `.vae`, or it is a consistency decoder (patch
            parallelism splits AutoencoderKL VAEs only).
        RuntimeError: torch.distributed is not initialised.
    """
    import torch.distributed as dist

    vae = _find_vae(vae_or_pipe)
    if _is_consistency(vae):
        raise TypeError(f"enable_patch_parallel splits AutoencoderKL VAEs; {type(vae).__name__} (a consistency "
                        f"decoder) is not supported")
    if callable(getattr(vae, "enable_patch_parallel", None)):
        vae.enable_patch_parallel(group, gather=gather)
        return vae_or_pipe
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("enable_patch_parallel needs an initialised torch.distributed process group: call "
                           "torch.distributed.init_process_group('nccl' or 'gloo') first (torchrun only sets the "
                           "environment it reads)")
    _set_patch_parallel(vae, group, gather)
    return vae_or_pipe


def disable_patch_parallel(vae_or_pipe):
    """Undo `enable_patch_parallel` (a no-op when it is off); returns the argument. A diffusers VAE that
    `enable_patch_parallel` patched is unpatched."""
    vae = _find_vae(vae_or_pipe)
    if callable(getattr(vae, "disable_patch_parallel", None)):
        vae.disable_patch_parallel()
    else:
        _clear_patch_parallel(vae)
    return vae_or_pipe
