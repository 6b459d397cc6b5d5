"""The detailer, after A1111's ADetailer: find faces, hands or persons, repaint each at a higher resolution,
blend it back.

Detectors: mediapipe's face models (``mediapipe_face_full``, the default, also finds small and turned faces;
``mediapipe_face_short`` for close-ups), its hand landmarker (``mediapipe_hands``) and its person segmentation
(``mediapipe_person``), all shipped inside the mediapipe wheel (``engine.landmarks``); and OpenCV's Haar
frontal-face cascade (``face_haar``, inside opencv-python-headless). For every detection box:

    crop the box plus padding  ->  upscale the crop to the model's working size (512 for SD1, 128 for house-ldm:
    more pixels than the face had)  ->  img2img through the same engine with the same prompt (plus an optional
    detailer prompt) at a low denoising strength  ->  downscale back  ->  blend into the image with a feathered
    mask (the box, dilated, Gaussian-blurred) that is exactly zero outside the padded box.

So every pixel outside the padded boxes is the input's, bit for bit. Several units run in turn, each on the
previous one's result (faces, then hands), as ADetailer's tabs. Used from generation
(``GenerateRequest(detailer=DetailerOptions())`` or a list of them, ``imagesmith generate --detailer face
--detailer hand``), or on any image:

    from imagesmith.engine.detailer import DetailerOptions, FaceDetailer
    image, report = FaceDetailer(engine, DetailerOptions(strength=0.4)).detail(image, request, seed=1)

``report`` says what was done (the detections with their boxes and scores, the options);
``infotext_params(reports)`` gives ADetailer's infotext keys (``ADetailer model: mediapipe_face_full,
ADetailer confidence: 0.3, ...``, a second unit's with `` 2nd``)."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.requests import DetailerOptions, GenerateRequest
HAAR_MODEL = "face_haar"
HAAR_FILE = "haarcascade_frontalface_default.xml"
_ORDINALS = ("", " 2nd", " 3rd", " 4th")


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1/y1 exclusive), image pixels
    neighbors: int                  # Haar's detection count: its confidence

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


# ----------------------------------------------------------------------------------------------- detect
_CASCADE = None


def _cascade():
    global _CASCADE
    if _CASCADE is None:
        import cv2
        from ..core.errors import MissingModelFile
        path = Path(cv2.data.haarcascades) / HAAR_FILE
        cascade = cv2.CascadeClassifier(str(path))
        if cascade.empty():
            raise MissingModelFile(f"the face detector needs OpenCV's {HAAR_FILE} (opencv-python-headless<5), "
                                   f"not found at {path}")
        _CASCADE = cascade
    return _CASCADE


def detect_faces(image: Image.Image, options: DetailerOptions | None = None) -> list[Face]:
    """Frontal faces in ``image``, largest first, at most ``options.max_faces``."""
    import cv2
    o = options or DetailerOptions()
    gray = cv2.equalizeHist(cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY))
    if min(gray.shape) < o.min_size:
        return []
    rects, counts = _cascade().detectMultiScale2(gray, scaleFactor=1.1, minNeighbors=o.min_neighbors,
                                                 minSize=(o.min_size, o.min_size))
    faces = [Face((int(x), int(y), int(x + w), int(y + h)), int(n)) for (x, y, w, h), n in zip(rects, counts)]
    faces.sort(key=lambda f: (-f.area, f.box))
    return faces[: o.max_faces]


def detect(image: Image.Image, options: DetailerOptions | None = None):
    """What the unit's detector finds, largest first, at most ``max_faces``, none smaller than ``min_size``:
    ``engine.landmarks.Detection`` (box, score, label)."""
    from .landmarks import Detection
    from .landmarks import detect as mediapipe_detect
    o = options or DetailerOptions()
    if o.detector == HAAR_MODEL:
        found = [Detection(f.box, float(f.neighbors), "face") for f in detect_faces(image, o)]
    else:
        found = mediapipe_detect(image, o.detector, confidence=o.confidence, max_count=32)
    found = [d for d in found if min(d.box[2] - d.box[0], d.box[3] - d.box[1]) >= o.min_size]
    return found[: o.max_faces]


# ----------------------------------------------------------------------------------------------- geometry
def padded_box(face: tuple[int, int, int, int], size: tuple[int, int], o: DetailerOptions) -> tuple[int, int, int, int]:
    """The face box grown by ``padding`` (at least enough for the dilated, blurred mask to reach zero inside
    it), made square where the image allows, clipped to the image."""
    x0, y0, x1, y1 = face
    w, h = size
    pad = o.padding_pixels if o.padding_pixels is not None else int(round(o.padding * max(x1 - x0, y1 - y0)))
    pad = max(pad, mask_reach(o) + 1)
    side = max(x1 - x0, y1 - y0) + 2 * pad
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    bx0, by0 = int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2))
    bx0, by0 = min(bx0, x0 - pad), min(by0, y0 - pad)
    bx1, by1 = max(bx0 + side, x1 + pad), max(by0 + side, y1 + pad)
    return max(0, bx0), max(0, by0), min(w, bx1), min(h, by1)


def mask_reach(o: DetailerOptions) -> int:
    """How far past the face box the blend mask is non-zero: dilation + the blur kernel's half width."""
    return max(0, o.dilate) + _blur_half(o.mask_blur)


