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

Compilation: one small program per distinct kernel (shape, dtype,
sharding), reused across layers and strip events; the quantile table is a
runtime input, so new dead sets and new factors do not recompile. Called
eagerly, :func:`strip_params` runs that per-kernel program for each kernel,
its outputs placed exactly like the inputs (same sharding, same devices).
Traced (under an outer ``jit``, ``pmap`` or ``shard_map``), it stacks the
kernels of each distinct shape and computes their thresholds under one
``lax.map``, so the outer program too holds one copy of the computation per
shape (under an outer ``jit`` that takes the factor as a static argument,
that ``jit`` itself retraces for a new factor). :func:`compile_strip`
compiles the per-kernel programs ahead of time from shapes, e.g. in an
application's start-up, so that the first eager strip event compiles
nothing.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from synstrip_jax import trees
from synstrip_jax._quantile import (column_thresholds, quantile_table,
                                    table_thresholds)
from synstrip_jax.validation import (check_dead_leaf, check_mask_leaf,
                                     validate_sparse_tree,
                                     validate_stripping_factor)

PyTree = Any
Array = jax.Array

#: Default stripping factor of the original implementation.
DEFAULT_STRIPPING_FACTOR = 0.05

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
      lambda: jnp.where(dead, table_thresholds(w2d, table, 0), jnp.nan),
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


def _fan_in(kernel: Any) -> int:
  return math.prod(kernel.shape[:-1])


