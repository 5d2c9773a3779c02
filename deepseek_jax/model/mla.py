"""Multi-head Latent Attention (DeepSeek-V2 paper, section 2.1).

Legend: B batch, T query positions, S key positions, D model width, H heads,
N nope dim (dn), R rope dim (dr), K = N + R, V value dim (dv), Q q latent (r_q),
C kv latent (r_kv).

Paper equations (2.1.2 low-rank key-value joint compression, 2.1.3 decoupled RoPE):
    c_KV = W_DKV h        (9)    k_C = W_UK c_KV      (10)   v_C = W_UV c_KV             (11)
    c_Q  = W_DQ h         (12)   q_C = W_UQ c_Q       (13)   q_R = RoPE(W_QR c_Q)        (14)
    k_R  = RoPE(W_KR h)   (15)   one k_R shared by all heads
    q_t,i = [q_C_t,i ; q_R_t,i]  (16)                k_t,i = [k_C_t,i ; k_R_t]          (17)
    o_t,i = sum_j softmax_j(q_t,i . k_j,i / sqrt(dn + dr)) v_C_j,i  (18)   u = W_O o    (19)
The published weights (and so this code) also RMS-normalise c_KV and c_Q.
With r_q = None (V2-Lite) the query is projected from h directly: q_C = W_UQ h, q_R = W_QR h.

Two ways to compute the same scores:
  * expanded (training, prefill): k_C and v_C are materialised per head for every key;
  * absorbed (decode): W_UK folds into the query and W_UV into the output, so attention runs
    against the cached latents [c_KV | k_R] (C + R numbers per token) and never expands them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels.attention import expanded_attention
from deepseek_jax.kernels.decode import latent_decode
from deepseek_jax.model.attention import attend
from deepseek_jax.model.layers import RMSNorm, weight
from deepseek_jax.model.rope import apply_rope, softmax_scale
from deepseek_jax.parallel.rules import constrain

# Logical axes of MLA's activations (the one rules table, parallel/rules.py): per-head arrays
# [B, T, H, *] (queries, keys, values, the attention output before W_O) split their heads as
# the weights that make them do; the latent c_KV [B, T, C] is whole wherever its rows are.
PER_HEAD = ("batch", "length", "act_heads", "act_head_dim")
LATENT = ("batch", "length", "act_kv_lora")


class MLA(nn.Module):
    """MLA over x [B, T, D]. Returns the output [B, T, D] and the latent cache of this call.

    `cache` None: expanded attention among the T positions, causal by index and confined to
    a document by `segment_ids` [B, T] (packed sequences); the returned latents [B, T, C + R]
    are what a prefill writes to the cache.
    `cache` [B, S, C + R]: the new latents are written at `positions` (cache index = position),
    then absorbed attention over the slots up to each query's position; returns the updated
    cache. Both read keys in blocks of `cfg.attention_block_size` once S exceeds it
    (`model/attention.py`), so no [B, H, T, S] array exists.
    """

    cfg: ModelConfig
    mesh: Mesh | None = None  # activation layouts; where a kernel (cfg.kernels) runs per shard

    def setup(self):
        cfg = self.cfg
        d, h, c = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
        n, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q_in, q_axis = d, "embed"
        if cfg.q_lora_rank is not None:
            q_in, q_axis = cfg.q_lora_rank, "q_lora"
            self.w_dq = weight(self, "w_dq", cfg, (d, q_in), ("embed", "q_lora"))
            self.q_norm = RMSNorm(cfg, axis_name="q_lora")
        self.w_uq = weight(self, "w_uq", cfg, (q_in, h, n), (q_axis, "heads", "head_dim"))
        self.w_qr = weight(self, "w_qr", cfg, (q_in, h, r), (q_axis, "heads", "head_dim"))
        self.w_dkv = weight(self, "w_dkv", cfg, (d, c), ("embed", "kv_lora"))
        self.w_kr = weight(self, "w_kr", cfg, (d, r), ("embed", "head_dim"))
        self.kv_norm = RMSNorm(cfg, axis_name="kv_lora")
        self.w_uk = weight(self, "w_uk", cfg, (c, h, n), ("kv_lora", "heads", "head_dim"))
        self.w_uv = weight(self, "w_uv", cfg, (c, h, v), ("kv_lora", "heads", "head_dim"))
        self.w_o = weight(self, "w_o", cfg, (h, v, d), ("heads", "head_dim", "embed"))

    def queries(self, x_BTD, cos, sin):
        """q_C [B, T, H, N] and roped q_R [B, T, H, R]: equations (12), (13), (14)."""
        c_q = x_BTD
        if self.cfg.q_lora_rank is not None:
            c_q = self.q_norm(x_BTD @ self.w_dq)  # BTQ
        q_c = jnp.einsum("BTQ,QHN->BTHN", c_q, self.w_uq)
        q_r = apply_rope(jnp.einsum("BTQ,QHR->BTHR", c_q, self.w_qr), cos, sin)
        return self.heads(q_c), self.heads(q_r)

    def heads(self, x_BTH_):
        """A per-head activation [B, T, H, *] laid out by the rules (PER_HEAD)."""
        return constrain(x_BTH_, self.mesh, PER_HEAD)

    def latents(self, x_BTD, cos, sin):
        """[c_KV | k_R] of shape [B, T, C + R]: equations (9) and (15), the cached numbers."""
        c_kv = constrain(self.kv_norm(x_BTD @ self.w_dkv), self.mesh, LATENT)  # BTC
        k_r = apply_rope(x_BTD @ self.w_kr, cos, sin)  # BTR
        return jnp.concatenate([c_kv, k_r], axis=-1)

    def __call__(self, x_BTD, cos, sin, positions_BT, segment_ids_BT=None, cache=None):
        cfg = self.cfg
        c, block = cfg.kv_lora_rank, cfg.attention_block_size
        scale = softmax_scale(cfg)
        q_c, q_r = self.queries(x_BTD, cos, sin)
        new_latents = self.latents(x_BTD, cos, sin)

        if cache is None:
            with jax.named_scope("mla_expanded"):
                c_kv, k_r = new_latents[..., :c], new_latents[..., c:]
                k_c = self.heads(jnp.einsum("BSC,CHN->BSHN", c_kv, self.w_uk))  # (10)
                v_c = self.heads(jnp.einsum("BSC,CHV->BSHV", c_kv, self.w_uv))  # (11)
                q = jnp.concatenate([q_c, q_r], axis=-1)  # (16)
                k_r = jnp.broadcast_to(k_r[:, :, None], (*k_c.shape[:3], k_r.shape[-1]))
                k = jnp.concatenate([k_c, k_r], axis=-1)  # (17)
                # Causal by index: packed documents restart their positions, segments split them.
                index_BT = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])

                def plain(q, k, v_c, segments_BT):  # (18), in blocks once T passes one
                    if segment_ids_BT is None:  # one document a row: causality alone
                        segments_BT = None
                    return attend(
                        q, k, v_c, scale=scale, q_positions_BT=index_BT,
                        segment_ids_BT=segments_BT, block=block,
                    )  # fmt: skip

                # Kernels by platform (kernels/attention.py) take segment ids always.
                segments = jnp.zeros(x_BTD.shape[:2], jnp.int32)
                if segment_ids_BT is not None:
                    segments = segment_ids_BT
                o = expanded_attention(
                    self.cfg.kernels, q, k, v_c, segments, scale, plain, self.mesh
                )
            return jnp.einsum("BTHV,HVD->BTD", self.heads(o), self.w_o), new_latents  # (19)

        with jax.named_scope("mla_absorbed"):
            rows = jnp.arange(x_BTD.shape[0])[:, None]
            cache = cache.at[rows, positions_BT].set(new_latents.astype(cache.dtype))
            q_latent = self.heads(jnp.einsum("BTHN,CHN->BTHC", q_c, self.w_uk))  # W_UK into q

            def plain(q_latent, q_r, cache, lengths_B):
                # [q W_UK | q_R] . [c_KV | k_R] = q_C . k_C + q_R . k_R: (18)'s scores, read
                # from the latents in blocks; the values are the c_KV part of the same latents,
                # kept from the output: slicing the values would copy [B, S, C] every step.
                latents_BS1L = cache[:, :, None].astype(x_BTD.dtype)  # one key head for all
                return attend(
                    jnp.concatenate([q_latent, q_r], axis=-1),
                    latents_BS1L,
                    latents_BS1L,
                    scale=scale,
                    q_positions_BT=positions_BT,
                    block=block,
                )[..., :c]

            if x_BTD.shape[1] == 1:  # one query per row (decode): row b sees slots 0..position
                lengths = positions_BT[:, 0] + 1
                o_latent = latent_decode(
                    self.cfg.kernels, q_latent, q_r, cache, lengths, scale, plain, self.mesh
                )
            else:
                o_latent = plain(q_latent, q_r, cache, None)
            o = jnp.einsum("BTHC,CHV->BTHV", o_latent, self.w_uv)  # W_UV absorbed into output
        return jnp.einsum("BTHV,HVD->BTD", self.heads(o), self.w_o), cache
