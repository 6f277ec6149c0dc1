import io

import numpy as np
import pytest
from conftest import encode
from PIL import Image

from ferpipe.preprocess import imaging
from ferpipe.preprocess.imaging import ClaheSettings, Reject


def test_jpeg_face_becomes_300x300_gray_in_three_channels(face_jpeg):
    frame = imaging.to_frame(imaging.decode_gray(face_jpeg))
    assert frame.shape == (300, 300, 3) and frame.dtype == np.uint8
    assert (frame[..., 0] == frame[..., 1]).all() and (frame[..., 1] == frame[..., 2]).all()


@pytest.mark.parametrize(
    "data, status",
    [
        (b"", "unreadable"),
        (b"this is a text file, not a JPEG", "unreadable"),
    ],
)
def test_non_images_are_rejected_as_unreadable(data, status):
    with pytest.raises(Reject) as err:
        imaging.decode_gray(data)
    assert err.value.status == status


def test_truncated_jpeg_is_unreadable(face_jpeg):
    with pytest.raises(Reject) as err:
        imaging.decode_gray(face_jpeg[: len(face_jpeg) // 2])
    assert err.value.status == "unreadable"


def test_sixteen_bit_tiff_uses_its_full_range():
    # Values 1000..4000 would all clip to 255 with a naive 8-bit conversion.
    ramp = np.linspace(1000, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)
    gray = imaging.decode_gray(encode(ramp, "TIFF"))
    assert gray.min() == 0 and gray.max() == 255
    assert np.all(np.diff(gray.astype(int).ravel()) >= 0)


def test_palette_tiff_and_cmyk_jpeg_and_alpha_png_decode(face_gray):
    rgb = np.stack([face_gray] * 3, axis=-1)
    palette = io.BytesIO()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(palette, format="TIFF")
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    alpha = np.dstack([rgb, np.full(face_gray.shape, 255, np.uint8)])
    alpha[:10, :10, 3] = 0  # transparent corner shows as white, not as the colour beneath
    for data in (palette.getvalue(), cmyk.getvalue(), encode(alpha, "PNG")):
        gray = imaging.decode_gray(data)
        assert gray.shape == face_gray.shape
        assert abs(float(gray[50:, 50:].mean()) - float(face_gray[50:, 50:].mean())) < 12
    assert imaging.decode_gray(encode(alpha, "PNG"))[:10, :10].min() == 255


def test_huge_and_tiny_images_are_rejected_before_decoding():
    huge = Image.new("1", (imaging.MAX_SIDE + 1, 8))
    buffer = io.BytesIO()
    huge.save(buffer, format="PNG")
    with pytest.raises(Reject) as err:
        imaging.decode_gray(buffer.getvalue())
    assert err.value.status == "too_large"
    with pytest.raises(Reject) as err:
        imaging.decode_gray(encode(np.zeros((16, 16), np.uint8)))
    assert err.value.status == "too_small"


def test_clahe_raises_local_contrast_and_follows_its_settings(face_gray):
    flat = (face_gray // 4 + 100).astype(np.uint8)  # a washed-out face
    frame = imaging.to_frame(flat)
    mild = imaging.equalize_contrast(frame, ClaheSettings(clip_limit=1.0, tile_grid=8))
    strong = imaging.equalize_contrast(frame, ClaheSettings(clip_limit=4.0, tile_grid=8))
    assert mild.shape == frame.shape
    assert frame[..., 0].std() < mild[..., 0].std() < strong[..., 0].std()


def test_png_round_trip_is_lossless(face_gray):
    frame = imaging.to_frame(face_gray)
    assert (imaging.decode_png(imaging.encode_png(frame)) == frame).all()


PEAK_MEMORY = """
import resource, sys
from ferpipe.preprocess.imaging import Reject, decode_gray
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_gray(data)
    print("decoded", 0)
except Reject as err:
    print(err.status, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_an_icon_is_refused_before_pillow_decodes_it(tmp_path):
    """Pillow's ICO loader decodes its embedded image inside Image.open: the format is not on the allow-list."""
    import subprocess
    import sys

    from conftest import REPO, flat_png, ico_holding

    icon = tmp_path / "big.ico"
    icon.write_bytes(ico_holding(flat_png(9400, 9400)))
    out = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(icon)], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout.split()
    status, grown_mib = out[0], int(out[1])
    assert status == "unreadable" and grown_mib < 40, out  # decoded, it took ~350 MB and then was "too_large"
    with pytest.raises(Reject, match="not an image format ferpipe can read"):
        imaging.image_size(icon.read_bytes())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP", "PPM"])
def test_every_format_ferpipe_lists_still_decodes(face_gray, fmt):
    assert imaging.decode_gray(encode(face_gray, fmt)).shape == face_gray.shape
