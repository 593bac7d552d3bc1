"""Causal grouped-query attention whose memory is linear in the sequence length.

`model.attention` picks the implementation (`attend`):

* "auto" (the default): "blockwise" where a sequence is longer than one block
  (`model.attention_block`), "xla" otherwise. At such lengths the L x L
  scores are no larger than one block's, and XLA's fused attention is the
  faster of the two on the CPU.
* "xla": `jax.nn.dot_product_attention(is_causal=True)`, which without an
  `implementation` is XLA's attention on every platform (jax 0.10): it builds
  the B x N x L x L scores, and their gradient, at once.
* "blockwise": `blockwise_attention`, the online-softmax attention of
  FlashAttention (-2) written in plain `jax.lax` loops, so every XLA compiler
  runs it. The sequence is cut into blocks of `model.attention_block`
  positions; a query block visits the key blocks up to the diagonal, keeping a
  running maximum, normaliser and weighted sum. A custom VJP keeps only q, k,
  v, the output and each row's log-sum-exp, and recomputes each block's scores
  in the backward pass. The largest temporary is one block of scores,
  B x N x block x block, so memory grows linearly with L.

References:
  Rabe & Staats, "Self-attention Does Not Need O(n^2) Memory",
  https://arxiv.org/abs/2112.05682. Dao et al., "FlashAttention",
  https://arxiv.org/abs/2205.14135. Dao, "FlashAttention-2",
  https://arxiv.org/abs/2307.08691.

Shape suffixes as in train/model.py (B batch, L length, N query heads, K
key/value heads, H head dim) plus G = N / K query heads per key/value head,
C blocks and Q / S the positions of a query / key block.
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp

Kind = Literal["auto", "xla", "blockwise"]
KINDS: tuple[str, ...] = ("auto", "xla", "blockwise")


def attend(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array, *,
           kind: Kind = "auto", block_size: int = 512) -> jax.Array:
  """Causal attention by the implementation `kind` (`model.attention`).

  Examples:
    >>> import jax.numpy as jnp
    >>> q = jnp.ones((1, 5, 4, 8)); kv = jnp.ones((1, 5, 2, 8))
    >>> attend(q, kv, kv, kind="blockwise", block_size=2).shape
    (1, 5, 4, 8)

  Args:
    q_BxLxNxH: Queries (rotated), (B, L, N, H).
    k_BxLxKxH: Keys (rotated), (B, L, K, H); N a multiple of K (grouped
      queries: query head n reads key/value head n // (N / K)).
    v_BxLxKxH: Values, (B, L, K, H).
    kind: "xla" (`jax.nn.dot_product_attention`), "blockwise"
      (`blockwise_attention`), or "auto": "blockwise" when L > `block_size`,
      "xla" otherwise.
    block_size: The block length of "blockwise" (ignored by "xla").

  Returns:
    The attention output, (B, L, N, H), in the queries' dtype.
  """
  if kind == "auto":
    kind = "blockwise" if q_BxLxNxH.shape[1] > block_size else "xla"
  if kind == "xla":
    return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH,
                                        is_causal=True)
  if kind == "blockwise":
    return blockwise_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, block_size)
  raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def blockwise_attention(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array,
                        v_BxLxKxH: jax.Array, block_size: int = 512) -> jax.Array:
  """Causal attention in blocks of `block_size` positions (linear memory).

  Equal to `jax.nn.dot_product_attention(q, k, v, is_causal=True)` up to
  rounding: scores and softmax statistics in float32, the probabilities cast
  to the values' dtype for their product with the values. A length that is
  not a multiple of the block is padded; the causal mask hides the padded keys
  from every real query. A sequence no longer than `block_size` is one block.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> q = jax.random.normal(jax.random.key(0), (2, 7, 4, 8))
    >>> k, v = jax.random.normal(jax.random.key(1), (2, 2, 7, 2, 8))
    >>> ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    >>> bool(jnp.allclose(blockwise_attention(q, k, v, 3), ref, atol=1e-5))
    True

  Args:
    q_BxLxNxH: Queries, (B, L, N, H).
    k_BxLxKxH: Keys, (B, L, K, H), with N a multiple of K.
    v_BxLxKxH: Values, (B, L, K, H).
    block_size: Positions per block (a positive int); the scores of one query
      block against one key block are the largest temporary.

  Returns:
    The attention output, (B, L, N, H), in the queries' dtype; differentiable
    (custom VJP that recomputes the scores block by block).
  """
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  n, kv = q_BxLxNxH.shape[2], k_BxLxKxH.shape[2]
  if n % kv:
    raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({kv})")
  return _blockwise(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH,
                    min(block_size, q_BxLxNxH.shape[1]))


def _to_blocks(x_BxLxR: jax.Array, block: int) -> jax.Array:
  """(B, L, ...) -> (C, B, block, ...), zero-padding L to C x block."""
  b, seq_len, *rest = x_BxLxR.shape
  count = -(-seq_len // block)
  pad = [(0, 0), (0, count * block - seq_len)] + [(0, 0)] * len(rest)
  x = jnp.pad(x_BxLxR, pad).reshape(b, count, block, *rest)
  return jnp.moveaxis(x, 1, 0)


def _from_blocks(x_CxBxQxR: jax.Array, seq_len: int) -> jax.Array:
  """(C, B, block, ...) -> (B, L, ...), dropping the padding."""
  count, b, block, *rest = x_CxBxQxR.shape
  return jnp.moveaxis(x_CxBxQxR, 0, 1).reshape(b, count * block, *rest)[:, :seq_len]


def _grouped_blocks(q_BxLxNxH: jax.Array, kv: int, block: int) -> jax.Array:
  """Queries (B, L, N, H) -> (C, B, Q, K, G, H) blocks, grouped per kv head."""
  b, seq_len, n, h = q_BxLxNxH.shape
  return _to_blocks(q_BxLxNxH.reshape(b, seq_len, kv, n // kv, h), block)


def _scores(q_BxQxKxGxH: jax.Array, k_BxSxKxH: jax.Array, i: jax.Array,
            j: jax.Array) -> jax.Array:
  """Scaled float32 scores of query block i against key block j, causally
  masked (-inf above the diagonal): (B, K, G, Q, S)."""
  block, h = q_BxQxKxGxH.shape[1], q_BxQxKxGxH.shape[-1]
  s_BxKxGxQxS = jnp.einsum("bqkgh,bskh->bkgqs", q_BxQxKxGxH, k_BxSxKxH,
                           preferred_element_type=jnp.float32) * h ** -0.5
  q_pos = i * block + jnp.arange(block)[:, None]
  k_pos = j * block + jnp.arange(block)[None, :]
  return jnp.where(k_pos <= q_pos, s_BxKxGxQxS, -jnp.inf)


def _forward(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, block):
  """Output (B, L, N, H) and per-row log-sum-exp (C, B, K, G, Q)."""
  seq_len, kv = q_BxLxNxH.shape[1], k_BxLxKxH.shape[2]
  q_CxBxQxKxGxH = _grouped_blocks(q_BxLxNxH, kv, block)
  k_CxBxSxKxH = _to_blocks(k_BxLxKxH, block)
  v_CxBxSxKxH = _to_blocks(v_BxLxKxH, block)

  def query_block(_, i_and_q):
    i, q_BxQxKxGxH = i_and_q

    def key_block(j, carry):
      max_BxKxGxQ, sum_BxKxGxQ, acc_BxKxGxQxH = carry
      s = _scores(q_BxQxKxGxH, k_CxBxSxKxH[j], i, j)
      new_max = jnp.maximum(max_BxKxGxQ, s.max(-1))
      p = jnp.exp(s - new_max[..., None])
      rescale = jnp.exp(max_BxKxGxQ - new_max)
      pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v_BxLxKxH.dtype),
                      v_CxBxSxKxH[j], preferred_element_type=jnp.float32)
      return (new_max, sum_BxKxGxQ * rescale + p.sum(-1),
              acc_BxKxGxQxH * rescale[..., None] + pv)

    b, _, kv_, g, h = q_BxQxKxGxH.shape
    stats = jnp.zeros((b, kv_, g, block), jnp.float32)
    init = (stats - jnp.inf, stats, jnp.zeros((b, kv_, g, block, h), jnp.float32))
    # Key block 0 is visible to every query, so the maximum is finite after it.
    max_, sum_, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
    out_BxQxKxGxH = jnp.einsum("bkgqh->bqkgh", acc / sum_[..., None])
    return None, (out_BxQxKxGxH.astype(q_BxLxNxH.dtype), max_ + jnp.log(sum_))

  count = q_CxBxQxKxGxH.shape[0]
  _, (out_CxBxQxKxGxH, lse_CxBxKxGxQ) = jax.lax.scan(
      query_block, None, (jnp.arange(count), q_CxBxQxKxGxH))
  out_BxLxNxH = _from_blocks(out_CxBxQxKxGxH, seq_len).reshape(q_BxLxNxH.shape)
  return out_BxLxNxH, lse_CxBxKxGxQ


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, block):
  return _forward(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, block)[0]


def _blockwise_fwd(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, block):
  out_BxLxNxH, lse = _forward(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, block)
  return out_BxLxNxH, (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, out_BxLxNxH, lse)


def _blockwise_bwd(block, residuals, dout_BxLxNxH):
  """FlashAttention-2's backward: per key block, the query blocks at and below
  the diagonal; dk, dv accumulate in the loop, dq in a float32 buffer."""
  q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, out_BxLxNxH, lse_CxBxKxGxQ = residuals
  seq_len, kv = q_BxLxNxH.shape[1], k_BxLxKxH.shape[2]
  h = q_BxLxNxH.shape[-1]
  q_CxBxQxKxGxH = _grouped_blocks(q_BxLxNxH, kv, block)
  do_CxBxQxKxGxH = _grouped_blocks(dout_BxLxNxH, kv, block)
  # delta = rowsum(dout * out), the softmax's correction term, per query row.
  delta_BxLxN = jnp.sum(dout_BxLxNxH.astype(jnp.float32)
                        * out_BxLxNxH.astype(jnp.float32), axis=-1)
  delta_CxBxKxGxQ = jnp.einsum("cbqkg->cbkgq",
                               _grouped_blocks(delta_BxLxN[..., None], kv, block)[..., 0])
  count = q_CxBxQxKxGxH.shape[0]

  def key_block(dq_CxBxQxKxGxH, j_k_v):
    j, k_BxSxKxH, v_BxSxKxH = j_k_v

    def query_block(i, carry):
      dq, dk_BxSxKxH, dv_BxSxKxH = carry
      q_BxQxKxGxH, do_BxQxKxGxH = q_CxBxQxKxGxH[i], do_CxBxQxKxGxH[i]
      p = jnp.exp(_scores(q_BxQxKxGxH, k_BxSxKxH, i, j)
                  - lse_CxBxKxGxQ[i][..., None])
      dv_BxSxKxH += jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do_BxQxKxGxH.dtype),
                               do_BxQxKxGxH, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqkgh,bskh->bkgqs", do_BxQxKxGxH, v_BxSxKxH,
                      preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_CxBxKxGxQ[i][..., None]) * h ** -0.5)
      dk_BxSxKxH += jnp.einsum("bkgqs,bqkgh->bskh", ds.astype(q_BxQxKxGxH.dtype),
                               q_BxQxKxGxH, preferred_element_type=jnp.float32)
      dq_i = jnp.einsum("bkgqs,bskh->bqkgh", ds.astype(k_BxSxKxH.dtype), k_BxSxKxH,
                        preferred_element_type=jnp.float32)
      return dq.at[i].add(dq_i), dk_BxSxKxH, dv_BxSxKxH

    zeros = jnp.zeros(k_BxSxKxH.shape, jnp.float32)
    dq_CxBxQxKxGxH, dk, dv = jax.lax.fori_loop(
        j, count, query_block, (dq_CxBxQxKxGxH, zeros, zeros))
    return dq_CxBxQxKxGxH, (dk, dv)

  dq_CxBxQxKxGxH, (dk_CxBxSxKxH, dv_CxBxSxKxH) = jax.lax.scan(
      key_block, jnp.zeros(q_CxBxQxKxGxH.shape, jnp.float32),
      (jnp.arange(count), _to_blocks(k_BxLxKxH, block), _to_blocks(v_BxLxKxH, block)))
  dq = _from_blocks(dq_CxBxQxKxGxH, seq_len).reshape(q_BxLxNxH.shape)
  return (dq.astype(q_BxLxNxH.dtype),
          _from_blocks(dk_CxBxSxKxH, seq_len).astype(k_BxLxKxH.dtype),
          _from_blocks(dv_CxBxSxKxH, seq_len).astype(v_BxLxKxH.dtype))


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
