"""`imagesmith train lora` on tiny random SD1.5/SDXL models (and two steps on the shipped house-ldm): loss,
outputs in both formats, registration, weight 0 identity, kohya key round trip, resume, bad configs, and
`imagesmith dataset check`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from imagesmith.core.requests import GenerateRequest, LoraSpec
from imagesmith.core.settings import Settings
from imagesmith.engine.generate import Engine
from imagesmith.models.lora_keys import from_kohya, sdxl_unet_module_to_ldm, to_kohya
from imagesmith.train import lora as L
from imagesmith.train.lora_data import LoraDataset, make_buckets, scan_folder

from fixtures.cli import run_cli

COLOURS = {"red": (220, 40, 30), "blue": (30, 60, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}


def make_dataset(folder: Path, n: int = 4, *, size=(64, 64), sub: str = "2_blocks") -> Path:
    d = folder / sub
    d.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate(list(COLOURS.items())[:n]):
        im = Image.new("RGB", size, (245, 245, 245))
        im.paste(rgb, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
        im.save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"a {name} square on a white backdrop")
    return folder


@pytest.fixture()
def home(tiny_models, tmp_path) -> Settings:
    """A fresh home whose checkpoints are the tiny SD1.5/SDXL models (linked), so what a run registers is
    seen by nothing else."""
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    for name in ("tiny-sd15", "tiny-sdxl"):
        (settings.models_dir / "checkpoints" / name).symlink_to(tiny_models.paths[name], target_is_directory=True)
    return settings


def config(tmp_path: Path, **kw) -> L.LoraTrainConfig:
    base = dict(base_model="tiny-sd15", dataset=make_dataset(tmp_path / "data"), output_name="blocks",
                trigger_word="blkstyle", rank=4, steps=8, batch_size=2, learning_rate=5e-3, resolution=64,
                bucket_step=16, progress=False, device="cpu", lr_scheduler="constant")
    base.update(kw)
    return L.LoraTrainConfig(**base)


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def fixed_loss(trainer: L.LoraTrainer) -> float:
    from diffusers import DDPMScheduler
    sched = DDPMScheduler.from_config(trainer.pipe.scheduler.config)
    pixels = torch.stack([trainer.dataset.load(i) for i in range(len(trainer.dataset))])
    captions = [trainer.dataset.caption(i) for i in range(len(trainer.dataset))]
    with torch.no_grad():
        return float(sum(trainer.loss(pixels, captions, torch.Generator().manual_seed(s), sched) for s in range(4)))


def test_training_lowers_the_loss_saves_both_formats_and_registers(home, tmp_path):
    cfg = config(tmp_path, steps=30, sample_every=15, sample_prompts=["blkstyle, a red square"], sample_steps=2)
    trainer = L.LoraTrainer(cfg, home)
    before = fixed_loss(trainer)  # the loss on a fixed batch (fixed noise and timesteps) before and after
    summary = trainer.train()
    after = fixed_loss(trainer)
    assert after < 0.9 * before, (before, after)
    assert summary["steps"] == 30 and summary["arch"] == "sd1" and summary["registered_format"] == "kohya"
    # the registered file: kohya keys + kohya metadata, in the home's loras folder
    registered = Path(summary["lora"])
    assert registered == home.models_dir / "loras" / "blocks.safetensors"
    with safe_open(str(registered), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys if not k.endswith(".alpha")} == {"lora_down", "lora_up"}
    assert meta["ss_network_dim"] == "4" and meta["imagesmith.trigger_word"] == "blkstyle"
    diff = load_file(summary["diffusers"])
    assert diff and all(k.startswith("unet.") for k in diff)
    # the card, the loss curve and sample grids exist and say what ran
    card = Path(summary["card"]).read_text()
    assert "blkstyle" in card and "30 steps" in card and "loss.png" in card
    run = Path(summary["card"]).parent
    assert (run / "loss.png").is_file() and (run / "samples" / "step-000030.png").is_file()
    assert len((run / "losses.jsonl").read_text().splitlines()) == 30


def test_both_formats_load_change_the_output_and_weight_zero_is_the_base(home, tmp_path):
    # alpha != rank: the kohya file carries it as .alpha, the diffusers file as its adapter metadata
    summary = L.LoraTrainer(config(tmp_path, steps=6, learning_rate=2e-2, alpha=2), home).train()
    # the diffusers-format file registered under a second name
    (home.models_dir / "loras" / "blocks-diffusers.safetensors").write_bytes(Path(summary["diffusers"]).read_bytes())
    engine = Engine(home, device="cpu")
    req = dict(prompt="blkstyle, a red square", model="tiny-sd15", width=64, height=64, steps=4, seed=3,
               sampler_name="Euler")
    base = px(engine.generate(GenerateRequest(**req)).images[0])
    for name in ("blocks", "blocks-diffusers"):
        zero = px(engine.generate(GenerateRequest(**req, loras=[LoraSpec(name=name, weight=0.0)])).images[0])
        one = px(engine.generate(GenerateRequest(**req, loras=[LoraSpec(name=name, weight=1.0)])).images[0])
        assert np.array_equal(zero, base), name
        assert np.abs(one - base).mean() > 0.5, name
    # the two formats are the same LoRA: the same pixels
    a = px(engine.generate(GenerateRequest(**req, loras=[LoraSpec(name="blocks", weight=1.0)])).images[0])
    b = px(engine.generate(GenerateRequest(**req, loras=[LoraSpec(name="blocks-diffusers", weight=1.0)])).images[0])
    assert np.abs(a - b).max() <= 1


def test_kohya_names_round_trip_sd15_and_sdxl(tiny_models):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from fixtures.tiny import build_sd15, build_sdxl
    for build, sdxl in ((build_sd15, False), (build_sdxl, True)):
        pipe = build(0)
        pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
        pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], init_lora_weights="gaussian"))
        layers = {"unet": get_peft_model_state_dict(pipe.unet), "text_encoder": get_peft_model_state_dict(pipe.text_encoder)}
        name_map = sdxl_unet_module_to_ldm(pipe.unet.config) if sdxl else None
        kohya = to_kohya(layers, alpha=3.0, unet_name_map=name_map)
        if sdxl:
            assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)  # kohya's SDXL (LDM) naming
        else:
            assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in kohya)
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
        back, alphas = from_kohya(kohya, {"unet": [n for n, _ in pipe.unet.named_modules()],
                                          "text_encoder": [n for n, _ in pipe.text_encoder.named_modules()]},
                                  unet_name_map=name_map)
        assert alphas == {"unet": 3.0, "text_encoder": 3.0}
        for comp in layers:
            assert set(back[comp]) == set(layers[comp])
            assert all(torch.equal(back[comp][k], layers[comp][k]) for k in layers[comp])


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(home, tmp_path):
    data = make_dataset(tmp_path / "data")
    whole = L.LoraTrainer(config(tmp_path, dataset=data, steps=6, output_name="whole", save_every=3,
                                 run_dir=tmp_path / "whole"), home)
    whole.train()
    first = L.LoraTrainer(config(tmp_path, dataset=data, steps=3, output_name="parts", save_every=3,
                                 run_dir=tmp_path / "parts"), home)
    first.train()
    second = L.LoraTrainer(config(tmp_path, dataset=data, steps=6, output_name="parts", save_every=3,
                                  run_dir=tmp_path / "parts"), home)
    summary = second.train()
    records = [json.loads(x) for x in (tmp_path / "parts" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and summary["steps"] == 6
    a, b = load_file(str(tmp_path / "whole" / "whole.kohya.safetensors")), load_file(str(tmp_path / "parts" / "parts.kohya.safetensors"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_sdxl_lora_trains_and_loads(home, tmp_path):
    summary = L.LoraTrainer(config(tmp_path, base_model="tiny-sdxl", steps=4, learning_rate=2e-2), home).train()
    with safe_open(summary["lora"], "pt") as f:
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    engine = Engine(home, device="cpu")
    req = dict(prompt="blkstyle, a red square", model="tiny-sdxl", width=64, height=64, steps=3, seed=3,
               sampler_name="Euler")
    base = px(engine.generate(GenerateRequest(**req)).images[0])
    one = px(engine.generate(GenerateRequest(**req, loras=[LoraSpec(name="blocks", weight=1.0)])).images[0])
    assert np.abs(one - base).mean() > 0.5


def test_house_ldm_lora_two_steps(tmp_path):
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    cfg = config(tmp_path, base_model="house-ldm", resolution=None, steps=2, batch_size=1)
    summary = L.LoraTrainer(cfg, settings).train()
    assert summary["arch"] == "house" and summary["buckets"] == ["128x128"]  # house-ldm's native size
    assert summary["registered_format"] == "diffusers"
    engine = Engine(settings, device="cpu")
    req = dict(prompt="blkstyle, a red square", width=128, height=128, steps=3, seed=3)
    base = px(engine.generate(GenerateRequest(**req)).images[0])
    zero = px(engine.generate(GenerateRequest(**req, loras=[LoraSpec(name="blocks", weight=0.0)])).images[0])
    assert np.array_equal(base, zero)
    with pytest.raises(L.LoraConfigError, match="MiniLM"):
        L.LoraTrainer(config(tmp_path, base_model="house-ldm", train_text_encoder=True), settings)


def test_buckets_group_aspect_ratios(tmp_path):
    make_dataset(tmp_path / "d", 2, size=(64, 64), sub="a")
    make_dataset(tmp_path / "d", 2, size=(60, 100), sub="b")
    ds = LoraDataset(tmp_path / "d", resolution=64, bucket_step=16, trigger_word="t")
    assert (64, 64) in make_buckets(64, 16) and ds.bucket_of[0] == (64, 64)
    tall = ds.bucket_of[2]
    assert tall[1] > tall[0] and tall[0] * tall[1] <= 64 * 64
    for batch in ds.batches(0, 2, seed=1):
        assert len({ds.bucket_of[i] for i in batch}) == 1
        assert ds.load(batch[0]).shape[1:] == (ds.bucket_of[batch[0]][1], ds.bucket_of[batch[0]][0])
    assert ds.caption(0).startswith("t, ")


def _write_config(tmp_path: Path, **data) -> Path:
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_configs_give_one_line_naming_the_key_or_file(home, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(home.home))
    data = make_dataset(tmp_path / "data")
    good = dict(base_model="tiny-sd15", dataset=str(data), output_name="x", steps=1, resolution=64)
    cases = [
        (dict(good, rnak=8), "unknown key 'rnak'"),
        (dict(good, dataset=str(tmp_path / "nope")), "nope does not exist"),
        (dict(good, base_model="no-such-model"), "no-such-model"),
        (dict(good, steps=None), "exactly one of 'steps' and 'epochs'"),
        ({k: v for k, v in good.items() if k != "output_name"}, "'output_name' is required"),
    ]
    for cfg, expected in cases:
        code, out, err = run_cli(capsys, "train", "lora", str(_write_config(tmp_path, **cfg)))
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (cfg, err)
        assert not (home.models_dir / "loras" / "x.safetensors").exists()
    (data / "2_blocks" / "1.txt").write_text("  \n")
    code, _, err = run_cli(capsys, "train", "lora", str(_write_config(tmp_path, **good)))
    assert code == 2 and "1.png: empty caption" in err
    code, _, err = run_cli(capsys, "train", "lora", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml does not exist" in err


def test_dataset_check_lists_every_problem(tmp_path, capsys):
    d = make_dataset(tmp_path / "data")
    code, out, _ = run_cli(capsys, "dataset", "check", str(d), "--min-side", "32")
    assert code == 0 and out.strip().endswith("ok") and "4 usable images (8 with repeats)" in out
    (d / "2_blocks" / "0.txt").unlink()
    (d / "2_blocks" / "broken.png").write_bytes(b"not a png")
    (d / "2_blocks" / "broken.txt").write_text("a broken file")
    Image.new("RGB", (8, 8)).save(d / "2_blocks" / "tiny.png")
    (d / "2_blocks" / "tiny.txt").write_text("a tiny image")
    code, out, _ = run_cli(capsys, "dataset", "check", str(d), "--min-side", "32", "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert report["missing_captions"] == [str(d / "2_blocks" / "0.png")]
    assert [u["file"] for u in report["unreadable"]] == [str(d / "2_blocks" / "broken.png")]
    assert [o["file"] for o in report["size_outliers"]] == [str(d / "2_blocks" / "tiny.png")]
    assert scan_folder(d).problems[0].endswith("no caption (0.txt is missing)")


@pytest.mark.parametrize("name", ["lora.yaml", "lora.ko.yaml"])
def test_example_configs_name_every_key_and_parse(name):
    path = Path(__file__).resolve().parents[2] / "examples" / "lora" / name
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(data) == set(L.LoraTrainConfig.model_fields)  # every key, commented
    cfg = L.LoraTrainConfig.from_yaml(path)
    assert cfg.dataset == path.parent / "my-dataset" and cfg.rank == 8
    english = yaml.safe_load((path.parent / "lora.yaml").read_text(encoding="utf-8"))
    assert data == english  # the Korean file differs in its comments only


def test_sdxl_text_encoder_lora_trains_both_encoders_and_loads(home, tmp_path):
    """SDXL with train_text_encoder: adapters on both CLIP encoders (kohya lora_te1_/lora_te2_ keys, diffusers
    text_encoder./text_encoder_2. keys), and the text-encoder part alone changes the picture."""
    summary = L.LoraTrainer(config(tmp_path, base_model="tiny-sdxl", steps=4, learning_rate=2e-2,
                                   train_text_encoder=True, output_name="sdxl-te"), home).train()
    with safe_open(summary["lora"], "pt") as f:
        keys = list(f.keys())
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    diff = load_file(summary["diffusers"])
    assert {k.split(".")[0] for k in diff} == {"unet", "text_encoder", "text_encoder_2"}
    # keep only the text-encoder keys: loading them must still change the output (they were trained, not zero)
    te_only = {k: v for k, v in load_file(summary["lora"]).items() if k.startswith(("lora_te1_", "lora_te2_"))}
    from safetensors.torch import save_file
    save_file(te_only, str(home.models_dir / "loras" / "sdxl-te-only.safetensors"))
    engine = Engine(home, device="cpu")
    req = dict(prompt="blkstyle, a red square", model="tiny-sdxl", width=64, height=64, steps=3, seed=3,
               sampler_name="Euler")
    base = px(engine.generate(GenerateRequest(**req)).images[0])
    for name in ("sdxl-te", "sdxl-te-only"):
        one = px(engine.generate(GenerateRequest(**req, loras=[LoraSpec(name=name, weight=1.0)])).images[0])
        assert np.abs(one - base).mean() > 0.2, name
