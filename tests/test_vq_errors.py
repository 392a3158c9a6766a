"""`sdvae_fast.VQModel`'s configuration and loading errors: each names the argument at fault (and what would work)
instead of diffusers' IndexError, a bare TypeError or torch's GroupNorm message. Backend "torch", tiny models,
no forward passes except the decode input check."""
import pytest
import torch

pytest.importorskip("diffusers")

from test_vq import VQ_F8_LIKE, _to_ldm_names  # noqa: E402

from sdvae_fast import VQModel  # noqa: E402
from sdvae_fast.loading import CheckpointError  # noqa: E402

TINY = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, num_vq_embeddings=16, norm_num_groups=4)


def test_widths_and_block_types_of_different_lengths_name_both():
    with pytest.raises(ValueError, match=r"block_out_channels has 3 entries \[8, 16, 16\] but down_block_types has "
                                         r"4 .*expected 4 widths"):
        VQModel.from_preset("vq-f8", block_out_channels=(8, 16, 16))
    with pytest.raises(ValueError, match=r"up_block_types has 1"):
        VQModel(**dict(TINY, up_block_types=("UpDecoderBlock2D",)))


def test_unknown_field_lists_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown config field\(s\) \['bogus'\]; valid fields: .*'vq_embed_dim'"):
        VQModel(**TINY, bogus=1)
    with pytest.raises(TypeError, match=r"unknown config field\(s\) \['bogus'\]"):
        VQModel.from_preset("vq-f4", bogus=1)


@pytest.mark.parametrize("field, value", [
    ("latent_channels", 0), ("vq_embed_dim", 0), ("num_vq_embeddings", 0), ("layers_per_block", 0),
    ("in_channels", -1), ("out_channels", 0), ("block_out_channels", (8, 0)), ("norm_num_groups", 0),
])
def test_non_positive_sizes_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VQModel(**dict(TINY, **{field: value}))


def test_group_count_that_does_not_divide_the_widths_names_norm_num_groups_and_the_counts_that_work():
    with pytest.raises(ValueError, match=r"norm_num_groups=32 does not divide every block_out_channels entry "
                                         r"\[8, 16\].*one of \[1, 2, 4, 8\]"):
        VQModel(**dict(TINY, block_out_channels=(8, 16), norm_num_groups=32))
    with pytest.raises(ValueError, match=r"norm_type='spatial'.*multiple of 32, got \[16, 16\]"):
        VQModel(**dict(TINY, block_out_channels=(16, 16), norm_type="spatial"))
    with pytest.raises(ValueError, match=r"norm_type must be 'group' or 'spatial'"):
        VQModel(**dict(TINY, norm_type="layer"))


def test_from_preset_takes_dtype_and_device_keyword_only():
    model = VQModel.from_preset("vq-f4", dtype=torch.float64, device="cpu", **{k: v for k, v in TINY.items()})
    assert next(model.parameters()).dtype == torch.float64 and not model.training
    assert "dtype" in VQModel.from_preset.__doc__ and "overrides" in VQModel.from_preset.__doc__


def test_decode_names_the_channel_count_for_a_4d_tensor_with_wrong_channels():
    model = VQModel(**TINY)
    model.set_backend("torch")
    with pytest.raises(ValueError, match=r"h must have 4 channels \(the codebook width vq_embed_dim\).*got shape "
                                         r"\(1, 3, 4, 4\)"):
        model.decode(torch.randn(1, 3, 4, 4))


@pytest.fixture(scope="module")
def vq_state():
    torch.manual_seed(0)
    return VQModel(**VQ_F8_LIKE).state_dict()


def test_single_file_without_norm_num_groups_says_32_was_assumed(vq_state, tmp_path):
    path = tmp_path / "vq.ckpt"
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in _to_ldm_names(vq_state, 4).items()}}, path)
    with pytest.raises(CheckpointError, match=r"norm_num_groups=32 \(assumed: the file cannot tell\) does not "
                                              r"divide the widths \[8, 8, 16, 16\]\. Pass norm_num_groups=N "
                                              r"\(one of \[1, 2, 4, 8\]\)"):
        VQModel.from_single_file(path)
    with pytest.raises(CheckpointError, match=r"norm_num_groups=3 does not divide"):
        VQModel.from_single_file(path, norm_num_groups=3)
    with pytest.raises(TypeError, match=r"unknown config field\(s\) \['bogus'\]"):
        VQModel.from_single_file(path, bogus=1)


def test_single_file_in_diffusers_names_is_refused_naming_from_pretrained(vq_state, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in vq_state.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"diffusers' names.*VQModel\.from_pretrained"):
        VQModel.from_single_file(path, norm_num_groups=4)


def test_codebook_narrower_than_the_quant_convs_is_named_with_expected_and_actual_shapes(vq_state, tmp_path):
    ldm = _to_ldm_names(vq_state, 4)
    ldm["quantize.embedding.weight"] = torch.randn(80, 3)  # the quant convs are 4 wide
    path = tmp_path / "vq.ckpt"
    torch.save(ldm, path)
    with pytest.raises(CheckpointError, match=r"codebook quantize\.embedding\.weight \(K, D\) = \(80, 3\).*"
                                              r"quant_conv\.weight \(4, 4, 1, 1\) \(expected \(3, 4, 1, 1\)\).*"
                                              r"post_quant_conv\.weight \(4, 4, 1, 1\) \(expected \(4, 3, 1, 1\)\)"):
        VQModel.from_single_file(path, norm_num_groups=4)


def test_weights_that_do_not_fit_a_given_config_show_file_and_model_shapes(vq_state, tmp_path):
    path = tmp_path / "vq.ckpt"
    torch.save(_to_ldm_names(vq_state, 4), path)
    config = dict(VQ_F8_LIKE, num_vq_embeddings=64)
    with pytest.raises(CheckpointError, match=r"quantize\.embedding\.weight: file \(80, 4\), model \(64, 4\)"):
        VQModel.from_single_file(path, config=config)
