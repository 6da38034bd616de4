"""The compiler's verdict (`python -m rlp_jax.plan ... --compile`): the run's real train step, built as
`rlp_jax.train` builds it, AOT-compiled by XLA for compile-only devices of the target, on this host.

TPU: libtpu (`pip install -e ".[tpu]"`) gives compile-only devices of any v4 / v5p / v5e / v6e topology on a
CPU machine (`jax.experimental.topologies`), the way MaxText's train_compile.py uses them. The step is
lowered with abstract inputs (`StateLayout.restore_target`, a [B, L] batch sharded like training's) on a
mesh of those devices and compiled. The memory per device the run will need is what XLA:TPU's own check counts
before it accepts the program (`CompileReport`): arguments, outputs, code and the temporaries its buffer
assignment puts in HBM, read from the compile's dump. Not `memory_analysis()`'s temp size: that adds the
TensorCore's VMEM scratch and more, and the compiler accepts programs it puts over the chip's HBM.

The largest buffers come from XLA's own memory-usage report of the compile (its buffer assignment: each
allocation slot with the shapes that share it over the step), dumped to a temporary folder.

The step time is the compiled program's roofline with every loop counted as often as it runs
(`plan.roofline`): the sampler's token loop at the full thought length, each token's cache read over the slots
filled so far, the layer, micro-batch and block scans by their static counts. `StepRoofline` splits it into
sampling and the rest of the step, each at the larger of its compute time at the chip's peak and its HBM
traffic at the chip's bandwidth.

Not here yet (see the project's issues): GPU targets (jax's CUDA plugin with a target config).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlp_jax import sharding
from rlp_jax.model.blockwise import FILLED_SCOPE
from rlp_jax.plan import roofline
from rlp_jax.plan.devices import GIB, DeviceSpec
from rlp_jax.rlp.objective import Objective
from rlp_jax.rlp.rollout import SAMPLER_SCOPE
from rlp_jax.rlp.think_ids import ThinkIds
from rlp_jax.runs.config import ConfigError, RunConfig
from rlp_jax.train.optim import make_optimizer

# Our kind -> (libtpu topology prefix, chip config, dimensions of the chip grid)
TPU_TOPOLOGIES = {"v4": ("v4", "megacore", 3), "v5p": ("v5", "megacore", 3), "v5e": ("v5e", "default", 2),
                  "v6e": ("v6e", "default", 2)}


@dataclasses.dataclass(frozen=True)
class StepRoofline:
    """The compiled step's loop-corrected cost per device (`plan.roofline`), split into the sampler's token loop
    (`sampling`, run `tokens` times per step) and everything else (`rest`). `full_reads`: the sampler's cost
    had every token read the whole thought cache (the traffic a length-unaware sampler has)."""

    sampling: roofline.Cost
    rest: roofline.Cost
    tokens: float
    full_reads: roofline.Cost
    uncounted: tuple[str, ...] = ()     # loops counted once (no static trip count, not the sampler's)
    collectives: int = 0                # collective ops inside the token loop (`roofline.Program.collectives`)
    collective_bytes: float = 0.0       # bytes of their results per token step and device
    sampler_weights: str = "sharded"    # the setting the step was compiled with (`Numerics.sampler_weights`)

    def seconds(self, devices: DeviceSpec) -> tuple[float, float] | None:
        """(sampling, rest) roofline seconds on `devices` (None without a spec peak and bandwidth)."""
        if devices.peak_flops is None or devices.bandwidth is None:
            return None
        return (self.sampling.seconds(devices.peak_flops, devices.bandwidth),
                self.rest.seconds(devices.peak_flops, devices.bandwidth))


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Bytes per device of the compiled step against the chip's HBM, as XLA:TPU's own check before it accepts a
    program counts them ("Used X of Y hbm"): arguments + outputs - aliased + the temporaries its buffer assignment
    places in HBM + code. `memory_analysis()`'s temp size is larger (`analysis_temp_bytes`): it adds the
    TensorCore's VMEM/SMEM scratch and more that the check does not count. Measured with libtpu's HBM-size flag:
    the smoke step (HBM temporaries 24.1 MiB, memory_analysis 38.8 MiB) compiles under a 35 MiB chip and is
    refused under 27 MiB ("Used 34.27M of 27.00M hbm"); the issue's bar config (1.66 GiB against 2.21) compiles
    under 1850 MiB."""

    devices: DeviceSpec
    mesh: dict[str, int]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int            # temporaries in HBM (the buffer assignment's; memory_analysis's where none was dumped)
    code_bytes: int
    analysis_temp_bytes: int = 0     # memory_analysis().temp_size_in_bytes, for reference
    onchip_bytes: int = 0            # temporaries in the TensorCore's scratch memories (VMEM, SMEM), not HBM
    largest: tuple[tuple[int, str], ...] = ()     # (bytes, the shapes sharing that slot), largest first
    fingerprint: dict = dataclasses.field(default_factory=dict)   # what the step was compiled for (`train.aot`)
    tokenizer_read: bool = True                   # False: compiled with stand-in marker ids (`compile_objective`)
    roofline: StepRoofline | None = None

    @property
    def total(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def buffers(self) -> int:
        """The program's buffers (`total` without the executable's code): what the planner models."""
        return self.total - self.code_bytes

    @property
    def fits(self) -> bool:
        return self.devices.hbm_bytes is None or self.total <= self.devices.hbm_bytes


class OutOfMemory(Exception):
    """XLA refused to compile the step for the target: it needs more device memory than the chip has (the
    compiler's own message, one line, e.g. "the total memory required for HLO temporaries (5.70T) exceeds
    available HBM (95.74G)")."""


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """A TPU slice's chip grid: 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4 (3-D tori), and
    2x2, 2x4, 4x4, ... for the 2-D v5e / v6e."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"a TPU slice has a power-of-two number of chips, not {chips}")
    grid, i = [1] * dims, 0
    while math.prod(grid) < chips:
        if i < dims:     # 2x1x1, 2x2x1, 2x2x2 first
            grid[i] *= 2
        else:            # then the smallest dimension, the last of equals: 2x2x4, 2x4x4, 4x4x4, 4x4x8
            small = min(grid)
            grid[max(j for j, g in enumerate(grid) if g == small)] *= 2
        i += 1
    return tuple(grid)


def target_devices(devices: DeviceSpec) -> list:
    """Compile-only devices of `devices`' kind and count (a one-line ConfigError when that cannot be had here);
    for `cpu`, this host's CPU devices (what the trainer runs on here)."""
    if devices.kind == "cpu":
        cpus = jax.devices("cpu")
        if devices.chips > len(cpus):
            raise ConfigError(f"--devices asks for {devices.chips} CPU devices; this process has {len(cpus)} "
                              "(XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        return cpus[:devices.chips]
    if devices.kind not in TPU_TOPOLOGIES:
        raise ConfigError(f"--compile targets TPU slices (v4, v5p, v5e, v6e) and this host's cpu here; "
                          f"{devices.kind} is not one (GPU targets are not supported yet)")
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError("--compile needs libtpu for compile-only TPU devices: pip install -e '.[tpu]'")
    prefix, chip_config, dims = TPU_TOPOLOGIES[devices.kind]
    grid = chip_grid(devices.chips, dims)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{devices.kind}-{devices.chips}")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # compile-only: no chip is opened, another process may hold libtpu
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")   # one process, no pod: libtpu stops guessing workers
    from jax.experimental import topologies

    per_host = tuple(min(a, b) for a, b in zip((2, 2, 1), grid + (1,) * (3 - dims)))   # at most 2x2x1 chips a host
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{prefix}:{'x'.join(map(str, grid))}",
                                            chip_config_name=chip_config, chips_per_host_bounds=per_host,
                                            num_slices=1)
    except Exception as e:   # libtpu's own refusal of a topology
        raise ConfigError(f"libtpu cannot describe {devices.kind} with {devices.chips} chips "
                          f"({str(e).splitlines()[0]})") from None
    if len(topo.devices) != devices.chips:
        raise ConfigError(f"libtpu gave {len(topo.devices)} devices for {devices.chips} chips of {devices.kind}")
    return list(topo.devices)


def compile_objective(cfg: RunConfig, vocab_size: int) -> Objective:
    """The run's objective with stand-in marker ids, when its tokenizer cannot be read here (the ids change the
    program's constants, not its memory or FLOPs): no banned ids and no prompt (a prompted run's few hundred
    tokens of context are left out of the figures). An executable compiled so is refused by the trainer."""
    return Objective(rlp=cfg.rlp, ids=ThinkIds(start=vocab_size - 2, end=vocab_size - 1))


def compile_step(cfg: RunConfig, devices: DeviceSpec, mesh_sizes: dict[str, int], options: dict | None = None):
    """The run's train step (RLP or NTP, micro-batches as configured) lowered and compiled for `devices` on a
    (data, fsdp, tensor) mesh of `mesh_sizes`, with XLA compiler `options` if given (e.g.
    `{"xla_tpu_max_hbm_size_mib": N}`: compile for a chip with less HBM). Returns (the compiled executable,
    CompileReport); raises `OutOfMemory` when XLA refuses the step for the chip's memory."""
    from rlp_jax.runs.loading import model_config
    from rlp_jax.train import aot, train_step
    from rlp_jax.train.loop import objective_of, run_tokenizer, trained_model_config

    target = target_devices(devices)
    shape = tuple(mesh_sizes[a] for a in sharding.AXES)
    mesh = jax.sharding.Mesh(np.array(target).reshape(shape), sharding.AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
    try:   # the tokenizer's vocabulary (markers added) and ids, as the trainer will have them
        tokenizer = run_tokenizer(cfg)
    except (ConfigError, OSError, ValueError):   # not readable on this host: stand-ins (figures hardly change)
        tokenizer = None
    if tokenizer is None:
        mcfg = model_config(cfg.model)
        objective = compile_objective(cfg, mcfg.vocab_size)
    else:
        mcfg, objective = trained_model_config(cfg, tokenizer), objective_of(cfg, tokenizer)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    layout = train_step.state_layout(mcfg, optimizer, mesh, keep_reference=cfg.keeps_kl_reference)
    kw = dict(mesh=mesh, state_shardings=layout.shardings, micro_batches=cfg.train.micro_batches)
    step = (train_step.make_rlp_train_step(mcfg, objective, optimizer, **kw)
            if cfg.train.objective == "rlp"
            else train_step.make_ntp_train_step(mcfg, optimizer, **kw))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    batch = {k: jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32, sharding=rows)
             for k in ("tokens", "segment_ids", "positions")}
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
    lowered = step.lower(layout.restore_target(), batch, rng)
    with tempfile.TemporaryDirectory(prefix="rlp_compile_") as dump:
        compiled = compile_lowered(lowered, {**(options or {}), "xla_dump_to": dump, "xla_dump_hlo_pass_re": "^$"})
        largest = largest_buffers(Path(dump))
        spaces = temps_by_space(Path(dump))
    mem = compiled.memory_analysis()
    hbm_temp = spaces.pop(HBM_SPACE, 0) if spaces else mem.temp_size_in_bytes   # no dump read: XLA's analysis
    report = CompileReport(devices=devices, mesh=dict(mesh_sizes), argument_bytes=mem.argument_size_in_bytes,
                           output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                           temp_bytes=hbm_temp, code_bytes=mem.generated_code_size_in_bytes,
                           analysis_temp_bytes=mem.temp_size_in_bytes, onchip_bytes=sum(spaces.values()),
                           largest=largest,
                           fingerprint=aot.fingerprint(cfg, mcfg, objective.ids, platform=target[0].platform,
                                                       devices=len(target), mesh=dict(mesh_sizes)),
                           tokenizer_read=tokenizer is not None,
                           roofline=step_roofline(compiled.as_text(), cfg, mcfg.decode_block))
    return compiled, report


def compile_lowered(lowered, options: dict | None = None):
    """`lowered.compile(options)`, with XLA's refusal for the chip's memory as `OutOfMemory` (its one line)."""
    try:
        return lowered.compile(compiler_options=options or {})
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise OutOfMemory(str(e).splitlines()[0].split("RESOURCE_EXHAUSTED: ", 1)[-1]) from None


def step_roofline(hlo_text: str, cfg: RunConfig, decode_block: int) -> StepRoofline:
    """The loop-corrected cost of a compiled train step's HLO (`compiled.as_text()`): the sampler's token loop
    (`thought_rollout`) runs its whole thought length (it stops only when every thought of the batch has ended),
    each token's cache read (`attend_filled`) covers the blocks of `decode_block` slots filled so far. Also the
    collectives each token step runs (weights gathered at every token show up here)."""
    program = roofline.Program(hlo_text)
    slots = cfg.rlp.rollout.thought_len
    block = min(decode_block, slots)

    def role(loop: roofline.Loop) -> str | None:
        return loop.written_as(SAMPLER_SCOPE, FILLED_SCOPE)

    def trips(full: bool):
        def count(loop: roofline.Loop):
            if role(loop) == SAMPLER_SCOPE:
                return min(slots, loop.bound or slots)
            if role(loop) == FILLED_SCOPE:   # mean over the tokens of ceil(filled / block)
                return -(-slots // block) if full else sum(-(-f // block) for f in range(slots)) / slots
            return None
        return count

    costs, full = program.costs(trips(False)), program.costs(trips(True))
    sampler = [n for n, lp in program.loops.items() if role(lp) == SAMPLER_SCOPE]
    sampling = sum((costs.by_loop.get(n, roofline.Cost()) for n in sampler), roofline.Cost())
    moved = [program.collectives(program.loops[n].body) for n in sampler]
    return StepRoofline(sampling=sampling, rest=costs.total - sampling,
                        tokens=sum(costs.runs.get(n, 0.0) for n in sampler),
                        full_reads=sum((full.by_loop.get(n, roofline.Cost()) for n in sampler), roofline.Cost()),
                        uncounted=costs.uncounted, collectives=sum(n for n, _ in moved),
                        collective_bytes=sum(b for _, b in moved), sampler_weights=cfg.model.sampler_weights)


HBM_SPACE = "default"     # XLA:TPU's memory space 0; the others (vmem, smem, ...) are on the TensorCore
_TEMP = re.compile(r"^allocation \d+: size (\d+),(?: color (\d+),)? preallocated-temp", re.M)
_SPACE = re.compile(r"^Memory Space: (\S+) \(color=(\d+)\)", re.M)


def _step_file(dump: Path, suffix: str) -> str | None:
    """The text of the dump's largest file ending in `suffix` (XLA:TPU writes one per module; the step's is the
    largest), or None when the compiler wrote none."""
    files = sorted(dump.glob(f"*{suffix}"), key=lambda f: f.stat().st_size)
    return files[-1].read_text() if files else None


def temps_by_space(dump: Path) -> dict[str, int]:
    """Bytes of the step's preallocated temporaries in each memory space, from the XLA dump's buffer assignment
    (memory spaces named as its memory-usage report names them: "default" is HBM, "vmem" / "smem" the
    TensorCore's scratch memories). Empty when the compiler wrote no buffer assignment."""
    assignment = _step_file(dump, "after_optimizations-buffer-assignment.txt")
    if assignment is None:
        return {}
    names = {"0": HBM_SPACE, **{color: name for name, color in _SPACE.findall(
        _step_file(dump, "memory-usage-report.txt") or "")}}
    spaces: dict[str, int] = {}
    for size, color in _TEMP.findall(assignment):
        name = names.get(color or "0", f"color {color}")
        spaces[name] = spaces.get(name, 0) + int(size)
    return spaces


_SLOT = re.compile(r"^\s*[\d.]+\w*\(\s*\d+%\);\s*([\d.]+)(B|KiB|MiB|GiB);\s*\d+;\s*\d+;\s*(.*)$")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def largest_buffers(dump: Path, top: int = 6) -> tuple[tuple[int, str], ...]:
    """The `top` largest slots of device memory from the XLA dump's memory-usage report of the step (TPU's
    compiler writes one per module): (bytes, the shapes of the values that share the slot). Empty when the
    compiler wrote none."""
    report = _step_file(dump, "memory-usage-report.txt")
    if report is None:
        return ()
    slots = []
    for line in report.split("Memory Space:")[1].splitlines():   # the default (HBM) space
        hit = _SLOT.match(line)
        if hit:
            slots.append((round(float(hit.group(1)) * _UNITS[hit.group(2)]), hit.group(3).strip()))
    return tuple(sorted(slots, key=lambda x: -x[0])[:top])


def format_verdict(report: CompileReport, planned_bytes: float, device_text: str,
                   model_flops: float | None = None) -> str:
    """The report's lines; the last is `compiled for <devices>: XLA <x> GiB/device, planner <y> GiB/device,
    fits|does not fit`. `model_flops`: the planner's FLOPs of one step per device, for the implied MFU."""
    hbm = "" if report.devices.hbm_bytes is None else f" of {report.devices.hbm_bytes / GIB:.1f} GiB HBM"
    return "\n".join([
        f"XLA memory per device{hbm}: arguments {report.argument_bytes / GIB:.3f} GiB, outputs "
        f"{report.output_bytes / GIB:.3f} (aliased {report.alias_bytes / GIB:.3f}), temporaries "
        f"{report.temp_bytes / GIB:.3f}, code {report.code_bytes / GIB:.3f}"
        + (f"; besides, {report.onchip_bytes / 2**20:.1f} MiB in the TensorCore's VMEM/SMEM (memory_analysis's "
           f"temp size, which counts them and more: {report.analysis_temp_bytes / GIB:.3f} GiB)"
           if report.onchip_bytes else ""),
        *(["largest buffers (XLA's buffer assignment; shapes sharing each slot):"] +
          [f"  {_size(size)}  {_short(shapes)}" for size, shapes in report.largest] if report.largest else []),
        *(_roofline_lines(report.roofline, report.devices, model_flops, report.mesh.get("fsdp", 1))
          if report.roofline else []),
        f"planner / XLA: {planned_bytes / max(report.total, 1):.2f} (XLA's buffers without its code: "
        f"{planned_bytes / max(report.buffers, 1):.2f})",
        f"compiled for {device_text}: XLA {report.total / GIB:.3f} GiB/device, planner {planned_bytes / GIB:.3f} "
        f"GiB/device, {'fits' if report.fits else 'does not fit'}",
    ])


def format_refusal(reason: str, planned_bytes: float, device_text: str) -> str:
    """The lines for a step XLA refused (`OutOfMemory`); the last is the verdict line, `... does not fit`."""
    return "\n".join([f"XLA refused to compile the step: {reason}",
                      f"compiled for {device_text}: XLA refused (out of memory), planner {planned_bytes / GIB:.3f} "
                      "GiB/device, does not fit"])


def _roofline_lines(r: StepRoofline, devices: DeviceSpec, model_flops: float | None, fsdp: int) -> list[str]:
    """The roofline's lines; the hint to gather the sampling weights once only where they are fsdp-sharded."""
    rest = f"rest of the step: {r.rest.flops:.3g} FLOP, {_traffic(r.rest.bytes)} of HBM traffic per device"
    lines = ["compiled step, every loop counted (plan.roofline; HBM bytes without TPU tile padding):"]
    if r.tokens:
        per, full = r.sampling * (1 / r.tokens), r.full_reads * (1 / r.tokens)
        lines.append(f"  sampling: {r.tokens:.0f} token steps, each {per.flops:.3g} FLOP and {_traffic(per.bytes)} "
                     f"of HBM traffic per device on average (reading the whole thought cache every token: "
                     f"{_traffic(full.bytes)}, {full.bytes / max(per.bytes, 1):.1f}x)")
        if r.collectives:
            hint = ("; model.sampler_weights=gathered gathers the fsdp-sharded weights once, before the loop"
                    if r.sampler_weights == "sharded" and fsdp > 1 else "")
            lines.append(f"  inside the token loop: {r.collectives} collective ops, {_traffic(r.collective_bytes)} "
                         f"of results per token step and device{hint}")
    seconds = r.seconds(devices)
    if seconds is None:
        lines.append(f"  {rest}")
    else:
        sample_s, rest_s = seconds
        if r.tokens:
            lines[1] += f": {sample_s:.3g} s"       # the sampling line
        lines.append(f"  {rest}: {rest_s:.3g} s")
        implied = None if model_flops is None else model_flops / ((sample_s + rest_s) * devices.peak_flops)
        mfu = "" if implied is None else f"; model FLOPs / (time x peak) = {100 * implied:.1f}% MFU"
        lines.append(f"  step time at the roofline ({devices.peak_flops / 1e12:.0f} TFLOP/s, "
                     f"{devices.bandwidth / 1e9:.0f} GB/s per device): {sample_s + rest_s:.3g} s{mfu}")
    if r.uncounted:
        lines.append(f"  note: {len(r.uncounted)} loop(s) with a data-dependent trip count counted once: "
                     f"{', '.join(r.uncounted)}")
    return lines


def _traffic(nbytes: float) -> str:
    return f"{nbytes / 1e12:.3g} TB" if nbytes >= 1e12 else f"{nbytes / 1e9:.3g} GB"


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:8.3f} GiB" if nbytes >= GIB / 4 else f"{nbytes / 2**20:8.1f} MiB"


def _short(shapes: str, width: int = 100) -> str:
    return shapes if len(shapes) <= width else shapes[:width - 3] + "..."
