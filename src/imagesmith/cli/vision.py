"""Vision tools: classify, describe, cutout, analyze, prompt expansion."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .common import app, _Exit, _segmenter


@app.command("classify")
def classify_cmd(images: List[str] = typer.Argument(..., help="image files; or: train FOLDER --name NAME"),
                 labels: Optional[str] = typer.Option(None, "--labels", help="comma-separated labels (zero-shot, house-clip)"),
                 gate: Optional[str] = typer.Option(None, "--gate", help="a trained gate's name"),
                 name: Optional[str] = typer.Option(None, "--name", help="with train: the gate's name"),
                 imagenet: bool = typer.Option(False, "--imagenet", help="the 1,000 ImageNet classes (EfficientNet-Lite0)"),
                 top: int = typer.Option(5, "--top", min=1, max=1000, help="with --imagenet: how many classes"),
                 clip: Optional[str] = typer.Option(None, "--clip", help="zero-shot / gate training on this CLIP: "
                                                    "house-clip (default), a transformers CLIP folder under "
                                                    "models/clip/NAME, or a folder path"),
                 as_json: bool = typer.Option(False, "--json")):
    """Zero-shot classification (--labels), ImageNet classes (--imagenet) or a trained gate (--gate);
    `classify train FOLDER --name N` trains a gate from one sub-folder of images per class."""
    from ..core.imageio import load_image
    from ..core.settings import Settings
    from ..vision.classify import Gate, classify_images, train_gate
    settings = Settings.from_env()
    if images[0] == "train":
        if len(images) != 2 or not name:
            raise _Exit("usage: imagesmith classify train FOLDER --name NAME")
        card = train_gate(images[1], name, settings=settings, clip=clip)
        if as_json:
            print(json.dumps(card, indent=1))
        else:
            print(f"gate {card['name']}: classes {', '.join(card['classes'])}; held-out accuracy "
                  f"{card['holdout_accuracy']:.3f} on {card['holdout_images']} images -> {card['path']}")
        return
    if (labels is not None) + (gate is not None) + imagenet != 1:
        raise _Exit("give one of --labels 'a,b,c', --imagenet or --gate NAME")
    if clip is not None and imagenet:
        raise _Exit("--clip is for zero-shot labels and gates, not --imagenet")
    g = Gate(gate, settings) if gate else None  # an unknown gate fails before any image is read
    loaded = [(p, load_image(p, settings=settings, mode="RGB", what="image")) for p in images]
    found = classify_images([im for _, im in loaded], labels=labels.split(",") if labels is not None else None,
                            imagenet=imagenet, gate=g, top=top, settings=settings, clip=clip)
    rows = [{"file": p, **r} for (p, _), r in zip(loaded, found)]
    if as_json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=1))
    else:
        for r in rows:
            print(f"{r['file']}: {r['label']} ({r['score']:.3f})")


prompt_app = typer.Typer(no_args_is_help=True, help="Prompt helpers.")
app.add_typer(prompt_app, name="prompt")


@prompt_app.command("expand")
def prompt_expand(request: str = typer.Argument(..., help="a short request, e.g. 'a white cat, 3D'"),
                  n: int = typer.Option(5, "--n", min=1, max=20, help="how many prompts"),
                  seed: int = typer.Option(0, "--seed", help="same seed, same prompts"),
                  as_json: bool = typer.Option(False, "--json")):
    """Expand a short request into detailed prompts (style, composition, camera, lighting, palette), offline."""
    from ..workflows.prompt_assist import PromptAssistant
    from ..workflows.llm import LLMConfig
    results = PromptAssistant().expand(request, n=n, seed=seed, llm=LLMConfig.from_env())  # IMAGESMITH_LLM_URL
    if results and results[0].get("llm_error"):
        print(f"imagesmith: note: the LLM failed ({results[0]['llm_error']}); offline prompts instead", file=sys.stderr)
    if as_json:
        print(json.dumps(results, indent=1))
    else:
        for i, r in enumerate(results, 1):
            print(f"{i}. {r['prompt']}")


@app.command("describe")
def describe_cmd(images: List[Path] = typer.Argument(..., help="image files"),
                 top: int = typer.Option(5, "--top", help="how many tags"),
                 captioner: Optional[str] = typer.Option(None, "--captioner", help="a local BLIP or VLM (Qwen2-VL) "
                                                         "folder of safetensors, or a name under models/captioners"),
                 question: Optional[str] = typer.Option(None, "--question", help="with --captioner: BLIP's text prefix "
                                                        "(e.g. 'a photography of') or the VLM's instruction"),
                 clip: Optional[str] = typer.Option(None, "--clip", help="the CLIP that names the object and tags: "
                                                    "house-clip (default), a transformers CLIP under "
                                                    "models/clip/NAME, or a folder path"),
                 as_json: bool = typer.Option(False, "--json")):
    """Describe images offline: a caption usable as a prompt, tags with scores, ImageNet classes, dominant colours
    and tone; with --captioner, the caption comes from your BLIP/VLM weights."""
    from ..core.imageio import load_image
    from ..core.settings import Settings
    from ..vision.caption import Captioner, describe
    settings = Settings.from_env()
    loaded = [(p, load_image(str(p), settings=settings, mode="RGB", what="image")) for p in images]  # all checked first
    from ..vision.caption import TransformersCaptioner
    from ..vision.imagenet import ImageNetClassifier
    if question and not captioner:
        raise _Exit("--question steers a model captioner: give --captioner PATH too")
    model_cap = TransformersCaptioner(captioner, settings=settings) if captioner else None
    cap, inet = Captioner(clip=clip, settings=settings), ImageNetClassifier(settings)
    results = [{"file": str(p), **describe(im, top_k=top, captioner=cap, imagenet=inet, model_captioner=model_cap,
                                           question=question)} for p, im in loaded]
    if as_json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=1))
        return
    for r in results:
        colours = ", ".join(f"{c['hex']} {c['share']:.0%}" for c in r["dominant_colors"][:3])
        tags = ", ".join(f"{t['label']} {t['score']:.2f}" for t in r["tags"])
        by_imagenet = r.get("object_source") == "imagenet"  # then the CLIP's ranking is the other opinion
        other, other_name = (r["clip_tags"], r["clip"]) if by_imagenet else (r.get("imagenet", []), "imagenet")
        other_line = ", ".join(f"{t['label']} {t['score']:.2f}" for t in other)
        print(f"{r['file']}: {r['caption']}\n  tags ({r.get('object_source', r['clip'])}): {tags}\n"
              f"  {other_name}: {other_line}\n  colours: {colours}; tone {r['tone']}, brightness {r['brightness']}")




@app.command()
def cutout(image: str = typer.Argument(..., help="product photo (an RGBA image is used as it is)"),
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="RGBA PNG (default: IMAGE-cutout.png)"),
           segmenter: Optional[str] = typer.Option(None, "--segmenter", help="house-cutout (default), a registered "
                                                   "segmenter or a .onnx file"),
           no_refine: bool = typer.Option(False, "--no-refine", help="skip edge feathering and decontamination"),
           product_box: Optional[str] = typer.Option(None, "--product-box", help="x0,y0,x1,y1 around the product "
                                                     "(pixels): 'this one' in a busy photo"),
           product_point: Optional[str] = typer.Option(None, "--product-point", help="x,y of a point on the product"),
           min_confidence: Optional[float] = typer.Option(None, "--min-confidence", help="refuse a cut-out scoring "
                                                          "below this (0..1) instead of writing it"),
           as_json: bool = typer.Option(False, "--json")):
    """Cut the product out: soft alpha, refined edges, background spill removed; prints the cut-out's confidence."""
    import time
    from ..core.imageio import load_image, save_png_atomic
    from ..core.settings import Settings
    from ..vision.cutout import cutout as run_cutout
    src = load_image(image, settings=Settings.from_env(), mode=None, what="image")
    out_path = output or Path(image).with_name(Path(image).stem + "-cutout.png")
    if out_path.suffix.lower() != ".png":
        raise _Exit(f"{out_path}: the cutout is written as PNG (it has an alpha channel); use a .png name")
    t = time.perf_counter()
    cut = run_cutout(src, _segmenter(segmenter), refine=not no_refine, box=product_box, point=product_point,
                     min_confidence=min_confidence)
    seconds = time.perf_counter() - t
    save_png_atomic(cut.rgba, out_path, text_chunks={})
    summary = {"path": str(out_path), "width": cut.rgba.width, "height": cut.rgba.height, "box": list(cut.box),
               "coverage": round(float(cut.coverage), 4), "confidence": cut.confidence,
               "confidence_parts": cut.confidence_parts, "source": cut.source, "seconds": round(seconds, 3)}
    low = "" if cut.confidence >= 0.5 else "  LOW: check it, or give --product-box / --product-point"
    print(json.dumps(summary) if as_json else f"{out_path}  product box {list(cut.box)}  "
          f"coverage {cut.coverage:.1%}  confidence {cut.confidence:.2f}{low}  ({cut.source}, {seconds:.2f}s)")


