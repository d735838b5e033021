"""The original's CIFAR Vision Transformer (pre-LayerNorm encoder), in Linen.

Layout (``T = (H / patch_size) * (W / patch_size) + 1`` tokens, ``D =
hidden_size``)::

  images [B, H, W, C]
    -> patch_embed   Conv(D, kernel = stride = patch_size)    [B, H/p, W/p, D]
    -> flatten, prepend cls_token, add pos_embedding           [B, T, D]
    -> Dropout
    -> encoder_block_0 .. encoder_block_{depth-1}               [B, T, D]
         x = x + Dropout(attn(ln1(x)))
         x = x + mlp(ln2(x))
           mlp = fc1 ActDense(mlp_dim, act) -> Dropout
                 -> fc2 ActDense(D, act)   -> Dropout
    -> head_norm(x[:, 0]) -> head Dense(num_classes)           [B, num_classes]

As in the original, the MLP applies the activation after *both* of its Dense
layers, so ``fc1`` (``mlp_dim`` neurons) and ``fc2`` (``D`` neurons) of every
block sow statistics and are stripped; the attention projections, the patch
embedding and the head are plain layers and never stripped.

Parameter paths (one block)::

  encoder_block_i/ln1/{scale,bias}                 [D]
  encoder_block_i/attn/{query,key,value}/kernel    [D, heads, D/heads]
  encoder_block_i/attn/{query,key,value}/bias      [heads, D/heads]
  encoder_block_i/attn/out/kernel                  [heads, D/heads, D]
  encoder_block_i/attn/out/bias                    [D]
  encoder_block_i/ln2/{scale,bias}                 [D]
  encoder_block_i/mlp/fc1/kernel                   [D, mlp_dim]
  encoder_block_i/mlp/fc1/bias                     [mlp_dim]
  encoder_block_i/mlp/fc2/kernel                   [mlp_dim, D]
  encoder_block_i/mlp/fc2/bias                     [D]

and the statistics sit at ``activations/encoder_block_i/mlp/fc{1,2}/post_act``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from synstrip_jax.linen import ActDense
from synstrip_vit.models.mlp import (Activation, _check_positive, constant_bias,
                                     get_activation)

#: Attention implementations of :class:`ViT` (its ``attention`` field).
ATTENTIONS = ("flax", "jax")

#: torch's ``nn.LayerNorm`` default epsilon (flax's default is 1e-6).
LAYER_NORM_EPS = 1e-5


def _check_rate(owner: str, rate: float) -> None:
  if not 0.0 <= float(rate) < 1.0:
    raise ValueError(f"{owner}.dropout must be in [0, 1), got {rate!r}")


class MlpBlock(nn.Module):
  """``Dropout(act(fc2(Dropout(act(fc1(x))))))``: ``[..., D] -> [..., D]``.

  Both ``fc1`` (``[D, mlp_dim]``) and ``fc2`` (``[mlp_dim, D]``) are
  :class:`~synstrip_jax.linen.ActDense` layers that sow their statistics.
  """
  mlp_dim: int
  activation: Union[str, Activation] = "relu"
  dropout: float = 0.0
  bias_init: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    act = get_activation(self.activation)
    bias = constant_bias(self.bias_init)
    features = x.shape[-1]
    x = ActDense(self.mlp_dim, activation=act, dtype=self.dtype,
                 param_dtype=jnp.float32, bias_init=bias, name="fc1")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = ActDense(features, activation=act, dtype=self.dtype,
                 param_dtype=jnp.float32, bias_init=bias, name="fc2")(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


def _option(default: Any) -> Any:
  return dataclasses.field(default=default, kw_only=True)


class EncoderOptions(nn.Module):
  """The keyword-only fields that :class:`ViT` passes on to every
  :class:`EncoderBlock` (see :class:`ViT` for their meaning)."""
  activation: Union[str, Activation] = _option("relu")
  dropout: float = _option(0.0)
  attn_scale: Optional[float] = _option(None)
  bias_init: float = _option(0.0)
  attention: str = _option("flax")
  dtype: Any = _option(jnp.float32)

  def encoder_options(self) -> dict[str, Any]:
    """The :class:`EncoderOptions` fields of this module, by name."""
    return {f.name: getattr(self, f.name)
            for f in dataclasses.fields(EncoderOptions)
            if f.name not in ("parent", "name")}


class EncoderBlock(EncoderOptions):
  """Pre-LayerNorm encoder block; ``[B, T, D] -> [B, T, D]``.

  ``x = x + Dropout(attn(ln1(x))); x = x + mlp(ln2(x))``. The attention is
  ``nn.MultiHeadDotProductAttention`` (query/key/value/out projections, never
  stripped) with logits scaled by ``attn_scale`` (``None``:
  ``1/sqrt(D / num_heads)``, the standard scaling); its softmax runs in
  float32 whatever ``dtype``. ``attention='jax'`` computes the attention
  with ``jax.nn.dot_product_attention`` (XLA implementation) instead of
  Flax's ``nn.dot_product_attention`` (same parameters; equal up to float
  rounding).
  """
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    features = x.shape[-1]
    head_dim = features // self.num_heads
    attention_fn = nn.dot_product_attention
    if self.attention == "jax":
      scale = self.attn_scale

      def attention_fn(query, key, value, bias=None, mask=None, **unused):
        # No attention dropout here (rate 0, deterministic), so the rest of
        # Flax's attention_fn arguments do not apply.
        del unused
        return jax.nn.dot_product_attention(query, key, value, bias=bias,
                                            mask=mask, scale=scale,
                                            implementation="xla")
    elif self.attn_scale is not None:
      # dot_product_attention divides the query by sqrt(head_dim); pre-scale it
      # so the logits are attn_scale * q.k.
      rescale = float(self.attn_scale) * math.sqrt(head_dim)

      def attention_fn(query, key, value, **kwargs):
        return nn.dot_product_attention(
            query * jnp.asarray(rescale, query.dtype), key, value, **kwargs)

    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                     param_dtype=jnp.float32, name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
        dropout_rate=0.0, deterministic=True, force_fp32_for_softmax=True,
        attention_fn=attention_fn, name="attn")(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    x = x + y
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                     param_dtype=jnp.float32, name="ln2")(x)
    y = MlpBlock(self.mlp_dim, activation=self.activation,
                 dropout=self.dropout, bias_init=self.bias_init,
                 dtype=self.dtype, name="mlp")(
                     y, train=train)
    return x + y


class ViT(EncoderOptions):
  """CIFAR Vision Transformer of the original (see the module docstring).

  Image size and channel count follow from the input: the positional
  embedding has ``(H / patch_size) * (W / patch_size) + 1`` rows (65 for the
  original's 32x32 images with 4x4 patches).

  Attributes:
    num_classes: number of output logits.
    patch_size: side of the square, non-overlapping patches.
    hidden_size: token width ``D``.
    depth: number of encoder blocks.
    num_heads: attention heads (must divide ``hidden_size``).
    mlp_dim: hidden width of every block's MLP (``fc1`` neurons).
    activation: ``'relu'`` (the paper's) or ``'gelu'`` (exact erf GELU, as
      torch's ``nn.GELU()``), or a callable.
    dropout: rate after the embedding, the attention output and both MLP
      layers (the original uses 0).
    attn_scale: attention logit scale; ``None`` is ``1/sqrt(hidden_size /
      num_heads)``.
    bias_init: constant initial bias of every MLP layer (``fc1``, ``fc2``);
      0 is the original's; negative values push neurons towards death (the
      stress study, RESULTS.md).
    attention: ``'flax'`` (Flax's ``nn.dot_product_attention``, default) or
      ``'jax'`` (``jax.nn.dot_product_attention``, XLA implementation).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are always
      float32 and the returned logits are float32.
  """
  num_classes: int
  patch_size: int = 4
  hidden_size: int = 384
  depth: int = 7
  num_heads: int = 8
  mlp_dim: int = 1536

  def __post_init__(self):
    name = type(self).__name__
    _check_positive(name, num_classes=self.num_classes,
                    patch_size=self.patch_size, hidden_size=self.hidden_size,
                    depth=self.depth, num_heads=self.num_heads,
                    mlp_dim=self.mlp_dim)
    if self.hidden_size % self.num_heads:
      raise ValueError(f"{name}: num_heads={self.num_heads} does not divide "
                       f"hidden_size={self.hidden_size}")
    _check_rate(name, self.dropout)
    get_activation(self.activation)
    constant_bias(self.bias_init)
    if self.attention not in ATTENTIONS:
      raise ValueError(f"{name}.attention must be one of {ATTENTIONS}, got "
                       f"{self.attention!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Logits ``[B, num_classes]`` (float32) of images ``[B, H, W, C]``.

    Args:
      x: float images, channels last.
      train: enables dropout (then ``apply`` needs ``rngs={'dropout': key}``
        when ``dropout > 0``).

    Collect the MLP statistics with ``apply({'params': params}, x,
    train=False, mutable=['activations'])``; pass only ``params`` in, since
    statistics already in the variables are added to, not replaced.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
      raise ValueError(f"ViT expects images [B, H, W, C], got shape {x.shape}")
    b, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not divisible by "
                       f"patch_size={p}")
    x = nn.Conv(self.hidden_size, kernel_size=(p, p), strides=(p, p),
                padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                name="patch_embed")(x.astype(self.dtype))
    x = x.reshape((b, -1, self.hidden_size))
    cls = self.param("cls_token", nn.initializers.zeros,
                     (1, 1, self.hidden_size), jnp.float32)
    x = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.hidden_size)), x],
        axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, x.shape[1], self.hidden_size), jnp.float32)
    x = x + pos.astype(x.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for i in range(self.depth):
      x = EncoderBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                       **self.encoder_options(),
                       name=f"encoder_block_{i}")(x, train=train)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                     param_dtype=jnp.float32, name="head_norm")(x[:, 0])
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 name="head")(x)
    return x.astype(jnp.float32)


__all__ = ["ATTENTIONS", "EncoderBlock", "EncoderOptions", "LAYER_NORM_EPS",
           "MlpBlock", "ViT"]
