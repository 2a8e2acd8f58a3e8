"""gemma3.image against the reference image processor (fixtures from
tests/fixtures/make_image_fixtures.py): pixels within one uint8 step (bit-exact in practice), pan &
scan crops exactly, WebP decoding equal to Pillow's; hostile inputs raise clear errors."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import image as gi

HERE = Path(__file__).parent
IMAGES = HERE / "data" / "images"
REF = np.load(HERE / "fixtures" / "image_ref.npz")
INDEX = json.loads(REF["index"].tobytes())
GRID = (slice(None), slice(None), slice(3, None, 11), slice(5, None, 11))
STEP = 1 / 127.5  # one uint8 step after x / 127.5 - 1


def _u8(px):
    u8 = np.round((px.astype(np.float64) + 1) * 127.5)
    assert np.abs(u8 / 127.5 - 1 - px).max() < 1e-6
    return u8.astype(np.uint8)


def _mem_image(name):
    pytest.importorskip("PIL")
    import importlib.util

    spec = importlib.util.spec_from_file_location("mk", HERE / "fixtures" /
                                                  "make_image_fixtures.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    return mk.in_memory()[name]


@pytest.mark.parametrize("key", sorted(INDEX))
def test_pixel_parity(key):
    name, pas = key.rsplit("/pas", 1)
    if not name.endswith(".webp"):
        pytest.importorskip("PIL")
    src = IMAGES / name if INDEX[key]["kind"] == "file" else _mem_image(name)
    out = gi.preprocess(src, pan_and_scan=pas == "1")
    px = out.pixel_values
    assert px.dtype == np.float32 and px.shape == tuple(REF[key + "/shape"])
    assert len(out.crops) == INDEX[key]["num_crops"]
    assert px.min() >= -1 and px.max() <= 1
    ours = _u8(px)
    d = np.abs(ours[GRID].astype(int) - REF[key + "/grid"]).max()
    exact = hashlib.sha256(ours.tobytes()).digest() == REF[key + "/sha256"].tobytes()
    print(f"\n{key}: max |Δ| {d} uint8 steps on the grid, full image bit-exact: {exact}")
    assert d <= 1, f"{key}: max |Δ| {d} uint8 steps"


def reference_boxes(w, h, min_crop=256, max_crops=4, min_ratio=1.2):
    """§4.2 of the transformers digest, written independently of gemma3.image."""
    if w >= h:
        if w / h < min_ratio:
            return []
        n_w = max(2, min(math.floor(w / min_crop), math.floor(w / h + 0.5)))
        n_w, n_h = min(max_crops, n_w), 1
    else:
        if h / w < min_ratio:
            return []
        n_h = max(2, min(math.floor(h / min_crop), math.floor(h / w + 0.5)))
        n_h, n_w = min(max_crops, n_h), 1
    cw, ch = math.ceil(w / n_w), math.ceil(h / n_h)
    if min(cw, ch) < min_crop:
        return []
    return [(x, y, min(x + cw, w), min(y + ch, h)) for y in range(0, ch * n_h, ch)
            for x in range(0, cw * n_w, cw)]


@pytest.mark.parametrize("w,h", [(1000, 400), (600, 500), (1500, 300), (300, 700), (37, 911),
                                 (896, 896), (5000, 256), (255, 900), (2000, 1000), (4000, 300)])
def test_pan_and_scan_boxes(w, h):
    img = np.zeros((h, w, 3), np.uint8)
    crops, boxes = gi.pan_and_scan(img)
    assert boxes == reference_boxes(w, h)
    for c, (x0, y0, x1, y1) in zip(crops, boxes, strict=True):
        assert c.shape == (y1 - y0, x1 - x0, 3)


def test_pan_and_scan_worked_examples():
    _, b = gi.pan_and_scan(np.zeros((400, 1000, 3), np.uint8))
    assert b == [(0, 0, 334, 400), (334, 0, 668, 400), (668, 0, 1000, 400)]
    _, b = gi.pan_and_scan(np.zeros((300, 600, 3), np.uint8), min_crop_size=10, max_num_crops=2)
    assert b == [(0, 0, 300, 300), (300, 0, 600, 300)]
    out = gi.preprocess(np.zeros((500, 600, 3), np.uint8), pan_and_scan=True, size=32)
    assert out.pixel_values.shape == (3, 3, 32, 32) and out.original_size == (500, 600)


@pytest.mark.parametrize("name", sorted(p.name for p in IMAGES.glob("*.webp")))
def test_webp_decoding_equals_pillow(name):
    data = (IMAGES / name).read_bytes()
    ours = gemma3._core.webp_decode(data)
    assert ours.shape == tuple(REF[name + "/decoded_shape"])
    assert hashlib.sha256(ours.tobytes()).digest() == REF[name + "/decoded"].tobytes()
    try:
        from PIL import Image
    except ImportError:
        return
    np.testing.assert_array_equal(ours, np.asarray(Image.open(IMAGES / name)))


def test_inputs_agree():
    PIL = pytest.importorskip("PIL.Image")
    p = IMAGES / "portrait_300x700.png"
    a = gi.load_image(p)
    assert a.shape == (700, 300, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(gi.load_image(str(p)), a)
    np.testing.assert_array_equal(gi.load_image(p.read_bytes()), a)
    np.testing.assert_array_equal(gi.load_image(PIL.open(p)), a)
    np.testing.assert_array_equal(gi.load_image(a), a)
    g = gi.load_image(a[..., 0])
    assert g.shape == a.shape and (g == a[..., :1]).all()
    rgba = np.concatenate([a, np.full((700, 300, 1), 128, np.uint8)], -1)
    np.testing.assert_array_equal(gi.load_image(rgba, alpha="drop"), a)
    w = gi.load_image(rgba)
    np.testing.assert_array_equal(w, np.round(a * (128 / 255) + (1 - 128 / 255) * 255))
    before = a.copy()
    gi.preprocess(a, pan_and_scan=True)
    np.testing.assert_array_equal(a, before)  # input unchanged


def test_alpha_composite_matches_pil():
    Image = pytest.importorskip("PIL.Image")
    rgba = np.random.default_rng(0).integers(0, 256, (50, 70, 4), dtype=np.uint8)
    ref = Image.alpha_composite(Image.new("RGBA", (70, 50), (255,) * 4),
                                Image.fromarray(rgba, "RGBA")).convert("RGB")
    np.testing.assert_array_equal(gi._composite_white_pil_math(rgba), np.asarray(ref))


def test_resize_matches_pil_odd_sizes():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    for sw, sh, dw, dh in [(1, 1, 3, 5), (31, 33, 255, 7), (257, 640, 32, 256), (640, 31, 33, 1),
                           (100, 105, 99, 100), (100, 102, 99, 100), (2560, 3, 896, 896)]:
        img = rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(img).resize((dw, dh), Image.BILINEAR))
        np.testing.assert_array_equal(gi.resize(img, dh, dw), ref, err_msg=f"{sw}x{sh}->{dw}x{dh}")


def _webp_bytes():
    return (IMAGES / "landscape_1000x400.webp").read_bytes()


def _png_bytes():
    return (IMAGES / "gray_250x180.png").read_bytes()


def _huge_webp(w=16384, h=16384):
    # a lossless VP8L header declaring w x h (the bitstream is cut short after it): 45 bytes
    bits = (w - 1) | ((h - 1) << 14) | (0 << 28)
    vp8l = b"\x2f" + bits.to_bytes(4, "little") + b"\x00" * 16
    chunk = b"VP8L" + len(vp8l).to_bytes(4, "little") + vp8l
    return b"RIFF" + (4 + len(chunk)).to_bytes(4, "little") + b"WEBP" + chunk


HOSTILE = [
    ("empty-bytes", lambda: b"", "empty image data"),
    ("webp-truncated", lambda: _webp_bytes()[:200], "truncated or corrupt|not a decodable"),
    ("webp-header-only", lambda: _webp_bytes()[:30], "not a decodable|truncated"),
    ("webp-garbage-payload", lambda: _webp_bytes()[:40] + b"\xff" * 3000, "corrupt|decodable"),
    ("webp-huge", _huge_webp, "too large"),
    ("not-an-image", lambda: b"hello, this is text and not a picture at all", "not an image"),
    ("png-truncated", lambda: _png_bytes()[:100], "broken or truncated"),
    ("zero-size-array", lambda: np.zeros((0, 5, 3), np.uint8), "zero size"),
    ("huge-array-side", lambda: np.lib.stride_tricks.as_strided(np.zeros(3, np.uint8),
                                                                (20000, 2, 3), (0, 0, 1)),
     "too large"),
    ("float-array", lambda: np.zeros((4, 4, 3), np.float32), "must be uint8"),
    ("bad-channels", lambda: np.zeros((4, 4, 2), np.uint8), "shape"),
    ("wrong-type", lambda: 12345, "cannot read an image from int"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_inputs(case):
    _, make, msg = case
    obj = make()
    if isinstance(obj, bytes) and not obj.startswith(b"RIFF"):
        pytest.importorskip("PIL")
    with pytest.raises(ValueError, match=msg):
        gi.preprocess(obj)
    # the process keeps working
    assert gi.preprocess(np.full((3, 5, 3), 255, np.uint8), size=8).pixel_values.max() == 1


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        gi.load_image(tmp_path / "nope.png")
    with pytest.raises(OSError):
        gi.load_image(tmp_path)


def test_huge_pil_image_rejected_before_decoding():
    Image = pytest.importorskip("PIL.Image")
    im = Image.new("L", (1, 1))
    im._size = (20000, 20000)  # what a hostile header declares
    with pytest.raises(ValueError, match="too large"):
        gi.load_image(im)


def test_pixel_limit_is_checked_from_the_header(monkeypatch):
    # 2^27 pixels by default: at the limit the header passes and the short bitstream fails to
    # decode; one row more is refused from the header, before any pixel memory is allocated
    assert gi.MAX_PIXELS == 1 << 27
    with pytest.raises(ValueError, match="truncated or corrupt|not enough data"):
        gi.load_image(_huge_webp(16384, 8192))
    with pytest.raises(ValueError, match=r"16384 x 8193 pixels is too large .*134217728 pixels"):
        gi.load_image(_huge_webp(16384, 8193))
    # the C reader's own bound (2^28) when called without a limit, and with one
    with pytest.raises(ValueError, match="truncated or corrupt|not enough data"):
        gemma3._core.webp_decode(_huge_webp(16384, 8193))
    with pytest.raises(ValueError, match="1000 x 400 pixels is too large"):
        gemma3._core.webp_decode(_webp_bytes(), max_pixels=399_999)
    assert gemma3._core.webp_decode(_webp_bytes(), max_pixels=400_000).shape == (400, 1000, 3)

    # the limit is a setting: every source is held to it, and the old value restores them
    monkeypatch.setattr(gi, "MAX_PIXELS", 1000 * 400 - 1)
    sources = [_webp_bytes(), np.zeros((400, 1000, 3), np.uint8)]
    if _has_pil():  # a PIL image and PNG bytes, both checked before decoding
        import io

        from PIL import Image
        png = io.BytesIO()
        Image.new("RGB", (1000, 400)).save(png, "PNG")
        sources += [Image.new("RGB", (1000, 400)), png.getvalue()]
    for src in sources:
        with pytest.raises(ValueError, match="1000 x 400 pixels is too large"):
            gi.load_image(src)
    for bad in (0, -5, 2.5, "many", True, 16384 * 16384 + 1):
        monkeypatch.setattr(gi, "MAX_PIXELS", bad)
        with pytest.raises(ValueError, match="gemma3.image.MAX_PIXELS must be an int"):
            gi.load_image(_webp_bytes())
    monkeypatch.setattr(gi, "MAX_PIXELS", 1000 * 400)
    for src in sources:
        assert gi.load_image(src).shape == (400, 1000, 3)


def _has_pil():
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


def test_pillow_decompression_bomb_is_a_size_error(monkeypatch):
    # MAX_PIXELS raised past Pillow's own limit: Pillow refuses, and the message says why
    Image = pytest.importorskip("PIL.Image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # errors above 2x: 250x180 is 45,000
    with pytest.raises(ValueError, match="too large for Pillow.*MAX_IMAGE_PIXELS"):
        gi.load_image(_png_bytes())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    assert gi.load_image(_png_bytes()).shape == (180, 250, 3)


def test_webp_decode_never_crashes_on_mutations():
    data = bytearray(_webp_bytes())
    rng = np.random.default_rng(0)
    for _ in range(200):
        d = bytearray(data[: rng.integers(12, len(data))])
        for i in rng.integers(0, len(d), 4):
            d[i] = rng.integers(0, 256)
        try:
            gemma3._core.webp_decode(bytes(d))
        except (ValueError, NotImplementedError):
            pass
