"""Which implementation runs: the `kernels` switch of ModelConfig, resolved per lowering platform.

    "auto"       TPU: the Pallas TPU kernels; GPU: cuDNN attention / ragged_dot experts where
                 their constraints hold; CPU and shapes no kernel takes: the plain paths
    "plain"      the plain JAX paths everywhere (the reference every kernel is tested against)
    "tpu"        the Pallas TPU kernels, or a one-line error (lowered elsewhere, shape unfit)
    "cuda"       the GPU paths, or a one-line error
    "interpret"  the Pallas TPU kernels in interpret mode on any platform (tests, debugging)

The choice is made while lowering (`jax.lax.platform_dependent`), not from the host's
backend, so `jax.export(..., platforms=["tpu"])` on a CPU host carries the TPU kernels and a
program lowered for several platforms carries each its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

from deepseek_jax.config import KERNELS
from deepseek_jax.errors import UserError
from deepseek_jax.parallel import rules

# A kernel that cannot take the shapes at hand is given to `by_platform` as the reason, a
# string naming the shape, instead of a function.
Kernel = Callable | str


def check_choice(kernels: str) -> None:
    if kernels not in KERNELS:
        raise UserError(f"kernels={kernels!r}: choose one of {KERNELS}")


# A placeholder whose lowering fails with the message it carries: a forced kernel has no
# branch for the platforms it cannot run on, and JAX's own error for a missing branch does
# not say which kernel or what to do.
_unavailable_p = Primitive("deepseek_jax_kernel_unavailable")
_unavailable_p.multiple_results = True
_unavailable_p.def_abstract_eval(lambda *args, out_avals, message: out_avals)


def _refuse(ctx, *args, out_avals, message):
    platforms = "/".join(ctx.module_context.platforms)
    raise UserError(message.format(platform=platforms))


mlir.register_lowering(_unavailable_p, _refuse)


def unavailable(fn: Callable, message: str) -> Callable:
    """A branch shaped like `fn` that fails at lowering with `message` ({platform} filled in).

    Differentiable (zero tangents), since `platform_dependent` differentiates every branch
    of a forced kernel before the lowering drops all but the platform's own.
    """

    @jax.custom_jvp
    def branch(*args):
        out = jax.eval_shape(fn, *args)
        leaves, tree = jax.tree.flatten(out)
        avals = tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in leaves)
        flat = _unavailable_p.bind(*jax.tree.leaves(args), out_avals=avals, message=message)
        return jax.tree.unflatten(tree, flat)

    @branch.defjvp
    def branch_jvp(primals, tangents):
        out = branch(*primals)
        return out, jax.tree.map(jnp.zeros_like, out)

    return branch


def by_platform(
    kernels: str,
    name: str,
    args: tuple,
    plain: Callable,
    tpu: Kernel | None = None,
    cuda: Kernel | None = None,
    interpret: Kernel | None = None,
):
    """`plain(*args)`, or the kernel the choice and the lowering platform call for.

    A kernel given as a string (the reason it cannot take these shapes, decided statically by
    the caller): "auto" falls back to `plain`, a forced choice raises a one-line UserError
    naming `name` and the reason. None (no such kernel, e.g. a GPU decode): `plain` is that
    platform's path, forced or not.
    """
    check_choice(kernels)
    if kernels == "plain":
        return plain(*args)
    if kernels == "interpret":
        return _required(interpret, name, "interpret", plain)(*args)
    if kernels == "auto":
        branches = {
            "tpu": tpu if callable(tpu) else plain,
            "cuda": cuda if callable(cuda) else plain,
        }
        if all(b is plain for b in branches.values()):
            return plain(*args)
        return jax.lax.platform_dependent(*args, **branches, default=plain)
    forced = _required(tpu if kernels == "tpu" else cuda, name, kernels, plain)
    message = (
        f"kernel {name} (kernels={kernels!r}) cannot run on the {{platform}} platform: use "
        "kernels='auto' (picks per platform) or 'plain', or 'interpret' to emulate the TPU "
        "kernels"
    )
    return jax.lax.platform_dependent(
        *args, **{kernels: forced}, default=unavailable(forced, message)
    )


def _required(kernel: Kernel | None, name: str, kernels: str, plain: Callable) -> Callable:
    if kernel is None:  # no kernel of that kind for this path (GPU decode): its path is plain
        return plain
    if isinstance(kernel, str):
        raise UserError(
            f"kernel {name} (kernels={kernels!r}) cannot take {kernel}: use kernels='auto' "
            "(falls back to the plain path) or 'plain'"
        )
    return kernel


def per_shard(mesh, fn: Callable, args: tuple, in_logical: tuple, out_logical: tuple) -> Kernel:
    """`fn` run on each device's shard of `args`, placed by the rules table's logical axes
    (`fn` itself without a mesh), or the reason a shard cannot be formed. Pallas calls are
    opaque to XLA's sharding propagation, which would gather their operands onto every
    device."""
    if mesh is None:
        return fn
    specs = tuple(rules.spec(axes) for axes in in_logical)
    for x, spec in zip(args, specs, strict=True):
        for size, axes in zip(x.shape, spec, strict=False):
            names = () if axes is None else (axes,) if isinstance(axes, str) else axes
            devices = math.prod(mesh.shape[a] for a in names)
            if size % devices:
                return f"shape {x.shape} on mesh {dict(mesh.shape)} ({size} split {devices} ways)"
    return jax.shard_map(
        fn, mesh=mesh, in_specs=specs, out_specs=rules.spec(out_logical), check_vma=False
    )
