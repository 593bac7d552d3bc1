"""A LLaMA decoder in Flax NNX.

RMSNorm, rotary position embeddings, causal multi-head (optionally grouped-query)
attention (`model.attention`: XLA's `jax.nn.dot_product_attention` or the
blockwise one of train/attention.py, linear in memory), a SwiGLU MLP and an untied LM
head. Every linear kernel is a plain 2-D (in, out) matrix; with `scan=True` the
blocks are stacked, so each kernel becomes an (L, in, out) array whose leading axis
the subspace optimizers treat as a batch axis (one subspace per layer).

With `model.kernel_format="int8"` the blocks' kernels are stored as
`subspax.QuantizedArray`s (int8 codes, one float32 absmax scale per block of
256 values of a row) and dequantized to `param_dtype` where a layer uses them:
inside the scan, one layer at a time. Norms, the embedding and the head keep
`param_dtype`.

Parameters carry logical sharding names (`embed`, `mlp`, `heads`, `vocab`, plus
`layers` for the scanned axis); `train/sharding.py` maps them to mesh axes.

Shape suffixes: B batch, L sequence length, D d_model, N query heads, K key/value
heads, H head dim, F MLP hidden size, V vocabulary, S stacked layers.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import subspax
from flax import nnx
from jax.sharding import PartitionSpec as P

from train import attention
from train import sharding

REPARAM_KINDS = ("", "rows", "dense")
KERNEL_FORMATS = ("float", "int8")  # model.kernel_format


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static model hyperparameters (see configs/base.py for the meaning of each)."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  kernel_format: str = "float"  # the blocks' kernels: "float" (param_dtype) or "int8"
  scan: bool = False
  remat: bool = False
  attention: str = "auto"  # train/attention.py: "auto", "blockwise" or "xla"
  attention_block: int = 512  # positions per block of "blockwise"
  reparam: str = ""  # "": plain kernels; "rows" (GRASS) / "dense" (RSO) deltas
  reparam_rank: int = 0  # rank r of the reduced deltas
  reparam_side: str = "auto"  # projected side of the reparametrised kernels

  @classmethod
  def from_config(cls, model_cfg: Any, vocab_size: int,
                  **reparam: Any) -> "LlamaConfig":
    """Builds the config from the `model` ConfigDict and the data's vocab size.

    `head_dim` 0 means d_model // n_heads and `n_kv_heads` 0 means n_heads.
    `reparam` sets the `reparam*` fields (the trainer derives them from the
    `opt` section: train/reparam.py).
    """
    n_kv_heads = model_cfg.n_kv_heads or model_cfg.n_heads
    head_dim = model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads
    if model_cfg.n_heads % n_kv_heads:
      raise ValueError(
          f"model.n_heads ({model_cfg.n_heads}) must be a multiple of "
          f"model.n_kv_heads ({n_kv_heads})"
      )
    return cls(
        vocab_size=vocab_size,
        d_model=model_cfg.d_model,
        n_layers=model_cfg.n_layers,
        n_heads=model_cfg.n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=model_cfg.d_ff,
        rope_theta=model_cfg.rope_theta,
        norm_eps=model_cfg.norm_eps,
        init_std=model_cfg.init_std,
        dtype=model_cfg.dtype,
        param_dtype=model_cfg.param_dtype,
        kernel_format=model_cfg.get("kernel_format", cls.kernel_format),
        scan=model_cfg.scan,
        remat=model_cfg.remat,
        attention=model_cfg.get("attention", cls.attention),
        attention_block=model_cfg.get("attention_block", cls.attention_block),
        **reparam,
    )

  def projected_dims(self) -> dict[str, tuple[int, int]]:
    """(in, out) of every per-layer kernel a subspace optimizer would project."""
    d, q, kv = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
    return {
        "attn.q": (d, q), "attn.k": (d, kv), "attn.v": (d, kv), "attn.o": (q, d),
        "mlp.gate": (d, self.d_ff), "mlp.up": (d, self.d_ff), "mlp.down": (self.d_ff, d),
    }


def _linear(cfg: LlamaConfig, d_in: int, d_out: int, names: tuple[str, str],
            rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
  """A bias-free (in, out) linear layer with logical sharding names."""
  init = nnx.initializers.normal(cfg.init_std)
  return nnx.Linear(
      d_in, d_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      kernel_init=nnx.with_partitioning(init, names), rngs=rngs, **kwargs)


class QuantizedLinear(nnx.Linear):
  """A bias-free linear layer whose kernel is stored in int8.

  Initialised as ``nnx.Linear`` and then quantized (`subspax.quantize`,
  "linear" levels: absmax int8 per block of 256 values of a row). The call
  dequantizes the kernel to ``param_dtype`` first; given a float kernel
  instead (the layer-wise step differentiates the dequantized weights), it
  is a plain ``nnx.Linear``.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.kernel.set_value(subspax.quantize(self.kernel.get_value(), "linear"))

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel.get_value()
    if isinstance(kernel, subspax.QuantizedArray):
      kernel = subspax.dequantize(kernel).astype(self.param_dtype)
    x, kernel = self.promote_dtype((x, kernel), dtype=self.dtype)
    extra = {} if self.preferred_element_type is None else {
        "preferred_element_type": self.preferred_element_type}
    return self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision, **extra)


