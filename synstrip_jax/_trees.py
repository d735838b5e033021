"""Small pytree helpers shared by the library: path names and structure checks.

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


def check_aligned(params: PyTree, other: PyTree, name: str) -> None:
  """Raise ``ValueError`` naming the paths where ``other`` does not align.

  ``other`` aligns with ``params`` when it has the same containers and keys,
  with ``None`` or an array in place of each parameter leaf. A ``None`` leaf
  of ``params`` (no parameter there) must be ``None`` in ``other`` too.
  """
  p_def = jax.tree_util.tree_structure(params, is_leaf=is_none)
  o_def = jax.tree_util.tree_structure(other, is_leaf=is_none)
  if p_def == o_def:
    p_flat = leaves_with_path(params, keep_none=True)
    if any(leaf is None for _, leaf in p_flat):
      set_at_none = [path for (path, p), (_, o) in zip(
          p_flat, leaves_with_path(other, keep_none=True))
                     if p is None and o is not None]
      if set_at_none:
        path = set_at_none[0]
        raise ValueError(
            f"{name}[{path}] is set but params[{path}] is None (no parameter "
            f"there): put None in {name} at {set_at_none[:5]}")
    return
  p_paths = [p for p, _ in leaves_with_path(params, keep_none=True)]
  o_paths = [p for p, _ in leaves_with_path(other, keep_none=True)]
  missing = sorted(set(p_paths) - set(o_paths))
  extra = sorted(set(o_paths) - set(p_paths))
  detail = []
  if missing:
    detail.append(f"paths of params missing from {name}: {missing[:5]}")
  if extra:
    detail.append(f"paths of {name} not in params: {extra[:5]}")
  if not detail:
    detail.append(f"containers differ: params {p_def} vs {name} {o_def}")
  raise ValueError(
      f"`{name}` must have the structure of `params` (None at untouched "
      f"leaves); " + "; ".join(detail))


def aligned_leaves(params: PyTree, *others: Optional[PyTree]
                   ) -> tuple[Any, list[str], list[Any], list[list[Any]]]:
  """Flatten ``params`` and sparse trees aligned with it.

  Returns ``(treedef, paths, param_leaves, [other_leaves, ...])``; an
  ``other`` that is ``None`` yields a list of ``None``. Call
  :func:`check_aligned` first for a readable error on a mismatch.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in flat]
  leaves = [leaf for _, leaf in flat]
  rest = [[None] * len(leaves) if o is None else treedef.flatten_up_to(o)
          for o in others]
  return treedef, paths, leaves, rest
