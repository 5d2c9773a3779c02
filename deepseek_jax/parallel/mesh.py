"""The device mesh: axes ("data", "fsdp", "expert", "tensor"), any of size 1 (docs/design.md 5).

data    pure data parallelism: batch split, params replicated
fsdp    batch split, params split on "embed" and gathered for compute (ZeRO-3)
expert  routed experts split; one routing group per device (device-limited routing)
tensor  heads, FFN width and vocabulary split (Megatron)
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

from deepseek_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A Mesh over the first data*fsdp*expert*tensor devices (all of `devices` if given).

    Axes are AxisType.Auto: the logical-rules workflow (`with_sharding_constraint` with a spec,
    jit in/out shardings) fails on jax.make_mesh's default Explicit axes (docs/design.md 7).
    """
    shape = (data, fsdp, expert, tensor)
    for name, size in zip(MESH_AXES, shape, strict=True):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"make_mesh({name}={size!r}): each axis size must be an int >= 1")
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(shape)
    if needed > len(devices):
        raise ValueError(
            f"make_mesh(data={data}, fsdp={fsdp}, expert={expert}, tensor={tensor}) needs "
            f"{needed} devices but {len(devices)} are available: shrink an axis (on the CPU, "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} fakes more)"
        )
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices[:needed]
    )


def start_processes(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins this process to a multi-process job; call before anything else touches jax.

    Values left None are found by `jax.distributed.initialize` itself on TPU pod slices, under
    SLURM and Open MPI (and the address from JAX_COORDINATOR_ADDRESS).
    """
    # XLA:CPU runs collectives across processes only through gloo (docs/design.md 7); GPU and TPU
    # backends ignore the setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def parse_mesh(spec: str) -> dict[str, int]:
    """ "data=2,expert=4" -> {"data": 2, "expert": 4} (command lines)."""
    sizes = {}
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in MESH_AXES or not value.strip().isdigit():
            raise UserError(
                f"--mesh {spec!r}: write axis=size pairs separated by commas, axes from {MESH_AXES}"
            )
        sizes[name.strip()] = int(value)
    return sizes
