"""Argument checks shared by the library: factors, tree alignment, leaves.

Every check reads only static properties (Python values, tree structure,
shapes and dtypes), so each one works under ``jit``; errors are
``ValueError`` or ``TypeError`` naming the tree path, the value found and the
one expected. Paths are :func:`synstrip_jax.trees.path_str` names.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from synstrip_jax import trees
from synstrip_jax.trees import is_none, leaves_with_path  # noqa: F401

PyTree = Any
Array = jax.Array


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
  if missing and {m.removesuffix("/value") for m in missing} == set(extra):
    detail.append(
        f"params holds nnx.Variable leaves and {name} plain arrays: pass "
        f"nnx.to_pure_dict(params) and {name}.to_pure_dict() (or strip an "
        f"NNX model in place with synstrip_jax.nnx.strip)")
  raise ValueError(
      f"`{name}` must have the structure of `params` (None at untouched "
      f"leaves); " + "; ".join(detail))



def _label(name: str, path: Optional[str]) -> str:
  return name if path is None else f"{name}[{path}]"


def check_bool_leaf(label: str, leaf: Any, expected: str = "") -> None:
  """``TypeError`` unless ``leaf`` (named ``label``) is a bool array."""
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    raise TypeError(f"{label} must be a bool array or None, got "
                    f"{type(leaf).__name__}: {leaf!r}")
  if leaf.dtype != jnp.bool_:
    raise TypeError(f"{label} must have dtype bool{expected}, got "
                    f"{trees.describe(leaf)}")


def check_dead_leaf(path: Optional[str], kernel: Any, dead: Any,
                     name: str = "dead") -> None:
  """Check that ``dead`` is a bool ``[n]`` vector for ``kernel [..., n]``.

  Only static properties (shape, dtype) are read, so this works under jit.
  ``path`` (``None``: a bare argument) and ``name`` label the message.
  """
  label = _label(name, path)
  check_bool_leaf(label, dead)
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
  check_bool_leaf(label, mask,
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
  check_aligned(params, tree, name)
  check = check_dead_leaf if name == "dead" else check_mask_leaf
  _, paths, leaves, (others,) = trees.aligned_leaves(params, tree)
  for path, p, t in zip(paths, leaves, others):
    if t is not None:
      check(path, p, t)


def check_new_masks(old: PyTree, new: PyTree) -> None:
  """``new`` must have a bool mask of the same shape wherever ``old`` has one
  and ``None`` elsewhere (the targets are fixed at ``init``). Static checks
  only (jit-safe); errors name the path, what was found and what is expected.
  """
  check_aligned(old, new, "masks")  # same containers; None kept
  for (path, o), (_, n) in zip(trees.leaves_with_path(old, keep_none=True),
                               trees.leaves_with_path(new, keep_none=True)):
    if o is None and n is not None:
      raise ValueError(
          f"masks[{path}] is set but {path} is not a target of "
          f"with_stripping (None in the current masks); got "
          f"{trees.describe(n)}")
    if o is not None and n is None:
      raise ValueError(
          f"masks[{path}] is None but {path} is a target of with_stripping: "
          f"expected a bool mask of shape {tuple(o.shape)}")
    if o is not None:
      check_mask_leaf(path, o, n)


def present_bool_leaves(tree: PyTree, name: str, ndim: Optional[int] = None
                         ) -> list[tuple[str, Array]]:
  """``[(path, leaf)]`` of the non-``None`` leaves, each checked to be a bool
  array (of rank ``ndim`` if given); ``TypeError``/``ValueError`` name the
  path and what was found."""
  out = []
  for path, x in trees.leaves_with_path(tree, keep_none=True):
    if x is None:
      continue
    if getattr(x, "dtype", None) != jnp.bool_:
      raise TypeError(f"{name}[{path}] must be a bool array, got "
                      f"{trees.describe(x)}")
    if ndim is not None and x.ndim != ndim:
      raise ValueError(f"{name}[{path}] must have rank {ndim}, got shape "
                       f"{tuple(x.shape)}")
    out.append((path, x))
  return out




__all__ = ["check_aligned", "check_bool_leaf", "check_dead_leaf",
           "check_mask_leaf", "check_new_masks", "present_bool_leaves",
           "validate_sparse_tree", "validate_stripping_factor"]
