"""Tests for rlp_jax.data.pipeline: formats, packing, bad records, mixture, host sharding, exact resume, eval split."""
import dataclasses
import gzip
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from array_record.python.array_record_module import ArrayRecordWriter

from rlp_jax.data.config import DataConfig, SourceConfig
from rlp_jax.data.pipeline import DataError, make_iterator
from rlp_jax.data.tokenizer import load_tokenizer, train_sentencepiece

WORDS = ("the quick brown fox jumps over a lazy dog because therefore reason answer question alpha beta "
         "doc 0 1 2 3 4 5 6 7 8 9 , .").split()
SEQ = 32


def make_docs(n, prefix="doc", seed=0, lo=6, hi=18):
    """Distinct single-line documents `"<prefix> <i> w w w ..."` (ASCII, so decode(encode(t)) == t)."""
    rng = random.Random(seed)
    return [f"{prefix} {i} " + " ".join(rng.choice(WORDS[:14]) for _ in range(rng.randint(lo, hi)))
            for i in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = make_docs(300, seed=1) + make_docs(50, "alpha", seed=2) + make_docs(50, "beta", seed=3)
    return load_tokenizer(train_sentencepiece(corpus, tmp_path_factory.mktemp("tok") / "sp", vocab_size=400))


def cfg_for(paths, **kw):
    srcs = tuple(p if isinstance(p, SourceConfig) else SourceConfig(path=str(p)) for p in paths)
    base = dict(seq_len=SEQ, batch_size=4, shuffle_buffer=0, num_epochs=1, prefetch=2)
    return DataConfig(sources=srcs, **{**base, **kw})


def take(it, n=None):
    """The next n batches (all remaining ones if n is None)."""
    return list(itertools.islice(it, n))


def segments(batch):
    """[(row, seg id, tokens)] of every segment in a batch."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        for s in sorted(set(batch["segment_ids"][r].tolist()) - {0}):
            out.append((r, s, batch["tokens"][r][batch["segment_ids"][r] == s]))
    return out


def texts(tok, batches):
    return [tok.decode(t, skip_special=True) for b in batches for _, _, t in segments(b)]


def read_all(tok, paths, **kw):
    """Decoded segments of every batch of a one-epoch run, and the (exhausted) iterator."""
    pi, pc = kw.pop("process_index", 0), kw.pop("process_count", 1)
    it = make_iterator(cfg_for(paths, **kw), tok, process_index=pi, process_count=pc)
    batches = take(it)
    return texts(tok, batches), it


def write_jsonl(path, docs, field="text", opener=open):
    with opener(path, "wb") as f:
        for d in docs:
            f.write((json.dumps({field: d, "id": 1}) + "\n").encode())
    return path


# --- formats ---------------------------------------------------------------------------------------

def test_each_format_reads_every_document(tok, tmp_path):
    docs = make_docs(12)
    lines = b"".join((json.dumps({"text": d}) + "\n").encode() for d in docs)
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "arr.json").write_text(json.dumps([{"text": d} for d in docs]))
    (tmp_path / "lines.json").write_bytes(lines)
    pq.write_table(pa.table({"text": docs, "id": list(range(12))}), tmp_path / "hf.parquet", row_group_size=5)
    pq.write_table(pa.table({"content": docs}), tmp_path / "custom.parquet")
    for name, recs in (("j.array_record", [json.dumps({"text": d}).encode() for d in docs]),
                       ("t.array_record-00000-of-00001", [d.encode() for d in docs])):
        w = ArrayRecordWriter(str(tmp_path / name), "group_size:1")
        for r in recs:
            w.write(r)
        w.close()
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, d in enumerate(docs):
        (txt / f"{i}.txt").write_text(d)
    (txt / "_SUCCESS").write_text("")  # ignored in directories
    sources = ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "arr.json", "lines.json", "hf.parquet",
               SourceConfig(path=str(tmp_path / "custom.parquet"), text_field="content"),
               "j.array_record", "t.array_record-00000-of-00001", "txt", "txt/*.txt"]
    for s in sources:
        s = s if isinstance(s, SourceConfig) else SourceConfig(path=str(tmp_path / s))
        got, it = read_all(tok, [s])
        assert sorted(got) == sorted(docs), s.path
        assert it.stats()["docs"] == 12 and it.stats()["bad_json"] == 0, s.path


def test_globs_and_directories(tok, tmp_path):
    docs = make_docs(30)
    d = tmp_path / "data" / "sub"
    d.mkdir(parents=True)
    write_jsonl(d / "part0.jsonl", docs[:10])
    write_jsonl(d / "part1.jsonl.gz", docs[10:20], opener=gzip.open)
    pq.write_table(pa.table({"text": docs[20:]}), tmp_path / "data" / "part2.parquet")
    (tmp_path / "data" / "README.md").write_text("not data")
    got, it = read_all(tok, [tmp_path / "data"])
    assert sorted(got) == sorted(docs) and it.names == ["data"]
    got, _ = read_all(tok, [tmp_path / "data" / "sub" / "*.jsonl*"])
    assert sorted(got) == sorted(docs[:20])
    got, _ = read_all(tok, [tmp_path / "data" / "*.parquet"])
    assert sorted(got) == sorted(docs[20:])
    with pytest.raises(DataError, match="recursive glob"):
        read_all(tok, [tmp_path / "data" / "**" / "*.parquet"])


# --- packing ---------------------------------------------------------------------------------------

def test_pack_rows_hold_several_documents(tok, tmp_path):
    docs = make_docs(40, lo=2, hi=8)
    long_doc = "doc long " + " ".join(random.Random(5).choice(WORDS[:14]) for _ in range(120))
    write_jsonl(tmp_path / "a.jsonl", docs + [long_doc])
    it = make_iterator(cfg_for([tmp_path / "a.jsonl"], min_doc_tokens=1), tok, process_index=0, process_count=1)
    batches = take(it)
    multi = 0
    for b in batches:
        assert set(b) == {"tokens", "segment_ids", "positions"}
        assert all(v.dtype == np.int32 and v.shape == (4, SEQ) for v in b.values())
        for r in range(4):
            seg, pos, toks = b["segment_ids"][r], b["positions"][r], b["tokens"][r]
            ids = [s for s in seg.tolist() if s]
            assert ids == sorted(ids) and sorted(set(ids)) == list(range(1, len(set(ids)) + 1))
            multi += len(set(ids)) > 1
            for s in set(ids):
                assert pos[seg == s].tolist() == list(range(int((seg == s).sum())))
            assert (toks[seg == 0] == tok.pad_id).all() and (pos[seg == 0] == 0).all()
            assert (seg[np.argmax(seg == 0):] == 0).all() if (seg == 0).any() else True  # right padding
    assert multi > 5
    got = texts(tok, batches)
    assert sorted(t for t in got if t in docs) == sorted(docs)
    assert all(t in long_doc for t in got if t not in docs)
    # the long document is split into seq_len chunks: each chunk is a whole segment
    ids = tok.encode(long_doc) + [tok.eos_id]
    chunks = [ids[i:i + SEQ] for i in range(0, len(ids), SEQ)]
    assert len(chunks) >= 3
    segs = [t.tolist() for b in batches for _, _, t in segments(b)]
    assert all(c in segs for c in chunks)
    assert all(s[-1] == tok.eos_id for s in segs if s in [tok.encode(d) + [tok.eos_id] for d in docs])


def test_window_one_document_per_row(tok, tmp_path):
    docs = make_docs(10)
    long_doc = "doc long " + " ".join(random.Random(6).choice(WORDS[:14]) for _ in range(90))
    write_jsonl(tmp_path / "a.jsonl", docs + [long_doc])
    it = make_iterator(cfg_for([tmp_path / "a.jsonl"], packing="window", add_bos=True), tok,
                       process_index=0, process_count=1)
    rows = []
    for b in take(it):
        for r in range(4):
            seg, pos, toks = b["segment_ids"][r], b["positions"][r], b["tokens"][r]
            n = int((seg == 1).sum())
            assert set(seg.tolist()) <= {0, 1} and (seg[:n] == 1).all() and (seg[n:] == 0).all()
            assert pos[:n].tolist() == list(range(n)) and (pos[n:] == 0).all() and (toks[n:] == tok.pad_id).all()
            if n:
                rows.append(toks[:n].tolist())
    want = [[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in docs + [long_doc]]
    want_rows = [w[i:i + SEQ] for w in want for i in range(0, len(w), SEQ)]
    assert sorted(rows) == sorted(want_rows) and len(want_rows) > len(docs) + 2


# --- bad records -----------------------------------------------------------------------------------

def test_bad_records_are_skipped_and_counted(tok, tmp_path):
    docs = make_docs(20)
    good = [(json.dumps({"text": d}) + "\n").encode() for d in docs]
    bad = [b'{"text": "unterminated\n', b"not json at all\n",                       # bad_json 2
           b'{"body": "no text field"}\n', b'{"text": null}\n', b"[1, 2]\n",          # missing_text 3
           b'{"text": 42}\n', b'{"text": ["a", "b"]}\n',                             # not_string 2
           b'{"text": ""}\n', b'{"text": "hi"}\n',                                     # too_short 2
           b'{"text": "caf\xe9 latin-1"}\n', b'{"text": "lone \\ud800 surrogate"}\n',  # bad_utf8 2
           b"\n", b"   \n"]                                                            # blank: ignored
    rng = random.Random(0)
    lines = good[:-1] + bad
    rng.shuffle(lines)
    (tmp_path / "bad.jsonl").write_bytes(b"".join(lines + good[-1:]))
    got, it = read_all(tok, [tmp_path / "bad.jsonl"])
    assert sorted(got) == sorted(docs)
    st = it.stats()
    want = {"bad_json": 2, "missing_text": 3, "not_string": 2, "too_short": 2, "bad_utf8": 2, "docs": 20}
    assert {k: st[k] for k in want} == want
    assert {k: st[f"{k}/bad"] for k in want if k != "docs"} == {k: v for k, v in want.items() if k != "docs"}
    # repeating forever: the run does not stop, and counts grow by whole epochs' worth
    it = make_iterator(cfg_for([tmp_path / "bad.jsonl"], num_epochs=None), tok, process_index=0, process_count=1)
    take(it, 40)
    assert it.stats()["docs"] > 40 and it.stats()["bad_json"] >= 2 * (it.stats()["docs"] // 20)


def test_bad_records_in_parquet_and_array_record(tok, tmp_path):
    docs = make_docs(6)
    pq.write_table(pa.table({"text": [docs[0], None, "x", docs[1], docs[2]]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": docs}), tmp_path / "nofield.parquet")
    w = ArrayRecordWriter(str(tmp_path / "raw.array_record"), "group_size:1")
    for r in [d.encode() for d in docs[3:5]] + [b"\xff\xfe broken", docs[5].encode()]:
        w.write(r)
    w.close()
    got, it = read_all(tok, [tmp_path / "a.parquet", tmp_path / "raw.array_record"])
    assert sorted(got) == sorted(docs)
    assert {k: it.stats()[k] for k in ("missing_text/a", "too_short/a", "bad_utf8/raw")} == {
        "missing_text/a": 1, "too_short/a": 1, "bad_utf8/raw": 1}
    with pytest.raises(DataError, match=r"nofield.parquet.*missing_text=6"):
        read_all(tok, [tmp_path / "nofield.parquet"])


# --- mixture ---------------------------------------------------------------------------------------

def test_mixture_weights(tok, tmp_path):
    write_jsonl(tmp_path / "alpha.jsonl", make_docs(100, "alpha", seed=2))
    write_jsonl(tmp_path / "beta.jsonl", make_docs(15, "beta", seed=3))  # small: must repeat
    srcs = [SourceConfig(path=str(tmp_path / "alpha.jsonl"), weight=3.0),
            SourceConfig(path=str(tmp_path / "beta.jsonl"), weight=1.0)]
    cfg = cfg_for(srcs, num_epochs=None, batch_size=8, shuffle_buffer=64, shuffle_seed=3)
    it = make_iterator(cfg, tok, process_index=0, process_count=1)
    batches = take(it, 40)
    got = texts(tok, batches)
    share = sum(t.startswith("alpha") for t in got) / len(got)
    assert len(got) > 400 and abs(share - 0.75) < 0.03
    st = it.stats()
    assert st["docs/alpha"] + st["docs/beta"] == st["docs"]
    assert abs(st["docs/alpha"] / st["docs"] - 0.75) < 0.03
    # deterministic for a seed, different for another
    again = take(make_iterator(cfg, tok, process_index=0, process_count=1), 5)
    assert all((a["tokens"] == b["tokens"]).all() for a, b in zip(again, batches))
    other = take(make_iterator(cfg_for(srcs, num_epochs=None, batch_size=8, shuffle_buffer=64, shuffle_seed=4),
                               tok, process_index=0, process_count=1), 5)
    assert any((a["tokens"] != b["tokens"]).any() for a, b in zip(other, batches))


# --- host sharding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n_files", [1, 4])
def test_hosts_read_disjoint_documents(tok, tmp_path, n_files):
    docs = make_docs(41)
    for f in range(n_files):
        write_jsonl(tmp_path / f"p{f}.jsonl", docs[f::n_files])
    per_host = []
    for host in range(2):
        got, it = read_all(tok, [tmp_path], batch_size=4, process_index=host, process_count=2, shuffle_buffer=16)
        assert take(make_iterator(cfg_for([tmp_path]), tok, process_index=host, process_count=2), 1)[0][
            "tokens"].shape == (2, SEQ)
        per_host.append(got)
    a, b = set(per_host[0]), set(per_host[1])
    assert len(a) == len(per_host[0]) and not a & b and a | b == set(docs) and min(len(a), len(b)) >= 15
    with pytest.raises(DataError, match="not divisible by process_count 3"):
        make_iterator(cfg_for([tmp_path]), tok, process_index=0, process_count=3)


def test_corrupt_files_are_skipped_and_counted(tok, tmp_path):
    """A truncated .gz, a corrupt .zst and a non-Parquet .parquet among good files: their good records (up
    to the damage) are read, the rest of each is skipped and counted once as bad_file, the run goes on;
    a source with nothing but corrupt files is a one-line DataError."""
    good, gz_docs = make_docs(12, "good"), make_docs(40, "gz", seed=1)
    write_jsonl(tmp_path / "a.jsonl", good)
    whole = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in gz_docs).encode())
    (tmp_path / "b.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])          # an interrupted download
    (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 20)   # zstd magic, then noise
    (tmp_path / "d.parquet").write_bytes(b"not a parquet file at all")
    late = make_docs(5, "late", seed=2)
    write_jsonl(tmp_path / "e.jsonl", late)   # skips are counted on the next document (files in order here)
    got, it = read_all(tok, [tmp_path], shuffle_buffer=0)
    st = it.stats()
    assert set(good + late) <= set(got) and st["bad_file"] == 3 and st["docs"] == len(got)
    assert set(got) - set(good + late) <= set(gz_docs)   # what the truncated gzip held before the damage
    bad_only = tmp_path / "bad_only"
    bad_only.mkdir()
    (bad_only / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="no readable documents.*bad_file=1"):
        read_all(tok, [bad_only])


# --- exact resume ----------------------------------------------------------------------------------

@pytest.fixture
def resume_sources(tmp_path):
    rng = random.Random(7)
    docs = make_docs(60, lo=2, hi=40)
    docs += ["doc long " + " ".join(rng.choice(WORDS[:14]) for _ in range(rng.randint(40, 120))) for _ in range(6)]
    rng.shuffle(docs)
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    lines[5:5] = ["{oops\n", '{"text": 3}\n']
    (tmp_path / "a.jsonl").write_text("".join(lines[:40]))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress("".join(lines[40:]).encode()))
    write_jsonl(tmp_path / "beta.jsonl", make_docs(9, "beta", seed=3) + ["tiny"])
    return [SourceConfig(path=str(tmp_path / "*.jsonl*"), weight=2.0, name="main"),
            SourceConfig(path=str(tmp_path / "beta.jsonl"))]


def same(xs, ys):
    return len(xs) == len(ys) and all(set(x) == set(y) and all((x[k] == y[k]).all() for k in x)
                                      for x, y in zip(xs, ys))


@pytest.mark.parametrize("packing", ["pack", "window"])
def test_resume_yields_exactly_the_same_batches(tok, resume_sources, packing):
    cfg = cfg_for(resume_sources, num_epochs=None, packing=packing, shuffle_buffer=7)
    full = make_iterator(cfg, tok, process_index=0, process_count=1)
    ref = take(full, 40)
    ref_stats = full.stats()
    for n in (0, 1, 3, 8, 17, 29):
        it = make_iterator(cfg, tok, process_index=0, process_count=1)
        assert same(take(it, n), ref[:n])
        state = it.get_state()
        for restored in (state, json.loads(json.dumps(state))):
            new = make_iterator(dataclasses.replace(cfg, prefetch=n % 3), tok, process_index=0, process_count=1)
            new.set_state(restored)
            assert same(take(new, 40 - n), ref[n:]), n
            assert new.stats() == ref_stats, n
        assert same(take(it, 40 - n), ref[n:])  # the original goes on unchanged
        it.set_state(state)  # and can be rewound
        assert same(take(it, 40 - n), ref[n:]) and it.stats() == ref_stats
    assert ref_stats["docs/main"] > 60 and ref_stats["bad_json/main"] >= 1 and ref_stats["too_short/beta"] >= 1


def test_resume_to_the_end_of_finite_epochs(tok, resume_sources):
    cfg = cfg_for(resume_sources, num_epochs=2, shuffle_buffer=5)
    ref_it = make_iterator(cfg, tok, process_index=0, process_count=1)
    ref = take(ref_it)
    assert ref[-1]["tokens"].shape == (4, SEQ)
    it = make_iterator(cfg, tok, process_index=0, process_count=1)
    take(it, len(ref) // 2)
    new = make_iterator(cfg, tok, process_index=0, process_count=1)
    new.set_state(json.loads(json.dumps(it.get_state())))
    assert same(take(new), ref[len(ref) // 2:]) and new.stats() == ref_it.stats()


def test_state_from_another_config_is_refused(tok, resume_sources):
    it = make_iterator(cfg_for(resume_sources), tok, process_index=0, process_count=1)
    other = make_iterator(cfg_for(resume_sources, seq_len=16), tok, process_index=0, process_count=1)
    with pytest.raises(DataError, match="different data config"):
        other.set_state(it.get_state())


def test_state_resumes_after_the_data_moved(tok, resume_sources, tmp_path_factory):
    """A run directory copied or moved with its data resumes: the state's fingerprint holds each source's
    files relative to their directory, not absolute paths (a changed file layout is still refused)."""
    import shutil

    cfg = cfg_for(resume_sources, shuffle_buffer=5)
    it = make_iterator(cfg, tok, process_index=0, process_count=1)
    take(it, 3)
    state, ref = it.get_state(), take(it, 4)
    src_dir = Path(resume_sources[1].path).parent
    moved = tmp_path_factory.mktemp("moved") / "data"
    shutil.copytree(src_dir, moved)
    at = lambda d: [dataclasses.replace(s, path=s.path.replace(str(src_dir), str(d))) for s in resume_sources]
    new = make_iterator(cfg_for(at(moved), shuffle_buffer=5), tok, process_index=0, process_count=1)
    new.set_state(state)
    assert same(take(new, 4), ref)
    (moved / "extra.jsonl").write_text(json.dumps({"text": "one more document here"}) + "\n")
    grown = make_iterator(cfg_for(at(moved), shuffle_buffer=5), tok, process_index=0, process_count=1)
    with pytest.raises(DataError, match="different data config"):
        grown.set_state(state)


# --- eval split ------------------------------------------------------------------------------------

def test_eval_split_is_disjoint_and_deterministic(tok, tmp_path):
    docs = make_docs(200)
    write_jsonl(tmp_path / "a.jsonl", docs)
    train, _ = read_all(tok, [tmp_path / "a.jsonl"], eval_fraction=0.3)
    it = make_iterator(cfg_for([tmp_path / "a.jsonl"], eval_fraction=0.3), tok, split="eval",
                       process_index=0, process_count=1)
    ev = texts(tok, take(it))
    assert not set(train) & set(ev) and set(train) | set(ev) == set(docs) and len(train) + len(ev) == 200
    assert 0.2 < len(ev) / 200 < 0.4
    it = make_iterator(cfg_for([tmp_path / "a.jsonl"], eval_fraction=0.3, shuffle_seed=9, shuffle_buffer=8),
                       tok, split="eval", process_index=0, process_count=1)
    assert sorted(texts(tok, take(it))) == sorted(ev)
    with pytest.raises(DataError, match="eval_fraction"):
        make_iterator(cfg_for([tmp_path / "a.jsonl"]), tok, split="eval", process_index=0, process_count=1)


# --- start-up errors -------------------------------------------------------------------------------

def test_startup_errors_name_the_path(tok, tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "allbad.jsonl").write_text('{oops\n{"text": 1}\n{"body": "x"}\n')
    cases = [(tmp_path / "missing.jsonl", "no such file"), (tmp_path / "nomatch" / "*.jsonl", "matched no files"),
             (tmp_path / "x.csv", "cannot tell the format"), (tmp_path / "allbad.jsonl", "no readable documents")]
    for path, msg in cases:
        with pytest.raises(DataError, match=msg) as e:
            make_iterator(cfg_for([path]), tok, process_index=0, process_count=1)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="bad_json=1, missing_text=1, not_string=1"):
        make_iterator(cfg_for([tmp_path / "allbad.jsonl"]), tok, process_index=0, process_count=1)
    with pytest.raises(DataError, match="unknown format"):
        SourceConfig(path="x", format="csv")
    for bad in (dict(packing="zip"), dict(batch_size=0), dict(eval_fraction=1.0), dict(prefetch=-1)):
        with pytest.raises(DataError, match="DataConfig"):
            cfg_for([tmp_path / "allbad.jsonl"], **bad)
    with pytest.raises(DataError, match="non-empty tuple of SourceConfig"):
        DataConfig(sources=(), seq_len=8, batch_size=1)
