"""Linen wiring: statistics of post-activation outputs, aligned with kernels.

Two routes give the same statistics tree (``<layer path>/post_act``, beside
``params/<layer path>/kernel``; :func:`synstrip_jax.probe.dead_tree` pairs the
two by path):

* **unmodified models**: :func:`capture_stats` applies any Linen model and
  reduces the outputs of the selected ``nn.Dense`` / ``nn.Conv`` /
  ``nn.DenseGeneral`` layers (through ``activation``, ``nn.relu`` by default)
  to per-neuron statistics on the fly; :func:`candidate_layers` lists the
  layers to choose from;
* **sown**: :class:`ActDense` / :class:`ActConv` are ``activation(layer(x))``
  that sow ``('activations', <path>, 'post_act')`` themselves.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax

from synstrip_jax.activations import example_stats
from synstrip_jax._select import (POST_ACT, Layer, Select, Selection,
                                  accumulate_sown, check_selection, no_stats,
                                  output_stats, rekey_stats)
from synstrip_jax._reach import (IN, OUT, Call, Reach, abstract_call,
                                 check_reach, follow, is_norm, mark,
                                 resolve_select)
from synstrip_jax.probe import stats_by_layer, target_tree

PyTree = Any

#: Linen collection that holds the sown statistics.
ACTIVATIONS = "activations"

#: Private collection :func:`capture_stats` sows into during its own apply.
CAPTURE = "synstrip_capture"


def _activate_and_sow(layer: nn.Module, pre: jax.Array) -> jax.Array:
  """``layer.activation(pre)``, its per-example statistics sown as
  ``(ACTIVATIONS, <layer path>, POST_ACT)`` (added up over repeated calls)."""
  y = layer.activation(pre)
  layer.sow(ACTIVATIONS, POST_ACT, example_stats(y),
            reduce_fn=accumulate_sown, init_fn=no_stats)
  return y


class ActDense(nn.Dense):
  """``activation(Dense(x))`` that sows the per-example output statistics.

  Attributes:
    activation: elementwise activation applied after the affine map
      (``nn.relu`` as in the paper).
  """
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    return _activate_and_sow(self, super().__call__(inputs))


class ActConv(nn.Conv):
  """``activation(Conv(x))`` that sows per-example, per-channel statistics.

  Outputs ``[B, *spatial, features]`` are reduced over the spatial axes (a
  channel is dead iff it is 0 at every position of every example); the
  kernel ``[*kernel_size, in, features]`` is stripped per output channel.

  Attributes:
    activation: elementwise activation after the convolution (``nn.relu``).
  """
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    return _activate_and_sow(self, super().__call__(inputs))


def linen_stats(variables: Mapping[str, Any]) -> PyTree:
  """The sown statistics of a Linen ``apply(..., mutable=[ACTIVATIONS])``."""
  if ACTIVATIONS not in variables:
    raise ValueError(f"no '{ACTIVATIONS}' collection: apply the model with "
                     f"mutable=['{ACTIVATIONS}'] (got {sorted(variables)})")
  return variables[ACTIVATIONS]


# ----------------------------------------------------- unmodified models

def _layer(module: nn.Module, path: str, y: Any
           ) -> tuple[Optional[Layer], Optional[str]]:
  """``(Layer, None)`` for a supported layer, ``(None, problem)`` for a
  ``DenseGeneral`` whose kernel is not ``[..., fan_in, n]``, ``(None, None)``
  for any other module.
  """
  if not isinstance(module, (nn.Dense, nn.Conv, nn.DenseGeneral)):
    return None, None
  if isinstance(module, nn.DenseGeneral):
    feats = module.features
    feats = (feats,) if isinstance(feats, int) else tuple(feats)
    if len(feats) != 1 or module.batch_dims:
      return None, (
          f"DenseGeneral {path!r} has features={module.features!r}, "
          f"batch_dims={module.batch_dims!r}: only a kernel [..., fan_in, n] "
          "(one output axis, no batch_dims) can be stripped per neuron")
  kernel = module.get_variable("params", "kernel")
  if kernel is None:
    return None, None
  kernel = nn.meta.unbox(kernel)
  shape = getattr(y, "shape", None)
  return Layer(path, type(module).__name__, tuple(kernel.shape),
               None if shape is None else tuple(shape)), None


def _intercept(selection: Optional[Selection],
               activation: Callable[[jax.Array], jax.Array],
               seen: dict, captured: list, other: dict) -> Callable[..., Any]:
  """A method interceptor that records layers and sows selected statistics."""

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return y
    module = context.module
    path = "/".join(module.path)
    layer, problem = _layer(module, path, y)
    if layer is None:
      other[path] = type(module).__name__
    else:
      seen[path] = layer
    if selection is not None and selection.is_source(
        path, module, layer is not None, problem):
      module.sow(CAPTURE, POST_ACT, output_stats(path, y, activation),
                 reduce_fn=accumulate_sown, init_fn=no_stats)
      if path not in captured:
        captured.append(path)
    return y

  return interceptor


def _extra_collections(mutable: Union[bool, str, Sequence[str]]) -> list[str]:
  """``capture_stats``'s ``mutable`` as a list of collection names."""
  if mutable is True:
    raise ValueError("mutable=True is not supported by capture_stats: name "
                     "the collections to update")
  if mutable is False:
    return []
  return [mutable] if isinstance(mutable, str) else list(mutable)


