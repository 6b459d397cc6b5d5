"""Sample sheets and held-out metrics for the house text-to-image model, run through the real engine.

- :func:`render_sheet` draws labelled grids (the sheet in docs/ is made by ``imagesmith house sheet``):
  24+ common objects, wording outside the captions, backdrops, colours, and one prompt over several seeds.
- :func:`evaluate_ldm` generates images for held-out captions (the house dataset's ``val_views``: training
  objects in backdrop/colour combinations never seen in training) and scores them with house-clip (own
  caption preferred over a shuffled one, zero-shot object top-5) and house-cutout (does the named colour show
  on the object?), next to the same numbers for the real held-out renders as a ceiling.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..core.requests import GenerateRequest
from ..eval.grid import labelled_grid, stack_vertically

# 32 common objects, all named as the captions name them (``house_data.natural_name``)
SHEET_OBJECTS: tuple[str, ...] = (
    "a red apple", "a teapot", "a soccer ball", "a lipstick", "an umbrella", "a violin", "a hamburger",
    "a potted plant", "a pineapple", "a cupcake", "a pizza", "a guitar", "a camera", "a rocket", "a teddy bear",
    "a watermelon", "a strawberry", "a cactus", "a sunflower", "an alarm clock", "a backpack",
    "a high-heeled shoe", "a trophy", "a birthday cake", "a lemon", "a doughnut", "a light bulb", "a balloon",
    "a saxophone", "a laptop", "a pair of sunglasses", "a bicycle",
)
# wording the captions never use: the nearest concept should come out
SHEET_OUTSIDE: tuple[str, ...] = (
    "a cup of espresso", "a sneaker", "a handbag", "a puppy", "a sports car", "a bouquet of roses",
    "a juicy cheeseburger", "a ripe banana",
)
SHEET_BACKDROPS: tuple[str, ...] = (
    "a teapot on a wooden table", "a teapot on a marble surface", "a teapot on a pale blue backdrop",
    "a teapot against a red brick wall", "a teapot on a black backdrop", "a teapot against an orange gradient",
    "a teapot on linen", "a teapot on terrazzo",
)
SHEET_COLOURS: tuple[str, ...] = (
    "a blue apple", "a green apple", "a purple umbrella", "a yellow umbrella", "a pink teapot",
    "a blue sneaker", "a red car", "a green balloon",
)
SHEET_SEED_PROMPT = "a cupcake"  # nothing said of backdrop or placement: seeds should vary them


class SheetSettings:
    """What every sheet image uses (also written under the sheet and into the model card)."""

    def __init__(self, steps: int = 20, cfg_scale: float = 5.0, sampler: str = "DPM++ 2M", scheduler: str = "karras",
                 size: int = 128, seed: int = 1):
        self.steps, self.cfg_scale, self.sampler, self.scheduler = steps, cfg_scale, sampler, scheduler
        self.size, self.seed = size, seed

    def request(self, prompt: str, seed: int | None = None, model: str | None = None,
                ground: bool = True) -> GenerateRequest:
        return GenerateRequest(prompt=prompt, model=model, steps=self.steps, cfg_scale=self.cfg_scale,
                               sampler_name=self.sampler, scheduler=self.scheduler, width=self.size,
                               height=self.size, seed=self.seed if seed is None else seed, ground_concepts=ground)

    def describe(self) -> str:
        return (f"{self.size}x{self.size}, {self.steps} steps {self.sampler} {self.scheduler}, "
                f"CFG {self.cfg_scale:g}, seed {self.seed}")


def generate_one(engine, settings: SheetSettings, prompt: str, seed: int | None = None,
                 model: str | None = None, ground: bool = True) -> tuple[Image.Image, str | None]:
    """One image, and the concept grounding drew instead of the prompt's subject (None: drawn as written)."""
    from ..core.metadata import parse_infotext
    result = engine.generate(settings.request(prompt, seed, model, ground))
    return result.images[0], parse_infotext(result.records[0].infotext).get("Concept")


