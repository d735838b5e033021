r"""ReDo: recycle dormant neurons (Sokar et al., 2023), a baseline arm.

"The Dormant Neuron Phenomenon in Deep Reinforcement Learning" (ICML 2023;
reference code: google/dopamine, ``labs/redo/weight_recyclers.py``) revives a
dormant neuron instead of pruning it. For a kernel ``W`` of shape ``[...,
fan_in, n]`` (Flax layout, last axis = neurons) and a dormant neuron ``j``:

1. its incoming weights ``W[..., j]`` are redrawn from the layer's
   initializer (a fresh kernel is drawn and column ``j`` taken from it, so the
   scale is the initializer's for the whole kernel's fan-in) and its bias
   ``b[j]`` is set to 0;
2. its outgoing weights, row ``j`` (axis ``-2``) of the kernel ``V`` that
   consumes the layer's output, are set to 0. The recycled neuron's new
   activation is then multiplied by zeros, and its old one was (about) zero
   since it was dormant, so the network function is unchanged: exactly for
   neurons dead under the exact rule (``tau=None``: zero output on the probe
   data, and in practice on any data for a dead ReLU unit), up to the
   removed contribution ``a_j V[j, :]`` of a neuron only dormant under a
   ``tau > 0`` threshold;
3. the optimizer's per-parameter statistics (Adam's ``mu`` and ``nu``,
   momentum traces...) at all those entries are reset to 0; the step count is
   kept, as in the reference.

Which kernel consumes which layer is model-specific, so it is passed
explicitly as ``outgoing``: a mapping from the ``'/'``-joined path of an
incoming kernel (as :func:`synstrip_jax.trees.path_str` writes it, e.g.
``'fc0/kernel'`` or ``'encoder_block_0/mlp/fc1/kernel'``) to the path of the
kernel whose axis ``-2`` is indexed by that layer's neurons (applied to the
layer's output directly or through channel-preserving ops such as dropout or
pooling), or ``None`` when there is no such single consumer (e.g. a layer
that writes into a residual stream). With ``None`` only step 1 (and the
moments of the incoming column and bias) happens, and **the network function
changes**. :func:`sequential_outgoing` builds it for a chain of layers;
``synstrip_vit.models.outgoing_map`` for the application's models.

Detection is the library's: ``dead`` is the tree of
:func:`synstrip_jax.strip_params` (a ``[n]`` bool vector at each kernel,
``None`` elsewhere), e.g. ``probe.dead_tree(params, stats, tau=0.1)``
for ReDo's dormancy rule ``s_i <= tau``.

Composition with :func:`synstrip_jax.with_stripping`: :func:`recycle`
re-applies the keep-masks found in the optimizer state after recycling, so a
weight that was stripped stays exactly 0.0 (a recycled neuron gets fresh
weights only at its kept entries; masks never grow back).

Everything here is pure and jit-able: ``outgoing`` and ``init_fn`` are Python
configuration (close over them with ``functools.partial``, or pass them as
static arguments when hashable: the builders below return a
``flax.core.FrozenDict``); ``dead`` and ``key`` may be traced. No Python
loop over neurons: every reset is a vectorised ``jnp.where`` with the dead
vector broadcast over the kernel.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
from flax.core import FrozenDict
import jax
import jax.numpy as jnp
import optax

from synstrip_jax import trees
from synstrip_jax.validation import check_aligned, validate_sparse_tree
from synstrip_jax.transform import MASKS_FIELD, get_masks

PyTree = Any
Array = jax.Array
#: ``init(key, shape, dtype) -> array``, a ``flax.linen.initializers`` function.
Initializer = Callable[..., Array]
Outgoing = Mapping[str, Optional[str]]
InitFn = Union[Initializer, Mapping[str, Initializer]]

#: Flax ``Dense``/``Conv``'s default kernel initializer (``ActDense`` uses it).
DEFAULT_INIT: Initializer = nn.initializers.lecun_normal()


# ----------------------------------------------------------------------------
# Validation and the per-leaf plan
# ----------------------------------------------------------------------------


def _bias_path(kernel_path: str) -> Optional[str]:
  """``'a/b/bias'`` for ``'a/b/kernel'`` (``None`` for other names)."""
  if kernel_path == "kernel":
    return "bias"
  if kernel_path.endswith("/kernel"):
    return kernel_path[: -len("kernel")] + "bias"
  return None


def _path_seed(path: str) -> int:
  """A stable 31-bit integer for ``path`` (folded into the key)."""
  return zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF


def _check_outgoing(outgoing: Any, index: Mapping[str, int],
                    leaves: Sequence[Any]) -> dict[str, Optional[str]]:
  """``outgoing`` as a dict, checked against the params' paths and shapes."""
  if not isinstance(outgoing, Mapping):
    raise TypeError("outgoing must be a mapping {incoming kernel path: "
                    "consumer kernel path or None}, got "
                    f"{type(outgoing).__name__}: {outgoing!r}")
  out: dict[str, Optional[str]] = {}
  for src, dst in outgoing.items():
    if not isinstance(src, str):
      raise TypeError(f"outgoing key {src!r} must be a '/'-joined path string")
    if dst is not None and not isinstance(dst, str):
      raise TypeError(f"outgoing[{src!r}] must be a path string or None, got "
                      f"{type(dst).__name__}: {dst!r}")
    if src not in index:
      raise ValueError(f"outgoing key {src!r} is not a path of params")
    kernel = leaves[index[src]]
    if getattr(kernel, "ndim", 0) < 2:
      raise ValueError(f"outgoing key {src!r}: params[{src}] has shape "
                       f"{getattr(kernel, 'shape', None)}, not a kernel "
                       "[..., fan_in, neurons]")
    if dst is not None:
      if dst not in index:
        raise ValueError(f"outgoing[{src!r}] = {dst!r} is not a path of params")
      consumer = leaves[index[dst]]
      n = kernel.shape[-1]
      if getattr(consumer, "ndim", 0) < 2 or consumer.shape[-2] != n:
        raise ValueError(
            f"outgoing[{src!r}] = {dst!r}: params[{dst}] has shape "
            f"{getattr(consumer, 'shape', None)}, its input axis (-2) must "
            f"have the {n} neurons of {src} {tuple(kernel.shape)}")
    out[src] = dst
  return out


