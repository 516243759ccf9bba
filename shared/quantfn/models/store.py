"""The model store: a verified local folder for a model reference.

``layer:<id>`` resolves to ``<models_root>/<id>`` (the model layer, /opt/models
in Lambda). ``s3://bucket/prefix/<id>/`` downloads into a /tmp cache: files go
to a private temporary folder, each is checked against the manifest's size and
sha256 while it streams, and only a complete, verified folder is renamed into
place. One lock (a thread lock plus ``flock`` on a file in the cache) makes two
callers that ask at once download once. Old cache entries are evicted, least
recently used first, when the cache budget or the disk is short.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantfn.config import Settings
from quantfn.errors import IntegrityError, ModelUnavailable
from quantfn.models.manifest import MANIFEST_NAME, Manifest, verify_folder
from quantfn.models.reference import ModelRef

logger = logging.getLogger(__name__)

_DISK_MARGIN = 16 * 1024 * 1024
_CHUNK = 1 << 20


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

    def fetch(self, ref: ModelRef) -> LocalModel:
        """Return the verified folder for ``ref``; raises ModelUnavailable (or IntegrityError)."""
        key = str(ref)
        with self._lock:
            if key in self._verified:
                return self._verified[key]
            local = self._fetch_layer(ref) if ref.kind == "layer" else self._fetch_s3(ref)
            self._verified[key] = local
            return local

    def read_manifest(self, ref: ModelRef) -> Manifest:
        """The model's manifest alone, unverified and without fetching its files (names, task, labels).

        A layer folder's file is read; an S3 model's ``manifest.json`` object is fetched (a few kB).
        """
        if ref.kind == "layer":
            folder = self.settings.models_root / ref.model_id
            if not folder.is_dir():
                raise ModelUnavailable(f"model {ref.model_id} is not in the model layer (looked in {folder})")
            manifest = Manifest.read(folder)
        else:
            data = self._read_object(ref, MANIFEST_NAME)
            try:
                manifest = Manifest.from_dict(json.loads(data))
            except (ValueError, TypeError, RecursionError) as exc:
                raise ModelUnavailable(f"{ref}{MANIFEST_NAME} is not a valid manifest") from exc
        self._check_identity(ref, manifest)
        return manifest

    def forget(self, ref: ModelRef) -> None:
        """Drop what is known of ``ref``: the verified entry and, for S3, its cached folders (a model that
        failed to load is fetched and verified afresh next time)."""
        with self._lock:
            local = self._verified.pop(str(ref), None)
        if local is not None and local.source != "layer":
            shutil.rmtree(local.path, ignore_errors=True)

    # -- layer ---------------------------------------------------------------
    def _fetch_layer(self, ref: ModelRef) -> LocalModel:
        folder = self.settings.models_root / ref.model_id
        if not folder.is_dir():
            raise ModelUnavailable(f"model {ref.model_id} is not in the model layer (looked in {folder})")
        manifest = Manifest.read(folder)
        self._check_identity(ref, manifest)
        verify_folder(folder, manifest)
        return LocalModel(folder, manifest, "layer")

    # -- S3 ------------------------------------------------------------------
    def _s3(self) -> Any:
        if self._s3_client is None:
            import boto3  # deferred: layer-only functions never pay for it
            from botocore.config import Config

            config = Config(retries={"mode": "standard", "max_attempts": 4}, connect_timeout=5, read_timeout=30)
            self._s3_client = boto3.client("s3", config=config)
        return self._s3_client

    def _fetch_s3(self, ref: ModelRef) -> LocalModel:
        manifest_bytes = self._read_object(ref, MANIFEST_NAME)
        try:
            data = json.loads(manifest_bytes)
        except ValueError as exc:
            raise ModelUnavailable(f"{ref}{MANIFEST_NAME} is not valid JSON") from exc
        manifest = Manifest.from_dict(data)
        self._check_identity(ref, manifest)
        # The manifest's own hash names the cache entry: a new model version under
        # the same prefix gets a new entry instead of mixing files of two versions.
        entry = f"{ref.model_id}-{hashlib.sha256(manifest_bytes).hexdigest()[:16]}"
        cache = self.settings.cache_dir
        final = cache / entry
        with self._cache_lock():
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
                    self._download_verified(ref, name, partial / name, expected.size, expected.sha256)
                (partial / MANIFEST_NAME).write_bytes(manifest_bytes)
                os.rename(partial, final)
            except OSError as exc:
                shutil.rmtree(partial, ignore_errors=True)
                if exc.errno == errno.ENOSPC:
                    raise ModelUnavailable(
                        f"no space left in {cache} for model {ref.model_id}; raise the function's EphemeralStorage"
                    ) from exc
                raise ModelUnavailable(f"cannot write model {ref.model_id} to the cache: {exc.strerror}") from exc
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
        return LocalModel(final, manifest, "s3")

    def _read_object(self, ref: ModelRef, name: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._s3().get_object(Bucket=ref.bucket, Key=ref.prefix + name)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "ClientError")
            raise ModelUnavailable(f"cannot read s3://{ref.bucket}/{ref.prefix}{name}: {code}") from exc
        except BotoCoreError as exc:
            raise ModelUnavailable(f"cannot reach S3 for {ref}: {exc.__class__.__name__}") from exc

    def _download_verified(self, ref: ModelRef, name: str, target: Path, size: int, sha256: str) -> None:
        """Stream one object to ``target`` while hashing it; raise IntegrityError on any mismatch."""
        from botocore.exceptions import BotoCoreError, ClientError

        digest = hashlib.sha256()
        written = 0
        try:
            body = self._s3().get_object(Bucket=ref.bucket, Key=ref.prefix + name)["Body"]
            with target.open("wb") as out:
                for chunk in body.iter_chunks(_CHUNK):
                    digest.update(chunk)
                    written += len(chunk)
                    if written > size:
                        break
                    out.write(chunk)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "ClientError")
            raise ModelUnavailable(f"model {ref.model_id} is incomplete in S3: {name}: {code}") from exc
        except BotoCoreError as exc:
            raise ModelUnavailable(f"download of {name} for {ref.model_id} failed: {exc.__class__.__name__}") from exc
        if written != size:
            raise IntegrityError(
                f"model {ref.model_id} is incomplete or altered: {name} has {'more than ' if written > size else ''}"
                f"{written} bytes in S3, manifest says {size}"
            )
        if digest.hexdigest() != sha256:
            raise IntegrityError(f"model {ref.model_id} failed verification: sha256 of {name} does not match")

    @contextmanager
    def _cache_lock(self) -> Iterator[None]:
        cache = self.settings.cache_dir
        cache.mkdir(parents=True, exist_ok=True)
        with (cache / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                # Under the lock nobody else is downloading: leftovers are from a crash.
                for stale in cache.glob(".partial-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _make_room(self, needed: int, keep: str) -> None:
        """Evict least recently used entries until ``needed`` bytes fit the budget and the disk."""
        cache = self.settings.cache_dir
        entries = []
        for path in cache.iterdir():
            if path.is_dir() and not path.name.startswith(".") and path.name != keep:
                size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
                entries.append((path.stat().st_mtime, size, path))
        entries.sort()
        budget = self.settings.cache_max_bytes
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
