"""Tests for rlp_jax.evaluate.answers and rlp_jax.evaluate.tasks: readers on small files in the public layouts, malformed rows,
GPQA shuffling, few-shot sampling, prompts, scoring, extractors, math_equal and pass@k."""
import itertools
import json
import math
import threading
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlp_jax.data.corpus import build_corpus
from rlp_jax.evaluate.answers import (
    extract_boxed,
    extract_choice,
    extract_math,
    extract_number,
    math_equal,
    normalize_answer,
    pass_at_k,
)
from rlp_jax.evaluate.tasks import (
    TASKS,
    Item,
    TaskError,
    answer_cue,
    build_prompt,
    fewshot_items,
    find_task_file,
    get_task,
    load_task,
    read_items,
    score,
)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GSM_ROWS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "A shop sells 1,200 pens a day. How many in 2 days?", "answer": "1200*2=2400\n#### 2,400"},
]


def test_gsm8k_reader(tmp_path):
    write_jsonl(tmp_path / "gsm8k.jsonl", GSM_ROWS)
    items = load_task("gsm8k", tmp_path)
    assert [it.answer for it in items] == ["72", "2400"]
    assert items[0] == Item("gsm8k", "gsm8k-1", GSM_ROWS[0]["question"], "72",
                            solution="In May she sold 48/2 = 24 clips.\nIn total 48+24 = 72.")
    assert len(load_task("gsm8k", tmp_path, limit=1)) == 1


@pytest.mark.parametrize("task, rows, message", [
    ("gsm8k", GSM_ROWS + [{"question": "q", "answer": "so 5"}],
     "gsm8k.jsonl row 3: field 'answer' has no '#### <number>' final answer"),
    ("gsm8k", [{"answer": "#### 1"}], "gsm8k.jsonl row 1: missing field 'question'"),
    ("math500", [{"problem": "p", "solution": "no box here"}],
     "math500.jsonl row 1: missing field 'answer' and no \\boxed{} answer in 'solution'"),
    ("aime", [{"problem": "p", "answer": 3}, {"answer": 4}], "aime.jsonl row 2: missing field 'problem' or 'question'"),
    ("mmlu", [{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 1},
              {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}],
     "mmlu.jsonl row 2: field 'answer' index 4 out of range 0..3"),
    ("mmlu", [{"question": "q", "choices": ["a", "b", "c"], "answer": 1}],
     "mmlu.jsonl row 1: field 'choices' must be a list of 4 options"),
    ("mmlu_pro", [{"question": "q", "options": ["a", "b", "c"], "answer": "E", "answer_index": 4}],
     "mmlu_pro.jsonl row 1: field 'answer' value 'E' is not one of ABC or 0..2"),
    ("mmlu_pro", [{"question": "q", "options": ["a", "b", "c"], "answer": "B", "answer_index": 2}],
     "mmlu_pro.jsonl row 1: field 'answer' 'B' disagrees with 'answer_index' 2"),
    ("gpqa", [{"Question": "q", "Correct Answer": "x", "Incorrect Answer 1": "y", "Incorrect Answer 2": "z"}],
     "gpqa.jsonl row 1: missing field 'Incorrect Answer 3'"),
    ("generated", [{"question": "What is 2 + 2?", "answer": "4"}],
     "generated.jsonl row 1: field 'question' does not end with the cue 'The answer is'"),
])
def test_malformed_rows(tmp_path, task, rows, message):
    write_jsonl(tmp_path / f"{task}.jsonl", rows)
    with pytest.raises(TaskError) as err:
        load_task(task, tmp_path)
    assert str(err.value) == message


