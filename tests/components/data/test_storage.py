"""Dataset roots: local directories and S3 prefixes (against a real moto S3 server on loopback)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from segshift.components.data import storage
from segshift.components.data.storage import LocalRoot, S3Root, StorageError, open_root
from tests.fixtures.s3 import S3Endpoint, moto_endpoint, s3, use_credentials  # noqa: F401


def _tree(root: Path) -> None:
    for rel, data in {"images/00001.png": b"one", "images/00002.png": b"two", "labels/00001.png": b"L",
                      "README": b"r"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


# --- local ------------------------------------------------------------------------------------


def test_local_root_lists_relative_posix_paths_sorted_and_reads_them(tmp_path: Path):
    _tree(tmp_path)
    root = open_root(str(tmp_path))
    assert isinstance(root, LocalRoot)
    assert root.list_files() == ["README", "images/00001.png", "images/00002.png", "labels/00001.png"]
    assert root.read_bytes("images/00002.png") == b"two"
    assert root.describe("images/00002.png") == str(tmp_path / "images" / "00002.png")
    assert root.describe() == str(tmp_path)


def test_local_root_follows_symlinked_folders(tmp_path: Path):
    _tree(tmp_path / "download")
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "images").symlink_to(tmp_path / "download" / "images")
    assert open_root(str(tmp_path / "dataset")).list_files() == ["images/00001.png", "images/00002.png"]


def test_missing_local_root_is_an_error(tmp_path: Path):
    with pytest.raises(StorageError, match=r"/nope: dataset root does not exist"):
        open_root(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is not a directory"):
        open_root(str(tmp_path / "file"))


def test_unreadable_local_file_names_the_path(tmp_path: Path):
    root = LocalRoot(str(tmp_path))
    with pytest.raises(StorageError, match=r"/gone\.png: cannot read"):
        root.read_bytes("gone.png")


def test_unsupported_scheme_is_an_error():
    with pytest.raises(StorageError, match="unsupported location"):
        open_root("gs://bucket/gta5")


# --- S3 URIs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("uri, bucket, prefix", [
    ("s3://data/gta5", "data", "gta5"),
    ("s3://data/raw/gta5/", "data", "raw/gta5"),
    ("s3://data//raw//gta5", "data", "raw/gta5"),
    ("s3://data", "data", ""),
    ("s3://data/", "data", ""),
])
def test_s3_uri_parsing(uri: str, bucket: str, prefix: str):
    root = open_root(uri, endpoint_url="http://127.0.0.1:1")
    assert root == S3Root(bucket, prefix, "http://127.0.0.1:1")


def test_s3_uri_without_bucket_is_an_error():
    with pytest.raises(StorageError, match="no bucket name"):
        open_root("s3:///gta5")


def test_s3_describe_gives_uris():
    root = S3Root("b", "raw/gta5")
    assert root.describe("images/00001.png") == "s3://b/raw/gta5/images/00001.png"
    assert root.describe() == "s3://b/raw/gta5"
    assert S3Root("b").describe("images/1.png") == "s3://b/images/1.png"
    assert S3Root("b").describe() == "s3://b"


# --- S3 against a moto server -----------------------------------------------------------------


def test_s3_root_lists_and_reads_a_prefix(s3: S3Endpoint, tmp_path: Path):
    _tree(tmp_path)
    bucket = s3.new_bucket()
    s3.upload_tree(tmp_path, bucket, "raw/gta5")
    s3.client().put_object(Bucket=bucket, Key="raw/gta5/empty-folder/", Body=b"")  # a console folder marker
    s3.client().put_object(Bucket=bucket, Key="raw/gta5-other/images/9.png", Body=b"not mine")
    root = open_root(f"s3://{bucket}/raw/gta5", endpoint_url=s3.url)
    assert root.list_files() == ["README", "images/00001.png", "images/00002.png", "labels/00001.png"]
    assert root.read_bytes("images/00001.png") == b"one"


def test_s3_listing_follows_every_page(s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch):
    bucket = s3.new_bucket()
    client = s3.client()
    for i in range(7):
        client.put_object(Bucket=bucket, Key=f"p/images/{i:05d}.png", Body=b"")
    monkeypatch.setattr(storage, "LIST_PAGE_SIZE", 2)
    assert len(open_root(f"s3://{bucket}/p", endpoint_url=s3.url).list_files()) == 7


def test_s3_root_pickles_without_its_client_and_works_after(s3: S3Endpoint, tmp_path: Path):
    _tree(tmp_path)
    bucket = s3.new_bucket()
    s3.upload_tree(tmp_path, bucket, "p")
    root = open_root(f"s3://{bucket}/p", endpoint_url=s3.url)
    root.read_bytes("README")  # creates the client
    clone = pickle.loads(pickle.dumps(root))
    assert clone == root
    assert clone._client is None
    assert clone.read_bytes("images/00002.png") == b"two"


def test_s3_endpoint_comes_from_the_environment_when_not_given(s3: S3Endpoint, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    _tree(tmp_path)
    bucket = s3.new_bucket()
    s3.upload_tree(tmp_path, bucket, "p")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    assert open_root(f"s3://{bucket}/p").read_bytes("README") == b"r"


def test_missing_bucket_is_an_error_naming_it(s3: S3Endpoint):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/gta5: bucket 'no-such-bucket' does not exist"):
        open_root("s3://no-such-bucket/gta5", endpoint_url=s3.url).list_files()


def test_missing_prefix_lists_nothing(s3: S3Endpoint):
    bucket = s3.new_bucket()
    assert open_root(f"s3://{bucket}/nothing-here", endpoint_url=s3.url).list_files() == []


def test_missing_object_is_an_error_naming_its_uri(s3: S3Endpoint):
    bucket = s3.new_bucket()
    with pytest.raises(StorageError, match=rf"s3://{bucket}/p/gone\.png: object does not exist"):
        open_root(f"s3://{bucket}/p", endpoint_url=s3.url).read_bytes("gone.png")


def test_forbidden_bucket_says_access_denied_and_names_the_uri(s3: S3Endpoint, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    _tree(tmp_path)
    bucket = s3.new_bucket()
    s3.upload_tree(tmp_path, bucket, "p")
    with s3.user_without_permissions() as (access_key, secret_key):
        use_credentials(monkeypatch, access_key, secret_key)
        root = open_root(f"s3://{bucket}/p", endpoint_url=s3.url)
        with pytest.raises(StorageError, match=rf"access denied to s3://{bucket}/p \(AccessDenied"):
            root.list_files()
        with pytest.raises(StorageError, match=rf"access denied to s3://{bucket}/p/README"):
            root.read_bytes("README")


def test_unknown_credentials_are_access_denied(s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch):
    bucket = s3.new_bucket()
    with s3.user_without_permissions():
        use_credentials(monkeypatch, "AKIAUNKNOWN", "wrong")
        with pytest.raises(StorageError, match=rf"access denied to s3://{bucket}/p \(InvalidAccessKeyId"):
            open_root(f"s3://{bucket}/p", endpoint_url=s3.url).list_files()


def test_unreachable_endpoint_is_an_error(monkeypatch: pytest.MonkeyPatch):
    use_credentials(monkeypatch)
    with pytest.raises(StorageError, match=r"s3://b/p: cannot reach the S3 endpoint http://127\.0\.0\.1:9"):
        open_root("s3://b/p", endpoint_url="http://127.0.0.1:9").list_files()
