"""`python -m rlp_jax.plan --compile`: the run's real train step compiled by XLA:TPU for compile-only devices
of a v5p-8 slice on this CPU host (libtpu), with the splash attention kernel lowered for the target, and the
hybrid family's step; the verdict line."""

import importlib.util
import math

import pytest

from rlp_jax.plan.compile import chip_grid, compile_step, format_verdict
from rlp_jax.plan.devices import device_spec, parse_mesh
from rlp_jax.plan.estimate import plan
from rlp_jax.runs.config import (
    ConfigError,
    apply_overrides,
    load_experiment,
    recipe_config,
)

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu extra)")


def _cfg(*sets):
    return apply_overrides(recipe_config(load_experiment("smoke")), list(sets))


def test_chip_grids_are_the_slices_tori():
    assert [chip_grid(n, 3) for n in (4, 8, 16, 32, 64, 128)] == [(2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4),
                                                             (4, 4, 8)]
    assert [chip_grid(n, 2) for n in (4, 8, 16, 32)] == [(2, 2), (2, 4), (4, 4), (4, 8)]
    with pytest.raises(ConfigError, match="power-of-two"):
        chip_grid(6, 3)


@needs_libtpu
def test_rlp_step_with_splash_attention_compiles_for_v5p_8():
    cfg = _cfg("model.attention=kernel", "data.seq_len=128", "model.compute_dtype=bfloat16",
               "rlp.rollout.thought_len=160")   # two blocks of the thought cache (`blockwise.DECODE_BLOCK`)
    devices = device_spec("v5p-8")
    mesh = parse_mesh("data=2,fsdp=2", devices.chips)
    compiled, report = compile_step(cfg, devices, mesh)
    planned = plan(cfg, devices, mesh)
    text = compiled.as_text()
    assert "tpu_custom_call" in text            # the Pallas splash kernel, lowered by Mosaic for the TPU
    assert 0 < report.total < devices.hbm_bytes and report.fits
    assert report.largest and all(0 < size <= report.temp_bytes for size, _ in report.largest)
    assert [size for size, _ in report.largest] == sorted((size for size, _ in report.largest), reverse=True)
    assert abs(planned.total / report.total - 1) < 0.15      # the planner within 15% of XLA:TPU's HBM (1.08)
    # the verdict counts HBM as XLA:TPU's own check does: under a chip with 2 MiB more HBM than the verdict's
    # total the step compiles, though memory_analysis's temp size (VMEM scratch and more) would not fit there
    limit = math.ceil(report.total / 2**20) + 2
    assert report.total - report.temp_bytes + report.analysis_temp_bytes > limit * 2**20
    assert report.onchip_bytes > 0
    _, limited = compile_step(cfg, devices, mesh, options={"xla_tpu_max_hbm_size_mib": limit})
    assert limited.total <= limit * 2**20
    # the roofline: the sampler ran 160 token steps, each reading the cache up to its last filled block (less
    # than reading both blocks every token); executed FLOPs are the model's plus the remat recompute
    r = report.roofline
    assert r.tokens == 160 and not r.uncounted
    assert r.sampling.flops < r.full_reads.flops and r.sampling.bytes < r.full_reads.bytes
    model_flops = planned.step_flops / devices.chips
    assert model_flops < r.sampling.flops + r.rest.flops < 2.5 * model_flops
    lines = format_verdict(report, planned.total, "v5p-8", model_flops=model_flops).splitlines()
    assert any(x.startswith("  step time at the roofline") and x.endswith("% MFU") for x in lines)
    # sampler_weights=sharded on an fsdp mesh: the token loop gathers weights at every token, and says so
    assert r.sampler_weights == "sharded" and r.collectives > 0 and r.collective_bytes > 0
    (sampling,) = [x for x in lines if x.startswith("  sampling: ")]
    assert sampling.endswith(" s")
    assert any(x.startswith("  inside the token loop: ") and x.endswith("once, before the loop") for x in lines)
    assert lines[-1].startswith("compiled for v5p-8: XLA ") and lines[-1].endswith(", fits")