def test_bad_json_line_and_blank_lines(tmp_path):
    (tmp_path / "amc.jsonl").write_text('{"problem": "p", "answer": 1}\n\n{"problem": \n')
    with pytest.raises(TaskError, match=r"^amc.jsonl row 3: not valid JSON"):
        load_task("amc", tmp_path)
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "test.jsonl", [{"problem": "p", "answer": 1}, {"problem": "p", "answer": [1]}])
    with pytest.raises(TaskError, match=r"^test.jsonl row 2: field 'answer' must be a string or number, got list$"):
        read_items(TASKS["amc"], tmp_path / "sub" / "test.jsonl")


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "gsm8k.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(TaskError, match=r"^gsm8k.jsonl: not UTF-8 text"):
        load_task("gsm8k", tmp_path)
    (tmp_path / "gsm8k.jsonl").unlink()
    (tmp_path / "gsm8k.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(TaskError, match=r"^gsm8k.parquet: not a readable Parquet file"):
        load_task("gsm8k", tmp_path)


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(TaskError) as err:
        find_task_file(tmp_path, "gsm8k")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"no test file for task 'gsm8k' in {tmp_path}: tried gsm8k.jsonl, "
                                              "gsm8k.parquet, gsm8k/test.jsonl, gsm8k/test.parquet; put")
    with pytest.raises(TaskError, match="unknown task 'gsm8kk'; valid tasks: gsm8k, math500, "):
        load_task("gsm8kk", tmp_path)
    assert isinstance(err.value, ValueError)


