"""Statistics of post-activation outputs and dead-neuron masks.

A layer's statistics are an :class:`ActivationStats` of ``[n]`` vectors (one
entry per neuron, the last axis of the activation) accumulated over every
other axis (batch, tokens, spatial) and over probe batches:

* ``total``: sum of the outputs. The original's rule: a neuron is dead iff
  ``total == 0`` exactly (for ReLU outputs, all of them are 0).
* ``abs_total``: sum of ``|output|`` (for a ReDo-style dormancy score).
* ``nonfinite``: number of NaN/inf outputs. A neuron with a non-finite output
  is never counted as dead *or* silently as alive: :func:`dead_mask` reports it
  through :func:`nonfinite_neurons`, and :func:`check_finite` (which
  :func:`synstrip_jax.dead_tree` runs on concrete statistics) raises on it.
* ``count``: number of elements each neuron summed (scalar).

Everything is a pure function of arrays and works under ``jit``, ``pmap`` and
``shard_map`` (pass ``axis_name`` to sum across devices); under sharded
``jit`` the batch reduction is already global.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from synstrip_jax import trees
from synstrip_jax._deprecated import TOP_LEVEL, deprecated_getattr

PyTree = Any
Array = jax.Array
AxisName = Union[str, Sequence[str], None]


class ActivationStats(NamedTuple):
  """Per-neuron statistics of one layer's post-activation outputs.

  Attributes:
    total: ``[n]`` float32, sum of finite outputs.
    abs_total: ``[n]`` float32, sum of ``|output|`` over finite outputs.
    nonfinite: ``[n]`` int32, number of NaN or infinite outputs.
    count: ``[]`` float32, number of outputs summed per neuron.
  """
  total: Array
  abs_total: Array
  nonfinite: Array
  count: Array


def init_stats(num_neurons: int) -> ActivationStats:
  """Zero statistics for a layer of ``num_neurons`` neurons."""
  z = jnp.zeros((num_neurons,), jnp.float32)
  return ActivationStats(z, z, jnp.zeros((num_neurons,), jnp.int32),
                         jnp.zeros((), jnp.float32))


def example_stats(x: Array) -> ActivationStats:
  """Per-example statistics of activations ``x`` of shape ``[B, ..., n]``.

  Reduces every axis but the first (examples) and the last (neurons), in
  float32, so that padding examples can still be dropped afterwards (see
  :func:`reduce_examples`). This is what models sow.

  Returns:
    :class:`ActivationStats` with ``[B, n]`` leaves and a ``[B]`` count.
  """
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(
        f"activations must have an example and a neuron axis, got shape {x.shape}")
  x = x.astype(jnp.float32)
  axes = tuple(range(1, x.ndim - 1))
  per_neuron = float(np.prod(x.shape[1:-1], dtype=np.int64))
  count = jnp.full(x.shape[:1], per_neuron, jnp.float32)

  def exact(_):
    finite = jnp.isfinite(x)
    return ActivationStats(
        total=jnp.sum(jnp.where(finite, x, 0.0), axis=axes),
        abs_total=jnp.sum(jnp.where(finite, jnp.abs(x), 0.0), axis=axes),
        nonfinite=jnp.sum(~finite, axis=axes, dtype=jnp.int32),
        count=count)

  # Fast path: two plain sums. A finite sum of |x| proves every summed
  # element finite, so these are then exactly the masked sums of `exact`
  # (and nothing is non-finite); otherwise `exact` runs. This avoids
  # materialising full-size isfinite temporaries (bench/README.md).
  total = jnp.sum(x, axis=axes)
  abs_total = jnp.sum(jnp.abs(x), axis=axes)

  def fast(_):
    # zeros_like keeps `total`'s varying-axis type under shard_map.
    return ActivationStats(total, abs_total,
                           jnp.zeros_like(total, dtype=jnp.int32), count)

  return jax.lax.cond(jnp.all(jnp.isfinite(abs_total)), fast, exact, None)


def reduce_examples(stats: ActivationStats, *, where: Optional[Array] = None,
                    axis_name: AxisName = None) -> ActivationStats:
  """Sum per-example statistics (``[B, n]``) over the examples.

  Args:
    stats: output of :func:`example_stats`.
    where: optional ``[B]`` bool; examples where it is False (padding of a
      last partial batch) are left out.
    axis_name: a ``pmap``/``shard_map`` axis name (or names) to sum across
      devices; ``None`` for a local (or sharded-``jit`` global) reduction.

  Returns:
    :class:`ActivationStats` with ``[n]`` leaves and a scalar count.
  """
  if where is not None:
    where = jnp.asarray(where, jnp.bool_)
    if where.shape != stats.count.shape:
      raise ValueError(f"where has shape {where.shape}, expected "
                       f"{stats.count.shape} (one flag per example)")
    stats = ActivationStats(
        jnp.where(where[:, None], stats.total, 0.0),
        jnp.where(where[:, None], stats.abs_total, 0.0),
        jnp.where(where[:, None], stats.nonfinite, 0),
        jnp.where(where, stats.count, 0.0))
  out = jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), stats)
  if axis_name is not None:
    out = jax.lax.psum(out, axis_name)
  return out


def batch_stats(x: Array, *, axis_name: AxisName = None,
                where: Optional[Array] = None) -> ActivationStats:
  """Statistics of one batch of activations ``x`` of shape ``[..., n]``.

  Reduces every axis but the last, in float32; a rank-1 ``x`` is one example.

  Args:
    x: post-activation outputs, last axis = neurons.
    axis_name: a ``pmap``/``shard_map`` axis name (or names) to sum across
      devices; ``None`` for a local (or sharded-``jit`` global) reduction.
    where: optional ``[B]`` bool over the leading axis; False rows (e.g.
      padding examples) are ignored.

  Returns:
    :class:`ActivationStats` with ``[n]`` leaves.
  """
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"activations must have a neuron axis, got shape {x.shape}")
  if x.ndim == 1:
    x = x[None]
  return reduce_examples(example_stats(x), where=where, axis_name=axis_name)


def merge_stats(a: ActivationStats, b: ActivationStats) -> ActivationStats:
  """Sum of two statistics (accumulate probe batches; associative)."""
  return jax.tree_util.tree_map(jnp.add, a, b)


def dormancy_score(stats: ActivationStats) -> Array:
  """ReDo's score: mean ``|a_i|`` over the layer's average mean ``|a|``.

  ``s_i = E|a_i| / (1/n sum_j E|a_j|)`` (Sokar et al., 2023); 0 for an
  all-zero layer.
  """
  mean_abs = stats.abs_total / jnp.maximum(stats.count, 1.0)
  layer = jnp.mean(mean_abs)
  return jnp.where(layer > 0, mean_abs / jnp.where(layer > 0, layer, 1.0), 0.0)


def dead_mask(stats: ActivationStats, tau: Optional[float] = None) -> Array:
  """``[n]`` bool dead neurons of one layer.

  ``tau=None`` is the original's exact rule: ``total == 0`` (not a tolerance:
  a single output of 1e-30 keeps a neuron alive). With ``tau`` a float, a
  neuron is dormant when its :func:`dormancy_score` is ``<= tau`` (ReDo).
  Neurons with a non-finite output are never marked dead; see
  :func:`nonfinite_neurons`.
  """
  if tau is None:
    dead = stats.total == 0
  else:
    dead = dormancy_score(stats) <= tau
  return dead & (stats.nonfinite == 0)


def nonfinite_neurons(stats: ActivationStats) -> Array:
  """``[n]`` bool: neurons that produced a NaN or infinite output."""
  return stats.nonfinite > 0


def _is_stats(x: Any) -> bool:
  return isinstance(x, ActivationStats)


def check_finite(stats_tree: PyTree) -> None:
  """Raise ``ValueError`` naming every layer with non-finite activations.

  Host-side (not under ``jit``): call it on the accumulated probe statistics
  before deciding which neurons are dead.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(stats_tree, is_leaf=_is_stats)
  bad = []
  for path, s in flat:
    if _is_stats(s):
      n_bad = int(np.sum(np.asarray(s.nonfinite) > 0))
      if n_bad:
        bad.append(f"{trees.path_str(path)} ({n_bad} neurons)")
  if bad:
    raise ValueError(
        "non-finite (NaN/inf) activations in " + ", ".join(bad) +
        ": cannot decide which neurons are dead")


__all__ = ["ActivationStats", "batch_stats", "check_finite", "dead_mask",
           "dormancy_score", "example_stats", "init_stats", "merge_stats",
           "nonfinite_neurons", "reduce_examples"]

__getattr__ = deprecated_getattr(__name__, {
    name: TOP_LEVEL[name]
    for name in ("dead_masks", "find_dead", "psum_stats", "update_stats")})
