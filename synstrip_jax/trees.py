"""Pytree paths as the library names them, and sparse-tree flattening.

Every path the library reports (error messages, the keys of
:func:`synstrip_jax.dead_counts` and :func:`synstrip_jax.summary`, the
``outgoing`` maps of :mod:`synstrip_jax.redo`) is :func:`path_str` of a JAX key
path: the keys joined by ``/`` (``encoder/block_0/mlp/fc1/kernel``; a dict
key, attribute name or sequence index each give one part).

A *sparse tree* (the ``dead`` and ``masks`` trees of the library) has the
structure of a parameter tree, with an array at the leaves it concerns and
``None`` at every other leaf. JAX treats ``None`` as an empty subtree, so these
helpers flatten with ``is_leaf=lambda x: x is None`` to keep the alignment.
"""

from __future__ import annotations

from typing import Any, Optional

import jax

PyTree = Any
KeyPath = tuple[Any, ...]


def is_none(x: Any) -> bool:
  """``is_leaf`` predicate that keeps ``None`` as a leaf."""
  return x is None


def path_str(path: KeyPath) -> str:
  """A readable ``a/b/kernel`` name for a JAX key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts) if parts else "<root>"


def describe(x: Any) -> str:
  """``float32[32,16]``-style description of an array (else type and repr)."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"{x.dtype}{list(x.shape)}".replace(" ", "")
  return f"{type(x).__name__} {x!r}"


def leaves_with_path(tree: PyTree, *, keep_none: bool = False) -> list[tuple[str, Any]]:
  """``[(path_str, leaf)]`` in flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_none if keep_none else None)
  return [(path_str(p), leaf) for p, leaf in flat]


def aligned_leaves(params: PyTree, *others: Optional[PyTree]
                   ) -> tuple[Any, list[str], list[Any], list[list[Any]]]:
  """Flatten ``params`` and sparse trees aligned with it.

  Returns ``(treedef, paths, param_leaves, [other_leaves, ...])``; an
  ``other`` that is ``None`` yields a list of ``None``. Call
  :func:`synstrip_jax.validation.check_aligned` first for a readable error
  on a mismatch.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in flat]
  leaves = [leaf for _, leaf in flat]
  rest = [[None] * len(leaves) if o is None else treedef.flatten_up_to(o)
          for o in others]
  return treedef, paths, leaves, rest


__all__ = ["aligned_leaves", "describe", "is_none", "leaves_with_path",
           "path_str"]
