"""Image files in and out, hardened.

Input (`load_image`) trusts nothing about a file:

* the byte size is checked against ``settings.max_image_bytes`` before anything is read (``stat`` for a
  path, ``len`` for bytes);
* only six decoders may run (PNG, JPEG, WebP, BMP, TIFF, GIF): Pillow's other plugins (EPS, which calls
  Ghostscript, PSD, ICO, ...) are never tried;
* ``width * height`` is checked against ``settings.max_input_pixels`` from the header, before a single
  pixel is decoded. Pillow's own guard only *warns* between 89 and 179 megapixels (a 602 KB PNG of
  14000x14000 costs 814 MB RSS), so its DecompressionBombWarning is turned into an error here, locally,
  with ``warnings.catch_warnings`` (``Image.MAX_IMAGE_PIXELS`` is never touched);
* truncated or corrupt data fails the ``load()`` (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off);
* the EXIF orientation is applied, then the mode is converted.

Every failure is a :class:`~imagesmith.core.errors.BadImage` with one line naming the file.

Output (`save_png_atomic`) writes a temporary file in the target folder and renames it over the target,
so a reader never sees a partial PNG, even when the writer dies half way.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .errors import BadImage, BadRequest
from .settings import Settings

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
_FORMAT_NAMES = "PNG, JPEG, WebP, BMP, TIFF, GIF"

ImageMode = Literal["RGB", "RGBA", "L"]
ImageSource = str | os.PathLike[str] | bytes

# (magic bytes at offset 0, name): only used to word the error for a file Pillow was not allowed to open
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"qoif", "QOI"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"DDS ", "DDS"),
    (b"icns", "ICNS"),
    (b"P1", "PNM"), (b"P2", "PNM"), (b"P3", "PNM"), (b"P4", "PNM"), (b"P5", "PNM"), (b"P6", "PNM"),
)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""Image files a folder of images (a dataset, a batch) is read from."""


def _sniff(head: bytes) -> str | None:
    """The format a file's first bytes announce, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand[:3] in (b"hei", b"hev", b"mif") or brand == b"msf1":
            return "HEIF"
        return "MP4/QuickTime"
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    return None


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB" if n >= 1024 * 1024 else f"{n} bytes"


def _label(source: ImageSource, what: str) -> str:
    return f"{what} ({len(source)} bytes of data)" if isinstance(source, bytes) else f"{what} {os.fspath(source)}"


def _head_format(fp: IO[bytes]) -> str | None:
    try:
        fp.seek(0)
        return _sniff(fp.read(16))
    except (OSError, ValueError):
        return None


def _pixel_message(label: str, w: int, h: int, limit: int, what_limit: str) -> str:
    return f"{label} is {w}x{h} = {w * h:,} pixels; the cap is {limit:,} pixels ({what_limit})"


def _bomb_message(fp: IO[bytes], label: str, settings: Settings, exc: Exception) -> str:
    """Pillow refused the header: say WxH, read again from the header with the warning silenced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            fp.seek(0)
            w, h = Image.open(fp, formats=list(ALLOWED_FORMATS)).size
    except Exception:  # over twice Pillow's limit it raises again: its own message says the pixel count
        return f"{label} has too many pixels to decode safely ({exc})"
    if w * h > settings.max_input_pixels:
        return _pixel_message(label, w, h, settings.max_input_pixels, "IMAGESMITH_MAX_INPUT_PIXELS")
    return _pixel_message(label, w, h, Image.MAX_IMAGE_PIXELS or 0, "Pillow's decompression-bomb limit")


