"""Identity embeddings for IP-Adapter FaceID, computed as InsightFace computes them, without its package.

FaceID adapters (h94's ``ip-adapter-faceid_sd15`` / ``_sdxl``) read a face's ArcFace embedding instead of a CLIP
image embedding. InsightFace makes it in three steps, which this module repeats with the libraries imagesmith
already has:

1. **Five landmarks** (the eye centres, the nose tip and the mouth corners). InsightFace takes them from its SCRFD
   detector; here mediapipe's face detector (shipped in its wheel) finds the faces and its face mesh (also
   shipped) places the points: eye centre = the middle of the eye's two corners, mouth corners as marked.
2. **Alignment** to ArcFace's 112x112 template (the five standard positions the recognition models were trained
   on): the least-squares similarity transform from the landmarks to the template (Umeyama 1991, as
   scikit-image's ``SimilarityTransform.estimate`` that InsightFace calls), applied with OpenCV's warpAffine
   (black border).
3. **The recognition network**, the user's ArcFace ``.onnx`` (``w600k_r50.onnx`` of InsightFace's buffalo_l, or
   ``glintr100.onnx`` of antelopev2) in ``models/insightface/`` (any subfolder, as ComfyUI and A1111 keep them),
   run by onnxruntime on the aligned face in RGB, scaled ``(x - 127.5) / 127.5`` unless the graph normalises its
   own input (the older MXNet exports begin with Sub and Mul nodes: then raw pixels, as InsightFace decides it);
   the output, divided by its length, is the ``normed_embedding`` FaceID reads.

The models are the user's (InsightFace's weights are for non-commercial research); nothing is downloaded.
Steps 2 and 3 are checked against InsightFace's own ``norm_crop`` and ``ArcFaceONNX`` in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import BadRequest, MissingModelFile

ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
"""where the left eye, right eye, nose tip, left and right mouth corner sit in ArcFace's 112x112 crop"""
RECOGNITION_NAMES = ("w600k_r50", "glintr100", "w600k_mbf", "arcface")
"""InsightFace's recognition model files, preferred in this order when several lie in models/insightface"""


# ------------------------------------------------------------------------------------------- alignment
def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation; no reflection) that maps ``src`` points onto
    ``dst`` with the least squared error (Umeyama 1991)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    n = src.shape[0]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / n
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1
    u, sig, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        raise BadRequest("the face's landmarks are degenerate (all at one point)")
    if rank == 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:
        r = u @ vt
    elif rank == 1:
        d_mod = d.copy()
        d_mod[1] = -1
        r = u @ np.diag(d_mod) @ vt
    else:
        r = u @ np.diag(d) @ vt
    var_s = (s0 ** 2).sum() / n
    scale = (sig * d).sum() / var_s
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]]).astype(np.float64)


def align_face(rgb: np.ndarray, points: np.ndarray, size: int = 112) -> np.ndarray:
    """The face at ``points`` (5 x 2, ArcFace's order) warped onto the template at ``size`` px (uint8 RGB)."""
    import cv2
    matrix = similarity_transform(points, ARCFACE_TEMPLATE * (size / 112.0))
    return cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (size, size), borderValue=0.0)


# ------------------------------------------------------------------------------------------- landmarks
# mediapipe face-mesh indices: the two corners of each eye, the nose tip, the two mouth corners
_EYE_A, _EYE_B, _NOSE, _MOUTH = (33, 133), (362, 263), 1, (61, 291)


