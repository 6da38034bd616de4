"""lm-evaluation-harness on rlp_jax checkpoints (`python -m rlp_jax.lm_eval`, model `rlp_jax`): the same
log-likelihoods, rolling log-likelihoods and greedy generations as lm-eval's own `hf` backend on the export
of the same checkpoint, for local tasks of every request type."""

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from rlp_jax.data.corpus import generate_documents  # noqa: E402
from rlp_jax.evaluate.harness import RlpJaxLM  # noqa: E402
from rlp_jax.export import export  # noqa: E402
from rlp_jax.runs.loading import load_model  # noqa: E402
from tests.run_dirs import make_run_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["toy_mc", "toy_gen", "toy_ppl"]   # multiple_choice, generate_until, loglikelihood_rolling


def write_tasks(folder: Path, n: int = 8) -> Path:
    """Three lm-eval YAML tasks over one local JSONL of arithmetic problems (no download)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for doc in generate_documents(4 * n, seed=3):
        m = re.match(r"(.*?) The answer is (-?\d+)\.", doc)
        if m:
            a = int(m.group(2))
            rows.append({"question": m.group(1), "choices": [str(a + 1), str(a), str(a - 3)], "label": 1,
                         "answer": str(a), "text": doc})
    (folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'toy.jsonl'}\n"
              "test_split: test\n")
    specs = {
        "toy_mc": 'output_type: multiple_choice\ndoc_to_text: "{{question}} The answer is"\n'
                  'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n',
        "toy_gen": 'output_type: generate_until\ndoc_to_text: "{{question}} The answer is"\n'
                   'doc_to_target: " {{answer}}"\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 6\n'
                   '  do_sample: false\nmetric_list:\n  - metric: exact_match\n',
        "toy_ppl": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                   'metric_list:\n  - metric: word_perplexity\n',
    }
    for name, spec in specs.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{common}{spec}")
    return folder


def responses(samples: dict) -> dict:
    """{(task, doc_id): [response per request]} from lm-eval's samples (`results["samples"]`)."""
    return {(task, s["doc_id"]): [r[0] for r in s["resps"]] for task, rows in samples.items() for s in rows}


def responses_from_files(out: Path) -> dict:
    samples = {}
    for f in glob.glob(str(out / "**" / "samples_*.jsonl"), recursive=True):
        task = re.match(r"samples_(.*)_\d{4}-", Path(f).name).group(1)
        samples[task] = [json.loads(line) for line in Path(f).read_text().splitlines()]
    return responses(samples)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    run = make_run_dir(root / "run")
    return run, export(run, root / "hf"), write_tasks(root / "tasks")


def evaluate(model, tasks_dir, tasks=TASKS, **model_args):
    # only the local tasks: indexing lm-eval's thousands of built-in task files takes seconds per call
    results = lm_eval.simple_evaluate(model=model, model_args=model_args or None, tasks=tasks, batch_size=8,
                                      device="cpu", log_samples=True,
                                      task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    return responses(results["samples"])


def lm_eval_cli(module: str, model_args: str, tasks_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m MODULE [--model ...] --model_args ... --tasks ... --batch_size 8 --log_samples`, as the README
    writes it."""
    cmd = [sys.executable, "-m", module, *extra, "--model_args", model_args, "--tasks", ",".join(TASKS),
           "--include_path", str(tasks_dir), "--batch_size", "8", "--log_samples", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=out.parent, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "toy_mc" in proc.stdout and "word_perplexity" in proc.stdout   # lm-eval's own results table
    return proc


@pytest.fixture(scope="module")
def hf_backend(setup, tmp_path_factory):
    """lm-eval's `hf` backend on the export, by the README's command."""
    _, exported, tasks_dir = setup
    out = tmp_path_factory.mktemp("hf_backend") / "out"
    lm_eval_cli("lm_eval", f"pretrained={exported},dtype=float32", tasks_dir, out, "--model", "hf", "--device", "cpu")
    return responses_from_files(out)


def assert_scores_match(ours: dict, ref: dict, *, generations: bool):
    assert ours.keys() == ref.keys() and len(ours) == 24
    for key, ref_resps in ref.items():
        for a, b in zip(ours[key], ref_resps, strict=True):
            if key[0] == "toy_gen":
                if generations:
                    assert a == b, key
            elif key[0] == "toy_mc":   # (log-likelihood, is_greedy); the samples files hold them as strings
                assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-4, abs=1e-4) and str(a[1]) == str(b[1]), key
            else:
                assert float(a) == pytest.approx(float(b), rel=1e-4), key


def test_cli_on_a_run_dir_scores_as_the_hf_backend_on_its_export(setup, hf_backend, tmp_path):
    """`python -m rlp_jax.lm_eval` with lm-eval's flags on a run directory (nothing exported). Generated
    strings are compared on the Hugging Face folder below: this run's sentencepiece tokenizer renders a
    random model's stray UTF-8 bytes differently from the export's tokenizer.json (same token ids)."""
    run, _, tasks_dir = setup
    lm_eval_cli("rlp_jax.lm_eval", f"checkpoint={run}", tasks_dir, tmp_path / "out")
    assert_scores_match(responses_from_files(tmp_path / "out"), hf_backend, generations=False)


def test_hf_folder_generations_and_scores_equal_the_hf_backend(setup, hf_backend):
    _, exported, tasks_dir = setup
    ours = evaluate("rlp_jax", tasks_dir, checkpoint=str(exported))
    assert_scores_match(ours, hf_backend, generations=True)
    assert any(r[0] for k, r in ours.items() if k[0] == "toy_gen")   # something was generated


def test_think_inserts_a_thought_before_generating(setup):
    run, _, tasks_dir = setup
    lm = load_model(run)
    plain = evaluate(RlpJaxLM(lm=lm), tasks_dir, tasks=["toy_gen"])
    thinking = evaluate(RlpJaxLM(lm=lm, think=True, think_tokens=4), tasks_dir, tasks=["toy_gen"])
    assert plain.keys() == thinking.keys()
    assert any(plain[k] != thinking[k] for k in plain)


def test_a_missing_checkpoint_is_one_line(setup, tmp_path):
    _, _, tasks_dir = setup
    proc = subprocess.run([sys.executable, "-m", "rlp_jax.lm_eval", "--model_args", f"checkpoint={tmp_path / 'nope'}",
                           "--tasks", "toy_mc", "--include_path", str(tasks_dir)],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint") and "does not exist" in proc.stderr
