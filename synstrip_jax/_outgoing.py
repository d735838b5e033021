"""Find each layer's outgoing kernel from the model's jaxpr.

``find_outgoing(fn, params, *args)`` traces ``fn(params, *args)`` with
:func:`jax.make_jaxpr`, inlines nested jaxprs (``jit``, ``custom_jvp_call``,
``custom_vjp_call``), drops equations whose results do not reach the outputs
(sown statistics of an ``apply`` without ``mutable``), and follows each
kernel's layer output forward. Ops that keep the last (channel) axis are
followed: elementwise ops whose other operands come from parameters,
constants or the same layer (bias, ReLU/GELU, dropout masks, BatchNorm's
per-channel statistics and parameters), reshapes that keep the last axis,
broadcasts, pooling (``reduce_window_*``), reductions over other axes. The
layer's consumer is found when the followed value meets a ``dot_general`` or
``conv_general_dilated`` as its contracted operand, against a kernel whose
axis ``-2`` is that channel axis. Anything else (an add with data from
elsewhere: a residual stream; a reduction over the channel axis: LayerNorm,
softmax; a flatten of spatial axes into features; the function's output; two
different consumers) gives ``None`` and a reason.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple, Optional

from flax.core import FrozenDict
import jax
from jax.extend import core as jcore
import numpy as np

from synstrip_jax import trees

_ELEMENTWISE = frozenset("""
abs add and atan2 cbrt ceil clamp convert_element_type copy copy_p cos cosh
div eq erf erf_inv erfc exp exp2 expm1 floor ge gt integer_pow is_finite le
log log1p logistic lt max min mul ne neg nextafter not or pow reduce_precision
rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan tanh
xor
""".split())
_SUB = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class Found(NamedTuple):
  """Result of :func:`find_outgoing`.

  Attributes:
    outgoing: ``{kernel path: consumer kernel path or None}`` for every
      kernel ``[..., fan_in, n]`` whose output keeps ``n`` as its last axis
      (a ``FrozenDict``, the ``outgoing`` of :mod:`synstrip_jax.redo`).
    reasons: ``{kernel path: why it maps to None}``.
  """
  outgoing: FrozenDict
  reasons: dict


class _Eqn(NamedTuple):
  name: str
  ins: list
  outs: list
  params: dict
  in_shapes: list
  out_shapes: list


def _sub_jaxpr(eqn: Any) -> Optional[Any]:
  for key in _SUB:
    sub = eqn.params.get(key)
    if isinstance(sub, jcore.ClosedJaxpr):
      sub = sub.jaxpr
    if isinstance(sub, jcore.Jaxpr) and len(sub.invars) == len(eqn.invars):
      return sub
  return None


def _flatten(jaxpr: Any, env: dict, out: list, ids: Any) -> None:
  """Append ``jaxpr``'s equations, nested ones inlined, to ``out`` with
  global integer variable ids (``None`` for literals)."""
  def get(v):
    return None if isinstance(v, jcore.Literal) else env.get(v)

  for eqn in jaxpr.eqns:
    ins = [get(v) for v in eqn.invars]
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      inner = dict(zip(sub.invars, ins))
      inner.update({c: next(ids) for c in sub.constvars})
      _flatten(sub, inner, out, ids)
      for v, w in zip(eqn.outvars, sub.outvars):
        env[v] = None if isinstance(w, jcore.Literal) else inner.get(w)
      continue
    outs = [next(ids) for _ in eqn.outvars]
    env.update(zip(eqn.outvars, outs))
    out.append(_Eqn(eqn.primitive.name, ins, outs, dict(eqn.params),
                    [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars],
                    [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]))


def _live(eqns: list, outputs: set) -> list:
  live, keep = set(outputs), []
  for e in reversed(eqns):
    if any(o in live for o in e.outs):
      keep.append(e)
      live.update(i for i in e.ins if i is not None)
  return keep[::-1]


def _tainted(eqns: list, data: set) -> set:
  t = set(data)
  for e in eqns:
    if any(i in t for i in e.ins):
      t.update(e.outs)
  return t


def _aliases(eqns: list, kernel: int) -> set:
  """``kernel`` and its dtype casts/copies."""
  out = {kernel}
  for e in eqns:
    if e.name in ("convert_element_type", "copy", "copy_p") and e.ins[0] in out:
      out.update(e.outs)
  return out


def _kernel_operand(e: _Eqn, kid: Any, last: bool) -> bool:
  """``e`` contracts every axis of kernel alias ``kid`` (operand 1) but the
  last (``last``: it produces the layer) or only axis ``-2`` (it consumes
  a layer whose channels are that axis)."""
  r = len(e.in_shapes[1])
  if e.name == "dot_general":
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    if rb or lb:
      return False
    if last:
      return tuple(sorted(rc)) == tuple(range(r - 1))
    return (tuple(rc) == (r - 2,)
            and tuple(lc) == (len(e.in_shapes[0]) - 1,))
  if e.name == "conv_general_dilated":
    dn = e.params["dimension_numbers"]
    if e.params.get("feature_group_count", 1) != 1:
      return False
    if last:
      return dn.rhs_spec[0] == r - 1 and dn.out_spec[1] == len(e.out_shapes[0]) - 1
    return dn.rhs_spec[1] == r - 2 and dn.lhs_spec[1] == len(e.in_shapes[0]) - 1
  return False


def _keeps_channels(e: _Eqn, pos: int, n: int) -> bool:
  """``e`` maps the channel axis (last, size ``n``) of operand ``pos`` to
  the last axis of its output."""
  shape_in, shape_out = e.in_shapes[pos], e.out_shapes[0]
  if not shape_out or shape_out[-1] != n or not shape_in or shape_in[-1] != n:
    return False
  if e.name in _ELEMENTWISE:
    return True
  if e.name == "broadcast_in_dim":
    return e.params["broadcast_dimensions"][-1] == len(shape_out) - 1
  if e.name in ("reshape", "squeeze", "expand_dims"):
    return True
  if e.name.startswith("reduce_window"):
    return e.params["window_dimensions"][-1] == 1
  if e.name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod"):
    return len(shape_in) - 1 not in e.params["axes"]
  if e.name == "transpose":
    return e.params["permutation"][-1] == len(shape_in) - 1
  return False


def _follow(eqns: list, start: int, y: int, n: int, kernels: dict,
            tainted: set, outputs: set) -> tuple[Optional[str], Optional[str]]:
  """``(consumer path, None)`` or ``(None, reason)`` for the layer output
  ``y`` (channels last, ``n`` of them) produced by equation ``start``."""
  tracked, sinks = {y}, set()
  for e in eqns[start + 1:]:
    pos = [k for k, i in enumerate(e.ins) if i in tracked]
    if not pos:
      continue
    if e.name in ("dot_general", "conv_general_dilated") and pos == [0]:
      path = kernels.get(e.ins[1])
      if path is not None and _kernel_operand(e, e.ins[1], last=False):
        sinks.add(path)
        continue
      return None, f"meets a {e.name} that is not a kernel consuming its channels"
    others = [i for k, i in enumerate(e.ins) if k not in pos and i is not None]
    if e.name in _ELEMENTWISE and any(i in tainted for i in others):
      return None, (f"is combined by {e.name} with data from elsewhere (a "
                    "residual stream: no single consumer)")
    if all(_keeps_channels(e, k, n) for k in pos):
      tracked.update(e.outs)
      continue
    if (e.name == "reshape" and e.in_shapes[pos[0]][-1] == n
        and e.out_shapes[0] and e.out_shapes[0][-1] % n == 0):
      return None, ("is flattened with other axes into the features of its "
                    "consumer (rows j::n, not one row per neuron)")
    return None, f"is mixed across channels by {e.name}"
  if tracked & outputs:
    return None, "reaches the function's output"
  if len(sinks) != 1:
    return None, (f"has {len(sinks)} consumer kernels "
                  f"({', '.join(sorted(sinks))})" if sinks else "has no consumer")
  return next(iter(sinks)), None


def find_outgoing(fn: Callable[..., Any], params: Any, *args: Any) -> Found:
  """Each kernel's outgoing kernel, from the jaxpr of ``fn(params, *args)``.

  Args:
    fn: ``(params, *args) -> outputs``, e.g. ``lambda p, x:
      model.apply({"params": p, **other_collections}, x)`` (other
      collections closed over are constants).
    params: the parameter pytree (plain nested dicts; paths as
      :func:`synstrip_jax.trees.path_str` writes them).
    *args: example inputs; their floating arrays are "data" (an add with
      data not from the layer is a residual stream).

  Returns:
    :class:`Found`. Kernels whose output does not keep their last axis as
    channels (e.g. multi-head projections) are not in it.
  """
  closed = jax.make_jaxpr(fn)(params, *args)
  jaxpr = closed.jaxpr
  ids = itertools.count()
  env = {v: next(ids) for v in itertools.chain(jaxpr.constvars, jaxpr.invars)}
  eqns: list = []
  _flatten(jaxpr, env, eqns, ids)
  outputs = {env.get(v) for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
  eqns = _live(eqns, outputs)
  _, paths, leaves, _ = trees.aligned_leaves(params)
  invars = [env[v] for v in jaxpr.invars]
  data = {i for i, v in zip(invars[len(leaves):], jaxpr.invars[len(leaves):])
          if np.issubdtype(v.aval.dtype, np.inexact)}
  tainted = _tainted(eqns, data)
  kernels: dict = {}
  for path, kid, leaf in zip(paths, invars, leaves):
    if np.ndim(leaf) >= 2:
      kernels.update({a: path for a in _aliases(eqns, kid)})
  outgoing, reasons = {}, {}
  for path, kid, leaf in zip(paths, invars, leaves):
    if np.ndim(leaf) < 2:
      continue
    alias = _aliases(eqns, kid)
    for k, e in enumerate(eqns):
      if len(e.ins) > 1 and e.ins[1] in alias and _kernel_operand(e, e.ins[1], last=True):
        dst, why = _follow(eqns, k, e.outs[0], np.shape(leaf)[-1], kernels,
                           tainted, outputs)
        if path in outgoing and outgoing[path] != dst:
          dst, why = None, "is applied more than once with different consumers"
        outgoing[path] = dst
        if why is not None:
          reasons[path] = f"{path} {why}"
  return Found(FrozenDict(outgoing), reasons)


__all__ = ["Found", "find_outgoing"]
