"""Storyboards: a script -> scenes -> one rendered panel per scene -> a sheet (PNG + PDF) and a manifest.

``imagesmith storyboard SCRIPT.txt -o DIR`` is a thin wrapper over :func:`storyboard`.

Stages, each deterministic unless an LLM is configured:

1. **Review** (:func:`review_length`, then the safety gate of :mod:`imagesmith.vision.safety` on the script,
   each scene and each prompt). Too-short or unsafe scripts are refused with one line (``BadRequest``) before
   any model is loaded. When an OpenAI-compatible endpoint is configured (:class:`LLMConfig`, env
   ``IMAGESMITH_LLM_URL`` / ``IMAGESMITH_LLM_MODEL`` / ``IMAGESMITH_LLM_KEY``) it also judges the logic of the
   script; that verdict is advisory and recorded under ``review`` in the manifest.
2. **Scenes** (:func:`split_scenes`): scene markers (``INT.``/``EXT.``/``SCENE``/``#``/``씬``/``장면``/``S#1``/
   ``1.``) win; otherwise paragraphs; a single paragraph is split into sentences. With an LLM configured, the
   LLM splits the script (the rules are the fallback when it fails). ``panels`` merges the closest short
   neighbours or splits the longest scene (sentences, then clauses, then words) until there are N
   (:func:`fit_panels`).
3. **Consistency**: one shared style LoRA (``style``, applied through the request's ``loras`` field, its
   trigger word read from the LoRA's card), one fixed description per recurring character (a drawable noun or
   a name bound to one, seen in two panels or more; its colour is the script's first colour for it, else a
   colour derived from its name) repeated in every prompt where it appears, one shared backdrop, and related
   seeds: **panel i (1-based) uses seed + i - 1** (mod 2**32); ``seed=-1`` draws one random base seed.
4. **Shots** (:func:`detect_shot`): wide / medium / close-up from English and Korean cues (medium when none).
5. **Prompts**: the house model draws product-like objects on backdrops, and nothing translates Korean
   offline, so the prompt is built from the drawable nouns found in the scene (English vocabulary, or the
   curated Korean->English table :data:`KO_EN`), their colours, setting words (night, rain, ...), the shot and
   the style tokens. The original scene text is kept for the sheet.
6. **Output**: every panel through the engine, then ``panel-NN.png``, ``storyboard.png`` (one sheet),
   ``storyboard.pdf`` (up to six panels a page) and ``storyboard.json``, written into a temporary folder beside
   DIR and renamed into place only when everything succeeded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import BadRequest
from ..core.requests import CheckedSampling, GenerateRequest
from .llm import LLMConfig, chat, json_object

StoryboardProgress = Callable[[int, int, str], None]  # (panels done, panels in all, label)

MIN_CHARS = 20
"""Fewest non-space characters a script may have (the length gate)."""
MIN_SENTENCES = 2
"""Fewest sentences a script may have (the length gate)."""
MAX_PANELS = 48
PANELS_PER_PAGE = 6
"""Panels on one PDF page (two rows of three)."""

SHOTS = ("wide", "medium", "close-up")
SHOT_PHRASE: Mapping[str, str] = MappingProxyType(
    {"wide": "wide shot of", "medium": "medium shot of", "close-up": "close-up of"})
DEFAULT_SHOT = "medium"

# ---------------------------------------------------------------------------------------------- vocabularies
# shot cues: English as whole words (lower case), Korean as nouns (a particle may follow) or stems
_SHOT_CUES_EN: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "close-up": ("close", "close-up", "closeup", "closer", "face", "faces", "eye", "eyes", "holds", "holding",
                 "hold", "hand", "hands", "detail", "details", "tear", "tears", "smile", "smiles", "lips",
                 "macro", "zoom", "zooms", "grips", "touches", "whisker", "whiskers", "paw", "paws", "steam",
                 "sip", "sips", "label"),
    "wide": ("landscape", "city", "crowd", "street", "streets", "wide", "panorama", "skyline", "horizon",
             "ocean", "sea", "beach", "field", "fields", "mountain", "mountains", "sky", "establishing",
             "town", "village", "road", "highway", "forest", "park", "ext", "aerial", "distance", "far"),
    "medium": ("sits", "sitting", "walks", "walking", "talks", "stands", "standing", "table", "room",
               "desk", "kitchen", "waits", "waiting", "medium"),
})
_SHOT_CUES_KO: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "close-up": ("얼굴", "눈", "눈물", "손", "손가락", "입술", "미소", "클로즈업", "표정", "발", "코", "김"),
    "wide": ("풍경", "도시", "거리", "군중", "바다", "하늘", "산", "들판", "전경", "해변", "마을", "숲", "길",
             "도로", "공원", "멀리", "와이드"),
    "medium": ("방", "식탁", "책상", "부엌", "앉", "서", "걷"),
})

# drawable nouns (canonical English) and the words that name them; multi-word names first when matching
_EN_NOUNS: tuple[str, ...] = (
    "cat", "kitten", "dog", "puppy", "apple", "coffee cup", "coffee", "cup", "mug", "teacup", "teapot", "kettle",
    "car", "taxi", "bus", "truck", "bicycle", "motorcycle", "train", "airplane", "rocket", "boat", "ship",
    "house", "tent", "lighthouse", "umbrella", "tree", "flower", "rose", "sunflower", "cactus", "plant",
    "bread", "croissant", "cake", "cookie", "donut", "pizza", "hamburger", "sandwich", "ice cream", "egg",
    "cheese", "carrot", "tomato", "banana", "grapes", "strawberry", "lemon", "orange", "watermelon", "pear",
    "peach", "cherry", "milk", "book", "letter", "envelope", "chair", "window", "door", "clock",
    "alarm clock", "phone", "camera", "bag", "backpack", "hat", "shoe", "balloon", "gift", "box", "key",
    "lamp", "candle", "guitar", "piano", "ball", "kite", "teddy bear", "robot", "bird", "fish", "rabbit",
    "bear", "duck", "chicken", "pig", "cow", "horse", "fox", "owl", "frog", "turtle", "mouse", "moon", "sun",
    "star", "cloud", "rainbow", "snowman", "mountain", "fire", "leaf", "mushroom", "bottle", "glass", "bowl",
    "spoon", "basket", "pumpkin", "wristwatch", "pencil", "paintbrush", "scissors", "newspaper", "radio",
    "television",
)
_EN_ALIASES: Mapping[str, str] = MappingProxyType({
    "kitty": "cat", "cats": "cat", "doggy": "dog", "automobile": "car", "bike": "bicycle", "plane": "airplane",
    "cellphone": "phone", "smartphone": "phone", "mobile": "phone", "tv": "television", "present": "gift",
    "cuppa": "cup", "espresso": "coffee", "latte": "coffee", "doughnut": "donut", "burger": "hamburger",
    "bunny": "rabbit", "home": "house", "cottage": "house", "suitcase": "bag", "sneaker": "shoe",
    "sneakers": "shoe", "mice": "mouse", "leaves": "leaf", "knives": "knife", "glasses": "glass",
})
ANIMATE: frozenset[str] = frozenset({
    "cat", "kitten", "dog", "puppy", "robot", "bird", "fish", "rabbit", "bear", "duck", "chicken", "pig", "cow",
    "horse", "fox", "owl", "frog", "turtle", "mouse", "teddy bear", "snowman"})
# setting words: not drawn as objects but said as a phrase after them
_SETTINGS_EN: Mapping[str, str] = MappingProxyType({
    "night": "at night", "midnight": "at night", "morning": "in the morning", "dawn": "at dawn",
    "evening": "in the evening", "sunset": "at sunset", "rain": "in the rain", "raining": "in the rain",
    "rainy": "in the rain", "snow": "in the snow", "snowing": "in the snow", "sea": "by the sea",
    "ocean": "by the sea", "beach": "on the beach", "city": "in the city", "street": "on the street",
    "road": "on the road", "park": "in the park", "garden": "in the garden", "kitchen": "in the kitchen",
    "cafe": "in a cafe", "café": "in a cafe", "forest": "in the forest", "room": "in a room",
    "table": "on a wooden table", "tables": "on a wooden table", "desk": "on a wooden table"})
# the house model's captions put objects on tables and backdrops: a table is where things stand, not a subject
_SURFACE_PHRASES = frozenset({"on a wooden table"})
_UNIQUE = frozenset({"sun", "moon"})

KO_EN: Mapping[str, str] = MappingProxyType({
    # animals
    "고양이": "cat", "새끼고양이": "kitten", "개": "dog", "강아지": "puppy", "토끼": "rabbit", "곰": "bear",
    "곰인형": "teddy bear", "오리": "duck", "닭": "chicken", "돼지": "pig", "소": "cow", "새": "bird",
    "물고기": "fish", "여우": "fox", "부엉이": "owl", "개구리": "frog", "거북이": "turtle", "쥐": "mouse",
    "로봇": "robot",
    # food and drink
    "사과": "apple", "커피": "coffee", "커피잔": "coffee cup", "컵": "cup", "머그잔": "mug", "찻잔": "teacup",
    "주전자": "teapot", "우유": "milk", "빵": "bread", "케이크": "cake", "쿠키": "cookie", "도넛": "donut",
    "피자": "pizza", "햄버거": "hamburger", "아이스크림": "ice cream", "달걀": "egg", "계란": "egg",
    "바나나": "banana", "포도": "grapes", "딸기": "strawberry", "레몬": "lemon", "오렌지": "orange",
    "수박": "watermelon", "당근": "carrot", "토마토": "tomato", "버섯": "mushroom", "호박": "pumpkin",
    # vehicles and places
    "자동차": "car", "차": "car", "택시": "taxi", "버스": "bus", "트럭": "truck", "자전거": "bicycle",
    "기차": "train", "비행기": "airplane", "로켓": "rocket", "보트": "boat", "집": "house", "텐트": "tent",
    "등대": "lighthouse",
    # objects
    "우산": "umbrella", "책": "book", "편지": "letter", "의자": "chair", "탁자": "table", "식탁": "table",
    "테이블": "table", "창문": "window", "문": "door", "시계": "clock", "전화기": "phone", "휴대폰": "phone",
    "카메라": "camera", "가방": "bag", "모자": "hat", "신발": "shoe", "풍선": "balloon", "선물": "gift",
    "상자": "box", "열쇠": "key", "램프": "lamp", "촛불": "candle", "초": "candle", "기타": "guitar",
    "피아노": "piano", "공": "ball", "연": "kite", "병": "bottle", "그릇": "bowl", "바구니": "basket",
    # nature
    "나무": "tree", "꽃": "flower", "장미": "rose", "해바라기": "sunflower", "선인장": "cactus",
    "화분": "plant", "달": "moon", "해": "sun", "태양": "sun", "별": "star", "구름": "cloud",
    "무지개": "rainbow", "눈사람": "snowman", "산": "mountain", "불": "fire", "나뭇잎": "leaf",
    # settings (become phrases, see _SETTINGS_EN)
    "바다": "sea", "비": "rain", "밤": "night", "아침": "morning", "저녁": "evening", "새벽": "dawn",
    "도시": "city", "거리": "street", "길": "road", "공원": "park", "정원": "garden", "부엌": "kitchen",
    "카페": "cafe", "숲": "forest", "방": "room", "해변": "beach", "노을": "sunset",
})
"""The curated Korean -> English keyword table: common drawable nouns and setting words."""

_COLOURS_EN: Mapping[str, str] = MappingProxyType({
    "red": "red", "orange": "orange", "yellow": "yellow", "green": "green", "blue": "blue", "purple": "purple",
    "pink": "pink", "brown": "brown", "black": "black", "white": "white", "grey": "grey", "gray": "grey",
    "golden": "golden", "gold": "golden", "silver": "silver", "ginger": "orange"})
_COLOURS_KO: Mapping[str, str] = MappingProxyType({
    "빨간": "red", "빨강": "red", "붉은": "red", "빨간색": "red", "파란": "blue", "파랑": "blue", "푸른": "blue",
    "파란색": "blue", "노란": "yellow", "노랑": "yellow", "노란색": "yellow", "하얀": "white", "흰": "white",
    "하얀색": "white", "흰색": "white", "검은": "black", "까만": "black", "검정": "black", "검은색": "black",
    "초록": "green", "초록색": "green", "녹색": "green", "주황": "orange", "주황색": "orange",
    "분홍": "pink", "분홍색": "pink", "핑크": "pink", "회색": "grey", "갈색": "brown", "보라": "purple",
    "보라색": "purple", "금색": "golden", "은색": "silver"})
# colours given to recurring characters the script does not colour (picked by a CRC of the name)
_ASSIGNED_COLOURS = ("red", "blue", "yellow", "green", "orange", "white", "pink", "purple", "brown", "grey")
_KO_PARTICLES = ("", "이", "가", "을", "를", "은", "는", "의", "에", "에서", "에게", "한테", "와", "과", "도",
                 "로", "으로", "만", "랑", "이랑", "처럼", "까지", "부터", "보다", "야", "아", "이가", "이는",
                 "이를", "이의", "에는", "에도", "으로는", "로는", "하고", "이다", "였다", "이었다", "입니다")
_STOP_EN = frozenset(
    "a an the and or but of to in on at by for with from into onto over under as is are was were be been it its "
    "this that these those he she they we you i his her their our your my me him them then when while there "
    "here again very just so up down out off not no yes one two some all each every slowly suddenly finally "
    "scene int ext day night cut fade".split())
_NAME_STOP = frozenset(
    "The A An And But Or Then When While She He They It We You I His Her Their Our Its This That There Here "
    "Scene Int Ext Cut Fade Day Night Morning Evening Later Meanwhile Suddenly Finally Outside Inside Title "
    "Close Wide Medium Now After Before At In On By With Of To Still Back Everyone Nobody Someone".split())

_MARKER = re.compile(
    r"^\s*(?:(?P<slug>(?:INT|EXT|INT\./EXT|I/E)\.)\s*"
    r"|(?P<scene>(?:SCENE|Scene|scene)\s*\d*\s*[:.\-–]?)\s*"
    r"|(?P<hash>#{1,6})\s*"
    r"|(?P<ko>(?:씬|장면)\s*\d*\s*[:.\-–]?|S#\s*\d+\s*[:.\-–]?)\s*"
    r"|(?P<num>\d{1,3}\s*[.)]|\[\s*\d{1,3}\s*\])\s+)")
_TITLE_LINE = re.compile(r"^\s*(?:title|제목)\s*[:：]\s*(?P<title>.+?)\s*$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?。！？…])[\"'”’)\]]*\s+")
_CLAUSE = re.compile(r"(?<=[,;:—–])\s+")
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_WORD_EN = re.compile(r"[A-Za-z][A-Za-z'\-]*")


# ---------------------------------------------------------------------------------------------- models
class StoryboardRequest(CheckedSampling):
    """One storyboard. Generation fields mean what they mean in GenerateRequest."""

    model_config = ConfigDict(extra="forbid")

    script: str = Field(..., max_length=200_000, description="the script text (scene markers, paragraphs or sentences)")
    title: str | None = Field(None, max_length=200, description="sheet title; default: a 'Title:' line, else 'Storyboard'")
    panels: int | None = Field(None, ge=1, le=MAX_PANELS, description="merge/split the scenes into exactly N panels")
    style: str | None = Field(None, description="style LoRA name in the registry (e.g. style-noto), shared by every panel")
    style_weight: float = Field(0.8, ge=0.0, le=2.0)
    backdrop: str = Field("a pale blue backdrop", description="shared backdrop phrase of every prompt ('' for none)")
    max_subjects: int = Field(2, ge=1, le=6, description="subjects per prompt, characters first (the house model "
                              "draws one or two objects well; more turn into a blend)")
    seed: int = Field(-1, ge=-1, lt=2**32, description="-1: random; panel i (1-based) uses seed + i - 1")
    model: str | None = Field(None, description="checkpoint; default: the default model (house-ldm)")
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(5.0, ge=0.0, le=30.0)
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "karras"
    negative_prompt: str = "text, watermark, blurry, lowres"
    width: int | None = Field(None, ge=8, le=2048)
    height: int | None = Field(None, ge=8, le=2048)
    panel_px: int = Field(256, ge=64, le=1024, description="panel size on the sheet (images are resized to it)")
    output: str | None = Field(None, description="output folder; default <home>/outputs/storyboards/<time>")
    safety: bool = Field(True, description="check the script, scenes and prompts with the safety gate")
    llm: LLMConfig | None = Field(None, description="OpenAI-compatible endpoint for scenes and the logic review")


@dataclass(frozen=True)
class Scene:
    text: str
    heading: str = ""

    @property
    def full(self) -> str:
        return f"{self.heading}. {self.text}".strip(". ") if self.heading else self.text


@dataclass(frozen=True)
class Mention:
    noun: str            # canonical English
    colour: str | None   # colour the scene gives it
    surface: str         # the word in the script


@dataclass
class Character:
    key: str                     # the noun, or the name
    description: str             # what every prompt says for it, e.g. "a grey cat"
    noun: str | None
    colour: str | None
    colour_source: str           # "script" or "assigned"
    name: str | None = None
    panels: list[int] = field(default_factory=list)


class StoryboardPanel(BaseModel):
    index: int = Field(..., description="1-based")
    scene: str
    heading: str = ""
    shot: str
    shot_cue: str | None = None
    prompt: str
    seed: int
    characters: list[str] = Field(default_factory=list)
    keywords: dict[str, str] = Field(default_factory=dict, description="script word -> English keyword")
    file: str | None = None


class StoryboardResult(BaseModel):
    out_dir: str
    sheet_png: str
    sheet_pdf: str
    manifest_path: str
    pages: int
    panels: list[StoryboardPanel]
    manifest: dict
    seconds: float


# ---------------------------------------------------------------------------------------------- review
def _clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).replace("\ufeff", "")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def sentences(text: str) -> list[str]:
    """Sentences of a text: split after . ! ? 。 … (a paragraph's line breaks also end one)."""
    out: list[str] = []
    for line in text.split("\n"):
        out += [s.strip() for s in _SENTENCE_END.split(line.strip()) if s.strip()]
    return out


def review_length(script: str) -> dict:
    """The length gate: BadRequest unless the script has MIN_CHARS non-space characters and MIN_SENTENCES
    sentences (scene markers count as sentence ends)."""
    text = _clean(script)
    chars = sum(1 for ch in text if not ch.isspace())
    if not chars:
        raise BadRequest("the script is empty: write a few scenes, one paragraph or marker (INT./EXT./SCENE/#/씬) each")
    body = "\n".join(line[m.end():] if (m := _MARKER.match(line)) else line for line in text.split("\n"))
    n = len(sentences(body))
    if chars < MIN_CHARS or n < MIN_SENTENCES:
        raise BadRequest(f"the script is too short for a storyboard ({chars} characters, {n} sentence(s)): "
                         f"write at least {MIN_CHARS} characters in {MIN_SENTENCES} sentences or more")
    return {"ok": True, "characters": chars, "sentences": n}


def review_safety(texts: Sequence[str], gate) -> dict:
    """The safety gate on every text; BadRequest naming the reason at the first flagged one."""
    for text in dict.fromkeys(t for t in texts if t.strip()):
        verdict = gate.check_prompt(text)
        if verdict.flagged:
            raise BadRequest(f"script refused by the safety policy: {verdict.reason}")
    return {"ok": True, "checked": len(texts)}


# ---------------------------------------------------------------------------------------------- scenes
def split_scenes(script: str) -> tuple[str | None, list[Scene]]:
    """(title from a 'Title:'/'제목:' line, scenes) by the rules: markers, else paragraphs, else sentences."""
    lines = _clean(script).split("\n")
    title = None
    if lines and (m := _TITLE_LINE.match(lines[0])):
        title, lines = m.group("title"), lines[1:]
    if any(_MARKER.match(line) for line in lines):
        scenes: list[Scene] = []
        heading, body = None, []

        def close():
            text = " ".join(" ".join(body).split())
            if heading is not None or text:
                if text or heading:
                    scenes.append(Scene(text=text or (heading or ""), heading=heading or ""))

        for line in lines:
            m = _MARKER.match(line)
            if m is None:
                if line.strip():
                    body.append(line.strip())
                continue
            close()
            rest = line[m.end():].strip()
            if m.group("num"):  # "1. The cat wakes up." : the rest of the line is story text
                heading, body = "", [rest] if rest else []
            else:               # "INT. KITCHEN - NIGHT", "# Morning", "씬 1 부엌": the line is a heading
                marker = m.group(0).strip()
                heading = (marker + " " + rest).strip() if m.group("slug") else rest
                body = []
        close()
        return title, [s for s in scenes if s.text.strip()]
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", "\n".join(lines)) if p.strip()]
    if len(paragraphs) >= 2:
        return title, [Scene(p) for p in paragraphs]
    return title, [Scene(s) for s in sentences("\n".join(lines))]


def _split_text(text: str) -> tuple[str, str] | None:
    """Two halves of a scene text: at the middle sentence end, else clause mark, else word."""
    for parts in (sentences(text), _CLAUSE.split(text), text.split()):
        parts = [p for p in parts if p.strip()]
        if len(parts) >= 2:
            total = sum(len(p) for p in parts)
            acc, cut = 0, 1
            for i, p in enumerate(parts[:-1], 1):
                acc += len(p)
                cut = i
                if acc >= total / 2:
                    break
            return " ".join(parts[:cut]), " ".join(parts[cut:])
    return None


def fit_panels(scenes: list[Scene], n: int | None) -> list[Scene]:
    """Exactly ``n`` scenes: merge the adjacent pair with the least text, or split the longest scene."""
    scenes = list(scenes)
    if n is None:
        return scenes
    while len(scenes) > n:
        i = min(range(len(scenes) - 1), key=lambda k: len(scenes[k].text) + len(scenes[k + 1].text))
        a, b = scenes[i], scenes[i + 1]
        heading = " / ".join(h for h in (a.heading, b.heading) if h)
        scenes[i:i + 2] = [Scene(f"{a.text} {b.text}".strip(), heading)]
    while len(scenes) < n:
        order = sorted(range(len(scenes)), key=lambda k: -len(scenes[k].text))
        for i in order:
            halves = _split_text(scenes[i].text)
            if halves:
                scenes[i:i + 1] = [Scene(halves[0], scenes[i].heading), Scene(halves[1], scenes[i].heading)]
                break
        else:
            raise BadRequest(f"cannot make {n} panels from this script: it has only {len(scenes)} scene(s) "
                             "that cannot be split further")
    return scenes


# ---------------------------------------------------------------------------------------------- LLM
def _short(exc: Exception) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}"[:200]


