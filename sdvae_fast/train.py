"""Train or fine-tune a kl-f8 `AutoencoderKL` with latent-diffusion's autoencoder losses.

The objective follows latent-diffusion's `LPIPSWithDiscriminator` (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", appendix G; Esser et al. 2021 for the adaptive GAN weight):

    loss_ae = L1(x, x_hat) [+ perceptual_weight * LPIPS(x, x_hat)]
              + kl_weight * KL(q(z|x) || N(0, I))
              + disc_factor * lambda_adaptive * (-mean(D(x_hat)))
    lambda_adaptive = disc_weight * ||grad_{w_last} L_rec|| / (||grad_{w_last} L_gan|| + 1e-4), clamped to [0, 1e4],
    loss_d  = 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))            (hinge loss)

where `w_last` is the decoder's last layer (`decoder.conv_out.weight`) and `disc_factor` is 0 before `disc_start`
steps and 1 after. latent-diffusion sums the L1 and KL terms over pixels / latent elements and averages over the
batch; here every term is that sum divided by the pixel count 3*H*W, so the L1 term reads as a per-pixel mean in
units of the [-1, 1] image range. Dividing the whole objective by a constant changes neither the adaptive weight's
effect nor Adam's steps (Adam is invariant to the loss scale up to its eps), so `kl_weight` keeps its meaning.
Both optimisers are Adam with betas (0.5, 0.9), as in latent-diffusion.

The discriminator is the pix2pix PatchGAN `NLayerDiscriminator` (Isola et al. 2017): 4x4 convolutions, stride 2
in the first `n_layers`, BatchNorm and LeakyReLU(0.2), one logit per overlapping patch.

What gets saved is an exponential moving average (EMA) of the weights, with latent-diffusion's `LitEma` warm-up
(decay_t = min(ema, (1 + t) / (10 + t))). A new VAE (from `preset` or `config`) gets `scaling_factor` =
1 / std(latents of the first training batch), the latent-diffusion recipe, computed with the saved EMA weights;
a VAE loaded with `vae=` keeps its own `scaling_factor` (SD's fine-tuned decoders kept 0.18215).

Images are (N, 3, H, W) float32 in [-1, 1] (`x = 2 * pixel / 255 - 1`), NCHW, as in `sdvae_fast.images`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from .configs import PRESETS as CONFIG_PRESETS
from .images import load_image, pad_to_multiple, to_uint8

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
STATE_DIR = "trainer_state"

# Architectures a new VAE can start from (diffusers `AutoencoderKL` constructor kwargs); "tiny" is the default.
PRESETS = CONFIG_PRESETS


# --------------------------------------------------------------------------------------------------------------
# Model classes
# --------------------------------------------------------------------------------------------------------------
def default_model_class() -> type:
    """The `AutoencoderKL` class to train: sdvae_fast's own when present, else diffusers' (same layout)."""
    try:
        from .model import AutoencoderKL
    except ImportError:
        from diffusers import AutoencoderKL
    return AutoencoderKL


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix's `NLayerDiscriminator`, as used by latent-diffusion).

    Layout: conv4x4/s2 (in_channels -> channels) + LeakyReLU(0.2); `n_layers - 1` blocks of conv4x4/s2 + BatchNorm
    + LeakyReLU with channels doubling up to 8x; one conv4x4/s1 block; a final conv4x4/s1 to one logit channel.
    All convolutions pad by 1. Weights are drawn from N(0, 0.02), BatchNorm scales from N(1, 0.02).

    Input: (N, in_channels, H, W) float32 images in [-1, 1]. Output: (N, 1, H', W') logits, one per overlapping
    patch (H' = H / 2**n_layers - 2 for H divisible by 2**n_layers); for 256x256 and n_layers=3, 30x30.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, 1, H', W') patch logits."""
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))), a 0-dim tensor."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def _load_lpips() -> Optional[nn.Module]:
    """LPIPS(vgg) when the `lpips` package and its backbone weights are present locally, else None (no download)."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return None
    try:
        import torchvision

        # LPIPS needs torchvision's VGG16 ImageNet weights; refuse to download them.
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
        if not (hub_dir / os.path.basename(url)).exists():
            return None
        import lpips

        model = lpips.LPIPS(net="vgg", verbose=False).eval()
    except Exception:
        return None
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
class CropDataset:
    """All images of a folder held in memory, sampled as random crops with random horizontal flips.

    Images are kept as uint8 (3, H, W) tensors (RGB; grey, palette and alpha images are converted to RGB), so
    memory is 3 bytes per pixel of the whole folder.
    Batches are drawn from a dedicated `torch.Generator`, so a run is reproducible from `seed` and resumable
    from the generator's state.

    Raises (all before any training):
        FileNotFoundError: `folder` does not exist. NotADirectoryError: it is not a folder.
        ValueError: no PNG/JPEG file in it; one or more files Pillow cannot read (all are named); an image
        smaller than `crop` on either side (named, with its size); `crop` not a positive multiple of `multiple`.
    """

    def __init__(self, folder: Union[str, Path], crop: int, multiple: int = 8):
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"--data folder not found: {folder}")
        if not folder.is_dir():
            raise NotADirectoryError(f"--data must be a folder of images, got the file {folder}")
        if crop <= 0 or crop % multiple:
            raise ValueError(f"--crop must be a positive multiple of {multiple} (the VAE's downsampling), got {crop}")
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise ValueError(f"--data folder {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)} files)")
        images, unreadable, too_small = [], [], []
        for path in paths:
            try:
                with Image.open(path) as img:
                    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
            except Exception as exc:  # Pillow raises several types for broken files
                unreadable.append(f"{path.name} ({type(exc).__name__}: {exc})")
                continue
            h, w = arr.shape[:2]
            if h < crop or w < crop:
                too_small.append(f"{path.name} ({w}x{h})")
            images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())  # (3, H, W) uint8
        if unreadable:
            raise ValueError(f"cannot read {len(unreadable)} file(s) in {folder}: " + "; ".join(unreadable))
        if too_small:
            raise ValueError(
                f"--crop {crop} is larger than these images (width x height): {', '.join(too_small)}; "
                f"use a smaller --crop or remove them"
            )
        self.paths = paths
        self.images = images
        self.crop = crop

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A (batch_size, 3, crop, crop) float32 batch in [-1, 1]: random image, random crop, random h-flip."""
        out = torch.empty(batch_size, 3, self.crop, self.crop)
        for i in range(batch_size):
            img = self.images[int(torch.randint(len(self.images), (1,), generator=generator))]
            h, w = img.shape[1:]
            top = int(torch.randint(h - self.crop + 1, (1,), generator=generator))
            left = int(torch.randint(w - self.crop + 1, (1,), generator=generator))
            patch = img[:, top : top + self.crop, left : left + self.crop]
            if bool(torch.rand((), generator=generator) < 0.5):
                patch = patch.flip(-1)
            out[i] = patch.float() / 127.5 - 1.0
        return out


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruct(vae: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Encode to the posterior mean and decode: (1, 3, H, W) in [-1, 1] -> (1, 3, H, W) in [-1, 1].

    Sides that are not multiples of the VAE's factor f (8 for kl-f8) are edge-padded before encoding and
    cropped back after decoding.
    """
    factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
    padded, (h, w) = pad_to_multiple(image, factor)  # (1, 3, H', W'), H' and W' multiples of f
    latents = vae.encode(padded).latent_dist.mode()
    return vae.decode(latents).sample[..., :h, :w]


def image_metrics(vae: nn.Module, image: torch.Tensor, max_side: Optional[int] = None) -> dict[str, float]:
    """8-bit PSNR (dB) and SSIM of a VAE round trip of one (1, 3, H, W) image in [-1, 1].

    Both images are rounded to uint8 first (what a user would save); PSNR and SSIM come from
    `skimage.metrics` with data_range 255 (SSIM over the RGB channel axis, default 7x7 window).
    `max_side` centre-crops larger images to at most max_side x max_side first (None: full resolution).
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if max_side is not None:
        h, w = image.shape[-2:]
        top, left = max(0, (h - max_side) // 2), max(0, (w - max_side) // 2)
        image = image[..., top : top + max_side, left : left + max_side]
    recon = reconstruct(vae, image)
    ref, out = to_uint8(image)[0], to_uint8(recon)[0]  # (H, W, 3) uint8
    return {
        "psnr": float(peak_signal_noise_ratio(ref, out, data_range=255)),
        "ssim": float(structural_similarity(ref, out, data_range=255, channel_axis=-1)),
    }


# --------------------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------------------
class Ema:
    """Exponential moving average of the trainable parameters (latent-diffusion's `LitEma` warm-up).

    After update t (1-based), shadow = d_t * shadow + (1 - d_t) * param with d_t = min(decay, (1 + t) / (10 + t)).
    Frozen parameters and buffers are copied verbatim into the EMA model, so a frozen encoder stays bit-identical.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current trainable parameters into the shadow copy."""
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, target: nn.Module, source: nn.Module) -> None:
        """Load `source`'s state into `target`, with the averaged values for the trainable parameters."""
        state = {k: v.clone() for k, v in source.state_dict().items()}
        state.update(self.shadow)
        target.load_state_dict(state)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What `train` returns.

    vae: the EMA model (eval mode) that was saved to `out_dir`; discriminator: the PatchGAN after training;
    history: one dict per step run in this call (step, loss, rec, kl, and g_loss / d_weight / d_loss once the
    discriminator is on); validation: one dict per validation (step, mean psnr / ssim, per-image values);
    scaling_factor: the value stored in the config; wall_time: seconds spent in this call.
    """

    vae: nn.Module
    discriminator: nn.Module
    out_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    scaling_factor: float = 1.0
    wall_time: float = 0.0


def _build_vae(
    model_cls: type, vae: Optional[str], preset: Optional[str], config: Union[str, dict, None]
) -> tuple[nn.Module, bool]:
    """The starting VAE and whether it is new (so its scaling_factor must be measured). Exactly one source."""
    given = [name for name, value in (("vae", vae), ("preset", preset), ("config", config)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of --vae, --preset, --config (got {', '.join(given)})")
    if vae is not None:
        return model_cls.from_pretrained(vae), False
    if config is not None:
        try:
            if isinstance(config, dict):
                kwargs = config
            elif str(config).lstrip().startswith("{"):
                kwargs = json.loads(config)
            else:
                path = Path(config)
                if not path.is_file():
                    raise FileNotFoundError(f"--config file not found: {path}")
                kwargs = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config must be a JSON file or JSON text of AutoencoderKL kwargs: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise ValueError(f"--config must hold a JSON object of AutoencoderKL kwargs, got {type(kwargs).__name__}")
        return model_cls(**{k: v for k, v in kwargs.items() if not k.startswith("_")}), True
    name = preset or "tiny"
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {name!r}")
    return model_cls(**PRESETS[name]), True


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """The states (uint8 tensors) of the trainer's generators and of the global torch CPU RNG."""
    state = {f"generator.{k}": g.get_state() for k, g in generators.items()}
    state["torch"] = torch.get_rng_state()
    return state


def _save_checkpoint(
    out_dir: Path,
    step: int,
    vae: nn.Module,
    ema_vae: nn.Module,
    ema: Ema,
    disc: nn.Module,
    opt_ae: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    scaling_factor: float,
    meta: dict[str, Any],
) -> None:
    """Write the EMA model in diffusers layout to `out_dir` and the full trainer state to `out_dir/trainer_state`.

    The state folder is written beside the old one and swapped in by renames, so an interrupted save leaves the
    previous checkpoint intact.
    """
    _set_scaling_factor(ema_vae, scaling_factor)
    ema_vae.save_pretrained(out_dir)
    _patch_config(out_dir, scaling_factor)
    tmp = out_dir / (STATE_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp / "model.safetensors")
    save_file({k: v.contiguous() for k, v in ema.shadow.items()}, tmp / "ema.safetensors")
    save_file({k: v.contiguous() for k, v in disc.state_dict().items()}, tmp / "discriminator.safetensors")
    torch.save(
        {"opt_ae": opt_ae.state_dict(), "opt_d": opt_d.state_dict(), "rng": _rng_state(generators)},
        tmp / "optimizers_rng.pt",
    )
    (tmp / "state.json").write_text(json.dumps({**meta, "step": step, "ema_updates": ema.num_updates}, indent=2))
    final, old = out_dir / STATE_DIR, out_dir / (STATE_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _set_scaling_factor(vae: nn.Module, value: float) -> None:
    """Store scaling_factor in the in-memory config.

    diffusers' models have `register_to_config`; sdvae_fast's read-only `VAEConfig` is replaced by a new one.
    """
    if hasattr(vae, "register_to_config"):
        vae.register_to_config(scaling_factor=float(value))
    else:
        vae.config = type(vae.config)({**dict(vae.config), "scaling_factor": float(value)})


def _patch_config(out_dir: Path, value: float) -> None:
    """Make sure the saved config.json carries scaling_factor (whatever the model class wrote)."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    config["scaling_factor"] = float(value)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def train(
    data: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    vae: Optional[str] = None,
    preset: Optional[str] = None,
    config: Union[str, dict, None] = None,
    decoder_only: bool = False,
    steps: int = 1000,
    batch_size: int = 4,
    crop: int = 256,
    lr: float = 1e-4,
    ema: float = 0.999,
    seed: int = 0,
    resume: bool = False,
    disc_start: int = 50001,
    disc_weight: float = 0.5,
    disc_channels: int = 64,
    disc_layers: int = 3,
    kl_weight: float = 1e-6,
    perceptual_weight: float = 1.0,
    val: Optional[Sequence[str]] = None,
    val_every: int = 500,
    val_max_side: Optional[int] = 512,
    save_every: int = 500,
    threads: Optional[int] = None,
    progress: bool = True,
    model_cls: Optional[type] = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a VAE on random crops of a folder of images and save its EMA weights in diffusers layout.

    Args:
        data: folder of PNG/JPEG images of any size (each at least `crop` on both sides).
        out_dir: output folder; receives config.json + diffusion_pytorch_model.safetensors (the EMA weights,
            loadable by `from_pretrained` of sdvae_fast and diffusers), `trainer_state/` for resuming and
            `log.jsonl` (one line per validation).
        vae / preset / config: the starting model (at most one): a pretrained folder or name for
            `model_cls.from_pretrained`, a key of `PRESETS` ("tiny" is the default), or a JSON file / JSON text of
            `AutoencoderKL` constructor kwargs.
        decoder_only: freeze the encoder and quant_conv (their weights stay bit-identical, latents stay valid).
        steps: total optimiser steps (a resumed run continues up to this number).
        batch_size, crop: batch of `crop` x `crop` random crops (crop a multiple of 8).
        lr: Adam learning rate for the VAE and the discriminator. ema: EMA decay of the saved weights.
        seed: seeds data sampling, latent sampling and initialisation.
        resume: continue from `out_dir/trainer_state` (bit-identical to an uninterrupted run on the same machine
            and thread count).
        disc_start: number of steps without the PatchGAN loss; it is on from step disc_start + 1 (latent-diffusion's
            kl-f8 config: 50001, i.e. off for shorter runs).
        disc_weight, disc_channels, disc_layers: its weight and its width / depth.
        kl_weight: weight of the KL term (per-pixel normalised as described in the module docstring).
        perceptual_weight: LPIPS weight when LPIPS is available locally (otherwise it is off and a message says so).
        val: held-out images (paths or `skimage:NAME`); default: every 10th image of `data` (at least one)
            is held out of training when there are at least 2 images.
        val_every: validate (and log PSNR / SSIM of the EMA model) every this many steps and at the end.
        val_max_side: centre-crop validation images to at most this size (None: full resolution).
        save_every: checkpoint every this many steps and at the end.
        threads: `torch.set_num_threads` value (None: leave as is).
        progress: show a tqdm progress bar with the losses.
        model_cls: the AutoencoderKL class (default: sdvae_fast's, else diffusers').
        log: where messages go.
    Raises:
        ValueError: bad arguments (named), an empty data folder, unreadable files, crops larger than an image,
            `resume` without a checkpoint or with a different model. FileNotFoundError: missing folder or image.
    """
    start_time = time.time()
    for name, value in (("steps", steps), ("batch", batch_size), ("val_every", val_every), ("save_every", save_every)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if lr <= 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    if kl_weight < 0 or disc_weight < 0:
        raise ValueError(f"--kl-weight and --disc-weight must be >= 0, got {kl_weight}, {disc_weight}")
    if disc_start < 0:
        raise ValueError(f"--disc-start must be >= 0, got {disc_start}")
    if threads is not None:
        torch.set_num_threads(threads)
    model_cls = model_cls or default_model_class()
    out_dir = Path(out_dir)

    # Data: every problem is reported here, before any model is built.
    dataset = CropDataset(data, crop)
    val_images: list[tuple[str, torch.Tensor]] = []
    if val is None and len(dataset) >= 2:
        held = list(range(0, len(dataset), 10))
        val_images = [(dataset.paths[i].name, dataset.images[i].float()[None] / 127.5 - 1.0) for i in held]
        dataset.images = [img for i, img in enumerate(dataset.images) if i not in held]
        dataset.paths = [p for i, p in enumerate(dataset.paths) if i not in held]
    elif val:
        val_images = [(str(src), load_image(src)) for src in val]
    if not val_images:
        log("validation: off (no --val images and only one training image)")

    state_dir = out_dir / STATE_DIR
    if resume and not (state_dir / "state.json").exists():
        raise ValueError(f"--resume: no checkpoint in {state_dir}")

    # Models and optimisers; the global RNG seeds the initial weights of a new VAE and of the discriminator.
    torch.manual_seed(seed)
    model, is_new = _build_vae(model_cls, vae, preset, config)
    model.train()
    factor = 2 ** (len(model.config["block_out_channels"]) - 1)  # pixels per latent along a side
    if crop % factor:
        raise ValueError(f"--crop must be a multiple of the VAE's downsampling factor {factor}, got {crop}")
    disc = NLayerDiscriminator(3, disc_channels, disc_layers)
    frozen = ("encoder.", "quant_conv.") if decoder_only else ()
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(frozen))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_ae = torch.optim.Adam(trainable, lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))
    ema_tracker = Ema(model, ema)
    ema_vae = model_cls(**{k: v for k, v in dict(model.config).items() if not k.startswith("_")})
    ema_vae.eval()
    last_layer = model.decoder.conv_out.weight

    generators = {"data": torch.Generator().manual_seed(seed), "latent": torch.Generator().manual_seed(seed + 1)}
    # The "first batch" of the scaling_factor recipe: the first batch the data sampler draws for this seed.
    reference_batch = dataset.sample(batch_size, torch.Generator().manual_seed(seed))
    scaling_factor = float(model.config["scaling_factor"]) if "scaling_factor" in model.config else 1.0

    # Everything a resumed run restores: weights, EMA, discriminator, optimisers, generator states, step.
    meta = {"decoder_only": decoder_only, "seed": seed, "batch_size": batch_size, "crop": crop, "is_new": is_new}
    step = 0
    if resume:
        saved = json.loads((state_dir / "state.json").read_text())
        for key in ("decoder_only", "batch_size", "crop"):
            if saved.get(key) != meta[key]:
                raise ValueError(f"--resume: checkpoint has {key}={saved.get(key)}, this run {meta[key]}")
        model.load_state_dict(load_file(state_dir / "model.safetensors"))
        ema_tracker.shadow = load_file(state_dir / "ema.safetensors")
        ema_tracker.num_updates = saved["ema_updates"]
        disc.load_state_dict(load_file(state_dir / "discriminator.safetensors"))
        blob = torch.load(state_dir / "optimizers_rng.pt", weights_only=True)
        opt_ae.load_state_dict(blob["opt_ae"])
        opt_d.load_state_dict(blob["opt_d"])
        for group in opt_ae.param_groups + opt_d.param_groups:
            group["lr"] = lr  # this run's --lr (the same value keeps the resume bit-exact)
        for key, gen in generators.items():
            gen.set_state(blob["rng"][f"generator.{key}"])
        torch.set_rng_state(blob["rng"]["torch"])
        step = saved["step"]
        is_new = saved["is_new"]
        meta["is_new"] = is_new
        log(f"resumed from {state_dir} at step {step}")

    lpips_model = _load_lpips() if perceptual_weight > 0 else None
    if perceptual_weight > 0 and lpips_model is None:
        log("LPIPS perceptual loss: off (the `lpips` package or its VGG16 weights are not available locally)")
    log(
        f"training {sum(p.numel() for p in trainable) / 1e6:.2f} M of "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters on {len(dataset)} image(s), "
        f"{len(val_images)} held out; discriminator from step {disc_start}"
    )

    def finish_ema() -> float:
        """Refresh the EMA model; measure scaling_factor with it for a new VAE."""
        ema_tracker.copy_to(ema_vae, model)
        if not is_new:
            return scaling_factor
        with torch.no_grad():
            latents = ema_vae.encode(reference_batch).latent_dist.sample(generator=torch.Generator().manual_seed(seed))
        return float(1.0 / latents.flatten().std())

    def validate() -> dict[str, Any]:
        per_image = {name: image_metrics(ema_vae, img, val_max_side) for name, img in val_images}
        record = {
            "step": step,
            "psnr": float(np.mean([m["psnr"] for m in per_image.values()])),
            "ssim": float(np.mean([m["ssim"] for m in per_image.values()])),
            "images": per_image,
        }
        with open(out_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        return record

    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    result = TrainResult(vae=ema_vae, discriminator=disc, out_dir=out_dir, scaling_factor=scaling_factor)
    bar = tqdm(total=steps, initial=step, disable=not progress, dynamic_ncols=True, desc="train")
    while step < steps:
        images = dataset.sample(batch_size, generators["data"])  # (B, 3, crop, crop)
        n_pixels = images[0].numel()

        # Generator (VAE) step. A frozen encoder runs without autograd, so its weights cannot change.
        if decoder_only:
            with torch.no_grad():
                posterior = model.encode(images).latent_dist
        else:
            posterior = model.encode(images).latent_dist
        latents = posterior.sample(generator=generators["latent"])  # (B, 4, crop/8, crop/8)
        recon = model.decode(latents).sample  # (B, 3, crop, crop)
        rec = (images - recon).abs()
        if lpips_model is not None:
            rec = rec + perceptual_weight * lpips_model(images, recon)
        rec_loss = rec.mean()
        kl_loss = posterior.kl().mean() / n_pixels  # sum over latent elements, per pixel
        loss = rec_loss + kl_weight * kl_loss
        stats = {"step": step + 1, "rec": rec_loss.item(), "kl": kl_loss.item()}
        disc_on = step >= disc_start
        if disc_on:
            disc.requires_grad_(False)  # the generator loss trains the VAE only
            g_loss = -disc(recon).mean()
            rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
            g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
            d_weight = (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight
            loss = loss + d_weight * g_loss
            stats.update(g_loss=g_loss.item(), d_weight=d_weight.item())
        opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        opt_ae.step()
        stats["loss"] = loss.item()

        # Discriminator step, on the same batch and the (detached) reconstruction.
        if disc_on:
            disc.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            d_loss = hinge_d_loss(disc(images), disc(recon.detach()))
            d_loss.backward()
            opt_d.step()
            stats["d_loss"] = d_loss.item()

        ema_tracker.update(model)
        step += 1
        # Validation and checkpoints use the EMA weights, the ones that are saved.
        result.history.append(stats)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if k != "step"}, refresh=False)

        last = step == steps
        if val_images and (step % val_every == 0 or last):
            result.scaling_factor = finish_ema()
            record = validate()
            result.validation.append(record)
            bar.write(f"step {step}: held-out PSNR {record['psnr']:.2f} dB, SSIM {record['ssim']:.4f}")
        if step % save_every == 0 or last:
            result.scaling_factor = finish_ema()
            _save_checkpoint(
                out_dir, step, model, ema_vae, ema_tracker, disc, opt_ae, opt_d, generators,
                result.scaling_factor, meta,
            )
    bar.close()
    if not result.history:
        log(f"nothing to do: the checkpoint in {out_dir} is already at step {step} (--steps {steps})")
        result.scaling_factor = finish_ema()
    result.wall_time = time.time() - start_time
    return result


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `sdvae-fast train` options to `parser` (returns it)."""
    src = parser.add_mutually_exclusive_group()
    parser.add_argument("--data", required=True, help="folder of PNG/JPEG training images (any sizes)")
    parser.add_argument("--out", required=True, help="output folder (diffusers layout + trainer_state/)")
    src.add_argument("--vae", help="start from this pretrained VAE (folder or name) and keep its scaling_factor")
    src.add_argument("--preset", choices=sorted(PRESETS), help="start a new VAE from this architecture (default: tiny)")
    src.add_argument("--config", help="start a new VAE from a JSON file (or JSON text) of AutoencoderKL kwargs")
    parser.add_argument("--decoder-only", action="store_true", help="freeze encoder and quant_conv")
    parser.add_argument("--steps", type=int, default=1000, help="total optimiser steps (default 1000)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--crop", type=int, default=256, help="random crop side in pixels, multiple of 8 (default 256)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (default 0.999)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/trainer_state")
    parser.add_argument(
        "--disc-start", type=int, default=50001, help="steps before the PatchGAN loss is switched on (default 50001)"
    )
    parser.add_argument("--disc-weight", type=float, default=0.5, help="PatchGAN loss weight (default 0.5)")
    parser.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight (default 1e-6)")
    parser.add_argument("--val", nargs="+", metavar="IMAGE", help="held-out images (paths or skimage:NAME)")
    parser.add_argument("--val-every", type=int, default=500, help="validate every K steps (default 500)")
    parser.add_argument(
        "--val-max-side", type=int, default=512, help="centre-crop held-out images to this size, 0: full (default 512)"
    )
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default 500)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: PyTorch's choice)")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run `train` from parsed `add_train_arguments` options; prints the final metrics; returns exit code 0."""
    result = train(
        args.data,
        args.out,
        vae=args.vae,
        preset=args.preset,
        config=args.config,
        decoder_only=args.decoder_only,
        steps=args.steps,
        batch_size=args.batch,
        crop=args.crop,
        lr=args.lr,
        ema=args.ema,
        seed=args.seed,
        resume=args.resume,
        disc_start=args.disc_start,
        disc_weight=args.disc_weight,
        kl_weight=args.kl_weight,
        val=args.val,
        val_every=args.val_every,
        val_max_side=args.val_max_side or None,
        save_every=args.save_every,
        threads=args.threads,
    )
    summary = f"saved EMA weights to {result.out_dir} (scaling_factor {result.scaling_factor:.5f})"
    if result.validation:
        summary += f"; held-out PSNR {result.validation[-1]['psnr']:.2f} dB, SSIM {result.validation[-1]['ssim']:.4f}"
    print(summary + f"; {result.wall_time:.0f} s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m sdvae_fast.train ...`: the same options as `sdvae-fast train`."""
    parser = add_train_arguments(argparse.ArgumentParser(prog="sdvae-fast train", description=__doc__.split("\n")[0]))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
