"""Generation metadata in PNG text chunks, compatible with AUTOMATIC1111's WebUI.

Two chunks per image:

* ``parameters``: the A1111 "infotext" (prompt, ``Negative prompt: ...``, then one line of
  ``Key: value`` pairs). A1111's PNG Info tab, Civitai and most image browsers read it.
* ``imagesmith``: JSON with what is needed to redo the image exactly: the full request, this image's
  seed and variation seed, its index in the job, model name and short hash, LoRA hashes, VAE, mode and
  the imagesmith version (see `payload_for`).

A PNG is read header-only: Pillow reads the text chunks before the pixel data; text chunks after it
(some tools put them there) are found by walking the chunk list and seeking over the pixel data. Pixels
are never decoded, so reading the metadata of a huge image is cheap. JPEG/WebP files written by A1111 keep the infotext in EXIF UserComment; that is read too.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any

from PIL import Image

from .imageio import open_image_header
from .settings import Settings

PARAMETERS_KEY = "parameters"
IMAGESMITH_KEY = "imagesmith"

# A1111 modules/infotext_utils.py
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
_RE_KEY = re.compile(r"^\w[\w \-/]+$")

_NEGATIVE = "Negative prompt:"


def format_value(value: Any) -> str:
    """A parameter value as A1111 prints it: floats without a useless '.0' (CFG scale: 7), and quoted
    with JSON when it holds ',', ':', '"' or a newline (A1111 quotes on ',', ':' and newlines; quoting
    '"' too keeps such values intact through the parser, which A1111 reads the same way)."""
    if isinstance(value, bool):
        text = str(value)
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    else:
        text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def build_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """A1111's create_infotext layout::

        <prompt, may span lines>
        Negative prompt: <negative, may span lines>      (only when there is one)
        Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abcdef1234, ...

    Keys keep the order given; None values are left out; a value equal to its key is written alone
    (A1111 does that for flags). Keys must match A1111's key pattern (letters, digits, space, - and /)."""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        if not _RE_KEY.match(key):
            raise ValueError(f"infotext key {key!r} does not match A1111's pattern (letters, digits, ' ', '-', '/')")
        parts.append(key if key == value else f"{key}: {format_value(value)}")
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(parts)}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's parse_generation_parameters, without the defaults it adds for its own UI.

    Returns {"Prompt": ..., "Negative prompt": ..., key: value, ...} with every value a string as
    written (JSON-quoted values unquoted) and a "WxH" value split into "<key>-1" and "<key>-2"
    (Size: 512x768 gives Size-1 "512", Size-2 "768"). The last line holds the parameters only when at
    least 3 pairs are found on it, as in A1111; otherwise it belongs to the prompt.
    So parse_infotext(build_infotext(p, n, params)) == {"Prompt": p, "Negative prompt": n, **params as
    strings, Size split} for prompts whose lines have no leading/trailing spaces (A1111 strips them)."""
    res: dict[str, str] = {}
    prompt = ""
    negative = ""
    done_with_prompt = False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            done_with_prompt = True
            line = line[len(_NEGATIVE):].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative
    for key, value in RE_PARAM.findall(lastline):
        if value[:1] == '"' and value[-1:] == '"':
            value = _unquote(value)
        m = RE_IMAGESIZE.match(value)
        if m is not None:
            res[f"{key}-1"] = m.group(1)
            res[f"{key}-2"] = m.group(2)
        else:
            res[key] = value
    return res


def make_png_chunks(infotext: str, payload: dict[str, Any]) -> dict[str, str]:
    """The text chunks of one image: 'parameters' (A1111 infotext) and 'imagesmith' (JSON payload)."""
    return {PARAMETERS_KEY: infotext,
            IMAGESMITH_KEY: json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str)}


def payload_for(result: Any, record: Any) -> dict[str, Any]:
    """The 'imagesmith' JSON of one image of a GenerationResult (record: its ImageRecord)."""
    payload = {
        "request": result.request.model_dump(mode="json"),
        "seed": record.seed,
        "variation_seed": record.variation_seed,
        "index": record.index,
        "model": result.model_name,
        "model_hash": result.model_hash,
        "lora_hashes": dict(result.lora_hashes),
        "vae": result.vae_name,
        "mode": result.request.mode,
        "version": result.version,
    }
    if getattr(record, "detailer", None) is not None:
        payload["detailer"] = record.detailer
    return payload


def write_metadata_chunks(result: Any, record: Any) -> dict[str, str]:
    """Both chunks of one image of a GenerationResult, ready for save_png_atomic(text_chunks=...)."""
    return make_png_chunks(record.infotext, payload_for(result, record))


# ---------------------------------------------------------------------------------------------- reading

_USER_COMMENT = 0x9286
_EXIF_IFD = 0x8769


def _decode_user_comment(raw: Any) -> str | None:
    """EXIF UserComment as A1111 writes it (piexif: b'UNICODE\\0' + UTF-16, or ASCII)."""
    if isinstance(raw, str):
        return raw.strip("\x00") or None
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\x00":
        # byte order is not recorded: for mostly-ASCII text the zero bytes tell it
        even_zeros = body[0::2].count(0)
        odd_zeros = body[1::2].count(0)
        codec = "utf-16-be" if even_zeros >= odd_zeros else "utf-16-le"
        text = body.decode(codec, errors="replace")
    elif prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        text = body.decode("utf-8", errors="replace")
    else:
        return None
    return text.strip("\x00") or None


def _from_info(info: dict[str, Any], exif: Any) -> tuple[str | None, str | None]:
    params = info.get(PARAMETERS_KEY)
    own = info.get(IMAGESMITH_KEY)
    if not isinstance(params, str):
        params = None
    if not isinstance(own, str):
        own = None
    if params is None and exif is not None:
        try:
            params = _decode_user_comment(exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT))
        except Exception:  # a broken EXIF block is "no metadata", not an error
            params = None
    return params, own


def _result(params: str | None, own: str | None) -> dict[str, Any]:
    payload: dict[str, Any] | None = None
    if own:
        try:
            loaded = json.loads(own)
            payload = loaded if isinstance(loaded, dict) else None
        except ValueError:
            payload = None
    return {PARAMETERS_KEY: params, IMAGESMITH_KEY: payload,
            "parsed": parse_infotext(params) if params else {}}


def read_png_metadata(path_or_image: str | os.PathLike[str] | bytes | Image.Image, *,
                      settings: Settings | None = None) -> dict[str, Any]:
    """{'parameters': infotext or None, 'imagesmith': payload dict or None, 'parsed': parse_infotext of
    the infotext ({} without one)}. An image without metadata gives Nones, not an error; a file that is
    not an allowed image raises BadImage (load_image's checks). Pixels are not decoded."""
    if isinstance(path_or_image, Image.Image):
        im = path_or_image
        info = dict(im.info)
        if PARAMETERS_KEY not in info and IMAGESMITH_KEY not in info:
            info.update(getattr(im, "text", None) or {})
        try:
            exif = im.getexif()
        except Exception:
            exif = None
        return _result(*_from_info(info, exif))

    settings = settings if settings is not None else Settings()
    with open_image_header(path_or_image, settings=settings, what="image") as im:
        info = dict(im.info)
        try:
            exif = im.getexif()
        except Exception:
            exif = None
        params, own = _from_info(info, exif)
        is_png = im.format == "PNG"
    if (params is None or own is None) and is_png:
        late = _late_png_text(path_or_image, (PARAMETERS_KEY, IMAGESMITH_KEY))
        params = params if params is not None else late.get(PARAMETERS_KEY)
        own = own if own is not None else late.get(IMAGESMITH_KEY)
    return _result(params, own)


_MAX_TEXT = 8 * 1024 * 1024  # bytes of one text chunk, before and after decompression


def _inflate(data: bytes) -> bytes | None:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, _MAX_TEXT)
    except zlib.error:
        return None
    return None if d.unconsumed_tail else out


