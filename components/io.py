"""Crash-safe output: nothing is visible under its final name until it is complete, and nothing
segshift did not write is ever replaced.

A finished output folder replaces the previous one wholesale, so `atomic_directory` first makes
sure that what it would replace is segshift's own: every folder it produces carries a marker file
(`MARKER_NAME`) naming what wrote it and the entries it wrote. A folder without one is replaced only
when it is empty or is exactly what segshift 0.1.0 wrote (before the marker existed). One writer at
a time: a second process writing the same output is refused, not raced.

New files and folders get the permissions any open()/mkdir() gives under the user's umask: the
kernel applies it to the modes asked for here (0666, 0777), so the process-global umask is never
read or set (setting it to read it races with other threads).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

try:
    import fcntl
except ImportError:          # Windows: no flock; concurrent writers go undetected there
    fcntl = None

MARKER_NAME = ".segshift-output"
MARKER_FORMAT = 1
# A folder holding one of these is a project (or its repository), never an output.
PROJECT_SIGNS = (".git", ".dvc", "dvc.yaml", "params.yaml")
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# flock's answers on file systems without locks (Lustre mounted noflock, some FUSE and NFS setups)
_NO_LOCKS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


class OutputError(ValueError):
    """An output segshift refuses to write: a file or folder it did not write, the project itself,
    or an output another segshift process is writing."""


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, writer: str = "segshift",
                     companions: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it replaces `final`.

    Before any work, `final` must be absent, an empty folder or a folder segshift wrote, and no
    other segshift process may be writing it: otherwise an OutputError naming it and why. The
    finished folder gets the marker, recording `writer` (e.g. "segshift prepare") and its entries;
    `companions` are names other code adds to it later (an S3 mirror's index), replaced with it.

    If the body raises (Ctrl-C included), the temporary directory is removed and `final` is left
    untouched, so a failed run never destroys the previous good output; what a killed run left
    beside `final` is cleared by the next.
    """
    final = _absolute(final)
    companions = tuple(companions)
    _refuse_project(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(final):
        _clear_leftovers(final)
        check_output(final, companions)       # under the lock: nobody else changes `final` now
        tmp = backup = None
        try:
            tmp = _new_directory(final)
            yield tmp
            _write_marker(tmp, writer)
            check_output(final, companions)   # a long run: the user may have made the folder since
            backup = _unused_name(final, "old")
            if os.path.lexists(final):
                os.rename(final, backup)
            os.rename(tmp, final)
        finally:
            _restore_and_clean(final, tmp, backup)


def check_output(final: str | Path, companions: Iterable[str] = ()) -> None:
    """Raise OutputError unless `atomic_directory(final)` may replace `final`: absent, an empty
    folder, or a folder segshift wrote holding nothing else. Cheap: call it at a command's start
    so a long run is not refused at its end (atomic_directory checks again, under its lock)."""
    final = _absolute(final)
    _refuse_project(final)
    if not os.path.lexists(final):
        return
    if not final.is_dir():
        raise OutputError(f"{final} is a file, not a folder segshift wrote; choose another output")
    names = sorted(os.listdir(final))
    if not names:
        return
    marker = _read_marker(final)
    if marker is None:
        if not _legacy_output(final):
            raise OutputError(f"{final} is not a folder segshift wrote (it holds {_some(names)}) and an "
                              "output replaces its whole folder; choose a new or empty folder")
        return
    recorded = marker.get("entries")
    if isinstance(recorded, list):
        extra = [n for n in names if n not in {MARKER_NAME, *map(str, recorded), *companions}]
        if extra:
            raise OutputError(f"{final} holds {_some(extra)}, which segshift did not write, and an output "
                              "replaces its whole folder; move it out or choose another output")


def _absolute(final: str | Path) -> Path:
    # Resolved: `.` has no name to build siblings from, and through a symlink the real folder is
    # the one replaced (the link stays), locked under one name whichever way it is reached.
    return Path(final).resolve()


def _refuse_project(final: Path) -> None:
    with contextlib.suppress(OSError):         # no current directory: nothing to compare with
        here = Path.cwd().resolve()
        if final == here or final in here.parents:
            where = "the current directory" if final == here else "above the current directory"
            raise OutputError(f"{final} is {where}, and an output replaces its whole folder; "
                              "choose a subfolder for the output")
    if final.parent == final or final == _home():
        raise OutputError(f"{final} cannot be an output (it would be replaced whole); choose a subfolder")
    sign = next((name for name in PROJECT_SIGNS if os.path.lexists(final / name)), None)
    if sign is not None:
        raise OutputError(f"{final} holds {sign}: it is a project, not an output (an output replaces "
                          "its whole folder); choose a subfolder for the output")


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (OSError, RuntimeError):      # no HOME and no password entry
        return None


def _some(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


# -- the marker and the outputs of segshift 0.1.0 -----------------------------------------------------

def _write_marker(directory: Path, writer: str) -> None:
    # No version or time: the same output stays byte-identical (DVC sees it unchanged).
    entries = sorted(name for name in os.listdir(directory) if name != MARKER_NAME)
    atomic_write_text(directory / MARKER_NAME, json.dumps(
        {"tool": "segshift", "format": MARKER_FORMAT, "writer": writer, "entries": entries}, indent=2) + "\n")


def _read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((directory / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("tool") == "segshift" else None


class _Layout(NamedTuple):
    required: frozenset[str]
    entries: dict[str, Any]        # name -> _FILE, _PNGS or a nested _Layout


_FILE, _PNGS = "file", "folders of PNG files"
_DATASET = _Layout(frozenset({"manifest.parquet"}), {
    "manifest.parquet": _FILE, "skipped.csv": _FILE, "images": _PNGS, "labels": _PNGS})
# What segshift 0.1.0 wrote, unmarked: a folder that is exactly one of these is taken for its
# output, so upgrading does not block a project. Frozen on purpose (names are not imported):
# renaming something in today's code must not widen what an old output may contain.
LEGACY_LAYOUTS = (
    _DATASET,                                                     # segshift ingest
    _Layout(frozenset({"summary.json"}), {                        # segshift prepare
        "summary.json": _FILE, ".s3-index.json": _FILE, "source": _DATASET, "target": _DATASET}),
    _Layout(frozenset({"ranking.parquet"}), {                     # segshift rank, a sweep trial
        "ranking.parquet": _FILE, "pseudo_labels": _PNGS}),
    _Layout(frozenset({"records.parquet", "cache.json"}), {       # a sweep's ranking cache
        "records.parquet": _FILE, "cache.json": _FILE, "pseudo_labels": _PNGS, "confidence": _PNGS}),
)


def _legacy_output(directory: Path) -> bool:
    return any(_matches(directory, layout) for layout in LEGACY_LAYOUTS)


def _matches(path: Path, kind: Any) -> bool:
    # Symbolic links inside count as what they are named: removing the folder removes the link only.
    real_dir = path.is_dir() and not path.is_symlink()
    if kind == _FILE:
        return not real_dir
    if kind == _PNGS:
        return real_dir and all(name.endswith(".png") for _, _, files in os.walk(path) for name in files)
    if not real_dir:
        return False
    names = os.listdir(path)
    return kind.required <= set(names) and all(
        name in kind.entries and _matches(path / name, kind.entries[name]) for name in names)


# -- one writer, and no temporaries left --------------------------------------------------------------

@contextlib.contextmanager
def _exclusive(final: Path) -> Iterator[None]:
    """Hold `final`'s lock file (`.<name>.segshift-lock` beside it) from entry to the final rename,
    or refuse at once.

    The file is removed on release while still locked, and whoever then locks the removed file
    finds it no longer at its path and starts again, so removing it never lets two writers in; it
    leaves no clutter beside the output. After a crash (SIGKILL) it stays, unlocked, and the next
    run takes it over. Where the file system has no locks, the write goes ahead with a warning
    rather than not at all.
    """
    if fcntl is None:
        yield
        return
    path = final.parent / f".{final.name}.segshift-lock"    # a name no other tool would use
    fd = _lock(path, final)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if fd is not None:
            os.close(fd)


def _lock(path: Path, final: Path) -> int | None:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise OutputError(f"{final} is being written by another segshift process{pid}; "
                              "wait for it or choose another output") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCKS:
                raise
            warnings.warn(f"{path.parent}: the file system has no locks, so another segshift writing "
                          f"{final} at the same time would go unnoticed", stacklevel=4)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)        # its last holder removed it on release: lock the one at the path now


def _same_file(fd: int, path: Path) -> bool:
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)


def _unused_name(final: Path, kind: str) -> Path:
    # 64 random bits: a clash is not a practical concern, and creating with O_EXCL/mkdir never
    # takes over an existing entry anyway.
    return final.parent / f".{final.name}.{kind}-{secrets.token_hex(8)}"


_LEFTOVER = re.compile(r"(tmp|old)-[0-9a-f]{16}")


def _clear_leftovers(final: Path) -> None:
    """What a killed writer of `final` (SIGKILL, the OOM killer) left beside it: called under the
    lock, so no live writer owns any of it. Killed mid-swap, the previous output is put back."""
    prefix = f".{final.name}."
    leftovers = [p for p in final.parent.iterdir() if p.name.startswith(prefix)
                 and _LEFTOVER.fullmatch(p.name[len(prefix):]) and p.is_dir() and not p.is_symlink()]
    previous = [p for p in leftovers if p.name[len(prefix):].startswith("old-")]
    if len(previous) == 1 and not os.path.lexists(final):
        os.rename(previous[0], final)
        leftovers.remove(previous[0])
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)


def _new_directory(final: Path) -> Path:
    tmp = _unused_name(final, "tmp")
    os.mkdir(tmp, 0o777)     # as mkdir: 0777 less the umask (mkdtemp's 0700 locks colleagues out)
    return tmp


def _restore_and_clean(final: Path, tmp: Path | None, backup: Path | None) -> None:
    # However far the swap got before a failure or Ctrl-C, the previous output goes back under its
    # name, and the temporary folders go.
    if backup is not None and os.path.lexists(backup) and not os.path.lexists(final):
        os.rename(backup, final)
    for leftover in (tmp, backup):
        if leftover is not None and os.path.lexists(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


# -- single files ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[BinaryIO]:
    """A binary handle on a new temporary file beside `path`, renamed over `path` once the body
    is done; removed if it fails. Created as open() creates any file: 0666 less the umask (mkstemp's
    0600 would survive the rename and keep a colleague out of the results)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unused_name(path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and an atomic rename."""
    path = Path(path)
    with _replacing(path) as handle:
        handle.write(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy `src` to `dst` through a temporary file and an atomic rename, keeping its times (as
    shutil.copy2) but not its mode: the copy is a new file, with the umask's permissions."""
    src, dst = Path(src), Path(dst)
    with open(src, "rb") as source, _replacing(dst) as handle:
        shutil.copyfileobj(source, handle, 1 << 20)
        handle.flush()
        stat = os.fstat(source.fileno())
        os.utime(handle.fileno(), ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return dst


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
