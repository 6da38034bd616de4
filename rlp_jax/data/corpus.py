"""A small, deterministic "reasoning-rich web text" corpus, generated offline from word lists.

Document kinds (`KINDS`):
    arithmetic       "What is (12 + 7) x 3?"  2-3 operations of + - x, evaluated left to right
    word_problem     "Ana has 12 apples. She buys 7 more and then gives 5 away. How many ..."
    unit_conversion  km/m, m/cm, kg/g, L/mL, weeks/days/hours/minutes/seconds, both ways and mixed
    logic            "Tom is taller than Bob. Eve is shorter than Bob. Who is the tallest?"
    descriptive      plain templated text and lists (animals, cities, colours, weekdays, lists)

A problem document is `body [worked steps] cue answer.`, e.g. "Ana has 12 apples. ... How many apples
does she have now? 12 + 7 = 19. 19 - 5 = 14. So the answer is 14." With probability
`worked_fraction` the worked steps are shown; otherwise only "The answer is 14." follows the body, so
the answer token is predictable only by reasoning that is not written down.

Markers in the text (for a model that has never read them): `think_fraction` writes a problem's working as a
thought at the answer (`is<think> steps</think> answer`), `aside_fraction` gives documents an aside
(`with_aside`: `<think>` a copy of the words before it `</think>`, then the text resumes).

Held-out evaluation problems never occur in training, by construction: every problem has a canonical
key that identifies its content independently of its surface form (`math:12+7-5` is shared by the
arithmetic and word-problem renderings; `unit:km>m:3`; `logic:taller:Tom>Bob>Eve` for either
question about that ordering). A key is held out iff blake2b(key) falls in a fixed 10% slice
(`is_heldout_key`), independent of any seed. Evaluation problems are drawn only from held-out keys;
a training document is rejected if its key *or any sub-problem it contains* (the 2-operation prefix
of a 3-operation sum, a 3-name sub-chain of a 4-name ordering) is held out. All randomness comes from
`random.Random` seeded with strings derived from `seed`, so outputs are identical across runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

KINDS = ("arithmetic", "word_problem", "unit_conversion", "logic", "descriptive")
PROBLEM_KINDS = KINDS[:4]
HELDOUT_PER_MILLE = 100  # share of canonical keys (in 1/1000) reserved for evaluation
ASIDE_WORDS = (2, 6)     # an aside copies this many preceding words (inclusive; 0: the empty thought)
EVAL_CUE = "The answer is"
_DOC_WEIGHTS = (0.2, 0.2, 0.2, 0.15, 0.25)
_CUES_PLAIN = ("The answer is", "The answer is", "Answer:")
_CUES_WORKED = ("So the answer is", "The answer is")
_PREAMBLES = ("", "", "", "Practice problem.", "Exercise.", "Here is a short puzzle.", "Quick question.",
              "Try this one.")


@dataclass(frozen=True)
class Problem:
    kind: str
    question: str  # the text up to and including the cue, e.g. "... How many apples? The answer is"
    answer: str  # the short final answer, e.g. "14"
    worked: str  # the worked steps, e.g. "12 + 7 = 19. 19 - 5 = 14."
    key: str = ""  # canonical key (see module docstring)
    subkeys: tuple[str, ...] = ()  # keys of sub-problems contained in this one (key included)

    @property
    def body(self) -> str:
        """An evaluation question without its cue (the text checked against the training split)."""
        return self.question[: len(self.question) - len(EVAL_CUE)].rstrip()


@dataclass(frozen=True)
class Document:
    kind: str
    text: str
    key: str | None  # canonical key of the problem; None for descriptive text
    worked: bool  # whether the worked steps are shown
    problem: Problem | None = None  # the problem it states (question without cue); None for descriptive


def canonical_key(item: Problem | Document) -> str | None:
    return item.key


def is_heldout_key(key: str) -> bool:
    """The fixed, seed-independent partition: True for the ~10% of keys reserved for evaluation."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h % 1000 < HELDOUT_PER_MILLE


# ----------------------------------------------------------------------------- arithmetic / word problems
_SYM = {"+": "+", "-": "-", "*": "x"}
_NAMES = (("Ana", "she"), ("Tom", "he"), ("Mia", "she"), ("Ben", "he"), ("Lina", "she"), ("Omar", "he"),
          ("Sara", "she"), ("Leo", "he"), ("Nora", "she"), ("Sam", "he"), ("Eva", "she"), ("Ivan", "he"))
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "coins", "eggs", "cards")
_CONTAINERS = ("bags", "boxes", "jars", "packs", "baskets")
_PLUS = ("buys {n} more", "finds {n} more", "gets {n} more from a friend", "is given {n} more")
_MINUS = ("gives {n} away", "loses {n}", "sells {n}", "uses {n}", "gives {n} to a friend")
_ARITH_T = ("What is {e}?", "Compute {e}.", "Calculate {e}.", "Find the value of {e}.", "Work out {e}.")


