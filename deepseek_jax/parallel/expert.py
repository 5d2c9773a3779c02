"""Expert parallelism: the routed experts of one MoE layer, dispatched by all-to-all over the
"expert" mesh axis inside `jax.shard_map` (paper 2.2.2-2.2.4, DESIGN.md 5).

Legend: N tokens, n = N / (devices splitting tokens) tokens on one device, D model width,
I expert width (I/tp on one device), E routed experts, P devices on "expert", L = E / P experts
on one device, K experts per token, C rows one device sends to one destination (capacity),
R = P * C rows a device receives.

Per device:
  1. route its own n tokens (`route_fn`, the model's router);
  2. a token with any expert on device p becomes ONE row for p (x once, plus its K slots of
     local expert id and gate): with device-limited routing a token is sent to <= M devices,
     which is what the paper's group_limited_greedy buys (2.2.2);
  3. rows are packed per destination under the capacity C; over it, the rows with the lowest
     affinity are dropped, never those of never-drop sequences (2.2.4);
  4. all_to_all; the L local experts run as a tiled grouped matmul; psum over "tensor"
     (expert width split); all_to_all back; each token sums its rows.

Routing groups are the devices of "expert": group g lives on device g // (G / P), so n_group
must be a multiple of P. The plain single-device path is `model/moe.py`; tests hold this one
to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels.gmm import routed_swiglu
from deepseek_jax.model.layers import grouped_swiglu
from deepseek_jax.parallel.rules import token_axes


@struct.dataclass
class Dispatch:
    """Where each token's rows went. Row (t, p): token t has an expert on device p."""

    wanted: jnp.ndarray  # [N, P] bool, token t chose an expert on device p
    sent: jnp.ndarray  # [N, P] bool, ... and its row was not dropped
    affinity: jnp.ndarray  # [N, P] float32, sum of t's chosen scores s on device p (drop order)


def expert_devices(cfg: ModelConfig, mesh: Mesh) -> int:
    """P, the size of the "expert" axis, after checking the experts and groups divide over it."""
    p = mesh.shape["expert"]
    if cfg.n_routed_experts % p:
        raise ValueError(
            f"n_routed_experts={cfg.n_routed_experts} does not split over the expert mesh axis "
            f"of size {p}: choose an expert axis size that divides it"
        )
    if cfg.topk_method == "group_limited_greedy" and cfg.n_group % p:
        raise ValueError(
            f"n_group={cfg.n_group} routing groups cannot map onto {p} devices of the expert "
            f"mesh axis: n_group must be a multiple of the expert axis size (paper 2.2.2); set "
            f"the expert axis to a divisor of {cfg.n_group}"
        )
    return p


def devices_per_token(cfg: ModelConfig, p: int) -> int:
    """The most devices one token's rows can reach: min(M, P), or min(K, P) when greedy."""
    if cfg.topk_method == "group_limited_greedy":
        return min(cfg.topk_group, p)
    return min(cfg.num_experts_per_tok, p)


def capacity(cfg: ModelConfig, n: int, p: int, never_drop: int) -> int:
    """C, the rows one device may send to one destination.

    Dropless: n (every token could pick that device). Otherwise capacity_factor times the
    average, n * devices_per_token / P, plus room for the `never_drop` tokens so that their
    guarantee holds whatever the router does.
    """
    if cfg.capacity_factor is None:
        return n
    average = n * devices_per_token(cfg, p) / p
    return min(n, math.ceil(cfg.capacity_factor * average) + never_drop)


def never_drop_tokens(cfg: ModelConfig, batch: int, length: int) -> np.ndarray:
    """[B * T] bool: the tokens of the sequences whose tokens are never dropped (paper 2.2.4).

    floor(B * no_drop_fraction) sequences, spread evenly over the batch so that every device
    holds its share.
    """
    i = np.arange(batch)
    frac = cfg.no_drop_fraction
    chosen = np.floor((i + 1) * frac + 1e-9) > np.floor(i * frac + 1e-9)
    return np.repeat(chosen, length)


