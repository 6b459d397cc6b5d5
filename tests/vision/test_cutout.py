"""vision.cutout: own alpha vs segmenter, refinement (specks, feather), colour decontamination, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imagesmith.core.errors import BadRequest
from imagesmith.models import segment as S
from fixtures.cutout import ColourKeySegmenter, _cluttered, over, soft_disc
from imagesmith.vision.cutout import Cutout, alpha_box, cutout, decontaminate, own_alpha


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / max(1, (a | b).sum()))


class FakeSegmenter:
    """Answers a fixed matte (resized to the image if asked at another size) and counts its calls."""

    name = "fake-seg"

    def __init__(self, alpha: np.ndarray):
        self.alpha = alpha.astype(np.float32)
        self.calls = 0

    def predict(self, image: Image.Image) -> np.ndarray:
        self.calls += 1
        assert image.mode == "RGB"
        return self.alpha

    def cutout(self, image: Image.Image) -> Image.Image:
        return S.cutout_with(self.predict(image), image)


class RefusingSegmenter:
    name = "refusing"

    def predict(self, image: Image.Image) -> np.ndarray:
        raise AssertionError("the segmenter must not be called")


def blocky(alpha: np.ndarray, factor: int = 8) -> np.ndarray:
    """What a low-resolution network gives: the matte at 1/factor, upsampled bilinearly."""
    import cv2
    h, w = alpha.shape
    lo = cv2.resize(alpha, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    return np.clip(cv2.resize(lo, (w, h), interpolation=cv2.INTER_LINEAR), 0, 1)


# ------------------------------------------------------------------------------------------- segmenter
def test_red_disc_on_grey_with_a_fake_segmenter():
    w, h = 240, 180
    truth = soft_disc(w, h, edge=3.0)
    img = Image.fromarray(over((200, 40, 40), (225, 225, 220), truth))
    seg = FakeSegmenter(blocky(truth))
    cut = cutout(img, seg)
    assert isinstance(cut, Cutout) and seg.calls == 1 and cut.source == "fake-seg"
    assert cut.rgba.mode == "RGBA" and cut.rgba.size == (w, h)
    assert cut.alpha.dtype == np.float32 and cut.alpha.shape == (h, w)
    assert np.array_equal(np.asarray(cut.rgba)[..., 3], np.round(cut.alpha * 255).astype(np.uint8))
    assert iou(cut.alpha, truth) >= 0.9
    assert np.allclose(cut.box, alpha_box(truth), atol=2)
    assert cut.coverage == pytest.approx(float(truth.mean()), abs=0.01)
    # soft edge band, solid inside
    assert ((cut.alpha > 0.05) & (cut.alpha < 0.95)).any()
    assert cut.alpha[h // 2, w // 2] == 1.0


def test_specks_far_from_the_product_are_dropped():
    w, h = 200, 200
    truth = soft_disc(w, h, cx=120, cy=110, r=50)
    noisy = truth.copy()
    noisy[5:8, 5:8] = 1.0       # a speck in the corner
    noisy[150:200, 0:30] = 0.3  # faint haze
    img = Image.fromarray(over((30, 60, 200), (240, 240, 240), truth))
    cut = cutout(img, FakeSegmenter(noisy))
    assert np.allclose(cut.box, alpha_box(truth), atol=2)
    assert cut.alpha[:20, :20].max() == 0 and cut.alpha[150:, :30].max() == 0
    # refine=False keeps the raw matte (speck and all) and the photo's colours
    raw = cutout(img, FakeSegmenter(noisy), refine=False)
    assert raw.box[:2] == (5, 5)
    assert np.array_equal(np.asarray(raw.rgba)[..., :3], np.asarray(img))


def test_feathering_softens_a_hard_mask_and_scales():
    w, h = 256, 256
    hard = (soft_disc(w, h, edge=0.01) > 0.5).astype(np.float32)
    img = Image.fromarray(over((200, 40, 40), (225, 225, 220), hard))
    band = lambda c: int(((c.alpha > 0.02) & (c.alpha < 0.98)).sum())  # noqa: E731
    none = cutout(img, FakeSegmenter(hard), feather_px=0)
    auto = cutout(img, FakeSegmenter(hard))
    wide = cutout(img, FakeSegmenter(hard), feather_px=4)
    assert band(none) == 0 < band(auto) < band(wide)
    assert iou(wide.alpha, hard) > 0.97  # feathering keeps the boundary where it was
    with pytest.raises(BadRequest):
        cutout(img, FakeSegmenter(hard), feather_px=-1)


def test_default_segmenter_is_the_shipped_house_cutout_on_a_rendered_product():
    if not (S.house_cutout_dir() / "model.safetensors").is_file():
        pytest.skip("house-cutout not exported")
    # a shaded blue bottle with a neck, on a warm paper backdrop with a soft vertical falloff
    w, h, k = 256, 256, 4
    mask = Image.new("L", (w * k, h * k), 0)
    d = ImageDraw.Draw(mask)
    d.rounded_rectangle((int(w * k * .40), int(h * k * .30), int(w * k * .60), int(h * k * .88)),
                        radius=int(w * k * .04), fill=255)
    d.rectangle((int(w * k * .47), int(h * k * .16), int(w * k * .53), int(h * k * .31)), fill=255)
    truth = np.asarray(mask.resize((w, h), Image.BOX), np.float32) / 255.0
    x = np.linspace(0, 1, w)[None, :, None]
    body = np.broadcast_to(np.array([40, 110, 200]) * (0.6 + 0.4 * np.cos((x - 0.5) * 6)), (h, w, 3))
    y = np.linspace(0, 1, h)[:, None, None]
    backdrop = np.array([236, 232, 224]) * (1 - 0.1 * y) * np.ones((h, w, 3))
    img = Image.fromarray(over(body, backdrop, truth))
    cut = cutout(img)
    assert cut.source == "house-cutout"
    assert iou(cut.alpha, truth) >= 0.9, iou(cut.alpha, truth)
    assert np.allclose(cut.box, alpha_box(truth), atol=3)


# ------------------------------------------------------------------------------------------- own alpha
def test_meaningful_alpha_is_used_as_is():
    w, h = 120, 90
    a = np.round(soft_disc(w, h, edge=2.0) * 255).astype(np.uint8)
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, a]), "RGBA")
    cut = cutout(rgba, RefusingSegmenter())
    assert cut.source == "alpha"
    assert np.array_equal(np.asarray(cut.rgba), np.asarray(rgba))
    assert np.array_equal(cut.alpha, a.astype(np.float32) / 255.0)
    la = Image.fromarray(np.dstack([rgb[..., 0], a]), "LA")
    assert cutout(la, RefusingSegmenter()).source == "alpha"


def test_palette_transparency_is_used():
    pal = Image.new("P", (80, 60), 0)
    pal.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    ImageDraw.Draw(pal).ellipse((20, 10, 60, 50), fill=1)
    pal.info["transparency"] = 0
    assert own_alpha(pal) is not None
    cut = cutout(pal, RefusingSegmenter())
    assert cut.source == "alpha" and cut.box == (20, 10, 61, 51)


def test_opaque_or_fully_transparent_alpha_goes_to_the_segmenter():
    w, h = 100, 100
    truth = soft_disc(w, h)
    rgb = over((20, 120, 40), (230, 230, 230), truth)
    opaque = Image.fromarray(np.dstack([rgb, np.full((h, w), 255, np.uint8)]), "RGBA")
    seg = FakeSegmenter(truth)
    assert own_alpha(opaque) is None
    assert cutout(opaque, seg).source == "fake-seg" and seg.calls == 1
    clear = Image.fromarray(np.dstack([rgb, np.zeros((h, w), np.uint8)]), "RGBA")
    assert own_alpha(clear) is None
    with pytest.raises(BadRequest, match="empty"):  # flattened onto white, there is nothing to find
        cutout(clear, FakeSegmenter(np.zeros((h, w), np.float32)))


# ------------------------------------------------------------------------------------------------ refusals
def test_empty_and_full_masks_are_refused_with_one_line():
    img = Image.new("RGB", (64, 48), (200, 200, 200))
    with pytest.raises(BadRequest, match="no product found in product.png: the cutout mask is empty") as e:
        cutout(img, FakeSegmenter(np.zeros((48, 64), np.float32)), what="product.png")
    assert "\n" not in str(e.value)
    with pytest.raises(BadRequest, match="covers the whole image"):
        cutout(img, FakeSegmenter(np.ones((48, 64), np.float32)))
    tiny = np.zeros((48, 64), np.float32)
    tiny[10, 10] = 1.0  # one pixel: under 0.5% of the frame
    with pytest.raises(BadRequest, match="empty"):
        cutout(img, FakeSegmenter(tiny))
    with pytest.raises(BadRequest):
        cutout("not an image", FakeSegmenter(tiny))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- decontamination
def _green_excess(rgb: np.ndarray, sel: np.ndarray) -> float:
    px = rgb[sel].astype(np.float64)
    return float((px[:, 1] - (px[:, 0] + px[:, 2]) / 2).mean())


def test_decontamination_removes_the_green_fringe_and_keeps_the_interior():
    w, h = 160, 160
    alpha = soft_disc(w, h, r=50, edge=8.0)
    rng = np.random.default_rng(1)
    # a white-ish object with some texture, photographed on a green screen
    obj = np.clip(235 + rng.normal(0, 8, (h, w, 3)), 0, 255)
    photo = over(obj, (40, 200, 60), alpha)
    clean = decontaminate(photo, alpha)
    assert clean.dtype == np.uint8 and clean.shape == photo.shape
    interior = alpha >= 0.98
    assert np.array_equal(clean[interior], photo[interior])
    band = (alpha > 0.05) & (alpha < 0.95)
    on_black = lambda rgb: np.round(rgb * alpha[..., None]).astype(np.uint8)  # noqa: E731
    before, after = _green_excess(on_black(photo), band), _green_excess(on_black(clean), band)
    assert before > 15 and after < 0.25 * before, (before, after)
    # uint8 alpha is accepted; shapes are checked
    assert np.array_equal(decontaminate(photo, np.round(alpha * 255).astype(np.uint8))[interior], photo[interior])
    with pytest.raises(ValueError):
        decontaminate(photo, alpha[:10])


def test_cutout_decontaminates_its_edges():
    w, h = 160, 120
    truth = soft_disc(w, h, edge=6.0)
    photo = over((250, 250, 250), (40, 200, 60), truth)
    cut = cutout(Image.fromarray(photo), FakeSegmenter(truth))
    rgba = np.asarray(cut.rgba)
    a = rgba[..., 3:4].astype(np.float64) / 255.0
    band = (cut.alpha > 0.05) & (cut.alpha < 0.95)
    naive = np.round(photo * a).astype(np.uint8)
    ours = np.round(rgba[..., :3] * a).astype(np.uint8)
    assert _green_excess(ours, band) < 0.3 * _green_excess(naive, band)
    solid = cut.alpha >= 0.98
    assert np.array_equal(rgba[..., :3][solid], photo[solid])


# ------------------------------------------------------------------------------------------- "this one"
def test_a_box_picks_the_product_out_of_clutter():
    from imagesmith.vision.cutout import guided_matte
    img, truth = _cluttered()
    seg = ColourKeySegmenter()
    plain = guided_matte(img, seg)
    assert iou(plain, truth) < 0.6  # the slab came along
    boxed = guided_matte(img, seg, box=(105, 50, 195, 140))
    assert seg.sizes[-1][0] < img.width  # the segmenter saw the widened box, not the whole photo
    assert iou(boxed, truth) >= 0.95 and boxed[:, :80].max() == 0.0


def test_a_point_keeps_the_part_under_it_and_a_point_on_the_background_is_refused():
    from imagesmith.vision.cutout import guided_matte
    img, truth = _cluttered()
    seg = ColourKeySegmenter()
    picked = guided_matte(img, seg, point=(150, 95))
    assert iou(picked, truth) >= 0.95 and picked[:, :80].max() == 0.0
    slab = guided_matte(img, seg, point=(30, 90))
    assert slab[90, 30] == 1.0 and slab[95, 150] == 0.0
    with pytest.raises(BadRequest, match="product_point 220,10 is on the background") as err:
        guided_matte(img, seg, point=(220, 10))
    assert err.value.field == "product_point"


@pytest.mark.parametrize("value, message", [
    ("10,10,500,100", "lies outside the 240x180 image"), ("50,50,40,60", "is empty"),
    ("1,2,3", "4 numbers x0,y0,x1,y1"), ("a,b,c,d", "4 numbers"), ([0, 0, 2, 2], "too small")])
def test_bad_boxes_are_refused_naming_the_field(value, message):
    img, _ = _cluttered()
    with pytest.raises(BadRequest, match=message) as err:
        cutout(img, ColourKeySegmenter(), box=value)
    assert err.value.field == "product_box" and "product_box" in str(err.value)
    with pytest.raises(BadRequest, match="outside") as err:
        cutout(img, ColourKeySegmenter(), point="300,20")
    assert err.value.field == "product_point"


def test_fractional_boxes_are_fractions_of_the_size():
    from imagesmith.vision.cutout import parse_box, parse_point
    assert parse_box("0.25,0.5,0.75,1", (200, 100)) == (50, 50, 150, 100)
    assert parse_box([10, 20, 110, 90], (200, 100)) == (10, 20, 110, 90)
    assert parse_point("0.5,0.5", (200, 100)) == (100, 50)


def test_confidence_scores_clean_and_broken_mattes():
    from imagesmith.vision.cutout import cutout_confidence
    clean = soft_disc(200, 160, r=50)
    score, parts = cutout_confidence(clean)
    assert score >= 0.9 and parts["border"] == 0 and parts["parts"] == 0
    kept_table = clean.copy()
    kept_table[110:, :] = 1.0  # the table came along: the matte runs along three edges
    assert cutout_confidence(kept_table)[0] < 0.5
    haze = np.clip(clean * 0.5 + 0.25, 0, 1)  # everything half-sure
    assert cutout_confidence(haze)[0] < 0.5
    blobs = clean.copy()
    blobs[5:45, 160:195] = 1.0  # a second object, apart from the product
    assert cutout_confidence(blobs)[0] < score
    assert cutout_confidence(np.zeros((50, 50), np.float32))[0] == 0.0


def test_an_unclear_cutout_is_refused_and_a_box_fixes_it():
    from imagesmith.vision.cutout import UnclearCutout
    img, truth = _cluttered()
    with pytest.raises(UnclearCutout, match="could not be separated cleanly.*product_box") as err:
        cutout(img, ColourKeySegmenter(), min_confidence=0.5)
    assert err.value.field == "product_box" and err.value.confidence < 0.5
    cut = cutout(img, ColourKeySegmenter(), box="105,50,195,140", min_confidence=0.5)
    assert cut.confidence >= 0.5 and iou(cut.alpha, truth) >= 0.95
    loose = cutout(img, ColourKeySegmenter())  # no threshold: returned, with its low score
    assert loose.confidence < 0.5 and loose.confidence_parts["border"] > 0


def test_a_box_drops_slivers_of_neighbours_it_caught():
    from imagesmith.vision.cutout import guided_matte
    truth = soft_disc(240, 180, cx=130, cy=95, r=45)
    bit = np.zeros((180, 240), np.float32)
    bit[52:62, 178:186] = 1.0  # a corner of something else, inside the dragged box
    img = Image.fromarray(over((200, 30, 40), over((30, 60, 200), (128, 128, 128), bit), truth))
    m = guided_matte(img, ColourKeySegmenter(), box=(80, 45, 190, 145))
    assert m[57, 182] == 0.0 and iou(m, truth) >= 0.95


# ------------------------------------------------------------------------------ colour re-segmentation
def _real(name: str) -> dict:
    from imagesmith.train.cutout_data import real_photos
    return next(p for p in real_photos() if name in p["name"])


def test_a_box_on_a_real_photo_is_re_segmented_by_its_own_colours():
    """scikit-image's espresso cup (a real photograph, hand-masked): house-cutout alone, even with the box, loses
    the coffee and the saucer's shadowed rim; the box re-segmented by the photo's colours gets them back."""
    from imagesmith.models.segment import load_segmenter
    from imagesmith.vision.cutout import guided_matte
    cup, seg = _real("cup"), load_segmenter()
    alone = guided_matte(cup["image"], seg, box=cup["box"], colour=False)
    recut = guided_matte(cup["image"], seg, box=cup["box"])
    assert iou(alone, cup["mask"]) < 0.65
    assert iou(recut, cup["mask"]) >= 0.78
    x0, y0, x1, y1 = cup["box"]
    gx, gy = int(0.03 * (x1 - x0)) + 1, int(0.03 * (y1 - y0)) + 1
    outside = np.ones(recut.shape, bool)
    outside[y0 - gy:y1 + gy, x0 - gx:x1 + gx] = False
    assert recut[outside].max() <= 0.5  # nothing beyond the box the user drew (and its 3% margin)
    again = guided_matte(cup["image"], seg, box=cup["box"])
    assert np.array_equal(recut, again)  # deterministic (OpenCV's GrabCut draws from a seeded RNG)


def test_an_unclear_part_under_a_point_is_re_segmented_and_a_clear_one_is_kept():
    from imagesmith.models.segment import load_segmenter
    from imagesmith.vision.cutout import cutout_confidence, guided_matte
    cup, seg = _real("cup"), load_segmenter()
    alone = guided_matte(cup["image"], seg, point=cup["point"], colour=False)
    assert cutout_confidence(alone)[0] < 0.5
    tapped = guided_matte(cup["image"], seg, point=cup["point"])
    assert iou(tapped, cup["mask"]) >= iou(alone, cup["mask"]) + 0.15
    # a clean matte under the tap is the segmenter's own, untouched
    img, truth = _cluttered()
    clear = ColourKeySegmenter()
    assert np.array_equal(guided_matte(img, clear, point=(150, 95)),
                          guided_matte(img, clear, point=(150, 95), colour=False))


# ------------------------------------------------------------------------------ how far a guided cut is trusted
def test_a_box_whose_two_cuts_disagree_is_not_trusted():
    """scikit-image's motorcycle in a garage, boxed: the colour cut keeps the red crates behind it and loses the
    dark front wheel (IoU 0.62 against the hand mask), while looking crisp: the segmenter's own matte scores it
    confident. The segmenter's cut of the box and the colour cut disagree (IoU 0.32), so the guided matte's
    confidence is low, and the ad is refused rather than made."""
    from imagesmith.models.segment import load_segmenter
    from imagesmith.vision.cutout import UnclearCutout, cutout_confidence, scored_matte
    bike, seg = _real("motorcycle"), load_segmenter()
    alpha, score, parts = scored_matte(bike["image"], seg, box=bike["box"])
    assert iou(alpha, bike["mask"]) < 0.7 and cutout_confidence(alpha)[0] >= 0.5  # crisp, wrong
    assert parts["agreement"] < 0.5 and score < 0.5
    with pytest.raises(UnclearCutout, match="tighter product_box") as err:
        cutout(bike["image"], seg, box=bike["box"], min_confidence=0.5)
    assert err.value.field == "product_box"
    # a tap on its seat keeps the seat and tank only: the pieces beside it say the tap did not get it all
    alpha, score, parts = scored_matte(bike["image"], seg, point=bike["point"])
    assert iou(alpha, bike["mask"]) < 0.4 and parts["neighbours"] > 0.5 and score < 0.5
    with pytest.raises(UnclearCutout, match="give product_box") as err:
        cutout(bike["image"], seg, point=bike["point"], min_confidence=0.5)
    assert err.value.field == "product_box"


def test_a_tap_whose_colour_cut_drops_part_of_the_product_is_not_trusted():
    """scikit-image's espresso cup, tapped: the segmenter's part is unclear, so it is cut again by colour; that cut
    is crisp but drops the spoon and leaves a hole in the saucer (IoU 0.85 against the hand mask), and it used to
    make an ad at confidence 0.91. The part and its colour cut disagree (IoU 0.70), so the cut is not trusted and
    the ad is refused with a line that asks for a box."""
    from imagesmith.models.segment import load_segmenter
    from imagesmith.vision.cutout import UnclearCutout, cutout_confidence, scored_matte
    cup, seg = _real("cup"), load_segmenter()
    alpha, score, parts = scored_matte(cup["image"], seg, point=cup["point"])
    assert iou(alpha, cup["mask"]) < 0.9 and cutout_confidence(alpha)[0] >= 0.5  # crisp, and wrong
    assert parts["recut_agreement"] < 0.8 and score < 0.5
    with pytest.raises(UnclearCutout, match="give product_box") as err:
        cutout(cup["image"], seg, point=cup["point"], min_confidence=0.5)
    assert err.value.field == "product_box"


def test_matte_confidence_scales_by_agreement_and_neighbours():
    from imagesmith.vision.cutout import cutout_confidence, matte_confidence
    clean = soft_disc(200, 150, cx=100, cy=75, r=40)
    base = cutout_confidence(clean)[0]
    assert base > 0.9
    assert matte_confidence(clean)[0] == base
    assert matte_confidence(clean, agreement=0.95)[0] == base  # two cuts that agree: full trust
    assert matte_confidence(clean, agreement=0.5)[0] == 0.0  # they disagree: none
    half = matte_confidence(clean, agreement=0.675)
    assert abs(half[0] - base / 2) < 0.01 and half[1]["agreement"] == 0.675
    assert matte_confidence(clean, neighbours=0.05)[0] == base
    assert matte_confidence(clean, neighbours=0.8)[0] == 0.0
    assert matte_confidence(clean, recut_agreement=0.95)[0] == base  # a tap's colour cut: stricter than a box's
    assert matte_confidence(clean, recut_agreement=0.75)[0] == 0.0
    assert abs(matte_confidence(clean, recut_agreement=0.86)[0] - base / 2) < 0.01


def test_a_tap_beside_other_pieces_of_the_matte_is_less_trusted():
    """A segmenter that split the product into pieces (the motorcycle's seat, its body, its tail): a tap keeps
    one piece, and the others right beside it lower the confidence; a lone product tapped keeps its score."""
    from imagesmith.vision.cutout import scored_matte
    seat = np.zeros((180, 240), np.float32)
    seat[60:90, 100:140] = 1.0
    rest = np.zeros_like(seat)
    rest[93:140, 60:180] = 1.0  # the body below, split off by a thin gap
    rest[55:90, 60:97] = 1.0  # the tail beside it
    img = Image.fromarray(over((200, 30, 40), (128, 128, 128), seat + rest))
    _, score, parts = scored_matte(img, FakeSegmenter(seat + rest), point=(120, 75), colour=False)
    assert parts["neighbours"] > 0.5 and score < 0.5
    lone_img = Image.fromarray(over((200, 30, 40), (128, 128, 128), seat))
    _, lone, parts = scored_matte(lone_img, FakeSegmenter(seat), point=(120, 75), colour=False)
    assert parts["neighbours"] == 0.0 and lone > 0.8
