"""Tests for rlp_jax.data.tokenizer against real sentencepiece / tokenizers / transformers behaviour."""
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlp_jax.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
    resize_embeddings,
    train_sentencepiece,
)

WORDS = ("the quick brown fox jumps over a lazy dog because therefore reason answer question "
         "let us think step by step 12 345 6789 , . ! ? ; : ( ) - café naïve über 日本 语 λ ü é").split()
ROUND_TRIP = [
    "hello world",
    "The answer is 42.",
    "<think>let us reason</think> so 3 + 4 = 7!",
    "a <think> b </think> c",
    "<think></think>",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n",
    "unicode: café naïve 日本語 λ 😀",
    "",
]


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    return lines + ["<think> reason </think> answer"] * 5


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_sentencepiece(corpus(), tmp_path_factory.mktemp("sp") / "tok", vocab_size=400)


@pytest.fixture(scope="module")
def sp_plain_path(tmp_path_factory):
    return train_sentencepiece(corpus(), tmp_path_factory.mktemp("sp_plain") / "tok", vocab_size=400,
                               user_defined_symbols=(), model_type="unigram")


@pytest.fixture(scope="module")
def sp_tok(sp_path):
    return load_tokenizer(sp_path)


# --- sentencepiece --------------------------------------------------------------------------------

def test_sp_training_is_deterministic(sp_path, tmp_path):
    again = load_tokenizer(train_sentencepiece(corpus(), tmp_path / "again", vocab_size=400)).sp
    first = load_tokenizer(sp_path).sp  # the files differ only in the stored model_prefix
    pieces = [(first.id_to_piece(i), first.get_score(i)) for i in range(first.get_piece_size())]
    assert pieces == [(again.id_to_piece(i), again.get_score(i)) for i in range(again.get_piece_size())]


def test_sp_ids_and_markers(sp_tok):
    assert isinstance(sp_tok, SentencePieceTokenizer)
    assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 2, 3)
    assert (sp_tok.think_start_id, sp_tok.think_end_id) == (4, 5)
    assert sp_tok.num_added_tokens == 0 and sp_tok.vocab_size == sp_tok.sp.get_piece_size()
    assert {0, 2, 3, 4, 5} <= sp_tok.special_ids
    start = [i for i in sp_tok.encode("<think>") if sp_tok.decode([i]).strip()]
    end = [i for i in sp_tok.encode("</think>") if sp_tok.decode([i]).strip()]
    assert start == [sp_tok.think_start_id] and end == [sp_tok.think_end_id]
    ids = sp_tok.encode("x <think> y </think> z")
    assert ids.count(4) == 1 and ids.count(5) == 1


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sp_round_trip(sp_tok, text):
    ids = sp_tok.encode(text)
    assert all(0 <= i < sp_tok.vocab_size for i in ids)
    assert sp_tok.decode(ids) == text


def test_sp_bos_eos_and_skip_special(sp_tok):
    ids = sp_tok.encode("hello there", add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 3 and ids[1:-1] == sp_tok.encode("hello there")
    assert sp_tok.decode(ids, skip_special=True) == "hello there"
    assert sp_tok.decode(ids) == "<s>hello there</s>"
    assert sp_tok.decode(sp_tok.encode("<think>hi</think> ok"), skip_special=True) == "hi ok"
    assert sp_tok.encode_batch(["a b", "c"]) == [sp_tok.encode("a b"), sp_tok.encode("c")]


def test_sp_appended_markers(sp_plain_path):
    tok = load_tokenizer(sp_plain_path)
    base = tok.sp.get_piece_size()
    assert tok.num_added_tokens == 2 and tok.vocab_size == base + 2
    assert (tok.think_start_id, tok.think_end_id) == (base, base + 1)
    assert {base, base + 1} <= tok.special_ids
    ids = tok.encode("a <think> b </think>")
    assert ids.count(base) == 1 and ids.count(base + 1) == 1
    assert tok.encode("<think>") == [base] and tok.encode("</think>") == [base + 1]
    assert tok.decode(ids) == "a <think> b </think>"
    for text in ROUND_TRIP:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids[1:-1]) == text
        plain = text.replace("<think>", "").replace("</think>", "")
        assert tok.decode(ids, skip_special=True) == plain
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=40))
def test_sp_round_trip_property(sp_tok, text):
    # U+2581 is sentencepiece's whitespace marker and decodes to a space, so it cannot round trip.
    assert sp_tok.decode(sp_tok.encode(text)) == text


# --- Hugging Face tokenizers ----------------------------------------------------------------------

