"""Embeddings: pool the graph's token states (mean, CLS, max, mean/sqrt(length), last token; or take the graph's
own pooled output), L2-normalise.

An ``input_type`` (``query`` or ``document``) puts the manifest's prompt for it in
front of each text, as e5 and bge models expect; a model without prompts
refuses one with a 400 rather than ignoring it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from quantfn.errors import BadRequest, UpstreamFailed
from quantfn.tasks.base import Encoded, Pipeline, encode_with
from quantfn.tasks.task import Task, Tokens

if TYPE_CHECKING:
    from quantfn.config import Settings
    from quantfn.models.manifest import Manifest

# Upper bounds for the JSON the function returns, escaped once more inside Lambda's proxy reply:
# quantfn.serialize writes a float32 in its shortest form, at most 14 characters ("-1.2345678e-05"), plus ",".
_FLOAT_CHARS = 15
_ITEM_OVERHEAD = 96  # {"object": "embedding", "index": N, "embedding": ...}, with its quotes escaped
_ENVELOPE = 4096  # status, headers, "model", "usage"


@dataclass(frozen=True)
class EmbedRequest:
    texts: list[str]
    model: str | None = None
    input_type: str | None = None  # "query" | "document": the manifest's prompt goes in front
    encoding_format: str = "float"
    dimensions: int | None = None
    task = "embed"


class EmbedTask(Task):
    """Embeddings of texts, with the manifest's prompt for the request's ``input_type``."""

    name = "embed"
    serves = ("embed",)

    def check(self, request: EmbedRequest, manifest: Manifest) -> None:
        if request.dimensions is not None and request.dimensions != manifest.dimensions:
            raise BadRequest(
                f"'dimensions' must be {manifest.dimensions} for model {manifest.model_id}; "
                "this model cannot shorten its embeddings.",
                param="dimensions",
            )
        apply_prompt(manifest.prompts, [], request.input_type, manifest.model_id)  # 400 for an undeclared type

    def reply_bytes(self, request: EmbedRequest, manifest: Manifest) -> int:
        return estimate_embedding_bytes(len(request.texts), manifest.dimensions, request.encoding_format)

    def reply_advice(self, request: EmbedRequest, manifest: Manifest, settings: Settings) -> str:
        return embedding_advice(len(request.texts), manifest.dimensions, request.encoding_format, settings)

    def encode(self, request: EmbedRequest, manifest: Manifest, tokenizer: Any) -> Tokens:
        texts = apply_prompt(manifest.prompts, request.texts, request.input_type, manifest.model_id)
        return Tokens.of(encode_with(tokenizer, texts))

    def endpoint_request(self, request: EmbedRequest, manifest: Manifest) -> dict[str, Any]:
        texts = apply_prompt(manifest.prompts, request.texts, request.input_type, manifest.model_id)
        return {"input": texts, "encoding_format": "base64"}  # base64: the smallest reply, read without parsing floats

    def endpoint_output(self, data: bytes, request: EmbedRequest, manifest: Manifest) -> np.ndarray:
        return endpoint_vectors(data, len(request.texts), manifest.dimensions, manifest.normalize)


def estimate_embedding_bytes(inputs: int, dimensions: int, encoding_format: str) -> int:
    """An upper bound of the bytes Lambda returns for ``inputs`` embeddings of ``dimensions``."""
    base64_chars = 4 * math.ceil(4 * dimensions / 3) + 4
    per_item = base64_chars if encoding_format == "base64" else dimensions * _FLOAT_CHARS
    return _ENVELOPE + inputs * (per_item + _ITEM_OVERHEAD)


def embedding_advice(inputs: int, dimensions: int, encoding_format: str, settings: Settings) -> str:
    """What to do when ``inputs`` embeddings would not fit the reply: base64 if it would fit, else how to split."""
    limit = settings.limits.max_response_bytes
    per_item = estimate_embedding_bytes(1, dimensions, encoding_format) - _ENVELOPE
    fits = max(1, (limit - _ENVELOPE) // per_item)
    if encoding_format != "base64":
        as_base64 = estimate_embedding_bytes(inputs, dimensions, "base64")
        if as_base64 <= limit:
            return (
                f"Ask for encoding_format=base64 (about {as_base64 / 2**20:.1f} MB) "
                f"or split the request into parts of at most {fits} inputs."
            )
    return f"Split the request into parts of at most {fits} inputs."


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

    def prompted(self, texts: Sequence[str], input_type: str | None) -> list[str]:
        """``texts`` with the manifest's prompt for ``input_type`` in front (none given: its default prompt, if any)."""
        if input_type is None and self.manifest.raw.get("default_prompt"):
            return [str(self.manifest.raw["default_prompt"]) + text for text in texts]
        return apply_prompt(self.manifest.prompts, texts, input_type, self.manifest.model_id)

    def encode_texts(self, texts: Sequence[str], input_type: str | None = None) -> Encoded:
        return self.encode(self.prompted(texts, input_type))

    def embed(self, texts: Sequence[str], input_type: str | None = None) -> np.ndarray:
        """Embeddings [n, dimensions] float32, in the order of ``texts``."""
        return self.forward(self.encode_texts(texts, input_type))

    def postprocess(self, output: np.ndarray, mask: np.ndarray) -> np.ndarray:
        pooled = pool(output, mask, self.manifest.pooling)
        if self.manifest.normalize:
            pooled = l2_normalize(pooled)
        return pooled.astype(np.float32, copy=False)


def apply_prompt(prompts: dict[str, str], texts: Sequence[str], input_type: str | None, model_id: str) -> list[str]:
    """Prefix each text with ``prompts[input_type]``; 400 for an input type the model does not declare."""
    if input_type is None:
        return list(texts)
    if input_type not in prompts:
        declared = ", ".join(sorted(prompts)) or "none"
        raise BadRequest(
            f"'input_type' {input_type!r} is not supported by model {model_id}; its input types: {declared}.",
            param="input_type",
        )
    prefix = prompts[input_type]
    return [prefix + text for text in texts]
