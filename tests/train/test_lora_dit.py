"""`imagesmith train lora` on the tiny random FLUX and SD3 checkpoints (flow matching on the transformer): the loss
falls, the registered diffusers-format file loads through the engine with `--lora NAME:W` and changes the picture
(weight 0 gives the base pixels), alpha survives the round trip, the kohya file in BFL/MMDiT naming is exactly
the same update, resume continues from the saved step, buckets follow the 16 px grid, text-encoder training is
refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from imagesmith.core.requests import GenerateRequest, LoraSpec
from imagesmith.core.settings import Settings
from imagesmith.engine.generate import Engine
from imagesmith.models.lora_keys import dit_to_kohya
from imagesmith.train import lora as L

from test_lora import make_dataset, px

WIDE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out"]


@pytest.fixture()
def home(tiny_models, tmp_path) -> Settings:
    settings = Settings(home=tmp_path / "home")
    settings.ensure_home()
    for name in ("tiny-flux", "tiny-sd3"):
        (settings.models_dir / "checkpoints" / name).symlink_to(tiny_models.paths[name], target_is_directory=True)
    return settings


def config(tmp_path: Path, arch: str, **kw) -> L.LoraTrainConfig:
    base = dict(base_model=f"tiny-{arch}", dataset=make_dataset(tmp_path / "data"), output_name=f"blocks-{arch}",
                trigger_word="blkstyle", rank=4, steps=8, batch_size=2, learning_rate=1e-2, resolution=64,
                bucket_step=16, progress=False, device="cpu", lr_scheduler="constant")
    base.update(kw)
    return L.LoraTrainConfig(**base)


def fixed_loss(trainer: L.LoraTrainer) -> float:
    """The loss on a fixed batch with fixed noise and timesteps."""
    pixels = torch.stack([trainer.dataset.load(i) for i in range(len(trainer.dataset))])
    captions = [trainer.dataset.caption(i) for i in range(len(trainer.dataset))]
    with torch.no_grad():
        return float(sum(trainer.loss(pixels, captions, torch.Generator().manual_seed(s)) for s in range(4)))


@pytest.mark.parametrize("arch,ratio", [("flux", 0.9), ("sd3", 0.95)])
def test_dit_lora_lowers_the_loss_loads_through_the_engine_and_weight_zero_is_the_base(home, tmp_path, arch, ratio):
    cfg = config(tmp_path, arch, steps=30, alpha=8, target_modules=WIDE_TARGETS, sample_every=30,
                 sample_prompts=["blkstyle, a red square"], sample_steps=2)
    trainer = L.LoraTrainer(cfg, home)
    assert isinstance(trainer.objective, L.FlowMatchObjective) and trainer.objective.component == "transformer"
    before = fixed_loss(trainer)
    summary = trainer.train()
    after = fixed_loss(trainer)
    print(f"{arch}: fixed-batch loss {before:.4f} -> {after:.4f}; logged {summary['first_loss']} -> {summary['last_loss']}")
    assert after < ratio * before, (before, after)
    assert summary["arch"] == arch and summary["steps"] == 30 and summary["registered_format"] == "diffusers"
    assert "flow matching" in summary["objective"]
    # the registered file is what the pipeline's save_lora_weights writes: transformer.* peft keys + adapter config
    registered = Path(summary["lora"])
    assert registered == home.models_dir / "loras" / f"blocks-{arch}.safetensors"
    with safe_open(str(registered), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 8
    # the kohya file names the original layout's modules
    with safe_open(summary["kohya"], "pt") as f:
        kkeys, kmeta = list(f.keys()), f.metadata()
    first = {"flux": "lora_unet_double_blocks_0_img_attn_qkv", "sd3": "lora_unet_joint_blocks_0_x_block_attn_qkv"}[arch]
    assert f"{first}.lora_down.weight" in kkeys and kmeta["imagesmith.arch"] == arch
    if arch == "flux":
        assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in kkeys
    card = Path(summary["card"]).read_text()
    assert "flow matching" in card and "30 steps" in card and (Path(summary["card"]).parent / "samples" / "step-000030.png").is_file()
    # through the engine: weight 0 (before and after the adapter is loaded) is the base, weight 1 changes it
    engine = Engine(home, device="cpu")
    req = dict(prompt="blkstyle, a red square", model=f"tiny-{arch}", width=64, height=64, steps=3, seed=3,
               sampler_name="Euler")
    name = f"blocks-{arch}"
    base = px(engine.generate(GenerateRequest(**req)).images[0])
    zero = px(engine.generate(GenerateRequest(**req, loras=[LoraSpec(name=name, weight=0.0)])).images[0])
    one = px(engine.generate(GenerateRequest(**req, loras=[LoraSpec(name=name, weight=1.0)])).images[0])
    zero_again = px(engine.generate(GenerateRequest(**req, loras=[LoraSpec(name=name, weight=0.0)])).images[0])
    assert np.array_equal(zero, base) and np.array_equal(zero_again, base)
    assert np.abs(one - base).mean() > 1.0
    # alpha / rank = 2 came back from the file's metadata
    pipe = engine._pipeline_entry(engine.registry.get(f"tiny-{arch}", "checkpoint")).value
    scalings = {s for m in pipe.transformer.modules() for s in (getattr(m, "scaling", None) or {}).values()}
    assert scalings == {2.0}


def _deltas(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    out = {}
    for k, a in state.items():
        if ".lora_A." in k:
            b = state[k.replace(".lora_A.", ".lora_B.")]
            module = k.split(".lora_A.")[0].removeprefix("transformer.")
            out[module] = scale * (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])
    return out


def _kohya_deltas(kohya: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, down in kohya.items():
        if k.endswith(".lora_down.weight"):
            stem = k[:-len(".lora_down.weight")]
            up, alpha = kohya[f"{stem}.lora_up.weight"], float(kohya[f"{stem}.alpha"])
            out[stem] = alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return out


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_dit_kohya_export_is_the_same_update_in_the_original_layout(tiny_models, arch):
    """Merge the LoRA into the diffusers transformer and convert the result to the original layout (models/convert.py);
    the kohya file's up @ down * alpha / rank must be exactly that change, module by module: partial q/k/v groups,
    FLUX single blocks' linear1 (q, k, v, MLP), the swapped final modulation and SD3's last context block included."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from imagesmith.models.convert import flux_to_bfl, sd3_to_mmdit
    cls, convert = {"flux": (FluxTransformer2DModel, flux_to_bfl), "sd3": (SD3Transformer2DModel, sd3_to_mmdit)}[arch]
    model = cls.from_pretrained(str(tiny_models.paths[f"tiny-{arch}"] / "transformer"))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    targets = ["to_q", "to_k", "add_v_proj", "to_out.0", "to_add_out", "ff.net.0.proj", "ff_context.net.2",
               "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder"]
    if arch == "flux":
        targets += ["proj_mlp", "norm.linear", "x_embedder"]
    model.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    widths = {n: m.out_features for n, m in model.named_modules() if isinstance(getattr(m, "out_features", None), int)}
    kohya = dit_to_kohya(arch, state, alpha=3.0, num_layers=model.config.num_layers, out_features=widths)
    merged = dict(base)
    for module, d in _deltas(state, 1.5).items():
        merged[f"{module}.weight"] = base[f"{module}.weight"] + d
    before, after = convert(base, model.config), convert(merged, model.config)
    expected = {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}
    got = {f"{stem.removeprefix('lora_unet_')}": d for stem, d in _kohya_deltas(kohya).items()}
    names = {k.removesuffix(".weight").replace(".", "_"): k for k in expected}
    assert set(got) == set(names), (sorted(set(got) ^ set(names)))
    for stem, d in got.items():
        torch.testing.assert_close(d, expected[names[stem]], rtol=1e-4, atol=1e-5)
    if arch == "flux":  # what diffusers (and so imagesmith's engine) reads from a kohya FLUX file: the same deltas
        from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
        double = {k: v for k, v in kohya.items() if "double_blocks" in k}  # diffusers hard-codes single blocks' 3072
        back = _convert_kohya_flux_lora_to_diffusers(dict(double))
        ours = {m: d for m, d in _deltas(state, 1.5).items() if m.startswith("transformer_blocks.")}
        theirs = {m: d for m, d in _deltas(back, 1.0).items() if m.startswith("transformer_blocks.")}
        assert set(theirs) >= set(ours)
        for m, d in theirs.items():
            torch.testing.assert_close(d, ours.get(m, torch.zeros_like(d)), rtol=1e-4, atol=1e-5)


