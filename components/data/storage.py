"""Where a raw dataset lives: a local directory or an S3 prefix, behind one small picklable interface.

A root is shipped to worker processes, so it holds only plain values; an S3 root creates its
boto3 client lazily in each process (clients cannot be pickled) and drops it when pickled.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

S3_SCHEME = "s3://"
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Error codes S3 returns with HTTP 403; all of them mean "these credentials may not do this".
_ACCESS_DENIED_CODES = frozenset({
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "AllAccessDisabled", "AccountProblem", "InvalidToken", "ExpiredToken",
})
_MISSING_BUCKET_CODES = frozenset({"NoSuchBucket"})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
LIST_PAGE_SIZE = 1000  # S3's maximum keys per ListObjectsV2 page


class StorageError(ValueError):
    """A dataset root that cannot be listed or read; the message names the location and why."""


class DatasetRoot(Protocol):
    def list_files(self) -> list[str]:
        """Every file under the root as a sorted relative POSIX path."""

    def read_bytes(self, rel: str) -> bytes:
        """The content of one file, by its relative path."""

    def describe(self, rel: str = "") -> str:
        """A user-facing location (path or URI) of `rel`, or of the root itself."""


@dataclass(frozen=True)
class LocalRoot:
    path: str

    def list_files(self) -> list[str]:
        base = Path(self.path)
        if not base.is_dir():
            raise StorageError(f"{self.path}: dataset root does not exist or is not a directory")
        found: list[str] = []
        visited: dict[tuple[int, int], Path] = {}
        # Datasets are often assembled from symlinked download folders, so links are followed;
        # a link back to a folder already listed would make the walk endless, so it is an error.
        for directory, subdirs, names in os.walk(base, followlinks=True, onerror=self._walk_error):
            here = Path(directory)
            self._check_not_visited(here, visited)
            for name in names:
                self._check_resolves(here / name)
            rel_dir = here.relative_to(base)
            found.extend((rel_dir / name).as_posix() for name in names)
        return sorted(found)

    def _check_resolves(self, path: Path) -> None:
        if _is_link_loop(path):
            raise StorageError(f"{path}: a symbolic link loop under {self.path} (the link never "
                               "reaches a file); remove or fix the link")

    def _check_not_visited(self, directory: Path, visited: dict[tuple[int, int], Path]) -> None:
        status = directory.stat()
        key = (status.st_dev, status.st_ino)
        if key in visited:
            raise StorageError(f"{directory}: a symbolic link loop under {self.path} leads back to "
                               f"{visited[key]}; remove or fix the link")
        visited[key] = directory

    def _walk_error(self, error: OSError) -> None:
        raise StorageError(f"{error.filename or self.path}: cannot list ({error.strerror or error})")

    def read_bytes(self, rel: str) -> bytes:
        try:
            return (Path(self.path) / rel).read_bytes()
        except OSError as error:
            raise StorageError(f"{self.describe(rel)}: cannot read ({error.strerror or error})") from error

    def describe(self, rel: str = "") -> str:
        return str(Path(self.path) / rel) if rel else str(Path(self.path))


@dataclass(frozen=True)
class S3Root:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    _client: Any = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "prefix": self.prefix, "endpoint_url": self.endpoint_url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in {**state, "_client": None}.items():
            object.__setattr__(self, name, value)

    def list_files(self) -> list[str]:
        return sorted(self.etags())

    def etags(self, under: str = "") -> dict[str, str]:
        """Relative path -> ETag of every object below the root (and below `under` inside it)."""
        key_prefix = "/".join(p for p in (self.prefix, under.strip("/")) if p)
        key_prefix = f"{key_prefix}/" if key_prefix else ""
        skip = len(f"{self.prefix}/") if self.prefix else 0
        paginator = self._s3().get_paginator("list_objects_v2")
        found: dict[str, str] = {}
        try:
            pages = paginator.paginate(Bucket=self.bucket, Prefix=key_prefix,
                                       PaginationConfig={"PageSize": LIST_PAGE_SIZE})
            for page in pages:
                for item in page.get("Contents", ()):
                    rel = item["Key"][skip:]
                    # Zero-byte "folder" markers created by consoles and sync tools are not files.
                    if rel and not rel.endswith("/"):
                        found[rel] = item["ETag"].strip('"')
        except Exception as error:  # botocore raises several unrelated exception types
            raise self._storage_error(error, self.describe(under)) from error
        return found

    def read_bytes(self, rel: str) -> bytes:
        try:
            response = self._s3().get_object(Bucket=self.bucket, Key=self._key(rel))
            return response["Body"].read()
        except Exception as error:
            raise self._storage_error(error, self.describe(rel)) from error

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Upload one object; S3 makes it visible whole, never partly written."""
        try:
            self._s3().put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)
        except Exception as error:
            raise self._storage_error(error, self.describe(rel)) from error

    def describe(self, rel: str = "") -> str:
        key = self._key(rel) if rel else self.prefix
        return f"{S3_SCHEME}{self.bucket}/{key}" if key else f"{S3_SCHEME}{self.bucket}"

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _s3(self) -> Any:
        if self._client is None:
            import boto3  # deferred: importing boto3 costs every worker process time
            from botocore.config import Config

            config = Config(retries={"mode": "standard", "max_attempts": 5})
            client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
            object.__setattr__(self, "_client", client)
        return self._client

    def _storage_error(self, error: Exception, location: str) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(error, NoCredentialsError):
            return StorageError(f"{location}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)")
        if isinstance(error, EndpointConnectionError):
            return StorageError(f"{location}: cannot reach the S3 endpoint {self._endpoint()}")
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = error.response.get("Error", {}).get("Message", "") or str(error)
            if code in _ACCESS_DENIED_CODES or status == 403:
                return StorageError(f"access denied to {location} ({code}: {message}); check the "
                                    "credentials and the bucket policy")
            if code in _MISSING_BUCKET_CODES:
                return StorageError(f"{location}: bucket '{self.bucket}' does not exist "
                                    f"(endpoint {self._endpoint()})")
            if code in _MISSING_KEY_CODES:
                return StorageError(f"{location}: object does not exist")
            return StorageError(f"{location}: S3 error {code or status}: {message}")
        return StorageError(f"{location}: {type(error).__name__}: {error}")

    def _endpoint(self) -> str:
        client = self._client
        return str(client.meta.endpoint_url) if client is not None else str(self.endpoint_url)


