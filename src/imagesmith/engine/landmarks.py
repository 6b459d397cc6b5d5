"""People in pictures, found by the models that ship inside mediapipe 0.10.21's wheel (Apache-2.0; nothing is
downloaded): faces (BlazeFace, short range for close faces and full range for small ones), hands (palm detector
and 21 landmarks each), a body's 33 pose landmarks, and person masks (selfie segmentation).

They serve the detailer (faces, hands and persons to repaint, with ADetailer's model names) and the OpenPose
ControlNet preprocessors (a body and its hands drawn as OpenPose's 18-keypoint skeleton, the format the OpenPose
ControlNets were trained on).

mediapipe 0.10.21 is the last release whose wheel carries its models; it declares numpy<2 and protobuf<5, but runs
with this project's numpy 2 and protobuf 6, so ``make install`` installs it without its pins (see the Makefile).
Each call builds its own mediapipe graph (a few milliseconds), so threads never share one."""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..core.errors import MissingModelFile

DETECTORS = ("mediapipe_face", "mediapipe_face_full", "mediapipe_face_short", "mediapipe_hands", "mediapipe_person")
"""ADetailer's names for mediapipe's two face models; imagesmith's for both together (``mediapipe_face``: every face
either finds, overlaps merged), for hands and for persons (ADetailer uses YOLO models there)."""


_QUIET = threading.RLock()
_NOISE = re.compile(rb"^(W0000|I0000|E0000|INFO: Created TensorFlow|WARNING: All log messages|"
                    rb"AttributeError: 'MessageFactory')")


@contextlib.contextmanager
def _quiet():
    """mediapipe's C++ side writes its start-up and per-graph log lines straight to file descriptor 2; while it
    runs, fd 2 goes to a temporary file, and afterwards every line that is not mediapipe's goes back to stderr
    (so another thread's message written meanwhile is delayed, never lost)."""
    with _QUIET, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().splitlines(keepends=True) if not _NOISE.match(line)]
            if kept:
                os.write(2, b"".join(kept))


def _solutions():
    try:
        with _quiet():
            from mediapipe.python import solutions
    except ImportError:
        raise MissingModelFile("faces, hands and poses need mediapipe 0.10.21 (its wheel ships the models): "
                               "pip install --no-deps mediapipe==0.10.21 absl-py matplotlib") from None
    return solutions


@dataclass(frozen=True)
class Detection:
    box: tuple[int, int, int, int]
    """x0, y0, x1, y1 (x1, y1 exclusive), image pixels"""
    score: float
    label: str
    points: tuple[tuple[float, float], ...] = ()
    """a face's keypoints in image pixels, mediapipe's order: the subject's right eye, left eye, nose tip,
    mouth centre, right ear, left ear (empty for other detections)"""

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def _clip_box(x0: float, y0: float, x1: float, y1: float, w: int, h: int) -> tuple[int, int, int, int]:
    return (max(0, int(math.floor(x0))), max(0, int(math.floor(y0))), min(w, int(math.ceil(x1))),
            min(h, int(math.ceil(y1))))


def detect(image: Image.Image, model: str = "mediapipe_face", *, confidence: float = 0.3,
           max_count: int = 8) -> list[Detection]:
    """What ``model`` finds in ``image``, largest first, at most ``max_count``."""
    if model not in DETECTORS:
        raise ValueError(f"unknown detector {model!r}; known: {', '.join(DETECTORS)}")
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    h, w = rgb.shape[:2]
    solutions = _solutions()
    found: list[Detection] = []
    if model.startswith("mediapipe_face"):
        selections = {"mediapipe_face_full": (1,), "mediapipe_face_short": (0,), "mediapipe_face": (1, 0)}[model]
        for selection in selections:
            with _quiet(), solutions.face_detection.FaceDetection(model_selection=selection,
                                                                  min_detection_confidence=confidence) as fd:
                result = fd.process(rgb)
            for det in result.detections or []:
                b = det.location_data.relative_bounding_box
                box = _clip_box(b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h, w, h)
                points = tuple((p.x * w, p.y * h) for p in det.location_data.relative_keypoints)
                if all(_iou(box, kept.box) < 0.3 for kept in found):  # the same face seen by both models: once
                    found.append(Detection(box, float(det.score[0]), "face", points))
    elif model == "mediapipe_hands":
        for points, score in hand_landmarks(image, confidence=confidence, max_count=max_count):
            x0, y0 = points.min(0)
            x1, y1 = points.max(0)
            grow = 0.15 * max(x1 - x0, y1 - y0)  # landmarks sit on the joints: the fingertips' flesh is beyond
            found.append(Detection(_clip_box(x0 - grow, y0 - grow, x1 + grow, y1 + grow, w, h), score, "hand"))
    else:
        found = _persons(rgb, solutions, confidence)
    found = [d for d in found if d.box[2] > d.box[0] and d.box[3] > d.box[1]]
    found.sort(key=lambda d: (-d.area, d.box))
    return found[:max_count]


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _persons(rgb: np.ndarray, solutions, confidence: float) -> list[Detection]:
    """Each connected region of the selfie-segmentation mask (above 1/200 of the image) is a person."""
    import cv2
    with _quiet(), solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as seg:
        mask = seg.process(rgb).segmentation_mask
    h, w = mask.shape
    binary = (mask > 0.5).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    out = []
    for i in range(1, count):
        x, y, bw, bh, area = stats[i]
        if area < h * w / 200:
            continue
        score = float(mask[labels == i].mean())
        if score >= confidence:
            out.append(Detection((int(x), int(y), int(x + bw), int(y + bh)), score, "person"))
    return out