def _blur_half(sigma: float) -> int:
    return int(math.ceil(3 * sigma)) if sigma > 0 else 0


def unit_prompt(image_prompt: str, text: str, index: int, mode: str) -> str:
    """The repaint's prompt for detection ``index`` (0: the largest): the unit's text split at ADetailer's [SEP]
    (the last part serves the detections past it), added to the image's prompt, or with ``mode`` "replace" in its
    place where the part is not empty ([PROMPT] in it stands for the image's prompt)."""
    parts = [p.strip() for p in text.split("[SEP]")]
    part = parts[min(index, len(parts) - 1)]
    if mode == "replace" or "[PROMPT]" in part:
        return part.replace("[PROMPT]", image_prompt.strip()) if part else image_prompt
    return ", ".join(p for p in (image_prompt.strip(), part) if p)


def blend_mask(face: tuple[int, int, int, int], box: tuple[int, int, int, int], o: DetailerOptions) -> np.ndarray:
    """float32 [h, w] in 0..1 over the padded ``box``: 1 on the dilated face box, a Gaussian edge, and exactly 0
    wherever the kernel does not reach (so at the padded box's border, except where the image's edge clips it:
    there the face runs on past the edge and the mask stays high)."""
    import cv2
    bx0, by0, bx1, by1 = box
    half = _blur_half(o.mask_blur)
    # blur on a canvas `half` wider than the box on each side, so the image's edge does not darken the mask
    m = np.zeros((by1 - by0 + 2 * half, bx1 - bx0 + 2 * half), np.float32)
    fx0, fy0 = face[0] - o.dilate - bx0 + half, face[1] - o.dilate - by0 + half
    fx1, fy1 = face[2] + o.dilate - bx0 + half, face[3] + o.dilate - by0 + half
    m[max(0, fy0):max(0, fy1), max(0, fx0):max(0, fx1)] = 1.0
    if half:
        # the kernel's support is exactly `half` pixels: nothing leaks further than dilate + half
        m = cv2.GaussianBlur(m, (2 * half + 1, 2 * half + 1), o.mask_blur, borderType=cv2.BORDER_CONSTANT)
        m = m[half:-half, half:-half]
        m[m < 1e-4] = 0.0
    return np.clip(m, 0.0, 1.0)


def work_size(crop: tuple[int, int], size: int) -> tuple[int, int]:
    """The repaint's width/height: the crop scaled so its long side is ``size``, multiples of 8."""
    cw, ch = crop
    s = size / max(cw, ch)
    return max(8, int(round(cw * s / 8)) * 8), max(8, int(round(ch * s / 8)) * 8)