def llm_scenes(script: str, cfg: LLMConfig, panels: int | None) -> list[Scene]:
    """Scenes as the LLM splits them (raises on any transport or format problem)."""
    want = f" Make exactly {panels} scenes." if panels else ""
    system = ("You split a film or comic script into storyboard scenes, in order, one per visual moment. Keep "
              "the script's own words and language; do not add or translate." + want +
              ' Answer with JSON only: {"scenes": [{"heading": "optional place/time", "text": "scene text"}]}')
    got = json_object(chat(cfg, system, script)).get("scenes")
    if not isinstance(got, list) or not got:
        raise ValueError("the answer has no 'scenes' list")
    out = []
    for s in got:
        if isinstance(s, str):
            s = {"text": s}
        text = " ".join(str(s.get("text", "")).split()) if isinstance(s, dict) else ""
        if text:
            out.append(Scene(text, " ".join(str(s.get("heading") or "").split())))
    if not out:
        raise ValueError("the answer's scenes are empty")
    return out


def llm_review(script: str, cfg: LLMConfig) -> dict:
    system = ("You review a storyboard script for logic only: the order of events, continuity of characters "
              "and objects, contradictions. Answer with JSON only: "
              '{"ok": true or false, "notes": "one or two short sentences"}')
    try:
        got = json_object(chat(cfg, system, script))
        return {"judge": "llm", "model": cfg.model, "ok": bool(got.get("ok", True)),
                "notes": " ".join(str(got.get("notes", "")).split())[:500]}
    except Exception as exc:  # advisory: a failing judge never blocks the storyboard
        return {"judge": "llm", "model": cfg.model, "ok": None, "error": _short(exc)}


