"""Summaries of stripping: dead neurons, active parameters, sparsity.

All functions are jit-able and return dicts ``{layer_path: scalar}`` (the
kernel's path, e.g. ``encoder/block_0/mlp/fc1/kernel``), plus totals.

*Active parameters* follow the original's definition: over the stripped
(targeted) kernels, the weights that are kept by the mask **and** do not feed
a currently dead neuron. Biases are not counted.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp

from synstrip_jax import trees
from synstrip_jax.validation import present_bool_leaves, validate_sparse_tree

PyTree = Any
Array = jax.Array


def dead_counts(dead: PyTree) -> dict[str, Array]:
  """``{path: number of dead neurons}`` for each non-``None`` dead vector.

  The keys are the kernels' paths (``conv1/kernel``) for Linen trees, NNX
  ``State`` trees (with or without ``Param`` leaves) and plain dicts alike.

  Raises:
    TypeError, ValueError: a dead vector that is not a 1-D bool array.
  """
  return {path: jnp.sum(d, dtype=jnp.int32)
          for path, d in present_bool_leaves(_pure(dead), "dead", ndim=1)}


def _pure(tree: PyTree) -> PyTree:
  """``tree`` with NNX ``Variable`` leaves replaced by their values (so that
  paths read ``fc1/kernel``, not ``fc1/kernel/value``); others unchanged."""
  nnx = sys.modules.get("flax.nnx")  # an NNX object implies flax.nnx loaded
  if nnx is None:
    return tree
  is_var = lambda x: isinstance(x, nnx.Variable)
  if not any(is_var(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_var)):
    return tree
  return nnx.as_pure(tree)


def _kernel_entries(params: PyTree, dead: Optional[PyTree],
                    masks: Optional[PyTree]):
  """``(path, kernel, dead or None, mask or None)`` for the targeted kernels.

  A kernel is targeted when ``dead`` or ``masks`` has an entry for it. Dead
  vectors must be bool ``[n]`` and masks bool of the kernel's shape (errors
  name the path).
  """
  validate_sparse_tree(params, dead, "dead")
  validate_sparse_tree(params, masks, "masks")
  _, paths, leaves, (dead_l, mask_l) = trees.aligned_leaves(params, dead, masks)
  return [(path, p, d, m) for path, p, d, m in zip(paths, leaves, dead_l, mask_l)
          if d is not None or m is not None]


def active_params(params: PyTree, dead: Optional[PyTree] = None,
                  masks: Optional[PyTree] = None) -> dict[str, Array]:
  """Active weights per targeted kernel and ``'total'``.

  Args:
    params: parameter pytree (only shapes are used).
    dead: dead-neuron tree (``None`` = no dead neuron).
    masks: keep-mask tree (``None`` = nothing stripped).

  Returns:
    ``{path: int32 count, ..., 'total': int32}``: for each kernel, the number
    of entries kept by its mask whose neuron (last axis) is not dead.

  Raises:
    ValueError, TypeError: trees that do not align with ``params``, a dead
      vector that is not bool ``[n]`` (``n = kernel.shape[-1]``), a mask that
      is not bool of the kernel's shape; the message names the path.
  """
  out = {}
  for path, p, d, m in _kernel_entries(params, dead, masks):
    keep = jnp.ones(p.shape, jnp.bool_) if m is None else m
    if d is not None:
      keep = keep & ~d
    out[path] = jnp.sum(keep, dtype=jnp.int32)
  out["total"] = sum(out.values(), jnp.zeros((), jnp.int32))
  return out


def sparsity(masks: PyTree) -> dict[str, Array]:
  """Fraction of pruned weights per masked kernel and ``'total'`` (float32).

  An empty mask (zero-size kernel) has sparsity 0. Raises ``TypeError``
  naming the path for a mask that is not a bool array.
  """
  pruned, sizes, out = 0, 0, {}
  for path, m in present_bool_leaves(masks, "masks"):
    n_pruned = jnp.sum(~m, dtype=jnp.int32)
    out[path] = (n_pruned.astype(jnp.float32) / m.size if m.size
                 else jnp.zeros((), jnp.float32))
    pruned = pruned + n_pruned
    sizes += m.size
  out["total"] = (jnp.asarray(pruned, jnp.float32) / sizes if sizes
                  else jnp.zeros((), jnp.float32))
  return out


def summary(params: PyTree, dead: PyTree, masks: Optional[PyTree]) -> dict[str, Array]:
  """Flat scalar metrics for logging.

  Keys: ``dead_neurons``, ``active_params``, ``sparsity`` (totals) and
  ``dead/<path>``, ``active/<path>``, ``sparsity/<path>`` per kernel.
  Inputs are validated as in :func:`active_params`.
  """
  ap = active_params(params, dead, masks)  # validates dead and masks first
  dc = dead_counts(dead)
  out = {"dead_neurons": sum(dc.values(), jnp.zeros((), jnp.int32)),
         "active_params": ap.pop("total")}
  if masks is not None:
    sp = sparsity(masks)
    out["sparsity"] = sp.pop("total")
    out.update({f"sparsity/{k}": v for k, v in sp.items()})
  else:
    out["sparsity"] = jnp.zeros((), jnp.float32)
  out.update({f"dead/{k}": v for k, v in dc.items()})
  out.update({f"active/{k}": v for k, v in ap.items()})
  return out


__all__ = ["active_params", "dead_counts", "sparsity", "summary"]
