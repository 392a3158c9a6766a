"""Tests of `sdvae_fast.train` (the VAE trainer) and of the shipped VAE `sdvae-fast/tiny` it produced.

The training tests use a VAE of a few thousand parameters on 32x32 crops of small random-texture images, so a
step costs milliseconds; they check behaviour (loss goes down, bit-exact resume, frozen encoder, discriminator
switch-on, input errors), not image quality. The shipped-VAE test checks the quality figure in its note.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdvae_fast import train as trainer
from sdvae_fast.images import load_image
from sdvae_fast.model import AutoencoderKL

# Four levels (f = 8, as the trainer requires), four latent channels, widths small enough for milliseconds a step.
TINY_TEST_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)
FAST = dict(
    config=json.dumps(TINY_TEST_CONFIG),
    batch_size=2,
    crop=32,
    lr=1e-3,
    disc_channels=8,
    disc_layers=2,
    threads=1,
    progress=False,
    log=lambda msg: None,
)
TINY_FOLDER = Path(trainer.__file__).resolve().parent / "data" / "tiny"


def _write_images(folder: Path, sizes=((48, 40), (64, 56), (40, 72)), seed: int = 0) -> Path:
    """Smooth random colour images (non-zero mean, learnable structure) saved as PNG and JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        coarse = rng.uniform(40, 215, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        img.save(folder / (f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg"))
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _write_images(tmp_path_factory.mktemp("train_data"))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor a run leaves behind: saved EMA model, raw model, EMA shadow, discriminator, optimiser states."""
    out = {f"ema_vae.{k}": v for k, v in load_file(folder / "diffusion_pytorch_model.safetensors").items()}
    state = folder / trainer.STATE_DIR
    for name in ("model", "ema", "discriminator"):
        out.update({f"{name}.{k}": v for k, v in load_file(state / f"{name}.safetensors").items()})
    blob = torch.load(state / "optimizers_rng.pt", weights_only=True)
    for opt in ("opt_ae", "opt_d"):
        for idx, slots in blob[opt]["state"].items():
            out.update({f"{opt}.{idx}.{k}": v for k, v in slots.items() if torch.is_tensor(v)})
    out.update({f"rng.{k}": v for k, v in blob["rng"].items()})
    return out


def test_few_steps_lower_the_training_loss(data_dir, tmp_path):
    result = trainer.train(data_dir, tmp_path / "run", steps=25, ema=0.0, val_every=1000, save_every=1000, **FAST)
    assert len(result.history) == 25
    # The trained model (EMA decay 0: the raw weights) against the same seeded initial weights, on fixed crops.
    torch.manual_seed(0)
    initial = AutoencoderKL(**TINY_TEST_CONFIG).eval()
    dataset = trainer.CropDataset(data_dir, 32)
    batch = dataset.sample(4, torch.Generator().manual_seed(123))  # (4, 3, 32, 32) in [-1, 1]
    with torch.no_grad():
        before = (initial(batch).sample - batch).abs().mean().item()
        after = (result.vae(batch).sample - batch).abs().mean().item()
    assert after < 0.8 * before, f"L1 on fixed crops: {before:.4f} before, {after:.4f} after 25 steps"
    first = np.mean([h["rec"] for h in result.history[:5]])
    last = np.mean([h["rec"] for h in result.history[-5:]])
    assert last < first, f"training L1 went from {first:.4f} to {last:.4f}"


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(data_dir, tmp_path):
    # The discriminator switches on in the middle, so its optimiser state and BatchNorm stats are covered too.
    common = dict(FAST, disc_start=2, val=[str(data_dir / "img0.png")], val_every=2, save_every=100)
    trainer.train(data_dir, tmp_path / "straight", steps=5, **common)
    trainer.train(data_dir, tmp_path / "split", steps=3, **common)
    resumed = trainer.train(data_dir, tmp_path / "split", steps=5, resume=True, **common)
    assert [h["step"] for h in resumed.history] == [4, 5]
    straight, split = _tensors(tmp_path / "straight"), _tensors(tmp_path / "split")
    assert straight.keys() == split.keys()
    differing = [k for k in straight if not torch.equal(straight[k], split[k])]
    assert not differing, f"resumed run differs from the uninterrupted one in {differing[:5]}"
    config_a = json.loads((tmp_path / "straight" / "config.json").read_text())
    config_b = json.loads((tmp_path / "split" / "config.json").read_text())
    assert config_a == config_b


def test_checkpoint_loads_in_sdvae_fast_and_diffusers_with_measured_scaling_factor(data_dir, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    result = trainer.train(data_dir, tmp_path / "run", steps=2, val_every=100, save_every=100, **FAST)
    ours = AutoencoderKL.from_pretrained(tmp_path / "run").eval()
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "run").eval()
    # A new VAE's scaling_factor is 1 / std of its latents on the first batch (latent-diffusion's recipe).
    assert ours.config.scaling_factor == theirs.config.scaling_factor == pytest.approx(result.scaling_factor)
    assert result.scaling_factor != pytest.approx(0.18215)
    x = torch.rand(2, 3, 40, 48) * 1.6 - 0.7  # non-zero mean, not a crop size
    with torch.no_grad():
        assert torch.equal(ours(x).sample, result.vae(x).sample)
        torch.testing.assert_close(theirs(x).sample, ours(x).sample, rtol=1e-4, atol=1e-5)


def test_trainer_also_trains_diffusers_autoencoderkl(data_dir, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    result = trainer.train(
        data_dir, tmp_path / "run", steps=2, disc_start=1, val_every=100, save_every=100,
        model_cls=diffusers.AutoencoderKL, **FAST,
    )
    assert isinstance(result.vae, diffusers.AutoencoderKL)
    assert "g_loss" in result.history[-1]
    reloaded = AutoencoderKL.from_pretrained(tmp_path / "run")
    assert reloaded.config.scaling_factor == pytest.approx(result.scaling_factor)


def test_decoder_only_leaves_every_encoder_parameter_bit_identical(data_dir, tmp_path):
    torch.manual_seed(7)
    start = AutoencoderKL(**TINY_TEST_CONFIG)
    start.save_pretrained(tmp_path / "start")
    fast = {k: v for k, v in FAST.items() if k != "config"}
    result = trainer.train(
        data_dir, tmp_path / "run", vae=str(tmp_path / "start"), decoder_only=True, steps=3, disc_start=1,
        val_every=100, save_every=100, **fast,
    )
    before = start.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert len(frozen) > 10
    for folder_file in ("diffusion_pytorch_model.safetensors", f"{trainer.STATE_DIR}/model.safetensors"):
        after = load_file(tmp_path / "run" / folder_file)
        changed = [k for k in frozen if not torch.equal(after[k], before[k])]
        assert not changed, f"{folder_file}: frozen parameters changed: {changed[:5]}"
        assert not torch.equal(after["decoder.conv_out.weight"], before["decoder.conv_out.weight"])
    # A VAE loaded with --vae keeps its scaling_factor.
    assert result.scaling_factor == pytest.approx(start.config.scaling_factor)


def test_discriminator_switches_on_at_disc_start(data_dir, tmp_path):
    common = dict(FAST, disc_start=2, val_every=100, save_every=100)
    out = tmp_path / "run"
    disc_states, history = [], []
    for steps in (1, 2, 3, 4):
        result = trainer.train(data_dir, out, steps=steps, resume=steps > 1, **common)
        history += result.history
        disc_states.append(load_file(out / trainer.STATE_DIR / "discriminator.safetensors"))
    # Steps 1-2 (before disc_start): no GAN term, the discriminator (weights and BatchNorm stats) untouched.
    assert all("g_loss" not in h and "d_loss" not in h for h in history[:2])
    assert all(torch.equal(disc_states[0][k], disc_states[1][k]) for k in disc_states[0])
    # Steps 3-4: the adaptive-weighted GAN term is in the loss and the discriminator learns.
    assert all("g_loss" in h and "d_loss" in h and h["d_weight"] > 0 for h in history[2:])
    for later in (2, 3):
        changed = [k for k in disc_states[0] if not torch.equal(disc_states[later - 1][k], disc_states[later][k])]
        assert any(k.endswith(".weight") for k in changed), f"discriminator weights unchanged at step {later + 1}"


def test_bad_inputs_fail_before_training_with_clear_errors(data_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="contains no images"):
        trainer.train(empty, tmp_path / "out", steps=1, **FAST)
    with pytest.raises(FileNotFoundError, match="--data folder not found"):
        trainer.train(tmp_path / "missing", tmp_path / "out", steps=1, **FAST)

    broken = _write_images(tmp_path / "broken", sizes=((40, 40),))
    (broken / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"cannot read 1 file.*truncated\.png"):
        trainer.train(broken, tmp_path / "out", steps=1, **FAST)

    with pytest.raises(ValueError, match=r"--crop 64 is larger than these images.*img0\.png \(48x40\)"):
        trainer.train(data_dir, tmp_path / "out", steps=1, **dict(FAST, crop=64))
    with pytest.raises(ValueError, match="--crop must be a positive multiple of 8"):
        trainer.train(data_dir, tmp_path / "out", steps=1, **dict(FAST, crop=30))
    with pytest.raises(ValueError, match="--resume: no checkpoint"):
        trainer.train(data_dir, tmp_path / "out", steps=1, resume=True, **FAST)
    with pytest.raises(ValueError, match="give only one of --vae, --preset, --config"):
        trainer.train(data_dir, tmp_path / "out", steps=1, preset="tiny", **FAST)
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        trainer.train(data_dir, tmp_path / "out", steps=0, **FAST)
    assert not (tmp_path / "out").exists()


def test_cli_arguments_reach_train(data_dir, tmp_path, capsys):
    parser = trainer.add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--data", str(data_dir), "--out", str(tmp_path / "cli"), "--config", json.dumps(TINY_TEST_CONFIG),
         "--steps", "2", "--batch", "2", "--crop", "32", "--val", str(data_dir / "img0.png"), "--threads", "1"]
    )
    assert trainer.run_from_args(args) == 0
    assert "held-out PSNR" in capsys.readouterr().out
    assert (tmp_path / "cli" / "config.json").exists()
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "x", "--out", "y", "--vae", "a", "--preset", "tiny"])


def test_resume_keeps_the_held_out_split_stored_with_the_checkpoint(data_dir, tmp_path):
    """Issue 15 item 2: a resume without --val holds out what the first run held out; another --val is refused."""
    common = dict(FAST, val_every=1, save_every=100)
    # First run with an explicit held-out image from outside the data folder: every data image trains.
    held = _write_images(tmp_path / "held", sizes=((40, 40),), seed=9) / "img0.png"
    first = trainer.train(data_dir, tmp_path / "explicit", steps=1, val=[str(held)], **common)
    resumed = trainer.train(data_dir, tmp_path / "explicit", steps=2, resume=True, **common)
    assert list(resumed.validation[-1]["images"]) == list(first.validation[-1]["images"]) == [str(held)]
    with pytest.raises(ValueError, match=r"--resume: this checkpoint was trained with the held-out split --val "
                                         r".*held.*img0\.png; --val .* would change it.*Omit --val"):
        trainer.train(data_dir, tmp_path / "explicit", steps=3, resume=True, **dict(common, val=[str(held.parent)]))
    # First run with the default split (img0.png of the data folder held out): the resume keeps it out of
    # training even when the folder gains images that would move the every-10th rule, and refuses a --val.
    data = _write_images(tmp_path / "data", seed=1)
    trainer.train(data, tmp_path / "default", steps=1, **common)
    state = json.loads((tmp_path / "default" / trainer.STATE_DIR / "state.json").read_text())
    assert state["val_split"] == {"val": None, "held_out": ["img0.png"]}
    (data / "img0.png").rename(data / "zz_img0.png")  # sorted last now: every 10th would no longer pick it
    with pytest.raises(ValueError, match=r"held-out image\(s\) \['img0.png'\] of this checkpoint are no longer"):
        trainer.train(data, tmp_path / "default", steps=2, resume=True, **common)
    (data / "zz_img0.png").rename(data / "img0.png")
    (data / "a_extra.png").write_bytes((data / "img2.png").read_bytes())  # sorted first: every 10th would pick it
    resumed = trainer.train(data, tmp_path / "default", steps=2, resume=True, **common)
    assert list(resumed.validation[-1]["images"]) == ["img0.png"]
    with pytest.raises(ValueError, match=r"held-out split every 10th data image held out \(img0.png\); --val"):
        trainer.train(data, tmp_path / "default", steps=3, resume=True, **dict(common, val=[str(held)]))


@pytest.mark.skipif(not (TINY_FOLDER / "metrics.json").exists(), reason="the shipped VAE is not built yet")
def test_shipped_tiny_vae_reconstructs_heldout_photos_at_recorded_psnr():
    recorded = json.loads((TINY_FOLDER / "metrics.json").read_text())["heldout"]
    vae = AutoencoderKL.from_pretrained("sdvae-fast/tiny").eval()
    assert vae.config.block_out_channels and vae.config.latent_channels == 4
    for name in ("chelsea", "coffee"):
        image = load_image(f"skimage:{name}")  # full resolution, never seen in training
        measured = trainer.image_metrics(vae, image)
        assert measured["psnr"] >= 20.0, f"{name}: {measured['psnr']:.2f} dB"
        assert abs(measured["psnr"] - recorded[name]["psnr"]) <= 0.5, (
            f"{name}: measured {measured['psnr']:.2f} dB, note records {recorded[name]['psnr']:.2f} dB"
        )