def _random_ops(rng: random.Random, value: int, n_ops: int, allow_mul: bool) -> list[tuple[str, int]]:
    ops = []
    for _ in range(n_ops):
        choices = ["+"] + (["-"] if value >= 2 else []) + (["*"] if allow_mul and value <= 15 else [])
        op = rng.choice(choices)
        n = rng.randint(1, 99) if op == "+" else rng.randint(1, value - 1) if op == "-" else rng.randint(2, 9)
        ops.append((op, n))
        value = value + n if op == "+" else value - n if op == "-" else value * n
    return ops


def _math(first: int, ops: list[tuple[str, int]]) -> tuple[str, list[str], str, tuple[str, ...]]:
    """-> (expression with parentheses for left-to-right order, step strings, answer, subkeys)."""
    expr, top_sum, value, steps, keys = str(first), False, first, [], []
    for i, (op, n) in enumerate(ops):
        new = value + n if op == "+" else value - n if op == "-" else value * n
        steps.append(f"{value} {_SYM[op]} {n} = {new}.")
        expr = f"({expr}) x {n}" if op == "*" and top_sum else f"{expr} {_SYM[op]} {n}"
        top_sum, value = op != "*", new
        if i >= 1:
            keys.append(f"math:{first}" + "".join(f"{o}{m}" for o, m in ops[: i + 1]))
    return expr, steps, str(value), tuple(reversed(keys))


def _arithmetic(rng: random.Random) -> Problem:
    first = rng.randint(2, 99)
    expr, steps, ans, keys = _math(first, _random_ops(rng, first, rng.randint(2, 3), allow_mul=True))
    return Problem("arithmetic", rng.choice(_ARITH_T).format(e=expr), ans, " ".join(steps), keys[0], keys)


def _word_problem(rng: random.Random) -> Problem:
    (name, he), items = rng.choice(_NAMES), rng.choice(_ITEMS)
    if rng.random() < 0.4:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        first, pre, start = a, [("*", b)], f"{name} has {a} {rng.choice(_CONTAINERS)} with {b} {items} in each."
    else:
        first, pre = rng.randint(2, 99), []
        start = f"{name} has {first} {items}."
    ops = pre + _random_ops(rng, first * (pre[0][1] if pre else 1), rng.randint(2, 3) - len(pre), False)
    acts = [rng.choice(_PLUS if op == "+" else _MINUS).format(n=n) for op, n in ops[len(pre):]]
    if len(acts) == 1 or rng.random() < 0.5:
        joined = ", ".join(acts[:-1]) + " and then " + acts[-1] if len(acts) > 1 else acts[0]
        actions = f"{he.capitalize()} {joined}."
    else:
        actions = " ".join(f"{'Then ' + he if i else he.capitalize()} {a}." for i, a in enumerate(acts))
    ask = rng.choice((f"How many {items} does {he} have now?", f"How many {items} does {name} have in the end?",
                      f"How many {items} are there now?"))
    _, steps, ans, keys = _math(first, ops)
    return Problem("word_problem", f"{start} {actions} {ask}", ans, " ".join(steps), keys[0], keys)


# ----------------------------------------------------------------------------- unit conversions
# (big singular, big plural, small singular, small plural, factor, dimension)
_UNITS = (("kilometer", "kilometers", "meter", "meters", 1000, "length"),
          ("meter", "meters", "centimeter", "centimeters", 100, "length"),
          ("kilogram", "kilograms", "gram", "grams", 1000, "mass"),
          ("liter", "liters", "milliliter", "milliliters", 1000, "volume"),
          ("week", "weeks", "day", "days", 7, "time"), ("day", "days", "hour", "hours", 24, "time"),
          ("hour", "hours", "minute", "minutes", 60, "time"), ("minute", "minutes", "second", "seconds", 60, "time"))
_CONTEXT = {"length": "A path is {q} long. How long is it in {to}?", "mass": "A bag of rice weighs {q}. "
            "How much is that in {to}?", "volume": "A jug holds {q}. How much is that in {to}?",
            "time": "A trip takes {q}. How many {to} is that?"}


