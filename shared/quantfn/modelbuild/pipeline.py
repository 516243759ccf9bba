"""``build_model``: source -> plan -> fp32 graph -> the ladder's recipes -> one gate -> a published model folder.

One path for every model: the packaged default (``source.locate_source``) is a source
planned by ``architectures.plan_build`` like a folder someone brings. Each rung is
staged in a temporary directory beside the destination, measured by the one
evaluator (``evaluate``: the staged folder and its fp32 original through the runtime's
task pipeline), held to the one gate (``gate.Gate.check``) and renamed into place only
when it passes; nothing is published otherwise.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantfn.modelbuild.errors import BuildError, BuildGateError
from quantfn.modelbuild.gate import Gate, int8_floor
from quantfn.modelbuild.recipes import DEFAULT_LADDER, RECIPES, Calibration, Recipe, recipe_ladder

if TYPE_CHECKING:
    from quantfn.modelbuild.architectures import BuildPlan
    from quantfn.modelbuild.source import ModelSource

DEFAULT_MODEL_ID = "all-minilm-l6-v2"
# Lambda: code plus layers unzip to at most 250 MB (the Makefile's check); the runtime layer takes about 145 MiB
# and the function code about 1 MiB, so a model layer gets the rest. /tmp is 512 MiB unless configured (to 10 GiB).
LAMBDA_UNZIPPED_LIMIT = 262_144_000
RUNTIME_LAYER_BYTES = 145 * 2**20
FUNCTION_CODE_BYTES = 1 * 2**20
DEFAULT_TMP_BYTES = 512 * 2**20


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
    from quantfn.modelbuild import export, heads, onnx_graph

    digest = hashlib.sha256()
    for module in (export, heads, onnx_graph):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:8]


def fp32_graph(source: ModelSource, plan: BuildPlan, work_dir: Path, say: Callable[[str], None]) -> Path:
    """The plan's fp32 graph, cached in ``work_dir`` by the weights, the exporter and what the plan exports
    (not the model id: the recipes of one model share it)."""
    import onnx

    from quantfn.modelbuild import export, heads, onnx_graph
    from quantfn.modelbuild.architectures import default_model_id
    from quantfn.models.manifest import sha256_file

    exported = {k: v for k, v in plan.as_dict().items() if k != "model_id"}
    key = json.dumps(
        {"weights": sha256_file(source.weights), "exporter": exporter_digest(), **exported}, sort_keys=True
    )
    path = work_dir / f"fp32-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"
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
            name=default_model_id(source),
        )
    elif plan.architecture == "onnx":
        model, _, _ = onnx_graph.load_conformed(source.weights, plan.output, source.tokenizer)
    else:
        tokens = "last_hidden_state" if plan.head == "none" else plan.output
        onnx_graph.export_with_torch(source.folder, replace(plan, output=tokens), tmp, source.tokenizer)
        vocab = onnx_graph.vocabulary_size(source.tokenizer)
        model, _, _ = onnx_graph.conform(onnx.load(str(tmp)), tokens, vocab, padded_table=True)
    if plan.head == "sklearn-linear":
        coef, intercept, _ = heads.load_sklearn_linear(Path(plan.head_file), Path(plan.label_map_file or "") or None)
        pooled = heads.append_pool(model, export.OUTPUT, plan.pooling, plan.normalize)
        heads.append_linear(model, pooled, coef, intercept)
    if source.st.dense and plan.output_kind == "sentence_embedding":  # pool in the graph, then each Dense
        x = heads.append_pool(model, export.OUTPUT, plan.pooling, normalize=False)
        for i, dense in enumerate(source.st.dense):
            weights = export.load_weights(dense.weights)
            x = heads.append_dense(model, x, weights["linear.weight"], weights.get("linear.bias"), dense.activation,
                                   f"dense{i}")  # fmt: skip
        heads.set_output(model, x, plan.dimensions, plan.output)
    kept = [p for p in model.metadata_props if p.key != "quantfn.max_sequence_length"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = "quantfn.max_sequence_length", str(plan.max_length)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(tmp))
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


def describe(source: ModelSource, plan: BuildPlan, tokenizer: Path) -> dict[str, Any]:
    """The manifest fields a plan decides (what the model is and how to run it), before any file is written."""
    from quantfn.modelbuild.vocab import tokenizer_facts
    from quantfn.models.manifest import BASE_SCHEMA

    manifest: dict[str, Any] = {
        "schema": BASE_SCHEMA,
        "model_id": plan.model_id,
        "task": plan.task,
        "architecture": plan.architecture,
        "source": source.record(),
        "inputs": list(plan.inputs),
        "output": plan.output,
        "output_kind": plan.output_kind,
        "tokenizer": tokenizer_facts(tokenizer),
        "dimensions": plan.dimensions,
        "max_sequence_length": plan.max_length,
        "build": {"export_path": plan.export_path, "head": plan.head},
    }
    if plan.task == "embed":  # a graph that pools itself (Dense modules after pooling) answers sentence embeddings
        pooled = "none" if plan.output_kind == "sentence_embedding" else plan.pooling
        manifest.update(pooling=pooled, normalize=plan.normalize)
    else:
        manifest.update(scoring=plan.scoring, pair=plan.pair)
    if plan.labels:
        manifest["labels"] = list(plan.labels)
    if plan.prompts:
        manifest["prompts"] = dict(plan.prompts)
    if plan.default_prompt:
        manifest["default_prompt"] = plan.default_prompt
    return manifest


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    from quantfn.models.manifest import MANIFEST_NAME, Manifest

    Manifest.from_dict(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def fp32_original(work: Path, graph: Path, source: ModelSource, plan: BuildPlan) -> Path:
    """A model folder of the exported fp32 graph and the unpruned tokenizer: what every rung is measured against.

    Made once per fp32 graph in ``work``; it answers through the same runtime path as the model it is compared
    with (``evaluate``), so the reference is the export itself (tested equal to torch and sentence-transformers).
    """
    import os
    import shutil

    from quantfn.modelbuild.vocab import write_tokenizer
    from quantfn.models.manifest import MANIFEST_NAME, describe_file

    folder = work / f"{graph.stem}-original"
    if (folder / MANIFEST_NAME).is_file():
        return folder
    staging = work / f".{folder.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        os.link(graph, staging / "model.onnx")
    except OSError:
        shutil.copyfile(graph, staging / "model.onnx")
    write_tokenizer(source.tokenizer, staging / "tokenizer.json", prune_vocab=False, max_length=plan.max_length)
    manifest = describe(source, plan, staging / "tokenizer.json")
    manifest.update(
        model_id=folder.name,
        files={name: describe_file(staging / name) for name in ("model.onnx", "tokenizer.json")},
        session={"pre_optimized": False, "config": {}},
        quantization={"recipe": "fp32", "description": "the exported fp32 graph (the gate's reference)"},
    )
    _write_manifest(staging, manifest)
    staging.replace(folder)
    return folder


def calibration_feeds(staging: Path, manifest: dict[str, Any], items: list[Any]) -> list[dict[str, np.ndarray]]:
    """The graph inputs the runtime would feed for ``items``: the staged tokenizer, truncation, length-sorted
    sub-batches, padding (``Pipeline.encode`` + ``Pipeline.sub_batches``)."""
    from quantfn.models.manifest import Manifest
    from quantfn.tasks import PIPELINES, load_tokenizer

    # The graph file is not written yet (calibration makes it): its entry is a placeholder.
    pending = {name: {"sha256": "", "size": 0} for name in ("model.onnx", "tokenizer.json")}
    described = Manifest.from_dict({**manifest, "files": pending})
    pipeline = PIPELINES[described.task](None, load_tokenizer(staging / "tokenizer.json"), described)
    return list(pipeline.sub_batches(pipeline.encode(items)))


def _pre_optimize(path: Path, config: dict[str, str]) -> bool:
    """Replace ``path`` by onnxruntime's EXTENDED-optimized graph if that keeps its size."""
    from quantfn.modelbuild.dequantize_at_load import optimize

    optimized = optimize(path, config)
    if optimized.stat().st_size > path.stat().st_size * 1.01:
        optimized.unlink()
        return False
    optimized.replace(path)
    return True


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


