"""Does a layer's output reach a ReLU? Found from the model's jaxpr.

Shared by :mod:`synstrip_jax.linen` and :mod:`synstrip_jax.nnx`. The model is
traced once (``jax.make_jaxpr``, nothing computed) with each interesting
module call wrapped: its output goes through :func:`mark` (an identity
``jit`` named ``synstrip_out_<i>``) and, for normalization layers, its first
input through one named ``synstrip_in_<i>``. :func:`follow` then follows
every marked output forward through the operations that keep each value in
its place (dtype casts, reshapes, transposes, broadcasts, max-pooling) and
(and dropout's scaling and zeroing) and records what it meets first: ``max(x, 0)`` (a ReLU, also inside
``jax.nn.relu``'s ``custom_jvp``), the input of a marked module, any other
operation (by primitive name), or the model's output.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import numpy as np
from jax.extend import core as jcore

OUT = "synstrip_out_"
IN = "synstrip_in_"

#: Primitives that move or cast values without changing which are <= 0.
KEEP = frozenset({
    "convert_element_type", "copy", "copy_p", "reshape", "squeeze",
    "expand_dims", "broadcast_in_dim", "transpose", "reduce_precision",
    "reduce_max", "reduce_window_max", "concatenate"})

#: Primitives holding a sub-jaxpr that is followed through, with its param.
CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
         "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
         "custom_vjp_call": "call_jaxpr", "checkpoint": "jaxpr",
         "remat": "jaxpr", "remat2": "jaxpr"}


def mark(x: Any, kind: str, index: int) -> Any:
  """``x`` through an identity ``jit`` named ``<kind><index>`` (arrays only)."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    return x

  def ident(v):
    return v

  ident.__name__ = ident.__qualname__ = f"{kind}{index}"
  return jax.jit(ident)(x)


class Reach(NamedTuple):
  """Where one marked output goes.

  Attributes:
    relu: it reaches ``max(x, 0)`` through value-keeping operations.
    modules: indices of the marked modules whose input it is.
    ops: the other operations it meets first (primitive names; ``output``
      when it is returned by the model).
  """
  relu: bool
  modules: frozenset
  ops: frozenset


def _is_zero(v: Any) -> bool:
  return isinstance(v, jcore.Literal) and np.all(np.asarray(v.val) == 0)


def _is_positive(v: Any) -> bool:
  return isinstance(v, jcore.Literal) and np.all(np.asarray(v.val) > 0)


def _keeps_sign(eqn: Any, ins: list[frozenset], zeros: set) -> bool:
  """Whether ``eqn`` maps its marked operand to values with the same sign
  where they are not zeroed: a multiply or divide by a positive constant, or
  a choice between the marked value and zeros (dropout's ``select_n``)."""
  name = eqn.primitive.name
  if name in ("mul", "div") and len(ins) == 2:
    other = eqn.invars[1] if ins[0] else eqn.invars[0]
    return not (ins[0] and ins[1]) and _is_positive(other) and (
        name == "mul" or bool(ins[0]))
  if name == "select_n" and not ins[0]:
    return all(bool(s) or _is_zero(v) or (
        not isinstance(v, jcore.Literal) and v in zeros)
               for v, s in zip(eqn.invars[1:], ins[1:]))
  return False


def _inner(eqn: Any) -> Optional[Any]:
  key = CALLS.get(eqn.primitive.name)
  sub = None if key is None else eqn.params.get(key)
  return getattr(sub, "jaxpr", sub)


def _walk(jaxpr: Any, env: dict, hits: dict) -> list[frozenset]:
  """Propagate labels (``env``: var -> set of labels) through ``jaxpr``;
  record hits per label; return the labels of its outputs."""
  get = lambda v: (frozenset() if isinstance(v, jcore.Literal)
                   else env.get(v, frozenset()))
  zeros: set = set()  # vars known to be all zeros (broadcast 0.0)
  for eqn in jaxpr.eqns:
    ins = [get(v) for v in eqn.invars]
    name = eqn.primitive.name
    first = eqn.invars[0] if eqn.invars else None
    if name in ("broadcast_in_dim", "convert_element_type") and (
        _is_zero(first) or (not isinstance(first, jcore.Literal)
                            and first in zeros)):
      zeros.add(eqn.outvars[0])
    tag = eqn.params.get("name", "") if name in ("jit", "pjit") else ""
    if (tag.startswith(OUT) or tag.startswith(IN)) and eqn.outvars:
      index = int(tag.rsplit("_", 1)[1])
      if tag.startswith(IN):
        first_in = ins[0] if ins else frozenset()
        for label in first_in:
          hits[label][1].add(index)
        env[eqn.outvars[0]] = first_in
      else:
        env[eqn.outvars[0]] = frozenset({index})
      continue
    sub = _inner(eqn)
    if not any(ins) and sub is None:
      continue
    if name == "max" and len(ins) == 2 and (
        _is_zero(eqn.invars[0]) or _is_zero(eqn.invars[1])):
      for label in ins[0] | ins[1]:
        hits[label][0].add(True)
    elif name in KEEP or _keeps_sign(eqn, ins, zeros):
      out = frozenset().union(*ins)
      for v in eqn.outvars:
        env[v] = out
    elif sub is not None and len(sub.invars) == len(ins):  # markers may be inside
      inner_env = {v: s for v, s in zip(sub.invars, ins) if s}
      outs = _walk(sub, inner_env, hits)
      for v, s in zip(eqn.outvars, outs):
        if s:
          env[v] = s
    else:
      for label in frozenset().union(*ins):
        hits[label][2].add(name)
  return [get(v) for v in jaxpr.outvars]


