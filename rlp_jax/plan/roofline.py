"""A compiled program's FLOPs and HBM bytes with every loop counted as many times as it runs, and the roofline
time they imply.

XLA's `cost_analysis()` counts the body of every `while` once (the layer scan, the micro-batch scan, the
sampler's token loop and its blockwise cache reads), so for a train step it is off by the product of the trip
counts. Here the compiled module (optimised HLO, as the target's compiler left it) is costed one computation at
a time by XLA's own HloCostAnalysis (`hlo_module_cost_analysis`; a computation is costed by making it the
module's entry), and each loop's body is multiplied by its trip count:

    corrected(X) = once(X) + sum over the loops w that X runs (not inside another loop of X)
                             of trips(w) * corrected(body(w)) - once(body(w))

A loop's trip count is XLA's own `known_trip_count` annotation where the backend writes one (XLA:CPU), else
read from its condition when it is `counter < constant` (XLA:TPU; scans, static fori_loops);
a loop whose count depends on the data (the sampler stops when every thought has ended; a cache read covers
the slots filled so far) is named by the `jax.named_scope` it was written under, or the function that wrote
it (the HLO's stack frames), and the caller says how many times it runs (`trips`). A loop no one can count is counted once and listed in `Costs.uncounted`.

Bytes are XLA's "bytes accessed" (operands and results of every top-level op, each fusion once) with dense
shape sizes: the TPU's (8, 128) tile padding is not in them, nor is time on the interconnect.
Shapes: none (scalars per program).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax


@dataclasses.dataclass(frozen=True)
class Cost:
    """FLOPs and bytes accessed (per device, as the program runs on one device of its mesh)."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.flops - other.flops, self.bytes - other.bytes)

    def __mul__(self, k: float) -> Cost:
        return Cost(self.flops * k, self.bytes * k)

    def seconds(self, peak_flops: float, bandwidth: float) -> float:
        """Roofline time: the larger of compute at `peak_flops` and memory traffic at `bandwidth`."""
        return max(self.flops / peak_flops, self.bytes / bandwidth)


@dataclasses.dataclass(frozen=True)
class Loop:
    """A `while` of the compiled module.

    name: the while instruction. body / parent: computations. scopes: its op name (jax's name stack: the
    `jax.named_scope`s it was written under, outermost first). functions: the Python functions that wrote it,
    innermost first (the module's stack frames; jax keeps only the innermost user frame by default).
    trips: the static trip count (XLA's `known_trip_count` where it annotates one, as XLA:CPU does, else
    `counter < constant` from a constant start), else None. bound: the constant the condition compares a counter with, when it has
    one (an upper bound on a data-dependent loop's trips). A static count assumes the counter starts at 0 (as
    jax writes every loop) when its start is not a constant the module shows.
    """

    name: str
    body: str
    parent: str
    scopes: tuple[str, ...]
    functions: tuple[str, ...]
    trips: int | None
    bound: int | None

    def written_as(self, *names: str) -> str | None:
        """Which of `names` the loop is: the named scope it was written directly under (`with
        jax.named_scope(name): lax.while_loop(...)`: its op name ends `name/while`), else the innermost function
        that wrote it (a plain name; the stack frames may qualify it); None when neither is one of `names`."""
        own = (self.scopes[-2] if len(self.scopes) >= 2 else None,
               self.functions[0].rsplit(".", 1)[-1] if self.functions else None)
        return next((n for n in own if n in names), None)


@dataclasses.dataclass(frozen=True)
class Costs:
    """A program's loop-corrected cost: `total`, and `by_loop[name]` the cost of all the runs of that loop
    (nested loops included) with `runs[name]` the number of times its body ran per program run."""

    total: Cost
    once: Cost                     # XLA's own count (every loop body once)
    by_loop: dict[str, Cost]
    runs: dict[str, float]
    uncounted: tuple[str, ...]     # loops counted once: no static trip count and `trips` gave none


_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) \(", re.MULTILINE)
_CALLS = re.compile(r"\b(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_WHILE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? while\(%([\w.\-]+)\), condition=%([\w.\-]+), "
                    r"body=%([\w.\-]+)(.*)$")
_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
# a collective that moves data between devices (synchronous, or the `-done` half of an asynchronous pair)
_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) (?:all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute|collective-broadcast)(?:-done)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8}


