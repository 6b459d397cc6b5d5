"""Face detailer (ADetailer-style): Haar faces on a real photo, repaint inside the padded boxes only, metadata, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imagesmith.core.requests import GenerateRequest
from imagesmith.engine.generate import Engine
from imagesmith.engine import detailer as D
from imagesmith.core.requests import DetailerOptions
from imagesmith.engine.detailer import FaceDetailer, detect_faces

from fixtures.cli import TINY, run_cli

# skimage.data.astronaut(): Eileen Collins' NASA portrait (public domain), 512x512, shipped inside the wheel
ASTRONAUT_FACE = (170, 60, 280, 170)  # x0, y0, x1, y1 around her face, by eye


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    skdata = pytest.importorskip("skimage.data")
    return Image.fromarray(skdata.astronaut())


@pytest.fixture(scope="module")
def engine(tiny_home):
    return Engine(tiny_home, device="cpu")


def _overlap(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _outside(mask_shape, boxes) -> np.ndarray:
    outside = np.ones(mask_shape, bool)
    for x0, y0, x1, y1 in boxes:
        outside[y0:y1, x0:x1] = False
    return outside


def test_haar_finds_the_astronauts_face(astronaut):
    faces = detect_faces(astronaut)
    assert len(faces) == 1
    assert _overlap(faces[0].box, ASTRONAUT_FACE) > 0.5, faces
    assert faces[0].neighbors >= 5
    # a blank picture has none; a picture smaller than min_size is not searched
    assert detect_faces(Image.new("RGB", (256, 256), (120, 130, 140))) == []
    assert detect_faces(astronaut.resize((16, 16))) == []


def test_detailer_changes_the_face_and_nothing_outside_the_padded_box(engine, astronaut):
    request = GenerateRequest(prompt="portrait photo of an astronaut", model="tiny-sd15", steps=4,
                              sampler_name="Euler")
    opts = DetailerOptions(strength=0.4, size=192)
    out, report = FaceDetailer(engine, opts).detail(astronaut, request, seed=3)
    assert out.size == astronaut.size and len(report["detections"]) == 1
    assert report["model"] == "mediapipe_face"
    face = report["detections"][0]
    assert _overlap(tuple(face["box"]), ASTRONAUT_FACE) > 0.5 and face["score"] > 0.8
    x0, y0, x1, y1 = face["box"]
    px0, py0, px1, py1 = face["padded_box"]
    assert px0 <= x0 and py0 <= y0 and px1 >= x1 and py1 >= y1 and (px1 - px0) > (x1 - x0)
    assert face["work_size"][0] == 192 or face["work_size"][1] == 192  # repainted above the face's own size
    before, after = np.asarray(astronaut), np.asarray(out)
    # every pixel outside the padded box: exactly the input's
    outside = _outside(before.shape[:2], [face["padded_box"]])
    assert np.array_equal(before[outside], after[outside])
    # inside the face box the random model's repaint shows
    inner = np.abs(before[y0:y1, x0:x1].astype(int) - after[y0:y1, x0:x1].astype(int))
    assert (inner.max(-1) > 0).mean() > 0.9
    # the blend is feathered: the padded box's border ring is untouched, change rises towards the face
    ring = np.zeros(before.shape[:2], bool)
    ring[py0:py1, px0:px1] = True
    ring[py0 + 1:py1 - 1, px0 + 1:px1 - 1] = False
    assert np.array_equal(before[ring], after[ring])
    # same seed, same pixels
    again, _ = FaceDetailer(engine, opts).detail(astronaut, request, seed=3)
    assert np.array_equal(np.asarray(again), after)


def test_no_face_leaves_the_image_unchanged_and_metadata_says_so(engine):
    base = dict(prompt="a red apple", model="tiny-sd15", width=64, height=64, steps=3, seed=5, sampler_name="Euler")
    plain = engine.generate(GenerateRequest(**base))
    detailed = engine.generate(GenerateRequest(**base, detailer=DetailerOptions()))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(detailed.images[0]))
    rec = detailed.records[0]
    assert rec.detailer["units"][0]["detections"] == [] and "ADetailer detections: 0" in rec.infotext
    assert "ADetailer model: mediapipe_face" in rec.infotext and "ADetailer denoising strength: 0.4" in rec.infotext
    assert "ADetailer" not in plain.records[0].infotext


def test_engine_step_repaints_only_inside_the_padded_boxes(engine, monkeypatch):
    """Through Engine.generate: a face 'found' at a fixed box (the tiny model paints no faces) is repainted,
    the rest of the image is the plain generation's, and the infotext records it."""
    base = dict(prompt="a face", model="tiny-sd15", width=128, height=128, steps=3, seed=9, sampler_name="Euler")
    from imagesmith.engine.landmarks import Detection
    monkeypatch.setattr(D, "detect", lambda image, o=None: [Detection((40, 40, 80, 80), 0.9, "face")])
    plain = engine.generate(GenerateRequest(**base)).images[0]
    res = engine.generate(GenerateRequest(**base, detailer=DetailerOptions(size=64, strength=0.5, prompt="detailed eyes")))
    rec = res.records[0]
    face = rec.detailer["units"][0]["detections"][0]
    assert face["box"] == [40, 40, 80, 80] and face["seed"] == 9
    a, b = np.asarray(plain), np.asarray(res.images[0])
    outside = _outside(a.shape[:2], [face["padded_box"]])
    assert np.array_equal(a[outside], b[outside]) and not np.array_equal(a[40:80, 40:80], b[40:80, 40:80])
    assert "ADetailer detections: 1" in rec.infotext and "ADetailer prompt: detailed eyes" in rec.infotext
    assert "ADetailer denoising strength: 0.5" in rec.infotext


