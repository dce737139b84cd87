"""Where bytes live: local paths and `s3://bucket/prefix` URLs behind one small API.

Everything that reads or writes shards, manifests, corpora, run directories, pages and the model
registry goes through these functions, so no other module branches on the kind of URL. S3 goes
through boto3 with the standard credential chain; `AWS_ENDPOINT_URL` (read natively by boto3)
points it at an S3-compatible server. Credentials are never taken from arguments, configs or
logged.

Importing this module registers an `s3` scheme in `webdataset.gopen_schemes` (webdataset has
none), so `s3://` shard URLs stream through the same reader as `open_read`, which resumes a body
that breaks mid-transfer with a ranged GET from the byte it reached. Registration happens at
import time on purpose: DataLoader workers started with spawn/forkserver re-import modules and
would lose a handler installed inside a function.

Bad input (a bucket that does not exist, an unreachable endpoint, missing credentials) raises
`UserError` with one line naming the URL; a missing object raises `FileNotFoundError`.

One module, longer than most, on purpose: each operation is written once for both kinds of URL,
side by side, which is the point of the module.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import io
import logging
import mimetypes
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

import boto3
import botocore.config
import urllib3.exceptions
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from webdataset.gopen import gopen_schemes

from composeae.errors import UserError

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
# Consecutive broken reads without progress before an S3 stream gives up.
MAX_RESUMES = 5
# Read buffer of streams: tar members are read in small pieces; S3 pays per round trip.
READ_BUFFER = 1 << 20

# Errors that mean "the connection broke while the body was streaming", not "the request failed".
_BROKEN_BODY = (
    ResponseStreamingError,
    ReadTimeoutError,
    IncompleteReadError,
    ConnectionClosedError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
)

_clients: dict[tuple, object] = {}
_session: boto3.session.Session | None = None
_session_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # A lock held by another thread at fork time would stay locked forever in the child.
    global _session_lock
    _session_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def is_s3(url: str) -> bool:
    return url.startswith(S3_SCHEME)


def split_s3(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    bucket, _, key = url[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise UserError(f"bad S3 URL {url!r}: expected s3://bucket/prefix")
    return bucket, key.strip("/")


def join(url: str, *names: str) -> str:
    """Append path components; S3 keys always use '/'."""
    if is_s3(url):
        return "/".join([url.rstrip("/"), *names])
    return os.path.join(url, *names)


def absolute_url(url: str) -> str:
    """A local path made absolute (Ray workers and Tune trials do not run in the caller's
    directory); `s3://` URLs unchanged."""
    return url if is_s3(url) else os.path.realpath(url)


def s3_client():
    """The process's S3 client.

    Cached per process id because a client (its connection pool) must not cross a fork, and
    per endpoint so that changing `AWS_ENDPOINT_URL` (tests, proxies) takes effect. The
    session behind the clients is shared and does cross forks: it holds the parsed service
    model, which costs ~0.1 s of CPU to load, and DataLoader workers start every epoch.
    """
    global _session
    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"))
    client = _clients.get(key)
    if client is None:
        config = botocore.config.Config(
            # Adaptive mode backs off client-side on 503 SlowDown (S3 throttles per prefix).
            retries={"mode": "adaptive",
                     "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", 8))},
            connect_timeout=10,
            read_timeout=60,
        )
        # Sessions are not thread-safe: create clients from ours one at a time.
        with _session_lock:
            if _session is None:
                _session = boto3.session.Session()
            client = _session.client("s3", config=config)
        _clients[key] = client
    return client


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextmanager
def _s3_errors(url: str) -> Iterator[None]:
    """Turn the S3 failures a user can fix into one-line `UserError`s naming `url`."""
    try:
        yield
    except NoCredentialsError:
        raise UserError(f"no AWS credentials for {url} (set them through the standard credential "
                        f"chain: environment, config files or an instance role)") from None
    except (EndpointConnectionError, ConnectTimeoutError) as exc:
        raise UserError(f"cannot reach the S3 endpoint for {url}: {exc}") from None
    except ClientError as exc:
        code = _error_code(exc)
        if code == "NoSuchBucket":
            raise UserError(f"bucket {split_s3(url)[0]!r} does not exist ({url})") from None
        if code in ("NoSuchKey", "404"):
            raise FileNotFoundError(url) from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise UserError(f"access denied to {url} ({code})") from None
        raise


def _check_bucket(url: str) -> None:
    """Raise `UserError` when the bucket of `url` does not exist (a 404 alone does not say)."""
    bucket, _ = split_s3(url)
    try:
        with _s3_errors(url):
            s3_client().head_bucket(Bucket=bucket)
    except FileNotFoundError:
        raise UserError(f"bucket {bucket!r} does not exist ({url})") from None


def exists(url: str) -> bool:
    if not is_s3(url):
        return os.path.exists(url)
    bucket, key = split_s3(url)
    try:
        with _s3_errors(url):
            s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except FileNotFoundError:
        _check_bucket(url)
        return False


def read_bytes(url: str) -> bytes:
    with open_read(url) as stream:
        return stream.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def _put_object(url: str, data: bytes, **condition: str) -> bool:
    """One S3 PUT of a whole object; with a condition (`IfNoneMatch="*"`, `IfMatch=etag`), False
    when the condition does not hold."""
    bucket, key = split_s3(url)
    # A content type by extension, so a report or sweep page opened from a bucket (or a
    # presigned link) shows in the browser instead of downloading.
    kind = mimetypes.guess_type(key)[0] or "application/octet-stream"
    try:
        with _s3_errors(url):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=kind,
                                   **condition)
    except FileNotFoundError:  # If-Match on an object deleted since it was read
        return False
    except ClientError as exc:
        # 412: the condition failed; 409: a concurrent conditional write is in flight.
        if condition and _error_code(exc) in ("PreconditionFailed", "412",
                                              "ConditionalRequestConflict", "409"):
            return False
        raise
    return True


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object atomically: readers see the old content or the new, never a part."""
    if is_s3(url):
        _put_object(url, data)
        return
    tmp = _local_tmp_name(url)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def create_exclusive(url: str, data: bytes) -> bool:
    """Write a whole object only if none exists at `url`; False when one already does.

    Two writers racing for the same name: exactly one gets True. On S3 this is a conditional
    write (`If-None-Match: *`, honoured by S3 since 2024 and by moto); locally the content is
    written to a temp name and hard-linked into place (`link` fails when the name exists), so
    the object appears whole or not at all.
    """
    if is_s3(url):
        return _put_object(url, data, IfNoneMatch="*")
    tmp = _local_tmp_name(url)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.link(tmp, url)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def read_tagged(url: str) -> tuple[bytes | None, str | None]:
    """The object's bytes and a tag for `replace_if` ((None, None) when there is none)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            with _s3_errors(url):
                response = s3_client().get_object(Bucket=bucket, Key=key)
        except FileNotFoundError:
            _check_bucket(url)
            return None, None
        return response["Body"].read(), response["ETag"]
    try:
        with open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, None
    # The content's hash: what was read is what the tag vouches for (a stat taken after the
    # read could already describe a newer file).
    return data, hashlib.sha256(data).hexdigest()


def replace_if(url: str, data: bytes, tag: str | None) -> bool:
    """Compare and swap: write `data` only if the object is still the one `read_tagged` returned
    with `tag` (None: only if there is still no object). False when someone wrote in between.

    S3: `If-Match: <ETag>` / `If-None-Match: *`. Locally: under an exclusive `flock` on a
    sibling lock file, the content's hash is checked and the new content renamed into place.
    Callers keep a revision number in the object, so equal content means no write in between.
    """
    if tag is None:
        return create_exclusive(url, data)
    if is_s3(url):
        return _put_object(url, data, IfMatch=tag)
    lock_path = os.path.join(os.path.dirname(os.path.abspath(url)),
                             f".{os.path.basename(url)}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if read_tagged(url)[1] != tag:
            return False
        write_bytes(url, data)
        return True


def list_files(url: str) -> list[str]:
    """Relative names of every file (object) under `url`, recursively, sorted."""
    if not is_s3(url):
        return sorted(os.path.relpath(os.path.join(root, name), url)
                      for root, _, names in os.walk(url) for name in names)
    bucket, key = split_s3(url)
    prefix = f"{key.rstrip('/')}/" if key else ""
    names: list[str] = []
    with _s3_errors(url):
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                          Prefix=prefix):
            # Keys ending in "/" are folder markers (pyarrow's S3 filesystem, which Ray Train
            # writes checkpoints with, makes them), not files.
            names += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])
                      if not obj["Key"].endswith("/")]
    return sorted(names)


def copy_tree(src: str, dst: str, after_each=None) -> list[str]:
    """Copy every file under `src` to the same relative names under `dst` (local or S3 on
    either side, each file written whole); returns the relative names copied. `after_each(name)`
    runs after each file (fault drills)."""
    names = list_files(src)
    for name in names:
        write_bytes(join(dst, *name.split("/")), read_bytes(join(src, *name.split("/"))))
        if after_each is not None:
            after_each(name)
    return names


def _local_tmp_name(path: str) -> str:
    """A sibling temp name (same filesystem, so `os.replace` is atomic); creates the parent."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    unique = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return os.path.join(parent, f".{os.path.basename(path)}.tmp-{unique}")


