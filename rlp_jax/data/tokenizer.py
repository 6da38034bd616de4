"""One small tokenizer interface over sentencepiece `.model` files and Hugging Face `tokenizer.json`.

Both back ends expose the same API (`Tokenizer`). The reasoning markers `<think>` / `</think>` are
always single token ids: a HF tokenizer gains them as added special tokens; a sentencepiece model
that lacks them (its vocabulary is frozen after training) gets them appended at ids `V` and `V+1`,
handled by splitting the text on the marker strings. `num_added_tokens` says how many ids were
appended, so a model's embedding can be grown with `resize_embeddings`.

`pad_id` falls back to `eos_id` when the tokenizer defines no pad token.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import sentencepiece as spm
import tokenizers

THINK_TOKENS = ("<think>", "</think>")
_BOS_GUESSES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>")
_EOS_GUESSES = ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>")
_PAD_GUESSES = ("<pad>", "<|pad|>", "[PAD]")


class TokenizerError(ValueError):
    """A tokenizer could not be found, read or used."""


class Tokenizer:
    """Common interface. Subclasses set the attributes below and implement encode/decode."""

    vocab_size: int  # including appended/added marker tokens
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None  # falls back to eos_id when the tokenizer has no pad token
    think_start_id: int
    think_end_id: int
    special_ids: set[int]
    num_added_tokens: int  # ids appended beyond the vocabulary stored in the file
    added_pieces: dict[int, list[int]] = {}  # appended id -> the ids its text has without it (embedding init)
    chat_template: str | None = None  # the Jinja chat template the tokenizer ships, if any

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Turn ids back into text; `skip_special` drops bos/eos/pad/think and other special ids."""
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Tokenize `text`; optionally prepend bos / append eos (TokenizerError if undefined)."""
        ids = self._encode(text)
        if add_bos:
            ids = [self._require(self.bos_id, "bos")] + ids
        if add_eos:
            ids = ids + [self._require(self.eos_id, "eos")]
        return ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Tokenize several texts (no bos/eos)."""
        return [self._encode(t) for t in texts]

    def word_start_ids(self) -> tuple[int, ...]:
        """Ids whose piece begins a word: a space marker (sentencepiece's `▁`, byte-level BPE's `Ġ`, or a
        plain space) followed by a letter or digit. Not: a bare space, punctuation, a piece inside a word or a
        number, special tokens. Sorted."""
        return tuple(sorted(i for piece, i in self._pieces() if _starts_word(piece) and i not in self.special_ids))

    def _pieces(self) -> Iterable[tuple[str, int]]:
        raise NotImplementedError

    def _require(self, tid: int | None, name: str) -> int:
        if tid is None:
            raise TokenizerError(f"{type(self).__name__} has no {name} token")
        return tid