def _sown_stats(state: Mapping[str, Any], captured: list[str]
                ) -> dict[str, Any]:
  """``{layer path: stats}`` sown in :data:`CAPTURE`; every captured layer
  must be there (a lifted transform may swallow the collection)."""
  sown = stats_by_layer(state.get(CAPTURE, {}))
  lost = [p for p in captured if p not in sown]
  if lost:
    raise ValueError(
        f"the statistics of {lost} did not come out of apply: these layers "
        "sit inside a lifted transform that does not return the "
        f"'{CAPTURE}' collection (nn.scan, nn.vmap...); stacked layers are "
        "not supported (nn.remat is)")
  return sown


def _reach(model: nn.Module, variables: Mapping[str, Any], args: tuple,
           kwargs: dict, method: Any, extra: list[str]
           ) -> tuple[dict[int, Call], dict[int, Reach]]:
  """Trace ``model`` abstractly with every Dense/Conv and normalization
  call marked; where each marked output goes (:mod:`synstrip_jax._reach`)."""
  calls: dict[int, Call] = {}

  def interceptor(next_fun, a, kw, context):
    module = context.module
    kind = type(module).__name__
    supported = isinstance(module, (nn.Dense, nn.Conv, nn.DenseGeneral))
    if context.method_name != "__call__" or not (supported or is_norm(kind)):
      return next_fun(*a, **kw)
    k = len(calls)
    calls[k] = Call("/".join(module.path), kind, supported)
    if a:
      a = (mark(a[0], IN, k),) + tuple(a[1:])
    return mark(next_fun(*a, **kw), OUT, k)

  def run(v, *a):
    with nn.intercept_methods(interceptor):
      return model.apply(v, *a, method=method, mutable=extra or False,
                         **kwargs)

  closed = abstract_call(run, variables, *args)
  return calls, follow(closed, calls)


