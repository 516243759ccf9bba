"""Embeddings: pool the graph's token states (mean, CLS, max, mean/sqrt(length), last token; or take the graph's
own pooled output), L2-normalise; then the sizes and types a request asks for.

An ``input_type`` puts the manifest's prompt for it in front of each text, as e5 and bge models
expect: OpenAI's extension (``query`` | ``document``) is refused by a model without that prompt;
Cohere's (``search_query`` | ``search_document`` | ``classification`` | ``clustering``) takes the
prompt the model declares for it and is ignored by a model without prompts, as Cohere's v1 models did.

Output types (``EMBEDDING_TYPES``, Cohere's layouts): ``float``; ``base64`` (little-endian float32);
``uint8`` and ``int8`` (each dimension scaled by the range the build calibrated for it and stored in
the manifest, ``embedding_ranges``: ``round((x - low) / (high - low) * 255)`` clipped to 0..255, and
int8 is that less 128); ``ubinary`` (``packbits(x > 0)``, dimensions / 8 unsigned bytes) and
``binary`` (the same bytes less 128, as signed). Codes depend on the float vector and the manifest
alone, so every invocation, batch job and endpoint route gives the same ones. A model whose manifest
declares Matryoshka sizes serves those too: the vector is truncated, then re-normalised.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from quantfn.errors import BadRequest, UpstreamFailed
from quantfn.tasks.base import Encoded, Pipeline, encode_with
from quantfn.tasks.task import Forward, Task, Tokens

if TYPE_CHECKING:
    from quantfn.config import Settings
    from quantfn.models.manifest import Manifest

EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
TRUNCATE = ("NONE", "START", "END")
#: Cohere's input types -> the manifest prompts that serve them, the first one declared wins.
COHERE_INPUT_TYPES = {
    "search_query": ("query",),
    "search_document": ("document", "passage"),
    "classification": ("classification", "query"),
    "clustering": ("clustering", "query"),
}
# Upper bounds for the JSON the function returns, escaped once more inside Lambda's proxy reply:
# quantfn.serialize writes a float32 in its shortest form, at most 14 characters ("-1.2345678e-05"), plus ",";
# an int8 at most 4 ("-128") plus ",", a uint8 3 plus ",".
_VALUE_CHARS = {"float": 15, "int8": 5, "uint8": 4, "binary": 5, "ubinary": 4}
_ITEM_OVERHEAD = 96  # {"object": "embedding", "index": N, "embedding": ...}, with its quotes escaped
_ENVELOPE = 4096  # status, headers, "model", "usage", "meta"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: The request fields a refusal names, by the wire shape the request came in.
_FIELDS = {
    "openai": {"dimensions": "dimensions", "types": "encoding_format", "texts": "input"},
    "cohere": {"dimensions": "output_dimension", "types": "embedding_types", "texts": "texts"},
}


@dataclass(frozen=True)
class EmbedRequest:
    texts: list[str]
    model: str | None = None
    input_type: str | None = None  # OpenAI's "query" | "document", or one of COHERE_INPUT_TYPES
    encoding_format: str = "float"  # OpenAI: "float" | "base64" (the type when ``types`` is empty)
    dimensions: int | None = None  # the model's own, or one of its Matryoshka sizes
    types: tuple[str, ...] = ()  # Cohere's embedding_types, any of EMBEDDING_TYPES
    truncate: str = "END"  # a text over the model's length: "END" / "START" cut from that side, "NONE" refuses
    max_tokens: int | None = None  # tokens per text, when fewer than the model's length
    shape: str = "openai"  # the reply's wire shape: "cohere" repeats the texts
    task = "embed"

    @property
    def wanted(self) -> tuple[str, ...]:
        """The output types the reply holds."""
        return self.types or (self.encoding_format,)

    def field(self, name: str) -> str:
        """The request field that holds ``name`` (dimensions, types, texts) in this request's wire shape."""
        return _FIELDS[self.shape][name]


