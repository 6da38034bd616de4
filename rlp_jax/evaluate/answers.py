"""Answer extraction and scoring for evaluation: pure string functions, no model, no task files.

Where the final answer of a completion is looked for, in order (`extract_math`, `extract_number`):
    1. the content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces, so nested `\\frac{1}{2}`)
    2. the text after the first answer cue: "The answer is", "The final answer is", "####", "Answer:",
       "Final answer:" (case-insensitive), up to the end of its line or sentence. The *first* cue, because
       a base model that has answered tends to go on with a new made-up question and its own cue.
    3. the last number in the text.
`extract_number` reduces the result to a canonical number string: "1,234" -> "1234", "$12.50" -> "12.5",
"50%" -> "50", "-0" -> "0", "3.50" -> "3.5", "3/4" stays "3/4", "\\frac{3}{4}" / "\\dfrac{3}{4}" -> "3/4".
`extract_math` keeps a LaTeX expression as it is ("\\frac{\\sqrt{3}}{2}", "(1, 2)", "Ana") and reduces only
a plain number with an optional unit ("14 apples", "$12.50") to its number.

`extract_choice` finds a letter A..J (MMLU-Pro has up to 10 options) from, in order: "answer is (B)" /
"Answer: B", "(B)", a line starting "B)" / "B." / "B", then any lone capital letter - where "A" and "I"
followed by a lowercase word are read as the English words, not as options.

`math_equal(pred, gold)`: exact match after `normalize_answer` (cheap, catches most cases), else
`math_verify.verify(parse(gold), parse(pred))` with both strings wrapped in `$...$` (math-verify's LaTeX
extractor needs the delimiters for "\\frac{1}{2}", "\\pi", "x^2+1"). math-verify times out with
`signal.alarm`, which works only in the main thread: there the timeout is `timeout_s`; in other
threads it is disabled (math-verify then logs a one-time warning). Errors and timeouts count as not
equal. A one-word gold answer ("Ana", "Monday") is compared exactly only: math-verify would read it as a
product of symbols, so "Ana" would equal "Naa".
"""
from __future__ import annotations

import math
import re
import threading
from decimal import Decimal, InvalidOperation

import math_verify

CHOICE_LETTERS = "ABCDEFGHIJ"

# A number: optional sign (not after a word character, so "5-3" gives 5 and 3), thousands commas,
# decimals, an optional "/denominator".
_NUM = r"(?:(?<![\w.])[-+])?(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])-?\.\d+"
_NUM_RE = re.compile(_NUM)
_CUE_RE = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|####|(?:final\s+)?answer\s*:)\s*:?", re.IGNORECASE)
_SPAN_END_RE = re.compile(r"\.(?:\s|$)|\n|$")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?[\d.,]+)\s*\}\s*\{\s*([\d.,]+)\s*\}")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
# A plain number with an optional currency sign before and a percent sign or unit words after.
_UNIT_NUM_RE = re.compile(rf"(?:\\?\$\s*)?({_NUM})(?:\s*\\?%|\s+[A-Za-z][A-Za-z ]*)?")
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z ]+")


def canonical_number(s: str) -> str:
    """A number string in canonical form: '1,234' -> '1234', '3.50' -> '3.5', '-0' -> '0', '+7' -> '7',
    '06/8' -> '6/8' (each part of a fraction, not reduced); not a number -> unchanged."""
    if "/" in s:
        num, den = s.split("/", 1)
        return f"{canonical_number(num)}/{canonical_number(den)}"
    try:
        d = Decimal(s.replace(",", ""))
    except InvalidOperation:
        return s
    return "0" if d == 0 else format(d.normalize(), "f")


def _latex_numbers(text: str) -> str:
    """Rewrite the LaTeX forms of numbers as plain text: \\frac{3}{4} -> 3/4, \\$ -> $, 1{,}234 -> 1,234."""
    text = _FRAC_RE.sub(r"\1/\2", text.replace("\u2212", "-"))
    return text.replace("{,}", ",").replace("\\!", "").replace("\\$", "$").replace("\\%", "%")


