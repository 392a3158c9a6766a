"""Loading and saving (issue 2 item 4; field cases C11 and C12).

One small full-depth VAE (four levels, widths 32/32/64/64, two resnets per encoder level, the mid attention) with
seeded, perturbed weights is written in every layout found in the wild; each must load to bitwise-identical
parameters and decode outputs. The test-side LDM writer is checked against diffusers' own `from_single_file`, so
the loader's LDM mapping is not only checked against its own inverse.
"""
import argparse
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from safetensors.torch import save_file

from sdvae_fast import loading
from sdvae_fast.configs import CONFIG_FIELDS, PRESETS
from sdvae_fast.loading import (AmbiguousFamilyWarning, AssumedNormGroupsWarning, CheckpointError,
                                inspect_checkpoint, load_pretrained, load_single_file, safetensors_metadata,
                                save_pretrained)
from sdvae_fast.model import AutoencoderKL
from tests.helpers import assert_close

SMALL = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, latent_channels=4, norm_num_groups=32,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
# A 16-channel VAE without quant convs, as SD3 and FLUX.1 have (two levels keep it quick).
SMALL_16 = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=16, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                use_quant_conv=False, use_post_quant_conv=False)

# Fake tensors of the other components of whole-model checkpoints (names as the real files use them).
UNET_KEYS = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3), "model.diffusion_model.out.2.bias": (4,)}
SD1_TEXT_KEYS = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (10, 8)}
SDXL_TEXT_KEYS = {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (10, 8),
                  "conditioner.embedders.1.model.token_embedding.weight": (10, 8)}
SD3_KEYS = {"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (24, 8),
            "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": (10, 8)}
FLUX_KEYS = {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (24, 8)}


