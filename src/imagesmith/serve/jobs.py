"""The service's job types, one entry each: the request model (its schema is the API's), the checks that run at
submit beyond the model's own, and how a worker runs it. Adding a job type is one :class:`JobSpec` in ``JOBS``.

``check(request, settings) -> (normalised request, model name for affinity)`` raises pydantic's ValidationError or
BadRequest (4xx at submit); ``run(worker, job, folder, progress, cancel) -> result`` writes the job's files into its
attempt folder and returns the result the store keeps (``files``, and the answer for ``answers`` types)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter, create_model

from ..core import requests as R
from ..core.errors import BadRequest, NotFound
from ..core.progress import ProgressEvent
from ..core.settings import Settings

Check = Callable[[dict, "Settings | None"], "tuple[dict, str | None]"]
Run = Callable[..., "dict[str, Any]"]


@dataclass(frozen=True)
class JobSpec:
    name: str
    model: type[BaseModel]
    """The request body's model (OpenAPI shows it under the job type)."""
    check: Check
    run: Run
    summary: str
    answers: bool = False
    """The job's result holds an answer (JSON), not only files: the job view shows it."""
    preview: bool = False
    """Live previews from the sampler's latents while it runs."""


# ------------------------------------------------------------------------------------------------ checks

def _generate(kind: str) -> Check:
    def check(request: dict, settings: Settings | None) -> tuple[dict, str | None]:
        req = R.GenerateRequest.model_validate(request)
        if kind in ("img2img", "inpaint") and not req.init_image:
            raise BadRequest(f"a {kind} job needs request.init_image (an uploaded file id or path)")
        if kind == "inpaint" and not req.mask:
            raise BadRequest("an inpaint job needs request.mask")
        from ..engine.prompt_editing import check_request
        from ..engine.wildcards import expand_prompt, has_dynamic
        check_request(req)  # a malformed [from:to:when]: 4xx now
        for text in (req.prompt, req.negative_prompt, *(r.prompt for r in req.regions)):
            if has_dynamic(text):  # a malformed choice or an unknown wildcard: 4xx now
                expand_prompt(text, seed=0, folder=(settings or Settings.from_env()).home / "wildcards")
        return req.model_dump(mode="json"), req.model
    return check


def _plain(model: type[BaseModel]) -> Check:
    def check(request: dict, settings: Settings | None) -> tuple[dict, str | None]:
        return model.model_validate(request).model_dump(mode="json"), None
    return check


def _check_upscale(request: dict, settings: Settings | None) -> tuple[dict, str | None]:
    """The request's fields, and its upscaler among those installed (built in, or a file of the user's)."""
    from ..engine.upscale import UpscalerSet
    req = R.UpscaleRequest.model_validate(request)
    names = UpscalerSet(settings or Settings.from_env()).names(files=True)
    if req.upscaler.lower() not in {n.lower() for n in names} | {n.lower().rsplit(".", 1)[0] for n in names}:
        raise BadRequest(f"upscaler {req.upscaler!r} is not installed; choose one of: {', '.join(names)}")
    return req.model_dump(mode="json"), (req.refine.model if req.refine is not None else None)


def _check_grid(request: dict, settings: Settings | None) -> tuple[dict, str | None]:
    from ..eval.grid import GridRequest
    req = GridRequest.model_validate(request)
    req.plan()  # every cell's request is valid before the job is queued
    if req.base.init_image or req.base.mask:
        raise BadRequest("grid jobs are txt2img sweeps: no init_image or mask")
    return req.model_dump(mode="json"), req.base.model


def _check_ad(request: dict, settings: Settings | None) -> tuple[dict, str | None]:
    from ..compose.contrast import parse_hex
    from ..compose.formats import parse_formats
    req = R.AdRequest.model_validate(request)
    parse_formats(req.formats)  # an unknown format or a bad colour is a 4xx now, not a failed job later
    if req.brand_color:
        parse_hex(req.brand_color)
    if req.product_box is not None or req.product_point is not None or req.min_cutout_confidence > 0:
        _check_cutouts(req, settings)
    return req.model_dump(mode="json"), req.model


def _check_cutouts(req: R.AdRequest, settings: Settings | None) -> None:
    """Cut every product out now: a box or point outside the photo, a point on the background, or a product that
    cannot be separated cleanly is a 422 naming the field (``product_box``) before anything is queued."""
    from ..core.imageio import load_image
    from ..models.house import make_registry
    from ..models.segment import resolve_segmenter
    from ..vision.cutout import cutout
    settings = settings or Settings.from_env()
    # None: cutout() loads house-cutout only if a photo needs it (an RGBA product carries its own alpha)
    seg = resolve_segmenter(req.segmenter, make_registry(settings)) if req.segmenter else None
    for i, product in enumerate(req.products):
        image = load_image(product, settings=settings, mode=None, what=f"products[{i}]")
        cutout(image, seg, box=req.product_box, point=req.product_point, what=f"products[{i}]",
               min_confidence=req.min_cutout_confidence or None)


