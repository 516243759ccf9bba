"""What one warm ``POST /v1/embeddings`` crosses: the project's files and functions, in call order.

A reader following a request reads these; fewer, each with one job, is the point of the task/route shape.
Run from a checkout (``PYTHONPATH=shared:. python bench/request_path.py [--models-root build/models]``); it
serves one request to warm up, then records every Python function of the checkout called by a second one
(``sys.setprofile``), the handler's own file included and third-party code left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-root", type=Path, default=REPO / "build" / "models")
    parser.add_argument("--list", action="store_true", help="print every function, in first-call order")
    args = parser.parse_args()
    os.environ.update(
        QUANTFN_MODELS_ROOT=str(args.models_root.resolve()),
        QUANTFN_THREADS="1",
        POWERTOOLS_METRICS_NAMESPACE="bench",
        POWERTOOLS_LOG_LEVEL="ERROR",
        POWERTOOLS_TRACE_DISABLED="true",
    )
    sys.path[:0] = [str(REPO / "shared"), str(REPO)]
    from functions.api.app import lambda_handler

    event = json.loads((REPO / "events" / "api-embeddings.json").read_text())

    class Context:
        function_name, memory_limit_in_mb, aws_request_id = "bench", 2048, "bench"
        invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"

        def get_remaining_time_in_millis(self) -> int:
            return 29_000

    assert lambda_handler(event, Context())["statusCode"] == 200  # warm: the model is loaded
    seen: dict[tuple[str, str], None] = {}
    root = str(REPO)

    def profile(frame, kind, _arg) -> None:
        if kind == "call" and frame.f_code.co_filename.startswith(root):
            path = os.path.relpath(frame.f_code.co_filename, root)
            if path.split(os.sep)[0] in ("shared", "functions"):  # not a virtualenv inside the checkout
                seen.setdefault((path, frame.f_code.co_qualname), None)

    sys.setprofile(profile)
    try:
        status = lambda_handler(event, Context())["statusCode"]
    finally:
        sys.setprofile(None)
    assert status == 200
    files = sorted({path for path, _ in seen})
    functions = [f"{path}:{name}" for path, name in seen if "<" not in name]  # comprehensions and lambdas aside
    print(json.dumps({"files": len(files), "functions": len(functions), "file_list": files}, indent=2))
    if args.list:
        print("\n".join(functions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
