"""The task pipeline every task shares: tokenize -> run in length-sorted sub-batches -> post-process.

Texts (or (query, document) pairs) are tokenized once without truncation: the
untruncated counts are what limits and ``usage`` report. Inputs longer than the
model's maximum are encoded again by a truncating copy of the same tokenizer, so
truncation and the special tokens around it are exactly the tokenizer's own (its
post-processor holds the template; no token is a literal here). Inputs are sorted
by length so each sub-batch pads only to its own longest, and the outputs come
back in request order.

With ``workers`` > 1 (``open_pipeline``'s ``parallelism``), a sub-batch is cut into
``workers`` contiguous pieces of the length-sorted order that run at once on a
CPU session of one intra-op thread (onnxruntime releases the GIL in ``run``): on
two vCPUs the int8 graph ran 2.4x plain onnxruntime fp32 this way against 1.9x
with two intra-op threads, whose many small per-token kernels hand work between
threads more often than fp32's few big GEMMs (bench/QUANTIZATION.md, round 8). A
request of one text is one piece and runs on ``session`` itself, which under
``"auto"`` has every thread: one short text is faster on two threads. Rows depend
on their piece only through padding and on the session only through summation
order, which the batch-invariance gate bounds. A task overrides ``postprocess``
(and, for pairs, nothing else): the manifest says which task a model serves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from quantfn.models.manifest import Manifest

Inputs = Sequence[str] | Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Encoded:
    """Token ids per input, untruncated, with the tokenizer's special tokens; ``inputs`` are what was encoded."""

    ids: list[list[int]]
    type_ids: list[list[int]]
    inputs: Sequence[Any] = ()
    #: Tokens per input that are not special tokens: 0 means the text held nothing the model reads.
    content: list[int] | None = None

    @property
    def counts(self) -> list[int]:
        return [len(ids) for ids in self.ids]

    @classmethod
    def concat(cls, parts: Sequence[Encoded]) -> Encoded:
        """One Encoded of several requests' encodings, in order (the GPU container batches them so)."""
        return cls(
            [ids for part in parts for ids in part.ids],
            [types for part in parts for types in part.type_ids],
            [item for part in parts for item in part.inputs],
            [c for part in parts for c in (part.content or [1] * len(part.ids))],
        )

    def subset(self, indices: Sequence[int]) -> Encoded:
        """The encodings of ``indices``, in that order (a batch job drops its bad lines this way)."""
        return Encoded(
            [self.ids[i] for i in indices],
            [self.type_ids[i] for i in indices],
            [self.inputs[i] for i in indices] if self.inputs else (),
            [self.content[i] for i in indices] if self.content is not None else None,
        )


