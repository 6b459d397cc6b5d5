"""Classification speed per image on this machine (document 3's VGG16 gate: 175 ms): house-clip zero-shot over
three labels, a trained gate and EfficientNet-Lite0 over the 1,000 ImageNet classes, after load, median of N images.

    .venv/bin/python benchmarks/classify_speed.py [--n 20] [--out benchmarks/results/classify_speed.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import machine, write_report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/classify_speed.json")
    args = ap.parse_args(argv)
    from imagesmith.core.settings import Settings
    from imagesmith.models.house_clip import load_house_clip
    from imagesmith.vision.classify import Gate, train_gate
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(args.n)]
    clip = load_house_clip()
    labels = ["desk setup", "kitchen", "bedroom"]
    clip.classify(images[0], labels)
    zs = []
    for im in images:
        t = time.perf_counter()
        clip.classify(im, labels)
        zs.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp) / "home")
        for cls in ("yes", "no"):
            (Path(tmp) / "g" / cls).mkdir(parents=True)
            for i in range(6):
                images[i].save(Path(tmp) / "g" / cls / f"{i}.png")
        train_gate(Path(tmp) / "g", "bench", settings=settings)
        gate = Gate("bench", settings, clip=clip)
        gs = []
        for im in images:
            t = time.perf_counter()
            gate(im)
            gs.append(time.perf_counter() - t)
    from imagesmith.vision.imagenet import ImageNetClassifier
    with tempfile.TemporaryDirectory() as tmp:
        inet = ImageNetClassifier(Settings(home=Path(tmp) / "home"))
        inet.classify(images[:1])
        ins = []
        for im in images:
            t = time.perf_counter()
            inet.classify([im])
            ins.append(time.perf_counter() - t)
    report = {"machine": machine(),
              "command": f"python benchmarks/classify_speed.py --n {args.n}",
              "images": f"{args.n} x 512x512 RGB (resized to house-clip's 64 px inside)",
              "zero_shot_3_labels_ms_median": round(1000 * statistics.median(zs), 1),
              "gate_ms_median": round(1000 * statistics.median(gs), 1),
              "imagenet_efficientnet_lite0_ms_median": round(1000 * statistics.median(ins), 1),
              "document_3_vgg16_gate_ms": 175}
    write_report(report, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
