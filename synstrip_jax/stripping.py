r"""Synaptic stripping: prune the lowest incoming weights of dead neurons.

For a kernel ``W`` of shape ``[..., fan_in, n]`` (Flax layout: the last axis
indexes the ``n`` neurons, every other axis is fan-in, so Dense and Conv
kernels both work) and a dead neuron ``j``, let ``v`` be the ``m`` weights of
column ``W[..., j]`` that are still non-zero. Stripping computes the
``q = stripping_factor`` quantile of ``v`` with linear interpolation, exactly
as ``torch.quantile`` (and ``numpy.quantile``) does in float32,

.. math::
   r = q (m - 1) \text{ (float64)},\quad l = \lfloor r \rfloor,\quad
   h = \lceil r \rceil,\quad w = \mathrm{f32}(r - l),\quad
   t = \mathrm{lerp}(v_{(l)}, v_{(h)}, w)

where ``v_(i)`` is the ``i``-th smallest value and ``lerp`` is PyTorch's CPU
lerp with one rounding (``a + w d`` if ``w < 0.5`` else ``b - d (1 - w)``,
``d = b - a``). Every weight of the column with ``W < t`` (signed, strictly;
ties survive) is set to 0.0 and its keep-mask bit to False. Masks only shrink.

Implementation: the ``m``-dependent interpolation constants come from a
float64 table built on the host for each ``(fan_in, q)``
(:func:`quantile_table`, so ranks match PyTorch's float64 ranks without
enabling x64) and enter the compiled program as a runtime input: a new
``stripping_factor`` reuses the compiled program. The order statistics
``v_(l)`` and ``v_(h)`` are found exactly, without sorting, by bisection on
order-preserving ``uint32`` keys of the float32 weights: 32 vectorised
compare-and-count passes over the fan-in (``sum(key <= mid)``) give
``v_(l)``, one more pass gives ``v_(h)``. This works in the kernel's own
``[fan_in, n]`` layout (no transpose) and on XLA:CPU is several times faster
than ``lax.top_k`` (a per-row sort there). The whole kernel is processed at
once (no gather of the dead columns: a data-dependent gather needs one
compiled branch per bucket size), behind a ``lax.cond`` that skips a kernel
without dead neurons.

Eager calls of :func:`strip_params` compute on the host by default
(:mod:`synstrip_jax._host`: NumPy, no compilation, only the dead columns,
bit-identical to the compiled program including XLA:CPU's flush-to-zero), so
a first strip event costs no compile time; ``method='compiled'`` selects the
XLA program below, which multi-process arrays always use.

Compilation: one small program per distinct kernel (shape, dtype), reused
across layers and strip events. Called eagerly with ``method='compiled'``,
:func:`strip_params` dispatches a jitted per-kernel program for each kernel;
traced (under an
outer ``jit``, ``pmap`` or ``shard_map``), it stacks the kernels of each
distinct shape and computes their thresholds under one ``lax.map``, so the
outer program too holds one copy of the computation per shape, not one per
kernel. Compile time grows with the number of distinct kernel shapes, not
with the number of kernels; new dead sets and new factors do not recompile
(under an outer ``jit`` that takes the factor as a static argument, that
``jit`` itself retraces for a new factor).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import numbers
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from synstrip_jax import _host, _trees

PyTree = Any
Array = jax.Array

#: Default stripping factor of the original implementation.
DEFAULT_STRIPPING_FACTOR = 0.05

#: How an eager :func:`strip_params` computes (see its ``method``).
METHODS = ("auto", "host", "compiled")


def validate_stripping_factor(stripping_factor: Any) -> float:
  """Return ``stripping_factor`` as a Python float, or raise.

  Accepted: a real number in ``[0, 1]``: a Python ``int``/``float``, a numpy
  scalar or a *concrete* 0-d array (numpy or JAX) of an integer or floating
  dtype. It fixes static quantities, so a traced value (a jit argument) is
  refused with ``TypeError``; NaN, booleans, complex numbers, strings and
  arrays of rank > 0 with ``ValueError``.
  """
  if isinstance(stripping_factor, jax.core.Tracer):
    raise TypeError(
        "stripping_factor must be a static Python number, got a traced "
        f"value {stripping_factor!r}; pass it as a static argument "
        "(static_argnames='stripping_factor') or close over a constant.")
  bad = ValueError(
      f"stripping_factor must be a real number in [0, 1], got "
      f"{stripping_factor!r}")
  if isinstance(stripping_factor, (bool, np.bool_)):
    raise bad
  if isinstance(stripping_factor, (np.ndarray, np.generic, jax.Array)):
    dtype = stripping_factor.dtype
    if stripping_factor.shape != () or not (
        jnp.issubdtype(dtype, jnp.floating)
        or jnp.issubdtype(dtype, jnp.integer)):
      raise bad
    q = float(np.asarray(stripping_factor))
  elif isinstance(stripping_factor, numbers.Real):
    q = float(stripping_factor)
  else:
    raise bad
  if not (0.0 <= q <= 1.0):  # also rejects NaN
    raise ValueError(
        f"stripping_factor must be in [0, 1], got {stripping_factor!r}")
  return q


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


def _table_thresholds(cols: Array, table: Array, axis: int) -> Array:
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
  return _table_thresholds(cols, table, axis)


def _replicated(x: Array) -> Array:
  """``x`` resharded to replicated when its type carries explicit mesh axes.

  Under explicit sharding (``jax.sharding.AxisType.Explicit``) reductions
  over a sharded fan-in and the per-neuron comparisons are typed errors or
  need collectives; replicating the one kernel being stripped is cheap next
  to the stripping itself. Arrays with auto/unspecified sharding are
  returned unchanged (XLA's partitioner takes care of them).
  """
  try:
    sharding = jax.typeof(x).sharding
  except Exception:  # pylint: disable=broad-except
    return x
  spec = getattr(sharding, "spec", None)
  if spec is None or all(s is None for s in spec):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def _kernel_thresholds(kernel: Array, dead: Array, table: Array) -> Array:
  """:func:`kernel_thresholds` with the quantile table as an array."""
  n = kernel.shape[-1]
  kernel, dead = _replicated(kernel), _replicated(dead)
  w2d = kernel.reshape(-1, n).astype(jnp.float32)
  nan = jnp.full((n,), jnp.nan, jnp.float32)
  # One program for every dead set: the whole kernel is processed (no
  # data-dependent gather, which would need one compiled branch per bucket
  # size), and a kernel without dead neurons is skipped at run time.
  return jax.lax.cond(
      jnp.any(dead),
      lambda: jnp.where(dead, _table_thresholds(w2d, table, 0), jnp.nan),
      lambda: nan)


def kernel_thresholds(kernel: Array, dead: Array,
                      stripping_factor: float) -> Array:
  """Per-neuron stripping thresholds of one kernel.

  Args:
    kernel: ``[..., fan_in, n]`` effective weights (pruned entries are 0).
    dead: ``[n]`` bool, the dead neurons.
    stripping_factor: the quantile ``q`` in ``[0, 1]`` (a Python float).

  Returns:
    ``[n]`` float32: the threshold of each dead neuron with a non-zero weight
    left, NaN elsewhere (all NaN, at almost no cost, when no neuron is dead).
  """
  table = quantile_table(math.prod(kernel.shape[:-1]), stripping_factor)
  return _kernel_thresholds(kernel, dead, table)


def _effective(kernel: Array, mask: Optional[Array]) -> Array:
  """The kernel with masked-out weights at 0.0."""
  if mask is None:
    return kernel
  return jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))


def _apply_thresholds(kernel: Array, mask: Optional[Array], effective: Array,
                      thr: Array) -> tuple[Array, Array]:
  """``(kernel, mask)`` with every effective weight below its threshold pruned."""
  # NaN thresholds compare False: live neurons and empty columns keep all.
  keep = ~(effective.astype(jnp.float32) < thr)
  new_mask = keep if mask is None else mask & keep
  return jnp.where(new_mask, kernel, jnp.zeros((), kernel.dtype)), new_mask


def _has_nan(effective: Array) -> Array:
  """``[n]`` bool: the columns with a NaN among their (kept) weights."""
  return jnp.any(jnp.isnan(effective), axis=tuple(range(effective.ndim - 1)))


def _strip_kernel_impl(kernel: Array, dead: Array, mask: Optional[Array],
                       table: Array) -> tuple[Array, Array, Array, Array]:
  """:func:`strip_kernel` with the quantile table as an array (traceable;
  ``mask=None`` means everything kept).

  Returns ``(kernel, mask, thresholds, skipped)``; ``skipped`` (``[n]``
  bool): the dead neurons left alone for a NaN among their kept weights (the
  NaN policy: nothing pruned, as the original whose quantile is NaN there).
  """
  effective = _effective(kernel, mask)
  skipped = dead & _has_nan(effective)
  thr = _kernel_thresholds(effective, dead & ~skipped, table)
  return (*_apply_thresholds(kernel, mask, effective, thr), thr, skipped)


#: The per-kernel program: compiled once per kernel (shape, dtype, sharding),
#: whatever the dead set and the stripping factor.
_strip_kernel_jit = jax.jit(_strip_kernel_impl)


def _fan_in(kernel: Any) -> int:
  return math.prod(kernel.shape[:-1])


def _is_traced(*trees: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer)
             for x in jax.tree_util.tree_leaves(trees))


def _raise_on_nan(skipped: list[tuple[str, Any]]) -> None:
  """Raise ``ValueError`` naming every ``(label, [n] bool)`` with a True entry.

  Only called on concrete values (eager); under ``jit`` the neurons are
  skipped instead.
  """
  if not any(np.asarray(f).any() for _, f in skipped):
    return  # the common case (NumPy: no op-by-op compilation)
  found = []
  for path, flags in skipped:
    idx = np.flatnonzero(np.asarray(flags))
    if idx.size:
      shown = idx[:10].tolist()
      found.append(f"{path} neuron(s) {shown}"
                   + (f" (+{idx.size - 10} more)" if idx.size > 10 else ""))
  raise ValueError(
      "NaN weight(s) in the incoming weights of dead neuron(s): "
      + "; ".join(found) + ". Their quantile is undefined; fix or mask the "
      "NaN weights first (under jit such neurons are skipped: nothing "
      "pruned, mask kept).")


def strip_kernel(kernel: Array, dead: Array, mask: Array, *,
                 stripping_factor: Any = DEFAULT_STRIPPING_FACTOR
                 ) -> tuple[Array, Array, Array]:
  """Strip one kernel (always with the compiled per-kernel program; see
  :func:`strip_params` for the host path of eager calls).

  Args:
    kernel: ``[..., fan_in, n]`` weights (any float dtype; thresholds are
      computed in float32).
    dead: ``[n]`` bool dead neurons.
    mask: keep-mask of ``kernel``'s shape, bool (True = kept).
    stripping_factor: the quantile ``q`` in ``[0, 1]``: a Python number or
      a concrete 0-d array (see :func:`validate_stripping_factor`); a new
      value does not recompile.

  Returns:
    ``(kernel, mask, thresholds)``: the kernel with every pruned weight 0.0
    (dtype unchanged), the new mask (``new <= old``), and ``[n]`` float32
    thresholds (NaN for neurons that were not stripped). An empty kernel
    (a zero-size axis) is returned as it is, with its mask.

  Raises:
    ValueError, TypeError: a bad stripping factor, ``dead`` not bool ``[n]``
      or ``mask`` not bool of the kernel's shape.
    ValueError: in an eager call, a dead neuron has a NaN among its kept
      weights (the message names the neuron). Under ``jit`` such a neuron is
      skipped instead (nothing pruned, mask kept, threshold NaN), exactly
      what the original does (its quantile is NaN there).
  """
  q = validate_stripping_factor(stripping_factor)
  _check_dead_leaf(None, kernel, dead, name="dead")
  check_mask_leaf(None, kernel, mask, name="mask")
  if kernel.size == 0:  # nothing to prune
    return kernel, mask, jnp.full((kernel.shape[-1],), jnp.nan, jnp.float32)
  table = quantile_table(_fan_in(kernel), q)
  new_kernel, new_mask, thr, skipped = _strip_kernel_jit(kernel, dead, mask,
                                                         table)
  if not _is_traced(kernel, dead, mask):
    _raise_on_nan([("kernel", skipped)])
  return new_kernel, new_mask, thr


def _use_host(method: str, *trees: Any) -> bool:
  """Whether an eager call runs on the host (see :func:`strip_params`, which
  has checked ``method``).

  Raises:
    ValueError: ``'host'`` with arrays that this process cannot read whole
      (multi-process sharded arrays).
  """
  if method == "compiled":
    return False
  readable = all(getattr(x, "is_fully_addressable", True)
                 for x in jax.tree_util.tree_leaves(trees))
  if method == "host" and not readable:
    raise ValueError("method='host' needs arrays this process can read "
                     "whole; these span several processes: use 'auto' or "
                     "'compiled'")
  return readable


def _like(x: np.ndarray, ref: Any) -> Array:
  """``x`` as a JAX array placed like ``ref`` (same sharding if it has one)."""
  sharding = getattr(ref, "sharding", None)
  return jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)


def _host_strip_all(kernels: list[Array], deads: list[Array],
                    masks: list[Optional[Array]], q: float
                    ) -> list[tuple[Array, Array, Any]]:
  """``[(kernel, mask, skipped)]`` computed by :mod:`synstrip_jax._host` (no
  compilation), placed like the inputs.

  The kernels are stripped in parallel threads, one per CPU at most (NumPy's
  partition and element-wise passes release the GIL: about 1.9x on 2 cores);
  the transfers stay in this thread.
  """
  jobs = []
  for k, d, m in zip(kernels, deads, masks):
    lo, hi, w, _ = _interpolation_table(_fan_in(k), q)
    jobs.append((np.asarray(k), np.asarray(d),
                 None if m is None else np.asarray(m), (lo, hi, w)))
  workers = min(len(jobs), os.cpu_count() or 1)
  if workers > 1:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      results = list(pool.map(lambda job: _host.strip_kernel(*job), jobs))
  else:
    results = [_host.strip_kernel(*job) for job in jobs]
  return [(_like(new_k, k), _like(new_m, k if m is None else m), skipped)
          for (new_k, new_m, skipped), k, m in zip(results, kernels, masks)]


def _compiled_strip(kernel: Array, dead: Array, mask: Optional[Array],
                    q: float) -> tuple[Array, Array, Array]:
  """``(kernel, mask, skipped)`` by the jitted per-kernel program (compiled
  once per kernel shape; a missing mask is made on the host, so the same
  program serves the first and later events)."""
  if mask is None:
    mask = np.ones(kernel.shape, np.bool_)
  new_k, new_m, _, skipped = _strip_kernel_jit(
      kernel, dead, mask, quantile_table(_fan_in(kernel), q))
  return new_k, new_m, skipped


def _strip_kernels(kernels: list[Array], deads: list[Array],
                   masks: list[Optional[Array]], q: float,
                   method: str = "auto"
                   ) -> list[tuple[Array, Array, Array]]:
  """``[(kernel, mask, skipped)]`` of :func:`strip_kernel` for each kernel.

  Eager: on the host (:mod:`synstrip_jax._host`, no compilation) when
  :func:`_use_host`, else one call of the jitted per-kernel program per
  kernel (compiled once per distinct kernel shape). Traced: kernels of the
  same shape, dtype and mask presence get their thresholds from one
  ``lax.map`` of the per-kernel computation over their stack, so the
  enclosing program holds one copy of it per distinct shape (and a cheap
  masking per kernel). ``skipped``: ``[n]`` bool, the dead neurons left
  alone for a NaN among their kept weights.
  """
  if not _is_traced(kernels, deads, masks):
    if _use_host(method, kernels, deads, masks):
      return _host_strip_all(kernels, deads, masks, q)
    return [_compiled_strip(k, d, m, q)
            for k, d, m in zip(kernels, deads, masks)]
  if method == "host":
    raise ValueError("method='host' needs concrete arrays; strip_params is "
                     "being traced (jit, pmap, shard_map): use 'auto' or "
                     "'compiled'")

  groups: dict[Any, list[int]] = {}
  for i, (k, m) in enumerate(zip(kernels, masks)):
    key = (tuple(k.shape), jnp.dtype(k.dtype), m is None)
    groups.setdefault(key, []).append(i)
  out: list[Any] = [None] * len(kernels)
  for idx in groups.values():
    table = quantile_table(_fan_in(kernels[idx[0]]), q)
    if len(idx) == 1:
      i = idx[0]
      new_k, new_m, _, skipped = _strip_kernel_impl(kernels[i], deads[i],
                                                    masks[i], table)
      out[i] = (new_k, new_m, skipped)
      continue
    # The thresholds of all kernels of this shape by one lax.map of the
    # per-kernel computation over their stack (a loop, not a vmap: a
    # vmapped lax.cond would process kernels without dead neurons too, and
    # XLA:CPU runs the batched bisection 2-3x slower); only the cheap final
    # masking is per kernel.
    effective = [_effective(kernels[i], masks[i]) for i in idx]
    skipped = [deads[i] & _has_nan(e) for i, e in zip(idx, effective)]
    thr = jax.lax.map(
        lambda kd: _kernel_thresholds(kd[0], kd[1], table),
        (jnp.stack([_replicated(e) for e in effective]),
         jnp.stack([_replicated(deads[i] & ~s) for i, s in zip(idx, skipped)])))
    for j, i in enumerate(idx):
      out[i] = (*_apply_thresholds(kernels[i], masks[i], effective[j], thr[j]),
                skipped[j])
  return out


def _label(name: str, path: Optional[str]) -> str:
  return name if path is None else f"{name}[{path}]"


def _check_bool_leaf(label: str, leaf: Any, expected: str = "") -> None:
  """``TypeError`` unless ``leaf`` (named ``label``) is a bool array."""
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    raise TypeError(f"{label} must be a bool array or None, got "
                    f"{type(leaf).__name__}: {leaf!r}")
  if leaf.dtype != jnp.bool_:
    raise TypeError(f"{label} must have dtype bool{expected}, got "
                    f"{_trees.describe(leaf)}")


def _check_dead_leaf(path: Optional[str], kernel: Any, dead: Any,
                     name: str = "dead") -> None:
  """Check that ``dead`` is a bool ``[n]`` vector for ``kernel [..., n]``.

  Only static properties (shape, dtype) are read, so this works under jit.
  ``path`` (``None``: a bare argument) and ``name`` label the message.
  """
  label = _label(name, path)
  _check_bool_leaf(label, dead)
  if getattr(kernel, "ndim", 0) < 2:
    raise ValueError(
        f"{_label('params', path) if path is not None else 'kernel'} has "
        f"shape {getattr(kernel, 'shape', None)}: only kernels of rank >= 2 "
        "([..., fan_in, neurons]) can be stripped")
  if tuple(dead.shape) != (kernel.shape[-1],):
    raise ValueError(
        f"{label} has shape {tuple(dead.shape)} but the kernel "
        f"{tuple(kernel.shape)} has {kernel.shape[-1]} neurons (last axis): "
        f"expected shape ({kernel.shape[-1]},)")


def check_mask_leaf(path: Optional[str], kernel: Any, mask: Any,
                     name: str = "masks") -> None:
  """Check that ``mask`` is a bool array of ``kernel``'s shape (jit-safe)."""
  label = _label(name, path)
  _check_bool_leaf(label, mask,
                   f" (the kernel's shape {tuple(kernel.shape)})")
  if tuple(mask.shape) != tuple(kernel.shape):
    raise ValueError(f"{label} has shape {tuple(mask.shape)}, expected the "
                     f"kernel's shape {tuple(kernel.shape)}")


def validate_sparse_tree(params: PyTree, tree: Optional[PyTree], name: str) -> None:
  """Check that ``tree`` (``dead`` or ``masks``) aligns with ``params``.

  Raises ``ValueError``/``TypeError`` naming the path and the offending
  value. Only shapes and dtypes are inspected, so this works under ``jit``.
  """
  if tree is None:
    return
  _trees.check_aligned(params, tree, name)
  check = _check_dead_leaf if name == "dead" else check_mask_leaf
  _, paths, leaves, (others,) = _trees.aligned_leaves(params, tree)
  for path, p, t in zip(paths, leaves, others):
    if t is not None:
      check(path, p, t)


def _merge(leaves: list[Any], dead_l: list[Any], mask_l: list[Any],
           stripped: dict[int, tuple[Array, Array, Any]]
           ) -> tuple[list[Any], list[Any]]:
  """The new param and mask leaves of :func:`strip_params`: the stripped
  kernels (``{leaf index: (kernel, mask, skipped)}``), all-True masks for
  empty dead-vector kernels, and every other masked leaf with its masked-out
  entries at 0."""
  new_params, new_masks = list(leaves), list(mask_l)
  for i, (p, m, _) in stripped.items():
    new_params[i], new_masks[i] = p, m
  for i, (p, m) in enumerate(zip(leaves, mask_l)):
    if dead_l[i] is not None and m is None and not p.size:
      new_masks[i] = jnp.ones(p.shape, jnp.bool_)
    elif dead_l[i] is None and m is not None:
      new_params[i] = jnp.where(m, p, jnp.zeros((), p.dtype))
  return new_params, new_masks


def strip_params(params: PyTree, dead: PyTree, masks: Optional[PyTree] = None,
                 *, stripping_factor: float = DEFAULT_STRIPPING_FACTOR,
                 method: str = "auto") -> tuple[PyTree, PyTree]:
  """Synaptic stripping over a parameter pytree (pure).

  Args:
    params: the parameter pytree.
    dead: the structure of ``params`` with a ``[n]`` bool vector at every
      kernel ``[..., fan_in, n]`` to strip and ``None`` at every other leaf.
    masks: ``None`` (everything kept) or the keep-mask pytree: bool arrays of
      the kernel's shape at stripped kernels and ``None`` elsewhere.
    stripping_factor: the quantile ``q`` in ``[0, 1]`` of each dead neuron's
      remaining non-zero incoming weights below which weights are pruned.
    method: how an eager call computes; the results are bit-identical
      (tested). ``'auto'``: on the host in NumPy (no compilation; only the
      dead columns are processed) when this process can read the arrays
      whole, else ``'compiled'``. ``'host'``: always on the host (an error
      for traced or multi-process arrays). ``'compiled'``: the jitted
      per-kernel XLA program (compiled once per kernel shape). Traced calls
      (under ``jit``, ``pmap``, ``shard_map``) are always compiled.

  Returns:
    ``(params, masks)``: new params with pruned weights exactly 0.0 (shapes
    and dtypes unchanged; leaves without a ``dead`` entry are returned as
    they are) and the new masks, which hold a bool array at every leaf where
    ``dead`` or the old ``masks`` did.

  Raises:
    ValueError, TypeError: a bad stripping factor or ``method``, trees that
      do not align, a dead vector or mask of the wrong shape or dtype; the
      message names the tree path and the value.
    ValueError: in an eager call, a dead neuron has a NaN among its kept
      weights; the message names every such kernel path and neuron. Under
      ``jit`` (where raising on values is impossible) such a neuron is
      skipped: nothing is pruned in its column and its mask is kept, which is
      what the original does (its quantile is NaN there). Infinite weights
      are ordinary values for the quantile, as in the original.

  Empty kernels (a zero-size axis) and ``None`` leaves of ``params`` are left
  as they are.
  """
  q = validate_stripping_factor(stripping_factor)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  validate_sparse_tree(params, dead, "dead")
  validate_sparse_tree(params, masks, "masks")
  treedef, paths, leaves, (dead_l, mask_l) = _trees.aligned_leaves(
      params, dead, masks)
  todo = [i for i, d in enumerate(dead_l) if d is not None and leaves[i].size]
  stripped = _strip_kernels([leaves[i] for i in todo],
                            [dead_l[i] for i in todo],
                            [mask_l[i] for i in todo], q, method)
  new_params, new_masks = _merge(leaves, dead_l, mask_l,
                                 dict(zip(todo, stripped)))
  if not _is_traced(leaves, dead_l, mask_l):  # eager calls only
    _raise_on_nan([(f"params[{paths[i]}]", s)
                   for i, (_, _, s) in zip(todo, stripped)])
  return (jax.tree_util.tree_unflatten(treedef, new_params),
          jax.tree_util.tree_unflatten(treedef, new_masks))