def test_math_readers_and_parquet(tmp_path):
    write_jsonl(tmp_path / "minerva_math" / "test.jsonl", [
        {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
        {"question": "Two?", "solution": "s", "answer": "2"}])
    items = load_task("minerva_math", tmp_path)
    assert [it.answer for it in items] == ["\\frac{1}{2}", "2"] and items[1].question == "Two?"
    path = tmp_path / "aime" / "test.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"id": [7, 8], "question": ["Find x.", "Find y."], "answer": [142.0, 33.0]}), path)
    assert find_task_file(tmp_path, "aime") == path
    items = load_task("aime", tmp_path)
    assert [(it.id, it.question, it.answer) for it in items] == [("7", "Find x.", "142"), ("8", "Find y.", "33")]


def test_choice_readers(tmp_path):
    write_jsonl(tmp_path / "mmlu.jsonl", [
        {"question": "Q1", "subject": "x", "choices": ["a", "b", "c", "d"], "answer": 2},
        {"question": "Q2", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "D"},
        {"input": "Q3", "A": "a", "B": "b", "C": "c", "D": "d", "target": "B"}])
    items = load_task("mmlu", tmp_path)
    assert [(it.question, it.answer, it.choices) for it in items] == [
        ("Q1", "C", ("a", "b", "c", "d")), ("Q2", "D", ("a", "b", "c", "d")), ("Q3", "B", ("a", "b", "c", "d"))]
    opts = [f"o{i}" for i in range(10)]
    write_jsonl(tmp_path / "mmlu_pro.jsonl", [{"question_id": 1, "question": "Q", "options": opts, "answer": "J",
                                               "answer_index": 9, "cot_content": "A: think. The answer is (J)."}])
    (item,) = load_task("mmlu_pro", tmp_path)
    assert item.answer == "J" and item.choices == tuple(opts) and item.solution.startswith("A: think")


def gpqa_rows(n):
    return [{"Record ID": f"rec{i}", "Question": f"Q{i}?", "Correct Answer": f"right{i} ",
             **{f"Incorrect Answer {j}": f"wrong{i}.{j}" for j in (1, 2, 3)}} for i in range(n)]


def test_gpqa_shuffle(tmp_path):
    write_jsonl(tmp_path / "gpqa.jsonl", gpqa_rows(40))
    a, b, c = (load_task("gpqa", tmp_path, seed=s) for s in (0, 0, 1))
    assert a == b and a != c
    for it in a:
        assert it.choices[ord(it.answer) - ord("A")] == f"right{it.id[3:]}"
        assert sorted(it.choices) == sorted([f"right{it.id[3:]}"] + [f"wrong{it.id[3:]}.{j}" for j in (1, 2, 3)])
    letters = Counter(it.answer for it in a)
    assert len(letters) == 4 and max(letters.values()) < 20


def test_generated_from_corpus(tmp_path):
    build_corpus(tmp_path, num_train_docs=5, num_eval_problems=6, seed=0)
    spec, items = get_task("generated"), load_task("generated", tmp_path)
    assert len(items) == 6 and find_task_file(tmp_path, "generated").name == "heldout.jsonl"
    assert read_items(spec, tmp_path / "heldout.jsonl", limit=2) == items[:2]
    prompt = build_prompt(spec, items[0], [])
    assert prompt == items[0].question and prompt.endswith("The answer is") and answer_cue(spec) == ""
    assert score(spec, f" {items[0].answer}. Exercise. What is 2 + 2? The answer is 4.", items[0]) == (
        items[0].answer, True)
    assert score(spec, f" {items[0].answer}.", items[0], think=True)[1]
    assert build_prompt(spec, items[0], items[1:3]).startswith(f"{items[1].question} {items[1].answer}.\n\n")


def test_fewshot(tmp_path):
    write_jsonl(tmp_path / "amc.jsonl", [{"problem": f"P{i}", "answer": i} for i in range(6)])
    items = load_task("amc", tmp_path)
    shots = fewshot_items("amc", tmp_path, items, 5, seed=3)
    for it, ex in zip(items, shots):
        assert len(ex) == 5 and it not in ex and len(set(ex)) == 5
    assert shots == fewshot_items("amc", tmp_path, items, 5, seed=3)
    assert fewshot_items("amc", tmp_path, items, 0, seed=3) == [[]] * 6
    with pytest.raises(TaskError, match="6 shots asked but only 5 .*--shots 5 or fewer"):
        fewshot_items("amc", tmp_path, items, 6, seed=3)
    # a --limit slice draws its shots from the whole test file (never the item itself)
    few = fewshot_items("amc", tmp_path, items[:2], 4, seed=3, pool=items)
    assert all(len(ex) == 4 and it not in ex and set(ex) <= set(items) for it, ex in zip(items[:2], few))
    write_jsonl(tmp_path / "amc" / "train.jsonl", [{"problem": f"T{i}", "answer": i} for i in range(3)])
    shots = fewshot_items("amc", tmp_path, items, 3, seed=0)  # train ids amc-1..3 equal eval ids: no matter
    assert all(sorted(ex.question for ex in s) == ["T0", "T1", "T2"] for s in shots)
    write_jsonl(tmp_path / "amc" / "train.jsonl", [{"problem": f"P{i % 2}", "answer": i} for i in range(6)])
    assert all(ex.question != it.question for it, s in zip(items, fewshot_items("amc", tmp_path, items, 3, 0))
               for ex in s)
    with pytest.raises(TaskError, match="4 shots asked but only 3"):  # only 3 train rows differ from P0
        fewshot_items("amc", tmp_path, items[:1], 4, 0)


def test_prompts_and_score():
    math_spec, choice_spec = TASKS["gsm8k"], TASKS["mmlu"]
    ex = Item("gsm8k", "e", "1+1?", "2", solution="1+1=2.")
    it = Item("gsm8k", "i", "2+3?", "5")
    assert build_prompt(math_spec, it, [ex]) == (
        "Question: 1+1?\nAnswer: 1+1=2. The answer is 2.\n\nQuestion: 2+3?\nAnswer:")
    assert build_prompt(math_spec, it, [it]).startswith("Question: 2+3?\nAnswer: The answer is 5.\n\n")
    assert score(math_spec, " 2+3=5. The answer is 5.\n\nQuestion: 4+4?\nAnswer: The answer is 8.", it) == ("5", True)
    assert score(math_spec, " 6.\n\nQuestion: 1?", it, think=True) == ("6", False)
    assert answer_cue(math_spec) == " The answer is" and answer_cue(choice_spec) == " Answer:"
    q = Item("mmlu", "q", "Capital of France?", "B", ("Rome", "Paris", "Oslo", "Bern"))
    assert build_prompt(choice_spec, q, []) == (
        "Question: Capital of France?\nA. Rome\nB. Paris\nC. Oslo\nD. Bern\nAnswer:")
    assert build_prompt(choice_spec, q, [q]).startswith("Question: Capital of France?\nA. Rome") and (
        "D. Bern\nAnswer: B\n\nQuestion:" in build_prompt(choice_spec, q, [q]))
    assert score(choice_spec, " B\n\nQuestion: Capital of Spain?\nA. Madrid\nAnswer: A", q) == ("B", True)
    assert score(choice_spec, " C", q, think=True) == ("C", False)
    assert score(choice_spec, "", q) == (None, False)


@pytest.mark.parametrize("text, number", [
    ("The answer is 1,234.", "1234"), ("#### 72", "72"), ("She pays $12.50 in total.", "12.5"),
    ("so 3/4 of them", "3/4"), ("The answer is $\\frac{3}{4}$.", "3/4"), ("\\boxed{\\dfrac{1}{2}}", "1/2"),
    ("It is 50%.", "50"), ("answer: -0", "0"), ("The answer is 3.50 dollars.", "3.5"), ("5-3 = 2", "2"),
    ("The answer is 14. Exercise. What is 3+4? The answer is 7.", "14"), ("Answer: \\$1{,}000", "1000"),
    ("no numbers here", None), ("It costs -$5 or -4.", "-4"),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize("text, boxed", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("\\fbox{x^{2}}", "x^{2}"), ("\\boxed 5$", "5"), ("\\boxed{unbalanced", None), ("none", None),
])
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


@pytest.mark.parametrize("text, expr", [
    ("The answer is $(1, 2)$.", "(1, 2)"), ("The answer is Ana.", "Ana"), ("The answer is $12.50.", "12.5"),
    ("so \\boxed{\\frac{1}{2}}", "1/2"), ("x is 4 and y is 9", "9"), ("The answer is 14 apples.", "14"),
])
def test_extract_math(text, expr):
    assert extract_math(text) == expr


@pytest.mark.parametrize("text, n, letter", [
    ("The answer is (C)", 4, "C"), ("I think A is wrong, the answer is B", 4, "B"), ("B)", 4, "B"),
    ("(B)", 4, "B"), ("Answer: B", 4, "B"), (" D\n", 4, "D"), ("A", 4, "A"), ("A man walks in.", 4, None),
    ("I think so", 10, None), ("The answer is J", 10, "J"), ("The answer is J", 4, None), ("Answer: **C**", 4, "C"),
    ("B is correct", 4, "B"),
])
def test_extract_choice(text, n, letter):
    assert extract_choice(text, n) == letter


@pytest.mark.parametrize("pred, gold, equal", [
    ("0.5", "\\frac{1}{2}", True), ("2", "3", False), ("1,234", "1234", True), ("x^2+1", "1+x^2", True),
    ("\\frac{\\sqrt 2}{2}", "\\frac{\\sqrt{2}}{2}", True), ("(1,2)", "(1, 2)", True), ("3/4", "\\dfrac{3}{4}", True),
    ("Ana", "ana", True), ("Naa", "Ana", False), ("5", "5 \\text{ cm}", True), (None, "1", False), ("", "1", False),
])
def test_math_equal(pred, gold, equal):
    assert math_equal(pred, gold) is equal


def test_math_equal_off_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append((math_equal("0.5", "\\frac{1}{2}"), math_equal("2", "3"))))
    t.start()
    t.join()
    assert out == [(True, False)]


def test_normalize_answer():
    assert normalize_answer("$\\left( 1,\\, 2 \\right)$.") == "(1,2)" == normalize_answer("(1, 2)")
    assert normalize_answer("\\$1,000.00") == "1000"


def brute_pass_at_k(n, c, k):
    hits = [any(i < c for i in s) for s in itertools.combinations(range(n), k)]
    return sum(hits) / len(hits)


@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k(nck):
    n, c, k = nck
    p = pass_at_k(n, c, k)
    assert 0.0 <= p <= 1.0
    assert p == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
    assert p == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    if c < n:
        assert pass_at_k(n, c + 1, k) >= p
    if k < n:
        assert pass_at_k(n, c, k + 1) >= p


def test_pass_at_k_edges():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3) and pass_at_k(200, 0, 10) == 0.0
    assert 0.0 < pass_at_k(10_000, 1, 1) < 1e-3
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(5, 6, 1)