def _check_restyle(request: dict, settings: Settings | None) -> tuple[dict, str | None]:
    from ..workflows.restyle import RestyleRequest
    req = RestyleRequest.model_validate(request)
    if req.gate:
        from ..vision.classify import Gate
        Gate(req.gate)  # an unknown gate is a 4xx now
    check_clip(req.clip, settings)
    return req.model_dump(mode="json"), req.model


def _check_storyboard(request: dict, settings: Settings | None) -> tuple[dict, str | None]:
    from ..models.house import make_registry
    from ..workflows.storyboard import StoryboardRequest, plan_storyboard
    for key in ("output", "llm", "safety"):  # the service picks the folder, the endpoint and keeps safety on
        if key in request:
            raise BadRequest(f"storyboard jobs do not take request.{key}")
    req = StoryboardRequest.model_validate(request)
    plan_storyboard(req, registry=make_registry(settings or Settings.from_env()))  # too short, unsafe, unknown style
    return req.model_dump(mode="json"), req.model


def _check_vision(model: type[BaseModel]) -> Check:
    def check(request: dict, settings: Settings | None) -> tuple[dict, str | None]:
        req = model.model_validate(request)
        if isinstance(req, R.ClassifyRequest) and req.gate:
            from ..vision.classify import Gate
            gate = Gate(req.gate, settings)  # an unknown gate is a 4xx now
            if req.clip is not None and req.clip != gate.embedder:
                raise BadRequest(f"gate {req.gate!r} runs on the CLIP it was trained on ({gate.embedder}), not "
                                 f"{req.clip}")
        check_clip(getattr(req, "clip", None), settings)
        return req.model_dump(mode="json"), None
    return check


def check_clip(name: str | None, settings: Settings | None) -> None:
    """A request's ``clip`` must be house-clip or a registered transformers CLIP, by name (never a path)."""
    if name is None or name == "house-clip":
        return
    from ..models.registry import clip_folders
    known = clip_folders(settings or Settings.from_env())
    if name not in known:
        raise NotFound(f"no CLIP named {name!r}; known: {', '.join(['house-clip', *known])}")


# ------------------------------------------------------------------------------------------------ runs

def _run_generate(w, job: dict, folder: Path, progress, cancel) -> dict[str, Any]:
    req = R.GenerateRequest.model_validate(job["request"])
    return w._save_generation(w.engine.generate(req, progress=progress, cancel=cancel), folder)


def _run_cutout(w, job: dict, folder: Path, progress, cancel) -> dict[str, Any]:
    from ..core.imageio import load_image, save_png_atomic
    from ..vision.cutout import cutout
    from ..models.house import make_registry
    from ..models.segment import resolve_segmenter
    req = R.CutoutRequest.model_validate(job["request"])
    image = load_image(req.image, settings=w.settings, mode=None, what="image")
    seg = resolve_segmenter(req.segmenter, make_registry(w.settings) if req.segmenter else None)
    cut = cutout(image, seg, box=req.product_box, point=req.product_point, min_confidence=req.min_confidence)
    path = folder / "cutout.png"
    save_png_atomic(cut.rgba, path)
    return {"files": [{"path": str(path), "width": cut.rgba.width, "height": cut.rgba.height}],
            "box": list(cut.box), "confidence": cut.confidence, "confidence_parts": cut.confidence_parts}


def _run_ad(w, job: dict, folder: Path, progress, cancel) -> dict[str, Any]:
    return w._ad(job, folder, progress, cancel)


def _run_grid(w, job: dict, folder: Path, progress, cancel) -> dict[str, Any]:
    from PIL import Image

    from ..eval.grid import GridRequest, run_grid
    result = run_grid(w.engine, GridRequest.model_validate(job["request"]), folder, progress=progress, cancel=cancel,
                      gate=w.safety)
    with Image.open(result.grid_path) as im:
        size = im.size
    return {"files": [{"path": str(result.grid_path), "kind": "png", "width": size[0], "height": size[1]},
                      {"path": str(result.json_path), "kind": "json"}], "seconds": round(result.seconds, 3)}


