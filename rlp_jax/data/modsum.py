"""Running sums mod 3: a reasoning task where thinking is useful, for the RLP study and the demo.

A problem is k digits d_1..d_k in {0, 1, 2} (k uniform in 8..12); its answer is (d_1 + ... + d_k) mod 3.
A small model learns the one-step skill s_i = (s_{i-1} + d_i) mod 3 in minutes on a CPU, but cannot
compute the whole sum in one forward pass (direct accuracy stays near chance, 1/3): written-out steps,
or a thought that writes them, are what make the answer predictable.

Documents are words separated by spaces, each word one token of the task's tokenizer (`train_tokenizer`);
the think markers attach to the word before them, so `A<think> = 2 2</think> 2` is the tokens
`A <think> = 2 2 </think> 2`. Kinds (`KINDS`):

    answer   2 0 1 1 2 0 1 2 ; A 0                                 the answer only
    worked   2 0 1 1 ; = 2 2 0 2 1 0 1 1 ; A 1                      each digit and the sum so far, then the answer
    trace    2 0 1 1 ; A<think> = 2 2 0 2 1 0 1 1</think> 1          the working inside a thought at the answer
    aside    2 0 1<think> 2 0 1</think> 1 ; A 1                      an answer-only document with a copy of a few
                                                                    preceding words in a thought at a non-answer
                                                                    position (teaches ending a thought and resuming)

`PRETRAIN_MIX` is rich in worked examples (stage 1); `CONTINUATION_MIX` is poor in them (about 90%
answer-only; the corpus both RLP and CPT continue on). Every document records its words' roles
(`ROLES`); the answer is always the last word, so its token index is `len(words) - 1` (+1 with a bos).

Held-out problems never occur in training, by construction: a problem's key (`modsum3:20112012`) is held out
iff `corpus.is_heldout_key` says so (a fixed, seed-independent 10% slice); training documents are drawn from
the other keys only, held-out problems only from held-out keys, each from its own seed's stream.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from rlp_jax.data.corpus import is_heldout_key

MODULUS = 3
MIN_DIGITS, MAX_DIGITS = 8, 12
THINK_START, THINK_END = "<think>", "</think>"
SEP, EQ, CUE = ";", "=", "A"
KINDS = ("answer", "worked", "trace", "aside")
PRETRAIN_MIX = {"answer": 0.45, "worked": 0.45, "trace": 0.05, "aside": 0.05}
CONTINUATION_MIX = {"answer": 0.90, "worked": 0.05, "trace": 0.02, "aside": 0.03}
ASIDE_WORDS = (2, 6)   # an aside copies this many preceding words (inclusive)
# A word's role: the problem's digits, separators, the copied digit and the running sum of worked steps
# ("copy", "step"), the answer cue and the answer, the markers, and the words inside a thought.
ROLES = ("digit", "sep", "eq", "copy", "step", "cue", "answer", "think_start", "think_end", "thought")


@dataclass(frozen=True)
class Problem:
    digits: tuple[int, ...]

    @property
    def sums(self) -> tuple[int, ...]:
        """The running sums s_1..s_k mod 3 (s_k is the answer)."""
        out, s = [], 0
        for d in self.digits:
            s = (s + d) % MODULUS
            out.append(s)
        return tuple(out)

    @property
    def answer(self) -> int:
        return self.sums[-1]

    @property
    def key(self) -> str:
        return f"modsum{MODULUS}:" + "".join(map(str, self.digits))

    def working(self) -> list[str]:
        """The worked steps `= d_1 s_1 d_2 s_2 ... d_k s_k` as words."""
        return [EQ] + [w for d, s in zip(self.digits, self.sums) for w in (str(d), str(s))]


@dataclass(frozen=True)
class Document:
    kind: str
    problem: Problem
    words: tuple[str, ...]
    roles: tuple[str, ...]

    @property
    def text(self) -> str:
        return render(self.words)

    @property
    def answer_index(self) -> int:
        """Word (= token, without bos) index of the answer: the last word."""
        return len(self.words) - 1


def render(words: Sequence[str]) -> str:
    """Words joined by spaces, the think markers attached to the word before them (see the module docstring)."""
    out = []
    for w in words:
        out.append(w if (w in (THINK_START, THINK_END) or not out) else " " + w)
    return "".join(out)


def _working_roles(problem: Problem) -> list[str]:
    return ["eq"] + ["copy", "step"] * len(problem.digits)


def make_document(kind: str, problem: Problem, rng: random.Random | None = None) -> Document:
    """One document of `kind` stating `problem` (`rng` places an aside; unused by the other kinds)."""
    digits = [str(d) for d in problem.digits]
    head, head_roles = digits + [SEP], ["digit"] * len(digits) + ["sep"]
    answer = [str(problem.answer)]
    if kind == "answer":
        words, roles = head + [CUE] + answer, head_roles + ["cue", "answer"]
    elif kind == "worked":
        words = head + problem.working() + [SEP, CUE] + answer
        roles = head_roles + _working_roles(problem) + ["sep", "cue", "answer"]
    elif kind == "trace":
        words = head + [CUE, THINK_START] + problem.working() + [THINK_END] + answer
        roles = head_roles + ["cue", "think_start"] + ["thought"] * len(problem.working()) + ["think_end", "answer"]
    elif kind == "aside":
        rng = rng or random.Random(problem.key)
        at = rng.randint(ASIDE_WORDS[0], len(digits))                  # after digit `at` (1-based), before the answer
        n = rng.randint(ASIDE_WORDS[0], min(ASIDE_WORDS[1], at))
        copied = digits[at - n:at]
        words = digits[:at] + [THINK_START] + copied + [THINK_END] + digits[at:] + [SEP, CUE] + answer
        roles = (["digit"] * at + ["think_start"] + ["thought"] * n + ["think_end"] + ["digit"] * (len(digits) - at)
                 + ["sep", "cue", "answer"])
    else:
        raise ValueError(f"unknown modsum document kind {kind!r}; kinds: {', '.join(KINDS)}")
    return Document(kind, problem, tuple(words), tuple(roles))


def _problems(rng: random.Random, heldout: bool) -> Iterable[Problem]:
    while True:
        k = rng.randint(MIN_DIGITS, MAX_DIGITS)
        p = Problem(tuple(rng.randrange(MODULUS) for _ in range(k)))
        if is_heldout_key(p.key) == heldout:
            yield p


def _check_mix(mix: dict) -> list[tuple[str, float]]:
    unknown = set(mix) - set(KINDS)
    if unknown or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"a modsum mix maps kinds {KINDS} to non-negative weights, got {mix}")
    return list(mix.items())


def generate_documents(n: int, seed: int | str, mix: dict[str, float] = PRETRAIN_MIX) -> list[Document]:
    """n training documents (never a held-out problem), kinds drawn by `mix`; deterministic in `seed`."""
    rng = random.Random(f"modsum-train-{seed}")
    kinds, weights = zip(*_check_mix(mix))
    problems = _problems(rng, heldout=False)
    return [make_document(rng.choices(kinds, weights)[0], next(problems), rng) for _ in range(n)]


def generate_heldout(n: int, seed: int | str) -> list[Problem]:
    """n distinct held-out problems (keys in the held-out slice), from their own stream of `seed`."""
    rng, out, seen = random.Random(f"modsum-heldout-{seed}"), [], set()
    for p in _problems(rng, heldout=True):
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


def thought_answer(words: Sequence[str]) -> int | None:
    """The answer a thought states: its last word as a digit (None if it ends otherwise)."""
    return int(words[-1]) if words and words[-1].isdigit() and len(words[-1]) == 1 else None


def doc_record(doc: Document) -> dict:
    return {"text": doc.text, "kind": doc.kind, "digits": "".join(map(str, doc.problem.digits)),
            "answer": doc.problem.answer}


def write_jsonl(path, docs: Iterable[Document]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(doc_record(d)) + "\n" for d in docs)
    return path


def read_jsonl(path) -> list[Document]:
    """Documents written by `write_jsonl` (their kind, problem, words and roles rebuilt)."""
    docs = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        problem = Problem(tuple(int(c) for c in rec["digits"]))
        docs.append(_parse(problem, rec["text"]) if rec["kind"] == "aside" else make_document(rec["kind"], problem))
    return docs


def _parse(problem: Problem, text: str) -> Document:
    """A document back from its text (asides, whose placement `make_document` drew at random)."""
    words = text.replace(THINK_START, " " + THINK_START + " ").replace(THINK_END, " " + THINK_END + " ").split()
    roles, inside = [], False
    for i, w in enumerate(words):
        if w == THINK_START:
            inside, role = True, "think_start"
        elif w == THINK_END:
            inside, role = False, "think_end"
        elif inside:
            role = "thought"
        elif i == len(words) - 1:
            role = "answer"
        else:
            role = {SEP: "sep", CUE: "cue"}.get(w, "digit")
        roles.append(role)
    return Document("aside", problem, tuple(words), tuple(roles))


def train_tokenizer(out_prefix, seed: int = 0) -> Path:
    """A sentencepiece model in which every word of the task is one token (and the two markers)."""
    from rlp_jax.data.tokenizer import train_sentencepiece

    docs = generate_documents(2000, f"tokenizer-{seed}", {k: 1.0 for k in KINDS})
    return train_sentencepiece((d.text for d in docs), out_prefix, vocab_size=20, byte_fallback=False)


def encode_document(tokenizer, doc: Document, *, add_bos: bool = False) -> list[int]:
    """The document's token ids, one per word (a one-line error if the tokenizer splits words)."""
    ids = tokenizer.encode(doc.text, add_bos=add_bos)
    if len(ids) != len(doc.words) + add_bos:
        raise ValueError(f"the tokenizer splits modsum words ({len(ids)} tokens for {len(doc.words)} words in "
                         f"{doc.text!r}); use the task's own tokenizer (rlp_jax.data.modsum.train_tokenizer)")
    return ids


