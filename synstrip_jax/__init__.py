"""synstrip_jax: Synaptic Stripping (Whitaker & Whitley, 2023) in JAX.

Find dead ReLU neurons with a probe pass, prune the lowest ``stripping_factor``
quantile of each dead neuron's remaining incoming weights, and keep the pruned
weights at exactly zero through any optax optimizer.

The top level holds one route to each result; the modules hold the rest:
:mod:`synstrip_jax.linen` and :mod:`synstrip_jax.nnx` (Flax wiring: layers that
sow statistics, ``capture_stats`` for unmodified models), :mod:`synstrip_jax.redo`
(ReDo recycling), :mod:`synstrip_jax.stripping` (``compile_strip``, the
per-kernel functions), :mod:`synstrip_jax.trees` (the path format),
:mod:`synstrip_jax.validation` (argument checks). ``synstrip_jax.nnx`` (and
with it ``flax.nnx``) is imported only when used.
"""

from synstrip_jax._deprecated import TOP_LEVEL, deprecated_getattr
from synstrip_jax.activations import (ActivationStats, batch_stats, dead_mask,
                                      init_stats, merge_stats)
from synstrip_jax.metrics import active_params, dead_counts, sparsity, summary
from synstrip_jax.probe import (dead_tree, probe_dead, probe_stats,
                                target_tree)
from synstrip_jax.stripping import DEFAULT_STRIPPING_FACTOR, strip_params
from synstrip_jax.transform import (StrippingState, get_masks, masked_params,
                                    strip_event, with_stripping)

__version__ = "0.1.0"

__all__ = [
    "ActivationStats", "DEFAULT_STRIPPING_FACTOR", "StrippingState",
    "active_params", "batch_stats", "dead_counts", "dead_mask", "dead_tree",
    "get_masks", "init_stats", "masked_params", "merge_stats", "probe_dead",
    "probe_stats", "sparsity", "strip_event", "strip_params", "summary",
    "target_tree", "with_stripping",
]

__getattr__ = deprecated_getattr(
    __name__, TOP_LEVEL,
    lazy={name: f"synstrip_jax.{name}"
          for name in ("linen", "nnx", "redo", "remedies", "stripping", "trees",
                       "validation")})
