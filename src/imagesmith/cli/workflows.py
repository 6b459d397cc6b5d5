"""Workflows: the ad studio, restyle, storyboard."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .common import app, _Exit, _engine, _progress_bar


@app.command()
def ad(products: List[str] = typer.Argument(..., help="product photos (files or folders)"),
       concept: str = typer.Option(..., "--concept", help="the scene around the product"),
       headline: str = typer.Option(..., "--headline"),
       subline: Optional[str] = typer.Option(None, "--subline"),
       cta: Optional[str] = typer.Option(None, "--cta", help="call-to-action button label"),
       brand_color: Optional[str] = typer.Option(None, "--brand-color", help="#rrggbb"),
       formats: str = typer.Option("1:1,4:5,9:16,1.91:1", "--formats",
                                   help="comma list: 1:1,4:5,9:16,1.91:1,300x250,728x90,300x600,320x50 or "
                                        "social, display, all"),
       variations: int = typer.Option(1, "--variations"),
       seed: int = typer.Option(-1, "--seed"),
       model: Optional[str] = typer.Option(None, "--model", help="checkpoint that paints the background"),
       negative: Optional[str] = typer.Option(None, "--negative", help="negative prompt for the background"),
       steps: int = typer.Option(20, "--steps"),
       cfg: float = typer.Option(5.0, "--cfg"),
       sampler: str = typer.Option("DPM++ 2M", "--sampler"),
       schedule: str = typer.Option("karras", "--schedule", "--scheduler"),
       upscaler: str = typer.Option("R-ESRGAN 4x+", "--upscaler", help="brings the painted scene to format size"),
       position: str = typer.Option("auto", "--position", help="auto, center, bottom, left, right"),
       no_shadow: bool = typer.Option(False, "--no-shadow"),
       reflection: bool = typer.Option(False, "--reflection"),
       harmonize: bool = typer.Option(False, "--harmonize", help="colour-match the product to the scene "
                                      "(then its pixels may change; the manifest says so)"),
       harmonize_mode: str = typer.Option("edge", "--harmonize-mode", help="edge (edge band) or full (whole product)"),
       segmenter: Optional[str] = typer.Option(None, "--segmenter"),
       product_box: Optional[str] = typer.Option(None, "--product-box", help="x0,y0,x1,y1 around the product in the "
                                                 "photo (pixels): 'this one' when the photo holds several things"),
       product_point: Optional[str] = typer.Option(None, "--product-point", help="x,y of a point on the product"),
       background: str = typer.Option("auto", "--background", help="paint (the checkpoint paints the scene), "
                                      "studio (surface, wall and light built from the concept's words, crisp at "
                                      "full size) or auto (studio for the house model, paint for yours)"),
       min_confidence: float = typer.Option(0.5, "--min-cutout-confidence", help="refuse a cut-out scoring below "
                                            "this (ask for a box or a point); 0 accepts any"),
       props: str = typer.Option("auto", "--props", help="objects painted away from the product: auto (cleared in "
                                 "banners and for house models), keep or clear"),
       output: Path = typer.Option(..., "--output", "-o", help="output folder (manifest.json goes here)"),
       as_json: bool = typer.Option(False, "--json", help="print the manifest on stdout")):
    """Product photos + a concept -> finished ads in every format (PNG + editable HTML + manifest.json)."""
    from ..core.requests import AdRequest
    from ..workflows.product_ad import ProductAdStudio
    files: list[str] = []
    for p in products:
        path = Path(p)
        if path.is_dir():
            files += sorted(str(f) for f in path.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        else:
            files.append(p)
    if not files:
        raise _Exit("no product photos found in " + ", ".join(products))
    if harmonize_mode not in ("edge", "full"):
        raise _Exit(f"--harmonize-mode takes edge or full, not {harmonize_mode!r}")
    fields = dict(products=files, concept=concept, headline=headline, subline=subline, cta=cta,
                  brand_color=brand_color, formats=[f.strip() for f in formats.split(",") if f.strip()],
                  variations=variations, seed=seed, model=model, steps=steps, cfg_scale=cfg, sampler_name=sampler,
                  scheduler=schedule, upscaler=upscaler, position=position, shadow=not no_shadow, reflection=reflection,
                  harmonize=harmonize_mode if harmonize else "off", segmenter=segmenter, props=props)
    if negative is not None:
        fields["negative_prompt"] = negative
    for flag, value, n in (("--product-box", product_box, 4), ("--product-point", product_point, 2)):
        if value is not None:
            try:
                nums = [float(v) for v in value.split(",")]
            except ValueError:
                nums = []
            if len(nums) != n:
                raise _Exit(f"{flag} takes {n} comma-separated numbers, not {value!r}")
            fields[flag[2:].replace("-", "_")] = nums
    fields["min_cutout_confidence"] = min_confidence
    if background not in ("auto", "paint", "studio"):
        raise _Exit(f"--background takes auto, paint or studio, not {background!r}")
    fields["background"] = background
    req = AdRequest(**fields)
    studio = ProductAdStudio(_engine())
    show = not as_json and (sys.stderr.isatty() or os.environ.get("IMAGESMITH_PROGRESS") == "1")
    with _progress_bar(show, "ads") as on_progress:
        def batch_progress(done, total, label):
            if on_progress:
                from ..core.progress import ProgressEvent
                on_progress(ProgressEvent(done, total, label))
        result = studio.make(req, output, progress=batch_progress)
    if not result.outputs and len(result.failures) == 1:
        raise _Exit(result.failures[0].error)  # the one clear line (the manifest records it too)
    if as_json:
        print(Path(result.manifest_path).read_text())
    else:
        for o in result.outputs:
            print(f"{o.path}  {o.width}x{o.height}  seed={o.seed}  occ={o.occ:.3f}  "
                  f"min contrast={min(t['contrast_ratio'] for t in o.text):.1f}")
        for f in result.failures:
            print(f"FAILED {f.product}{' [' + f.format + ']' if f.format else ''}: {f.error}", file=sys.stderr)
        print(f"{len(result.outputs)} ad(s), {len(result.failures)} failure(s); manifest {result.manifest_path}")
    if result.failures and not result.outputs:
        raise _Exit(result.failures[0].error)
    if result.failures:
        raise SystemExit(1)


@app.command("restyle")
def restyle_cmd(photo: str = typer.Argument(..., help="the input photo"),
                gate: Optional[str] = typer.Option(None, "--gate", help="a trained gate the photo must pass"),
                gate_class: Optional[str] = typer.Option(None, "--gate-class", help="the gate's accepting class "
                                                         "(default: yes/pass/ok/... when it has one)"),
                gate_threshold: float = typer.Option(0.5, "--gate-threshold", help="least score of the accepting class"),
                lora: List[str] = typer.Option([], "--lora", help="style LoRA NAME:WEIGHT, repeatable"),
                concept: Optional[str] = typer.Option(None, "--concept", help="the new scene, e.g. 'on a marble table'"),
                strength: Optional[float] = typer.Option(None, "--strength", help="img2img from the photo at this "
                                                         "denoising strength (default: txt2img)"),
                seed: int = typer.Option(-1, "--seed", help="-1: random"),
                model: Optional[str] = typer.Option(None, "--model", "-m", help="checkpoint (default: house-ldm)"),
                steps: int = typer.Option(20, "--steps"),
                cfg: float = typer.Option(5.0, "--cfg", help="CFG scale"),
                clip: Optional[str] = typer.Option(None, "--clip", help="the CLIP that describes and labels: "
                                                   "house-clip (default) or a transformers CLIP under models/clip/NAME"),
                output: Path = typer.Option(..., "--output", "-o", help="output folder (restyled.png, boxes.png, "
                                            "restyle.json)"),
                as_json: bool = typer.Option(False, "--json", help="print restyle.json on stdout")):
    """Gate -> describe -> prompt -> generate -> boxes and labels of the main objects in the new image."""
    from ..core.requests import LoraSpec
    from ..workflows.restyle import RestyleRequest, restyle
    req = RestyleRequest(photo=photo, gate=gate, gate_class=gate_class, gate_threshold=gate_threshold,
                         loras=[LoraSpec.parse(x) for x in lora], concept=concept, strength=strength, seed=seed,
                         model=model, steps=steps, cfg_scale=cfg, clip=clip)
    if output.exists() and not output.is_dir():
        raise _Exit(f"output {output} exists and is not a folder")
    show = not as_json and (sys.stderr.isatty() or os.environ.get("IMAGESMITH_PROGRESS") == "1")
    with _progress_bar(show, "restyle") as on_progress:
        result = restyle(req, engine=_engine(), output=output, progress=on_progress)
    rec = result.record
    if as_json:
        print(json.dumps(rec, indent=1, ensure_ascii=False))
        return
    if rec["gate"]:
        print(f"gate {rec['gate']['gate']}: {rec['gate']['class']} {rec['gate']['score']:.3f} (passed)")
    print(f"described: {rec['description']['caption']}\nprompt: {rec['prompt']}")
    for o in rec["objects"]:
        print(f"  {o['label']} {o['score']:.2f}  box {o['box']}")
    print(f"{output / 'restyled.png'}  seed={rec['seed']}  {len(rec['objects'])} object(s)\n"
          f"{output / 'boxes.png'}\n{output / 'restyle.json'}")


@app.command("storyboard")
def storyboard_cmd(
    script: Path = typer.Argument(..., metavar="SCRIPT.txt", help="script: scene markers (INT./EXT./SCENE/#/씬/장면/1.), "
                                  "paragraphs or sentences; a first line 'Title: ...' names the sheet"),
    panels: Optional[int] = typer.Option(None, "--panels", help="merge/split the scenes into exactly N panels"),
    style: Optional[str] = typer.Option(None, "--style", help="style LoRA shared by every panel, e.g. style-noto"),
    style_weight: float = typer.Option(0.8, "--style-weight"),
    seed: int = typer.Option(-1, "--seed", help="-1: random; panel i (1-based) uses seed + i - 1"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="checkpoint name (default house-ldm)"),
    steps: int = typer.Option(20, "--steps"),
    cfg: float = typer.Option(5.0, "--cfg", help="CFG scale"),
    title: Optional[str] = typer.Option(None, "--title", help="sheet title (default: the script's 'Title:' line)"),
    output: Path = typer.Option(..., "--output", "-o", help="output folder (panels, storyboard.png/.pdf/.json)"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest on stdout"),
):
    """Script -> storyboard: scenes, shots, consistent prompts, one panel each, sheet as PNG + PDF.

    An OpenAI-compatible LLM splits scenes and reviews the logic when IMAGESMITH_LLM_URL is set
    (IMAGESMITH_LLM_MODEL, IMAGESMITH_LLM_KEY); otherwise rules do it, offline."""
    from ..workflows.storyboard import LLMConfig, StoryboardRequest, storyboard
    if not script.is_file():
        raise _Exit(f"script file not found: {script}")
    try:
        text = script.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _Exit(f"{script} is not UTF-8 text") from None
    except OSError as exc:
        raise _Exit(f"cannot read {script}: {exc.strerror or exc}") from None
    req = StoryboardRequest(script=text, title=title, panels=panels, style=style, style_weight=style_weight, seed=seed,
                            model=model, steps=steps, cfg_scale=cfg, output=str(output), llm=LLMConfig.from_env())
    show = not as_json and (sys.stderr.isatty() or os.environ.get("IMAGESMITH_PROGRESS") == "1")
    with _progress_bar(show, "storyboard") as on_progress:
        def panel_progress(done, total, label):
            if on_progress:
                from ..core.progress import ProgressEvent
                on_progress(ProgressEvent(done, total, label))
        result = storyboard(req, _engine(), progress=panel_progress)
    logic = result.manifest["review"].get("logic", {})
    if logic.get("ok") is False:
        print(f"imagesmith: note: the LLM review doubts the script's logic: {logic.get('notes', '')}", file=sys.stderr)
    if as_json:
        print(Path(result.manifest_path).read_text(encoding="utf-8"))
    else:
        for p in result.panels:
            print(f"{Path(result.out_dir) / p.file}  #{p.index} {p.shot}  seed={p.seed}  {p.prompt}")
        print(f"{result.sheet_png}\n{result.sheet_pdf} ({result.pages} page(s))\n{result.manifest_path}")