class _Plan:
  """Per-leaf recycling plan (Python structure; the vectors may be traced).

  Attributes:
    treedef, paths, leaves: the flattened params.
    incoming: per leaf, the ``[n]`` dead vector of a recycled kernel (its
      columns are redrawn) or ``None``.
    rows: per leaf, the ``[m]`` OR of the dead vectors of the layers it
      consumes (its rows are zeroed) or ``None``.
    bias: per leaf, the ``[n]`` dead vector of the kernel it is the bias of
      (its entries are zeroed) or ``None``.
  """

  def __init__(self, params: PyTree, dead: PyTree, outgoing: Any):
    if dead is None:
      raise TypeError("dead must be a tree with the params' structure "
                      "(use probe.dead_tree), got None")
    validate_sparse_tree(params, dead, "dead")
    self.treedef, self.paths, self.leaves, (dead_l,) = trees.aligned_leaves(
        params, dead)
    index = {p: i for i, p in enumerate(self.paths)}
    outgoing = _check_outgoing(outgoing, index, self.leaves)
    num = len(self.leaves)
    self.incoming: list[Optional[Array]] = [None] * num
    self.bias: list[Optional[Array]] = [None] * num
    rows: list[list[Array]] = [[] for _ in range(num)]
    for i, (path, d) in enumerate(zip(self.paths, dead_l)):
      if d is None:
        continue
      if path not in outgoing:
        raise ValueError(
            f"dead[{path}] is set but outgoing has no entry for {path!r}; map "
            "it to the kernel that consumes its neurons, or to None to reset "
            "its incoming weights only (the function then changes)")
      self.incoming[i] = d
      n = self.leaves[i].shape[-1]
      bias = _bias_path(path)
      if bias is not None and bias in index:
        b = self.leaves[index[bias]]
        if tuple(getattr(b, "shape", ())) != (n,):
          raise ValueError(f"params[{bias}] has shape "
                           f"{getattr(b, 'shape', None)}, expected ({n},): "
                           f"the bias of the {n} neurons of {path}")
        self.bias[index[bias]] = d
      if outgoing[path] is not None:
        rows[index[outgoing[path]]].append(d)
    self.rows: list[Optional[Array]] = [None] * num
    for i, rs in enumerate(rows):
      if rs:
        acc = rs[0]
        for r in rs[1:]:
          acc = acc | r
        self.rows[i] = acc


