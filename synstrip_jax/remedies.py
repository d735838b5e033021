r"""Remedies for dead and dormant neurons, side by side, as pure functions.

Every remedy takes ``(params, opt_state, stats, key)`` and returns new
``(params, opt_state, ...)``; ``stats`` is the reduced statistics tree of a
probe (or training) pass (:func:`synstrip_jax.probe_stats`, ``capture_stats``;
``<layer>/post_act`` leaves), ``opt_state`` any optax state. All compose with
:func:`synstrip_jax.with_stripping`: when ``opt_state`` holds its keep-masks,
they are applied to the new params, so a stripped weight stays exactly 0.0.

================  ==========================================================
:func:`strip`     Synaptic Stripping: prune the lowest ``stripping_factor``
                  quantile of each dead neuron's incoming weights (and keep
                  them at 0 through the optimizer).
:func:`redo`      ReDo (Sokar et al., 2023): redraw the incoming weights of
                  neurons with score ``<= tau``, zero their bias and outgoing
                  weights, zero their optimizer moments.
:func:`cbp`       Continual backprop (Dohare et al., 2024): a running
                  utility ``|outgoing weights| x |activation|``; each call
                  replaces ``replacement_rate`` of the mature neurons with the
                  lowest utility, as ReDo does (fresh in, zero out).
:func:`shrink_perturb`  Shrink & perturb (Ash & Adams, 2020):
                  ``params <- shrink * params + sigma * N(0, 1)``.
================  ==========================================================

Optimizer moments are found by structure (:func:`synstrip_jax.redo.reset_moments`:
every params-shaped subtree of the state), never by position.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from synstrip_jax import trees
from synstrip_jax._outgoing import Found, find_outgoing
from synstrip_jax.activations import ActivationStats, Criterion
from synstrip_jax.probe import dead_tree, stats_by_layer
from synstrip_jax.redo import DEFAULT_INIT, InitFn, Outgoing, recycle
from synstrip_jax.redo import _path_seed as path_seed
from synstrip_jax.redo import _stripping_masks as stripping_masks
from synstrip_jax.stripping import DEFAULT_STRIPPING_FACTOR
from synstrip_jax.transform import strip_event

PyTree = Any
Array = jax.Array

#: GnT's ``init='kaiming'`` for ReLU: ``U(-b, b)``, ``b = sqrt(2) sqrt(3 / fan_in)``.
KAIMING_UNIFORM: InitFn = nn.initializers.variance_scaling(
    2.0, "fan_in", "uniform")


def strip(params: PyTree, opt_state: Any, stats: PyTree, key: Any = None, *,
          stripping_factor: float = DEFAULT_STRIPPING_FACTOR,
          criterion: Criterion = None) -> tuple[PyTree, Any, PyTree]:
  """One stripping event (:func:`synstrip_jax.strip_event`) on the neurons
  that ``criterion`` calls dead (default: exact zero). ``key`` is unused.

  Returns:
    ``(params, opt_state, dead)``; ``opt_state`` must hold a
    :func:`synstrip_jax.with_stripping` state targeting the dead kernels.
  """
  del key
  dead = dead_tree(params, stats, criterion)
  params, opt_state = strip_event(params, opt_state, dead,
                                  stripping_factor=stripping_factor)
  return params, opt_state, dead


def redo(params: PyTree, opt_state: Any, stats: PyTree, key: Array, *,
         outgoing: Outgoing, tau: Criterion = 0.1,
         init_fn: InitFn = DEFAULT_INIT) -> tuple[PyTree, Any, PyTree]:
  """One ReDo event: :func:`synstrip_jax.redo.recycle` on the neurons with
  ReDo score ``<= tau`` (``tau`` may also be any
  :class:`~synstrip_jax.activations.Dormancy`).

  Only kernels with an ``outgoing`` entry are recycled (a layer whose
  statistics exist but that is not in ``outgoing`` is left alone).

  Returns:
    ``(params, opt_state, dead)``.
  """
  dead = _only(dead_tree(params, stats, tau), outgoing)
  params, opt_state = recycle(params, opt_state, dead, key,
                              outgoing=outgoing, init_fn=init_fn)
  return params, opt_state, dead


def _only(dead: PyTree, layers: Mapping[str, Any]) -> PyTree:
  """``dead`` with every kernel not in ``layers`` set to ``None``."""
  return jax.tree_util.tree_map_with_path(
      lambda p, d: d if trees.path_str(p) in layers else None, dead,
      is_leaf=trees.is_none)


def shrink_perturb(params: PyTree, opt_state: Any, stats: Any, key: Array, *,
                   shrink: float, sigma: float) -> tuple[PyTree, Any]:
  """Shrink & perturb: ``p <- shrink * p + sigma * eps``, ``eps ~ N(0, 1)``.

  Applied to every floating leaf (Ash & Adams, 2020 apply it to all
  weights); leaf ``path`` draws from ``fold_in(key, crc32(path))``. The
  optimizer state is returned unchanged except that stripping keep-masks,
  if any, are re-applied to the params. ``stats`` is unused.

  Returns:
    ``(params, opt_state)``.
  """
  del stats
  treedef, paths, leaves, (mask_l,) = trees.aligned_leaves(
      params, stripping_masks(opt_state))
  out = []
  for path, leaf, m in zip(paths, leaves, mask_l):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      eps = jax.random.normal(jax.random.fold_in(key, path_seed(path)),
                              leaf.shape, leaf.dtype)
      leaf = shrink * leaf + sigma * eps
      if m is not None:
        leaf = jnp.where(m, leaf, jnp.zeros((), leaf.dtype))
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out), opt_state


# ----------------------------------------------------------------------------
# Continual backprop
# ----------------------------------------------------------------------------


class CBPState(NamedTuple):
  """Running statistics of continual backprop, one entry per kernel path.

  Attributes:
    util: ``{path: [n]}`` running utility (not bias-corrected).
    mean_act: ``{path: [n]}`` running mean activation.
    ages: ``{path: [n]}`` float32 steps since each neuron was (re)born.
    accumulated: ``{path: []}`` fractional replacements carried over.
  """
  util: dict[str, Array]
  mean_act: dict[str, Array]
  ages: dict[str, Array]
  accumulated: dict[str, Array]


def cbp_layers(outgoing: Outgoing) -> dict[str, str]:
  """The layers CBP handles: ``outgoing`` entries with a consumer kernel
  (a layer without one has no outgoing weights to measure utility by)."""
  return {k: v for k, v in outgoing.items() if v is not None}


def cbp_init(params: PyTree, outgoing: Outgoing) -> CBPState:
  """Zero :class:`CBPState` for the layers of :func:`cbp_layers`."""
  shapes = dict(trees.leaves_with_path(params))
  zeros = {}
  for path in cbp_layers(outgoing):
    if path not in shapes:
      raise ValueError(f"outgoing key {path!r} is not a path of params")
    zeros[path] = jnp.zeros((shapes[path].shape[-1],), jnp.float32)
  return CBPState(dict(zeros), dict(zeros), dict(zeros),
                  {p: jnp.zeros((), jnp.float32) for p in zeros})


class _Layer(NamedTuple):
  util: Array
  mean_act: Array
  ages: Array
  accumulated: Array


def _cbp_layer(s: _Layer, stats: ActivationStats, consumer: Array, u: Array,
               *, decay: float, rate: float, maturity: int, accumulate: bool
               ) -> tuple[_Layer, Array]:
  """GnT's ``test_features`` for one layer (``util_type='contribution'``):
  the new state and the ``[n]`` bool replaced neurons. ``u`` is a uniform
  draw for the stochastic rounding of a replacement count below 1."""
  ages = s.ages + 1.0
  correction = 1.0 - decay ** ages
  mean = stats.total / jnp.maximum(stats.count, 1.0)
  mean_act = s.mean_act * decay + (1.0 - decay) * mean
  axes = tuple(a for a in range(consumer.ndim) if a != consumer.ndim - 2)
  out_mag = jnp.mean(jnp.abs(consumer), axis=axes).astype(jnp.float32)
  util = s.util * decay + (1.0 - decay) * out_mag * stats.abs_mean
  corrected = util / correction
  eligible = ages > maturity
  num = rate * jnp.sum(eligible).astype(jnp.float32)
  acc = s.accumulated + num
  if accumulate:
    k = jnp.floor(acc)
    acc = acc - k
  else:
    k = jnp.where(num < 1.0, (u <= num) & (num > 0), jnp.floor(num))
  order = jnp.argsort(jnp.where(eligible, corrected, jnp.inf))
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
  replaced = eligible & (rank < k)
  new = _Layer(jnp.where(replaced, 0.0, util), jnp.where(replaced, 0.0, mean_act),
               jnp.where(replaced, 0.0, ages), acc)
  return new, replaced


def cbp(params: PyTree, opt_state: Any, state: CBPState, stats: PyTree,
        key: Array, *, outgoing: Outgoing, replacement_rate: float = 1e-4,
        maturity_threshold: int = 100, decay_rate: float = 0.99,
        accumulate: bool = False, init_fn: InitFn = KAIMING_UNIFORM
        ) -> tuple[PyTree, Any, CBPState, PyTree]:
  """One continual-backprop step (GnT's ``test_features`` then
  ``gen_new_features`` and the optimizer reset; Dohare et al., 2024).

  Per layer ``L`` (kernel ``[..., fan_in, n]``) with consumer ``V``
  (``[..., n, m]``), from ``stats`` of the current batch: ages += 1;
  ``util <- decay util + (1 - decay) mean|V[..., j, :]| E|a_j|``; neurons
  older than ``maturity_threshold`` are eligible; ``replacement_rate`` x
  #eligible of them (accumulated across calls when ``accumulate``, else
  rounded up to 1 with that probability when below 1) with the lowest
  bias-corrected utility ``util / (1 - decay^age)`` are replaced: fresh
  incoming weights from ``init_fn`` (GnT's Kaiming uniform by default), zero
  bias, zero outgoing weights, zero moments, utility, mean and age 0. As in
  the reference, the consumer's bias is not corrected (GnT zeroes the
  running mean before using it for that correction).

  Returns:
    ``(params, opt_state, state, replaced)``; ``replaced`` is the dead-tree
    form (``[n]`` bool at the handled kernels, ``None`` elsewhere).
  """
  layers = cbp_layers(outgoing)
  by_path = dict(trees.leaves_with_path(params))
  by_layer = stats_by_layer(stats)
  k_round, k_init = jax.random.split(key)
  new = CBPState({}, {}, {}, {})
  replaced: dict[str, Array] = {}
  for path, consumer in layers.items():
    layer = path[: -len("/kernel")] if path.endswith("/kernel") else None
    if layer not in by_layer:
      raise ValueError(f"no statistics '{layer}/post_act' for the CBP layer "
                       f"{path!r}")
    s = _Layer(state.util[path], state.mean_act[path], state.ages[path],
               state.accumulated[path])
    u = jax.random.uniform(jax.random.fold_in(k_round, path_seed(path)))
    if replacement_rate == 0:
      out, rep = s, jnp.zeros_like(s.ages, jnp.bool_)
    else:
      out, rep = _cbp_layer(s, by_layer[layer], by_path[consumer], u,
                            decay=decay_rate, rate=replacement_rate,
                            maturity=maturity_threshold, accumulate=accumulate)
    for field, container in zip(out, new):
      container[path] = field
    replaced[path] = rep
  dead = jax.tree_util.tree_map_with_path(
      lambda p, _: replaced.get(trees.path_str(p)), params)
  params, opt_state = recycle(params, opt_state, dead, k_init,
                              outgoing=layers, init_fn=init_fn)
  return params, opt_state, new, dead


__all__ = ["CBPState", "Found", "KAIMING_UNIFORM", "find_outgoing", "cbp", "cbp_init", "cbp_layers",
           "redo", "shrink_perturb", "strip"]
