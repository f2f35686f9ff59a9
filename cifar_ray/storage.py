"""URIs -> pyarrow filesystems: a local path, s3://bucket/prefix, or an S3-compatible endpoint.

Ray gets the same place as a pyarrow filesystem too (`for_ray`: RunConfig's storage_path and
storage_filesystem), one that writes nothing above the configured prefix. Endpoints and
credentials come from the standard AWS chain (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
profiles, instance roles) or from the URI's `?endpoint_override=` query, never from our
config: nothing secret is ever written out.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from cifar_ray.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long an operation keeps retrying a connection-level failure (object stores drop
# connections now and then): --storage-retry-s inside `with retries(...)`, else this.
DEFAULT_RETRY_S = 120.0
_retry_s: ContextVar[float] = ContextVar("storage_retry_s", default=DEFAULT_RETRY_S)
# Objects larger than this are read as parallel ranged GETs of this size: a phase-2
# checkpoint (weights + AdamW moments) in a few requests side by side, not one 256 KB GET
# after another.
PART = 32 * 2**20
READERS = 8


@contextlib.contextmanager
def retries(seconds: float) -> Iterator[None]:
    """Storage calls made inside the block (by this thread) retry dropped connections for
    `seconds` (--storage-retry-s) before they fail. Threads of their own pass `window`."""
    token = _retry_s.set(seconds)
    try:
        yield
    finally:
        _retry_s.reset(token)


def retry_window() -> float:
    """The retry window in force here (retries), in seconds."""
    return _retry_s.get()


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


class _ForRay(pafs.FileSystemHandler):
    """An object store as Ray Train and Tune get it (RunConfig's storage_filesystem):
    - it never creates "directories". S3 has none: pyarrow's create_dir PUTs an empty marker
      object for every missing level, prefixes above --storage included, and Ray creates its
      run folders that way. A bucket policy scoped to the prefix would refuse those writes;
      without them, everything Ray writes stays under the prefix;
    - every call retries dropped connections for `retry_s`, as our own reads and writes do.
      Ray's controller writes its checkpoint index (checkpoint_manager_snapshot.json) after
      every report, and one connection reset there would end the run. Files are written
      whole on close and read whole on open (through write_file / read_file), so a retry
      never resumes half an object."""

    def __init__(self, fs: pafs.FileSystem, retry_s: float):
        # Ray calls this filesystem from pyarrow's IO threads (copy_files syncing Tune's
        # experiment folder): a write here that queued its upload on those same threads (S3's
        # background writes) would wait for itself once they are all busy, so its writes
        # upload in the calling thread. Our own writes (_unwrapped) keep the original.
        self.original, self.fs, self.retry_s = fs, _synchronous(fs), retry_s

    def __reduce__(self):  # travels to Ray's controller and workers with its retry window
        return _ForRay, (self.original, self.retry_s)

    def _retry(self, what: str, path, fn: Callable[[], T]) -> T:
        return retrying(str(path), what, fn, self.retry_s, raw=True)

    def __eq__(self, other):
        return isinstance(other, _ForRay) and self.fs.equals(other.fs)

    def get_type_name(self):
        return f"cifar-ray+{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def equals(self, other):
        return self == other

    def create_dir(self, path, recursive):
        return None  # a key prefix exists as soon as an object is written under it

    def get_file_info(self, paths):
        return self._retry("lookup", paths[:1], lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._retry("listing", selector.base_dir, lambda: self.fs.get_file_info(selector))

    def delete_dir(self, path):
        self._retry("delete", path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._retry("delete", path, lambda: self.fs.delete_dir_contents(
            path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        self._retry("delete", "/", lambda: self.fs.delete_dir_contents(
            "", accept_root_dir=True))

    def delete_file(self, path):
        self._retry("delete", path, lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self._retry("move", src, lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        self._retry("copy", src, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return pa.BufferReader(read_file(self.fs, path, window=self.retry_s, raw=True))

    def open_input_file(self, path):
        return pa.BufferReader(read_file(self.fs, path, window=self.retry_s, raw=True))

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_WholeUpload(self.fs, path, self.retry_s), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError(f"{path}: appending is not supported on an object store")


class _WholeUpload(io.RawIOBase):
    """A write stream that uploads the whole object when closed, retried (write_file)."""

    def __init__(self, fs: pafs.FileSystem, path: str, retry_s: float):
        super().__init__()
        self.fs, self.path, self.retry_s, self.buf = fs, path, retry_s, io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.buf.write(b)

    def close(self) -> None:
        if not self.closed:
            write_file(self.fs, self.path, self.buf.getvalue(), local=False,
                       window=self.retry_s, raw=True)
        super().close()


def for_ray(uri: str, retry_s: float | None = None) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig / Tuner.restore: local paths
    as they are; object stores through a filesystem that writes nothing above the prefix
    and retries dropped connections for `retry_s` (default: the window in force)."""
    if not is_remote(uri):
        return normalize(uri), None
    fs, path = resolve(uri)
    return path, pafs.PyFileSystem(_ForRay(fs, retry_window() if retry_s is None else retry_s))


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


# Connection-level failures, as pyarrow's S3 client words them: worth retrying. Refused
# credentials, missing buckets or files and full disks are not.
TRANSIENT = ("NETWORK_CONNECTION", "curlCode", "Couldn't connect", "Connection refused",
             "Connection reset", "connection was reset", "Timeout was reached", "timed out",
             "Empty reply", "Recv failure", "Send failure", "SERVICE_UNAVAILABLE", "SLOW_DOWN",
             "INTERNAL_FAILURE", "response code: 5")


def transient(e: BaseException) -> bool:
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    return isinstance(e, OSError) and any(t in str(e) for t in TRANSIENT)


def retrying(label: str, what: str, fn: Callable[[], T], window: float | None = None,
             raw: bool = False) -> T:
    """fn(), retried with backoff while it fails transiently, for at most `window` seconds
    (default: retry_window()). Other failures, and the last transient one, raise StorageError
    naming `label`
    (a URI) and `what` was being done; or, with `raw`, the OSError itself (for Ray, which
    tells a missing file by FileNotFoundError)."""
    window = retry_window() if window is None else window
    start, delay, tries = time.monotonic(), 0.5, 0
    while True:
        try:
            return fn()
        except OSError as e:
            tries += 1
            if raw and (not transient(e) or time.monotonic() + delay > start + window):
                raise
            if isinstance(e, FileNotFoundError):
                raise StorageError(f"{display(label)}: no such file") from e
            if not transient(e):
                raise _wrap(label, what, e) from e
            if time.monotonic() + delay > start + window:
                n = f"{tries} tr{'y' if tries == 1 else 'ies'}"
                raise StorageError(
                    f"{_wrap(label, what, e)} (gave up after {n} in "
                    f"{time.monotonic() - start:.0f} s: --storage-retry-s {window:g})") from e
            log.warning(f"{display(label)}: {what} failed ({str(e).splitlines()[0][:160]}); "
                        f"retrying in {delay:.1f} s")
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _lookup(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    return fs.get_file_info(path)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return retrying(uri, "lookup", lambda: _lookup(fs, path).type != pafs.FileType.NotFound)


def _unwrapped(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The object store inside Ray's view of it (for_ray), so that retries do not nest."""
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, _ForRay):
        return fs.handler.original
    return fs


def _synchronous(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The same S3 filesystem without background writes (uploads in the calling thread)."""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    options = fs.__reduce__()[1][0]  # the constructor's keyword arguments, as pickled
    return pafs.S3FileSystem(**{**options, "background_writes": False})


def read_file(fs: pafs.FileSystem, path: str, label: str | None = None,
              window: float | None = None, raw: bool = False) -> bytes:
    """A whole file of `fs`: large objects in parallel ranged reads (PART each), each one
    retried on connection failures."""
    label, fs = label or path, _unwrapped(fs)
    window = retry_window() if window is None else window  # the reader threads get it passed

    def size() -> int:
        info = _lookup(fs, path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(path)
        return info.size

    n = retrying(label, "read", size, window, raw)
    if n <= PART:
        def whole() -> bytes:
            with fs.open_input_file(path) as f:
                return f.read_at(n, 0)  # one GET (a stream's read() makes one per 256 KB)
        return retrying(label, "read", whole, window, raw)
    buf = bytearray(n)

    def part(offset: int) -> None:
        def get() -> bytes:
            with fs.open_input_file(path) as f:
                return f.read_at(min(PART, n - offset), offset)
        data = retrying(label, "read", get, window, raw)
        buf[offset:offset + len(data)] = data

    with ThreadPoolExecutor(READERS) as pool:
        list(pool.map(part, range(0, n, PART)))
    return bytes(buf)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    return read_file(fs, path, uri)


def write_file(fs: pafs.FileSystem, path: str, data: bytes, local: bool,
               label: str | None = None, window: float | None = None,
               raw: bool = False) -> None:
    """Write a whole object, retried on connection failures. Local files go through a temp
    file + rename, so a reader never sees half a file; S3 PUTs (multipart ones included)
    are atomic by themselves."""
    fs = _unwrapped(fs)

    def write() -> None:
        if local:
            # Only local paths need parents. On S3, create_dir would PUT a marker object for
            # every level, prefixes above --storage included (which a bucket policy scoped to
            # the prefix rightly refuses).
            fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if local else path
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            if tmp != path:
                fs.move(tmp, path)
        except BaseException:
            if local and os.path.exists(tmp):
                os.remove(tmp)  # a full disk leaves no half-written file behind
            raise
    retrying(label or path, "write", write, window, raw)


def write_bytes(uri: str, data: bytes, window: float | None = None) -> None:
    fs, path = resolve(uri)
    write_file(fs, path, data, local=not is_remote(uri), label=uri, window=window)


def list_dir(uri: str) -> list[str]:
    """Names directly under a folder URI (empty if it does not exist)."""
    fs, path = resolve(uri)
    infos = retrying(uri, "listing", lambda: fs.get_file_info(
        pafs.FileSelector(path, allow_not_found=True)))
    return sorted(posixpath.basename(i.path) for i in infos)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)

    def delete() -> None:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    retrying(uri, "delete", delete)


def check_writable(uri: str) -> None:
    """Fail fast, naming the URI, if storage is unreachable, missing or read-only (no
    retries: this runs before anything starts, and a wrong endpoint should say so now)."""
    probe = join(uri, f".cifar-ray-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok", window=0)
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
