"""`imagesmith storyboard`: scenes, shots, consistent characters, related seeds, the review gates, the LLM path
(against a fake OpenAI-compatible server on localhost), and the CLI end to end on the shipped house model with
two sampler steps (sheet PNG, PDF pages, manifest, panel files) plus one clear line for every bad input."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagesmith.core.errors import BadRequest
from imagesmith.workflows.storyboard import (
    KO_EN, LLMConfig, Scene, StoryboardRequest, detect_shot, find_characters, fit_panels, plan_storyboard,
    render_sheet, review_length, split_scenes, trigger_word, _fonts)
from fixtures.cli import run_cli

EN = """Title: Milo's Rainy Morning

INT. KITCHEN - MORNING
Milo, a grey cat, wakes up next to a coffee cup on the table.

INT. KITCHEN - LATER
Close on Milo's face: his eyes follow a red apple rolling across the table.

EXT. CITY STREET - DAY
A car drives down the wide city street in the rain. The car is fast.

INT. HOUSE - NIGHT
Milo holds the apple in his paws and falls asleep. The car waits outside.
"""

KO = """제목: 고양이의 하루

씬 1. 부엌 - 아침
하얀 고양이가 식탁 위의 커피잔 옆에서 잠을 깬다.

씬 2. 부엌
고양이의 얼굴. 고양이의 눈이 빨간 사과를 바라본다.

씬 3. 거리 - 낮
빨간 자동차가 비 오는 도시의 거리를 달린다.

