"""Device mesh and logical-axis sharding rules (MaxText style: the rules are data).

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters,
EMA and optimizer state sharded), `tensor` (heads / MLP / vocab split inside a layer). Every parameter
axis has a logical name (`rlp_jax.model.dense.transformer.param_logical_axes`); `RULES` maps names to mesh axes. A
logical axis whose size does not divide by its mesh axes is replicated instead (a tiny model on a big
mesh still runs). Activations are constrained by name inside the model through `constrain`, a no-op
unless JAX's abstract mesh is set while tracing (`jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`
inside the jitted function, or `jax.set_mesh(mesh)` around the call; the train step does the former).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None: replicated)
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": None, "norm": None, "head_dim": None, "length": None, "branch": None,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) mesh axes; one of them may be -1 (= all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes must be positive with at most one -1, got data={self.data} "
                             f"fsdp={self.fsdp} tensor={self.tensor}")

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """The one `--mesh` syntax of every command: `data=2,fsdp=4` (axes data, fsdp, tensor; -1 = the rest).
        Omitted axes are 1, except that when no axis is -1 the first omitted of data, fsdp takes the rest
        (`fsdp=4` on 8 devices is data=2 x fsdp=4; `data=2` is data=2 x fsdp=4). ValueError (one line)
        on anything else."""
        sizes: dict[str, int] = {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            key, sep, value = (x.strip() for x in item.partition("="))
            if not sep or key not in AXES or not value.lstrip("-").isdigit() or key in sizes:
                raise ValueError(f"--mesh {text!r}: expected axis=size with axes {', '.join(AXES)} each at most "
                                 "once, e.g. data=2,fsdp=4 (-1: the rest)")
            sizes[key] = int(value)
        if -1 not in sizes.values():
            rest = next((a for a in ("data", "fsdp") if a not in sizes), None)
            if rest is not None:
                sizes[rest] = -1
        try:
            return cls(**{a: sizes.get(a, 1) for a in AXES})
        except ValueError as e:
            raise ValueError(f"--mesh {text!r}: {e}") from None

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh: {num_devices} devices do not divide by the fixed axes (product {known})")
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(f"mesh data*fsdp*tensor = {int(np.prod(sizes))} but {num_devices} devices are "
                             "present; set one axis to -1 to use the rest")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), laid out by jax.make_mesh."""
    devices = jax.devices() if devices is None else devices
    shape = cfg.resolve(len(devices))
    # Auto axes: GSPMD propagates shardings from the annotated inputs and the `constrain` hints.
    return jax.make_mesh(shape, AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def maybe_initialize_distributed() -> bool:
    """Call jax.distributed.initialize() when the environment describes several processes.

    Recognised: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES / JAX_PROCESS_ID, as `tpu_scripts`' GPU
    launcher sets), SLURM with more than one task, a multi-host TPU VM (TPU_WORKER_HOSTNAMES listing
    several hosts, as on GKE), or RLP_JAX_DISTRIBUTED=1 (set by `tpu_scripts/tpu_vm.sh train`: on a plain
    TPU VM the worker list comes from the metadata server, which `jax.distributed.initialize()` reads
    itself). Returns True when it initialised.
    """
    env = os.environ
    multi = ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
             or "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("RLP_JAX_DISTRIBUTED") == "1")
    if not multi:
        return False
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in env:
        kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
                      process_id=int(env.get("JAX_PROCESS_ID", "0")))
    # CPU processes (tests, CPU clusters) need a collectives backend; TPU and GPU ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
    return True


def logical_to_spec(names, shape, mesh: Mesh | AbstractMesh) -> P:
    """PartitionSpec for an array with logical axis `names`; non-divisible or reused mesh axes replicate."""
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axes = RULES.get(name)
        if axes is None:
            spec.append(None)
            continue
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or size % n:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def tree_shardings(logical_tree, shape_tree, mesh: Mesh):
    """NamedShardings for a pytree given matching trees of logical names (tuples) and arrays/shapes."""
    return jax.tree.map(lambda names, x: NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)),
                        logical_tree, shape_tree, is_leaf=lambda x: isinstance(x, tuple))


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def state_shardings(abstract_state, param_shardings, mesh: Mesh):
    """Shardings of a TrainState-like pytree: any leaf whose key path ends with a parameter's path
    (params, EMA, optimizer moments, reference) takes that parameter's sharding; all else replicates."""
    by_path = {_path_keys(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_shardings)}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = _path_keys(path)
        for start in range(len(keys)):
            s = by_path.get(keys[start:])
            if s is not None and len(s.spec) <= len(leaf.shape):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, L] batches: rows split over data x fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble each host's [B_local, L] numpy arrays into global arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


# ----------------------------------------------------------------------------------------------
# Activation constraints inside the model
# ----------------------------------------------------------------------------------------------

def constrain(x, names: tuple[str | None, ...]):
    """with_sharding_constraint by logical names over JAX's current abstract mesh; identity when none is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)))


def gathered(params, logical_axes, dtype):
    """`params` as a token loop should read them: every leaf sharded over fsdp (a logical axis mapped to it)
    constrained to its sharding without fsdp, over JAX's current abstract mesh, weights of two or more axes cast
    to `dtype` first (only cast when no mesh is set). XLA then gathers each once, here, instead of at every step
    of a loop that reads the fsdp-sharded originals. Vectors (biases sharded over fsdp) keep their dtype, as the
    models add them; leaves not sharded over fsdp are returned as they are. logical_axes: the tree of
    `param_logical_axes`."""
    mesh = jax.sharding.get_abstract_mesh()

    def one(names, x):
        if not any("fsdp" in (RULES.get(n) or ()) for n in names):
            return x
        if x.ndim >= 2:
            x = x.astype(dtype)
        if mesh.empty:
            return x
        spec = P(*(_without("fsdp", entry) for entry in logical_to_spec(names, x.shape, mesh)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(one, logical_axes, params, is_leaf=lambda x: isinstance(x, tuple))


def _without(axis: str, entry):
    """A PartitionSpec entry (None, a mesh axis or a tuple of them) without `axis`."""
    kept = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a not in (None, axis))
    return None if not kept else kept[0] if len(kept) == 1 else kept
