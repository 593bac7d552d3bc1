"""`subspax.projected_by_name`: choosing the projected parameters by name, as
PyTorch's `optim_target_modules` / `--target_modules` do."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import subspax

PARAMS = {
    "blocks": {"attn": {"q": {"kernel": jnp.ones((8, 8))},
                        "v": {"kernel": jnp.ones((8, 8))}},
               "attn_norm": {"scale": jnp.ones(8)},
               "mlp": {"up": {"kernel": jnp.ones((8, 16))},
                       "up_proj": {"kernel": jnp.ones((8, 16))}}},
    "embed": {"embedding": jnp.ones((64, 8))},
}


def selected(patterns):
  rule = subspax.projected_by_name(patterns)
  return sorted(subspax.path_name(path)
                for path, p in jax.tree_util.tree_flatten_with_path(PARAMS)[0]
                if rule(path, p))


@pytest.mark.parametrize("patterns, names", [
    # Whole words, as many as the pattern has, anywhere in the path.
    ("attn", ["blocks.attn.q.kernel", "blocks.attn.v.kernel"]),
    ("mlp.up", ["blocks.mlp.up.kernel"]),
    (["attn.q", "embed"], ["blocks.attn.q.kernel", "embed.embedding"]),
    # A glob matches the whole name; a regex is searched in it.
    ("*up*", ["blocks.mlp.up.kernel", "blocks.mlp.up_proj.kernel"]),
    ("blocks.*.kernel", ["blocks.attn.q.kernel", "blocks.attn.v.kernel",
                         "blocks.mlp.up.kernel", "blocks.mlp.up_proj.kernel"]),
    ("re:(q|v)\\.kernel$", ["blocks.attn.q.kernel", "blocks.attn.v.kernel"]),
    # A 1-D scale inside a matched module is never projected.
    ("attn_norm", []),
    ("attn, mlp", ["blocks.attn.q.kernel", "blocks.attn.v.kernel",
                   "blocks.mlp.up.kernel", "blocks.mlp.up_proj.kernel"]),
])
def test_patterns_select_by_name(patterns, names):
  assert selected(patterns) == names


@pytest.mark.parametrize("patterns, error, message", [
    ("", ValueError, "no pattern"),
    ([" ", ""], ValueError, "no pattern"),
    ("re:(q", ValueError, "not a valid regular expression"),
    ("attn..q", ValueError, "empty part"),
    (3, TypeError, "string or a sequence of strings"),
    (["attn", 3], TypeError, "string or a sequence of strings"),
])
def test_bad_patterns_raise_and_name_the_fix(patterns, error, message):
  with pytest.raises(error, match=message):
    subspax.projected_by_name(patterns)


def test_the_optimizer_projects_exactly_the_named_parameters():
  """GaLore on the selection: the named kernels get reduced states, the
  rest full Adam, and its update equals the one of a hand-written tree."""
  by_name = subspax.galore(1e-2, rank=2, update_interval=5,
                           projected=subspax.projected_by_name("attn.q,mlp"))
  by_tree = subspax.galore(1e-2, rank=2, update_interval=5, projected={
      "blocks": {"attn": {"q": True, "v": False}, "attn_norm": False,
                 "mlp": True},
      "embed": False})
  grads = jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(p.size), p.shape), PARAMS)
  state_a, state_b = by_name.init(PARAMS), by_tree.init(PARAMS)
  assert subspax.state_bytes(state_a) == subspax.state_bytes(state_b)
  assert subspax.state_bytes(state_a) < subspax.state_bytes(optax.adam(1e-2).init(PARAMS))
  up_a, _ = jax.jit(by_name.update)(grads, state_a, PARAMS)
  up_b, _ = jax.jit(by_tree.update)(grads, state_b, PARAMS)
  jax.tree.map(np.testing.assert_array_equal, up_a, up_b)