def render_sheet(engine, path: str | Path, *, settings: SheetSettings | None = None, model: str | None = None,
                 columns: int = 8, progress: bool = True) -> Path:
    """The house-ldm sample sheet: five labelled sections, every image through ``engine.generate``."""
    st = settings or SheetSettings()
    sections: list[tuple[str, list[tuple[str, int | None]]]] = [
        ("Common objects", [(p, None) for p in SHEET_OBJECTS]),
        ("Wording outside the captions", [(p, None) for p in SHEET_OUTSIDE]),
        ("Backdrop named in the prompt", [(p, None) for p in SHEET_BACKDROPS]),
        ("Colour named in the prompt", [(p, None) for p in SHEET_COLOURS]),
        (f"Seeds 1-8: {SHEET_SEED_PROMPT}", [(SHEET_SEED_PROMPT, s) for s in range(1, 9)]),
    ]
    total = sum(len(items) for _, items in sections)
    bar = tqdm(total=total, desc="sample sheet", unit="image", disable=not progress)
    parts = []
    for title, items in sections:
        cells = []
        for prompt, seed in items:
            image, concept = generate_one(engine, st, prompt, seed, model)
            label = prompt if seed is None else f"seed {seed}"
            if concept:  # "a cup of espresso -> cup of coffee"
                label += f" -> {concept.split(' -> ')[-1]}"
            cells.append((image, label))
            bar.update(1)
        parts.append(labelled_grid(cells, columns, title=title))
    bar.close()
    foot = Image.new("RGB", (parts[0].size[0], 22), "white")
    ImageDraw.Draw(foot).text((6, 4), f"house-ldm, {st.describe()} (imagesmith house sheet)", fill=(60, 60, 60),
                              font=ImageFont.load_default(size=11))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    stack_vertically(parts + [foot]).save(out)
    return out


# ------------------------------------------------------------------------------------------ metrics
def image_stats(im: Image.Image) -> dict[str, float]:
    """Per-image pixel std (0..1 scale) and the share of the picture that differs from its border colour
    (a uniform blob or an empty backdrop has almost none)."""
    a = np.asarray(im.convert("RGB"), np.float32) / 255.0
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    ref = np.median(border, axis=0)
    differs = np.abs(a - ref).max(axis=-1) > 0.12
    return {"std": float(a.std()), "foreground": float(differs.mean())}


def colour_share(im: Image.Image, alpha: np.ndarray, colour: str) -> float:
    """Share of the object's pixels (alpha > 0.5) whose hue falls in the named colour's range."""
    from .house_data import _colour, _hsv
    a = np.asarray(im.convert("RGB"), np.float32) / 255.0
    sel = alpha > 0.5
    if sel.sum() < 16:
        return 0.0
    hsv = _hsv(a[sel])
    return float(_colour(colour).matches(hsv).mean())


@torch.no_grad()
def vae_psnr(vae, split: str, *, n: int = 64, size: int = 128, seed: int = 7) -> float:
    """Mean PSNR (dB) of ``vae`` reconstructing ``n`` held-out samples of ``split`` (``encode().mode()`` then
    decode, fp32 on the CPU): the ceiling on any picture the UNet on top of it can draw."""
    from .house_data import HouseSampleDataset, load_house_dataset
    ds = HouseSampleDataset(load_house_dataset(), split, size=size, seed=seed, epoch_length=n)
    images = torch.stack([ds[i]["image"] for i in range(n)]).float()
    ref = next(vae.parameters())
    vae32 = vae if ref.dtype == torch.float32 and ref.device.type == "cpu" else copy.deepcopy(vae).float().cpu()
    psnr = []
    for chunk in images.split(16):
        rec = vae32.decode(vae32.encode(chunk).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - chunk) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnr.append(10 * torch.log10(1 / mse))
    return float(torch.cat(psnr).mean())


