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
from dataclasses import dataclass, field

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
                results = [(x0, y0, x1 - x0, y1 - y0, fd.process(np.ascontiguousarray(rgb[y0:y1, x0:x1])))
                           for x0, y0, x1, y1 in _face_tiles(w, h)]
            for x0, y0, tw, th, result in results:
                for det in result.detections or []:
                    b = det.location_data.relative_bounding_box
                    box = _clip_box(x0 + b.xmin * tw, y0 + b.ymin * th, x0 + (b.xmin + b.width) * tw,
                                    y0 + (b.ymin + b.height) * th, w, h)
                    points = tuple((x0 + p.x * tw, y0 + p.y * th) for p in det.location_data.relative_keypoints)
                    if all(_iou(box, kept.box) < 0.3 for kept in found):  # one face seen twice (models, tiles)
                        found.append(Detection(box, float(det.score[0]), "face", points))
    elif model == "mediapipe_hands":
        for points, score, _ in hand_landmarks(image, confidence=confidence, max_count=max_count):
            x0, y0 = points.min(0)
            x1, y1 = points.max(0)
            grow = 0.15 * max(x1 - x0, y1 - y0)  # landmarks sit on the joints: the fingertips' flesh is beyond
            found.append(Detection(_clip_box(x0 - grow, y0 - grow, x1 + grow, y1 + grow, w, h), score, "hand"))
    else:
        found = _persons(rgb, solutions, confidence)
    found = [d for d in found if d.box[2] > d.box[0] and d.box[3] > d.box[1]]
    found.sort(key=lambda d: (-d.area, d.box))
    return found[:max_count]


FACE_TILE = 640
"""photos longer than 1.5 tiles are also searched in FACE_TILE squares at half-tile steps: the face models read
128 or 192 px, so in a 1280 px group photo a 100 px face would shrink to 15 px (measured on insightface's 6-person
t1.jpg: 3 faces found on the whole photo, all 6 with the tiles, nothing else)"""


def _face_tiles(w: int, h: int) -> list[tuple[int, int, int, int]]:
    """The whole photo, then (when it is large) overlapping FACE_TILE squares covering it."""
    tiles = [(0, 0, w, h)]
    if max(w, h) < 1.5 * FACE_TILE:
        return tiles
    step = FACE_TILE // 2
    xs = sorted({min(x, max(0, w - FACE_TILE)) for x in range(0, max(1, w - step), step)})
    ys = sorted({min(y, max(0, h - FACE_TILE)) for y in range(0, max(1, h - step), step)})
    tiles += [(x, y, min(w, x + FACE_TILE), min(h, y + FACE_TILE)) for y in ys for x in xs]
    return tiles


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
                   ) -> list[tuple[np.ndarray, float, str]]:
    """Each hand's 21 landmarks [21, 2] in pixels (wrist, then thumb to little finger, base to tip: OpenPose's
    hand order), its score, and which of the subject's hands it is ("left"/"right"; mediapipe names them as if
    the photo were mirrored, so its names are swapped here)."""
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    h, w = rgb.shape[:2]
    solutions = _solutions()
    with _quiet(), solutions.hands.Hands(static_image_mode=True, max_num_hands=max_count, model_complexity=1,
                                         min_detection_confidence=confidence) as hands:
        result = hands.process(rgb)
    out = []
    for lm, handed in zip(result.multi_hand_landmarks or [], result.multi_handedness or []):
        pts = np.array([[p.x * w, p.y * h] for p in lm.landmark], dtype=np.float32)
        label = handed.classification[0]
        out.append((pts, float(label.score), "right" if label.label == "Left" else "left"))
    return out


# ---------------------------------------------------------------------------------- OpenPose
# mediapipe's 33 pose landmarks -> OpenPose's 18 body keypoints (nose, neck, then right before left, as OpenPose)
_BODY_FROM_POSE = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
# mediapipe's face mesh (468 points, 478 with the irises) -> OpenPose's 70 face keypoints: dlib's 68 (jaw from the
# subject's right ear to the left, brows, nose bridge and base, eyes from the outer corner of the right one, outer
# and inner lips from the right corner) and the right and left pupils
_FACE_FROM_MESH = (127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356,
                   70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
                   168, 197, 5, 4, 75, 97, 2, 326, 305,
                   33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
                   61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
                   78, 82, 13, 312, 308, 317, 14, 87,
                   468, 473)
