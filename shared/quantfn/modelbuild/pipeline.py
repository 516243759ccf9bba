"""``build_model``: fp32 graph -> recipe -> fidelity gate -> published model folder.

Nothing is published unless the gate passes: the folder is assembled in a
temporary directory beside the destination and renamed into place at the end.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from quantfn.modelbuild.errors import BuildError, BuildGateError
from quantfn.modelbuild.recipes import (
    DEFAULT_LADDER,
    MAX_SEQUENCE_LENGTH,
    RECIPES,
    Calibration,
    Gate,
    Recipe,
    recipe_ladder,
)

DEFAULT_MODEL_ID = "all-minilm-l6-v2"
TASK = "embed"


def _tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for dist in ("onnx", "onnxruntime", "numpy", "tokenizers", "quantfn"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            import quantfn

            versions[dist] = str(getattr(quantfn, "__version__", "unknown")) if dist == "quantfn" else "unknown"
    return versions


def exporter_digest() -> str:
    """A digest of the code that writes fp32 graphs (part of every graph cache key: a changed
    exporter never reuses a graph the old one wrote)."""
    import hashlib

    from quantfn.modelbuild import export, heads, onnx_graph

    digest = hashlib.sha256()
    for module in (export, heads, onnx_graph):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:8]


def fp32_graph(work_dir: Path, progress: Callable[[str], None]) -> Path:
    """The fp32 graph, cached in ``work_dir`` by the weights' sha256 and the exporter so recipes share it."""
    from quantfn.modelbuild.export import export_fp32
    from quantfn.modelbuild.source import locate_source
    from quantfn.models.manifest import sha256_file

    source = locate_source()
    digest = sha256_file(source.weights)[:16]
    path = work_dir / f"fp32-{digest}-{exporter_digest()}.onnx"
    if not path.is_file():
        progress("exporting fp32 graph from safetensors")
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        export_fp32(source.weights, source.config(), tmp)
        tmp.replace(path)
    return path


def pruned_graph(fp32_path: Path, keep: np.ndarray) -> Path:
    """The fp32 graph without unreachable vocabulary rows, cached beside ``fp32_path``."""
    import onnx

    from quantfn.modelbuild.quantize import keep_embedding_rows

    path = fp32_path.with_name(fp32_path.stem + f"-vocab{len(keep)}.onnx")
    if not path.is_file():
        model = onnx.load(str(fp32_path))
        keep_embedding_rows(model, keep)
        tmp = path.with_suffix(".tmp")
        onnx.save_model(model, str(tmp))
        tmp.replace(path)
    return path