def _qty(n: int, sing: str, plur: str) -> str:
    return f"{n} {sing if n == 1 else plur}"


def _unit_conversion(rng: random.Random) -> Problem:
    bs, bp, ss, sp, f, dim = rng.choice(_UNITS)
    mode, a = rng.choice(("down", "down", "up", "mixed")), rng.randint(1, 30)
    if mode == "down":
        q, to, ans = _qty(a, bs, bp), sp, a * f
        worked = f"1 {bs} is {f} {sp}, so {q} is {a} x {f} = {ans} {sp}."
    elif mode == "up":
        q, to, ans = _qty(a * f, ss, sp), bp, a
        worked = f"{f} {sp} is 1 {bs}, so {q} is {a * f} / {f} = {_qty(a, bs, bp)}."
    else:
        b = rng.randint(1, f - 1)
        q, to, ans = f"{_qty(a, bs, bp)} and {_qty(b, ss, sp)}", sp, a * f + b
        worked = f"{_qty(a, bs, bp)} is {a} x {f} = {a * f} {sp}. {a * f} + {b} = {ans} {sp}."
    t = rng.choice(("How many {to} are in {q}?", "Convert {q} to {to}.", "How many {to} is {q}?", _CONTEXT[dim]))
    question = t.format(q=q, to=to)
    key = f"unit:{mode}:{bs}>{ss}:{a}" + (f"+{ans - a * f}" if mode == "mixed" else "")
    return Problem("unit_conversion", question[0].upper() + question[1:], str(ans), worked, key, (key,))


# ----------------------------------------------------------------------------- logic / ordering
_PEOPLE = ("Tom", "Bob", "Eve", "Ana", "Max", "Lily", "Sam", "Zoe", "Ben", "Kim", "Raj", "Mia")
_COMPARE = (("taller", "shorter", "tallest", "shortest"), ("older", "younger", "oldest", "youngest"),
            ("faster", "slower", "fastest", "slowest"), ("heavier", "lighter", "heaviest", "lightest"))


def _logic(rng: random.Random) -> Problem:
    more, less, most, least = rng.choice(_COMPARE)
    order = rng.sample(_PEOPLE, rng.choice((3, 3, 4)))  # order[0] is the `most`
    pairs = [(order[i], order[i + 1]) for i in range(len(order) - 1)]
    rng.shuffle(pairs)
    facts = " ".join(f"{a} is {more} than {b}." if rng.random() < 0.6 else f"{b} is {less} than {a}."
                     for a, b in pairs)
    ask_most = rng.random() < 0.5
    ask = f"Who is the {most if ask_most else least}?"
    intro = rng.choice(("", f"{', '.join(sorted(order)[:-1])} and {sorted(order)[-1]} are friends. "))
    steps = [f"{a} is {more} than {b}" for a, b in zip(order, order[1:])]
    chain = ", ".join(steps[:-1]) + " and " + steps[-1]
    worked = f"{chain}, so from {most} to {least} the order is {', '.join(order)}."
    key = f"logic:{more}:" + ">".join(order)
    subs = tuple(f"logic:{more}:" + ">".join(order[i:i + 3]) for i in range(len(order) - 2))
    return Problem("logic", f"{intro}{facts} {ask}", order[0] if ask_most else order[-1], worked, key,
                   tuple(dict.fromkeys((key,) + subs)))


# ----------------------------------------------------------------------------- descriptive text
_ANIMALS = (("fox", "foxes", "forest", "mice and berries", "red"), ("cow", "cows", "farm", "grass", "black and white"),
            ("owl", "owls", "woods", "mice", "brown"), ("frog", "frogs", "pond", "insects", "green"),
            ("bear", "bears", "mountains", "fish and berries", "brown"), ("camel", "camels", "desert", "dry plants",
            "sandy brown"), ("penguin", "penguins", "cold south", "fish", "black and white"),
            ("rabbit", "rabbits", "meadow", "grass and carrots", "grey"), ("horse", "horses", "farm", "hay", "brown"))
_CITIES = (("Paris", "France", "Seine"), ("Cairo", "Egypt", "Nile"), ("London", "England", "Thames"),
           ("Rome", "Italy", "Tiber"), ("Vienna", "Austria", "Danube"), ("Budapest", "Hungary", "Danube"),
           ("Lisbon", "Portugal", "Tagus"), ("Warsaw", "Poland", "Vistula"), ("Prague", "Czechia", "Vltava"))