# ---------------------------------------------------------------------------------------------- analysis
def is_korean(text: str) -> bool:
    hangul = len(_HANGUL.findall(text))
    return hangul > 0 and hangul >= 0.3 * sum(ch.isalpha() for ch in text)


def _ko_words(text: str) -> list[str]:
    return [w for w in re.split(r"[^\w]+", text) if w]


def _ko_match(word: str, table: Mapping[str, str], *, stems: bool = False) -> str | None:
    """The table key ``word`` is (a noun plus an optional particle or plural 들), longest key first."""
    for key in sorted((k for k in table if word.startswith(k)), key=len, reverse=True):
        rest = word[len(key):]
        if rest.startswith("들"):
            rest = rest[1:]
        if rest in _KO_PARTICLES or stems:
            return key
    return None


_EN_FORMS: Mapping[str, str] = MappingProxyType({
    **{n: n for n in _EN_NOUNS},
    **{n + "s": n for n in _EN_NOUNS if not n.endswith(("s", "y", "x", "sh", "ch"))},
    **{n + "es": n for n in _EN_NOUNS if n.endswith(("s", "x", "sh", "ch", "o"))},
    **{n[:-1] + "ies": n for n in _EN_NOUNS if n.endswith("y") and n[-2] not in "aeiou"},
    **{n + "s": n for n in _EN_NOUNS if n.endswith("y") and n[-2] in "aeiou"},
    **_EN_ALIASES,
})
_EN_MAX_WORDS = max(len(k.split()) for k in _EN_FORMS)


