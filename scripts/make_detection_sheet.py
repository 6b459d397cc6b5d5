"""docs/detection.jpg: what the detailer and the ControlNet preprocessors see on real photographs.

Top row: scikit-image's astronaut and cameraman, matplotlib's Grace Hopper, and four LFW faces turned 30 degrees,
with mediapipe's face boxes (green, the detailer's default ``mediapipe_face``) and OpenCV Haar's (red). Middle
row: the ``openpose_full`` maps (body, hands, the face's 70 points) for the three photos and ``openpose_faceonly``
for the turned faces, over a dimmed copy. Bottom row: two people side by side (``openpose_full``), and the
model-free preprocessors canny, scribble_xdog and lineart_standard on the astronaut.

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


def _over(photo: Image.Image, detected: Image.Image) -> Image.Image:
    """The map's lit pixels over a dimmed copy of the photo."""
    dim = Image.blend(photo, Image.new("RGB", photo.size), 0.7)
    mask = Image.fromarray(((np.asarray(detected).max(-1) > 20) * 255).astype(np.uint8))
    dim.paste(detected, (0, 0), mask)
    return dim


def main() -> None:
    from imagesmith.core.requests import ControlNetSpec, DetailerOptions
    from imagesmith.engine.controlnet import preprocess
    from imagesmith.engine.detailer import detect, detect_faces
    from imagesmith.engine.landmarks import openpose
    parser = argparse.ArgumentParser()
    parser.add_argument("-o", "--output", default="docs/detection.jpg")
    out = Path(parser.parse_args().output)
    cell, label = 320, 22
    pics = photos()
    sheet = Image.new("RGB", (cell * len(pics), (cell + label) * 3), "white")
    draw = ImageDraw.Draw(sheet)

    def put(picture: Image.Image, row: int, col: int, text: str) -> None:
        scale = cell / max(picture.size)
        sheet.paste(picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.LANCZOS),
                    (col * cell, row * (cell + label)))
        draw.text((col * cell + 6, row * (cell + label) + cell + 5), text, fill="black")

    for i, (name, photo) in enumerate(pics.items()):
        shown = photo.copy()
        d = ImageDraw.Draw(shown)
        width = max(2, round(3 * max(photo.size) / cell))
        for face in detect_faces(photo, DetailerOptions(min_size=16)):
            d.rectangle(face.box, outline=(230, 30, 30), width=width)
        for found in detect(photo, DetailerOptions(min_size=16)):
            d.rectangle([v + width * (1 if k < 2 else -1) for k, v in enumerate(found.box)], outline=(30, 200, 60),
                        width=width)
        put(shown, 0, i, f"{name}: green mediapipe, red Haar")
        module = "openpose_faceonly" if name == "LFW turned 30" else "openpose_full"
        put(_over(photo, openpose(photo, module)[0]), 1, i, f"{name}: {module}")
    astronaut, hopper = pics["astronaut"], pics["grace_hopper"]
    pair = Image.new("RGB", (1024, 600), (128, 128, 128))  # two people, one small (her face about 60 px wide)
    pair.paste(astronaut.resize((400, 400)), (0, 150))
    pair.paste(hopper.resize((400, 600)), (560, 0))
    put(_over(pair, openpose(pair, "openpose_full")[0]), 2, 0, "two people: openpose_full")
    for col, module in enumerate(("canny", "scribble_xdog", "lineart_standard"), start=1):
        spec = ControlNetSpec(model="-", image="-", preprocessor=module)
        put(preprocess(astronaut, spec), 2, col, f"astronaut: {module}")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=80)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