def _initializer(init_fn: InitFn, path: str) -> Initializer:
  if isinstance(init_fn, Mapping):
    if path not in init_fn:
      raise ValueError(f"init_fn has no initializer for the recycled kernel "
                       f"{path!r} (known: {sorted(init_fn)})")
    fn = init_fn[path]
  else:
    fn = init_fn
  if not callable(fn):
    raise TypeError(f"the initializer for {path!r} must be callable "
                    f"init(key, shape, dtype), got {fn!r}")
  return fn


def _zero_where(mask: Array, x: Array) -> Array:
  return jnp.where(mask, jnp.zeros((), x.dtype), x)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def recycled_mask(params: PyTree, dead: PyTree, *, outgoing: Outgoing) -> PyTree:
  """Bool tree of the entries that ReDo resets.

  Args:
    params: the parameter pytree (only shapes are used).
    dead: the ``dead`` tree of :func:`synstrip_jax.strip_params`.
    outgoing: ``{incoming kernel path: consumer kernel path or None}`` (see
      the module docstring); every kernel with a ``dead`` vector needs an
      entry.

  Returns:
    The params' structure with, at each leaf that has a recycled entry, a
    bool array of the leaf's shape (True at the dead neurons' incoming
    columns ``[..., j]``, their bias entries ``[j]`` and their consumers'
    rows ``[..., j, :]``), ``None`` at every other leaf. This is the
    ``recycled`` argument of :func:`reset_moments`.

  Raises:
    ValueError, TypeError: see :func:`recycle_params`.
  """
  plan = _Plan(params, dead, outgoing)
  out = []
  for leaf, d, r, b in zip(plan.leaves, plan.incoming, plan.rows, plan.bias):
    if d is None and r is None and b is None:
      out.append(None)
      continue
    m = jnp.zeros(leaf.shape, jnp.bool_)
    if d is not None:
      m = m | d
    if r is not None:
      m = m | r[:, None]
    if b is not None:
      m = m | b
    out.append(m)
  return jax.tree_util.tree_unflatten(plan.treedef, out)


def recycle_params(params: PyTree, dead: PyTree, key: Array, *,
                   outgoing: Outgoing,
                   init_fn: InitFn = DEFAULT_INIT,
                   masks: Optional[PyTree] = None) -> PyTree:
  """Recycle the dead neurons' weights (pure; ReDo steps 1 and 2).

  Args:
    params: the parameter pytree.
    dead: the params' structure with a ``[n]`` bool vector at every kernel
      ``[..., fan_in, n]`` whose dead neurons are recycled, ``None`` elsewhere.
    key: a PRNG key (raw ``uint32[2]`` or typed); the fresh weights of the
      kernel at ``path`` use ``fold_in(key, crc32(path))``, so they do not
      depend on which other kernels are recycled.
    outgoing: ``{incoming kernel path: consumer kernel path or None}``.
    init_fn: ``init(key, shape, dtype)`` for every recycled kernel, or a
      mapping ``{kernel path: initializer}``. A whole fresh kernel is drawn
      and the dead columns are taken from it, so fan-in based scales
      (LeCun, He, Glorot) are those of the layer. Default: Flax Dense's
      ``lecun_normal()``.
    masks: optional keep-masks (the ``masks`` tree of
      :func:`synstrip_jax.strip_params`): applied after recycling, so
      stripped weights stay exactly 0.0.

  Returns:
    New params: at a dead neuron ``j`` of kernel ``K``, ``K[..., j]`` is
    freshly drawn and ``bias[j]`` (the ``bias`` beside ``kernel``, if any) is
    0.0; row ``j`` (axis ``-2``) of ``outgoing[K]`` is 0.0. Everything else is
    unchanged bit for bit (except masked-out weights, set to 0.0). Where a
    redrawn column crosses a zeroed row (two consecutive recycled layers),
    the entry is 0.0.

  Raises:
    ValueError, TypeError: ``dead`` (or ``masks``) not aligned with
      ``params`` or with a bad leaf; a dead kernel without an ``outgoing``
      entry; an ``outgoing`` path not in params; a consumer whose axis ``-2``
      length differs from the number of neurons; a bias of the wrong shape.
      The message names the path.
  """
  if key is None:
    raise TypeError("recycle_params needs a PRNG key to draw fresh weights")
  plan = _Plan(params, dead, outgoing)
  validate_sparse_tree(params, masks, "masks")
  mask_l = ([None] * len(plan.leaves) if masks is None
            else trees.aligned_leaves(params, masks)[3][0])
  out = [_recycle_leaf(*args, key=key, init_fn=init_fn)
         for args in zip(plan.paths, plan.leaves, plan.incoming, plan.rows,
                         plan.bias, mask_l)]
  return jax.tree_util.tree_unflatten(plan.treedef, out)


