"""The product-ad studio end to end on the shipped house models (house-cutout cuts, house-ldm paints).

Few sampler steps and the Lanczos upscaler keep it quick; every property is checked on the written files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from imagesmith.core.requests import AdRequest
from imagesmith.core.settings import Settings
from imagesmith.workflows.product_ad import ProductAdStudio, cover_transform, generation_canvas


def product_photo(path: Path, size=(480, 400), seed=0) -> Path:
    """A phone-photo-like shot: a shaded orange bottle on a light, slightly noisy table backdrop (JPEG)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy = np.linspace(0, 1, h)[:, None, None]
    ground = (np.array([228, 226, 220]) * (1 - 0.15 * yy)).repeat(w, axis=1)
    ground = ground + rng.normal(0, 3, ground.shape)
    img = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((190, 120, 290, 340), radius=30, fill=(230, 110, 30))
    d.rectangle((220, 70, 260, 125), fill=(40, 40, 45))
    d.ellipse((205, 160, 235, 300), fill=(250, 170, 90))  # highlight
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    img.save(path, quality=92)
    return path


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from imagesmith.engine.generate import Engine
    home = tmp_path_factory.mktemp("home")
    return ProductAdStudio(Engine(Settings(home=home), device="cpu"))


@pytest.fixture(scope="module")
def made(studio, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ads")
    photo = product_photo(folder / "bottle.jpg")
    broken = folder / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    req = AdRequest(products=[str(photo), str(broken)], concept="a bottle on a marble surface",
                    headline="Summer Glow Serum", subline="Light, fresh, made to last all day", cta="Shop now",
                    brand_color="#0a6cff", formats=["1:1", "9:16", "1.91:1", "300x250", "320x50"],
                    seed=7, steps=4, upscaler="Lanczos")
    result = studio.make(req, folder / "out")
    return req, result, folder


def test_batch_finishes_and_reports_the_bad_item(made):
    req, result, folder = made
    assert [f.product for f in result.failures] == [str(folder / "broken.jpg")]
    assert "broken.jpg" in result.failures[0].error
    assert sorted(o.format for o in result.outputs) == sorted(["1:1", "9:16", "1.91:1", "300x250", "320x50"])
    manifest = json.loads(Path(result.manifest_path).read_text())
    assert len(manifest["outputs"]) == 5 and len(manifest["failures"]) == 1
    for entry in manifest["outputs"]:
        for key in ("format", "path", "html_path", "width", "height", "seed", "request", "product_box",
                    "product_scale", "product_pixels_preserved", "text", "occ", "rea"):
            assert key in entry


def test_outputs_have_format_sizes_and_budgets(made):
    _, result, _ = made
    for o in result.outputs:
        with Image.open(o.path) as im:
            assert im.size == (o.width, o.height)
        if o.format in ("300x250", "320x50"):
            assert Path(o.path).stat().st_size <= 150 * 1024
        html = Path(o.html_path).read_text()
        assert "Summer Glow Serum" in html and (Path(o.html_path).parent / "fonts").is_dir() and Path(o.html_path).with_name(Path(o.background_path).name).is_file()


def test_product_pixels_are_the_cutouts(made):
    """Inside the product mask eroded by 2 px, every output equals the resized cutout, recomputed here."""
    import cv2
    from imagesmith.compose.composite import fit_product
    from imagesmith.models.segment import load_segmenter
    from imagesmith.vision.cutout import cutout
    req, result, _ = made
    from imagesmith.workflows.product_ad import product_crop
    product = product_crop(cutout(Image.open(req.products[0]), load_segmenter()))
    for o in result.outputs:
        x0, y0, x1, y1 = o.product_box
        fitted = fit_product(product, (x1 - x0, y1 - y0))
        alpha = np.asarray(fitted.getchannel("A")) >= 128
        core = cv2.erode(alpha.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert core.sum() > 20, o.format
        out = np.asarray(Image.open(o.path).convert("RGB"))[y0:y1, x0:x1]
        want = np.asarray(fitted.convert("RGB"))
        if o.format in ("300x250", "320x50") and Path(o.path).stat().st_size > 0:
            # palette-reduced only when over budget: then say so by tolerance, still near-exact
            diff = np.abs(out[core].astype(int) - want[core].astype(int)).max()
            assert o.product_pixels_preserved and (diff == 0 or Image.open(o.path).mode == "P")
        else:
            assert np.array_equal(out[core], want[core]), o.format
            assert o.product_pixels_preserved


def test_every_text_element_is_readable_and_inside_the_safe_zone(made):
    _, result, _ = made
    for o in result.outputs:
        roles = {t["role"] for t in o.text}
        assert "headline" in roles
        for t in o.text:
            assert t["contrast_ratio"] >= 4.5, (o.format, t)
            x0, y0, x1, y1 = t["box"]
            assert 0 <= x0 < x1 <= o.width and 0 <= y0 < y1 <= o.height
            if o.format == "9:16":
                assert y0 >= 250 and y1 <= o.height - 250
            # text never covers the product
            px0, py0, px1, py1 = o.product_box
            assert x1 <= px0 or px1 <= x0 or y1 <= py0 or py1 <= y0, (o.format, t["role"])
        if o.format == "9:16":
            assert o.product_box[1] >= 250 and o.product_box[3] <= o.height - 250


def test_background_is_painted_not_flat(made):
    """The scene comes from the model: varied pixels around the product, not the grey init canvas."""
    _, result, _ = made
    o = next(o for o in result.outputs if o.format == "1:1")
    bg = np.asarray(Image.open(o.background_path).convert("RGB")).astype(float)
    x0, y0, x1, y1 = o.product_box
    ring = np.ones(bg.shape[:2], bool)
    ring[y0:y1, x0:x1] = False
    assert bg[ring].std(axis=0).mean() > 4
    assert np.abs(bg[ring].mean(axis=0) - 128).max() > 3 or bg[ring].std() > 10


def test_canvas_geometry():
    assert generation_canvas(1080, 1080, 128) == (128, 128)
    w, h = generation_canvas(1080, 1920, 128)
    assert w < h and w % 32 == 0 and h % 32 == 0
    w, h = generation_canvas(728, 90, 128)
    assert w / h <= 3.01  # banners are painted as a wide scene, then cropped
    s, ox, oy = cover_transform((128, 224), (1080, 1920))
    assert abs(1080 * s + 2 * ox - 128) < 1e-6 and abs(1920 * s + 2 * oy - 224) < 1e-6


@pytest.mark.parametrize("fmt", [(1080, 1350), (1080, 1920), (1200, 628), (728, 90), (1080, 1080)])
def test_cover_transform_is_the_inverse_of_cover_resize(fmt):
    """A mark painted on the canvas where cover_transform puts a format point lands on that point after
    cover_resize: the product the model paints around is where the real product is composited."""
    from imagesmith.workflows.product_ad import cover_resize
    canvas = generation_canvas(*fmt, 128)
    s, ox, oy = cover_transform(canvas, fmt)
    for fx, fy in ((0.3 * fmt[0], 0.6 * fmt[1]), (0.8 * fmt[0], 0.25 * fmt[1])):
        img = Image.new("L", canvas, 0)
        cx, cy = fx * s + ox, fy * s + oy
        ImageDraw.Draw(img).ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=255)
        big = np.asarray(cover_resize(img, fmt), np.float32)
        ys, xs = np.nonzero(big > 128)
        assert abs(xs.mean() - fx) < fmt[0] * 0.02 and abs(ys.mean() - fy) < fmt[1] * 0.02


def test_bad_requests_fail_before_any_work(studio, tmp_path):
    from imagesmith.core.errors import BadRequest
    photo = product_photo(tmp_path / "p.jpg")
    with pytest.raises(BadRequest, match="16:10"):
        studio.make(AdRequest(products=[str(photo)], concept="x", headline="h", formats=["16:10"]), tmp_path / "o")
    with pytest.raises(BadRequest, match="zzz"):
        studio.make(AdRequest(products=[str(photo)], concept="x", headline="h", brand_color="zzz"), tmp_path / "o")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_no_product_and_unfittable_copy_are_per_item_failures(studio, tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 300), (200, 200, 200)).save(blank)
    photo = product_photo(tmp_path / "p.jpg")
    req = AdRequest(products=[str(blank), str(photo)], concept="x", steps=2, upscaler="Lanczos",
                    headline="Incomprehensibilities-extraordinarily-long-word-that-never-breaks-anywhere-at-all", formats=["320x50"])
    result = studio.make(req, tmp_path / "o")
    errors = {Path(f.product).name: f.error for f in result.failures}
    assert "blank.png" in errors and "product" in errors["blank.png"]
    assert "p.jpg" in errors and "320x50" in errors["p.jpg"]
    assert result.outputs == []