@contextmanager
def _open_checked(source: ImageSource, settings: Settings, what: str, *,
                  check_pixels: bool) -> Iterator[tuple[Image.Image, str]]:
    """Open an image header-only after the byte-size check; with `check_pixels`, refuse more pixels than
    the cap (Pillow's DecompressionBombWarning is an error too). Yields (image, label); the file is
    closed on exit, so decode inside the block."""
    label = _label(source, what)
    cap = settings.max_image_bytes
    fp: IO[bytes]
    if isinstance(source, bytes):
        if len(source) > cap:
            raise BadImage(f"{label} is {_mb(len(source))}; the cap is {_mb(cap)} (IMAGESMITH_MAX_IMAGE_BYTES)")
        fp = io.BytesIO(source)
    else:
        path = Path(source).expanduser()
        try:
            st = path.stat()
        except FileNotFoundError:
            raise BadImage(f"{label}: file not found") from None
        except OSError as exc:
            raise BadImage(f"{label}: cannot read it ({exc.strerror or exc})") from None
        if path.is_dir():
            raise BadImage(f"{label} is a folder, not an image file")
        if not path.is_file():
            raise BadImage(f"{label} is not a regular file")
        if st.st_size > cap:
            raise BadImage(f"{label} is {_mb(st.st_size)}; the cap is {_mb(cap)} (IMAGESMITH_MAX_IMAGE_BYTES)")
        if st.st_size == 0:
            raise BadImage(f"{label} is empty (0 bytes), not an image")
        try:
            fp = open(path, "rb")  # noqa: SIM115 - closed in the finally below
        except OSError as exc:
            raise BadImage(f"{label}: cannot read it ({exc.strerror or exc})") from None
    try:
        with warnings.catch_warnings():
            if check_pixels:
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            else:  # header/metadata only: nothing gets decoded, a big image is harmless
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(fp, formats=list(ALLOWED_FORMATS))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise BadImage(_bomb_message(fp, label, settings, exc)) from None
            except UnidentifiedImageError:
                kind = _head_format(fp)
                if kind in ALLOWED_FORMATS:
                    raise BadImage(f"{label} is a truncated or corrupt {kind} file") from None
                if kind is not None:
                    raise BadImage(f"{label} is in {kind} format, which is not accepted; supported formats: "
                                   f"{_FORMAT_NAMES}") from None
                raise BadImage(f"{label} is not an image (or not a supported format: {_FORMAT_NAMES})") from None
            except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
                kind = _head_format(fp) or "image"
                raise BadImage(f"{label} is a truncated or corrupt {kind} file ({exc})") from None
            if check_pixels:
                w, h = im.size
                limit = settings.max_input_pixels
                if w * h > limit:
                    raise BadImage(_pixel_message(label, w, h, limit, "IMAGESMITH_MAX_INPUT_PIXELS"))
            yield im, label
    finally:
        fp.close()


def _normalize_mode(im: Image.Image) -> Image.Image:
    """Palette, 1-bit, 16/32-bit, CMYK... become L, LA, RGB or RGBA (8 bits per channel)."""
    mode = im.mode
    if mode in ("RGB", "RGBA", "L", "LA"):
        return im
    if mode.startswith("I") or mode == "F":  # 16-bit PNG/TIFF grey: scale to 8 bits instead of clipping
        arr = np.asarray(im)
        if mode == "F":
            arr8 = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255)
        elif mode.startswith("I;16") or arr.max(initial=0) > 255:  # "I": 16-bit data in 32-bit ints
            arr8 = np.clip(arr.astype(np.float64) / 257.0, 0, 255)
        else:
            arr8 = np.clip(arr, 0, 255)
        return Image.fromarray(np.round(arr8).astype(np.uint8), "L")
    if mode == "1":
        return im.convert("L")
    if mode == "La":
        return im.convert("LA")
    if mode in ("PA", "RGBa") or (mode == "P" and "transparency" in im.info):
        return im.convert("RGBA")
    return im.convert("RGB")


def load_image(source: ImageSource, *, settings: Settings, mode: ImageMode | None = "RGB",
               what: str = "image") -> Image.Image:
    """Read an image safely (see the module docstring) and return it fully decoded, detached from the file.

    `source`: a path or the file's bytes. `mode`: "RGB", "RGBA", "L", or None to keep the file's own
    channels (normalised to one of L, LA, RGB, RGBA). `what` names the input in errors, e.g. "mask".
    Multi-frame files (GIF, TIFF, animated WebP) give their first frame. Raises BadImage."""
    if mode not in ("RGB", "RGBA", "L", None):
        raise ValueError(f"mode must be 'RGB', 'RGBA', 'L' or None, not {mode!r}")
    with _open_checked(source, settings, what, check_pixels=True) as (im, label):
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise BadImage(f"{label} has too many pixels to decode safely ({exc})") from None
            except MemoryError:
                raise BadImage(f"{label} needs more memory to decode than is available") from None
            except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
                detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise BadImage(f"{label} is truncated or corrupt ({detail})") from None
        try:
            out = ImageOps.exif_transpose(im)  # always a new image, detached from the file
        except Exception:  # a broken EXIF block must not lose the picture: keep it unrotated
            out = im.copy()
    out = _normalize_mode(out)
    if mode is not None and out.mode != mode:
        out = out.convert(mode)
    return out