def is_quantized(x: Any) -> bool:
  """Whether a parameter tree's node is an int8 kernel (`QuantizedArray`)."""
  return isinstance(x, subspax.QuantizedArray)


def as_float(tree: Any, dtype: Any) -> Any:
  """`tree` with every int8 kernel seen as the float parameter it stands for.

  Examples:
    `as_float(params, jnp.bfloat16)` dequantizes (one layer's params inside
    the scan); `as_float(shapes, "bfloat16")` gives `jax.ShapeDtypeStruct`s
    and `as_float(shardings, None)` the codes' shardings (what an optimizer
    of the float parameters is built from).

  Args:
    tree: Parameters (arrays), their `jax.ShapeDtypeStruct`s or shardings.
    dtype: The float dtype (`model.param_dtype`) of dequantized kernels.

  Returns:
    The tree with each `QuantizedArray` node replaced by one leaf: the
    dequantized array in `dtype`, a `jax.ShapeDtypeStruct` of its shape in
    `dtype`, or the codes' sharding.
  """
  def view(x):
    if not is_quantized(x):
      return x
    if isinstance(x.codes, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.codes.shape, dtype, sharding=x.codes.sharding)
    if isinstance(x.codes, jax.sharding.Sharding):
      return x.codes
    return subspax.dequantize(x).astype(dtype)
  return jax.tree.map(view, tree, is_leaf=is_quantized)


def quantize_like(params: dict, like: dict) -> dict:
  """Float `params` quantized (to nearest) where `like` holds int8 kernels.

  Args:
    params: Parameters in the layout of a float model (e.g. an imported
      checkpoint's).
    like: The int8 model's parameters or shapes (`abstract_model`).

  Returns:
    `params` in `like`'s layout.
  """
  return jax.tree.map(
      lambda l, p: subspax.quantize(p, l.mode) if is_quantized(l) else p,
      like, params, is_leaf=is_quantized)


class SubspaceBasis(nnx.Variable):
  """A non-trainable subspace of a reparametrised kernel (chosen at refresh)."""


class FrozenKernel(nnx.Variable):
  """A reparametrised layer's kernel ``W``: frozen between refreshes, where its
  delta is merged into it. A model weight, but not trained by the step."""


class SubspaceDelta(nnx.Param):
  """A reparametrised layer's trainable reduced delta ``(r, D)``."""


# Filters on the variable types (`nnx.split`, `nnx.state`, `partition`).
TRAINABLE = nnx.Param  # what the train step differentiates and updates
FROZEN = nnx.Not(TRAINABLE)  # frozen kernels and bases: refreshed, not trained
# The model's weights: what a plain model of the same shape holds (the deltas
# merged into the kernels), without the training-only deltas and bases.
WEIGHTS = nnx.Not(nnx.Any(SubspaceDelta, SubspaceBasis))


