"""NNX wiring: statistics of post-activation outputs, stripping with ``nnx.Optimizer``.

Two routes give the same statistics tree (``<layer path>/post_act``, keyed as
``nnx.state(model, nnx.Param)``; :func:`synstrip_jax.probe.dead_tree` pairs
it with the kernels by path):

* **unmodified models**: :func:`capture_stats` runs any NNX model and reduces
  the outputs of the selected ``nnx.Linear`` / ``nnx.Conv`` /
  ``nnx.LinearGeneral`` layers (through ``activation``) to per-neuron
  statistics on the fly; :func:`candidate_layers` lists the layers;
* **sown**: :class:`ActLinear` / :class:`ActConv` sow ``nnx.Intermediate``
  statistics themselves; collect them with ``nnx.capture(model,
  nnx.Intermediate)(x)``.

NNX trees, one way: pass ``params = nnx.state(model, nnx.Param)`` to
:func:`~synstrip_jax.probe.target_tree` / :func:`~synstrip_jax.probe.dead_tree`
and the trees come out with that structure. ``targets`` then goes straight
into ``nnx.Optimizer(model, with_stripping(tx, targets), wrt=nnx.Param)``;
:func:`strip` applies a strip event to the model and the optimizer in place,
:func:`synstrip_jax.get_masks` reads the keep-masks back from the optimizer.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any, Callable, Optional, Union

import jax
from flax import nnx

from synstrip_jax import trees
from synstrip_jax.activations import example_stats
from synstrip_jax._deprecated import deprecated_getattr
from synstrip_jax._select import (POST_ACT, Layer, Select, Selection,
                                  accumulate_sown, check_selection, no_stats,
                                  output_stats, path_name, rekey_stats)
from synstrip_jax._reach import (IN, OUT, Call, Reach, abstract_call,
                                 check_reach, follow, is_norm, mark,
                                 resolve_select)
from synstrip_jax.probe import stats_by_layer, target_tree
from synstrip_jax.stripping import DEFAULT_STRIPPING_FACTOR
from synstrip_jax.transform import strip_event

PyTree = Any


def _activate_and_sow(layer: nnx.Module, pre: jax.Array) -> jax.Array:
  """``layer.activation(pre)``, its per-example statistics sown as
  ``nnx.Intermediate`` ``POST_ACT`` (added up over repeated calls)."""
  y = layer.activation(pre)
  layer.sow(nnx.Intermediate, POST_ACT, example_stats(y),
            reduce_fn=accumulate_sown, init_fn=no_stats)
  return y


class ActLinear(nnx.Linear):
  """NNX ``activation(Linear(x))`` that sows ``nnx.Intermediate`` statistics.

  Collect them with ``nnx.capture(model, nnx.Intermediate)(x)``.
  """

  def __init__(self, in_features: int, out_features: int, *,
               activation: Callable[[jax.Array], jax.Array] = nnx.relu,
               **kwargs: Any):
    super().__init__(in_features, out_features, **kwargs)
    self.activation = activation

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return _activate_and_sow(self, super().__call__(inputs))


class ActConv(nnx.Conv):
  """NNX ``activation(Conv(x))`` that sows per-example, per-channel statistics.

  Outputs ``[B, *spatial, out_features]`` are reduced over the spatial axes;
  the kernel ``[*kernel_size, in, out_features]`` is stripped per output
  channel. Collect with ``nnx.capture(model, nnx.Intermediate)(x)``.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: Any, *,
               activation: Callable[[jax.Array], jax.Array] = nnx.relu,
               **kwargs: Any):
    super().__init__(in_features, out_features, kernel_size, **kwargs)
    self.activation = activation

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return _activate_and_sow(self, super().__call__(inputs))


# ----------------------------------------------------- unmodified models

class _Captured(nnx.Intermediate):
  """Variable type of the statistics :func:`capture_stats` sows (private)."""