def _last_number(text: str) -> str | None:
    found = _NUM_RE.findall(_latex_numbers(text))
    return canonical_number(found[-1]) if found else None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` whose braces balance (also `\\boxed 5`), or None."""
    for m in reversed(list(_BOX_RE.finditer(text))):
        i = m.end()
        if text.startswith("{", i):
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j].strip()
        elif m.end() > m.start() + len(m.group().rstrip()):  # "\boxed 5": a space, then one token
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group()
    return None


def _answer_span(text: str) -> str | None:
    """The raw final-answer text: the last boxed content, else the rest of the first cue's sentence."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    cue = _CUE_RE.search(text)
    if cue is None:
        return None
    rest = text[cue.end():]
    return rest[:_SPAN_END_RE.search(rest).start()].strip()


def _strip_delimiters(span: str) -> str:
    span = span.strip().rstrip(".").strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
        if span.startswith(left) and span.endswith(right) and len(span) >= len(left) + len(right):
            span = span[len(left):len(span) - len(right)].strip()
    return span.rstrip(".").strip()


def extract_number(text: str) -> str | None:
    """The final numeric answer of `text` (see the module docstring for the order), canonical, or None."""
    span = _answer_span(text)
    if span is not None:
        number = _last_number(span)
        if number is not None:
            return number
    return _last_number(text)


def extract_math(text: str) -> str | None:
    """The final answer of `text` as an expression (LaTeX kept, plain numbers canonical), or None."""
    span = _answer_span(text)
    if span is None or not _strip_delimiters(span):
        return _last_number(text)
    span = _strip_delimiters(span)
    plain = _TEXT_RE.sub(r" \1", _latex_numbers(span)).strip()
    unit_num = _UNIT_NUM_RE.fullmatch(plain)
    return canonical_number(unit_num.group(1)) if unit_num else span


def extract_choice(text: str, num_choices: int) -> str | None:
    """The option letter chosen in `text`, one of the first `num_choices` of A..J, or None."""
    if not 1 <= num_choices <= len(CHOICE_LETTERS):
        raise ValueError(f"num_choices must be in 1..{len(CHOICE_LETTERS)}, got {num_choices}")
    c = f"[{CHOICE_LETTERS[:num_choices]}]"
    patterns = (
        rf"(?i:answer)\s*(?:(?i:is)|:)?\s*:?\s*(?:\*\*)?\(?({c})\)?(?!\w)",  # "the answer is (B)", "Answer: B"
        rf"\(({c})\)",  # "(B)"
        rf"^\s*({c})(?:[).:]|\s*$)",  # a line "B)", "B.", "B"
        rf"(?<![\w'])(?:(?![AI]\s+[a-z])({c}))(?![\w'])",  # a lone letter, not the word "A" or "I"
    )
    for p in patterns:
        m = re.search(p, text, re.MULTILINE)
        if m:
            return m.group(1)
    return None


def normalize_answer(s: str) -> str:
    """A canonical string for exact comparison: a plain number (with optional currency sign, percent sign
    or unit words) -> its canonical number; else no $ / \\( \\) / spacing / \\left, \\text{x} -> x,
    \\dfrac -> \\frac, lowercase."""
    s = _TEXT_RE.sub(r" \1", _latex_numbers(_strip_delimiters(s))).strip()
    unit_num = _UNIT_NUM_RE.fullmatch(s)
    if unit_num:
        return canonical_number(unit_num.group(1))
    for tok in ("\\left", "\\right", "\\,", "\\;", "\\ ", "\\displaystyle"):
        s = s.replace(tok, "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def _wrap(s: str) -> str:
    return s if "$" in s else f"${s}$"


def math_equal(pred: str | None, gold: str, *, timeout_s: int = 5) -> bool:
    """True iff `pred` is the same answer as `gold`: exact after `normalize_answer`, else math-verify.

    `timeout_s` bounds each math-verify parse and comparison in the main thread (signal based); off the
    main thread there is no timeout. Exceptions and timeouts give False.
    """
    if pred is None or not pred.strip():
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p == g:
        return True
    if _WORD_RE.fullmatch(_TEXT_RE.sub(r"\1", _strip_delimiters(gold)).strip()):  # a name or word: exact only
        return False
    t = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = math_verify.parse(_wrap(gold), parsing_timeout=t)
        pred_parsed = math_verify.parse(_wrap(pred), parsing_timeout=t)
        if not (gold_parsed and pred_parsed):
            return False
        return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=t))
    except Exception:  # noqa: BLE001 - math-verify's TimeoutException and parser errors are all "not equal"
        return False


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, eq. 1): 1 - C(n-c, k) / C(n, k), for n samples of which c are
    correct, computed as a product so large n does not overflow."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