def first_passing(
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
        except BuildError as cannot:  # the rung does not apply to this graph: say why and go on
            if progress:
                progress(f"{rung} cannot apply ({cannot}); trying {after}")
            if rejected is not None:
                rejected.append({"recipe": rung, "cannot_apply": str(cannot)})
    return build(ladder[-1], rejected)  # the last rung's failure is the build's


def _chosen_by(rejected: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The manifest's record of how ``default`` chose its recipe (``None``: a recipe asked by name)."""
    if rejected is None:
        return {}
    ladder = ", ".join(DEFAULT_LADDER)
    return {"chosen_by": f"default: the first of {ladder} that passes the gate", "rejected": list(rejected)}


def build_model(
    out_dir: Path,
    source: ModelSource | None = None,
    plan: BuildPlan | None = None,
    recipe: str = "default",
    model_id: str | None = None,
    progress: Callable[[str], None] | None = None,
    gate: Gate | None = None,
    corpus_size: int | None = None,
    quality_cache: Path | None = None,
    matryoshka: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Build, evaluate and publish ``out_dir/<plan.model_id>/``; return its manifest.

    ``source`` defaults to the packaged default model, ``plan`` to what ``plan_build`` decides for it
    (``model_id`` overrides the id, which otherwise carries a named recipe's name). ``recipe`` ``default``
    publishes the first recipe of ``DEFAULT_LADDER`` that passes the gate (the manifest names it and what
    was rejected on the way); ``gate`` overrides the recipe's gate. Recipes calibrate on the calibration
    corpus; fidelity is measured on the gate corpus (``corpora``: its first ``corpus_size`` texts, a mix of
    every kind, for tests of tiny models) against the fp32 original; the
    task-quality suite runs with its data cached in ``quality_cache`` (default ``$QUANTFN_QUALITY_CACHE``).
    An embedder's manifest also gets the int8 ranges of its output, calibrated on the calibration texts, for
    its own size and each of ``matryoshka`` (the sizes it was trained to serve; ``embedding_ranges``).
    Raises BuildError for an unknown recipe or a source it cannot build, BuildGateError (nothing
    published) when the gate is missed. An existing folder of the same id is replaced only on success.
    """
    from quantfn.modelbuild import corpora, embedding_ranges, evaluate, quality
    from quantfn.modelbuild.architectures import default_model_id, plan_build
    from quantfn.modelbuild.source import locate_source

    source = source or locate_source()
    plan = plan or plan_build(source, model_id=model_id or default_model_id(source, recipe))
    say = progress or (lambda _message: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph = fp32_graph(source, plan, out_dir / ".work", say)
    original = fp32_original(out_dir / ".work", graph, source, plan)
    floor = int8_floor(graph)
    cache = quality.cache_dir(quality_cache)
    if matryoshka:
        embedding_ranges.check_sizes(matryoshka, plan.dimensions)
    calibration, gated = corpora.load(cache)
    texts = Texts(
        evaluate.items_for(plan.pair, calibration.texts), evaluate.items_for(plan.pair, gated.texts[:corpus_size])
    )
    texts.record.update(calibration=calibration.record(), gate=gated.record())
    manifest = first_passing(
        recipe,
        # ``gate`` replaces the recipes' own, but the default ladder's last rung (fp32) always keeps its own:
        # it is what publishes a model every int8 rung missed.
        lambda rung, rejected: _build_rung(
            out_dir,
            source,
            plan,
            RECIPES[rung],
            graph,
            floor,
            original,
            texts,
            None if recipe == "default" and rung == DEFAULT_LADDER[-1] else gate,
            cache,
            say,
            rejected,
        ),
        progress,
    )
    if plan.task == "embed":  # calibrated on the texts the recipe calibrates on, never on the gate's
        say("calibrating the int8 ranges of the embeddings")
        manifest = embedding_ranges.add_to_published(out_dir / plan.model_id, texts.calibration, matryoshka)
    return manifest


@dataclass
class Texts:
    """What a build fits to (``calibration``) and what its gate measures (``gate``): never a shared sentence."""

    calibration: list[Any]
    gate: list[Any]
    record: dict[str, Any] = field(default_factory=dict)  # the manifest's ``corpora``


def _build_rung(
    out_dir: Path,
    source: ModelSource,
    plan: BuildPlan,
    chosen: Recipe,
    graph: Path,
    size_floor: float,
    original: Path,
    texts: Texts,
    gate: Gate | None,
    cache: Path,
    say: Callable[[str], None],
    rejected: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    import onnx

    from quantfn.modelbuild import cascade, dequantize_at_load, evaluate, quality
    from quantfn.modelbuild.dequantize_at_load import WEIGHTS_FILE
    from quantfn.modelbuild.vocab import prunable, write_tokenizer
    from quantfn.models.manifest import CASCADE_SCHEMA, FileEntry, describe_file, weights_size

    gate = gate or chosen.gate
    started = time.perf_counter()
    model_id = plan.model_id
    with tempfile.TemporaryDirectory(prefix=f".{model_id}-", dir=out_dir) as tmp:
        staging = Path(tmp) / model_id
        staging.mkdir()
        model_path = staging / "model.onnx"
        prune = chosen.prune_vocab and prunable(graph, source.tokenizer, plan.architecture)
        keep = write_tokenizer(source.tokenizer, staging / "tokenizer.json", prune, plan.max_length)
        manifest = describe(source, plan, staging / "tokenizer.json")
        start_graph = graph if keep is None else pruned_graph(graph, keep)
        if chosen.cascade and plan.task != "classify":
            raise BuildError(f"{chosen.name} serves classifiers only (this model's task is {plan.task})")
        feeds = lambda: calibration_feeds(staging, manifest, texts.calibration)  # noqa: E731
        # a cascade's margin compares the int8 logits with the fp32 graph's, taken in the calibration pass
        calibration = Calibration(start_graph, feeds, [manifest["output"]] if chosen.cascade else [])

        def write_graph(recipe: Recipe, path: Path, weights_file: str = WEIGHTS_FILE) -> dict[str, Any]:
            """``recipe`` applied to ``start_graph`` at ``path``, saved as the runtime loads it: its session record."""
            say(f"applying recipe {recipe.name}: {recipe.description}")
            recipe.apply(start_graph, path, calibration)
            if recipe.dequantize_at_load:
                say(f"saving the optimized graph with its weights int8 in {weights_file} (dequantized at load)")
                dequantize = dequantize_at_load.pre_optimize(path, recipe.session_config, weights_file)
                return {"pre_optimized": True, "config": dict(recipe.session_config), "dequantize_at_load": dequantize}
            optimized = recipe.pre_optimize and _pre_optimize(path, recipe.session_config)
            return {"pre_optimized": optimized, "config": dict(recipe.session_config)}

        session = write_graph(chosen, model_path)
        cascade_record = None
        if chosen.cascade:
            second = RECIPES[chosen.cascade]
            say(f"cascade: {second.name} for the near ties; measuring the margin on the calibration texts")
            cascade_record = cascade.build(
                staging,
                second.name,
                lambda path, weights_file: write_graph(second, path, weights_file),
                session,
                calibration.feeds(),
                calibration.output(manifest["output"]),
                manifest["output"],
                manifest["scoring"],
            )
        graphs = [session] + ([cascade_record["session"]] if cascade_record else [])
        names = ["model.onnx", "tokenizer.json"]
        names += [cascade_record["file"]] if cascade_record else []
        names += [graph["dequantize_at_load"]["file"] for graph in graphs if "dequantize_at_load" in graph]
        files = {name: describe_file(staging / name) for name in names}
        entries = {name: FileEntry(**entry) for name, entry in files.items()}
        # What ships, against the full fp32 export (pruned rows included); the tokenizer is not counted.
        size_ratio = weights_size(entries) / graph.stat().st_size
        opset = next(
            o.version
            for o in onnx.load(str(model_path), load_external_data=False).opset_import
            if o.domain in ("", "ai.onnx")
        )
        vocab = len(json.loads(source.tokenizer.read_text(encoding="utf-8"))["model"]["vocab"])
        manifest.update(
            files=files,
            quantization={
                "recipe": chosen.name,
                "description": chosen.description,
                **chosen.details,
                "vocabulary_pruned_rows": 0 if keep is None else vocab - len(keep),
                **_chosen_by(rejected),
            },
            opset=opset,
            session=session,
            **({"cascade": cascade_record, "schema": CASCADE_SCHEMA} if cascade_record else {}),
            tools=_tool_versions(),
            size_ratio_vs_fp32=round(size_ratio, 4),
            deploy=deployment_fit(sum(entry["size"] for entry in files.values())),
        )
        _write_manifest(staging, manifest)
        items = texts.gate
        say(f"evaluating on {len(items)} gate items against the fp32 original (size {size_ratio:.1%} of fp32)")
        fidelity = evaluate.measure(staging, original, items, cache)
        manifest["corpora"] = texts.record
        manifest["fidelity"] = {
            **fidelity,
            "reference": "the fp32 original (the exported graph), through the runtime's task pipeline",
            "corpus": "gate",
            "sentences": len(items),
            "gate": gate.as_dict(),
        }
        # a cascade ships two graphs of the model: its floor is twice one graph's
        floor = size_floor * (2 if cascade_record else 1)
        gate.check(model_id, plan.task, fidelity, size_ratio=size_ratio, size_floor=floor)
        # The suite has embedding and classification tasks (a cross-encoder is held to its score fidelity alone);
        # every build of one records it, and the gate holds it to the recipe's minimums where it has them.
        if plan.task in ("embed", "classify"):
            say("task-quality suite against the fp32 original")
            scored = quality.evaluate_quality(staging, original, cache, corpus=items)
            manifest["quality"] = scored.as_dict()
            gate.check(model_id, plan.task, {}, retention=scored.retention)
        _write_manifest(staging, manifest)
        final = out_dir / model_id
        if final.exists():
            final.rename(Path(tmp) / "replaced")
        staging.rename(final)
    say(
        f"published {final} ({chosen.name}) in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{k}={v}" for k, v in fidelity.items())
    )
    return manifest


__all__ = [
    "DEFAULT_MODEL_ID",
    "build_model",
    "deployment_fit",
    "first_passing",
    "fp32_graph",
    "fp32_original",
]
