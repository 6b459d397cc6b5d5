"""The OpenPose preprocessors (openpose, openpose_hand, openpose_face, openpose_faceonly, openpose_full): mediapipe's
landmarks on real photographs, drawn as the ControlNet extension draws OpenPose keypoints. The drawing is checked
pixel for pixel against controlnet_aux's (the extension's annotator code, packaged), the keypoints against the
faces the photos really have."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from imagesmith.engine.landmarks import OPENPOSE_PARTS, Person, body_keypoints, detect, draw_openpose, openpose, people


def _photos():
    """Real photographs with faces that ship inside installed packages: scikit-image's astronaut, matplotlib's
    Grace Hopper."""
    import matplotlib.cbook as cbook
    import skimage.data as data
    return {"astronaut": Image.fromarray(data.astronaut()),
            "grace_hopper": Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")}


def _two_people() -> Image.Image:
    """Both photographs side by side on grey, the astronaut small (her face about 60 px wide)."""
    photos = _photos()
    pair = Image.new("RGB", (1024, 600), (128, 128, 128))
    pair.paste(photos["astronaut"].resize((400, 400)), (0, 150))
    pair.paste(photos["grace_hopper"].resize((400, 600)), (560, 0))
    return pair


def test_openpose_keypoints_on_real_photos():
    """mediapipe's pose model on the photographs: OpenPose's nose, neck and shoulders where a person's are (the
    nose inside the face box, the neck below the nose, right shoulder left of the left one in the picture)."""
    for name, photo in _photos().items():
        points = body_keypoints(photo)
        face = detect(photo, "mediapipe_face")[0].box
        nose, neck, rshoulder, lshoulder = points[0], points[1], points[2], points[5]
        assert nose is not None and face[0] <= nose[0] <= face[2] and face[1] <= nose[1] <= face[3], name
        assert neck is not None and neck[1] > nose[1] and rshoulder[0] < lshoulder[0], name


def test_the_drawing_is_the_extensions_pixel_for_pixel():
    """The same keypoints drawn by imagesmith and by controlnet_aux's draw_poses (the ControlNet extension's
    annotator drawing): body limbs and joints, both hands, a face; at 512 px, the extension's detect resolution,
    every pixel equal."""
    from controlnet_aux.open_pose import PoseResult, draw_poses
    from controlnet_aux.open_pose.body import BodyResult, Keypoint
    rng = np.random.default_rng(3)
    size = 512
    body = [tuple(rng.uniform(40, 470, 2).round(1)) for _ in range(18)]
    body[9] = body[16] = None  # unseen keypoints: their limbs are not drawn
    hands = [rng.uniform(60, 450, (21, 2)).round(1) for _ in range(2)]
    face = rng.uniform(150, 350, (70, 2)).round(1)
    ours = np.asarray(draw_openpose((size, size), [Person(body, hands[0], hands[1], face)]))

    def kp(points):
        return [None if p is None else Keypoint(p[0] / size, p[1] / size) for p in points]
    theirs = draw_poses([PoseResult(BodyResult(kp(body), 1.0, 16), kp(hands[0]), kp(hands[1]), kp(face))], size, size)
    assert ours.max() == 255 and (ours.max(-1) > 0).mean() > 0.02
    assert np.array_equal(ours, theirs), np.argwhere((ours != theirs).any(-1))[:5]
    # parts off: the extension's draw_body / draw_hand / draw_face switches
    only_face = np.asarray(draw_openpose((size, size), [Person(face=face)]))
    assert np.array_equal(only_face, draw_poses([PoseResult(BodyResult(kp(body), 1.0, 16), None, None, kp(face))],
                                                size, size, draw_body=False, draw_hand=False))


def _check_face(points: np.ndarray, box) -> None:
    """70 OpenPose face keypoints that sit on a real face: inside its box (a little beyond for the jaw), the subject's
    right eye and brow left of the left ones in the picture, pupils inside their eyes, the nose tip below the eyes,
    the mouth below the nose and the chin lowest."""
    assert points.shape == (70, 2)
    w, h = box[2] - box[0], box[3] - box[1]
    assert (points[:, 0] > box[0] - 0.3 * w).all() and (points[:, 0] < box[2] + 0.3 * w).all()
    assert (points[:, 1] > box[1] - 0.5 * h).all() and (points[:, 1] < box[3] + 0.3 * h).all()
    right_eye, left_eye = points[36:42], points[42:48]
    assert right_eye[:, 0].max() < left_eye[:, 0].min() and points[17:22, 0].mean() < points[22:27, 0].mean()
    for pupil, eye in ((points[68], right_eye), (points[69], left_eye)):
        assert eye[:, 0].min() <= pupil[0] <= eye[:, 0].max()
        assert eye[:, 1].min() - 0.05 * h <= pupil[1] <= eye[:, 1].max() + 0.05 * h
    assert points[30, 1] > points[36:48, 1].mean() and points[48:68, 1].min() > points[27:31, 1].min()
    assert points[51, 1] > points[30, 1] - 0.02 * h and points[8, 1] == points[:68, 1].max()
    assert points[0, 0] < points[8, 0] < points[16, 0]


def test_faces_on_real_photos_land_on_the_face():
    """openpose_faceonly: each photograph's face as 70 keypoints in the right places; the pupils within a tenth of
    the face's width of the eyes mediapipe's face detector (another model) finds."""
    for name, photo in _photos().items():
        det = detect(photo, "mediapipe_face")[0]
        (person,) = people(photo, body=False, face=True)
        assert not person.body and person.left_hand is None and person.right_hand is None
        _check_face(person.face, det.box)
        width = det.box[2] - det.box[0]
        for pupil, eye in ((person.face[68], det.points[0]), (person.face[69], det.points[1])):
            assert math.dist(pupil, eye) < 0.1 * width, (name, pupil, eye)


def test_two_people_each_with_their_body_and_face():
    """openpose_full on two people side by side: two persons, each with a body whose nose is inside its own face's
    keypoints and a face; a small face (about 60 px wide) still gets its 70 points. The map draws both, and its JSON
    is OpenPose's (18, 70 keypoints as x, y, confidence) in pixels, as the extension's detect answers."""
    pair = _two_people()
    detected, poses = openpose(pair, "openpose_full")
    persons = poses["people"]
    assert poses["canvas_width"] == 1024 and poses["canvas_height"] == 600 and len(persons) == 2
    noses = sorted(p["pose_keypoints_2d"][0] for p in persons)
    assert noses[0] < 400 < 560 < noses[1]  # one on the astronaut, one on Grace Hopper
    for p in persons:
        body, face = np.array(p["pose_keypoints_2d"]).reshape(18, 3), np.array(p["face_keypoints_2d"]).reshape(70, 3)
        assert (face[:, 2] == 1).all() and body[0, 2] == 1
        x0, y0 = face[:, :2].min(0)
        x1, y1 = face[:, :2].max(0)
        assert x0 < body[0, 0] < x1 and y0 < body[0, 1] < y1
    small = min(persons, key=lambda p: p["pose_keypoints_2d"][0])
    face = np.array(small["face_keypoints_2d"]).reshape(70, 3)[:, :2]
    assert 40 < np.ptp(face[:, 0]) < 90
    _check_face(face, detect(pair.crop((0, 150, 400, 550)), "mediapipe_face")[0].box + np.array([0, 150, 0, 150]))
    lit = np.asarray(detected).max(-1) > 0
    assert lit[:, :400].any() and lit[:, 560:].any()
    white = (np.asarray(detected) == 255).all(-1)
    assert white[:, :400].sum() > 70 and white[:, 560:].sum() > 70  # each face's dots


@pytest.mark.parametrize("module", sorted(OPENPOSE_PARTS))
def test_each_module_draws_its_parts_and_nothing_on_an_empty_photo(module):
    """Each of the extension's OpenPose modules: the body's colours only where it draws the body, the face's white
    dots only where it draws faces; an empty grey photo gives an empty map and no people."""
    body, hands, face = OPENPOSE_PARTS[module]
    detected, poses = openpose(_photos()["grace_hopper"], module)
    pixels = np.asarray(detected).astype(int)
    red = (pixels[..., 0] == 255) & (pixels[..., 1] == 0) & (pixels[..., 2] == 0)  # OpenPose's nose dot
    white = (pixels == 255).all(-1)
    assert red.any() == body and white.any() == face
    (person,) = poses["people"]
    assert (person["face_keypoints_2d"] is not None) == face and any(person["pose_keypoints_2d"]) == body
    blank, nobody = openpose(Image.new("RGB", (96, 96), (90, 90, 90)), module)
    assert np.asarray(blank).max() == 0 and nobody["people"] == []


def _group_photo() -> Image.Image:
    """insightface's sample t1.jpg (it ships inside the insightface wheel, a test dependency): six people round a
    card table, 1280 x 886, faces about 110 px, several hands holding cards and chips."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec("insightface")
    if spec is None:
        pytest.skip("insightface is not installed")
    return Image.open(Path(spec.origin).parent / "data" / "images" / "t1.jpg").convert("RGB")


