r"""An optax transformation that keeps stripped weights at exactly zero.

:func:`with_stripping` wraps any optax optimizer. Its state holds the
keep-masks of the targeted kernels (``StrippingState.stripping_masks``) beside
the inner optimizer's state. Each update

.. math::
   g' = g \odot M, \qquad u = \mathrm{inner}(g'), \qquad
   u' = M \odot u + (1 - M) \odot (-p)

so a stripped weight receives a zero gradient (no momentum or Adam moment
builds up for it) and an update of exactly ``-p`` (0 when ``p`` is already
0.0), whatever the inner optimizer does: momentum, decoupled weight decay,
sign-based updates. After ``optax.apply_updates`` a stripped weight is 0.0.

:func:`strip_event` is the jit-able stripping step: it finds the masks in any
(nested) optimizer state, strips the params with
:func:`synstrip_jax.stripping.strip_params` and writes the new masks back,
without an optimizer step and without touching any other weight.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from synstrip_jax import trees
from synstrip_jax.stripping import DEFAULT_STRIPPING_FACTOR, strip_params
from synstrip_jax.validation import (check_aligned, check_new_masks,
                                     validate_sparse_tree)

PyTree = Any
Targets = Union[PyTree, Callable[[PyTree], PyTree]]

MASKS_FIELD = "stripping_masks"


class StrippingState(NamedTuple):
  """State of :func:`with_stripping`.

  Attributes:
    stripping_masks: the params' structure with a bool keep-mask (True =
      kept) of the kernel's shape at each targeted kernel, ``None`` elsewhere.
    inner_state: the wrapped optimizer's state.
  """
  stripping_masks: PyTree
  inner_state: Any


def _resolve_targets(targets: Targets, params: PyTree) -> list[bool]:
  tree = targets(params) if callable(targets) else targets
  check_aligned(params, tree, "targets")
  _, paths, leaves, (flags,) = trees.aligned_leaves(params, tree)
  out = []
  for path, p, flag in zip(paths, leaves, flags):
    if not isinstance(flag, (bool, type(None))) and not (
        hasattr(flag, "dtype") and flag.dtype == jnp.bool_ and flag.shape == ()):
      raise TypeError(f"targets[{path}] must be a Python bool, got {flag!r}")
    flag = bool(flag) if flag is not None else False
    if flag and getattr(p, "ndim", 0) < 2:
      raise ValueError(f"targets[{path}] is True but params[{path}] has shape "
                       f"{getattr(p, 'shape', None)}: only kernels of rank >= 2 "
                       "can be stripped")
    out.append(flag)
  return out


def init_masks(params: PyTree, targets: Targets) -> PyTree:
  """All-True keep-masks at the targeted kernels, ``None`` elsewhere."""
  flags = _resolve_targets(targets, params)
  treedef, _, leaves, _ = trees.aligned_leaves(params)
  masks = [jnp.ones_like(p, dtype=jnp.bool_) if f else None
           for p, f in zip(leaves, flags)]
  return jax.tree_util.tree_unflatten(treedef, masks)


def _apply_masks(tree: PyTree, masks: PyTree, fill: Optional[PyTree]) -> PyTree:
  """``where(mask, x, fill)`` at masked leaves (``fill=None``: zeros)."""
  treedef, _, leaves, (mask_l, fill_l) = trees.aligned_leaves(
      tree, masks, fill)
  out = []
  for x, m, f in zip(leaves, mask_l, fill_l):
    if m is None or x is None:
      out.append(x)
    else:
      out.append(jnp.where(m, x, -f if f is not None else jnp.zeros((), x.dtype)))
  return jax.tree_util.tree_unflatten(treedef, out)


def masked_params(params: PyTree, opt_state: Any) -> PyTree:
  """``params`` with every weight whose mask bit is False set to 0.0.

  The :func:`with_stripping` guarantee covers the params it updates. Some
  optimizers keep their own copy of the weights (e.g.
  ``optax.contrib.schedule_free_*``, whose evaluation params are computed
  from an internal iterate the wrapper never sees); pass such derived params
  through this function to apply the same masks.

  Args:
    params: a pytree with the structure of the params the optimizer was
      initialised with.
    opt_state: a state holding exactly one :func:`with_stripping` state.

  Returns:
    ``params`` with the stripped weights at exactly 0.0 (dtypes unchanged).
  """
  return _apply_masks(params, get_masks(opt_state), None)


def with_stripping(inner: optax.GradientTransformation,
                   targets: Targets) -> optax.GradientTransformationExtraArgs:
  """Wrap ``inner`` so that stripped weights stay exactly 0.0.

  Args:
    inner: any optax transformation (``optax.adamw(...)``, a chain, an
      ``inject_hyperparams`` optimizer...).
    targets: a bool pytree with the params' structure (True at the kernels
      that may be stripped) or a callable ``params -> bool pytree``, e.g.
      ``lambda p: probe.target_tree(p, stats)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`StrippingState`. ``update`` needs ``params`` (to send stripped
    weights to exactly zero); extra keyword arguments go to ``inner``.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return StrippingState(stripping_masks=init_masks(params, targets),
                          inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("with_stripping needs `params` in update() to keep "
                       "stripped weights at exactly zero")
    masks = state.stripping_masks
    grads = _apply_masks(updates, masks, None)
    new_updates, inner_state = inner.update(grads, state.inner_state, params,
                                            **extra_args)
    new_updates = _apply_masks(new_updates, masks, params)
    return new_updates, StrippingState(masks, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def get_masks(opt_state: Any) -> PyTree:
  """The keep-masks held by a :func:`with_stripping` state nested anywhere.

  Args:
    opt_state: an optax state, or an ``nnx.Optimizer`` (its ``opt_state``
      is read; the masks come back as a pure ``State`` with the structure of
      ``nnx.as_pure(nnx.state(model, optimizer.wrt))``).

  Returns:
    The params' structure with a bool keep-mask at each target, ``None``
    elsewhere.

  Raises:
    ValueError: no :class:`StrippingState` in ``opt_state``.
  """
  nnx = sys.modules.get("flax.nnx")  # an NNX object implies flax.nnx loaded
  if nnx is not None and isinstance(opt_state, nnx.Optimizer):
    opt_state = nnx.as_pure(opt_state.opt_state)
  found = optax.tree_utils.tree_get_all_with_path(opt_state, MASKS_FIELD)
  found = [v for _, v in found]
  if len(found) != 1:
    raise ValueError(
        f"expected exactly one StrippingState in the optimizer state, found "
        f"{len(found)}: build the optimizer with synstrip_jax.with_stripping")
  return found[0]


def set_masks(opt_state: Any, masks: PyTree) -> Any:
  """``opt_state`` with the :class:`StrippingState` masks replaced.

  Raises:
    ValueError, TypeError: ``opt_state`` does not hold exactly one
      :class:`StrippingState`, or ``masks`` is not a bool array of the
      current mask's (the kernel's) shape at every target and ``None``
      elsewhere; the message names the path, the shape/dtype found and the
      one expected.
  """
  check_new_masks(get_masks(opt_state), masks)
  return optax.tree_utils.tree_set(opt_state, **{MASKS_FIELD: masks})


def _refuse_nnx_variables(params: PyTree, opt_state: Any) -> None:
  """TypeError pointing at ``synstrip_jax.nnx.strip`` when ``params`` or
  ``opt_state`` hold NNX ``Variable`` leaves (a ``State`` of a model or of
  an ``nnx.Optimizer``), whose tree types do not line up with each other."""
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:
    return
  is_var = lambda x: isinstance(x, nnx.Variable)
  for name, tree in (("params", params), ("opt_state", opt_state)):
    if isinstance(tree, nnx.Optimizer) or any(
        is_var(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_var)):
      raise TypeError(
          f"strip_event got NNX Variables in `{name}`: for an NNX model use "
          "synstrip_jax.nnx.strip(model, optimizer, dead), which strips the "
          "model and the nnx.Optimizer in place (or pass nnx.as_pure(...) "
          "of both trees)")


def strip_event(params: PyTree, opt_state: Any, dead: PyTree, *,
                stripping_factor: float = DEFAULT_STRIPPING_FACTOR
                ) -> tuple[PyTree, Any]:
  """Strip dead neurons and record the new masks in the optimizer state.

  Pure. No optimizer step is taken: only the stripped weights of dead
  neurons change (to 0.0), plus any weight already masked that was not yet
  zero. Call it eagerly (one compiled program per kernel shape, outputs
  placed like the inputs; :func:`synstrip_jax.stripping.compile_strip`
  compiles them ahead of time) or inside a jitted step
  (``stripping_factor`` static).

  Args:
    params: the parameter pytree.
    opt_state: a state containing one :class:`StrippingState`.
    dead: the ``dead`` tree of :func:`synstrip_jax.strip_params`; every
      non-``None`` entry must be a targeted kernel.
    stripping_factor: the quantile in ``[0, 1]``.

  Returns:
    ``(params, opt_state)``.
  """
  _refuse_nnx_variables(params, opt_state)
  masks = get_masks(opt_state)
  validate_sparse_tree(params, dead, "dead")
  _, paths, _, (dead_l, mask_l) = trees.aligned_leaves(params, dead, masks)
  for path, d, m in zip(paths, dead_l, mask_l):
    if d is not None and m is None:
      raise ValueError(f"dead[{path}] is set but {path} is not a target of "
                       "with_stripping (no mask in the optimizer state)")
  new_params, new_masks = strip_params(params, dead, masks,
                                       stripping_factor=stripping_factor)
  return new_params, set_masks(opt_state, new_masks)


__all__ = ["MASKS_FIELD", "StrippingState", "get_masks", "init_masks",
           "masked_params", "set_masks", "strip_event", "with_stripping"]