def capture_stats(model: nn.Module, variables: Mapping[str, Any], *args: Any,
                  select: Select,
                  activation: Callable[[jax.Array], jax.Array] = nn.relu,
                  method: Union[str, Callable[..., Any], None] = None,
                  mutable: Union[bool, str, Sequence[str]] = False,
                  check_relu: str = "warn",
                  **kwargs: Any) -> tuple[Any, PyTree]:
  """Apply an unmodified Linen model and capture per-neuron statistics.

  Each selected layer's ``activation(output)`` is reduced on the fly to
  per-example statistics (every axis but the first and the last), never
  stored whole; a layer called several times adds its statistics up. Pure:
  nothing stays installed after the call; works under ``jit``.

  Args:
    model: any Linen module, unchanged.
    variables: its variables (``{"params": ..., "batch_stats": ...}``).
    *args, **kwargs: the model's call arguments (e.g. ``x, train=False``).
    select: which layers feed ``activation`` (:data:`~synstrip_jax.probe.
      Select`): a glob over module paths (``"encoder/*/mlp/fc*"``), a
      ``re.Pattern``, a predicate ``(path, module) -> bool`` over the
      supported layers (``nn.Dense``, ``nn.Conv``, ``nn.DenseGeneral`` with
      one output axis), or a mapping ``{source path: kernel path}`` pairing
      the source module's output (e.g. the ``nn.BatchNorm`` after a Conv,
      which the ReLU sees) with the kernel layer: ``{"block/bn1":
      "block/conv1"}``. See :func:`candidate_layers` for the paths.
      ``"auto"``: every Dense/Conv whose output reaches a ReLU directly
      (through reshapes, casts, max-pooling), and every one whose output
      feeds only a normalization layer whose output does (paired with it).
    check_relu: what to do when a selected output does not reach a ReLU
      (e.g. a logits layer) or reaches one only through a normalization
      layer (the mapping forgotten), as found from the model's jaxpr:
      ``"warn"`` (default), ``"error"`` or ``"ignore"``. Checked (one extra
      abstract trace) only when ``activation`` is ``jax.nn.relu``.
    activation: the elementwise function the model applies to the selected
      outputs (``nn.relu``: the original's exact dead rule).
    method: as ``model.apply``'s ``method``.
    mutable: extra mutable collections; when given, ``out`` is ``(output,
      updated collections)``.

  Returns:
    ``(out, stats)``: the model's output and ``{...: {<kernel layer>:
    {"post_act": ActivationStats}}}`` with ``[B, n]`` leaves (``B`` the
    outputs' first axis), keyed as ``params``; reduce it with
    :func:`synstrip_jax.probe.reduce_stats_tree` (``where=``, ``axis_name=``).

  Raises:
    ValueError (naming the module path): no layer matches; a mapped module is
      never called or its kernel layer is not Dense/Conv; a selected output
      is not ``[B, ..., n]`` with its kernel's ``n``; a selected layer sits
      inside ``nn.scan``/``nn.vmap`` (unsupported).
  """
  extra = _extra_collections(mutable)
  select, reach = resolve_select(
      select, activation, check_relu,
      lambda: _reach(model, variables, args, kwargs, method, extra))
  selection = Selection(select)
  seen: dict[str, Layer] = {}
  captured: list[str] = []
  other: dict[str, str] = {}
  with nn.intercept_methods(_intercept(selection, activation, seen, captured,
                                       other)):
    out, state = model.apply(variables, *args, method=method,
                             mutable=[CAPTURE] + extra, **kwargs)
  check_selection(selection, seen, captured, other)
  check_reach(reach, captured, check_relu)
  sown = _sown_stats(state, captured)
  keys = {p: tuple(p.split("/")) for p in seen}
  stats = rekey_stats(sown, selection, seen, keys)
  if extra:
    out = (out, {k: v for k, v in state.items() if k != CAPTURE})
  return out, stats


def targets(model: nn.Module, variables: Mapping[str, Any], *args: Any,
            select: Select,
            method: Union[str, Callable[..., Any], None] = None,
            **kwargs: Any) -> PyTree:
  """The ``targets`` of :func:`~synstrip_jax.transform.with_stripping` from
  shapes only.

  :func:`capture_stats` is traced under ``jax.eval_shape``: nothing is
  computed or updated (BatchNorm statistics stay as they are; every
  collection besides ``params`` is treated as mutable inside the trace and
  the result dropped). ``variables`` and ``args`` may be arrays or
  ``jax.ShapeDtypeStruct``; ``kwargs`` (e.g. ``train=False``, ``rngs=``) go
  to the model as in :func:`capture_stats`.

  Returns:
    A bool tree with the structure of ``variables['params']``: True at the
    kernels of the selected layers.
  """
  if "params" not in variables:
    raise ValueError("variables has no 'params' collection (got "
                     f"{sorted(variables)}): pass the model's variables dict")
  extra = [c for c in variables if c != "params"]

  def stats_of(v, *a):
    return capture_stats(model, v, *a, select=select, method=method,
                         mutable=extra, **kwargs)[1]

  stats = jax.eval_shape(stats_of, variables, *args)
  return target_tree(variables["params"], stats)


def candidate_layers(model: nn.Module, variables: Mapping[str, Any],
                     *args: Any, method: Union[str, Callable[..., Any], None] = None,
                     **kwargs: Any) -> list[Layer]:
  """The strippable layers a call of ``model`` goes through, in call order.

  Abstract (``jax.eval_shape``: nothing is computed). Use the paths in
  :func:`capture_stats`'s ``select``.

  Returns:
    One :class:`~synstrip_jax.probe.Layer` (path, kind, kernel shape,
    output shape) per supported layer called.
  """
  seen: dict[str, Layer] = {}

  def run(v):
    with nn.intercept_methods(_intercept(None, nn.relu, seen, [], {})):
      return model.apply(v, *args, method=method, **kwargs)

  jax.eval_shape(run, variables)
  return list(seen.values())


__all__ = ["ACTIVATIONS", "ActConv", "ActDense", "CAPTURE", "Layer", "Select",
           "candidate_layers", "capture_stats", "linen_stats", "targets"]
