"""What the data pipeline reads and how (`DataConfig`, `SourceConfig`): plain settings, importable without Grain
(a run's config, and the readers of a run directory, need them; `rlp_jax.data.pipeline` runs them)."""

from __future__ import annotations

import dataclasses
import math

from rlp_jax.data.readers import FORMATS, DataError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One data source: a file, a directory (searched recursively) or a glob, local or remote."""
    path: str
    weight: float = 1.0
    format: str = "auto"
    text_field: str = "text"
    name: str | None = None  # default: derived from path

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise DataError(f"SourceConfig.path must be a non-empty string, got {self.path!r}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise DataError(f"SourceConfig.weight must be a positive number, got {self.weight!r} ({self.path})")
        if self.format != "auto" and self.format not in FORMATS:
            raise DataError(f"unknown format {self.format!r} for {self.path}: use 'auto' or one of {FORMATS}")
        if not self.text_field:
            raise DataError(f"SourceConfig.text_field must be non-empty ({self.path})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Sources, shapes and policies of the pipeline (see the module docstring)."""
    sources: tuple[SourceConfig, ...]
    seq_len: int
    batch_size: int  # global; each host gets batch_size // process_count rows
    packing: str = "pack"  # "pack" | "window"
    min_doc_tokens: int = 8
    add_bos: bool = False
    add_eos: bool = True
    shuffle_seed: int = 0
    shuffle_buffer: int = 1024  # window shuffle over chunks; 0 = no shuffling at all
    eval_fraction: float = 0.0
    num_epochs: int | None = None  # None = repeat forever
    prefetch: int = 2  # ready batches kept by the background thread; 0 = build batches on demand

    def __post_init__(self):
        srcs = tuple(self.sources) if isinstance(self.sources, (list, tuple)) else ()
        object.__setattr__(self, "sources", srcs)
        checks = [
            (bool(srcs) and all(isinstance(s, SourceConfig) for s in srcs),
             f"sources must be a non-empty tuple of SourceConfig, got {self.sources!r}"),
            (self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.packing in ("pack", "window"), f"packing must be 'pack' or 'window', got {self.packing!r}"),
            (self.min_doc_tokens >= 0, f"min_doc_tokens must be >= 0, got {self.min_doc_tokens}"),
            (self.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}"),
            (0.0 <= self.eval_fraction < 1.0, f"eval_fraction must be in [0, 1), got {self.eval_fraction}"),
            (self.num_epochs is None or self.num_epochs >= 1,
             f"num_epochs must be None or >= 1, got {self.num_epochs}"),
            (self.prefetch >= 0, f"prefetch must be >= 0, got {self.prefetch}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise DataError(f"DataConfig: {msg}")
