"""Linen wiring: Dense layers that sow their post-activation statistics.

:class:`ActDense` is ``activation(nn.Dense(x))`` that sows
``('activations', <path>, 'post_act')`` beside its ``('params', <path>,
'kernel')``; :func:`synstrip_jax.probe.dead_tree` pairs the two by path.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax

from synstrip_jax.activations import example_stats
from synstrip_jax.probe import POST_ACT, accumulate_sown, no_stats

PyTree = Any

#: Linen collection that holds the sown statistics.
ACTIVATIONS = "activations"


class ActDense(nn.Dense):
  """``activation(Dense(x))`` that sows the per-example output statistics.

  Attributes:
    activation: elementwise activation applied after the affine map
      (``nn.relu`` as in the paper).
  """
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    y = self.activation(super().__call__(inputs))
    self.sow(ACTIVATIONS, POST_ACT, example_stats(y),
             reduce_fn=accumulate_sown, init_fn=no_stats)
    return y


def linen_stats(variables: Mapping[str, Any]) -> PyTree:
  """The sown statistics of a Linen ``apply(..., mutable=[ACTIVATIONS])``."""
  if ACTIVATIONS not in variables:
    raise ValueError(f"no '{ACTIVATIONS}' collection: apply the model with "
                     f"mutable=['{ACTIVATIONS}'] (got {sorted(variables)})")
  return variables[ACTIVATIONS]


__all__ = ["ACTIVATIONS", "ActDense", "linen_stats"]
