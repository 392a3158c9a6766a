"""The command line with VQ models (issue 14): detected from a folder's `_class_name`, a latent-diffusion file's
codebook, or `--preset vq-f8`; latents files record the model class that wrote them. Backend "torch" (the
kernels are covered by tests/test_vq.py)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from safetensors import safe_open  # noqa: E402
from test_vq import VQ_F8_LIKE, _to_ldm_names  # noqa: E402

from sdvae_fast import VQModel, cli  # noqa: E402
from sdvae_fast.images import load_image, pad_to_multiple, to_uint8  # noqa: E402


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    """A narrow VQ-f8-like diffusers folder (config.json `_class_name` "VQModel"), seeded weights."""
    torch.manual_seed(0)
    model = VQModel(**VQ_F8_LIKE)
    folder = tmp_path_factory.mktemp("vq")
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "VQModel"
    return folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 19x21 crop of scikit-image's chelsea photo (sides not multiples of 8)."""
    import skimage.data

    path = tmp_path_factory.mktemp("photo") / "cat.png"
    Image.fromarray(skimage.data.chelsea()[100:119, 200:221]).save(path)
    return path


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_reconstruct_encode_decode_of_a_vq_folder_round_trip_through_the_quantiser(vq_dir, photo, tmp_path, capsys):
    code, stdout, _ = _run(["reconstruct", photo, "--vae", vq_dir, "--backend", "torch", "--out", tmp_path / "rec",
                            "-q"], capsys)
    assert code == 0 and "PSNR" in stdout
    assert Image.open(tmp_path / "rec" / "cat.png").size == (21, 19)

    latents = tmp_path / "z.safetensors"
    code, stdout, _ = _run(["encode", photo, "--vae", vq_dir, "--backend", "torch", "-o", latents, "-q"], capsys)
    assert code == 0 and "latents (1, 4, 3, 3)" in stdout
    with safe_open(str(latents), "pt") as f:
        meta, stored = f.metadata(), f.get_tensor("cat")
    assert meta["model"] == "VQModel"
    vq = VQModel.from_pretrained(vq_dir).eval()
    vq.set_backend("torch")
    with torch.no_grad():
        padded, _ = pad_to_multiple(load_image(photo), 8)
        h = vq.encode(padded).latents
        scaling = vq.config.scaling_factor
        torch.testing.assert_close(stored, h * scaling, rtol=0, atol=0)
        expected = vq.decode(stored / scaling).sample[..., :19, :21]  # quantised, then decoded
    code, _, _ = _run(["decode", latents, "--vae", vq_dir, "--backend", "torch", "--out", tmp_path / "dec", "-q"],
                      capsys)
    assert code == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "dec" / "cat.png")), to_uint8(expected)[0])

    # latents of a VQModel given to an AutoencoderKL: a one-line error naming both classes
    code, _, err = _run(["decode", latents, "--backend", "torch", "--preset", "sd15", "--out", tmp_path, "-q"],
                        capsys)
    assert code == 2 and "written by a VQModel" in err and "AutoencoderKL" in err and "Traceback" not in err


def test_info_detects_a_vq_folder_and_a_latent_diffusion_single_file(vq_dir, tmp_path, capsys):
    code, stdout, _ = _run(["info", vq_dir, "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["model"] == "VQModel" and info["layout"] == "diffusers folder"
    assert info["config"]["block_out_channels"] == [8, 8, 16, 16]
    vq = VQModel.from_pretrained(vq_dir)
    path = tmp_path / "vq.ckpt"
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in _to_ldm_names(vq.state_dict(), 4).items()}},
               path)
    code, stdout, _ = _run(["info", path, "--norm-num-groups", "4"], capsys)
    assert code == 0 and "model: VQModel" in stdout and "latent-diffusion single file" in stdout
    assert "AttnDownEncoderBlock2D" in stdout and f"parameters: {sum(p.numel() for p in vq.parameters()):,}" in stdout


def test_preset_vq_f8_without_weights_builds_latent_diffusions_architecture(photo, tmp_path, capsys):
    code, stdout, err = _run(["reconstruct", photo, "--preset", "vq-f8", "--backend", "torch", "--out", tmp_path,
                              "-q"], capsys)
    assert code == 0 and "seeded random weights" in err
    assert Image.open(tmp_path / "cat.png").size == (21, 19)
    code, _, err = _run(["reconstruct", photo, "--preset", "vq-f8", "--shift-factor", "0.1", "--out", tmp_path,
                         "-q"], capsys)
    assert code == 2 and "--shift-factor does not apply to VQ models" in err


def test_commands_without_vq_support_say_so_in_one_line(capsys, monkeypatch):
    """bench is the one model-building command left without VQ support; past its CUDA check (none here), it
    refuses a VQ model in one line that names the commands that take one, parity and profile included."""
    assert set(cli.VQ_COMMANDS) == {"reconstruct", "encode", "decode", "info", "parity", "profile"}
    monkeypatch.setattr(cli, "_require_cuda", lambda command, device: None)
    code, _, err = _run(["bench", "--preset", "vq-f8", "--backend", "torch", "--device", "cpu"], capsys)
    assert code == 2 and "bench does not take VQ models yet" in err and "Traceback" not in err
    assert "parity, profile do)" in err and len(err.strip().splitlines()) == 1


def test_decode_takes_a_latents_file_without_metadata_and_refuses_one_naming_another_model(vq_dir, tmp_path, capfd):
    """A safetensors file that `encode` did not write (no "model" key) is decoded by any model whose channel count
    fits (the VQ folder's codebook width, 4); a file whose metadata names another class is still refused, with the
    right article. diffusers' accelerate notice is not printed on the folder load (capfd:
    diffusers' log handler writes to the stderr it found at import)."""
    from safetensors.torch import save_file

    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    plain = tmp_path / "lat4.safetensors"
    save_file({"a": z}, str(plain))
    code, stdout, err = _run(["decode", plain, "--vae", vq_dir, "--backend", "torch", "--out", tmp_path / "dec",
                              "-q"], capfd)
    assert code == 0 and "48x48" in stdout, err
    assert "accelerate" not in err and "warning" not in err
    vq = VQModel.from_pretrained(vq_dir).eval()
    vq.set_backend("torch")
    with torch.no_grad():
        expected = vq.decode(z / vq.config.scaling_factor).sample
    assert np.array_equal(np.asarray(Image.open(tmp_path / "dec" / "a.png")), to_uint8(expected)[0])

    other = tmp_path / "kl.safetensors"
    save_file({"a": z}, str(other), metadata={"model": "AutoencoderKL"})
    code, _, err = _run(["decode", other, "--vae", vq_dir, "--backend", "torch", "--out", tmp_path, "-q"], capfd)
    assert code == 2 and "written by an AutoencoderKL; this model is a VQModel" in err and "Traceback" not in err


def test_a_non_vq_preset_with_a_vq_folder_is_an_error_naming_the_option(vq_dir, capsys):
    code, _, err = _run(["info", vq_dir, "--preset", "flux2"], capsys)
    assert code == 2 and "--preset flux2 does not fit" in err and "VQModel" in err
