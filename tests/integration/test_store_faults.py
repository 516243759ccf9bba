"""The model store's fault matrix: real boto3 against moto on 127.0.0.1, faults from a loopback proxy and tmpfs.

For each fault: the fetch fails with ModelUnavailable (503) within its deadline, the cache
holds nothing broken, and once the fault is fixed the same store fetches the verified model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from quantfn.config import RuntimeSettings, Settings
from quantfn.errors import ModelUnavailable
from quantfn.models import store as store_module
from quantfn.models.manifest import Manifest, verify_folder
from quantfn.models.reference import parse_model_ref
from quantfn.models.store import ModelStore
from tests.conftest import _free_port
from tests.integration.faulty_proxy import FaultyProxy

BUCKET = "quantfn-faults"
PREFIX = "models/all-minilm-l6-v2/"
REF = parse_model_ref(f"s3://{BUCKET}/{PREFIX}")
DEADLINE_S = 1.0
SLACK_S = 1.5  # scheduling on a shared host; the point is seconds, not the 30-150 s a stall took before


def publish(client, folder: Path, skip: tuple[str, ...] = ()) -> None:
    for path in folder.iterdir():
        if path.is_file() and path.name not in skip:
            client.upload_file(str(path), BUCKET, PREFIX + path.name)


@pytest.fixture
def s3(aws, model_dir: Path):
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    publish(client, model_dir)
    return client


def make_store(cache: Path) -> ModelStore:
    # A 5 s read timeout with 3 attempts would hold a stalled fetch for 15 s: only the deadline can stop it sooner.
    return ModelStore(
        Settings(runtime=RuntimeSettings(cache_dir=cache, s3_connect_timeout_ms=500, s3_read_timeout_ms=5000))
    )


def entries(cache: Path) -> list[str]:
    """What the cache holds besides its lock file: complete entries and leftovers of a failed download."""
    return sorted(p.name for p in cache.iterdir() if p.name != ".lock") if cache.is_dir() else []


def fetch_fails_in_time(store: ModelStore, match: str | None = None) -> ModelUnavailable:
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match=match) as failed:
        store.fetch(REF, deadline_s=started + DEADLINE_S)
    assert time.monotonic() - started < DEADLINE_S + SLACK_S
    assert failed.value.status == 503
    return failed.value


def recovers(store: ModelStore, model_dir: Path) -> None:
    local = store.fetch(REF, deadline_s=time.monotonic() + 30)
    assert local.source == "s3"
    verify_folder(local.path, Manifest.read(model_dir))  # every byte as published
    assert entries(local.path.parent) == [local.path.name]


@pytest.mark.parametrize(
    ("fault", "key"),
    [
        ("stall", "manifest.json"),  # S3 accepts the request and never answers
        ("stall", "model.onnx"),
        ("stall_body", "model.onnx"),  # the body stops half way
        ("trickle", "tokenizer.json"),  # a byte every 50 ms: every read succeeds, the whole never arrives
        ("reset", "model.onnx"),  # connection reset mid-download
    ],
)
def test_given_a_faulty_s3_when_fetching_then_503_in_time_nothing_cached_and_recovery_once_fixed(
    s3, aws, monkeypatch, tmp_path: Path, model_dir: Path, fault: str, key: str
) -> None:
    with FaultyProxy(aws.url, fault=fault, match=key, trickle_s=0.05) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = make_store(tmp_path)
        fetch_fails_in_time(store)
        assert proxy.hits >= 1 and entries(tmp_path) == []
        proxy.set(None)
        recovers(store, model_dir)


def test_given_s3_down_when_fetching_then_503_and_recovery_when_it_is_back(
    s3, aws, monkeypatch, tmp_path: Path, model_dir: Path
) -> None:
    port = _free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    store = make_store(tmp_path)
    fetch_fails_in_time(store, "cannot reach S3|failed")
    with FaultyProxy(aws.url, port=port):  # S3 is back at the same address
        recovers(store, model_dir)


@pytest.mark.parametrize("damage", ["tampered", "truncated", "missing"])
def test_given_a_damaged_file_in_s3_when_fetching_then_503_nothing_cached_and_recovery_once_republished(
    s3, tmp_path: Path, model_dir: Path, damage: str
) -> None:
    original = (model_dir / "tokenizer.json").read_bytes()
    key = PREFIX + "tokenizer.json"
    if damage == "tampered":
        s3.put_object(Bucket=BUCKET, Key=key, Body=original[:10] + bytes([original[10] ^ 1]) + original[11:])
    elif damage == "truncated":
        s3.put_object(Bucket=BUCKET, Key=key, Body=original[:1000])
    else:
        s3.delete_object(Bucket=BUCKET, Key=key)
    store = make_store(tmp_path)
    fetch_fails_in_time(store)
    assert entries(tmp_path) == []
    publish(s3, model_dir)
    recovers(store, model_dir)


@pytest.mark.parametrize("change", ["omits tokenizer.json", "omits model.onnx", "size 1e400", "nested 5000 deep"])
def test_given_an_incomplete_or_odd_manifest_when_fetching_then_503_and_recovery_once_fixed(
    s3, tmp_path: Path, model_dir: Path, change: str
) -> None:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    if change.startswith("omits"):
        del manifest["files"][change.split()[1]]
        body = json.dumps(manifest)
    elif change == "size 1e400":
        body = json.dumps(manifest).replace('"size": 505727', '"size": 1e400')
        assert "1e400" in body
    else:
        body = "[" * 5000 + "]" * 5000
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "manifest.json", Body=body.encode())
    store = make_store(tmp_path)
    fetch_fails_in_time(store, "manifest")
    assert entries(tmp_path) == []
    publish(s3, model_dir)
    recovers(store, model_dir)


# ---- the cache on a file system that cannot take the model (real tmpfs mounts; needs root) ----------------


def _mount(target: Path, options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An empty tmpfs (remount it with other options in the test); skipped where mounting is not allowed."""
    target = tmp_path / "fs"
    target.mkdir()
    try:
        _mount(target, "size=64m")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs permission to mount a tmpfs (root)")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


