"""synstrip_jax: Synaptic Stripping (Whitaker & Whitley, 2023) in JAX.

Find dead ReLU neurons with a probe pass, prune the lowest ``stripping_factor``
quantile of each dead neuron's remaining incoming weights, and keep the pruned
weights at exactly zero through any optax optimizer.
"""

from synstrip_jax.activations import (ActivationStats, batch_stats,
                                      check_finite, dead_mask, dead_masks,
                                      dormancy_score, example_stats, find_dead,
                                      init_stats, merge_stats,
                                      nonfinite_neurons, psum_stats,
                                      reduce_examples, update_stats)
from synstrip_jax.metrics import active_params, dead_counts, sparsity, summary
from synstrip_jax.probe import (dead_tree, probe_dead, probe_stats,
                                reduce_stats_tree, stats_by_layer, target_tree)
from synstrip_jax.stripping import (DEFAULT_STRIPPING_FACTOR, strip_kernel,
                                    strip_params, validate_stripping_factor)
from synstrip_jax.transform import (StrippingState, get_masks, init_masks,
                                    masked_params, set_masks, strip_event,
                                    with_stripping)

__version__ = "0.1.0"

__all__ = [
    "ActivationStats", "DEFAULT_STRIPPING_FACTOR", "StrippingState",
    "active_params", "batch_stats", "dead_tree", "reduce_stats_tree",
    "stats_by_layer", "target_tree", "check_finite", "dead_counts", "dead_mask",
    "dead_masks", "dormancy_score", "example_stats", "find_dead", "get_masks",
    "init_masks", "init_stats", "masked_params", "merge_stats", "nonfinite_neurons",
    "probe_dead", "probe_stats",
    "psum_stats", "reduce_examples", "set_masks", "sparsity", "strip_event",
    "strip_kernel", "strip_params", "summary", "update_stats",
    "validate_stripping_factor", "with_stripping",
]
