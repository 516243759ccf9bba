"""fp32 ONNX graphs the build did not write itself: torch exports (every family but BERT) and files users bring.

Both go through ``conform``: one output kept (the rest pruned), the word-embedding
table renamed to ``export.WORD_EMBEDDINGS`` so the quantization recipes find it,
and its row count checked against the tokenizer's vocabulary.

The torch export (``export_with_torch``) runs at build time only, with torch
2.13.0 CPU and transformers; the runtime never imports either.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantfn.modelbuild.errors import BuildError
from quantfn.modelbuild.export import OPSET, WORD_EMBEDDINGS

if TYPE_CHECKING:
    import onnx

# Texts the torch export is checked on: short and long (past the trace's 16 tokens), accents, scripts, CJK.
CHECK_TEXTS = (
    "a",
    "The quick brown fox jumps over the lazy dog while the cat watches from the warm kitchen window.",
    "Crème brûlée, naïve café; Ünïcödé façade.",
    "Привет, как дела? Это проверка экспорта.",
    "東京は日本の首都です。 北京是中国的首都。",
    " ".join(["a longer text that goes on"] * 12),
)
# A torch export whose outputs differ from torch by more than this (relative to the outputs' scale) is refused.
EXPORT_TOLERANCE = 1e-4


def export_with_torch(folder: Path, plan: Any, out_path: Path, tokenizer_path: Path) -> Path:
    """Export ``plan``'s encoder (``AutoModel``, output last_hidden_state) or sequence-classification model
    (``AutoModelForSequenceClassification``, output logits) in ``folder`` with torch.onnx, inputs
    ``plan.inputs``; then check the graph against torch on ``CHECK_TEXTS`` (BuildError on a difference)."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BuildError(
            f"exporting {plan.architecture} needs torch and transformers: pip install '.[reference]'"
        ) from exc

    head = plan.head == "sequence_classification"
    loader = transformers.AutoModelForSequenceClassification if head else transformers.AutoModel
    # float32 whatever the checkpoint's dtype (bf16/fp16 weights are widened), eager attention (traceable).
    model = loader.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()
    names = list(plan.inputs)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *arrays: Any) -> Any:
            out = self.inner(**dict(zip(names, arrays, strict=True)))
            return out.logits if head else out.last_hidden_state

    wrapped = Wrapped(model).eval()
    ids = torch.full((2, 16), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes[plan.output] = {0: "batch"} if head else {0: "batch", 1: "sequence"}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            wrapped,
            tuple(example[name] for name in names),
            str(out_path),
            dynamo=False,
            input_names=names,
            output_names=[plan.output],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    _check_against_torch(wrapped, out_path, names, tokenizer_path, plan)
    return out_path


def _check_against_torch(wrapped: Any, path: Path, names: list[str], tokenizer_path: Path, plan: Any) -> None:
    """Run the exported graph and torch on ``CHECK_TEXTS`` (pairs of them for a pair model), padded to the
    longest, and refuse the export where they differ."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(plan.max_length)
    pad = tokenizer.padding or {}
    tokenizer.enable_padding(pad_id=int(pad.get("pad_id", 0)), pad_token=str(pad.get("pad_token", "[PAD]")))
    items = list(itertools.pairwise(CHECK_TEXTS)) if plan.pair else list(CHECK_TEXTS)
    encodings = tokenizer.encode_batch(items)
    arrays = {
        "input_ids": np.array([e.ids for e in encodings], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int64),
    }
    feed = {name: arrays[name] for name in names}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    with torch.no_grad():
        want = wrapped(*(torch.from_numpy(feed[name]) for name in names)).numpy()
    real = arrays["attention_mask"].astype(bool)
    got, want = (got, want) if plan.head == "sequence_classification" else (got[real], want[real])
    worst = float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1.0)
    if not np.isfinite(got).all() or worst > EXPORT_TOLERANCE:
        raise BuildError(
            f"the torch.onnx export of {plan.architecture} differs from torch by {worst:.2e} (relative; allowed "
            f"{EXPORT_TOLERANCE}) on the check texts: refusing to build from it"
        )


def conform(
    model: onnx.ModelProto, output: str | None, vocab_size: int, padded_table: bool = False
) -> tuple[onnx.ModelProto, str, int]:
    """Keep one output, name the word-embedding table, check its rows; returns (model, output, rank).

    Raises BuildError naming what does not fit: several outputs and none chosen,
    unknown inputs, no embedding table on ``input_ids``, a table whose rows differ
    from the tokenizer's vocabulary (``padded_table``: a table with more rows than the
    tokenizer has tokens is fine, as checkpoints pad it to a multiple: DeBERTa-v3, ModernBERT).
    """
    from onnx import TensorProto

    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    unknown = sorted(set(inputs) - {"input_ids", "attention_mask", "token_type_ids"})
    if unknown or "input_ids" not in inputs or "attention_mask" not in inputs:
        raise BuildError(
            f"graph inputs {inputs} are unsupported: expected input_ids, attention_mask and optionally "
            f"token_type_ids (unknown: {', '.join(unknown) or 'none'})"
        )
    outputs = {o.name: o for o in model.graph.output}
    if output is None:
        if len(outputs) != 1:
            raise BuildError(f"the graph has outputs {', '.join(outputs)}: choose one with --output")
        output = next(iter(outputs))
    if output not in outputs:
        raise BuildError(f"the graph has no output {output!r} (it has {', '.join(outputs)})")
    chosen = outputs[output]
    if chosen.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise BuildError(f"output {output!r} is not float32")
    rank = len(chosen.type.tensor_type.shape.dim)
    del model.graph.output[:]
    model.graph.output.append(chosen)
    _prune_dead_nodes(model)

    inits = {t.name: t for t in model.graph.initializer}
    gathers = [
        n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids" and n.input[0] in inits
    ]
    if len(gathers) != 1:
        raise BuildError("no single embedding table is gathered by input_ids: cannot find the word embeddings")
    table = inits[gathers[0].input[0]]
    rows = int(table.dims[0])
    if rows < vocab_size or (rows != vocab_size and not padded_table):
        raise BuildError(
            f"the word-embedding table has {rows} rows but the tokenizer has {vocab_size} tokens: "
            "this tokenizer does not belong to this graph"
        )
    old = table.name
    if old != WORD_EMBEDDINGS:
        if WORD_EMBEDDINGS in inits:
            raise BuildError(f"the graph already has an initializer named {WORD_EMBEDDINGS!r}")
        table.name = WORD_EMBEDDINGS
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = WORD_EMBEDDINGS
    return model, output, rank


def _prune_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers no graph output depends on."""
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(list(model.graph.node)):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # subgraphs (If/Loop) read outer names too
                for sub in [attr.g, *attr.graphs]:
                    for inner in sub.node:
                        needed.update(inner.input)
    kept.reverse()
    del model.graph.node[:]
    model.graph.node.extend(kept)
    inits = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


def vocabulary_size(tokenizer_path: Path) -> int:
    """Token count of a tokenizer.json: its vocabulary plus added tokens beyond it."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_path)).get_vocab_size(with_added_tokens=True)


def load_conformed(path: Path, output: str | None, tokenizer_path: Path) -> tuple[onnx.ModelProto, str, int]:
    """``conform`` applied to the ONNX file at ``path`` (external data beside it is loaded)."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, ValueError, OSError... for a file that is not a model
        raise BuildError(f"{path} cannot be read as an ONNX model: {exc.__class__.__name__}") from exc
    return conform(model, output, vocabulary_size(tokenizer_path))
