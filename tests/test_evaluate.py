"""End to end: `rlp_jax.evaluate` and `rlp_jax.generate` on a tiny run directory, checked against a
naive greedy decoder (one full forward per token) and `tasks.score`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlp_jax import evaluate, generate, model, tasks
from rlp_jax.loading import LoadError, load_model
from tests.run_dirs import make_run_dir

BUDGET = 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run"), num_problems=5)


@pytest.fixture(scope="module")
def lm(run_dir):
    return load_model(run_dir)


def _naive_greedy(lm, prompt_ids, n, banned=()):
    """Greedy continuation with a full forward over the (padded) sequence per token."""
    seq = list(prompt_ids)
    width = len(seq) + n
    fwd = jax.jit(lambda p, x, s: model.forward(p, lm.cfg, x, segment_ids_bl=s)[0])
    out = []
    for _ in range(n):
        x = np.zeros((1, width), np.int32)
        x[0, :len(seq)] = seq
        seg = (np.arange(width) < len(seq)).astype(np.int32)[None]
        logits = np.array(fwd(lm.params, jnp.asarray(x), jnp.asarray(seg))[0, len(seq) - 1])
        logits[list(banned)] = -np.inf
        tok = int(np.argmax(logits))
        if tok == lm.tokenizer.eos_id:
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


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint=/nonexistent", "--tasks=generated", "--data_dir=DATA"], "does not exist"),
    (["--checkpoint=RUN", "--tasks=nope", "--data_dir=."], "unknown task 'nope'"),
    (["--checkpoint=RUN", "--tasks=gsm8k", "--data_dir=DATA"], "no test file for task 'gsm8k'"),
    (["--checkpoint=RUN", "--tasks=generated", "--data_dir=DATA", "--modes=dream"], "--modes 'dream'"),
    (["--checkpoint=RUN", "--tasks=generated", "--data_dir=DATA", "--samples=4"], "needs --temperature > 0"),
])
def test_evaluate_errors_are_one_line(run_dir, argv, message, capsys):
    argv = [a.replace("RUN", str(run_dir)).replace("DATA", str(run_dir / "data")) for a in argv]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_load_model_refuses_a_plain_directory(tmp_path):
    with pytest.raises(LoadError, match="neither an rlp_jax run directory"):
        load_model(tmp_path)


def test_averages_follow_the_paper_groups():
    res = {"gsm8k": {"think": {"pass@1": 0.5}}, "math500": {"think": {"pass@1": 0.3}},
           "mmlu": {"think": {"pass@1": 0.6}}, "generated": {"think": {"pass@1": 1.0}}}
    avg = evaluate.averages(res)["think"]
    assert avg == pytest.approx({"math_avg": 0.4, "science_avg": 0.6, "overall_avg": (0.5 + 0.3 + 0.6) / 3})
