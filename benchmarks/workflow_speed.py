"""CPU time per stage of the #7 workflows on the house models, after load (median of N runs):
restyle (describe with ImageNet, txt2img 128 px 20 steps, object boxes) and storyboard (per panel, and the sheet
with its PDF), plus describe alone.

    .venv/bin/python benchmarks/workflow_speed.py [--n 3] [--out benchmarks/results/workflow_speed.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import machine, write_report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


def _median_ms(xs: list[float]) -> float:
    return round(1000 * statistics.median(xs), 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/workflow_speed.json")
    args = ap.parse_args(argv)
    from PIL import Image, ImageDraw

    from imagesmith.core.requests import GenerateRequest
    from imagesmith.core.settings import Settings
    from imagesmith.engine.generate import Engine
    from imagesmith.models.segment import resolve_segmenter
    from imagesmith.vision.caption import Captioner, describe
    from imagesmith.vision.imagenet import ImageNetClassifier
    from imagesmith.workflows.restyle import build_prompt, find_objects
    from imagesmith.workflows.storyboard import StoryboardRequest, storyboard

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp) / "home")
        engine = Engine(settings, device="cpu")
        photo = Image.new("RGB", (512, 512), (236, 232, 226))
        ImageDraw.Draw(photo).ellipse([150, 170, 360, 380], fill=(200, 40, 40))
        seg = resolve_segmenter(None)
        cap, inet = Captioner(segmenter=seg), ImageNetClassifier(settings)
        gen = GenerateRequest(prompt="an apple, on a marble table", steps=20, cfg_scale=5.0, sampler_name="DPM++ 2M",
                              scheduler="karras", seed=1)
        describe(photo, captioner=cap, imagenet=inet)  # warm: loads
        engine.generate(gen)
        d_t, g_t, o_t = [], [], []
        for i in range(args.n):
            t = time.perf_counter()
            desc = describe(photo, captioner=cap, imagenet=inet)
            d_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            image = engine.generate(gen.model_copy(update={"prompt": build_prompt(desc, "on a marble table"),
                                                          "seed": i})).images[0]
            g_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            find_objects(image, seg, cap)
            o_t.append(time.perf_counter() - t)
        script = (ROOT / "examples/storyboard/en.txt").read_text()
        sb_t = []
        for i in range(args.n):
            t = time.perf_counter()
            board = storyboard(StoryboardRequest(script=script, seed=i, output=str(Path(tmp) / f"sb{i}")), engine)
            sb_t.append(time.perf_counter() - t)
        panels = len(board.panels)
    report = {"machine": machine(), "command": f"python benchmarks/workflow_speed.py --n {args.n}",
              "settings": "house-ldm 128 px, 20 steps DPM++ 2M karras, CFG 5; photo 512x512",
              "describe_ms_median": _median_ms(d_t),
              "restyle_generate_ms_median": _median_ms(g_t),
              "restyle_objects_ms_median": _median_ms(o_t),
              "restyle_total_ms_median": round(_median_ms(d_t) + _median_ms(g_t) + _median_ms(o_t), 1),
              "storyboard_panels": panels,
              "storyboard_total_s_median": round(statistics.median(sb_t), 2),
              "storyboard_per_panel_s_median": round(statistics.median(sb_t) / panels, 2)}
    write_report(report, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
