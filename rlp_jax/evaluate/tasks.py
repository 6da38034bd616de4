"""Evaluation tasks: local benchmark files -> `Item`s -> plain-text few-shot prompts -> scores.

Files (`find_task_file`): in `data_dir`, the first of `{task}.jsonl`, `{task}.parquet`,
`{task}/test.jsonl`, `{task}/test.parquet` (for `generated` also `heldout.jsonl`, the name
`rlp_jax.data.corpus.build_corpus` writes); few-shot exemplars come from `{task}.train.jsonl`,
`{task}.train.parquet`, `{task}/train.jsonl` or `{task}/train.parquet` when present. Rows (JSON objects,
or Parquet columns) per task, as the public releases lay them out:

    gsm8k         {question, answer}: answer is the worked solution ending "#### 72"; gold = "72"
                  (canonical), solution = the text before "####" without the "<<48/2=24>>" annotations
    math500,      {problem, solution, answer}; `question` is accepted for `problem`; without `answer`,
    minerva_math  gold = the last \\boxed{} of `solution`
    aime, amc     {problem, answer}; `question` accepted for `problem`; answer may be a number
                  (142.0 -> "142")
    mmlu          {question, choices: [4 strings], answer: index 0-3 or letter}, or the CSV-derived layout
                  {question | input, A, B, C, D, answer | target: letter}
    mmlu_pro      {question, options: [<= 10 strings], answer: letter, answer_index: int};
                  cot_content (when present) -> solution
    gpqa          {Question, Correct Answer, Incorrect Answer 1, 2, 3} (Record ID, Explanation optional):
                  the 4 options are shuffled by a permutation seeded with (seed, item id), so the correct
                  letter is uniform over items and the same for the same seed
    generated     {question, answer, kind, text} from rlp_jax.data.corpus: question ends with "The answer is"
A row's `id` (or `unique_id`, `Record ID`) becomes `Item.id`; otherwise "{task}-{row number}".

Groups follow the paper's evaluation suite (arXiv 2510.01265): math = AIME25, MATH500, GSM8K, AMC23,
Minerva Math; science = MMLU, MMLU-Pro, GPQA (so MMLU is science, not "general"). `generated` (our
synthetic held-out set) is in the math group; report it apart from the paper's averages.
`TaskSpec.default_shots` (5 gsm8k, as lm-eval's `gsm8k` task; 4 MATH/Minerva/AIME/AMC; 5
MMLU/MMLU-Pro/GPQA; 0 generated) follow the usual lm-eval-style settings; the paper does not state its
shot counts. (MMLU and GPQA are scored generatively here, lm-eval scores them by log-likelihood: the
numbers are not comparable.)

Prompts (the model is a base LM: plain text, no chat template). Math exemplar:
    "Question: {question}\\nAnswer: {solution} The answer is {answer}.\\n\\n"
choice exemplar: "Question: {question}\\nA. {option}\\nB. {option}\\n...\\nAnswer: {letter}\\n\\n"; the
evaluated item is the same with nothing after "Answer:". `generated` is "{question} {answer}.\\n\\n" per
exemplar, then the bare question, which already ends with its cue (0 shots by default).

Thinking: the prompt is the same in both modes. no_think: decode after the prompt and pass that text to
`score(..., think=False)`. think: append the think marker, decode the thought, append "</think>" and
`answer_cue(spec)` (" The answer is" for math, " Answer:" for choice, "" for `generated`, whose prompt
already ends with its cue), decode the answer, and pass the answer text alone to `score(..., think=True)`,
which reads it as the cue followed by the answer. `score` cuts a completion at the first "\\nQuestion:",
where a base model starts inventing the next exemplar.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlp_jax.evaluate.answers import (
    CHOICE_LETTERS,
    canonical_number,
    extract_boxed,
    extract_choice,
    extract_math,
    math_equal,
)

STOP = "\nQuestion:"


class TaskError(ValueError):
    """A missing or malformed task file, or an unknown task name."""


@dataclass(frozen=True)
class Item:
    """One evaluation question. `answer`: canonical gold (a letter for choice tasks); `solution`: worked
    solution text when the format has one (used in few-shot exemplars)."""
    task: str
    id: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()
    solution: str = ""


class _BadRow(Exception):
    """Raised by a reader; `load_task` prefixes the file and row."""


Row = Mapping[str, Any]
Reader = Callable[[Row, str, str, int], Item]  # (row, task, default id, seed) -> Item


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """A benchmark. Attributes: name; kind: "math" (free-form answer, math_equal) or "choice" (letter,
    exact); group: the paper's average it counts in; reader: row -> Item; template: "qa" (Question/Answer
    few-shot) or "bare" (the question is the prompt); default_shots: shots when the caller gives none."""
    name: str
    kind: Literal["math", "choice"]
    group: Literal["math", "science"]
    reader: Reader
    template: Literal["qa", "bare"] = "qa"
    default_shots: int = 0


def _field(row: Row, *names: str) -> Any:
    for n in names:
        if row.get(n) is not None and row.get(n) != "":
            return row[n]
    raise _BadRow(f"missing field {' or '.join(repr(n) for n in names)}")


def _text(row: Row, *names: str) -> str:
    v = _field(row, *names)
    if not isinstance(v, str):
        raise _BadRow(f"field {names[0]!r} must be a string, got {type(v).__name__}")
    return v.strip()


def _ident(row: Row, default: str) -> str:
    found = (row[k] for k in ("id", "unique_id", "Record ID") if row.get(k) not in (None, ""))
    return str(next(found, default))


def _read_gsm8k(row: Row, task: str, rid: str, seed: int) -> Item:
    solution, sep, final = _text(row, "answer").rpartition("####")
    if not sep or not re.fullmatch(r"\s*[-+$]?[\d,]*\.?\d+\s*", final):
        raise _BadRow("field 'answer' has no '#### <number>' final answer")
    solution = re.sub(r"<<[^<>]*>>", "", solution).strip()
    gold = canonical_number(final.strip().lstrip("$"))
    return Item(task, _ident(row, rid), _text(row, "question"), gold, solution=solution)


def _read_math(row: Row, task: str, rid: str, seed: int) -> Item:
    solution = row.get("solution") or ""
    if row.get("answer") not in (None, ""):
        gold = str(row["answer"]).strip()
    else:
        gold = extract_boxed(str(solution)) if solution else None
        if gold is None:
            raise _BadRow("missing field 'answer' and no \\boxed{} answer in 'solution'")
    return Item(task, _ident(row, rid), _text(row, "problem", "question"), gold, solution=str(solution).strip())


def _read_short(row: Row, task: str, rid: str, seed: int) -> Item:
    gold = _field(row, "answer")
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        raise _BadRow(f"field 'answer' must be a string or number, got {type(gold).__name__}")
    gold = canonical_number(str(gold)) if isinstance(gold, (int, float)) else gold.strip()
    return Item(task, _ident(row, rid), _text(row, "problem", "question"), gold)


def _letter(value: Any, num: int, field: str) -> str:
    """An answer index (int) or letter -> the letter, checked against `num` options."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < num:
            raise _BadRow(f"field {field!r} index {value} out of range 0..{num - 1}")
        return CHOICE_LETTERS[value]
    if isinstance(value, str) and value.strip().isdigit():
        return _letter(int(value), num, field)
    if isinstance(value, str) and value.strip() in CHOICE_LETTERS[:num]:
        return value.strip()
    raise _BadRow(f"field {field!r} value {value!r} is not one of {CHOICE_LETTERS[:num]} or 0..{num - 1}")