def hand_landmarks(image: Image.Image, *, confidence: float = 0.3, max_count: int = 4
                   ) -> list[tuple[np.ndarray, float]]:
    """Each hand's 21 landmarks [21, 2] in pixels (wrist, then thumb to little finger, base to tip: OpenPose's
    hand order) and its score."""
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    h, w = rgb.shape[:2]
    solutions = _solutions()
    with _quiet(), solutions.hands.Hands(static_image_mode=True, max_num_hands=max_count, model_complexity=1,
                                         min_detection_confidence=confidence) as hands:
        result = hands.process(rgb)
    out = []
    for lm, handed in zip(result.multi_hand_landmarks or [], result.multi_handedness or []):
        pts = np.array([[p.x * w, p.y * h] for p in lm.landmark], dtype=np.float32)
        out.append((pts, float(handed.classification[0].score)))
    return out


# ---------------------------------------------------------------------------------- OpenPose drawing
# mediapipe's 33 pose landmarks -> OpenPose's 18 body keypoints (nose, neck, then right before left, as OpenPose)
_BODY_FROM_POSE = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
# OpenPose's 17 limbs between its keypoints, and its 18 colours: the format its ControlNets were trained on
_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
          (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
            (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
            (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
_HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
               (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))


def body_keypoints(image: Image.Image, *, confidence: float = 0.3) -> list[tuple[float, float] | None]:
    """One body's 18 OpenPose keypoints in pixels (None where mediapipe does not see it), or [] without a body.
    mediapipe's pose model follows one person: the most prominent."""
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    h, w = rgb.shape[:2]
    solutions = _solutions()
    with _quiet(), solutions.pose.Pose(static_image_mode=True, model_complexity=1,
                                       min_detection_confidence=confidence) as pose:
        result = pose.process(rgb)
    if result.pose_landmarks is None:
        return []
    lm = result.pose_landmarks.landmark

    def point(i: int):
        p = lm[i]
        inside = 0 <= p.x <= 1 and 0 <= p.y <= 1
        return (p.x * w, p.y * h) if p.visibility >= 0.5 and inside else None
    points = [point(i) if i is not None else None for i in _BODY_FROM_POSE]
    if points[2] is not None and points[5] is not None:  # the neck: between the shoulders
        points[1] = ((points[2][0] + points[5][0]) / 2, (points[2][1] + points[5][1]) / 2)
    return points


def draw_openpose(size: tuple[int, int], body: list, hands: list[np.ndarray] = ()) -> Image.Image:
    """OpenPose's picture of a pose on black: limbs as coloured ellipses at 60%, keypoints as dots; hands as
    rainbow edges with blue joints. Line widths follow OpenPose's at 512 px, scaled with the image."""
    import colorsys

    import cv2
    w, h = size
    canvas = np.zeros((h, w, 3), np.uint8)
    scale = max(1.0, min(w, h) / 512)
    stick = max(1, int(round(4 * scale)))
    if body:
        for (a, b), colour in zip(_LIMBS, _COLOURS):
            if body[a] is None or body[b] is None:
                continue
            layer = canvas.copy()
            (xa, ya), (xb, yb) = body[a], body[b]
            length = math.hypot(xa - xb, ya - yb)
            angle = math.degrees(math.atan2(ya - yb, xa - xb))
            poly = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), stick),
                                    int(angle), 0, 360, 1)
            cv2.fillConvexPoly(layer, poly, colour)
            canvas = cv2.addWeighted(canvas, 0.4, layer, 0.6, 0)
        for p, colour in zip(body, _COLOURS):
            if p is not None:
                cv2.circle(canvas, (int(p[0]), int(p[1])), stick, colour, thickness=-1)
    for pts in hands:
        for k, (a, b) in enumerate(_HAND_EDGES):
            r, g, bl = colorsys.hsv_to_rgb(k / len(_HAND_EDGES), 1.0, 1.0)
            cv2.line(canvas, tuple(int(v) for v in pts[a]), tuple(int(v) for v in pts[b]),
                     (int(r * 255), int(g * 255), int(bl * 255)), max(1, int(round(2 * scale))))
        for p in pts:
            cv2.circle(canvas, (int(p[0]), int(p[1])), max(1, int(round(2 * scale))), (0, 0, 255), thickness=-1)
    return Image.fromarray(canvas)


def openpose(image: Image.Image, *, hands: bool = False) -> Image.Image:
    """The OpenPose preprocessor: the body (and with ``hands`` its hands) drawn as OpenPose draws them."""
    body = body_keypoints(image)
    found = [pts for pts, _ in hand_landmarks(image)] if hands else []
    return draw_openpose(image.size, body, found)
