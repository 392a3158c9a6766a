"""`AutoencoderKLFlux2.from_single_file`: black-forest-labs' original FLUX.2 VAE files (issue 14).

The files are written here from seeded diffusers models with an inverse mapping of our own (diffusers -> original
names, as diffusers' scripts/convert_flux2_to_diffusers.py reads them: LDM names, the quant convs inside the
encoder / decoder, `bn.running_mean` / `bn.running_var`, attention projections as (C, C, 1, 1) convs), then loaded
back and compared with the diffusers model bitwise (state dict, and encode / decode on backend "torch").
Narrow two-level models (widths 16/32, one resnet per level, 32 latent channels, 2x2 patches): each test runs in
well under a second on CPU.
"""
import json
import re
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from safetensors.torch import save_file  # noqa: E402

from sdvae_fast import AutoencoderKLFlux2, cli  # noqa: E402
from sdvae_fast.flux2 import flux2_config_from_keys, flux2_file_prefix, flux2_state_dict  # noqa: E402
from sdvae_fast.loading import AssumedNormGroupsWarning, CheckpointError  # noqa: E402

TWO_LEVELS = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1)
FLUX2_LIKE = dict(TWO_LEVELS, block_out_channels=(16, 32), norm_num_groups=8)
# The small-decoder variant: decoder widths other than the encoder's (FLUX.2's 96/192/384/384 against 128/...).
SMALL_LIKE = dict(TWO_LEVELS, block_out_channels=(16, 32), decoder_block_out_channels=(12, 24), norm_num_groups=4)


def _reference(config, seed: int = 0):
    """diffusers' AutoencoderKLFlux2 of `config`, seeded; biases, GroupNorm gammas and bn's running statistics
    perturbed (none at their defaults), bn.num_batches_tracked 7."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2(**config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen) + 0.05)
            elif p.dim() == 1:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.running_mean.shape, generator=gen))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=gen))
        vae.bn.num_batches_tracked.fill_(7)
    return vae


_ATTENTION_PART = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _original_name(key: str, levels: int) -> str:
    """diffusers name -> black-forest-labs' original name (written independently of sdvae_fast.loading)."""
    fixed = {"quant_conv": "encoder.quant_conv", "post_quant_conv": "decoder.post_quant_conv"}
    head, _, leaf = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{leaf}"
    if key.startswith("bn."):
        return key
    m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.", key)
    if m:
        return f"{m[1]}.mid.attn_1.{_ATTENTION_PART[m[2]]}.{leaf}"
    substitutions = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
         lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
    ]
    for pattern, replacement in substitutions:
        key = re.sub(pattern, replacement, key)
    return key.replace("conv_shortcut", "nin_shortcut")


