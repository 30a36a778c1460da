"""Paths and files on a local disk or in a bucket: the one module that knows the difference.

    from lwm import storage
    storage.write_bytes("gs://bucket/run/metadata.pkl", data)   # one whole object, atomically
    with storage.open_file("gs://bucket/run/streaming_params", "rb") as f: ...
    storage.listdir("gs://bucket/run")  ->  ['metadata.pkl', 'streaming_params', ...]

A path with a scheme (`gs://`, `s3://`, `memory://`, any fsspec URL) goes through fsspec: GCS needs
`pip install -e '.[gcs]'` (gcsfs), S3 `pip install -e '.[s3]'` (s3fs). Anything else is a local path
and goes through `os`, with the guarantees a local disk gives (fsync, atomic rename).

Why fsspec and not etils.epath: the data loaders already read fsspec URLs, fsspec's gcsfs and
s3fs clients take their credentials and endpoints from the usual places (gcloud's application
default credentials, `STORAGE_EMULATOR_HOST`, AWS variables), and fsspec exposes what a commit
protocol needs (single-object writes, server-side copy, listing) without a TensorFlow dependency.

What an object store gives, and what the rest of the code may rely on:
  - a written object appears whole or not at all (a killed upload leaves nothing): `write_bytes`
    and `AtomicWriter` are atomic on both kinds of storage;
  - there is no atomic rename: `rename` is a server-side copy then a delete, so a commit never
    rests on a rename (lwm.checkpoint commits with one small object written last);
  - there is no lock and no append: lwm.run_folder builds a lease from whole-object writes, and
    lwm.logger rewrites metrics.jsonl whole.
Errors name the URL: a missing object is `FileNotFoundError('gs://b/x: no such file or object')`,
missing credentials or access is a PermissionError saying which.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from typing import IO, Iterator

EXTRAS = {"gs": "gcs", "gcs": "gcs", "s3": "s3", "s3a": "s3"}
_CLIENT_MODULES = {"fsspec", "gcsfs", "s3fs", "aiohttp", "google", "botocore", "aiobotocore", "requests", "urllib3"}


def is_remote(path: str) -> bool:
    """A URL with a scheme other than file:// (gs://, s3://, memory://, ...)."""
    return "://" in str(path) and not str(path).startswith("file://")


def _local(path: str) -> str:
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


def join(base: str, *names: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(n.strip("/") for n in names)])
    return os.path.join(_local(base), *names)


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(_local(path))


