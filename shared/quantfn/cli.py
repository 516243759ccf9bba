"""``quantfn`` command line: build-model, eval, demo.

Heavy modules (the build pipeline, onnx) are imported inside each command so
``quantfn --help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path


def progress_printer(stream=sys.stderr) -> Callable[[str], None]:
    """A progress display: each step on its own line with the time since the start."""
    started = time.perf_counter()

    def show(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=stream, flush=True)

    return show


def _build_model(args: argparse.Namespace) -> int:
    from quantfn.build import BuildGateError
    from quantfn.build.pipeline import RECIPES, build_model
    from quantfn.models.manifest import Manifest

    if args.list_recipes:
        for name, recipe in RECIPES.items():
            print(f"{name:20s} {recipe.description}")
        return 0
    try:
        manifest = build_model(Path(args.out), recipe=args.recipe, model_id=args.model_id, progress=progress_printer())
    except BuildGateError as exc:
        print(f"quantfn build-model: {exc}", file=sys.stderr)
        return 3
    fidelity = manifest["fidelity"]
    weights = Manifest.from_dict(manifest).weights_size
    print(
        f"built {manifest['model_id']} ({args.recipe}): {weights / 2**20:.1f} MB, "
        f"{manifest.get('size_ratio_vs_fp32', 0):.3f} of fp32; cosine mean {fidelity['cosine_mean']:.5f} "
        f"min {fidelity['cosine_min']:.5f}, recall@5 {fidelity['recall_at_5']:.4f}, "
        f"spearman {fidelity['spearman']:.5f} -> {Path(args.out) / manifest['model_id']}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from quantfn.build import BuildError
    from quantfn.build.quality import format_table, run_eval

    try:
        rows = run_eval(
            [Path(p) for p in args.model_dirs],
            fp32=Path(args.fp32) if args.fp32 else None,
            cache=Path(args.cache) if args.cache else None,
            threads=args.threads,
            record=args.record,
        )
    except BuildError as exc:
        print(f"quantfn eval: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


def _demo(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(args.repo).resolve() / "local"))
    from demo import run_demo  # local/demo.py: drives the real API handler with events/

    return run_demo(Path(args.models_root).resolve(), Path(args.repo).resolve())


def _serve(args: argparse.Namespace) -> int:
    repo = Path(args.repo).resolve()
    sys.path[:0] = [str(repo), str(repo / "local")]
    from api_server import serve  # local/api_server.py: the real API handler behind HTTP

    return serve(args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantfn", description="quantized ONNX text models on AWS Lambda")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build-model", help="export, quantize, evaluate and publish a model folder")
    build.add_argument("--out", default="build/models", help="folder that receives <model-id>/ (default build/models)")
    build.add_argument("--recipe", default="default", help="quantization recipe (see --list-recipes)")
    build.add_argument("--model-id", default=None, help="model id (default: derived from the recipe)")
    build.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    build.set_defaults(run=_build_model)

    evaluate = commands.add_parser("eval", help="task-quality suite: scores and retention vs the fp32 build")
    evaluate.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
    evaluate.add_argument("--fp32", default=None, help="the fp32 build to compare with (default: found beside each)")
    evaluate.add_argument("--cache", default=None, help="data and output cache (default build/quality-cache)")
    evaluate.add_argument("--threads", type=int, default=2)
    evaluate.add_argument("--record", action="store_true", help="also write the result into each manifest's quality")
    evaluate.set_defaults(run=_eval)

    demo = commands.add_parser("demo", help="answer the events/ requests through the real API handler")
    demo.add_argument("--models-root", default="build/models")
    demo.add_argument("--repo", default=".", help="the quantfn checkout (for events/ and functions/)")
    demo.set_defaults(run=_demo)

    serve = commands.add_parser("serve", help="the API handler on a local HTTP server (openai/cohere clients, curl)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--repo", default=".", help="the quantfn checkout (for functions/)")
    serve.set_defaults(run=_serve)

    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
