"""Names kept for one release: each warns (``DeprecationWarning``) on access.

A module lists its deprecated names as ``{old name: (module, name)}`` and
sets ``__getattr__ = deprecated_getattr(__name__, {...})``; the old name then
resolves, with a warning that names its replacement, to that object. Names
whose route is gone have their thin replacement here.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Mapping, Optional

import jax

PyTree = Any


def deprecated_getattr(module: str, aliases: Mapping[str, tuple[str, ...]],
                       lazy: Optional[Mapping[str, str]] = None
                       ) -> Callable[[str], Any]:
  """A module ``__getattr__`` for ``aliases`` (warn) and ``lazy`` submodules.

  Args:
    module: the module's ``__name__`` (for the messages).
    aliases: ``{old name: (module, name[, what to use instead])}``: the
      object an old name stands for; access warns with
      ``DeprecationWarning`` naming the replacement (default
      ``module.name``).
    lazy: ``{name: module}``: submodules imported on first access (no
      warning), so that importing ``module`` does not import them.
  """
  lazy = dict(lazy or {})

  def __getattr__(name: str) -> Any:
    if name in lazy:
      return importlib.import_module(lazy[name])
    if name not in aliases:
      raise AttributeError(f"module {module!r} has no attribute {name!r}")
    target_module, target, *instead = aliases[name]
    warnings.warn(
        f"{module}.{name} is deprecated and will be removed; use "
        f"{instead[0] if instead else target_module + '.' + target}",
        DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(target_module), target)

  return __getattr__


def _dead_tree_of_stats(stats_tree: PyTree, tau: Optional[float] = None
                        ) -> PyTree:
  """:func:`synstrip_jax.dead_mask` at every statistics leaf of a tree."""
  from synstrip_jax.activations import ActivationStats, dead_mask  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(
      lambda s: dead_mask(s, tau), stats_tree,
      is_leaf=lambda x: isinstance(x, ActivationStats))


def _find_dead(stats_tree: PyTree, tau: Optional[float] = None) -> PyTree:
  """``check_finite`` then the dead mask of every statistics leaf."""
  from synstrip_jax.activations import check_finite  # pylint: disable=g-import-not-at-top
  check_finite(stats_tree)
  return _dead_tree_of_stats(stats_tree, tau)


def _update_stats(stats: Any, x: jax.Array, **kwargs: Any) -> Any:
  """``merge_stats(stats, batch_stats(x, **kwargs))``."""
  from synstrip_jax.activations import batch_stats, merge_stats  # pylint: disable=g-import-not-at-top
  return merge_stats(stats, batch_stats(x, **kwargs))


#: Top-level names of earlier releases: ``{old: (module, name)}``.
TOP_LEVEL = {
    "check_finite": ("synstrip_jax.activations", "check_finite"),
    "dead_masks": ("synstrip_jax._deprecated", "_dead_tree_of_stats",
                   "synstrip_jax.dead_tree (or dead_mask per layer)"),
    "dormancy_score": ("synstrip_jax.activations", "dormancy_score"),
    "example_stats": ("synstrip_jax.activations", "example_stats"),
    "find_dead": ("synstrip_jax._deprecated", "_find_dead",
                  "synstrip_jax.dead_tree (it checks finiteness)"),
    "init_masks": ("synstrip_jax.transform", "init_masks"),
    "nonfinite_neurons": ("synstrip_jax.activations", "nonfinite_neurons"),
    "psum_stats": ("jax.lax", "psum"),
    "reduce_examples": ("synstrip_jax.activations", "reduce_examples"),
    "reduce_stats_tree": ("synstrip_jax.probe", "reduce_stats_tree"),
    "set_masks": ("synstrip_jax.transform", "set_masks"),
    "stats_by_layer": ("synstrip_jax.probe", "stats_by_layer"),
    "strip_kernel": ("synstrip_jax.stripping", "strip_kernel"),
    "update_stats": ("synstrip_jax._deprecated", "_update_stats",
                     "synstrip_jax.merge_stats(stats, batch_stats(x))"),
    "validate_stripping_factor": ("synstrip_jax.validation",
                                  "validate_stripping_factor"),
}

__all__ = ["TOP_LEVEL", "deprecated_getattr"]