def mentions(text: str) -> list[Mention]:
    """Drawable nouns and setting words of a scene, with the colour said right before each (in order)."""
    if is_korean(text):
        words = _ko_words(text)
        out = []
        for i, w in enumerate(words):
            key = _ko_match(w, KO_EN)
            if key is None:
                continue
            colour = None
            for prev in words[max(0, i - 2):i][::-1]:
                c = _ko_match(prev, _COLOURS_KO)
                if c:
                    colour = _COLOURS_KO[c]
                    break
            out.append(Mention(KO_EN[key], colour, key))
        # Latin words in a Korean script still count
        return out + _mentions_en(" ".join(re.findall(r"[A-Za-z][A-Za-z' \-]*", text)))
    return _mentions_en(text)


def _mentions_en(text: str) -> list[Mention]:
    words = [re.sub(r"['’]s$", "", w.lower()).strip("'-") for w in _WORD_EN.findall(text)]  # cat's -> cat
    out: list[Mention] = []
    i = 0
    while i < len(words):
        hit = None
        for k in range(min(_EN_MAX_WORDS, len(words) - i), 0, -1):
            phrase = " ".join(words[i:i + k])
            if phrase in _EN_FORMS or (k == 1 and phrase in _SETTINGS_EN):
                hit = (phrase, k)
                break
        if hit is None:
            i += 1
            continue
        phrase, k = hit
        noun = _EN_FORMS.get(phrase, phrase)
        # "orange" before a noun is its colour, not the fruit
        if noun == "orange" and i + 1 < len(words) and (words[i + 1] in _EN_FORMS):
            i += 1
            continue
        colour = None
        for prev in words[max(0, i - 2):i][::-1]:
            if prev in _COLOURS_EN:
                colour = _COLOURS_EN[prev]
                break
        out.append(Mention(noun, colour, phrase))
        i += k
    return out


