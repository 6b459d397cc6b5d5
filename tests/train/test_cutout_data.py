"""Hard cut-out data: the split record is disjoint by construction and by check, samples are exact composites,
and the evaluation's metrics behave. Built from fake sources (no network): a fake house dataset, a fake Debian
root with photos, a fake flat emoji set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagesmith.train import cutout_data as D
from imagesmith.train.house_data import HouseDataError

from fixtures.house import fake_sources, house  # noqa: F401  (module fixtures)

PHOTO = Path(__import__("skimage").__file__).resolve().parent / "data"


def _svg_set(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True)
    icons = {"prefix": name, "width": 32, "height": 32, "icons": {
        "gift": {"body": '<rect x="4" y="8" width="24" height="20" fill="#e33"/><rect x="14" y="4" width="4" '
                         'height="24" fill="#fd0"/>'},
        "cup": {"body": '<circle cx="16" cy="16" r="11" fill="#36c"/>'},
        "face": {"body": '<circle cx="16" cy="16" r="14" fill="#fc0"/>'}}}
    (folder / "icons.json").write_text(json.dumps(icons))
    (folder / "metadata.json").write_text(json.dumps({"categories": {"Objects": ["gift", "cup"],
                                                                     "Smileys & Emotion": ["face"]}}))
    (folder / "package.json").write_text(json.dumps({"name": name, "license": "MIT"}))
    return folder


@pytest.fixture(scope="module")
def sources(house):  # noqa: F811
    cache = house.cache_dir
    root = cache / "fake-debian" / "mate-backgrounds" / "usr" / "share" / "backgrounds" / "mate"
    root.mkdir(parents=True)
    for name, src in (("Elephants_3840x2160.jpg", "astronaut.png"), ("Elephants.jpg", "astronaut.png"),
                      ("Garden.jpg", "chelsea.png"), ("Dune.jpg", "rocket.jpg"), ("Wood.jpg", "brick.png"),
                      ("Aqua.jpg", "coffee.png"), ("Storm.jpg", "grass.png"), ("Silk.jpg", "gravel.png")):
        Image.open(PHOTO / src).convert("RGB").save(root / name)
    kde = cache / "fake-debian" / "plasma-workspace-wallpapers"
    for name, src in (("Flow", "hubble_deep_field.jpg"), ("Kite", "color.png")):
        folder = kde / "usr" / "share" / "wallpapers" / name / "contents" / "images"
        folder.mkdir(parents=True)
        Image.open(PHOTO / src).convert("RGB").save(folder / "1920x1080.jpg")
    flat_train = _svg_set(cache / "npm" / "flat-train" / "package", "@iconify-json/fluent-emoji-flat")
    flat_eval = _svg_set(cache / "npm" / "flat-eval" / "package", "@iconify-json/noto")
    record = D.build_sources(cache, progress=False,
                             debian_roots={"mate-backgrounds": root.parents[3], "plasma-workspace-wallpapers": kde},
                             flat_packages={"@iconify-json/fluent-emoji-flat": flat_train,
                                            "@iconify-json/noto": flat_eval},
                             photo_files=[PHOTO / "motorcycle_right.png"])
    return cache, record


def test_groups_fold_resolutions_and_variants():
    assert D.group_of("Elephants_3840x2160.jpg") == D.group_of("Elephants.jpg") == "elephants"
    assert D.group_of("adwaita-l.webp") == D.group_of("adwaita-d.webp") == "adwaita"
    assert D.group_of("/usr/share/wallpapers/Flow/contents/images/5120x2880.jpg") == "flow"
    assert D.group_of("/usr/share/wallpapers/Flow/contents/images_dark/720x1440.jpg") == "flow"


def test_record_is_disjoint_and_written(sources):
    cache, record = sources
    assert json.loads((cache / "cutout" / "sources.json").read_text()) == record
    ids = [b["id"] for b in record["backgrounds"]]
    assert len(ids) == len(set(ids))  # KDE names every wallpaper <W>x<H>.jpg: ids carry the group
    groups = [b["group"] for b in record["backgrounds"]]
    assert len(groups) == len(set(groups))  # one picture per group: the two Elephants files are one
    assert sum("elephants" in g for g in groups) == 1
    splits = {b["split"] for b in record["backgrounds"]}
    assert splits == {"train", "eval"}
    assert all(b["split"] == "eval" for b in record["backgrounds"] if b["origin"] == "scikit-image")
    assert {f["set"]: f["split"] for f in record["flat_sets"]} == {"@iconify-json/fluent-emoji-flat": "train",
                                                                   "@iconify-json/noto": "eval"}
    assert not set(record["objects"]["train"]) & set(record["objects"]["eval"])
    for b in record["backgrounds"]:
        with Image.open(cache / "cutout" / b["file"]) as im:
            assert max(im.size) <= D.BG_LONG_SIDE


def test_an_overlapping_record_is_refused(sources):
    _, record = sources
    bad = json.loads(json.dumps(record))
    train = next(b for b in bad["backgrounds"] if b["split"] == "train")
    bad["backgrounds"].append({**train, "split": "eval", "id": "copy"})
    with pytest.raises(HouseDataError, match="background groups"):
        D.check_disjoint(bad)
    bad = json.loads(json.dumps(record))
    bad["objects"]["eval"].append(bad["objects"]["train"][0])
    with pytest.raises(HouseDataError, match="3D objects"):
        D.check_disjoint(bad)


def test_samples_are_exact_composites_from_their_own_split(sources):
    cache, record = sources
    split_of = {b["id"]: b["split"] for b in record["backgrounds"]}
    for split in ("train", "eval"):
        data = D.HardCutoutData(split, size=96, seed=3, cache_dir=cache)
        kinds = set()
        for i in range(28):
            s = data.sample(i)
            kinds.add(s.kind)
            assert s.image.shape == (96, 96, 3) and s.image.dtype == np.uint8
            assert s.alpha.shape == (96, 96) and 0 <= s.alpha.min() and s.alpha.max() <= 1
            assert (s.alpha > 0.5).any(), (split, i, s.kind)
            ys, xs = np.nonzero(s.alpha > 0.5)
            assert s.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            if s.background in split_of:
                assert split_of[s.background] == split  # never a background of the other split
            if s.product.startswith("fluent-3d:"):
                assert s.product.split(":", 1)[1] in record["objects"][split]
            else:
                assert s.product.split(":")[0] == {"train": "@iconify-json/fluent-emoji-flat",
                                                   "eval": "@iconify-json/noto"}[split]
            if s.kind in ("studio", "photo", "texture", "flat", "clutter") and split == "eval":
                # no blur, no noise: where the product is opaque the pixels are the product's, untouched by the
                # backdrop; the truth there is exactly 1
                assert s.alpha.max() == 1.0
        if split == "eval":
            assert kinds == set(D.KINDS)  # the eval split cycles through every kind
        again = D.HardCutoutData(split, size=96, seed=3, cache_dir=cache).sample(5)
        assert np.array_equal(again.image, data.sample(5).image) and np.array_equal(again.alpha, data.sample(5).alpha)
    item = D.HardCutoutData("train", size=64, seed=0, cache_dir=cache)[7]
    assert tuple(item["image"].shape) == (3, 64, 64) and tuple(item["mask"].shape) == (1, 64, 64)
    assert -1 <= float(item["image"].min()) and float(item["image"].max()) <= 1


def test_clutter_puts_other_objects_in_frame_but_not_in_the_truth(sources):
    cache, _ = sources
    data = D.HardCutoutData("eval", size=128, seed=0, cache_dir=cache, kinds=("clutter",))
    s = data.sample(0)
    plain = D.HardCutoutData("eval", size=128, seed=0, cache_dir=cache, kinds=("studio",))
    assert s.kind == "clutter" and plain.sample(0).kind == "studio"
    # the distractors touch the frame; the truth does not
    edge = np.concatenate([s.alpha[0], s.alpha[-1], s.alpha[:, 0], s.alpha[:, -1]])
    assert edge.max() < 0.5


def test_hard_textures_are_busy_and_in_range():
    rng = np.random.default_rng(0)
    for _ in range(10):
        t = D.hard_texture((64, 80), rng)
        assert t.shape == (64, 80, 3) and t.dtype == np.float32 and 0 <= t.min() and t.max() <= 1
        assert np.abs(np.diff(t, axis=1)).mean() > 0.005  # never a flat colour


def test_real_photos_have_hand_masks():
    photos = D.real_photos()
    assert photos and all(p["mask"].shape == p["image"].size[::-1] for p in photos)
    cup = next(p for p in photos if "cup" in p["name"])
    m = cup["mask"]
    assert 0.3 < m.mean() < 0.7  # the cup and saucer fill about half the frame
    x, y = cup["point"]
    assert m[y, x] == 1.0
    assert m[5, 5] == 0 and m[-5, -5] == 0  # table corners are background


def test_boundary_f_and_metrics():
    from imagesmith.train.cutout_eval import boundary_f, deepest_point, matte_metrics, summarise
    from imagesmith.vision.cutout import matte_confidence
    gt = np.zeros((100, 100), np.float32)
    gt[30:70, 30:70] = 1
    assert boundary_f(gt, gt) == 1.0
    near = np.roll(gt, 1, axis=1)
    far = np.roll(gt, 12, axis=1)
    assert boundary_f(near, gt) == 1.0 and boundary_f(far, gt) < 0.6
    assert boundary_f(np.zeros_like(gt), gt) == 0.0
    m = matte_metrics((far, 0.3, {}), gt)
    assert abs(m["mae"] - float(np.abs(far - gt).mean())) < 1e-9 and 0.5 < m["iou"] < 0.6 and m["confidence"] == 0.3
    s = summarise([matte_metrics((gt, *matte_confidence(gt)), gt), m])
    assert s["n"] == 2 and s["bad"] == 1 and s["min_iou"] == round(m["iou"], 4) and s["bad_caught"] == 1
    assert deepest_point(gt) in {(49, 49), (50, 50), (49, 50), (50, 49)}  # the middle of the square


def test_realism_changes_training_samples_only(sources):
    cache, _ = sources
    plain = D.HardCutoutData("train", size=96, seed=2, cache_dir=cache)
    real = D.HardCutoutData("train", size=96, seed=2, cache_dir=cache, realism=True)
    changed = 0
    for i in range(12):
        a, b = plain.sample(i), real.sample(i)
        assert a.kind == b.kind and a.product == b.product and a.background == b.background  # same draws
        changed += not np.array_equal(a.image, b.image)
        ys, xs = np.nonzero(b.alpha > 0.5)
        assert len(ys) and b.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert changed >= 6
    e1 = D.HardCutoutData("eval", size=96, seed=2, cache_dir=cache).sample(4)
    e2 = D.HardCutoutData("eval", size=96, seed=2, cache_dir=cache, realism=True).sample(4)
    assert np.array_equal(e1.image, e2.image) and np.array_equal(e1.alpha, e2.alpha)  # the eval set never moves


def test_real_photos_from_a_debian_package_are_read_from_its_root(tmp_path):
    """opencv-doc's sample photos join the real set from the package's unpacked root; without it they are
    listed as missing, not fetched."""
    missing: list[str] = []
    photos = D.real_photos(tmp_path / "empty-cache", missing=missing)
    assert {"apple on a green cloth", "lighter on a cluttered desk"} <= set(missing)
    assert all(p["source"].startswith("scikit-image/") for p in photos)
    root = tmp_path / "opencv-doc"
    data = root / D.OPENCV_SAMPLES
    data.mkdir(parents=True)
    for name, size in (("apple.jpg", (512, 512)), ("orange.jpg", (512, 512)), ("stuff.jpg", (640, 480))):
        Image.new("RGB", size, (90, 120, 60)).save(data / name)
    missing = []
    photos = D.real_photos(tmp_path / "empty-cache", debian_roots={"opencv-doc": root}, missing=missing)
    assert missing == []
    lighter = next(p for p in photos if p["name"] == "lighter on a cluttered desk")
    assert lighter["source"].startswith("debian:opencv-doc/stuff.jpg") and "Apache-2.0" in lighter["source"]
    assert lighter["mask"].shape == (480, 640)
    x, y = lighter["point"]
    assert lighter["mask"][y, x] == 1.0 and 0.01 < lighter["mask"].mean() < 0.05
    assert lighter["box"][0] < x < lighter["box"][2] and lighter["box"][1] < y < lighter["box"][3]
