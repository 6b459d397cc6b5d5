"""GGUF model files (city96's FLUX and SD3.5 quantisations, ComfyUI-GGUF's layout): read their tensor table
without loading weights, and say what quantisation they hold.

A GGUF file is a header (key/value metadata, then one entry per tensor: name, shape, GGML type, offset)
followed by the tensor data; the ``gguf`` package (llama.cpp's own reader, MIT) parses it through a memory map,
so listing a 7 GB file reads only its header. Loading goes through diffusers' GGUF support
(``GGUFQuantizationConfig``): the linear layers keep their quantised blocks and dequantise on the fly, so a
Q4_K FLUX transformer holds about a quarter of the bf16 memory.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from typing import Any

from ..core.errors import UnsupportedModel

_PLAIN = {"F32", "F16", "BF16"}


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise UnsupportedModel("GGUF files need the gguf package (pip install gguf)") from None
    return gguf


def read_gguf_tables(path: str | Path) -> tuple[dict[str, list[int]], dict[str, str], dict[str, str]]:
    """(shapes, dtypes, metadata): names and shapes (torch order: outermost first) and GGML type names of a GGUF
    file's tensors, and its string metadata (probe.read_model_header wraps them as a SafetensorsHeader). A truncated or foreign file, or a quantisation type this gguf package does not know, raises
    ValueError naming the file and why."""
    gguf = _gguf()
    path = Path(path)
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path.name}: not a GGUF file (no GGUF magic)")
    try:
        reader = gguf.GGUFReader(str(path))
    except ValueError as e:  # an unknown GGML type is a ValueError of its enum; a short file, of numpy's reshape
        text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if "GGMLQuantizationType" in text or "GGUFValueType" in text:
            raise ValueError(f"{path.name}: unknown GGUF type ({text}); this gguf package reads "
                             f"{', '.join(t.name for t in gguf.GGMLQuantizationType)}") from None
        raise ValueError(f"{path.name}: truncated or damaged GGUF ({text})") from None
    except (IndexError, OSError, KeyError, AssertionError, OverflowError) as e:
        raise ValueError(f"{path.name}: truncated or damaged GGUF ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else 'its header points past the end'})") from None
    shapes, dtypes, metadata = {}, {}, {}
    for t in reader.tensors:
        shapes[t.name] = [int(d) for d in reversed(list(t.shape))]
        dtypes[t.name] = t.tensor_type.name
    for name, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.STRING and len(field.data) == 1:
            metadata[name] = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return shapes, dtypes, metadata


def quantisation(header: Any) -> str:
    """The quantisation most of the weights have ("Q4_K"), plus the others when mixed ("Q4_K + Q6_K")."""
    kinds = Counter(d for k, d in header.dtypes.items() if len(header.shapes.get(k, [])) >= 2)
    if not kinds:
        return "F32"
    quant = [k for k, _ in kinds.most_common() if k not in _PLAIN] or [kinds.most_common(1)[0][0]]
    return " + ".join(quant[:3])


def unsupported_types(header: Any) -> list[str]:
    """GGML types in the file that diffusers cannot dequantise."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES
    ok = {t.name for t in SUPPORTED_GGUF_QUANT_TYPES} | {"F32", "F16"}
    return sorted({d for d in header.dtypes.values() if d not in ok})
