"""Cut-out evaluation on inputs the model was not built on: the hard held-out composites and real photographs.

``imagesmith eval cutout`` reports, per source kind (:data:`imagesmith.train.cutout_data.KINDS`) and overall:

- **MAE** of the alpha against the true alpha;
- **IoU** of alpha > 0.5 against truth > 0.5;
- **boundary F** (:func:`boundary_f`): the F-measure of the matte's outline against the true outline, a
  boundary pixel counting as matched within a tolerance of 0.75% of the image diagonal (about 5 px at 512 px:
  the convention of the DAVIS benchmark's contour accuracy);
- the cut-out's own **confidence** (:func:`imagesmith.vision.cutout.matte_confidence`), with how often a low
  score caught a bad cut-out (IoU < 0.9) and how often it refused a good one.

Every matte comes through :func:`imagesmith.vision.cutout.scored_matte`, the path ads use. Every composite is
measured three times: alone, with the true product box given (the "this one" input, what a user drags), and with
a tap at the product's deepest inside point (what a user taps); the clutter cases' boxed figures are also shown
on their own.
The real photographs (``train/data/real_cutouts.json``, hand-made masks) are also run with their box and their
point. Nothing here uses the project's own models as a judge: the truth is the compositing alpha or a hand mask.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..vision.cutout import MIN_CONFIDENCE, scored_matte

BOUNDARY_TOLERANCE = 0.0075  # of the image diagonal


def _outline(mask: np.ndarray) -> np.ndarray:
    import cv2
    m = mask.astype(np.uint8)
    return (m - cv2.erode(m, np.ones((3, 3), np.uint8))).astype(bool)


def boundary_f(pred: np.ndarray, gt: np.ndarray, tolerance: float = BOUNDARY_TOLERANCE) -> float:
    """F-measure of the outline of ``pred > 0.5`` against the outline of ``gt > 0.5``, matched within
    ``tolerance`` x the image diagonal. Both empty counts as 1."""
    import cv2
    bp, bg = _outline(pred > 0.5), _outline(gt > 0.5)
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    tol = max(1.0, tolerance * float(np.hypot(*gt.shape)))
    d_to_gt = cv2.distanceTransform((~bg).astype(np.uint8), cv2.DIST_L2, 3)
    d_to_pred = cv2.distanceTransform((~bp).astype(np.uint8), cv2.DIST_L2, 3)
    precision = float((d_to_gt[bp] <= tol).mean())
    recall = float((d_to_pred[bg] <= tol).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def matte_metrics(scored: tuple[np.ndarray, float, dict], gt: np.ndarray) -> dict[str, float]:
    """MAE, IoU and boundary F of a :func:`~imagesmith.vision.cutout.scored_matte` result against the truth,
    with the matte's own confidence."""
    pred, conf, _ = scored
    p, g = pred > 0.5, gt > 0.5
    union = np.logical_or(p, g).sum()
    iou = float(np.logical_and(p, g).sum() / union) if union else 1.0
    return {"mae": float(np.abs(pred - gt).mean()), "iou": iou, "bf": boundary_f(pred, gt), "confidence": conf}


def deepest_point(alpha: np.ndarray) -> tuple[int, int]:
    """The inside point farthest from the matte's edge: where a user taps a product."""
    import cv2
    d = cv2.distanceTransform((alpha > 0.5).astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(x), int(y)


def summarise(rows: list[dict[str, float]], threshold: float = MIN_CONFIDENCE) -> dict[str, Any]:
    if not rows:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(rows)}
    for k in ("mae", "iou", "bf", "confidence"):
        out[k] = round(float(np.mean([r[k] for r in rows])), 4)
    out["max_mae"] = round(float(np.max([r["mae"] for r in rows])), 4)
    out["min_iou"] = round(float(np.min([r["iou"] for r in rows])), 4)
    bad = [r for r in rows if r["iou"] < 0.9]
    good = [r for r in rows if r["iou"] >= 0.9]
    out["bad"] = len(bad)
    out["bad_caught"] = sum(r["confidence"] < threshold for r in bad)
    out["good_refused"] = sum(r["confidence"] < threshold for r in good)
    return out


