"""Face restoration: GFPGAN, RestoreFormer and other face networks spandrel knows, from the user's files.

What A1111's "Restore faces" and its Extras tab's GFPGAN visibility do, on imagesmith's parts: each face is
found by mediapipe's face detector (shipped inside its wheel), aligned by its eyes, nose tip and mouth centre to
the 512 px face template these networks were trained on (FFHQ's, as published with GFPGAN), restored, and
pasted back through the inverse transform with a feathered mask; ``visibility`` blends the result with the
original (A1111's GFPGAN visibility: 1 is all restored).

Files: ``$IMAGESMITH_HOME/models/restorers/`` (or ComfyUI's ``facerestore_models``), ``.safetensors`` or ``.pth``
(read without unpickling; see :mod:`imagesmith.models.image_models`). CodeFormer is not among spandrel's own
architectures (it is in spandrel_extra_arches, under non-commercial terms), so it is not loaded.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.errors import UnsupportedModel

FACE_SIZE = 512
TEMPLATE_512 = np.array([[192.98138, 239.94708],   # the eye on the image's left
                         [318.90277, 240.19360],   # the eye on the image's right
                         [256.63416, 314.01935],   # nose tip
                         [257.17511, 371.28081]],  # mouth centre (the middle of the two mouth corners)
                        dtype=np.float32)
"""Where the aligned 512 px face has its landmarks (FFHQ alignment, the numbers GFPGAN publishes)."""


@dataclass
class RestoredFace:
    box: tuple[int, int, int, int]
    score: float


@dataclass
class RestoreReport:
    model: str
    visibility: float
    faces: list[RestoredFace] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "visibility": self.visibility,
                "faces": [{"box": list(f.box), "score": round(f.score, 3)} for f in self.faces]}


class FaceRestorer:
    """One face network (loaded on first use, kept) and the alignment around it. Thread-safe."""

    def __init__(self, path: str | Path, *, cache_dir: Path, name: str | None = None, device: str = "cpu",
                 cache=None):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.cache_dir = cache_dir
        self.device = device
        self.cache = cache
        """the engine's ModelCache: the network is kept there, under its budget, instead of here"""
        self._desc: Any = None
        self._lock = threading.Lock()

    def _prepare(self, desc: Any) -> None:
        if desc.purpose != "FaceSR":
            raise UnsupportedModel(f"{self.path.name} is a {desc.architecture.name} upscaler, not a face "
                                   "restorer (GFPGAN, RestoreFormer)")

    def _load(self) -> Any:
        with self._lock:
            if self._desc is not None:
                return self._desc
            from ..models.image_models import cached_image_model
            desc = cached_image_model(self.path, self.cache_dir, device=self.device, cache=self.cache,
                                      prepare=self._prepare)
            if self.cache is None:  # no engine cache: this restorer keeps its network
                self._desc = desc
            return desc

    @property
    def architecture(self) -> str:
        return str(self._load().architecture.name)

    def restore_crop(self, face: np.ndarray, fidelity: float = 0.5) -> np.ndarray:
        """An aligned FACE_SIZE x FACE_SIZE uint8 RGB face -> the network's restored face, float 0..1. ``fidelity``
        is CodeFormer's weight (A1111's "CodeFormer weight": 0 the most restoration, 1 the least); others have
        none."""
        import torch
        desc = self._load()
        x = torch.from_numpy(np.array(face, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
        x = x.to(device=desc.device, dtype=desc.dtype)
        with torch.inference_mode():
            if desc.architecture.name == "CodeFormer":
                y = desc.model(x, weight=float(fidelity))[0][0].float().cpu()
            else:
                y = desc(x)[0].float().cpu()
        return y.permute(1, 2, 0).numpy()

    def restore(self, image: Image.Image, *, visibility: float = 1.0, confidence: float = 0.5,
                max_faces: int = 8, fidelity: float = 0.5) -> tuple[Image.Image, RestoreReport]:
        """``image`` with every face found restored and blended in by ``visibility`` (0: unchanged)."""
        import cv2

        from .landmarks import detect
        if not 0.0 <= visibility <= 1.0:
            raise ValueError(f"visibility must be within 0..1, got {visibility}")
        report = RestoreReport(model=self.name, visibility=visibility)
        self._load()  # a file that is not a face restorer fails here, faces or not
        src_mode = image.mode
        rgb = np.asarray(image.convert("RGB"))
        faces = [d for d in detect(image, "mediapipe_face", confidence=confidence, max_count=max_faces)
                 if len(d.points) >= 4]
        if not faces or visibility == 0:
            report.faces = [RestoredFace(d.box, d.score) for d in faces]
            return image.copy(), report
        h, w = rgb.shape[:2]
        out = rgb.astype(np.float32) / 255.0
        for det in faces:
            eyes = sorted(det.points[:2])
            src = np.array([eyes[0], eyes[1], det.points[2], det.points[3]], dtype=np.float32)
            m, _ = cv2.estimateAffinePartial2D(src, TEMPLATE_512, method=cv2.LMEDS)
            if m is None:
                continue
            crop = cv2.warpAffine(np.ascontiguousarray((out * 255 + 0.5).astype(np.uint8)), m, (FACE_SIZE, FACE_SIZE),
                                  flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
            restored = self.restore_crop(crop, fidelity)
            inv = cv2.invertAffineTransform(m)
            back = cv2.warpAffine(restored, inv, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            mask = _face_mask()
            weight = cv2.warpAffine(mask, inv, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.0)[..., None]
            out = out * (1 - weight * visibility) + back * (weight * visibility)
            report.faces.append(RestoredFace(det.box, det.score))
        result = Image.fromarray(np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")
        if src_mode == "RGBA":
            result.putalpha(image.getchannel("A"))
        return result, report


def _face_mask() -> np.ndarray:
    """1 over the aligned face, fading to 0 over the last 1/16 of the crop on each side (no seam where the
    restored face meets the picture)."""
    import cv2
    edge = FACE_SIZE // 16
    mask = np.zeros((FACE_SIZE, FACE_SIZE), np.float32)
    mask[edge:-edge, edge:-edge] = 1.0
    return cv2.GaussianBlur(mask, (0, 0), sigmaX=edge / 2)