@contextmanager
def open_image_header(source: ImageSource, *, settings: Settings, what: str = "image",
                      check_pixels: bool = False) -> Iterator[Image.Image]:
    """The image opened header-only (size, format, mode, info, the text chunks before the pixel data),
    with load_image's byte-size and format checks; the pixel cap only with `check_pixels` (nothing is
    decoded unless the caller calls .load()). The file is closed when the block ends. Raises BadImage."""
    with _open_checked(source, settings, what, check_pixels=check_pixels) as (im, _label):
        yield im


# ---------------------------------------------------------------------------------------------- output

_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


def _pnginfo(text_chunks: dict[str, str]) -> PngInfo:
    info = PngInfo()
    for key, value in text_chunks.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 79:
            raise ValueError(f"PNG text key must be 1-79 characters: {key!r}")
        try:
            key.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"PNG text key must be latin-1: {key!r}") from None
        value = str(value)
        try:
            value.encode("latin-1")
            info.add_text(key, value)  # tEXt: what A1111 writes and every reader understands
        except UnicodeEncodeError:
            info.add_itxt(key, value)  # iTXt: UTF-8 text (CJK prompts, emoji)
    return info


def save_png_atomic(image: Image.Image, path: str | os.PathLike[str], *,
                    text_chunks: dict[str, str] | None = None) -> Path:
    """Write `image` as a PNG at `path` with the given text chunks (tEXt, or iTXt for text beyond
    latin-1), atomically: the bytes go to a hidden temporary file in the same folder, are fsynced, then
    renamed over `path`. On any failure the temporary file is removed and `path` is untouched (absent,
    or its previous content). Creates the folder. Returns the path. An OS error (permission, disk full)
    becomes BadRequest with one line."""
    path = Path(path).expanduser()
    pnginfo = _pnginfo(dict(text_chunks or {}))
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        # 0o666 minus the umask, like any new file (mkstemp would make it 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as fp:
            image.save(fp, format="PNG", pnginfo=pnginfo)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise BadRequest(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            try:
                tmp.unlink()
            except OSError:
                pass
    try:  # make the rename itself durable; best effort (not possible on every platform)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


_NUMBERED = re.compile(r"^(\d{5,})-")
_OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic")


def write_json_atomic(path: str | os.PathLike[str], data) -> None:
    """Write JSON through a temporary file in the same folder, renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fp:
            json.dump(data, fp, indent=2, ensure_ascii=False, default=str)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise BadRequest(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink(missing_ok=True)


def output_paths(output: str | os.PathLike[str] | None, count: int, default_dir: str | os.PathLike[str],
                 stem: str = "image", *, seeds: Sequence[int] | None = None) -> list[Path]:
    """Where `count` images go. Nothing is created or written here.

    * `output` ends in ``.png`` (any case) and is not an existing folder: that file for one image; for
      several, numbered siblings ``NAME-00000.png``, ``NAME-00001.png``, ... next to it.
    * `output` is a folder (existing, or a name without an image suffix), or None (then `default_dir`):
      WebUI-style numbered files ``00000-<seed>.png`` (``00000-<stem>.png`` without seeds), numbering
      after the highest ``NNNNN-*`` file already in the folder, so earlier outputs are never overwritten.
      (Two processes writing one folder at the same instant may pick the same number.)
    * another image suffix (.jpg, .webp, ...): BadRequest, images are written as PNG.
    """
    if count <= 0:
        return []
    if seeds is not None and len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} images")
    if output is not None:
        out = Path(output).expanduser()
        text = os.fspath(output)
        is_dir_like = out.is_dir() or text.endswith(("/", os.sep))
        suffix = out.suffix.lower()
        if not is_dir_like and suffix == ".png":
            if count == 1:
                return [out]
            return [out.with_name(f"{out.stem}-{i:05d}.png") for i in range(count)]
        if not is_dir_like and suffix in _OTHER_IMAGE_SUFFIXES:
            raise BadRequest(f"output {text}: images are written as PNG; use a .png name or a folder")
        folder = out
    else:
        folder = Path(default_dir).expanduser()
    start = 0
    if folder.is_dir():
        for child in folder.iterdir():
            m = _NUMBERED.match(child.name)
            if m:
                start = max(start, int(m.group(1)) + 1)
    tags = [str(s) for s in seeds] if seeds is not None else [stem] * count
    return [folder / f"{start + i:05d}-{tag}.png" for i, tag in enumerate(tags)]


def decode_base64(data: str) -> bytes:
    """An image sent as base64 (A1111's API; a data: URL prefix allowed) -> its bytes; BadRequest otherwise."""
    if not isinstance(data, str):
        raise BadRequest("images must be base64 strings")
    if "," in data[:100] and data.startswith("data:"):
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise BadRequest("not valid base64 image data") from None