# OpenPose's 17 limbs between its keypoints, and its 18 colours: the format its ControlNets were trained on
_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
          (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
            (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
            (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
_HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
               (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
_FACE_SIZE = 256  # each face is read by the mesh model at this size, however small it is in the photo


@dataclass
class Person:
    """One person as OpenPose describes them, in image pixels: 18 body keypoints (None where unseen; empty when
    the body was not found or not asked for), each hand's 21 and the face's 70 keypoints (None when not found)."""
    body: list = field(default_factory=list)
    left_hand: np.ndarray | None = None
    right_hand: np.ndarray | None = None
    face: np.ndarray | None = None


def _pose(rgb: np.ndarray, solutions, confidence: float) -> list[tuple[float, float] | None]:
    h, w = rgb.shape[:2]
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


def body_keypoints(image: Image.Image, *, confidence: float = 0.3) -> list[tuple[float, float] | None]:
    """The most prominent body's 18 OpenPose keypoints in pixels (None where mediapipe does not see it), or []
    without a body."""
    return _pose(np.ascontiguousarray(np.asarray(image.convert("RGB"))), _solutions(), confidence)


def _inside(point, box, grow: float = 0.0) -> bool:
    if point is None:
        return False
    gx, gy = grow * (box[2] - box[0]), grow * (box[3] - box[1])
    return box[0] - gx <= point[0] <= box[2] + gx and box[1] - gy <= point[1] <= box[3] + gy


def _crop_to(rgb: np.ndarray, x0: float, y0: float, side_x: float, side_y: float, out_w: int, out_h: int):
    """The region (x0, y0, side_x x side_y) of `rgb` scaled to out_w x out_h (black beyond the photo), and the
    function taking the crop's pixels back to the photo's."""
    import cv2
    sx, sy = out_w / side_x, out_h / side_y
    m = np.array([[sx, 0, -x0 * sx], [0, sy, -y0 * sy]], np.float32)
    crop = cv2.warpAffine(rgb, m, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return np.ascontiguousarray(crop), lambda x, y: (x0 + x / sx, y0 + y / sy)


def _bodies(rgb: np.ndarray, faces: list[Detection], solutions, confidence: float) -> list[list]:
    """Every body: mediapipe's pose model follows one person, so it reads the whole photo (the most prominent
    person), then the region below each face whose nose no body has yet (a person is about 8 heads tall)."""
    h, w = rgb.shape[:2]
    found = [b for b in [_pose(rgb, solutions, confidence)] if b]
    for face in faces:
        if any(_inside(b[0], face.box, 0.25) for b in found):
            continue
        fw = max(face.box[2] - face.box[0], face.box[3] - face.box[1])
        cx = (face.box[0] + face.box[2]) / 2
        # the whole body first; where a neighbour in it is more prominent, down to the chest (on insightface's
        # t1.jpg the taller crop finds 4 of the 6 people, the two more with the shorter one)
        for wide, above, tall in ((2.5, 1.0, 9.0), (2.0, 0.5, 6.0)):
            x0, y0, side_x, side_y = cx - wide * fw, face.box[1] - above * fw, 2 * wide * fw, tall * fw
            scale = 512 / side_y
            crop, back = _crop_to(rgb, x0, y0, side_x, side_y, max(1, int(side_x * scale)), 512)
            body = [None if p is None else back(*p) for p in _pose(crop, solutions, confidence)]
            body = [p if p is not None and 0 <= p[0] < w and 0 <= p[1] < h else None for p in body]
            if body and _inside(body[0], face.box, 0.25):
                found.append(body)
                break
    return found


def _face_mesh(rgb: np.ndarray, face: Detection, solutions, confidence: float) -> np.ndarray | None:
    """The face's 70 OpenPose keypoints: the face (found by the face detectors, so small faces too) read by the
    mesh model at 256 px in a square twice its size."""
    side = 2.0 * max(face.box[2] - face.box[0], face.box[3] - face.box[1])
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    crop, back = _crop_to(rgb, cx - side / 2, cy - side / 2, side, side, _FACE_SIZE, _FACE_SIZE)
    with _quiet(), solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                                                min_detection_confidence=confidence) as mesh:
        result = mesh.process(crop)
    if not result.multi_face_landmarks:
        return None
    lm = result.multi_face_landmarks[0].landmark
    return np.array([back(lm[i].x * _FACE_SIZE, lm[i].y * _FACE_SIZE) for i in _FACE_FROM_MESH], np.float32)


def people(image: Image.Image, *, body: bool = True, hands: bool = False, face: bool = False,
           confidence: float = 0.3) -> list[Person]:
    """Everyone in `image` as OpenPose keypoints: bodies by mediapipe's pose model, hands by its hand landmarker,
    faces by its face detectors and face mesh. A hand goes to the body whose wrist is nearest, a face to the body
    whose nose is in it; one with no body is a person of its own."""
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    solutions = _solutions()
    faces = detect(image, "mediapipe_face", confidence=max(confidence, 0.5)) if body or face else []
    found = [Person(body=b) for b in _bodies(rgb, faces, solutions, confidence)] if body else []
    if face:
        for det in faces:
            points = _face_mesh(rgb, det, solutions, confidence)
            if points is None:
                continue
            owner = next((p for p in found if p.face is None and _inside(p.body[0] if p.body else None, det.box,
                                                                            0.25)), None)
            if owner is None:
                owner = Person()
                found.append(owner)
            owner.face = points
    if hands:
        for points, _, side in hand_landmarks(image, confidence=confidence):
            # a body's wrist within twice the hand's size of the hand's wrist: its hand (else a person of its own;
            # the pose model's wrists miss by up to 1.6 hand sizes on insightface's t1.jpg)
            owner, best = None, 2.0 * float(np.ptp(points, axis=0).max())
            for p in found:
                for s, k in (("right", 4), ("left", 7)):
                    if len(p.body) == 18 and p.body[k] is not None and getattr(p, f"{s}_hand") is None:
                        d = math.dist(p.body[k], points[0])
                        if d < best:
                            owner, best, side = p, d, s
            if owner is None:
                owner = Person()
                found.append(owner)
            setattr(owner, f"{side}_hand", points)
    return found


def _at(p) -> tuple[int, int]:
    return int(p[0]), int(p[1])


def draw_openpose(size: tuple[int, int], persons: list[Person]) -> Image.Image:
    """OpenPose's picture of the poses on black, drawn as the ControlNet extension (ControlNet 1.1's annotator)
    draws them: limbs as ellipses in 60% of OpenPose's colours, keypoints as dots; hands as rainbow edges with blue
    joints; faces as white dots. Widths are the extension's at 512 px, scaled with the image's short side (the
    extension draws at its 512 px detect resolution and resizes the map), at least 1 px."""
    import colorsys

    import cv2
    w, h = size
    canvas = np.zeros((h, w, 3), np.uint8)
    scale = min(w, h) / 512
    stick, dot, line, face_dot = (max(1, int(round(v * scale))) for v in (4, 4, 2, 3))
    for person in persons:
        body = person.body
        if body:
            for (a, b), colour in zip(_LIMBS, _COLOURS):
                if body[a] is None or body[b] is None:
                    continue
                (xa, ya), (xb, yb) = body[a], body[b]
                length = math.hypot(xa - xb, ya - yb)
                angle = math.degrees(math.atan2(ya - yb, xa - xb))
                poly = cv2.ellipse2Poly((int((xa + xb) / 2), int((ya + yb) / 2)), (int(length / 2), stick),
                                        int(angle), 0, 360, 1)
                cv2.fillConvexPoly(canvas, poly, [int(c * 0.6) for c in colour])
            for p, colour in zip(body, _COLOURS):
                if p is not None:
                    cv2.circle(canvas, _at(p), dot, colour, thickness=-1)
        for pts in (person.left_hand, person.right_hand):
            if pts is None:
                continue
            for k, (a, b) in enumerate(_HAND_EDGES):
                r, g, bl = colorsys.hsv_to_rgb(k / len(_HAND_EDGES), 1.0, 1.0)
                cv2.line(canvas, _at(pts[a]), _at(pts[b]), (r * 255, g * 255, bl * 255), line)
            for p in pts:
                cv2.circle(canvas, _at(p), dot, (0, 0, 255), thickness=-1)
        if person.face is not None:
            for p in person.face:
                cv2.circle(canvas, _at(p), face_dot, (255, 255, 255), thickness=-1)
    return Image.fromarray(canvas)


def pose_json(persons: list[Person], size: tuple[int, int]) -> dict:
    """The poses in OpenPose's JSON, as the ControlNet extension returns them (``poses`` of /controlnet/detect)
    and its pose editors read them: x, y in pixels and a confidence per keypoint, [0, 0, 0] where unseen."""
    def flat(points, count: int):
        if points is None or len(points) == 0:
            return None
        out = []
        for p in points:
            out.extend([0.0, 0.0, 0.0] if p is None else [round(float(p[0]), 2), round(float(p[1]), 2), 1.0])
        return out + [0.0] * (3 * count - len(out))
    return {"people": [{"pose_keypoints_2d": flat(p.body, 18) or [0.0] * 54,
                        "face_keypoints_2d": flat(p.face, 70),
                        "hand_left_keypoints_2d": flat(p.left_hand, 21),
                        "hand_right_keypoints_2d": flat(p.right_hand, 21)} for p in persons],
            "canvas_width": size[0], "canvas_height": size[1]}


OPENPOSE_PARTS = {"openpose": (True, False, False), "openpose_hand": (True, True, False),
                  "openpose_face": (True, False, True), "openpose_faceonly": (False, False, True),
                  "openpose_full": (True, True, True)}
"""the ControlNet extension's OpenPose modules: which of body, hands and face each draws"""


def openpose(image: Image.Image, module: str = "openpose") -> tuple[Image.Image, dict]:
    """An OpenPose preprocessor (``OPENPOSE_PARTS``): its map, and the poses as OpenPose JSON."""
    body, hands, face = OPENPOSE_PARTS[module]
    persons = people(image, body=body, hands=hands, face=face)
    return draw_openpose(image.size, persons), pose_json(persons, image.size)