def _is_traced(*args: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer)
             for x in jax.tree_util.tree_leaves(args))


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
  """Strip one kernel (:func:`strip_params` of a single kernel).

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
  check_dead_leaf(None, kernel, dead, name="dead")
  check_mask_leaf(None, kernel, mask, name="mask")
  if kernel.size == 0:  # nothing to prune
    return kernel, mask, jnp.full((kernel.shape[-1],), jnp.nan, jnp.float32)
  if _is_traced(kernel, dead, mask):
    table = quantile_table(_fan_in(kernel), q)
    return _strip_kernel_impl(kernel, dead, mask, table)[:3]
  new_kernel, new_mask, thr, skipped = _eager_strip(kernel, dead, mask, q)
  _raise_on_nan([("kernel", skipped)])
  return new_kernel, new_mask, thr


def _shardings(kernel: Any) -> Optional[tuple[Any, Any]]:
  """``(kernel sharding, replicated sharding)`` of the per-kernel program for
  a kernel committed to a ``NamedSharding`` or one device; ``None`` for an
  uncommitted array (JAX's default device), a NumPy array, a
  ``jax.ShapeDtypeStruct`` without sharding or another sharding kind (the
  program then places its outputs as ``jax.jit`` does)."""
  sharding = getattr(kernel, "sharding", None)
  if not getattr(kernel, "committed", True):
    return None
  if isinstance(sharding, jax.sharding.NamedSharding):
    return sharding, jax.sharding.NamedSharding(sharding.mesh,
                                                jax.sharding.PartitionSpec())
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding, sharding
  return None


@functools.lru_cache(maxsize=None)
def _program(shardings: Optional[tuple[Any, Any]]) -> Any:
  """The jitted per-kernel program ``(kernel, dead, mask, table) -> (kernel,
  mask, thresholds, skipped)`` for kernels placed by ``shardings`` (see
  :func:`_shardings`): kernel and mask keep the kernel's sharding, the small
  vectors are replicated over its devices. Compiled once per kernel (shape,
  dtype, sharding), whatever the dead set and the factor."""
  if shardings is None:
    return jax.jit(_strip_kernel_impl)
  s, r = shardings
  return jax.jit(_strip_kernel_impl, in_shardings=(s, r, s, r),
                 out_shardings=(s, s, r, r))


def _put(x: Any, sharding: Any) -> Array:
  """``x`` placed by ``sharding`` (unchanged when it already is: no copy)."""
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
    return x
  return jax.device_put(x, sharding)


def _eager_strip(kernel: Array, dead: Array, mask: Optional[Array],
                 q: float) -> tuple[Array, Array, Array, Array]:
  """``(kernel, mask, thresholds, skipped)`` of one kernel by the per-kernel
  program, outputs placed like ``kernel`` (a missing mask is made on the
  host, so the same program serves the first and later events)."""
  if mask is None:
    mask = np.ones(kernel.shape, np.bool_)
  table = quantile_table(_fan_in(kernel), q)
  shardings = _shardings(kernel)
  if shardings is not None:  # inputs where the program expects them
    s, r = shardings
    dead, mask, table = _put(dead, r), _put(mask, s), _put(table, r)
  return _program(shardings)(kernel, dead, mask, table)


def compile_strip(params: PyTree, targets: PyTree) -> int:
  """Compile ahead of time what eager strip events on ``params`` will run.

  An eager :func:`strip_params` (or :func:`synstrip_jax.strip_event`) runs
  one compiled program per distinct kernel (shape, dtype, sharding); the
  first event of a process compiles them (about 0.3-0.5 s per kernel shape
  on a 2-core CPU). This compiles them from shapes alone, e.g. in a thread
  of an application's start-up beside its other compilations; the strip
  events then find them in JAX's in-memory caches (and a persistent
  compilation cache keeps them across processes)::

    abstract = jax.eval_shape(lambda: params)  # or the arrays themselves
    compile_strip(abstract, targets)           # targets: bool tree

  Args:
    params: the parameter pytree as arrays or ``jax.ShapeDtypeStruct``s;
      give each struct the ``sharding`` its array will have (none: the
      default device, uncommitted).
    targets: the structure of ``params`` with a truthy entry (``True``, a
      dead vector or a mask) at each kernel that will be stripped and
      ``None``/``False`` elsewhere (the ``targets`` of
      :func:`synstrip_jax.with_stripping` or a ``dead`` tree).

  Returns:
    The number of distinct programs compiled (or found in the caches).
  """
  _, paths, leaves, (flags,) = trees.aligned_leaves(params, targets)
  done = set()
  for path, p, flag in zip(paths, leaves, flags):
    if flag is None or flag is False or not math.prod(p.shape):
      continue
    if len(p.shape) < 2:
      raise ValueError(f"targets[{path}] is set but params[{path}] has shape "
                       f"{tuple(p.shape)}: only kernels of rank >= 2 can be "
                       "stripped")
    shardings = _shardings(p)
    key = (tuple(p.shape), jnp.dtype(p.dtype), shardings)
    if key in done:
      continue
    done.add(key)
    s, r = shardings if shardings is not None else (None, None)
    spec = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype,
                                                         sharding=sh)
    _program(shardings).lower(
        spec(p.shape, p.dtype, s), spec(p.shape[-1:], jnp.bool_, r),
        spec(p.shape, jnp.bool_, s),
        spec((_fan_in(p) + 1, 3), jnp.float32, r)).compile()
  return len(done)

def _strip_kernels(kernels: list[Array], deads: list[Array],
                   masks: list[Optional[Array]], q: float
                   ) -> list[tuple[Array, Array, Array]]:
  """``[(kernel, mask, skipped)]`` of :func:`strip_kernel` for each kernel.

  Eager: one call of the per-kernel program per kernel (compiled once per
  distinct kernel shape, dtype and sharding; outputs placed like the
  kernel). Traced: kernels of the
  same shape, dtype and mask presence get their thresholds from one
  ``lax.map`` of the per-kernel computation over their stack, so the
  enclosing program holds one copy of it per distinct shape (and a cheap
  masking per kernel). ``skipped``: ``[n]`` bool, the dead neurons left
  alone for a NaN among their kept weights.
  """
  if not _is_traced(kernels, deads, masks):
    out = [_eager_strip(k, d, m, q) for k, d, m in zip(kernels, deads, masks)]
    return [(k, m, skipped) for k, m, _, skipped in out]

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
                 *, stripping_factor: float = DEFAULT_STRIPPING_FACTOR
                 ) -> tuple[PyTree, PyTree]:
  """Synaptic stripping over a parameter pytree (pure).

  Args:
    params: the parameter pytree.
    dead: the structure of ``params`` with a ``[n]`` bool vector at every
      kernel ``[..., fan_in, n]`` to strip and ``None`` at every other leaf.
    masks: ``None`` (everything kept) or the keep-mask pytree: bool arrays of
      the kernel's shape at stripped kernels and ``None`` elsewhere.
    stripping_factor: the quantile ``q`` in ``[0, 1]`` of each dead neuron's
      remaining non-zero incoming weights below which weights are pruned.
  Returns:
    ``(params, masks)``: new params with pruned weights exactly 0.0 (shapes
    and dtypes unchanged; leaves without a ``dead`` entry are returned as
    they are) and the new masks, which hold a bool array at every leaf where
    ``dead`` or the old ``masks`` did.

  Raises:
    ValueError, TypeError: a bad stripping factor, trees that
      do not align, a dead vector or mask of the wrong shape or dtype; the
      message names the tree path and the value.
    ValueError: in an eager call, a dead neuron has a NaN among its kept
      weights; the message names every such kernel path and neuron. Under
      ``jit`` (where raising on values is impossible) such a neuron is
      skipped: nothing is pruned in its column and its mask is kept, which is
      what the original does (its quantile is NaN there). Infinite weights
      are ordinary values for the quantile, as in the original.

  Empty kernels (a zero-size axis) and ``None`` leaves of ``params`` are left
  as they are. Called eagerly, it runs one compiled program per distinct
  kernel (shape, dtype, sharding), compiled at its first use or ahead of
  time by :func:`compile_strip`, and returns arrays placed exactly like the
  inputs; under ``jit``/``pmap``/``shard_map`` it is part of the enclosing
  program.
  """
  q = validate_stripping_factor(stripping_factor)
  validate_sparse_tree(params, dead, "dead")
  validate_sparse_tree(params, masks, "masks")
  treedef, paths, leaves, (dead_l, mask_l) = trees.aligned_leaves(
      params, dead, masks)
  todo = [i for i, d in enumerate(dead_l) if d is not None and leaves[i].size]
  stripped = _strip_kernels([leaves[i] for i in todo],
                            [dead_l[i] for i in todo],
                            [mask_l[i] for i in todo], q)
  new_params, new_masks = _merge(leaves, dead_l, mask_l,
                                 dict(zip(todo, stripped)))
  if not _is_traced(leaves, dead_l, mask_l):  # eager calls only
    _raise_on_nan([(f"params[{paths[i]}]", s)
                   for i, (_, _, s) in zip(todo, stripped)])
  return (jax.tree_util.tree_unflatten(treedef, new_params),
          jax.tree_util.tree_unflatten(treedef, new_masks))


__all__ = ["DEFAULT_STRIPPING_FACTOR", "column_thresholds", "compile_strip",
           "kernel_thresholds", "quantile_table", "strip_kernel",
           "strip_params"]