씬 4. 방 - 밤
고양이가 사과를 안고 잠이 든다.
"""


def plan(script: str, **kw):
    return plan_storyboard(StoryboardRequest(script=script, safety=False, **kw))


# ------------------------------------------------------------------------------------------------ scenes
def test_scenes_from_paragraphs_sentences_and_markers():
    _, paras = split_scenes("A cat sleeps on the sofa.\nIt dreams.\n\nA red car stops outside.\n\nThe cat wakes up.")
    assert [s.text for s in paras] == ["A cat sleeps on the sofa. It dreams.", "A red car stops outside.",
                                       "The cat wakes up."]
    _, sents = split_scenes("A cat sleeps. A car arrives! Does the cat wake up? It does.")
    assert len(sents) == 4 and sents[2].text == "Does the cat wake up?"
    title, marked = split_scenes(EN)
    assert title == "Milo's Rainy Morning"
    assert [s.heading for s in marked] == ["INT. KITCHEN - MORNING", "INT. KITCHEN - LATER", "EXT. CITY STREET - DAY",
                                           "INT. HOUSE - NIGHT"]
    assert marked[2].text == "A car drives down the wide city street in the rain. The car is fast."
    _, other = split_scenes("SCENE 1: Garden\nA cat sits.\n# Kitchen\nA cup steams.\n1. The cat drinks.\n2) The end.")
    assert [(s.heading, s.text) for s in other] == [("Garden", "A cat sits."), ("Kitchen", "A cup steams."),
                                                    ("", "The cat drinks."), ("", "The end.")]


def test_korean_scenes_markers_and_sentences():
    title, scenes = split_scenes(KO)
    assert title == "고양이의 하루" and len(scenes) == 4
    assert scenes[0].heading == "부엌 - 아침" and scenes[0].text.startswith("하얀 고양이가")
    _, s2 = split_scenes("장면 1\n고양이가 잔다.\n장면 2\n개가 짖는다.")
    assert [s.text for s in s2] == ["고양이가 잔다.", "개가 짖는다."]
    _, s3 = split_scenes("고양이가 잔다. 개가 짖는다. 비가 온다.")
    assert len(s3) == 3


def test_panels_merge_and_split_to_n():
    _, scenes = split_scenes(EN)
    two = fit_panels(scenes, 2)
    assert len(two) == 2 and " ".join(s.text for s in two) == " ".join(s.text for s in scenes)
    six = fit_panels(scenes, 6)
    assert len(six) == 6 and " ".join(s.text for s in six).split() == " ".join(s.text for s in scenes).split()
    with pytest.raises(BadRequest, match="cannot make 3 panels"):
        fit_panels([Scene("Cat."), Scene("Dog.")], 3)


# ------------------------------------------------------------------------------------------------ shots
@pytest.mark.parametrize("text, shot", [
    ("Close on her eyes as she holds the cup.", "close-up"),
    ("A crowd fills the city landscape at dusk.", "wide"),
    ("The cat sits at the desk.", "medium"),
    ("A cat and a ball.", "medium"),                       # no cue: the default
    ("고양이의 얼굴이 보인다.", "close-up"),
    ("손으로 사과를 든다.", "close-up"),
    ("도시의 거리 풍경.", "wide"),
    ("고양이가 방에 있다.", "medium"),
])
def test_shot_cues(text, shot):
    assert detect_shot(text)[0] == shot


# ------------------------------------------------------------------------------------------------ consistency
def test_character_description_is_the_same_in_every_panel():
    p = plan(EN, seed=10, max_subjects=4)
    milo = p.characters["Milo"]
    assert milo.description == "a grey cat" and milo.panels == [0, 1, 3]
    car = p.characters["car"]                         # the script gives it no colour: one is assigned, once
    assert car.colour_source == "assigned" and car.colour not in ("grey", "red")
    for panel in p.panels:
        mentions_milo = "Milo" in panel.scene
        assert (panel.prompt.count("a grey cat") == 1) == mentions_milo, panel.prompt
        assert ("car" in panel.scene) == (car.description in panel.prompt), panel.prompt
        assert panel.prompt.startswith({"wide": "wide shot of", "medium": "medium shot of",
                                        "close-up": "close-up of"}[panel.shot])
    assert [p.shot for p in p.panels] == ["medium", "close-up", "wide", "close-up"]
    capped = plan(EN, seed=10)                           # default: two subjects a prompt, characters first
    assert [x.prompt.split(",")[0] for x in capped.panels] == [
        "medium shot of a grey cat and a coffee cup", "close-up of a grey cat and a red apple",
        f"wide shot of {car.description}", "close-up of a grey cat and a red apple"]
    split = plan(EN, seed=10, panels=7)                # "his eyes follow ..." : the pronoun carries Milo over
    his = next(x for x in split.panels if x.scene.startswith("his eyes"))
    assert "Milo" in his.characters and his.prompt.startswith("close-up of a grey cat")


def test_korean_prompts_from_the_keyword_table_and_scene_text_kept():
    assert len(KO_EN) >= 60
    p = plan(KO, seed=3, style="style-noto")
    assert p.characters["cat"].description == "a white cat"
    for panel, scene in zip(p.panels, split_scenes(KO)[1]):
        assert panel.scene == scene.text                 # the original text goes on the sheet
        assert panel.prompt.isascii() and panel.prompt.endswith("notomoji")
        if "고양이" in scene.text:
            assert "a white cat" in panel.prompt
    assert "a red car" in p.panels[2].prompt and "in the rain" in p.panels[2].prompt
    assert p.panels[2].keywords["자동차"] == "car" and p.panels[2].keywords["거리"] == "street"
    assert p.style == {"lora": "style-noto", "weight": 0.8, "trigger": "notomoji"}


def test_seeds_are_base_plus_panel_index():
    p = plan(EN, seed=2**32 - 2, panels=4)
    assert [x.seed for x in p.panels] == [2**32 - 2, 2**32 - 1, 0, 1]
    r = plan(EN)                                         # -1: one random base seed
    assert [x.seed for x in r.panels] == [(r.base_seed + i) % 2**32 for i in range(4)]


def test_trigger_word_from_the_card():
    from imagesmith.models.house import SHIPPED_DIR
    assert trigger_word(SHIPPED_DIR / "loras" / "style-noto.safetensors") == "notomoji"


# ------------------------------------------------------------------------------------------------ review
@pytest.mark.parametrize("script, needle", [
    ("", "empty"), ("   \n\n ", "empty"), ("A cat.", "too short"),
    ("The grey cat sleeps on the warm sofa all day long", "too short"),   # one sentence
])
def test_length_gate_refuses(script, needle):
    with pytest.raises(BadRequest, match=needle):
        review_length(script)


def test_safety_gate_refuses_the_script():
    with pytest.raises(BadRequest, match="safety policy: blocked term 'gore'"):
        plan_storyboard(StoryboardRequest(script="A cat walks home. Then there is gore everywhere on the street."))


# ------------------------------------------------------------------------------------------------ LLM
class _FakeLLM(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        system = body["messages"][0]["content"]
        if self.server.broken:
            content = "sorry, I cannot do JSON"
        elif "split" in system:
            content = "```json\n" + json.dumps({"scenes": [
                {"heading": "Morning", "text": "A grey cat wakes up next to a coffee cup."},
                {"text": "The grey cat watches a red car in the rain."},
                "Close on the cat's eyes: an apple."]}) + "\n```"
        else:
            content = json.dumps({"ok": False, "notes": "The car appears without setup."})
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_llm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeLLM)
    server.seen, server.broken = [], False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_llm_splits_scenes_and_reviews_logic(fake_llm):
    env = {"IMAGESMITH_LLM_URL": f"http://127.0.0.1:{fake_llm.server_port}", "IMAGESMITH_LLM_MODEL": "fake-7b",
           "IMAGESMITH_LLM_KEY": "sk-test"}
    cfg = LLMConfig.from_env(env)
    assert LLMConfig.from_env({}) is None and "sk-test" not in repr(cfg)
    p = plan(EN, seed=1, llm=cfg)
    assert p.scene_source == "llm" and len(p.panels) == 3
    assert p.panels[0].heading == "Morning" and p.panels[2].shot == "close-up"
    assert all("a grey cat" in x.prompt for x in p.panels)
    assert p.review["logic"] == {"judge": "llm", "model": "fake-7b", "ok": False,
                                 "notes": "The car appears without setup."}
    assert [s["path"] for s in fake_llm.seen] == ["/v1/chat/completions"] * 2
    assert fake_llm.seen[0]["auth"] == "Bearer sk-test" and fake_llm.seen[0]["body"]["model"] == "fake-7b"
    assert fake_llm.seen[0]["body"]["messages"][1]["content"] == EN
    fake_llm.broken = True                              # an unusable answer: the rules take over
    q = plan(EN, seed=1, llm=cfg)
    assert q.scene_source == "rules" and len(q.panels) == 4 and "LLM scene split failed" in q.notes[0]
    assert q.review["logic"]["ok"] is None and "error" in q.review["logic"]


# ------------------------------------------------------------------------------------------------ sheet
def test_korean_text_renders_with_a_hangul_font():
    """The sheet's font covers every Hangul syllable of the scenes, and the glyphs differ from .notdef."""
    from imagesmith.compose.typeset import missing_glyphs
    p = plan(KO, seed=1)
    sample = p.title + "".join(x.scene + x.heading for x in p.panels)
    fonts, notes = _fonts(sample, 1.0)
    assert notes == [] and missing_glyphs(fonts.path, sample) == [] and "Nanum" in fonts.path
    tiles = [Image.new("RGB", (128, 128), (200, 210, 230)) for _ in p.panels]
    sheet = render_sheet(p.title, "sub", p.panels, tiles, fonts, 256)
    arr = np.asarray(sheet.convert("L"))
    assert sheet.width == 2 * 25 + 2 * 256 + 18 and (arr < 100).sum() > 2000   # 2 columns for 4 panels; ink