def _options(value: Any, field: str, lo: int, hi: int) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not lo <= len(value) <= hi:
        raise _BadRow(f"field {field!r} must be a list of {lo}..{hi} options" if lo < hi else
                      f"field {field!r} must be a list of {lo} options")
    return tuple(str(v).strip() for v in value)


def _read_mmlu(row: Row, task: str, rid: str, seed: int) -> Item:
    if row.get("choices") is not None:
        choices = _options(row["choices"], "choices", 4, 4)
    else:
        choices = tuple(_text(row, k) for k in "ABCD")
    answer = _letter(_field(row, "answer", "target"), 4, "answer")
    return Item(task, _ident(row, rid), _text(row, "question", "input"), answer, choices)


def _read_mmlu_pro(row: Row, task: str, rid: str, seed: int) -> Item:
    options = _options(_field(row, "options"), "options", 2, 10)
    answer = _letter(_field(row, "answer", "answer_index"), len(options), "answer")
    index = row.get("answer_index")
    if index is not None and _letter(index, len(options), "answer_index") != answer:
        raise _BadRow(f"field 'answer' {answer!r} disagrees with 'answer_index' {index}")
    solution = str(row.get("cot_content") or "")
    return Item(task, _ident(row, rid), _text(row, "question"), answer, options, solution)


