"""Peak memory and time of a tiled upscale (Ultimate SD Upscale) against the same img2img on the whole picture, on
the shipped house model: each in its own process, its peak resident memory read from the kernel (ru_maxrss).

A SIZE / 4 picture is made 4x larger with Lanczos, then repainted at strength 0.3, 8 steps: tiled (TILE px tiles,
32 px padding, 48 px feathering), or in one img2img pass at SIZE px.

    .venv/bin/python benchmarks/tiled_upscale.py [--size 2048] [--tile 512]

Writes benchmarks/results/tiled_upscale.json."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_report  # noqa: E402

CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
import numpy as np
from PIL import Image
from imagesmith.core.requests import GenerateRequest, TiledRefine
from imagesmith.core.settings import Settings
from imagesmith.engine.generate import Engine
from imagesmith.engine.tiled import refine_tiles
mode, size, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
home = Path(tempfile.mkdtemp(prefix="imagesmith-tiled-bench-"))
settings = Settings(home=home); settings.ensure_home()
engine = Engine(settings, device="cpu")
y, x = np.mgrid[0:size // 4, 0:size // 4].astype(np.float32)
small = Image.fromarray(np.stack([128 + 90 * np.sin((x + 0.6 * y) / 7), 128 + 90 * np.cos((y - 0.3 * x) / 9),
                                  120 + 80 * np.sin((x * y) / 900)], -1).clip(0, 255).astype(np.uint8))
big = small.resize((size, size), Image.LANCZOS)
engine.generate(GenerateRequest(prompt="warm", steps=1, width=128, height=128))  # the model loaded first
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if mode == "tiled":
    out, _ = refine_tiles(engine, big, TiledRefine(prompt="a colourful striped fabric", strength=0.3, steps=8,
                                                   seed=1, tile=tile, padding=32, mask_blur=48))
else:
    path = home / "big.png"; big.save(path)
    out = engine.generate(GenerateRequest(prompt="a colourful striped fabric", init_image=str(path),
                                          denoising_strength=0.3, steps=8, seed=1, width=size, height=size)).images[0]
print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "size": list(out.size),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "rss_after_load_mb": round(base / 1024)}))
"""


def run(mode: str, size: int, tile: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(size), str(tile)], capture_output=True, text=True,
                       timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--tiled-only", action="store_true", help="skip the whole-picture pass (slow at 2048)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "tiled_upscale.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    tiled = run("tiled", args.size, args.tile)
    report = {"benchmark": "tiled_upscale", "model": "house-ldm", "size": args.size, "tile": args.tile,
              "tiled": tiled, "extra_peak_mb": {"tiled": tiled["peak_rss_mb"] - tiled["rss_after_load_mb"]}}
    if not args.tiled_only:
        whole = run("whole", args.size, args.tile)
        report.update(whole_image_img2img=whole,
                      peak_rss_ratio_tiled_to_whole=round(tiled["peak_rss_mb"] / whole["peak_rss_mb"], 3))
        report["extra_peak_mb"]["whole"] = whole["peak_rss_mb"] - whole["rss_after_load_mb"]
    report.update({
              "wall_s": round(time.perf_counter() - start, 1), "machine": machine(),
              "command": f"python benchmarks/tiled_upscale.py --size {args.size} --tile {args.tile}"
                         + (" --tiled-only" if args.tiled_only else "")})
    write_report(report, Path(args.out))


if __name__ == "__main__":
    main()
