"""Statistics of post-activation outputs and dead/dormant-neuron masks.

A layer's statistics are an :class:`ActivationStats` of ``[n]`` vectors (one
entry per neuron, the last axis of the activation) accumulated over every
other axis (batch, tokens, spatial) and over probe batches:

* ``total``: sum of the outputs. The original's rule: a neuron is dead iff
  ``total == 0`` exactly (for ReLU outputs, all of them are 0). A sum that
  overflows to ``inf`` (or ``nan`` from ``inf - inf``) is not 0: alive.
* ``abs_scaled``: sum of ``|output|`` times ``2**-64`` (an exact power of
  two: integer-valued sums stay exact and independent of the batch split),
  so finite outputs never overflow it (it would take ``2**64`` outputs at
  the float32 maximum). ``abs_total`` and ``abs_mean`` are derived from it;
  outputs below about ``2**-62`` lose precision there (they only enter
  ReDo's score).
* ``nonfinite``: number of NaN/inf outputs. A neuron with a non-finite output
  is never counted as dead *or* silently as alive: :func:`dead_mask` reports it
  through :func:`nonfinite_neurons`, and :func:`check_finite` (which
  :func:`synstrip_jax.dead_tree` runs on concrete statistics) raises on it.
* ``count``: number of elements each neuron summed (scalar).
* ``active``: number of examples in which the neuron had a non-zero finite
  output (at any position), for "active on fewer than a fraction of the
  examples" (Dohare et al., 2024).
* ``examples``: number of examples (scalar).

:class:`Dormancy` selects one of the three rules (exact zero, ReDo's score,
inactive fraction); all three are read from the same statistics pass.

Everything is a pure function of arrays and works under ``jit``, ``pmap`` and
``shard_map`` (pass ``axis_name`` to reduce across devices); under sharded
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


#: ``abs_scaled = sum |output| * ABS_SCALE``.
ABS_SCALE = 2.0 ** -64


class ActivationStats(NamedTuple):
  """Per-neuron statistics of one layer's post-activation outputs.

  Attributes:
    total: ``[n]`` float32, sum of finite outputs.
    abs_scaled: ``[n]`` float32, sum of ``|output|`` over finite outputs,
      times :data:`ABS_SCALE`.
    nonfinite: ``[n]`` int32, number of NaN or infinite outputs.
    count: ``[]`` float32, number of outputs summed per neuron.
    active: ``[n]`` int32, number of examples with a non-zero finite output.
    examples: ``[]`` int32, number of examples.

  Per-example statistics (sown by models, see :func:`example_stats`) have a
  leading ``[B]`` axis on every field.
  """
  total: Array
  abs_scaled: Array
  nonfinite: Array
  count: Array
  active: Array
  examples: Array

  @property
  def abs_total(self) -> Array:
    """Sum of ``|output|`` (may overflow to inf; ``abs_scaled`` does not)."""
    return self.abs_scaled * (1.0 / ABS_SCALE)

  @property
  def abs_mean(self) -> Array:
    """Mean ``|output|`` per neuron (``[n]``; 0 with no outputs)."""
    count = jnp.reshape(self.count, jnp.shape(self.count)
                        + (1,) * (self.abs_scaled.ndim - jnp.ndim(self.count)))
    return self.abs_scaled / jnp.maximum(count, 1.0) * (1.0 / ABS_SCALE)


def init_stats(num_neurons: int) -> ActivationStats:
  """Zero statistics for a layer of ``num_neurons`` neurons."""
  z = jnp.zeros((num_neurons,), jnp.float32)
  zi = jnp.zeros((num_neurons,), jnp.int32)
  return ActivationStats(z, z, zi, jnp.zeros((), jnp.float32), zi,
                         jnp.zeros((), jnp.int32))


def example_stats(x: Array) -> ActivationStats:
  """Per-example statistics of activations ``x`` of shape ``[B, ..., n]``.

  Reduces every axis but the first (examples) and the last (neurons), in
  float32, so that padding examples can still be dropped afterwards (see
  :func:`reduce_examples`). This is what models sow.

  Returns:
    :class:`ActivationStats` with ``[B, n]`` leaves and ``[B]`` counts.
  """
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(
        f"activations must have an example and a neuron axis, got shape {x.shape}")
  x = x.astype(jnp.float32)
  axes = tuple(range(1, x.ndim - 1))
  per_neuron = float(np.prod(x.shape[1:-1], dtype=np.int64))
  count = jnp.full(x.shape[:1], per_neuron, jnp.float32)
  examples = jnp.ones(x.shape[:1], jnp.int32)
  scale = jnp.float32(ABS_SCALE)

  def exact(_):
    finite = jnp.isfinite(x)
    live = finite & (x != 0)
    return ActivationStats(
        total=jnp.sum(jnp.where(finite, x, 0.0), axis=axes),
        abs_scaled=jnp.sum(jnp.where(finite, jnp.abs(x) * scale, 0.0),
                           axis=axes),
        nonfinite=jnp.sum(~finite, axis=axes, dtype=jnp.int32),
        count=count,
        active=jnp.any(live, axis=axes).astype(jnp.int32),
        examples=examples)

  # Fast path: plain reductions. A finite sum of |x| proves every element
  # finite, so these are then exactly the masked reductions of `exact` (and
  # nothing is non-finite); otherwise `exact` runs. This avoids materialising
  # full-size isfinite temporaries (bench/README.md).
  total = jnp.sum(x, axis=axes)
  abs_scaled = jnp.sum(jnp.abs(x) * scale, axis=axes)
  active = jnp.any(x != 0, axis=axes).astype(jnp.int32)

  def fast(_):
    # zeros_like keeps `total`'s varying-axis type under shard_map.
    return ActivationStats(total, abs_scaled,
                           jnp.zeros_like(total, dtype=jnp.int32), count,
                           active, examples)

  return jax.lax.cond(jnp.all(jnp.isfinite(abs_scaled)), fast, exact, None)


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
    col = where[:, None]
    stats = ActivationStats(
        jnp.where(col, stats.total, 0.0), jnp.where(col, stats.abs_scaled, 0.0),
        jnp.where(col, stats.nonfinite, 0), jnp.where(where, stats.count, 0.0),
        jnp.where(col, stats.active, 0), jnp.where(where, stats.examples, 0))
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
  """Sum of two statistics (or trees of them): accumulate probe batches;
  associative (exactly so for integer-valued outputs)."""
  return jax.tree_util.tree_map(jnp.add, a, b)


def dormancy_score(stats: ActivationStats) -> Array:
  """ReDo's score: mean ``|a_i|`` over the layer's average mean ``|a|``.

  ``s_i = E|a_i| / (1/n sum_j E|a_j|)`` (Sokar et al., 2023); 0 for an
  all-zero layer. Computed from ``abs_scaled``: finite outputs never
  overflow it.
  """
  scaled = stats.abs_scaled / jnp.maximum(stats.count, 1.0)
  layer = jnp.mean(scaled, axis=-1, keepdims=True)
  return jnp.where(layer > 0, scaled / jnp.where(layer > 0, layer, 1.0), 0.0)


def active_fraction(stats: ActivationStats) -> Array:
  """``[n]`` fraction of the examples on which each neuron had a non-zero
  finite output (0 when there are no examples)."""
  return stats.active / jnp.maximum(stats.examples, 1).astype(jnp.float32)


#: The rules of :class:`Dormancy`.
RULES = ("zero", "score", "inactive")


class Dormancy(NamedTuple):
  """Which neurons count as dead or dormant (hashable: a static argument).

  Attributes:
    rule: ``'zero'``: every output is exactly 0 (``total == 0``, stripping's
      rule; ``threshold`` unused). ``'score'``: ReDo's
      :func:`dormancy_score` ``<= threshold`` (Sokar et al., 2023).
      ``'inactive'``: :func:`active_fraction` ``< threshold``, i.e. active
      on fewer than that fraction of the examples (Dohare et al., 2024 use
      0.01).
    threshold: the rule's threshold.
  """
  rule: str = "zero"
  threshold: float = 0.0


Criterion = Union[None, float, Dormancy]


def as_dormancy(criterion: Criterion) -> Dormancy:
  """``None`` -> ``Dormancy('zero')``, a float ``tau`` -> ``Dormancy('score',
  tau)``, a :class:`Dormancy` checked and returned."""
  if criterion is None:
    return Dormancy("zero")
  if isinstance(criterion, Dormancy):
    if criterion.rule not in RULES:
      raise ValueError(f"Dormancy.rule={criterion.rule!r}, expected one of "
                       f"{RULES}")
    if not np.isfinite(criterion.threshold) or criterion.threshold < 0:
      raise ValueError(f"Dormancy.threshold={criterion.threshold!r} must be "
                       "a finite number >= 0")
    return criterion
  if isinstance(criterion, (int, float)) and not isinstance(criterion, bool):
    return as_dormancy(Dormancy("score", float(criterion)))
  raise TypeError("a dormancy criterion is None, a float tau or a Dormancy, "
                  f"got {type(criterion).__name__}: {criterion!r}")


def dead_mask(stats: ActivationStats, tau: Criterion = None) -> Array:
  """``[n]`` bool dead (or dormant) neurons of one layer.

  ``tau=None`` is the original's exact rule: ``total == 0`` (not a tolerance:
  a single output of 1e-30 keeps a neuron alive). With ``tau`` a float, a
  neuron is dormant when its :func:`dormancy_score` is ``<= tau`` (ReDo).
  A :class:`Dormancy` selects any rule. Neurons with a non-finite output
  are never marked dead; see :func:`nonfinite_neurons`.
  """
  crit = as_dormancy(tau)
  if crit.rule == "zero":
    dead = stats.total == 0
  elif crit.rule == "score":
    dead = dormancy_score(stats) <= crit.threshold
  else:
    dead = active_fraction(stats) < crit.threshold
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


__all__ = ["ABS_SCALE", "ActivationStats", "Dormancy", "RULES", "active_fraction",
           "as_dormancy", "batch_stats", "check_finite", "dead_mask",
           "dormancy_score", "example_stats", "init_stats", "merge_stats",
           "nonfinite_neurons", "reduce_examples"]

__getattr__ = deprecated_getattr(__name__, {
    name: TOP_LEVEL[name]
    for name in ("dead_masks", "find_dead", "psum_stats", "update_stats")})
