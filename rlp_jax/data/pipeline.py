"""Data pipeline: text files -> tokenized, packed, host-sharded, exactly resumable batches (Grain).

Per host, every stage is a Grain `IterDataset`, so the whole pipeline has one checkpointable state:

    files of a source -> SourceDataset: read records, parse, train/eval split, tokenize, skip and
                         count bad records, add bos/eos, cut into chunks of <= seq_len tokens
    sources           -> grain.IterDataset.mix(weights)   deterministic weighted interleave of chunks
                      -> window shuffle of shuffle_buffer chunks
                      -> "pack": FirstFitPackIterDataset   | "window": one chunk per row
                      -> batch(batch_size // process_count)
                      -> ThreadPrefetchIterDataset(prefetch)   ready batches built in a background thread
                      -> DataIterator: next(), get_state(), set_state(), stats()

`next()` returns int32 numpy arrays, each `[batch_size // process_count, seq_len]`:
    tokens       token ids, `pad_id` where segment_ids == 0
    segment_ids  1, 2, 3, ... for the chunks in a row; 0 = padding
    positions    0, 1, ... within each segment (restarting per chunk); 0 on padding

Formats (by extension, or `SourceConfig.format`): `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.json` (a JSON
array of objects, or JSON lines), `.parquet` (a string column `text_field`), `.txt` (the whole file is
one document), `.array_record` (also `name.array_record-00000-of-00008`; each file's records are JSON
objects or raw UTF-8 text, decided from its first records). Paths go through `etils.epath` (gs://...);
directories are searched recursively (names starting with `.` or `_` are skipped), `**` globs are not
supported. A `.json` array is loaded whole: use JSON lines for big files.

Decisions:
* Sharding: with at least as many files as hosts, host h reads files h::process_count; otherwise every
  host reads every file and keeps the records r of file f with (f + r) % process_count == h.
* Packing: Grain's first-fit packer over max(rows per host, 16) bins; whole chunks are never split, so
  a row's segments are complete documents or seq_len-sized chunks of longer ones.
* Prefetch: reading, tokenizing, packing and batching all run in one background thread (Grain's
  ThreadPrefetchIterDataset) that keeps `prefetch` ready batches; about 0.7M tokens/s per host with a
  sentencepiece tokenizer (tokenization is ~2/3 of it), far above what an RLP step consumes.
* Shuffling is streaming (no record index, so compressed and remote files work): file order is
  reshuffled per epoch and chunks pass a window shuffle of `shuffle_buffer`; 0 disables both.
* Mixing weights apply to chunks (documents for documents shorter than seq_len, roughly tokens for
  longer ones). A source repeats forever unless `num_epochs` is set; then the mixture ends when the
  first source finishes its epochs (Grain's mix) and the last batch is padded with empty rows.
* Eval split: a document is held out iff blake2b(its text) / 2**64 < eval_fraction. This does not
  depend on the seed, the host count or the file layout, and duplicate texts share a split.
* Resume: `get_state()` is Grain's state of the consumed batch (source: epoch, file, record, chunk;
  the shuffle window and packing round it belongs to) plus the counters. `set_state` re-reads at most
  one shuffle window and one packing round and re-scans the current file up to the saved record.
  A state saved under another config, split or host layout is refused (fingerprint; prefetch may differ).
* Counting: every chunk carries a small vector with the records its source skipped since its previous
  document (by reason) and +1 document for a document's first chunk; `DataIterator` adds up the vectors
  of the batches it hands out and saves the totals in its state, so `stats()` describes exactly the
  consumed batches, identically after a resume. (With `num_epochs`, bad records after a source's last
  good document have nothing to ride on and are not counted.)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import weakref

import grain
import numpy as np
from grain import experimental as gx

from rlp_jax.data.config import DataConfig
from rlp_jax.data.readers import REASONS, DataError, resolve_files
from rlp_jax.data.stages import SourceDataset, SourceIterator, WindowShuffle, collate

_STATE_VERSION = 1


class DataIterator:
    """Batches of one host; `get_state`/`set_state` resume exactly, `stats` counts the consumed batches."""

    def __init__(self, ds: grain.IterDataset, *, names: list[str], fingerprint: str, also_accepts: tuple = ()):
        self._ds, self.names, self._fingerprint = ds, names, fingerprint
        self._accepts = {fingerprint, *also_accepts}   # states saved under an older fingerprint rule
        self._box = [iter(ds)]  # released at exit: Grain's prefetch iterator fails if freed during teardown
        weakref.finalize(self, _release, self._box)
        self._acct = np.zeros(len(names) * (1 + len(REASONS)), np.int64)
        self._counts = {"batches": 0, "tokens": 0, "padding": 0}

    @property
    def _it(self):
        return self._box[0]

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._acct += batch.pop("acct")
        real = int(np.count_nonzero(batch["segment_ids"]))
        self._counts["batches"] += 1
        self._counts["tokens"] += real
        self._counts["padding"] += batch["segment_ids"].size - real
        return batch

    def next(self) -> dict[str, np.ndarray]:
        """The next batch: {"tokens", "segment_ids", "positions"}, int32 [rows_per_host, seq_len]."""
        return self.__next__()

    def get_state(self) -> dict:
        """JSON-serialisable state of the batches consumed so far (pipeline position and counters)."""
        state = {"version": _STATE_VERSION, "fingerprint": self._fingerprint, "grain": self._it.get_state(),
                 "acct": self._acct.tolist(), "counts": dict(self._counts)}
        return json.loads(json.dumps(state))

    def set_state(self, state: dict) -> None:
        """Continue exactly after the batch at which `state` was taken (also from its JSON round trip)."""
        if state.get("version") != _STATE_VERSION or state.get("fingerprint") not in self._accepts:
            raise DataError("data iterator state was saved by a different data config, split or host layout "
                            f"(fingerprint {state.get('fingerprint')} != {self._fingerprint}): restore with the "
                            "same DataConfig (prefetch may differ) and process_index/process_count")
        acct, n = np.asarray(state["acct"], np.int64), len(self.names)
        if acct.size != self._acct.size and acct.size % n == 0 and acct.size < self._acct.size:
            # saved before a skip reason was added (bad_file): the new reasons start at 0
            old, new = acct.size // n, self._acct.size // n
            acct = np.concatenate([np.pad(block, (0, new - old)) for block in acct.reshape(n, old)])
        self._it.set_state(json.loads(json.dumps(state["grain"])))
        self._acct[:] = acct
        self._counts = {k: int(v) for k, v in state["counts"].items()}

    def stats(self) -> dict[str, int]:
        """Counts over the consumed batches: batches, tokens, padding, docs, skipped records by reason
        (bad_json, missing_text, not_string, too_short, bad_utf8), and per source `docs/NAME`, `REASON/NAME`."""
        per = self._acct.reshape(len(self.names), 1 + len(REASONS))
        out = dict(self._counts, docs=int(per[:, 0].sum()))
        out.update({r: int(per[:, 1 + j].sum()) for j, r in enumerate(REASONS)})
        for i, name in enumerate(self.names):
            out[f"docs/{name}"] = int(per[i, 0])
            out.update({f"{r}/{name}": int(per[i, 1 + j]) for j, r in enumerate(REASONS)})
        return out

    def close(self) -> None:
        """Stop the prefetch thread."""
        self._it.close()


def _release(box: list) -> None:
    box.pop().close()


def _relative_layout(files: list[str]) -> list[str]:
    """A source's files relative to their common directory (just the name for a single file)."""
    if len(files) == 1:
        return [files[0].rsplit("/", 1)[-1]]
    root = os.path.commonpath(files)
    return [os.path.relpath(f, root) for f in files]


