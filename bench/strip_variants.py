"""Prototype variants of ``synstrip_jax.stripping.kernel_thresholds`` (scratch).

Used by ``bench/bench_strip_variants.py`` to measure proposed changes to the
library without editing it. Every variant must give bit-identical thresholds.

Variants (``select`` x ``full``):

* ``select="topk"``: the library's method: gather the dead columns, transpose
  to ``[B, F]``, ``lax.top_k`` of the ``k`` smallest non-zero values. On
  XLA:CPU ``top_k`` is a per-row ``std::sort`` of indices whenever
  ``64 k >= F`` (always here), single-threaded.
* ``select="bisect"``: exact order statistic by bisection on order-preserving
  ``uint32`` keys of the float32 weights, in the kernel's own ``[F, B]``
  layout (no transpose): 32 vectorised compare-and-count passes
  ``sum(keys <= mid, axis=0)`` find ``v_(lo)``, one more pass gives
  ``v_(hi)`` (= ``v_(lo)`` if enough ties, else the next larger key).
* ``barrier=True``: ``lax.optimization_barrier`` on the gathered ``[F, B]``
  columns; without it XLA fuses the gather into the key computation and
  adds transposes/copies that cost as much as the bisection itself.
* ``full=True``: the largest bucket (``n`` columns) works on the kernel
  itself instead of gathering all its columns (no gather, no scatter).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from synstrip_jax.stripping import (_interpolation_table,
                                    column_thresholds)


def bucket_sizes(num_neurons: int, num_buckets: int = 5) -> tuple[int, ...]:
  """Static column-bucket sizes ``n/2^j`` (ascending, deduplicated); the
  library used them until it switched to whole-kernel thresholds."""
  sizes = {max(1, math.ceil(num_neurons / 2**j)) for j in range(num_buckets)}
  return tuple(sorted(sizes))


_MAX = 0xFFFFFFFF


def float_keys(x):
  """float32 -> uint32 keys with the same order; zeros (+-0.0) -> max key."""
  b = lax.bitcast_convert_type(x, jnp.uint32)
  k = jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(0x80000000))
  return jnp.where(x != 0, k, jnp.uint32(_MAX))


def keys_float(k):
  """Inverse of :func:`float_keys` (for keys of non-zero values)."""
  b = jnp.where((k >> 31) == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
  return lax.bitcast_convert_type(b, jnp.float32)


def column_thresholds_bisect(cols_fb, stripping_factor, axis=0):
  """Like ``column_thresholds``; ``axis`` is the fan-in axis of 2-D ``cols_fb``
  (0: ``[F, B]`` columns, 1: ``[B, F]`` rows)."""
  fan_in = cols_fb.shape[axis]
  nb = cols_fb.shape[1 - axis]
  lo_t, hi_t, w_t, _ = _interpolation_table(fan_in, stripping_factor)
  keys = float_keys(cols_fb)
  ex = (lambda v: v[None, :]) if axis == 0 else (lambda v: v[:, None])
  m = jnp.sum(keys != jnp.uint32(_MAX), axis=axis, dtype=jnp.int32)
  r_lo = jnp.asarray(lo_t)[m]
  r_hi = jnp.asarray(hi_t)[m]
  w = jnp.asarray(w_t)[m]

  def body(_, c):
    lo, hi = c
    mid = lo + ((hi - lo) >> 1)
    cnt = jnp.sum(keys <= ex(mid), axis=axis, dtype=jnp.int32)
    p = cnt > r_lo
    return jnp.where(p, lo, mid + 1), jnp.where(p, mid, hi)

  ka, _ = lax.fori_loop(0, 32, body, (jnp.zeros((nb,), jnp.uint32),
                                      jnp.full((nb,), _MAX, jnp.uint32)))
  le = jnp.sum(keys <= ex(ka), axis=axis, dtype=jnp.int32)
  kn = jnp.min(jnp.where(keys > ex(ka), keys, jnp.uint32(_MAX)), axis=axis)
  kb = jnp.where(le > r_hi, ka, kn)
  a, b = keys_float(ka), keys_float(kb)
  d = b - a
  t = jnp.where(w < 0.5, a + w * d, b - d * (1.0 - w))
  return jnp.where(m > 0, t, jnp.nan)


def kernel_thresholds_variant(kernel, dead, stripping_factor, *,
                              num_buckets=5, select="bisect", full=True,
                              rows=False, barrier=False):
  n = kernel.shape[-1]
  w2d = kernel.reshape(-1, n).astype(jnp.float32)
  num_dead = jnp.sum(dead)
  sizes = bucket_sizes(n, num_buckets)
  nan = jnp.full((n,), jnp.nan, jnp.float32)

  def thresholds(cols_fb):
    if select == "bisect":
      return column_thresholds_bisect(cols_fb, stripping_factor)
    return column_thresholds(cols_fb.T, stripping_factor)

  def thresholds_gathered(idx):
    if rows and select == "bisect":  # gather straight into [size, F] rows
      cols_bf = jnp.take(w2d, idx, axis=1, mode="clip").T
      return column_thresholds_bisect(cols_bf, stripping_factor, axis=1)
    cols = jnp.take(w2d, idx, axis=1, mode="clip")  # [F, size]
    if barrier:  # keep XLA from fusing the gather into the keys (layout copies)
      cols = lax.optimization_barrier(cols)
    return thresholds(cols)

  def branch(size):
    if full and size == n:
      return lambda _: jnp.where(dead, thresholds(w2d), jnp.nan)

    def run(_):
      idx = jnp.nonzero(dead, size=size, fill_value=n)[0]
      return nan.at[idx].set(thresholds_gathered(idx), mode="drop")
    return run

  branches = [lambda _: nan] + [branch(s) for s in sizes]
  index = jnp.where(num_dead == 0, 0,
                    1 + jnp.searchsorted(jnp.asarray(sizes), num_dead))
  return lax.switch(index, branches, None)


@functools.partial(jax.jit, static_argnames=("stripping_factor", "num_buckets",
                                             "select", "full", "rows",
                                             "barrier"))
def strip_kernel_variant(kernel, dead, mask, *, stripping_factor=0.05,
                         num_buckets=5, select="bisect", full=True, rows=False,
                         barrier=False):
  effective = jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))
  thr = kernel_thresholds_variant(effective, dead, stripping_factor,
                                  num_buckets=num_buckets, select=select,
                                  full=full, rows=rows, barrier=barrier)
  prune = effective.astype(jnp.float32) < thr
  new_mask = mask & ~prune
  new_kernel = jnp.where(new_mask, kernel, jnp.zeros((), kernel.dtype))
  return new_kernel, new_mask, thr


def strip_params_variant(params, dead, masks, *, stripping_factor=0.05,
                         **kw):
  """``strip_params`` for the benchmark's nested-dict layout (masks given)."""
  new_p, new_m = {}, {}
  for b, layers in params.items():
    new_p[b], new_m[b] = {}, {}
    for name, leaf in layers.items():
      d = dead[b][name]["kernel"]
      k, m, _ = strip_kernel_variant(leaf["kernel"], d,
                                     masks[b][name]["kernel"],
                                     stripping_factor=stripping_factor, **kw)
      new_p[b][name] = {"kernel": k, "bias": leaf["bias"]}
      new_m[b][name] = {"kernel": m, "bias": None}
  return new_p, new_m