def test_ghost_objects_next_to_the_product_are_cleared_props_elsewhere_stay():
    """A generator that knows the product paints more of it around the real one: matte regions touching the
    product's footprint are ghosts (cleared with the footprint); a region away from it is a prop and stays."""
    from imagesmith.workflows.product_ad import ghost_objects

    class FakeSegmenter:
        def predict(self, image):
            m = np.zeros((100, 100), np.float32)
            m[30:70, 20:60] = 1.0   # around/behind the product
            m[5:15, 85:95] = 1.0    # a prop in the corner
            return m

    product = np.zeros((100, 100), np.float32)
    product[40:60, 40:55] = 1.0
    ghosts = ghost_objects(Image.new("RGB", (100, 100)), product, FakeSegmenter())
    assert ghosts[35, 25] == 1.0 and ghosts[50, 30] == 1.0  # the ghost, beyond the footprint
    assert ghosts[10, 90] == 0.0 and ghosts[90, 90] == 0.0  # the prop and the empty floor


def test_banner_scenes_lose_their_props_but_never_the_table():
    """For banners (a thin band of a wider painted scene) props are cleared too: compact regions anywhere, up to
    max_prop_frac of the scene; a region across the scene (a table touching three edges) always stays."""
    from imagesmith.workflows.product_ad import ghost_objects

    class FakeSegmenter:
        def predict(self, image):
            m = np.zeros((100, 200), np.float32)
            m[20:70, 10:90] = 1.0    # a big painted blob, 20% of the scene, touching no edge
            m[5:15, 180:195] = 1.0   # a small prop
            m[85:, :] = 1.0          # the table: left, right and bottom edges
            return m

    product = np.zeros((100, 200), np.float32)
    product[40:60, 150:165] = 1.0
    kept = ghost_objects(Image.new("RGB", (200, 100)), product, FakeSegmenter())
    assert kept.sum() == 0  # nothing touches the product: without props nothing is cleared
    cleared = ghost_objects(Image.new("RGB", (200, 100)), product, FakeSegmenter(), props=True, max_prop_frac=0.5)
    assert cleared[40, 50] == 1.0 and cleared[10, 185] == 1.0 and cleared[95, 100] == 0.0
    small = ghost_objects(Image.new("RGB", (200, 100)), product, FakeSegmenter(), props=True, max_prop_frac=0.1)
    assert small[40, 50] == 0.0 and small[10, 185] == 1.0  # the blob is over the size limit