def _read_gpqa(row: Row, task: str, rid: str, seed: int) -> Item:
    correct = _text(row, "Correct Answer")
    options = [correct] + [_text(row, f"Incorrect Answer {i}") for i in (1, 2, 3)]
    ident = _ident(row, rid)
    random.Random(f"gpqa/{seed}/{ident}").shuffle(options)
    answer = CHOICE_LETTERS[options.index(correct)]
    return Item(task, ident, _text(row, "Question"), answer, tuple(options), str(row.get("Explanation") or ""))


def _read_generated(row: Row, task: str, rid: str, seed: int) -> Item:
    question = _text(row, "question")
    if not question.endswith("The answer is"):
        raise _BadRow("field 'question' does not end with the cue 'The answer is'")
    return Item(task, _ident(row, rid), question, str(_field(row, "answer")).strip())


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec(name="gsm8k", kind="math", group="math", reader=_read_gsm8k, default_shots=5),
    TaskSpec(name="math500", kind="math", group="math", reader=_read_math, default_shots=4),
    TaskSpec(name="minerva_math", kind="math", group="math", reader=_read_math, default_shots=4),
    TaskSpec(name="aime", kind="math", group="math", reader=_read_short, default_shots=4),
    TaskSpec(name="amc", kind="math", group="math", reader=_read_short, default_shots=4),
    TaskSpec(name="generated", kind="math", group="math", reader=_read_generated, template="bare"),
    TaskSpec(name="mmlu", kind="choice", group="science", reader=_read_mmlu, default_shots=5),
    TaskSpec(name="mmlu_pro", kind="choice", group="science", reader=_read_mmlu_pro, default_shots=5),
    TaskSpec(name="gpqa", kind="choice", group="science", reader=_read_gpqa, default_shots=5),
)}
_FORMATS = {"gsm8k": "{question, answer ending '#### N'}", "math500": "{problem, solution, answer}",
            "minerva_math": "{problem, solution[, answer]}", "aime": "{problem, answer}",
            "amc": "{problem, answer}", "generated": "{question, answer} (rlp_jax.data.corpus heldout.jsonl)",
            "mmlu": "{question, choices, answer}", "mmlu_pro": "{question, options, answer, answer_index}",
            "gpqa": "{Question, Correct Answer, Incorrect Answer 1..3}"}