def test_a_real_group_photo_six_faces_six_bodies_and_their_hands():
    """On a real 6-person photo: all six faces (the face models also read 640 px tiles of a large photo: on the
    whole photo they find 3), a body for each (its nose inside its own face), each face's 70 points, and the hands
    mediapipe finds; a hand goes to a body only when that body's wrist is near it."""
    photo = _group_photo()
    faces = detect(photo, "mediapipe_face")
    assert len(faces) == 6 and min(f.score for f in faces) > 0.6
    persons = people(photo, body=True, hands=True, face=True)
    bodies = [p for p in persons if p.body]
    assert len(bodies) == 6
    for f in faces:  # one body and one face for each face found
        owners = [p for p in bodies if p.body[0] is not None and f.box[0] <= p.body[0][0] <= f.box[2]
                  and f.box[1] <= p.body[0][1] <= f.box[3]]
        assert len(owners) == 1 and owners[0].face is not None, f.box
    hands = [h for p in persons for h in (p.left_hand, p.right_hand) if h is not None]
    assert len(hands) >= 3
    for p in bodies:
        for hand, k in ((p.right_hand, 4), (p.left_hand, 7)):
            if hand is not None:
                assert math.dist(p.body[k], hand[0]) < 2 * np.ptp(hand, axis=0).max()
    assert sum(p.left_hand is not None or p.right_hand is not None for p in bodies) >= 2
