"""What a source is and how the build exports it: the build plan.

``plan_build`` reads a source's files (config.json, the sentence-transformers
files, the ONNX graph's interface) plus the user's overrides and decides
architecture, task, head, pooling, normalisation, max length, labels and the
export path, or refuses with a BuildError naming what is unsupported.

Export paths, and why:

- ``bert``: the torch-free writer (``export``): fused onnxruntime kernels, one
  QKV projection, no optimizer pass needed; encoders and sequence-classification
  heads (classify, or a one-logit cross-encoder for rerank). The default model is
  BERT, and its speed is the product: the writer's fused graph is what it ships.
- every other family (``TORCH_FAMILIES``: MPNet, XLM-RoBERTa/RoBERTa/CamemBERT,
  DistilBERT, DeBERTa-v2, ModernBERT, ELECTRA): torch.onnx (TorchScript exporter)
  at build time, encoders through ``AutoModel`` and heads through
  ``AutoModelForSequenceClassification``, then checked against torch on real
  tokenized texts of several lengths before any recipe runs. Their differences are
  in attention and positions (MPNet's relative buckets, DeBERTa's disentangled
  relative attention, ModernBERT's rotary positions and alternating local/global
  windows, RoBERTa's positions counted from the padding index): easy to get subtly
  wrong by hand, traced exactly by torch. The recipes find projections by graph
  structure, so every recipe applies to both kinds of graph.
- ``onnx``: pass-through: the user's graph, one output kept, tables renamed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantfn.modelbuild.errors import BuildError
from quantfn.modelbuild.source import ModelSource
from quantfn.models.manifest import POOLINGS as RUNTIME_POOLINGS

# model_type -> the number of positions its position ids skip (RoBERTa's count from padding_idx + 1).
TORCH_FAMILIES = {
    "mpnet": 2,
    "xlm-roberta": 2,
    "roberta": 2,
    "camembert": 2,
    "distilbert": 0,
    "deberta-v2": 0,
    "modernbert": 0,
    "electra": 0,
}
SUPPORTED = (
    "bert, mpnet, xlm-roberta, roberta, camembert, distilbert, deberta-v2, modernbert, electra (encoders, "
    "sequence classification, one-logit cross-encoders), or an ONNX file (--onnx)"
)
TORCH_EXPORT = "torch.onnx.export (TorchScript exporter, build time only), checked against torch"
EXPORT_PATHS = {
    "bert": "torch-free graph writer (quantfn.modelbuild.export)",
    "onnx": "pass-through (one output kept, embedding table renamed)",
}
#: The poolings a build may choose: the runtime's, less "none" (a graph's own pooled output, not a choice).
POOLINGS = tuple(mode for mode in RUNTIME_POOLINGS if mode != "none")


@dataclass(frozen=True)
class BuildPlan:
    """Everything the build decided before it works; printed first, recorded in the manifest."""

    model_id: str
    architecture: str
    task: str
    head: str  # "none" | "sequence_classification" | "sklearn-linear"
    inputs: tuple[str, ...]
    output: str
    output_kind: str
    pooling: str
    normalize: bool
    max_length: int
    dimensions: int
    labels: tuple[str, ...] = ()
    scoring: str = "none"
    pair: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    head_file: str = ""
    label_map_file: str = ""
    default_prompt: str = ""
    # sentence-transformers Dense modules after pooling (then the graph pools: output_kind sentence_embedding)
    dense: tuple[str, ...] = ()

    @property
    def export_path(self) -> str:
        return EXPORT_PATHS.get(self.architecture, TORCH_EXPORT)

    def describe(self) -> list[str]:
        """The lines ``quantfn build-model`` prints before it starts."""
        lines = [
            f"model id      {self.model_id}",
            f"architecture  {self.architecture} -> export: {self.export_path}",
            f"task          {self.task}" + (f" (head: {self.head})" if self.head != "none" else ""),
            f"inputs        {', '.join(self.inputs)} -> output {self.output} ({self.output_kind})",
        ]
        if self.task == "embed":
            lines.append(
                f"pooling       {self.pooling}, normalize {str(self.normalize).lower()}, {self.dimensions} dims"
            )
        else:
            lines.append(f"scoring       {self.scoring}" + (", (query, document) pairs" if self.pair else ""))
        if self.labels:
            shown = ", ".join(self.labels[:8]) + (f", ... ({len(self.labels)} labels)" if len(self.labels) > 8 else "")
            lines.append(f"labels        {shown}")
        lines.append(f"max length    {self.max_length} tokens")
        if self.prompts:
            lines.append(f"prompts       {self.prompts}")
        if self.default_prompt:
            lines.append(f"default prompt {self.default_prompt!r} (without an input_type)")
        if self.dense:
            lines.append(f"dense         {len(self.dense)} module(s) after pooling, in the graph")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_model_id(source: ModelSource, recipe: str = "default") -> str:
    """The id a build publishes under when none is given: the upstream's name, with a named recipe's name
    after it (``all-minilm-l6-v2``, ``all-minilm-l6-v2-int8-weight``), so a recipe never replaces the default."""
    name = source.upstream.rstrip("/").rsplit("/", 1)[-1]
    slug = "".join(c if c.isalnum() or c in "._-" else "-" for c in name.lower()) or "model"
    return slug if recipe == "default" else f"{slug}-{recipe}"


def _max_length(source: ModelSource, config: dict[str, Any], override: int | None) -> int:
    limit = int(config.get("max_position_embeddings", 512))
    limit -= TORCH_FAMILIES.get(str(config.get("model_type")), 0)  # positions start after the padding index
    length = override or source.st.max_length or min(limit, 512)
    if length > limit:
        raise BuildError(f"max length {length} exceeds the model's {limit} positions")
    return int(length)


def plan_build(
    source: ModelSource,
    *,
    model_id: str | None = None,
    task: str | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    output: str | None = None,
    sklearn_head: Path | None = None,
    label_map: Path | None = None,
) -> BuildPlan:
    """Decide the build from the source's files and the overrides; BuildError when unsupported."""
    if task not in (None, "embed", "classify", "rerank"):
        raise BuildError(f"task {task!r} is unsupported: choose embed, classify or rerank")
    if pooling not in (None, *POOLINGS):
        raise BuildError(f"pooling {pooling!r} is unsupported: choose {', '.join(POOLINGS)}")
    model_id = model_id or default_model_id(source)
    if source.kind == "onnx":
        return _plan_onnx(source, model_id, task, pooling, normalize, max_length, output)
    config = source.config()
    model_type = str(config.get("model_type", ""))
    classes = [str(a) for a in config.get("architectures") or []]
    is_classifier = any(a.endswith("ForSequenceClassification") for a in classes)
    unsupported_head = [
        a for a in classes if a.endswith(("ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice"))
    ]
    if model_type != "bert" and model_type not in TORCH_FAMILIES:
        raise BuildError(
            f"architecture {', '.join(classes) or '?'} (model_type {model_type or 'missing'}) is unsupported; "
            f"supported: {SUPPORTED}"
        )
    if unsupported_head:
        raise BuildError(f"head {unsupported_head[0]} is unsupported; supported: {SUPPORTED}")
    length = _max_length(source, config, max_length)
    hidden = int(config.get("hidden_size") or config.get("dim") or 0)  # DistilBERT's config says dim
    st = source.st
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    if sklearn_head is not None:
        from quantfn.modelbuild.heads import load_sklearn_linear

        if is_classifier or task not in (None, "classify"):
            raise BuildError("a scikit-learn head goes on an embedding model, with task classify")
        coef, _, labels = load_sklearn_linear(Path(sklearn_head), Path(label_map) if label_map else None)
        if coef.shape[1] != hidden:
            raise BuildError(
                f"{Path(sklearn_head).name} expects {coef.shape[1]}-d embeddings; the model gives {hidden}"
            )
        return BuildPlan(
            model_id, model_type, "classify", "sklearn-linear", inputs, "logits", "logits",
            pooling or st.pooling or "mean", bool(st.normalize) if normalize is None else normalize, length,
            len(labels), tuple(labels), "softmax", head_file=str(sklearn_head), label_map_file=str(label_map or ""),
        )  # fmt: skip
    # A pair's second segment is type 1 where the model has token types (BERT, ELECTRA); RoBERTa's family,
    # DeBERTa-v3, DistilBERT and ModernBERT read the pair from its separators alone.
    typed = int(config.get("type_vocab_size", 0) or 0) > 1
    pair_inputs = (*inputs, "token_type_ids") if typed else inputs
    if is_classifier:
        id2label = config.get("id2label") or {}
        count = int(config.get("num_labels", len(id2label) or 2))
        rerank = task == "rerank" or (task is None and count == 1)
        if rerank:
            if count != 1:
                raise BuildError(f"a cross-encoder for rerank has one logit; this head has {count}")
            return BuildPlan(
                model_id, model_type, "rerank", "sequence_classification", pair_inputs, "logits",
                "logits", "none", False, length, 1, (), "sigmoid", pair=True,
            )  # fmt: skip
        if task not in (None, "classify"):
            raise BuildError(f"a {count}-label classification head cannot serve task {task}")
        labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count))
        scoring = "sigmoid" if config.get("problem_type") == "multi_label_classification" else "softmax"
        return BuildPlan(
            model_id, model_type, "classify", "sequence_classification", inputs, "logits", "logits", "none", False,
            length, count, labels, scoring,
        )  # fmt: skip
    if task not in (None, "embed"):
        raise BuildError(f"{model_type} encoder without a head serves task embed, not {task}")
    pooled = pooling or st.pooling or "mean"
    normalized = bool(st.normalize) if normalize is None else normalize
    if st.dense:  # pooling and the Dense layers go into the graph: it answers sentence embeddings
        if st.dense[0].in_features != hidden:
            raise BuildError(f"{st.dense[0].weights.parent}: in_features {st.dense[0].in_features} != hidden {hidden}")
        return BuildPlan(
            model_id, model_type, "embed", "none", inputs, "sentence_embedding", "sentence_embedding", pooled,
            normalized, length, st.dense[-1].out_features, prompts=dict(st.prompts),
            default_prompt=st.default_prompt, dense=tuple(str(d.weights.parent) for d in st.dense),
        )  # fmt: skip
    return BuildPlan(
        model_id, model_type, "embed", "none", inputs, "last_hidden_state", "token_embeddings", pooled,
        normalized, length, hidden, prompts=dict(st.prompts), default_prompt=st.default_prompt,
    )  # fmt: skip


