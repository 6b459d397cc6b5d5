"""Build the product-ad sample sheet in docs/ from hard, real inputs (nothing here is committed but the sheet).

Rows: real photographs with hand-made masks (scikit-image's espresso cup, alone and with the box a user would
drag, and its motorcycle in a cluttered garage with a box; OpenCV's sample photos from Debian's opencv-doc: a
lighter on a cluttered desk with a tap, an apple on a cloth), and three held-out hard composites from the cut-out
evaluation set (a product on a saturated texture, on a photograph with a person in it, among other objects cut
by the frame, with a box). Each row: the input (box drawn when one is given), the cut-out over a checkerboard
with its confidence, then the ads in the four social formats. A product the cut-out refuses is shown refused.

    imagesmith house data --cutout             # once: the hard set's sources
    python scripts/make_ad_samples.py          # -> docs/ad-samples.jpg, outputs/ad-samples/*/manifest.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CASES = (
    # (label, source, concept, headline, subline, cta, brand, guide: None, "box", "point", or "isnet")
    ("real photo: espresso cup on a wooden table (no guide)", "real:cup", "a cozy cafe counter, warm light",
     "Slow Mornings", "Single-origin espresso, roasted weekly", "Order now", "#8c4a2f", None),
    ("the same cup, box dragged", "real:cup", "a cozy cafe counter, warm light",
     "Slow Mornings", "Single-origin espresso, roasted weekly", "Order now", "#8c4a2f", "box"),
    ("real photo: lighter on a cluttered desk, tapped", "real:lighter", "a seamless paper studio backdrop, "
     "dramatic light", "Spark Anywhere", "Refillable, windproof, pocket-sized", "Get one", "#b03060", "point"),
    ("real photo: apple on a green cloth (no guide)", "real:apple", "white marble, light from the left",
     "Crisp & Local", "Picked this week, delivered tomorrow", "Order now", "#c0392b", None),
    ("real photo: motorcycle in a cluttered garage, box dragged", "real:motorcycle",
     "a seamless paper studio backdrop, dramatic light", "Ride Classic", "Restored 1983 roadster", "Book a ride",
     "#c0392b", "box"),
    ("the first cup with --segmenter isnet (if installed: imagesmith models install isnet)", "real:cup",
     "a cozy cafe counter, warm light", "Slow Mornings", "Single-origin espresso, roasted weekly", "Order now",
     "#8c4a2f", "isnet"),
    ("held-out composite: product on a saturated texture", "hard:texture",
     "white marble, light from the left", "Made to Last", "Hand-finished, built for every day", "Shop now",
     "#2e86ab", None),
    ("held-out composite: product in front of a photo", "hard:photo",
     "a bright bathroom shelf with soft morning light", "Glow All Day", "Light, fresh, 24 h hydration", "Try it",
     "#3b7d4f", None),
    ("held-out composite: clutter, box dragged", "hard:clutter", "a pale blue linen tablecloth, soft light",
     "Pick Me", "The one you were looking for", "Shop now", "#6c3483", "box"),
)
FORMATS = ["1:1", "4:5", "9:16", "1.91:1"]


def checker(rgba: Image.Image) -> Image.Image:
    w, h = rgba.size
    yy, xx = np.mgrid[0:h, 0:w]
    board = np.where(((xx // 16 + yy // 16) % 2)[..., None] == 0, 204, 255).astype(np.uint8) * np.ones((1, 1, 3),
                                                                                                        np.uint8)
    out = Image.fromarray(board)
    out.paste(rgba, (0, 0), rgba)
    return out


def caption(im: Image.Image, text: str, font) -> Image.Image:
    out = Image.new("RGB", (im.width, im.height + 28), (250, 250, 250))
    out.paste(im, (0, 28))
    ImageDraw.Draw(out).text((4, 4), text, fill=(20, 20, 20), font=font)
    return out


def contact_sheet(rows: list[tuple[str, list[Image.Image]]], path: Path, row_h: int = 300) -> None:
    font = ImageFont.load_default(size=18)
    tiles = []
    for label, ims in rows:
        ims = [im.resize((max(1, round(im.width * row_h / im.height)), row_h), Image.LANCZOS) for im in ims]
        width = sum(im.width for im in ims) + 12 * (len(ims) + 1)
        row = Image.new("RGB", (width, row_h + 44), (250, 250, 250))
        ImageDraw.Draw(row).text((12, 10), label, fill=(20, 20, 20), font=font)
        x = 12
        for im in ims:
            row.paste(im, (x, 38 + (row_h - im.height) // 2))
            x += im.width + 12
        tiles.append(row)
    sheet = Image.new("RGB", (max(t.width for t in tiles), sum(t.height for t in tiles)), (250, 250, 250))
    y = 0
    for t in tiles:
        sheet.paste(t, (0, y))
        y += t.height
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, quality=85, optimize=True)


def source(spec: str, out: Path) -> tuple[Path, tuple[int, int, int, int], tuple[int, int] | None] | None:
    """(the input photo written as JPEG, the product's true box, its tap point) of a case; None when the photo's
    package is not in the cache (imagesmith house data --cutout)."""
    from imagesmith.train.cutout_data import HardCutoutData, real_photos
    kind, arg = spec.split(":")
    point = None
    if kind == "real":
        p = next((x for x in real_photos() if arg in x["name"]), None)
        if p is None:
            return None
        img, box, point = p["image"], p["box"], p["point"]
    else:
        data = HardCutoutData("eval", size=768, seed=0, kinds=(arg,))
        # a photo with a person in it when the set has one (what the old cut-out kept), else the first sample
        samples = [data.sample(i) for i in range(24)]
        s = next((x for x in samples if "astronaut" in x.background), samples[0])
        img, box = Image.fromarray(s.image), s.box
    path = out / f"{spec.replace(':', '-')}.jpg"
    img.save(path, quality=92)
    return path, box, point


def main() -> int:
    from imagesmith.core.requests import AdRequest
    from imagesmith.vision.cutout import cutout
    from imagesmith.workflows.product_ad import ProductAdStudio

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/ad-samples"))
    ap.add_argument("--sheet", type=Path, default=Path("docs/ad-samples.jpg"))
    ap.add_argument("--segmenter", default=None)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    studio = ProductAdStudio()
    font = ImageFont.load_default(size=22)
    rows, summary = [], []
    for k, (label, spec, concept, headline, subline, cta, brand, guided) in enumerate(CASES):
        seg, segmenter = studio.segmenter(args.segmenter), args.segmenter
        if guided == "isnet":  # the stronger, user-installed segmenter on the same photo
            try:
                seg, segmenter = studio.segmenter("isnet"), "isnet"
            except Exception:
                continue
            guided = False
        found = source(spec, args.out)
        if found is None:
            continue
        photo, true_box, true_point = found
        img = Image.open(photo).convert("RGB")
        box = point = None
        if guided == "box":  # what a user drags: the product with a little slack
            x0, y0, x1, y1 = true_box
            m = int(0.04 * max(img.size))
            box = [max(0, x0 - m), max(0, y0 - m), min(img.width, x1 + m), min(img.height, y1 + m)]
        elif guided == "point":
            point = list(true_point)
        shown = img.copy()
        r = max(3, img.width // 150)
        if box:
            ImageDraw.Draw(shown).rectangle(box, outline=(255, 40, 40), width=r)
        if point:
            ImageDraw.Draw(shown).ellipse([point[0] - 3 * r, point[1] - 3 * r, point[0] + 3 * r, point[1] + 3 * r],
                                          outline=(255, 40, 40), width=r)
        cut = cutout(img, seg, box=box, point=point)
        tiles = [caption(shown, "input" + (" + box" if box else " + tap" if point else ""), font),
                 caption(checker(cut.rgba), f"cut-out, confidence {cut.confidence:.2f}", font)]
        req = AdRequest(products=[str(photo)], concept=concept, headline=headline, subline=subline, cta=cta,
                        brand_color=brand, formats=FORMATS, seed=args.seed + k, product_box=box, product_point=point,
                        segmenter=segmenter)
        result = studio.make(req, args.out / f"case-{k}")
        if result.failures:
            note = Image.new("RGB", (900, 300), (255, 240, 240))
            import textwrap
            ImageDraw.Draw(note).multiline_text((12, 12), "\n".join(textwrap.wrap(
                "refused: " + result.failures[0].error, 70)), fill=(120, 20, 20), font=font, spacing=6)
            tiles.append(note)
        tiles += [Image.open(o.path).convert("RGB") for o in result.outputs]
        rows.append((f"{label} - \"{concept}\"", tiles))
        summary.append({"case": label, "concept": concept, "confidence": cut.confidence, "box": box, "point": point,
                        "ads": len(result.outputs), "failures": [f.error for f in result.failures],
                        "scene": result.outputs[0].scene if result.outputs else None,
                        "seconds": result.seconds})
    contact_sheet(rows, args.sheet)
    print(json.dumps({"sheet": str(args.sheet), "cases": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
