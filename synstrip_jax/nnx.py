"""NNX wiring: Linear layers that sow their post-activation statistics.

:class:`ActLinear` is ``activation(nnx.Linear(x))`` that sows
``nnx.Intermediate`` ``<path>/post_act`` beside its ``<path>/kernel`` param;
collect them with ``nnx.capture(model, nnx.Intermediate)(x)`` and pair them
with the kernels through :func:`synstrip_jax.probe.dead_tree`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from synstrip_jax.activations import example_stats
from synstrip_jax.probe import POST_ACT, accumulate_sown, no_stats


class ActLinear(nnx.Linear):
  """NNX ``activation(Linear(x))`` that sows ``nnx.Intermediate`` statistics.

  Collect them with ``nnx.capture(model, nnx.Intermediate)(x)``.
  """

  def __init__(self, in_features: int, out_features: int, *,
               activation: Callable[[jax.Array], jax.Array] = nnx.relu,
               **kwargs: Any):
    super().__init__(in_features, out_features, **kwargs)
    self.activation = activation

  def __call__(self, inputs: jax.Array) -> jax.Array:
    y = self.activation(super().__call__(inputs))
    self.sow(nnx.Intermediate, POST_ACT, example_stats(y),
             reduce_fn=accumulate_sown, init_fn=no_stats)
    return y


__all__ = ["ActLinear"]