def _default_name(path: str) -> str:
    parts = [p for p in path.rstrip("/").split("/") if p]
    parts = parts[:next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))] or ["data"]
    return re.sub(r"(\.(jsonl|json|gz|zst|parquet|txt|array_record))+(-\d+-of-\d+)?$", "", parts[-1]) or "data"


def make_iterator(cfg: DataConfig, tokenizer, *, split: str = "train", process_index: int | None = None,
                  process_count: int | None = None) -> DataIterator:
    """Build this host's batch iterator (see the module docstring).

    Raises DataError at start-up for a bad batch/host layout, missing files, unknown formats, or a
    source whose shard has no readable document in `split` ("train" or "eval").
    """
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} must be in [0, process_count={process_count})")
    if cfg.batch_size % process_count:
        raise DataError(f"batch_size {cfg.batch_size} is not divisible by process_count {process_count}: "
                        "use a multiple of the host count")
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    if split == "eval" and cfg.eval_fraction == 0:
        raise DataError("split='eval' needs DataConfig.eval_fraction > 0")
    for flag, tid in (("add_bos", tokenizer.bos_id), ("add_eos", tokenizer.eos_id)):
        if getattr(cfg, flag) and tid is None:
            raise DataError(f"DataConfig.{flag}=True but the tokenizer has no such token: set {flag}=False")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    rows = cfg.batch_size // process_count

    names: list[str] = []
    for s in cfg.sources:
        name = s.name or _default_name(s.path)
        names.append(name if name not in names else f"{name}_{len(names)}")
    sources, layouts = [], []
    for i, (s, name) in enumerate(zip(cfg.sources, names)):
        files, formats = resolve_files(s)
        layouts.append(_relative_layout(files))
        by_file = len(files) >= process_count  # else: shard records
        src = SourceDataset(
            index=i, name=name, path=s.path, text_field=s.text_field, tokenizer=tokenizer, cfg=cfg, split=split,
            n_sources=len(cfg.sources), host=f"{process_index}/{process_count}",
            files=files[process_index::process_count] if by_file else files,
            formats=formats[process_index::process_count] if by_file else formats,
            stride=1 if by_file else process_count, offset=0 if by_file else process_index)
        probe = SourceIterator(src)
        next(probe)  # DataError if this shard has no readable document
        probe.close()
        sources.append(src)

    ds = sources[0] if len(sources) == 1 else grain.IterDataset.mix(sources, [s.weight for s in cfg.sources])
    if cfg.shuffle_buffer > 1:
        ds = WindowShuffle(ds, window=cfg.shuffle_buffer, seed=cfg.shuffle_seed)
    if cfg.packing == "pack":
        ds = gx.FirstFitPackIterDataset(ds, length_struct={"tokens": cfg.seq_len}, meta_features=("acct",),
                                        num_packing_bins=max(rows, 16), seed=cfg.shuffle_seed,
                                        shuffle_bins=cfg.shuffle_buffer > 0)
    batch_fn = lambda b: collate(b, n_rows=rows, seq_len=cfg.seq_len, pad_id=pad_id, n_acct=sources[0].n_acct)
    ds = ds.batch(rows, drop_remainder=False, batch_fn=batch_fn)
    if cfg.prefetch > 0:
        ds = gx.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)

    # What the saved state's positions refer to. Source paths enter only as each source's files relative to
    # their common directory, so a run directory moved or copied with its data (or pointed at a copy of the
    # data elsewhere) still resumes.
    digest = lambda d: hashlib.blake2b(json.dumps(d, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    base = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "prefetch"}
    base.update(split=split, process_index=process_index, process_count=process_count, names=names)
    layout_ids = [{**{k: v for k, v in dataclasses.asdict(src).items() if k != "path"}, "files": layout}
                  for src, layout in zip(cfg.sources, layouts)]
    # `base` alone is the rule before 2026-12-03 (absolute source paths): states saved then still resume.
    return DataIterator(ds, names=names, fingerprint=digest({**base, "sources": layout_ids}),
                        also_accepts=(digest(base),))
