"""docs/detection.jpg: what the detailer and the OpenPose preprocessor see on real photographs.

Top row: scikit-image's astronaut and cameraman, matplotlib's Grace Hopper, and four LFW faces turned 30 degrees,
with mediapipe's face boxes (green, the detailer's default ``mediapipe_face``) and OpenCV Haar's (red). Bottom
row: the OpenPose maps ``engine.landmarks.openpose`` draws for the three photos, over a dimmed copy.

    .venv/bin/python scripts/make_detection_sheet.py [-o docs/detection.jpg]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def photos() -> dict[str, Image.Image]:
    import matplotlib.cbook as cbook
    import skimage.data as data
    lfw = data.lfw_subset()[:4]
    turned = Image.new("RGB", (256, 256), (128, 128, 128))
    for i, crop in enumerate(lfw):
        face = Image.fromarray((crop * 255).astype(np.uint8)).convert("RGB").resize((96, 96), Image.BICUBIC)
        turned.paste(face.rotate(30, resample=Image.BICUBIC, fillcolor=(128, 128, 128)), (16 + 128 * (i % 2),
                                                                                          16 + 128 * (i // 2)))
    return {"astronaut": Image.fromarray(data.astronaut()), "camera": Image.fromarray(data.camera()).convert("RGB"),
            "grace_hopper": Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"),
            "LFW turned 30": turned}


def main() -> None:
    from imagesmith.core.requests import DetailerOptions
    from imagesmith.engine.detailer import detect, detect_faces
    from imagesmith.engine.landmarks import openpose
    parser = argparse.ArgumentParser()
    parser.add_argument("-o", "--output", default="docs/detection.jpg")
    out = Path(parser.parse_args().output)
    cell = 320
    pics = photos()
    sheet = Image.new("RGB", (cell * len(pics), cell * 2 + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, photo) in enumerate(pics.items()):
        scale = cell / max(photo.size)
        shown = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.LANCZOS)
        d = ImageDraw.Draw(shown)
        for face in detect_faces(photo, DetailerOptions(min_size=16)):
            d.rectangle([v * scale for v in face.box], outline=(230, 30, 30), width=3)
        for found in detect(photo, DetailerOptions(min_size=16)):
            d.rectangle([v * scale + 3 * (1 if k < 2 else -1) for k, v in enumerate(found.box)],
                        outline=(30, 200, 60), width=3)
        sheet.paste(shown, (i * cell, 0))
        draw.text((i * cell + 6, cell * 2 + 6), f"{name}: green mediapipe, red Haar", fill="black")
        if name != "LFW turned 30":
            pose = openpose(photo, hands=True)
            dim = Image.blend(photo, Image.new("RGB", photo.size), 0.7)
            mask = Image.fromarray(((np.asarray(pose).max(-1) > 20) * 255).astype(np.uint8))
            dim.paste(pose, (0, 0), mask)
            sheet.paste(dim.resize(shown.size, Image.LANCZOS), (i * cell, cell))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=88)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