def seeded_vae(config: dict, seed: int = 0) -> AutoencoderKL:
    """Our AutoencoderKL with default init plus seeded noise on every parameter (GroupNorm weights differ from 1,
    so swapped norm layers would show)."""
    torch.manual_seed(seed)
    model = AutoencoderKL(**config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            # About a third of the default init's bound 1/sqrt(fan_in) for weights; 0.1 for biases and norms.
            scale = 0.3 / p[0].numel() ** 0.5 if p.dim() > 1 else 0.1
            p.add_(torch.randn(p.shape, generator=g), alpha=scale)
    return model.eval()


def to_ldm(state: dict, num_levels: int) -> dict:
    """diffusers names -> original LDM names, attention projections as 1x1 convs (written independently of the
    loader, and checked against diffusers' from_single_file below)."""
    out = {}
    for key, value in state.items():
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", new)
        new = new.replace(".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm.")
        for diffusers_name, ldm_name in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if f".mid_block.attentions.0.{diffusers_name}." in new:
                new = new.replace(f".mid_block.attentions.0.{diffusers_name}.", f".mid.attn_1.{ldm_name}.")
                if value.dim() == 2:
                    value = value[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) conv
        out[new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")] = value.clone()
    return out


def to_old_attention(state: dict) -> dict:
    """diffusers names -> diffusers < 0.14 attention names (query/key/value/proj_attn)."""
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    return {re.sub(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".attentions.0.{names[m[1]]}.", k):
            v.clone() for k, v in state.items()}


def fake(keys: dict) -> dict:
    return {k: torch.randn(shape) for k, shape in keys.items()}


def with_prefix(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def ldm_state(model) -> dict:
    return to_ldm(model.state_dict(), len(model.config.block_out_channels))


def assert_same_parameters(loaded, source, dtype=None) -> None:
    """Bitwise-equal state dicts; with `dtype`, the source's values rounded to it (the loaded model may differ)."""
    expected, actual = source.state_dict(), loaded.state_dict()
    assert actual.keys() == expected.keys()
    expected = {k: v.to(dtype) for k, v in expected.items()} if dtype else expected
    differing = [k for k in expected if not torch.equal(actual[k].to(expected[k].dtype), expected[k])]
    assert not differing, f"parameters differ: {differing[:5]}"


def load_quietly(path, cls=AutoencoderKL, **kwargs):
    """load_single_file with the family-guess warning of VAE-only files silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AmbiguousFamilyWarning)
        return load_single_file(cls, path, **kwargs)


@pytest.fixture(scope="module")
def source():
    return seeded_vae(SMALL)


@pytest.fixture(scope="module")
def latents():
    # Batch 2, non-square, non-zero mean.
    return torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(3)) + 0.3


@pytest.fixture(scope="module")
def expected_decode(source, latents):
    with torch.no_grad():
        return source.decode(latents).sample


@pytest.fixture(scope="module")
def layouts(source, tmp_path_factory):
    """The six C12 layouts of `source`: {layout name: path}."""
    root = tmp_path_factory.mktemp("layouts")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    paths = {"diffusers-folder": save_pretrained(source, root / "folder")}

    paths["diffusers-single-file"] = root / "vae.safetensors"
    save_file(state, paths["diffusers-single-file"])

    paths["ldm"] = root / "vae_ldm.safetensors"
    save_file(ldm_state(source), paths["ldm"])

    paths["first-stage-prefix"] = root / "sd15_whole_model.safetensors"
    save_file({**with_prefix(ldm_state(source), "first_stage_model."), **fake(UNET_KEYS), **fake(SD1_TEXT_KEYS)},
              paths["first-stage-prefix"])

    # An LDM training checkpoint: EMA bookkeeping and flattened EMA copies (LitEma drops the dots), loss weights.
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000),
           "model_ema.encoderconv_inweight": torch.randn(32, 3, 3, 3)}
    loss = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)}
    paths["ckpt-state-dict-ema"] = root / "vae_training.ckpt"
    torch.save({"state_dict": {**ldm_state(source), **ema, **loss}, "global_step": 1000, "epoch": 3},
               paths["ckpt-state-dict-ema"])

    paths["old-attention-names"] = root / "vae_old_attention.safetensors"
    save_file(to_old_attention(state), paths["old-attention-names"])
    return paths


EXPECTED_LAYOUT = {"diffusers-folder": "diffusers", "diffusers-single-file": "diffusers", "ldm": "ldm",
                   "first-stage-prefix": "ldm", "ckpt-state-dict-ema": "ldm",
                   "old-attention-names": "diffusers-old-attention"}


@pytest.mark.parametrize("layout", list(EXPECTED_LAYOUT))
def test_every_c12_layout_loads_identical_parameters_and_decode(layout, layouts, source, latents, expected_decode):
    path = layouts[layout]
    # The architecture comes from the weight shapes alone (no config given); unrelated keys (UNet, text encoder,
    # EMA, loss) are ignored.
    model = load_pretrained(AutoencoderKL, path) if layout == "diffusers-folder" else load_quietly(path)
    assert isinstance(model, AutoencoderKL)
    assert_same_parameters(model, source)
    assert list(dict(model.config)["block_out_channels"]) == list(source.config.block_out_channels)
    with torch.no_grad():  # bitwise: same weights, same code
        assert_close(model.decode(latents).sample, expected_decode, rel_l2=0.0, name=layout)
    # `sdvae-fast info` reports what was detected; the parameter count covers the VAE only.
    info = inspect_checkpoint(path)
    assert info["layout"] == EXPECTED_LAYOUT[layout]
    assert info["parameter_count"] == sum(p.numel() for p in source.parameters())
    assert info["dtypes"] == ["float32"]


@pytest.mark.parametrize("preset", ["sd15", "sdxl", "sd3", "flux1", "diffusers_test"])
def test_architecture_of_every_preset_is_inferred_from_ldm_weight_shapes(preset):
    # Full-size shapes without memory: diffusers' model built on the meta device, renamed to LDM names.
    config = PRESETS[preset]
    with torch.device("meta"):
        model = DiffusersAutoencoderKL(**config)
    ldm = to_ldm(model.state_dict(), len(config["block_out_channels"]))
    state, unmapped = loading._to_diffusers_names(ldm, loading._detect_layout(list(ldm), Path(preset)))
    assert not unmapped and state.keys() == model.state_dict().keys()
    inferred = loading.infer_architecture({k: v.shape for k, v in state.items()})
    assert inferred == {k: config[k] for k in loading.ARCHITECTURE_FIELDS}


def test_test_ldm_writer_agrees_with_diffusers_from_single_file(layouts, source):
    """diffusers' own converter reads our LDM files to the source weights, so `to_ldm` writes real LDM names."""
    for layout in ("ldm", "first-stage-prefix"):
        oracle = DiffusersAutoencoderKL.from_single_file(str(layouts[layout]), config=str(layouts["diffusers-folder"]),
                                                         local_files_only=True)
        assert_same_parameters(oracle, source)


def test_diffusers_class_can_be_built_by_the_loader(layouts, source):
    model = load_quietly(layouts["ldm"], cls=DiffusersAutoencoderKL)
    assert isinstance(model, DiffusersAutoencoderKL)
    assert_same_parameters(model, source)


def test_save_pretrained_is_read_by_diffusers_and_diffusers_folders_are_read_back(source, latents, expected_decode,
                                                                                  tmp_path):
    # ours -> diffusers: config.json carries diffusers' bookkeeping fields and every config field.
    folder = save_pretrained(source, tmp_path / "ours")
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["_diffusers_version"]
    assert set(CONFIG_FIELDS) <= set(config)
    theirs = DiffusersAutoencoderKL.from_pretrained(folder)
    assert_same_parameters(theirs, source)
    with torch.no_grad():  # a different implementation of the same function: close, not bitwise
        assert_close(theirs.decode(latents).sample, expected_decode, rel_l2=1e-5, name="diffusers")

    # diffusers -> ours, both weight formats it writes (safetensors and the .bin pickle).
    for safe in (True, False):
        out = tmp_path / f"theirs_{safe}"
        theirs.save_pretrained(out, safe_serialization=safe)
        model = load_pretrained(AutoencoderKL, out)
        assert_same_parameters(model, source)
        assert model.config.scaling_factor == source.config.scaling_factor


def test_save_pretrained_takes_diffusers_variant_and_pickle_options(source, tmp_path):
    folder = save_pretrained(source, tmp_path / "variant", safe_serialization=False, variant="fp16")
    assert (folder / "diffusion_pytorch_model.fp16.bin").is_file()
    assert_same_parameters(DiffusersAutoencoderKL.from_pretrained(folder, variant="fp16"), source)
    assert_same_parameters(load_pretrained(AutoencoderKL, folder, variant="fp16"), source)
    with pytest.raises(OSError, match="pass variant="):  # diffusers' error type for a variant-only folder
        load_pretrained(AutoencoderKL, folder)


def test_subfolder_vae_torch_dtype_and_overrides(source, tmp_path):
    save_pretrained(source, tmp_path / "pipeline" / "vae")
    model = load_pretrained(AutoencoderKL, tmp_path / "pipeline", subfolder="vae", torch_dtype=torch.float16,
                            scaling_factor=0.5)
    assert model.dtype == torch.float16 and all(p.dtype == torch.float16 for p in model.parameters())
    assert model.config.scaling_factor == 0.5  # the override wins over config.json's 0.18215
    assert_same_parameters(model, source, dtype=torch.float16)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_pretrained(AutoencoderKL, tmp_path / "pipeline" / "unet")
    # A pipeline folder without subfolder= is pointed at it.
    with pytest.raises(CheckpointError, match="subfolder='vae'"):
        load_pretrained(AutoencoderKL, tmp_path / "pipeline")
    with pytest.raises(TypeError, match="scaling_factr"):
        load_pretrained(AutoencoderKL, tmp_path / "pipeline", subfolder="vae", scaling_factr=0.5)


def test_c11_sdxl_whole_model_gets_013025_sd1_gets_018215(source, tmp_path):
    # Whole-model files as released: the VAE in fp16 under first_stage_model., beside the UNet and text encoders.
    sdxl = tmp_path / "sdxl_whole.safetensors"
    vae_fp16 = {k: v.half() for k, v in with_prefix(ldm_state(source), "first_stage_model.").items()}
    save_file({**vae_fp16, **fake(UNET_KEYS), **fake(SDXL_TEXT_KEYS)}, sdxl)
    sd1 = tmp_path / "sd1_whole.safetensors"
    save_file({**with_prefix(ldm_state(source), "first_stage_model."), **fake(UNET_KEYS), **fake(SD1_TEXT_KEYS)},
              sd1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmbiguousFamilyWarning)  # whole-model files are never guessed
        model_xl = load_single_file(AutoencoderKL, sdxl)
        model_1 = load_single_file(AutoencoderKL, sd1)
    assert model_xl.config.scaling_factor == 0.13025
    assert model_1.config.scaling_factor == 0.18215
    assert model_xl.dtype == torch.float32  # fp16 file, fp32 model unless torch_dtype says otherwise
    assert_same_parameters(model_xl, source, dtype=torch.float16)
    info = inspect_checkpoint(sdxl)
    assert (info["family"], info["prefix"], info["dtypes"]) == ("sdxl", "first_stage_model.", ["float16"])
    assert info["family_certain"] and info["ignored_keys"] == len(UNET_KEYS) + len(SDXL_TEXT_KEYS)


def test_playground_whole_model_gets_its_latent_statistics_and_scaling_factor_05(source, tmp_path):
    # Playground v2.5 (SDXL architecture) stores per-channel latent statistics beside the weights.
    mean, std = torch.randn(1, 4, 1, 1) + 0.5, torch.rand(1, 4, 1, 1) + 0.5
    path = tmp_path / "playground.safetensors"
    save_file({**with_prefix(ldm_state(source), "first_stage_model."), **fake(SDXL_TEXT_KEYS), "edm_mean": mean,
               "edm_std": std}, path)
    model = load_single_file(AutoencoderKL, path)
    assert model.config.scaling_factor == 0.5
    assert model.config.latents_mean == tuple(mean.flatten().tolist())
    assert model.config.latents_std == tuple(std.flatten().tolist())


def test_c11_explicit_scaling_factor_or_config_wins_and_survives_save_and_reload(source, tmp_path):
    sdxl = tmp_path / "sdxl_whole.safetensors"
    save_file({**with_prefix(ldm_state(source), "first_stage_model."), **fake(SDXL_TEXT_KEYS)}, sdxl)
    assert load_single_file(AutoencoderKL, sdxl, scaling_factor=0.2).config.scaling_factor == 0.2
    assert load_single_file(AutoencoderKL, sdxl, config={"scaling_factor": 0.3}).config.scaling_factor == 0.3
    # Detected and explicit values alike are written to config.json and read back, by us and by diffusers.
    for name, model, expected in (("detected", load_single_file(AutoencoderKL, sdxl), 0.13025),
                                  ("explicit", load_single_file(AutoencoderKL, sdxl, scaling_factor=0.2), 0.2)):
        save_pretrained(model, tmp_path / name)
        assert load_pretrained(AutoencoderKL, tmp_path / name).config.scaling_factor == expected
        assert DiffusersAutoencoderKL.from_pretrained(tmp_path / name).config.scaling_factor == expected


def test_vae_only_4_channel_file_warns_and_names_the_sdxl_override(layouts):
    with pytest.warns(AmbiguousFamilyWarning, match=r"config='sdxl' \(or scaling_factor=0.13025\)") as record:
        model = load_single_file(AutoencoderKL, layouts["diffusers-single-file"])
    assert str(layouts["diffusers-single-file"]) in str(record[0].message)
    assert model.config.scaling_factor == 0.18215
    # Either way of naming the family silences the warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmbiguousFamilyWarning)
        assert load_single_file(AutoencoderKL, layouts["ldm"], config="sdxl", block_out_channels=(32, 32, 64, 64),
                                sample_size=64).config.scaling_factor == 0.13025
        assert load_single_file(AutoencoderKL, layouts["ldm"], scaling_factor=0.13025).config.scaling_factor == 0.13025
    assert inspect_checkpoint(layouts["ldm"])["family_certain"] is False


def test_16_channel_vae_only_takes_flux1_and_warns_whole_models_decide(tmp_path):
    # SD3 and FLUX.1 VAEs have identical shapes: a VAE-only file gets FLUX.1 (the commoner) and a warning.
    vae = seeded_vae(SMALL_16, seed=5)
    vae_only = tmp_path / "ae.safetensors"
    save_file(to_ldm(vae.state_dict(), 2), vae_only)
    with pytest.warns(AmbiguousFamilyWarning, match=r"config='sd3' \(or scaling_factor=1.5305, shift_factor=0.0609\)"):
        model = load_single_file(AutoencoderKL, vae_only)
    assert (model.config.scaling_factor, model.config.shift_factor) == (0.3611, 0.1159)
    assert model.config.use_quant_conv is False and model.config.use_post_quant_conv is False
    assert model.config.latent_channels == 16
    assert_same_parameters(model, vae)

    # Whole-model files name their family through the other components' keys.
    sd3 = tmp_path / "sd3_whole.safetensors"
    save_file({**with_prefix(to_ldm(vae.state_dict(), 2), "first_stage_model."), **fake(SD3_KEYS)}, sd3)
    flux = tmp_path / "flux_whole.safetensors"
    save_file({**with_prefix(vae.state_dict(), "vae."), **fake(FLUX_KEYS)}, flux)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmbiguousFamilyWarning)
        model_sd3 = load_single_file(AutoencoderKL, sd3)
        model_flux = load_single_file(AutoencoderKL, flux)
        # An explicit SD3 scaling factor selects the SD3 family, hence its shift factor too.
        model_sf = load_single_file(AutoencoderKL, vae_only, scaling_factor=1.5305)
    assert (model_sd3.config.scaling_factor, model_sd3.config.shift_factor) == (1.5305, 0.0609)
    assert (model_flux.config.scaling_factor, model_flux.config.shift_factor) == (0.3611, 0.1159)
    assert model_sf.config.shift_factor == 0.0609
    assert_same_parameters(model_flux, vae)


def test_missing_and_misshaped_keys_are_listed_in_one_error_naming_the_file(source, tmp_path):
    # Two keys deleted and one replaced by a wrong shape, in LDM names: the error lists all three, in the
    # diffusers names the model uses.
    state = ldm_state(source)
    del state["decoder.up.0.block.2.conv2.weight"], state["encoder.mid.attn_1.q.bias"]
    state["decoder.mid.block_1.conv1.weight"] = torch.randn(64, 64, 1, 1)
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_quietly(path)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError) and not isinstance(excinfo.value, KeyError)
    assert str(path) in message
    assert "2 missing key(s)" in message and "1 mis-shaped key(s)" in message
    assert "decoder.up_blocks.3.resnets.2.conv2.weight" in message  # LDM up.0 is diffusers' last level
    assert "encoder.mid_block.attentions.0.to_q.bias" in message
    assert "decoder.mid_block.resnets.0.conv1.weight: file (64, 64, 1, 1), model (64, 64, 3, 3)" in message


@pytest.mark.parametrize("extra, loader", [("bn.running_mean", "AutoencoderKLFlux2.from_single_file"),
                                           ("quantize.embedding.weight", "VQModel.from_single_file")])
def test_flux2_and_vq_single_files_are_refused_naming_their_loader(extra, loader, source, tmp_path):
    # Loading only the AutoencoderKL part of such a file would silently drop FLUX.2's BatchNorm or the codebook.
    state = with_prefix({**ldm_state(source), extra: torch.zeros(8)}, "vae.")
    path = tmp_path / "other.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=re.escape(f"vae.{extra}")) as excinfo:
        load_quietly(path)
    assert f"sdvae_fast.{loader}" in str(excinfo.value) and str(path) in str(excinfo.value)


def test_config_that_contradicts_the_weights_says_what_the_weights_imply(layouts):
    with pytest.raises(CheckpointError) as excinfo:
        load_single_file(AutoencoderKL, layouts["ldm"], config="sd15")
    message = str(excinfo.value)
    assert "block_out_channels=(32, 32, 64, 64) (config has (128, 256, 512, 512))" in message
    assert "down_block_types=" not in message and "layers_per_block=2 (config" not in message  # only differences
    assert "... and " in message and len(message.splitlines()) < 100  # a long list is cut, with a count


def test_folder_and_file_entry_points_delegate_to_each_other(layouts, source):
    assert_same_parameters(load_single_file(AutoencoderKL, layouts["diffusers-folder"]), source)
    assert_same_parameters(load_pretrained(AutoencoderKL, layouts["ldm"], scaling_factor=0.13025), source)


def test_truncated_corrupt_and_empty_files_get_an_error_naming_the_file(layouts, tmp_path):
    # Half of a safetensors file (header intact, data cut), half of a zip-format .ckpt, random bytes, nothing.
    cases = {}
    for name, source_path in (("truncated.safetensors", layouts["ldm"]), ("truncated.ckpt",
                                                                         layouts["ckpt-state-dict-ema"])):
        data = source_path.read_bytes()
        cases[name] = data[: len(data) // 2]
    cases["random.ckpt"] = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                         dtype=torch.uint8).numpy().tobytes()
    cases["empty.safetensors"] = b""
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as excinfo:
            load_quietly(path)
        assert str(path) in str(excinfo.value), name
    folder = tmp_path / "bad_config"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(AutoencoderKL, folder)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_single_file(AutoencoderKL, tmp_path / "nothing.safetensors")
    no_vae = tmp_path / "unet_only.safetensors"
    save_file(fake(UNET_KEYS), no_vae)
    with pytest.raises(CheckpointError, match="no VAE weights found"):
        load_single_file(AutoencoderKL, no_vae)


def test_pickle_needing_python_objects_is_refused_unless_unsafe_pickle(source, tmp_path):
    # Lightning checkpoints often carry hyper-parameters as an argparse.Namespace: not a plain container.
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": ldm_state(source), "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace.*unsafe_pickle=True") as excinfo:
        load_quietly(path)
    assert str(path) in str(excinfo.value)
    assert_same_parameters(load_quietly(path, unsafe_pickle=True), source)


def test_norm_num_groups_defaults_to_32_and_is_taken_from_an_override(tmp_path, latents):
    vae = seeded_vae(dict(SMALL, norm_num_groups=8), seed=7)
    path = tmp_path / "groups8.safetensors"
    save_file(ldm_state(vae), path)
    assert load_quietly(path).config.norm_num_groups == 32  # shapes cannot tell: documented default
    model = load_quietly(path, norm_num_groups=8)
    with torch.no_grad():
        assert_close(model.decode(latents).sample, vae.decode(latents).sample, rel_l2=0.0, name="groups 8")
    # Widths that 32 does not divide: the default cannot apply, so the error asks for norm_num_groups=.
    narrow = seeded_vae(dict(SMALL_16, block_out_channels=(24, 48), norm_num_groups=8), seed=8)
    narrow_path = tmp_path / "narrow.safetensors"
    save_file(narrow.state_dict(), narrow_path)
    with pytest.raises(CheckpointError, match=r"norm_num_groups=32 \(assumed.*does not divide the widths \[24, 48\]"
                                              r".*Pass norm_num_groups=N .*one of \[1, 2, 3, 4, 6, 8, 12, 24\]"):
        load_quietly(narrow_path)
    assert_same_parameters(load_quietly(narrow_path, norm_num_groups=8), narrow)


def test_tiny_name_resolves_to_the_package_folder_or_says_it_is_absent(source, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "TINY_FOLDER", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="not installed"):
        load_pretrained(AutoencoderKL, "sdvae-fast/tiny")
    monkeypatch.setattr(loading, "TINY_FOLDER", save_pretrained(source, tmp_path / "tiny_data"))
    for name in ("sdvae-fast/tiny", "tiny"):
        assert_same_parameters(load_pretrained(AutoencoderKL, name), source)


# ---------------------------------------------------------------------------------------------------------------
# Issue 15 item 1: what the weights cannot tell (norm_num_groups, scaling_factor) comes from the file side, and
# an assumed value is reported as assumed.
# ---------------------------------------------------------------------------------------------------------------

# Two levels, 8 groups: widths 32/64, which 32 also divides, so an assumed 32 would load silently wrong.
GROUPS_8 = dict(SMALL_16, latent_channels=4, use_quant_conv=True, use_post_quant_conv=True, norm_num_groups=8,
                scaling_factor=0.5)


def _eight_group_vae():
    torch.manual_seed(11)
    return AutoencoderKL.from_config(GROUPS_8).eval()


def _record(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, caught


def test_assumed_group_count_is_reported_as_assumed_and_warned_with_the_override(tmp_path):
    vae = _eight_group_vae()
    path = tmp_path / "plain.safetensors"
    save_file(vae.state_dict(), path)
    sources = inspect_checkpoint(path)["config_sources"]
    assert sources["norm_num_groups"].startswith("assumed") and sources["scaling_factor"].startswith("assumed")
    model, caught = _record(load_single_file, AutoencoderKL, path)
    assert model.config.norm_num_groups == 32
    groups = [w for w in caught if issubclass(w.category, AssumedNormGroupsWarning)]
    assert len(groups) == 1, [str(w.message) for w in caught]
    message = str(groups[0].message)
    assert str(path) in message and "norm_num_groups=32 is assumed" in message and "norm_num_groups=N" in message
    assert "[1, 2, 4, 8, 16]" in message  # the other counts the widths allow
    # An argument settles it: no warning, and the source says so.
    model, caught = _record(load_single_file, AutoencoderKL, path, norm_num_groups=8)
    assert model.config.norm_num_groups == 8 and not [w for w in caught if w.category is AssumedNormGroupsWarning]
    assert inspect_checkpoint(path, norm_num_groups=8)["config_sources"]["norm_num_groups"] == "argument"


def test_group_count_and_scaling_come_from_file_metadata_or_a_config_beside_the_file(tmp_path, latents):
    vae = _eight_group_vae()
    with torch.no_grad():
        expected = vae.decode(latents).sample
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    cases = {
        "file metadata": (tmp_path / "meta" / "vae.safetensors", safetensors_metadata(vae.config)),
        "config.json beside the file": (tmp_path / "beside" / "vae.safetensors", None),
    }
    save_pretrained(vae, tmp_path / "beside")  # writes config.json into the same folder
    (tmp_path / "meta").mkdir()
    for source, (path, metadata) in cases.items():
        save_file(state, path, metadata=metadata)
        model, caught = _record(load_single_file, AutoencoderKL, path)
        assert not caught, [str(w.message) for w in caught]  # nothing assumed, nothing guessed
        assert (model.config.norm_num_groups, model.config.scaling_factor) == (8, 0.5)
        with torch.no_grad():
            assert_close(model.decode(latents).sample, expected, rel_l2=0.0, name=source)
        assert inspect_checkpoint(path)["config_sources"] == {"norm_num_groups": source, "scaling_factor": source}
    # A bare `norm_num_groups` metadata entry is enough for the groups; an argument still wins over the file.
    bare = tmp_path / "bare.safetensors"
    save_file(state, bare, metadata={"norm_num_groups": "8"})
    assert load_quietly(bare).config.norm_num_groups == 8
    assert load_quietly(bare, norm_num_groups=4).config.norm_num_groups == 4
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad, metadata={"norm_num_groups": "eight"})
    with pytest.raises(CheckpointError, match=r"bad.safetensors: metadata entry 'norm_num_groups'='eight'"):
        load_quietly(bad)


def test_a_config_beside_the_file_that_contradicts_the_weights_is_ignored_with_a_warning(tmp_path):
    vae = _eight_group_vae()
    save_pretrained(AutoencoderKL.from_config(dict(GROUPS_8, block_out_channels=(32, 32))), tmp_path)
    path = tmp_path / "other.safetensors"
    save_file(vae.state_dict(), path)
    model, caught = _record(load_single_file, AutoencoderKL, path)
    assert model.config.block_out_channels == (32, 64) and model.config.norm_num_groups == 32
    assert any("config.json was ignored" in str(w.message) and "block_out_channels=[32, 32]" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    assert inspect_checkpoint(path)["config_sources"]["norm_num_groups"].startswith("assumed")


def test_save_pretrained_stores_the_config_in_the_weights_metadata_for_an_exact_round_trip(tmp_path):
    vae = _eight_group_vae()
    save_pretrained(vae, tmp_path / "folder")
    alone = tmp_path / "alone" / "vae.safetensors"  # the weights file without its config.json
    alone.parent.mkdir()
    alone.write_bytes((tmp_path / "folder" / "diffusion_pytorch_model.safetensors").read_bytes())
    model, caught = _record(load_single_file, AutoencoderKL, alone)
    assert not caught, [str(w.message) for w in caught]
    def fields(config):  # every diffusers field, sequences as lists (the classes may hold tuples or lists)
        return {k: list(config[k]) if isinstance(config[k], (list, tuple)) else config[k] for k in CONFIG_FIELDS}

    assert fields(model.config) == fields(vae.config)
    assert_same_parameters(model, vae)


def test_published_sd_architectures_load_quietly_but_are_still_reported_as_assumed(tmp_path, monkeypatch):
    # Stand-in for a public SD VAE file (no metadata, 32 groups): the sd15 preset narrowed to this small model.
    monkeypatch.setitem(PRESETS, "sd15", dict(PRESETS["sd15"], **{k: v for k, v in GROUPS_8.items()
                                                                   if k in loading.ARCHITECTURE_FIELDS}))
    path = tmp_path / "public_like.safetensors"
    save_file(AutoencoderKL.from_config(dict(GROUPS_8, norm_num_groups=32)).state_dict(), path)
    _, caught = _record(load_single_file, AutoencoderKL, path)
    assert not [w for w in caught if w.category is AssumedNormGroupsWarning]
    assert inspect_checkpoint(path)["config_sources"]["norm_num_groups"].startswith("assumed")


# ---------------------------------------------------------------------------------------------------------------
# A folder of another model type (config.json's _class_name) is refused by the AutoencoderKL loaders
# ---------------------------------------------------------------------------------------------------------------

FLUX2_TINY = dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def test_autoencoderkl_from_pretrained_refuses_flux2_vq_and_consistency_folders(tmp_path):
    """diffusers' AutoencoderKL.from_pretrained builds an AutoencoderKL from a FLUX.2 folder and only logs that
    bn's statistics were not used; ours (and load_pretrained, the loader without diffusers) raise before reading
    any weight, naming the class that loads the folder, also for a pipeline's vae/ subfolder. Genuine
    AutoencoderKL folders, with `_class_name` or without (older writers), still load."""
    import diffusers

    from sdvae_fast.model import StandaloneAutoencoderKL

    flux2 = tmp_path / "flux2"
    diffusers.AutoencoderKLFlux2(**FLUX2_TINY).save_pretrained(flux2)
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    for f in flux2.iterdir():
        (pipeline / "vae" / f.name).write_bytes(f.read_bytes())
    config = json.loads((flux2 / "config.json").read_text())
    for name in ("VQModel", "ConsistencyDecoderVAE"):
        (tmp_path / name).mkdir()  # config.json alone: the refusal comes before the weights are looked for
        (tmp_path / name / "config.json").write_text(json.dumps(dict(config, _class_name=name)))

    for cls in (AutoencoderKL, StandaloneAutoencoderKL):
        with pytest.raises(CheckpointError, match=r"flux2: config.json's _class_name is 'AutoencoderKLFlux2', not "
                                                  r"\w*AutoencoderKL: load it with "
                                                  r"sdvae_fast\.AutoencoderKLFlux2\.from_pretrained, or with "
                                                  r"sdvae_fast\.loading\.load_vae"):
            cls.from_pretrained(str(flux2))
        with pytest.raises(CheckpointError, match=r"vae: config.json's _class_name is 'AutoencoderKLFlux2'.*"
                                                  r"AutoencoderKLFlux2\.from_pretrained\(\.\.\., subfolder='vae'\)"):
            cls.from_pretrained(pipeline, subfolder="vae")
        with pytest.raises(CheckpointError, match=r"'VQModel'.*sdvae_fast\.VQModel\.from_pretrained"):
            cls.from_pretrained(str(tmp_path / "VQModel"))
        with pytest.raises(CheckpointError, match=r"'ConsistencyDecoderVAE'.*"
                                                  r"sdvae_fast\.ConsistencyDecoderVAE\.from_pretrained"):
            cls.from_pretrained(str(tmp_path / "ConsistencyDecoderVAE"))

    # What does load it: the named class, and load_vae.
    assert type(loading.load_vae(pipeline, subfolder="vae")).__name__ == "AutoencoderKLFlux2"
    # Genuine AutoencoderKL folders: diffusers' `_class_name`, and none at all.
    kl = tmp_path / "kl"
    AutoencoderKL(**SMALL_16).save_pretrained(kl)
    assert json.loads((kl / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "diffusion_pytorch_model.safetensors").write_bytes((kl / "diffusion_pytorch_model.safetensors")
                                                                 .read_bytes())
    data = {k: v for k, v in json.loads((kl / "config.json").read_text()).items() if k != "_class_name"}
    (legacy / "config.json").write_text(json.dumps(data))
    for folder in (kl, legacy):
        for cls in (AutoencoderKL, StandaloneAutoencoderKL):
            assert cls.from_pretrained(str(folder)).config.latent_channels == 16
    # load_config outside from_pretrained is diffusers' (a FLUX.2 config is readable, e.g. to convert it).
    assert AutoencoderKL.load_config(str(flux2))["_class_name"] == "AutoencoderKLFlux2"


def test_flux2_folder_parameter_count_excludes_the_batchnorm_statistics(tmp_path):
    """inspect_checkpoint of a FLUX.2 folder counts parameters only (as model.parameters()), not bn's buffers."""
    import diffusers

    vae = diffusers.AutoencoderKLFlux2(**FLUX2_TINY)
    vae.save_pretrained(tmp_path)
    info = inspect_checkpoint(tmp_path)
    assert info["parameter_count"] == sum(p.numel() for p in vae.parameters())
    assert info["parameter_count"] < sum(t.numel() for t in vae.state_dict().values())
