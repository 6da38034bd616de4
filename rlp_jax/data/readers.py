"""Files and records of a data source: which files a source names (`resolve_files`), and their records
as (text, bad-record reason) pairs (`records`), for every format the pipeline reads.

Formats (by extension, or `SourceConfig.format`): `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.json`, `.parquet`,
`.txt`, `.array_record` (also `name.array_record-00000-of-00008`); see `rlp_jax.data.pipeline`.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import logging
import re
from typing import Any, Callable

from etils import epath

REASONS = ("bad_json", "missing_text", "not_string", "too_short", "bad_utf8", "bad_file")
PAST_THE_END = 1 << 62   # the record index a corrupt file reports: its remaining records are skipped
FORMATS = ("jsonl", "json", "jsonl.gz", "jsonl.zst", "parquet", "txt", "array_record")
_EXT_FORMAT = ((".jsonl.gz", "jsonl.gz"), (".jsonl.zst", "jsonl.zst"), (".jsonl", "jsonl"),
               (".json", "json"), (".parquet", "parquet"), (".txt", "txt"), (".array_record", "array_record"))


log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data configuration or the files it names cannot be used (one-line message with the fix)."""


def _format_of(path: str) -> str | None:
    name = re.sub(r"-\d+-of-\d+$", "", path.lower())
    return next((fmt for ext, fmt in _EXT_FORMAT if name.endswith(ext)), None)


def resolve_files(src) -> tuple[list[str], list[str]]:
    """Sorted files of a source and their formats; DataError if there are none or a format is unknown."""
    path = src.path
    if "**" in path:
        raise DataError(f"recursive glob {path!r} is not supported: name the directory (searched recursively)")
    if any(c in path for c in "*?["):
        parts = path.split("/")
        i = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
        base = "/".join(parts[:i]) or ("/" if path.startswith("/") else ".")
        files = sorted(str(p) for p in epath.Path(base).glob("/".join(parts[i:])) if p.is_file())
        if not files:
            raise DataError(f"glob {path!r} matched no files: fix SourceConfig.path")
    elif (p := epath.Path(path)).is_dir():
        files = sorted(str(root / f) for root, _, names in p.walk() for f in names
                       if not any(part.startswith((".", "_")) for part in (root / f).relative_to(p).parts)
                       and (src.format != "auto" or _format_of(f)))
        if not files:
            raise DataError(f"directory {path} holds no files with a known extension {[e for e, _ in _EXT_FORMAT]}: "
                            "fix SourceConfig.path or set SourceConfig.format")
    elif p.exists():
        files = [path]
    else:
        raise DataError(f"no such file or directory: {path}: fix SourceConfig.path")
    formats = [src.format if src.format != "auto" else _format_of(f) for f in files]
    for f, fmt in zip(files, formats):
        if fmt is None:
            raise DataError(f"cannot tell the format of {f} from its extension: set SourceConfig.format "
                            f"to one of {FORMATS}")
    return files, formats


def _decode(b: bytes) -> tuple[str | None, str | None]:
    try:
        return b.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "bad_utf8"


def _from_value(v: Any) -> tuple[str | None, str | None]:
    if v is None:
        return None, "missing_text"
    if isinstance(v, bytes):
        return _decode(v)
    return (v, None) if isinstance(v, str) else (None, "not_string")


def _from_json(line: bytes, field: str) -> tuple[str | None, str | None]:
    s, reason = _decode(line)
    if reason:
        return None, reason
    try:
        obj = json.loads(s)
    except ValueError:
        return None, "bad_json"
    return _from_value(obj.get(field)) if isinstance(obj, dict) else (None, "missing_text")


_WARNED: set[str] = set()   # corrupt files already reported in this process


def records(path: str, fmt: str, field: str, start: int, keep: Callable[[int], bool]):
    """Yield (index, text, None) or (index, None, reason) for the kept records of one file from `start`.

    A file that turns out corrupt or truncated (a bad gzip/zstd stream, an unreadable Parquet file) yields
    its good records up to the damage, then one (PAST_THE_END, None, "bad_file"): the rest of the file is
    skipped and counted once as `data/bad_file`, and a resume past it does not read it again. Other files
    go on; a source whose every file is bad has no readable documents (a one-line DataError)."""
    if start >= PAST_THE_END:
        return
    try:
        yield from _file_records(path, fmt, field, start, keep)
    except Exception as e:
        if not isinstance(e, _corrupt_errors()):
            raise
        if path not in _WARNED:   # once per file, not once per epoch (it is counted as bad_file each time)
            _WARNED.add(path)
            log.warning("skipping the rest of %s: it is corrupt or truncated (%s: %s); later epochs skip it "
                        "without a word", path, type(e).__name__, " ".join(str(e).split())[:200])
        yield PAST_THE_END, None, "bad_file"


@functools.cache
def _corrupt_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged file raises (imported on first need: pyarrow and zstandard are not light)."""
    import zlib

    import pyarrow
    import zstandard
    return (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError, pyarrow.ArrowException, OSError)


def _file_records(path: str, fmt: str, field: str, start: int, keep: Callable[[int], bool]):
    if fmt == "array_record":
        yield from _array_record_records(path, field, start, keep)
        return
    with epath.Path(path).open("rb") as raw:
        if fmt == "parquet":
            yield from _parquet_records(raw, field, start, keep)
            return
        if fmt == "jsonl.gz":
            f = gzip.GzipFile(fileobj=raw)
        elif fmt == "jsonl.zst":
            import zstandard
            f = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
        else:
            f = raw
        if fmt == "txt":
            if start == 0 and keep(0):
                yield 0, *_decode(f.read())
            return
        lines = f
        if fmt == "json":
            data = f.read()
            if data.lstrip()[:1] == b"[":  # a JSON array; otherwise JSON lines
                try:
                    items = json.loads(data)
                except ValueError:
                    items = None
                if items is None and start == 0 and keep(0):
                    yield 0, None, "bad_json"
                for i, item in enumerate(items or ()):
                    if i >= start and keep(i):
                        yield i, *(_from_value(item.get(field)) if isinstance(item, dict) else (None, "missing_text"))
                return
            lines = io.BytesIO(data)
        for i, line in enumerate(lines):
            if i >= start and line.strip() and keep(i):
                yield i, *_from_json(line, field)


def _parquet_records(f, field: str, start: int, keep: Callable[[int], bool]):
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(f)
    has_field, offset = field in pf.schema_arrow.names, 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset + n > start:
            values = pf.read_row_group(g, columns=[field]).column(0).to_pylist() if has_field else [None] * n
            for j, v in enumerate(values):
                if offset + j >= start and keep(offset + j):
                    yield offset + j, *_from_value(v)
        offset += n


def _array_record_records(path: str, field: str, start: int, keep: Callable[[int], bool]):
    from array_record.python.array_record_module import ArrayRecordReader
    reader = ArrayRecordReader(path)
    try:
        n = reader.num_records()
        head = reader.read(0, min(n, 8)) if n else []
        as_json = 2 * sum(_from_json(r, field)[1] not in ("bad_json", "bad_utf8") for r in head) > len(head)
        for lo in range(start, n, 256):
            idx = [i for i in range(lo, min(lo + 256, n)) if keep(i)]
            for i, rec in zip(idx, reader.read(idx) if idx else ()):
                yield i, *(_from_json(rec, field) if as_json else _decode(rec))
    finally:
        reader.close()