# (activation, {id(module): path}) while a capture_stats call runs, else None.
_ACTIVE: contextvars.ContextVar[Optional[tuple[Callable[..., Any], dict]]] = (
    contextvars.ContextVar("synstrip_nnx_capture", default=None))


@functools.lru_cache(maxsize=None)
def _tapped(cls: type) -> type:
  """A subclass of ``cls`` whose ``__call__`` also sows output statistics.

  Instances are switched to it only for the duration of a
  :func:`capture_stats` call; outside one it behaves exactly as ``cls``.
  """

  def __call__(self, *args, **kwargs):
    y = cls.__call__(self, *args, **kwargs)
    active = _ACTIVE.get()
    if active is not None:
      activation, paths = active
      path = paths.get(id(self), type(self).__name__)
      self.sow(_Captured, POST_ACT, output_stats(path, y, activation),
               reduce_fn=accumulate_sown, init_fn=no_stats)
    return y

  return type(f"_Captured{cls.__name__}", (cls,), {
      "__call__": __call__, "__module__": __name__,
      "__qualname__": f"_Captured{cls.__name__}"})


def _layer(module: Any, path: str) -> tuple[Optional[Layer], Optional[str]]:
  """``(Layer, None)`` for a supported NNX layer, ``(None, problem)`` for a
  ``LinearGeneral`` whose kernel is not ``[..., fan_in, n]``, else
  ``(None, None)``.
  """
  if isinstance(module, nnx.LinearGeneral):
    if len(module.out_features) != 1 or module.batch_axis:
      return None, (
          f"LinearGeneral {path!r} has out_features={module.out_features!r}, "
          f"batch_axis={dict(module.batch_axis)!r}: only a kernel "
          "[..., fan_in, n] can be stripped per neuron")
  elif not isinstance(module, (nnx.Linear, nnx.Conv)):
    return None, None
  kernel = getattr(module, "kernel", None)
  if kernel is None:
    return None, None
  return Layer(path, type(module).__name__, tuple(kernel.shape), None), None


def _modules(model: nnx.Module) -> list[tuple[tuple[Any, ...], Any]]:
  return [(p, m) for p, m in nnx.iter_modules(model)]


def candidate_layers(model: nnx.Module) -> list[Layer]:
  """The strippable layers of ``model`` (``nnx.Linear``, ``nnx.Conv``,
  ``nnx.LinearGeneral`` with one output axis), by graph path.

  Nothing is run, so ``output_shape`` is ``None``; a layer referenced
  several times appears once, at its first path.
  """
  out = []
  for parts, module in _modules(model):
    layer, _ = _layer(module, path_name(parts))
    if layer is not None:
      out.append(layer)
  return out


def _scan_modules(model: nnx.Module, selection: Selection
                  ) -> tuple[dict[str, Layer], dict[str, str],
                             list[tuple[str, Any]], dict[str, tuple[Any, ...]]]:
  """``(seen, other, sources, keys)`` over the model's modules: the
  supported layers by path, the other modules' type names, the selected
  ``(path, module)`` statistics sources, and each path's key tuple."""
  seen: dict[str, Layer] = {}
  other: dict[str, str] = {}
  sources: list[tuple[str, Any]] = []
  keys: dict[str, tuple[Any, ...]] = {}
  for parts, module in _modules(model):
    path = path_name(parts)
    keys[path] = tuple(parts)
    layer, problem = _layer(module, path)
    if layer is None:
      other[path] = type(module).__name__
    else:
      seen[path] = layer
    if selection.is_source(path, module, layer is not None, problem):
      sources.append((path, module))
  return seen, other, sources, keys


@functools.lru_cache(maxsize=None)
def _marking(cls: type) -> type:
  """A subclass of ``cls`` whose ``__call__`` marks its first input and its
  output for :mod:`synstrip_jax._reach` (used on a merged copy only)."""

  def __call__(self, *args, **kwargs):
    k = self.__dict__["_synstrip_mark"]
    if args:
      args = (mark(args[0], IN, k),) + tuple(args[1:])
    return mark(cls.__call__(self, *args, **kwargs), OUT, k)

  return type(f"_Marking{cls.__name__}", (cls,), {
      "__call__": __call__, "__module__": __name__,
      "__qualname__": f"_Marking{cls.__name__}"})