@app.command()
def analyze(image: str = typer.Argument(...),
            maps: Optional[Path] = typer.Option(None, "--maps", help="folder for saliency and free-space PNGs"),
            captioner: Optional[str] = typer.Option(None, "--captioner", help="add a free-text description by your "
                                                    "VLM (Qwen2-VL) or BLIP weights: a folder or a name under "
                                                    "models/captioners (never used for placement)"),
            question: Optional[str] = typer.Option(None, "--question", help="with --captioner: the instruction "
                                                   "or BLIP prefix"),
            as_json: bool = typer.Option(False, "--json")):
    """Measure an image: dominant colours, tone, brightness, saliency, free space, copy regions; with
    --captioner, a VLM's free-text description beside the measurements."""
    from ..core.imageio import load_image
    from ..core.settings import Settings
    from ..vision.analyze import analyze as run_analyze, save_maps
    settings = Settings.from_env()
    if question and not captioner:
        raise _Exit("--question steers a model captioner: give --captioner PATH too")
    src = load_image(image, settings=settings, mode="RGB", what="image")
    describer = None
    if captioner:
        from ..vision.caption import TransformersCaptioner
        describer = TransformersCaptioner(captioner, settings=settings)  # a bad folder fails before any work
    analysis, arrays = run_analyze(src)
    if describer is not None:  # prose rides along; copy regions and placement come from the measured maps only
        analysis.description = describer(src, question)
    data = analysis.model_dump()
    if maps is not None:
        data["maps"] = save_maps(arrays, maps)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    print(f"{image}: {analysis.width}x{analysis.height}, tone {analysis.tone}, brightness {analysis.brightness:.2f}")
    if analysis.description:
        print(f"description: {analysis.description}")
    print("colours: " + ", ".join(f"{c['hex']} {c['share']:.0%}" for c in analysis.dominant_colors))
    for r in analysis.copy_regions:
        print(f"copy region {r['box']} score {r['score']:.3f}")