def _is_link_loop(path: Path) -> bool:
    """A symlink that never resolves (a -> b -> a): reading it would fail with ELOOP."""
    if not path.is_symlink():
        return False
    try:
        path.resolve(strict=True)
    except RuntimeError:        # Python < 3.13 reports a loop this way
        return True
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def open_root(uri: str, endpoint_url: str | None = None) -> LocalRoot | S3Root:
    """A root for a local directory or an `s3://bucket/prefix` URI; `endpoint_url` applies to S3 only."""
    if uri.startswith(S3_SCHEME):
        return _s3_root(uri, endpoint_url)
    if _URI_SCHEME.match(uri):
        raise StorageError(f"{uri}: unsupported location; use a local path or s3://bucket/prefix")
    path = Path(uri).expanduser()
    if not path.exists():
        raise StorageError(f"{uri}: dataset root does not exist")
    if not path.is_dir():
        raise StorageError(f"{uri}: dataset root is not a directory")
    return LocalRoot(str(path))


def _s3_root(uri: str, endpoint_url: str | None) -> S3Root:
    bucket, _, prefix = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name; expected s3://bucket/prefix")
    prefix = PurePosixPath(prefix).as_posix().strip("/") if prefix.strip("/") else ""
    return S3Root(bucket=bucket, prefix=prefix, endpoint_url=endpoint_url)