def follow(closed: Any, labels: Iterable[int]) -> dict[int, Reach]:
  """``{label: Reach}`` for the marked outputs of a traced model."""
  hits = {k: (set(), set(), set()) for k in labels}
  outs = _walk(closed.jaxpr, {}, hits)
  for s in outs:
    for label in s:
      hits[label][2].add("output")
  return {k: Reach(bool(r), frozenset(m), frozenset(o))
          for k, (r, m, o) in hits.items()}


def is_norm(type_name: str) -> bool:
  """Normalization layers (they change each neuron's values per example or
  per channel: a zero input does not stay zero)."""
  return "Norm" in type_name


class Call(NamedTuple):
  """A marked module call: its path, type name, and whether it is a
  strippable (Dense/Conv-like) layer."""
  path: str
  kind: str
  supported: bool


def auto_pairs(calls: Mapping[int, Call], reach: Mapping[int, Reach]
               ) -> dict[str, str]:
  """``{source path: kernel path}`` for ``select="auto"``: every strippable
  layer whose output reaches a ReLU directly (paired with itself), or feeds
  only a normalization layer whose output does (paired with that layer)."""
  out: dict[str, str] = {}
  for k, call in calls.items():
    if not call.supported or call.path in out.values():
      continue
    r = reach[k]
    if r.relu:
      out[call.path] = call.path
      continue
    norms = [m for m in r.modules if is_norm(calls[m].kind)]
    if len(norms) == 1 and reach[norms[0]].relu and calls[norms[0]].path not in out:
      out[calls[norms[0]].path] = call.path
  return out


def problems(sources: Iterable[str], calls: Mapping[int, Call],
             reach: Mapping[int, Reach]) -> list[str]:
  """One message per selected source path whose output does not reach a
  ReLU directly (through value-keeping operations). An output that could
  not be followed at all (its marker inlined away, e.g. under ``nn.remat``,
  or inside ``scan``/``while``) gives no message."""
  by_path: dict[str, list[int]] = {}
  for k, call in calls.items():
    by_path.setdefault(call.path, []).append(k)
  out = []
  for src in sources:
    ks = by_path.get(src, [])
    if not ks or any(reach[k].relu for k in ks) or not any(
        reach[k].modules or reach[k].ops for k in ks):
      continue  # fine, or not followed (e.g. inside nn.scan): no claim
    norms = sorted({calls[m].path for k in ks for m in reach[k].modules
                    if is_norm(calls[m].kind)})
    if norms:
      out.append(
          f"{src!r} reaches a ReLU only through {calls[by_path[norms[0]][0]].kind}"
          f" {norms[0]!r}, which changes per-neuron values: its own output "
          f"is not what the ReLU sees; select {{{norms[0]!r}: {src!r}}} "
          "pairs the ReLU's input with this kernel")
    else:
      ops = sorted({o for k in ks for o in reach[k].ops})
      out.append(
          f"the output of {src!r} does not reach a ReLU (it goes to {ops}): "
          "its 'dead' neurons are not dead ReLUs (a logits layer?)")
  return out


def report(found: list[str], on_problem: str) -> None:
  """Warn (``'warn'``), raise ``ValueError`` (``'error'``) or nothing
  (``'ignore'``) about the messages of :func:`problems`."""
  if on_problem not in ("warn", "error", "ignore"):
    raise ValueError(f"check_relu must be 'warn', 'error' or 'ignore', got "
                     f"{on_problem!r}")
  if not found or on_problem == "ignore":
    return
  text = ("select: " + "; ".join(found) + " (check_relu='ignore' to accept)")
  if on_problem == "error":
    raise ValueError(text)
  warnings.warn(text, UserWarning, stacklevel=3)


def resolve_select(select: Any, activation: Callable[[jax.Array], jax.Array],
                   check_relu: str, trace: Callable[[], tuple]
                   ) -> tuple[Any, Optional[tuple]]:
  """``(select, reach)`` for a ``capture_stats`` call: ``"auto"`` replaced by
  its :func:`auto_pairs`; ``reach`` (``(calls, reach)`` from ``trace()``, one
  abstract trace of the model) when the ReLU check or ``"auto"`` needs it,
  else ``None``."""
  auto = isinstance(select, str) and select == "auto"
  if activation is not jax.nn.relu:
    if auto:
      raise ValueError("select='auto' finds the layers that feed a ReLU: it "
                       f"needs activation=jax.nn.relu, got {activation!r}")
    return select, None
  reach = trace() if check_relu != "ignore" or auto else None
  return (auto_pairs(*reach) if auto else select), reach


def check_reach(reach: Optional[tuple], captured: list[str],
                check_relu: str) -> None:
  """:func:`report` the :func:`problems` of the captured source paths (no-op
  without a ``reach`` from :func:`resolve_select`)."""
  if reach is not None:
    report(problems(captured, *reach), check_relu)


def abstract_call(fn: Callable[..., Any], *trees: Any) -> Any:
  """``jax.make_jaxpr(fn)(*trees)`` with every array leaf abstract (shape
  and dtype only) and every other leaf held fixed."""
  leaves, treedef = jax.tree_util.tree_flatten(trees)
  dyn = [i for i, x in enumerate(leaves)
         if hasattr(x, "shape") and hasattr(x, "dtype")]

  def call(*xs):
    full = list(leaves)
    for i, x in zip(dyn, xs):
      full[i] = x
    return fn(*jax.tree_util.tree_unflatten(treedef, full))

  specs = [jax.ShapeDtypeStruct(np.shape(leaves[i]), leaves[i].dtype)
           for i in dyn]
  return jax.make_jaxpr(call)(*specs)


__all__ = ["Call", "IN", "OUT", "Reach", "abstract_call", "auto_pairs",
           "follow", "is_norm", "mark", "problems", "report"]