def _probed_width(model: Any, inputs: tuple[str, ...], output: str) -> int:
    """The last dimension of ``output`` when the file leaves it symbolic: one two-token input run through it."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {
        name: np.ones((1, 2), np.int64) if name != "token_type_ids" else np.zeros((1, 2), np.int64) for name in inputs
    }
    try:
        (answer,) = session.run([output], feed)
    except Exception as exc:  # onnxruntime raises its own types for a graph that cannot run these inputs
        raise BuildError(f"output {output!r} has no fixed size and the graph would not run to show it: {exc}") from exc
    return int(answer.shape[-1])


def _plan_onnx(
    source: ModelSource,
    model_id: str,
    task: str | None,
    pooling: str | None,
    normalize: bool | None,
    max_length: int | None,
    output: str | None,
) -> BuildPlan:
    from quantfn.modelbuild.onnx_graph import load_conformed

    model, output, rank = load_conformed(source.weights, output, source.tokenizer)
    inputs = tuple(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    dims = model.graph.output[0].type.tensor_type.shape.dim
    width = int(dims[-1].dim_value) if dims and dims[-1].dim_value else _probed_width(model, inputs, output)
    length = int(max_length or 256)
    task = task or "embed"
    if task == "embed":
        if rank not in (2, 3):
            raise BuildError(f"output {output!r} has rank {rank}: an embedder gives [batch, dim] or [batch, seq, dim]")
        kind = "sentence_embedding" if rank == 2 else "token_embeddings"
        if rank == 2 and pooling:
            raise BuildError(f"output {output!r} is already pooled ([batch, dim]): drop --pooling")
        return BuildPlan(
            model_id, "onnx", "embed", "none", inputs, output, kind, "none" if rank == 2 else pooling or "mean",
            bool(normalize), length, width,
        )  # fmt: skip
    if rank != 2:
        raise BuildError(f"a {task} model's output is logits [batch, n]; {output!r} has rank {rank}")
    if task == "rerank":
        if width != 1 or "token_type_ids" not in inputs:
            raise BuildError("an ONNX cross-encoder needs one logit and a token_type_ids input")
        return BuildPlan(
            model_id, "onnx", "rerank", "none", inputs, output, "logits", "none", False, length, 1, (), "sigmoid",
            pair=True,
        )  # fmt: skip
    raise BuildError("classify from an ONNX file needs labels this build cannot read from it: use a HF folder")
