"""Stages 1 and 2: decode any offered file safely, make it the paper's input, enhance contrast.

Stage 1 turns whatever arrived (JPEG, PNG, 8/16-bit and palette TIFF, alpha,
CMYK) into one 8-bit gray image repeated to 3 channels, 300x300, bilinear.
Anything that is not a decodable image of plausible size raises `Reject` with
the status to record, never an exception the run dies of.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from ferpipe.data.manifest import TOO_LARGE, TOO_SMALL, UNREADABLE

FRAME_SIZE = 300

# A face photo larger than 50 megapixels (or 20,000 px on a side) is not a
# face photo: refuse before decoding, so a decompression bomb costs nothing.
MAX_PIXELS = 50_000_000
MAX_SIDE = 20_000
MIN_SIDE = 32


class Reject(Exception):
    """An input that gets a manifest row with `status` instead of pixels."""

    def __init__(self, status: str, detail: str = ""):
        super().__init__(f"{status}: {detail}" if detail else status)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class ClaheSettings:
    clip_limit: float = 2.0
    tile_grid: int = 8


def decode_gray(data: bytes) -> np.ndarray:
    """Bytes of any common image format -> 2-D uint8 gray, or Reject."""
    if not data:
        raise Reject(UNREADABLE, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
                raise Reject(TOO_LARGE, f"{width}x{height} exceeds {MAX_PIXELS} pixels or {MAX_SIDE} px a side")
            if min(width, height) < MIN_SIDE:
                raise Reject(TOO_SMALL, f"{width}x{height} is under {MIN_SIDE} px a side")
            image.load()  # decodes now: truncated files fail here, not later
            return _to_gray(image)
    except Reject:
        raise
    except UnidentifiedImageError:
        raise Reject(UNREADABLE, "not an image format ferpipe can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Reject(TOO_LARGE, _short(err)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise Reject(UNREADABLE, _short(err)) from None


def _to_gray(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit gray: stretch the used range to 8 bits; a plain convert('L') clips at 255.
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return np.clip((pixels - low) * scale, 0, 255).astype(np.uint8)
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        return np.clip(pixels * (255.0 if pixels.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels over white, as a viewer shows them, instead of the undefined colour beneath.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _short(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"[:200]


def to_frame(gray: np.ndarray, size: int = FRAME_SIZE) -> np.ndarray:
    """Stage 1's output: gray repeated to 3 channels, size x size, bilinear (the paper's resize)."""
    resized = cv2.resize(gray, (size, size), interpolation=cv2.INTER_LINEAR)
    return cv2.merge([resized, resized, resized])


def equalize_contrast(frame: np.ndarray, settings: ClaheSettings = ClaheSettings()) -> np.ndarray:
    """Stage 2: CLAHE on the gray channel, repeated back to 3 channels."""
    clahe = cv2.createCLAHE(clipLimit=settings.clip_limit, tileGridSize=(settings.tile_grid, settings.tile_grid))
    gray = frame[..., 0] if frame.ndim == 3 else frame
    enhanced = clahe.apply(np.ascontiguousarray(gray))
    return cv2.merge([enhanced, enhanced, enhanced])


def encode_png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """A PNG this project wrote (3-channel uint8)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise Reject(UNREADABLE, "not a PNG written by ferpipe")
    return image