controlnet_app = typer.Typer(no_args_is_help=True, help="ControlNet tools.")
app.add_typer(controlnet_app, name="controlnet")


@controlnet_app.command("detect")
def controlnet_detect(image: str = typer.Argument(..., help="the image to preprocess"),
                      preprocessor: str = typer.Option("canny", "--preprocessor", "-p", help="canny, scribble_xdog, "
                                                       "lineart_standard, invert, threshold, tile_resample, "
                                                       "openpose, openpose_hand, openpose_face, openpose_faceonly, "
                                                       "openpose_full, depth_anything, depth_midas, depth_zoe, "
                                                       "lineart_realistic, lineart_coarse, lineart_anime, softedge_hed, "
                                                       "softedge_hedsafe, scribble_hed, none (imagesmith controlnet "
                                                       "preprocessors lists which can run here)"),
                      threshold_a: Optional[float] = typer.Option(None, "--threshold-a", help="the first slider "
                                                                  "(canny low, xdog threshold, level, tile rate)"),
                      threshold_b: Optional[float] = typer.Option(None, "--threshold-b", help="canny high"),
                      processor_res: Optional[int] = typer.Option(None, "--processor-res", min=64, max=4096,
                                                                  help="a network preprocessor's working resolution "
                                                                  "(short side; default 512)"),
                      output: Path = typer.Option(Path("detected.png"), "-o", "--output"),
                      as_json: bool = typer.Option(False, "--json")):
    """Run a ControlNet preprocessor alone and save its detected map (what the ControlNet would see)."""
    from ..core.imageio import load_image, save_png_atomic
    from ..core.requests import ControlNetSpec
    from ..core.settings import Settings
    from ..engine.controlnet import PREPROCESSORS, detect
    if preprocessor not in PREPROCESSORS:
        raise _Exit(f"unknown preprocessor {preprocessor!r}; available: {', '.join(PREPROCESSORS)}")
    low = int(threshold_a) if preprocessor == "canny" and threshold_a is not None else 100
    high = int(threshold_b) if preprocessor == "canny" and threshold_b is not None else 200
    spec = ControlNetSpec(model="-", image=image, preprocessor=preprocessor, canny_low=low, canny_high=high,
                          threshold_a=threshold_a, threshold_b=threshold_b, processor_res=processor_res)
    settings = Settings.from_env()
    loaded = load_image(image, settings=settings, mode="RGB", what="image")
    from contextlib import nullcontext

    from rich.console import Console
    err = Console(stderr=True)
    with err.status(f"{preprocessor} on {Path(image).name}") if err.is_terminal and not as_json else nullcontext():
        detected, poses = detect(loaded, spec, settings=settings)
    save_png_atomic(detected, output)
    if as_json:  # the OpenPose modules add the keypoints as OpenPose JSON, as the extension's detect does
        print(json.dumps({"output": str(output), "preprocessor": preprocessor, "width": detected.width,
                          "height": detected.height, **({"poses": poses} if poses is not None else {})}))
    else:
        print(f"{output} ({preprocessor}, {detected.width}x{detected.height})")


@controlnet_app.command("preprocessors")
def controlnet_preprocessors(as_json: bool = typer.Option(False, "--json")):
    """Every preprocessor, whether it can run here, and for those that need a file, which file and where."""
    from ..core.settings import Settings
    from ..engine.controlnet import preprocessor_status
    rows = preprocessor_status(Settings.from_env())
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        state = "ready" if r["available"] else "unavailable"
        where = f"  {r['file']}" if r.get("file") else ""
        need = f"  ({r['needs']})" if not r["available"] else ""
        print(f"{r['name']:<18} {state:<11} {r['kind']:<9}{where}{need}")
