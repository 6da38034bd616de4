"""Tests for rlp_jax.data.corpus: determinism, held-out disjointness, correct answers, kinds, worked fraction, JSONL."""
import json
import re

import pytest

from rlp_jax.data.corpus import (
    EVAL_CUE,
    KINDS,
    PROBLEM_KINDS,
    build_corpus,
    canonical_key,
    generate_documents,
    generate_problems,
    generate_records,
    is_heldout_key,
)

N_DOCS, N_EVAL = 1500, 120

# Independent of the module's tables: factor of each (big>small) conversion.
FACTORS = {"kilometer>meter": 1000, "meter>centimeter": 100, "kilogram>gram": 1000, "liter>milliliter": 1000,
           "week>day": 7, "day>hour": 24, "hour>minute": 60, "minute>second": 60}
SUPERLATIVES = {"taller": ("tallest", "shortest"), "older": ("oldest", "youngest"),
                "faster": ("fastest", "slowest"), "heavier": ("heaviest", "lightest")}
INVERSE = {"taller": "shorter", "older": "younger", "faster": "slower", "heavier": "lighter"}


@pytest.fixture(scope="module")
def records():
    return generate_records(N_DOCS, seed=0)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(N_EVAL, seed=0)


def math_terms(key):
    """'math:12+7*3' -> [12, ('+', 7), ('*', 3)]."""
    first, *rest = re.findall(r"[+\-*]?\d+", key[len("math:"):])
    return int(first), [(t[0], int(t[1:])) for t in rest]


def expected_answer(key, question):
    """Recompute the answer from the canonical key (and, for logic, which end the question asks for)."""
    kind = key.split(":")[0]
    if kind == "math":
        value, ops = math_terms(key)
        for op, n in ops:  # left to right
            value = value + n if op == "+" else value - n if op == "-" else value * n
        return str(value)
    if kind == "unit":
        _, mode, pair, qty = key.split(":")
        f = FACTORS[pair]
        if mode == "mixed":
            a, b = map(int, qty.split("+"))
            return str(a * f + b)
        return str(int(qty) * f if mode == "down" else int(qty))
    _, more, chain = key.split(":")
    order = chain.split(">")
    most, least = SUPERLATIVES[more]
    assert (f"the {most}?" in question) != (f"the {least}?" in question)
    return order[0] if f"the {most}?" in question else order[-1]


def check_consistent(key, question):
    """The question text states exactly the problem its key describes."""
    kind = key.split(":")[0]
    nums = [int(x) for x in re.findall(r"\d+", question)]
    if kind == "math":
        first, ops = math_terms(key)
        assert nums == [first] + [n for _, n in ops], (key, question)
    elif kind == "unit":
        _, mode, pair, qty = key.split(":")
        f = FACTORS[pair]
        want = [int(x) for x in qty.split("+")] if mode == "mixed" else [int(qty) * (f if mode == "up" else 1)]
        assert nums == want, (key, question)
    else:
        _, more, chain = key.split(":")
        order = chain.split(">")
        facts = set()
        for a, rel, b in re.findall(r"(\w+) is (\w+) than (\w+)\.", question):
            facts.add((a, b) if rel == more else (b, a))
            assert rel in (more, INVERSE[more])
        assert facts == set(zip(order, order[1:])), (key, question)


def test_deterministic(records, problems):
    assert generate_documents(N_DOCS, seed=0) == [d.text for d in records]
    assert generate_problems(N_EVAL, seed=0) == problems
    assert generate_documents(200, seed=1) != generate_documents(200, seed=0)
    assert generate_problems(40, seed=1) != generate_problems(40, seed=0)


def test_heldout_never_in_training(records, problems):
    assert len({p.key for p in problems}) == len(problems)
    assert all(is_heldout_key(canonical_key(p)) for p in problems)
    train = records + generate_records(500, seed=7)  # the partition does not depend on the seed
    assert all(not is_heldout_key(d.key) for d in train if d.key is not None)
    assert not {canonical_key(p) for p in problems} & {d.key for d in train}
    joined = "\n".join(d.text for d in train)
    for p in problems:
        assert p.question.endswith(" " + EVAL_CUE) and p.body and p.body in p.question
        assert p.body not in joined, p.body


