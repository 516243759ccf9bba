"""The model store: a verified local folder for a model reference.

``layer:<id>`` resolves to ``<models_root>/<id>`` (the model layer, /opt/models
in Lambda). ``s3://bucket/prefix/<id>/`` downloads into a /tmp cache: files go
to a private temporary folder, each is checked against the manifest's size and
sha256 while it streams, and only a complete, verified folder is renamed into
place. One lock (a thread lock plus ``flock`` on a file in the cache) makes two
callers that ask at once download once. Old cache entries are evicted, least
recently used first, when the cache budget or the disk is short.

Every fetch has a deadline (the caller's time left, else QUANTFN_MODEL_FETCH_TIMEOUT_MS):
botocore's timeouts apply per socket read and its retries multiply them, so each
object is read by a helper thread and the caller stops waiting when the deadline
passes. Every failure is ``ModelUnavailable`` (503): S3 unreachable, stalled or
reset, a file missing, tampered or truncated, a cache that cannot be written.
``forget`` drops a model that verified but would not load, so the next request
fetches it again.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantfn.config import Settings
from quantfn.errors import IntegrityError, ModelUnavailable, safe_reason
from quantfn.models.manifest import MANIFEST_NAME, Manifest, verify_file, verify_folder
from quantfn.models.reference import ModelRef
from quantfn.tracing import subsegment

logger = logging.getLogger(__name__)

_DISK_MARGIN = 16 * 1024 * 1024
_CHUNK = 1 << 20
_MAX_MANIFEST_BYTES = 8 * 1024 * 1024
_LOCK_POLL_S = 0.05
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # tmpfs and ext4 say ENOSPC for no free inodes as well
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("quantfn_fetch_deadline", default=None)
# Objects read whole in a ``fetch_deadline`` block, by (reference, name, sha256 or "" for the manifest).
_read_once: contextvars.ContextVar[dict[tuple[str, str, str], bytes] | None] = contextvars.ContextVar(
    "quantfn_read_once", default=None
)


@contextlib.contextmanager
def fetch_deadline(deadline_s: float | None) -> Iterator[None]:
    """One request's use of the store: fetches (and manifest reads) inside this block end by ``deadline_s`` on
    time.monotonic, unless given one, and an S3 model's manifest and tokenizer are each read once in it.

    ``quantfn.inference.run`` sets it from the request's time left, so code between it and the store
    (the registry) need not pass it along. A cold S3 model's first request names the model by its manifest,
    checks the tokenizer against it and fetches the files it lists: one GET of ``manifest.json``, not three,
    one of ``tokenizer.json``, not two, and every step sees the same version. The next request reads afresh.
    """
    token = _deadline.set(deadline_s if deadline_s is not None else _deadline.get())
    outer = _read_once.get()
    seen = _read_once.set({} if outer is None else outer)  # a block inside another is the same request
    try:
        yield
    finally:
        _deadline.reset(token)
        _read_once.reset(seen)


def _read_before(ref: ModelRef, name: str, sha256: str) -> bytes | None:
    """The object's bytes if this request (``fetch_deadline``'s block) already read it whole, else None."""
    seen = _read_once.get()
    return None if seen is None else seen.get((str(ref), name, sha256))


@dataclass(frozen=True)
class LocalModel:
    """A verified model folder. ``source`` is "layer", "s3" (downloaded now) or "cache"."""

    path: Path
    manifest: Manifest
    source: str


class ModelStore:
    """Resolves model references to verified local folders; safe across threads."""

    def __init__(self, settings: Settings, s3_client: Any | None = None) -> None:
        self.settings = settings
        self._s3_client = s3_client
        self._lock = threading.Lock()
        self._verified: dict[str, LocalModel] = {}

    def reset_clients(self) -> None:
        """Forget the S3 client (after a SnapStart restore its connections are stale)."""
        self._s3_client = None

    def fetch(self, ref: ModelRef, deadline_s: float | None = None) -> LocalModel:
        """Return the verified folder for ``ref``; raises ModelUnavailable (or IntegrityError).

        ``deadline_s`` is on ``time.monotonic``; without one the fetch gets QUANTFN_MODEL_FETCH_TIMEOUT_MS.
        """
        key = str(ref)
        deadline_s = self._deadline(deadline_s)
        if not self._lock.acquire(timeout=max(0.0, deadline_s - time.monotonic())):
            raise ModelUnavailable(f"model {ref.model_id} is being fetched by another request; out of time waiting")
        try:
            if key in self._verified:
                return self._verified[key]
            with subsegment("model_fetch", model=ref.model_id, source=ref.kind):
                local = self._fetch_layer(ref) if ref.kind == "layer" else self._fetch_s3(ref, deadline_s)
            self._verified[key] = local
            return local
        finally:
            self._lock.release()

    def _deadline(self, deadline_s: float | None) -> float:
        """The given deadline, else the enclosing ``fetch_deadline``; never past QUANTFN_MODEL_FETCH_TIMEOUT_MS."""
        longest = time.monotonic() + self.settings.runtime.model_fetch_timeout_ms / 1000
        chosen = deadline_s if deadline_s is not None else _deadline.get()
        return longest if chosen is None else min(chosen, longest)

    def forget(self, ref: ModelRef) -> None:
        """Drop ``ref``: its verified entry and, for S3, its cached folder; the next fetch starts over.

        For a model that verified but would not load (an unloadable file listed with its true sha256).
        """
        with self._lock:
            local = self._verified.pop(str(ref), None)
        if local is None or local.source == "layer":
            return
        try:
            with self._cache_lock(time.monotonic() + self.settings.runtime.model_fetch_timeout_ms / 1000):
                shutil.rmtree(local.path, ignore_errors=True)
        except (OSError, ModelUnavailable) as exc:  # the entry is gone from memory; a stale folder is re-verified
            logger.warning("could not remove cached model %s: %s", local.path.name, safe_reason(str(exc)))

    def read_manifest(self, ref: ModelRef, deadline_s: float | None = None) -> Manifest:
        """The model's manifest alone, unverified and without fetching its files (names, task, labels).

        A layer folder's file is read; an S3 model's ``manifest.json`` object is fetched (a few kB).
        """
        if ref.kind == "layer":
            manifest = Manifest.read(self._layer_folder(ref))
        else:
            data = self._manifest_bytes(ref, self._deadline(deadline_s))
            try:
                manifest = Manifest.from_dict(json.loads(data))
            except (ValueError, TypeError, RecursionError) as exc:
                raise ModelUnavailable(f"{ref}{MANIFEST_NAME} is not a valid manifest") from exc
        self._check_identity(ref, manifest)
        return manifest

    def read_verified(self, ref: ModelRef, name: str, deadline_s: float | None = None) -> tuple[Manifest, bytes]:
        """One small file of the model (its tokenizer.json) and the manifest it was checked against.

        Without the model's other files: the router counts tokens before it knows whether the request runs
        here, and a request sent to the GPU endpoint must not download an S3 model's weights. A folder already
        fetched and verified is read from; otherwise the manifest is read afresh (a layer file, or one small
        S3 object) and the file alone read and its size and sha256 checked (IntegrityError on a mismatch).
        """
        with self._lock:
            local = self._verified.get(str(ref))
        if local is not None:
            return local.manifest, (local.path / name).read_bytes()
        deadline_s = self._deadline(deadline_s)
        manifest = self.read_manifest(ref, deadline_s)
        entry = manifest.files.get(name)
        if entry is None:
            raise ModelUnavailable(f"model {ref.model_id} lists no {name}")
        if ref.kind == "layer":
            folder = self._layer_folder(ref)
            verify_file(folder, manifest, name)
            return manifest, (folder / name).read_bytes()
        return manifest, self._once(
            ref,
            name,
            entry.sha256,
            lambda: b"".join(self._verified_chunks(ref, name, entry.size, entry.sha256, deadline_s)),
        )

    # -- layer ---------------------------------------------------------------
    def _layer_folder(self, ref: ModelRef) -> Path:
        folder = self.settings.runtime.models_root / ref.model_id
        if not folder.is_dir():
            raise ModelUnavailable(f"model {ref.model_id} is not in the model layer (looked in {folder})")
        return folder

    def _fetch_layer(self, ref: ModelRef) -> LocalModel:
        folder = self._layer_folder(ref)
        manifest = Manifest.read(folder)
        self._check_identity(ref, manifest)
        verify_folder(folder, manifest)
        return LocalModel(folder, manifest, "layer")

    # -- S3 ------------------------------------------------------------------
    def _s3(self) -> Any:
        if self._s3_client is None:
            import boto3  # deferred: layer-only functions never pay for it
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "max_attempts": 3},
                connect_timeout=self.settings.runtime.s3_connect_timeout_ms / 1000,
                read_timeout=self.settings.runtime.s3_read_timeout_ms / 1000,
            )
            self._s3_client = boto3.client("s3", config=config)
        return self._s3_client

    def _fetch_s3(self, ref: ModelRef, deadline_s: float) -> LocalModel:
        manifest_bytes = self._manifest_bytes(ref, deadline_s)
        try:
            data = json.loads(manifest_bytes)
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
            raise ModelUnavailable(f"{ref}{MANIFEST_NAME} is not valid JSON") from exc
        if not isinstance(data, dict):
            raise ModelUnavailable(f"{ref}{MANIFEST_NAME} is not a JSON object")
        manifest = Manifest.from_dict(data)
        self._check_identity(ref, manifest)
        # The manifest's own hash names the cache entry: a new model version under
        # the same prefix gets a new entry instead of mixing files of two versions.
        entry = f"{ref.model_id}-{hashlib.sha256(manifest_bytes).hexdigest()[:16]}"
        try:
            with self._cache_lock(deadline_s):
                return self._into_cache(ref, manifest, manifest_bytes, entry, deadline_s)
        except OSError as exc:  # the cache cannot be written: read-only, under a file, no space or no inodes
            raise self._cache_failure(ref, exc) from exc

    def _into_cache(
        self, ref: ModelRef, manifest: Manifest, manifest_bytes: bytes, entry: str, deadline_s: float
    ) -> LocalModel:
        """Under the cache lock: the verified cache entry, downloading it first when it is absent or damaged."""
        cache = self.settings.runtime.cache_dir
        final = cache / entry
        if final.is_dir():
            try:
                verify_folder(final, manifest)
                os.utime(final)
                return LocalModel(final, manifest, "cache")
            except IntegrityError:
                logger.warning("cached model %s failed verification; downloading again", entry)
                shutil.rmtree(final, ignore_errors=True)
        self._make_room(manifest.total_size, keep=entry)
        partial = cache / f".partial-{entry}-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        try:
            for name, expected in manifest.files.items():
                self._download_verified(ref, name, partial / name, expected.size, expected.sha256, deadline_s)
            (partial / MANIFEST_NAME).write_bytes(manifest_bytes)
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return LocalModel(final, manifest, "s3")

    def _cache_failure(self, ref: ModelRef, exc: OSError) -> ModelUnavailable:
        if exc.errno in _NO_SPACE:
            return ModelUnavailable(
                f"no space or no free inodes in QUANTFN_CACHE_DIR for model {ref.model_id}; "
                "raise the function's EphemeralStorage"
            )
        return ModelUnavailable(
            f"QUANTFN_CACHE_DIR cannot hold model {ref.model_id}: {exc.strerror or exc.__class__.__name__}; "
            "it must be a writable folder (Lambda: under /tmp)"
        )

    def _manifest_bytes(self, ref: ModelRef, deadline_s: float) -> bytes:
        """The S3 model's ``manifest.json``: read once inside a ``fetch_deadline`` block, else each time."""
        return self._once(ref, MANIFEST_NAME, "", lambda: self._read_object(ref, MANIFEST_NAME, deadline_s))

    @staticmethod
    def _once(ref: ModelRef, name: str, sha256: str, read: Callable[[], bytes]) -> bytes:
        """``read()``'s bytes, kept to the end of the enclosing ``fetch_deadline`` block (none: read each time)."""
        data = _read_before(ref, name, sha256)
        if data is None:
            data = read()
            seen = _read_once.get()
            if seen is not None:
                seen[(str(ref), name, sha256)] = data
        return data

    def _read_object(self, ref: ModelRef, name: str, deadline_s: float) -> bytes:
        """A small object (the manifest) whole; ModelUnavailable if S3 fails or the deadline passes."""
        data = bytearray()
        for chunk in self._stream(ref, name, deadline_s, missing=f"cannot read s3://{ref.bucket}/{ref.prefix}{name}"):
            data += chunk
            if len(data) > _MAX_MANIFEST_BYTES:
                raise ModelUnavailable(f"{ref}{name} is over {_MAX_MANIFEST_BYTES} bytes: not a manifest")
        return bytes(data)

    def _stream(self, ref: ModelRef, name: str, deadline_s: float, *, missing: str) -> Iterator[bytes]:
        """The chunks of one object, each within the deadline; S3's errors become ModelUnavailable."""
        from botocore.exceptions import BotoCoreError, ClientError

        reader = _ObjectReader(self._s3(), ref.bucket, ref.prefix + name)
        try:
            yield from reader.chunks(deadline_s)
        except _Expired:
            raise ModelUnavailable(
                f"S3 did not deliver {name} of model {ref.model_id} in the time left; stalled or too slow",
                code="model_fetch_timeout",
            ) from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "ClientError")
            raise ModelUnavailable(f"{missing}: {code}") from exc
        except (BotoCoreError, OSError) as exc:
            raise ModelUnavailable(f"download of {name} for {ref.model_id} failed: {exc.__class__.__name__}") from exc

    def _download_verified(
        self, ref: ModelRef, name: str, target: Path, size: int, sha256: str, deadline_s: float
    ) -> None:
        """Stream one object to ``target`` while hashing it; raise IntegrityError on any mismatch. One this
        request already read whole and verified against the same size and sha256 (the tokenizer) is written."""
        data = _read_before(ref, name, sha256)
        if data is not None and len(data) == size:
            target.write_bytes(data)
            return
        with target.open("wb") as out:
            for chunk in self._verified_chunks(ref, name, size, sha256, deadline_s):
                out.write(chunk)

    def _verified_chunks(self, ref: ModelRef, name: str, size: int, sha256: str, deadline_s: float) -> Iterator[bytes]:
        """One object's chunks, hashed as they stream; IntegrityError (after the last) on any mismatch."""
        digest = hashlib.sha256()
        written = 0
        missing = f"model {ref.model_id} is incomplete in S3: {name}"
        for chunk in self._stream(ref, name, deadline_s, missing=missing):
            digest.update(chunk)
            written += len(chunk)
            if written > size:
                break
            yield chunk
        if written != size:
            raise IntegrityError(
                f"model {ref.model_id} is incomplete or altered: {name} has {'more than ' if written > size else ''}"
                f"{written} bytes in S3, manifest says {size}"
            )
        if digest.hexdigest() != sha256:
            raise IntegrityError(f"model {ref.model_id} failed verification: sha256 of {name} does not match")

    @contextlib.contextmanager
    def _cache_lock(self, deadline_s: float) -> Iterator[None]:
        cache = self.settings.runtime.cache_dir
        cache.mkdir(parents=True, exist_ok=True)
        with (cache / ".lock").open("w") as handle:
            # Another process (a second worker sharing /tmp) may hold it: wait no longer than the deadline.
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() + _LOCK_POLL_S > deadline_s:
                        raise ModelUnavailable("the model cache is locked by another process; out of time") from None
                    time.sleep(_LOCK_POLL_S)
            try:
                # Under the lock nobody else is downloading: leftovers are from a crash.
                for stale in cache.glob(".partial-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _make_room(self, needed: int, keep: str) -> None:
        """Evict least recently used entries until ``needed`` bytes fit the budget and the disk."""
        cache = self.settings.runtime.cache_dir
        entries = []
        for path in cache.iterdir():
            if path.is_dir() and not path.name.startswith(".") and path.name != keep:
                size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
                entries.append((path.stat().st_mtime, size, path))
        entries.sort()
        budget = self.settings.runtime.cache_max_bytes
        if needed > budget:
            raise ModelUnavailable(
                f"model needs {needed // 2**20} MB, over the cache budget QUANTFN_CACHE_MAX_MB={budget // 2**20}"
            )
        used = sum(size for _, size, _ in entries)

        def short() -> bool:
            return used + needed > budget or shutil.disk_usage(cache).free < needed + _DISK_MARGIN

        while entries and short():
            _, size, path = entries.pop(0)
            logger.info("evicting cached model %s (%d bytes)", path.name, size)
            shutil.rmtree(path, ignore_errors=True)
            used -= size
        if shutil.disk_usage(cache).free < needed + _DISK_MARGIN:
            free = shutil.disk_usage(cache).free
            raise ModelUnavailable(
                f"not enough space in the cache for model: need {needed // 2**20} MB, {free // 2**20} MB free; "
                "raise the function's EphemeralStorage"
            )

    @staticmethod
    def _check_identity(ref: ModelRef, manifest: Manifest) -> None:
        if manifest.model_id != ref.model_id:
            raise IntegrityError(f"manifest names model {manifest.model_id}, reference {ref} names {ref.model_id}")


class _Expired(Exception):
    """The deadline passed before the object arrived."""


_END = object()


class _ObjectReader:
    """One S3 GetObject, read by a helper thread so that the caller can stop waiting at its deadline.

    The caller takes chunks from a small queue. When its deadline passes it abandons the helper
    and shuts the helper's socket down, so a stalled or trickling server keeps no thread for long;
    the caller writes every file itself, so nothing is written after it gave up.
    """

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self._client, self._bucket, self._key = client, bucket, key
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        self._body: Any = None
        threading.Thread(target=self._run, name="s3-read", daemon=True).start()

    def _run(self) -> None:
        try:
            self._body = self._client.get_object(Bucket=self._bucket, Key=self._key)["Body"]
            for chunk in self._body.iter_chunks(_CHUNK):
                if not self._put(chunk):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the caller, which raises it
            self._put(exc)
        finally:
            if self._body is not None:
                self._body.close()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def chunks(self, deadline_s: float) -> Iterator[bytes]:
        """The object's chunks; raises what the helper raised, or _Expired at the deadline."""
        done = False
        try:
            while True:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline_s - time.monotonic()))
                except queue.Empty:
                    self._abandon()
                    raise _Expired from None
                if item is _END:
                    done = True
                    return
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
        finally:
            self._stop.set()  # a caller that stopped early (a file over its size) frees the helper too
            if not done:
                self._abandon()

    def _abandon(self) -> None:
        self._stop.set()
        sock = _socket_of(self._body)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # unblocks the helper's recv at once


def _socket_of(body: Any) -> socket.socket | None:
    """The socket under a botocore StreamingBody (urllib3 2.x), or None when it cannot be found."""
    raw = getattr(body, "_raw_stream", None)
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None