class SubspaceLinear(nnx.Linear):
  """A bias-free linear layer whose kernel trains through a reduced delta.

  ``y = x (W + back(Delta))`` computed as in :mod:`subspax.reparam`: ``W``
  (``kernel``, a :class:`FrozenKernel`) is frozen between refreshes,
  ``delta`` (``(r, D)``, a :class:`SubspaceDelta`) is the trainable part, and
  the basis (:class:`SubspaceBasis`) is a GRASS row selector
  (``subspace_index``, ``subspace_scale``) or an RSO dense basis
  (``subspace_basis``, ``(d, r)``). The kernel is initialised exactly as by
  ``nnx.Linear``.
  """

  def __init__(self, cfg: LlamaConfig, d_in: int, d_out: int,
               names: tuple[str, str], rngs: nnx.Rngs, **kwargs):
    init = nnx.initializers.normal(cfg.init_std)
    super().__init__(
        d_in, d_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nnx.with_partitioning(init, names), rngs=rngs, **kwargs)
    self.kernel = FrozenKernel(self.kernel[...], **self.kernel.get_metadata())
    r = cfg.reparam_rank
    self.side = subspax.reparam.resolve_side(d_in, d_out, cfg.reparam_side)
    projected_name, kept_name = names if self.side == "left" else names[::-1]
    d = d_in if self.side == "left" else d_out
    self.kind = cfg.reparam
    self.delta = SubspaceDelta(
        jnp.zeros(subspax.reparam.delta_shape(d_in, d_out, r, self.side),
                  cfg.param_dtype), out_sharding=(None, kept_name))
    if cfg.reparam == "rows":
      self.subspace_index = SubspaceBasis(jnp.zeros((r,), jnp.int32),
                                          out_sharding=(None,))
      self.subspace_scale = SubspaceBasis(jnp.zeros((r,), jnp.float32),
                                          out_sharding=(None,))
    else:
      self.subspace_basis = SubspaceBasis(jnp.zeros((d, r), jnp.float32),
                                          out_sharding=(projected_name, None))

  def basis(self) -> subspax.reparam.Basis:
    """The current basis as a subspax ``RowBasis`` / ``DenseBasis``."""
    if self.kind == "rows":
      return subspax.RowBasis(self.subspace_index[...], self.subspace_scale[...])
    return subspax.DenseBasis(self.subspace_basis[...])

  def layer(self) -> subspax.reparam.SubspaceLayer:
    """Kernel, delta and basis, as :mod:`subspax.reparam` refreshes them."""
    return subspax.reparam.SubspaceLayer(self.kernel[...], self.delta[...],
                                         self.basis())

  def set_layer(self, layer: subspax.reparam.SubspaceLayer) -> None:
    """Sets a refreshed layer (merged kernel, zero delta, new basis)."""
    self.kernel.set_value(layer.kernel)
    self.delta.set_value(layer.delta)
    if self.kind == "rows":
      self.subspace_index.set_value(layer.basis.index)
      self.subspace_scale.set_value(layer.basis.scale)
    else:
      self.subspace_basis.set_value(layer.basis.s)

  def __call__(self, x: jax.Array) -> jax.Array:
    return subspax.reparam.dense(
        x.astype(self.dtype), self.kernel[...], self.delta[...], self.basis(),
        side=self.side)


def _projected_linear(cfg: LlamaConfig, d_in: int, d_out: int,
                      names: tuple[str, str], rngs: nnx.Rngs):
  """An attention / MLP kernel: reparametrised when `cfg.reparam` is set,
  int8 with `cfg.kernel_format="int8"`."""
  if cfg.reparam:
    return SubspaceLinear(cfg, d_in, d_out, names, rngs)
  if cfg.kernel_format == "int8":
    init = nnx.initializers.normal(cfg.init_std)
    return QuantizedLinear(
        d_in, d_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nnx.with_partitioning(init, names), rngs=rngs)
  return _linear(cfg, d_in, d_out, names, rngs)


