"""house-ldm trainer: tiny widths on a synthetic shapes dataset, seconds on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from imagesmith.engine.prompts import encode_pair_sd, encode_prompt_sd
from imagesmith.models.probe import probe
from imagesmith.train import common as C
from imagesmith.train import house_ldm as H

from fixtures.shapes import BACKDROPS, COLOURS, SHAPES, Shapes as _Shapes  # noqa: E402,F401


def Shapes(size: int = 32):
    return _Shapes(size)


def tiny_config(tmp_path: Path, **kw) -> H.HouseLdmConfig:
    base = dict(output_dir=tmp_path / "run", image_size=32, vae_widths=(8, 16), vae_norm_groups=4,
                unet_widths=(16, 32), unet_layers_per_block=1, unet_heads=2, unet_norm_groups=4,
                unet_attention_levels=1, batch_size=8, vae_batch_size=8, warmup_steps=2, vae_steps=30, unet_steps=30,
                vae_lr=3e-3, unet_lr=1e-3, save_every=1000, sample_every=0, progress=False, device="cpu",
                ema_decay=0.9)
    base.update(kw)
    return H.HouseLdmConfig(**base)


@pytest.fixture(scope="module")
def text():
    return H.load_text_encoder()


@pytest.fixture(scope="module")
def shapes():
    return Shapes(32)


def test_synthetic_dataset_follows_the_protocol(shapes):
    item = shapes[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["caption"] == "a red circle on a white backdrop"
    assert not torch.equal(shapes[0]["image"], shapes[9]["image"])  # circle vs square


def test_config_from_yaml_and_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("image_size: 64\nbatch_size: 4\nunet_widths: [32, 64, 128]\noutput_dir: out\n")
    cfg = H.HouseLdmConfig.from_yaml(path)
    assert (cfg.image_size, cfg.batch_size, cfg.unet_widths, cfg.latent_size) == (64, 4, (32, 64, 128), 8)
    assert H.HouseLdmConfig().latent_size == 16  # the shipped shape: 128 px -> 16x16 latents
    with pytest.raises(ValueError):
        H.HouseLdmConfig(image_size=100)
    with pytest.raises(ValueError):
        H.HouseLdmConfig(bogus=1)


def test_default_architecture_shapes_and_sizes():
    cfg = H.HouseLdmConfig()
    vae, unet = H.build_vae(cfg), H.build_unet(cfg)
    assert 1e6 < C.count_params(vae) < 4.5e6
    assert 10e6 < C.count_params(unet) < 20e6
    assert unet.config.cross_attention_dim == 384 and unet.config.sample_size == 16
    with torch.no_grad():
        lat = vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mode()
    assert lat.shape == (1, 4, 16, 16)


def test_training_encoding_equals_engine_encoding(text):
    tok, te = text
    caption = "a blue square on a yellow backdrop"
    train = H.encode_captions([caption, ""], tok, te)
    assert train.shape == (2, 77, 384)
    assert torch.allclose(train[:1], encode_prompt_sd(caption, tok, te), atol=1e-5)
    assert torch.allclose(train[1:], encode_prompt_sd("", tok, te), atol=1e-5)


def test_vae_training_lowers_reconstruction_loss(tmp_path, shapes):
    cfg = tiny_config(tmp_path)
    vae = H.train_vae(cfg, shapes)
    l1 = C.LossLog(cfg.output_dir / "vae" / "losses.jsonl").losses("l1")
    assert len(l1) == 30
    assert C.mean(l1[-5:]) < 0.8 * C.mean(l1[:5])
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae.config.scaling_factor != 0.18215 and math.isfinite(vae.config.scaling_factor)


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory, shapes):
    cfg = tiny_config(tmp_path_factory.mktemp("vae"), vae_steps=15)
    return H.train_vae(cfg, shapes)


def test_unet_training_lowers_diffusion_loss(tmp_path, shapes, trained_vae, text):
    cfg = tiny_config(tmp_path, unet_steps=30)
    unet, ema_unet = H.train_unet(cfg, shapes, trained_vae, text=text)
    losses = C.LossLog(cfg.output_dir / "unet" / "losses.jsonl").losses()
    assert len(losses) == 30
    assert C.mean(losses[-5:]) < 0.85 * C.mean(losses[:5]), losses
    # the EMA copy differs from the raw weights and is frozen
    raw, avg = dict(unet.named_parameters()), dict(ema_unet.named_parameters())
    assert any(not torch.equal(raw[k], avg[k]) for k in raw)
    assert not any(p.requires_grad for p in ema_unet.parameters())


def test_min_snr_weighting_discounts_near_clean_timesteps():
    torch.manual_seed(0)
    noise = torch.randn(2, 4, 8, 8)
    err = torch.randn(1, 4, 8, 8)
    pred = noise + torch.cat([err, err])  # the same error at a clean (SNR 99) and a noisy (SNR 0.25) step
    alpha_bar = torch.tensor([0.99, 0.2])
    plain = H.diffusion_loss(pred, noise, alpha_bar)
    assert torch.isclose(plain, F.mse_loss(pred, noise))
    assert torch.isclose(H.diffusion_loss(pred, noise, alpha_bar, 5.0), plain)  # equal errors: same mean
    pred_clean_wrong = noise.clone()
    pred_clean_wrong[0] += err[0]  # error only at the clean step: weight 5/99 of the noisy step's (1)
    weighted = H.diffusion_loss(pred_clean_wrong, noise, alpha_bar, 5.0)
    expected = (5 / 99) * err.pow(2).mean() / (5 / 99 + 1)
    assert torch.isclose(weighted, expected, rtol=1e-4)
    assert weighted < 0.1 * H.diffusion_loss(pred_clean_wrong, noise, alpha_bar)


def test_resume_equals_uninterrupted_run(tmp_path, shapes, trained_vae, text):
    straight = tiny_config(tmp_path / "a", unet_steps=20)
    _, ema_a = H.train_unet(straight, shapes, trained_vae, text=text)
    unet_a = C.LossLog(straight.output_dir / "unet" / "losses.jsonl").losses()

    resumed = tiny_config(tmp_path / "b", unet_steps=20)
    first, _ = H.train_unet(resumed, shapes, trained_vae, text=text, stop_at=10)
    state = json.loads((resumed.output_dir / "unet" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10
    unet_b, ema_b = H.train_unet(resumed, shapes, trained_vae, text=text)
    losses_b = C.LossLog(resumed.output_dir / "unet" / "losses.jsonl").losses()
    assert len(losses_b) == 20
    assert losses_b == pytest.approx(unet_a, abs=1e-6)

    unet_a_final = H.build_unet(straight)
    from safetensors.torch import load_file
    unet_a_final.load_state_dict(load_file(str(straight.output_dir / "unet" / "checkpoint" / "model.safetensors")))
    for (name, pa), (_, pb) in zip(unet_a_final.state_dict().items(), unet_b.state_dict().items()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    for (name, pa), (_, pb) in zip(ema_a.state_dict().items(), ema_b.state_dict().items()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    # and the interrupted half really was different from the end state
    assert any(not torch.allclose(a, b) for a, b in zip(first.state_dict().values(), unet_b.state_dict().values()))


def test_latent_cache_encodes_once_and_matches_the_encoders(tmp_path, shapes, trained_vae, text):
    cfg = tiny_config(tmp_path, unet_steps=12, latent_cache=20, cpu_bf16=False)
    _, ema = H.train_unet(cfg, shapes, trained_vae, text=text)
    path = cfg.output_dir / "unet" / "latent_cache.safetensors"
    from safetensors.torch import load_file
    cache = load_file(str(path))
    n = cfg.latent_size
    assert cache["mean"].shape == (20, 4, n, n) and cache["text"].shape == (20, 77, 384)
    # what was cached is what the frozen encoders give for those samples
    with torch.no_grad():
        mean = trained_vae.encode(shapes[3]["image"][None]).latent_dist.mean[0]
    assert torch.allclose(cache["mean"][3].float(), mean, atol=1e-2, rtol=1e-2)
    tok, te = text
    assert torch.allclose(cache["text"][5].float(), H.encode_captions([shapes[5]["caption"]], tok, te)[0], atol=1e-2)
    losses = C.LossLog(cfg.output_dir / "unet" / "losses.jsonl").losses()
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    # a resumed run reuses the file instead of encoding again
    stamp = path.stat().st_mtime_ns
    H.train_unet(cfg.model_copy(update={"unet_steps": 14}), shapes, trained_vae, text=text)
    assert path.stat().st_mtime_ns == stamp
    # ... unless the VAE changed: then the stale latents are encoded again
    other = H.train_vae(tiny_config(tmp_path / "v2", vae_steps=3), shapes)
    H.train_unet(cfg.model_copy(update={"unet_steps": 15}), shapes, other, text=text)
    assert path.stat().st_mtime_ns != stamp


def test_resume_false_starts_over(tmp_path, shapes, trained_vae, text):
    cfg = tiny_config(tmp_path, unet_steps=4)
    H.train_unet(cfg, shapes, trained_vae, text=text)
    H.train_unet(cfg.model_copy(update={"resume": False}), shapes, trained_vae, text=text)
    assert [r["step"] for r in C.LossLog(cfg.output_dir / "unet" / "losses.jsonl").records] == [1, 2, 3, 4]


def test_checkpoint_holds_only_safetensors_and_json(tmp_path, shapes, trained_vae, text):
    cfg = tiny_config(tmp_path, unet_steps=3)
    H.train_unet(cfg, shapes, trained_vae, text=text)
    files = sorted(p.name for p in (cfg.output_dir / "unet" / "checkpoint").iterdir())
    assert files == ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "rng.safetensors",
                     "state.json"]


def test_sampling_during_training_writes_a_grid(tmp_path, shapes, trained_vae, text):
    from PIL import Image
    cfg = tiny_config(tmp_path, unet_steps=2, sample_every=2, sample_steps=2,
                      sample_prompts=("a red circle on a white backdrop", "a green triangle"))
    H.train_unet(cfg, shapes, trained_vae, text=text)
    grid = Image.open(cfg.output_dir / "unet" / "samples-0000002.png")
    assert grid.size == (64, 32)


def test_init_from_a_shipped_folder_continues_its_weights(tmp_path, shapes, trained_vae, text):
    cfg = tiny_config(tmp_path / "a", unet_steps=5)
    _, ema = H.train_unet(cfg, shapes, trained_vae, text=text)
    import copy
    shipped_vae = copy.deepcopy(trained_vae)
    shipped_vae.register_to_config(scaling_factor=0.7)
    folder = H.export_house_pipeline(cfg, shipped_vae, ema, tmp_path / "house-ldm")
    cont = tiny_config(tmp_path / "b", vae_steps=0, unet_steps=0, init_from=folder)
    vae = H.train_vae(cont, shapes)
    assert vae.config.scaling_factor == 0.7  # kept, not re-measured
    _, unet = H.train_unet(cont, shapes, vae, text=text)
    for k, v in unet.state_dict().items():
        assert torch.allclose(v, ema.state_dict()[k].half().float()), k
    for k, v in vae.state_dict().items():
        assert torch.allclose(v, trained_vae.state_dict()[k].half().float()), k
    more = tiny_config(tmp_path / "c", vae_steps=0, unet_steps=3, init_from=folder)
    _, moved = H.train_unet(more, shapes, H.train_vae(more, shapes), text=text)
    assert any(not torch.allclose(a, b) for a, b in zip(moved.state_dict().values(), unet.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="init_from"):
        H.train_vae(tiny_config(tmp_path / "d", init_from=tmp_path / "nowhere"), shapes)


def test_export_load_and_generate_128px(tmp_path, text):
    tok, te = text
    cfg = tiny_config(tmp_path, image_size=128, vae_widths=(8, 16, 16, 16), unet_steps=1, vae_steps=1,
                      batch_size=2, vae_batch_size=2)
    torch.manual_seed(0)
    vae, unet = H.build_vae(cfg).eval(), H.build_unet(cfg).eval()
    vae.register_to_config(scaling_factor=0.5)
    out = H.export_house_pipeline(cfg, vae, unet, tmp_path / "house-ldm",
                                  facts={"vae": {"steps": 7}, "unet": {"steps": 9, "wall_seconds": 1.5},
                                         "hardware": "test CPU"})
    names = sorted(p.name for p in out.iterdir())
    assert names == ["MODEL_CARD.md", "model_index.json", "scheduler", "unet", "vae"]
    for part in ("unet", "vae"):
        with safe_open(str(out / part / "diffusion_pytorch_model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    index = json.loads((out / "model_index.json").read_text())
    assert index["_imagesmith"]["house"] == "house-ldm" and H.is_house_folder(out)
    card = (out / "MODEL_CARD.md").read_text()
    assert "9 steps" in card and "test CPU" in card

    res = probe(out)
    assert (res.kind, res.arch, res.format) == ("checkpoint", "sd1", "diffusers")
    assert res.native_size == 128

    pipe = H.load_house_pipeline(out, torch.float32, "cpu")
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert pipe.text_encoder.config.model_type == "bert"
    sd = unet.state_dict()
    for k, v in pipe.unet.state_dict().items():
        assert torch.allclose(v, sd[k].half().float()), k
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = encode_pair_sd("a (red:1.2) circle", "blurry", pipe.tokenizer, pipe.text_encoder,
                                  device="cpu", dtype=torch.float32)
    image = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=2, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (128, 128)
    # plain diffusers with text prompts conditions exactly as the engine (and training) do: masked [PAD]s, 77 tokens
    cond, uncond = encode_pair_sd("a red circle", "blurry", pipe.tokenizer, pipe.text_encoder, device="cpu",
                                  dtype=torch.float32)
    ours = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=2, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    plain = pipe("a red circle", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.abs(ours - plain).max() < 1e-4


def test_checkpoint_roundtrip_restores_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, C.warmup_cosine(2, 10))
    gen = torch.Generator().manual_seed(5)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    C.save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, generator=gen,
                      wall_seconds=2.0)
    expected = torch.rand(3, generator=gen)
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, C.warmup_cosine(2, 10))
    gen2 = torch.Generator().manual_seed(99)
    state = C.load_checkpoint(tmp_path, model=model2, optimizer=opt2, scheduler=sched2, generator=gen2)
    assert state["step"] == 1 and state["wall_seconds"] == 2.0
    assert torch.equal(torch.rand(3, generator=gen2), expected)
    assert torch.equal(model.weight, model2.weight)
    assert torch.equal(opt.state[model.weight]["exp_avg"], opt2.state[model2.weight]["exp_avg"])
    assert sched2.get_last_lr() == sched.get_last_lr()


def make_shapes(config: H.HouseLdmConfig) -> Shapes:
    return Shapes(config.image_size)


def test_module_entry_point_trains_both_stages_and_exports(tmp_path):
    cfg = tmp_path / "house.yaml"
    cfg.write_text(f"""output_dir: {tmp_path / 'run'}
