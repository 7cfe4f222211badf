"""Device mesh from the `mesh:` config section (axes `data` and `fsdp`; -1 = the rest).

The batch is split over data x fsdp; parameters and optimizer state are replicated (data
parallelism). Every parameter carries logical axis names (mixers.base.dense) for the FSDP
partitioning of the sharding issue; until then `fsdp` > 1 acts as more data parallelism.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from training.config import ConfigError, MeshConfig

AXES = ("data", "fsdp")


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {free}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % fixed:
            raise ConfigError(f"mesh: the fixed axes multiply to {fixed}, which does not divide "
                              f"the {n} devices")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ConfigError(f"mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
                          f"but there are {n} devices")
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXES))