def _rms_norm(cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  """RMSNorm over d_model, computed in float32."""
  return nnx.RMSNorm(
      cfg.d_model, epsilon=cfg.norm_eps, dtype=jnp.float32,
      param_dtype=cfg.param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
      rngs=rngs)


def rotary(x_BxLxNxH: jax.Array, theta: float, start: jax.Array | int = 0
           ) -> jax.Array:
  """Applies rotary position embeddings (rotate-half form) along the L axis,
  whose first position is `start` (a decoding step's offset)."""
  seq_len, head_dim = x_BxLxNxH.shape[1], x_BxLxNxH.shape[3]
  half = head_dim // 2
  freq_H2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  position_L = start + jnp.arange(seq_len, dtype=jnp.float32)
  angle_LxH2 = position_L[:, None] * freq_H2[None, :]
  sin_1xLx1xH2 = jnp.sin(angle_LxH2)[None, :, None, :]
  cos_1xLx1xH2 = jnp.cos(angle_LxH2)[None, :, None, :]
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate(
      [x1 * cos_1xLx1xH2 - x2 * sin_1xLx1xH2, x2 * cos_1xLx1xH2 + x1 * sin_1xLx1xH2],
      axis=-1)
  return out.astype(x_BxLxNxH.dtype)


class KVCache(NamedTuple):
  """One layer's keys and values of the positions decoded so far (rotated)."""

  k_BxTxKxH: jax.Array  # shape=(B, T, K, H), T the longest sequence decoded
  v_BxTxKxH: jax.Array  # shape=(B, T, K, H)


class Attention(nnx.Module):
  """Causal self-attention with rotary embeddings and optional grouped queries."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.q = _projected_linear(cfg, d, n * h, ("embed", "heads"), rngs)
    self.k = _projected_linear(cfg, d, k * h, ("embed", "heads"), rngs)
    self.v = _projected_linear(cfg, d, k * h, ("embed", "heads"), rngs)
    self.o = _projected_linear(cfg, n * h, d, ("heads", "embed"), rngs)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, seq_len, _ = x_BxLxD.shape
    q_BxLxNxH = self.q(x_BxLxD).reshape(b, seq_len, cfg.n_heads, cfg.head_dim)
    k_BxLxKxH = self.k(x_BxLxD).reshape(b, seq_len, cfg.n_kv_heads, cfg.head_dim)
    v_BxLxKxH = self.v(x_BxLxD).reshape(b, seq_len, cfg.n_kv_heads, cfg.head_dim)
    q_BxLxNxH = rotary(q_BxLxNxH, cfg.rope_theta)
    k_BxLxKxH = rotary(k_BxLxKxH, cfg.rope_theta)
    out_BxLxNxH = attention.attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH,
                                   kind=cfg.attention, block_size=cfg.attention_block)
    return self.o(out_BxLxNxH.reshape(b, seq_len, cfg.n_heads * cfg.head_dim))

  def decode(self, x_BxLxD: jax.Array, cache: "KVCache", start: jax.Array
             ) -> tuple[jax.Array, "KVCache"]:
    """Attention of positions `start .. start + L - 1` to themselves and to the
    keys and values of the earlier positions in `cache`, which it extends."""
    cfg = self.cfg
    b, seq_len, _ = x_BxLxD.shape
    q_BxLxNxH = self.q(x_BxLxD).reshape(b, seq_len, cfg.n_heads, cfg.head_dim)
    k_BxLxKxH = self.k(x_BxLxD).reshape(b, seq_len, cfg.n_kv_heads, cfg.head_dim)
    v_BxLxKxH = self.v(x_BxLxD).reshape(b, seq_len, cfg.n_kv_heads, cfg.head_dim)
    q_BxLxNxH = rotary(q_BxLxNxH, cfg.rope_theta, start)
    k_BxLxKxH = rotary(k_BxLxKxH, cfg.rope_theta, start)
    at = (0, start, 0, 0)
    cache = KVCache(
        jax.lax.dynamic_update_slice(cache.k_BxTxKxH, k_BxLxKxH.astype(
            cache.k_BxTxKxH.dtype), at),
        jax.lax.dynamic_update_slice(cache.v_BxTxKxH, v_BxLxKxH.astype(
            cache.v_BxTxKxH.dtype), at))
    total = cache.k_BxTxKxH.shape[1]
    visible_LxT = (jnp.arange(total)[None, :]
                   <= start + jnp.arange(seq_len)[:, None])  # causal, cache-wide
    out_BxLxNxH = jax.nn.dot_product_attention(
        q_BxLxNxH, cache.k_BxTxKxH.astype(q_BxLxNxH.dtype),
        cache.v_BxTxKxH.astype(q_BxLxNxH.dtype), mask=visible_LxT[None, None])
    return self.o(out_BxLxNxH.reshape(b, seq_len, cfg.n_heads * cfg.head_dim)), cache


class Mlp(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate = _projected_linear(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
    self.up = _projected_linear(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
    self.down = _projected_linear(cfg, cfg.d_ff, cfg.d_model, ("mlp", "embed"), rngs)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD))


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.attn_norm = _rms_norm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = _rms_norm(cfg, rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x_BxLxD = sharding.split_batch(x_BxLxD)
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD).astype(self.dtype))
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD).astype(self.dtype))

  def decode(self, x_BxLxD: jax.Array, cache: KVCache, start: jax.Array
             ) -> tuple[jax.Array, KVCache]:
    """`__call__` for positions `start ..`, attending to `cache` (extended)."""
    attn_BxLxD, cache = self.attn.decode(
        self.attn_norm(x_BxLxD).astype(self.dtype), cache, start)
    x_BxLxD = x_BxLxD + attn_BxLxD
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD).astype(self.dtype)), cache


def _block_key(key: jax.Array, layer: jax.Array) -> nnx.Rngs:
  """Per-layer init stream: identical whether the layers are scanned or not."""
  return nnx.Rngs(params=jax.random.fold_in(key, layer))


def _stacked_blocks(cfg: "LlamaConfig", block_key: jax.Array) -> "Block":
  """The `cfg.n_layers` blocks stacked along a leading "layers" axis.

  Float kernels are made for all layers at once (`nnx.vmap`). int8 kernels
  are made one layer at a time (`nnx.scan` over the layers, each quantized
  where it is made): made at once, every layer's float kernels
  would exist before any is quantized, the model-wide float copy the int8
  format exists to avoid (13B: 24 GiB at init on an H100). Both draw the
  same values, each layer from its own key (`_block_key`).
  """
  stack = nnx.scan if cfg.kernel_format == "int8" else nnx.vmap
  make = stack(lambda layer: Block(cfg, rngs=_block_key(block_key, layer)),
               in_axes=0, out_axes=0,
               transform_metadata={nnx.PARTITION_NAME: "layers"})
  return make(jnp.arange(cfg.n_layers))


class Llama(nnx.Module):
  """LLaMA decoder: token ids (B, L) -> float32 logits (B, L, V)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(cfg.init_std)
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nnx.with_partitioning(init, ("vocab", "embed")), rngs=rngs)
    block_key = rngs.params()
    if cfg.scan:
      self.blocks = _stacked_blocks(cfg, block_key)
    else:
      self.blocks = nnx.List(
          [Block(cfg, rngs=_block_key(block_key, jnp.asarray(i)))
           for i in range(cfg.n_layers)])
    self.final_norm = _rms_norm(cfg, rngs)
    self.head = _linear(cfg, cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs,
                        preferred_element_type=jnp.float32)

  def embed_tokens(self, tokens_BxL: jax.Array) -> jax.Array:
    """The residual stream's input: token ids (B, L) -> (B, L, D)."""
    return self.embed(tokens_BxL)

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """The last block's output (B, L, D) -> float32 logits (B, L, V)."""
    x_BxLxD = self.final_norm(x_BxLxD).astype(self.cfg.dtype)
    return self.head(x_BxLxD).astype(jnp.float32)

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    cfg = self.cfg
    x_BxLxD = self.embed_tokens(tokens_BxL)

    def apply_block(x_BxLxD: jax.Array, block: Block) -> jax.Array:
      return block(x_BxLxD)

    if cfg.remat:
      apply_block = nnx.remat(apply_block)
    if cfg.scan:
      x_BxLxD = nnx.scan(
          apply_block, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
          transform_metadata={nnx.PARTITION_NAME: "layers"})(x_BxLxD, self.blocks)
    else:
      for block in self.blocks:
        x_BxLxD = apply_block(x_BxLxD, block)
    return self.logits(x_BxLxD)

  def decode(self, tokens_BxL: jax.Array, caches: list[KVCache], start: jax.Array
             ) -> tuple[jax.Array, list[KVCache]]:
    """Logits of tokens at positions `start ..` given the layers' caches of the
    positions before (an unscanned model; train/generate.py).

    Returns:
      float32 logits (B, L, V) and the caches extended by these positions.
    """
    if self.cfg.scan:
      raise ValueError("decode needs an unscanned model (scan=False)")
    x_BxLxD = self.embed_tokens(tokens_BxL)
    new_caches = []
    for block, cache in zip(self.blocks, caches):
      x_BxLxD, cache = block.decode(x_BxLxD, cache, start)
      new_caches.append(cache)
    return self.logits(x_BxLxD), new_caches