def upload_file(local_path: str, url: str) -> None:
    """Copy a local file to `url` (atomically: a local replace, or one S3 object write)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            with _s3_errors(url):
                s3_client().upload_file(local_path, bucket, key)
        except boto3.exceptions.S3UploadFailedError:
            _check_bucket(url)
            raise
        return
    tmp = _local_tmp_name(url)
    try:
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove(url: str) -> None:
    """Delete one object or file; a missing one is not an error."""
    if is_s3(url):
        bucket, key = split_s3(url)
        with _s3_errors(url):
            s3_client().delete_object(Bucket=bucket, Key=key)
    elif os.path.exists(url):
        os.remove(url)


def listdir(url: str) -> list[str]:
    """Sorted names directly under `url` (objects and sub-prefixes); [] when there is nothing."""
    if not is_s3(url):
        return sorted(os.listdir(url)) if os.path.isdir(url) else []
    bucket, key = split_s3(url)
    prefix = f"{key}/" if key else ""
    names: list[str] = []
    with _s3_errors(url):
        pages = s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, Delimiter="/")
        for page in pages:
            names += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])
                      if not obj["Key"].endswith("/")]  # a folder marker, as in list_files
            names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return sorted(names)


def open_read(url: str) -> IO[bytes]:
    """A buffered binary stream over the whole object; S3 streams survive broken connections."""
    if not is_s3(url):
        return open(url, "rb", buffering=READ_BUFFER)
    return io.BufferedReader(S3RangeReader(url), buffer_size=READ_BUFFER)


class S3RangeReader(io.RawIOBase):
    """A raw stream over one S3 object that resumes where it broke.

    When the body's connection breaks (or ends early), the reader issues a new GET with
    `Range: bytes=<offset>-` and `If-Match: <etag>` from the first byte it has not delivered,
    so no byte is lost or repeated and a replaced object is detected rather than spliced.
    It gives up after `MAX_RESUMES` consecutive failures without progress.
    """

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.bucket, self.key = split_s3(url)
        self.resumes = 0
        self._offset = 0
        self._failures = 0
        self._etag = None
        self._body, self._size = self._get(0)

    def _get(self, offset: int):
        params = {"Bucket": self.bucket, "Key": self.key}
        if offset:
            params.update(Range=f"bytes={offset}-", IfMatch=self._etag)
        with _s3_errors(self.url):
            response = s3_client().get_object(**params)
        self._etag = response["ETag"]
        return response["Body"], offset + response["ContentLength"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._offset >= self._size or len(buffer) == 0:
            return 0
        while True:
            try:
                n = self._body.readinto(buffer)
                if n == 0:
                    raise IncompleteReadError(actual_bytes=self._offset, expected_bytes=self._size)
            except _BROKEN_BODY as exc:
                self._resume(exc)
                continue
            self._offset += n
            self._failures = 0
            return n

    def _resume(self, error: Exception) -> None:
        self._failures += 1
        if self._failures > MAX_RESUMES:
            raise OSError(f"reading {self.url} failed at byte {self._offset} of {self._size} "
                          f"after {MAX_RESUMES} resumed GETs: {error}") from error
        log.warning("S3 read of %s broke at byte %d of %d (%s); resuming with a ranged GET",
                    self.url, self._offset, self._size, error)
        self._body.close()
        # Short backoff: a broken connection is often a transient network or server event.
        time.sleep(0.05 * 2 ** (self._failures - 1))
        self.resumes += 1
        try:
            self._body, _ = self._get(self._offset)
        except ClientError as exc:
            if _error_code(exc) in ("PreconditionFailed", "412"):
                raise OSError(f"{self.url} changed while it was being read") from None
            raise

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> IO[bytes]:
    """webdataset's opener for `s3://` URLs (read-only: shards are written by `upload_file`)."""
    if mode != "rb":
        raise ValueError(f"s3 URLs open for reading only, not mode {mode!r}: {url}")
    return open_read(url)


gopen_schemes["s3"] = _gopen_s3
