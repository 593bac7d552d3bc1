"""subspax: Adam in a reduced subspace, as Optax gradient transformations.

Methods (each as ``scale_by_<name>`` and ``<name>(learning_rate, ...)``):

* tracked: :func:`subtrack` (SubTrack++), :func:`galore` (SVD baseline);
* randomized: :func:`grasswalk`, :func:`grassjump`, :func:`rso`;
* sparse: :func:`grass` (structured row selection);
* scaled gradient: :func:`fira` (GaLore plus recovery scaling),
  :func:`apollo` and :func:`apollo_mini` (the raw gradient scaled by Adam's
  ratio in a random subspace).

All share one reduced-space Adam core, :func:`scale_by_subspace_adam`, and
differ only in their :class:`SubspacePolicy`. :data:`METHODS` maps each
method's name to its factory; :func:`state_bytes` and
:func:`state_shardings` inspect any optax state;
:func:`projected_by_name` selects the projected parameters by name; :func:`quantize` and
:func:`dequantize` read the 8-bit moments of ``quantize_moments``.
:func:`apply_updates` adds updates to bfloat16 weights with unbiased
stochastic rounding (:func:`stochastic_round`), and to 8-bit weights
(:func:`stochastic_quantize`), :func:`with_moment_dtype` keeps any
transformation's moments out of the weights' dtype, :func:`layerwise` takes
a stacked model's step one layer at a time, and :func:`clip_by_global_norm`
clips gradients without a second copy of them. The math, section by section, is
in ``docs/algorithms.md``.

The update of a projected parameter is written over its gradient. Jit it with
the gradients donated, as a train step does (``donate_argnums=(0, 1)``): XLA
then writes each update into its gradient's buffer. A gradient the caller
keeps (not donated) is copied first, which raises the update's peak memory
(docs/algorithms.md section 8.2).

Examples:
  >>> import jax, jax.numpy as jnp, optax, subspax
  >>> tx = optax.chain(subspax.clip_by_global_norm(1.0),
  ...                  subspax.subtrack(1e-3, rank=4, update_interval=10))
  >>> params = {'w': jnp.zeros((16, 32))}
  >>> state = tx.init(params)
  >>> update = jax.jit(tx.update, donate_argnums=(0, 1))  # grads and state
  >>> updates, state = update({'w': jnp.ones((16, 32))}, state, params)
  >>> params = optax.apply_updates(params, updates)
"""

from subspax._apollo import apollo
from subspax._apollo import apollo_mini
from subspax._apollo import fira
from subspax._apollo import scale_by_apollo
from subspax._apollo import scale_by_apollo_mini
from subspax._apollo import scale_by_fira
from subspax._bases import DenseBasis
from subspax._blocks import num_row_blocks
from subspax._clipping import clip_by_global_norm
from subspax._bases import RowBasis
from subspax._core import scale_by_subspace_adam
from subspax._layout import default_is_projected
from subspax._moment_dtype import with_moment_dtype
from subspax._layout import MatrixLayout
from subspax._layout import MatrixSpec
from subspax._layout import path_name
from subspax._layout import projected_by_name
from subspax._methods import galore
from subspax._methods import grass
from subspax._methods import grassjump
from subspax._methods import grasswalk
from subspax._methods import rso
from subspax._methods import scale_by_galore
from subspax._methods import scale_by_grass
from subspax._methods import scale_by_grassjump
from subspax._methods import scale_by_grasswalk
from subspax._methods import scale_by_rso
from subspax._methods import scale_by_subtrack
from subspax._methods import subtrack
from subspax._policies import GeodesicSubspace
from subspax._policies import RandomSubspace
from subspax._policies import RowSubspace
from subspax._policies import SubspacePolicy
from subspax._policies import SvdSubspace
from subspax._quantized import dequantize
from subspax._quantized import quantize
from subspax._quantized import QuantizedArray
from subspax._registry import METHODS
from subspax._rounding import apply_updates
from subspax._rounding import stochastic_quantize
from subspax._rounding import stochastic_round
from subspax._state_types import ProjectedState
from subspax._state_types import SubspaceAdamState
from subspax._state import overwritten
from subspax._state import state_bytes
from subspax._state import state_shardings
from subspax._layerwise import layerwise
from subspax._layerwise import LayerwiseUpdate
from subspax._reduced import reduce_gradients
from subspax._reduced import refresh_subspaces
from subspax._reduced import update_from_reduced
from subspax import ordering
from subspax import reparam

__version__ = "0.1.0"

__all__ = (
    "DenseBasis",
    "GeodesicSubspace",
    "LayerwiseUpdate",
    "METHODS",
    "MatrixLayout",
    "MatrixSpec",
    "ProjectedState",
    "QuantizedArray",
    "RandomSubspace",
    "RowBasis",
    "RowSubspace",
    "SubspaceAdamState",
    "SubspacePolicy",
    "SvdSubspace",
    "apollo",
    "apollo_mini",
    "apply_updates",
    "clip_by_global_norm",
    "default_is_projected",
    "dequantize",
    "fira",
    "galore",
    "grass",
    "grassjump",
    "grasswalk",
    "num_row_blocks",
    "path_name",
    "projected_by_name",
    "quantize",
    "reduce_gradients",
    "refresh_subspaces",
    "rso",
    "scale_by_apollo",
    "scale_by_apollo_mini",
    "scale_by_fira",
    "scale_by_galore",
    "scale_by_grass",
    "scale_by_grassjump",
    "scale_by_grasswalk",
    "scale_by_rso",
    "scale_by_subspace_adam",
    "scale_by_subtrack",
    "state_bytes",
    "ordering",
    "overwritten",
    "reparam",
    "state_shardings",
    "stochastic_quantize",
    "stochastic_round",
    "subtrack",
    "update_from_reduced",
    "with_moment_dtype",
)