def dirname(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(_local(path))


def display(path: str) -> str:
    """How a path is shown in messages (an absolute path for a local one)."""
    return str(path) if is_remote(path) else os.path.abspath(_local(path))


# ---- remote file systems --------------------------------------------------------------------


def _filesystem(url: str):
    """(fsspec file system, path inside it) of a URL; a missing client library is one line."""
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with datasets/huggingface_hub
        raise ImportError(f"{url}: remote paths need fsspec: pip install fsspec") from None
    scheme = str(url).split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError:
        extra = EXTRAS.get(scheme)
        hint = f"pip install -e '.[{extra}]'" if extra else f"install the fsspec client for {scheme}://"
        raise ImportError(f"{url}: {scheme}:// paths need a client library that is not installed: {hint}") from None
    return fs, path


@contextlib.contextmanager
def _remote_errors(url: str) -> Iterator[None]:
    """The client's exceptions as one line naming the URL (not the REST endpoint)."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such file or object") from None
    except PermissionError as e:
        raise PermissionError(f"{url}: access denied ({_first_line(e)}); check the credentials of this "
                              "machine (gcloud auth application-default login, or the VM's service account)") from None
    except OSError:
        raise
    except Exception as e:  # credentials missing, HTTP errors: gcsfs/google-auth raise their own types
        if type(e).__module__.split(".")[0] not in _CLIENT_MODULES:
            raise  # not the storage client's (a parser reading the file, ...): the caller's business
        name = type(e).__name__
        if "Credential" in name or "Auth" in name or "Refresh" in name:
            raise PermissionError(f"{url}: no usable credentials ({name}: {_first_line(e)}); run gcloud auth "
                                  "application-default login or use a VM with a service account") from None
        raise OSError(f"{url}: {name}: {_first_line(e)}") from None


@contextlib.contextmanager
def translate_errors(path: str) -> Iterator[None]:
    """Around reads and writes of an open remote file: its client's errors as OSErrors naming the
    URL (a local path's errors are already OSErrors naming the file)."""
    if not is_remote(path):
        yield
        return
    with _remote_errors(path):
        yield


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# ---- the operations -------------------------------------------------------------------------


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(_local(path))
    fs, inner = _filesystem(path)
    with _remote_errors(path):
        fs.invalidate_cache()  # another host may have written it since our last listing
        return fs.exists(inner)


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(_local(path))
    fs, inner = _filesystem(path)
    with _remote_errors(path):
        fs.invalidate_cache()
        return fs.isfile(inner)


def isdir(path: str) -> bool:
    """A local folder, or a bucket prefix that holds at least one object (or the bucket itself)."""
    if not is_remote(path):
        return os.path.isdir(_local(path))
    fs, inner = _filesystem(path)
    with _remote_errors(path):
        fs.invalidate_cache()
        return fs.isdir(inner)


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(_local(path))
    fs, inner = _filesystem(path)
    with _remote_errors(path):
        fs.invalidate_cache()  # a listing cached earlier holds the size an object had then
        return int(fs.size(inner))


def listdir(folder: str) -> list[str]:
    """Names (not paths) directly inside a folder or bucket prefix; [] when there is none."""
    if not is_remote(folder):
        return sorted(os.listdir(_local(folder))) if os.path.isdir(_local(folder)) else []
    fs, inner = _filesystem(folder)
    with _remote_errors(folder):
        fs.invalidate_cache()
        try:
            entries = fs.ls(inner, detail=False)
        except FileNotFoundError:
            return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != inner.rstrip("/")})


def makedirs(folder: str) -> None:
    """A local folder (and its parents); a bucket needs none: prefixes exist when objects do."""
    if not is_remote(folder):
        os.makedirs(_local(folder), exist_ok=True)


def remove(path: str) -> None:
    """Delete a file or object; one that is already gone is fine."""
    if not is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_local(path))
        return
    fs, inner = _filesystem(path)
    with contextlib.suppress(FileNotFoundError), _remote_errors(path):
        fs.rm_file(inner)


def rmtree(folder: str) -> None:
    if not is_remote(folder):
        shutil.rmtree(_local(folder), ignore_errors=True)
        return
    fs, inner = _filesystem(folder)
    with contextlib.suppress(FileNotFoundError), _remote_errors(folder):
        fs.rm(inner, recursive=True)


def read_bytes(path: str) -> bytes:
    """A whole file or object. In a bucket one GET of the object, so the bytes are one version of
    it: an open file takes the size from the object's metadata and then reads ranges, and an
    object replaced in between (a lease renewed by another host) comes back cut or mixed."""
    if not is_remote(path):
        with open(_local(path), "rb") as f:
            return f.read()
    fs, inner = _filesystem(path)
    with _remote_errors(path):
        return fs.cat_file(inner)


def read_text(path: str) -> str:
    """UTF-8 text as `open(path, encoding="utf-8").read()` gives it (universal newlines)."""
    with io.TextIOWrapper(io.BytesIO(read_bytes(path)), encoding="utf-8") as f:
        return f.read()


