"""What Qwen-Image 2.1's KV cache saves, and imagesmith's cost over diffusers' own pipeline, on a random model of
the real classes (QwenImage21Transformer2DModel of LAYERS blocks of HEADS x 64, a small Qwen3-VL, the RGBA VAE):
the same request made by diffusers' QwenImage21Pipeline without its cache (use_kv_cache=False), with it, and by
imagesmith's engine (which always caches), text to image and with one condition picture. All in one process, the
same weights, the best of RUNS after a warm-up run each.

    .venv/bin/python benchmarks/qwen21_kv_cache.py [--size 256] [--steps 8] [--layers 8] [--runs 2]

Writes benchmarks/results/qwen21_kv_cache.json. The ratios, not the seconds, carry over to the real 20B model: the
cache saves the text's and the pictures' share of each step after the first."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import machine, write_report  # noqa: E402

PROMPT = ("a glass bottle of olive oil on a marble kitchen counter, soft morning light from a window on the left, "
          "a sprig of rosemary beside it, shallow depth of field, product photograph, high detail")


def best(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(min(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "qwen21_kv_cache.json"))
    args = parser.parse_args()

    import torch
    from PIL import Image

    from fixtures.tiny import build_qwen_image21
    from imagesmith.core.requests import GenerateRequest
    from imagesmith.core.settings import Settings
    from imagesmith.engine.generate import Engine

    home = Path(tempfile.mkdtemp(prefix="imagesmith-q21-bench-"))
    settings = Settings(home=home)
    settings.ensure_home()
    build_qwen_image21(0, layers=args.layers, heads=args.heads, head_dim=64).save_pretrained(
        settings.models_dir / "checkpoints" / "q21", safe_serialization=True)
    engine = Engine(settings, device="cpu")
    pipe = engine.pipeline(engine.checkpoint("q21")).value
    # the tests' processor reads small pictures only; the real one reads ~1 MP (diffusers sizes the picture's
    # tokens without asking the processor, so its bounds must hold the picture as it is)
    pipe.processor.image_processor.size = {"shortest_edge": 32 * 32 * 4, "longest_edge": 1024 * 1024}
    size, steps = args.size, args.steps
    picture = Image.new("RGBA", (size, size), (200, 60, 40, 255))
    picture.paste((20, 90, 200, 255), (size // 8, size // 3, size // 2, size - 8))
    path = home / "picture.png"
    picture.save(path)

    report = {"benchmark": "qwen21_kv_cache", "model": f"random QwenImage21Transformer2DModel, {args.layers} blocks "
              f"of {args.heads}x64", "size": size, "steps": steps, "cfg": 4.0, "runs": args.runs, "cases": {}}
    for case, images in (("text_to_image", None), ("one_condition_picture", [picture])):
        req = GenerateRequest(prompt=PROMPT, negative_prompt="blurry", model="q21", width=size, height=size,
                              steps=steps, cfg_scale=4.0, seed=1, sampler_name="euler", scheduler="simple",
                              edit_images=[str(path)] if images else [])

        def diffusers_run(cache: bool):
            kw = {"image": images, "output_resolution": size} if images else {}
            return pipe(PROMPT, negative_prompt="blurry", true_cfg_scale=4.0, width=size, height=size,
                        num_inference_steps=steps, generator=torch.Generator().manual_seed(1), use_kv_cache=cache,
                        output_type="np", **kw)
        off = best(lambda: diffusers_run(False), args.runs)
        on = best(lambda: diffusers_run(True), args.runs)
        ours = best(lambda: engine.generate(req), args.runs)
        report["cases"][case] = {"diffusers_no_cache_s": off, "diffusers_cache_s": on, "imagesmith_s": ours,
                                 "cache_speedup_diffusers": round(off / on, 3),
                                 "imagesmith_vs_diffusers_cache": round(ours / on, 3),
                                 "imagesmith_vs_diffusers_no_cache": round(ours / off, 3)}
    report.update(machine=machine(), command="python benchmarks/qwen21_kv_cache.py " + " ".join(sys.argv[1:]))
    write_report(report, Path(args.out))


if __name__ == "__main__":
    main()