def sheet_metrics(engine, clip, *, settings: SheetSettings | None = None, model: str | None = None,
                  prompts: tuple[str, ...] = SHEET_OBJECTS, seeds: tuple[int, ...] = (1, 2, 3, 4),
                  progress: bool = True) -> dict[str, Any]:
    """What the sample sheet's first section shows, measured: the bare prompts people type ("a teapot": no
    backdrop, no placement) over several seeds.

    - ``object_top5``: share of images whose object is in house-clip's zero-shot top 5 over the names of
      every training object (house-clip's ``labels.json``; the prompt without its article is the label);
    - ``seed_rms``: mean pairwise RMS pixel difference (0..1) between the seeds of one prompt;
    - ``seed_embed``: mean pairwise 1 - cosine of their house-clip image embeddings (0: the same picture).
    Different seeds should differ: nothing in a bare prompt fixes the backdrop or the placement."""
    import json

    from ..models.house_clip import default_house_clip_dir
    st = settings or SheetSettings()
    labels = json.loads((default_house_clip_dir() / "labels.json").read_text())  # the training objects' names
    wanted = [p.split(" ", 1)[1] if p.split(" ", 1)[0] in ("a", "an") else p for p in prompts]
    wanted = [w.removeprefix("pair of ") if w not in labels else w for w in wanted]  # "a pair of sunglasses"
    keep = [(p, w) for p, w in zip(prompts, wanted) if w in labels]
    hits, rms, emb = [], [], []
    bar = tqdm(total=len(keep) * len(seeds), desc="sheet metrics", unit="image", disable=not progress)
    for prompt, label in keep:
        images = []
        for seed in seeds:
            images.append(generate_one(engine, st, prompt, seed=seed, model=model, ground=False)[0])
            bar.update(1)
        feats = clip.encode_images(images)
        hits += [label in [lab for lab, _ in top] for top in clip.classify_many(images, labels, top_k=5)]
        px = [np.asarray(im.convert("RGB"), np.float32) / 255.0 for im in images]
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                rms.append(float(np.sqrt(((px[i] - px[j]) ** 2).mean())))
                emb.append(float(1.0 - feats[i] @ feats[j]))
    bar.close()
    return {"prompts": len(keep), "seeds": list(seeds), "settings": st.describe(),
            "object_top5": float(np.mean(hits)), "seed_rms": float(np.mean(rms)), "seed_embed": float(np.mean(emb))}