def load_tokenizer(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` with the file's padding and truncation turned off (the pipeline does both)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def encode_with(tokenizer: Any, inputs: Inputs) -> Encoded:
    """Untruncated encodings by ``tokenizer`` (texts or pairs), in order."""
    encodings = tokenizer.encode_batch(list(inputs))
    return Encoded(
        [e.ids for e in encodings],
        [e.type_ids for e in encodings],
        inputs,
        [len(e.special_tokens_mask) - sum(e.special_tokens_mask) for e in encodings],
    )


class Pipeline:
    """A model's session, tokenizer and manifest, and the steps every task shares."""

    task: ClassVar[str] = ""

    def __init__(
        self,
        session: Any,
        tokenizer: Any,
        manifest: Manifest,
        batch_size: int = 32,
        workers: int = 1,
        open_piece_session: Callable[[], Any] | None = None,
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.batch_size = batch_size
        self.max_length = manifest.max_sequence_length
        #: Sub-batch pieces run at once on ``session`` (1: one at a time, on the caller's thread).
        self.workers = max(1, workers)
        #: The session pieces run on when there are several: ``session`` itself unless ``open_piece_session``
        #: is given, which makes it (one intra-op thread) on the first request of more than one piece.
        self.piece_session: Any = None if open_piece_session else session
        self._open_piece_session = open_piece_session
        self._pool: ThreadPoolExecutor | None = None
        self._truncating: Any = None
        self._lock = threading.Lock()

    # -- tokenize --------------------------------------------------------------------------------------------
    def encode(self, inputs: Inputs) -> Encoded:
        """Untruncated encodings of texts or (query, document) pairs, in order."""
        return encode_with(self.tokenizer, inputs)

    def _truncated(self, encoded: Encoded) -> tuple[list[list[int]], list[list[int]]]:
        """Ids and type ids cut to the model's maximum by the tokenizer's own truncation."""
        ids, type_ids = list(encoded.ids), list(encoded.type_ids)
        long = [i for i, seq in enumerate(ids) if len(seq) > self.max_length]
        if long:
            encodings = self._truncating_tokenizer().encode_batch([encoded.inputs[i] for i in long])
            for i, encoding in zip(long, encodings, strict=True):
                ids[i], type_ids[i] = encoding.ids, encoding.type_ids
        return ids, type_ids

    def _truncating_tokenizer(self) -> Any:
        # A second tokenizer, made only when a long input first appears: the cold path never pays for it.
        with self._lock:
            if self._truncating is None:
                from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
                tokenizer.no_padding()
                tokenizer.enable_truncation(self.max_length)
                self._truncating = tokenizer
        return self._truncating

    # -- run -------------------------------------------------------------------------------------------------
    def forward(self, encoded: Encoded) -> np.ndarray:
        """Post-processed outputs [n, ...] in the order of ``encoded``."""
        ids, type_ids = self._truncated(encoded)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        if not order:
            return np.empty((0, self.manifest.dimensions), dtype=np.float32)
        # Pieces of the sorted order: sub-batches of ``batch_size``, each cut in ``workers`` (a request of
        # 32 on two workers is two pieces of 16 that run at once; one text is one piece, run right here).
        piece = -(-min(len(order), self.batch_size) // self.workers)
        pieces = [order[start : start + piece] for start in range(0, len(order), piece)]

        at_once = len(pieces) > 1 and self.workers > 1
        session = self._pieces() if at_once else self.session

        def run(chunk: list[int]) -> np.ndarray:
            return self._run([ids[i] for i in chunk], [type_ids[i] for i in chunk], session)

        results = self._executor().map(run, pieces) if at_once else map(run, pieces)
        out: np.ndarray | None = None
        for chunk, rows in zip(pieces, results, strict=True):
            if out is None:
                out = np.empty((len(ids), *rows.shape[1:]), dtype=np.float32)
            out[chunk] = rows
        assert out is not None
        return out

    def open_sessions(self) -> None:
        """Open now every session this pipeline may use (init under preload or SnapStart), not on first need."""
        if self.workers > 1:
            self._pieces()

    def _pieces(self) -> Any:
        # Made on the first request of more than one piece: a function that only sees single texts never pays.
        with self._lock:
            if self.piece_session is None and self._open_piece_session is not None:
                self.piece_session = self._open_piece_session()
        return self.piece_session

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="quantfn-run")
        return self._pool

    def feeds(self, batch: Sequence[Sequence[int]], type_batch: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Every input a graph may take for one sub-batch of token ids, padded with the manifest's pad id to
        the longest: ``input_ids``, ``attention_mask``, ``token_type_ids`` (a graph is fed the ones its manifest
        names; a build's calibration feeds its graph exactly so)."""
        longest = max(len(seq) for seq in batch)
        input_ids = np.full((len(batch), longest), self.manifest.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        token_types = np.zeros((len(batch), longest), dtype=np.int64)
        for row, (seq, types) in enumerate(zip(batch, type_batch, strict=True)):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
            token_types[row, : len(types)] = types
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types}

    def sub_batches(self, encoded: Encoded) -> Iterator[dict[str, np.ndarray]]:
        """The graph inputs the runtime feeds for ``encoded``: truncated, length-sorted sub-batches of
        ``batch_size``, each padded by ``feeds`` (a build calibrates its graph on exactly these)."""
        ids, type_ids = self._truncated(encoded)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            feeds = self.feeds([ids[i] for i in chunk], [type_ids[i] for i in chunk])
            yield {name: feeds[name] for name in self.manifest.inputs}

    def _run(self, batch: list[list[int]], type_batch: list[list[int]], session: Any) -> np.ndarray:
        feeds = self.feeds(batch, type_batch)
        (output,) = session.run([self.manifest.output], {name: feeds[name] for name in self.manifest.inputs})
        return self.postprocess(output, feeds["attention_mask"])

    def postprocess(self, output: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """What the task makes of one sub-batch's graph output; ``mask`` [B, S] marks real tokens."""
        raise NotImplementedError
