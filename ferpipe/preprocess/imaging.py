"""Stages 1 and 2: decode any offered file safely, make it the paper's input, enhance contrast.

Stage 1 turns whatever arrived (JPEG, PNG, 8/16-bit and palette TIFF, alpha,
CMYK) into one 8-bit gray image repeated to 3 channels, 300x300, bilinear.
Anything that is not a decodable image of plausible size raises `Reject` with
the status to record, never an exception the run dies of.

Images are read as a person sees them: a camera that stored its pixels
sideways and an EXIF orientation tag is turned upright before detection (the
SSD finds few faces lying on their side). Memory follows what is decoded, not
what the header declares: a large JPEG is decoded at 1/2, 1/4 or 1/8 scale by
the decoder itself (the 300x300 frame needs far fewer pixels), and a format
that cannot be reduced while decoding is refused when its raster alone would
exceed MAX_DECODED_BYTES.

Pillow is asked for the formats ferpipe reads and no others (`FORMATS`):
some of its loaders decode inside `Image.open`, before any size check can
run (the ICO loader decodes the whole embedded image: a 9400x9400 ICO took
~350 MB before being refused as too large). Every reader of a user's image
(training's stage 1, `ferpipe predict`, the served model) opens it here.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ferpipe.data.manifest import TOO_LARGE, TOO_SMALL, UNREADABLE

FRAME_SIZE = 300

# A face photo larger than 50 megapixels (or 20,000 px on a side) is not a
# face photo: refuse before decoding, so a decompression bomb costs nothing.
MAX_PIXELS = 50_000_000
MAX_SIDE = 20_000
MIN_SIDE = 32
# JPEGs above this many pixels decode reduced (DCT scaling) to no less than REDUCED_SIDE on the short side.
# Below it nothing changes, so results for ordinary photos stay bit-identical.
REDUCE_ABOVE_PIXELS = 16_000_000
REDUCED_SIDE = 1200
# Memory a format that cannot decode reduced (PNG, TIFF, ...) may take to become gray, estimated from the
# header as pixels x the peak bytes per pixel its mode costs here (measured: a 49 MP RGBA PNG peaks at ~18
# bytes a pixel through the alpha composite; 16-bit gray at ~6 with the row-wise stretch below).
MAX_DECODED_BYTES = 512 * 2**20
PEAK_BYTES_PER_PIXEL = {"1": 2, "L": 2, "P": 5, "RGB": 5, "YCbCr": 5, "CMYK": 6, "I;16": 6, "I;16B": 6,
                        "I;16L": 6, "I;16N": 6, "I": 10, "F": 10}
TRANSPARENT_PEAK_BYTES_PER_PIXEL = 18
ROWS_PER_CHUNK = 256
ORIENTATION_TAG = 0x0112
# Pillow's names of the formats ferpipe decodes (the dataset suffixes: .jpg .png .tif .bmp .gif .webp .pgm/.ppm).
# A camera JPEG holding a second picture (MPO) opens through the JPEG entry.
FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP", "PPM")


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


def open_image(data: bytes) -> Image.Image:
    """A lazy Pillow image (the header read, no pixel decoded) of one of FORMATS, or Reject."""
    if not data:
        raise Reject(UNREADABLE, "empty file")
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise Reject(UNREADABLE, "not an image format ferpipe can read") from None
    except Image.DecompressionBombError as err:
        raise Reject(TOO_LARGE, _short(err)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise Reject(UNREADABLE, _short(err)) from None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone, or Reject."""
    with open_image(data) as image:
        return image.size


def decode_gray(data: bytes) -> np.ndarray:
    """Bytes of any common image format -> 2-D uint8 gray, upright, or Reject."""
    return decode_upright(data)[0]


def decode_upright(data: bytes) -> tuple[np.ndarray, int]:
    """(2-D uint8 gray turned upright by its EXIF orientation, the orientation applied: 1 = none), or Reject."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = open_image(data)
            width, height = image.size
            if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
                raise Reject(TOO_LARGE, f"{width}x{height} exceeds {MAX_PIXELS} pixels or {MAX_SIDE} px a side")
            if min(width, height) < MIN_SIDE:
                raise Reject(TOO_SMALL, f"{width}x{height} is under {MIN_SIDE} px a side")
            _bound_decode(image)
            image.load()  # decodes now: truncated files fail here, not later
            orientation = _orientation(image)  # after load: a PNG's getexif() would decode it anyway
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
            return _to_gray(image), orientation
    except Reject:
        raise
    except UnidentifiedImageError:
        raise Reject(UNREADABLE, "not an image format ferpipe can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Reject(TOO_LARGE, _short(err)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise Reject(UNREADABLE, _short(err)) from None


def _orientation(image: Image.Image) -> int:
    try:
        value = int(image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001  a broken EXIF block is no reason to lose the image
        return 1
    return value if 1 <= value <= 8 else 1


def _bound_decode(image: Image.Image) -> None:
    """Decode large JPEGs reduced; refuse rasters too large to hold (before a byte is decoded)."""
    width, height = image.size
    if image.format in ("JPEG", "MPO") and width * height > REDUCE_ABOVE_PIXELS:
        scale = min(width, height) / REDUCED_SIDE
        image.draft(image.mode, (int(width / scale), int(height / scale)))
        return
    transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    per_pixel = TRANSPARENT_PEAK_BYTES_PER_PIXEL if transparent else PEAK_BYTES_PER_PIXEL.get(
        image.mode, TRANSPARENT_PEAK_BYTES_PER_PIXEL)
    if width * height * per_pixel > MAX_DECODED_BYTES:
        raise Reject(TOO_LARGE, f"{width}x{height} {image.mode} would take ~{width * height * per_pixel / 2**20:.0f}"
                     f" MiB to decode (limit {MAX_DECODED_BYTES / 2**20:.0f} MiB)")


def _to_gray(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit gray: stretch the used range to 8 bits; a plain convert('L') clips at 255.
        pixels = np.asarray(image)
        low, high = float(pixels.min()), float(pixels.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return _rows_to_uint8(pixels, lambda rows: (rows - low) * scale)
    if mode == "F":
        pixels = np.asarray(image)
        factor = 255.0 if pixels.max() <= 1.0 else 1.0
        return _rows_to_uint8(pixels, lambda rows: rows * factor)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels over white, as a viewer shows them, instead of the undefined colour beneath.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _rows_to_uint8(pixels: np.ndarray, transform) -> np.ndarray:
    """transform(float64 rows) clipped to uint8, a band of rows at a time: the same numbers as on the
    whole image at once, without a float64 copy of all of it."""
    out = np.empty(pixels.shape, np.uint8)
    for start in range(0, pixels.shape[0], ROWS_PER_CHUNK):
        rows = pixels[start:start + ROWS_PER_CHUNK].astype(np.float64)
        out[start:start + ROWS_PER_CHUNK] = np.clip(transform(rows), 0, 255).astype(np.uint8)
    return out


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
