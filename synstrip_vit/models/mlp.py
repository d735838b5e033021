"""Plain MLP for the width/depth ablation, and the activation registry.

Every hidden layer is an :class:`~synstrip_jax.linen.ActDense` (Dense +
activation that sows its post-activation statistics), so it is a stripping
target; the classifier head is a plain ``nn.Dense`` and never stripped.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from synstrip_jax.linen import ActDense

Activation = Callable[[jax.Array], jax.Array]


def gelu_exact(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU ``0.5 x (1 + erf(x / sqrt 2))``, torch's ``nn.GELU()``."""
  return nn.gelu(x, approximate=False)


#: Activation names understood by :func:`get_activation`.
ACTIVATION_FNS: dict[str, Activation] = {
    "relu": nn.relu,
    "gelu": gelu_exact,
    # Never dead (slope 0.01 below 0, torch's nn.LeakyReLU() default): the
    # common practical fix the stress study compares stripping with.
    "leaky_relu": nn.leaky_relu,
}


def get_activation(name: Union[str, Activation]) -> Activation:
  """The activation function called ``name`` (case-insensitive).

  ``'relu'`` is ``nn.relu``; ``'gelu'`` is the exact erf GELU (torch's default
  ``nn.GELU()``, not the tanh approximation that is ``nn.gelu``'s default);
  ``'leaky_relu'`` is ``nn.leaky_relu`` (slope 0.01, torch's default).
  A callable is returned unchanged.

  Raises:
    ValueError: unknown name (the message names it and the known ones).
  """
  if callable(name):
    return name
  if not isinstance(name, str) or name.lower() not in ACTIVATION_FNS:
    raise ValueError(f"unknown activation {name!r}; known: "
                     f"{sorted(ACTIVATION_FNS)}")
  return ACTIVATION_FNS[name.lower()]


def constant_bias(value: float) -> Callable[..., jax.Array]:
  """Initializer filling a bias with ``value`` (``zeros`` when it is 0).

  Raises:
    ValueError: ``value`` is not a finite number (named).
  """
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value)):
    raise ValueError(f"bias_init must be a finite number, got {value!r}")
  if value == 0:
    return nn.initializers.zeros
  return nn.initializers.constant(float(value))


def _check_positive(owner: str, **fields: Any) -> None:
  for key, value in fields.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{owner}.{key} must be a positive int, got {value!r}")


class MLP(nn.Module):
  """``depth`` strippable hidden layers of ``width`` neurons and a Dense head.

  Input ``[B, ...]`` (e.g. images ``[B, H, W, C]``) is flattened to
  ``[B, D]``; hidden layers ``fc0 .. fc{depth-1}`` are
  ``ActDense(width, activation)`` (each sows ``[B, width]`` statistics at
  ``activations/fc{i}/post_act``, beside ``params/fc{i}/kernel`` of shape
  ``[in, width]``); ``head`` is a plain ``nn.Dense(num_classes)``.

  Attributes:
    num_classes: number of output logits.
    width: neurons per hidden layer.
    depth: number of hidden layers (>= 1).
    activation: ``'relu'``, ``'gelu'`` (exact) or ``'leaky_relu'``, or a
      callable.
    bias_init: constant initial bias of the hidden layers (0, flax's and the
      original's default); a negative value starts neurons closer to death
      (the stress study's lever, RESULTS.md).
    dtype: computation dtype; parameters are always float32.
  """
  num_classes: int
  width: int = 256
  depth: int = 3
  activation: Union[str, Activation] = "relu"
  bias_init: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    _check_positive(type(self).__name__, num_classes=self.num_classes,
                    width=self.width, depth=self.depth)
    get_activation(self.activation)
    constant_bias(self.bias_init)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Logits ``[B, num_classes]`` (float32) of inputs ``[B, ...]``.

    ``train`` is accepted for a uniform model interface (no dropout here).
    """
    del train
    act = get_activation(self.activation)
    x = jnp.asarray(x)
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for i in range(self.depth):
      x = ActDense(self.width, activation=act, dtype=self.dtype,
                   param_dtype=jnp.float32,
                   bias_init=constant_bias(self.bias_init), name=f"fc{i}")(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 name="head")(x)
    return x.astype(jnp.float32)


__all__ = ["ACTIVATION_FNS", "MLP", "constant_bias", "gelu_exact",
           "get_activation"]