def write_tokenizer(
    src: Path, dst: Path, prune_vocab: bool, max_length: int = MAX_SEQUENCE_LENGTH, pad: tuple[int, str] | None = None
) -> np.ndarray | None:
    """Write tokenizer.json with truncation at ``max_length`` and pad-to-longest with ``pad`` (id, token).

    ``pad`` defaults to the source tokenizer's own pad token (``[PAD]``, id 0, for
    BERT vocabularies). With ``prune_vocab`` the unreachable entries are dropped
    and ids renumbered; returns the kept old ids (the embedding rows to keep), else None.
    """
    from quantfn.modelbuild.vocab import prune_tokenizer, unreachable_ids

    data = json.loads(src.read_text(encoding="utf-8"))
    pad_id, pad_token = pad or source_pad(data)
    keep = None
    if prune_vocab:
        data, keep = prune_tokenizer(data, unreachable_ids(data))
        pad_id = int(np.searchsorted(keep, pad_id))
    data["truncation"] = {
        "direction": "Right",
        "max_length": max_length,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    data["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": pad_id,
        "pad_type_id": 0,
        "pad_token": pad_token,
    }
    dst.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return keep


def source_pad(data: dict[str, Any]) -> tuple[int, str]:
    """The pad ``(id, token)`` a tokenizer.json declares: its padding, else its pad special token."""
    vocab = (data.get("model") or {}).get("vocab") or {}
    padding = data.get("padding") or {}
    if padding.get("pad_token"):
        return int(padding.get("pad_id", vocab.get(padding["pad_token"], 0))), str(padding["pad_token"])
    for token in data.get("added_tokens", []):
        if token.get("special") and token["content"].strip("[]<>").lower() in ("pad", "padding"):
            return int(token["id"]), str(token["content"])
    raise BuildError("the tokenizer declares no pad token: set its padding (tokenizer.enable_padding) and save it")


def tokenizer_facts(path: Path) -> dict[str, Any]:
    """What the manifest records of a tokenizer.json: padding, special tokens and the pair template.

    Read from the file itself (its post-processor and added tokens), so no token is a literal anywhere.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    special = [t["content"] for t in data.get("added_tokens", []) if t.get("special")]
    post = data.get("post_processor") or {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    pair_template = ""
    for processor in processors:
        if processor.get("type") == "TemplateProcessing":
            pair_template = " ".join(
                piece["SpecialToken"]["id"] if "SpecialToken" in piece else "$" + piece["Sequence"]["id"]
                for piece in processor.get("pair", [])
            )
        elif processor.get("type") in ("BertProcessing", "RobertaProcessing"):
            cls, sep = processor["cls"][0], processor["sep"][0]
            between = f"{sep} {sep}" if processor["type"] == "RobertaProcessing" else sep
            pair_template = f"{cls} $A {between} $B {sep}"
    padding = data.get("padding") or {}
    pad_token = padding.get("pad_token") or next((t for t in special if "pad" in t.lower()), "")
    vocab = (data.get("model") or {}).get("vocab") or {}
    pad_id = padding.get("pad_id", vocab.get(pad_token, 0) if isinstance(vocab, dict) else 0)
    return {
        "file": path.name,
        "pad_id": int(pad_id),
        "pad_token": pad_token,
        "special_tokens": special,
        "pair_template": pair_template,
    }


def _pre_optimize(path: Path) -> bool:
    """Replace ``path`` by onnxruntime's EXTENDED-optimized graph if that keeps its size.

    EXTENDED applies only hardware-independent fusions (the layout transforms
    that tie a saved graph to one CPU are level ALL), so the file stays portable.
    """
    import onnxruntime as ort

    from quantfn.models.session import SLOW_CPU_FUSIONS

    optimized = path.with_name("optimized.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(SLOW_CPU_FUSIONS)
    )
    if optimized.stat().st_size > path.stat().st_size * 1.01:
        optimized.unlink()
        return False
    optimized.replace(path)
    return True


def check_gate(model_id: str, gate: Gate, fidelity: dict[str, float], size_ratio: float) -> None:
    """Raise BuildGateError naming the first metric below its gate."""
    for metric in ("cosine_mean", "cosine_min", "recall_at_5", "batch_invariance_min_cosine"):
        minimum = getattr(gate, metric)
        if minimum is not None and fidelity[metric] < minimum:
            raise BuildGateError(model_id, metric, fidelity[metric], minimum)
    if gate.max_size_ratio is not None and size_ratio > gate.max_size_ratio:
        raise BuildGateError(model_id, "size_ratio_vs_fp32", size_ratio, gate.max_size_ratio, "<=")


def build_model(
    out_dir: Path,
    recipe: str = "default",
    model_id: str | None = None,
    progress: Callable[[str], None] | None = None,
    gate: Gate | None = None,
    quality_cache: Path | None = None,
) -> dict[str, Any]:
    """Build, evaluate and publish ``out_dir/<model_id>/``; return its manifest.

    ``recipe`` ``default`` publishes the first recipe of ``DEFAULT_LADDER`` that passes
    the gate (the manifest names it and what was rejected on the way). ``gate``
    overrides the recipe's gate. The task-quality suite (``quality``) runs with its data
    cached in ``quality_cache`` (default ``$QUANTFN_QUALITY_CACHE``). Raises BuildError for an unknown recipe
    or missing weights, BuildGateError (nothing published) when fidelity or size
    misses the gate. An existing folder of the same id is replaced only on success.
    """
    model_id = model_id or (DEFAULT_MODEL_ID if recipe == "default" else f"{DEFAULT_MODEL_ID}-{recipe}")
    return _first_passing(
        recipe,
        lambda rung, rejected: _build_model(out_dir, rung, model_id, progress, gate, quality_cache, rejected),
        progress,
    )


def _first_passing(
    recipe: str,
    build: Callable[[str, list[dict[str, Any]] | None], dict[str, Any]],
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Run ``build`` for each recipe of ``recipe``'s ladder until one passes its gate."""
    ladder = recipe_ladder(recipe)
    rejected = [] if recipe == "default" else None
    for rung, after in itertools.pairwise(ladder):
        try:
            return build(rung, rejected)
        except BuildGateError as missed:
            if progress:
                progress(f"{rung} missed the gate ({missed.metric} {missed.value:.6f}); trying {after}")
            if rejected is not None:
                rejected.append({"recipe": rung, "metric": missed.metric, "value": round(missed.value, 6)})
    return build(ladder[-1], rejected)  # the last rung's failure is the build's


def _chosen_by(rejected: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The manifest's record of how ``default`` chose its recipe (``None``: a recipe asked by name)."""
    if rejected is None:
        return {}
    ladder = ", ".join(DEFAULT_LADDER)
    return {"chosen_by": f"default: the first of {ladder} that passes the gate", "rejected": list(rejected)}


def _build_model(
    out_dir: Path,
    recipe: str,
    model_id: str,
    progress: Callable[[str], None] | None,
    gate: Gate | None,
    quality_cache: Path | None,
    rejected: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    from quantfn.modelbuild import dequantize_at_load, evaluate
    from quantfn.modelbuild.reference import load_corpus, load_reference
    from quantfn.modelbuild.source import locate_source
    from quantfn.models.manifest import (
        SCHEMA_VERSION,
        DequantizeAtLoad,
        FileEntry,
        describe_file,
        weights_size,
    )
    from quantfn.models.session import create_session

    chosen: Recipe = RECIPES[recipe]
    gate = gate or chosen.gate
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = locate_source()
    fp32_path = fp32_graph(out_dir / ".work", say)
    texts = load_corpus()
    reference = load_reference()

    def calibration_feeds() -> list[tuple[np.ndarray, np.ndarray]]:
        # Calibrate on the even-indexed half; fidelity is reported on the whole corpus.
        half = texts[0::2]
        feeds = []
        for batch in evaluate.length_sorted_batches(tokenizer, half, 32):
            encodings = tokenizer.encode_batch([half[i] for i in batch])
            feeds.append(
                (
                    np.array([e.ids for e in encodings], np.int64),
                    np.array([e.attention_mask for e in encodings], np.int64),
                )
            )
        return feeds

    with tempfile.TemporaryDirectory(prefix=f".{model_id}-", dir=out_dir) as tmp:
        staging = Path(tmp) / model_id
        staging.mkdir()
        model_path = staging / "model.onnx"
        keep = write_tokenizer(source.tokenizer, staging / "tokenizer.json", chosen.prune_vocab)
        tokenizer = evaluate.load_tokenizer(staging / "tokenizer.json")
        start_graph = fp32_path if keep is None else pruned_graph(fp32_path, keep)
        say(f"applying recipe {recipe}: {chosen.description}")
        chosen.apply(start_graph, model_path, Calibration(start_graph, calibration_feeds))
        dequantize: dict[str, Any] | None = None
        if chosen.dequantize_at_load:
            say("saving the optimized graph with its weights int8 (dequantized at load)")
            dequantize = dequantize_at_load.pre_optimize(model_path, chosen.session_config)
            pre_optimized = True
        else:
            pre_optimized = chosen.pre_optimize and _pre_optimize(model_path)
        names = ["model.onnx", "tokenizer.json"] + ([dequantize["file"]] if dequantize else [])
        files = {name: describe_file(staging / name) for name in names}
        entries = {name: FileEntry(**entry) for name, entry in files.items()}
        # What ships, against the full fp32 export (pruned rows included); the tokenizer is not counted.
        size_ratio = weights_size(entries) / fp32_path.stat().st_size
        say(f"evaluating on {len(texts)} sentences (size {size_ratio:.1%} of fp32)")
        # Evaluated exactly as the runtime loads it.
        session = create_session(
            model_path,
            threads=2,
            pre_optimized=pre_optimized,
            config=chosen.session_config,
            dequantize=DequantizeAtLoad.from_dict(dequantize, entries) if dequantize else None,
        )
        fidelity = evaluate.measure_fidelity(session, tokenizer, texts, reference).as_dict()
        fidelity_record: dict[str, Any] = {
            **fidelity,
            "corpus": "fidelity_corpus.txt",
            "sentences": len(texts),
            "gate": gate.as_dict(),
        }
        check_gate(model_id, gate, fidelity, size_ratio)
        pruned_rows = 0 if keep is None else int(source.config()["vocab_size"]) - len(keep)
        import onnx

        opset = next(
            o.version
            for o in onnx.load(str(model_path), load_external_data=False).opset_import
            if o.domain in ("", "ai.onnx")
        )
        manifest: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "model_id": model_id,
            "task": TASK,
            "architecture": "bert",
            "source": {
                "kind": "pypi",
                "package": source.package,
                "version": source.version,
                "upstream": source.upstream,
            },
            "files": files,
            "quantization": {
                "recipe": recipe,
                "description": chosen.description,
                **chosen.details,
                "vocabulary_pruned_rows": pruned_rows,
                **_chosen_by(rejected),
            },
            "opset": opset,
            "inputs": [i.name for i in session.get_inputs()],
            "output": "last_hidden_state",
            "output_kind": "token_embeddings",
            "tokenizer": tokenizer_facts(staging / "tokenizer.json"),
            "dimensions": 384,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "pooling": "mean",
            "normalize": True,
            "session": {
                "pre_optimized": pre_optimized,
                "config": dict(chosen.session_config),
                **({"dequantize_at_load": dequantize} if dequantize else {}),
            },
            "fidelity": fidelity_record,
            "tools": _tool_versions(),
            "size_ratio_vs_fp32": round(size_ratio, 4),
            "deploy": deployment_fit(sum(entry["size"] for entry in files.values())),
        }
        final = _gate_quality_and_publish(
            out_dir, Path(tmp), staging, manifest, gate, fp32_path, source.tokenizer, quality_cache, say
        )
    say(
        f"published {final} in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{k}={v}" for k, v in fidelity.items())
    )
    return manifest


def _gate_quality_and_publish(
    out_dir: Path,
    tmp: Path,
    staging: Path,
    manifest: dict[str, Any],
    gate: Gate,
    fp32_path: Path,
    tokenizer_source: Path,
    quality_cache: Path | None,
    say: Callable[[str], None],
) -> Path:
    """The end of every build: the task-quality gate against the fp32 original (``quantfn.modelbuild.quality``:
    retention of its task scores, cosine against its vectors), then ``staging`` replaces
    ``out_dir/<model_id>`` (an existing folder only on success; nothing is published on a failure), which
    is returned."""
    from quantfn.modelbuild import quality
    from quantfn.models.manifest import MANIFEST_NAME, Manifest

    Manifest.from_dict(manifest)
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    # The suite has embedding and classification tasks; a cross-encoder is held to its score fidelity alone.
    if gate.task_retention is not None and manifest["task"] in ("embed", "classify"):
        say("task-quality suite against the fp32 original")
        baseline = quality.fp32_original(out_dir / ".work", fp32_path, tokenizer_source, manifest)
        cache = quality.cache_dir(quality_cache)
        manifest["quality"] = quality.gate_build(manifest["model_id"], gate, staging, baseline, cache)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    final = out_dir / manifest["model_id"]
    if final.exists():
        final.rename(tmp / "replaced")
    staging.rename(final)
    return final


# Lambda: code plus layers unzip to at most 250 MB (the Makefile's check); the runtime layer takes about 145 MiB
# and the function code about 1 MiB, so a model layer gets the rest. /tmp is 512 MiB unless configured (to 10 GiB).
LAMBDA_UNZIPPED_LIMIT = 262_144_000
RUNTIME_LAYER_BYTES = 145 * 2**20
FUNCTION_CODE_BYTES = 1 * 2**20
DEFAULT_TMP_BYTES = 512 * 2**20
PLANNED_SIZE_ALLOWANCE = 0.005


def deployment_fit(total_bytes: int) -> dict[str, Any]:
    """Where a model folder of ``total_bytes`` can be served from: the manifest's ``deploy`` record.

    ``layer``: a model layer beside the runtime layer; ``s3``: downloaded to the
    default 512 MiB /tmp (with a fifth left free); ``s3-large-tmp``: the function
    needs ``ephemeral_storage_mb`` of /tmp.
    """
    layer_budget = LAMBDA_UNZIPPED_LIMIT - RUNTIME_LAYER_BYTES - FUNCTION_CODE_BYTES
    record: dict[str, Any] = {"model_bytes": total_bytes, "layer_budget_bytes": layer_budget}
    if total_bytes <= layer_budget:
        record["fits"] = "layer"
    elif total_bytes <= DEFAULT_TMP_BYTES * 0.8:
        record["fits"] = "s3"
    else:
        record["fits"] = "s3-large-tmp"
        record["ephemeral_storage_mb"] = int(-(-total_bytes * 1.25 // 2**20 // 512) * 512)
    return record


def planned_fp32_graph(source: Any, plan: Any, work_dir: Path, say: Callable[[str], None]) -> Path:
    """The fp32 graph of a planned build, cached in ``work_dir`` by source digest and plan."""
    import hashlib

    import onnx

    from quantfn.modelbuild import export, heads, onnx_graph
    from quantfn.models.manifest import sha256_file

    key = json.dumps(
        {"weights": sha256_file(source.weights), "exporter": exporter_digest(), **plan.as_dict()}, sort_keys=True
    )
    path = work_dir / f"graph-{plan.model_id}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"
    if path.is_file():
        return path
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    say(f"exporting the fp32 graph: {plan.export_path}")
    if plan.architecture == "bert":
        model = export.build_fp32_graph(
            export.load_weights(source.weights),
            source.config(),
            token_types=plan.pair,
            head="sequence_classification" if plan.head == "sequence_classification" else "none",
            name=plan.model_id,
        )
    elif plan.architecture == "onnx":
        model, _, _ = onnx_graph.load_conformed(source.weights, plan.output, source.tokenizer)
    else:
        onnx_graph.export_with_torch(source.folder, plan.architecture, tmp)
        model, _, _ = onnx_graph.conform(
            onnx.load(str(tmp)), export.OUTPUT, onnx_graph.vocabulary_size(source.tokenizer)
        )
    if plan.head == "sklearn-linear":
        coef, intercept, _ = heads.load_sklearn_linear(Path(plan.head_file), Path(plan.label_map_file or "") or None)
        pooled = heads.append_mean_pool(model, export.OUTPUT, plan.normalize)
        heads.append_linear(model, pooled, coef, intercept)
    kept = [p for p in model.metadata_props if p.key != "quantfn.max_sequence_length"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = "quantfn.max_sequence_length", str(plan.max_length)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(tmp))
    tmp.replace(path)
    return path


def build_planned(
    out_dir: Path,
    source: Any,
    plan: Any,
    recipe: str = "default",
    progress: Callable[[str], None] | None = None,
    gate: Gate | None = None,
    corpus_size: int | None = None,
    quality_cache: Path | None = None,
) -> dict[str, Any]:
    """Build, evaluate and publish ``out_dir/<plan.model_id>/`` for any source; return its manifest.

    Like ``build_model``, but the reference is the source's own fp32 graph and the
    gate is the task's (``task_fidelity``). Nothing is published when it fails.
    ``corpus_size`` evaluates on the first texts of the corpus only (tests of tiny models). The
    task-quality suite gates it as it gates the default (``quality_cache`` as in ``build_model``);
    ``default`` chooses its recipe as ``build_model`` does.
    """
    return _first_passing(
        recipe,
        lambda rung, rejected: _build_planned(
            out_dir, source, plan, rung, progress, gate, corpus_size, quality_cache, rejected
        ),
        progress,
    )


def _build_planned(
    out_dir: Path,
    source: Any,
    plan: Any,
    recipe: str,
    progress: Callable[[str], None] | None,
    gate: Gate | None,
    corpus_size: int | None,
    quality_cache: Path | None,
    rejected: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    import onnx
    from tokenizers import Tokenizer

    from quantfn.modelbuild import dequantize_at_load, task_fidelity
    from quantfn.modelbuild.reference import load_corpus
    from quantfn.models.manifest import (
        SCHEMA_VERSION,
        DequantizeAtLoad,
        FileEntry,
        describe_file,
        weights_size,
    )
    from quantfn.models.session import create_session

    chosen: Recipe = RECIPES[recipe]
    gate = gate or chosen.gate
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = planned_fp32_graph(source, plan, out_dir / ".work", say)
    items = task_fidelity.items_for(plan, load_corpus()[:corpus_size])
    model_id = plan.model_id

    with tempfile.TemporaryDirectory(prefix=f".{model_id}-", dir=out_dir) as tmp:
        staging = Path(tmp) / model_id
        staging.mkdir()
        model_path = staging / "model.onnx"
        # Pruning renumbers ids: only where the graph uses them for nothing but the table lookup (and
        # comparisons with ids that keep their number, as MPNet's padding test).
        prune = chosen.prune_vocab and (
            plan.architecture == "bert" or ids_only_looked_up(fp32_path, first_unreachable_id(source.tokenizer))
        )
        keep = write_tokenizer(source.tokenizer, staging / "tokenizer.json", prune, plan.max_length)
        tokenizer = Tokenizer.from_file(str(staging / "tokenizer.json"))
        start_graph = fp32_path if keep is None else pruned_graph(fp32_path, keep)
        say(f"fp32 reference outputs on {len(items)} items")
        reference = task_fidelity.run(create_session(fp32_path, threads=2), tokenizer if keep is None else
                                      _unpruned(source, plan), plan, items)  # fmt: skip

        def calibration_feeds() -> list[tuple[np.ndarray, ...]]:
            half = items[0::2]
            return [
                tuple(task_fidelity.feed(tokenizer, half[i : i + 32], plan.inputs).values())
                for i in range(0, len(half), 32)
            ]

        say(f"applying recipe {recipe}: {chosen.description}")
        chosen.apply(start_graph, model_path, Calibration(start_graph, calibration_feeds))
        dequantize: dict[str, Any] | None = None
        if chosen.dequantize_at_load:
            say("saving the optimized graph with its weights int8 (dequantized at load)")
            dequantize = dequantize_at_load.pre_optimize(model_path, chosen.session_config)
            pre_optimized = True
        else:
            pre_optimized = chosen.pre_optimize and _pre_optimize(model_path)
        names = ["model.onnx", "tokenizer.json"] + ([dequantize["file"]] if dequantize else [])
        files = {name: describe_file(staging / name) for name in names}
        entries = {name: FileEntry(**entry) for name, entry in files.items()}
        size_ratio = weights_size(entries) / fp32_path.stat().st_size
        say(f"evaluating on {len(items)} items (size {size_ratio:.1%} of fp32)")
        session = create_session(
            model_path,
            threads=2,
            pre_optimized=pre_optimized,
            config=chosen.session_config,
            dequantize=DequantizeAtLoad.from_dict(dequantize, entries) if dequantize else None,
        )
        fidelity = {
            k: round(v, 6) for k, v in task_fidelity.measure(session, tokenizer, plan, items, reference).items()
        }
        failed = task_fidelity.gate_failure(plan, fidelity, gate)
        if failed:
            raise BuildGateError(model_id, *failed)
        # Every weight matrix and looked-up table is int8 here as in the default; what stays fp32 (biases,
        # LayerNorm, scales) weighs more where no vocabulary rows are pruned: all-mpnet-base-v2 ships 25.1 %
        # of its fp32 graph. Hence a half-point allowance; a recipe that quantized nothing still fails.
        size_gate = None if gate.max_size_ratio is None else gate.max_size_ratio + PLANNED_SIZE_ALLOWANCE
        if size_gate is not None and size_ratio > size_gate:
            raise BuildGateError(model_id, "size_ratio_vs_fp32", size_ratio, size_gate, "<=")
        opset = next(
            o.version
            for o in onnx.load(str(model_path), load_external_data=False).opset_import
            if o.domain in ("", "ai.onnx")
        )
        vocab = len(json.loads(source.tokenizer.read_text(encoding="utf-8"))["model"]["vocab"])
        manifest: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "model_id": model_id,
            "task": plan.task,
            "architecture": plan.architecture,
            "source": source.record(),
            "files": files,
            "quantization": {
                "recipe": recipe,
                "description": chosen.description,
                **chosen.details,
                "vocabulary_pruned_rows": 0 if keep is None else vocab - len(keep),
                **_chosen_by(rejected),
            },
            "opset": opset,
            "inputs": list(plan.inputs),
            "output": plan.output,
            "output_kind": plan.output_kind,
            "tokenizer": tokenizer_facts(staging / "tokenizer.json"),
            "dimensions": plan.dimensions,
            "max_sequence_length": plan.max_length,
            "session": {
                "pre_optimized": pre_optimized,
                "config": dict(chosen.session_config),
                **({"dequantize_at_load": dequantize} if dequantize else {}),
            },
            "fidelity": {
                **fidelity,
                "reference": "the source's fp32 graph",
                "corpus": "fidelity_corpus.txt",
                "items": len(items),
                "gate": task_fidelity.gate_record(plan, gate),
            },
            "build": {"export_path": plan.export_path, "head": plan.head},
            "tools": _tool_versions(),
            "size_ratio_vs_fp32": round(size_ratio, 4),
            "deploy": deployment_fit(sum(entry["size"] for entry in files.values())),
        }
        if plan.task == "embed":
            manifest.update(pooling=plan.pooling, normalize=plan.normalize)
        else:
            manifest.update(scoring=plan.scoring, pair=plan.pair)
        if plan.labels:
            manifest["labels"] = list(plan.labels)
        if plan.prompts:
            manifest["prompts"] = dict(plan.prompts)
        final = _gate_quality_and_publish(
            out_dir, Path(tmp), staging, manifest, gate, fp32_path, source.tokenizer, quality_cache, say
        )
    say(
        f"published {final} in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{k}={v}" for k, v in fidelity.items())
    )
    return manifest


def first_unreachable_id(tokenizer_path: Path) -> int:
    """The lowest id vocabulary pruning would drop (ids below it keep their number); -1 if none."""
    from quantfn.modelbuild.vocab import unreachable_ids

    drop = unreachable_ids(json.loads(Path(tokenizer_path).read_text(encoding="utf-8")))
    return drop[0] if drop else -1


def ids_only_looked_up(graph_path: Path, stable_below: int = 0) -> bool:
    """Whether ``input_ids`` feeds only the word-embedding Gather, Shape nodes, and comparisons
    (``Equal``) with constant ids below ``stable_below`` (ids pruning does not renumber)."""
    import onnx
    from onnx import numpy_helper

    from quantfn.modelbuild.export import WORD_EMBEDDINGS

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) <= 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def allowed(node: Any) -> bool:
        if node.op_type == "Shape":
            return True
        if node.op_type == "Gather":
            return node.input[0] == WORD_EMBEDDINGS
        if node.op_type == "Equal":
            other = [name for name in node.input if name != "input_ids"]
            if len(other) == 1 and other[0] in constants:
                ids = np.asarray(constants[other[0]])
                return stable_below < 0 or bool((ids >= 0).all() and (ids < stable_below).all())
        return False

    return all(allowed(n) for n in graph.node if "input_ids" in n.input)


def _unpruned(source: Any, plan: Any) -> Any:
    """The tokenizer before vocabulary pruning (the fp32 graph still has every row)."""
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(source.tokenizer, Path(tmp) / "tokenizer.json", False, plan.max_length)
        return Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))


__all__ = [
    "DEFAULT_MODEL_ID",
    "build_model",
    "build_planned",
    "check_gate",
    "deployment_fit",
    "fp32_graph",
    "tokenizer_facts",
    "write_tokenizer",
]
