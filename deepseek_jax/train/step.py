"""Jitted train and eval steps on a mesh, sharded by the one rules table.

Legend: B global batch, A micro-batches (gradient accumulation), b = B / A, T positions,
L_moe MoE layers, E routed experts.

The mesh has the axes of docs/design.md section 5, ("data", "fsdp", "expert", "tensor"); one
device is the 1x1x1x1 mesh, so single- and multi-device training are the same code. Params
take `placement.param_shardings`, AdamW's moments `placement.opt_state_shardings` (ZeRO-1), batches
`rules.batch_sharding`; the jitted steps keep every leaf where it lies, so between steps
nothing moves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig, resolve_dtype
from deepseek_jax.model.transformer import DeepSeekV2
from deepseek_jax.parallel import placement, rules
from deepseek_jax.train import losses
from deepseek_jax.train.state import TrainState, apply_gradients, init_state


def state_shardings(cfg: ModelConfig, mesh: Mesh, state_shapes: TrainState) -> TrainState:
    """A TrainState of NamedShardings: params and moments by the rules, the rest replicated."""
    replicated = NamedSharding(mesh, P())
    return TrainState(
        step=replicated,
        params=placement.param_shardings(cfg, mesh),
        opt_state=placement.opt_state_shardings(cfg, mesh, state_shapes.opt_state),
        rng=replicated,
    )


def init_sharded_state(
    cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """A fresh state created in place on `mesh` (no device holds more than its shards), and
    its shardings."""
    fresh = functools.partial(init_state, cfg, optimizer, seed)
    shardings = state_shardings(cfg, mesh, jax.eval_shape(fresh))
    return jax.jit(fresh, out_shardings=shardings)(), shardings


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows [B / P, T] -> one global [B, T] array per field, split over the mesh."""
    sharding = rules.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def forward(cfg: ModelConfig, params, batch, mesh: Mesh | None = None, train: bool = False):
    # On one device the plain MoE path (its kernel chosen for the token count) beats a
    # one-device all-to-all dispatch; on more, the expert-parallel dispatch.
    cfg = resolve_dtype(cfg, mesh)  # the mesh's platform, even where the model gets no mesh
    model = DeepSeekV2(cfg, mesh=mesh if mesh is not None and mesh.size > 1 else None)
    return model.apply(
        {"params": params},
        batch["inputs"],
        positions_BT=batch["positions"],
        segment_ids_BT=batch["segment_ids"],
        train=train,
        token_mask_BT=batch.get("token_mask"),  # padded rows: padding out of the balance losses
    )


def micro_batches(batch, micro_steps: int):
    """[B, T] fields -> [A, b, T]. Micro-batch a takes rows a, a + A, a + 2A, ...: each device
    splits its own rows, so every micro-batch spans the whole mesh without moving data."""
    return jax.tree.map(
        lambda x: x.reshape(x.shape[0] // micro_steps, micro_steps, *x.shape[1:]).swapaxes(0, 1),
        batch,
    )


def make_train_step(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    shardings: TrainState,
    micro_steps: int,
):
    """(state, batch [B, T] fields) -> (state, metrics): A micro-batches, one AdamW update."""

    def micro_grads(params, micro, total_weight):
        def loss_fn(p):
            out = forward(cfg, p, micro, mesh, train=True)
            return losses.train_loss(out, micro, total_weight, micro_steps)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def step(state: TrainState, batch):
        total_weight = jnp.maximum(batch["weights"].sum(), 1.0)

        def accumulate(grads, micro):
            (_, (nll, aux)), g = micro_grads(state.params, micro, total_weight)
            return jax.tree.map(jnp.add, grads, g), (nll, aux)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (nll_A, aux_A) = jax.lax.scan(accumulate, zeros, micro_batches(batch, micro_steps))
        new_state = apply_gradients(state, grads, optimizer)
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
            # [L_moe] each: token dropping (2.2.4) and devices per token (2.2.2)
            "drop_rate": aux.drop_rate,
            "never_drop_drop_rate": aux.never_drop_drop_rate,
            "fanout_mean": aux.fanout_mean,
            "fanout_max": aux.fanout_max,
        }
        return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(shardings, rules.batch_sharding(mesh)),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )


def make_eval_step(cfg: ModelConfig, mesh: Mesh, params_shardings):
    """(params, batch) -> (nll sum, target count) over the batch's unmasked targets."""

    def step(params, batch):
        out = forward(cfg, params, batch, mesh)
        return losses.nll_sum(out.logits, batch["targets"], batch["weights"]), batch[
            "weights"
        ].sum()

    return jax.jit(
        step,
        in_shardings=(params_shardings, rules.batch_sharding(mesh)),
        out_shardings=NamedSharding(mesh, P()),
    )