def abstract_model(cfg: LlamaConfig) -> tuple[nnx.GraphDef, dict, dict]:
  """Shapes and logical sharding names of the parameters, without allocating.

  Returns:
    (graphdef, shapes, names): the model's static graph, a nested dict of
    `jax.ShapeDtypeStruct` and a nested dict of `PartitionSpec`s of logical axis
    names, both in the layout `init_params` returns.
  """
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  is_var = lambda x: isinstance(x, nnx.Variable)
  shapes = nnx.to_pure_dict(jax.tree.map(
      lambda v: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                             v.get_value()), state, is_leaf=is_var))
  names = nnx.to_pure_dict(jax.tree.map(_names, state, is_leaf=is_var))
  return graphdef, shapes, names


def _names(variable: nnx.Variable) -> Any:
  """A variable's logical names: an int8 kernel's scales share its codes'
  names but the last (their blocks), which is not sharded."""
  names = tuple(variable.get_metadata().get("out_sharding") or ())
  value = variable.get_value()
  if is_quantized(value):
    return subspax.QuantizedArray(P(*names), P(*names[:-1], None), value.mode,
                                  value.signed)
  return P(*names)


def init_params(cfg: LlamaConfig, seed: int) -> dict:
  """Initialises the parameters as a nested dict of arrays (jit this)."""
  with nnx.use_eager_sharding(False):
    model = Llama(cfg, rngs=nnx.Rngs(seed))
  return nnx.to_pure_dict(nnx.state(model))