def build_hf(special_tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    build_hf(["<|endoftext|>", "<|pad|>"]).save(str(d / "tokenizer.json"))
    return d


def test_hf_file_and_dir_load(hf_dir):
    for path in (hf_dir / "tokenizer.json", hf_dir):
        tok = load_tokenizer(path)
        assert isinstance(tok, HFTokenizer)
        base = tok.tok.get_vocab_size() - 2
        assert tok.num_added_tokens == 2 and tok.vocab_size == base + 2
        assert (tok.think_start_id, tok.think_end_id) == (base, base + 1)
        assert tok.encode("<think>") == [base] and tok.encode("</think>") == [base + 1]
        assert tok.encode("a <think>b</think>").count(base) == 1
        eot, pad = tok.tok.token_to_id("<|endoftext|>"), tok.tok.token_to_id("<|pad|>")
        assert (tok.eos_id, tok.pad_id, tok.bos_id) == (eot, pad, None)
        assert {eot, pad, base, base + 1} <= tok.special_ids
        for text in ROUND_TRIP:
            assert tok.decode(tok.encode(text)) == text
        ids = tok.encode("<think>x</think> y", add_eos=True)
        assert ids[-1] == eot
        assert tok.decode(ids) == "<think>x</think> y<|endoftext|>"
        assert tok.decode(ids, skip_special=True) == "x y"
        assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]
        with pytest.raises(TokenizerError, match="bos"):
            tok.encode("x", add_bos=True)


def test_hf_markers_not_duplicated(tmp_path):
    hf = build_hf(["<|endoftext|>", "<think>", "</think>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.num_added_tokens == 0 and tok.vocab_size == hf.get_vocab_size()
    assert (tok.think_start_id, tok.think_end_id) == (hf.token_to_id("<think>"), hf.token_to_id("</think>"))
    assert tok.pad_id == tok.eos_id == hf.token_to_id("<|endoftext|>")  # pad falls back to eos


def test_hf_transformers_saved_dir(tmp_path):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=build_hf(["<|endoftext|>", "<|bos|>"]),
                                   eos_token="<|endoftext|>", bos_token="<|bos|>")
    fast.save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == fast.eos_token_id and tok.bos_id == fast.bos_token_id
    assert tok.pad_id == tok.eos_id
    assert tok.decode(tok.encode("the quick fox", add_bos=True), skip_special=True) == "the quick fox"


# --- errors ---------------------------------------------------------------------------------------

def test_errors(tmp_path):
    cases = [tmp_path / "missing", tmp_path / "empty_dir", tmp_path / "x.model",
             tmp_path / "pytorch_model.bin", tmp_path / "bad" / "tokenizer.json"]
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "x.model").write_bytes(b"\x00garbage not a sentencepiece model\xff" * 10)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 pickled weights")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    for path in cases:
        with pytest.raises(TokenizerError) as info:
            load_tokenizer(path)
        msg = str(info.value)
        assert str(path) in msg and "\n" not in msg
    assert issubclass(TokenizerError, ValueError)


# --- embeddings -----------------------------------------------------------------------------------

def test_resize_embeddings():
    embed = jax.random.normal(jax.random.PRNGKey(0), (10, 8), jnp.float32)
    out = resize_embeddings(embed, 12, jax.random.PRNGKey(1))
    assert out.shape == (12, 8) and out.dtype == embed.dtype
    np.testing.assert_array_equal(out[:10], embed)
    np.testing.assert_allclose(out[10:], np.broadcast_to(embed.mean(0), (2, 8)), atol=0.1)
    assert resize_embeddings(embed, 10, jax.random.PRNGKey(1)) is embed
    with pytest.raises(ValueError):
        resize_embeddings(embed, 9, jax.random.PRNGKey(1))


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_word_start_ids_are_the_pieces_that_begin_a_word(kind, sp_path, hf_dir):
    """Encoding text, a token is in `word_start_ids` exactly when its text begins a word: a space then a letter
    or digit (the first word of a text has no space before it and is not a word start)."""
    tok = load_tokenizer(sp_path if kind == "sentencepiece" else hf_dir)
    starts = set(tok.word_start_ids())
    assert starts and not starts & set(tok.special_ids)
    text = "Ana has 12 apples, then 7 more. How many? 19 - 5 = 14."
    for i in tok.encode(text):
        piece = tok.decode([i])
        if kind == "sentencepiece":   # sentencepiece drops a text's leading space when decoding a piece alone
            piece = tok.sp.id_to_piece(i).replace("\u2581", " ")
        assert (i in starts) == (piece[:1] == " " and piece[1:2].isalnum()), (i, piece)