# medium is the default: its cues (rooms, tables, sitting) weigh half of a close-up or wide cue
_SHOT_WEIGHT: Mapping[str, float] = MappingProxyType({"close-up": 1.0, "wide": 1.0, "medium": 0.5})


def detect_shot(text: str, heading: str = "") -> tuple[str, str | None]:
    """(shot, the cue that decided it): the shot with the most cue weight in the text (a heading's cues
    count half); ties go close-up > wide > medium; no cue: DEFAULT_SHOT."""
    counts = {s: 0.0 for s in SHOTS}
    first: dict[str, str] = {}
    for part, scale in ((text, 1.0), (heading, 0.5)):
        lower = [w.lower() for w in _WORD_EN.findall(part)]
        for shot, cues in _SHOT_CUES_EN.items():
            for w in lower:
                if w in cues:
                    counts[shot] += scale * _SHOT_WEIGHT[shot]
                    first.setdefault(shot, w)
        if _HANGUL.search(part):
            for shot, cues in _SHOT_CUES_KO.items():
                stems = {c for c in cues if len(c) == 1 and c in "앉서걷"}
                nouns = {c: c for c in cues if c not in stems}
                for w in _ko_words(part):
                    key = _ko_match(w, nouns)
                    if key is None and any(w.startswith(s) for s in stems) and len(w) <= 4:
                        key = w
                    if key is not None:
                        counts[shot] += scale * _SHOT_WEIGHT[shot]
                        first.setdefault(shot, key)
    best = max(counts.values())
    if best == 0:
        return DEFAULT_SHOT, None
    for shot in ("close-up", "wide", "medium"):
        if counts[shot] == best:
            return shot, first[shot]
    return DEFAULT_SHOT, None  # unreachable


def _article(phrase: str) -> str:
    if phrase in _UNIQUE:
        return "the " + phrase
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _names(scenes: Sequence[Scene]) -> dict[str, list[int]]:
    """Capitalised names (English) and the panels that say them: a name is said twice or more, or once
    inside a sentence (not as its first word), and is not a drawable noun or a marker word."""
    seen: dict[str, list[int]] = {}
    mid: set[str] = set()
    for idx, scene in enumerate(scenes):
        for sent in sentences(scene.text):
            toks = _WORD_EN.findall(sent)
            for j, tok in enumerate(toks):
                if not re.fullmatch(r"[A-Z][a-z]{1,}", tok) or tok in _NAME_STOP or tok.lower() in _EN_FORMS \
                        or tok.lower() in _SETTINGS_EN or tok.lower() in _COLOURS_EN:
                    continue
                seen.setdefault(tok, [])
                if idx not in seen[tok]:
                    seen[tok].append(idx)
                if j > 0:
                    mid.add(tok)
    counts = {n: sum(len(re.findall(rf"\b{n}\b", s.text)) for s in scenes) for n in seen}
    return {n: p for n, p in seen.items() if n in mid or counts[n] >= 2}


def find_characters(scenes: Sequence[Scene]) -> dict[str, Character]:
    """Recurring characters: drawable animate/objects nouns in 2+ panels, and names (bound to the animate
    noun of the sentence that first says them). One fixed description each."""
    per_panel = [mentions(s.text) for s in scenes]
    chars: dict[str, Character] = {}

    def colour_of(noun: str) -> str | None:
        for ms in per_panel:
            for m in ms:
                if m.noun == noun and m.colour:
                    return m.colour
        return None

    # names first: "Milo, a grey cat, ..." binds Milo to "grey cat"
    for name, panels in _names(scenes).items():
        noun = None
        for idx in panels:
            for sent in sentences(scenes[idx].text):
                if re.search(rf"\b{name}\b", sent):
                    animate = [m for m in mentions(sent) if m.noun in ANIMATE]
                    if animate:
                        noun = animate[0].noun
                    break
            break
        chars[name] = Character(key=name, description="", noun=noun, colour=None, colour_source="", name=name,
                                panels=[])
    for idx, ms in enumerate(per_panel):
        for m in ms:
            if m.noun in _SETTINGS_EN and m.noun not in _EN_FORMS:
                continue
            key = next((c.key for c in chars.values() if c.name and c.noun == m.noun), m.noun)
            ch = chars.get(key) or chars.setdefault(key, Character(key=key, description="", noun=m.noun,
                                                                    colour=None, colour_source=""))
            if idx not in ch.panels:
                ch.panels.append(idx)
    for name in [c.key for c in chars.values() if c.name]:
        ch = chars[name]
        for idx, scene in enumerate(scenes):
            if re.search(rf"\b{name}\b", scene.full) and idx not in ch.panels:
                ch.panels.append(idx)
        ch.panels.sort()
    out: dict[str, Character] = {}
    for key, ch in chars.items():
        if len(ch.panels) < 2 and not ch.name:
            continue
        if ch.name and ch.noun is None:
            ch.description, ch.colour_source = ch.name, "name"
        else:
            colour = colour_of(ch.noun) if ch.noun else None
            ch.colour_source = "script" if colour else "assigned"
            if colour is None:  # a colour of its own: derived from its name, one the script does not use
                taken = {m.colour for ms in per_panel for m in ms if m.colour} | {c.colour for c in out.values()}
                free = [c for c in _ASSIGNED_COLOURS if c not in taken] or list(_ASSIGNED_COLOURS)
                colour = free[zlib.crc32(key.encode("utf-8")) % len(free)]
            ch.colour = colour
            ch.description = _article(f"{colour} {ch.noun}")
        out[key] = ch
    return out


