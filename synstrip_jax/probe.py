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

Models written without any library layer (plain ``nn.Dense``/``nn.Conv``,
``nnx.Linear``/``nnx.Conv``) give the same statistics tree through
:func:`synstrip_jax.linen.capture_stats` / :func:`synstrip_jax.nnx.capture_stats`,
which select layers with the ``select`` forms of :data:`synstrip_jax.linen.Select`.
:func:`probe_stats` / :func:`probe_dead` run any such statistics function over
an iterable of batches.

NNX trees: pass ``nnx.state(model, nnx.Param)`` as ``params`` and
``targets`` comes out with that same structure (``State`` with ``Param``
leaves), so that it goes straight into ``nnx.Optimizer(model,
with_stripping(tx, targets), wrt=nnx.Param)``; ``dead`` comes out as the
pure ``State`` (plain arrays). Pass ``nnx.as_pure(...)`` or a pure dict and
both come out in that form.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Iterable, Optional

import jax

from synstrip_jax import trees
from synstrip_jax._select import POST_ACT
from synstrip_jax.activations import (ActivationStats, Criterion,
                                      check_finite, dead_mask, merge_stats,
                                      reduce_examples)

PyTree = Any

def _is_stats(x: Any) -> bool:
  return isinstance(x, ActivationStats)


def _nnx() -> Any:
  """``flax.nnx`` if it is imported, else ``None``: NNX objects exist only
  once it is, so the library never imports it to recognise them."""
  return sys.modules.get("flax.nnx")


def _as_plain(tree: PyTree) -> PyTree:
  """An NNX ``State`` (or any mapping tree) as nested plain dicts."""
  nnx = _nnx()
  if nnx is not None and isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  return tree