def face_points(image: Image.Image, *, max_faces: int = 4) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Each face's box and five ArcFace landmarks (left eye, right eye, nose, left and right mouth corner, as
    they appear in the picture), largest face first."""
    from .landmarks import _quiet, _solutions, detect
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    h, w = rgb.shape[:2]
    solutions = _solutions()
    out = []
    for face in detect(image, "mediapipe_face", max_count=max_faces):
        x0, y0, x1, y1 = face.box
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        half = side  # the face mesh wants the face at about half its input
        cx0, cy0 = int(max(0, cx - half)), int(max(0, cy - half))
        cx1, cy1 = int(min(w, cx + half)), int(min(h, cy + half))
        crop = np.ascontiguousarray(rgb[cy0:cy1, cx0:cx1])
        if crop.size == 0:
            continue
        with _quiet(), solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                                    min_detection_confidence=0.3) as mesh:
            result = mesh.process(crop)
        if not result.multi_face_landmarks:
            continue
        lm = result.multi_face_landmarks[0].landmark
        ch, cw = crop.shape[:2]

        def at(i: int) -> np.ndarray:
            return np.array([cx0 + lm[i].x * cw, cy0 + lm[i].y * ch], np.float64)
        eyes = sorted([(at(_EYE_A[0]) + at(_EYE_A[1])) / 2, (at(_EYE_B[0]) + at(_EYE_B[1])) / 2], key=lambda p: p[0])
        mouth = sorted([at(_MOUTH[0]), at(_MOUTH[1])], key=lambda p: p[0])
        out.append((face.box, np.stack([eyes[0], eyes[1], at(_NOSE), mouth[0], mouth[1]]).astype(np.float32)))
    return out


# ------------------------------------------------------------------------------------- the recognition net
@dataclass
class FaceEmbedder:
    """An ArcFace recognition network (onnxruntime session) and how its input is scaled."""
    session: object
    name: str
    size: int
    mean: float
    std: float

    @property
    def width(self) -> int:
        shape = self.session.get_outputs()[0].shape
        return int(shape[-1])

    def embed(self, aligned: np.ndarray) -> np.ndarray:
        """``normed_embedding`` of one aligned face (uint8 RGB, ``size`` px square): float32, unit length."""
        x = (aligned.astype(np.float32) - self.mean) / self.std
        blob = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        inp = self.session.get_inputs()[0].name
        out = np.asarray(self.session.run(None, {inp: blob})[0], np.float32).reshape(-1)
        norm = float(np.linalg.norm(out))
        if not np.isfinite(norm) or norm == 0:
            raise BadRequest(f"face model {self.name} gave an empty embedding")
        return out / norm


def _normalises_itself(path: Path) -> bool:
    """Whether the graph scales its own input (MXNet exports start with Sub and Mul nodes), as InsightFace checks."""
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        return False
    graph = onnx.load(str(path), load_external_data=False).graph
    names = [n.name for n in graph.node[:8]]
    sub = any(n.startswith(("Sub", "_minus")) for n in names)
    mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return sub and mul


def load_face_embedder(path: str | Path) -> FaceEmbedder:
    """An ArcFace ``.onnx`` file as a :class:`FaceEmbedder`; another network (a detector, say) is refused."""
    import onnxruntime as ort
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise BadRequest(f"face model {path.name}: InsightFace recognition models are .onnx files")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise BadRequest(f"face model {path.name} cannot be read: {str(exc).splitlines()[0]}") from None
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3] or not isinstance(shape[2], int):
        raise BadRequest(f"face model {path.name} takes input {shape}, not a square RGB face: not a recognition "
                         f"(ArcFace) network; use w600k_r50.onnx or glintr100.onnx")
    mean, std = (0.0, 1.0) if _normalises_itself(path) else (127.5, 127.5)
    return FaceEmbedder(session, path.stem, int(shape[2]), mean, std)


def pick_recognition_model(paths: list[Path]) -> Path | None:
    """The recognition model among InsightFace files: the known names first (w600k_r50, glintr100...), else the
    only file that is not a known detector or landmark model."""
    by_name = {p.stem.lower(): p for p in paths}
    for name in RECOGNITION_NAMES:
        hit = next((p for stem, p in by_name.items() if stem.startswith(name)), None)
        if hit is not None:
            return hit
    others = [p for p in paths if not p.stem.lower().startswith(("det_", "scrfd", "1k3d68", "2d106det",
                                                                "genderage", "retinaface"))]
    return others[0] if len(others) == 1 else None


def largest_face(image: Image.Image, *, what: str = "image") -> np.ndarray:
    """The five landmarks of the largest face in ``image``; :class:`BadRequest` when there is no face."""
    faces = face_points(image, max_faces=4)
    if not faces:
        raise BadRequest(f"{what}: no face found (IP-Adapter FaceID takes a photo of a face)")
    return faces[0][1]


def identity_embedding(embedder: FaceEmbedder, image: Image.Image, *, what: str = "image",
                       points: np.ndarray | None = None) -> np.ndarray:
    """The ``normed_embedding`` of the face at ``points`` (default: the largest face in ``image``)."""
    points = largest_face(image, what=what) if points is None else points
    aligned = align_face(np.asarray(image.convert("RGB")), points, embedder.size)
    return embedder.embed(aligned)


def face_crop(image: Image.Image, points: np.ndarray, size: int = 224) -> Image.Image:
    """The face aligned to ArcFace's template at ``size`` px: what FaceID Plus shows its CLIP encoder (InsightFace's
    ``norm_crop(image, kps, 224)``, as the reference implementation does)."""
    return Image.fromarray(align_face(np.asarray(image.convert("RGB")), points, size))


def missing_model_error(where: list[Path]) -> MissingModelFile:
    return MissingModelFile("IP-Adapter FaceID reads InsightFace identity embeddings: put an ArcFace recognition "
                            "model (w600k_r50.onnx from InsightFace's buffalo_l, or glintr100.onnx; non-commercial "
                            f"licence) in {where[0]}" + (f" (or {', '.join(str(p) for p in where[1:])})"
                                                         if len(where) > 1 else ""))
