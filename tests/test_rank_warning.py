"""A rank that saves nothing on a matrix is reported, naming the parameter."""

import warnings

import jax.numpy as jnp
import optax
import pytest

import subspax

PARAMS = {"w": jnp.zeros((256, 512)), "b": jnp.zeros((512,)),
          "embed": jnp.zeros((8192, 256))}


def _warnings(tx, params=PARAMS):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = tx.init(params)
    tx.update(params, state, params)
  return [str(w.message) for w in caught if w.category is UserWarning]


def test_default_rule_reports_a_matrix_left_to_adam_for_its_rank():
  messages = _warnings(subspax.subtrack(1e-3, rank=1000))
  # Once per parameter, though the router runs at init and at every update;
  # the vector and the embedding (left out for its shape) are not reported.
  assert len(messages) == 1, messages
  assert "['w']" in messages[0] and "256 x 512" in messages[0]
  assert "plain Adam" in messages[0] and "below 256" in messages[0]


def test_projected_matrix_with_too_large_a_rank_names_the_parameter():
  params = {"w": jnp.zeros((256, 512))}
  tx = subspax.galore(1e-3, rank=256, projected=True)
  messages = _warnings(tx, params)
  assert len(messages) == 1, messages
  assert "projected parameter ['w']" in messages[0]
  assert "larger than Adam's" in messages[0]
  # Larger than Adam's state indeed: the warning says why it matters.
  assert (subspax.state_bytes(tx.init(params))
          > subspax.state_bytes(optax.adam(1e-3).init(params)))


@pytest.mark.parametrize("tx", [
    subspax.subtrack(1e-3, rank=128),
    subspax.grass(1e-3, rank=128, projected=True),
    subspax.apollo_mini(1e-3, projected={"w": True, "b": False,
                                         "embed": False}),
], ids=["default", "projected", "tree"])
def test_a_rank_below_every_smaller_side_is_silent(tx):
  assert _warnings(tx, {"w": PARAMS["w"], "b": PARAMS["b"]}) == []
