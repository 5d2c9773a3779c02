"""Expert parallelism: the routed experts of one MoE layer, dispatched by all-to-all over the
"expert" mesh axis inside `jax.shard_map` (paper 2.2.2-2.2.4, docs/design.md 5).

Legend: N tokens, n = N / (devices splitting tokens) tokens on one device, D model width,
I expert width (I/tp on one device), E routed experts, P devices on "expert", L = E / P experts
on one device, K experts per token, M devices a token may reach, C rows one device sends to
one destination (dense), S rows it sends in all, R rows it receives, Q = R * K expert slots
it receives, B its budget of expert assignments.

Per device:
  1. route its own n tokens (`route_fn`, the model's router);
  2. a token with any expert on device p becomes ONE row for p (x once, plus its K slots of
     local expert id, gate and priority): with device-limited routing a token is sent to at
     most M devices, which is what the paper's group_limited_greedy buys (2.2.2);
  3. rows are packed per destination, highest priority (never-drop, then affinity) first:
     dense (`all_to_all`, the CPU): C rows for each, sized from the device-limited
     expectation SEND_SLACK x cf x M x n / P, raised to the never-drop rows one pair may
     need; ragged (`ragged_all_to_all`, TPU and GPU; parallel/ragged.py): each destination
     its own count, S = M x n rows in all, at most R = SEND_SLACK x cf x M x n into one
     receiver, never-drop rows first, whatever one device's sequences are;
  4. the exchange; the receiving device keeps its budget B = cf x K x n of the slots it got,
     the highest-affinity ones across everything it received, never-drop ones first
     (paper 2.2.4: cf times the device's average share of the K x N assignments);
  5. the kept slots, sorted by local expert, run as one grouped matmul sized by B (not by
     R x K); psum over the expert-width axis; the exchange back (y and which slots were
     kept); each token sums its rows.

Dropless (`drop=False`: evaluation, generation, and cf None) keeps every slot: C = n (dense)
or R = P x n (ragged), and the grouped matmul is sized for all Q slots, exact whatever the
router does.

Routing groups are the devices of "expert": group g lives on device g // (G / P), so n_group
must be a multiple of P. The plain single-device path is `model/moe.py`; tests hold this one
to it. Every PartitionSpec and collective axis comes from the rules table (`rules.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.errors import UserError
from deepseek_jax.kernels.gmm import routed_swiglu
from deepseek_jax.kernels.select import unavailable
from deepseek_jax.model.experts import grouped_swiglu, tile_rows
from deepseek_jax.parallel import ragged, rules

# Rows a sender may ship to one destination, over the device-limited average cf * M * n / P.
# Per-pair loads scatter around the average; 1.2 keeps dispatch + combine traffic within 1.3x
# of 2 cf M D bytes per token (issue 12 goal) while rarely overflowing a pair.
SEND_SLACK = 1.2


@struct.dataclass
class Dispatch:
    """What happened to each token's rows and slots. Row (t, p): token t has an expert on p."""

    wanted: jnp.ndarray  # [N, P] bool, token t chose an expert on device p
    sent: jnp.ndarray  # [N, P] bool, ... and its row was shipped (within C, or its allowance)
    affinity: jnp.ndarray  # [N, P] float32, sum of t's chosen scores s on device p
    kept: jnp.ndarray  # [N, K] bool, slot k of token t was computed (within its device's B)
    # or has a zero gate (nothing to add, not sent)


def expert_axis() -> str:
    """The one mesh axis the "expert" rule splits experts over (the all_to_all's axis)."""
    axes = rules.TABLE["expert"]
    if len(axes) != 1:
        raise UserError(
            f"the 'expert' rule maps to {axes}: expert parallelism needs exactly one mesh axis "
            f"there (edit RULES in deepseek_jax/parallel/rules.py)"
        )
    return axes[0]


