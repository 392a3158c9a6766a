"""Image I/O between Pillow and the VAE's tensor convention.

The VAE takes and returns images as (N, 3, H, W) tensors in [-1, 1] (diffusers' `VaeImageProcessor`
convention: `x = 2 * pixel / 255 - 1`). Sides that are not multiples of 8 are padded by edge replication before
encoding and cropped back after decoding, so the output has the input's size.

Transparency: the VAE has three input channels, so an image with an alpha channel (RGBA, LA, PA, or a palette /
grayscale / RGB file with a transparent colour) that has any pixel not fully opaque is composited over a white
background (`rgb * a + 255 * (1 - a)`, a = alpha / 255), as image viewers show it, and an `AlphaCompositedWarning`
says so (the CLI prints it as one warning line). Simply dropping alpha, as Pillow's `convert("RGB")` does, would
expose whatever colour the transparent pixels happen to store (often black), silently. A fully opaque alpha
channel changes nothing and gives no warning.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SKIMAGE_PREFIX = "skimage:"
# Pillow's single-channel integer modes that hold 16-bit samples (0..65535): 16-bit grayscale PNG and TIFF files
# open as "I;16" (Pillow >= 10.1 for PNG) or as 32-bit "I" (older Pillow); "I;16B"/"I;16L"/"I;16N" name the byte order.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# 65535 / 255: the factor between 16-bit and 8-bit full scale (x / 257 maps 0..65535 onto 0..255 exactly).
SIXTEEN_TO_EIGHT_BIT = 257.0


# Pillow modes that carry an alpha channel; palette, grayscale and RGB images may instead name a transparent colour.
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# The background transparent pixels are composited over (white, 8-bit).
ALPHA_BACKGROUND = 255.0


class AlphaCompositedWarning(UserWarning):
    """An image with transparent pixels was composited over white to give the VAE its three RGB channels."""


def rgb_array(img: Image.Image, name: str = "image") -> np.ndarray:
    """The (H, W, 3) float32 RGB samples in [0, 255] of an 8-bit Pillow image, alpha composited over white.

    Grayscale and palette images are expanded to RGB (Pillow's `convert`). When the image has an alpha channel
    or a transparent colour and any pixel is not fully opaque, the result is `rgb * a + 255 * (1 - a)` with
    a = alpha / 255 (not rounded), and an `AlphaCompositedWarning` naming `name` and the count of transparent
    pixels is issued. 16-bit grayscale modes are not handled here (see `load_image`).
    """
    has_alpha = img.mode in ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)
    if not has_alpha:
        return np.asarray(img.convert("RGB"), dtype=np.float32)
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)  # (H, W, 4)
    alpha = rgba[..., 3:] / 255.0  # (H, W, 1) in [0, 1]
    transparent = int((alpha[..., 0] < 1.0).sum())
    if transparent == 0:
        return np.ascontiguousarray(rgba[..., :3])
    warnings.warn(
        f"{name} has an alpha channel with {transparent} of {alpha.size} pixels not fully opaque: composited over "
        f"a white background (the VAE takes RGB only; the output has no alpha)", AlphaCompositedWarning,
        stacklevel=3)
    return rgba[..., :3] * alpha + ALPHA_BACKGROUND * (1.0 - alpha)


def load_image(source: Union[str, Path, Image.Image]) -> torch.Tensor:
    """Load an RGB image as a (1, 3, H, W) float32 tensor in [-1, 1].

    Grayscale and palette images are repeated over the three channels. Transparent pixels are composited over
    white with an `AlphaCompositedWarning` (see `rgb_array` and the module docstring). 16-bit grayscale images (Pillow modes I;16* and I, whose samples are 0..65535) are scaled
    by 1/257 to the 8-bit range, keeping their fractional values (Pillow's own conversion would clip them to
    white); 16-bit RGB files are already reduced to 8 bits by Pillow when opened.

    Args:
        source: a file path readable by Pillow, a PIL image, or `skimage:NAME` for a photo that scikit-image
            ships (`skimage:chelsea`, `skimage:astronaut`, `skimage:coffee`, ...).
    Raises:
        FileNotFoundError: the path does not exist. ValueError: the file is not an image Pillow can read, or the
        `skimage:` name is not one of scikit-image's RGB photos.
    """
    if isinstance(source, Image.Image):
        img = source
    elif str(source).startswith(SKIMAGE_PREFIX):
        img = Image.fromarray(_skimage_photo(str(source)[len(SKIMAGE_PREFIX):]))
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            img = Image.open(path)
            img.load()
        except Exception as exc:  # Pillow raises several types for unreadable files
            raise ValueError(f"cannot read image {path}: {exc}") from exc
    if img.mode in SIXTEEN_BIT_MODES:
        gray = np.asarray(img, dtype=np.float64) / SIXTEEN_TO_EIGHT_BIT  # (H, W) in [0, 255]
        arr = np.repeat(np.clip(gray, 0.0, 255.0)[..., None], 3, axis=-1).astype(np.float32)  # (H, W, 3)
    else:
        arr = rgb_array(img, str(source) if not isinstance(source, Image.Image) else "image")  # (H, W, 3), [0, 255]
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]  # (1, 3, H, W)
    return x / 127.5 - 1.0


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    fn = getattr(skimage.data, name, None)
    if fn is None or name.startswith("_"):
        raise ValueError(f"skimage.data has no image named {name!r} (try chelsea, coffee, astronaut)")
    arr = fn()
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"skimage:{name} is not an RGB photo (shape {arr.shape})")
    return arr[..., :3]


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """Convert (N, 3, H, W) or (3, H, W) values in [-1, 1] (any float dtype/device) to PIL RGB images."""
    if x.dim() == 3:
        x = x[None]
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] to a uint8 array (N, H, W, 3): the 8-bit image a user would save."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def pad_to_multiple(x: torch.Tensor, multiple: int = 8) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad the bottom and right of (N, C, H, W) so H and W are multiples of `multiple`.

    Returns the padded tensor and the original (H, W), to crop the decoded image back with `x[..., :H, :W]`.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


# SSIM's uniform 7x7 window (skimage's default) needs images at least this many pixels on each side.
SSIM_MIN_SIDE = 7


def image_metrics(reference: np.ndarray, reconstruction: np.ndarray) -> tuple[float, Optional[float]]:
    """PSNR (dB) and SSIM of two uint8 (H, W, 3) images, by skimage.metrics with data_range 255.

    SSIM uses skimage's default uniform 7x7 window over the RGB channel axis (Wang et al. 2004 use an 11x11
    Gaussian), so it is None for images smaller than `SSIM_MIN_SIDE` pixels on a side. PSNR is inf for identical
    images.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = float(peak_signal_noise_ratio(reference, reconstruction, data_range=255))
    if min(reference.shape[:2]) < SSIM_MIN_SIDE:
        return psnr, None
    return psnr, float(structural_similarity(reference, reconstruction, channel_axis=-1, data_range=255))


def format_ssim(ssim: Optional[float]) -> str:
    """SSIM with 4 decimals, or "n/a" when it was not measured (image too small)."""
    return "n/a" if ssim is None else f"{ssim:.4f}"