@needs_libtpu
def test_hybrid_step_keeps_its_rows_sharded_and_its_remat_on_a_pod():
    """The hybrid's step compiles for v5p slices. With the same rows per chip, a 4x larger slice and batch need the
    same temporaries per chip: no array holds the global batch on every chip (without the residual stream's
    sharding constraints XLA did that: 68 -> 120 MB here by memory_analysis, and the 12B recipe asked for 5.7 TB).
    And remat full needs less than remat none (its blocks are a Python loop: without `prevent_cse` XLA merged each
    recomputation with the forward, and remat full needed more: 60 against 55 MB by memory_analysis). HBM
    temporaries now: 28.7 (v5p-8) and 30.4 MB (v5p-32) at remat full, 41.6 MB at remat none."""
    temps = {}
    for slice_name, rows, remat in (("v5p-8", 4, "none"), ("v5p-8", 4, "full"), ("v5p-32", 16, "full")):
        cfg = _cfg("model.preset=nemotron-h-tiny", "data.seq_len=256", "rlp.rollout.thought_len=64",
                   f"data.batch_size={rows}", f"model.remat={remat}")
        devices = device_spec(slice_name)
        _, report = compile_step(cfg, devices, parse_mesh(f"fsdp={devices.chips}", devices.chips))
        assert report.fits
        temps[slice_name, remat] = report.temp_bytes
    assert temps["v5p-32", "full"] < 1.15 * temps["v5p-8", "full"], temps
    assert temps["v5p-8", "full"] < 0.9 * temps["v5p-8", "none"], temps


@needs_libtpu
def test_hybrid_planner_agrees_with_xla_tpu_buffers():
    """The hybrid planner's total within 15% of the buffers XLA:TPU places in HBM (its total without the code) for a
    remat-none RLP step on v5p-8, 4 rows per chip, of the hybrid whose widths fill TPU tiles (`M*-`): the planner's
    count of its arrays is checked, not the padding of the tiny preset's 16-wide chunks. The count is of what
    XLA:TPU keeps across blocks (a Mamba block's saved set read from XLA:TPU, not XLA:CPU's; `hybrid_costs`). Not
    against the total: XLA's code (35 MiB here) is not modelled. Measured 1.05; with XLA:CPU's saved set the
    planner said 1.44."""
    cfg = _cfg("model.preset=nemotron-h-tiny-aligned", "data.seq_len=256", "rlp.rollout.thought_len=64",
               "data.batch_size=16", "model.remat=none")
    devices = device_spec("v5p-8")
    mesh = parse_mesh("fsdp=4", devices.chips)
    _, report = compile_step(cfg, devices, mesh)
    planned = plan(cfg, devices, mesh)
    assert report.fits and planned.activations["loss"] > 10 * planned.state["params"]
    assert abs(planned.total / report.buffers - 1) < 0.15, (planned.total / 2**20, report.buffers / 2**20)


@needs_libtpu
def test_a_step_larger_than_the_chip_is_a_verdict_not_a_traceback():
    """XLA:TPU refuses a program that needs more HBM than a v5p chip has; `compile_lowered` turns the refusal
    into `OutOfMemory` (the compiler's one line), and the verdict line says it does not fit."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from rlp_jax.plan.compile import OutOfMemory, compile_lowered, format_refusal, target_devices

    mesh = jax.sharding.Mesh(target_devices(device_spec("v5p-8"))[:1], ("x",))
    rows = jax.ShapeDtypeStruct((400_000, 128), jnp.float32, sharding=NamedSharding(mesh, P()))
    lowered = jax.jit(lambda a: jnp.tanh(a @ a.T)).lower(rows)           # a 640 GB product
    with pytest.raises(OutOfMemory, match="exceeds available HBM") as refused:
        compile_lowered(lowered)
    lines = format_refusal(str(refused.value), 1.5 * 2**30, "v5p-8").splitlines()
    assert "\n" not in str(refused.value) and lines[0].startswith("XLA refused to compile the step: ")
    assert lines[-1] == "compiled for v5p-8: XLA refused (out of memory), planner 1.500 GiB/device, does not fit"


def test_a_gpu_target_is_a_one_line_refusal():
    with pytest.raises(ConfigError, match="TPU slices"):
        compile_step(_cfg(), device_spec("h100x8"), {"data": 8, "fsdp": 1, "tensor": 1})


def test_compile_only_device_kinds_are_known():
    from rlp_jax.plan.devices import kind_of_jax_device

    assert kind_of_jax_device("TPU v5") == "v5p" and kind_of_jax_device("TPU v5p") == "v5p"
    assert kind_of_jax_device("TPU v5 lite") == "v5e" and kind_of_jax_device("NVIDIA H100 80GB HBM3") == "h100"