image_size: 32
vae_widths: [8, 16]
vae_norm_groups: 4
unet_widths: [16, 32]
unet_layers_per_block: 1
unet_heads: 2
unet_norm_groups: 4
unet_attention_levels: 1
batch_size: 2
vae_batch_size: 2
vae_steps: 2
unet_steps: 2
sample_every: 0
progress: false
device: cpu
""")
    assert H.main(["--config", str(cfg), "--dataset", f"{__name__}:make_shapes",
                   "--export", str(tmp_path / "house-ldm")]) == 0
    assert H.is_house_folder(tmp_path / "house-ldm")
    card = (tmp_path / "house-ldm" / "MODEL_CARD.md").read_text()
    assert "| VAE training | 2 steps, batch 2" in card and "| UNet training | 2 steps, batch 2" in card


@pytest.mark.parametrize("name", sorted(p.relative_to(Path(H.__file__).parent / "configs").as_posix()
                                        for p in (Path(H.__file__).parent / "configs").rglob("house-ldm*.yaml")))
def test_shipped_house_ldm_configs_parse_and_their_files_ship(name):
    """The documented `--config` runs must work from a fresh clone: every file a config names is in the repo."""
    root = Path(H.__file__).resolve().parents[3]
    cfg = H.HouseLdmConfig.from_yaml(Path(H.__file__).parent / "configs" / name)
    assert cfg.image_size == 128 and cfg.latent_size == 16
    if cfg.init_from:
        assert (root / cfg.init_from / "model_index.json").is_file(), cfg.init_from
    if cfg.object_weights:
        weights = json.loads((root / cfg.object_weights).read_text())
        assert len(weights) > 500 and all(isinstance(v, int) and 1 <= v <= 3 for v in weights.values())
        assert sum(v > 1 for v in weights.values()) > 0  # a curriculum, not a uniform list
