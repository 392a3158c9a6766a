"""bf16 on the kernels for the issue-14 models: FLUX.2's VAE with a small decoder of other widths, and a
VQ-f8-like VQModel (attention inside the down and up blocks).

The project's low-precision rule: the fast path in bf16 may be at most 2x as far from the fp32 reference as
diffusers' own bf16 forward is (same weights cast to bf16), plus a small floor (relative L2, tests/helpers.py).
Both models are two-level and narrow so that the interpreter (about a second per launch) stays within seconds;
their units are the ones the full-depth fp32 tests (tests/test_flux2.py, tests/test_vq.py) cover.
The VQ decode is compared with `force_not_quantize=True` on the reference's quantised latents: in bf16 a latent
near a tie of two codebook rows may legitimately pick the other row (the quantiser's bf16 indices are tested in
tests/test_vector_quantize.py), which would swamp the decoder's rounding error.
"""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import sdvae_fast  # noqa: E402
from helpers import error_report  # noqa: E402

FLOOR = 5e-3  # relative L2 added to 2x diffusers' bf16 error (parity.TOL_FLOOR for bf16)

FLUX2_TINY = dict(block_out_channels=(8, 16), decoder_block_out_channels=(12, 24), norm_num_groups=4,
                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2)
VQ_TINY = dict(block_out_channels=(16, 16), latent_channels=4, num_vq_embeddings=40, norm_num_groups=4,
               layers_per_block=1, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
               up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`model` in eval mode with every parameter moved off its initial value (norms and biases non-default)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _check_bf16(got: torch.Tensor, diffusers_bf16: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    """Assert rel_l2(got, reference) <= 2 * rel_l2(diffusers_bf16, reference) + FLOOR, printing both errors."""
    ours, theirs = error_report(got, reference), error_report(diffusers_bf16, reference)
    print(f"{name}: ours {ours}; diffusers bf16 rel_l2 {theirs['rel_l2']:.3e}")
    assert got.dtype == torch.bfloat16 and torch.isfinite(got.float()).all(), name
    assert ours["rel_l2"] <= 2 * theirs["rel_l2"] + FLOOR, (name, ours, theirs)


def test_flux2_small_decoder_in_bf16_on_the_kernels_is_within_twice_diffusers_bf16_error():
    torch.manual_seed(0)
    reference = _perturbed(diffusers.AutoencoderKLFlux2(**FLUX2_TINY), seed=1)
    ours = sdvae_fast.AutoencoderKLFlux2(**FLUX2_TINY).eval()
    ours.load_state_dict(reference.state_dict())
    ours = ours.to(torch.bfloat16)
    ours.set_backend("triton")
    low = copy.deepcopy(reference).to(torch.bfloat16)
    z = torch.randn(2, 32, 3, 5, generator=torch.Generator().manual_seed(2))  # batch 2, odd latent size
    with torch.no_grad():
        want = reference.decode(z).sample
        got = ours.decode(torch.full_like(z, float("nan"), dtype=torch.bfloat16).copy_(z)).sample
        base = low.decode(z.to(torch.bfloat16)).sample
    _check_bf16(got, base, want, "FLUX.2 small-decoder decode bf16")


def test_vq_model_with_level_attention_in_bf16_on_the_kernels_is_within_twice_diffusers_bf16_error():
    torch.manual_seed(3)
    reference = _perturbed(diffusers.VQModel(**VQ_TINY), seed=4)
    ours = sdvae_fast.VQModel(**VQ_TINY).eval()
    ours.load_state_dict(reference.state_dict())
    ours = ours.to(torch.bfloat16)
    ours.set_backend("triton")
    low = copy.deepcopy(reference).to(torch.bfloat16)
    x = torch.rand(1, 3, 12, 20, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        h = reference.encode(x).latents
        _check_bf16(ours.encode(x.to(torch.bfloat16)).latents, low.encode(x.to(torch.bfloat16)).latents, h,
                    "VQ encode bf16")
        quant = reference.quantize(h)[0]
        want = reference.decode(quant, force_not_quantize=True).sample
        got = ours.decode(quant.to(torch.bfloat16), force_not_quantize=True).sample
        base = low.decode(quant.to(torch.bfloat16), force_not_quantize=True).sample
    _check_bf16(got, base, want, "VQ decode bf16")
