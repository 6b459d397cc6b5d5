"""Hard cut-out data: products on real photographs, hard textures and clutter, with phone-camera damage.

house-cutout's first figures came from its own kind of data (Fluent 3D renders on procedural backdrops) and
fell apart on a plaid, on a photo with a person in it, and on a real photo of a cup. This module builds the
data that measures (and trains) a cut-out on what shop owners actually send.

Sources, all fetched from package registries once and verified (nothing is downloaded at run time, nothing is
committed):

- **Backgrounds from real photographs**: Debian's ``gnome-backgrounds`` and ``mate-backgrounds`` (pinned
  version and sha256, fetched with ``apt-get download``), and the sample photos that ship inside
  scikit-image (astronaut, chelsea, rocket, brick, grass, gravel, hubble...).
- **Real photographs with hand-made masks** (:func:`real_photos`, evaluation only): scikit-image's espresso cup
  and motorcycle, and OpenCV's sample photos from Debian's ``opencv-doc`` (an apple, an orange, a lighter and a
  cap on a cluttered desk; Apache-2.0 AND BSD-3-Clause).
- **Procedural hard textures** (this module): plaids, stripes, checkers, printed text, colour noise.
- **Products**: Fluent Emoji 3D renders (the house dataset: ``train`` objects for training, the never-seen
  ``val_objects`` for evaluation), and flat SVG emoji sets rendered with resvg: ``@iconify-json/fluent-emoji-flat``
  (MIT) for training; ``@iconify-json/noto`` (Apache-2.0) and ``@iconify-json/openmoji`` (CC-BY-SA-4.0) only
  for evaluation: styles the model never sees in training.

**The split** (:func:`build_sources`): every background file belongs to a *group* (its name without the
light/dark or resolution suffix, so ``Elephants_3840x2160.jpg`` and ``Elephants.jpg`` are one group), and a
group goes wholly to ``train`` or ``eval`` (scikit-image's photos are all ``eval``). The record is written to
``<cache>/cutout/sources.json`` and :func:`check_disjoint` refuses a record where a group, a file's content
hash, an emoji set or a product object sits in both splits. Procedural textures draw from disjoint seed ranges.

**Kinds** (:data:`KINDS`), one hard factor each, reported separately: ``studio`` (the old easy case: a
procedural studio backdrop), ``photo`` (a real photograph behind the product), ``texture`` (a hard procedural
pattern), ``clutter`` (other objects partly in frame, some bigger than the product: the truth is the product
alone), ``shadow`` (a hard cast shadow and a mirror reflection on a glossy surface, neither part of the
product), ``phone`` (sensor noise, JPEG, defocus, white balance, vignetting) and ``flat`` (a flat-style
product from a set the model never trained on, on a photo or texture).

The ground truth is the exact alpha the compositing used (quantised first, then composited with it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .backdrops import BACKDROP_KINDS, make_backdrop
from .house_data import HouseDataError, default_cache_dir, fetch_npm_package, load_house_dataset
from .house_styles import STYLES, icon_svg, render_svg

log = logging.getLogger(__name__)

KINDS = ("studio", "photo", "texture", "clutter", "shadow", "phone", "flat")
EVAL_SEED_BASE = 1_000_000  # procedural draws for eval use seeds from here; training stays below it
SOURCES_VERSION = 1


@dataclass(frozen=True)
class DebPin:
    """One Debian package at one version, with the sha256 its .deb must have."""
    name: str
    version: str
    sha256: str
    licence: str


DEBIAN = (
    DebPin("gnome-backgrounds", "43.1-1", "a670dea21572652127d6e55f9cdb3a226d0037854fdbfd037003c7d00ee0dc4e",
           "CC-BY-SA-3.0 and others (debian/copyright)"),
    DebPin("mate-backgrounds", "1.26.0-1", "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04",
           "GPL-2+ and CC-BY-SA (debian/copyright)"),
    DebPin("plasma-workspace-wallpapers", "4:5.27.5-2",
           "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b", "LGPL-3 / CC-BY-SA (debian/copyright)"),
    DebPin("ukui-wallpapers", "20.04.3-1.1", "6d49be70152e6d603163458e177e501deb0be8f2916389ccbfcf59b0d7fc0262",
           "GPL-3+ / CC (debian/copyright)"),
)
# OpenCV's sample photos (samples/data): a few real product photos for the hand-masked real-photo set (eval only)
OPENCV_DOC = DebPin("opencv-doc", "4.6.0+dfsg-12", "4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a",
                    "Apache-2.0 AND BSD-3-Clause (debian/copyright)")
OPENCV_SAMPLES = Path("usr/share/doc/opencv-doc/examples/data")
# flat emoji sets (house_styles' pins): one for training, two styles the model never sees in training for eval
FLAT_TRAIN = (STYLES["fluent-flat"].pin,)
FLAT_EVAL = (STYLES["noto"].pin, STYLES["openmoji"].pin)
# product-like emoji categories of the iconify sets (faces, people, flags and symbols are not products)
PRODUCT_CATEGORIES = ("objects", "food", "activities", "travel")
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "rocket.jpg", "brick.png", "grass.png", "gravel.png",
                  "hubble_deep_field.jpg", "motorcycle_right.png", "color.png", "retina.jpg")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
EVAL_FRACTION = 0.35
BG_LONG_SIDE = 1024  # backgrounds are stored at most this big in the cache


# ------------------------------------------------------------------------------------------- fetching
def fetch_debian_package(pin: DebPin, cache_dir: Path) -> Path:
    """``<cache>/debian/<name>_<version>/root``: the package's files, fetched with ``apt-get download`` and
    verified against the pinned sha256. Idempotent."""
    dest = Path(cache_dir) / "debian" / f"{pin.name}_{pin.version}"
    marker = dest / "imagesmith-verified.json"
    if marker.is_file() and (dest / "root").is_dir():
        return dest / "root"
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if not apt or not dpkg:
        raise HouseDataError(f"fetching {pin.name} needs apt-get and dpkg-deb (a Debian system); "
                             f"the cut-out evaluation set's real backgrounds come from Debian's archive")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp_s:
        tmp = Path(tmp_s)
        proc = subprocess.run([apt, "download", f"{pin.name}={pin.version}"], cwd=tmp, capture_output=True,
                              text=True)
        debs = list(tmp.glob("*.deb"))
        if proc.returncode != 0 or not debs:
            raise HouseDataError(f"apt-get download {pin.name}={pin.version} failed: {proc.stderr.strip()[-500:]}")
        got = hashlib.sha256(debs[0].read_bytes()).hexdigest()
        if got != pin.sha256:
            raise HouseDataError(f"{debs[0].name}: sha256 {got} does not match the pinned {pin.sha256}")
        out = tmp / "out"
        (out / "root").mkdir(parents=True)
        subprocess.run([dpkg, "-x", str(debs[0]), str(out / "root")], check=True)
        (out / "imagesmith-verified.json").write_text(json.dumps({"package": pin.name, "version": pin.version,
                                                                  "sha256": got}, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(out), dest)
    return dest / "root"


def group_of(name: str) -> str:
    """The split group of a background file: its stem without light/dark and resolution suffixes; a KDE
    wallpaper (``wallpapers/<Name>/contents/images/<WxH>.jpg``) is its folder's name."""
    m = re.search(r"wallpapers/([^/]+)/contents/", str(name))
    if m:
        return m.group(1).lower()
    stem = Path(name).stem.lower()
    stem = re.sub(r"_\d+x\d+$", "", stem)
    stem = re.sub(r"-(l|d|light|dark|day|night)$", "", stem)
    return stem


