"""The consistency decoder (issue 13) in the loaders, `patch`, the command line, parity and profile.

A narrow decoder (tests/test_consistency.py's CONFIG and perturbed weights) saved by diffusers' save_pretrained:
the loader builds the class config.json's `_class_name` names and lists missing keys (where diffusers'
from_pretrained without accelerate initialises them at random); `reconstruct --vae FOLDER --seed N` is
diffusers' encode + seeded decode, the same PNG twice; patch/unpatch of a live diffusers ConsistencyDecoderVAE
routes its encoder and UNet to the fast path and restores it exactly; parity and profile list the UNet's units.
Kernel runs under the interpreter are slow, so only two UNet units run on them here (tests/test_consistency.py
covers whole decodes); the routing checks replace `fast.run_unet` / `run_encoder` by recording stubs.
"""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

import sdvae_fast  # noqa: E402
from helpers import assert_close  # noqa: E402
from sdvae_fast import ConsistencyDecoderVAE, cli, fast, loading, parity  # noqa: E402
from sdvae_fast.images import to_uint8  # noqa: E402
from sdvae_fast.model import StandaloneAutoencoderKL  # noqa: E402
from test_consistency import CONFIG, _reference  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("consistency") / "vae"
    reference.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A 24x16 RGB image (3x2 latents)."""
    path = tmp_path_factory.mktemp("img") / "small.png"
    rng = np.random.default_rng(0)
    pixels = np.clip(np.cumsum(rng.normal(0, 40, (16, 24, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _equal_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _plain(config) -> dict:
    """A config's public fields as JSON would hold them (tuples as lists)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def _damaged_copy(folder, tmp_path, drop=(), reshape=()):
    """A copy of `folder` whose weights lack `drop` and have `reshape` keys cut to half their first dim."""
    out = tmp_path / "damaged"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / WEIGHTS)
    for key in drop:
        del state[key]
    for key in reshape:
        state[key] = state[key][: state[key].shape[0] // 2].contiguous()
    save_file(state, out / WEIGHTS)
    return out


def test_load_vae_builds_the_class_config_json_names(reference, folder, tmp_path):
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "ConsistencyDecoderVAE"
    assert loading.folder_class_name(folder) == "ConsistencyDecoderVAE"
    vae = loading.load_vae(folder)
    assert type(vae) is ConsistencyDecoderVAE and not vae.training and _equal_state(vae, reference)
    assert _plain(vae.config) == _plain(reference.config)
    half = loading.load_vae(str(folder), torch_dtype="bf16")
    assert half.dtype == torch.bfloat16 and type(half) is ConsistencyDecoderVAE
    info = loading.inspect_checkpoint(folder)  # what `sdvae-fast info` prints
    assert info["model"] == "ConsistencyDecoderVAE" and info["family"] is None
    assert info["parameter_count"] == sum(p.numel() for p in reference.parameters())
    # an AutoencoderKL folder still gives our AutoencoderKL
    assert type(loading.load_vae("sdvae-fast/tiny")) is sdvae_fast.AutoencoderKL
    # the AutoencoderKL loader refuses the folder and says what loads it, instead of listing decoder.* keys
    with pytest.raises(loading.CheckpointError, match="ConsistencyDecoderVAE.*load_vae"):
        loading.load_pretrained(StandaloneAutoencoderKL, folder)
    # another model type is named
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(loading.CheckpointError, match="'AutoencoderTiny'.*loads AutoencoderKL.*ConsistencyDecoderVAE"):
        loading.load_vae(other)


def test_missing_and_misshaped_keys_are_named_not_initialised_at_random(folder, tmp_path):
    dropped = ("decoder_unet.conv_out.weight", "encoder.conv_in.bias")
    reshaped = "decoder_unet.mid_block.resnets.0.time_emb_proj.bias"
    damaged = _damaged_copy(folder, tmp_path, drop=dropped, reshape=(reshaped,))
    with pytest.raises(loading.CheckpointError) as info:
        loading.load_vae(damaged)
    message = str(info.value)
    assert "2 missing key(s)" in message and all(k in message for k in dropped)
    assert f"1 mis-shaped key(s):\n  {reshaped}: file (24,), model (48,)" in message
    assert "random" in message


def test_cli_missing_keys_error_is_one_line_naming_them(folder, tmp_path, image, capsys):
    damaged = _damaged_copy(folder, tmp_path, drop=("decoder_unet.conv_out.weight",))
    code = cli.main(["reconstruct", str(image), "--vae", str(damaged), "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("sdvae-fast: warning")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "1 missing key(s): decoder_unet.conv_out.weight" in lines[0], lines[0]


def test_cli_reconstruct_seeded_is_diffusers_decode_and_repeats(reference, folder, image, tmp_path, capsys):
    """`reconstruct --vae FOLDER --seed 5` writes diffusers' encode-mode + decode(generator seeded 5) image,
    the same bytes on a second run, another image with another seed; PSNR and SSIM are printed."""
    def run(seed, out):
        code = cli.main(["reconstruct", str(image), "--vae", str(folder), "--seed", str(seed), "--backend", "torch",
                         "--out", str(tmp_path / out), "-q"])
        stdout = capsys.readouterr().out
        assert code == 0 and "PSNR" in stdout and "SSIM" in stdout and "dB" in stdout, stdout
        return (tmp_path / out / "small.png").read_bytes(), np.asarray(Image.open(tmp_path / out / "small.png"))

    first_bytes, first = run(5, "a")
    again_bytes, _ = run(5, "b")
    _, other = run(6, "c")
    assert first_bytes == again_bytes
    assert not np.array_equal(first, other)
    x = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        z = reference.encode(x).latent_dist.mode()
        y = reference.decode(z, generator=torch.Generator().manual_seed(5)).sample
    assert np.array_equal(first, to_uint8(y)[0])
    # options of AutoencoderKL configs are refused by name
    code = cli.main(["reconstruct", str(image), "--vae", str(folder), "--norm-num-groups", "8", "--out",
                     str(tmp_path / "d"), "-q"])
    assert code == 2 and "--norm-num-groups" in capsys.readouterr().err


def test_patch_unpatch_live_diffusers_consistency_decoder_round_trip(reference, monkeypatch):
    """patch routes the live object's encoder and decoder UNet to fast.run_encoder / fast.run_unet (stubs that
    record and return diffusers' result); backend "torch" and unpatch give diffusers' decode bitwise, and
    unpatch restores the instance dicts, the class and the state dict exactly."""
    live = copy.deepcopy(reference)
    dicts = {name: dict(m.__dict__) for name, m in (("vae", live), ("encoder", live.encoder),
                                                   ("decoder_unet", live.decoder_unet))}
    state = {k: v.clone() for k, v in live.state_dict().items()}
    z = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(11))
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(12)) * 2 - 1

    def decode():
        with torch.no_grad():
            return live.decode(z, generator=torch.Generator().manual_seed(0)).sample

    before = decode()
    calls = []
    unet_forward = type(live.decoder_unet).forward
    encoder_forward = type(live.encoder).forward
    monkeypatch.setattr(fast, "run_unet",
                        lambda unet, s, t: calls.append(("unet", t)) or unet_forward(unet, s, t).sample)
    monkeypatch.setattr(fast, "run_encoder", lambda enc, s: calls.append(("encoder",)) or encoder_forward(enc, s))

    class Pipeline:
        vae = live

    pipe = Pipeline()
    assert sdvae_fast.patch(pipe, backend="torch") is pipe and sdvae_fast.is_patched(pipe)
    assert torch.equal(decode(), before) and not calls
    sdvae_fast.patch(live, backend="triton")  # idempotent: only the backend changes
    assert torch.equal(decode(), before)
    with torch.no_grad():
        live.encode(x)
        as_tuple = live.decoder_unet(torch.randn(1, 7, 16, 24), 512, return_dict=False)
    assert [c[0] for c in calls] == ["unet", "unet", "encoder", "unet"], calls
    assert [int(c[1]) for c in calls if c[0] == "unet"][:2] == [1008, 512] and isinstance(as_tuple, tuple)
    with pytest.raises(TypeError, match="consistency decoder"):
        sdvae_fast.enable_patch_parallel(live)
    assert sdvae_fast.unpatch(pipe) is pipe and not sdvae_fast.is_patched(pipe)
    assert type(live) is diffusers.ConsistencyDecoderVAE
    for name, module in (("vae", live), ("encoder", live.encoder), ("decoder_unet", live.decoder_unet)):
        assert module.__dict__.keys() == dicts[name].keys(), name
    assert all(torch.equal(state[k], v) for k, v in live.state_dict().items())
    calls.clear()
    assert torch.equal(decode(), before) and not calls
    # our own class is not patched: patch sets its backend
    ours = ConsistencyDecoderVAE(**CONFIG)
    assert sdvae_fast.patch(ours, backend="torch").backend == "torch" and sdvae_fast.is_patched(ours)


def test_parity_and_profile_cover_the_unet_units(folder):
    """The UNet's units are listed (encoder units first), recorded once per decode step with their time
    embedding, compared on the torch backend (passes), and two of them (an up-block resnet on its recorded
    concatenation, a mid-block resnet) run on the kernels within fp32 rounding of their modules."""
    from sdvae_fast.profile import profile_part

    vae = loading.load_vae(folder)
    vae.set_backend("torch")
    names = parity.unit_names(vae)
    assert names[0] == "encoder.conv_in" and "quant_conv" in names
    for unit in ("decoder_unet.conv_in", "decoder_unet.down_blocks.0.resnets.0", "decoder_unet.mid_block.resnets.1",
                 "decoder_unet.up_blocks.3.resnets.1", "decoder_unet.conv_out*"):
        assert unit in names, names
    report = parity.run_parity(vae, device=torch.device("cpu"), dtype=torch.float32, backend="torch", res=16,
                               parts=("decode",), quiet=True)
    rows = [r.name for r in report.rows["decode"]]
    assert "decoder_unet.up_blocks.0.resnets.0 [call 2]" in rows and "decode: sample" in rows, rows
    assert report.passed, report.markdown()

    captures = []
    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), parity.record_units(vae, captures):
        parity.decode(vae, z)
    wanted = {"decoder_unet.up_blocks.0.resnets.0", "decoder_unet.mid_block.resnets.0"}
    for cap in [c for c in captures if c.name in wanted][:2]:
        assert cap.args[1].shape == (1, 32)  # the time embedding reached the unit
        with torch.no_grad():
            got = parity.run_unit(vae, cap.name, cap.args, cap.kwargs, fast_path=True)
        assert_close(got, cap.output, rel_l2=1e-5, name=cap.name)

    with torch.no_grad():
        profiled = profile_part(vae, "decode", z, budget_s=0.0)
    labels = [r.name for r in profiled]
    assert "decoder_unet.conv_out* [call 1]" in labels and labels[-1] == "decode (end to end)"
    assert all(r.gflop > 0 for r in profiled if r.name.startswith("decoder_unet.up_blocks"))