_PRONOUN = re.compile(r"\b(?:he|she|his|her|him|they|them|their|it|its)\b|(?:^|\s)(?:그는|그가|그의|그녀|그들)",
                      re.IGNORECASE)


def build_prompt(scene: Scene, shot: str, characters: Mapping[str, Character], style_tokens: Sequence[str],
                 backdrop: str, fallback: str | None, carry: Character | None = None,
                 max_subjects: int = 2) -> tuple[str, list[str], dict[str, str]]:
    """(prompt, character keys in it, script word -> keyword) for one panel. The scene text gives the
    subjects; a heading (INT. KITCHEN - NIGHT) gives settings, and subjects only when the text names none."""
    text_ms = mentions(scene.text)
    head_ms = mentions(scene.heading) if scene.heading else []
    has_subject = any(not (m.noun in _SETTINGS_EN and m.noun not in _EN_FORMS) for m in text_ms)
    ms = head_ms + text_ms if not has_subject else (
        [m for m in head_ms if m.noun in _SETTINGS_EN and m.noun not in _EN_FORMS] + text_ms)
    subjects: list[str] = []
    settings: list[str] = []
    used: list[str] = []
    keywords: dict[str, str] = {}
    for name, ch in characters.items():
        if ch.name and re.search(rf"\b{re.escape(name)}\b", scene.full):
            subjects.append(ch.description)
            used.append(name)
    for m in ms:
        if is_korean(scene.full) or m.surface != m.noun:
            keywords.setdefault(m.surface, m.noun)
        if m.noun in _SETTINGS_EN and m.noun not in _EN_FORMS:
            if _SETTINGS_EN[m.noun] not in settings:
                settings.append(_SETTINGS_EN[m.noun])
            continue
        ch = next((c for c in characters.values() if c.noun == m.noun), None)
        if ch is not None:
            if ch.description not in subjects:
                subjects.append(ch.description)
                used.append(ch.key)
            continue
        phrase = _article(f"{m.colour} {m.noun}" if m.colour else m.noun)
        if phrase not in subjects and not any(s.endswith(" " + m.noun) for s in subjects):
            subjects.append(phrase)
    someone = any(characters[k].name or characters[k].noun in ANIMATE for k in used)
    if carry is not None and not someone and carry.description not in subjects and _PRONOUN.search(scene.text):
        subjects.insert(0, carry.description)  # "his eyes follow ...": the character of the panel before
        used.append(carry.key)
    if not subjects:
        if ms or is_korean(scene.full) or fallback:
            subjects = [fallback or "a gift box"]
        else:  # English text with no known noun: its content words
            words = [w.lower() for w in _WORD_EN.findall(scene.full) if w.lower() not in _STOP_EN and len(w) > 2]
            subjects = [" ".join(dict.fromkeys(words[:5]))] if words else ["a gift box"]
    described = {c.description for c in characters.values()}
    subjects = sorted(subjects, key=lambda x: x not in described)[:max_subjects]  # characters first (stable)
    used = [k for k in used if characters[k].description in subjects]
    body = subjects[0] if len(subjects) == 1 else ", ".join(subjects[:-1]) + " and " + subjects[-1]
    parts = [f"{SHOT_PHRASE[shot]} {body}"]
    surface = [s for s in settings if s in _SURFACE_PHRASES]
    parts += [s for s in settings if s not in _SURFACE_PHRASES][:2] + surface[:1]
    if backdrop and not surface:
        parts.append(f"on {backdrop}" if not backdrop.startswith(("on ", "in ", "at ")) else backdrop)
    parts += list(style_tokens)
    return ", ".join(parts), used, keywords


def trigger_word(lora_path: Path) -> str | None:
    """The trigger word a LoRA's card names (``| Trigger word | notomoji |`` in NAME.md beside it)."""
    card = Path(lora_path).with_suffix(".md")
    try:
        text = card.read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r"^\|\s*Trigger word\s*\|\s*`?([^|`]+?)`?\s*\|", text, re.MULTILINE | re.IGNORECASE)
    return m.group(1).strip() if m else None


@dataclass
class Plan:
    """Everything decided before any pixel: scenes, panels, prompts, seeds, review."""
    title: str
    scenes: list[Scene]
    panels: list[StoryboardPanel]
    characters: dict[str, Character]
    base_seed: int
    scene_source: str
    review: dict
    style: dict | None
    notes: list[str] = field(default_factory=list)