_THINGS = (("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
           ("a ripe banana", "yellow"), ("a ripe tomato", "red"), ("a carrot", "orange"))
_MIXES = (("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
          ("red", "white", "pink"), ("black", "white", "grey"))
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_LISTS = {"fruits": ("apples", "pears", "plums", "grapes", "cherries", "lemons"),
          "tools": ("a hammer", "a saw", "a drill", "pliers", "a ruler", "nails"),
          "things in a kitchen": ("a cup", "a pan", "a knife", "a spoon", "a kettle", "plates"),
          "school supplies": ("pencils", "a notebook", "an eraser", "a ruler", "glue", "crayons")}


def _animal(rng: random.Random) -> list[str]:
    a, pl, home, food, col = rng.choice(_ANIMALS)
    return [f"The {a} lives in the {home}.", f"A {a} eats {food}.", f"Many {pl} are {col}.",
            f"{pl.capitalize()} live in the {home} and eat {food}.", f"Have you ever seen a {a}?"]


def _city(rng: random.Random) -> list[str]:
    c, country, river = rng.choice(_CITIES)
    return [f"{c} is the capital of {country}.", f"The {river} river flows through {c}.",
            f"Many tourists visit {c} every year.", f"{c} has old streets, busy markets and bridges."]


def _colour(rng: random.Random) -> list[str]:
    (t, c), (x, y, z) = rng.choice(_THINGS), rng.choice(_MIXES)
    return [f"The colour of {t} is {c}.", f"{t[0].upper() + t[1:]} is usually {c}.",
            f"If you mix {x} and {y}, you get {z}.", f"Mixing {x} paint with {y} paint gives {z}."]


def _weekday(rng: random.Random) -> list[str]:
    i = rng.randrange(7)
    d, nxt, prv = _DAYS[i], _DAYS[(i + 1) % 7], _DAYS[i - 1]
    return [f"The day after {d} is {nxt}.", f"The day before {d} is {prv}.", f"If today is {d}, tomorrow is {nxt}.",
            f"There are seven days in a week: {', '.join(_DAYS[:-1])} and Sunday.", f"{prv} comes before {d}."]


def _descriptive(rng: random.Random) -> str:
    topic = rng.choice((_animal, _city, _colour, _weekday, None))
    if topic is None:
        cat = rng.choice(sorted(_LISTS))
        items = rng.sample(_LISTS[cat], rng.randint(3, 5))
        style = rng.randrange(3)
        if style == 0:
            return f"Some {cat}: {', '.join(items[:-1])} and {items[-1]}."
        lines = [f"- {x}" if style == 1 else f"{i + 1}. {x}" for i, x in enumerate(items)]
        return f"A short list of {cat}:\n" + "\n".join(lines)
    sentences = topic(rng)
    return " ".join(rng.sample(sentences, rng.randint(2, len(sentences))))


# ----------------------------------------------------------------------------- public API
_MAKERS = {"arithmetic": _arithmetic, "word_problem": _word_problem, "unit_conversion": _unit_conversion,
           "logic": _logic}


def thought_in_text(before: str, thought: str, after: str) -> str:
    """A thought written into text as RLP lays one out (`rollout.branch_tokens`): `<think>` straight after the
    context's last word, the thought's words, `</think>` straight before the next word's space:
    `before<think> thought</think> after`; an empty thought is `before<think></think> after`."""
    return f"{before}<think>{' ' + thought if thought else ''}</think> {after}"


def with_aside(text: str, rng: random.Random, words: tuple[int, int] = ASIDE_WORDS) -> str:
    """`text` with an aside: after a word (not the first two, not before the last one: never at the answer),
    a thought that copies `words` (min, max; 0 is the empty thought) of the words before it (`thought_in_text`),
    then the text resumes as it was. Teaches a reader to go on after `</think>` as if the thought were not there,
    and gives `</think>` a place it is written."""
    text_words = text.split(" ")
    if len(text_words) < 4:
        return text
    at = rng.randint(2, len(text_words) - 2)
    n = rng.randint(*words)
    copied = text_words[max(0, at - n):at] if n else []
    return thought_in_text(" ".join(text_words[:at]), " ".join(copied), " ".join(text_words[at:]))


def generate_records(num_docs: int, seed: int, *, worked_fraction: float = 0.5,
                     think_fraction: float = 0.0, aside_fraction: float = 0.0,
                     aside_words: tuple[int, int] = ASIDE_WORDS) -> list[Document]:
    """Training documents with their kind, canonical key and whether the working is shown.

    think_fraction: share of problem documents whose working is shown as a thought at the answer
    position, `question The answer is<think> steps</think> answer.` (`thought_in_text`) -- the format RLP samples, as
    in web text that contains reasoning traces (a base model that never saw the markers cannot use
    them; see LESSONS.md). aside_fraction: share of the other documents given an aside (`with_aside`, of
    `aside_words` copied words).
    0 leaves the documents (and the random stream) unchanged.
    """
    rng, docs = random.Random(f"rlp_jax.corpus/train/{seed}"), []
    aside = (lambda d: dataclasses.replace(d, text=with_aside(d.text, rng, aside_words)) if rng.random() < aside_fraction
             else d) if aside_fraction > 0 else (lambda d: d)
    for _ in range(num_docs):
        kind = rng.choices(KINDS, weights=_DOC_WEIGHTS)[0]
        if kind == "descriptive":
            docs.append(aside(Document(kind, _descriptive(rng), None, False)))
            continue
        p = _MAKERS[kind](rng)
        while any(is_heldout_key(k) for k in p.subkeys):  # never train on an evaluation problem
            p = _MAKERS[kind](rng)
        if think_fraction > 0 and rng.random() < think_fraction:
            text = " ".join(x for x in (rng.choice(_PREAMBLES), p.question, EVAL_CUE) if x)
            docs.append(Document(kind, thought_in_text(text, p.worked, f"{p.answer}."), p.key, True, p))
            continue
        worked = rng.random() < worked_fraction
        cue = rng.choice(_CUES_WORKED if worked else _CUES_PLAIN)
        parts = [rng.choice(_PREAMBLES), p.question, p.worked if worked else "", f"{cue} {p.answer}."]
        docs.append(aside(Document(kind, " ".join(x for x in parts if x), p.key, worked, p)))
    return docs


def generate_documents(num_docs: int, seed: int, *, worked_fraction: float = 0.5,
                       think_fraction: float = 0.0, aside_fraction: float = 0.0,
                       aside_words: tuple[int, int] = ASIDE_WORDS) -> list[str]:
    """`num_docs` training texts, deterministic for `seed`; none contains a held-out problem."""
    return [d.text for d in generate_records(num_docs, seed, worked_fraction=worked_fraction,
                                             think_fraction=think_fraction, aside_fraction=aside_fraction,
                                             aside_words=aside_words)]


def generate_problems(num: int, seed: int) -> list[Problem]:
    """`num` distinct evaluation problems (kinds in rotation), all with held-out keys."""
    rng, out, seen = random.Random(f"rlp_jax.corpus/eval/{seed}"), [], set()
    for i in range(num):
        kind = PROBLEM_KINDS[i % len(PROBLEM_KINDS)]
        for _ in range(100_000):
            p = _MAKERS[kind](rng)
            if is_heldout_key(p.key) and p.key not in seen:
                break
        else:
            raise ValueError(f"could not find {num} distinct held-out problems")
        seen.add(p.key)
        out.append(Problem(p.kind, f"{p.question} {EVAL_CUE}", p.answer, p.worked, p.key, p.subkeys))
    return out


def build_corpus(out_dir, *, num_train_docs: int, num_eval_problems: int, seed: int = 0,
                 worked_fraction: float = 0.5, think_fraction: float = 0.0,
                 aside_fraction: float = 0.0, aside_words: tuple[int, int] = ASIDE_WORDS) -> dict[str, Path]:
    """Write `train.jsonl` ({"text"}) and `heldout.jsonl` ({"question", "answer", "kind", "text"})."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = generate_documents(num_train_docs, seed, worked_fraction=worked_fraction, think_fraction=think_fraction,
                               aside_fraction=aside_fraction, aside_words=aside_words)
    problems = generate_problems(num_eval_problems, seed)
    joined = "\n".join(train)
    leaked = [p.body for p in problems if p.body in joined]
    if leaked:  # impossible by construction; a cheap guard against future template edits
        raise AssertionError(f"held-out questions occur in the training split: {leaked[:3]}")
    paths = {"train": out_dir / "train.jsonl", "heldout": out_dir / "heldout.jsonl"}
    with open(paths["train"], "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in train)
    with open(paths["heldout"], "w") as f:
        f.writelines(json.dumps({"question": p.question, "answer": p.answer, "kind": p.kind,
                                 "text": f"{p.question} {p.answer}."}) + "\n" for p in problems)
    return paths
