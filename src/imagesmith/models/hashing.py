"""WebUI (A1111) model hashes, cached on disk so a multi-GB file is hashed once.

- "Model hash" in infotext: sha256 of the file, first 10 hex digits (`short_hash`)
- "Lora hashes": sha256 of the file, first 12 hex digits (`lora_short_hash`)
- a diffusers folder: sha256 over its weight files' bytes, in sorted relative-path order

The cache lives in <home>/cache/hashes.json, keyed by absolute path and checked against size and
mtime_ns, so an edited or replaced file is hashed again. Reading a file's bytes to hash it never
deserialises it (pickles included)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ..core.settings import Settings

CHUNK = 4 * 1024 * 1024
WEIGHT_SUFFIXES = (".safetensors",)


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, streamed, or of a diffusers folder's weight files."""
    path = Path(path)
    h = hashlib.sha256()
    for f in _files_to_hash(path):
        with open(f, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _files_to_hash(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        return files
    return [path]


def short_hash(path: str | Path) -> str:
    """A1111 'Model hash' (sha256, 10 hex digits). Uncached; see HashCache for the cached one."""
    return sha256_file(path)[:10]


def lora_short_hash(path: str | Path) -> str:
    """A1111 'Lora hashes' entry (sha256, 12 hex digits)."""
    return sha256_file(path)[:12]


def _signature(path: Path) -> dict:
    """What must be unchanged for a cached hash to hold: size and mtime_ns (summed over a folder's
    weight files, with their count)."""
    files = _files_to_hash(path)
    size = mtime = 0
    for f in files:
        st = f.stat()
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
    return {"size": size, "mtime_ns": mtime, "files": len(files)}


class HashCache:
    """sha256 of model files, remembered in <home>/cache/hashes.json."""

    def __init__(self, settings: Settings):
        self.path = settings.home / "cache" / "hashes.json"

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _store(self, key: str, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self._load()  # re-read: another process may have added entries meanwhile
        data[key] = record
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".hashes.", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def sha256(self, path: str | Path) -> str:
        path = Path(path).resolve()
        key = str(path)
        sig = _signature(path)
        record = self._load().get(key)
        if isinstance(record, dict) and all(record.get(k) == v for k, v in sig.items()) and record.get("sha256"):
            return str(record["sha256"])
        digest = sha256_file(path)
        try:
            self._store(key, {**sig, "sha256": digest})
        except OSError:  # a read-only home still gets hashes, just not remembered
            pass
        return digest

    def short_hash(self, path: str | Path) -> str:
        return self.sha256(path)[:10]

    def lora_short_hash(self, path: str | Path) -> str:
        return self.sha256(path)[:12]