class EmbedTask(Task):
    """Embeddings of texts, with the manifest's prompt for the request's ``input_type``."""

    name = "embed"
    serves = ("embed",)

    def check(self, request: EmbedRequest, manifest: Manifest) -> None:
        size = output_size(request, manifest)
        if size != manifest.dimensions and size not in manifest.matryoshka_dimensions:
            sizes = ", ".join(str(d) for d in manifest.output_dimensions)
            why = "" if manifest.matryoshka_dimensions else "; this model was not trained to shorten its embeddings"
            raise BadRequest(
                f"'{request.field('dimensions')}' must be one of {sizes} for model {manifest.model_id}{why}.",
                param=request.field("dimensions"),
            )
        field = request.field("types")
        if {"int8", "uint8"} & set(request.wanted) and size not in manifest.embedding_ranges:
            raise BadRequest(
                f"Model {manifest.model_id} has no calibrated int8 ranges for {size} dimensions (it was built "
                "before they existed): rebuild it with `quantfn build-model`, or ask for float, base64, binary or "
                "ubinary.",
                param=field,
            )
        if {"binary", "ubinary"} & set(request.wanted) and size % 8:
            raise BadRequest(f"Binary embeddings need dimensions divisible by 8, not {size}.", param=field)
        prompt_for(manifest, request.input_type)  # 400 for an undeclared OpenAI input type

    def inputs_field(self, request: EmbedRequest) -> str:
        return request.field("texts")

    def reply_bytes(self, request: EmbedRequest, manifest: Manifest) -> int:
        echo = texts_json_bytes(request.texts) if request.shape == "cohere" else 0
        return estimate_embedding_bytes(len(request.texts), output_size(request, manifest), request.wanted) + echo

    def reply_advice(self, request: EmbedRequest, manifest: Manifest, settings: Settings) -> str:
        size = output_size(request, manifest)
        if request.shape == "cohere":
            return embedding_advice(len(request.texts), size, request.wanted, settings, "embedding_types")
        return embedding_advice(len(request.texts), size, request.wanted, settings)

    def encode(self, request: EmbedRequest, manifest: Manifest, tokenizer: Any) -> Tokens:
        texts = prompted(request, manifest)
        encoded = encode_with(tokenizer, texts)
        counts = encoded.counts
        limit = min(request.max_tokens or manifest.max_sequence_length, manifest.max_sequence_length)
        long = [i for i, count in enumerate(counts) if count > limit]
        if not long or (request.truncate == "END" and limit == manifest.max_sequence_length):
            return Tokens.of(encoded)  # the pipeline cuts the end of a text over the model's length itself
        if request.truncate == "NONE":
            where = f"{request.field('texts')}[{long[0]}]"
            raise BadRequest(
                f"'{where}' has {counts[long[0]]} tokens; model {manifest.model_id} reads at most {limit}. "
                "Shorten it, or send truncate START or END.",
                param=where,
                code="text_too_long",
            )
        ids, type_ids = list(encoded.ids), list(encoded.type_ids)
        direction = "left" if request.truncate == "START" else "right"
        for i, cut in zip(long, cut_encodings(tokenizer, [texts[i] for i in long], limit, direction), strict=True):
            ids[i], type_ids[i] = cut.ids, cut.type_ids
        return Tokens(Encoded(ids, type_ids, encoded.inputs, encoded.content), counts, Tokens.of(encoded).readable)

    def run(self, request: EmbedRequest, pipeline: Pipeline, tokens: Tokens, ok: list[int], forward: Forward) -> Any:
        return shorten(super().run(request, pipeline, tokens, ok, forward), request, pipeline.manifest)

    def endpoint_request(self, request: EmbedRequest, manifest: Manifest) -> dict[str, Any]:
        # base64: the smallest reply, read without parsing floats; the model's own size, shortened here, and float
        # alone: the types are made here from the same ranges, so the endpoint route gives the same codes.
        body: dict[str, Any] = {"input": prompted(request, manifest), "encoding_format": "base64"}
        if request.truncate != "END":
            body["truncate"] = request.truncate
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        return body

    def endpoint_output(self, data: bytes, request: EmbedRequest, manifest: Manifest) -> np.ndarray:
        vectors = endpoint_vectors(data, len(request.texts), manifest.dimensions, manifest.normalize)
        return shorten(vectors, request, manifest)


def served_types(manifest: Manifest) -> list[str]:
    """The output types an embedder serves at its own size: int8 and uint8 only with calibrated ranges."""
    ranged = manifest.dimensions in manifest.embedding_ranges
    return [kind for kind in EMBEDDING_TYPES if ranged or kind not in ("int8", "uint8")]


def output_size(request: EmbedRequest, manifest: Manifest) -> int:
    """The size of the request's embeddings: the one it asks for, else the model's own."""
    return request.dimensions if request.dimensions is not None else manifest.dimensions


def shorten(vectors: np.ndarray, request: EmbedRequest, manifest: Manifest) -> np.ndarray:
    """``vectors`` at the request's size: a Matryoshka prefix, re-normalised when the model normalises."""
    size = output_size(request, manifest)
    return vectors if size == vectors.shape[1] else matryoshka(vectors, size, manifest.normalize)


def matryoshka(vectors: np.ndarray, size: int, normalize: bool) -> np.ndarray:
    """The first ``size`` dimensions of each vector, re-normalised to unit length when ``normalize``."""
    prefix = np.ascontiguousarray(vectors[:, :size], dtype=np.float32)
    return l2_normalize(prefix).astype(np.float32, copy=False) if normalize else prefix


