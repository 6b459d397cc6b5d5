"""The house dataset: captioned product shots made on the fly from Microsoft's Fluent Emoji 3D renders.

Source. The renders come from the npm package ``@lobehub/fluent-emoji-3d`` 1.1.0 (MIT, 3,391 RGBA 256x256
``.webp`` files named by their Unicode code points, ``assets/1f34e.webp`` for U+1F34E RED APPLE,
``assets/2615.webp``, ``assets/1f43b-200d-2744-fe0f.webp``). The package carries no group information, so the
emoji groups and subgroups (Unicode's emoji-test.txt ordering: 'food-drink' / 'food-fruit', ...) and CLDR
keywords come from the npm package ``emojibase-data`` 17.0.0 (MIT). Object names are the CLDR short names as
the PyPI ``emoji`` package spells them (``EMOJI_DATA[e]['en']``: ':red_apple:' -> 'red apple'), made into
natural English by a small table (:data:`NAME_OVERRIDES`: 'hot beverage' -> 'cup of coffee', 'dog face' ->
'dog head').

Build (network, once). :func:`build_house_dataset` runs ``npm view`` and ``npm pack`` for both pinned packages
in a temporary folder under the cache, checks each tarball's sha512 against the integrity pinned here (and
against what the registry reports), unpacks it to ``<cache>/npm/<name>-<version>/package`` and writes
``<cache>/house/index.json``. Run again, it finds the verified packages and the index and does nothing. Nothing
is written inside the git checkout; no image is written at all except an optional preview sheet.

Scope. Only the object groups are kept: animals & nature, food & drink, travel & places, activities, objects.
People, smileys/faces, hands and body parts, flags, keycaps and symbols are dropped (by group), as are the
24 clock faces that differ only in the time shown ('one-thirty') and the faces in the sky ('sun with face').

Samples. Each training sample is made procedurally from one render (:func:`render_sample`): a backdrop from
:mod:`imagesmith.train.backdrops`; a scale (the object's longer side covers 35-90% of the frame: 'small' below
50%, 'large' from 75%) and a position (centred, left, right, bottom); sometimes a hue rotation of the object
that moves its dominant hue into a clearly different named colour, named in the caption ('a blue apple');
a soft contact shadow; and a caption from varied templates ('a photo of a small blue apple on a wooden table,
on the left', 'a red apple, a pink to orange gradient, product shot'). The cut-out is composited with its
alpha in premultiplied form (no dark fringes); the returned mask is exactly the alpha used.

Splits (documented in the index as well).

- ``val_objects``: 10% of the object NAMES, the lowest by ``sha256([seed, 'object', name])``; objects sharing a name
  (the three globes) fall on the same side. These objects never appear in ``train`` or ``val_views``.
- held-out combinations: 10% of the (backdrop kind, recolour) pairs, the lowest by
  ``sha256([seed, 'combo', kind, colour])`` over :data:`BACKDROP_KINDS` x :data:`OBJECT_COLOURS` (8 x 7: 6 pairs).
  Objects in their natural colours are never held out, so training sees every backdrop kind with every
  object; what it never sees is, say, a recoloured blue object on a brick wall, though it sees blue objects
  and brick walls.
- ``train``: training objects in the combinations not held out.
- ``val_views``: training objects, only in the held-out combinations (new views of known objects; so only
  objects that can take the held-out colours).

:class:`HouseSampleDataset` draws samples of one split on the fly; a sample is a pure function of
(index file, split, seed, sample index, size).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import textwrap
import time
import unicodedata
from ..core.errors import ImagesmithError
from ..core.phrases import with_article  # noqa: F401 - used here and by the house trainers
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import cv2
import emoji
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from .backdrops import BACKDROP_KINDS, backdrop_preposition, make_backdrop

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
SPLITS: tuple[str, ...] = ("train", "val_views", "val_objects")
_SPLIT_CODES = MappingProxyType({"train": 0, "val_views": 1, "val_objects": 2})

KEPT_GROUPS: tuple[str, ...] = ("animals-nature", "food-drink", "travel-places", "activities", "objects")
POSITIONS: tuple[str, ...] = ("centre", "left", "right", "bottom")
MIN_SCALE, MAX_SCALE = 0.35, 0.90
SMALL_BELOW, LARGE_FROM = 0.50, 0.75


class HouseDataError(ImagesmithError, RuntimeError):
    """The house dataset cannot be built or read (npm missing, integrity mismatch, no index): a user-facing
    condition, so the CLI prints its one line instead of 'internal error'."""

    code = "house_data"


@dataclass(frozen=True)
class NpmPin:
    """One npm package at one version, with the sha512 integrity its tarball must have."""
    name: str
    version: str
    integrity: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def folder(self) -> str:
        return f"{self.name.replace('/', '__').lstrip('@')}-{self.version}"


FLUENT_3D = NpmPin("@lobehub/fluent-emoji-3d", "1.1.0",
                   "sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g==")
EMOJIBASE = NpmPin("emojibase-data", "17.0.0",
                   "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==")


@dataclass(frozen=True)
class HueColour:
    """A named object colour: pixels with a hue in [lo, hi) degrees and at least ``min_s`` saturation and
    ``min_v`` value count as it (dark or greyish reds and oranges are browns and tans, which name nothing);
    a recolour aims at ``centre``."""
    name: str
    lo: float
    hi: float
    centre: float
    min_s: float = 0.30
    min_v: float = 0.45

    def contains(self, hue: np.ndarray) -> np.ndarray:
        h = np.mod(hue, 360.0)
        if self.lo < 0:
            return (h >= self.lo + 360.0) | (h < self.hi)
        return (h >= self.lo) & (h < self.hi)

    def matches(self, hsv: np.ndarray) -> np.ndarray:
        return self.contains(hsv[..., 0]) & (hsv[..., 1] >= self.min_s) & (hsv[..., 2] >= self.min_v)


# gaps between the ranges are hues a person would not name with confidence; they name nothing
OBJECT_COLOURS: tuple[HueColour, ...] = (
    HueColour("red", -22.0, 12.0, 358.0, 0.55, 0.55),
    HueColour("orange", 14.0, 37.0, 26.0, 0.65, 0.70),
    HueColour("yellow", 40.0, 68.0, 50.0, 0.50, 0.70),
    HueColour("green", 75.0, 160.0, 120.0),
    HueColour("blue", 190.0, 252.0, 220.0),
    HueColour("purple", 258.0, 290.0, 272.0, 0.35, 0.50),
    HueColour("pink", 295.0, 335.0, 318.0, 0.35, 0.55),
)
COLOUR_NAMES: tuple[str, ...] = tuple(c.name for c in OBJECT_COLOURS)
# words that name a colour inside an object's name ('red apple', 'black cat'): a recolour replaces them
_COLOUR_WORDS = frozenset(COLOUR_NAMES + ("brown", "black", "white", "grey", "gray"))

# pixels whose hue means something: saturated and not dark
_HUED_S, _HUED_V = 0.25, 0.30
# an object is recoloured only when most of it carries a hue and most of that sits in one hue cluster
_MIN_HUED, _MIN_PEAK = 0.35, 0.55
_PEAK_HALF_WIDTH = 22.0
# a recolour turns the main hue by at least this much (degrees)
_MIN_TURN = 45.0
# a colour names an object when it covers this much of the opaque pixels and of the hued ones
_MIN_NAMED_OPAQUE, _MIN_NAMED_HUED = 0.30, 0.50
# a recolour is offered only when it clears those by this margin (resizing blends edges a little)
_TARGET_MARGIN = 0.06

TEMPLATES: tuple[str, ...] = (
    "a photo of {obj} {prep} {bg}{where}",
    "{obj}{at}, {bg}, product shot",
    "a 3D render of {obj} {prep} {bg}{where}",
    "product photo of {obj} {prep} {bg}{where}",
    "{obj} {prep} {bg}{where}",
    "studio shot of {obj}{at}, {bg}",
    "{bg} with {obj}{at}",
)
_AT = MappingProxyType({"centre": "", "left": " on the left", "right": " on the right", "bottom": " at the bottom"})
# captions that leave the backdrop (and often the placement) unsaid: what people type ("a teapot"). Trained on,
# they make an unnamed backdrop or placement free, so that seeds vary it instead of the model guessing one.
SHORT_TEMPLATES: tuple[str, ...] = ("{obj}{at}", "a photo of {obj}{at}", "a 3D render of {obj}{at}",
                                    "product photo of {obj}{at}", "{obj}{at}, product shot")

# CLDR short names -> what a person would call the render (keys: the cleaned CLDR name)
NAME_OVERRIDES = MappingProxyType({
    # food & drink
    "ear of corn": "corn cob", "hot pepper": "chili pepper", "bread": "loaf of bread",
    "baguette bread": "baguette", "cheese wedge": "wedge of cheese", "poultry leg": "chicken leg",
    "cut of meat": "steak", "bacon": "bacon strips", "cooking": "fried egg in a pan",
    "shallow pan of food": "pan of paella", "pot of food": "pot of stew", "fondue": "fondue pot",
    "bowl with spoon": "bowl of cereal", "green salad": "bowl of salad", "popcorn": "popcorn bucket",
    "butter": "stick of butter", "salt": "salt shaker", "canned food": "tin can", "cooked rice": "bowl of rice",
    "curry rice": "plate of curry rice", "steaming bowl": "bowl of ramen", "spaghetti": "plate of spaghetti",
    "oden": "oden skewer", "dango": "dango skewer", "moon cake": "mooncake",
    "soft ice cream": "soft-serve ice cream", "ice cream": "bowl of ice cream", "shortcake": "slice of cake",
    "candy": "wrapped candy", "hot beverage": "cup of coffee", "teacup without handle": "teacup",
    "sake": "sake bottle", "bottle with popping cork": "champagne bottle", "clinking glasses": "champagne glasses",
    "tumbler glass": "whiskey glass", "pouring liquid": "tipped glass of water", "cup with straw": "soda cup",
    "beverage box": "juice box", "mate": "cup of mate", "ice": "ice cube", "chopsticks": "pair of chopsticks",
    "fork and knife with plate": "plate with fork and knife", "sushi": "sushi",
    # animals & nature
    "front-facing baby chick": "baby chick", "pig nose": "pig snout", "four leaf clover": "four-leaf clover",
    "leaf fluttering in wind": "leaves blowing in the wind", "empty nest": "bird's nest",
    "lady beetle": "ladybug", "deciduous tree": "tree", "evergreen tree": "pine tree",
    "sheaf of rice": "rice stalks", "mount fuji": "Mount Fuji",
    # travel & places, sky
    "globe showing Europe-Africa": "globe", "globe showing Americas": "globe",
    "globe showing Asia-Australia": "globe", "globe with meridians": "wireframe globe", "camping": "camping tent",
    "building construction": "construction crane", "brick": "bricks", "wood": "log", "wedding": "wedding chapel",
    "automobile": "car", "police car light": "police siren light", "construction": "construction barrier",
    "ring buoy": "life ring", "passenger ship": "cruise ship", "airplane departure": "airplane taking off",
    "airplane arrival": "airplane landing", "seat": "airplane seat", "aerial tramway": "cable car",
    "mountain cableway": "cable car", "bellhop bell": "service bell", "luggage": "suitcase",
    "hourglass done": "hourglass", "hourglass not done": "hourglass", "watch": "wristwatch",
    "timer clock": "kitchen timer", "high voltage": "lightning bolt", "droplet": "water droplet",
    "water wave": "ocean wave", "snowman without snow": "snowman", "umbrella on ground": "beach umbrella",
    "umbrella with rain drops": "umbrella in the rain",
    # activities
    "wrapped gift": "gift box", "reminder ribbon": "awareness ribbon", "1st place medal": "gold medal",
    "2nd place medal": "silver medal", "3rd place medal": "bronze medal", "rugby football": "rugby ball",
    "tennis": "tennis racket and ball", "flying disc": "frisbee", "bowling": "bowling ball and pins",
    "cricket game": "cricket bat and ball", "field hockey": "field hockey stick and ball",
    "ice hockey": "ice hockey stick and puck", "lacrosse": "lacrosse stick and ball",
    "ping pong": "ping pong paddle and ball", "badminton": "badminton racket and shuttlecock",
    "goal net": "football goal", "flag in hole": "golf flag", "fishing pole": "fishing rod",
    "bullseye": "dartboard", "pool 8 ball": "eight ball", "video game": "game controller", "game die": "dice",
    "mirror ball": "disco ball", "joker": "joker card", "mahjong red dragon": "mahjong tile",
    "flower playing cards": "hanafuda cards", "performing arts": "theatre masks", "artist palette": "paint palette",
    "thread": "spool of thread", "yarn": "ball of yarn", "knot": "rope knot",
    # objects
    "one-piece swimsuit": "swimsuit", "briefs": "swim briefs", "woman's clothes": "blouse",
    "folding hand fan": "folding fan", "thong sandal": "flip-flop", "man's shoe": "leather shoe",
    "running shoe": "sneaker", "flat shoe": "ballet flat", "woman's sandal": "sandal", "woman's boot": "boot",
    "woman's hat": "sun hat", "billed cap": "baseball cap", "rescue worker's helmet": "rescue helmet",
    "gem stone": "gemstone", "muted speaker": "speaker", "speaker low volume": "speaker",
    "speaker medium volume": "speaker", "speaker high volume": "speaker", "bell with slash": "crossed-out bell",
    "musical score": "sheet music", "headphone": "headphones", "musical keyboard": "piano keyboard",
    "long drum": "conga drum", "mobile phone": "smartphone", "mobile phone with arrow": "smartphone",
    "keyboard": "computer keyboard", "computer disk": "minidisc", "optical disk": "CD", "dvd": "DVD",
    "film frames": "film strip", "video camera": "camcorder", "magnifying glass tilted left": "magnifying glass",
    "magnifying glass tilted right": "magnifying glass", "diya lamp": "oil lamp", "books": "stack of books",
    "page facing up": "sheet of paper", "label": "tag", "e-mail": "email envelope", "package": "cardboard box",
    "closed mailbox with raised flag": "mailbox", "closed mailbox with lowered flag": "mailbox",
    "open mailbox with raised flag": "open mailbox", "open mailbox with lowered flag": "open mailbox",
    "ballot box with ballot": "ballot box", "black nib": "fountain pen nib", "straight ruler": "ruler",
    "triangular ruler": "set square", "locked": "padlock", "unlocked": "open padlock",
    "locked with pen": "padlock with pen", "locked with key": "padlock with key", "pick": "pickaxe",
    "carpentry saw": "saw", "link": "chain link", "dna": "DNA double helix", "satellite antenna": "satellite dish",
    "adhesive bandage": "bandage", "shower": "shower head", "roll of paper": "toilet paper roll",
    "soap": "bar of soap", "bubbles": "soap bubbles", "moai": "moai statue", "placard": "protest sign",
    "identification card": "ID card",
})

# nouns used without an article ('bacon strips on a wooden table')


# ------------------------------------------------------------------------------------------ records
class NpmRecord(BaseModel):
    name: str
    version: str
    integrity: str | None = Field(None, description="sha512 SRI of the tarball; None for a local folder")


class BuildParams(BaseModel):
    seed: int = 0
    val_object_fraction: float = 0.1
    val_combo_fraction: float = 0.1
    kept_groups: list[str] = Field(default_factory=lambda: list(KEPT_GROUPS))
    backdrop_kinds: list[str] = Field(default_factory=lambda: list(BACKDROP_KINDS))
    object_colours: list[str] = Field(default_factory=lambda: list(COLOUR_NAMES))
    # set by the build (no defaults from the running code, so an index from older rules never compares equal)
    emoji_package_version: str = ""
    rules: str = Field("", description="digest of the naming, scope and colour rules: a change rebuilds the index")


class HouseObject(BaseModel):
    """One render kept for the dataset."""
    key: str = Field(description="the render's code points as in its file name, e.g. '1f34e' (unique)")
    name: str = Field(description="natural English name used in captions, e.g. 'red apple'")
    cldr_name: str = Field(description="the CLDR short name, e.g. 'red apple', 'hot beverage'")
    emoji: str
    group: str = Field(description="emoji group slug, e.g. 'food-drink'")
    subgroup: str = Field(description="emoji subgroup slug, e.g. 'food-fruit'")
    keywords: list[str] = Field(default_factory=list, description="CLDR keywords (emojibase tags)")
    file: str = Field(description="the render, relative to the cache folder (absolute when outside it)")
    split: Literal["train", "val_objects"]
    bbox: tuple[int, int, int, int] = Field(description="alpha bounding box x0, y0, x1, y1 (exclusive)")
    natural_colour: str | None = Field(None, description="the named colour of its dominant hue, if clear")
    colour_targets: list[str] = Field(default_factory=list,
                                      description="colours a hue rotation turns it into cleanly")


class HouseDataset(BaseModel):
    """The contents of ``<cache>/house/index.json``: what was built from what, and every object's split."""
    format: int = INDEX_FORMAT
    package: NpmRecord
    metadata_package: NpmRecord
    params: BuildParams
    objects: list[HouseObject]
    held_out_combos: list[tuple[str, str]] = Field(
        description="(backdrop kind, recolour) pairs seen only in val_views")
    excluded: dict[str, int] = Field(default_factory=dict, description="renders left out, by reason")
    splits_doc: str = ""
    build_seconds: float = 0.0
    cache_dir: Path | None = Field(None, exclude=True, description="set when loaded; not written")

    # ---- views
    def objects_in(self, split: str) -> list[HouseObject]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        want = "val_objects" if split == "val_objects" else "train"
        return [o for o in self.objects if o.split == want]

    def object(self, key: str) -> HouseObject:
        for o in self.objects:
            if o.key == key:
                return o
        raise KeyError(key)

    def is_held_out(self, kind: str, colour: str | None) -> bool:
        return (kind, colour) in {tuple(c) for c in self.held_out_combos}

    def render_path(self, obj: HouseObject) -> Path:
        p = Path(obj.file)
        if p.is_absolute():
            return p
        if self.cache_dir is None:
            raise HouseDataError("this index was not loaded from a cache folder; cannot resolve render paths")
        return self.cache_dir / p

    def counts(self) -> dict[str, dict[str, int]]:
        groups = Counter(o.group for o in self.objects)
        by_split = Counter(o.split for o in self.objects)
        return {"groups": dict(sorted(groups.items())),
                "splits": {"train": by_split.get("train", 0), "val_objects": by_split.get("val_objects", 0)},
                "group_split": {f"{g}/{s}": n for (g, s), n in
                                sorted(Counter((o.group, o.split) for o in self.objects).items())},
                "excluded": dict(sorted(self.excluded.items()))}


