"""Linen models whose strippable layers sow activation statistics.

* :class:`ViT`: the original's CIFAR Vision Transformer (both MLP Dense layers
  of every block are strippable ``ActDense`` layers).
* :class:`MLP`: plain MLP for the width/depth ablation.

:data:`MODELS` is the one registry: each name's model class and ReDo
``outgoing`` builder. Use :func:`create_model` to build one by name and
:func:`outgoing_map` for its params' ``outgoing`` map.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from synstrip_jax.redo import Outgoing
from synstrip_vit.models.mlp import (ACTIVATION_FNS, MLP, gelu_exact,
                                     get_activation)
from synstrip_vit.models.outgoing import mlp_outgoing, vit_outgoing
from synstrip_vit.models.vit import EncoderBlock, MlpBlock, ViT

PyTree = Any


class ModelSpec(NamedTuple):
  """A registered model: its class and the builder of its ReDo ``outgoing``
  map (``params -> Outgoing``, see :mod:`synstrip_jax.redo`)."""
  cls: type[nn.Module]
  outgoing: Callable[[PyTree], Outgoing]


#: The models by name (lower case), as configs and :func:`create_model` name
#: them.
MODELS: dict[str, ModelSpec] = {
    "vit": ModelSpec(ViT, vit_outgoing),
    "mlp": ModelSpec(MLP, mlp_outgoing),
}


def model_spec(name: str) -> ModelSpec:
  """``MODELS[name]`` (any case).

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  key = name.lower() if isinstance(name, str) else name
  if key not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  return MODELS[key]


def create_model(name: str, **kwargs: Any) -> nn.Module:
  """``MODELS[name].cls(**kwargs)``: ``create_model('vit', num_classes=10)``.

  A ``dtype`` given by name (``'bfloat16'``, as configs hold it) becomes the
  dtype itself. The model class checks its own fields.

  Raises:
    ValueError: unknown name, field or dtype (the message lists the known
      ones).
  """
  cls = model_spec(name).cls
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


def outgoing_map(params: PyTree, model_name: str) -> Outgoing:
  """``outgoing`` for the params of ``create_model(model_name)``.

  The result is a hashable ``flax.core.FrozenDict``, so it can be a static
  argument: ``jax.jit(recycle, static_argnames=('outgoing',))``.

  Raises:
    ValueError: unknown model name (lists the known ones) or params that do
      not belong to that model.
  """
  return model_spec(model_name).outgoing(params)


__all__ = [
    "ACTIVATION_FNS", "EncoderBlock", "MLP", "MODELS", "MlpBlock",
    "ModelSpec", "ViT", "create_model", "gelu_exact", "get_activation",
    "mlp_outgoing", "model_spec", "outgoing_map", "vit_outgoing",
]
