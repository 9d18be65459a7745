"""Paths built from outside input stay inside their root: checked here, and only here.

S3 keys, manifest entries, sample ids and label file names reach segshift from buckets, DVC
remotes, colleagues and annotators. Joined to a folder unchecked, a key such as
`prepared/../../../.bashrc` writes outside it. Every such join goes through `confined`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

# A path segment as datasets name their files and folders (city names, frame numbers, splits).
_SEGMENT = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9._+=@-]*$")
MAX_RELATIVE_LENGTH = 1024
MAX_ECHO = 120   # characters of an untrusted value quoted in an error message


class UnsafePathError(ValueError):
    """A relative path from outside input that would leave its root, or is not a plain path."""


def quoted(value: object, limit: int = MAX_ECHO) -> str:
    """`value` as it may appear in an error message: repr'd (control characters visible), bounded."""
    text = repr(str(value))
    return text if len(text) <= limit else f"{text[:limit]}…' ({len(str(value))} characters)"


def relative_parts(rel: str, what: str) -> tuple[str, ...]:
    """The segments of `rel`, a relative POSIX path of plain names; UnsafePathError otherwise.

    Refused: empty, absolute, `..` or `.` segments, empty segments, backslashes, and names with
    anything but letters, digits and `._+=@-` (spaces and control characters included), overlong paths.
    """
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(f"{what}: empty path")
    if len(rel) > MAX_RELATIVE_LENGTH:
        raise UnsafePathError(f"{what} {quoted(rel)}: longer than {MAX_RELATIVE_LENGTH} characters")
    if rel.startswith("/") or "\\" in rel:
        raise UnsafePathError(f"{what} {quoted(rel)}: must be a relative path with '/' separators")
    parts = PurePosixPath(rel).parts
    bad = next((p for p in parts if p in (".", "..") or not _SEGMENT.match(p)), None)
    if bad is not None or any(not p for p in rel.split("/")):
        reason = "leaves its folder" if bad == ".." else "is not a plain relative path"
        raise UnsafePathError(f"{what} {quoted(rel)}: {reason} (allowed: names of letters, digits "
                              "and ._+=@- separated by '/')")
    return parts


def confined(root: str | Path, rel: str, what: str) -> Path:
    """`root / rel` for a `rel` from outside input, refused unless it names a plain path inside
    `root`; an existing symlink on the way may not lead out of `root` either."""
    root = Path(root)
    path = root.joinpath(*relative_parts(rel, what))
    _check_no_escape_through_links(root, path, rel, what)
    return path


def checked_id(sample_id: str, what: str = "sample id") -> str:
    """A sample id safe to become a file name below a folder (it may hold '/': city folders)."""
    relative_parts(sample_id, what)
    return sample_id


def _check_no_escape_through_links(root: Path, path: Path, rel: str, what: str) -> None:
    if not _any_link_between(root, path):
        return
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(f"{what} {quoted(rel)}: a symbolic link under {root} leads outside it "
                              f"(to {real})")


def _any_link_between(root: Path, path: Path) -> bool:
    current = path
    while current != root and current != current.parent:
        if current.is_symlink():
            return True
        current = current.parent
    return False