def test_props_auto_clears_for_house_models_and_in_banners(studio, tiny_home):
    """props=auto: the shipped house model's stray objects go everywhere; a user's checkpoint keeps its props
    except in banners, whose band crop would cut them; keep/clear override both."""
    from imagesmith.compose.formats import FORMATS
    from imagesmith.engine.generate import Engine
    from imagesmith.workflows.product_ad import ProductAdStudio
    square, band = FORMATS["1:1"], FORMATS["728x90"]
    base = dict(products=["p.png"], concept="on a table", headline="Hi")
    assert studio.clear_props(AdRequest(**base), square) and studio.clear_props(AdRequest(**base), band)  # house-ldm
    user = ProductAdStudio(Engine(tiny_home, device="cpu"))
    assert not user.clear_props(AdRequest(**base, model="tiny-sd15"), square)
    assert user.clear_props(AdRequest(**base, model="tiny-sd15"), band)
    assert not studio.clear_props(AdRequest(**base, props="keep"), band)
    assert user.clear_props(AdRequest(**base, model="tiny-sd15", props="clear"), square)


def test_the_decoded_border_is_settled_before_upscaling():
    """The VAE's darker outer rings would become a sharpened dark line after R-ESRGAN: the two outer rings take
    the third ring's pixels; everything inside is untouched."""
    from imagesmith.workflows.product_ad import _settle_border
    rng = np.random.default_rng(0)
    a = rng.integers(100, 255, (40, 60, 3)).astype(np.uint8)
    a[:2], a[-2:], a[:, :2], a[:, -2:] = 20, 20, 20, 20  # a dark frame
    out = np.asarray(_settle_border(Image.fromarray(a)))
    assert np.array_equal(out[2:-2, 2:-2], a[2:-2, 2:-2])
    assert np.array_equal(out[0, 2:-2], a[2, 2:-2]) and np.array_equal(out[:, 1][2:-2], a[:, 2][2:-2])
    assert out.min() >= 100  # no dark pixel left on the border