def expert_devices(cfg: ModelConfig, mesh: Mesh) -> int:
    """P, the size of the expert mesh axis, after checking the experts and groups divide."""
    p = mesh.shape[expert_axis()]
    if cfg.n_routed_experts % p:
        raise UserError(
            f"n_routed_experts={cfg.n_routed_experts} does not split over the expert mesh axis "
            f"of size {p}: choose an expert axis size that divides it"
        )
    if cfg.topk_method == "group_limited_greedy" and cfg.n_group % p:
        raise UserError(
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


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The static sizes of one call's dispatch (all per device)."""

    n: int  # tokens
    c: int  # rows sent to each destination (dense all_to_all)
    sent: int  # rows one device may send in all: P x C dense, S ragged
    received: int  # rows one device may receive: P x C dense, R ragged
    budget: int  # expert assignments computed (B); received x K when dropless


def sizes(cfg: ModelConfig, p: int, n: int, protected: int, drop: bool, ragged: bool) -> Sizes:
    """C, S, R and B for n tokens a device, `protected` of them never-drop on the worst device.

    Dense: dropless, C = n (every token could pick one destination) and B = every slot
    received; dropping, C = SEND_SLACK x cf x M x n / P, raised to `protected` so that a pair
    always fits its never-drop rows (a device holding one whole never-drop sequence makes that
    every pair's C: the worst case, which only ragged dispatch avoids).
    Ragged (parallel/ragged.py): S = M x n, every row a device can have (a token reaches at
    most M devices); R = SEND_SLACK x cf x M x n, at least `protected`, dropping, and P x n
    dropless.
    Dropping, B = cf x K x n: it includes the never-drop slots (ranked first) and does not
    grow for them: they are about no_drop_fraction of B on average, and are lost only if one
    device receives more of them than its whole budget.
    """
    k, m = cfg.num_experts_per_tok, devices_per_token(cfg, p)
    dropping = drop and cfg.capacity_factor is not None
    cf = cfg.capacity_factor
    if not dropping:
        c, received = n, p * n
        sent = m * n if ragged else p * n
        return Sizes(n=n, c=c, sent=sent, received=received, budget=received * k)
    if ragged:
        c, sent = 0, m * n
        received = min(p * n, max(math.ceil(SEND_SLACK * cf * m * n), protected))
    else:
        c = min(n, max(math.ceil(SEND_SLACK * cf * m * n / p), protected))
        sent = received = p * c
    budget = min(math.ceil(cf * k * n), received * k)
    return Sizes(n=n, c=c, sent=sent, received=received, budget=budget)


def never_drop_tokens(cfg: ModelConfig, batch: int, length: int) -> np.ndarray:
    """[B * T] bool: the tokens never dropped, about no_drop_fraction of the batch (2.2.4).

    round(fraction x B x T) tokens in whole sequences spread evenly over the batch (so that
    every device holds its share), the last one cut short: a batch of fewer than 1 / fraction
    sequences still protects its share, as part of one sequence.
    """
    protected = round(cfg.no_drop_fraction * batch * length)
    sequences = -(-protected // length)
    chosen = np.zeros((batch, length), bool)
    for j in range(sequences):
        row = j * batch // sequences
        chosen[row, : min(length, protected - j * length)] = True
    return chosen.reshape(-1)


def exchange(
    cfg: ModelConfig,
    size: Sizes,
    x_nD,
    protected_n,
    routing,
    w_gate,
    w_up,
    w_down,
    collective: Callable | None = None,
):
    """One device's part, inside shard_map: pack, all_to_all, budget, experts, back, combine.

    `collective` None: the dense all_to_all, C rows per destination. Otherwise a
    `ragged_all_to_all` (or its emulation): each destination gets the rows allowed it
    (`ragged.allowances`), packed one after another in an S-row buffer, into an R-row one.
    Returns y [n, D] (the routed experts' sum for this device's tokens) and its Dispatch.
    """
    axis = expert_axis()
    n, d = x_nD.shape
    k = routing.experts.shape[1]
    l = w_gate.shape[0]
    p = cfg.n_routed_experts // l
    device_nK = routing.experts // l
    # A slot whose gate is exactly 0 adds nothing and is not sent: its score underflowed to
    # the 0 that masks the groups left out, so top-K may pick it outside the top-M groups
    # (as transformers does) and it would take a row to an (M+1)-th device.
    live_nK = routing.weights != 0
    to_nKP = (device_nK[:, :, None] == jnp.arange(p)) & live_nK[:, :, None]
    wanted_nP = to_nKP.any(axis=1)
    score_nK = jnp.take_along_axis(routing.scores, routing.experts, axis=1)
    affinity_nP = jnp.einsum("nK,nKP->nP", score_nK, to_nKP.astype(score_nK.dtype))
    # Softmax scores sum to at most 1, so +2 ranks every never-drop row and slot above the rest.
    boost_n = 2.0 * protected_n.astype(score_nK.dtype)

    with jax.named_scope("dispatch"):
        priority_nP = jnp.where(wanted_nP, affinity_nP + boost_n[:, None], -1.0)
        order_Pn = jnp.argsort(-priority_nP.T, axis=1, stable=True)
        rank_Pn = (
            jnp.zeros((p, n), jnp.int32)
            .at[jnp.arange(p)[:, None], order_Pn]
            .set(jnp.arange(n, dtype=jnp.int32))
        )
        if collective is None:  # row X = (destination, rank) of a [P, C] block per destination
            allow_P = jnp.full(p, size.c)
            dest_X = jnp.repeat(jnp.arange(p), size.c)
            rank_X = jnp.tile(jnp.arange(size.c), p)
        else:  # rows for destination 0, then 1, ..., then filler up to S
            me = jax.lax.axis_index(axis)
            count_SR = jax.lax.all_gather(wanted_nP.sum(axis=0), axis)
            protected_SR = jax.lax.all_gather((wanted_nP & protected_n[:, None]).sum(0), axis)
            allow_SR = ragged.allowances(count_SR, protected_SR, size.received)
            allow_P = allow_SR[me]
            end_P = jnp.cumsum(allow_P)
            j = jnp.arange(size.sent)
            dest_X = jnp.minimum(jnp.searchsorted(end_P, j, side="right"), p - 1)
            rank_X = jnp.where(j < end_P[-1], j - (end_P - allow_P)[dest_X], n)
        sent_nP = wanted_nP & (rank_Pn.T < allow_P)
        token_X = order_Pn[dest_X, jnp.minimum(rank_X, n - 1)]
        valid_X = (rank_X < n) & wanted_nP[token_X, dest_X]
        mine_XK = (device_nK[token_X] == dest_X[:, None]) & live_nK[token_X] & valid_X[:, None]
        x_XD = jnp.where(valid_X[:, None], x_nD[token_X], 0)
        # Slot metadata, one float32 array so that it travels in one collective: local expert
        # id (L marks an empty slot; exact in float32), gate g, priority (-1 when empty).
        empty_3K = jnp.concatenate([jnp.full(k, l, jnp.float32), jnp.zeros(k), jnp.full(k, -1.0)])
        meta_X3K = jnp.concatenate(
            [
                jnp.where(mine_XK, routing.experts[token_X] % l, l).astype(jnp.float32),
                jnp.where(mine_XK, routing.weights[token_X], 0.0),
                jnp.where(mine_XK, (score_nK + boost_n[:, None])[token_X], -1.0),
            ],
            axis=-1,
        )

        if collective is None:

            def send(v, fill=None):  # [P * C, ...]: block p goes to / comes from device p
                return jax.lax.all_to_all(v, axis, 0, 0, tiled=True)

            back = send
        else:
            there, home = ragged.plans(allow_SR, me)

            def send(v, fill=0):  # rows past what arrives keep `fill` (an empty row)
                out = jnp.broadcast_to(jnp.asarray(fill, v.dtype), (size.received, *v.shape[1:]))
                return collective(v, out, *there, axis_name=axis)

            def back(v):
                out = jnp.zeros((size.sent, *v.shape[1:]), v.dtype)
                return collective(v, out, *home, axis_name=axis)

        x_RD, meta_R3K = send(x_XD), send(meta_X3K, empty_3K)

    y_RD, kept_RK = local_experts(size, x_RD, meta_R3K, k, l, cfg.kernels, w_gate, w_up, w_down)

    with jax.named_scope("combine"):
        y_XD, kept_XK = back(y_RD), back(kept_RK)
        # Filler rows (beyond a destination's wanted ones) carry no slots, so they add zeros.
        y_nD = jnp.zeros((n, d), y_XD.dtype).at[token_X].add(y_XD)
        kept_nK = jnp.zeros((n, k), jnp.int32).at[token_X].add(kept_XK.astype(jnp.int32)) > 0
        kept_nK = kept_nK | ~live_nK
    return y_nD, Dispatch(wanted_nP, sent_nP, affinity_nP, kept_nK)


def local_experts(size: Sizes, x_RD, meta_R3K, k, l, kernels, w_gate, w_up, w_down):
    """The received rows through this device's L experts, within its budget B: (y [R, D],
    kept [R, K] int8, which slots were computed)."""
    with jax.named_scope("budget"):
        expert_Q = meta_R3K[:, :k].astype(jnp.int32).reshape(-1)
        gate_Q = meta_R3K[:, k : 2 * k].reshape(-1)
        priority_Q = meta_R3K[:, 2 * k :].reshape(-1)
        q = expert_Q.shape[0]
        if size.budget < q:
            # Paper 2.2.4: over budget, the lowest-affinity assignments of everything this
            # device received are dropped; never-drop ones (priority >= 2) rank first.
            _, slot_B = jax.lax.top_k(priority_Q, size.budget)
        else:
            slot_B = jnp.arange(q)
        live_B = priority_Q[slot_B] >= 0
        expert_B = jnp.where(live_B, expert_Q[slot_B], l)
        order_B = jnp.argsort(expert_B, stable=True)  # empty slots last, outside every group
        slot_B, live_B = slot_B[order_B], live_B[order_B]
        row_B = slot_B // k
        kept_RK = jnp.zeros(q, jnp.int8).at[slot_B].set(live_B.astype(jnp.int8)).reshape(-1, k)

    with jax.named_scope("experts"):
        group_sizes = jnp.bincount(expert_B, length=l)  # id L (empty) is not counted
        tile = tile_rows(size.budget, l)
        plain = functools.partial(grouped_swiglu, tile=tile)
        y_BD = routed_swiglu(kernels, plain, x_RD[row_B], group_sizes, w_gate, w_up, w_down)
        gate_B = jnp.where(live_B, gate_Q[slot_B], 0.0).astype(y_BD.dtype)
        y_RD = jnp.zeros_like(x_RD).at[row_B].add(y_BD * gate_B[:, None])
        # Each rank of the expert-width axes held I / tp of every expert.
        y_RD = jax.lax.psum(y_RD, rules.TABLE["expert_mlp"])
    return y_RD, kept_RK


def choose_exchange(cfg: ModelConfig, p: int, n: int, protected: int, drop: bool) -> Callable:
    """`exchange` with the collective cfg.dispatch and the lowering platform call for."""
    dense = functools.partial(exchange, cfg, sizes(cfg, p, n, protected, drop, ragged=False))
    uneven = sizes(cfg, p, n, protected, drop, ragged=True)
    fast = functools.partial(exchange, cfg, uneven, collective=jax.lax.ragged_all_to_all)
    if cfg.dispatch == "dense":
        return dense
    if cfg.dispatch == "emulated":
        return functools.partial(exchange, cfg, uneven, collective=ragged.emulated_all_to_all)
    message = (
        "dispatch='ragged' cannot run on the {platform} platform (XLA there has no "
        "ragged-all-to-all): use dispatch='auto' (dense there) or 'emulated'"
    )
    other = dense if cfg.dispatch == "auto" else unavailable(fast, message)

    def chosen(*args):
        return jax.lax.platform_dependent(*args, tpu=fast, cuda=fast, default=other)

    return chosen


def dispatch_specs() -> tuple[P, P, P]:
    """(tokens [N, ...], w_gate/w_up [E, D, I], w_down [E, I, D]) inside shard_map.

    From the rules table: tokens split by the "batch" rule; experts split by "expert" and
    their width by "expert_mlp", gathered on D (the shard_map's input is the whole row).
    """
    rows = rules.spec(("batch",))
    experts_in = rules.spec(("expert", None, "expert_mlp"))
    experts_out = rules.spec(("expert", "expert_mlp", None))
    return rows, experts_in, experts_out


def expert_parallel(
    cfg: ModelConfig,
    mesh: Mesh,
    route_fn: Callable,
    x_ND: jnp.ndarray,
    never_drop_N: np.ndarray,
    centroids_DE: jnp.ndarray,
    w_gate_EDI: jnp.ndarray,
    w_up_EDI: jnp.ndarray,
    w_down_EID: jnp.ndarray,
    drop: bool = False,
):
    """The routed experts of N tokens on `mesh`: (y [N, D], Routing of [N, ...], Dispatch).

    `route_fn(cfg, x_nD, centroids)` is the model's router (returns a Routing); tokens are
    split over the "batch" rule's mesh axes and routed where they lie. `drop` applies the
    device budget (cfg.capacity_factor); the model passes it only when training.
    """
    p = expert_devices(cfg, mesh)
    splits = rules.token_devices(mesh)
    n_all = x_ND.shape[0]
    if n_all % splits:
        raise UserError(
            f"{n_all} tokens (batch x length) do not split over the mesh axes "
            f"{rules.token_axes()} ({splits} devices): make batch x length a multiple of {splits}"
        )
    n = n_all // splits
    protected = int(np.asarray(never_drop_N).reshape(splits, n).sum(axis=1).max())
    exchange_fn = choose_exchange(cfg, p, n, protected, drop)

    def body(x_nD, protected_n, centroids, w_gate, w_up, w_down):
        with jax.named_scope("router"):
            routing = route_fn(cfg, x_nD, centroids)
        y, dispatch = exchange_fn(x_nD, protected_n, routing, w_gate, w_up, w_down)
        return y, routing, dispatch

    rows, experts_in, experts_out = dispatch_specs()
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(rows, rows, P(), experts_in, experts_in, experts_out),
        out_specs=(rows, rows, rows),
        # Pallas calls (the grouped-matmul kernels of deepseek_jax/kernels/gmm.py) do not say
        # how their outputs vary over the mesh, which the check requires of every operation.
        check_vma=False,
    )(x_ND, jnp.asarray(never_drop_N), centroids_DE, w_gate_EDI, w_up_EDI, w_down_EID)