def test_install_swaps_an_earlier_storyboard_and_keeps_nothing_else(tmp_path):
    from imagesmith.workflows.storyboard import _check_out_dir, _install
    out = tmp_path / "board"
    out.mkdir()
    (out / "storyboard.json").write_text("{}")
    (out / "panel-09.png").write_bytes(b"old")
    _check_out_dir(out, create_parent=True)               # an earlier storyboard may be replaced
    new = tmp_path / ".board.tmp-x"
    new.mkdir()
    (new / "storyboard.json").write_text('{"new": 1}')
    _install(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["storyboard.json"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadRequest, match="not a folder"):
        _check_out_dir(tmp_path / "file", create_parent=False)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IMAGESMITH_LLM_URL", raising=False)
    return tmp_path


def _pdf_pages(data: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page(?!s)", data))


def test_cli_end_to_end(home, capsys):
    script = home / "en.txt"
    script.write_text(EN, encoding="utf-8")
    out = home / "board"
    code, stdout, err = run_cli(capsys, "storyboard", str(script), "--panels", "7", "--style", "style-noto",
                                "--seed", "5", "--steps", "2", "-o", str(out), "--json")
    assert code == 0, err
    manifest = json.loads(stdout)
    assert manifest == json.loads((out / "storyboard.json").read_text(encoding="utf-8"))
    assert manifest["model"] == "house-ldm" and manifest["style"]["lora"] == "style-noto"
    assert manifest["review"]["length"]["ok"] and manifest["review"]["safety"]["ok"]
    assert manifest["review"]["logic"] == {"skipped": "no LLM configured"}
    panels = manifest["panels"]
    assert [p["index"] for p in panels] == list(range(1, 8)) and [p["seed"] for p in panels] == list(range(5, 12))
    for p in panels:
        assert set(p) >= {"index", "scene", "shot", "prompt", "seed", "file"} and "notomoji" in p["prompt"]
        im = Image.open(out / p["file"])
        assert im.size == (128, 128) and np.asarray(im).std() > 5          # painted, not flat
        assert f"Seed: {p['seed']}" in im.text["parameters"] and "style-noto" in im.text["parameters"]
    sheet = Image.open(out / "storyboard.png")
    assert sheet.format == "PNG" and sheet.width > 3 * 256 and sheet.height > 3 * 256   # 3 columns, 3 rows
    # panel 1 on the sheet is panel-01.png, scaled up
    first = np.asarray(Image.open(out / panels[0]["file"]).convert("RGB").resize((256, 256), Image.LANCZOS), float)
    pad = 25
    top = next(y for y in range(sheet.height) if np.asarray(sheet.convert("L"))[y, pad + 128] < 80 and y > 60)
    tile = np.asarray(sheet.convert("RGB"), float)[top + 1:top + 257, pad:pad + 256]
    assert np.abs(tile - first).mean() < 6
    pdf = (out / "storyboard.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and _pdf_pages(pdf) == 2 == manifest["sheet"]["pages"]   # 6 + 1 panels
    assert not [p for p in home.iterdir() if p.name.startswith(".board")]                  # no temp dir left


@pytest.mark.parametrize("case", ["missing", "empty", "short", "style", "unsafe", "model", "not-empty"])
def test_cli_bad_input_one_line_no_output(home, capsys, case):
    script = home / "s.txt"
    text = {"empty": "", "short": "A cat.", "unsafe": "A cat walks home. Then there is gore everywhere."}.get(case, EN)
    if case != "missing":
        script.write_text(text, encoding="utf-8")
    out = home / "board"
    extra = {"style": ["--style", "no-such-style"], "model": ["--model", "no-such-model"]}.get(case, [])
    if case == "not-empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    code, stdout, err = run_cli(capsys, "storyboard", str(script), *extra, "--steps", "1", "-o", str(out))
    needle = {"missing": "not found", "empty": "empty", "short": "too short", "style": "no-such-style",
              "unsafe": "safety policy", "model": "no-such-model", "not-empty": "not empty"}[case]
    assert code == 2 and err.startswith("imagesmith: error:") and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err and stdout == ""
    if case == "not-empty":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()
    assert not [p for p in home.iterdir() if p.name.startswith(".board")]
