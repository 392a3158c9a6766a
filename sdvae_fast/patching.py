"""`patch` / `unpatch`: run a live `diffusers.AutoencoderKL` (or a pipeline's `.vae`) on the fast path, in place.

    import sdvae_fast
    sdvae_fast.patch(pipe)        # pipe.vae.decode / encode now run the Triton kernels on CUDA
    sdvae_fast.unpatch(pipe)      # back to diffusers' own forwards, bit for bit

What patching changes: three instance attributes, nothing else.
- `vae.encoder.forward` and `vae.decoder.forward` become `sdvae_fast.fast.run_encoder` / `run_decoder` on the
  encoder's / decoder's own parameters. Everything above them is diffusers' own code, so `config`, `dtype`,
  `post_quant_conv` (still its own 1x1 conv), `enable_slicing` and `enable_tiling` (whose tiled paths call
  `self.encoder` / `self.decoder` per tile) work unchanged, and `.to()` casts apply to the shared parameters.
- `vae._encode` (when the class has one) runs `fast.encode_moments`, which folds `quant_conv` into the
  encoder's conv_out; with tiling enabled it defers to diffusers' `_encode` (whose tiles then use the fast
  encoder).
No parameter is copied (prepared weights such as the folded quant_conv are small derived tensors cached per
module and rebuilt when a parameter changes). Each patched forward falls back to the one it replaced (diffusers'
class method, or an instance override such as an accelerate hook that was there before) when the backend says
so (`sdvae_fast.fast.use_fast_path`), when any parameter's dtype or device differs from the input's (offloading
hooks, mixed-dtype modules and mismatched inputs keep diffusers' own behaviour and errors), when extra arguments
are passed (a decoder's `latent_embeds`), or when autograd is needed.

`patch` twice is idempotent (the second call only updates the backend); `unpatch` of an object that is not
patched is a no-op; both return their argument. `unpatch` restores exactly the instance attributes that were
there before `patch` (or their absence), so the module's behaviour is bit-identical to before. An override that
someone else installed *after* `patch` is left in place by `unpatch` (its wrapped call then reaches diffusers'
own forward).
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

    def previous(self, module: torch.nn.Module, name: str):
        """The callable that `module.<name>` was before patching: the replaced instance entry or the class method."""
        for owner, attr, entry in self.saved:
            if owner is module and attr == name and entry is not _MISSING:
                return entry
        return getattr(type(module), name).__get__(module, type(module))


def _find_vae(obj):
    """obj itself when it looks like an AutoencoderKL (has encoder and decoder), else obj.vae."""
    if hasattr(obj, "encoder") and hasattr(obj, "decoder"):
        return obj
    vae = getattr(obj, "vae", None)
    if vae is not None and hasattr(vae, "encoder") and hasattr(vae, "decoder"):
        return vae
    raise TypeError(
        f"patch/unpatch expects a diffusers AutoencoderKL (with .encoder and .decoder) or a pipeline holding one "
        f"as .vae, got {type(obj).__name__}"
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


def _decoder_forward(self, sample, latent_embeds=None, *args, **kwargs):
    """Patched `Decoder.forward(sample, latent_embeds=None)`: `fast.run_decoder` unless latent_embeds is given."""
    state = _state_of(self)
    if latent_embeds is not None or args or kwargs or not _runs_fast(state, (self,), sample):
        original = state.previous(self, "forward") if state is not None else type(self).forward.__get__(self)
        if latent_embeds is None:
            return original(sample, *args, **kwargs)
        return original(sample, latent_embeds, *args, **kwargs)
    return fast.run_decoder(self, sample)


def _vae_encode(self, x, *args, **kwargs):
    """Patched `AutoencoderKL._encode(x)`: `fast.encode_moments` (quant_conv folded) unless tiling is enabled."""
    state = _state_of(self)
    modules = (self.encoder, getattr(self, "quant_conv", None))
    if args or kwargs or getattr(self, "use_tiling", False) or not _runs_fast(state, modules, x):
        original = state.previous(self, "_encode") if state is not None else type(self)._encode.__get__(self)
        return original(x, *args, **kwargs)
    return fast.encode_moments(self, x)


def patch(obj, backend: str = "auto"):
    """Route a live diffusers `AutoencoderKL`'s encoder and decoder through the fast path, in place.

    Args:
        obj: a `diffusers.AutoencoderKL` (or any module with diffusers' AutoencoderKL structure), or a pipeline
            or other object holding one as `.vae`.
        backend: "auto" (kernels on CUDA tensors, diffusers' forwards elsewhere), "triton" (always the kernels;
            on CPU that needs TRITON_INTERPRET=1, else each call raises RuntimeError) or "torch" (diffusers'
            forwards; patched but inert). Read at every call, so the VAE may move between devices.
    Returns:
        obj, patched (the same object; parameters shared, nothing copied).
    Our own `sdvae_fast.AutoencoderKL` (which has the fast path built in) is not patched: `patch` only calls its
    `set_backend(backend)`.
    Raises:
        ValueError: unknown backend name.
        TypeError: obj is neither an AutoencoderKL-like module nor holds one as `.vae`.
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
    targets = [(vae.encoder, "forward", _encoder_forward), (vae.decoder, "forward", _decoder_forward)]
    if hasattr(type(vae), "_encode"):
        targets.append((vae, "_encode", _vae_encode))
    for module, name, function in targets:
        state.saved.append((module, name, module.__dict__.get(name, _MISSING)))
        # A bound method in the instance dict shadows the class method; copy.deepcopy rebinds it to the copy.
        module.__dict__[name] = types.MethodType(function, module)
    for module in {id(m): m for m, _, _ in targets}.values():
        module.__dict__[_STATE] = state
    return obj


def unpatch(obj):
    """Undo `patch(obj)`: restore the instance attributes exactly as they were; a no-op when not patched.

    Args:
        obj: what was given to `patch` (the VAE or an object holding it as `.vae`).
    Returns:
        obj.
    Raises:
        TypeError: obj is neither an AutoencoderKL-like module nor holds one as `.vae`.
    """
    vae = _find_vae(obj)
    state = _state_of(vae)
    if state is None:
        return obj
    for module, name, entry in state.saved:
        current = module.__dict__.get(name, _MISSING)
        ours = isinstance(current, types.MethodType) and current.__self__ is module and current.__func__ in (
            _encoder_forward, _decoder_forward, _vae_encode)
        if not ours:
            continue  # replaced by someone else after patch(): leave their override in place
        if entry is _MISSING:
            del module.__dict__[name]
        else:
            module.__dict__[name] = entry
    for module, _, _ in state.saved:
        module.__dict__.pop(_STATE, None)
    return obj


def is_patched(obj) -> bool:
    """Whether obj (or its `.vae`) runs the fast path when its backend allows: `patch` applied and not undone,
    or sdvae_fast's own AutoencoderKL (the fast path built in; `patch` only sets its backend)."""
    vae = _find_vae(obj)
    return callable(getattr(vae, "set_backend", None)) or _state_of(vae) is not None