def test_mask_is_zero_outside_the_padded_box_for_any_options():
    for opts in (DetailerOptions(), DetailerOptions(padding=0.0, dilate=10, mask_blur=12.5), DetailerOptions(mask_blur=0)):
        for face in ((0, 0, 30, 30), (50, 60, 90, 110), (200, 200, 256, 256)):
            box = D.padded_box(face, (256, 256), opts)
            m = D.blend_mask(face, box, opts)
            assert m.shape == (box[3] - box[1], box[2] - box[0])
            x0, y0, x1, y1 = (face[0] - box[0], face[1] - box[1], face[2] - box[0], face[3] - box[1])
            assert m[y0:y1, x0:x1].min() > 0.45  # the face itself is repainted
            # the border ring of the box is 0 wherever the box is not clipped by the image's edge
            if box[0] > 0:
                assert not m[:, 0].any()
            if box[1] > 0:
                assert not m[0, :].any()
            if box[2] < 256:
                assert not m[:, -1].any()
            if box[3] < 256:
                assert not m[-1, :].any()


def test_adetailer_padding_in_pixels_erode_and_per_face_prompts(engine, monkeypatch):
    """ADetailer's own semantics where they differ: padding in pixels (inpaint_only_masked_padding), a negative
    dilate/erode that shrinks the mask, and prompts that replace the image's ([PROMPT] standing for it) with [SEP]
    giving each face, largest first, its own (the last serving the rest)."""
    face = (100, 100, 140, 140)
    assert D.padded_box(face, (512, 512), DetailerOptions(padding_pixels=32, dilate=0, mask_blur=0)) == (
        68, 68, 172, 172)
    eroded = DetailerOptions(padding_pixels=32, dilate=-6, mask_blur=0)
    box = D.padded_box(face, (512, 512), eroded)
    m = D.blend_mask(face, box, eroded)
    fx, fy = face[0] - box[0], face[1] - box[1]
    assert m[fy + 20, fx + 20] == 1 and m[fy + 3, fx + 20] == 0 and m[fy + 6, fx + 20] == 1  # 6 px in from the edge
    assert D.unit_prompt("a portrait", "smiling", 0, "add") == "a portrait, smiling"
    assert D.unit_prompt("a portrait", "smiling", 0, "replace") == "smiling"
    assert D.unit_prompt("a portrait", "", 0, "replace") == "a portrait"  # nothing given: the image's
    assert D.unit_prompt("a portrait", "[PROMPT], freckles", 0, "add") == "a portrait, freckles"
    sep = "a smiling man [SEP] an old woman [SEP] [PROMPT]"
    assert [D.unit_prompt("two people", sep, i, "replace") for i in range(4)] == [
        "a smiling man", "an old woman", "two people", "two people"]
    from imagesmith.engine.landmarks import Detection
    monkeypatch.setattr(D, "detect", lambda image, o=None: [Detection((40, 40, 80, 80), 0.9, "face"),
                                                             Detection((90, 10, 120, 40), 0.8, "face")])
    seen = []
    original = engine.generate

    def spy(req, **kw):
        if req.init_image:
            seen.append(req.prompt)
        return original(req, **kw)
    monkeypatch.setattr(engine, "generate", spy)
    base = dict(prompt="two faces", model="tiny-sd15", width=128, height=128, steps=2, seed=9, sampler_name="Euler")
    res = original(GenerateRequest(**base, detailer=DetailerOptions(size=64, prompt="a smiling man [SEP] [PROMPT], "
                                                                    "an old woman", prompt_mode="replace",
                                                                    padding_pixels=16)))
    assert seen == ["a smiling man", "two faces, an old woman"]
    assert "ADetailer inpaint padding: 16" in res.records[0].infotext