def _recycle_leaf(path: str, leaf: Array, d: Optional[Array],
                  r: Optional[Array], b: Optional[Array], m: Optional[Array],
                  *, key: Array, init_fn: InitFn) -> Array:
  """One leaf of :func:`recycle_params`: fresh incoming columns where ``d``,
  zero outgoing rows where ``r``, zero bias entries where ``b``, then the
  keep-mask ``m``."""
  if d is not None:
    init = _initializer(init_fn, path)
    fresh = init(jax.random.fold_in(key, _path_seed(path)), leaf.shape,
                 leaf.dtype)
    leaf = jnp.where(d, jnp.asarray(fresh, leaf.dtype), leaf)
  if r is not None:
    leaf = _zero_where(r[:, None], leaf)
  if b is not None:
    leaf = _zero_where(b, leaf)
  if m is not None:
    leaf = jnp.where(m, leaf, jnp.zeros((), leaf.dtype))
  return leaf


def _validate_recycled(params: PyTree, recycled: PyTree) -> None:
  check_aligned(params, recycled, "recycled")
  _, paths, leaves, (rec_l,) = trees.aligned_leaves(params, recycled)
  for path, p, m in zip(paths, leaves, rec_l):
    if m is None:
      continue
    if not hasattr(m, "shape") or getattr(m, "dtype", None) != jnp.bool_:
      raise TypeError(f"recycled[{path}] must be a bool array or None, got "
                      f"{type(m).__name__}: {m!r}")
    if tuple(m.shape) != tuple(p.shape):
      raise ValueError(f"recycled[{path}] has shape {tuple(m.shape)}, "
                       f"params[{path}] has shape {tuple(p.shape)}")


def _params_entries(x: Any, *, p_def: Any, shapes: list[tuple[int, ...]]
                    ) -> Optional[list[Any]]:
  """``x``'s values at the params' leaf positions when ``x`` is a
  params-shaped statistics tree (``optax.MaskedNode`` allowed), else None."""
  if x is None or isinstance(x, optax.MaskedNode):
    return None
  try:
    xs = p_def.flatten_up_to(x)
  except Exception:  # pylint: disable=broad-except  (structure mismatch)
    return None
  found = False
  for a, s in zip(xs, shapes):
    if isinstance(a, optax.MaskedNode):
      continue
    if not (hasattr(a, "shape") and hasattr(a, "dtype")
            and tuple(a.shape) == s):
      return None
    found = True
  return xs if found else None