class _FlagAll:
    """A gate with the SafetyGate interface that flags every image (the policy's action decides the rest)."""

    def __init__(self, action: str):
        from imagesmith.vision.safety import SafetyGate, SafetyPolicy
        self.policy = SafetyPolicy(action=action)
        self._real = SafetyGate(self.policy)

    def check_image(self, image):
        from imagesmith.vision.safety import SafetyVerdict
        return SafetyVerdict(flagged=True, reason="test policy", score=1.0)

    def apply(self, image):
        return self._real.apply(image)


def test_the_painted_background_passes_the_services_safety_gate(studio, tmp_path):
    """Ads are generated outputs too (core.outputs): a withheld background fails that ad with the reason; a
    blurred one ships blurred, said in the manifest and the PNG."""
    photo = product_photo(tmp_path / "p.jpg")
    req = AdRequest(products=[str(photo)], concept="a bottle on a table", headline="Glow", formats=["1:1"], steps=2,
                    upscaler="Lanczos", seed=3, background="paint")
    gated = ProductAdStudio(studio.engine, settings=studio.settings, safety_gate=_FlagAll("withhold"))
    result = gated.make(req, tmp_path / "withheld")
    assert result.outputs == [] and "withheld by the safety policy: test policy" in result.failures[0].error
    blurred = ProductAdStudio(studio.engine, settings=studio.settings, safety_gate=_FlagAll("blur")).make(
        req, tmp_path / "blurred")
    [ad] = blurred.outputs
    assert ad.safety == {"reason": "test policy", "score": 1.0, "action": "blur"}
    assert Image.open(ad.path).text["imagesmith-safety"] == "blurred: test policy"
    plain = studio.make(req, tmp_path / "plain").outputs[0]
    edges = lambda p: np.abs(np.diff(np.asarray(Image.open(p).convert("L"), np.float32), axis=1)).mean()  # noqa: E731
    assert edges(ad.background_path) < edges(plain.background_path)  # the painted scene is blurred


def test_a_small_product_is_upscaled_not_blurred_and_never_blown_up_past_4x(studio, tmp_path):
    """A product photo with few pixels (a 60x110 cut-out with its own alpha, a label with bands on it): the format
    would show it several times larger, so R-ESRGAN enlarges it before placing (its edges steeper than
    Lanczos's), and it is never shown at more than 4x its pixels."""
    import cv2
    rgba = np.zeros((110, 60, 4), np.uint8)
    rgba[10:100, 8:52] = (200, 60, 90, 255)
    for y in range(20, 90, 8):  # dark bands on the label: hard edges, as print on a package
        rgba[y:y + 3, 14:46, :3] = (30, 30, 40)
    small = tmp_path / "small.png"
    Image.fromarray(rgba, "RGBA").save(small)
    outs = {}
    for up in ("R-ESRGAN 4x+", "Lanczos"):
        req = AdRequest(products=[str(small)], concept="white marble", headline="Tiny", formats=["4:5"], seed=2,
                        background="studio", upscaler=up)
        result = studio.make(req, tmp_path / up.replace(" ", "_"))
        assert not result.failures, result.failures
        outs[up] = result.outputs[0]
    crisp, soft = outs["R-ESRGAN 4x+"], outs["Lanczos"]
    assert crisp.product_upscaled == 4 and soft.product_upscaled is None
    assert crisp.product_scale <= 4.0 + 1e-6 and soft.product_scale <= 4.0 + 1e-6  # 44 px wide: at most 4x
    assert crisp.product_box == soft.product_box

    def steepness(out):  # the steepest 2% of the vertical gradients inside the product: its bands' edges
        x0, y0, x1, y1 = out.product_box
        inner = np.asarray(Image.open(out.path).convert("L"), np.float32)[y0 + 20:y1 - 20, x0 + 20:x1 - 20]
        grad = np.abs(cv2.Sobel(inner, cv2.CV_32F, 0, 1, ksize=3))
        return float(np.percentile(grad, 98))
    assert steepness(crisp) > 1.3 * steepness(soft)
    # past PRODUCT_UPSCALE_MAX_PIXELS (a 230 x 230 product) R-ESRGAN would cost tens of seconds: Lanczos instead
    big = np.zeros((250, 250, 4), np.uint8)
    big[10:240, 10:240] = (200, 60, 90, 255)
    Image.fromarray(big, "RGBA").save(tmp_path / "mid.png")
    mid = studio.make(AdRequest(products=[str(tmp_path / "mid.png")], concept="white marble", headline="Mid",
                                formats=["4:5"], seed=2, background="studio"), tmp_path / "mid").outputs[0]
    assert mid.product_upscaled is None and mid.product_scale > 2.0