def test_flux_resume_continues_from_the_saved_step(home, tmp_path):
    data = make_dataset(tmp_path / "data")
    whole = L.LoraTrainer(config(tmp_path, "flux", dataset=data, steps=4, save_every=2, output_name="whole",
                                 run_dir=tmp_path / "whole"), home)
    whole.train()
    L.LoraTrainer(config(tmp_path, "flux", dataset=data, steps=2, save_every=2, output_name="parts",
                         run_dir=tmp_path / "parts"), home).train()
    summary = L.LoraTrainer(config(tmp_path, "flux", dataset=data, steps=4, save_every=2, output_name="parts",
                                   run_dir=tmp_path / "parts"), home).train()
    records = [json.loads(x) for x in (tmp_path / "parts" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and summary["steps"] == 4
    a = load_file(str(tmp_path / "whole" / "diffusers" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "parts" / "diffusers" / "pytorch_lora_weights.safetensors"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_dit_buckets_follow_the_16px_grid_and_non_square_trains(home, tmp_path):
    make_dataset(tmp_path / "d", 2, size=(64, 64), sub="a")
    make_dataset(tmp_path / "d", 2, size=(56, 100), sub="b")
    trainer = L.LoraTrainer(config(tmp_path, "flux", dataset=tmp_path / "d", resolution=72, bucket_step=8, steps=2,
                                   batch_size=1), home)
    assert trainer.resolution == 64 and trainer.bucket_step == 16
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in trainer.dataset.buckets)
    assert any(w != h for w, h in trainer.dataset.bucket_of)
    summary = trainer.train()
    assert summary["steps"] == 2 and len(summary["buckets"]) == 2


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_dit_text_encoder_training_and_unknown_targets_are_refused_in_one_line(home, tmp_path, arch):
    with pytest.raises(L.LoraConfigError, match="transformer only") as err:
        L.LoraTrainer(config(tmp_path, arch, train_text_encoder=True), home)
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(L.LoraConfigError, match="target_modules") as err:  # a UNet-only name on a transformer
        L.LoraTrainer(config(tmp_path, arch, target_modules=["attn1.to_q"]), home).train()
    assert len(str(err.value).splitlines()) == 1


def test_flux_example_config_parses():
    path = Path(__file__).resolve().parents[2] / "examples" / "lora" / "lora-flux.yaml"
    cfg = L.LoraTrainConfig.from_yaml(path)
    assert cfg.base_model == "flux1-dev" and cfg.dataset == path.parent / "my-dataset"
    assert cfg.weighting_scheme == "none" and not cfg.train_text_encoder and cfg.mixed_precision == "bf16"