def _run_upscale(w, job: dict, folder: Path, progress, cancel) -> dict[str, Any]:
    from ..core.imageio import load_image, save_png_atomic
    req = R.UpscaleRequest.model_validate(job["request"])
    image = load_image(req.image, settings=w.settings, mode="RGB", what="image")

    def tiles(done: int, total: int) -> None:
        cancel.raise_if_cancelled()
        progress(ProgressEvent(done, total, "upscale"))
    big = w.engine.upscalers().get(req.upscaler).upscale(image, req.scale, progress=tiles)
    report = None
    if req.refine is not None:  # Ultimate SD Upscale: img2img tile by tile
        from ..engine.tiled import refine_tiles
        big, report = refine_tiles(w.engine, big, req.refine, progress=progress, cancel=cancel)
    restored = None
    if req.restore_faces is not None:  # A1111's Extras order: upscale, then restore the faces
        (big,), (restored,) = w.engine.restore_faces([big], req.restore_faces, progress=progress, cancel=cancel)
    path = folder / "upscaled.png"
    save_png_atomic(big, path)
    out = {"files": [{"path": str(path), "width": big.width, "height": big.height}]}
    if report is not None:
        out["tiled"] = report
    if restored is not None:
        out["face_restoration"] = restored
    return out


def _run_restyle(w, job: dict, folder: Path, progress, cancel) -> dict[str, Any]:
    from ..workflows.restyle import RestyleRequest, restyle
    out = folder / "restyle"
    done = restyle(RestyleRequest.model_validate(job["request"]), engine=w.engine, output=out, progress=progress,
                   cancel=cancel, safety_gate=w.safety)
    image = done.image
    return {"files": [{"path": str(out / "restyled.png"), "kind": "png", "seed": done.record["seed"],
                       "infotext": done.record["infotext"], "width": image.width, "height": image.height},
                      {"path": str(out / "boxes.png"), "kind": "png"},
                      {"path": str(out / "restyle.json"), "kind": "json"}],
            "objects": done.record["objects"], "prompt": done.record["prompt"], "gate": done.record["gate"]}


def _run_storyboard(w, job: dict, folder: Path, progress, cancel) -> dict[str, Any]:
    from ..workflows.storyboard import StoryboardRequest, storyboard

    def panels(done: int, total: int, label: str) -> None:
        cancel.raise_if_cancelled()  # between panels
        progress(ProgressEvent(done, total, label))
    req = StoryboardRequest.model_validate({**job["request"], "output": str(folder / "storyboard")})
    board = storyboard(req, engine=w.engine, progress=panels, safety_gate=w.safety)
    files = [{"path": board.sheet_png, "kind": "png"}, {"path": board.sheet_pdf, "kind": "pdf"},
             {"path": board.manifest_path, "kind": "json"}]
    files += [{"path": str(Path(board.out_dir) / p.file), "kind": "png", "seed": p.seed} for p in board.panels]
    return {"files": files, "pages": board.pages, "seconds": round(board.seconds, 3),
            "panels": [{"index": p.index, "shot": p.shot, "prompt": p.prompt, "seed": p.seed} for p in board.panels]}


def _run_vision(w, job: dict, folder: Path, progress, cancel) -> dict[str, Any]:
    answer = w._vision(job["type"], job["request"])
    path = folder / "result.json"
    path.write_text(json.dumps(answer, indent=1, ensure_ascii=False), encoding="utf-8")
    return {**answer, "files": [{"path": str(path), "kind": "json"}]}


class ComfyPrompt(BaseModel):
    """A ComfyUI API-format prompt as ``/prompt`` queues it (the graph was validated there, against the caller's
    input images)."""
    prompt: dict[str, Any]
    client_id: str | None = Field(None, max_length=200)
    extra_data: dict[str, Any] = Field(default_factory=dict)
    outputs: list[str] = Field(default_factory=list, description="the output nodes that validated")
    number: int = 0