def test_answers_correct(records, problems):
    for p in problems:
        assert p.answer == expected_answer(p.key, p.body), p
        check_consistent(p.key, p.body)
        if p.kind == "arithmetic":  # also evaluate the printed expression (parentheses give left-to-right)
            expr = re.fullmatch(r"(?:What is|Compute|Calculate|Find the value of|Work out) (.*)[?.]", p.body)[1]
            assert str(eval(expr.replace("x", "*"))) == p.answer, p  # noqa: S307 (digits, + - * ( ) only)
        if p.kind in ("arithmetic", "word_problem"):
            assert p.worked.split(" = ")[-1] == p.answer + "."
        else:
            assert p.answer in p.worked
    for d in records:
        if d.key is not None:
            p = d.problem
            assert p.key == d.key and p.kind == d.kind and p.question in d.text
            assert p.answer == expected_answer(p.key, p.question), d
            assert d.text.endswith(" " + p.answer + ".") and (p.worked in d.text) == d.worked, d
            check_consistent(p.key, p.question)


def test_all_kinds_and_ascii(records, problems):
    assert {d.kind for d in records} == set(KINDS)
    assert {p.kind for p in problems} == set(PROBLEM_KINDS)
    assert all(d.text.isascii() for d in records) and all(p.question.isascii() for p in problems)
    assert len({d.text for d in records}) > 0.9 * len(records)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.8, 1.0])
def test_worked_fraction(fraction):
    docs = [d for d in generate_records(1000, seed=3, worked_fraction=fraction) if d.key is not None]
    share = sum(d.worked for d in docs) / len(docs)
    assert abs(share - fraction) < 0.06
    for d in docs:
        if d.kind in ("arithmetic", "word_problem"):
            assert (" = " in d.text) == d.worked, d


def test_build_corpus(tmp_path):
    paths = build_corpus(tmp_path / "data", num_train_docs=300, num_eval_problems=24, seed=5)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    held = [json.loads(line) for line in paths["heldout"].read_text().splitlines()]
    assert [r["text"] for r in train] == generate_documents(300, seed=5)
    assert len(held) == 24 and all(set(r) == {"question", "answer", "kind", "text"} for r in held)
    for r, p in zip(held, generate_problems(24, seed=5)):
        assert r == {"question": p.question, "answer": p.answer, "kind": p.kind, "text": f"{p.question} {p.answer}."}
    again = build_corpus(tmp_path / "again", num_train_docs=300, num_eval_problems=24, seed=5)
    assert all(again[k].read_bytes() == paths[k].read_bytes() for k in paths)


def test_think_fraction_writes_the_working_as_a_thought_at_the_answer(problems):
    recs = generate_records(1000, seed=4, think_fraction=0.25)
    assert [r.text for r in recs] == [r.text for r in generate_records(1000, seed=4, think_fraction=0.25)]
    pattern = re.compile(re.escape(EVAL_CUE) + r"<think> (.+)</think> (\S+)\.$")
    thinking = [r for r in recs if "<think>" in r.text]
    share = len(thinking) / sum(r.key is not None for r in recs)
    assert 0.19 < share < 0.31
    for r in thinking:
        m = pattern.search(r.text)
        assert m is not None, r.text
        assert m.group(1) == r.problem.worked and m.group(2) == r.problem.answer
        assert r.text.count("<think>") == 1 and r.text.count("</think>") == 1
    assert all("<think>" not in r.text and "</think>" not in r.text for r in generate_records(300, seed=4))
    joined = "\n".join(r.text for r in recs)
    assert not [p.body for p in problems if p.body in joined]


def test_asides_copy_the_words_before_them_and_the_text_resumes():
    """`with_aside` puts one `<think> copy </think>` after a word: a copy of the 2-6 words just before it, never
    after the first word or before the last one (the answer); removed, it leaves the text as it was. With
    aside_fraction, about that share of the documents gets one; 0 changes nothing."""
    import random

    from rlp_jax.data import corpus

    plain = corpus.generate_records(400, seed=3)
    assert corpus.generate_records(400, seed=3, aside_fraction=0.0) == plain
    rng = random.Random(0)
    for doc in plain:
        text = corpus.with_aside(doc.text, rng)
        before, rest = text.split("<think> ")   # laid out as RLP lays a thought (`thought_in_text`)
        copied, after = rest.split("</think> ")
        words, copy = before.split(" "), copied.split(" ")
        assert len(words) >= 2 and (2 <= len(copy) <= 6 or copy == words) and words[-len(copy):] == copy
        assert len(after.split(" ")) >= 1 and after.split(" ")[-1] == doc.text.split(" ")[-1]
        assert f"{before} {after}" == doc.text
    asides = sum("<think>" in d.text for d in corpus.generate_records(400, seed=3, aside_fraction=0.5))
    assert 140 < asides < 260
    # zero copied words is the empty thought, laid out as RLP's: `word<think></think> next`
    empty = [corpus.with_aside(doc.text, rng, (0, 0)) for doc in plain[:50]]
    for doc, text in zip(plain[:50], empty):
        assert text.count("<think></think> ") == 1 and text.replace("<think></think>", "") == doc.text
