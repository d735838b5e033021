"""Per-task measurements of the continual-learning study
(``experiments/continual.py``): dead and dormant fractions on a probe,
ranks of the last hidden layer's features, weights and sparsity."""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np

import synstrip_jax as ss
from synstrip_jax import metrics, probe, trees
from synstrip_jax.activations import Dormancy

PyTree = Any

#: The dormancy rules recorded per task: ``{record key: rule}``.
DORMANCY = {"dead": Dormancy("zero"), "dormant": Dormancy("inactive", 0.01),
            "redo_dormant": Dormancy("score", 0.1)}


def effective_rank(sv: np.ndarray) -> float:
  """``exp(entropy(sv / sum sv))`` (Roy & Vetterli 2007; Dohare's
  ``compute_effective_rank``); 0 for an all-zero matrix."""
  total = sv.sum()
  if total <= 0:
    return 0.0
  p = sv[sv > 0] / total
  return float(np.exp(-np.sum(p * np.log(p))))


def srank(sv: np.ndarray, delta: float = 0.01) -> int:
  """Kumar et al.'s srank: the fewest singular values whose sum reaches
  ``1 - delta`` of the total (0 for an all-zero matrix)."""
  total = sv.sum()
  if total <= 0:
    return 0
  return int(np.searchsorted(np.cumsum(sv) / total, 1.0 - delta) + 1)


def count_marked(dead: PyTree) -> tuple[int, int]:
  """(marked neurons, hidden neurons) of a dead tree."""
  leaves = [np.asarray(d) for d in jax.tree_util.tree_leaves(dead)]
  return int(sum(d.sum() for d in leaves)), int(sum(d.size for d in leaves))


def task_metrics(params: PyTree, opt_state: Any, stats: PyTree,
                 feats: np.ndarray) -> dict[str, Any]:
  """The probe's dead/dormant fractions, ranks, weights and sparsity."""
  out: dict[str, Any] = {}
  for name, rule in DORMANCY.items():
    marked, total = count_marked(probe.dead_tree(params, stats, rule))
    out[f"{name}_frac"] = marked / total
  dead = probe.dead_tree(params, stats, None)
  out["dead_neurons"], out["hidden_neurons"] = count_marked(dead)
  out["dead_last_frac"] = float(np.mean(np.asarray(
      jax.tree_util.tree_leaves(dead)[-1])))
  sv = np.linalg.svd(np.asarray(feats, np.float64), compute_uv=False)
  out["erank_last"] = effective_rank(sv)
  out["srank_last"] = srank(sv)
  kernels = [np.asarray(v) for p, v in trees.leaves_with_path(params)
             if p.endswith("kernel")]
  out["weight_mean_abs"] = float(np.mean(np.concatenate(
      [np.abs(k).ravel() for k in kernels])))
  masks = stripping_masks(opt_state)
  out["sparsity"] = (float(metrics.sparsity(masks)["total"])
                     if masks is not None else 0.0)
  out["active_params"] = int(metrics.active_params(params, dead, masks)[
      "total"])
  return out


def stripping_masks(opt_state: Any) -> Optional[PyTree]:
  """The stripping keep-masks, or None when the optimizer has none."""
  try:
    return ss.get_masks(opt_state)
  except ValueError:
    return None


__all__ = ["DORMANCY", "count_marked", "effective_rank", "srank",
           "stripping_masks", "task_metrics"]