def _array_bytes(shape: str) -> int:
    """Bytes of an HLO result shape (an array or a tuple of arrays), dense."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += _ITEM_BYTES.get(dtype, 4) * n
    return total


def _computations(text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines (the module's text split at each computation's header)."""
    heads = list(_COMP.finditer(text))
    out = {}
    for i, h in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        out[h.group(2)] = text[h.end():end].split("\n")[1:]
    return out


def _stack_functions(text: str) -> dict[int, tuple[str, ...]]:
    """stack_frame_id -> the function names of that frame and its parents, innermost first."""
    def table(name: str) -> str:
        hit = re.search(rf"^{name}\n(.*?)(?:\n\n|\Z)", text, re.MULTILINE | re.DOTALL)
        return hit.group(1) if hit else ""

    functions = dict(re.findall(r'^(\d+) "(.*)"$', table("FunctionNames"), re.MULTILINE))
    locations = {int(i): int(f) for i, f in re.findall(r"^(\d+) \{.*?function_name_id=(\d+)", table("FileLocations"),
                                                        re.MULTILINE)}
    frames = {int(i): (int(loc), int(parent) if parent else 0)
              for i, loc, parent in re.findall(r"^(\d+) \{file_location_id=(\d+)(?: parent_frame_id=(\d+))?",
                                               table("StackFrames"), re.MULTILINE)}

    def chain(frame: int) -> tuple[str, ...]:
        names, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            loc, parent = frames[frame]
            names.append(functions.get(str(locations.get(loc, 0)), "?"))
            frame = parent
        return tuple(names)

    return {f: chain(f) for f in frames}


def _condition(lines: list[str]) -> tuple[int | None, int | None, bool]:
    """(the counter's tuple index, the constant it is compared with, whether `counter < constant` is the whole
    condition) of a while condition computation."""
    defs = {m.group(1): m.group(2) for line in lines if (m := _DEF.match(line))}
    constants = {n: int(v) for n, d in defs.items() if (v := _int_constant(d)) is not None}
    counters = {n: int(g.group(1)) for n, d in defs.items()
                if (g := re.search(r"get-tuple-element\(%[\w.\-]+\), index=(\d+)", d))}
    root = next((m.group(1) for line in lines if line.lstrip().startswith("ROOT ") and (m := _DEF.match(line))), None)
    for name, d in defs.items():
        cmp = re.search(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=LT", d)
        if cmp and cmp.group(1) in counters and cmp.group(2) in constants:
            return counters[cmp.group(1)], constants[cmp.group(2)], name == root
    return None, None, False


def _int_constant(definition: str) -> int | None:
    hit = re.match(r"[su]\d+\[\][^ ]* constant\((-?\d+)\)", definition)
    return int(hit.group(1)) if hit else None


def _start(parent: list[str], operand: str, index: int) -> int | None:
    """The constant the while's operand tuple holds at `index` (the counter's start), followed through copies
    and bitcasts; None when it is not a constant."""
    defs = {m.group(1): m.group(2) for line in parent if (m := _DEF.match(line))}
    tup = re.search(r"\btuple\((.*)\)", defs.get(operand, ""))
    if not tup:
        return None
    elements = [e.strip().lstrip("%") for e in re.sub(r"/\*index=\d+\*/", "", tup.group(1)).split(",")]
    value = elements[index] if index < len(elements) else ""
    for _ in range(8):
        definition = defs.get(value, "")
        if (k := _int_constant(definition)) is not None:
            return k
        hop = re.search(r"\b(?:copy|copy-start|copy-done|bitcast)\(%([\w.\-]+)\)", definition)
        if not hop:
            return None
        value = hop.group(1)
    return None


def _find_loops(comps: dict[str, list[str]], frames: dict[int, tuple[str, ...]]) -> dict[str, Loop]:
    """Every `while` of a module's computations (`_computations`), by instruction name."""
    loops = {}
    for parent, lines in comps.items():
        for line in lines:
            m = _WHILE.match(line)
            if not m:
                continue
            name, operand, cond, body, rest = m.groups()
            frame = re.search(r"stack_frame_id=(\d+)", rest)
            op_name = re.search(r'op_name="([^"]*)"', rest)
            known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)   # XLA:CPU/GPU annotate static loops
            index, bound, exact = _condition(comps.get(cond, []))
            if known:
                trips = int(known.group(1))
            elif exact:   # XLA:TPU does not annotate: `counter < constant`; jax's counters start at 0 when not shown
                trips = bound - (_start(lines, operand, index) or 0)
            else:
                trips = None
            loops[name] = Loop(name=name, body=body, parent=parent,
                               scopes=tuple(op_name.group(1).split("/")) if op_name else (),
                               functions=frames.get(int(frame.group(1)), ()) if frame else (), trips=trips, bound=bound)
    return loops