def plan_storyboard(req: StoryboardRequest, *, registry=None, safety_gate=None) -> Plan:
    """Review, scenes, shots, characters, prompts and seeds, without loading a model (safety's text encoder
    aside). Raises BadRequest (too short, unsafe, unknown style, cannot fit the panels)."""
    review: dict = {"length": review_length(req.script)}
    style = None
    style_tokens: list[str] = []
    if req.style:
        if registry is None:
            from ..core.settings import Settings
            from ..models.house import make_registry
            registry = make_registry(Settings.from_env())
        entry = registry.get(req.style, "lora")  # ModelNotFound: one line naming the LoRA
        trig = trigger_word(entry.path)
        style = {"lora": entry.name, "weight": req.style_weight, "trigger": trig}
        if trig:
            style_tokens.append(trig)
    title, scenes = split_scenes(req.script)
    source, notes = "rules", []
    if req.llm is not None:
        try:
            scenes = llm_scenes(req.script, req.llm, req.panels)
            source = "llm"
        except Exception as exc:  # the rules are the fallback
            notes.append(f"LLM scene split failed ({_short(exc)}); used the rules")
    if not scenes:
        raise BadRequest("the script has no scene text")
    scenes = fit_panels(scenes, req.panels)
    characters = find_characters(scenes)
    main = max((c for c in characters.values() if c.noun), key=lambda c: len(c.panels), default=None)
    base = req.seed if req.seed >= 0 else random.randrange(2**32)
    panels = []
    last: Character | None = None  # the latest animate character: what a pronoun refers to
    for i, scene in enumerate(scenes):
        shot, cue = detect_shot(scene.text, scene.heading)
        prompt, used, keywords = build_prompt(scene, shot, characters, style_tokens, req.backdrop,
                                              main.description if main else None, carry=last,
                                              max_subjects=req.max_subjects)
        for key in used:
            if characters[key].name or characters[key].noun in ANIMATE:
                last = characters[key]
        panels.append(StoryboardPanel(index=i + 1, scene=scene.text, heading=scene.heading, shot=shot, shot_cue=cue,
                                      prompt=prompt, seed=(base + i) % 2**32, characters=used, keywords=keywords))
    if req.safety:
        if safety_gate is None:
            from ..vision.safety import SafetyGate
            safety_gate = SafetyGate()
        review["safety"] = review_safety([req.script, *(s.full for s in scenes), *(p.prompt for p in panels)],
                                         safety_gate)
    else:
        review["safety"] = {"skipped": "safety off in the request"}
    review["logic"] = llm_review(req.script, req.llm) if req.llm is not None else {"skipped": "no LLM configured"}
    return Plan(title=req.title or title or "Storyboard", scenes=scenes, panels=panels, characters=characters,
                base_seed=base, scene_source=source, review=review, style=style, notes=notes)


# ---------------------------------------------------------------------------------------------- sheet
@dataclass(frozen=True)
class _Fonts:
    title: ImageFont.FreeTypeFont
    label: ImageFont.FreeTypeFont
    text: ImageFont.FreeTypeFont
    small: ImageFont.FreeTypeFont
    path: str