def _reach(model: nnx.Module, args: tuple, kwargs: dict,
           call: Callable[..., Any]
           ) -> tuple[dict[int, Call], dict[int, Reach]]:
  """Trace a copy of ``model`` abstractly with every Linear/Conv and
  normalization layer marked; where each marked output goes."""
  graphdef, state = nnx.split(model)
  calls: dict[int, Call] = {}

  def run(st, *a):
    m = nnx.merge(graphdef, st)
    for parts, module in _modules(m):
      layer, problem = _layer(module, path_name(parts))
      kind = type(module).__name__
      if layer is None and problem is None and not is_norm(kind):
        continue
      k = len(calls)
      calls[k] = Call(path_name(parts), kind, layer is not None)
      object.__setattr__(module, "_synstrip_mark", k)
      object.__setattr__(module, "__class__", _marking(type(module)))
    return call(m, *a, **kwargs)

  closed = abstract_call(run, state, *args)
  return calls, follow(closed, calls)


def capture_stats(model: nnx.Module, *args: Any, select: Select,
                  activation: Callable[[jax.Array], jax.Array] = nnx.relu,
                  method: Union[str, Callable[..., Any], None] = None,
                  check_relu: str = "warn",
                  **kwargs: Any) -> tuple[Any, PyTree]:
  """Run an unmodified NNX model and capture per-neuron statistics.

  The selected modules are switched, for this call only, to a subclass whose
  ``__call__`` also reduces ``activation(output)`` to per-example statistics
  (never storing whole activations) and sows them; their class is restored
  afterwards, whatever happens. A module called several times (shared
  weights) adds its statistics up. Works eagerly and inside ``nnx.jit`` /
  ``jax.jit`` (tree mode), and through ``nnx.remat`` inside the model.

  Args:
    model: any NNX module, unchanged.
    *args, **kwargs: the call arguments.
    select: a :data:`~synstrip_jax.probe.Select` over graph paths (``fc1``,
      ``layers/0``): glob, ``re.Pattern``, predicate ``(path, module) ->
      bool`` over the supported layers, or ``{source path: kernel path}``
      (e.g. ``{"bn1": "conv1"}`` for Conv -> BatchNorm -> ReLU: statistics of
      the BatchNorm's output, paired with the Conv kernel), or ``"auto"``
      (as in :func:`synstrip_jax.linen.capture_stats`).
    activation: the function the model applies to the selected outputs.
    check_relu: ``"warn"`` (default), ``"error"`` or ``"ignore"``: as in
      :func:`synstrip_jax.linen.capture_stats` (a selected output that does
      not reach a ReLU, or only through a normalization layer).
    method: a method name or ``fn(model, *args, **kwargs)``; default
      ``model(*args, **kwargs)``.

  Returns:
    ``(out, stats)``: the output and a nested dict ``{...: {<kernel layer>:
    {"post_act": ActivationStats}}}`` with ``[B, n]`` leaves, keyed as
    ``nnx.state(model, nnx.Param)``.

  Raises:
    ValueError: as :func:`synstrip_jax.linen.capture_stats`, naming the path.
  """
  if method is None:
    call = lambda m, *a, **k: m(*a, **k)
  elif isinstance(method, str):
    call = lambda m, *a, **k: getattr(m, method)(*a, **k)
  else:
    call = method
  select, reach = resolve_select(select, activation, check_relu,
                                 lambda: _reach(model, args, kwargs, call))
  selection = Selection(select)
  seen, other, sources, keys = _scan_modules(model, selection)
  saved = [(m, type(m)) for _, m in sources]
  token = _ACTIVE.set((activation, {id(m): p for p, m in sources}))
  try:
    for m, cls in saved:
      object.__setattr__(m, "__class__", _tapped(cls))
    out, state = nnx.capture(call, _Captured)(model, *args, **kwargs)
  finally:
    for m, cls in saved:
      object.__setattr__(m, "__class__", cls)
    _ACTIVE.reset(token)
  sown = stats_by_layer(state)
  check_selection(selection, seen, list(sown), other)
  check_reach(reach, list(sown), check_relu)
  return out, rekey_stats(sown, selection, seen, keys)


