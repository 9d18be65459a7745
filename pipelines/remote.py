"""Locations that may be `s3://`: prepared datasets, checkpoints and Ray/Tune storage.

Training reads thousands of small files at random, so an S3 location is never read in place: it
is *mirrored* into `<storage.cache_dir>/s3/<bucket>/<prefix>` on the machine that needs it (each
Ray node keeps its own mirror) and only objects whose ETag changed are fetched again. Writers do
the reverse: they write the local mirror, then push the files that changed. A download lands in a
temporary file that is renamed into place, so an interrupted pull never leaves a half file, and
two workers pulling at once on one node write the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from segshift.components.config import Params
from segshift.components.data.storage import S3_SCHEME, S3Root, StorageError, open_root
from segshift.components.io import atomic_write_bytes, atomic_write_text, resolve_under
from segshift.components.paths import confined

INDEX_NAME = ".s3-index.json"   # key -> ETag of what the mirror holds, per mirrored prefix
TRANSFER_THREADS = 8            # S3 latency, not bandwidth, bounds small-object transfers


def is_s3(location: str | os.PathLike) -> bool:
    return str(location).startswith(S3_SCHEME)


def endpoint_url(params: Params) -> str | None:
    return params.storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")


def mirror_path(params: Params, project_dir: str | Path, location: str) -> Path:
    """Where `location` lives on this machine: itself when local, its mirror when on S3."""
    if not is_s3(location):
        return resolve_under(project_dir, location)
    bucket_and_prefix = location[len(S3_SCHEME):].strip("/")
    return confined(resolve_under(project_dir, params.storage.cache_dir) / "s3", bucket_and_prefix,
                    f"S3 location {location}:")


def _root(params: Params, location: str) -> S3Root:
    root = open_root(location, endpoint_url(params))
    assert isinstance(root, S3Root)
    return root


def _read_index(local: Path) -> dict[str, str]:
    try:
        return json.loads((local / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return {}


def pull(params: Params, project_dir: str | Path, location: str, under: str = "",
         required: bool = True) -> Path:
    """The local path of `location`, after fetching the objects (below `under`) that changed.

    A local location is returned as is. `required=False` accepts an empty S3 prefix (a checkpoint
    folder on a first run); otherwise an empty prefix is an error naming it.
    """
    local = mirror_path(params, project_dir, location)
    if not is_s3(location):
        return local
    root = _root(params, location)
    remote = root.etags(under)
    if not remote and required:
        raise StorageError(f"{root.describe(under)}: no objects there (expected a prepared dataset; "
                           "run `segshift prepare` with prepare.out_dir set to it)")
    # Every key is checked before anything is written: a bucket holding one key that would land
    # outside the mirror is refused whole.
    targets = {rel: confined(local, rel, f"S3 object {root.describe(rel)}: key below the prefix")
               for rel in remote}
    index = _read_index(local)
    stale = [rel for rel, etag in remote.items() if index.get(rel) != etag or not targets[rel].is_file()]

    def fetch(rel: str) -> None:
        atomic_write_bytes(targets[rel], root.read_bytes(rel))

    _run_all(fetch, stale)
    if stale:
        local.mkdir(parents=True, exist_ok=True)
        atomic_write_text(local / INDEX_NAME, json.dumps({**_read_index(local), **remote}, sort_keys=True))
    return local


def push(params: Params, project_dir: str | Path, location: str, files: Iterable[Path] | None = None) -> int:
    """Upload the mirror's files (all, or `files`) whose content differs from S3; returns the count.

    A no-op for a local location. S3 makes each object visible whole, so readers never see a
    partly uploaded file.
    """
    if not is_s3(location):
        return 0
    local = mirror_path(params, project_dir, location)
    root = _root(params, location)
    candidates = sorted(files) if files is not None else sorted(
        p for p in local.rglob("*") if p.is_file() and p.name != INDEX_NAME)
    rels = [p.relative_to(local).as_posix() for p in candidates]
    remote = root.etags()
    digests = {rel: hashlib.md5((local / rel).read_bytes()).hexdigest() for rel in rels}
    changed = [rel for rel in rels if remote.get(rel) != digests[rel]]

    def send(rel: str) -> None:
        root.write_bytes(rel, (local / rel).read_bytes())

    _run_all(send, changed)
    atomic_write_text(local / INDEX_NAME, json.dumps({**_read_index(local), **digests}, sort_keys=True))
    return len(changed)


def _run_all(task, items: list[str]) -> None:
    if not items:
        return
    with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
        for _ in pool.map(task, items):  # re-raises the first failure
            pass


def prepared_dir(params: Params, project_dir: str | Path) -> Path:
    """`prepare.out_dir` on this machine, pulled first when it is on S3."""
    return pull(params, project_dir, params.prepare.out_dir)


def ray_storage(params: Params, project_dir: str | Path, location: str) -> tuple[str, Any]:
    """(storage path, pyarrow filesystem or None) for Ray Train / Tune's `storage_path`: S3 goes
    through a pyarrow S3FileSystem with `storage.s3_endpoint_url`, never through a mirror."""
    if not is_s3(location):
        return str(resolve_under(project_dir, location)), None
    import pyarrow.fs
    kwargs: dict[str, Any] = {}
    endpoint = endpoint_url(params)
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    fs = pyarrow.fs.S3FileSystem(**kwargs, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return location[len(S3_SCHEME):], fs
