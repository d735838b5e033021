"""ReDo's ``outgoing`` maps for the application's models (MLP, ViT).

Which kernel consumes which layer's neurons is model-specific; see
:mod:`synstrip_jax.redo` for the contract.
"""

from __future__ import annotations

import re
from typing import Optional

from flax.core import FrozenDict

from synstrip_jax import trees
from synstrip_jax.redo import Outgoing, sequential_outgoing

PyTree = object


_MLP_FC = re.compile(r"^fc(\d+)/kernel$")
_VIT_FC1 = re.compile(r"^(.+)/mlp/fc1/kernel$")


def mlp_outgoing(params: PyTree) -> Outgoing:
  """``outgoing`` of :class:`synstrip_vit.models.MLP`.

  ``fc{i}`` feeds ``fc{i+1}``; the last hidden layer feeds ``head``. Every
  mapping preserves the network function.

  Raises:
    ValueError: the params are not those of an MLP (no ``fc0/kernel``,
      non-contiguous layer indices or no ``head/kernel``).
  """
  paths = [p for p, _ in trees.leaves_with_path(params)]
  idx = sorted(int(m.group(1)) for m in map(_MLP_FC.match, paths) if m)
  if not idx or idx != list(range(len(idx))):
    raise ValueError("params are not those of models.MLP: expected kernels "
                     f"fc0/kernel .. fc{{depth-1}}/kernel, found "
                     f"{[f'fc{i}/kernel' for i in idx]}")
  if "head/kernel" not in paths:
    raise ValueError("params are not those of models.MLP: no head/kernel")
  return sequential_outgoing([f"fc{i}/kernel" for i in idx] + ["head/kernel"])


def vit_outgoing(params: PyTree) -> Outgoing:
  """``outgoing`` of :class:`synstrip_vit.models.ViT`.

  In every encoder block ``fc1``'s neurons feed ``fc2``'s input axis
  (function-preserving); ``fc2``'s neurons are added to the residual stream,
  which has no single consumer kernel, so they map to ``None``: recycling an
  ``fc2`` neuron redraws its incoming weights only and changes the function.

  Raises:
    ValueError: no ``<block>/mlp/fc1/kernel`` in params, or an ``fc1``
      without its ``fc2``.
  """
  paths = [p for p, _ in trees.leaves_with_path(params)]
  path_set = set(paths)
  out: dict[str, Optional[str]] = {}
  for p in paths:
    m = _VIT_FC1.match(p)
    if not m:
      continue
    fc2 = f"{m.group(1)}/mlp/fc2/kernel"
    if fc2 not in path_set:
      raise ValueError(f"params have {p} but no {fc2}")
    out[p] = fc2
    out[fc2] = None
  if not out:
    raise ValueError("params are not those of models.ViT: no "
                     "'<block>/mlp/fc1/kernel' path")
  return FrozenDict(out)


__all__ = ["mlp_outgoing", "vit_outgoing"]
