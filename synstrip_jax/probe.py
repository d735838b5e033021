"""Align per-layer activation statistics with the kernels that feed them.

A strippable layer sows the statistics of its post-activation output under its
own scope as ``<layer>/post_act`` (see :mod:`synstrip_jax.linen` and
:mod:`synstrip_jax.nnx`), beside its ``<layer>/kernel`` parameter. So
:func:`dead_tree` and :func:`target_tree` pair statistics and kernels by path,
by construction (the original guesses the preceding layer by subtracting one
from a ``Sequential`` index). Statistics are sown per example (``[B, n]``, see
:func:`synstrip_jax.activations.example_stats`) and summed by
:func:`reduce_stats_tree`, which can drop padding examples and sum across
devices.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from flax import nnx

from synstrip_jax import _trees
from synstrip_jax.activations import (ActivationStats, dead_mask,
                                      merge_stats, reduce_examples)

PyTree = Any

#: Name of the sown statistics inside a layer's scope.
POST_ACT = "post_act"


def accumulate_sown(prev: Optional[ActivationStats], new: ActivationStats) -> ActivationStats:
  # A layer applied several times in one call adds its statistics up.
  return new if prev is None else merge_stats(prev, new)


def no_stats() -> None:
  return None


def _is_stats(x: Any) -> bool:
  return isinstance(x, ActivationStats)


def _as_plain(tree: PyTree) -> PyTree:
  """An NNX ``State`` (or any mapping tree) as nested plain dicts."""
  if isinstance(tree, nnx.State):
    tree = tree.to_pure_dict()
  return tree


def stats_by_layer(stats_tree: PyTree) -> dict[str, ActivationStats]:
  """``{layer_path: ActivationStats}`` from a sown statistics tree.

  ``stats_tree`` is Linen's ``variables['activations']`` or NNX's captured
  ``nnx.Intermediate`` state; the layer path is the path of the statistics
  without its trailing ``post_act``.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(_as_plain(stats_tree),
                                                 is_leaf=_is_stats)
  out: dict[str, ActivationStats] = {}
  for path, leaf in flat:
    name = _trees.path_str(path)
    if not _is_stats(leaf):
      raise ValueError(f"statistics tree leaf at {name} is not an "
                       f"ActivationStats: {type(leaf).__name__}")
    if not name.endswith("/" + POST_ACT):
      raise ValueError(f"statistics at {name} are not sown as "
                       f"'<layer>/{POST_ACT}' by ActDense/ActLinear")
    out[name[: -len(POST_ACT) - 1]] = leaf
  return out


def reduce_stats_tree(stats_tree: PyTree, *, where: Optional[jax.Array] = None,
                      axis_name: Any = None) -> PyTree:
  """Per-example sown statistics (``[B, n]``) summed over the examples."""
  return jax.tree_util.tree_map(
      lambda s: reduce_examples(s, where=where, axis_name=axis_name),
      _as_plain(stats_tree), is_leaf=_is_stats)


def _kernel_path(path: str) -> Optional[str]:
  return path[: -len("/kernel")] if path.endswith("/kernel") else None


def dead_tree(params: PyTree, stats_tree: PyTree, tau: Optional[float] = None,
              ) -> PyTree:
  """Dead-neuron vectors aligned with ``params`` (the ``dead`` of strip_params).

  Args:
    params: parameter pytree (Linen ``variables['params']``, or NNX
      ``nnx.state(model, nnx.Param)``).
    stats_tree: reduced statistics (``[n]`` leaves) sown by
      :class:`ActDense`/:class:`ActLinear` (see :func:`reduce_stats_tree`).
    tau: ``None`` for the original's exact rule, else a ReDo threshold.

  Returns:
    The structure of ``params`` with a ``[n]`` bool at each kernel that feeds
    sown activations, ``None`` elsewhere.

  Raises:
    ValueError: statistics with no kernel at ``<layer>/kernel``, or whose
      neuron count differs from the kernel's last axis (names the path).
  """
  params = _as_plain(params)
  layers = stats_by_layer(stats_tree)
  treedef, paths, leaves, _ = _trees.aligned_leaves(params)
  dead_leaves, used = [], set()
  for path, leaf in zip(paths, leaves):
    layer = _kernel_path(path)
    if layer is None or layer not in layers:
      dead_leaves.append(None)
      continue
    stats = layers[layer]
    if stats.total.shape != (leaf.shape[-1],):
      raise ValueError(
          f"activations at {layer}/{POST_ACT} have shape {stats.total.shape} "
          f"but kernel {path} has {leaf.shape[-1]} neurons; reduce the "
          "per-example statistics first (reduce_stats_tree)")
    dead_leaves.append(dead_mask(stats, tau))
    used.add(layer)
  missing = sorted(set(layers) - used)
  if missing:
    raise ValueError(f"activations sown at {missing} have no kernel at "
                     "'<layer>/kernel' in params")
  return jax.tree_util.tree_unflatten(treedef, dead_leaves)


def target_tree(params: PyTree, stats_tree: PyTree) -> PyTree:
  """Bool tree: True at the kernels that feed sown activations.

  Suitable as the ``targets`` of :func:`synstrip_jax.transform.with_stripping`.
  Works on per-example or reduced statistics (only the paths are used).
  """
  params = _as_plain(params)
  layers = stats_by_layer(stats_tree)
  treedef, paths, _, _ = _trees.aligned_leaves(params)
  flags = [(_kernel_path(p) in layers) for p in paths]
  missing = sorted(set(layers) - {_kernel_path(p) for p in paths})
  if missing:
    raise ValueError(f"activations sown at {missing} have no kernel at "
                     "'<layer>/kernel' in params")
  return jax.tree_util.tree_unflatten(treedef, flags)


__all__ = [
    "POST_ACT", "accumulate_sown", "dead_tree", "no_stats", "reduce_stats_tree",
    "stats_by_layer", "target_tree",
]
