"""LoRA speed on this machine (issue: LoRA training and evaluation):

1. training step time of a rank-8 LoRA on house-ldm (128 px, batch 4, UNet attention adapters): imagesmith's
   trainer (`imagesmith train lora`) vs a plain diffusers + peft loop doing the same work, in the same run;
2. switching and re-weighting LoRAs between jobs on a loaded house-ldm (peft adapters, no base reload) vs
   reloading the base model.

    .venv/bin/python benchmarks/lora_speed.py [--steps 12] [--out benchmarks/results/lora_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import machine, write_report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(folder: Path, n: int = 8) -> Path:
    from imagesmith.train.house_data import HouseSampleDataset, load_house_dataset
    d = folder / "1_house"
    d.mkdir(parents=True, exist_ok=True)
    ds = HouseSampleDataset(load_house_dataset(), "train", size=128)
    for i in range(n):
        s = ds.sample(i)
        s.image.save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(s.caption)
    return folder


def plain_steps(trainer, steps: int) -> list[float]:
    """The same work without imagesmith's trainer: peft adapters on a fresh copy of the UNet, AdamW,
    VAE encode + text encode + UNet forward/backward per step."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from imagesmith.models.loaders import load_pipeline
    pipe = load_pipeline(trainer.entry)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    unet = pipe.unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    ds = trainer.dataset
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        idx = [(step * 4 + k) % len(ds) for k in range(4)]
        pixels = torch.stack([ds.load(i) for i in idx])
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample(g) * pipe.vae.config.scaling_factor
            tok = pipe.tokenizer([ds.caption(i) for i in idx], padding="max_length", max_length=77,
                                 truncation=True, return_tensors="pt")
            cond = pipe.text_encoder(tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lora_speed.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from imagesmith.core.settings import Settings
    from imagesmith.engine.loras import ResolvedLora, apply_loras
    from imagesmith.models.house import make_registry
    from imagesmith.models.loaders import load_pipeline
    from imagesmith.train.lora import LoraTrainConfig, LoraTrainer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = Settings(home=tmp / "home")
        settings.ensure_home()
        data = make_dataset(tmp / "data")
        base = dict(base_model="house-ldm", dataset=data, rank=8, batch_size=4, progress=False, device="cpu",
                    learning_rate=1e-4, lr_scheduler="constant")
        trainer = LoraTrainer(LoraTrainConfig(**base, output_name="bench-a", steps=args.steps), settings)
        trainer.train()
        records = [json.loads(x) for x in (trainer.run_dir / "losses.jsonl").read_text().splitlines()]
        ours = [r["sec"] for r in records[2:]]  # the first steps warm up allocators
        plain = plain_steps(trainer, args.steps)[2:]
        LoraTrainer(LoraTrainConfig(**base, output_name="bench-b", steps=2), settings).train()

        # switching / re-weighting on one loaded pipeline, as the engine does between jobs
        entry = make_registry(settings).get("house-ldm", "checkpoint")
        t0 = time.perf_counter()
        pipe = load_pipeline(entry)
        reload_s = time.perf_counter() - t0
        loras = {n: settings.models_dir / "loras" / f"{n}.safetensors" for n in ("bench-a", "bench-b")}

        def spec(name: str, w: float) -> ResolvedLora:
            return ResolvedLora(name, str(loras[name]), w, "sd1", loras[name].stat().st_mtime_ns)
        state: dict = {}
        t0 = time.perf_counter()
        apply_loras(pipe, state, [spec("bench-a", 1.0)], "sd1")
        first_load_s = time.perf_counter() - t0
        apply_loras(pipe, state, [spec("bench-b", 1.0)], "sd1")
        switch, reweight, mix, off = [], [], [], []
        for k in range(10):
            for bucket, loras_now in ((switch, [spec("bench-a" if k % 2 else "bench-b", 1.0)]),
                                      (reweight, [spec("bench-b", 0.3 + 0.05 * k)]),
                                      (mix, [spec("bench-a", 0.7), spec("bench-b", 0.5)]),
                                      (off, [])):
                t0 = time.perf_counter()
                apply_loras(pipe, state, loras_now, "sd1")
                bucket.append(time.perf_counter() - t0)

    report = {
        "machine": machine(),
        "command": "python benchmarks/lora_speed.py --steps %d" % args.steps,
        "training": {"settings": "house-ldm, rank 8 (alpha 8), UNet to_q/to_k/to_v/to_out.0, 128 px, batch 4, fp32 CPU",
                     "imagesmith_step_s_median": round(statistics.median(ours), 3),
                     "plain_diffusers_peft_step_s_median": round(statistics.median(plain), 3),
                     "ratio": round(statistics.median(ours) / statistics.median(plain), 3),
                     "steps_timed": len(ours)},
        "switching": {"base_reload_s": round(reload_s, 3), "first_load_of_a_lora_s": round(first_load_s, 3),
                      "switch_a_b_ms_median": round(1000 * statistics.median(switch), 2),
                      "reweight_ms_median": round(1000 * statistics.median(reweight), 2),
                      "mix_two_ms_median": round(1000 * statistics.median(mix), 2),
                      "all_off_ms_median": round(1000 * statistics.median(off), 2),
                      "goal_ms": 50},
    }
    write_report(report, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
