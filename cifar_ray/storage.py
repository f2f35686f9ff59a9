"""URIs -> pyarrow filesystems: a local path, s3://bucket/prefix, or an S3-compatible endpoint.

Ray Train resolves `RunConfig(storage_path=...)` with pyarrow too, so one URI means the same
place to us and to Ray. Endpoints and credentials come from the standard AWS chain
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, profiles, instance roles) or from the URI's
`?endpoint_override=` query, never from our config: nothing secret is ever written out.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from cifar_ray.config import UserError


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
