"""The init phase: optional preloading, and what SnapStart needs.

Loading the model during init moves its cost out of the first request. Init
is billed, so this pays only when first-request latency matters
(``QUANTFN_PRELOAD``). Under SnapStart, init runs once before the snapshot is
taken (``AWS_LAMBDA_INITIALIZATION_TYPE=snap-start``): the model is always
loaded then, so every restored environment starts with the session in memory,
and after a restore only per-environment state is refreshed.
"""

from __future__ import annotations

import logging
import os

from quantfn.service import get_service

logger = logging.getLogger(__name__)


def prepare_init() -> bool:
    """Called at import by a handler module; True when the model was loaded now."""
    service = get_service()
    snap_start = os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE") == "snap-start"
    if snap_start:
        try:
            from snapshot_restore_py import register_after_restore

            # Connections and credentials captured in the snapshot are stale once restored.
            register_after_restore(service.store.reset_clients)
        except ImportError:  # not a Lambda managed runtime
            pass
    if not (snap_start or service.settings.preload):
        return False
    service.model()
    logger.info("model loaded during init (%s): %.0f ms", "snap-start" if snap_start else "preload", service.load_ms)
    return True