def remount(target: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(target)], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ("ro", "cannot hold"),  # a read-only file system
        ("size=64m,nr_inodes=4", "no space or no free inodes"),  # the lock file and a folder, then no inodes
        ("size=8m", "not enough space"),  # the disk is too small: refused before any download
    ],
)
def test_given_a_cache_that_cannot_take_the_model_when_fetching_then_503_and_recovery_once_it_can(
    s3, tmpfs: Path, model_dir: Path, options: str, complaint: str
) -> None:
    remount(tmpfs, options)
    store = make_store(tmpfs / "cache" if options != "ro" else tmpfs)
    fetch_fails_in_time(store, complaint)
    remount(tmpfs, "rw,size=256m,nr_inodes=1000")
    assert not list(tmpfs.rglob(".partial-*"))
    recovers(store, model_dir)


def test_given_a_disk_that_fills_during_the_download_then_503_nothing_left_and_recovery(
    s3, tmpfs: Path, model_dir: Path, monkeypatch
) -> None:
    # Another writer takes the space after the store checked it: the check sees room, the write gets ENOSPC.
    remount(tmpfs, "size=12m")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1 << 40))
    store = make_store(tmpfs)
    fetch_fails_in_time(store, "no space or no free inodes")
    assert entries(tmpfs) == []
    monkeypatch.undo()
    remount(tmpfs, "size=256m")
    recovers(store, model_dir)


def test_given_a_cache_path_under_a_file_when_fetching_then_503_and_recovery_once_it_is_a_folder(
    s3, tmp_path: Path, model_dir: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache's parent folder should be")
    store = make_store(blocker / "cache")
    fetch_fails_in_time(store, "cannot hold")
    blocker.unlink()
    recovers(store, model_dir)


def test_forget_drops_the_cached_folder_and_the_next_fetch_downloads_again(s3, tmp_path: Path) -> None:
    store = make_store(tmp_path)
    first = store.fetch(REF)
    store.forget(REF)
    assert not first.path.exists() and entries(tmp_path) == []
    again = store.fetch(REF)
    assert again.source == "s3" and again.path == first.path