def _late_png_text(source: str | os.PathLike[str] | bytes, keys: tuple[str, ...]) -> dict[str, str]:
    """tEXt/zTXt/iTXt chunks with the given keys that come after the first IDAT chunk (Pillow's header
    read stops at IDAT). Walks the chunk list and seeks over pixel data: nothing is decoded. Broken files
    give what was found so far."""
    found: dict[str, str] = {}
    wanted = {k.encode("latin-1") for k in keys}
    fp = io.BytesIO(source) if isinstance(source, bytes) else open(Path(source).expanduser(), "rb")  # noqa: SIM115
    with fp:
        if fp.read(8) != b"\x89PNG\r\n\x1a\n":
            return found
        seen_idat = False
        while True:
            head = fp.read(8)
            if len(head) < 8:
                break
            length, ctype = struct.unpack(">I4s", head)
            if ctype == b"IEND":
                break
            if ctype == b"IDAT":
                seen_idat = True
            if not (seen_idat and ctype in (b"tEXt", b"zTXt", b"iTXt")) or length > _MAX_TEXT:
                fp.seek(length + 4, io.SEEK_CUR)
                continue
            data = fp.read(length)
            fp.seek(4, io.SEEK_CUR)  # CRC
            if len(data) < length:
                break
            key, _, rest = data.partition(b"\0")
            if key not in wanted:
                continue
            text: bytes | None
            if ctype == b"tEXt":
                value = rest.decode("latin-1")
            elif ctype == b"zTXt":
                text = _inflate(rest[1:])
                if text is None:
                    continue
                value = text.decode("latin-1")
            else:  # iTXt: flag, method, language\0, translated keyword\0, UTF-8 text
                if len(rest) < 2:
                    continue
                flag, body = rest[0], rest[2:]
                body = body.split(b"\0", 2)[-1] if body.count(b"\0") >= 2 else b""
                text = _inflate(body) if flag else body
                if text is None:
                    continue
                value = text.decode("utf-8", errors="replace")
            found.setdefault(key.decode("latin-1"), value)
    return found