@pytest.fixture
def env(tiny_home, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(tiny_home.home))


def test_cli_generate_with_detailer(env, capsys, tmp_path):
    out = tmp_path / "d.png"
    code, stdout, err = run_cli(capsys, "generate", "a portrait", "--seed", "4", *TINY, "--detailer", "face",
                                "--detailer-strength", "0.3", "-o", str(out), "--json")
    assert code == 0, err
    info = json.loads(stdout)["images"][0]["infotext"]
    assert "ADetailer model: mediapipe_face," in info and "ADetailer denoising strength: 0.3" in info
    payload = json.loads(Image.open(out).text["imagesmith"])
    assert payload["request"]["detailer"]["strength"] == 0.3 and payload["detailer"]["units"][0]["detections"] == []


def test_cli_bad_detailer_one_line(env, capsys, tmp_path):
    out = tmp_path / "never.png"
    for args, needle in ((["--detailer", "hands"], "--detailer takes face, hand, person, not 'hands'"),
                         (["--detailer", "face", "--detailer-strength", "1.5"], "strength")):
        code, _, err = run_cli(capsys, "generate", "x", *TINY, *args, "-o", str(out))
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert code != 0 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
        assert not out.exists()


# ------------------------------------------------------------------------------- mediapipe on real photographs
def _photos():
    """Real photographs with faces that ship inside installed packages: scikit-image's astronaut and cameraman,
    matplotlib's Grace Hopper."""
    import matplotlib.cbook as cbook
    import skimage.data as data
    return {"astronaut": Image.fromarray(data.astronaut()), "camera": Image.fromarray(data.camera()).convert("RGB"),
            "grace_hopper": Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")}


def test_mediapipe_finds_the_faces_in_real_photos_and_none_in_a_blank():
    from imagesmith.engine.landmarks import detect
    for name, photo in _photos().items():
        for model in ("mediapipe_face_full", "mediapipe_face_short"):
            found = detect(photo, model)
            assert len(found) == 1 and found[0].score > 0.7, (name, model, found)
    assert detect(_photos()["astronaut"], "mediapipe_face_full")[0].box[0] in range(150, 200)
    assert detect(Image.new("RGB", (256, 256), (120, 130, 140)), "mediapipe_face_full") == []
    person = detect(_photos()["astronaut"], "mediapipe_person")
    assert len(person) == 1 and person[0].area > 0.4 * 512 * 512


def test_mediapipe_finds_turned_and_small_faces_haar_misses():
    """The reason for the switch, measured on real photographs: scikit-image's LFW subset (100 face photos, 25x25
    crops) set into a 256 px picture at 48 and 64 px, upright and turned 30 degrees. The default detector
    (mediapipe_face: both of mediapipe's models) finds far more than OpenCV's Haar cascade (figures measured in
    the issue note: at 64 px 99/100 upright and 100/100 turned, Haar 83 and 1); few of LFW's 100 non-face crops
    are taken for faces."""
    import skimage.data as data
    from imagesmith.engine.landmarks import detect
    lfw = data.lfw_subset()

    def scene(crop, angle, size):
        face = Image.fromarray((crop * 255).astype(np.uint8)).convert("RGB").resize((size, size), Image.BICUBIC)
        face = face.rotate(angle, resample=Image.BICUBIC, fillcolor=(128, 128, 128))
        canvas = Image.new("RGB", (256, 256), (128, 128, 128))
        canvas.paste(face, ((256 - size) // 2, (256 - size) // 2))
        return canvas

    def found(crops, angle, size, finder):
        return sum(bool(finder(scene(c, angle, size))) for c in crops)

    haar = lambda im: D.detect_faces(im, DetailerOptions(min_size=16))  # noqa: E731
    mp = lambda im: D.detect(im, DetailerOptions(min_size=16))  # noqa: E731  (the default: mediapipe_face)
    faces, others = lfw[:100], lfw[100:]
    for size, angle in ((48, 0), (64, 0), (64, 30)):
        ours, theirs = found(faces, angle, size, mp), found(faces, angle, size, haar)
        assert ours >= theirs + 10 and ours >= 80 or angle == 0 and size == 48 and ours >= theirs, (size, angle,
                                                                                                   ours, theirs)
    assert found(others, 0, 64, mp) <= 10 and found(others, 0, 64, haar) <= 5
    assert detect(scene(faces[0], 30, 64), "mediapipe_face")  # and the named model runs the same way
