"""`rlp_jax.plan.roofline`: a compiled program's FLOPs with every loop counted as often as it runs, checked
against hand counts of matmul programs (XLA's own `cost_analysis` counts each loop body once)."""

import jax
import jax.numpy as jnp
import pytest

from rlp_jax.plan.roofline import Cost, Program

M, K = 64, 128
MATMUL = 2 * M * K * K          # FLOPs of one [M, K] x [K, K] product


def _program(fn, *shapes) -> Program:
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return Program(jax.jit(fn).lower(*args).compile().as_text())


def _scan(x, w, n):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=n)[0]


def test_a_scan_counts_its_body_once_per_trip():
    program = _program(lambda x, w: _scan(x, w, 7), (M, K), (K, K))
    costs = program.costs()
    assert costs.once.flops == pytest.approx(MATMUL, rel=0.01)          # XLA: the body once
    assert costs.total.flops == pytest.approx(7 * MATMUL, rel=0.01)
    (loop,) = program.loops.values()
    assert loop.trips == 7 and costs.runs[loop.name] == 7 and not costs.uncounted
    body = program.once(loop.body).bytes
    assert body >= (2 * M * K + K * K) * 4                              # reads c and w, writes c @ w
    assert costs.by_loop[loop.name].bytes == pytest.approx(7 * body)
    assert costs.total.bytes == pytest.approx(costs.once.bytes + 6 * body)


def test_nested_loops_multiply_and_loop_free_code_is_xlas_count():
    def fn(x, w):
        y = x @ w                                                          # once, outside the loops
        return jax.lax.scan(lambda c, _: (_scan(c, w, 3), None), y, None, length=5)[0]

    costs = _program(fn, (M, K), (K, K)).costs()
    assert costs.total.flops == pytest.approx((1 + 5 * 3) * MATMUL, rel=0.01)
    assert sorted(costs.runs.values()) == [5, 15]


def test_a_data_dependent_loop_is_counted_once_unless_its_trips_are_given():
    def stops_on_data(x, w, limit):
        def body(s):
            i, c = s
            return i + 1, c @ w

        return jax.lax.while_loop(lambda s: (s[0] < limit[0]) & (s[1].sum() < 1e30), body, (0, x))[1]

    program = Program(jax.jit(stops_on_data).lower(jax.ShapeDtypeStruct((M, K), jnp.float32),
                                                   jax.ShapeDtypeStruct((K, K), jnp.float32),
                                                   jax.ShapeDtypeStruct((1,), jnp.int32)).compile().as_text())
    (loop,) = program.loops.values()
    assert loop.trips is None and loop.written_as("stops_on_data") == "stops_on_data"   # the function that wrote it
    once = program.costs()
    assert once.uncounted == (loop.name,) and once.total.flops == pytest.approx(MATMUL, rel=0.01)
    given = program.costs(lambda lp: 4.5 if lp.written_as("stops_on_data") else None)
    assert given.total.flops == pytest.approx(4.5 * MATMUL, rel=0.01) and not given.uncounted


def test_roofline_seconds_is_the_slower_of_compute_and_memory():
    assert Cost(flops=2e12, bytes=1e9).seconds(1e12, 1e12) == 2.0
    assert Cost(flops=1e9, bytes=3e12).seconds(1e12, 1e12) == 3.0
    assert (Cost(1.0, 2.0) * 3 + Cost(1.0, 1.0) - Cost(0.5, 0.5)) == Cost(3.5, 6.5)


def test_a_loop_is_named_by_the_scope_it_was_written_directly_under():
    """`with jax.named_scope(name): lax.while_loop(...)` names that loop, not the loops inside its body."""
    def fn(x, w, limit):
        def body(s):
            i, c = s
            return i + 1, _scan(c, w, 3)

        with jax.named_scope("token_loop"):
            return jax.lax.while_loop(lambda s: (s[0] < limit[0]) & (s[1].sum() < 1e30), body, (0, x))[1]

    program = Program(jax.jit(fn).lower(jax.ShapeDtypeStruct((M, K), jnp.float32),
                                        jax.ShapeDtypeStruct((K, K), jnp.float32),
                                        jax.ShapeDtypeStruct((1,), jnp.int32)).compile().as_text())
    named = {lp.trips: lp.written_as("token_loop") for lp in program.loops.values()}
    assert named == {None: "token_loop", 3: None}
    costs = program.costs(lambda lp: 10 if lp.written_as("token_loop") else None)
    assert costs.total.flops == pytest.approx(30 * MATMUL, rel=0.01)


def test_a_fori_loop_around_a_scan_is_counted_on_every_backend_form():
    """XLA:CPU wraps a loop's compare in a fusion and annotates the trip count; both loops are counted."""
    def fn(x, w):
        return jax.lax.fori_loop(0, 5, lambda i, c: _scan(c, w, 3), x)

    program = _program(fn, (M, K), (K, K))
    assert sorted(lp.trips for lp in program.loops.values()) == [3, 5]
    assert program.costs().total.flops == pytest.approx(15 * MATMUL, rel=0.01)
