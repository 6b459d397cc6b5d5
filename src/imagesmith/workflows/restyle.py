"""Restyle a photo: gate -> describe -> prompt -> generate -> find the main objects (document 3's pipeline).

    photo  --gate (optional: a trained house-clip gate must accept it, else it is refused with its score)
           --describe (house-clip names the object, house-cutout separates the backdrop)
           --prompt (the object + the concept, or the description's caption; style LoRAs from the request)
           --generate (txt2img, or img2img from the photo when a strength is given)
           --objects (house-cutout matte -> connected components -> boxes -> house-clip zero-shot label per box)

Output folder, written all at once (a temporary sibling renamed into place; nothing on failure):
``restyled.png`` (with the generation's metadata), ``boxes.png`` (boxes and labels drawn) and ``restyle.json``
(gate result, description, prompt, settings, seed, objects with ``box: [x0, y0, x1, y1]`` in the generated
image's pixels, x1/y1 exclusive).

Python: ``restyle(RestyleRequest(photo="teapot.png", concept="on a marble table"), engine=Engine(), output="out")``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import BadRequest, ImagesmithError
from ..core.requests import CheckedSampling, GenerateRequest, LoraSpec

# class names that mean "accept" in a gate trained from yes/ and no/ (or pass/fail, ...) folders
PASS_CLASSES = ("yes", "pass", "ok", "accept", "accepted", "good", "true", "positive", "keep", "in")


class Refused(ImagesmithError):
    """The gate did not accept the photo."""

    code = "refused"
    http_status = 422


class RestyleRequest(CheckedSampling):
    model_config = ConfigDict(extra="forbid")

    photo: str = Field(..., min_length=1, description="path of the input photo")
    gate: str | None = Field(None, description="a trained gate's name (imagesmith classify train); the photo must pass")
    gate_class: str | None = Field(None, description="the gate's accepting class; default yes/pass/ok/... if it has one")
    gate_threshold: float = Field(0.5, ge=0.0, le=1.0, description="least probability of the accepting class")
    concept: str | None = Field(None, description="the new scene or style, e.g. 'on a marble table, soft light'")
    loras: list[LoraSpec] = Field(default_factory=list, description="style LoRAs, e.g. style-noto:0.8")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="img2img from the photo at this denoising "
                                   "strength; default: txt2img from the prompt alone")
    negative_prompt: str = "text, watermark, blurry, lowres"
    model: str | None = Field(None, description="checkpoint; default: the default model (house-ldm)")
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(5.0, ge=0.0, le=30.0)
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "karras"
    seed: int = Field(-1, ge=-1, lt=2**32, description="-1: random")
    width: int | None = Field(None, ge=8, le=8192, description="default: the model's native size")
    height: int | None = Field(None, ge=8, le=8192)
    min_object_area: float = Field(0.01, ge=0.0, le=1.0, description="drop objects smaller than this image fraction")
    max_objects: int = Field(8, ge=1, le=64)
    segmenter: str | None = Field(None, description="segmenter for the objects (default house-cutout)")
    clip: str | None = Field(None, description="the CLIP that describes the photo and labels the objects: house-clip "
                             "(default; a gate's own CLIP when a gate is given) or a registered transformers CLIP")

    @property
    def mode(self) -> str:
        return "img2img" if self.strength is not None else "txt2img"


class RestyleResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    image: Any = Field(..., description="the generated PIL image")
    boxes_image: Any = Field(..., description="the generated image with boxes and labels drawn (PIL)")
    record: dict = Field(..., description="what restyle.json holds")
    generation: Any = Field(None, description="the engine's GenerationResult")
    output: str | None = None


# ----------------------------------------------------------------------------------------------- pieces
def check_gate(gate, image: Image.Image, *, accept: str | None, threshold: float) -> dict:
    """Run a Gate on the photo; {'gate', 'class', 'score', 'threshold', 'probabilities', 'passed'}."""
    classes = list(gate.classes)
    if accept is None:
        accept = next((c for c in classes if c.lower() in PASS_CLASSES), None)
        if accept is None:
            raise BadRequest(f"gate {gate.card.get('name')!r} has classes {', '.join(classes)}: say which one "
                             f"accepts with --gate-class")
    elif accept not in classes:
        raise BadRequest(f"gate {gate.card.get('name')!r} has no class {accept!r}; its classes: {', '.join(classes)}")
    probs = gate.probabilities(image)
    score = float(probs[accept])
    return {"gate": gate.card.get("name"), "class": accept, "score": round(score, 4), "threshold": threshold,
            "probabilities": probs, "passed": score >= threshold}


def build_prompt(description: dict, concept: str | None) -> str:
    """The object the photo shows, in the concept's scene; without a concept the description's caption."""
    from ..core.phrases import with_article
    concept = " ".join((concept or "").split())
    if not concept:
        return description["caption"]
    return f"{with_article(description['object'])}, {concept}"


def find_objects(image: Image.Image, segmenter, captioner, *, min_area: float = 0.01, max_objects: int = 8,
                 top_k: int = 3) -> list[dict]:
    """Main objects of ``image``: the segmenter's matte (>= 0.5) split into connected components, the tiny ones
    dropped, each box's crop named by house-clip zero-shot over the captioner's labels. Largest first;
    ``{label, score, box: [x0, y0, x1, y1], area, alternatives}`` in image pixels (x1/y1 exclusive)."""
    import cv2
    import torch
    rgb = image.convert("RGB")
    w, h = rgb.size
    alpha = np.asarray(segmenter.predict(rgb), np.float32)
    if alpha.max() > 1.0:
        alpha = alpha / 255.0
    mask = (alpha >= 0.5).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    comps = [stats[i] for i in range(1, n) if stats[i][cv2.CC_STAT_AREA] >= max(1.0, min_area * w * h)]
    comps.sort(key=lambda s: -int(s[cv2.CC_STAT_AREA]))
    objects = []
    for s in comps[:max_objects]:
        x, y, bw, bh, area = (int(v) for v in s[:5])
        box = [x, y, x + bw, y + bh]
        m = max(2, int(round(0.1 * max(bw, bh))))  # a little context for the classifier
        crop = rgb.crop((max(0, x - m), max(0, y - m), min(w, x + bw + m), min(h, y + bh + m)))
        side = max(crop.size)  # square it on the mean colour: house-clip sees whole square frames
        square = Image.new("RGB", (side, side), tuple(int(v) for v in np.asarray(crop).reshape(-1, 3).mean(0)))
        square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
        emb = captioner.clip.encode_images([square])
        probs = (float(captioner.clip.scale()) * (emb @ captioner._label_embeds.t())[0]).softmax(-1)
        top = torch.topk(probs, min(top_k, len(captioner.labels)))
        ranked = [(captioner.labels[i], round(float(p), 4)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
        objects.append({"label": ranked[0][0], "score": ranked[0][1], "box": box, "area": round(area / (w * h), 4),
                        "alternatives": [{"label": l, "score": p} for l, p in ranked[1:]]})
    return objects


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60)]


def draw_boxes(image: Image.Image, objects: list[dict], *, min_side: int = 512) -> Image.Image:
    """The image (scaled up to ``min_side`` on its short side, for legibility) with each object's box and label."""
    scale = max(1, int(np.ceil(min_side / min(image.size))))
    canvas = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST if scale > 2
                                          else Image.LANCZOS)
    d = ImageDraw.Draw(canvas)
    font = _font(max(12, canvas.width // 32))
    for i, obj in enumerate(objects):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in obj["box"])
        d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=max(2, canvas.width // 200))
        text = f"{obj['label']} {obj['score']:.2f}"
        tb = d.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0] + 6, tb[3] - tb[1] + 6
        ty = y0 - th if y0 - th >= 0 else min(y0 + 2, canvas.height - th)
        tx = min(max(0, x0), canvas.width - tw)
        d.rectangle([tx, ty, tx + tw, ty + th], fill=colour)
        d.text((tx + 3 - tb[0], ty + 3 - tb[1]), text, fill=(255, 255, 255), font=font)
    return canvas


def side_by_side(left: Image.Image, right: Image.Image, *, height: int = 512, gap: int = 8) -> Image.Image:
    """``left | right`` at a common height on white (the docs' sample)."""
    a = left.convert("RGB").resize((max(1, round(left.width * height / left.height)), height), Image.LANCZOS)
    b = right.convert("RGB").resize((max(1, round(right.width * height / right.height)), height), Image.LANCZOS)
    out = Image.new("RGB", (a.width + gap + b.width, height), (255, 255, 255))
    out.paste(a, (0, 0))
    out.paste(b, (a.width + gap, 0))
    return out


def _write_folder(output: Path, files: dict[str, Any]) -> None:
    """Write every file into a temporary sibling folder, then move it into place: the output folder appears
    complete or not at all (an existing folder gets the new files replaced one by one, each atomically)."""
    from ..core.outputs import save_image
    output = Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise BadRequest(f"output {output} exists and is not a folder")
    tmp = output.parent / f".{output.name}.{secrets.token_hex(6)}.tmp"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        for name, (content, chunks) in files.items():
            if isinstance(content, Image.Image):
                save_image(content, tmp / name, chunks=chunks)  # screened already, before the boxes were drawn
            else:
                (tmp / name).write_text(content, encoding="utf-8")
        if not output.exists():
            os.rename(tmp, output)
        else:
            for name in files:
                os.replace(tmp / name, output / name)
    except OSError as exc:
        raise BadRequest(f"cannot write {output}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- the recipe
def restyle(request: RestyleRequest, *, engine=None, output: str | os.PathLike[str] | None = None, captioner=None,
            segmenter=None, progress=None, cancel=None, safety_gate=None) -> RestyleResult:
    """Run the whole recipe; write the output folder when ``output`` is given. Raises Refused when the gate
    says no, NotFound for an unknown gate/model/LoRA, BadImage for a bad photo: all before anything is written.
    `safety_gate`: the service's safety gate; a flagged result is blurred or withheld (a grey tile) by its policy,
    as every output (core.outputs)."""
    from ..core.imageio import load_image
    from ..core.metadata import write_metadata_chunks
    from ..core.outputs import safety_chunks, screen
    from ..models.segment import resolve_segmenter
    from ..vision.caption import Captioner, describe
    from ..vision.classify import Gate

    if engine is None:
        from ..engine.generate import Engine
        engine = Engine()
    settings = engine.settings
    gate = Gate(request.gate, settings) if request.gate else None  # an unknown gate fails before any work
    photo = load_image(request.photo, settings=settings, mode="RGB", what="photo")
    gate_result = None
    if gate is not None:
        if captioner is not None and getattr(captioner, "clip_name", None) == gate.embedder:
            gate._clip = captioner.clip  # one CLIP for everything
        gate_result = check_gate(gate, photo, accept=request.gate_class, threshold=request.gate_threshold)
        if not gate_result["passed"]:
            others = ", ".join(f"{k} {v:.3f}" for k, v in gate_result["probabilities"].items() if k != gate_result["class"])
            raise Refused(f"{Path(request.photo).name} refused by gate {request.gate!r}: {gate_result['class']} "
                          f"{gate_result['score']:.3f} < {request.gate_threshold:g} ({others})")
    if segmenter is None:
        segmenter = resolve_segmenter(request.segmenter)
    if captioner is None:
        clip = request.clip or (gate.clip if gate is not None else None)
        captioner = Captioner(clip=clip, segmenter=segmenter, settings=settings)
    from ..vision.imagenet import ImageNetClassifier
    # ImageNet names the objects of real photos better than house-clip, which knows studio shots (see describe)
    description = describe(photo, captioner=captioner, imagenet=ImageNetClassifier(settings))
    prompt = build_prompt(description, request.concept)
    fields: dict[str, Any] = dict(
        prompt=prompt, negative_prompt=request.negative_prompt, model=request.model, loras=request.loras,
        steps=request.steps, cfg_scale=request.cfg_scale, sampler_name=request.sampler_name,
        scheduler=request.scheduler, seed=request.seed, width=request.width, height=request.height)
    if request.strength is not None:
        fields.update(init_image=request.photo, denoising_strength=request.strength)
        if request.width is None and request.height is None:  # the photo's aspect at the model's native size
            fields["width"], fields["height"] = _fit(photo.size, _native(engine, request.model))
    gen_req = GenerateRequest(**fields)
    generation = engine.generate(gen_req, progress=progress, cancel=cancel)
    image, rec = generation.images[0], generation.records[0]
    objects = find_objects(image, segmenter, captioner, min_area=request.min_object_area,
                           max_objects=request.max_objects)
    seen = screen(image, safety_gate, placeholder=True)
    image = seen.image
    boxes = draw_boxes(image, objects)
    record = {
        "photo": str(request.photo),
        "gate": gate_result,
        "description": description,
        "prompt": prompt,
        "negative_prompt": request.negative_prompt,
        "mode": request.mode,
        "settings": {"model": generation.model_name, "model_hash": generation.model_hash, "steps": request.steps,
                     "cfg_scale": request.cfg_scale, "sampler_name": request.sampler_name,
                     "scheduler": request.scheduler, "strength": request.strength,
                     "loras": [l.model_dump() for l in request.loras], "width": image.width, "height": image.height,
                     "concept": request.concept},
        "seed": rec.seed,
        "infotext": rec.infotext,
        "objects": objects,
        "boxes_scale": boxes.width // image.width,
        "files": {"image": "restyled.png", "boxes": "boxes.png", "json": "restyle.json"},
        "seconds": round(generation.seconds, 3),
    }
    if seen.flag is not None:
        record["safety"] = seen.flag
    if output is not None:
        _write_folder(Path(output), {
            "restyled.png": (image, {**write_metadata_chunks(generation, rec), **safety_chunks(seen.flag)}),
            "boxes.png": (boxes, {}),
            "restyle.json": (json.dumps(record, indent=1, ensure_ascii=False) + "\n", None),
        })
    return RestyleResult(image=image, boxes_image=boxes, record=record, generation=generation,
                         output=str(output) if output is not None else None)


def _native(engine, model: str | None) -> int:
    if model and model.lower() in engine._adopted:
        entry = engine._adopted[model.lower()]
    else:
        entry = engine.registry.get(model, "checkpoint") if model else engine._default_checkpoint()
    return engine._native_size(entry)


def _fit(size: tuple[int, int], native: int) -> tuple[int, int]:
    w, h = size
    s = native / max(w, h)
    return max(8, int(round(w * s / 8)) * 8), max(8, int(round(h * s / 8)) * 8)