def blend(original: np.ndarray, repaint: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 blend; where alpha is 0 the original's pixels are kept exactly."""
    o = original.astype(np.float32)
    a = alpha[..., None]
    mixed = np.clip(np.rint(o * (1 - a) + repaint.astype(np.float32) * a), 0, 255)
    return np.where(a == 0, o, mixed).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- repaint
class FaceDetailer:
    """Detect faces in an image and repaint each with img2img through ``engine`` (an Engine)."""

    def __init__(self, engine, options: DetailerOptions | None = None):
        self.engine = engine
        self.options = options or DetailerOptions()

    def working_size(self, request: GenerateRequest) -> int:
        if self.options.size:
            return self.options.size
        eng = self.engine
        name = request.model
        if name and name.lower() in eng._adopted:
            entry = eng._adopted[name.lower()]
        else:
            entry = eng.registry.get(name, "checkpoint") if name else eng._default_checkpoint()
        return eng._native_size(entry)

    def detail(self, image: Image.Image, request: GenerateRequest, *, seed: int, progress=None,
               cancel=None) -> tuple[Image.Image, dict[str, Any]]:
        """(detailed image, report). ``request`` gives prompt, model, LoRAs, sampler, CFG, steps; the repaint of
        face i uses ``seed + i``. No face: the image itself, unchanged, and a report with 0 faces."""
        from ..core.requests import GenerateRequest
        o = self.options
        image = image.convert("RGB")
        faces = detect(image, o)
        report: dict[str, Any] = {"model": o.detector, "detections": [], "options": o.model_dump(mode="json")}
        if not faces:
            return image, report
        size = self.working_size(request)
        out = np.array(image)
        base = request.model_dump(mode="python")
        with tempfile.TemporaryDirectory(prefix="imagesmith-detailer-") as tmp:
            for i, face in enumerate(faces):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                box = padded_box(face.box, image.size, o)
                bx0, by0, bx1, by1 = box
                crop = Image.fromarray(out[by0:by1, bx0:bx1])
                tw, th = work_size(crop.size, size)
                path = Path(tmp) / f"face-{i}.png"
                crop.resize((tw, th), Image.LANCZOS).save(path)
                face_seed = (seed + i) % 2**32
                sub = GenerateRequest.model_validate({
                    **base,
                    "prompt": unit_prompt(request.prompt, o.prompt, i, o.prompt_mode),
                    "negative_prompt": unit_prompt(request.negative_prompt, o.negative_prompt, i, o.prompt_mode),
                    "steps": o.steps or request.steps, "seed": face_seed, "variation_seed": None,
                    "variation_strength": 0.0, "batch_size": 1, "batch_count": 1, "width": tw, "height": th,
                    "init_image": str(path), "denoising_strength": o.strength, "mask": None, "outpaint": None,
                    "hires": None, "controlnet": None, "detailer": None,
                })
                if o.strength > 0:
                    repaint = self.engine.generate(sub, progress=_relabel(progress), cancel=cancel).images[0]
                else:
                    repaint = crop.resize((tw, th), Image.LANCZOS)
                back = np.asarray(repaint.convert("RGB").resize(crop.size, Image.LANCZOS))
                out[by0:by1, bx0:bx1] = blend(out[by0:by1, bx0:bx1], back, blend_mask(face.box, box, o))
                report["detections"].append({"label": face.label, "box": list(face.box), "padded_box": list(box),
                                             "score": round(face.score, 4), "seed": face_seed,
                                             "work_size": [tw, th]})
        return Image.fromarray(out), report


def _relabel(progress):
    if progress is None:
        return None
    from ..core.progress import ProgressEvent

    def on_event(event):
        progress(ProgressEvent(event.step, event.total, "detailer", event.image_index))
    return on_event


def detail_images(engine, request: GenerateRequest, images: list[Image.Image], seeds: list[int], *,
                  progress=None, cancel=None) -> tuple[list[Image.Image], list[dict[str, Any]]]:
    """The engine's post-processing step: every unit of the request, in turn, on every image of a job (image i
    with its own seed). Each image's report is ``{"units": [unit report, ...]}``."""
    base = request.model_copy(update={"detailer": None})
    out, reports = [], []
    for image, seed in zip(images, seeds):
        units = []
        for options in request.detailer_units:
            image, rep = FaceDetailer(engine, options).detail(image, base, seed=seed, progress=progress,
                                                              cancel=cancel)
            units.append(rep)
        out.append(image)
        reports.append({"units": units})
    return out, reports


def infotext_params(report: dict[str, Any] | None) -> dict[str, Any]:
    """ADetailer's infotext keys for one image's report ({} without one); the second unit's end in `` 2nd``,
    as ADetailer writes its tabs."""
    if not report:
        return {}
    units = report.get("units", [report])

    def num(x):
        return f"{x:g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else x
    params: dict[str, Any] = {}
    for unit, suffix in zip(units, _ORDINALS):
        o = unit.get("options", {})
        haar = unit.get("model") == HAAR_MODEL
        params.update({
            f"ADetailer model{suffix}": unit.get("model"),
            f"ADetailer detections{suffix}": len(unit.get("detections", [])),
            f"ADetailer confidence{suffix}": None if haar else num(o.get("confidence")),
            f"ADetailer min neighbors{suffix}": o.get("min_neighbors") if haar else None,
            f"ADetailer min size{suffix}": o.get("min_size"),
            f"ADetailer padding{suffix}": num(o.get("padding")) if o.get("padding_pixels") is None else None,
            f"ADetailer inpaint padding{suffix}": o.get("padding_pixels"),  # ADetailer's key, in pixels
            f"ADetailer dilate erode{suffix}": o.get("dilate"),
            f"ADetailer mask blur{suffix}": num(o.get("mask_blur")),
            f"ADetailer denoising strength{suffix}": num(o.get("strength")),
            f"ADetailer steps{suffix}": o.get("steps"),
            f"ADetailer prompt{suffix}": o.get("prompt") or None,
            f"ADetailer negative prompt{suffix}": o.get("negative_prompt") or None,
        })
    return params
