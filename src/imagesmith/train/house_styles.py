"""House style LoRAs: house-ldm LoRAs trained with ``imagesmith train lora`` on emoji drawn in other styles,
rendered from their SVG icon sets on npm (Iconify JSON packages), so document 3's LoRA-mix experiment runs
offline.

For each style, the house dataset's training objects that the icon set also draws (matched by CLDR name) are
rendered at 128 px on plain and gradient backdrops (the house procedural backdrops), captioned
``<trigger>, a teapot on a pale blue backdrop``, and written as a kohya folder. Nothing is committed but the
LoRAs and their cards: ``imagesmith house styles`` rebuilds the datasets from the pinned npm packages.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .house_data import NpmPin, default_cache_dir, fetch_npm_package, load_house_dataset, with_article


@dataclass(frozen=True)
class StyleSet:
    name: str
    pin: NpmPin
    trigger: str
    licence: str


STYLES: dict[str, StyleSet] = {s.name: s for s in (
    StyleSet("fluent-flat", NpmPin("@iconify-json/fluent-emoji-flat", "1.2.6",
                                   "sha512-RY47RgPb47fYUiyrA64sIOL0+UU02s29sXpNBbIQRBUlPlfNFTKUmZDERGuxDs/7yNGWqQYvuaSYM1M4fRXlUw=="),
             "flatmoji", "MIT (Microsoft Fluent Emoji)"),
    StyleSet("noto", NpmPin("@iconify-json/noto", "1.2.9",
                            "sha512-DQiuXENbun41ch+XPSV55H9FaWKpHTyz46YIKtSaKYD4fIDDzL1tR6H4np/T38jfrTAeI3rcKF0mqHYeZVAuaw=="),
             "notomoji", "Apache-2.0 (Google Noto Emoji)"),
    StyleSet("openmoji", NpmPin("@iconify-json/openmoji", "1.2.29",
                                "sha512-vXdhkqcXVSO6suy+m9LbcUM3OdVyuNOtpV8/als/WqfkQIRxevL5Geb/g+6GH/Qwnq1OqksEmaDGTCmZ5nFKJQ=="),
             "openmojistyle", "CC BY-SA 4.0 (OpenMoji)"),
)}
BACKDROPS = ("plain", "gradient")


def _kebab(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def render_svg(svg: str, size: int) -> Image.Image:
    import resvg_py
    data = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size)
    return Image.open(io.BytesIO(bytes(data))).convert("RGBA")


def icon_svg(icons: dict, name: str) -> str:
    icon = icons["icons"][name]
    w, h = icon.get("width", icons.get("width", 16)), icon.get("height", icons.get("height", 16))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{icon.get("left", 0)} {icon.get("top", 0)} {w} {h}">{icon["body"]}</svg>')


def build_style_dataset(style: str, out: Path | None = None, *, objects: int = 96, size: int = 128,
                        seed: int = 0, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The kohya folder of one style (``<out>/1_<style>/NNN.png + .txt``), built from the pinned npm icon set
    and the house dataset's training objects; returns ``out``."""
    from tqdm.auto import tqdm

    from .backdrops import make_backdrop
    s = STYLES[style]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    package = fetch_npm_package(s.pin, cache, progress=progress)
    icons = json.loads((package / "icons.json").read_text(encoding="utf-8"))
    index = load_house_dataset(cache)
    matched = [(o, _kebab(o.cldr_name)) for o in index.objects_in("train") if _kebab(o.cldr_name) in icons["icons"]]
    rng = np.random.default_rng([seed, len(style)])
    chosen = [matched[i] for i in sorted(rng.permutation(len(matched))[:objects])]
    out = Path(out) if out else cache / "styles" / style
    folder = out / f"1_{style}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for k, (obj, icon) in enumerate(tqdm(chosen, desc=f"render {style}", disable=not progress)):
        r = np.random.default_rng([seed, k, 7])
        bg, phrase = make_backdrop(BACKDROPS[k % len(BACKDROPS)], size, r)
        scale = float(r.uniform(0.55, 0.8))
        side = int(size * scale)
        art = render_svg(icon_svg(icons, icon), side)
        x, y = [int(v) for v in r.integers(0, size - side + 1, 2)]
        canvas = bg.convert("RGBA")
        canvas.alpha_composite(art, (x, y))
        canvas.convert("RGB").save(folder / f"{k:03d}.png")
        prep = "against" if BACKDROPS[k % len(BACKDROPS)] == "gradient" else "on"
        (folder / f"{k:03d}.txt").write_text(f"{s.trigger}, {with_article(obj.name)} {prep} {phrase}")
    (out / "SOURCE.json").write_text(json.dumps({"package": s.pin.spec, "integrity": s.pin.integrity,
                                                "objects": len(chosen), "matched": len(matched)}, indent=1))
    return out


CONFIG = Path(__file__).resolve().parent / "configs" / "styles" / "house-style.yaml"
SAMPLE_OBJECTS = ("a red apple on a white backdrop", "a teapot on a pale blue backdrop", "a soccer ball",
                  "a potted plant on a wooden table")


def lora_name(style: str) -> str:
    return f"style-{style}"


def style_config(style: str, dataset: Path, **overrides):
    """The LoRA training config of one style: the shared YAML with this style's fields."""
    import yaml

    from .lora import LoraTrainConfig
    s = STYLES[style]
    data = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    data.update(dataset=str(dataset), output_name=lora_name(style), trigger_word=s.trigger,
                sample_prompts=[f"{s.trigger}, {p}" for p in SAMPLE_OBJECTS], **overrides)
    return LoraTrainConfig.parse(data, where=str(CONFIG))


def train_style(style: str, settings=None, *, ship: bool = False, **overrides) -> dict:
    """Build the style's dataset, train its LoRA (registered in the user's loras folder) and, with ``ship``,
    copy it and a card into the package's shipped loras folder."""
    from ..core.settings import Settings
    from ..models.house import SHIPPED_DIR
    from .lora import LoraTrainer
    settings = settings or Settings.from_env()
    dataset = build_style_dataset(style, cache_dir=settings.home / "cache")
    summary = LoraTrainer(style_config(style, dataset, **overrides), settings).train()
    if ship:
        dest = SHIPPED_DIR / "loras"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(summary["lora"], dest / f"{lora_name(style)}.safetensors")
        s = STYLES[style]
        card = Path(summary["card"]).read_text(encoding="utf-8")
        card = card.replace(str(Path(summary["lora"]).parent), "src/imagesmith/house/loras")
        # the run folder's pictures do not ship: point at the checked-in comparison instead
        card = re.sub(r"\n## Loss\n.*?(?=\n## |\Z)", "\n", card, flags=re.S)
        card = re.sub(r"\n## Samples\n.*?(?=\n## |\Z)", "\n## Samples\n\nSee docs/reports/house-styles/report.md "
                      "(`imagesmith eval report examples/report/house-styles.yaml`).\n", card, flags=re.S)
        (dest / f"{lora_name(style)}.md").write_text(
            card + f"\n## Data\n\n{json.loads((dataset / 'SOURCE.json').read_text())['objects']} objects of npm "
            f"`{s.pin.spec}` ({s.licence}) rendered with resvg on house backdrops at 128 px, captioned "
            f"`{s.trigger}, <object> on <backdrop>`; rebuild with `imagesmith house styles`. The LoRA weights: "
            "Apache-2.0; the look they learnt is the icon set's, under its licence.\n", encoding="utf-8")
        summary["shipped"] = str(dest / f"{lora_name(style)}.safetensors")
    return summary
