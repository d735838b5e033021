"""The exact quantile threshold of each neuron's non-zero incoming weights.

The math of :mod:`synstrip_jax.stripping` (see its docstring for the
definition): a float64 interpolation table per ``(fan_in, q)`` built on the
host, and order statistics found by bisection on order-preserving ``uint32``
keys of the float32 weights, in the kernel's own ``[fan_in, n]`` layout.
"""

from __future__ import annotations

import functools


import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@functools.lru_cache(maxsize=64)
def _interpolation_table(fan_in: int, q: float) -> tuple[np.ndarray, ...]:
  """Host-side tables indexed by the non-zero count ``m`` in ``[0, fan_in]``.

  Returns ``(lo, hi, w, k)``: int32 ``lo``/``hi`` order statistics, float32
  weight ``w`` (all ``[fan_in + 1]``), and ``k`` the number of smallest
  values needed. Rank ``q * (m - 1)`` is computed in float64 from the Python
  float ``q``, as ``torch.quantile`` does.
  """
  m = np.arange(fan_in + 1, dtype=np.float64)
  rank = np.float64(q) * np.maximum(m - 1.0, 0.0)
  lo = np.floor(rank)
  hi = np.ceil(rank)
  w = (rank - lo).astype(np.float32)
  k = int(hi.max()) + 1
  return lo.astype(np.int32), hi.astype(np.int32), w, k


#: Largest fan-in whose ranks are exact in the float32 table below.
_MAX_TABLE_FAN_IN = 2**24


@functools.lru_cache(maxsize=64)
def _quantile_table_cached(fan_in: int, q: float) -> np.ndarray:
  lo, hi, w, _ = _interpolation_table(fan_in, q)
  table = np.stack([lo.astype(np.float32), hi.astype(np.float32), w], axis=1)
  table.setflags(write=False)
  return table


def quantile_table(fan_in: int, stripping_factor: float) -> np.ndarray:
  """The interpolation constants of the ``q`` quantile, one row per count.

  Args:
    fan_in: the number of incoming weights of a neuron.
    stripping_factor: the quantile ``q`` in ``[0, 1]`` (a Python float).

  Returns:
    A read-only ``[fan_in + 1, 3]`` float32 numpy array whose row ``m`` holds
    ``(l, h, w)`` for a neuron with ``m`` non-zero weights: the order
    statistics ``l = floor(r)`` and ``h = ceil(r)`` (exact integers in
    float32) and the weight ``w = f32(r - l)`` of rank ``r = q (m - 1)``
    computed in float64 as ``torch.quantile`` does. The compiled strip
    programs take it as a runtime input, so a new ``q`` does not recompile.
  """
  if not 0 <= fan_in < _MAX_TABLE_FAN_IN:
    raise ValueError(f"fan_in must be in [0, 2**24), got {fan_in}")
  return _quantile_table_cached(int(fan_in), float(stripping_factor))


_MAX_KEY = 0xFFFFFFFF


def _float_keys(x: Array) -> Array:
  """float32 -> uint32 keys in the same order; zeros (``+-0.0``) -> max key."""
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  k = jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(0x80000000))
  return jnp.where(x != 0, k, jnp.uint32(_MAX_KEY))


def _keys_float(k: Array) -> Array:
  """Inverse of :func:`_float_keys` (for keys of non-zero values)."""
  b = jnp.where((k >> 31) == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def table_thresholds(cols: Array, table: Array, axis: int) -> Array:
  """:func:`column_thresholds` with the quantile table as an (runtime) array.

  ``table`` is :func:`quantile_table` of ``cols.shape[axis]`` (``[F + 1,
  3]`` float32), a traced value or a constant: the compiled program does not
  depend on ``q``.
  """
  axis = axis % 2
  keys = _float_keys(cols.astype(jnp.float32))
  expand = (lambda v: v[None, :]) if axis == 0 else (lambda v: v[:, None])
  count_le = lambda v: jnp.sum(keys <= expand(v), axis=axis, dtype=jnp.int32)
  m = jnp.sum(keys != jnp.uint32(_MAX_KEY), axis=axis, dtype=jnp.int32)
  consts = jnp.asarray(table, jnp.float32)[m]  # [B, 3]: l, h, w
  r_lo = consts[:, 0].astype(jnp.int32)
  r_hi = consts[:, 1].astype(jnp.int32)
  w = consts[:, 2]

  # Smallest key x with count(keys <= x) > r_lo, i.e. the r_lo-th smallest.
  def bisect(_, bounds):
    lo, hi = bounds
    mid = lo + ((hi - lo) >> 1)
    above = count_le(mid) > r_lo
    return jnp.where(above, lo, mid + 1), jnp.where(above, mid, hi)

  nb = cols.shape[1 - axis]
  key_a, _ = jax.lax.fori_loop(
      0, 32, bisect, (jnp.zeros((nb,), jnp.uint32),
                      jnp.full((nb,), _MAX_KEY, jnp.uint32)))
  # The r_hi-th smallest (r_hi is r_lo or r_lo + 1): key_a again if it is
  # repeated enough, else the next larger key.
  next_key = jnp.min(jnp.where(keys > expand(key_a), keys,
                               jnp.uint32(_MAX_KEY)), axis=axis)
  key_b = jnp.where(count_le(key_a) > r_hi, key_a, next_key)
  a, b = _keys_float(key_a), _keys_float(key_b)
  d = b - a
  # PyTorch CPU lerp; XLA contracts each branch into one fused multiply-add.
  t = jnp.where(w < 0.5, a + w * d, b - d * (1.0 - w))
  return jnp.where(m > 0, t, jnp.nan)


def column_thresholds(cols: Array, stripping_factor: float, *,
                      axis: int = -1) -> Array:
  """Quantile threshold of each neuron's non-zero incoming weights.

  Args:
    cols: 2-D float32; ``axis`` indexes one neuron's incoming weights
      (``-1``/``1``: ``[B, F]`` one neuron per row; ``0``: ``[F, B]``, the
      Flax kernel layout).
    stripping_factor: the quantile ``q`` in ``[0, 1]`` (a Python float; it
      enters the computation through :func:`quantile_table`).
    axis: the fan-in axis.

  Returns:
    ``[B]`` float32 thresholds; NaN for a neuron with no non-zero entry (such
    a neuron is left alone: the original raises there).
  """
  table = quantile_table(cols.shape[axis], stripping_factor)
  return table_thresholds(cols, table, axis)


__all__ = ["column_thresholds", "quantile_table", "table_thresholds"]
