"""Product-ad studio speed on this machine with the house models, stage by stage.

One product photo (a synthetic phone shot, 760x640 JPEG), one variation, the four social formats
(1:1, 4:5, 9:16, 1.91:1), painted (20 steps DPM++ 2M Karras, R-ESRGAN 4x+ upscaling) and as a studio set (the
house model's default): the goal is <= 60 s on the 2-core CPU. Also cutout alone (house-cutout + edge
refinement) and the segmenter's prediction alone on 1024 px photos: goal <= 0.5 s per image. Models are loaded before timing (load time is reported separately). Baseline for the painting
stage: the plain diffusers inpainting call on the same pipeline, as a ratio.

    .venv/bin/python benchmarks/ad_speed.py [--runs 3] [--out benchmarks/results/ad_speed.json]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from _common import machine, write_report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


def phone_shot(path: Path, size=(760, 640), scale: float = 1.0) -> Path:
    """A bottle on a plain counter; ``scale`` < 1 makes it a small product in the frame (enlarged on the ad's
    canvas, so the R-ESRGAN product pass runs)."""
    rng = np.random.default_rng(0)
    w, h = size
    ground = np.broadcast_to(np.array([232, 228, 220]) * (1 - 0.12 * np.linspace(0, 1, h)[:, None, None]), (h, w, 3))
    img = Image.fromarray(np.clip(ground + rng.normal(0, 2.5, (h, w, 3)), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)

    def at(box):  # the product scaled about its foot (380, 560)
        return tuple(int(round(c + (v - c) * scale)) for v, c in zip(box, (380, 560, 380, 560)))
    d.rounded_rectangle(at((300, 200, 460, 560)), radius=max(4, int(40 * scale)), fill=(40, 120, 200))
    d.rectangle(at((350, 130, 410, 205)), fill=(230, 230, 235))
    img.filter(ImageFilter.GaussianBlur(1.0)).save(path, quality=90)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ad_speed.json")
    args = ap.parse_args(argv)

    from imagesmith.core.requests import AdRequest
    from imagesmith.core.settings import Settings
    from imagesmith.engine.generate import Engine
    from imagesmith.models.segment import load_segmenter
    from imagesmith.vision.cutout import cutout
    from imagesmith.workflows.product_ad import ProductAdStudio

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        engine = Engine(Settings(home=tmp / "home"), device="cpu")
        segmenter = load_segmenter()
        studio = ProductAdStudio(engine, segmenter=segmenter)
        photo = phone_shot(tmp / "product.jpg")
        warm = AdRequest(products=[str(photo)], concept="a bottle on a wooden table", headline="Warm up",
                         formats=["1:1"], seed=0, upscaler="R-ESRGAN 4x+")
        studio.make(warm, tmp / "warm")  # loads house-ldm, MiniLM, R-ESRGAN, fonts
        load_s = time.perf_counter() - t0

        small = phone_shot(tmp / "small.jpg", scale=0.35)  # ~70x150 px: upscaled by R-ESRGAN on the canvas
        totals, stages, studio_totals, small_totals, small_stages = [], [], [], [], []
        for run in range(args.runs):
            req = AdRequest(products=[str(photo)], concept="a bottle on a wooden table",
                            headline="Fresh from the coast", subline="Cold-pressed, bottled the same day",
                            cta="Order now", brand_color="#1f6feb", seed=run, steps=20,
                            formats=["1:1", "4:5", "9:16", "1.91:1"], background="paint")
            t = time.perf_counter()
            result = studio.make(req, tmp / f"run{run}")
            totals.append(time.perf_counter() - t)
            stages.append(result.seconds)
            assert not result.failures, result.failures
            t = time.perf_counter()  # the default for the house model: the studio set built from the concept
            result = studio.make(req.model_copy(update={"background": "studio"}), tmp / f"studio{run}")
            studio_totals.append(time.perf_counter() - t)
            assert not result.failures, result.failures
            t = time.perf_counter()  # a small product: the R-ESRGAN product pass on every format
            result = studio.make(req.model_copy(update={"products": [str(small)], "background": "studio"}),
                                 tmp / f"small{run}")
            small_totals.append(time.perf_counter() - t)
            small_stages.append(result.seconds)
            assert not result.failures, result.failures

        # the painting stage against plain diffusers: the same inpainting call at the 1:1 canvas (128 px)
        import torch
        from diffusers import StableDiffusionInpaintPipeline
        from imagesmith.core.requests import GenerateRequest
        from imagesmith.engine.prompts import encode_pair_sd
        from diffusers_baseline import make_scheduler
        from imagesmith.models.house import HOUSE_NAME, SHIPPED_DIR, load_house_pipeline
        init = Image.new("RGB", (128, 128), (128, 128, 128))
        mask = Image.new("L", (128, 128), 255)
        ImageDraw.Draw(mask).rectangle((48, 40, 80, 112), fill=0)
        init.save(tmp / "init.png")
        mask.save(tmp / "mask.png")
        base = load_house_pipeline(SHIPPED_DIR / "checkpoints" / HOUSE_NAME)
        plain = StableDiffusionInpaintPipeline(**base.components)
        plain.scheduler = make_scheduler("DPM++ 2M", "karras", plain.scheduler.config, "sd1")
        plain.set_progress_bar_config(disable=True)
        prompt = "a bottle on a wooden table"
        gen_req = GenerateRequest(prompt=prompt, width=128, height=128, steps=20, cfg_scale=5.0,
                                  sampler_name="DPM++ 2M", scheduler="karras", seed=1, init_image=str(tmp / "init.png"),
                                  mask=str(tmp / "mask.png"), denoising_strength=1.0, mask_blur=1)

        def run_plain() -> None:
            cond, uncond = encode_pair_sd(prompt, "", plain.tokenizer, plain.text_encoder, device="cpu",
                                          dtype=torch.float32)
            plain(prompt_embeds=cond, negative_prompt_embeds=uncond, image=init, mask_image=mask, strength=1.0,
                  num_inference_steps=20, guidance_scale=5.0, height=128, width=128,
                  generator=torch.Generator().manual_seed(1))

        ours, theirs = [], []
        run_plain()
        for _ in range(5):
            t = time.perf_counter()
            engine.generate(gen_req)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            run_plain()
            theirs.append(time.perf_counter() - t)

        big = tmp / "big.jpg"
        Image.open(photo).resize((1024, 862), Image.LANCZOS).save(big, quality=92)
        image = Image.open(big)
        image.load()
        cut_s, predict_s = [], []
        for _ in range(5):
            t = time.perf_counter()
            cutout(image, segmenter)
            cut_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            segmenter.predict(image.convert("RGB"))  # the network and its guided upsampling alone
            predict_s.append(time.perf_counter() - t)

    stage_median = {k: round(statistics.median(s.get(k, 0.0) for s in stages), 3) for k in stages[0]}
    report = {
        "machine": machine(device="cpu"),
        "workload": "1 product, 1 variation, 4 social formats (1:1, 4:5, 9:16, 1.91:1), house-ldm 20 steps "
                    "DPM++ 2M Karras, R-ESRGAN 4x+",
        "load_seconds": round(load_s, 2),
        "four_formats_seconds": {"median": round(statistics.median(totals), 2), "runs": [round(x, 2) for x in totals],
                                 "background": "paint"},
        "four_formats_studio_seconds": {"median": round(statistics.median(studio_totals), 2),
                                        "runs": [round(x, 2) for x in studio_totals], "background": "studio"},
        "stage_seconds_median": stage_median,
        "small_product_four_formats_studio_seconds": {
            "median": round(statistics.median(small_totals), 2), "runs": [round(x, 2) for x in small_totals],
            "product_upscale_median": round(statistics.median(s.get("product upscale", 0.0) for s in small_stages), 2),
            "photo": "the same shot with the bottle at 0.35x (about 60x150 px)"},
        "goal_four_formats_seconds": 60,
        "painting_128px_inpaint_seconds": {"imagesmith": round(statistics.median(ours), 3),
                                           "diffusers": round(statistics.median(theirs), 3),
                                           "ratio": round(statistics.median(ours) / statistics.median(theirs), 3)},
        "cutout_1024px_seconds": {"median": round(statistics.median(cut_s), 3), "runs": [round(x, 3) for x in cut_s]},
        "segmenter_predict_1024px_seconds": {"median": round(statistics.median(predict_s), 3),
                                             "runs": [round(x, 3) for x in predict_s],
                                             "segmenter": str(getattr(segmenter, "name", "house-cutout")),
                                             "arch": getattr(segmenter, "config", {}).get("arch")},
        "goal_cutout_seconds": 0.5,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "command": "python benchmarks/ad_speed.py --runs %d" % args.runs,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
