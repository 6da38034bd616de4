"""Evaluating a model on the running-sum task (`rlp_jax.data.modsum`): the study's and the demo's numbers.

- `role_accuracy`: teacher-forced, is the model's most likely next token right, by word role (copy, step,
  answer, ...) on documents: the stage-1 gate reads `step` and `answer` on held-out worked documents.
- `answer_rows`: `rlp.think_eval` at the answer position of held-out answer-only documents (fixed
  positions, a fixed key for the thoughts, so every model is scored on the same places and draws), each
  sampled thought judged by the answer it states (`modsum.thought_answer`).
- `uniform_rows`: the same at one position per held-out continuation document drawn uniformly with a fixed
  key (the paper's rule), independent of the evaluated model.
Per-position arrays come back (for paired bootstrap CIs); `rlp.think_eval.summarize` averages them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlp_jax.data import modsum
from rlp_jax.model import family
from rlp_jax.rlp.objective import Objective
from rlp_jax.rlp.positions import choose_positions, valid_positions
from rlp_jax.rlp.think_eval import evaluate_thoughts_jit, per_position

EVAL_BATCH = 64


def doc_batch(tokenizer, docs: list[modsum.Document], seq_len: int) -> dict[str, np.ndarray]:
    """[B, L] int32 tokens / segment_ids / positions of one document per row (eos appended, as training reads)."""
    b = len(docs)
    out = {k: np.zeros((b, seq_len), np.int32) for k in ("tokens", "segment_ids", "positions")}
    out["tokens"][:] = tokenizer.pad_id or 0
    for i, d in enumerate(docs):
        ids = modsum.encode_document(tokenizer, d) + [tokenizer.eos_id]
        if len(ids) > seq_len:
            raise ValueError(f"a modsum document has {len(ids)} tokens > seq_len={seq_len}; raise data.seq_len")
        out["tokens"][i, :len(ids)], out["segment_ids"][i, :len(ids)] = ids, 1
        out["positions"][i, :len(ids)] = np.arange(len(ids))
    return out


def _chunks(docs, n=EVAL_BATCH):
    for i in range(0, len(docs), n):
        yield i, docs[i:i + n]


def role_accuracy(params, cfg, tokenizer, docs: list[modsum.Document], seq_len: int) -> dict[str, float]:
    """Teacher-forced next-token accuracy by role of the predicted word ({role: fraction})."""
    fwd = jax.jit(lambda p, b: jnp.argmax(_logits(p, cfg, b), -1))
    hits: dict[str, list[bool]] = {}
    for _, chunk in _chunks(docs):
        batch = doc_batch(tokenizer, chunk, seq_len)
        pred = np.asarray(fwd(params, batch))                                           # [B, L] argmax after j
        for i, d in enumerate(chunk):
            for j, role in enumerate(d.roles[1:], start=1):
                hits.setdefault(role, []).append(pred[i, j - 1] == batch["tokens"][i, j])
    return {r: float(np.mean(v)) for r, v in sorted(hits.items())}


def _logits(params, cfg, batch):
    logits, _ = family.forward(params, cfg, batch["tokens"], segment_ids_bl=batch["segment_ids"],
                               positions_bl=batch["positions"])
    return logits


def _judge(tokenizer, thoughts, answers_bk) -> np.ndarray:
    """bool [B, K, G]: the thought's last word is the right answer."""
    toks, lens = np.asarray(thoughts.tokens), np.asarray(thoughts.lengths)
    words = {i: tokenizer.decode([i]).strip() for i in np.unique(toks)}
    ok = np.zeros(lens.shape, bool)
    for idx in np.ndindex(*lens.shape):
        stated = modsum.thought_answer([words[t] for t in toks[idx][:lens[idx]]])
        ok[idx] = stated == answers_bk[idx[:2]]
    return ok