def content_sha256(path: str, chunk_bytes: int = 1 << 24) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks (a local file or an object in a bucket:
    a copy keeps its hash wherever it lies)."""
    digest = hashlib.sha256()
    with open_file(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_bytes(path: str, data: bytes) -> None:
    """Replace `path` by `data` as a whole: readers see the old content or the new, never a part."""
    with AtomicWriter(path) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def rename(src: str, dst: str) -> None:
    """Move a file over another. Atomic on a local disk; in a bucket a server-side copy then a
    delete (two steps: callers that need atomicity commit with a separate marker)."""
    if not is_remote(src):
        os.replace(_local(src), _local(dst))
        return
    fs, inner_src = _filesystem(src)
    _, inner_dst = _filesystem(dst)
    with _remote_errors(src):
        fs.copy(inner_src, inner_dst)  # not fs.mv: gcsfs's moveTo is not served everywhere
        fs.rm_file(inner_src)


def sync_folder(folder: str) -> None:
    """Make renames in a local folder durable (fsync of the folder); nothing to do in a bucket."""
    if is_remote(folder):
        return
    try:
        fd = os.open(_local(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_file(path: str, mode: str = "rb") -> Iterator[IO]:
    """`open` for local paths and URLs. Writing a URL directly is not atomic across a failure in
    the middle on every store: use `AtomicWriter` (or `write_bytes`) to write."""
    if not is_remote(path):
        with open(_local(path), mode) as f:
            yield f
        return
    fs, inner = _filesystem(path)
    with _remote_errors(path):
        fs.invalidate_cache()  # reads take the object's size from a listing: never a stale one
        f = fs.open(inner, mode)
    with f:
        yield f


@contextlib.contextmanager
def local_copy(path: str, suffix: str = "") -> Iterator[str]:
    """A local file path with the content of `path` (itself when it is local), for libraries
    that only open local files (sentencepiece, decord, PIL at a path)."""
    if not is_remote(path):
        yield _local(path)
        return
    data = read_bytes(path)
    fd, tmp = tempfile.mkstemp(suffix=suffix or os.path.splitext(basename(path))[1], prefix="lwm-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class AtomicWriter:
    """`with AtomicWriter(path) as f:` writes a whole file that appears only if the block ends
    without an exception. Locally: a temp file, flushed, fsynced and renamed into place. In a
    bucket: one object upload, which the store finalises only on success (an upload cut off by
    an error or a kill leaves no object and the previous one untouched)."""

    def __init__(self, path: str, mode: str = "wb"):
        self.path = str(path)
        self.mode = mode
        self.remote = is_remote(self.path)
        self.tmp = self.path if self.remote else f"{_local(self.path)}.tmp.{os.getpid()}"

    def __enter__(self):
        if self.remote:
            fs, inner = _filesystem(self.path)
            with _remote_errors(self.path):
                self.file = fs.open(inner, self.mode)
            return self.file
        os.makedirs(os.path.dirname(os.path.abspath(self.tmp)), exist_ok=True)
        self.file = open(self.tmp, self.mode)
        return self.file

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._discard()
            return False
        try:
            if self.remote:
                with _remote_errors(self.path):
                    self.file.close()  # the upload is finalised here, or fails as a whole
                return False
            self.file.flush()  # a full disk often shows here, not at write()
            os.fsync(self.file.fileno())
            self.file.close()
        except BaseException:
            self._discard()
            raise
        os.replace(self.tmp, _local(self.path))
        sync_folder(os.path.dirname(os.path.abspath(_local(self.path))))
        return False

    def _discard(self) -> None:
        if self.remote:
            with contextlib.suppress(Exception):
                # An unfinished upload never becomes an object. S3 keeps its parts until they are
                # aborted (discard does that); GCS drops an unfinished resumable upload by itself,
                # so gcsfs's cancel request, which some GCS-compatible servers do not serve, is skipped.
                discard = getattr(self.file, "discard", None)
                if discard is not None and not str(self.path).startswith(("gs://", "gcs://")):
                    discard()
                self.file.closed = True  # never close(): that would upload what was buffered
            return
        try:
            self.file.close()  # may fail again flushing the buffer to a full disk
        except OSError:
            pass
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