class SentencePieceTokenizer(Tokenizer):
    """Tokenizer backed by a sentencepiece `.model` file."""

    def __init__(self, path: str | Path, think_tokens: Sequence[str] = THINK_TOKENS):
        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on corrupt files
            raise TokenizerError(_one_line(f"cannot read sentencepiece model {self.path}: {e}; "
                                           "expected a file written by SentencePieceTrainer")) from e
        sp, base = self.sp, self.sp.get_piece_size()
        self.bos_id, self.eos_id, pad = (i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()))
        self.pad_id = pad if pad is not None else self.eos_id
        # Markers the model already treats atomically (user-defined pieces) are left to sentencepiece;
        # all others are split out of the text in `_encode`, with an existing piece id or a new id.
        self._split_markers: dict[str, int] = {}
        marker_ids = []
        for m in think_tokens:
            tid = sp.piece_to_id(m)
            if sp.id_to_piece(tid) != m:
                tid = base + sum(i >= base for i in marker_ids)
            if tid >= base or tid not in sp.encode(f"x{m}x"):
                self._split_markers[m] = tid
            marker_ids.append(tid)
        self.think_start_id, self.think_end_id = marker_ids
        self.num_added_tokens = sum(i >= base for i in marker_ids)
        self.added_pieces = {i: sp.encode(m) for m, i in zip(think_tokens, marker_ids) if i >= base}
        self.vocab_size = base + self.num_added_tokens
        self._control = {i for i in range(base) if sp.is_control(i)}
        # The unknown piece is special too: it is never text a model should write (e.g. inside a thought).
        self.special_ids = self._control | {i for i in range(base) if sp.is_unknown(i)} | set(marker_ids)
        self._id_to_marker = {i: m for m, i in self._split_markers.items()}
        self._split_re = (re.compile("(" + "|".join(map(re.escape, self._split_markers)) + ")")
                          if self._split_markers else None)

    def _pieces(self) -> Iterable[tuple[str, int]]:
        return ((self.sp.id_to_piece(i), i) for i in range(self.sp.get_piece_size()))

    def _encode(self, text: str) -> list[int]:
        if self._split_re is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for part in self._split_re.split(text):
            if part in self._split_markers:
                ids.append(self._split_markers[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Decode runs of ordinary ids with sentencepiece; render split markers / control ids as text.

        Runs are broken exactly where `encode` joined separately encoded pieces, so round trips are exact.
        """
        out: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i in self._id_to_marker or i in self._control:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special:
                    out.append(self._id_to_marker.get(i) or self.sp.id_to_piece(i))
            elif not (skip_special and i in self.special_ids):
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)


class HFTokenizer(Tokenizer):
    """Tokenizer backed by a Hugging Face `tokenizer.json` (file or directory holding it).

    bos/eos/pad come from `tokenizer_config.json` / `special_tokens_map.json` next to the file if present,
    else from common token names found in the vocabulary (e.g. `</s>`, `<|endoftext|>`).
    """

    def __init__(self, path: str | Path, think_tokens: Sequence[str] = THINK_TOKENS, *,
                 backend: tokenizers.Tokenizer | None = None, names: dict | None = None):
        """path: tokenizer.json or its directory; or, with `backend` (an already built `tokenizers.Tokenizer`,
        e.g. from a GGUF file's metadata), the file it came from, and `names` its bos/eos/pad token strings
        and chat_template."""
        path = Path(path)
        self.path = path / "tokenizer.json" if path.is_dir() else path
        if backend is not None:
            self.tok = backend
        else:
            try:
                self.tok = tokenizers.Tokenizer.from_file(str(self.path))
            except Exception as e:
                raise TokenizerError(_one_line(f"cannot read HF tokenizer {self.path}: {e}; "
                                               "expected a tokenizer.json written by the tokenizers library")) from e
        base = self._size()
        # Adding a token that already exists reuses its id; adding it as special keeps it from being split.
        # Markers that already are special added tokens keep their flags (an `rlp_jax.export` of a
        # sentencepiece model matches them after normalisation, which re-adding would undo).
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        pieces = {m: self.tok.encode(m, add_special_tokens=False).ids for m in think_tokens}
        self.tok.add_special_tokens([tokenizers.AddedToken(m, special=True, normalized=False)
                                     for m in think_tokens if m not in special])
        self.vocab_size = self._size()
        self.num_added_tokens = self.vocab_size - base
        self.think_start_id, self.think_end_id = (self.tok.token_to_id(m) for m in think_tokens)
        self.added_pieces = {self.tok.token_to_id(m): ids for m, ids in pieces.items()
                             if self.tok.token_to_id(m) >= base}

        names = _special_names(self.path.parent) if names is None else names
        self.chat_template = names.get("chat_template")
        self.bos_id, self.eos_id, pad = (self._find(names.get(k), guesses) for k, guesses in
                                         (("bos_token", _BOS_GUESSES), ("eos_token", _EOS_GUESSES),
                                          ("pad_token", _PAD_GUESSES)))
        self.pad_id = pad if pad is not None else self.eos_id
        added = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.special_ids = added | {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}

    def _size(self) -> int:
        return max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def _find(self, name: str | None, guesses: Sequence[str]) -> int | None:
        for n in ([name] if name else guesses):
            tid = self.tok.token_to_id(n)
            if tid is not None:
                return tid
        return None

    def _pieces(self) -> Iterable[tuple[str, int]]:
        return self.tok.get_vocab(with_added_tokens=False).items()

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Tokenize several texts in one (parallel) call (no bos/eos)."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Turn ids back into text; `skip_special` drops the tokenizer's special tokens."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def _starts_word(piece: str) -> bool:
    return len(piece) > 1 and piece[0] in "▁Ġ " and piece[1].isalnum()


def _special_names(directory: Path) -> dict[str, str]:
    """bos/eos/pad token strings from tokenizer_config.json, overridden by special_tokens_map.json."""
    names: dict[str, str] = {}
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        f = directory / fname
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(_one_line(f"cannot parse {f}: {e}; fix or remove the file")) from e
        for key in ("bos_token", "eos_token", "pad_token"):
            v = cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                names[key] = v
        if isinstance(cfg.get("chat_template"), str):
            names["chat_template"] = cfg["chat_template"]
    return names


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def load_tokenizer(path: str | Path, think_tokens: Sequence[str] = THINK_TOKENS) -> Tokenizer:
    """Load a tokenizer, choosing the back end from `path`.

    A `.model` file (or a directory holding exactly one `*.model` and no tokenizer.json) is read with
    sentencepiece; a `.json` file or a directory holding `tokenizer.json` with `tokenizers`; a `.gguf`
    file's own tokenizer metadata is rebuilt as a `tokenizers` tokenizer (`rlp_jax.model.dense.gguf`). Anything else
    (missing path, pickles / model weights, unknown formats, corrupt files) raises `TokenizerError`.
    """
    p = Path(path)
    hint = "expected a sentencepiece .model file, a .gguf file or a directory with tokenizer.json"
    if not p.exists():
        raise TokenizerError(f"no tokenizer at {p}: {hint}")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return HFTokenizer(p, think_tokens)
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return SentencePieceTokenizer(models[0], think_tokens)
        raise TokenizerError(f"no tokenizer.json (or single *.model) in directory {p}: {hint}")
    if p.suffix == ".model":
        return SentencePieceTokenizer(p, think_tokens)
    if p.suffix == ".gguf":
        from rlp_jax.model.dense.gguf import gguf_tokenizer
        from rlp_jax.model.safetensors_io import CheckpointError
        try:
            backend, names = gguf_tokenizer(p)
        except CheckpointError as e:
            raise TokenizerError(str(e)) from None
        return HFTokenizer(p, think_tokens, backend=backend, names=names)
    if p.suffix == ".json":
        return HFTokenizer(p, think_tokens)
    raise TokenizerError(f"unsupported tokenizer file {p} (model weights, pickle or unknown format; "
                         f"it is never unpickled): {hint}")


NEW_TOKEN_INITS = ("mean", "pieces")


def resize_embeddings(embed_vd: jax.Array, new_vocab_size: int, rng: jax.Array, std: float = 0.02, *,
                      init: str = "mean", pieces: dict[int, Sequence[int]] | None = None,
                      chosen: dict[int, Sequence[int]] | None = None) -> jax.Array:
    """Grow a `[vocab, dim]` embedding to `new_vocab_size` rows, keeping existing rows unchanged.

    init="mean": new rows are the mean of the existing rows plus N(0, std^2) noise (a common
    initialisation for added tokens). init="pieces": new row i is the mean of the rows of
    `pieces[i]`, the ids its text has in the original vocabulary (e.g. `<`, `think`, `>` for
    `<think>`), so the model reads the marker roughly as it reads its spelling; rows without pieces
    fall back to "mean". `chosen`: new row i starts as the mean of the rows of `chosen[i]` whatever `init`
    says (e.g. `</think>` as a copy of `.`). Shrinking raises ValueError.
    """
    if init not in NEW_TOKEN_INITS:
        raise ValueError(f"new-token init must be one of {NEW_TOKEN_INITS}, got {init!r}")
    v, d = embed_vd.shape
    if new_vocab_size < v:
        raise ValueError(f"cannot shrink embedding from {v} to {new_vocab_size} rows")
    if new_vocab_size == v:
        return embed_vd
    full = jnp.asarray(embed_vd, jnp.float32)
    mean = full.mean(axis=0)
    new = mean + std * jax.random.normal(rng, (new_vocab_size - v, d), jnp.float32)
    sources = {}   # new id -> the original ids whose mean row it starts from
    if init == "pieces":
        sources = {i: [j for j in ids if j < v] for i, ids in (pieces or {}).items()}
        sources = {i: ids for i, ids in sources.items() if v <= i < new_vocab_size and ids}
    for i, ids in (chosen or {}).items():
        if not v <= i < new_vocab_size or not ids or max(ids) >= v:
            raise ValueError(f"chosen row {i} must be an added id whose source ids {list(ids)} are below {v}")
        sources[i] = list(ids)
    for i, ids in sources.items():
        new = new.at[i - v].set(full[jnp.asarray(ids)].mean(axis=0))
    return jnp.concatenate([jnp.asarray(embed_vd), new.astype(embed_vd.dtype)], axis=0)


def train_sentencepiece(texts: Iterable[str], model_prefix: str | Path, vocab_size: int, *,
                        model_type: str = "bpe", user_defined_symbols: Sequence[str] = THINK_TOKENS,
                        character_coverage: float = 1.0, byte_fallback: bool = True, seed: int = 0) -> Path:
    """Train a sentencepiece model from an iterable of texts; return the path of `<model_prefix>.model`.

    Ids: pad=0, unk=1, bos=2, eos=3, then `user_defined_symbols` (single pieces). Training is
    deterministic (one thread, no input shuffling, fixed seed). Normalisation is the identity and extra
    whitespace is kept, so decode(encode(text)) == text; with `byte_fallback` any unicode round trips,
    but then `vocab_size` must exceed 256 + 4 + len(user_defined_symbols) + distinct characters.
    `hard_vocab_limit=False` lets small corpora yield fewer pieces than `vocab_size`.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
        user_defined_symbols=list(user_defined_symbols), character_coverage=character_coverage,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, byte_fallback=byte_fallback, num_threads=1,
        shuffle_input_sentence=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, minloglevel=2)
    return prefix.with_name(prefix.name + ".model")
