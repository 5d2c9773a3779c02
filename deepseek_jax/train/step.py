"""Jitted train and eval steps, placed on a jax Mesh.

Legend: B global batch, A micro-batches (gradient accumulation), b = B / A, T positions,
L_moe MoE layers, E routed experts.

The mesh has the axes of DESIGN.md section 5, ("data", "fsdp", "expert", "tensor"). Batches
are split over data x fsdp; the state is replicated here. The parallel runner swaps
`state_shardings` for its logical-rules table; the steps do not change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import DeepSeekV2
from deepseek_jax.train import losses
from deepseek_jax.train.state import TrainState, next_rng

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp")


def single_device_mesh() -> Mesh:
    """A 1x1x1x1 mesh on the first device (Auto axes: the logical-rules workflow needs them)."""
    devices = np.array(jax.devices()[:1]).reshape(1, 1, 1, 1)
    return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def state_shardings(mesh: Mesh, state_shapes):
    """Every leaf replicated: a tree of NamedSharding matching `state_shapes`."""
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), state_shapes)


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows [B / P, T] -> one global [B, T] array per field, split over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def forward(cfg: ModelConfig, params, batch):
    return DeepSeekV2(cfg).apply(
        {"params": params},
        batch["inputs"],
        positions_BT=batch["positions"],
        segment_ids_BT=batch["segment_ids"],
    )


def make_train_step(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    shardings,
    micro_steps: int,
):
    """(state, batch [B, T] fields) -> (state, metrics): A micro-batches, one AdamW update."""

    def micro_grads(params, micro, total_weight):
        def loss_fn(p):
            return losses.train_loss(forward(cfg, p, micro), micro, total_weight, micro_steps)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def step(state: TrainState, batch):
        total_weight = jnp.maximum(batch["weights"].sum(), 1.0)
        micro_BT = jax.tree.map(
            lambda x: x.reshape(micro_steps, x.shape[0] // micro_steps, *x.shape[1:]), batch
        )  # [A, b, T]

        def accumulate(grads, micro):
            (_, (nll, aux)), g = micro_grads(state.params, micro, total_weight)
            return jax.tree.map(jnp.add, grads, g), (nll, aux)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (nll_A, aux_A) = jax.lax.scan(accumulate, zeros, micro_BT)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            rng=next_rng(state.rng),
        )
        ce = nll_A.sum() / total_weight
        aux = jax.tree.map(lambda x: x.mean(axis=0), aux_A)
        metrics = {
            "loss": ce + aux.total,
            "ce": ce,
            "expert_loss": aux.expert_loss,
            "device_loss": aux.device_loss,
            "comm_loss": aux.comm_loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": total_weight,
            "load": aux.load,  # [L_moe, E] share of assignments per expert
        }
        return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )


def make_eval_step(cfg: ModelConfig, mesh: Mesh, params_shardings):
    """(params, batch) -> (nll sum, target count) over the batch's unmasked targets."""

    def step(params, batch):
        out = forward(cfg, params, batch)
        return losses.nll_sum(out.logits, batch["targets"], batch["weights"]), batch[
            "weights"
        ].sum()

    return jax.jit(
        step,
        in_shardings=(params_shardings, batch_sharding(mesh)),
        out_shardings=NamedSharding(mesh, P()),
    )
