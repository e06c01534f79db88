"""Image loading that never trusts its input: any mode to RGB, EXIF orientation, bomb guard.

Every failure surfaces as `ImageError` with a one-line reason, so the CLI, the indexer's build
report and the HTTP service can each turn it into their own clear error.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # ~8000x8000; larger is refused before decoding


class ImageError(ValueError):
    """An image that cannot be used, with a human-readable reason."""


def load_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open a path or bytes as an RGB PIL image, or raise ImageError."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageError("empty file (0 bytes)")
        fp: io.BytesIO | Path = io.BytesIO(source)
    else:
        fp = Path(source)
        if not fp.is_file():
            raise ImageError(f"not a file: {fp}")
        if fp.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image too large: {w}x{h} pixels exceeds the limit of {max_pixels}")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image too large: over the limit of {max_pixels} pixels (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError("not a readable image (unknown or unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not lose an otherwise good image
        pass
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo + 1e-9) * 255.0
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then a centred square crop (keeps aspect ratio)."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def efficientnet_tensor(img: Image.Image, size: int = 224) -> torch.Tensor:
    """EfficientNet-Lite preprocessing: (pixel - 127) / 128, CHW float32."""
    arr = np.asarray(resize_center_crop(img, size), dtype=np.float32)
    return torch.from_numpy((arr - 127.0) / 128.0).permute(2, 0, 1).contiguous()


def imagenet_tensor(img: Image.Image, size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    arr = np.asarray(resize_center_crop(img, size), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