def apply(graphdef: nnx.GraphDef, params: dict, tokens_BxL: jax.Array) -> jax.Array:
  """Runs the model functionally: (params, tokens (B, L)) -> logits (B, L, V)."""
  return nnx.merge(graphdef, params)(tokens_BxL)


def partition(graphdef: nnx.GraphDef, tree: dict,
              *filters: Any) -> tuple[dict, ...]:
  """Splits a tree in the layout of the model's state by variable type.

  Examples:
    `trainable, frozen = partition(graphdef, params, TRAINABLE, ...)`;
    `weights, = partition(graphdef, params, WEIGHTS)` (one filter: only what
    it selects).

  Args:
    graphdef: The model's graph (`abstract_model`).
    tree: A nested dict of the model's state (`init_params`): arrays, or
      anything per variable (`jax.ShapeDtypeStruct`s, shardings).
    *filters: nnx filters (variable types, `nnx.Not`, `...`); a variable goes
      to the first that matches.

  Returns:
    One nested dict per filter (empty when nothing matches).
  """
  states = nnx.state(nnx.merge(graphdef, tree), *filters)
  states = states if len(filters) > 1 else (states,)
  return tuple(nnx.to_pure_dict(state) for state in states)


def combine(*trees: dict) -> dict:
  """Inverse of `partition`: the nested dicts merged into one."""
  out: dict = {}
  for tree in trees:
    for key, value in tree.items():
      out[key] = combine(out.get(key, {}), value) if isinstance(value, dict) else value
  return out


def trainable(graphdef: nnx.GraphDef, tree: dict) -> dict:
  """The `TRAINABLE` part of `tree` (all of it for a plain model)."""
  return partition(graphdef, tree, TRAINABLE)[0]


def count_params(cfg: LlamaConfig) -> int:
  """Number of model weights (`WEIGHTS`: the deltas and bases of
  reparametrised layers, training state rather than weights, are not
  counted). Nothing is allocated; works under any mesh."""
  def weights() -> dict:
    with nnx.use_eager_sharding(False):
      return nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), WEIGHTS))
  leaves = jax.tree.leaves(jax.eval_shape(weights), is_leaf=is_quantized)
  return sum(math.prod(x.shape) for x in leaves)
