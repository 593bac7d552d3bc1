"""The string options of subspax, as ``typing.Literal`` types.

Each alias is the one definition of its choices: the factories annotate their
arguments with it and validate against ``typing.get_args`` of it, so the type
a checker sees and the values accepted at run time cannot drift apart.
"""

from __future__ import annotations

from typing import Literal, Optional

import jax

# Which matrix dimension is projected (docs/algorithms.md section 1).
Side = Literal["auto", "left", "right"]

# SubTrack++'s geodesic step rule (docs/algorithms.md section 5.2).
GeodesicStep = Literal["optimal", "normalized", "raw", "angle"]

# The tangent a geodesic refresh follows: SubTrack++'s or GrassWalk's.
GeodesicTangent = Literal["gradient", "random"]

# How the first dense basis is computed.
Init = Literal["randomized", "svd"]

# GRASS's row selection (docs/algorithms.md section 5.6).
Selection = Literal["topk", "multinomial", "uniform"]

# The norm-growth limiter's convention (docs/algorithms.md section 4).
Limiter = Literal["corrected", "uncorrected", "off"]

# APOLLO's scaling: per kept channel, or one scale per matrix.
ScaleType = Literal["channel", "tensor"]

# What the core does with the Adam moments at a refresh (section 3).
Moments = Literal["keep", "reset", "rotate", "overlap"]

# What the core emits: the back-projected step, or APOLLO's scaled gradient.
Output = Literal["back", "scaled_gradient"]

# The dtype of reduced moments; ``None`` means float32.
MomentDType = Optional[jax.typing.DTypeLike]

# Block-wise 8-bit storage of the reduced moments (docs/algorithms.md
# section 8.1): off (the moments' dtypes), or 8-bit codes on linear or
# quantile levels.
QuantizeMoments = Literal["off", "linear", "quantile"]