SPLITS_DOC = (
    "val_objects: the objects whose NAME is among the lowest 10% by sha256([seed, 'object', name]); they never "
    "appear in train or val_views. held_out_combos: the (backdrop kind, recolour) pairs among the lowest 10% by "
    "sha256([seed, 'combo', kind, colour]) over backdrop_kinds x object_colours (natural colours are never held "
    "out). train: training objects in combinations not held out. val_views: training objects recoloured in "
    "held-out combinations only.")


def _rules_digest() -> str:
    rules = [INDEX_FORMAT, sorted(NAME_OVERRIDES.items()), KEPT_GROUPS, [vars(c) for c in OBJECT_COLOURS],
             [_HUED_S, _HUED_V, _MIN_HUED, _MIN_PEAK, _PEAK_HALF_WIDTH, _MIN_TURN, _MIN_NAMED_OPAQUE,
              _MIN_NAMED_HUED, _TARGET_MARGIN]]
    return hashlib.sha256(json.dumps(rules, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ npm fetching
def sri_sha512(path: Path) -> str:
    """The npm 'integrity' string (``sha512-<base64>``) of a file."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode("ascii")


def _npm(args: list[str], cwd: Path) -> str:
    exe = shutil.which("npm")
    if exe is None:
        raise HouseDataError("npm is not installed: it is needed once, to fetch the house dataset's packages "
                             "(apt-get install npm)")
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise HouseDataError(f"npm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def fetch_npm_package(pin: NpmPin, cache_dir: Path, *, progress: bool = True) -> Path:
    """``<cache>/npm/<name>-<version>/package``, fetched with ``npm pack`` and verified against ``pin``'s
    integrity (and the registry's ``dist.integrity``). Idempotent: a verified copy already there is returned
    without touching the network."""
    npm_dir = Path(cache_dir) / "npm"
    dest = npm_dir / pin.folder
    marker = dest / "imagesmith-verified.json"
    if marker.is_file() and (dest / "package").is_dir():
        try:
            done = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        tarball = dest / str(done.get("tarball", ""))
        if done.get("integrity") == pin.integrity and tarball.is_file() and sri_sha512(tarball) == pin.integrity:
            return dest / "package"
    npm_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=npm_dir) as tmp_s, \
            tqdm(total=3, desc=f"npm {pin.spec}", unit="step", disable=not progress) as bar:
        tmp = Path(tmp_s)
        bar.set_postfix_str("view")
        reported = json.loads(_npm(["view", pin.spec, "dist.integrity", "--json"], tmp) or "null")
        bar.update()
        if reported != pin.integrity:
            raise HouseDataError(f"the registry reports integrity {reported!r} for {pin.spec}, not the pinned "
                                 f"{pin.integrity!r}: refusing to build from a changed package")
        log.info("fetching %s from npm", pin.spec)
        bar.set_postfix_str("pack")
        packed = json.loads(_npm(["pack", pin.spec, "--json", "--ignore-scripts", "--pack-destination", str(tmp)],
                                 tmp))
        bar.update()
        bar.set_postfix_str("verify")
        tarball = tmp / packed[0]["filename"]
        got = sri_sha512(tarball)
        bar.update()
        if got != pin.integrity:
            raise HouseDataError(f"{tarball.name}: sha512 {got} does not match the pinned {pin.integrity}")
        out = tmp / "out"
        out.mkdir()
        with tarfile.open(tarball, "r:gz") as tar:
            members = tar.getmembers()
            for m in tqdm(members, desc=f"unpacking {pin.spec}", unit="file", disable=not progress):
                tar.extract(m, out, filter="data")
        shutil.move(str(tarball), out / tarball.name)
        (out / "imagesmith-verified.json").write_text(json.dumps(
            {"spec": pin.spec, "integrity": pin.integrity, "tarball": tarball.name}, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(out, dest)
    return dest / "package"


# ------------------------------------------------------------------------------------ emoji metadata
@dataclass(frozen=True)
class EmojiMeta:
    label: str
    group: str
    subgroup: str
    tags: tuple[str, ...]


def _cp_key(codepoints: tuple[int, ...]) -> tuple[int, ...]:
    """Code points without variation selector 16, so 'fe0f' spellings and bare ones meet."""
    return tuple(c for c in codepoints if c != 0xFE0F)


def codepoints_from_filename(stem: str) -> tuple[int, ...] | None:
    """'1f43b-200d-2744-fe0f' -> (0x1F43B, 0x200D, 0x2744, 0xFE0F); tag sequences use '_' ('1f3f4-e0067_...').
    None when the stem is not hex code points."""
    parts = [p for p in re.split(r"[-_]", stem.strip().lower()) if p]
    if not parts or not all(re.fullmatch(r"[0-9a-f]{1,6}", p) for p in parts):
        return None
    return tuple(int(p, 16) for p in parts)


def load_emojibase(folder: Path) -> dict[tuple[int, ...], EmojiMeta]:
    """``emojibase-data``'s ``en/data.json`` + ``meta/groups.json`` -> code points (no FE0F) -> metadata,
    skin-tone variants included (they carry their parent's group)."""
    data = json.loads((Path(folder) / "en" / "data.json").read_text(encoding="utf-8"))
    meta = json.loads((Path(folder) / "meta" / "groups.json").read_text(encoding="utf-8"))
    groups, subgroups = meta["groups"], meta["subgroups"]
    out: dict[tuple[int, ...], EmojiMeta] = {}

    def add(entry: dict, parent: dict) -> None:
        g, s = entry.get("group", parent.get("group")), entry.get("subgroup", parent.get("subgroup"))
        if g is None:
            return
        cps = codepoints_from_filename(entry["hexcode"])
        if cps is None:
            return
        out[_cp_key(cps)] = EmojiMeta(entry.get("label", ""), groups[str(g)],
                                      subgroups.get(str(s), "") if s is not None else "",
                                      tuple(entry.get("tags", parent.get("tags", ())) or ()))

    for e in data:
        add(e, {})
        for skin in e.get("skins", []) or []:
            add(skin, e)
    return out


def cldr_name(chars: str, fallback: str = "") -> str:
    """The CLDR short name from the ``emoji`` package ('red apple'), else ``fallback``, else Unicode's name."""
    for cand in (chars, chars.replace("\ufe0f", ""), chars + "\ufe0f"):
        entry = emoji.EMOJI_DATA.get(cand)
        if entry and entry.get("en"):
            return _clean_name(entry["en"])
    if fallback:
        return _clean_name(fallback)
    try:
        return _clean_name(unicodedata.name(chars[0]).lower())
    except (ValueError, IndexError):
        return ""


def _clean_name(raw: str) -> str:
    s = raw.strip().strip(":").replace("_", " ").replace("\u2019", "'").replace("\u201c", "").replace("\u201d", "")
    return re.sub(r"\s+", " ", s).strip()


def natural_name(cldr: str, group: str) -> str:
    """CLDR short name -> how a caption should say it ('dog face' -> 'dog head', 'hot beverage' -> 'cup of
    coffee')."""
    if cldr in NAME_OVERRIDES:
        return NAME_OVERRIDES[cldr]
    if group == "animals-nature" and cldr.endswith(" face"):
        return cldr[: -len(" face")] + " head"
    return cldr


def _exclusion(group: str, subgroup: str, name: str) -> str | None:
    """Why a render of a kept group is still left out, or None."""
    if subgroup == "time" and (re.search(r"o'clock$", name) or name.endswith("-thirty")):
        return "clock face variant"
    if subgroup == "sky-weather" and (name.endswith(" face") or " with face" in name):
        return "face"
    return None



def _hsv(rgb01: np.ndarray) -> np.ndarray:
    """Float RGB in 0..1 (..., 3) -> HSV with H in degrees [0, 360), S and V in 0..1."""
    flat = np.ascontiguousarray(rgb01.reshape(-1, 1, 3), dtype=np.float32)
    return cv2.cvtColor(flat, cv2.COLOR_RGB2HSV).reshape(rgb01.shape)


def _rgb(hsv: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(hsv.reshape(-1, 1, 3), dtype=np.float32)
    return np.clip(cv2.cvtColor(flat, cv2.COLOR_HSV2RGB).reshape(hsv.shape), 0.0, 1.0)


@dataclass(frozen=True)
class ColourStats:
    hued: float                      # share of opaque pixels that carry a hue
    peak_hue: float | None           # circular mean of the main hue cluster, degrees
    peak_share: float                # share of the hued pixels within +-_PEAK_HALF_WIDTH of it
    shares: tuple[float, ...]        # per OBJECT_COLOURS entry, share of the opaque pixels it names
    dominant: str | None             # the named colour, when clear

    @property
    def recolourable(self) -> bool:
        return self.peak_hue is not None and self.hued >= _MIN_HUED and self.peak_share >= _MIN_PEAK


def _circ_mean(deg: np.ndarray) -> float:
    r = np.deg2rad(deg)
    return float(np.mod(np.rad2deg(np.arctan2(np.sin(r).mean(), np.cos(r).mean())), 360.0))


def colour_stats(rgb01: np.ndarray, alpha01: np.ndarray) -> ColourStats:
    """The hue make-up of the opaque pixels (alpha >= 0.5) of a straight (not premultiplied) RGB image."""
    return _stats_hsv(_hsv(rgb01)[alpha01 >= 0.5])


def _stats_hsv(hsv: np.ndarray, margin: float = 0.0) -> ColourStats:
    """:func:`colour_stats` of the opaque pixels' HSV values, shape (N, 3)."""
    n_opaque = len(hsv)
    if n_opaque == 0:
        return ColourStats(0.0, None, 0.0, tuple(0.0 for _ in OBJECT_COLOURS), None)
    hued = (hsv[:, 1] >= _HUED_S) & (hsv[:, 2] >= _HUED_V)
    n_hued = int(hued.sum())
    peak, peak_share = None, 0.0
    if n_hued:
        hues = hsv[hued, 0]
        hist = np.bincount((hues // 10).astype(int) % 36, minlength=36).astype(np.float64)
        smooth = hist + np.roll(hist, 1) + np.roll(hist, -1)
        centre = (int(np.argmax(smooth)) * 10 + 5) % 360
        near = np.abs((hues - centre + 180.0) % 360.0 - 180.0) <= _PEAK_HALF_WIDTH + 10
        peak = _circ_mean(hues[near])
        peak_share = float((np.abs((hues - peak + 180.0) % 360.0 - 180.0) <= _PEAK_HALF_WIDTH).mean())
    # per pixel: the colour whose hue range holds it (integer bounds, so the floor of the hue decides)
    lut = np.full(360, -1, np.int64)
    for i, c in enumerate(OBJECT_COLOURS):
        lut[np.mod(np.arange(int(c.lo), int(c.hi)), 360)] = i
    idx = lut[hsv[:, 0].astype(np.int64) % 360]
    min_s = np.array([c.min_s for c in OBJECT_COLOURS] + [2.0], np.float32)
    min_v = np.array([c.min_v for c in OBJECT_COLOURS] + [2.0], np.float32)
    named = np.where((hsv[:, 1] >= min_s[idx]) & (hsv[:, 2] >= min_v[idx]), idx, -1)
    counts = np.bincount(named[named >= 0], minlength=len(OBJECT_COLOURS)).tolist()
    shares = tuple(n / n_opaque for n in counts)
    best = int(np.argmax(counts))
    dominant = None
    if n_hued and shares[best] >= _MIN_NAMED_OPAQUE + margin and counts[best] / n_hued >= _MIN_NAMED_HUED + margin:
        dominant = OBJECT_COLOURS[best].name
    return ColourStats(n_hued / n_opaque, peak, peak_share, shares, dominant)


def _colour(name: str) -> HueColour:
    for c in OBJECT_COLOURS:
        if c.name == name:
            return c
    raise KeyError(name)


def recolour(rgb01: np.ndarray, alpha01: np.ndarray, target: str) -> np.ndarray:
    """Rotate every hue so the object's main hue cluster lands on ``target``'s centre (straight RGB in and
    out; saturation and value untouched)."""
    stats = colour_stats(rgb01, alpha01)
    if stats.peak_hue is None:
        raise ValueError("object has no hue to rotate")
    hsv = _hsv(rgb01)
    hsv[..., 0] = np.mod(hsv[..., 0] + (_colour(target).centre - stats.peak_hue), 360.0)
    return _rgb(hsv)


def colour_targets(rgb01: np.ndarray, alpha01: np.ndarray) -> tuple[str | None, list[str]]:
    """(natural colour or None, the colours a hue rotation turns the object into cleanly: afterwards that
    colour names the object by the same rule as a natural colour). Objects without one clear hue cluster
    (a multicoloured toy, a grey wrench) get none."""
    hsv = _hsv(rgb01)[alpha01 >= 0.5]
    stats = _stats_hsv(hsv)
    if not stats.recolourable:
        return stats.dominant, []
    ok = []
    for c in OBJECT_COLOURS:
        turn = (c.centre - stats.peak_hue + 180.0) % 360.0 - 180.0
        if c.name == stats.dominant or abs(turn) < _MIN_TURN:  # an 'orange tangerine' is no recolour
            continue
        # a hue rotation leaves S and V alone, so the check needs no round trip through RGB
        turned = hsv.copy()
        turned[:, 0] = np.mod(turned[:, 0] + (c.centre - stats.peak_hue), 360.0)
        if _stats_hsv(turned, _TARGET_MARGIN).dominant == c.name:
            ok.append(c.name)
    return stats.dominant, ok


def recoloured_name(name: str, colour: str) -> str:
    """'red apple' + 'blue' -> 'blue apple'; 'teapot' + 'blue' -> 'blue teapot'."""
    words = name.split(" ")
    hit = [i for i, w in enumerate(words) if w.lower() in _COLOUR_WORDS]
    if hit:
        words[hit[0]] = colour
        return " ".join(words)
    return f"{colour} {name}"


def concept_vocabulary(index: HouseDataset, split: str = "train"):
    """What a model trained on ``split`` knows, for prompt grounding (``engine.grounding``): the objects' caption
    names, their CLDR names as aliases where the captions renamed them ('hot beverage' -> 'cup of coffee'), and
    the colour and size words the captions put before a name."""
    from ..engine.grounding import ConceptVocabulary
    objects = index.objects_in(split)
    names = sorted({o.name for o in objects})
    aliases = {o.cldr_name: o.name for o in objects if o.cldr_name.lower() != o.name.lower()
               and o.cldr_name not in names}
    return ConceptVocabulary(names=names, aliases=aliases, modifiers=frozenset(_COLOUR_WORDS | {"small", "large"}))


# ----------------------------------------------------------------------------------------- building
def _unit_hash(*parts: Any) -> float:
    digest = hashlib.sha256(json.dumps(parts, ensure_ascii=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _n_held(n: int, fraction: float) -> int:
    if n < 2 or fraction <= 0:
        return 0
    return min(n - 1, max(1, int(round(fraction * n))))


def held_out_names(names: list[str], seed: int, fraction: float) -> set[str]:
    uniq = sorted(set(names))
    ranked = sorted(uniq, key=lambda n: (_unit_hash(seed, "object", n), n))
    return set(ranked[: _n_held(len(uniq), fraction)])


def held_out_combos(seed: int, fraction: float, kinds: list[str] | tuple[str, ...] = BACKDROP_KINDS,
                    colours: list[str] | tuple[str, ...] = COLOUR_NAMES) -> list[tuple[str, str]]:
    """The (backdrop kind, recolour) pairs only ``val_views`` shows."""
    combos = [(k, c) for k in kinds for c in colours]
    ranked = sorted(combos, key=lambda kc: (_unit_hash(seed, "combo", kc[0], kc[1]), kc))
    return sorted(ranked[: _n_held(len(combos), fraction)])


def _load_rgba(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))


def _scan(package_dir: Path, meta: dict[tuple[int, ...], EmojiMeta], cache_dir: Path, progress: bool
          ) -> tuple[list[dict], Counter]:
    assets = package_dir / "assets"
    files = sorted(assets.glob("*.webp")) if assets.is_dir() else sorted(package_dir.glob("*.webp"))
    if not files:
        raise HouseDataError(f"no .webp renders in {package_dir}")
    excluded: Counter = Counter()
    rows = []
    for path in tqdm(files, desc="scanning renders", unit="render", disable=not progress):
        cps = codepoints_from_filename(path.stem)
        m = None
        if cps:  # tag sequences (England's flag) are named without their closing CANCEL TAG
            m = meta.get(_cp_key(cps)) or meta.get(_cp_key(cps) + (0xE007F,))
        if m is None:
            excluded["unknown code points"] += 1
            continue
        if m.group not in KEPT_GROUPS:
            excluded[f"group {m.group}"] += 1
            continue
        chars = "".join(chr(c) for c in cps)
        cldr = cldr_name(chars, m.label)
        why = _exclusion(m.group, m.subgroup, cldr)
        if why:
            excluded[why] += 1
            continue
        rgba = _load_rgba(path)
        a = rgba[..., 3]
        ys, xs = np.nonzero(a > 0)
        if len(xs) == 0:
            excluded["empty render"] += 1
            continue
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        natural, targets = colour_targets(rgba[..., :3].astype(np.float32) / 255.0, a.astype(np.float32) / 255.0)
        try:
            rel = str(path.resolve().relative_to(Path(cache_dir).resolve()))
        except ValueError:
            rel = str(path.resolve())
        rows.append(dict(key=path.stem.lower(), name=natural_name(cldr, m.group), cldr_name=cldr, emoji=chars,
                         group=m.group, subgroup=m.subgroup, keywords=list(m.tags), file=rel, bbox=bbox,
                         natural_colour=natural, colour_targets=targets))
    return rows, excluded


def index_path(cache_dir: Path | str) -> Path:
    return Path(cache_dir) / "house" / "index.json"


def default_cache_dir() -> Path:
    """``$IMAGESMITH_HOME/cache`` (``~/.imagesmith/cache`` by default): outside any checkout."""
    from ..core.settings import Settings
    return Settings.from_env().home / "cache"


def load_house_dataset(cache_dir: Path | str | None = None) -> HouseDataset:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    p = index_path(cache)
    if not p.is_file():
        raise HouseDataError(f"no house dataset index at {p}: build it first (imagesmith house data)")
    ds = HouseDataset.model_validate_json(p.read_text(encoding="utf-8"))
    ds.cache_dir = cache
    return ds


def _package_record(package_dir: Path, pin: NpmPin | None) -> NpmRecord:
    if pin is not None:
        return NpmRecord(name=pin.name, version=pin.version, integrity=pin.integrity)
    try:
        pj = json.loads((package_dir / "package.json").read_text(encoding="utf-8"))
        return NpmRecord(name=pj.get("name", package_dir.name), version=pj.get("version", "local"))
    except (OSError, json.JSONDecodeError):
        return NpmRecord(name=package_dir.name, version="local")


def build_house_dataset(cache_dir: Path | str, *, seed: int = 0, progress: bool = True,
                        package_dir: Path | str | None = None, emojibase_dir: Path | str | None = None,
                        val_object_fraction: float = 0.1, val_combo_fraction: float = 0.1) -> HouseDataset:
    """Fetch (npm, once) and index the house dataset under ``cache_dir``; returns the loaded index.

    ``package_dir`` / ``emojibase_dir`` use already unpacked package folders instead of npm (tests, offline
    mirrors); recorded in the index without an integrity. Re-running with the same inputs returns the
    existing index without scanning."""
    t0 = time.perf_counter()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    pkg = Path(package_dir) if package_dir is not None else fetch_npm_package(FLUENT_3D, cache, progress=progress)
    ebd = Path(emojibase_dir) if emojibase_dir is not None else fetch_npm_package(EMOJIBASE, cache,
                                                                                   progress=progress)
    package = _package_record(pkg, None if package_dir is not None else FLUENT_3D)
    metadata_package = _package_record(ebd, None if emojibase_dir is not None else EMOJIBASE)
    params = BuildParams(seed=seed, val_object_fraction=val_object_fraction, val_combo_fraction=val_combo_fraction,
                         emoji_package_version=emoji.__version__, rules=_rules_digest())
    if index_path(cache).is_file() and package.integrity and metadata_package.integrity:
        try:
            old = load_house_dataset(cache)
        except (HouseDataError, ValueError):
            old = None
        if (old is not None and old.format == INDEX_FORMAT and old.params == params and old.package == package
                and old.metadata_package == metadata_package
                and all(old.render_path(o).is_file() for o in old.objects)):
            return old
    rows, excluded = _scan(pkg, load_emojibase(ebd), cache, progress)
    val_names = held_out_names([r["name"] for r in rows], seed, val_object_fraction)
    objects = [HouseObject(split="val_objects" if r["name"] in val_names else "train", **r) for r in rows]
    ds = HouseDataset(package=package, metadata_package=metadata_package, params=params, objects=objects,
                      held_out_combos=held_out_combos(seed, val_combo_fraction), excluded=dict(excluded),
                      splits_doc=SPLITS_DOC, build_seconds=round(time.perf_counter() - t0, 2))
    out = index_path(cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(ds.model_dump_json(indent=1), encoding="utf-8")
    os.replace(tmp, out)
    ds.cache_dir = cache
    return ds


# ------------------------------------------------------------------------------------------ samples
@dataclass(frozen=True)
class SampleSpec:
    """Everything that decides one sample; :func:`render_sample` is a pure function of it and the size."""
    object_key: str
    backdrop_kind: str
    backdrop_seed: int
    colour: str | None = None
    scale: float = 0.6
    position: str = "centre"
    shadow: bool = True
    template: int = 0
    jitter: tuple[float, float] = (0.0, 0.0)  # fraction of the free room, -1..1, along x and y

    @property
    def size_word(self) -> str | None:
        if self.scale < SMALL_BELOW:
            return "small"
        if self.scale >= LARGE_FROM:
            return "large"
        return None


@dataclass
class HouseSample:
    image: Image.Image               # RGB, size x size
    mask: Image.Image                # L, the composited alpha (0..255 = 0..1)
    caption: str
    object_key: str
    object_name: str                 # the render's name, e.g. 'red apple'
    object_phrase: str               # as said in the caption, e.g. 'small blue apple'
    emoji: str
    group: str
    backdrop_kind: str
    backdrop_phrase: str
    colour: str | None               # the recolour named in the caption; None = natural colour
    scale: float                     # longer side of the object / frame side
    position: str                    # centre | left | right | bottom
    box: tuple[int, int, int, int]   # where the object's bounding box landed, x0, y0, x1, y1
    spec: SampleSpec = field(repr=False)

    @property
    def mask_array(self) -> np.ndarray:
        """The mask as float32 in 0..1."""
        return np.asarray(self.mask, np.float32) / 255.0


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    shrink = w < img.shape[1] or h < img.shape[0]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _placement(spec: SampleSpec, w: int, h: int, size: int) -> tuple[int, int]:
    """Top-left corner of a ``w x h`` object in a ``size`` frame for the spec's position."""
    jx, jy = spec.jitter
    room_x, room_y = size - w, size - h
    margin = 0.04 * size
    if spec.position == "left":
        x = margin * (1 + 0.5 * jx)
        y = room_y / 2 + jy * 0.25 * room_y
    elif spec.position == "right":
        x = room_x - margin * (1 + 0.5 * jx)
        y = room_y / 2 + jy * 0.25 * room_y
    elif spec.position == "bottom":
        x = room_x / 2 + jx * 0.15 * room_x
        y = room_y - margin * (1 + 0.5 * jy)
    else:
        x = room_x / 2 + jx * 0.1 * room_x
        y = room_y / 2 + jy * 0.1 * room_y
    return int(round(min(max(x, 0), room_x))), int(round(min(max(y, 0), room_y)))


def _shadow_map(alpha: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """A soft contact shadow under the object (an ellipse at its base) plus a faint blurred drop shadow."""
    x0, y0, x1, y1 = box
    h = max(1, y1 - y0)
    solid = alpha > 0.5
    rows = np.nonzero(solid.any(axis=1))[0]
    if len(rows) == 0:
        return np.zeros_like(alpha)
    bottom = int(rows.max())
    base = solid[max(0, bottom - max(1, int(0.12 * h))): bottom + 1]
    cols = np.nonzero(base.any(axis=0))[0]
    cx = (cols.min() + cols.max()) / 2.0
    half_w = max(2.0, 0.55 * (cols.max() - cols.min() + 1) + 0.05 * (x1 - x0))
    contact = np.zeros_like(alpha)
    cv2.ellipse(contact, (int(round(cx * 4)), int(round(bottom * 4))),
                (int(round(half_w * 4)), int(round(max(1.0, 0.05 * h) * 4))), 0, 0, 360, 1.0, -1,
                lineType=cv2.LINE_AA, shift=2)
    contact = cv2.GaussianBlur(contact, (0, 0), max(0.8, 0.025 * size))
    drop = np.zeros_like(alpha)
    dy = max(1, int(round(0.03 * h)))
    drop[dy:] = alpha[:-dy]
    drop = cv2.GaussianBlur(drop, (0, 0), max(1.0, 0.04 * h))
    return np.clip(0.55 * contact / max(contact.max(), 1e-6) + 0.22 * drop, 0.0, 0.6)


def sample_caption(obj: HouseObject, spec: SampleSpec, bg_phrase: str) -> tuple[str, str]:
    """(object phrase, caption) of a sample: the object's (recoloured, sized) name put into the spec's
    template with the backdrop phrase and placement."""
    phrase = recoloured_name(obj.name, spec.colour) if spec.colour else obj.name
    if spec.size_word:
        phrase = f"{spec.size_word} {phrase}"
    caption = TEMPLATES[spec.template % len(TEMPLATES)].format(
        obj=with_article(phrase), bg=bg_phrase, prep=backdrop_preposition(spec.backdrop_kind),
        at=_AT[spec.position], where="," + _AT[spec.position] if spec.position != "centre" else "")
    return phrase, caption


def short_caption(phrase: str, position: str, rng: np.random.Generator) -> str:
    """A caption of the object phrase alone ('a small blue apple', 'a photo of a teapot on the left'): no
    backdrop; a non-centre placement said half the time."""
    at = _AT[position] if rng.random() < 0.5 else ""
    return SHORT_TEMPLATES[int(rng.integers(0, len(SHORT_TEMPLATES)))].format(obj=with_article(phrase), at=at)


def render_sample(dataset: HouseDataset, spec: SampleSpec, size: int = 128) -> HouseSample:
    """Make one sample: backdrop, (recoloured) object composited with its alpha, shadow, caption."""
    obj = dataset.object(spec.object_key)
    bg_img, bg_phrase = make_backdrop(spec.backdrop_kind, size, np.random.default_rng(spec.backdrop_seed))
    bg = np.asarray(bg_img, np.float32) / 255.0

    rgba = _load_rgba(dataset.render_path(obj))
    bx0, by0, bx1, by1 = obj.bbox
    crop = rgba[by0:by1, bx0:bx1].astype(np.float32) / 255.0
    rgb, a = crop[..., :3], crop[..., 3]
    if spec.colour is not None:
        rgb = recolour(rgb, a, spec.colour)
    # scale: the longer side of the alpha box covers ``scale`` of the frame
    k = spec.scale * size / max(rgb.shape[0], rgb.shape[1])
    w, h = max(1, int(round(rgb.shape[1] * k))), max(1, int(round(rgb.shape[0] * k)))
    premul = np.concatenate([rgb * a[..., None], a[..., None]], axis=2)
    small = _resize(premul, w, h)
    x, y = _placement(spec, w, h, size)
    pm = np.zeros((size, size, 3), np.float32)
    alpha = np.zeros((size, size), np.float32)
    pm[y:y + h, x:x + w] = small[..., :3]
    alpha[y:y + h, x:x + w] = np.clip(small[..., 3], 0.0, 1.0)
    box = (x, y, x + w, y + h)

    if spec.shadow:
        bg = bg * (1.0 - _shadow_map(alpha, box, size)[..., None])
    # the mask is the alpha the compositing uses, exactly: quantise it first, then composite with it
    a_q = np.round(alpha * 255.0) / 255.0
    straight = np.clip(pm / np.maximum(alpha, 1e-6)[..., None], 0.0, 1.0)
    out = straight * a_q[..., None] + bg * (1.0 - a_q[..., None])
    image = Image.fromarray(np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8), "RGB")
    mask = Image.fromarray((a_q * 255.0).round().astype(np.uint8), "L")

    phrase, caption = sample_caption(obj, spec, bg_phrase)
    return HouseSample(image=image, mask=mask, caption=caption, object_key=obj.key, object_name=obj.name,
                       object_phrase=phrase, emoji=obj.emoji, group=obj.group, backdrop_kind=spec.backdrop_kind,
                       backdrop_phrase=bg_phrase, colour=spec.colour, scale=spec.scale, position=spec.position,
                       box=box, spec=spec)


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(0, len(seq)))]


def draw_spec(dataset: HouseDataset, split: str, obj: HouseObject, rng: np.random.Generator,
              *, recolour_p: float = 0.3) -> SampleSpec:
    """A random spec for ``obj`` within ``split``'s rules on (backdrop kind, colour) combinations."""
    kinds = list(dataset.params.backdrop_kinds)
    held = {tuple(c) for c in dataset.held_out_combos}
    if split == "val_views":
        options = [(k, c) for k, c in sorted(held) if c in obj.colour_targets]
        if not options:
            raise ValueError(f"{obj.key} fits no held-out combination")
        kind, colour = _choice(rng, options)
    else:
        colour = _choice(rng, obj.colour_targets) if obj.colour_targets and rng.random() < recolour_p else None
        allowed = [k for k in kinds if split == "val_objects" or (k, colour) not in held]
        if not allowed:  # every kind is held out with this colour: fall back to the natural colour
            colour, allowed = None, kinds
        kind = _choice(rng, allowed)
    u = rng.random()
    position = "centre" if u < 0.5 else "left" if u < 0.67 else "right" if u < 0.84 else "bottom"
    top = MAX_SCALE if position == "centre" else 0.55 if position == "bottom" else 0.6
    scale = float(rng.uniform(MIN_SCALE, top))
    return SampleSpec(object_key=obj.key, backdrop_kind=kind, backdrop_seed=int(rng.integers(0, 2 ** 62)),
                      colour=colour, scale=round(scale, 4), position=position, shadow=bool(rng.random() < 0.7),
                      template=int(rng.integers(0, len(TEMPLATES))),
                      jitter=(round(float(rng.uniform(-1, 1)), 4), round(float(rng.uniform(-1, 1)), 4)))


class HouseSampleDataset(torch.utils.data.Dataset):
    """Samples of one split, made on the fly. ``ds[i]`` is a dict for ``torch`` loaders (the house-ldm
    protocol): ``image`` FloatTensor [3, size, size] in [-1, 1], ``mask`` FloatTensor [1, size, size] in 0..1,
    ``caption`` and the structured fields (``object``, ``emoji``, ``group``, ``backdrop``, ``backdrop_phrase``,
    ``colour`` ('' for natural), ``scale``, ``position``). ``ds.sample(i)`` gives the :class:`HouseSample`.

    With ``short_caption_p`` that share of the captions (drawn per sample from its own stream) says the object
    alone, without the backdrop (:func:`short_caption`).

    Sample ``i`` depends only on (index, split, seed, i, size). Objects are visited in seeded shuffled rounds,
    so every object of the split appears once per ``len(objects)`` consecutive indices.

    ``object_weights`` (object name -> whole number of visits per round, 1 for names it leaves out) makes a
    curriculum: an object of weight 3 appears three times in every round (``house_eval.hard_object_weights``
    gives the objects the model draws badly more visits). Without it the rounds are exactly as before."""

    def __init__(self, index: HouseDataset | Path | str, split: str = "train", size: int = 128, seed: int = 0,
                 epoch_length: int | None = None, recolour_p: float = 0.3, short_caption_p: float = 0.0,
                 object_weights: dict[str, int] | None = None):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        self.index = index if isinstance(index, HouseDataset) else load_house_dataset(
            Path(index).parent.parent if Path(index).suffix == ".json" else index)
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self.recolour_p = float(recolour_p)
        if not 0.0 <= short_caption_p <= 1.0:
            raise ValueError(f"short_caption_p must be in [0, 1], not {short_caption_p}")
        self.short_caption_p = float(short_caption_p)
        objs = self.index.objects_in(split)
        if split == "val_views":
            held_colours = {c for _, c in self.index.held_out_combos}
            objs = [o for o in objs if held_colours & set(o.colour_targets)]
        self.objects: tuple[HouseObject, ...] = tuple(objs)
        if not self.objects:
            raise HouseDataError(f"split {split!r} has no objects")
        weights = dict(object_weights or {})
        bad = {k: v for k, v in weights.items() if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 100}
        if bad:
            raise ValueError(f"object weights must be whole numbers from 1 to 100: {dict(list(bad.items())[:3])}")
        unknown = set(weights) - {o.name for o in self.objects}
        if unknown:
            raise ValueError(f"object weights name objects not in split {split!r}: {', '.join(sorted(unknown)[:5])}")
        # the round: each object's index as many times as its weight
        self.visits: tuple[int, ...] = tuple(k for k, o in enumerate(self.objects) for _ in range(weights.get(o.name, 1)))
        self.epoch_length = int(epoch_length) if epoch_length is not None else 10 * len(self.objects)

    def __len__(self) -> int:
        return self.epoch_length

    def spec(self, i: int) -> SampleSpec:
        if not 0 <= i < self.epoch_length:
            raise IndexError(i)
        n = len(self.visits)
        code = _SPLIT_CODES[self.split]
        order = np.random.default_rng([self.seed, code, i // n, 0x0B1EC7]).permutation(n)
        obj = self.objects[self.visits[int(order[i % n])]]
        return draw_spec(self.index, self.split, obj, np.random.default_rng([self.seed, code, i]),
                         recolour_p=self.recolour_p)

    def sample(self, i: int) -> HouseSample:
        s = render_sample(self.index, self.spec(i), self.size)
        if self.short_caption_p:  # its own stream: the images and the other captions stay as without it
            rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], i, 0x5407])
            if rng.random() < self.short_caption_p:
                s = replace(s, caption=short_caption(s.object_phrase, s.position, rng))
        return s

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.sample(int(i))
        img = torch.from_numpy(np.asarray(s.image, np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
        mask = torch.from_numpy(s.mask_array[None].copy())
        return {"image": img, "mask": mask, "caption": s.caption, "object": s.object_name, "emoji": s.emoji,
                "group": s.group, "backdrop": s.backdrop_kind, "backdrop_phrase": s.backdrop_phrase,
                "colour": s.colour or "", "scale": s.scale, "position": s.position}


# ------------------------------------------------------------------------------------------ preview
def save_preview_sheet(path: Path | str, n: int = 48, *, dataset: HouseSampleDataset | None = None,
                       cache_dir: Path | str | None = None, split: str = "train", size: int = 128, seed: int = 0,
                       columns: int = 8, progress: bool = True) -> Path:
    """A grid PNG of ``n`` samples with their captions beneath, to look at what training will see."""
    ds = dataset or HouseSampleDataset(load_house_dataset(cache_dir), split, size=size, seed=seed)
    n = min(n, len(ds))
    font = ImageFont.load_default(size=10)
    s = ds.size
    chars = max(12, int(s / 5.2))
    lines = 5
    cell_w, cell_h = s + 8, s + 4 + 12 * lines
    rows = (n + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    step = max(1, len(ds) // n)
    for j in tqdm(range(n), desc="preview", unit="sample", disable=not progress):
        smp = ds.sample(j * step)
        x, y = (j % columns) * cell_w + 4, (j // columns) * cell_h + 2
        sheet.paste(smp.image, (x, y))
        text = textwrap.wrap(smp.caption, chars)[:lines]
        for li, line in enumerate(text):
            draw.text((x, y + s + 2 + 12 * li), line, fill=(20, 20, 20), font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the house dataset index (fetches two npm packages once).")
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default $IMAGESMITH_HOME/cache)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preview", type=Path, default=None, help="also write a preview sheet PNG here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ds = build_house_dataset(args.cache or default_cache_dir(), seed=args.seed)
    print(json.dumps(ds.counts(), indent=1))
    print(f"index: {index_path(ds.cache_dir)}  ({time.perf_counter() - t0:.1f} s)")
    if args.preview:
        print(save_preview_sheet(args.preview, cache_dir=ds.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
