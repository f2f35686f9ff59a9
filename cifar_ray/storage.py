"""URIs -> pyarrow filesystems: a local path, s3://bucket/prefix, or an S3-compatible endpoint.

Ray gets the same place as a pyarrow filesystem too (`for_ray`: RunConfig's storage_path and
storage_filesystem), one that writes nothing above the configured prefix. Endpoints and
credentials come from the standard AWS chain (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
profiles, instance roles) or from the URI's `?endpoint_override=` query, never from our
config: nothing secret is ever written out.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from cifar_ray.errors import UserError


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def normalize(uri: str) -> str:
    """Local paths become absolute (Ray requires it); remote URIs are kept as given."""
    if is_remote(uri):
        return uri
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping any `?query` (e.g. endpoint_override) at the end."""
    if not is_remote(uri):
        return os.path.join(normalize(uri), *parts)
    base, sep, query = uri.partition("?")
    return posixpath.join(base.rstrip("/"), *parts) + (sep + query)


def display(uri: str) -> str:
    """The URI without its query string, for messages (queries may hold endpoints)."""
    return uri.partition("?")[0]


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or an s3:// URI."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), normalize(uri)
    scheme = urlsplit(uri).scheme
    if scheme not in ("s3", "gs", "gcs", "hdfs", "abfs", "abfss"):
        raise ValueError(f"{display(uri)}: unsupported URI scheme {scheme!r}; use a local "
                         "path or s3://bucket/prefix")
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError with terse messages
        raise StorageError(f"{display(uri)}: cannot open storage ({e})") from e


class _NoMarkers(pafs.FileSystemHandler):
    """An object store's filesystem that never creates "directories". S3 has none: pyarrow's
    create_dir PUTs an empty marker object for every missing level, prefixes above --storage
    included, and Ray creates its run folders that way. A bucket policy scoped to the prefix
    would refuse those writes; without them, everything Ray writes stays under the prefix."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs

    def __eq__(self, other):
        return isinstance(other, _NoMarkers) and self.fs.equals(other.fs)

    def get_type_name(self):
        return f"no-markers+{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def equals(self, other):
        return self == other

    def create_dir(self, path, recursive):
        return None  # a key prefix exists as soon as an object is written under it

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def for_ray(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig / Tuner.restore: local paths
    as they are; object stores through a filesystem that writes nothing above the prefix."""
    if not is_remote(uri):
        return normalize(uri), None
    fs, path = resolve(uri)
    return path, pafs.PyFileSystem(_NoMarkers(fs))


class StorageError(UserError, RuntimeError):
    """Storage is missing, unreachable, unwritable, or refused our credentials."""


def _wrap(uri: str, what: str, e: Exception) -> StorageError:
    msg = str(e)
    hint = ""
    if any(t in msg for t in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                              "response code: 403")):
        hint = " (credentials were refused: check AWS_ACCESS_KEY_ID / profile / role)"
    elif "NoSuchBucket" in msg or "NO_SUCH_BUCKET" in msg or "does not exist" in msg:
        hint = " (the bucket does not exist)"
    return StorageError(f"{display(uri)}: {what} failed{hint}: {msg}")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise _wrap(uri, "lookup", e) from e


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"{display(uri)}: no such file") from e
    except OSError as e:
        raise _wrap(uri, "read", e) from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local files go through a temp file + rename, so a reader never
    sees half a file; S3 PUTs are atomic by themselves."""
    fs, path = resolve(uri)
    try:
        if not is_remote(uri):
            # Only local paths need parents. On S3, create_dir would PUT a marker object for
            # every level, prefixes above --storage included (which a bucket policy scoped to
            # the prefix rightly refuses).
            fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = path if is_remote(uri) else f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        if tmp != path:
            fs.move(tmp, path)
    except OSError as e:
        raise _wrap(uri, "write", e) from e


def list_dir(uri: str) -> list[str]:
    """Names directly under a folder URI (empty if it does not exist)."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise _wrap(uri, "listing", e) from e
    return sorted(posixpath.basename(i.path) for i in infos)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except OSError as e:
        raise _wrap(uri, "delete", e) from e


def check_writable(uri: str) -> None:
    """Fail fast, naming the URI, if storage is unreachable, missing or read-only."""
    probe = join(uri, f".cifar-ray-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok")
        fs, path = resolve(probe)
        fs.delete_file(path)
    except (StorageError, OSError) as e:
        cause = e.__cause__ or e
        raise _wrap(uri, "writing a probe file", cause) from e


def open_input(uri: str) -> io.IOBase:
    fs, path = resolve(uri)
    try:
        return fs.open_input_file(path)
    except FileNotFoundError as e:
        raise StorageError(f"{display(uri)}: no such file") from e
    except OSError as e:
        raise _wrap(uri, "open", e) from e
