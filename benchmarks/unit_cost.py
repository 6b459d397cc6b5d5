"""What each control unit costs per sampling step, as a ratio to the plain step, on the shipped house model.

Units: a ControlNet (one made from the house UNet, random weights: the cost is the network's, not what it
learnt), an IP-Adapter (random weights for the house UNet's widths, a tiny CLIP vision encoder: its cost per step is
the extra attention; the encoder runs once), a regional prompt (one region), prompt editing (one switch), AND (two
parts). Per step = (time at 20 steps - time at 2 steps) / 18, the median of three, so the text encoder, the
reference encoder and the VAE, paid once per image, are left out. All measured in the same run.

    .venv/bin/python benchmarks/unit_cost.py [--steps 20] [--reps 3]

Writes benchmarks/results/unit_cost.json."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import machine, write_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "unit_cost.json"))
    args = parser.parse_args()

    from diffusers import ControlNetModel

    from fixtures.tiny import build_clip_vision, build_ip_adapter
    from imagesmith.core.requests import ControlNetSpec, GenerateRequest, IPAdapterSpec, RegionSpec
    from imagesmith.core.settings import Settings
    from imagesmith.engine.generate import Engine

    home = Path(tempfile.mkdtemp(prefix="imagesmith-unit-cost-"))
    settings = Settings(home=home)
    settings.ensure_home()
    engine = Engine(settings, device="cpu")
    entry = engine.checkpoint(None)
    holder = engine.pipeline(entry)
    unet = holder.value.unet
    ControlNetModel.from_unet(unet).save_pretrained(str(settings.models_dir / "controlnet" / "bench-cn"))
    build_ip_adapter(unet, settings.models_dir / "ipadapter" / "bench-ip.safetensors")
    build_clip_vision(settings.models_dir / "clip_vision" / "bench-vision")
    size = engine._native_size(entry)
    pattern = (np.indices((size, size)).sum(0) * 7 % 255).astype(np.uint8)
    control = home / "control.png"
    Image.fromarray(pattern).convert("RGB").save(control)
    reference = home / "reference.png"
    Image.fromarray(255 - pattern).convert("RGB").save(reference)

    base = dict(model=entry.name, prompt="a red apple on a wooden table", width=size, height=size, seed=3,
                sampler_name="Euler", cfg_scale=5.0)
    cases = {
        "base": {},
        "controlnet": {"controlnet": ControlNetSpec(model="bench-cn", image=str(control), preprocessor="none")},
        "ip_adapter": {"ip_adapter": IPAdapterSpec(model="bench-ip", image=str(reference))},
        "region": {"regions": [RegionSpec(prompt="a blue bowl", box=(0.0, 0.0, 0.5, 1.0))]},
        "prompt_editing": {"prompt": "[a red apple:a green pear:0.5] on a wooden table"},
        "and_two_parts": {"prompt": "a red apple AND a wooden table :0.8"},
    }

    def seconds(extra: dict, steps: int) -> float:
        start = time.perf_counter()
        engine.generate(GenerateRequest(**{**base, **extra, "steps": steps}))
        return time.perf_counter() - start

    per_step = {}
    for name, extra in cases.items():
        seconds(extra, 2)  # warm: models, adapters and encoders loaded before timing
        samples = [(seconds(extra, args.steps) - seconds(extra, 2)) / (args.steps - 2) for _ in range(args.reps)]
        per_step[name] = statistics.median(samples)
        print(f"{name}: {per_step[name] * 1000:.1f} ms/step", file=sys.stderr)
    report = {
        "benchmark": "unit_cost",
        "model": entry.name, "size": size, "steps": args.steps, "reps": args.reps,
        "ms_per_step": {k: round(v * 1000, 2) for k, v in per_step.items()},
        "ratio_to_base_step": {k: round(v / per_step["base"], 3) for k, v in per_step.items()},
        "machine": machine(),
        "command": "python benchmarks/unit_cost.py",
    }
    write_report(report, Path(args.out))


if __name__ == "__main__":
    main()
