"""Checks on encoded images from outside, made on their headers before anything is decoded.

A 1 MB PNG can claim 20000 x 20000 pixels and decode to gigabytes, and a header claiming
100000 x 100000 makes OpenCV abort; a JPEG renamed `.png` decodes as a label whose ids were
changed by lossy compression. Both are caught here from the first bytes of the file.
"""
from __future__ import annotations

import struct
from io import BytesIO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_KNOWN_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "RIFF/WebP",
                     b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


class ImageCheckError(ValueError):
    """An encoded image refused before decoding; the message names the file and the limit."""


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header, without decoding; None if the header is unreadable."""
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    from PIL import Image
    try:
        with Image.open(BytesIO(data)) as image:   # PIL reads only the header here
            return image.size
    except Image.DecompressionBombError:   # PIL's own limit is far above any we accept
        return 2**31 - 1, 2**31 - 1
    except Exception:   # not an image PIL knows: the decoder reports it with the file's name
        return None


def check_pixels(data: bytes, name: str, max_pixels: int) -> None:
    """Refuse an image whose header claims more than `max_pixels` pixels (width x height)."""
    size = header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        width, height = size
        raise ImageCheckError(f"{name}: {width}x{height} = {width * height:,} pixels, more than "
                              f"prepare.max_image_pixels ({max_pixels:,}); refused before decoding")


def require_png(data: bytes, name: str, what: str = "label") -> None:
    """Labels hold class ids, which only a lossless format keeps: the content must be PNG."""
    if data.startswith(PNG_SIGNATURE):
        return
    found = next((kind for magic, kind in _KNOWN_SIGNATURES.items() if data.startswith(magic)), None)
    content = f"a {found} file" if found else ("empty" if not data else "not a PNG file")
    raise ImageCheckError(f"{name}: {what} must be a PNG file, but its content is {content} "
                          "(a lossy format changes the ids)")
