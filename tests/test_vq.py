"""`sdvae_fast.VQModel` against diffusers' own VQModel with identical, seeded and perturbed weights.

Two narrow full-depth models (four levels, layers_per_block=1, small images):
- VQ-f8-like: attention inside the last down block and the first up block (`AttnDownEncoderBlock2D` /
  `AttnUpDecoderBlock2D`, head dim = that level's width, 16: the flash kernel), GroupNorm with 4 groups;
- MoVQ-like: `norm_type="spatial"` (SpatialNorm: 32 groups whatever `norm_num_groups` says, so widths are
  multiples of 32), `lookup_from_codebook=True`.
Backend "triton" runs the kernels under the interpreter; backend "torch" must be diffusers' bit for bit.
Batch 1 through the full-depth models (the interpreter costs ~2.5x per extra image); batch 2 runs through the
patched MoVQ decode (quantiser kernel, conv_in, upsamplers) and the quantiser tests (tests/test_vector_quantize.py).
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from helpers import assert_close  # noqa: E402
from sdvae_fast import VQModel  # noqa: E402
from sdvae_fast.fast import iter_units  # noqa: E402

FOUR_LEVELS = dict(down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
                   up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3, layers_per_block=1)
VQ_F8_LIKE = dict(FOUR_LEVELS, block_out_channels=(8, 8, 16, 16), latent_channels=4, num_vq_embeddings=80,
                  norm_num_groups=4)
MOVQ_LIKE = dict(FOUR_LEVELS, block_out_channels=(32, 32, 32, 32), latent_channels=4, vq_embed_dim=4,
                 num_vq_embeddings=72, norm_num_groups=8, norm_type="spatial", lookup_from_codebook=True)


def _pair(config: dict, seed: int):
    """(diffusers' VQModel, ours) in eval mode with the same perturbed weights (norms and biases non-default)."""
    torch.manual_seed(seed)
    reference = diffusers.VQModel(**config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = VQModel(**config).eval()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _check_torch_backend_is_diffusers(reference, ours, x):
    ours.set_backend("torch")
    with torch.no_grad():
        assert torch.equal(ours.encode(x).latents, reference.encode(x).latents)
        got, want = ours(x), reference(x)
    assert torch.equal(got.sample, want.sample) and torch.equal(got.commit_loss, want.commit_loss)


def test_vq_f8_like_encode_quantise_decode_match_diffusers():
    reference, ours = _pair(VQ_F8_LIKE, seed=0)
    kinds = {u.name: u.kind for u in iter_units(ours)}
    assert kinds["encoder.down_blocks.3.attentions.0"] == "Attention"  # on the fused attention unit
    assert kinds["decoder.up_blocks.0.attentions.1"] == "Attention"
    x = torch.randn(1, 3, 8, 16)
    _check_torch_backend_is_diffusers(reference, ours, x)
    ours.set_backend("triton")
    with torch.no_grad():
        h_ref = reference.encode(x).latents
        h = ours.encode(x).latents
        assert_close(h, h_ref, rel_l2=1e-4, name="encode (triton)")
        quant_ref, loss_ref, (_, _, idx_ref) = reference.quantize(h_ref)
        quant, loss, idx = ours.quantize_latents(h_ref)
        assert torch.equal(idx, idx_ref) and torch.equal(quant, quant_ref) and torch.equal(loss, loss_ref)
        out_ref = reference.decode(h_ref)
        out = ours.decode(torch.full_like(h_ref, float("nan")).copy_(h_ref))
    assert_close(out.sample, out_ref.sample, rel_l2=1e-4, name="decode (triton)")
    assert torch.equal(out.commit_loss, out_ref.commit_loss)


def test_movq_like_spatial_norm_encode_quantise_decode_and_codebook_lookup_match_diffusers():
    reference, ours = _pair(MOVQ_LIKE, seed=1)
    reasons = dict((u.name, u.reason) for u in iter_units(ours))
    assert reasons["decoder.up_blocks.0.attentions.0"] == "spatial_norm is set"  # documented per-unit fallback
    x = torch.randn(1, 3, 8, 16)
    _check_torch_backend_is_diffusers(reference, ours, x)
    ours.set_backend("triton")
    with torch.no_grad():
        h_ref = reference.encode(x).latents
        assert_close(ours.encode(x).latents, h_ref, rel_l2=1e-4, name="encode (triton)")
        out_ref = reference.decode(h_ref)
        out = ours.decode(h_ref)
        assert_close(out.sample, out_ref.sample, rel_l2=1e-4, name="decode (triton)")
        assert torch.equal(out.commit_loss, out_ref.commit_loss)
        # the lookup_from_codebook path: indices (N*h*w,) and shape (N, h, w, D)
        _, _, (_, _, idx) = reference.quantize(h_ref)
        shape = (h_ref.shape[0], h_ref.shape[2], h_ref.shape[3], h_ref.shape[1])
        looked = ours.decode(idx, force_not_quantize=True, shape=shape)
        looked_ref = reference.decode(idx, force_not_quantize=True, shape=shape)
    assert_close(looked.sample, looked_ref.sample, rel_l2=1e-4, name="decode from indices (triton)")
    assert torch.equal(looked.commit_loss, looked_ref.commit_loss)


def test_bad_inputs_get_clear_errors():
    _, ours = _pair(dict(VQ_F8_LIKE, lookup_from_codebook=True), seed=2)
    ours.set_backend("triton")
    with pytest.raises(ValueError, match=r"h must be 4-D \(N, 4, H, W\)"):
        ours.decode(torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match=r"h must have 4 channels \(the codebook width vq_embed_dim\).*got shape "
                                         r"\(1, 3, 2, 2\)"):
        ours.decode(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"x must have 3 channels \(in_channels\): \(N, 3, H, W\)"):
        ours.encode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"codebook indices must lie in \[0, 80\)"):
        ours.decode(torch.tensor([0, 80]), force_not_quantize=True, shape=(1, 1, 2, 4))
    with pytest.raises(ValueError, match=r"shape must be \(batch, height, width, 4\)"):
        ours.decode(torch.tensor([0, 1]), force_not_quantize=True, shape=(1, 1, 2, 3))
    with torch.no_grad():
        ours.quantize.embedding.weight = torch.nn.Parameter(torch.randn(80, 3))
    with pytest.raises(ValueError, match=r"quantize.embedding.weight must be \(num_vq_embeddings, 4\)"):
        ours.quantize_latents(torch.randn(1, 4, 2, 2))


_TO_LDM_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _to_ldm_names(state: dict, levels: int) -> dict:
    """diffusers VQModel names -> latent-diffusion's (the file layout `from_single_file` reads), written here
    independently of the loader: attention projections become 1x1 convs, decoder levels count from the bottom."""
    import re

    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        new = new.replace("mid_block.attentions.0", "mid.attn_1")
        new = re.sub(r"encoder\.down_blocks\.(\d+)", r"encoder.down.\1", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)", lambda m: f"decoder.up.{levels - 1 - int(m[1])}", new)
        new = re.sub(r"\.resnets\.(\d+)", r".block.\1", new)
        new = new.replace("downsamplers.0.conv", "downsample.conv").replace("upsamplers.0.conv", "upsample.conv")
        for part, ldm in _TO_LDM_ATTENTION.items():
            new = re.sub(rf"(attentions\.\d+|attn_1)\.{re.escape(part)}\.", lambda m: f"{m[1]}.{ldm}.", new)
        new = re.sub(r"\.attentions\.(\d+)\.", r".attn.\1.", new)
        if re.search(r"(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", new):
            value = value[:, :, None, None]
        out[new] = value
    return out


def test_latent_diffusion_single_file_loads_with_inferred_config(tmp_path):
    reference, _ = _pair(dict(VQ_F8_LIKE, mid_block_add_attention=True), seed=3)
    ldm = {f"first_stage_model.{k}": v for k, v in _to_ldm_names(reference.state_dict(), 4).items()}
    assert "first_stage_model.quantize.embedding.weight" in ldm
    assert "first_stage_model.decoder.up.3.attn.1.q.weight" in ldm  # diffusers' up_blocks.0, a 1x1 conv
    ldm["cond_stage_model.unrelated"] = torch.zeros(2)
    path = tmp_path / "vq-f8.ckpt"
    torch.save({"state_dict": ldm}, path)
    loaded = VQModel.from_single_file(path, norm_num_groups=4)
    for field in ("block_out_channels", "down_block_types", "up_block_types"):
        assert tuple(loaded.config[field]) == tuple(reference.config[field]), field
    for field in ("layers_per_block", "num_vq_embeddings", "latent_channels", "mid_block_add_attention"):
        assert loaded.config[field] == reference.config[field], field
    assert loaded.quantize.vq_embed_dim == reference.quantize.vq_embed_dim
    want = reference.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    del ldm["first_stage_model.quantize.embedding.weight"]
    torch.save(ldm, tmp_path / "kl.ckpt")
    with pytest.raises(ValueError, match="no codebook"):
        VQModel.from_single_file(tmp_path / "kl.ckpt")


def test_patch_runs_a_live_diffusers_movq_on_the_kernels_and_unpatch_restores_it():
    import sdvae_fast

    reference, _ = _pair(MOVQ_LIKE, seed=4)
    live, _ = _pair(MOVQ_LIKE, seed=4)
    h = torch.randn(2, 4, 1, 2)
    with torch.no_grad():
        want = reference.decode(h)
        sdvae_fast.patch(live, backend="triton")
        assert sdvae_fast.is_patched(live) and "forward" in live.quantize.__dict__
        got = live.decode(h)
        sdvae_fast.unpatch(live)
        assert "forward" not in live.quantize.__dict__ and "forward" not in live.decoder.__dict__
        again = live.decode(h)
    assert_close(got.sample, want.sample, rel_l2=1e-4, name="patched MoVQ decode (triton)")
    assert torch.equal(got.commit_loss, want.commit_loss)
    assert torch.equal(again.sample, want.sample)


def test_quantiser_equals_diffusers_vector_quantizer_on_integer_inputs_with_ties():
    """diffusers' own VectorQuantizer (cdist in fp32, exact on small integers) against the kernel: indices, values
    and commit loss equal, the lowest index winning every constructed tie; also with sane_index_shape."""
    from diffusers.models.autoencoders.vae import VectorQuantizer

    from sdvae_fast.vq import quantize_like_diffusers

    gen = torch.Generator().manual_seed(5)
    quantizer = VectorQuantizer(130, 3, beta=0.25)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.randint(-2, 3, (130, 3), generator=gen).float())
        quantizer.embedding.weight[129] = quantizer.embedding.weight[7]
        quantizer.embedding.weight[64] = quantizer.embedding.weight[7]
    z = torch.randint(-2, 3, (2, 3, 5, 13), generator=gen).float()
    with torch.no_grad():
        want_q, want_loss, (_, _, want_idx) = quantizer(z)
        got_q, got_loss, got_idx = quantize_like_diffusers(quantizer, z)
        assert torch.equal(got_idx, want_idx) and torch.equal(got_q, want_q) and torch.equal(got_loss, want_loss)
        assert not ((got_idx == 64) | (got_idx == 129)).any()
        quantizer.sane_index_shape = True
        assert torch.equal(quantize_like_diffusers(quantizer, z)[2], quantizer(z)[2][2])