def evaluate_ldm(engine, clip, *, cutout=None, n: int = 64, settings: SheetSettings | None = None,
                 model: str | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Held-out metrics of the text-to-image model (see the module docstring). ``clip`` is a house-clip
    model (``score``, ``classify``); ``cutout`` a segmenter (``predict``) or None to skip colour adherence."""
    from .house_data import HouseSampleDataset, load_house_dataset
    st = settings or SheetSettings()
    index = load_house_dataset()
    views = HouseSampleDataset(index, "val_views", size=st.size, seed=seed)
    labels = sorted({o.name for o in index.objects_in("train")})
    items = [views[i] for i in range(n)]
    captions = [it["caption"] for it in items]
    real = [views.sample(i).image for i in range(n)]
    gen = []
    for i, cap in enumerate(tqdm(captions, desc="house-ldm eval", unit="image", disable=not progress)):
        gen.append(generate_one(engine, st, cap, seed=seed + i, model=model, ground=False)[0])  # the model as is

    def clip_metrics(images: list[Image.Image]) -> dict[str, float]:
        sims = clip.score(images, captions)  # [n images, n captions]
        sims = np.asarray(sims.detach().cpu().float() if hasattr(sims, "detach") else sims, np.float32)
        own = np.diag(sims)
        shuffled = sims[np.arange(n), (np.arange(n) + n // 2) % n]  # each image vs another image's caption
        rank = (sims > own[:, None]).sum(axis=1)
        top5 = [it["object"] in [lab for lab, _ in top]
                for it, top in zip(items, clip.classify_many(images, labels, top_k=5))]
        return {"clip_score": float(own.mean()), "own_over_shuffled": float((own > shuffled).mean()),
                "caption_r1": float((rank == 0).mean()), "caption_r5": float((rank < 5).mean()),
                "object_top5": float(np.mean(top5))}

    stats = [image_stats(im) for im in gen]
    out: dict[str, Any] = {
        "n": n, "split": "val_views", "settings": st.describe(),
        "generated": {**clip_metrics(gen), "std_mean": float(np.mean([s["std"] for s in stats])),
                      "std_min": float(np.min([s["std"] for s in stats])),
                      "foreground_mean": float(np.mean([s["foreground"] for s in stats]))},
        "real_heldout": clip_metrics(real),
    }
    entry = engine.registry.get(model, "checkpoint") if model else engine.registry.default_checkpoint()
    vae = getattr(engine._pipeline_entry(entry).value, "vae", None)
    if vae is not None:
        out["vae_psnr_db"] = {split: vae_psnr(vae, split, size=st.size) for split in ("val_views", "val_objects")}
    if cutout is not None:
        named = [(im, it["colour"]) for im, it in zip(gen, items) if it["colour"]]
        if named:
            shares = [colour_share(im, cutout.predict(im), c) for im, c in named]
            out["generated"]["named_colour_share"] = float(np.mean(shares))
            out["generated"]["named_colour_shows"] = float(np.mean([s > 0.3 for s in shares]))
            out["generated"]["named_colour_n"] = len(named)
    return out


def object_recognition(engine, clip, *, settings: SheetSettings | None = None, model: str | None = None,
                       names: list[str] | None = None, seeds: tuple[int, ...] = (1,),
                       progress: bool = True) -> dict[str, Any]:
    """How well the model draws each training object from its bare name ("a teapot"): for every object, the
    rank of its own name in house-clip's zero-shot ranking over all object names (0 = first), per seed.

    The report is what :func:`hard_object_weights` turns into a training curriculum (objects the model draws
    badly are visited more often in the next fine-tune); ``names`` defaults to every training object."""
    import json

    from ..models.house_clip import default_house_clip_dir
    from .house_data import with_article
    st = settings or SheetSettings()
    labels = json.loads((default_house_clip_dir() / "labels.json").read_text())
    names = sorted(set(names if names is not None else labels))
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise ValueError(f"not training objects of house-clip: {', '.join(unknown[:5])}")
    images = []
    bar = tqdm(total=len(names) * len(seeds), desc="objects", unit="image", disable=not progress)
    for name in names:
        for seed in seeds:
            images.append(generate_one(engine, st, with_article(name), seed=seed, model=model, ground=False)[0])
            bar.update(1)
    bar.close()
    ranked = iter(clip.classify_many(images, labels, top_k=len(labels)))  # the label prompts encoded once
    ranks = {name: [[lab for lab, _ in next(ranked)].index(name) for _ in seeds] for name in names}
    flat = [r for rs in ranks.values() for r in rs]
    return {"settings": st.describe(), "seeds": list(seeds), "objects": len(names),
            "top1": float(np.mean([r == 0 for r in flat])), "top5": float(np.mean([r < 5 for r in flat])),
            "ranks": ranks}


def hard_object_weights(report: dict[str, Any], *, missed: int = 3, weak: int = 2) -> dict[str, int]:
    """Integer visit weights from an :func:`object_recognition` report: an object whose name misses
    house-clip's top 5 on average gets ``missed`` visits per round, one outside the top 1 gets ``weak``,
    the rest 1 (what ``HouseSampleDataset(object_weights=...)`` and the ``object_weights`` training key take)."""
    out = {}
    for name, rs in report["ranks"].items():
        miss = float(np.mean([r >= 5 for r in rs]))
        first = float(np.mean([r == 0 for r in rs]))
        out[name] = missed if miss >= 0.5 else weak if first < 0.5 else 1
    return out
