"""Data and FSDP parallelism through jax.sharding, from the `mesh:` config section.

    mesh: {data: -1, fsdp: 1, rules: {embed: fsdp}}

- The mesh has the named axes `data` and `fsdp` (-1 = the remaining devices), built with
  jax.make_mesh; sizes that do not multiply to the device count are a ConfigError naming `mesh`.
- The global batch is split over data x fsdp (its leading axis).
- Every parameter names its logical axes in its variable metadata (mixers.base.dense:
  ("embed", "heads"), ("embed", "mlp"), ("vocab", "embed") ...). Logical axis rules map those
  names to mesh axes (default: embed -> fsdp), so parameters and the optimizer moments are split
  over fsdp: mixers.base.Dense gathers a weight where it is used and keeps its output split
  over the batch, and the gradient is reduced back to the weight's shard. A dimension is split
  only when the mesh axes divide it; otherwise it stays whole.
- Pallas kernels are not partitioned automatically: mixers.base.shard_kernel runs each kernel
  call inside jax.shard_map over the batch axes of the mesh set by `jax.set_mesh` (the Trainer
  sets it around its compiled steps).
- Several hosts: `initialize_distributed()` calls jax.distributed.initialize when the launcher's
  environment says so; `global_batch` places each host's rows of the global batch.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from training.config import MESH_AXES, ConfigError, MeshConfig

AXES = MESH_AXES                     # ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")        # the batch is split over both
DEFAULT_RULES = {"embed": "fsdp"}    # logical axis -> mesh axis (or a tuple of them, or None)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """The mesh of `cfg` over `devices` (default: every device of every host)."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    sizes = {a: getattr(cfg, a) for a in AXES}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {free}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % fixed:
            raise ConfigError(f"mesh: the fixed axes {sizes} multiply to {fixed}, which does not "
                              f"divide the {n} devices")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ConfigError(f"mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
                          f"but there are {n} devices; make them multiply to {n} or set one "
                          "axis to -1")
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def logical_rules(cfg: MeshConfig) -> dict:
    """The default rules updated by `mesh.rules`; values normalised to tuples of mesh axes."""
    rules = dict(DEFAULT_RULES, **(cfg.rules or {}))
    out = {}
    for name, target in rules.items():
        targets = target if isinstance(target, (list, tuple)) else (target,)
        out[name] = tuple(t for t in targets if t is not None)
    return out


def logical_to_spec(logical_axes, shape, mesh, rules: dict) -> P:
    """PartitionSpec of one array: each logical axis -> its mesh axes, kept only where their
    product divides the dimension and no earlier dimension already uses them."""
    if not logical_axes:
        return P()
    used, spec = set(), []
    for name, dim in zip(logical_axes, shape, strict=True):
        axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh, rules: dict, optimizer_rules: dict | None = None):
    """The NamedSharding of every variable of an nnx state (parameters, optimizer moments, step
    counters), from its `out_sharding` logical axes; the tree has the structure of `state`.
    `optimizer_rules` (ZeRO-1, `mesh.shard_optimizer`) replace `rules` for the variables under
    the Trainer's optimizer, the second entry of its (model, optimizer) state."""
    def one(path, var):
        if not _is_var(var):
            return NamedSharding(mesh, P())
        key = getattr(path[0], "key", None) if path else None
        use = optimizer_rules if optimizer_rules is not None and key == 1 else rules
        logical = var.get_metadata().get("out_sharding")
        return var.replace(NamedSharding(mesh, logical_to_spec(logical, var.shape, mesh, use)))
    return jax.tree.map_with_path(one, state, is_leaf=_is_var)


def zero1_rules(rules: dict) -> dict:
    """ZeRO-1 (`mesh.shard_optimizer`): the rules for the optimizer moments, `data` added after
    the mesh axes each logical name already maps to, and `embed` -> `data` if it maps to none.
    A moment is then split over `data` along the first of its named axes the mesh divides."""
    out = {name: axes if "data" in axes else axes + ("data",) for name, axes in rules.items()}
    out.setdefault("embed", ("data",))
    return out


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh, key: str = "train.batch_size") -> None:
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % n:
        raise ConfigError(f"{key}: {batch_size} is not divisible by the mesh's data x fsdp = "
                          f"{n} devices (mesh {dict(mesh.shape)})")


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Host numpy arrays of the global batch -> global jax.Arrays split by `sharding`.

    Every host holds the same global batch (the data sources are pure functions of the step);
    each copies only the rows of its own devices, so no host sends data to another."""
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(one, batch)


def initialize_distributed() -> bool:
    """Call jax.distributed.initialize() when a multi-process launch is detected; True if so.

    Recognised: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (any launcher),
    SLURM (srun with more than one task), Open MPI (mpirun -n > 1), a multi-host Cloud TPU slice
    (TPU_WORKER_HOSTNAMES with several hosts), or TRAIN_DISTRIBUTED=1 (JAX's auto-detection).
    Must run before anything touches the devices."""
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                                   int(env.get("JAX_NUM_PROCESSES", "1")),
                                   int(env.get("JAX_PROCESS_ID", "0")))
        return True
    detected = (int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env) or \
        int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or \
        "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("TRAIN_DISTRIBUTED") == "1"
    if detected:
        jax.distributed.initialize()
    return detected