def _callees(lines: list[str]) -> set[str]:
    """Computations an instruction list calls other than as a loop body or condition (fusions, calls,
    conditional branches, reductions)."""
    out = set()
    for line in lines:
        if _WHILE.match(line):
            continue
        out.update(_CALLS.findall(line))
        for group in _BRANCHES.findall(line):
            out.update(c.strip().lstrip("%") for c in group.split(","))
    return out


class Program:
    """An HLO module's text (`compiled.as_text()`), costed loop by loop; each computation is costed once and
    reused, so asking for the costs under several trip-count rules is cheap."""

    def __init__(self, text: str):
        self.computations = _computations(text)
        self.loops = _find_loops(self.computations, _stack_functions(text))
        self.entry = re.search(r"^ENTRY %([\w.\-]+) ", text, re.MULTILINE).group(1)
        self._module = "HloModule costed\n" + text.split("\n", 1)[1].replace(f"\nENTRY %{self.entry} ",
                                                                             f"\n%{self.entry} ", 1)
        self._once: dict[str, Cost] = {}

    def once(self, comp: str) -> Cost:
        """XLA's HloCostAnalysis of computation `comp` run once (its loops' bodies counted once)."""
        if comp not in self._once:
            from jax._src.lib import xla_client
            from jaxlib import _hlo

            src = self._module.replace(f"\n%{comp} (", f"\nENTRY %{comp} (", 1)
            got = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client,
                                                           _hlo.hlo_module_from_text(src))
            self._once[comp] = Cost(float(got.get("flops", 0.0)), float(got.get("bytes accessed", 0.0)))
        return self._once[comp]

    def top_loops(self, comp: str) -> list[Loop]:
        """The loops `comp` runs directly or through the computations it calls, not inside another loop."""
        found, stack, seen = [], [comp], set()
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen.add(c)
            found += [lp for lp in self.loops.values() if lp.parent == c]
            stack += list(_callees(self.computations.get(c, [])))
        return found

    def collectives(self, comp: str) -> tuple[int, float]:
        """(collective ops, bytes of their results) of one run of `comp`: its own collectives (all-gather,
        all-reduce, ...), those of the computations it calls, and those of its loops, whose bytes count as many
        times as a static trip count says (once where there is none). Ops are counted once each."""
        ops, nbytes = 0, 0.0
        for line in self.computations.get(comp, []):
            hit = _COLLECTIVE.match(line)
            if hit:
                ops, nbytes = ops + 1, nbytes + _array_bytes(hit.group(1))
        for callee in _callees(self.computations.get(comp, [])):
            n, b = self.collectives(callee)
            ops, nbytes = ops + n, nbytes + b
        for lp in self.loops.values():
            if lp.parent == comp:
                n, b = self.collectives(lp.body)
                ops, nbytes = ops + n, nbytes + b * (lp.trips or 1)
        return ops, nbytes

    def costs(self, trips: Callable[[Loop], float | None] = lambda loop: None) -> Costs:
        """The loop-corrected cost; `trips(loop)` gives the trip count of a loop without a static one (None:
        count it once and list it in `uncounted`)."""
        by_loop: dict[str, Cost] = {}
        runs: dict[str, float] = {}
        uncounted = []

        def corrected(comp: str, times: float) -> Cost:
            cost = self.once(comp)
            for lp in self.top_loops(comp):
                n = lp.trips if lp.trips is not None else trips(lp)
                if n is None:
                    uncounted.append(lp.name)
                    n = 1
                runs[lp.name] = runs.get(lp.name, 0.0) + times * n
                inner = corrected(lp.body, times * n) * n
                by_loop[lp.name] = by_loop.get(lp.name, Cost()) + inner * times
                cost = cost + inner - self.once(lp.body)
            return cost

        total = corrected(self.entry, 1.0)
        return Costs(total=total, once=self.once(self.entry), by_loop=by_loop, runs=runs,
                     uncounted=tuple(dict.fromkeys(uncounted)))