def _original_tensors(vae, counter: bool = False, prefix: str = "") -> dict:
    """`vae`'s state dict in the original layout (attention projections as 1x1 convs); bn.num_batches_tracked only
    with `counter` (original files may lack it)."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        if key == "bn.num_batches_tracked" and not counter:
            continue
        if re.search(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key):
            value = value[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) conv
        out[prefix + _original_name(key, levels)] = value.clone().contiguous()
    assert len(out) == len(vae.state_dict()) - (0 if counter else 1)  # the inverse mapping is one-to-one
    return out


@pytest.fixture(scope="module")
def flux2_file(tmp_path_factory):
    """(diffusers reference, path of its original-layout .safetensors without bn.num_batches_tracked)."""
    reference = _reference(FLUX2_LIKE)
    path = tmp_path_factory.mktemp("flux2") / "flux2-vae.safetensors"
    save_file(_original_tensors(reference), str(path))
    return reference, path


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """(diffusers reference, original-layout .safetensors of the small-decoder variant, counter included)."""
    reference = _reference(SMALL_LIKE, seed=3)
    path = tmp_path_factory.mktemp("flux2_small") / "full_encoder_small_decoder.safetensors"
    save_file(_original_tensors(reference, counter=True), str(path))
    return reference, path


def _latents(seed: int):
    return torch.randn(1, 32, 3, 4, generator=torch.Generator().manual_seed(seed)) + 0.3  # (N, 32, h, w)


def _image(seed: int):
    return torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(seed)) * 2 - 0.9


def _assert_same_model(ours, reference, skip=()):
    theirs = reference.state_dict()
    mine = ours.state_dict()
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        if key not in skip:
            assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key
    with torch.no_grad():
        z, x = _latents(1), _image(2)
        assert torch.equal(ours.decode(z).sample, reference.decode(z).sample)
        assert torch.equal(ours.encode(x).latent_dist.mode(), reference.encode(x).latent_dist.mode())


def test_original_file_loads_as_the_diffusers_model_bitwise(flux2_file):
    reference, path = flux2_file
    vae = AutoencoderKLFlux2.from_single_file(path, norm_num_groups=8)
    vae.set_backend("torch")
    assert isinstance(vae, AutoencoderKLFlux2) and not vae.training
    config = vae.config
    assert tuple(config.block_out_channels) == (16, 32) and config.decoder_block_out_channels is None
    assert (config.layers_per_block, config.latent_channels, config.in_channels, config.out_channels) == (1, 32, 3, 3)
    assert config.use_quant_conv and config.use_post_quant_conv and config.mid_block_add_attention
    assert tuple(config.patch_size) == (2, 2) and config.batch_norm_eps == 1e-4 and config.norm_num_groups == 8
    # The file has no bn.num_batches_tracked: the model keeps a new BatchNorm's count (unused in eval mode).
    assert vae.bn.num_batches_tracked.item() == 0 and vae.bn.num_batches_tracked.dtype == torch.int64
    _assert_same_model(vae, reference, skip=("bn.num_batches_tracked",))
    # FLUX.2's latent normalisation uses the file's statistics.
    mean, std = vae.latents_bn_mean_std()
    assert torch.equal(mean.flatten(), reference.bn.running_mean)
    assert torch.equal(std.flatten(), torch.sqrt(reference.bn.running_var + 1e-4))


def test_state_dict_and_config_functions():
    """flux2_state_dict renames every original key (no leftovers); flux2_config_from_keys reads the architecture,
    FLUX.2's defaults for what the file does not store; flux2_file_prefix finds the VAE under a prefix."""
    reference = _reference(SMALL_LIKE, seed=5)
    original = _original_tensors(reference, counter=True)
    state, unmapped = flux2_state_dict(original)
    assert unmapped == [] and sorted(state) == sorted(reference.state_dict())
    assert state["encoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)
    assert torch.equal(state["quant_conv.weight"], reference.quant_conv.weight)
    config = flux2_config_from_keys({k: v.shape for k, v in original.items()})
    expected = dict(SMALL_LIKE, norm_num_groups=32, latent_channels=32, in_channels=3, out_channels=3,
                    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True, patch_size=(2, 2),
                    batch_norm_eps=1e-4)
    assert {k: config[k] for k in expected} == expected
    assert flux2_file_prefix(["vae." + k for k in original] + ["model.x"]) == "vae."
    assert flux2_file_prefix([k for k in original if not k.startswith("bn.")]) is None
    _, unmapped = flux2_state_dict({**original, "encoder.extra.weight": torch.zeros(1)})
    assert unmapped == ["encoder.extra.weight"]


@pytest.mark.parametrize("name", ["flux2", "flux2-small"])
def test_full_size_shapes_give_the_flux2_presets(name):
    """The shapes of FLUX.2's real VAE and of its small decoder (models built on the meta device: no weights)
    give the presets' configs back, FLUX.2's norm_num_groups / batch_norm_eps included."""
    from sdvae_fast.configs import FLUX2_PRESETS
    from sdvae_fast.flux2 import _family

    with torch.device("meta"):
        reference = diffusers.AutoencoderKLFlux2(**FLUX2_PRESETS[name])
    shapes = {k: v.shape for k, v in _original_tensors(reference).items()}
    config = flux2_config_from_keys(shapes)
    assert config == {k: tuple(v) if isinstance(v, list) else v for k, v in FLUX2_PRESETS[name].items()}
    assert _family(config) == name


def test_small_decoder_variant_with_counter_and_dtype(small_file):
    reference, path = small_file
    vae = AutoencoderKLFlux2.from_single_file(str(path), norm_num_groups=4)
    vae.set_backend("torch")
    assert tuple(vae.config.decoder_block_out_channels) == (12, 24)
    assert tuple(vae.config.block_out_channels) == (16, 32)
    assert vae.bn.num_batches_tracked.item() == 7  # taken from the file
    _assert_same_model(vae, reference)
    half = AutoencoderKLFlux2.from_single_file(path, norm_num_groups=4, torch_dtype="bf16")
    assert half.dtype == torch.bfloat16 and half.bn.running_var.dtype == torch.bfloat16
    assert half.bn.num_batches_tracked.dtype == torch.int64
    assert torch.equal(half.bn.running_var, reference.bn.running_var.to(torch.bfloat16))


def test_pickle_checkpoint_with_the_vae_under_a_prefix(small_file, tmp_path):
    """A .ckpt whose `state_dict` holds the VAE under `vae.` beside another component (ignored)."""
    reference, _ = small_file
    tensors = _original_tensors(reference, prefix="vae.")
    tensors["model.diffusion_model.img_in.weight"] = torch.randn(4, 4)
    path = tmp_path / "flux2-dev.ckpt"
    torch.save({"state_dict": tensors, "global_step": 3}, path)
    vae = AutoencoderKLFlux2.from_single_file(path, norm_num_groups=4)
    vae.set_backend("torch")
    _assert_same_model(vae, reference, skip=("bn.num_batches_tracked",))


def test_clear_errors(flux2_file, tmp_path):
    reference, path = flux2_file
    original = _original_tensors(reference)

    def write(name, tensors):
        target = tmp_path / name
        save_file(tensors, str(target))
        return target

    # A missing weight: named (diffusers' name of decoder.up.1.block.0.conv2.weight), nothing half-loaded.
    broken = {k: v for k, v in original.items() if k != "decoder.up.1.block.0.conv2.weight"}
    named = r"1 missing key\(s\):\n  decoder\.up_blocks\.0\.resnets\.0\.conv2\.weight"
    with pytest.raises(CheckpointError, match=named):
        AutoencoderKLFlux2.from_single_file(write("missing.safetensors", broken), norm_num_groups=8)
    # A key no rule maps, and a mis-shaped one.
    extra = dict(original, **{"encoder.extra.weight": torch.zeros(2)})
    extra["encoder.conv_in.bias"] = torch.zeros(15)
    listed = r"(?s)mis-shaped.*encoder\.conv_in\.bias.*unused key\(s\):\n  encoder\.extra"
    with pytest.raises(CheckpointError, match=listed):
        AutoencoderKLFlux2.from_single_file(write("extra.safetensors", extra), norm_num_groups=8)
    # No decoder at all: the keys the architecture is read from are named.
    encoder_only = {k: v for k, v in original.items() if not k.startswith("decoder.")}
    with pytest.raises(CheckpointError, match=r"encoder_only\.safetensors: not an original FLUX\.2 VAE: missing "
                                              r"\['decoder\.conv_in\.weight'"):
        AutoencoderKLFlux2.from_single_file(write("encoder_only.safetensors", encoder_only), norm_num_groups=8)
    # An AutoencoderKL file (no latent BatchNorm) is refused, naming the loader to use.
    kl = {k: v for k, v in original.items() if not k.startswith("bn.")}
    with pytest.raises(CheckpointError, match=r"not a FLUX\.2 VAE file.*AutoencoderKL\.from_single_file"):
        AutoencoderKLFlux2.from_single_file(write("ae.safetensors", kl))
    # diffusers' names in one file: from_pretrained with a folder.
    with pytest.raises(CheckpointError, match="from_pretrained"):
        AutoencoderKLFlux2.from_single_file(write("diffusers.safetensors", {k: v.contiguous() for k, v in
                                                                          reference.state_dict().items()}))
    # norm_num_groups is not in the file: FLUX.2's 32, which does not divide 16; the message says what to pass.
    advice = r"norm_num_groups=32 \(assumed.*Pass norm_num_groups=N.*\[1, 2, 4, 8, 16\]"
    with pytest.raises(CheckpointError, match=advice):
        AutoencoderKLFlux2.from_single_file(path)
    # A preset that does not fit the weights: the keys, and what the weights imply.
    with pytest.raises(CheckpointError, match=r"(?s)mis-shaped.*The weights imply block_out_channels=\(16, 32\)"):
        AutoencoderKLFlux2.from_single_file(path, config="flux2", norm_num_groups=8)
    with pytest.raises(TypeError, match=r"unknown config field\(s\) \['scaling_factor'\]"):
        AutoencoderKLFlux2.from_single_file(path, scaling_factor=0.5)
    with pytest.raises(ValueError, match="valid preset names"):
        AutoencoderKLFlux2.from_single_file(path, config="sd15")
    with pytest.raises(FileNotFoundError):
        AutoencoderKLFlux2.from_single_file(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        AutoencoderKLFlux2.from_single_file(tmp_path)


def test_assumed_groups_warn_for_widths_of_no_preset(tmp_path):
    """Widths that 32 divides load with the assumed 32, with a warning naming the override; none when given."""
    reference = _reference(dict(TWO_LEVELS, block_out_channels=(32, 64)))
    path = tmp_path / "wide.safetensors"
    save_file(_original_tensors(reference), str(path))
    with pytest.warns(AssumedNormGroupsWarning, match="Pass norm_num_groups=N"):
        vae = AutoencoderKLFlux2.from_single_file(path)
    assert vae.config.norm_num_groups == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoencoderKLFlux2.from_single_file(path, norm_num_groups=32)


def test_inspect_notes_groups_that_do_not_divide_and_counts_parameters_as_a_folder(flux2_file, tmp_path, capsys):
    """inspect_single_file (the CLI's `info`) says when norm_num_groups (FLUX.2's assumed 32, or a given one) does
    not divide the widths, as loading refuses it; its parameter count is the folder's (parameters, no bn
    statistics)."""
    from sdvae_fast.flux2 import inspect_single_file
    from sdvae_fast.loading import inspect_checkpoint

    reference, path = flux2_file
    note = (r"norm_num_groups=32 \(assumed: FLUX\.2's value.*\) does not divide the widths \[16, 32\]: loading "
            r"this file with it fails\. Pass norm_num_groups=N \(on the command line --norm-num-groups N\).*"
            r"one of \[1, 2, 4, 8, 16\]")
    info = inspect_single_file(path)
    assert len(info["notes"]) == 1 and re.search(note, info["notes"][0]), info["notes"]
    given = inspect_single_file(path, norm_num_groups=3)["notes"]
    assert len(given) == 1 and "norm_num_groups=3 (given) does not divide" in given[0]
    assert inspect_single_file(path, norm_num_groups=8)["notes"] == []
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"  note: " + note, out), out
    assert cli.main(["info", str(path), "--norm-num-groups", "8"]) == 0
    assert "note:" not in capsys.readouterr().out

    folder = tmp_path / "folder"
    reference.save_pretrained(folder)
    count = sum(p.numel() for p in reference.parameters())
    assert info["parameter_count"] == count == inspect_checkpoint(folder)["parameter_count"]
    assert cli.main(["info", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameter_count"] == count


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def test_cli_info_and_encode_decode_of_an_original_file(small_file, tmp_path, capsys):
    """`info FILE` reports AutoencoderKLFlux2 and the inferred config; `encode` / `decode --vae FILE` build it
    with from_single_file (normalised, patchified latents, decoded back as the diffusers model does)."""
    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    from sdvae_fast.images import load_image, pad_to_multiple, to_uint8

    reference, path = small_file
    assert cli.main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "model: AutoencoderKLFlux2" in text and "layout: flux2-original" in text
    assert "decoder_block_out_channels: [12, 24]" in text and "block_out_channels: [16, 32]" in text
    assert "norm_num_groups: 32  (assumed: FLUX.2 default" in text and "--norm-num-groups" in text
    assert cli.main(["info", str(path), "--norm-num-groups", "4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "AutoencoderKLFlux2" and info["config"]["norm_num_groups"] == 4
    assert info["config_sources"]["norm_num_groups"] == "--norm-num-groups"
    assert info["parameter_count"] == sum(p.numel() for p in reference.parameters())

    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 13, 3), dtype=np.uint8)).save(image)
    latents_path = tmp_path / "latents.safetensors"
    common = ["--vae", str(path), "--norm-num-groups", "4", "--backend", "torch", "-q"]
    assert cli.main(["encode", str(image), "-o", str(latents_path), *common]) == 0
    assert "latents (1, 128, 3, 4)" in capsys.readouterr().out  # 10x13 padded to 12x16: latents 6x8, patched 3x4
    with safe_open(str(latents_path), "pt") as f:
        meta, stored = f.metadata(), f.get_tensor("cat")
    assert meta["model"] == "AutoencoderKLFlux2"
    with torch.no_grad():
        padded, _ = pad_to_multiple(load_image(image), 4)
        bn = reference.bn
        std = torch.sqrt(bn.running_var + 1e-4).view(1, -1, 1, 1)
        patched = reference.encode(padded).latent_dist.mode()  # (1, 32, 6, 8)
        patched = patched.reshape(1, 32, 3, 2, 4, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 128, 3, 4)
        assert torch.equal(stored, (patched - bn.running_mean.view(1, -1, 1, 1)) / std)
        z = stored * std + bn.running_mean.view(1, -1, 1, 1)
        z = z.reshape(1, 32, 2, 2, 3, 4).permute(0, 1, 4, 2, 5, 3).reshape(1, 32, 6, 8)
        expected = reference.decode(z).sample[..., :10, :13]
    out_dir = tmp_path / "out"
    assert cli.main(["decode", str(latents_path), "-o", str(out_dir), *common]) == 0
    assert np.array_equal(np.asarray(Image.open(out_dir / "cat.png")), to_uint8(expected)[0])
    capsys.readouterr()
    # Errors: scaling options and --config do not apply; a FLUX.2 preset on an AutoencoderKL file is refused.
    assert cli.main(["encode", str(image), "-o", str(latents_path), "--scaling-factor", "0.5", *common]) == 2
    assert "do not apply" in capsys.readouterr().err
    assert cli.main(["info", str(path), "--config", "sd15"]) == 2
    assert "--config reads AutoencoderKL files" in capsys.readouterr().err
    assert cli.main(["encode", str(image), "-o", str(latents_path), "--vae", str(path), "--backend", "torch",
                     "-q"]) == 2
    assert "--norm-num-groups N" in capsys.readouterr().err  # 32 does not divide 12: the option to pass
