"""Crash-safe output: nothing is visible under its final name until it is complete."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it replaces `final`.

    If the body raises, the temporary directory is removed and `final` is left untouched, so a
    failed run never destroys the previous good output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, backup)
    os.replace(tmp, final)
    shutil.rmtree(backup, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def encode_png(array, rgb: bool, compression: int) -> bytes:
    """PNG bytes of an RGB (H, W, 3) or single-channel array; same array and level, same bytes."""
    import cv2
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if rgb else array
    ok, encoded = cv2.imencode(".png", data, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise ValueError(f"cannot encode a {array.shape} {array.dtype} array as PNG")
    return encoded.tobytes()


def write_png(path: str | Path, array, compression: int = 3) -> Path:
    """Atomically write an RGB image (H, W, 3) or a label/grey map (H, W) as PNG."""
    return atomic_write_bytes(path, encode_png(array, rgb=array.ndim == 3, compression=compression))


def resolve_under(root: str | Path, path: str | Path) -> Path:
    """`path` if absolute, else `root / path`: how every params path relative to the project resolves."""
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


def finite_or_none(value: Any) -> Any:
    """NaN and infinities as None (JSON has no NaN), through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def strict_json(obj: Any) -> str:
    """Indented JSON with every NaN/inf written as null (valid for any JSON reader)."""
    return json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n"
