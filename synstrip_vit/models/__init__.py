"""Linen models whose strippable layers sow activation statistics.

* :class:`ViT`: the original's CIFAR Vision Transformer (both MLP Dense layers
  of every block are strippable ``ActDense`` layers).
* :class:`MLP`: plain MLP for the width/depth ablation.

Use :func:`create_model` to build one by name.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from synstrip_vit.models.mlp import (ACTIVATION_FNS, MLP, gelu_exact,
                                     get_activation)
from synstrip_vit.models.outgoing import (OUTGOING_BUILDERS, mlp_outgoing,
                                          outgoing_map, vit_outgoing)
from synstrip_vit.models.vit import EncoderBlock, MlpBlock, ViT

#: Model names understood by :func:`create_model`.
MODELS: dict[str, type[nn.Module]] = {"vit": ViT, "mlp": MLP}


def create_model(name: str, **kwargs: Any) -> nn.Module:
  """``MODELS[name](**kwargs)``: ``create_model('vit', num_classes=10)``.

  Raises:
    ValueError: unknown name (lists the known ones).
  """
  key = name.lower() if isinstance(name, str) else name
  if key not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  return MODELS[key](**kwargs)


__all__ = [
    "ACTIVATION_FNS", "EncoderBlock", "MLP", "MODELS", "MlpBlock",
    "OUTGOING_BUILDERS", "ViT", "create_model", "gelu_exact", "get_activation",
    "mlp_outgoing", "outgoing_map", "vit_outgoing",
]