def _fonts(sample: str, scale: float) -> tuple[_Fonts, list[str]]:
    from ..compose.typeset import font_candidates, font_for, font_path, missing_glyphs
    notes = []
    try:
        regular = font_for(sample, "regular", role="storyboard text")
        bold = font_for(sample, "bold", role="storyboard text")
    except BadRequest:
        regular, bold = font_path("regular"), font_path("bold")
        notes.append("no installed font draws " + repr("".join(missing_glyphs(regular, sample))[:40]) +
                     f"; tried {', '.join(p.name for p in font_candidates('regular'))}")

    def f(path: Path, px: float) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(str(path), max(8, round(px * scale)))
    return _Fonts(f(bold, 30), f(bold, 15), f(regular, 14), f(regular, 11), str(regular)), notes


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy wrap at spaces; a word wider than the line breaks between characters; '…' ends a cut."""
    lines: list[str] = []
    cur = ""
    tokens = text.split()
    for tok in tokens:
        trial = f"{cur} {tok}" if cur else tok
        if draw.textlength(trial, font=font) <= width:
            cur = trial
            continue
        if cur:
            lines.append(cur)
        cur = ""
        for ch in tok:  # a long word: break it by characters
            if draw.textlength(cur + ch, font=font) > width and cur:
                lines.append(cur)
                cur = ch
            else:
                cur += ch
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "…"]
    return lines


def _line_h(font) -> int:
    a, d = font.getmetrics()
    return a + d + 2


def render_sheet(title: str, subtitle: str, panels: Sequence[StoryboardPanel], images: Sequence[Image.Image],
                 fonts: _Fonts, panel_px: int, page: str = "") -> Image.Image:
    """One sheet: title, then rows of [image / '#n  SHOT' / scene text / prompt in small type]."""
    n = len(panels)
    cols = n if n <= 3 else (2 if n == 4 else 3)
    rows = -(-n // cols)
    pad, gap = max(16, panel_px // 10), max(14, panel_px // 14)
    cell_w = panel_px
    probe = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    blocks = []
    for p in panels:
        label = f"#{p.index}  {p.shot.upper()}" + (f"  ·  {p.heading}" if p.heading else "")
        blocks.append((_wrap(probe, label, fonts.label, cell_w, 2), _wrap(probe, p.scene, fonts.text, cell_w, 6),
                       _wrap(probe, "prompt: " + p.prompt, fonts.small, cell_w, 4)))

    def block_h(b) -> int:
        return (len(b[0]) * _line_h(fonts.label) + 4 + len(b[1]) * _line_h(fonts.text) + 6
                + len(b[2]) * _line_h(fonts.small))
    row_h = [panel_px + 10 + max(block_h(b) for b in blocks[r * cols:(r + 1) * cols]) for r in range(rows)]
    head_h = _line_h(fonts.title) + _line_h(fonts.small) + 14
    width = 2 * pad + cols * cell_w + (cols - 1) * gap
    height = pad + head_h + sum(row_h) + (rows - 1) * gap + pad
    sheet = Image.new("RGB", (width, height), (250, 250, 247))
    d = ImageDraw.Draw(sheet)
    d.text((pad, pad), title, font=fonts.title, fill=(20, 20, 20))
    if page:
        d.text((width - pad, pad + 8), page, font=fonts.small, fill=(110, 110, 110), anchor="ra")
    d.text((pad, pad + _line_h(fonts.title) + 4), subtitle, font=fonts.small, fill=(100, 100, 100))
    y = pad + head_h
    for r in range(rows):
        for c in range(cols):
            k = r * cols + c
            if k >= n:
                break
            x = pad + c * (cell_w + gap)
            im = images[k].convert("RGB")
            scale = panel_px / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
            sheet.paste(im, (x + (panel_px - im.width) // 2, y + (panel_px - im.height) // 2))
            d.rectangle((x - 1, y - 1, x + panel_px, y + panel_px), outline=(60, 60, 60), width=1)
            ty = y + panel_px + 8
            label, text, prompt = blocks[k]
            for line in label:
                d.text((x, ty), line, font=fonts.label, fill=(25, 25, 25))
                ty += _line_h(fonts.label)
            ty += 4
            for line in text:
                d.text((x, ty), line, font=fonts.text, fill=(40, 40, 40))
                ty += _line_h(fonts.text)
            ty += 6
            for line in prompt:
                d.text((x, ty), line, font=fonts.small, fill=(120, 120, 120))
                ty += _line_h(fonts.small)
        y += row_h[r] + gap
    return sheet


# ---------------------------------------------------------------------------------------------- output
def _check_out_dir(out: Path, *, create_parent: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BadRequest(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "storyboard.json").is_file():
        raise BadRequest(f"output folder {out} is not empty and holds no earlier storyboard: choose a new or "
                         "empty folder")
    if not create_parent:
        return
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadRequest(f"cannot create {parent}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK):
        raise BadRequest(f"cannot write in {parent}")


def _install(tmp: Path, out: Path) -> None:
    """Move the finished folder into place: a new or empty DIR is replaced by a rename; an earlier storyboard
    in DIR is swapped out and then removed."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def storyboard(request: StoryboardRequest, engine=None, *, progress: Optional[StoryboardProgress] = None,
               safety_gate=None) -> StoryboardResult:
    """Script -> panels -> sheet (PNG, PDF), panel PNGs and storyboard.json in ``request.output``.

    Nothing is written unless every panel rendered; bad input raises BadRequest (or ModelNotFound for an
    unknown style/model) before any model is loaded."""
    from ..core.outputs import save_image, screen
    from ..core.requests import LoraSpec
    start = time.perf_counter()
    if engine is None:
        from ..engine.generate import Engine
        engine = Engine()
    if request.safety and safety_gate is None:  # one gate for the texts and the panels
        from ..vision.safety import SafetyGate
        safety_gate = SafetyGate.from_settings(engine.settings)
    out = Path(request.output).expanduser() if request.output else (
        engine.settings.home / "outputs" / "storyboards" / time.strftime("%Y%m%d-%H%M%S"))
    _check_out_dir(out, create_parent=False)  # cheap checks first: no model is loaded for a bad request
    if request.model and request.model.lower() not in getattr(engine, "_adopted", {}):
        engine.registry.get(request.model, "checkpoint")  # ModelNotFound: one line naming it
    plan = plan_storyboard(request, registry=engine.registry, safety_gate=safety_gate)
    _check_out_dir(out, create_parent=True)
    loras = [LoraSpec(name=plan.style["lora"], weight=request.style_weight)] if plan.style else []
    images: list[Image.Image] = []
    screened = []
    results = []
    total = len(plan.panels)
    if progress:
        progress(0, total, "storyboard")
    for p in plan.panels:
        greq = GenerateRequest(prompt=p.prompt, negative_prompt=request.negative_prompt, model=request.model,
                               loras=loras, steps=request.steps, cfg_scale=request.cfg_scale,
                               sampler_name=request.sampler_name, scheduler=request.scheduler, seed=p.seed,
                               width=request.width, height=request.height)
        res = engine.generate(greq)
        seen = screen(res.images[0], safety_gate if request.safety else None, placeholder=True)
        screened.append(seen)
        images.append(seen.image)  # the sheet shows what the panel file holds
        results.append(res)
        if progress:
            progress(p.index, total, f"panel {p.index}/{total}")
    first = results[0]
    sample = plan.title + " ".join(p.scene + p.heading + p.prompt for p in plan.panels)
    scale = request.panel_px / 256
    fonts, font_notes = _fonts(sample, max(0.75, min(2.0, scale)))
    style_txt = f"  ·  style {plan.style['lora']}:{plan.style['weight']:g}" if plan.style else ""
    subtitle = (f"{len(plan.panels)} panels  ·  {first.model_name}  ·  {request.steps} steps  ·  seeds "
                f"{plan.panels[0].seed}-{plan.panels[-1].seed} (seed + panel - 1){style_txt}")
    sheet = render_sheet(plan.title, subtitle, plan.panels, images, fonts, request.panel_px)
    chunks = [list(range(i, min(i + PANELS_PER_PAGE, total))) for i in range(0, total, PANELS_PER_PAGE)]
    pages = [render_sheet(plan.title, subtitle, [plan.panels[k] for k in ch], [images[k] for k in ch], fonts,
                          request.panel_px, page=f"page {j + 1}/{len(chunks)}" if len(chunks) > 1 else "")
             for j, ch in enumerate(chunks)]
    manifest = {
        "title": plan.title,
        "model": first.model_name, "model_hash": first.model_hash,
        "style": plan.style,
        "seed": plan.base_seed, "seed_rule": "panel i (1-based) uses seed + i - 1 (mod 2**32)",
        "steps": request.steps, "cfg_scale": request.cfg_scale, "sampler_name": request.sampler_name,
        "scheduler": request.scheduler, "negative_prompt": request.negative_prompt, "backdrop": request.backdrop,
        "scene_source": plan.scene_source, "notes": plan.notes + font_notes,
        "characters": [{"key": c.key, "name": c.name, "description": c.description, "noun": c.noun,
                        "colour": c.colour, "colour_source": c.colour_source,
                        "panels": [i + 1 for i in c.panels]} for c in plan.characters.values()],
        "review": plan.review,
        "llm": {"url": request.llm.url, "model": request.llm.model} if request.llm else None,
        "panels": [], "sheet": {"png": "storyboard.png", "pdf": "storyboard.pdf", "pages": len(pages)},
        "version": first.version,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a folder like any other (mkdtemp makes it 0700)
        for p, seen, res in zip(plan.panels, screened, results):
            p.file = f"panel-{p.index:02d}.png"
            save_image(seen.image, tmp / p.file, result=res, record=res.records[0], screened=seen)
            manifest["panels"].append({**p.model_dump(), **({"safety": seen.flag} if seen.flag else {})})
        sheet.save(tmp / "storyboard.png", format="PNG", optimize=True)
        pages[0].save(tmp / "storyboard.pdf", format="PDF", save_all=True, append_images=pages[1:],
                      resolution=144.0, title=plan.title, producer=f"imagesmith {first.version}")
        manifest["seconds"] = round(time.perf_counter() - start, 3)
        (tmp / "storyboard.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        _install(tmp, out)
    except OSError as exc:
        raise BadRequest(f"cannot write the storyboard to {out}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return StoryboardResult(out_dir=str(out), sheet_png=str(out / "storyboard.png"),
                            sheet_pdf=str(out / "storyboard.pdf"), manifest_path=str(out / "storyboard.json"),
                            pages=len(pages), panels=plan.panels, manifest=manifest, seconds=manifest["seconds"])
