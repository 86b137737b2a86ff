"""The input contract: how a photo becomes the model's uint8 RGB input. numpy + Pillow only.

This is the one copy of the rule, shared by the training pipeline (``pipeline/data.py``) and the
edge runner, so that what the model saw in training is exactly what it sees on a device:

1. decode with Pillow, apply the EXIF orientation, convert any mode to 8-bit RGB;
2. resize the shorter side to ``resize_shorter_to`` (the longer side scales, truncated);
3. center-crop ``height x width``.

Normalization (mean/std) is not done here: it lives inside the exported graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


class ImageDecodeError(ValueError):
    """A file that is not a usable image (corrupt, truncated, empty, or not an image at all)."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file into upright 8-bit RGB, or raise ImageDecodeError naming the file."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as img:
            img.load()  # force the full decode now: truncated files fail here, not mid-epoch
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"{path}: corrupt or truncated image ({e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Transparency is composited onto white (a plain backdrop)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16/32-bit grey: Pillow's own convert clips instead of scaling, so scale by hand.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def resize_shorter(img: Image.Image, shorter: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize so the shorter side is ``shorter`` pixels (torchvision's Resize(int) rule)."""
    w, h = img.size
    if w <= h:
        size = (shorter, int(shorter * h / w))
    else:
        size = (int(shorter * w / h), shorter)
    if size == (w, h):
        return img
    return img.resize(size, INTERPOLATION[interpolation])


def center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Center crop (torchvision's rounding); pads nothing, so the image must be large enough."""
    w, h = img.size
    if w < width or h < height:
        raise ValueError(f"image {w}x{h} is smaller than the crop {width}x{height}")
    left, top = _centered(w, width), _centered(h, height)
    return img.crop((left, top, left + width, top + height))


def _centered(length: int, crop: int) -> int:
    return int(round((length - crop) / 2.0))


def square_for_crop(img: Image.Image, side: int, crop: int) -> Image.Image:
    """The ``side`` square of an already resized image whose own center ``crop`` is exactly the
    contract's center crop of the image. (A plain center square can be a pixel off: the two
    roundings of a crop of a crop do not always add up.) Training caches these squares."""
    w, h = img.size
    inset = _centered(side, crop)
    left = min(max(_centered(w, crop) - inset, 0), w - side)
    top = min(max(_centered(h, crop) - inset, 0), h - side)
    return img.crop((left, top, left + side, top + side))


def shorter_side(size: list[int] | tuple[int, int], crop_pct: float) -> int:
    """The resize target for a crop of ``size`` keeping ``crop_pct`` of the shorter side (timm's rule)."""
    return round(max(size) / crop_pct)


def model_input(img: Image.Image, preprocess: dict) -> np.ndarray:
    """A photo to the model's uint8 HxWx3 input, following a manifest's ``preprocess`` section."""
    size = preprocess["size"]
    return resize_and_crop(img, size, shorter_side(size, preprocess["crop_pct"]), preprocess["interpolation"])


def resize_and_crop(
    img: Image.Image, size: tuple[int, int] | list[int], resize_shorter_to: int,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """The contract's geometric part: an RGB image to a uint8 HxWx3 array."""
    height, width = size
    img = resize_shorter(to_rgb(img), resize_shorter_to, interpolation)
    return np.asarray(center_crop(img, height, width), dtype=np.uint8)