def exchange(cfg: ModelConfig, c: int, x_nD, never_drop_n, routing, w_gate, w_up, w_down):
    """One device's part, inside shard_map: pack, all_to_all, local experts, back, combine.

    Returns y [n, D] (the routed experts' sum for this device's tokens) and its Dispatch rows.
    """
    n, d = x_nD.shape
    l = w_gate.shape[0]
    p = cfg.n_routed_experts // l
    device_nK = routing.experts // l
    to_nKP = device_nK[:, :, None] == jnp.arange(p)
    wanted_nP = to_nKP.any(axis=1)
    chosen_nK = jnp.take_along_axis(routing.scores, routing.experts, axis=1)
    affinity_nP = jnp.einsum("nK,nKP->nP", chosen_nK, to_nKP.astype(chosen_nK.dtype))

    with jax.named_scope("dispatch"):
        # Softmax scores sum to at most 1, so +2 ranks every never-drop row above the rest.
        priority_nP = jnp.where(wanted_nP, affinity_nP + 2.0 * never_drop_n[:, None], -1.0)
        order_Pn = jnp.argsort(-priority_nP.T, axis=1, stable=True)
        token_PC = order_Pn[:, :c]
        rank_Pn = (
            jnp.zeros((p, n), jnp.int32)
            .at[jnp.arange(p)[:, None], order_Pn]
            .set(jnp.arange(n, dtype=jnp.int32))
        )
        sent_nP = wanted_nP & (rank_Pn.T < c)

        valid_PC = jnp.take_along_axis(wanted_nP.T, token_PC, axis=1)
        mine_PCK = (device_nK[token_PC] == jnp.arange(p)[:, None, None]) & valid_PC[..., None]
        x_PCD = jnp.where(valid_PC[..., None], x_nD[token_PC], 0)
        expert_PCK = jnp.where(mine_PCK, routing.experts[token_PC] % l, l)
        gate_PCK = jnp.where(mine_PCK, routing.weights[token_PC], 0.0)

        def send(v):  # [P, C, ...] -> [P * C, ...]: block p goes to / comes from device p
            v = v.reshape(p * c, *v.shape[2:])
            return jax.lax.all_to_all(v, "expert", 0, 0, tiled=True)

        x_RD, expert_RK, gate_RK = send(x_PCD), send(expert_PCK), send(gate_PCK)

    with jax.named_scope("experts"):
        y_RD = routed_swiglu(
            cfg.kernels, grouped_swiglu, x_RD, expert_RK, gate_RK, w_gate, w_up, w_down
        )
        y_RD = jax.lax.psum(y_RD, "tensor")  # each tensor rank held I / tp of every expert

    with jax.named_scope("combine"):
        y_RD = jax.lax.all_to_all(y_RD, "expert", 0, 0, tiled=True)
        # Filler rows (beyond a destination's wanted ones) carry no slots, so they add zeros.
        y_nD = jnp.zeros((n, d), y_RD.dtype).at[token_PC.reshape(-1)].add(y_RD)
    return y_nD, Dispatch(wanted_nP, sent_nP, affinity_nP)


def expert_parallel(
    cfg: ModelConfig,
    mesh: Mesh,
    route_fn: Callable,
    x_ND: jnp.ndarray,
    never_drop_N: jnp.ndarray,
    centroids_DE: jnp.ndarray,
    w_gate_EDI: jnp.ndarray,
    w_up_EDI: jnp.ndarray,
    w_down_EID: jnp.ndarray,
):
    """The routed experts of N tokens on `mesh`: (y [N, D], Routing of [N, ...], Dispatch).

    `route_fn(cfg, x_nD, centroids)` is the model's router (returns a Routing); tokens are
    split over the "batch" rule's mesh axes and routed where they lie.
    """
    p = expert_devices(cfg, mesh)
    tokens = token_axes()
    splits = math.prod(mesh.shape[a] for a in tokens)
    n_all, d = x_ND.shape
    if n_all % splits:
        raise ValueError(
            f"{n_all} tokens (batch x length) do not split over the mesh axes {tokens} "
            f"({splits} devices): make batch x length a multiple of {splits}"
        )
    n = n_all // splits
    protected = np.asarray(never_drop_N).reshape(splits, n).sum(axis=1).max()
    c = capacity(cfg, n, p, int(protected))

    def body(x_nD, never_drop_n, centroids, w_gate, w_up, w_down):
        with jax.named_scope("router"):
            routing = route_fn(cfg, x_nD, centroids)
        y, dispatch = exchange(cfg, c, x_nD, never_drop_n, routing, w_gate, w_up, w_down)
        return y, routing, dispatch

    rows = P(tokens)
    experts_in, experts_out = P("expert", None, "tensor"), P("expert", "tensor", None)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(rows, rows, P(), experts_in, experts_in, experts_out),
        out_specs=(rows, rows, rows),
        # Pallas calls (the grouped-matmul kernels of deepseek_jax/kernels/gmm.py) do not say
        # how their outputs vary over the mesh, which the check requires of every operation.
        check_vma=False,
    )(x_ND, jnp.asarray(never_drop_N), centroids_DE, w_gate_EDI, w_up_EDI, w_down_EID)
