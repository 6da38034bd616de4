"""The running-sum task's documents are what they say: answers and working correct, thoughts placed as
documented, mixes as declared, held-out problems disjoint from training, one token per word."""

import collections
import random

import pytest

from rlp_jax.data import modsum
from rlp_jax.data.corpus import is_heldout_key
from rlp_jax.data.tokenizer import load_tokenizer


def _digits_before_sep(words):
    out = []
    for w in words:
        if w == modsum.SEP:
            return out
        if w.isdigit():
            out.append(int(w))
    raise AssertionError(f"no separator in {words}")


@pytest.fixture(scope="module")
def docs():
    return modsum.generate_documents(3000, seed=7, mix={k: 1.0 for k in modsum.KINDS})


def test_answers_and_working_are_right(docs):
    for d in docs:
        inside = [w for w, r in zip(d.words, d.roles) if r != "thought" and w not in (modsum.THINK_START, modsum.THINK_END)]
        digits = _digits_before_sep(inside)
        assert digits == list(d.problem.digits)
        assert d.words[d.answer_index] == str(sum(digits) % 3) == str(d.problem.answer)
        assert d.roles[d.answer_index] == "answer" and d.roles.count("answer") == 1
        assert len(d.words) == len(d.roles)
        if d.kind in ("worked", "trace"):
            start = d.words.index(modsum.EQ)
            pairs = d.words[start + 1:start + 1 + 2 * len(digits)]
            running = 0
            for i, dgt in enumerate(digits):   # each pair: the digit copied, then the sum so far mod 3
                running = (running + dgt) % 3
                assert pairs[2 * i:2 * i + 2] == (str(dgt), str(running))
        if d.kind == "trace":   # the working sits in a thought right before the answer
            assert d.words[d.answer_index - 1] == modsum.THINK_END
            assert d.words[d.words.index(modsum.THINK_START) - 1] == modsum.CUE
            inner = d.words[d.words.index(modsum.THINK_START) + 1:d.answer_index - 1]
            assert list(inner) == d.problem.working()
            assert modsum.thought_answer(inner) == d.problem.answer


def test_asides_copy_the_words_before_them_and_the_text_resumes(docs):
    asides = [d for d in docs if d.kind == "aside"]
    assert asides
    for d in asides:
        s, e = d.words.index(modsum.THINK_START), d.words.index(modsum.THINK_END)
        copied = d.words[s + 1:e]
        assert modsum.ASIDE_WORDS[0] <= len(copied) <= modsum.ASIDE_WORDS[1]
        assert d.words[s - len(copied):s] == copied
        # removing the aside leaves the answer-only document of the same problem
        assert d.words[:s] + d.words[e + 1:] == modsum.make_document("answer", d.problem).words
        assert e < d.words.index(modsum.SEP)   # never at the answer


@pytest.mark.parametrize("mix", [modsum.PRETRAIN_MIX, modsum.CONTINUATION_MIX])
def test_mixes_are_as_declared(mix):
    counts = collections.Counter(d.kind for d in modsum.generate_documents(4000, seed=1, mix=mix))
    for kind, share in mix.items():
        assert abs(counts[kind] / 4000 - share) < 0.025, (kind, counts)


def test_heldout_problems_never_occur_in_training():
    train = {d.problem.key for d in modsum.generate_documents(20_000, seed=3)}
    held = modsum.generate_heldout(300, seed=11)
    keys = [p.key for p in held]
    assert len(set(keys)) == 300 and all(is_heldout_key(k) for k in keys)
    assert not train & set(keys)
    assert not any(is_heldout_key(k) for k in train)
    assert {len(p.digits) for p in held} == set(range(modsum.MIN_DIGITS, modsum.MAX_DIGITS + 1))
    assert modsum.generate_heldout(300, seed=12) != held   # other seeds, other problems


def test_generation_is_deterministic():
    a = modsum.generate_documents(50, seed="x", mix=modsum.CONTINUATION_MIX)
    assert a == modsum.generate_documents(50, seed="x", mix=modsum.CONTINUATION_MIX)
    assert a != modsum.generate_documents(50, seed="y", mix=modsum.CONTINUATION_MIX)


def test_jsonl_round_trip(tmp_path, docs):
    path = modsum.write_jsonl(tmp_path / "d.jsonl", docs[:200])
    assert modsum.read_jsonl(path) == docs[:200]


def test_bad_mix_and_kind_are_one_line_errors():
    with pytest.raises(ValueError, match="non-negative weights"):
        modsum.generate_documents(3, seed=0, mix={"answer": 1.0, "essay": 1.0})
    with pytest.raises(ValueError, match="unknown modsum document kind"):
        modsum.make_document("essay", modsum.Problem((1, 2)))


def test_task_tokenizer_has_one_token_per_word(tmp_path, docs):
    tok = load_tokenizer(modsum.train_tokenizer(tmp_path / "tok"))
    for d in docs[:300]:
        ids = modsum.encode_document(tok, d)
        assert [tok.decode([i]).strip() for i in ids] == list(d.words)
    trace = modsum.make_document("trace", docs[0].problem)
    ids = modsum.encode_document(tok, trace)
    assert ids[trace.words.index(modsum.THINK_START)] == tok.think_start_id
    assert ids[trace.words.index(modsum.THINK_END)] == tok.think_end_id


def test_a_tokenizer_that_splits_words_is_refused(tmp_path):
    from rlp_jax.data.tokenizer import train_sentencepiece

    texts = [d.text for d in modsum.generate_documents(200, seed=0)]
    coarse = load_tokenizer(train_sentencepiece(texts, tmp_path / "c", vocab_size=13, byte_fallback=False))
    doc = modsum.make_document("worked", modsum.Problem(tuple(random.Random(0).choices(range(3), k=9))))
    with pytest.raises(ValueError, match="splits modsum words"):
        modsum.encode_document(coarse, doc)


def test_thoughts_can_be_kept_to_the_task_tokens(tmp_path, docs):
    """unused_token_ids: every id outside the task's words and markers (the tokenizer's unknown piece, bos, eos,
    pad and sentencepiece's bare characters), none that a document contains."""
    tok = load_tokenizer(modsum.train_tokenizer(tmp_path / "tok"))
    used = {i for d in docs for i in modsum.encode_document(tok, d)}
    banned = set(modsum.unused_token_ids(tok))
    assert used == modsum.task_token_ids(tok) and not used & banned
    assert used | banned == set(range(tok.vocab_size))
    assert tok.sp.unk_id() in banned and tok.sp.unk_id() in tok.special_ids   # the unknown piece is special