def get_task(name: str) -> TaskSpec:
    """The registered spec for `name`; an unknown name raises TaskError listing the valid ones."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def _candidates(task: str, split: Literal["test", "train"]) -> list[str]:
    if split == "test":
        names = [f"{task}.jsonl", f"{task}.parquet", f"{task}/test.jsonl", f"{task}/test.parquet"]
        return names + (["heldout.jsonl"] if task == "generated" else [])
    return [f"{task}.train.jsonl", f"{task}.train.parquet", f"{task}/train.jsonl", f"{task}/train.parquet"]


def _find(data_dir: str | Path, task: str, split: Literal["test", "train"]) -> Path | None:
    return next((Path(data_dir) / n for n in _candidates(task, split) if (Path(data_dir) / n).is_file()), None)


def find_task_file(data_dir: str | Path, task: str, split: Literal["test", "train"] = "test") -> Path:
    """The file holding `split` of `task` in `data_dir` (see the module docstring); TaskError if none."""
    get_task(task)
    path = _find(data_dir, task, split)
    if path is None:
        raise TaskError(f"no {split} file for task {task!r} in {data_dir}: tried "
                        f"{', '.join(_candidates(task, split))}; put the {split} split there as JSONL or "
                        f"Parquet rows {_FORMATS[task]}")
    return path


def _rows(path: Path, label: str) -> list[tuple[int, Mapping[str, Any]]]:
    """(1-based row number, row) pairs: JSONL line numbers (blank lines skipped) or Parquet row numbers."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            return list(enumerate(pq.read_table(path).to_pylist(), 1))
        except (pa.ArrowException, OSError) as e:
            raise TaskError(f"{label}: not a readable Parquet file ({e})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{label}: not UTF-8 text (byte {e.start}); save the file as UTF-8 JSONL") from None
    rows = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{label} row {i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TaskError(f"{label} row {i}: not a JSON object")
        rows.append((i, row))
    return rows


def read_items(spec: TaskSpec, path: str | Path, *, limit: int | None = None, seed: int = 0,
               label: str | None = None) -> list[Item]:
    """The first `limit` (all if None) items of the JSONL/Parquet file `path` read as task `spec`; `seed`
    drives GPQA's option shuffle. A malformed row raises TaskError "{label} row {n}: {problem}" (label
    defaults to the file name; n is 1-based)."""
    path = Path(path)
    label = label or path.name
    items = []
    for i, row in _rows(path, label)[:limit]:
        try:
            items.append(spec.reader(row, spec.name, f"{spec.name}-{i}", seed))
        except _BadRow as e:
            raise TaskError(f"{label} row {i}: {e}") from None
    return items


def load_task(name: str, data_dir: str | Path, *, limit: int | None = None, seed: int = 0) -> list[Item]:
    """`read_items` of task `name`'s test file in `data_dir` (`find_task_file`); errors name the file
    relative to `data_dir`."""
    path = find_task_file(data_dir, name)
    return read_items(get_task(name), path, limit=limit, seed=seed, label=path.relative_to(data_dir).as_posix())


def fewshot_items(name: str, data_dir: str | Path, items: list[Item], k: int, seed: int,
                  pool: list[Item] | None = None) -> list[list[Item]]:
    """For each item, `k` exemplars drawn (deterministically for `seed` and the item's id) from the task's
    train file when there is one, else from `pool` (default `items`: pass the whole test file when
    `items` is a `--limit` slice of it), as lm-eval does for tasks without a few-shot split; never the
    item itself."""
    spec = get_task(name)
    if k <= 0:
        return [[] for _ in items]
    train = _find(data_dir, name, "train")
    pool = list(items if pool is None else pool)
    if train is not None:
        pool = read_items(spec, train, seed=seed, label=train.relative_to(data_dir).as_posix())
    out = []
    for item in items:  # "the item itself" = any pool entry with its question (ids differ across files)
        rng = random.Random(f"fewshot/{seed}/{item.id}")
        picks = rng.sample(range(len(pool)), min(k + 1, len(pool)))
        shots = [pool[j] for j in picks if pool[j].question != item.question][:k]
        if len(shots) < k:  # the question occurs more than once in the pool: draw from all the others
            others = [x for x in pool if x.question != item.question]
            shots = rng.sample(others, min(k, len(others)))
        if len(shots) < k:
            raise TaskError(f"task {name!r}: {k} shots asked but only {len(shots)} other items to draw from; pass "
                            f"--shots {len(shots)} or fewer, or put exemplars in a {name}.train.* file")
        out.append(shots)
    return out


def _choice_block(item: Item) -> str:
    return "".join(f"\n{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(item.choices))


def _exemplar(spec: TaskSpec, ex: Item) -> str:
    if spec.template == "bare":
        return f"{ex.question} {ex.answer}.\n\n"
    if spec.kind == "choice":
        return f"Question: {ex.question}{_choice_block(ex)}\nAnswer: {ex.answer}\n\n"
    worked = f" {ex.solution}" if ex.solution else ""
    return f"Question: {ex.question}\nAnswer:{worked} The answer is {ex.answer}.\n\n"


def build_prompt(spec: TaskSpec, item: Item, shots: list[Item]) -> str:
    """The plain-text prompt: the exemplars, then `item` ending in "Answer:" (or, for the bare template,
    the question with its own cue). Identical for think and no_think (see the module docstring)."""
    head = "".join(_exemplar(spec, ex) for ex in shots)
    if spec.template == "bare":
        return head + item.question
    choices = _choice_block(item) if spec.kind == "choice" else ""
    return f"{head}Question: {item.question}{choices}\nAnswer:"


def _cue(spec: TaskSpec) -> str:
    return " Answer:" if spec.kind == "choice" else " The answer is"


def answer_cue(spec: TaskSpec) -> str:
    """Text to append after "</think>" in think mode so the answer follows: " The answer is" (math),
    " Answer:" (choice), "" for the bare template (the prompt already ends with its cue)."""
    return "" if spec.template == "bare" else _cue(spec)


def score(spec: TaskSpec, completion: str, item: Item, *, think: bool = False) -> tuple[str | None, bool]:
    """(prediction, correct) for a completion. no_think: `completion` is the text decoded after the prompt;
    think: the text decoded after "</think>" + answer_cue(spec). Cut at the first "\\nQuestion:"."""
    text = completion.split(STOP, 1)[0]
    if think or spec.template == "bare":
        text = _cue(spec) + text
    if spec.kind == "choice":
        pred = extract_choice(text, len(item.choices))
        return pred, pred == item.answer
    pred = extract_math(text)
    return pred, math_equal(pred, item.answer)