def typed_embeddings(vectors: np.ndarray, types: Sequence[str], manifest: Manifest) -> dict[str, Any]:
    """Each of ``types`` for ``vectors`` [n, d] (already at the request's size): arrays, or base64 strings."""
    out: dict[str, Any] = {}
    for kind in types:
        if kind == "float":
            out[kind] = vectors.astype(np.float32, copy=False)
        elif kind == "base64":
            little = vectors.astype("<f4", copy=False)
            out[kind] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
        elif kind in ("uint8", "int8"):
            codes = quantize_uint8(vectors, *manifest.embedding_ranges[vectors.shape[1]])
            out[kind] = codes if kind == "uint8" else signed(codes)
        else:
            bits = np.packbits(vectors > 0, axis=1)
            out[kind] = bits if kind == "ubinary" else signed(bits)
    return out


def quantize_uint8(vectors: np.ndarray, low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    """Codes 0..255 per dimension: ``round((x - low) / (high - low) * 255)``, clipped (float64 throughout, so
    the codes are the same on every machine)."""
    lo, hi = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    step = np.where(hi > lo, (hi - lo) / 255.0, 1.0)
    return np.clip(np.rint((vectors.astype(np.float64) - lo) / step), 0, 255).astype(np.uint8)


def signed(codes: np.ndarray) -> np.ndarray:
    """uint8 codes as int8, less 128 (Cohere's int8 from uint8, binary from ubinary)."""
    return (codes.astype(np.int16) - 128).astype(np.int8)


def estimate_embedding_bytes(inputs: int, dimensions: int, types: str | Sequence[str]) -> int:
    """An upper bound of the bytes Lambda returns for ``inputs`` embeddings of ``dimensions`` in each of ``types``."""
    kinds = (types,) if isinstance(types, str) else tuple(types)
    per_item = _ITEM_OVERHEAD + sum(_item_chars(kind, dimensions) for kind in kinds)
    return _ENVELOPE + inputs * per_item


def _item_chars(kind: str, dimensions: int) -> int:
    if kind == "base64":
        return 4 * math.ceil(4 * dimensions / 3) + 8
    values = dimensions // 8 if kind in ("binary", "ubinary") else dimensions
    return values * _VALUE_CHARS[kind] + 8


def texts_json_bytes(texts: Sequence[str]) -> int:
    """An upper bound of ``texts`` written as a JSON array inside Lambda's proxy reply (escaped twice): a quote or
    backslash takes 4 characters, a control character 7, a UTF-16 code unit outside ASCII 6 (``\\uXXXX``)."""
    total = 2
    for text in texts:
        size = len(text) + 3 * (text.count('"') + text.count("\\")) + 6 * len(_CONTROL.findall(text)) + 6
        if not text.isascii():
            ascii_chars = len(text.encode("ascii", "ignore"))
            size += 6 * (len(text.encode("utf-16-le")) // 2) - (len(text) - ascii_chars)
        total += size
    return total


def embedding_advice(
    inputs: int, dimensions: int, types: str | Sequence[str], settings: Settings, field: str = "encoding_format"
) -> str:
    """What to do when ``inputs`` embeddings would not fit the reply: a more compact type if one would, else how
    to split."""
    limit = settings.limits.max_response_bytes
    per_item = estimate_embedding_bytes(1, dimensions, types) - _ENVELOPE
    fits = max(1, (limit - _ENVELOPE) // per_item)
    compact = "base64" if field == "encoding_format" else "int8"
    if estimate_embedding_bytes(inputs, dimensions, compact) <= limit and types not in (compact, (compact,)):
        size = estimate_embedding_bytes(inputs, dimensions, compact) / 2**20
        what = "encoding_format=base64" if field == "encoding_format" else 'embedding_types ["int8"] (or ubinary)'
        return f"Ask for {what} (about {size:.1f} MB) or split the request into parts of at most {fits} inputs."
    return f"Split the request into parts of at most {fits} inputs."


def cut_encodings(tokenizer: Any, texts: Sequence[str], limit: int, direction: str) -> list[Any]:
    """``texts`` encoded to at most ``limit`` tokens, cut on the ``direction`` side ("left": the start), the special
    tokens put back by the tokenizer's own post-processor: exactly what its own truncation gives."""
    room = max(1, limit - tokenizer.num_special_tokens_to_add(False))
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    for encoding in encodings:
        encoding.truncate(room, direction=direction)
    return [tokenizer.post_process(encoding) for encoding in encodings]


def endpoint_vectors(data: bytes, count: int, dimensions: int, normalized: bool) -> np.ndarray:
    """Check an OpenAI embeddings reply and return its vectors in index order; UpstreamFailed if anything is off."""
    try:
        reply = json.loads(data)
        items = reply["data"]
        if not isinstance(items, list):
            raise TypeError("'data' is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise UpstreamFailed(f"GPU endpoint reply is not an embeddings list: {exc.__class__.__name__}") from exc
    if len(items) != count:
        raise UpstreamFailed(f"GPU endpoint returned {len(items)} embeddings for {count} inputs")
    out = np.empty((count, dimensions), dtype=np.float32)
    seen = set()
    for item in items:
        index = item.get("index") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < count or index in seen:
            raise UpstreamFailed(f"GPU endpoint reply has a bad or repeated index: {index!r}")
        seen.add(index)
        out[index] = _vector(item.get("embedding"), dimensions, index)
    if not np.isfinite(out).all():
        raise UpstreamFailed("GPU endpoint returned non-finite numbers")
    if normalized and not np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-2):
        raise UpstreamFailed("GPU endpoint returned embeddings that are not unit length")
    return out


def _vector(embedding: Any, dimensions: int, index: int) -> np.ndarray:
    try:
        if isinstance(embedding, str):
            vector = np.frombuffer(base64.b64decode(embedding, validate=True), dtype="<f4")
        else:
            vector = np.asarray(embedding, dtype=np.float32)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise UpstreamFailed(f"GPU endpoint embedding {index} cannot be decoded") from exc
    if vector.shape != (dimensions,):
        raise UpstreamFailed(f"GPU endpoint embedding {index} has shape {vector.shape}, expected ({dimensions},)")
    return vector


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``hidden`` [B, S, D] over the positions where ``mask`` [B, S] is 1."""
    weights = mask.astype(hidden.dtype)
    summed = np.matmul(weights[:, None, :], hidden)[:, 0, :]  # one batched GEMV instead of a [B,S,D] temporary
    return summed / np.clip(weights.sum(axis=1, keepdims=True), 1e-9, None)


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """``hidden`` [B, S, D] pooled over the real tokens as sentence-transformers pools (right padding)."""
    if mode == "none":
        return hidden
    if mode == "cls":
        return hidden[:, 0, :]
    if mode == "max":
        return np.where(mask[:, :, None].astype(bool), hidden, np.float32(-1e9)).max(axis=1)
    if mode == "lasttoken":
        return hidden[np.arange(len(hidden)), np.maximum(mask.sum(axis=1) - 1, 0)]
    pooled = mean_pool(hidden, mask)
    if mode == "mean_sqrt_len_tokens":  # the sum over sqrt(length)
        pooled *= np.sqrt(np.clip(mask.sum(axis=1, keepdims=True), 1e-9, None)).astype(pooled.dtype)
    return pooled


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


class EmbedPipeline(Pipeline):
    task = "embed"

    @property
    def dimensions(self) -> int:
        return self.manifest.dimensions

    def encode_texts(self, texts: Sequence[str], input_type: str | None = None) -> Encoded:
        prefix = prompt_for(self.manifest, input_type)
        return self.encode([prefix + text for text in texts])

    def embed(self, texts: Sequence[str], input_type: str | None = None) -> np.ndarray:
        """Embeddings [n, dimensions] float32, in the order of ``texts``."""
        return self.forward(self.encode_texts(texts, input_type))

    def postprocess(self, output: np.ndarray, mask: np.ndarray) -> np.ndarray:
        pooled = pool(output, mask, self.manifest.pooling)
        if self.manifest.normalize:
            pooled = l2_normalize(pooled)
        return pooled.astype(np.float32, copy=False)


def prompt_for(manifest: Manifest, input_type: str | None) -> str:
    """The manifest's prompt for ``input_type`` ("" for none). OpenAI's ``query``/``document`` must be declared
    (400 otherwise); Cohere's input types take the first prompt the model declares for them, or none; without
    an input type, the model's default prompt (sentence-transformers' ``default_prompt_name``), if it has one."""
    if input_type is None:
        return manifest.default_prompt
    if input_type in COHERE_INPUT_TYPES:
        return next((manifest.prompts[name] for name in COHERE_INPUT_TYPES[input_type] if name in manifest.prompts), "")
    if input_type not in manifest.prompts:
        declared = ", ".join(sorted(manifest.prompts)) or "none"
        raise BadRequest(
            f"'input_type' {input_type!r} is not supported by model {manifest.model_id}; its input types: {declared}.",
            param="input_type",
        )
    return manifest.prompts[input_type]


def prompted(request: EmbedRequest, manifest: Manifest) -> list[str]:
    """The request's texts with the manifest's prompt for its ``input_type`` in front."""
    prefix = prompt_for(manifest, request.input_type)
    return [prefix + text for text in request.texts] if prefix else list(request.texts)