def _run_comfy(w, job: dict, folder: Path, progress, cancel) -> dict[str, Any]:
    from ..core.outputs import screen
    from ..engine.graph.executor import GraphContext
    from ..engine.graph.nodes import input_files
    req = ComfyPrompt.model_validate(job["request"])
    dirs = w.comfy_dirs(job["user"])
    ex = w.graph_executor
    checked = ex.validate(req.prompt, lists={"input": input_files(dirs["input"])})
    outputs = [o for o in req.outputs if o in checked.outputs] or checked.outputs
    state = {"node": ""}

    def event(name: str, data: dict) -> None:
        if name == "executing":
            state["node"] = data["node"]
            progress(ProgressEvent(0, 1, f"comfy {data['node']}"))
        elif name == "progress":
            progress(ProgressEvent(data["value"], data["max"], f"comfy {data['node']} {data['value']}/{data['max']}"))

    def gate(image):
        return screen(image, w.safety).image
    ctx = GraphContext(engine=w.engine, output_dir=dirs["output"], temp_dir=dirs["temp"], input_dir=dirs["input"],
                       prompt=req.prompt, prompt_id=job["id"], extra_pnginfo=(req.extra_data or {}).get(
                           "extra_pnginfo") or {}, event=event, cancel=cancel, screen=gate if w.safety else None)
    run = ex.run(req.prompt, ctx, outputs)
    files = []
    for node, ui in run.outputs.items():
        for image in ui.get("images", []):
            path = dirs[image["type"]].joinpath(*[p for p in image["subfolder"].split("/") if p], image["filename"])
            files.append({"path": str(path), "kind": "png", "node": node})
    return {"files": files, "outputs": run.outputs, "executed": run.executed, "cached": run.cached,
            "seconds": round(run.seconds, 3)}


# ------------------------------------------------------------------------------------------------ the registry

def _specs() -> dict[str, JobSpec]:
    from ..eval.grid import GridRequest
    from ..workflows.restyle import RestyleRequest
    from ..workflows.storyboard import StoryboardRequest
    specs = [
        JobSpec("generate", R.GenerateRequest, _generate("generate"), _run_generate,
                "txt2img (img2img or inpainting when the request has init_image / mask)", preview=True),
        JobSpec("img2img", R.GenerateRequest, _generate("img2img"), _run_generate, "img2img: needs init_image",
                preview=True),
        JobSpec("inpaint", R.GenerateRequest, _generate("inpaint"), _run_generate,
                "inpainting: needs init_image and mask", preview=True),
        JobSpec("cutout", R.CutoutRequest, _plain(R.CutoutRequest), _run_cutout,
                "background removal (RGBA PNG), its box and confidence", answers=True),
        JobSpec("ad", R.AdRequest, _check_ad, _run_ad, "product ads from a photo, in several formats"),
        JobSpec("upscale", R.UpscaleRequest, _check_upscale, _run_upscale, "upscale an image"),
        JobSpec("grid", GridRequest, _check_grid, _run_grid, "X/Y/Z parameter grid", preview=True),
        JobSpec("describe", R.DescribeRequest, _check_vision(R.DescribeRequest), _run_vision,
                "caption, tags and colours of an image", answers=True),
        JobSpec("classify", R.ClassifyRequest, _check_vision(R.ClassifyRequest), _run_vision,
                "zero-shot or ImageNet labels, or a trained gate", answers=True),
        JobSpec("prompt_expand", R.PromptExpandRequest, _check_vision(R.PromptExpandRequest), _run_vision,
                "a short request -> full prompts", answers=True),
        JobSpec("restyle", RestyleRequest, _check_restyle, _run_restyle, "classify -> describe -> generate",
                answers=True, preview=True),
        JobSpec("comfy", ComfyPrompt, _plain(ComfyPrompt), _run_comfy, "a ComfyUI API prompt (POST /prompt)",
                answers=True),
        JobSpec("storyboard", StoryboardRequest, _check_storyboard, _run_storyboard, "a storyboard sheet from a "
                "concept", preview=True),
    ]
    return {s.name: s for s in specs}


JOBS: dict[str, JobSpec] = _specs()
JOB_TYPES: tuple[str, ...] = tuple(JOBS)


def spec(job_type: str) -> JobSpec:
    try:
        return JOBS[job_type]
    except KeyError:
        raise BadRequest(f"unknown job type {job_type!r}; known: {', '.join(JOB_TYPES)}") from None


def validate_request(job_type: str, request: dict, settings: Settings | None = None) -> tuple[dict, str | None]:
    """(normalised request, model name for affinity); raises pydantic's ValidationError or BadRequest."""
    return spec(job_type).check(request, settings)


def openapi_body() -> tuple[dict, dict]:
    """The /v1/jobs body as OpenAPI: one schema per job type, told apart by ``type`` (a discriminated union).
    Returns (the body's schema, the named schemas it refers to, for the document's components)."""
    variants = [create_model(f"{s.name.title().replace('_', '')}Job", __doc__=s.summary,
                             type=(Literal[s.name], ...), request=(s.model, ...),  # type: ignore[valid-type]
                             priority=(int, Field(0, ge=-100, le=100)), callback_url=(str | None, None))
                for s in JOBS.values()]
    union = Annotated[Union[tuple(variants)], Field(discriminator="type")]  # type: ignore[valid-type]
    schema = TypeAdapter(union).json_schema(ref_template="#/components/schemas/{model}")
    return schema, schema.pop("$defs", {})