def targets(model: nnx.Module, *args: Any, select: Select,
            method: Union[str, Callable[..., Any], None] = None,
            **kwargs: Any) -> PyTree:
  """The ``targets`` of :func:`~synstrip_jax.transform.with_stripping` from
  shapes only.

  :func:`capture_stats` is traced under ``nnx.eval_shape``: nothing is
  computed, ``model`` is not updated (BatchNorm statistics, RNG counters) and
  ``args`` may be ``jax.ShapeDtypeStruct``.

  Returns:
    A ``State`` with the structure of ``nnx.state(model, nnx.Param)``
    (``Param`` leaves holding bools): True at the kernels of the selected
    layers; it goes straight into ``nnx.Optimizer(model, with_stripping(tx,
    targets), wrt=nnx.Param)``.
  """
  def stats_of(m, *a):
    return capture_stats(m, *a, select=select, method=method, **kwargs)[1]

  stats = nnx.eval_shape(stats_of, model, *args)
  return target_tree(nnx.state(model, nnx.Param), stats)


# ------------------------------------------------- optimizer and strip events

def _like(params: PyTree, tree: PyTree, name: str) -> PyTree:
  """``tree`` (State with or without Variables, or pure dict) with the
  structure of the pure ``params`` State, ``None`` where ``tree`` has none.
  """
  if isinstance(tree, nnx.State):
    tree = nnx.as_pure(tree)
  by_path = dict(trees.leaves_with_path(tree, keep_none=True))
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [trees.path_str(p) for p, _ in flat]
  extra = sorted(set(by_path) - set(paths))
  if extra:
    raise ValueError(f"`{name}` has paths that are not params of the "
                     f"optimizer: {extra[:5]}")
  return jax.tree_util.tree_unflatten(treedef, [by_path.get(p) for p in paths])


def strip(model: nnx.Module, optimizer: nnx.Optimizer, dead: PyTree, *,
          stripping_factor: float = DEFAULT_STRIPPING_FACTOR) -> None:
  """A strip event on an NNX model and its ``nnx.Optimizer``, in place.

  :func:`~synstrip_jax.transform.strip_event` (called eagerly) on
  ``nnx.state(model, optimizer.wrt)`` and the optimizer's state: the dead
  neurons' lowest weights become 0.0 in ``model`` and the new masks are
  written into ``optimizer.opt_state``. No optimizer step is taken.

  Args:
    model: the module the optimizer updates.
    optimizer: ``nnx.Optimizer(model, with_stripping(tx, targets), wrt=...)``.
    dead: from :func:`~synstrip_jax.probe.dead_tree` /
      :func:`~synstrip_jax.probe.probe_dead` (``State`` with or without
      ``Param`` leaves, or a pure dict).
    stripping_factor: the quantile in ``[0, 1]``.
  """
  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  opt_state = nnx.as_pure(optimizer.opt_state)
  new_params, new_opt_state = strip_event(
      params, opt_state, _like(params, dead, "dead"),
      stripping_factor=stripping_factor)
  nnx.update(model, new_params)
  nnx.update(optimizer.opt_state, nnx.state(new_opt_state))


__all__ = ["ActConv", "ActLinear", "Layer", "Select", "candidate_layers",
           "capture_stats", "strip", "targets"]

__getattr__ = deprecated_getattr(__name__, {
    "get_masks": ("synstrip_jax.transform", "get_masks",
                  "synstrip_jax.get_masks (it takes an nnx.Optimizer)")})
