"""End to end: `rlp_jax.evaluate` and `rlp_jax.generate` on a tiny run directory, checked against a
naive greedy decoder (one full forward per token) and `tasks.score`."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax.evaluate import cli as evaluate
from rlp_jax.evaluate import tasks
from rlp_jax.generate import cli as generate
from rlp_jax.model.dense import transformer
from rlp_jax.runs.layout import LoadError
from rlp_jax.runs.loading import load_model
from tests.run_dirs import make_run_dir

BUDGET = 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run"), num_problems=5)


@pytest.fixture(scope="module")
def lm(run_dir):
    return load_model(run_dir)


def _naive_greedy(lm, prompt_ids, n, banned=(), stop=None):
    """Greedy continuation with a full forward over the (padded) sequence per token; stops before
    `stop` (default: eos)."""
    seq = list(prompt_ids)
    width = len(seq) + n
    fwd = jax.jit(lambda p, x, s: transformer.forward(p, lm.cfg, x, segment_ids_bl=s)[0])
    out = []
    for _ in range(n):
        x = np.zeros((1, width), np.int32)
        x[0, :len(seq)] = seq
        seg = (np.arange(width) < len(seq)).astype(np.int32)[None]
        logits = np.array(fwd(lm.params, jnp.asarray(x), jnp.asarray(seg))[0, len(seq) - 1])
        logits[list(banned)] = -np.inf
        tok = int(np.argmax(logits))
        if tok == (lm.tokenizer.eos_id if stop is None else stop):
            break
        out.append(tok)
        seq.append(tok)
    return out


def test_evaluate_matches_naive_greedy_and_scores(run_dir, lm, tmp_path, capsys):
    spec = tasks.get_task("generated")
    items = tasks.load_task("generated", run_dir / "data")
    tok = lm.tokenizer
    banned = (tok.think_start_id, tok.think_end_id)
    preds = []
    for it in items:
        text = tok.decode(_naive_greedy(lm, tok.encode(it.question), BUDGET, banned))
        preds.append(tasks.score(spec, text, it)[0])
    assert all(p is not None for p in preds)
    # Gold = the model's own answer for items 0, 2, 4, a wrong one for 1 and 3: pass@1 must be 60%.
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "generated.jsonl", "w") as f:
        for i, (it, p) in enumerate(zip(items, preds)):
            f.write(json.dumps({"question": it.question, "answer": p if i % 2 == 0 else "nope", "kind": "x"}) + "\n")
    out = tmp_path / "eval.json"
    rc = evaluate.main([f"--checkpoint={run_dir}", "--tasks=generated", f"--data_dir={data}", "--modes=no_think,think",
                        f"--max_new_tokens={BUDGET}", "--think_tokens=4", f"--out={out}", "--batch_size=4"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["results"]["generated"]["no_think"]["pass@1"] == pytest.approx(0.6)
    direct = [r for r in res["items"] if r["mode"] == "no_think"]
    assert [r["samples"][0]["prediction"] for r in direct] == preds
    assert [r["samples"][0]["correct"] for r in direct] == [True, False, True, False, True]
    # think mode: a thought of 1..4 tokens, then the greedy answer given prompt <think> thought </think>
    for r, it in zip([r for r in res["items"] if r["mode"] == "think"], items):
        s = r["samples"][0]
        ids = s["thought_ids"]
        assert 1 <= len(ids) <= 4 and tok.decode(ids) == s["thought"]
        assert not {tok.think_start_id, tok.think_end_id} & set(ids)
        ref = tok.decode(_naive_greedy(lm, tok.encode(it.question) + [tok.think_start_id] + ids + [tok.think_end_id],
                                       BUDGET, banned))
        assert s["completion"] == ref
    printed = capsys.readouterr().out
    assert "| generated | 5 | 60.0 |" in printed


def test_evaluate_fewshot_math_and_choice_with_pass_at_k(run_dir, tmp_path):
    """gsm8k and mmlu through the CLI: --limit slices the file but shots come from all of it, every
    recorded prediction is what `tasks.score` makes of its completion, pass@1 and pass@3 follow the counts."""
    from rlp_jax.evaluate.answers import pass_at_k

    data = tmp_path / "data"
    data.mkdir()
    with open(data / "gsm8k.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}.\n#### {i + 2}"}) + "\n")
    with open(data / "mmlu.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"question": f"Pick {i}.", "choices": ["1", "2", "3", "4"], "answer": i % 4}) + "\n")
    out = tmp_path / "eval.json"
    rc = evaluate.main([f"--checkpoint={run_dir}", "--tasks=gsm8k,mmlu", f"--data_dir={data}", "--modes=no_think",
                        "--limit=2", "--shots=3", "--samples=3", "--temperature=1.0", "--max_new_tokens=4",
                        f"--out={out}", "--batch_size=8"])
    assert rc == 0
    res = json.loads(out.read_text())
    for name in ("gsm8k", "mmlu"):
        spec, recs = tasks.get_task(name), [r for r in res["items"] if r["task"] == name]
        items = {it.id: it for it in tasks.load_task(name, data)}
        assert len(recs) == 2 and res["results"][name]["no_think"]["n"] == 2
        counts = []
        for r in recs:
            item = items[r["id"]]
            shown = [it for it in items.values() if f"Question: {it.question}" in r["prompt"]]
            assert len(shown) == 4 and r["prompt"].endswith(f"Question: {item.question}" + (
                "".join(f"\n{'ABCD'[i]}. {c}" for i, c in enumerate(item.choices)) if name == "mmlu" else "")
                + "\nAnswer:")
            assert len(r["samples"]) == 3
            for smp in r["samples"]:
                assert (smp["prediction"], smp["correct"]) == tasks.score(spec, smp["completion"], item)
            counts.append(sum(smp["correct"] for smp in r["samples"]))
        summary = res["results"][name]["no_think"]
        assert summary["pass@1"] == pytest.approx(np.mean([c / 3 for c in counts]))
        assert summary["pass@3"] == pytest.approx(np.mean([pass_at_k(3, c, 3) for c in counts]))
    assert set(res["averages"]["no_think"]) == {"math_avg", "science_avg", "overall_avg"}


def test_generate_cli_streams_the_greedy_continuation(run_dir, lm, capsys):
    prompt = "Convert 3 kilometers to meters."
    rc = generate.main([f"--checkpoint={run_dir}", f"--prompt={prompt}", "--temperature=0",
                        f"--max_new_tokens={BUDGET}"])
    assert rc == 0
    tok = lm.tokenizer
    ref = tok.decode(_naive_greedy(lm, tok.encode(prompt), BUDGET, (tok.think_start_id, tok.think_end_id)))
    assert capsys.readouterr().out == prompt + ref + "\n"
    assert generate.main([f"--checkpoint={run_dir}", f"--prompt={prompt}", "--think", "--think_tokens=3",
                          "--max_new_tokens=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompt + " <think>") and "</think>" in out


def test_generate_think_follows_the_runs_banned_ids(run_dir, lm, tmp_path, capsys):
    """`generate --think` samples thoughts as the run's rollout did: with the greedy thought's tokens in
    rlp.rollout.banned_ids, the thought is the naive greedy one with those tokens (and <think>) banned."""
    import shutil

    tok, prompt, n = lm.tokenizer, "Convert 3 kilometers to meters.", 4
    ids = tok.encode(prompt) + [tok.think_start_id]
    free = _naive_greedy(lm, ids, n, (tok.think_start_id,), stop=tok.think_end_id)
    assert free, "the tiny model's greedy thought is empty; pick another prompt"
    ban = sorted(set(free))
    ref = _naive_greedy(lm, ids, n, (tok.think_start_id, *ban), stop=tok.think_end_id)
    assert ref != free
    banned_run = tmp_path / "banned_run"
    shutil.copytree(run_dir, banned_run)
    conf = json.loads((banned_run / "config.json").read_text())
    conf["run"].setdefault("rlp", {}).setdefault("rollout", {})["banned_ids"] = ban
    (banned_run / "config.json").write_text(json.dumps(conf))
    for d, want in ((run_dir, free), (banned_run, ref)):
        assert generate.main([f"--checkpoint={d}", f"--prompt={prompt}", "--think", f"--think_tokens={n}",
                              "--temperature=0", "--max_new_tokens=1"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(prompt + " <think>" + tok.decode(want) + "</think>"), (out, tok.decode(want))


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint=/nonexistent", "--tasks=generated", "--data_dir=DATA"], "does not exist"),
    (["--checkpoint=RUN", "--tasks=nope", "--data_dir=."], "unknown task 'nope'"),
    (["--checkpoint=RUN", "--tasks=gsm8k", "--data_dir=DATA"], "no test file for task 'gsm8k'"),
    (["--checkpoint=RUN", "--tasks=generated", "--data_dir=DATA", "--modes=dream"], "--modes 'dream'"),
    (["--checkpoint=RUN", "--tasks=generated", "--data_dir=DATA", "--samples=4"], "needs --temperature > 0"),
    (["--checkpoint=RUN", "--tasks=generated", "--data_dir=DATA", "--samples=0"], "--samples 0: must be at least 1"),
    (["--checkpoint=RUN", "--tasks=generated", "--data_dir=DATA", "--batch_size=0"], "--batch_size 0: must be a"),
    (["--checkpoint=RUN", "--tasks=generated", "--data_dir=DATA", "--limit=-1"], "--limit -1: must be a"),
    (["--checkpoint=RUN", "--tasks=generated", "--data_dir=DATA", "--out=/proc/nope/eval.json"], "cannot write there"),
])
def test_evaluate_errors_are_one_line(run_dir, argv, message, capsys):
    argv = [a.replace("RUN", str(run_dir)).replace("DATA", str(run_dir / "data")) for a in argv]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_url_run_dirs_read_config_from_the_mirror_or_the_bucket(run_dir, lm, tmp_path, monkeypatch):
    """A run trained with --workdir gs://b/runs/x is loaded by that URL: checkpoints from the URL (the
    bucket is stood in for by the local checkpoints), config.json from the local mirror training wrote,
    or, on a machine without that mirror, from the newest checkpoint step."""
    import shutil

    from rlp_jax.runs import layout

    monkeypatch.setenv("HOME", str(tmp_path))
    url = "gs://bucket/runs/x"
    mirror, ckpt = layout.local_dirs(url)
    assert mirror == tmp_path / ".cache" / "rlp_jax" / "runs" / "bucket" / "runs" / "x"
    assert ckpt == "gs://bucket/runs/x/checkpoints" and layout.local_dirs(url + "/") == (mirror, ckpt)
    real = layout.local_dirs
    monkeypatch.setattr(layout, "_dir_exists", lambda p: Path(p).is_dir())
    monkeypatch.setattr(layout, "local_dirs", lambda p: (real(p)[0], str(run_dir / "checkpoints"))
                        if str(p) == url else real(p))
    for with_mirror in (False, True):
        if with_mirror:
            mirror.mkdir(parents=True)
            shutil.copy(run_dir / "config.json", mirror / "config.json")
        assert layout.is_run_dir(url)
        got = load_model(url)
        assert got.source == "run" and got.path == url and got.step == lm.step
        for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(lm.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_url_run_brings_its_tokenizer(run_dir, lm, tmp_path, monkeypatch):
    """On a machine without the tokenizer path a URL run recorded, readers fetch the copy training stored
    next to the checkpoints (`store_tokenizer`; the bucket is stood in for by a local folder)."""
    from rlp_jax.runs import layout

    bucket = tmp_path / "bucket"
    layout.copy_tokenizer(run_dir / "data" / "tokenizer.model", bucket / "tokenizer")   # what training stores
    assert sorted(p.name for p in (bucket / "tokenizer").iterdir()) == ["tokenizer.model"]
    with pytest.raises(LoadError, match="no tokenizer files"):
        layout.copy_tokenizer(tmp_path / "no-tokenizer-here", tmp_path / "x")

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    url = "gs://bucket/runs/y"
    record = json.loads((run_dir / "config.json").read_text())
    record["run"]["train"]["tokenizer"] = "/machine/that/trained/tokenizer.model"   # not on this machine
    real_any_path = layout._any_path
    monkeypatch.setattr(layout, "_any_path", lambda u: Path(str(u).replace("gs://bucket/runs/y", str(bucket)))
                        if str(u).startswith(url) else real_any_path(u))
    from rlp_jax.runs.config import from_dict

    tok = layout.run_tokenizer(url, from_dict(record["run"]))
    assert tok.encode("1 + 2 = 3") == lm.tokenizer.encode("1 + 2 = 3")
    assert (layout.local_dirs(url)[0] / "tokenizer" / "tokenizer.model").is_file()


def test_thoughts_follow_the_runs_banned_ids(lm):
    """Think mode samples thoughts as the run's rollout did: its rlp.rollout.banned_ids never appear."""
    import dataclasses

    from rlp_jax.evaluate.decoder import DecodeOptions, Decoder

    # the run banned its tokenizer's special tokens (rollout.ban_special_tokens, the default)
    specials = {lm.tokenizer.eos_id, lm.tokenizer.bos_id, lm.tokenizer.pad_id}
    assert set(lm.think_ids.banned) >= specials and dataclasses.replace(lm, run=None).think_ids.banned == ()
    rollout = dataclasses.replace(lm.run.rlp.rollout, banned_ids=(7, 5), ban_special_tokens=False)
    banned = dataclasses.replace(lm, run=dataclasses.replace(lm.run, rlp=dataclasses.replace(lm.run.rlp, rollout=rollout)))
    assert banned.think_ids.banned == (5, 7)
    dec = Decoder(lm.params, lm.cfg, lm.tokenizer, batch_size=8)
    prompts = [lm.tokenizer.encode("What is 2 + 3?")] * 8
    opts = DecodeOptions(think_tokens=6, think_temperature=3.0)
    free = {t for th in dec.think(prompts, opts, jax.random.key(0)) for t in th}
    ban = tuple(sorted(free))[: len(free) // 2] + (lm.tokenizer.eos_id,)
    got = {t for th in dec.think(prompts, DecodeOptions(think_tokens=6, think_temperature=3.0, think_banned_ids=ban),
                                 jax.random.key(0)) for t in th}
    assert got and not got & set(ban)


def test_load_model_refuses_a_plain_directory(tmp_path):
    with pytest.raises(LoadError, match="neither an rlp_jax run directory"):
        load_model(tmp_path)


def test_averages_follow_the_paper_groups():
    res = {"gsm8k": {"think": {"pass@1": 0.5}}, "math500": {"think": {"pass@1": 0.3}},
           "mmlu": {"think": {"pass@1": 0.6}}, "generated": {"think": {"pass@1": 1.0}}}
    avg = evaluate.averages(res)["think"]
    assert avg == pytest.approx({"math_avg": 0.4, "science_avg": 0.6, "overall_avg": (0.5 + 0.3 + 0.6) / 3})