def _gather(parts: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def answer_rows(params, cfg, tokenizer, docs: list[modsum.Document], objective: Objective, seq_len: int,
                key) -> dict[str, np.ndarray]:
    """`per_position` arrays at the answer position of each document (one row per document, in order)."""
    parts = []
    for start, chunk in _chunks(docs):
        batch = doc_batch(tokenizer, chunk, seq_len)
        t_bk = np.array([[d.answer_index] for d in chunk], np.int32)
        ev = evaluate_thoughts_jit(params, cfg, objective, batch, t_bk, jax.random.fold_in(key, start))
        ok = _judge(tokenizer, ev.sampled, np.array([[d.problem.answer] for d in chunk]))
        parts.append(per_position(ev, np.ones(t_bk.shape, bool), ok))
    return _gather(parts)


def uniform_rows(params, cfg, tokenizer, docs: list[modsum.Document], objective: Objective, seq_len: int,
                 key) -> dict[str, np.ndarray]:
    """`per_position` arrays at one uniformly drawn valid position per document (`rlp.rollout.min_context`),
    the draw depending only on `key` and the documents, never on the model."""
    parts = []
    for start, chunk in _chunks(docs):
        batch = doc_batch(tokenizer, chunk, seq_len)
        valid = valid_positions(jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"]),
                                min_context=objective.rlp.rollout.min_context)
        k_pos, k_think = jax.random.split(jax.random.fold_in(key, start))
        t_bk, mask = choose_positions(k_pos, valid, 1)
        ev = evaluate_thoughts_jit(params, cfg, objective, batch, t_bk, k_think)
        parts.append(per_position(ev, mask))
    return _gather(parts)


def show_thoughts(params, cfg, tokenizer, docs: list[modsum.Document], objective: Objective, seq_len: int,
                  key) -> list[str]:
    """`question <think> thought </think> answer  [gold: g, right|wrong]` for each document: the first of the
    G thoughts `answer_rows` samples with the same key, and the model's most likely answer after it."""
    batch = doc_batch(tokenizer, docs, seq_len)
    t_bk = np.array([[d.answer_index] for d in docs], np.int32)
    ev = jax.device_get(evaluate_thoughts_jit(params, cfg, objective, batch, t_bk, jax.random.fold_in(key, 0)))
    out = []
    for i, d in enumerate(docs):
        n = int(ev.sampled.lengths[i, 0, 0])
        thought = tokenizer.decode([int(x) for x in ev.sampled.tokens[i, 0, 0, :n]]).strip()
        said = tokenizer.decode([int(ev.top_sampled[i, 0, 0])]).strip()
        question = modsum.render(d.words[:d.answer_index])
        verdict = "right" if said == str(d.problem.answer) else "wrong"
        out.append(f"{question} <think> {thought} </think> {said}   [gold: {d.problem.answer}, {verdict}]")
    return out


def evaluate_params(params, cfg, tokenizer, data: dict, objective: Objective, seq_len: int, key, *,
                    problems: int | None = None, full: bool = True) -> tuple[dict, dict]:
    """The task's evaluation of one model: (summary, per-position rows). `data` names the held-out files of
    `modsum.build_study_data` (heldout_problems; with `full` also heldout_continuation and heldout_worked).
    Summary: `answer` (answer positions), and with `full`: `uniform` (uniform positions of held-out
    continuation documents), `roles_worked` / `roles_continuation` (teacher-forced accuracy by role)."""
    from rlp_jax.rlp.think_eval import summarize

    docs = modsum.read_jsonl(data["heldout_problems"])[:problems]
    ans = answer_rows(params, cfg, tokenizer, docs, objective, seq_len, key)
    summary, rows = {"answer": summarize(ans)}, {"answer": ans}
    if full:
        cont = modsum.read_jsonl(data["heldout_continuation"])
        rows["uniform"] = uniform_rows(params, cfg, tokenizer, cont, objective, seq_len, jax.random.fold_in(key, 1))
        summary["uniform"] = summarize(rows["uniform"])
        summary["roles_worked"] = role_accuracy(params, cfg, tokenizer, modsum.read_jsonl(data["heldout_worked"]),
                                                seq_len)
        summary["roles_continuation"] = role_accuracy(params, cfg, tokenizer, cont, seq_len)
    return summary, rows
