"""Linen models whose strippable layers sow activation statistics.

* :class:`ViT`: the original's CIFAR Vision Transformer (both MLP Dense layers
  of every block are strippable ``ActDense`` layers).
* :class:`MLP`: plain MLP for the width/depth ablation.

Use :func:`create_model` to build one by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from synstrip_vit.models.mlp import (ACTIVATION_FNS, MLP, gelu_exact,
                                     get_activation)
from synstrip_vit.models.outgoing import (OUTGOING_BUILDERS, mlp_outgoing,
                                          outgoing_map, vit_outgoing)
from synstrip_vit.models.vit import EncoderBlock, MlpBlock, ViT

#: Model names understood by :func:`create_model`.
MODELS: dict[str, type[nn.Module]] = {"vit": ViT, "mlp": MLP}


def create_model(name: str, **kwargs: Any) -> nn.Module:
  """``MODELS[name](**kwargs)``: ``create_model('vit', num_classes=10)``.

  A ``dtype`` given by name (``'bfloat16'``, as configs hold it) becomes the
  dtype itself. The model class checks its own fields.

  Raises:
    ValueError: unknown name, field or dtype (the message lists the known
      ones).
  """
  key = name.lower() if isinstance(name, str) else name
  if key not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  cls = MODELS[key]
  known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(f"model {name!r} has no field(s) {unknown}; known: "
                     f"{sorted(known)}")
  if isinstance(kwargs.get("dtype"), str):
    try:
      kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    except TypeError:
      raise ValueError(f"unknown dtype {kwargs['dtype']!r}") from None
  return cls(**kwargs)


__all__ = [
    "ACTIVATION_FNS", "EncoderBlock", "MLP", "MODELS", "MlpBlock",
    "OUTGOING_BUILDERS", "ViT", "create_model", "gelu_exact", "get_activation",
    "mlp_outgoing", "outgoing_map", "vit_outgoing",
]
