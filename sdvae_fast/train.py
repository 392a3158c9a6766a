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

Structure: `train(data, out_dir, **options)` is `run(TrainConfig(...))`. `run` calls the phases in order:
`load_data`, `build_models` (a `TrainState`), `resume_from_checkpoint`, then per step `generator_step`,
`discriminator_step` (once the discriminator is on) and the EMA update, with `validate` and `save` at their
intervals.
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
from .configs import PUBLIC_PRESETS, config_dict
from .images import image_metrics as pixel_metrics
from .images import load_image, pad_to_multiple, rgb_array, to_uint8
from .loading import safetensors_metadata

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
                    # (H, W, 3); transparent pixels composited over white, with a warning (sdvae_fast.images)
                    arr = np.round(rgb_array(img, str(path))).astype(np.uint8)
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
    `sdvae_fast.images.image_metrics` (skimage.metrics, data_range 255, SSIM over the RGB channel axis with the
    default 7x7 window). `max_side` centre-crops larger images to at most max_side x max_side first (None: full
    resolution).
    """
    if max_side is not None:
        h, w = image.shape[-2:]
        top, left = max(0, (h - max_side) // 2), max(0, (w - max_side) // 2)
        image = image[..., top : top + max_side, left : left + max_side]
    recon = reconstruct(vae, image)
    psnr, ssim = pixel_metrics(to_uint8(image)[0], to_uint8(recon)[0])  # of (H, W, 3) uint8 images
    return {"psnr": psnr, "ssim": ssim}


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
    # The config goes into the metadata too, so this file alone loads exactly with from_single_file.
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp / "model.safetensors",
              metadata=safetensors_metadata(config_dict(vae)))
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


@dataclass
class TrainConfig:
    """Every option of one training run (what `sdvae-fast train`'s flags set); `train(data, out_dir, **options)`
    builds one.

    data: folder of PNG/JPEG images of any size (each at least `crop` on both sides).
    out_dir: output folder; receives config.json + diffusion_pytorch_model.safetensors (the EMA weights, loadable
        by `from_pretrained` of sdvae_fast and diffusers), `trainer_state/` for resuming and `log.jsonl` (one line
        per validation).
    vae / preset / config: the starting model (at most one): a pretrained folder or name for
        `model_cls.from_pretrained`, a key of `PRESETS` ("tiny" is the default), or a JSON file / JSON text of
        `AutoencoderKL` constructor kwargs.
    decoder_only: freeze the encoder and quant_conv (their weights stay bit-identical, latents stay valid).
    steps: total optimiser steps (a resumed run continues up to this number).
    batch_size, crop: batch of `crop` x `crop` random crops (crop a multiple of 8).
    lr: Adam learning rate for the VAE and the discriminator. ema: EMA decay of the saved weights.
    seed: seeds data sampling, latent sampling and initialisation.
    resume: continue from `out_dir/trainer_state` (bit-identical to an uninterrupted run on the same machine and
        thread count).
    disc_start: number of steps without the PatchGAN loss; it is on from step disc_start + 1 (latent-diffusion's
        kl-f8 config: 50001, i.e. off for shorter runs).
    disc_weight, disc_channels, disc_layers: its weight and its width / depth.
    kl_weight: weight of the KL term (per-pixel normalised as described in the module docstring).
    perceptual_weight: LPIPS weight when LPIPS is available locally (otherwise it is off and a message says so).
    val: held-out images (paths or `skimage:NAME`); default: every 10th image of `data` (at least one) is held out
        of training when there are at least 2 images. The split is stored with the checkpoint; `resume` keeps it
        (None then means "as stored"; a different list is refused).
    val_every: validate (and log PSNR / SSIM of the EMA model) every this many steps and at the end.
    val_max_side: centre-crop validation images to at most this size (None: full resolution).
    save_every: checkpoint every this many steps and at the end.
    threads: `torch.set_num_threads` value (None: leave as is).
    progress: show a tqdm progress bar with the losses.
    model_cls: the AutoencoderKL class (default: sdvae_fast's, else diffusers').
    log: where messages go.
    """

    data: Union[str, Path]
    out_dir: Union[str, Path]
    vae: Optional[str] = None
    preset: Optional[str] = None
    config: Union[str, dict, None] = None
    decoder_only: bool = False
    steps: int = 1000
    batch_size: int = 4
    crop: int = 256
    lr: float = 1e-4
    ema: float = 0.999
    seed: int = 0
    resume: bool = False
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_channels: int = 64
    disc_layers: int = 3
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    val: Optional[Sequence[str]] = None
    val_every: int = 500
    val_max_side: Optional[int] = 512
    save_every: int = 500
    threads: Optional[int] = None
    progress: bool = True
    model_cls: Optional[type] = None
    log: Callable[[str], None] = print

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        """The config of parsed `add_train_arguments` options (`--val-max-side 0`: full resolution)."""
        return cls(
            args.data, args.out, vae=args.vae, preset=args.preset, config=args.config,
            decoder_only=args.decoder_only, steps=args.steps, batch_size=args.batch, crop=args.crop, lr=args.lr,
            ema=args.ema, seed=args.seed, resume=args.resume, disc_start=args.disc_start,
            disc_weight=args.disc_weight, kl_weight=args.kl_weight, val=args.val, val_every=args.val_every,
            val_max_side=args.val_max_side or None, save_every=args.save_every, threads=args.threads,
            progress=not getattr(args, "quiet", False),
        )

    def check(self) -> None:
        """Raise ValueError naming the flag for a non-positive step count, batch, interval or lr, or a negative
        weight or disc_start."""
        for name, value in (("steps", self.steps), ("batch", self.batch_size), ("val_every", self.val_every),
                            ("save_every", self.save_every)):
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.kl_weight < 0 or self.disc_weight < 0:
            raise ValueError(f"--kl-weight and --disc-weight must be >= 0, got {self.kl_weight}, {self.disc_weight}")
        if self.disc_start < 0:
            raise ValueError(f"--disc-start must be >= 0, got {self.disc_start}")

    @property
    def state_dir(self) -> Path:
        """Where the full trainer state (for `resume`) lives: out_dir/trainer_state."""
        return Path(self.out_dir) / STATE_DIR


@dataclass
class TrainState:
    """The models, optimisers and random generators of a run, and where it stands.

    model: the VAE being trained (train mode); is_new: its scaling_factor is measured (a VAE from a preset or
    config); disc: the PatchGAN; ema / ema_vae: the EMA tracker and the eval-mode model it is copied into (the
    one that is validated and saved); trainable: the VAE parameters being optimised; last_layer: the decoder's
    last weight (for the adaptive GAN weight); generators: "data" and "latent" generators; reference_batch: the
    first batch of the data sampler for this seed (the scaling_factor recipe); scaling_factor: the value stored
    in the config; meta: what a checkpoint records to check a resume; step: optimiser steps done so far.
    """

    model: nn.Module
    is_new: bool
    disc: nn.Module
    opt_ae: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: Ema
    ema_vae: nn.Module
    trainable: list
    last_layer: torch.Tensor
    generators: dict[str, torch.Generator]
    reference_batch: torch.Tensor
    scaling_factor: float
    meta: dict[str, Any]
    step: int = 0


def load_data(cfg: TrainConfig, saved_split: Optional[dict] = None
              ) -> tuple[CropDataset, list[tuple[str, torch.Tensor]], dict]:
    """The data phase: the training crops and the held-out images, every problem reported before any model.

    Returns (dataset, [(name, (1, 3, H, W) image in [-1, 1])], split); without `cfg.val`, every 10th image of the
    folder is held out (and removed from the dataset) when it has at least 2 images. `split` is what a checkpoint
    stores to keep the held-out set on resume: {"val": the --val sources or None, "held_out": names of the data
    files held out}.

    `saved_split` (a resumed run: the split stored with the checkpoint) wins: without `cfg.val` the stored --val
    images, or the same data files, are held out again, so a resume never trains on an image held out before.
    Raises ValueError naming --val when `cfg.val` differs from the stored split, or when a held-out data file
    is no longer in the folder.
    """
    dataset = CropDataset(cfg.data, cfg.crop)
    val_sources = None if cfg.val is None else [str(src) for src in cfg.val]
    held_names: Optional[list[str]] = None
    if saved_split is not None:
        stored = saved_split.get("val")
        if val_sources is not None and val_sources != stored:
            before = f"--val {' '.join(stored)}" if stored else (
                f"every 10th data image held out ({', '.join(saved_split.get('held_out', [])) or 'none'})")
            raise ValueError(
                f"--resume: this checkpoint was trained with the held-out split {before}; --val "
                f"{' '.join(val_sources)} would change it (and could train on images held out before). Omit --val "
                f"to keep the stored split, or train into a new --out")
        if stored is not None:
            val_sources = list(stored)
        else:
            held_names = list(saved_split.get("held_out", []))
    val_images: list[tuple[str, torch.Tensor]] = []
    if val_sources is None and (held_names is not None or len(dataset) >= 2):
        names = [p.name for p in dataset.paths]
        if held_names is None:
            held = list(range(0, len(dataset), 10))
        else:
            missing = [n for n in held_names if n not in names]
            if missing:
                raise ValueError(f"--resume: the held-out image(s) {missing} of this checkpoint are no longer in "
                                 f"--data {cfg.data}; restore them or train into a new --out")
            held = [names.index(n) for n in held_names]
        val_images = [(dataset.paths[i].name, dataset.images[i].float()[None] / 127.5 - 1.0) for i in held]
        dataset.images = [img for i, img in enumerate(dataset.images) if i not in held]
        dataset.paths = [p for i, p in enumerate(dataset.paths) if i not in held]
    elif val_sources:
        val_images = [(src, load_image(src)) for src in val_sources]
    if not val_images:
        cfg.log("validation: off (no --val images and only one training image)")
    elif saved_split is not None:
        cfg.log(f"held out (as stored with the checkpoint): {', '.join(name for name, _ in val_images)}")
    split = {"val": val_sources, "held_out": [] if val_sources is not None else [n for n, _ in val_images]}
    return dataset, val_images, split


def build_models(cfg: TrainConfig, dataset: CropDataset) -> TrainState:
    """The models phase: VAE, discriminator, optimisers, EMA, generators; the global RNG (seeded with cfg.seed)
    draws the initial weights of a new VAE and of the discriminator.

    Raises ValueError when the crop is not a multiple of the VAE's downsampling factor, or for conflicting model
    sources (see `_build_vae`).
    """
    torch.manual_seed(cfg.seed)
    model, is_new = _build_vae(cfg.model_cls, cfg.vae, cfg.preset, cfg.config)
    model.train()
    factor = 2 ** (len(model.config["block_out_channels"]) - 1)  # pixels per latent along a side
    if cfg.crop % factor:
        raise ValueError(f"--crop must be a multiple of the VAE's downsampling factor {factor}, got {cfg.crop}")
    disc = NLayerDiscriminator(3, cfg.disc_channels, cfg.disc_layers)
    frozen = ("encoder.", "quant_conv.") if cfg.decoder_only else ()
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(frozen))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_ae = torch.optim.Adam(trainable, lr=cfg.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    ema_tracker = Ema(model, cfg.ema)
    ema_vae = cfg.model_cls(**{k: v for k, v in dict(model.config).items() if not k.startswith("_")})
    ema_vae.eval()
    generators = {"data": torch.Generator().manual_seed(cfg.seed),
                  "latent": torch.Generator().manual_seed(cfg.seed + 1)}
    # The "first batch" of the scaling_factor recipe: the first batch the data sampler draws for this seed.
    reference_batch = dataset.sample(cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    scaling_factor = float(model.config["scaling_factor"]) if "scaling_factor" in model.config else 1.0
    meta = {"decoder_only": cfg.decoder_only, "seed": cfg.seed, "batch_size": cfg.batch_size, "crop": cfg.crop,
            "is_new": is_new}
    return TrainState(model=model, is_new=is_new, disc=disc, opt_ae=opt_ae, opt_d=opt_d, ema=ema_tracker,
                      ema_vae=ema_vae, trainable=trainable, last_layer=model.decoder.conv_out.weight,
                      generators=generators, reference_batch=reference_batch, scaling_factor=scaling_factor,
                      meta=meta)


def resume_from_checkpoint(cfg: TrainConfig, state: TrainState) -> None:
    """The resume phase: restore weights, EMA, discriminator, optimisers, generator states and the step from
    `cfg.state_dir` into `state` (this run's lr replaces the saved one; the same value keeps the resume bit-exact).

    Raises ValueError when the checkpoint was made with another decoder_only, batch size or crop.
    """
    state_dir = cfg.state_dir
    saved = json.loads((state_dir / "state.json").read_text())
    for key in ("decoder_only", "batch_size", "crop"):
        if saved.get(key) != state.meta[key]:
            raise ValueError(f"--resume: checkpoint has {key}={saved.get(key)}, this run {state.meta[key]}")
    state.model.load_state_dict(load_file(state_dir / "model.safetensors"))
    state.ema.shadow = load_file(state_dir / "ema.safetensors")
    state.ema.num_updates = saved["ema_updates"]
    state.disc.load_state_dict(load_file(state_dir / "discriminator.safetensors"))
    blob = torch.load(state_dir / "optimizers_rng.pt", weights_only=True)
    state.opt_ae.load_state_dict(blob["opt_ae"])
    state.opt_d.load_state_dict(blob["opt_d"])
    for group in state.opt_ae.param_groups + state.opt_d.param_groups:
        group["lr"] = cfg.lr
    for key, gen in state.generators.items():
        gen.set_state(blob["rng"][f"generator.{key}"])
    torch.set_rng_state(blob["rng"]["torch"])
    state.step = saved["step"]
    state.is_new = saved["is_new"]
    state.meta["is_new"] = state.is_new
    cfg.log(f"resumed from {state_dir} at step {state.step}")


def generator_step(cfg: TrainConfig, state: TrainState, images: torch.Tensor,
                   lpips_model: Optional[nn.Module]) -> tuple[dict[str, float], torch.Tensor, bool]:
    """One optimiser step of the VAE on a (B, 3, crop, crop) batch: L1 (+ LPIPS) + KL, plus the adaptive-weight
    GAN term once the discriminator is on (step >= disc_start).

    Returns (stats of this step, the reconstruction (B, 3, crop, crop), whether the discriminator is on). A frozen
    encoder runs without autograd, so its weights cannot change.
    """
    model = state.model
    n_pixels = images[0].numel()
    if cfg.decoder_only:
        with torch.no_grad():
            posterior = model.encode(images).latent_dist
    else:
        posterior = model.encode(images).latent_dist
    latents = posterior.sample(generator=state.generators["latent"])  # (B, 4, crop/8, crop/8)
    recon = model.decode(latents).sample  # (B, 3, crop, crop)
    rec = (images - recon).abs()
    if lpips_model is not None:
        rec = rec + cfg.perceptual_weight * lpips_model(images, recon)
    rec_loss = rec.mean()
    kl_loss = posterior.kl().mean() / n_pixels  # sum over latent elements, per pixel
    loss = rec_loss + cfg.kl_weight * kl_loss
    stats = {"step": state.step + 1, "rec": rec_loss.item(), "kl": kl_loss.item()}
    disc_on = state.step >= cfg.disc_start
    if disc_on:
        state.disc.requires_grad_(False)  # the generator loss trains the VAE only
        g_loss = -state.disc(recon).mean()
        rec_grad = torch.autograd.grad(rec_loss, state.last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, state.last_layer, retain_graph=True)[0]
        d_weight = (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * cfg.disc_weight
        loss = loss + d_weight * g_loss
        stats.update(g_loss=g_loss.item(), d_weight=d_weight.item())
    state.opt_ae.zero_grad(set_to_none=True)
    loss.backward()
    state.opt_ae.step()
    stats["loss"] = loss.item()
    return stats, recon, disc_on


def discriminator_step(state: TrainState, images: torch.Tensor, recon: torch.Tensor, stats: dict) -> None:
    """One hinge-loss step of the PatchGAN on the same batch and the detached reconstruction; adds d_loss to stats."""
    state.disc.requires_grad_(True)
    state.opt_d.zero_grad(set_to_none=True)
    d_loss = hinge_d_loss(state.disc(images), state.disc(recon.detach()))
    d_loss.backward()
    state.opt_d.step()
    stats["d_loss"] = d_loss.item()


def finish_ema(cfg: TrainConfig, state: TrainState) -> float:
    """Refresh the EMA model; return the scaling_factor to store (measured with the EMA model for a new VAE:
    1 / std of the latents of the reference batch)."""
    state.ema.copy_to(state.ema_vae, state.model)
    if not state.is_new:
        return state.scaling_factor
    with torch.no_grad():
        posterior = state.ema_vae.encode(state.reference_batch).latent_dist
        latents = posterior.sample(generator=torch.Generator().manual_seed(cfg.seed))
    return float(1.0 / latents.flatten().std())


def validate(cfg: TrainConfig, state: TrainState, val_images: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """The validation phase: PSNR / SSIM of the EMA model on each held-out image, appended to out_dir/log.jsonl.

    Returns {"step", "psnr" (mean), "ssim" (mean), "images": {name: {"psnr", "ssim"}}}.
    """
    per_image = {name: image_metrics(state.ema_vae, img, cfg.val_max_side) for name, img in val_images}
    record = {
        "step": state.step,
        "psnr": float(np.mean([m["psnr"] for m in per_image.values()])),
        "ssim": float(np.mean([m["ssim"] for m in per_image.values()])),
        "images": per_image,
    }
    with open(Path(cfg.out_dir) / "log.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def save(cfg: TrainConfig, state: TrainState, scaling_factor: float) -> None:
    """The saving phase: the EMA model in diffusers layout and the full trainer state (see `_save_checkpoint`)."""
    _save_checkpoint(Path(cfg.out_dir), state.step, state.model, state.ema_vae, state.ema, state.disc, state.opt_ae,
                     state.opt_d, state.generators, scaling_factor, state.meta)


def run(cfg: TrainConfig) -> TrainResult:
    """Train as `cfg` says: data, models, resume, then per step a generator step, a discriminator step (once
    on), the EMA update, and validation / saving at their intervals and at the end.

    Raises:
        ValueError: bad options (named), an empty data folder, unreadable files, crops larger than an image,
            `resume` without a checkpoint, with a different model, or with a --val that differs from the
            held-out split stored with the checkpoint. FileNotFoundError: missing folder or image.
    """
    start_time = time.time()
    cfg.check()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    cfg.model_cls = cfg.model_cls or default_model_class()
    out_dir = Path(cfg.out_dir)

    if cfg.resume and not (cfg.state_dir / "state.json").exists():
        raise ValueError(f"--resume: no checkpoint in {cfg.state_dir}")
    # A resumed run keeps the held-out split stored with its checkpoint (checkpoints older than that field
    # have none: their split is recomputed as before).
    saved_split = json.loads((cfg.state_dir / "state.json").read_text()).get("val_split") if cfg.resume else None
    dataset, val_images, split = load_data(cfg, saved_split)
    state = build_models(cfg, dataset)
    state.meta["val_split"] = split
    if cfg.resume:
        resume_from_checkpoint(cfg, state)

    lpips_model = _load_lpips() if cfg.perceptual_weight > 0 else None
    if cfg.perceptual_weight > 0 and lpips_model is None:
        cfg.log("LPIPS perceptual loss: off (the `lpips` package or its VGG16 weights are not available locally)")
    cfg.log(
        f"training {sum(p.numel() for p in state.trainable) / 1e6:.2f} M of "
        f"{sum(p.numel() for p in state.model.parameters()) / 1e6:.2f} M parameters on {len(dataset)} image(s), "
        f"{len(val_images)} held out; discriminator from step {cfg.disc_start}"
    )

    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    result = TrainResult(vae=state.ema_vae, discriminator=state.disc, out_dir=out_dir,
                         scaling_factor=state.scaling_factor)
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not cfg.progress, dynamic_ncols=True, desc="train")
    while state.step < cfg.steps:
        images = dataset.sample(cfg.batch_size, state.generators["data"])  # (B, 3, crop, crop)
        stats, recon, disc_on = generator_step(cfg, state, images, lpips_model)
        if disc_on:
            discriminator_step(state, images, recon, stats)
        state.ema.update(state.model)
        state.step += 1
        # Validation and checkpoints use the EMA weights, the ones that are saved.
        result.history.append(stats)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if k != "step"}, refresh=False)

        last = state.step == cfg.steps
        if val_images and (state.step % cfg.val_every == 0 or last):
            result.scaling_factor = finish_ema(cfg, state)
            record = validate(cfg, state, val_images)
            result.validation.append(record)
            bar.write(f"step {state.step}: held-out PSNR {record['psnr']:.2f} dB, SSIM {record['ssim']:.4f}")
        if state.step % cfg.save_every == 0 or last:
            result.scaling_factor = finish_ema(cfg, state)
            save(cfg, state, result.scaling_factor)
    bar.close()
    if not result.history:
        cfg.log(f"nothing to do: the checkpoint in {out_dir} is already at step {state.step} (--steps {cfg.steps})")
        result.scaling_factor = finish_ema(cfg, state)
    result.wall_time = time.time() - start_time
    return result


def train(data: Union[str, Path], out_dir: Union[str, Path], **options) -> TrainResult:
    """Train a VAE on random crops of a folder of images and save its EMA weights in diffusers layout.

    `run(TrainConfig(data, out_dir, **options))`: the options are the fields of `TrainConfig` (documented there).
    Raises TypeError for an unknown option, and what `run` raises.
    """
    return run(TrainConfig(data, out_dir, **options))


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `sdvae-fast train` options to `parser` (returns it)."""
    src = parser.add_mutually_exclusive_group()
    parser.add_argument("--data", required=True, help="folder of PNG/JPEG training images (any sizes)")
    parser.add_argument("--out", required=True, help="output folder (diffusers layout + trainer_state/)")
    src.add_argument("--vae", help="start from this pretrained VAE (folder or name) and keep its scaling_factor")
    src.add_argument("--preset", choices=PUBLIC_PRESETS,
                     help=f"start a new VAE from this architecture ({', '.join(PUBLIC_PRESETS)}; default: tiny)")
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
    parser.add_argument("--val", nargs="+", metavar="IMAGE",
                        help="held-out images (paths or skimage:NAME); default: every 10th image of --data. "
                             "--resume keeps the split stored with the checkpoint (a different --val is refused)")
    parser.add_argument("--val-every", type=int, default=500, help="validate every K steps (default 500)")
    parser.add_argument(
        "--val-max-side", type=int, default=512, help="centre-crop held-out images to this size, 0: full (default 512)"
    )
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default 500)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: PyTorch's choice)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run training from parsed `add_train_arguments` options; prints the final metrics; returns exit code 0."""
    result = run(TrainConfig.from_args(args))
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