def _unit(*parts: Any) -> float:
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def _store_background(src: Path, dst: Path) -> str:
    """Write ``src`` (any size, RGB) to ``dst`` as JPEG with the long side at most BG_LONG_SIDE; the sha256 of
    the source file's bytes."""
    im = Image.open(src).convert("RGB")
    im.thumbnail((BG_LONG_SIDE, BG_LONG_SIDE), Image.Resampling.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.save(dst, quality=93)
    return hashlib.sha256(src.read_bytes()).hexdigest()


def build_sources(cache_dir: Path | str | None = None, *, progress: bool = True,
                  debian_roots: dict[str, Path] | None = None, flat_packages: dict[str, Path] | None = None,
                  photo_files: list[Path] | None = None) -> dict[str, Any]:
    """Fetch every source (idempotent), store the backgrounds small, split them, and write the record to
    ``<cache>/cutout/sources.json``. Needs the house dataset (``imagesmith house data``) for the 3D products.
    ``debian_roots`` (package name -> unpacked root), ``flat_packages`` (npm name -> package folder inside the
    cache) and ``photo_files`` (instead of scikit-image's) replace the fetched sources: tests and offline mirrors."""
    from tqdm import tqdm
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    house = load_house_dataset(cache)
    out_dir = cache / "cutout"
    backgrounds: list[dict[str, Any]] = []
    files: list[tuple[str, Path, str]] = []
    for pin in DEBIAN:
        root = _source(debian_roots, pin.name, lambda: fetch_debian_package(pin, cache))
        if root is None:
            continue
        for sub in ("backgrounds", "wallpapers"):
            for p in sorted((root / "usr" / "share" / sub).rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                    files.append((f"debian:{pin.name}", p, pin.licence))
    if debian_roots is None:
        fetch_debian_package(OPENCV_DOC, cache)  # the hand-masked real photos (real_photos), not backgrounds
    if photo_files is None:
        import skimage
        sk = Path(skimage.__file__).resolve().parent / "data"
        photo_files = [sk / name for name in SKIMAGE_PHOTOS if (sk / name).is_file()]
    for path in photo_files:
        files.append(("scikit-image", Path(path), "scikit-image data (see skimage/data/README.txt)"))
    # one picture per group: the biggest file (resolutions and light/dark variants of one picture are one group)
    biggest: dict[str, tuple[str, Path, str]] = {}
    for origin, path, licence in files:
        g = f"{origin}:{group_of(path)}"
        if g not in biggest or path.stat().st_size > biggest[g][1].stat().st_size:
            biggest[g] = (origin, path, licence)
    files = sorted(biggest.values(), key=lambda f: str(f[1]))
    for origin, path, licence in tqdm(files, desc="cut-out backgrounds", unit="file", disable=not progress):
        group = f"{origin}:{group_of(path)}"
        split = "eval" if origin == "scikit-image" or _unit("bg", group) < EVAL_FRACTION else "train"
        stored = out_dir / "backgrounds" / split / f"{origin.replace(':', '_')}__{group.split(':')[-1]}.jpg"
        digest = _store_background(path, stored) if not stored.is_file() else \
            hashlib.sha256(path.read_bytes()).hexdigest()
        # one picture per group, so the group names it (KDE's files are all called <W>x<H>.jpg)
        backgrounds.append({"id": f"{group}/{path.name}", "group": group, "split": split, "origin": origin,
                            "licence": licence, "sha256": digest, "file": str(stored.relative_to(out_dir))})
    flats = []
    for pins, split in ((FLAT_TRAIN, "train"), (FLAT_EVAL, "eval")):
        for pin in pins:
            pkg = _source(flat_packages, pin.name, lambda: fetch_npm_package(pin, cache, progress=progress))
            if pkg is None:
                continue
            flats.append({"set": pin.name, "version": pin.version, "split": split,
                          "licence": json.loads((pkg / "package.json").read_text()).get("license"),
                          "folder": str(pkg.relative_to(cache))})
    record = {"version": SOURCES_VERSION, "backgrounds": backgrounds, "flat_sets": flats,
              "objects": {"train": [o.key for o in house.objects_in("train")],
                          "eval": [o.key for o in house.objects_in("val_objects")]}}
    check_disjoint(record)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sources.json").write_text(json.dumps(record, indent=1))
    return record


def _source(overrides: dict[str, Path] | None, name: str, fetch) -> Path | None:
    """The folder of source ``name``: fetched, or from ``overrides`` when given (None if it is not there)."""
    if overrides is None:
        return fetch()
    return Path(overrides[name]) if name in overrides else None


def check_disjoint(record: dict[str, Any]) -> None:
    """Raise :class:`HouseDataError` when anything sits in both splits: a background group, a background's
    content, an emoji set, a 3D object."""
    def both(items, key) -> set:
        tr = {key(b) for b in items if b["split"] == "train"}
        ev = {key(b) for b in items if b["split"] == "eval"}
        return tr & ev
    clash = {
        "background groups": both(record["backgrounds"], lambda b: b["group"]),
        "background contents": both(record["backgrounds"], lambda b: b["sha256"]),
        "emoji sets": both(record["flat_sets"], lambda f: f["set"]),
        "3D objects": set(record["objects"]["train"]) & set(record["objects"]["eval"]),
    }
    bad = {k: sorted(v)[:5] for k, v in clash.items() if v}
    if bad:
        raise HouseDataError(f"the cut-out train and eval splits overlap: {bad}")


def load_sources(cache_dir: Path | str | None = None) -> dict[str, Any]:
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / "cutout" / "sources.json"
    if not path.is_file():
        raise HouseDataError(f"no cut-out source record at {path}: build it first (imagesmith house data --cutout)")
    record = json.loads(path.read_text())
    check_disjoint(record)
    return record


# ------------------------------------------------------------------------------------------ textures
def hard_texture(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A hard procedural background, float32 [H, W, 3] in 0..1: plaid, stripes, checkers, printed text or
    colour noise, saturated and busy (the patterns that broke the first cut-out)."""
    h, w = size
    kind = rng.choice(["plaid", "stripes", "checkers", "text", "noise"])
    pal = rng.random((4, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "plaid":
        p1, p2 = rng.uniform(12, 60), rng.uniform(12, 60)
        bx = (np.sin(xx * 2 * np.pi / p1) > rng.uniform(-0.3, 0.5))[..., None]
        by = (np.sin(yy * 2 * np.pi / p2) > rng.uniform(-0.3, 0.5))[..., None]
        img = pal[0] * (1 - bx) * (1 - by) + pal[1] * bx * (1 - by) + pal[2] * by * (1 - bx) + pal[3] * bx * by
        thin = (np.abs(np.sin(xx * 2 * np.pi / (p1 / 3))) > 0.97) | (np.abs(np.sin(yy * 2 * np.pi / (p2 / 3))) > 0.97)
        img = np.where(thin[..., None], 1 - img, img)
    elif kind == "stripes":
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(6, 40)
        t = (xx * np.cos(ang) + yy * np.sin(ang)) / period
        idx = (np.floor(t) % 3).astype(int)
        img = pal[idx]
    elif kind == "checkers":
        c = rng.uniform(8, 48)
        idx = ((np.floor(xx / c) + np.floor(yy / c)) % 2).astype(int)
        img = pal[idx]
    elif kind == "text":
        canvas = Image.new("RGB", (w, h), tuple(int(v * 255) for v in pal[0]))
        draw = ImageDraw.Draw(canvas)
        fs = int(rng.integers(10, 34))
        font = ImageFont.load_default(size=fs)
        words = ["SALE", "new", "organic", "menu", "price", "coffee", "tea", "fresh", "gift", "open", "bag",
                 "12.99", "shop", "daily", "news", "the", "and", "best", "cotton", "summer"]
        y = -fs // 2
        while y < h:
            line = " ".join(rng.choice(words, size=12))
            draw.text((int(rng.integers(-40, 0)), y), line, font=font,
                      fill=tuple(int(v * 255) for v in pal[int(rng.integers(1, 4))]))
            y += int(fs * rng.uniform(1.1, 1.6))
        img = np.asarray(canvas, np.float32) / 255.0
    else:
        cells = rng.uniform(4, 32)
        small = rng.random((max(2, int(h / cells)), max(2, int(w / cells)), 3)).astype(np.float32)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST if rng.random() < 0.5 else cv2.INTER_CUBIC)
    return np.clip(img, 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------ products
class Products:
    """RGBA products of one split: 3D renders and flat SVG icons, loaded lazily, cropped to their alpha."""

    def __init__(self, cache: Path, record: dict[str, Any], split: str):
        self.cache = cache
        self.split = split
        self.house = load_house_dataset(cache)
        keys = set(record["objects"][split])
        self.objects = [o for o in self.house.objects if o.key in keys]
        self.flat_sets = [f for f in record["flat_sets"] if f["split"] == split]
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    @cached_property
    def icons(self) -> list[tuple[str, str, dict]]:
        out = []
        for fs in self.flat_sets:
            pkg = self.cache / fs["folder"]
            data = json.loads((pkg / "icons.json").read_text())
            meta = json.loads((pkg / "metadata.json").read_text())
            names = set()
            for cat, members in meta.get("categories", {}).items():
                if any(c in cat.lower() for c in PRODUCT_CATEGORIES):
                    names.update(members)
            for name in sorted(names):
                if "body" in data["icons"].get(name, {}):
                    out.append((fs["set"], name, data))
        return out

    def _crop(self, rgba: np.ndarray) -> np.ndarray:
        ys, xs = np.nonzero(rgba[..., 3] > 8)
        if len(ys) == 0:
            return rgba
        return rgba[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]

    def draw(self, rng: np.random.Generator, *, flat: bool = False) -> tuple[str, np.ndarray]:
        """(product id, uint8 RGBA cropped to its alpha)."""
        if flat and self.icons:
            s, name, data = self.icons[int(rng.integers(0, len(self.icons)))]
            key = (s, name)
            if key not in self._cache:
                self._cache[key] = self._crop(np.asarray(render_svg(icon_svg(data, name), 320)))
            return f"{s}:{name}", self._cache[key]
        obj = self.objects[int(rng.integers(0, len(self.objects)))]
        key = ("3d", obj.key)
        if key not in self._cache:
            rgba = np.asarray(Image.open(self.house.render_path(obj)).convert("RGBA"))
            self._cache[key] = self._crop(rgba)
        return f"fluent-3d:{obj.key}", self._cache[key]


# ------------------------------------------------------------------------------------------ composing
@dataclass
class CutoutSample:
    image: np.ndarray  # uint8 [H, W, 3]
    alpha: np.ndarray  # float32 [H, W], the product's exact alpha
    kind: str
    product: str
    background: str
    box: tuple[int, int, int, int]  # tight box of alpha > 0.5 (exclusive end)


def _fit(rgba: np.ndarray, long_px: int) -> tuple[np.ndarray, np.ndarray]:
    """(straight rgb float [h, w, 3], alpha float [h, w]) of ``rgba`` scaled so its long side is ``long_px``,
    resized premultiplied (no dark fringes)."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    pm = np.concatenate([rgba[..., :3].astype(np.float32) / 255.0 * a, a], axis=2)
    k = long_px / max(rgba.shape[:2])
    w, h = max(2, int(round(rgba.shape[1] * k))), max(2, int(round(rgba.shape[0] * k)))
    small = cv2.resize(pm, (w, h), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
    alpha = np.clip(small[..., 3], 0, 1)
    rgb = np.clip(small[..., :3] / np.maximum(alpha, 1e-6)[..., None], 0, 1)
    return rgb, alpha


def _paste(canvas_rgb: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, x: int, y: int) -> np.ndarray:
    """Composite in place (clipped to the canvas); returns the full-canvas alpha layer that was used."""
    H, W = canvas_rgb.shape[:2]
    h, w = alpha.shape
    layer = np.zeros((H, W), np.float32)
    x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    if x1 <= x0 or y1 <= y0:
        return layer
    a = np.round(alpha[y0 - y: y1 - y, x0 - x: x1 - x] * 255.0) / 255.0
    layer[y0:y1, x0:x1] = a
    canvas_rgb[y0:y1, x0:x1] = rgb[y0 - y: y1 - y, x0 - x: x1 - x] * a[..., None] + \
        canvas_rgb[y0:y1, x0:x1] * (1 - a[..., None])
    return layer


class HardCutoutData:
    """Seeded hard composites of one split. ``sample(i)`` is deterministic in (split, seed, i); the eval split
    cycles through :data:`KINDS` so every kind gets the same number of samples."""

    def __init__(self, split: str = "eval", *, size: int = 512, seed: int = 0, cache_dir: Path | str | None = None,
                 kinds: tuple[str, ...] = KINDS, realism: bool = False):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be train or eval, not {split!r}")
        self.cache = Path(cache_dir) if cache_dir else default_cache_dir()
        self.record = load_sources(self.cache)
        self.split, self.size, self.seed, self.kinds = split, int(size), int(seed), tuple(kinds)
        # train only: what pasted emoji lack against real product photos (see _realism); its own random stream,
        # so the samples' other draws (and the eval split) do not change
        self.realism = bool(realism) and split == "train"
        self.products = Products(self.cache, self.record, split)
        self.bg_entries = [b for b in self.record["backgrounds"] if b["split"] == split]
        self._bg: dict[str, np.ndarray] = {}

    def _background_photo(self, rng: np.random.Generator) -> tuple[str, np.ndarray]:
        b = self.bg_entries[int(rng.integers(0, len(self.bg_entries)))]
        if b["id"] not in self._bg:
            self._bg[b["id"]] = np.asarray(Image.open(self.cache / "cutout" / b["file"]).convert("RGB"))
        full = self._bg[b["id"]]
        H, W = full.shape[:2]
        s = self.size
        crop = int(min(H, W) * rng.uniform(0.45, 1.0))
        y, x = int(rng.integers(0, H - crop + 1)), int(rng.integers(0, W - crop + 1))
        img = cv2.resize(full[y:y + crop, x:x + crop], (s, s), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        return b["id"], img.astype(np.float32) / 255.0

    def _background(self, kind: str, rng: np.random.Generator) -> tuple[str, np.ndarray]:
        s = self.size
        if kind == "studio" or (kind == "shadow" and rng.random() < 0.4):
            bk = BACKDROP_KINDS[int(rng.integers(0, len(BACKDROP_KINDS)))]
            img, _ = make_backdrop(bk, s, rng)
            return f"studio:{bk}", np.asarray(img, np.float32) / 255.0
        if kind == "texture" or (kind in ("clutter", "flat") and rng.random() < 0.4):
            return "texture", hard_texture((s, s), rng)
        return self._background_photo(rng)

    def __len__(self) -> int:
        return 10 ** 9

    def __getitem__(self, i: int) -> dict[str, Any]:
        """A training item: ``image`` [3, S, S] in [-1, 1] and ``mask`` [1, S, S] in 0..1 (tensors)."""
        import torch
        s = self.sample(int(i))
        return {"image": torch.from_numpy(s.image.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0),
                "mask": torch.from_numpy(s.alpha[None].copy())}

    def sample(self, i: int) -> CutoutSample:
        base = EVAL_SEED_BASE if self.split == "eval" else 0
        rng = np.random.default_rng([base + self.seed, int(i)])
        kind = self.kinds[i % len(self.kinds)] if self.split == "eval" else \
            self.kinds[int(rng.integers(0, len(self.kinds)))]
        s = self.size
        bg_id, canvas = self._background(kind, rng)
        canvas = canvas.copy()
        pid, rgba = self.products.draw(rng, flat=(kind == "flat") or (self.split == "train" and rng.random() < 0.25))
        long_side = s * rng.uniform(0.3, 0.68)
        r2 = np.random.default_rng([base + self.seed, int(i), 7]) if self.realism else None
        if r2 is not None and r2.random() < 0.35:  # a product that fills most of the frame, as phone shots do
            long_side = s * r2.uniform(0.7, 0.95)
        rgb, a = _fit(rgba, int(long_side))
        h, w = a.shape
        margin = int(0.03 * s)
        x = int(rng.integers(margin, max(margin + 1, s - w - margin)))
        y = int(rng.integers(margin, max(margin + 1, s - h - margin)))
        if kind == "clutter":  # distractors behind the product, cut by the frame edge, some bigger than it
            for _ in range(int(rng.integers(1, 4))):
                _, drgba = self.products.draw(rng, flat=rng.random() < 0.3)
                drgb, da = _fit(drgba, int(s * rng.uniform(0.25, 0.85)))
                dh, dw = da.shape
                side = int(rng.integers(0, 4))
                dx = [-int(dw * rng.uniform(0.2, 0.6)), s - int(dw * rng.uniform(0.4, 0.8)),
                      int(rng.integers(-dw // 2, s - dw // 2)), int(rng.integers(-dw // 2, s - dw // 2))][side]
                dy = [int(rng.integers(-dh // 2, s - dh // 2)), int(rng.integers(-dh // 2, s - dh // 2)),
                      -int(dh * rng.uniform(0.2, 0.6)), s - int(dh * rng.uniform(0.4, 0.8))][side]
                _paste(canvas, drgb, da, dx, dy)
        if kind == "shadow" or (self.split == "train" and rng.random() < 0.25):
            full = np.zeros((s, s), np.float32)
            full[max(0, y): y + h, max(0, x): x + w] = a[: s - y, : s - x]
            # a hard cast shadow, sheared to one side, and a mirror reflection under the product
            shear = rng.uniform(-0.8, 0.8)
            M = np.float32([[1, shear, -shear * (y + h)], [0, rng.uniform(0.3, 0.9), (y + h) * 0.1]])
            M[1, 2] = (y + h) * (1 - M[1, 1])
            shadow = cv2.warpAffine(full, M, (s, s))
            shadow = cv2.GaussianBlur(shadow, (0, 0), rng.uniform(1.0, 6.0)) * rng.uniform(0.35, 0.75)
            canvas *= (1 - shadow[..., None])
            if rng.random() < 0.7:
                refl_a = a[::-1] * np.linspace(rng.uniform(0.25, 0.55), 0, h, dtype=np.float32)[:, None]
                _paste(canvas, rgb[::-1], refl_a, x, y + h)
        if r2 is not None and r2.random() < 0.5:  # lit by the same room: colours pulled towards the backdrop's
            under = canvas[max(0, y): y + h, max(0, x): x + w].reshape(-1, 3).mean(axis=0)
            mine = (rgb * a[..., None]).reshape(-1, 3).sum(axis=0) / max(float(a.sum()), 1.0)
            rgb = np.clip(rgb + r2.uniform(0.15, 0.6) * (under - mine), 0, 1)
        layer = _paste(canvas, rgb, a, x, y)
        alpha = layer
        if r2 is not None:
            canvas, alpha = _realism(canvas, alpha, r2)
        if kind == "phone" or (self.split == "train" and rng.random() < 0.35):
            canvas, alpha = self._phone(canvas, alpha, rng)
        img = np.clip(np.round(canvas * 255.0), 0, 255).astype(np.uint8)
        if kind == "phone" or (self.split == "train" and rng.random() < 0.3):
            ok, enc = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 80))])
            img = cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1].copy()
        ys, xs = np.nonzero(alpha > 0.5)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(ys) else (0, 0, 0, 0)
        return CutoutSample(image=img, alpha=alpha.astype(np.float32), kind=kind, product=pid, background=bg_id,
                            box=box)

    @staticmethod
    def _phone(canvas: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Sensor, lens and white-balance damage of a phone shot."""
        s = canvas.shape[0]
        if rng.random() < 0.6:  # defocus / shake: the true edge blurs with the picture
            sig = rng.uniform(0.6, 1.8)
            canvas = cv2.GaussianBlur(canvas, (0, 0), sig)
            alpha = cv2.GaussianBlur(alpha, (0, 0), sig)
        canvas = canvas * rng.uniform(0.8, 1.2, size=3).astype(np.float32)  # white balance
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
        canvas = canvas * (1 - rng.uniform(0.1, 0.5) * (xx ** 2 + yy ** 2) * 2)[..., None]  # vignetting
        canvas = canvas + rng.normal(0, rng.uniform(0.01, 0.05), canvas.shape).astype(np.float32)  # sensor noise
        return np.clip(canvas, 0, 1), alpha


def _realism(canvas: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Training-only changes towards real photos: one colour grade over product and backdrop together (a pasted
    product otherwise keeps its own clean statistics, a cue real photos do not give), and the non-square frame a
    phone photo is squeezed from when the network sees it square."""
    if rng.random() < 0.5:
        gamma = rng.uniform(0.7, 1.4)
        gains = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
        grey = canvas.mean(axis=2, keepdims=True)
        canvas = grey + (canvas - grey) * rng.uniform(0.6, 1.2)
        canvas = np.clip(np.clip(canvas, 0, 1) ** gamma * gains, 0, 1).astype(np.float32)
    if rng.random() < 0.4:
        s = canvas.shape[0]
        keep = int(s * rng.uniform(0.6, 0.95))
        axis = int(rng.integers(0, 2))
        on = np.nonzero((alpha > 0.05).any(axis=1 - axis))[0]
        lo, hi = (int(on.min()), int(on.max()) + 1) if len(on) else (0, s)
        if hi - lo <= keep:
            start = int(rng.integers(max(0, hi - keep), min(lo, s - keep) + 1))
            sl = (slice(start, start + keep), slice(None)) if axis == 0 else (slice(None), slice(start, start + keep))
            canvas = cv2.resize(np.ascontiguousarray(canvas[sl]), (s, s), interpolation=cv2.INTER_LINEAR)
            alpha = cv2.resize(np.ascontiguousarray(alpha[sl]), (s, s), interpolation=cv2.INTER_LINEAR)
    return canvas, alpha


# ------------------------------------------------------------------------------------------ real photos
REAL_PHOTOS_FILE = Path(__file__).resolve().parent / "data" / "real_cutouts.json"


def real_photos(cache_dir: Path | str | None = None, *, debian_roots: dict[str, Path] | None = None,
                missing: list[str] | None = None) -> list[dict[str, Any]]:
    """Hand-annotated real photographs: ``{name, image (PIL RGB), mask (float32), box, point, source}``. The
    photos ship inside scikit-image and Debian's ``opencv-doc`` (OpenCV's sample photos); the masks are polygons
    and ellipses drawn by hand over them (``train/data/real_cutouts.json``).

    Nothing is fetched here: a Debian package's photos are read from the cache where ``imagesmith house data
    --cutout`` put it (or from ``debian_roots``, package name -> unpacked root); the names of photos whose
    package is not there are appended to ``missing`` (when given) and left out."""
    import skimage
    sk = Path(skimage.__file__).resolve().parent / "data"
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    pins = {OPENCV_DOC.name: OPENCV_DOC}
    spec = json.loads(REAL_PHOTOS_FILE.read_text())
    out = []
    for item in spec["photos"]:
        package = item.get("package")
        if package is None:
            path, source = sk / item["file"], f"scikit-image/{item['file']}"
        else:
            pin = pins[package]
            root = Path(debian_roots[package]) if debian_roots and package in debian_roots else \
                cache / "debian" / f"{pin.name}_{pin.version}" / "root"
            path, source = root / OPENCV_SAMPLES / item["file"], f"debian:{pin.name}/{item['file']} ({pin.licence})"
        if not path.is_file():
            if missing is not None:
                missing.append(item["name"])
            continue
        img = Image.open(path).convert("RGB")
        mask = Image.new("L", img.size, 0)
        draw = ImageDraw.Draw(mask)
        for shape in item["shapes"]:
            fill = 0 if shape.get("subtract") else 255
            if shape["type"] == "polygon":
                draw.polygon([tuple(p) for p in shape["points"]], fill=fill)
            elif shape["type"] == "ellipse":
                draw.ellipse(shape["box"], fill=fill)
        m = np.asarray(mask, np.float32) / 255.0
        ys, xs = np.nonzero(m > 0.5)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        out.append({"name": item["name"], "image": img, "mask": m, "box": box, "point": tuple(item["point"]),
                    "source": source})
    return out