def reset_moments(opt_state: Any, params: PyTree, recycled: PyTree) -> Any:
  """Zero the optimizer's per-parameter statistics at recycled entries.

  Every subtree of ``opt_state`` with the structure of ``params`` and the
  same leaf shapes (Adam's ``mu`` and ``nu``, a momentum trace, the
  accumulated gradients of ``MultiSteps``...; ``optax.masked``'s
  ``MaskedNode`` placeholders allowed) is treated as per-parameter
  statistics: its floating leaves are set to 0 where ``recycled`` is True.
  This finds them inside any nesting (``optax.chain``,
  ``inject_hyperparams``, ``optax.masked``,
  :func:`synstrip_jax.with_stripping`, whose bool keep-masks are never
  touched). Scalars (step counts, hyperparameters) and
  statistics of other shapes (Adafactor's factored moments) are left as they
  are. Optimizers that keep a *copy of the weights* in their state
  (schedule-free's ``z``, lookahead's slow weights) are not supported: that
  copy would be zeroed too.

  (``optax.tree_utils.tree_map_params`` cannot be used: it initialises the
  optimizer on a placeholder, which ``with_stripping``'s target check
  rejects.)

  Args:
    opt_state: any optax state.
    params: the params the state was initialised with (shapes only).
    recycled: the params' structure with a bool array of the leaf's shape
      (True = reset) or ``None`` at each leaf; see :func:`recycled_mask`.

  Returns:
    The new state; every other value unchanged bit for bit. Pure, jit-able.
  """
  _validate_recycled(params, recycled)
  p_def = jax.tree_util.tree_structure(params)
  if p_def.num_leaves == 0:
    return opt_state
  shapes = [tuple(p.shape) for p in jax.tree_util.tree_leaves(params)]
  _, _, _, (rec_l,) = trees.aligned_leaves(params, recycled)

  entries = functools.partial(_params_entries, p_def=p_def, shapes=shapes)

  def matches(x: Any) -> bool:
    return entries(x) is not None

  def reset(x: Any) -> Any:
    xs = entries(x)
    if xs is None:
      return x
    out = [a if m is None or isinstance(a, optax.MaskedNode)
           or not jnp.issubdtype(a.dtype, jnp.inexact)
           else _zero_where(m, a) for a, m in zip(xs, rec_l)]
    return jax.tree_util.tree_unflatten(p_def, out)

  return jax.tree_util.tree_map(reset, opt_state, is_leaf=matches)


def _stripping_masks(opt_state: Any) -> Optional[PyTree]:
  """The keep-masks of a ``with_stripping`` state in ``opt_state``, or None."""
  found = optax.tree_utils.tree_get_all_with_path(opt_state, MASKS_FIELD)
  return get_masks(opt_state) if found else None


def recycle(params: PyTree, opt_state: Any, dead: PyTree, key: Array, *,
            outgoing: Outgoing,
            init_fn: InitFn = DEFAULT_INIT
            ) -> tuple[PyTree, Any]:
  """One ReDo event: recycle the dead neurons and reset their moments.

  :func:`recycle_params` followed by :func:`reset_moments` on the entries of
  :func:`recycled_mask`. When ``opt_state`` holds a
  :func:`synstrip_jax.with_stripping` state, its keep-masks are applied to
  the new params (stripped weights stay exactly 0.0; the masks themselves
  are unchanged). Pure and jit-able (close over ``outgoing`` and
  ``init_fn``).

  Args:
    params: the parameter pytree.
    opt_state: the optimizer state of ``params`` (any optax state).
    dead: the ``dead`` tree (``[n]`` bool at kernels, ``None`` elsewhere).
    key: PRNG key for the fresh incoming weights.
    outgoing: ``{incoming kernel path: consumer kernel path or None}``, e.g.
      ``outgoing_map(params, 'mlp')``.
    init_fn: initializer (or ``{path: initializer}``) of the fresh weights.

  Returns:
    ``(params, opt_state)``.
  """
  masks = _stripping_masks(opt_state)
  rec = recycled_mask(params, dead, outgoing=outgoing)
  new_params = recycle_params(params, dead, key, outgoing=outgoing,
                              init_fn=init_fn, masks=masks)
  return new_params, reset_moments(opt_state, params, rec)


# ----------------------------------------------------------------------------
# ``outgoing`` for the package's models
# ----------------------------------------------------------------------------


def sequential_outgoing(kernel_paths: Sequence[str]) -> Outgoing:
  """``{paths[i]: paths[i + 1]}``: a chain where each layer feeds the next.

  The last path (the output layer, which ReDo never recycles) gets no entry.
  Like every builder here, returns a hashable ``flax.core.FrozenDict``.
  """
  paths = list(kernel_paths)
  for p in paths:
    if not isinstance(p, str):
      raise TypeError(f"kernel paths must be strings, got {p!r}")
  return FrozenDict({a: b for a, b in zip(paths[:-1], paths[1:])})


__all__ = [
    "DEFAULT_INIT", "recycle", "recycle_params", "recycled_mask",
    "reset_moments", "sequential_outgoing",
]
