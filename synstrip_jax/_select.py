"""Layer selection for ``capture_stats`` (Linen and NNX), and sowing helpers.

Shared by :mod:`synstrip_jax.linen` and :mod:`synstrip_jax.nnx`: the
:data:`Select` forms, their resolution (:class:`Selection`), the checks after
a traced call, and the re-keying of captured statistics by kernel layer.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax

from synstrip_jax.activations import ActivationStats, example_stats, merge_stats

#: Name of the sown statistics inside a layer's scope.
POST_ACT = "post_act"


def accumulate_sown(prev: Optional[ActivationStats], new: ActivationStats
                    ) -> ActivationStats:
  """``reduce_fn`` of a sow: a layer applied several times in one call adds
  its statistics up."""
  return new if prev is None else merge_stats(prev, new)


def no_stats() -> None:
  """``init_fn`` of a sow: nothing before the first call."""
  return None


#: How ``capture_stats`` selects the layers whose outputs feed the activation:
#:
#: * a glob string (``fnmatch`` on the full module path ``a/b/c``; ``*`` also
#:   matches ``/``), or a sequence of them: the matching supported layers;
#: * a compiled ``re.Pattern``: the supported layers whose path it fullmatches;
#: * a predicate ``(path, module) -> bool``, asked about every supported
#:   layer that is called;
#: * a mapping ``{source path: kernel path}``: the statistics of the *source*
#:   module's output (any module, e.g. a BatchNorm after a Conv) are paired
#:   with the kernel of the *kernel* layer (a supported layer), e.g.
#:   ``{"block/bn1": "block/conv1"}``.
Select = Union[str, "re.Pattern[str]", Sequence[str],
               Callable[[str, Any], bool], Mapping[str, str]]


class Layer(NamedTuple):
  """A strippable layer found in a model (see ``candidate_layers``).

  Attributes:
    path: module path ``a/b/c`` (its kernel is ``params[a][b][c]['kernel']``).
    kind: the layer's class name (``Dense``, ``Conv``, ``Linear``...).
    kernel_shape: ``[..., fan_in, n]``; the last axis indexes the neurons.
    output_shape: shape of the layer's output in the traced call (``None``
      when the model was not run).
  """
  path: str
  kind: str
  kernel_shape: tuple[int, ...]
  output_shape: Optional[tuple[int, ...]]


def path_name(parts: Sequence[Any]) -> str:
  """``('a', 0, 'b') -> 'a/0/b'`` (``''`` for the root module)."""
  return "/".join(str(p) for p in parts)


class Selection:
  """A resolved :data:`Select`: which module calls to capture, and where to.

  ``sources(path, module, supported)`` says whether a call of ``module`` (at
  ``path``) is a statistics source; ``kernel_of(path)`` the kernel layer path
  its statistics belong to.
  """

  def __init__(self, select: Select):
    self.pairs: Optional[dict[str, str]] = None
    self.match: Callable[[str, Any], bool]
    self.exact: set[str] = set()
    self.globs: list[str] = []
    if isinstance(select, Mapping):
      if not select:
        raise ValueError("select mapping is empty")
      pairs = {str(k): str(v) for k, v in select.items()}
      kernels = list(pairs.values())
      dup = sorted({k for k in kernels if kernels.count(k) > 1})
      if dup:
        raise ValueError(f"select pairs several sources with kernel {dup}: "
                         "one statistics source per kernel")
      self.pairs = pairs
      self.match = lambda path, module: path in pairs
    elif isinstance(select, re.Pattern):
      self.match = lambda path, module: select.fullmatch(path) is not None
    elif isinstance(select, str) or (
        isinstance(select, Sequence) and select
        and all(isinstance(x, str) for x in select)):
      globs = [select] if isinstance(select, str) else list(select)
      self.globs = globs
      self.exact = {g for g in globs if not any(c in g for c in "*?[")}
      self.match = lambda path, module: any(
          fnmatch.fnmatchcase(path, g) for g in globs)
    elif callable(select):
      self.match = lambda path, module: bool(select(path, module))
    else:
      raise TypeError(
          "select must be a glob string (or a list of them), a re.Pattern, a "
          "predicate (path, module) -> bool or a mapping {source path: kernel "
          f"path}}, got {select!r}")
    self.select = select

  def is_source(self, path: str, module: Any, supported: bool,
                problem: Optional[str] = None) -> bool:
    """Whether this call is a statistics source (raises on a bad selection).

    ``problem``: why a Dense/Conv-like layer cannot be stripped (e.g. a
    ``DenseGeneral`` with two output axes); raised if the selection picks it.
    """
    if self.pairs is not None:
      return path in self.pairs
    if problem is not None:
      if path in self.exact or self.match(path, module):
        raise ValueError(problem)
      return False
    if supported:
      return self.match(path, module)
    if path in self.exact:
      raise ValueError(
          f"select picks module {path!r} of type {type(module).__name__}, "
          "which is not a Dense/Conv layer with a kernel [..., fan_in, n]; "
          "to pair another module's output with a kernel use a mapping "
          f"{{{path!r}: '<kernel layer path>'}}")
    return False

  def kernel_of(self, path: str) -> str:
    return path if self.pairs is None else self.pairs[path]


def check_selection(selection: Selection, seen: Mapping[str, Layer],
                    captured: Sequence[str], unsupported: Mapping[str, str]
                    ) -> None:
  """Errors after a traced call: nothing matched, mapping paths missing.

  Args:
    selection: the resolved selection.
    seen: every supported layer called, by path.
    captured: the source paths whose statistics were recorded.
    unsupported: ``{path: type name}`` of the other modules called.
  """
  candidates = sorted(seen)
  if selection.pairs is not None:
    for src, ker in selection.pairs.items():
      if src not in captured:
        raise ValueError(
            f"select maps {src!r} -> {ker!r} but no module {src!r} was called "
            f"by the model (modules called: {sorted(set(seen) | set(unsupported))})")
      if ker not in seen:
        what = (f"is a {unsupported[ker]}, not a Dense/Conv layer with a "
                "kernel [..., fan_in, n]" if ker in unsupported
                else "was not called by the model")
        raise ValueError(
            f"select maps {src!r} -> {ker!r} but {ker!r} {what}; candidate "
            f"kernel layers: {candidates}")
  elif not captured:
    raise ValueError(
        f"select={selection.select!r} matches no Dense/Conv layer called by "
        f"the model; candidate layers: {candidates}")
  unmatched = [g for g in selection.globs
               if not any(fnmatch.fnmatchcase(p, g) for p in captured)]
  if unmatched:
    raise ValueError(
        f"select entries {unmatched} match no Dense/Conv layer called by the "
        f"model (each entry must match one); candidate layers: {candidates}")


def rekey_stats(stats_by_source: Mapping[str, ActivationStats],
                selection: Selection, seen: Mapping[str, Layer],
                keys: Mapping[str, tuple[Any, ...]]) -> dict:
  """Nested ``{...: {kernel layer: {'post_act': stats}}}`` tree.

  Args:
    stats_by_source: statistics by source path.
    selection: gives the kernel layer of each source.
    seen: supported layers by path (to check neuron counts).
    keys: the key tuple (str/int parts) of every module path, so that the
      tree's keys match those of the params tree.
  """
  out: dict = {}
  for src, stats in stats_by_source.items():
    ker = selection.kernel_of(src)
    n = seen[ker].kernel_shape[-1]
    if stats.total.shape[-1] != n:
      raise ValueError(
          f"statistics of {src!r} have {stats.total.shape[-1]} neurons but "
          f"the kernel of {ker!r} has {n} (shape {seen[ker].kernel_shape})")
    node = out
    for k in keys[ker]:
      node = node.setdefault(k, {})
    node[POST_ACT] = stats
  return out


def output_stats(path: str, y: Any, activation: Callable[[jax.Array], jax.Array]
                 ) -> ActivationStats:
  """:func:`example_stats` of ``activation(y)``, or an error naming ``path``."""
  if not isinstance(y, jax.Array) and not hasattr(y, "shape"):
    raise ValueError(f"module {path!r} returned {type(y).__name__}, not an "
                     "array: cannot take per-neuron statistics of its output")
  if y.ndim < 2:
    raise ValueError(
        f"module {path!r} returned shape {tuple(y.shape)}: per-neuron "
        "statistics need an example axis and a neuron axis [B, ..., n]")
  return example_stats(activation(y))


__all__ = ["Layer", "POST_ACT", "Select", "Selection", "accumulate_sown",
           "check_selection", "no_stats", "output_stats", "path_name",
           "rekey_stats"]