def _param_leaves(params: PyTree) -> tuple[Any, list[str], list[Any]]:
  """``(treedef, paths, leaves)`` of ``params``, NNX ``Variable``s seen through.

  ``treedef`` is that of ``params`` itself (a ``State`` with ``Param`` leaves
  stays one), ``paths`` are those of its pure form (``fc1/kernel``, never
  ``fc1/kernel/value``): outputs built on ``treedef`` mirror the input form.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  pure = _nnx().as_pure(params) if _has_variables(params) else params
  pflat, _ = jax.tree_util.tree_flatten_with_path(pure)
  if len(pflat) != len(flat):  # pragma: no cover - as_pure keeps the leaves
    raise ValueError("could not see through the NNX Variables of params")
  return treedef, [trees.path_str(p) for p, _ in pflat], [x for _, x in pflat]


def _has_variables(tree: PyTree) -> bool:
  nnx = _nnx()
  return nnx is not None and any(
      isinstance(x, nnx.Variable) for x in jax.tree_util.tree_leaves(
          tree, is_leaf=lambda x: isinstance(x, nnx.Variable)))


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
    name = trees.path_str(path)
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


def _check_no_missing(missing: list[str], paths: list[str]) -> None:
  """Error for statistics whose layer has no ``<layer>/kernel`` in params;
  when params looks like a Linen variables dict (``params/...`` and another
  collection), the message says to pass ``variables['params']``."""
  if not missing:
    return
  tops = sorted({p.split("/", 1)[0] for p in paths})
  hint = ""
  if "params" in tops and any(f"params/{m}/kernel" in paths for m in missing):
    hint = (f"; params looks like a variables dict (collections {tops}): "
            "pass the parameter tree, e.g. probe_dead(..., params="
            "variables['params']) or dead_tree(variables['params'], ...)")
  raise ValueError(f"activations sown at {missing} have no kernel at "
                   f"'<layer>/kernel' in params{hint}")


def dead_tree(params: PyTree, stats_tree: PyTree, tau: Criterion = None,
              ) -> PyTree:
  """Dead-neuron vectors aligned with ``params`` (the ``dead`` of strip_params).

  Args:
    params: parameter pytree (Linen ``variables['params']``, or NNX
      ``nnx.state(model, nnx.Param)``, with or without ``nnx.as_pure``).
    stats_tree: reduced statistics (``[n]`` leaves) sown by
      :class:`ActDense`/:class:`ActLinear` or captured by ``capture_stats``
      (see :func:`reduce_stats_tree`).
    tau: ``None`` for the original's exact rule, a float ReDo threshold, or
      any :class:`~synstrip_jax.activations.Dormancy` (see
      :func:`~synstrip_jax.activations.dead_mask`).

  Returns:
    The structure of ``params`` with a ``[n]`` bool at each kernel that feeds
    the activations, ``None`` elsewhere; for an NNX ``State`` with ``Param``
    leaves, the pure ``State`` (plain arrays, keys ``fc1/kernel``).

  Raises:
    ValueError: statistics with no kernel at ``<layer>/kernel``, or whose
      neuron count differs from the kernel's last axis (names the path);
      called on concrete statistics, a layer with NaN/inf activations
      (:func:`~synstrip_jax.activations.check_finite`; under ``jit`` such
      neurons are simply never dead).
  """
  if not any(isinstance(x, jax.core.Tracer)
             for x in jax.tree_util.tree_leaves(stats_tree)):
    check_finite(_as_plain(stats_tree))
  layers = stats_by_layer(stats_tree)
  treedef, paths, leaves = _param_leaves(params)
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
  _check_no_missing(sorted(set(layers) - used), paths)
  if _has_variables(params):
    treedef = jax.tree_util.tree_structure(_nnx().as_pure(params))
  return jax.tree_util.tree_unflatten(treedef, dead_leaves)


def target_tree(params: PyTree, stats_tree: PyTree) -> PyTree:
  """Bool tree: True at the kernels that feed sown activations.

  Suitable as the ``targets`` of :func:`synstrip_jax.transform.with_stripping`.
  Works on per-example or reduced statistics (only the paths are used). The
  tree has the structure of ``params``: for ``nnx.state(model, nnx.Param)``, a
  ``State`` with ``Param`` leaves, as ``nnx.Optimizer(..., wrt=nnx.Param)``
  passes to ``tx.init``.
  """
  layers = stats_by_layer(stats_tree)
  treedef, paths, _ = _param_leaves(params)
  flags = [(_kernel_path(p) in layers) for p in paths]
  _check_no_missing(sorted(set(layers) - {_kernel_path(p) for p in paths}),
                    paths)
  return jax.tree_util.tree_unflatten(treedef, flags)


# ------------------------------------------------------------------ probe

def _probe_step(state: Any, batch: Any, *, stats_fn: Callable[[Any, Any], PyTree],
                where_fn: Optional[Callable[[Any], jax.Array]],
                axis_name: Any) -> PyTree:
  stats = stats_fn(state, batch)
  where = None if where_fn is None else where_fn(batch)
  return reduce_stats_tree(stats, where=where, axis_name=axis_name)


_probe_step_jit = jax.jit(_probe_step,
                          static_argnames=("stats_fn", "where_fn", "axis_name"))


@functools.lru_cache(maxsize=32)
def _pmapped_step(stats_fn: Callable[[Any, Any], PyTree],
                  where_fn: Optional[Callable[[Any], jax.Array]],
                  axis_name: Any) -> Callable[[Any, Any], PyTree]:
  """The ``pmap`` probe step, made once per ``(stats_fn, where_fn,
  axis_name)`` so that later probes reuse its compiled program."""
  pstep = jax.pmap(
      functools.partial(_probe_step, stats_fn=stats_fn, where_fn=where_fn,
                        axis_name=axis_name),
      axis_name=axis_name, in_axes=(None, 0))
  # After the psum every device holds the same sums: keep the first.
  return lambda st, b: jax.tree_util.tree_map(lambda x: x[0], pstep(st, b))


#: Sum of two statistics trees, compiled once per tree structure.
_add = jax.jit(merge_stats)


@functools.lru_cache(maxsize=32)
def _merging(stats_fn: Callable[[Any, Any], PyTree], graphdef: Any
             ) -> Callable[[Any, Any], PyTree]:
  """``stats_fn`` on the module rebuilt from ``graphdef`` and its state
  (one function object per pair, so the compiled step is reused)."""
  return lambda st, b: stats_fn(_nnx().merge(graphdef, st), b)


def _graph_safe(stats_fn: Callable[[Any, Any], PyTree], state: Any
                ) -> tuple[Callable[[Any, Any], PyTree], Any]:
  """An NNX module is passed to the compiled step as ``nnx.split``'s state
  and rebuilt inside, so that a module held under several attributes stays
  one module (as a plain pytree it would become independent copies, each
  with part of the statistics). Anything else passes through."""
  nnx = _nnx()
  if nnx is None or not isinstance(state, nnx.Module):
    return stats_fn, state
  graphdef, st = nnx.split(state)
  return _merging(stats_fn, graphdef), st


def probe_stats(stats_fn: Callable[[Any, Any], PyTree], state: Any,
                batches: Iterable[Any], *,
                where_fn: Optional[Callable[[Any], jax.Array]] = None,
                axis_name: Any = None) -> PyTree:
  """Statistics summed over a probe set, one jitted forward per batch.

  Args:
    stats_fn: ``(state, batch) -> per-example statistics tree`` (``[B, n]``
      leaves): e.g. ``lambda p, b: ss_linen.capture_stats(model, {"params":
      p}, b["x"], select=...)[1]``, an NNX ``capture_stats``, or a sown
      ``linen_stats``. Defined once (a ``def`` or a lambda kept in a
      variable): it is a static argument of the compiled step, so a new
      function object compiles again.
    state: what ``stats_fn`` needs besides the batch (Linen params, an NNX
      module): traced, so new values never recompile.
    batches: an iterable of batches (any pytree of arrays). Under sharded
      ``jit`` pass global arrays (``jax.make_array_from_process_local_data``
      on several hosts): the sums are then over every device and host. With
      ``axis_name``, every leaf has a leading device axis.
    where_fn: ``batch -> [B] bool``, False for padding examples (dropped).
    axis_name: ``None``: ``jax.jit``. A name: ``jax.pmap`` over the leading
      device axis of the batch with this axis name, ``state`` broadcast (not
      replicated), statistics summed over the devices.

  The compiled step is cached per ``(stats_fn, where_fn, axis_name)`` (and
  the shapes), so a second probe with the same functions compiles nothing.

  Returns:
    The reduced statistics tree (``[n]`` leaves, one
    :class:`~synstrip_jax.activations.ActivationStats` per layer), summed
    over all batches (exact for dead neurons; totals in float32).

  Raises:
    ValueError: ``batches`` is empty.
  """
  stats_fn, state = _graph_safe(stats_fn, state)
  if axis_name is None:
    step = lambda st, b: _probe_step_jit(st, b, stats_fn=stats_fn,
                                         where_fn=where_fn, axis_name=None)
  else:
    step = _pmapped_step(stats_fn, where_fn, axis_name)
  total = None
  for batch in batches:
    stats = step(state, batch)
    total = stats if total is None else _add(total, stats)
  if total is None:
    raise ValueError("probe_stats got no batches")
  return total


def probe_dead(stats_fn: Callable[[Any, Any], PyTree], state: Any,
               batches: Iterable[Any], *, params: Optional[PyTree] = None,
               tau: Criterion = None,
               where_fn: Optional[Callable[[Any], jax.Array]] = None,
               axis_name: Any = None) -> PyTree:
  """The ``dead`` tree of a probe set: :func:`probe_stats` then :func:`dead_tree`.

  Host-side: raises (naming the layers) if any activation was NaN/inf
  (:func:`dead_tree` runs :func:`~synstrip_jax.activations.check_finite`).

  Args:
    stats_fn, state, batches, where_fn, axis_name: as :func:`probe_stats`.
    params: the tree the result aligns with. Default: ``state``, or
      ``nnx.state(state, nnx.Param)`` when ``state`` is an NNX module.
    tau: ``None`` for the exact rule (summed output == 0), a float ReDo
      dormancy threshold, or any :class:`~synstrip_jax.activations.Dormancy`.

  Returns:
    ``params``' structure with a ``[n]`` bool at each probed kernel, ``None``
    elsewhere (see :func:`dead_tree`).
  """
  stats = probe_stats(stats_fn, state, batches, where_fn=where_fn,
                      axis_name=axis_name)
  if params is None:
    nnx = _nnx()
    params = (nnx.state(state, nnx.Param)
              if nnx is not None and isinstance(state, nnx.Module) else state)
  return dead_tree(params, stats, tau)


__all__ = ["POST_ACT", "dead_tree", "probe_dead", "probe_stats",
           "reduce_stats_tree", "stats_by_layer", "target_tree"]
