"""subspax.testing: every policy and method of subspax through the kit."""

import jax
import jax.numpy as jnp
import pytest

import helpers
import subspax
import subspax.testing

POLICIES = {
    "svd": (subspax.SvdSubspace(), {}),
    "geodesic": (subspax.GeodesicSubspace(), {}),
    "geodesic_random_hybrid": (subspax.GeodesicSubspace(
        eta=0.3, step="angle", tangent="random", jump_prob=0.5), {}),
    "haar": (subspax.RandomSubspace(), {"unbiased_scale": lambda d, r: d / r}),
    "gaussian": (subspax.RandomSubspace(orthonormal=False),
                 {"unbiased_scale": 1.0}),
    "rows": (subspax.RowSubspace(), {}),
    "rows_with_replacement": (subspax.RowSubspace(replacement=True),
                              {"unbiased_scale": 1.0}),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_passes_the_kit(name):
  policy, kwargs = POLICIES[name]
  # The methods built on these policies run the transformation checks below.
  subspax.testing.check_policy(policy, transformation=False, **kwargs)


@pytest.mark.parametrize("name", helpers.CORE)
def test_method_passes_the_kit(name):
  factory, kwargs = helpers.METHODS[name]
  subspax.testing.check(factory, **kwargs)


class _TopRowsAsDense(subspax.SubspacePolicy):
  """A new policy as a user would write it: the r largest-norm coordinate
  directions, as a dense orthonormal basis."""

  def refresh(self, basis, g, key, r):
    rows = jax.lax.top_k(jnp.linalg.norm(g, axis=1), r)[1]
    return subspax.DenseBasis(jnp.eye(g.shape[0])[:, rows])


def test_a_new_policy_is_tested_in_one_line():
  subspax.testing.check(_TopRowsAsDense(), max_examples=2)


class _Stretched(subspax.SubspacePolicy):
  """Broken on purpose: a Haar basis scaled by 1.1 is not orthonormal."""

  def refresh(self, basis, g, key, r):
    return subspax.DenseBasis(1.1 * subspax.RandomSubspace().refresh(
        basis, g, key, r).s)


def test_the_kit_catches_a_non_orthonormal_basis():
  with pytest.raises(AssertionError, match="S\\^T S - I"):
    subspax.testing.check(_Stretched(), max_examples=1, transformation=False)


def test_the_kit_catches_a_biased_claim():
  with pytest.raises(AssertionError, match="biased"):
    subspax.testing.check(subspax.RandomSubspace(), unbiased_scale=1.0,
                          max_examples=1, transformation=False)
