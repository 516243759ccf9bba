"""fp32 ONNX graphs the build did not write itself: torch exports (MPNet) and files users bring.

Both go through ``conform``: one output kept (the rest pruned), the word-embedding
table renamed to ``export.WORD_EMBEDDINGS`` so the quantization recipes find it,
and its row count checked against the tokenizer's vocabulary.

The torch export (``export_with_torch``) runs at build time only, with torch
2.13.0 CPU and transformers; the runtime never imports either.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantfn.modelbuild.errors import BuildError
from quantfn.modelbuild.export import OPSET, OUTPUT, WORD_EMBEDDINGS

if TYPE_CHECKING:
    import onnx

# Architectures exported with torch.onnx (TorchScript exporter: no onnxscript needed), and the transformers
# class that loads each one's base encoder.
TORCH_EXPORTED = {"mpnet": "MPNetModel"}


def export_with_torch(folder: Path, architecture: str, out_path: Path) -> Path:
    """Export the encoder in ``folder`` (inputs input_ids, attention_mask; output last_hidden_state)."""
    if architecture not in TORCH_EXPORTED:
        raise BuildError(f"architecture {architecture!r} has no torch export path here")
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BuildError(f"exporting {architecture} needs torch and transformers: pip install '.[reference]'") from exc

    model = getattr(transformers, TORCH_EXPORTED[architecture]).from_pretrained(
        str(folder), add_pooling_layer=False, attn_implementation="eager"
    )
    model.eval()  # from_pretrained already does; said again because dropout in a trace is silent

    class Encoder(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.full((2, 16), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    dynamic = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", OUTPUT)}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            Encoder(model).eval(),
            (ids, mask),
            str(out_path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=[OUTPUT],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    return out_path


def conform(model: onnx.ModelProto, output: str | None, vocab_size: int) -> tuple[onnx.ModelProto, str, int]:
    """Keep one output, name the word-embedding table, check its rows; returns (model, output, rank).

    Raises BuildError naming what does not fit: several outputs and none chosen,
    unknown inputs, no embedding table on ``input_ids``, a table whose rows differ
    from the tokenizer's vocabulary.
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
    if rows != vocab_size:
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
