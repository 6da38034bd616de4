"""The demo recipe's pipeline on a tiny setting (seconds, not the 10-minute demo): the running-sum data and
tokenizer, NTP stage, RLP stage initialised from it, the report's rows and thoughts; `init_from` of a run
directory."""

import json

import jax
import numpy as np
import pytest

from rlp_jax import train
from rlp_jax.runs import loading
from rlp_jax.runs.config import apply_overrides, load_experiment

TINY = ["model.preset=tiny", "data.batch_size=4", "data.shuffle_buffer=16",
        "rlp.rollout.group_size=2", "rlp.rollout.positions_per_doc=1", "rlp.rollout.thought_len=3",
        "train.steps=2", "train.save_every=1", "train.eval_every=0", "train.plot=false"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    demo = load_experiment("demo")
    demo.DATA = dict(pretrain_docs=300, continuation_docs=300, heldout=8, heldout_docs=8)
    demo.PRETRAIN = dict(demo.PRETRAIN, steps=3, warmup_steps=1, batch_size=4)
    workdir = tmp_path_factory.mktemp("demo")
    cfg = demo.prepare(apply_overrides(demo.config(), TINY), workdir)
    stages = demo.stages(cfg, workdir)
    for name, stage_cfg in stages:
        train.run(stage_cfg, workdir / name, experiment=f"demo/{name}")
    demo.report(cfg, workdir)
    return demo, cfg, workdir, stages


def test_stages_chain_ntp_then_rlp(demo_run):
    _, _, workdir, stages = demo_run
    assert [n for n, _ in stages] == ["pretrain", "rlp"]
    pre, rlp = (json.loads((workdir / n / "config.json").read_text())["run"] for n in ("pretrain", "rlp"))
    assert pre["train"]["objective"] == "ntp" and pre["train"]["steps"] == 3 and pre["model"]["init_from"] is None
    assert rlp["train"]["objective"] == "rlp" and rlp["model"]["init_from"] == str(workdir / "pretrain")
    assert (workdir / "rlp" / "checkpoints" / "2").is_dir()


def test_init_from_a_run_dir_starts_from_its_final_policy(demo_run):
    _, cfg, workdir, stages = demo_run
    from rlp_jax.data.tokenizer import load_tokenizer

    rlp_cfg = stages[1][1]
    tok = load_tokenizer(rlp_cfg.train.tokenizer)
    mcfg, params = train.build_model(rlp_cfg, tok, jax.random.key(0))
    _, ref, step, _ = loading.load_run_params(workdir / "pretrain")
    assert step == 3 and mcfg.vocab_size == tok.vocab_size
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_report_has_both_rows_with_the_issue_fields(demo_run):
    _, _, workdir, _ = demo_run
    rep = json.loads((workdir / "report.json").read_text())
    rows = {r["label"]: r for r in rep["rows"]}
    assert set(rows) == {"before RLP (NTP stage)", "after RLP"}
    assert rows["before RLP (NTP stage)"]["step"] == 3 and rows["after RLP"]["step"] == 2
    for r in rows.values():
        for k in ("answer_info_gain", "answer_info_gain_vs_empty", "answer_nll_no_think", "answer_nll_empty",
                  "answer_nll_think", "uniform_info_gain"):
            assert np.isfinite(r[k]), (k, r)
        assert r["answer_info_gain"] == pytest.approx(r["answer_nll_no_think"] - r["answer_nll_think"])
        assert r["answer_info_gain_vs_empty"] == pytest.approx(r["answer_nll_empty"] - r["answer_nll_think"])
        for k in ("acc_no_think", "acc_think", "acc_empty", "acc_greedy", "ended"):
            assert 0.0 <= r[k] <= 1.0
        assert 1 <= r["thought_len"] <= 3
    table = (workdir / "report.md").read_text()
    assert "| before RLP (NTP stage) | 3 |" in table and "| after RLP | 2 |" in table
    assert len(rep["thoughts"]) == 6 and all("<think>" in s and "[gold:" in s for s in rep["thoughts"])
    assert rep["verdict"].startswith("Accuracy after a sampled thought")
