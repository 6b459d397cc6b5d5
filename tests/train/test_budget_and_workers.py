"""Wall-clock budgets, worker-rendered data and decoder-only VAE fine-tuning (the rented-GPU training path),
exercised on CPU with tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from imagesmith.train import common as C
from imagesmith.train import house_cutout as HC
from imagesmith.train import house_ldm as H

from fixtures.shapes import Shapes
from test_house_cutout import Blobs, tiny_config as cutout_config
from test_house_ldm import tiny_config as ldm_config


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_time_budget_progress_done_and_schedule(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(C.time, "perf_counter", clock)
    plain = C.TimeBudget(100)
    assert plain.progress(50) == 0.5 and not plain.done(99) and plain.done(100)
    b = C.TimeBudget(1000, seconds=10)
    assert b.progress(10) == 0.01 and not b.done(10)
    clock.t = 5.0
    assert b.progress(10) == 0.5  # the clock is further along than the steps
    clock.t = 10.0
    assert b.done(10) and b.progress(10) == 1.0
    # the schedule: linear warmup by steps, then cosine over the clock's progress down to the floor
    clock.t = 0.0
    b = C.TimeBudget(10 ** 6, seconds=100)
    f = b.lr_factor(warmup=4, min_ratio=0.1)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    clock.t = 50.0
    assert 0.5 < f(5) < 0.6  # half-way through the budget: half-way down the cosine
    clock.t = 100.0
    assert f(6) == pytest.approx(0.1)
    # without seconds it is the plain step schedule
    assert C.TimeBudget(20).lr_factor(2)(11) == pytest.approx(C.warmup_cosine(2, 20)(11))


def test_time_budget_carries_over_a_resume(monkeypatch):
    """An interrupted budgeted run resumed from its checkpoint gets what is left of the budget, and its cosine
    goes on from where it was instead of restarting at the top."""
    clock = Clock()
    monkeypatch.setattr(C.time, "perf_counter", clock)
    whole = C.TimeBudget(10 ** 6, seconds=100)
    f_whole = whole.lr_factor(warmup=2, min_ratio=0.1)
    first = C.TimeBudget(10 ** 6, seconds=100)
    f_first = first.lr_factor(warmup=2, min_ratio=0.1)
    clock.t = 10.0
    assert f_first(2) == f_whole(2) == pytest.approx(1.0)  # the cosine starts at 10 s
    clock.t = 40.0
    saved = {"extra": first.state()}
    assert saved["extra"]["budget_seconds"] == pytest.approx(40.0) and saved["extra"]["budget_p0"] == 0.1
    # a new process, later: building caches takes 500 s of clock, which does not count
    clock.t = 1000.0
    resumed = C.TimeBudget(10 ** 6, seconds=100)
    f_resumed = resumed.lr_factor(warmup=2, min_ratio=0.1)
    resumed.restore(saved)
    clock.t = 1500.0
    resumed.start()
    assert resumed.elapsed() == pytest.approx(40.0) and not resumed.done(3)
    clock.t = 1530.0  # 70 s of steps in all
    lr_resumed = f_resumed(3)
    clock.t = 70.0
    assert lr_resumed == pytest.approx(f_whole(3)) and lr_resumed < 0.5  # where an unbroken run would be
    clock.t = 1560.0
    assert resumed.done(4) and f_resumed(4) == pytest.approx(0.1)
    # a checkpoint written before budgets were saved: a fresh budget, as before
    old = C.TimeBudget(10, seconds=5)
    old.restore({"extra": {}})
    assert old.spent == 0.0 and old.p0 is None


def test_cutout_resume_continues_the_time_budget(tmp_path):
    cfg = cutout_config(tmp_path, steps=100000, time_budget_s=3600.0, data_workers=0)
    HC.train(cfg, Blobs(10 ** 6, 32), stop_at=3)
    state = json.loads((cfg.output_dir / C.CHECKPOINT_DIR / "state.json").read_text())
    first = state["extra"]["budget_seconds"]
    assert state["step"] == 3 and first > 0
    HC.train(cfg, Blobs(10 ** 6, 32), stop_at=5)
    state = json.loads((cfg.output_dir / C.CHECKPOINT_DIR / "state.json").read_text())
    assert state["step"] == 5 and state["extra"]["budget_seconds"] > first  # accumulated, not restarted


def test_render_items_in_workers_equals_in_process():
    ds = Shapes(16)
    serial = list(C.render_items(ds, [5, 0, 7, 7, 3], keys=("image", "caption")))
    parallel = list(C.render_items(ds, [5, 0, 7, 7, 3], keys=("image", "caption"), workers=2, chunk=2))
    assert [it["caption"] for it in serial] == [it["caption"] for it in parallel] == [ds[i]["caption"] for i in
                                                                                       (5, 0, 7, 7, 3)]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(serial, parallel))
    assert set(serial[0]) == {"image", "caption"}


def test_step_batches_depend_on_the_step_only():
    ds = Blobs(1000, 16)
    whole = list(C.step_batches(ds, first=0, last=6, batch_size=3, seed=4, workers=0))
    tail = list(C.step_batches(ds, first=3, last=6, batch_size=3, seed=4, workers=2))
    assert len(whole) == 6 and len(tail) == 3
    for (ia, ma), (ib, mb) in zip(whole[3:], tail):
        assert torch.equal(ia, ib) and torch.equal(ma, mb)  # a resumed run draws the same batches
    assert not torch.equal(whole[0][0], whole[1][0])
    assert whole[0][0].shape == (3, 3, 16, 16) and whole[0][1].shape == (3, 1, 16, 16)


def test_cutout_stops_at_its_time_budget_with_a_checkpoint(tmp_path):
    cfg = cutout_config(tmp_path, steps=100000, time_budget_s=2.0, data_workers=1, warmup_steps=0)
    HC.train(cfg, Blobs(10 ** 6, 32))
    state = json.loads((cfg.output_dir / C.CHECKPOINT_DIR / "state.json").read_text())
    assert 0 < state["step"] < 100000
    losses = C.LossLog(cfg.output_dir / "losses.jsonl").records
    assert losses[-1]["step"] == state["step"]
    assert losses[-1]["lr"] < 0.5 * cfg.lr  # the schedule followed the clock down


def test_decoder_only_finetune_keeps_the_encoder_and_scaling_factor(tmp_path):
    shapes = Shapes(32)
    base = ldm_config(tmp_path / "a", vae_steps=5, unet_steps=0)
    vae = H.train_vae(base, shapes)
    vae.register_to_config(scaling_factor=0.6)
    folder = tmp_path / "shipped"
    torch.manual_seed(0)
    H.export_house_pipeline(base, vae, H.build_unet(base), folder, facts={"hardware": "test"})
    with pytest.raises(ValueError, match="init_from"):
        H.train_vae(ldm_config(tmp_path / "x", vae_train="decoder"), shapes)
    cfg = ldm_config(tmp_path / "b", init_from=folder, init_parts=("vae",), vae_train="decoder", vae_steps=8,
                     vae_lr=1e-2, data_workers=1)
    tuned = H.train_vae(cfg, shapes)
    start = {k: v.half().float() for k, v in vae.state_dict().items()}
    after = tuned.state_dict()
    enc = [k for k in start if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in start if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec
    assert all(torch.equal(after[k], start[k]) for k in enc)
    assert any(not torch.allclose(after[k], start[k]) for k in dec)
    assert tuned.config.scaling_factor == 0.6  # the latents are the shipped ones: not re-measured


def test_progress_bar_total_follows_the_time_budget(monkeypatch):
    """With a seconds budget the bar's total is where the budget will stop at the measured step rate (its ETA
    is the budget's end), not the step ceiling; without one it is the step count."""
    clock = Clock()
    monkeypatch.setattr(C.time, "perf_counter", clock)
    b = C.TimeBudget(100_000, seconds=100)
    bar = C.progress(100_000, 0, "t", enabled=True, budget=b)
    b.start()
    for _ in range(50):  # 50 steps in 10 s: 5 steps/s, 90 s left -> 50 + 450
        clock.t += 0.2
        bar.update(1)
    assert bar.total == 500 and bar.n == 50
    clock.t += 80.0  # a slow stretch: 90 s in, 50 steps -> the estimate falls to 50 + 10 s x 50/90
    bar.update(0)
    assert bar.total == 55
    bar.close()
    # a resumed run (40 s of the budget spent before) estimates from this process's rate only
    clock.t = 1000.0
    r = C.TimeBudget(100_000, seconds=100)
    r.restore({"extra": {"budget_seconds": 40.0, "budget_p0": 0.1}})
    rbar = C.progress(100_000, 300, "t", enabled=True, budget=r)
    r.start()
    clock.t += 10.0
    rbar.update(20)  # 2 steps/s, 50 s left -> 320 + 100
    assert rbar.total == 420
    rbar.close()
    plain = C.progress(1000, 0, "t", enabled=True)
    plain.update(10)
    assert plain.total == 1000
    plain.close()
