"""The init phase: optional preloading, and what SnapStart needs.

Loading the model during init moves its cost out of the first request. Init
is billed, so this pays only when first-request latency matters
(``QUANTFN_PRELOAD``, the default model). Under SnapStart, init runs once before
the snapshot is taken (``AWS_LAMBDA_INITIALIZATION_TYPE=snap-start``): the
default model is always loaded then, so every restored environment starts with
its sessions in memory (both of them under ``QUANTFN_PARALLELISM=auto``), and
after a restore only per-environment state is refreshed.
"""

from __future__ import annotations

import logging
import os

from quantfn.models.store import fetch_deadline
from quantfn.registry import get_registry

logger = logging.getLogger(__name__)


def prepare_init() -> bool:
    """Called at import by a handler module; True when the default model was loaded now."""
    registry = get_registry()
    snap_start = os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE") == "snap-start"
    if snap_start:
        try:
            from snapshot_restore_py import register_after_restore

            # Connections and credentials captured in the snapshot are stale once restored.
            register_after_restore(registry.store.reset_clients)
        except ImportError:  # not a Lambda managed runtime
            pass
    if not (snap_start or registry.settings.runtime.preload):
        return False
    with fetch_deadline(None):  # one read of an S3 model's manifest for the tokenizer and the files
        registry.pipeline(registry.default).open_sessions()  # the batch-piece session too, under "auto"
    how = "snap-start" if snap_start else "preload"
    logger.info("default model loaded during init (%s): %.0f ms", how, registry.load_ms(registry.default))
    return True
