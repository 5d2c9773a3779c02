"""Ragged dispatch: each sender ships each destination exactly the rows it has for it.

A dense `all_to_all` gives every (sender, destination) pair one static capacity C, so one
device that must send all n of its tokens to one destination (a never-drop sequence routed
there) makes C = n for every pair: P x n rows a device, the worst case. `ragged_all_to_all`
takes per-pair sizes at run time, so the buffers are sized by what a device can send in all
(M x n rows: a token's row reaches at most M devices) and what it takes in (R rows, the
device-limited expectation with slack), whatever the pairs do.

Legend: P devices on the expert axis, S rows a device may send in all, R rows it may receive,
allow[s, r] rows sender s ships to receiver r (row s of the matrix: one sender's sends).

`allowances` is the one rule every device applies to the same gathered counts, so senders and
receivers agree on every offset without another exchange. XLA:CPU cannot run
`ragged-all-to-all`, so `emulated_all_to_all` does the same thing with a dense all_to_all
(P x S rows moved: only for tests, `ModelConfig.dispatch="emulated"`); the tests hold it to
the collective's documented semantics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def allowances(count_SR: jnp.ndarray, protected_SR: jnp.ndarray, room: int) -> jnp.ndarray:
    """[P, P] int32: rows each sender may ship each receiver, at most `room` into one receiver.

    count_SR: rows sender s has for receiver r; protected_SR: how many of them are never-drop
    (a sender ranks them first). Into a receiver that would overflow, the never-drop rows go
    first; the rest of its room is shared in proportion to what each sender has (floored, so
    the sum fits). A sender drops its lowest-priority rows beyond its allowance.
    """
    protected_R = protected_SR.sum(axis=0)
    kept_protected = jnp.where(
        protected_R <= room, protected_SR, protected_SR * room // jnp.maximum(protected_R, 1)
    )
    left_R = room - kept_protected.sum(axis=0)
    other_SR = count_SR - protected_SR
    other_R = other_SR.sum(axis=0)
    kept_other = jnp.where(
        other_R <= left_R, other_SR, other_SR * left_R // jnp.maximum(other_R, 1)
    )
    return (kept_protected + kept_other).astype(jnp.int32)


def plans(allow_SR: jnp.ndarray, me) -> tuple[tuple[jnp.ndarray, ...], tuple[jnp.ndarray, ...]]:
    """The (input_offsets, send_sizes, output_offsets, recv_sizes) of device `me`: there, its
    rows packed by destination (its row of allow) into receive buffers packed by sender; and
    back, each sender's rows returned to where that sender packed them."""
    start_in_sender = jnp.cumsum(allow_SR, axis=1) - allow_SR
    start_in_receiver = jnp.cumsum(allow_SR, axis=0) - allow_SR
    there = (start_in_sender[me], allow_SR[me], start_in_receiver[me], allow_SR[:, me])
    back = (start_in_receiver[:, me], allow_SR[:, me], start_in_sender[:, me], allow_SR[me])
    return there, back


def emulated_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """`jax.lax.ragged_all_to_all`'s result with a dense all_to_all (one slice per device):
    each slice padded to the operand's length, so P times the operand moves."""
    rows = operand.shape[0]
    j = jnp.arange(rows)
    take_Pj = jnp.clip(input_offsets[:, None] + j, 0, rows - 1)
    real_Pj = j < send_sizes[:, None]
    blocks = jnp.where(_trailing(real_Pj, operand), operand[take_Pj], 0)
    blocks = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)  # block i: from device i
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    where_Pj = jnp.where(j < recv_sizes[:, None], offsets[:, None] + j, output.shape[0])
    flat = blocks.reshape(-1, *operand.shape[1:])
    return output.at[where_Pj.reshape(-1)].set(flat, mode="drop")


def _trailing(mask: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))