def task_token_ids(tokenizer) -> set[int]:
    """The ids the task's documents can contain: its words (digits, `;`, `=`, `A`) and the two markers."""
    doc = make_document("trace", Problem(tuple(range(MODULUS)) * 3))
    return set(encode_document(tokenizer, doc)) | {tokenizer.think_start_id, tokenizer.think_end_id}


def unused_token_ids(tokenizer) -> tuple[int, ...]:
    """Vocabulary ids no document of the task contains (sentencepiece's bare characters, the unknown piece,
    bos/eos/pad): their embeddings are never trained, so thoughts are kept from sampling them
    (`rlp.rollout.banned_ids`)."""
    used = task_token_ids(tokenizer)
    return tuple(i for i in range(tokenizer.vocab_size) if i not in used)


def build_study_data(out_dir, *, seed: int, pretrain_docs: int, continuation_docs: int, heldout: int,
                     heldout_docs: int = 512) -> dict[str, Path]:
    """Write the study's files under out_dir: pretrain.jsonl (PRETRAIN_MIX), continuation.jsonl
    (CONTINUATION_MIX, another stream), heldout_problems.jsonl (answer-only documents of held-out
    problems), heldout_worked.jsonl (worked documents of held-out problems, the stage-1 gate),
    heldout_continuation.jsonl (CONTINUATION_MIX documents of held-out problems) and tokenizer.model.
    Deterministic in `seed`; files already there are kept."""
    out = Path(out_dir)
    paths = {name: out / f"{name}.jsonl" for name in
             ("pretrain", "continuation", "heldout_problems", "heldout_worked", "heldout_continuation")}
    problems = generate_heldout(heldout + 2 * heldout_docs, seed)
    first, second, third = problems[:heldout], problems[heldout:heldout + heldout_docs], problems[heldout + heldout_docs:]
    rng = random.Random(f"modsum-heldout-docs-{seed}")
    kinds, weights = zip(*_check_mix(CONTINUATION_MIX))
    makers = {
        "pretrain": lambda: generate_documents(pretrain_docs, f"pretrain-{seed}", PRETRAIN_MIX),
        "continuation": lambda: generate_documents(continuation_docs, f"continuation-{seed}", CONTINUATION_MIX),
        "heldout_problems": lambda: [make_document("answer", p) for p in first],
        "heldout_worked": lambda: [make_document("worked", p) for p in second],
        "heldout_continuation": lambda: [make_document(rng.choices(kinds, weights)[0], p, rng) for p in third],
    }
    for name, path in paths.items():
        if not path.exists():
            write_jsonl(path.with_suffix(".tmp"), makers[name]()).rename(path)
    model = out / "tokenizer.model"
    if not model.exists():
        train_tokenizer(out / "tokenizer", seed=0)
    paths["tokenizer"] = model
    return paths
