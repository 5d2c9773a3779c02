"""The pretraining loss: token cross-entropy over unmasked targets + the balance losses.

Legend: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def nll_sum(logits_BTV, targets_BT, weights_BT) -> jnp.ndarray:
    """Sum of -log p(target) over positions with weight 1, in float32 (weights 0 excluded)."""
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), targets_BT
    )
    return jnp.sum(nll_BT * weights_BT)


def train_loss(out, batch, total_weight, micro_steps: int):
    """One micro-batch's share of the batch loss: its nll over all of the batch's targets, plus
    the balance losses (paper 2.2.3) averaged over micro-batches. Summed over micro-batches,
    the gradients are exactly those of the full batch.

    Returns (loss, (nll sum, aux)).
    """
    nll = nll_sum(out.logits, batch["targets"], batch["weights"])
    return nll / total_weight + out.aux.total / micro_steps, (nll, out.aux)
