"""The Grain stages of the data pipeline that are ours (`rlp_jax.data.pipeline` chains them with Grain's
mix, packer, batcher and prefetcher): one source's records -> document chunks with their skip counts,
a window shuffle, and the collation of packed rows into a batch. Each stage's iterator has a
checkpointable state; the module docstring of `pipeline` describes the whole chain and its decisions.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
from typing import TYPE_CHECKING, Callable

import grain
import numpy as np

from rlp_jax.data.readers import REASONS, DataError, records

if TYPE_CHECKING:
    from rlp_jax.data.config import DataConfig


# --- one source: records -> document chunks ------------------------------------------------------

class SourceDataset(grain.IterDataset):
    """The chunks (<= seq_len tokens) of the good documents of one source's shard, repeated by epoch."""

    def __init__(self, *, index: int, name: str, path: str, files: list[str], formats: list[str],
                 text_field: str, stride: int, offset: int, tokenizer, cfg: DataConfig, split: str,
                 n_sources: int, host: str):
        super().__init__()
        self.index, self.name, self.path, self.files, self.formats = index, name, path, files, formats
        self.text_field, self.stride, self.offset, self.tok, self.cfg = text_field, stride, offset, tokenizer, cfg
        self.split, self.n_acct, self.host = split, n_sources * (1 + len(REASONS)), host

    def keep_fn(self, fpos: int) -> Callable[[int], bool]:
        """Record sharding: keep record i of file fpos iff (fpos + i) % stride == offset."""
        s, o = self.stride, self.offset
        return (lambda i: True) if s == 1 else (lambda i: (fpos + i) % s == o)

    def file_order(self, epoch: int) -> np.ndarray:
        n = len(self.files)
        if self.cfg.shuffle_buffer == 0:
            return np.arange(n)
        return np.random.default_rng([self.cfg.shuffle_seed, self.index, epoch]).permutation(n)

    def acct_slot(self, key: str) -> int:
        return self.index * (1 + len(REASONS)) + (0 if key == "docs" else 1 + REASONS.index(key))

    def document(self, text: str) -> tuple[list[np.ndarray] | None, str | None]:
        """Chunks of a document in this split, ([], None) for the other split, or (None, reason)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes
            return None, "bad_utf8"
        if self.cfg.eval_fraction > 0:
            h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2.0 ** 64
            if (h < self.cfg.eval_fraction) != (self.split == "eval"):
                return [], None
        elif self.split == "eval":
            return [], None
        ids = self.tok.encode(text)
        if len(ids) < self.cfg.min_doc_tokens or not ids:
            return None, "too_short"
        cfg = self.cfg
        ids = [self.tok.bos_id] * cfg.add_bos + list(ids) + [self.tok.eos_id] * cfg.add_eos
        arr = np.asarray(ids, np.int32)
        return [arr[i:i + cfg.seq_len] for i in range(0, len(arr), cfg.seq_len)], None

    def __iter__(self):
        return SourceIterator(self)


class SourceIterator(grain.DatasetIterator):
    """Yields {"tokens": chunk, "acct": counts since the previous chunk}; state (epoch, file, record, chunk)."""

    _KEYS = ("epoch", "file", "record", "chunk", "epoch_docs")

    def __init__(self, src: SourceDataset):
        super().__init__()
        self._src = src
        self._epoch = self._file = self._record = self._chunk = self._epoch_docs = 0
        self._gen = None
        self._chunks: list[np.ndarray] = []  # chunks of record `_record` not yet emitted
        self._acct = np.zeros(src.n_acct, np.int64)

    def get_state(self) -> dict[str, int]:
        return {k: getattr(self, "_" + k) for k in self._KEYS}

    def set_state(self, state: dict[str, int]) -> None:
        self._close_gen()
        for k in self._KEYS:
            setattr(self, "_" + k, int(state[k]))
        self._chunks, self._acct[:] = [], 0
        if self._chunk:  # re-read the partly emitted document
            idx, text, _ = self._next_record()
            assert idx == self._record, (idx, self._record)
            self._chunks = self._src.document(text)[0][self._chunk:]

    def _close_gen(self):
        if self._gen is not None:
            self._gen.close()
        self._gen = None

    def _next_record(self):
        s = self._src
        while True:
            if s.cfg.num_epochs is not None and self._epoch >= s.cfg.num_epochs:
                raise StopIteration
            if self._file >= len(s.files):
                if self._epoch_docs == 0:
                    counts = ", ".join(f"{r}={self._acct[s.acct_slot(r)]}" for r in REASONS)
                    raise DataError(f"source {s.name!r} ({s.path}) has no readable documents in split "
                                    f"{s.split!r} on host {s.host} (skipped: {counts}): check the files, "
                                    "SourceConfig.format/text_field, min_doc_tokens and eval_fraction")
                self._epoch, self._file, self._record, self._epoch_docs = self._epoch + 1, 0, 0, 0
                continue
            if self._gen is None:
                fpos = int(s.file_order(self._epoch)[self._file])
                self._gen = records(s.files[fpos], s.formats[fpos], s.text_field, self._record, s.keep_fn(fpos))
            item = next(self._gen, None)
            if item is not None:
                return item
            self._close_gen()
            self._file, self._record = self._file + 1, 0

    def __next__(self) -> dict[str, np.ndarray]:
        s = self._src
        while not self._chunks:
            idx, text, reason = self._next_record()
            self._record = idx + 1
            if reason is None:
                chunks, reason = s.document(text)
                if chunks:
                    self._chunks, self._record, self._chunk = chunks, idx, 0
                    self._epoch_docs += 1
                    self._acct[s.acct_slot("docs")] += 1
            if reason is not None:
                self._acct[s.acct_slot(reason)] += 1
        tokens = self._chunks.pop(0)
        self._chunk += 1
        if not self._chunks:
            self._record, self._chunk = self._record + 1, 0
        acct, self._acct = self._acct, np.zeros_like(self._acct)
        return {"tokens": tokens, "acct": acct}

    def close(self) -> None:
        self._close_gen()
        super().close()


class WindowShuffle(grain.IterDataset):
    """Window shuffle (Grain's WindowShuffleIterDataset calls a slow per-element index_shuffle)."""

    def __init__(self, parent: grain.IterDataset, *, window: int, seed: int):
        super().__init__(parent)
        self.window, self.seed = window, seed

    def __iter__(self):
        return WindowShuffleIterator(self._parent.__iter__(), self.window, self.seed)


class WindowShuffleIterator(grain.DatasetIterator):
    """Reads `window` elements and yields them permuted; state: parent state at the window start,
    window index and position in the window (a restore re-reads the window)."""

    def __init__(self, parent: grain.DatasetIterator, window: int, seed: int):
        super().__init__(parent)
        self._window, self._seed = window, seed
        self._index, self._pos, self._buf = 0, 0, []
        self._start = parent.get_state()

    def _fill(self) -> None:
        self._start = copy.deepcopy(self._parent.get_state())
        buf = list(itertools.islice(self._parent, self._window))
        order = np.random.default_rng([self._seed, self._index]).permutation(len(buf))
        self._buf = [buf[i] for i in order]

    def __next__(self):
        if self._pos == len(self._buf):
            self._index += bool(self._buf)
            self._fill()
            self._pos = 0
            if not self._buf:
                raise StopIteration
        self._pos += 1
        return self._buf[self._pos - 1]

    def get_state(self) -> dict:
        return {"parent": copy.deepcopy(self._start), "index": self._index, "pos": self._pos}

    def set_state(self, state: dict) -> None:
        self._index, self._pos = int(state["index"]), int(state["pos"])
        self._parent.set_state(state["parent"])
        self._fill()


# --- batches ---------------------------------------------------------------------------------------

def collate(rows: list[dict], *, n_rows: int, seq_len: int, pad_id: int, n_acct: int) -> dict[str, np.ndarray]:
    """Stack packed rows ("pack") or single chunks ("window") into a full batch; sum the counts."""
    tokens = np.full((n_rows, seq_len), pad_id, np.int32)
    seg, pos = np.zeros_like(tokens), np.zeros_like(tokens)
    acct = np.zeros(n_acct, np.int64)
    for r, row in enumerate(rows):
        if "tokens_segment_ids" in row:  # packed by FirstFitPackIterDataset
            seg[r], pos[r] = row["tokens_segment_ids"], row["tokens_positions"]
            tokens[r] = np.where(seg[r] > 0, row["tokens"], pad_id)
            acct += np.sum(row["acct"], axis=0, dtype=np.int64)
        else:
            n = len(row["tokens"])
            tokens[r, :n], seg[r, :n], pos[r, :n] = row["tokens"], 1, np.arange(n)
            acct += row["acct"]
    return {"tokens": tokens, "segment_ids": seg, "positions": pos, "acct": acct}