def evaluate_hard(segmenter, *, per_kind: int = 30, size: int = 512, seed: int = 0,
                  progress: Callable[[int, int], None] | None = None, cache_dir=None) -> dict[str, Any]:
    """The hard held-out composites: ``per_kind`` samples of every kind at ``size`` px."""
    from .cutout_data import KINDS, HardCutoutData
    data = HardCutoutData("eval", size=size, seed=seed, cache_dir=cache_dir)
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    boxed: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    tapped: list[dict[str, float]] = []
    n = per_kind * len(KINDS)
    t0 = time.perf_counter()
    for i in range(n):
        s = data.sample(i)
        img = Image.fromarray(s.image)
        rows[s.kind].append(matte_metrics(scored_matte(img, segmenter), s.alpha))
        boxed[s.kind].append(matte_metrics(scored_matte(img, segmenter, box=s.box), s.alpha))
        tapped.append(matte_metrics(scored_matte(img, segmenter, point=deepest_point(s.alpha)), s.alpha))
        if progress:
            progress(i + 1, n)
    per = {k: summarise(v) for k, v in rows.items()}
    every = [r for v in rows.values() for r in v]
    return {"size": size, "seed": seed, "per_kind": per, "overall": summarise(every),
            "clutter_with_box": summarise(boxed["clutter"]),
            "with_box": summarise([r for v in boxed.values() for r in v]), "with_tap": summarise(tapped),
            "worst_kind_mae": max(per.items(), key=lambda kv: kv[1].get("mae", 0))[0],
            "seconds_per_image": round((time.perf_counter() - t0) / max(1, 3 * n), 3)}


def evaluate_real(segmenter, *, cache_dir=None) -> dict[str, Any]:
    """The hand-annotated real photographs, plain, with their product box, and with their point. Photos whose
    Debian package is not in the cache (``imagesmith house data --cutout`` fetches it) are listed under
    ``missing``."""
    from .cutout_data import real_photos
    missing: list[str] = []
    out: dict[str, Any] = {"photos": [], "missing": missing}
    modes: dict[str, list[dict[str, float]]] = {"plain": [], "box": [], "point": []}
    for p in real_photos(cache_dir, missing=missing):
        row: dict[str, Any] = {"name": p["name"], "source": p["source"], "size": list(p["image"].size)}
        for mode, guide in (("plain", {}), ("box", {"box": p["box"]}), ("point", {"point": p["point"]})):
            try:
                m = matte_metrics(scored_matte(p["image"], segmenter, **guide), p["mask"])
            except Exception as exc:  # a refused point is a finding
                m = {"mae": 1.0, "iou": 0.0, "bf": 0.0, "confidence": 0.0, "error": str(exc)}
            row[mode] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}
            modes[mode].append(m)
        out["photos"].append(row)
    out.update({mode: summarise(v) for mode, v in modes.items()})
    return out


def format_table(report: dict[str, Any]) -> str:
    """Markdown tables of :func:`evaluate_hard` / :func:`evaluate_real` results (``report`` holds either or both
    under ``hard`` and ``real``)."""
    lines = []
    if "hard" in report:
        h = report["hard"]
        lines += [f"Hard held-out composites ({h['size']} px, seed {h['seed']}):", "",
                  "| kind | n | MAE | IoU | boundary F | min IoU | confidence | bad (IoU<0.9) caught / refused good |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, v in [*h["per_kind"].items(), ("**all**", h["overall"]), ("clutter + box", h["clutter_with_box"]),
                     ("all + box", h.get("with_box", {})), ("all + tap", h.get("with_tap", {}))]:
            if v.get("n"):
                lines.append(f"| {k} | {v['n']} | {v['mae']:.4f} | {v['iou']:.4f} | {v['bf']:.4f} | {v['min_iou']:.3f} "
                             f"| {v['confidence']:.2f} | {v['bad_caught']}/{v['bad']} / {v['good_refused']} |")
    if "real" in report:
        r = report["real"]
        lines += ["", "Real photographs (hand-made masks; MAE / IoU / boundary F / confidence):", "",
                  "| photo | plain | with box | with point |",
                  "|---|---|---|---|"]
        for p in r["photos"]:
            cells = [f"{p[m]['mae']:.4f} / {p[m]['iou']:.3f} / {p[m]['bf']:.3f} / {p[m]['confidence']:.2f}"
                     for m in ("plain", "box", "point")]
            lines.append(f"| {p['name']} | " + " | ".join(cells) + " |")
        for mode in ("plain", "box", "point"):
            if r.get(mode, {}).get("n"):
                m = r[mode]
                lines.append(f"| **mean, {mode}** | IoU {m['iou']:.3f}, min {m['min_iou']:.3f}; bad (IoU<0.9) caught "
                             f"{m['bad_caught']}/{m['bad']}, good refused {m['good_refused']} | | |")
        if r.get("missing"):
            lines += ["", f"Not in the cache (imagesmith house data --cutout fetches them): {', '.join(r['missing'])}"]
    return "\n".join(lines)
