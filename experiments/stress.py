"""The stress study: where many ReLU neurons die, does stripping help?

Run groups (``python -m experiments.study --study=<group>``):

  stress_regime       one seed of ReLU without stripping under each candidate
                      setting (learning rate, warm-up, batch, depth, bias
                      init): the dead fraction over training of each.
  stress_mlp          the MLP regime: 5 arms x 3 seeds.
  stress_vit          the ViT regime: 5 arms x 3 seeds.
  stress_sensitivity  the MLP regime with stripping: factor (0.01, 0.05,
                      0.2) x frequency (1, 5), and the probe on the test set.
  stress_deadinit     the MLP with every hidden bias initialised to -1 (half
                      its neurons dead from the start; ReLU does not train):
                      5 arms x 3 seeds.

Arms: ``relu``, ``relu_strip`` (factor 0.05 every epoch), ``relu_redo``,
``leaky_relu`` (slope 0.01, never dead) and ``gelu`` (exact). All arms of a
seed start from the same initialisation and see the same batches.

For every ReLU run without stripping (``relu_s*``), :func:`probe_overlap`
compares, on the final parameters, the dead sets found on the held-out
split (this library's default probe) and on the test set (the original's).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from synstrip_jax import probe
from synstrip_vit import evaluation

#: The MLP regime: the study's 3 x 256 MLP on MNIST at 10x the learning rate
#: and without warm-up (40 % of its neurons dead after one epoch).
MLP_REGIME = {"optimizer.learning_rate": 1e-2, "optimizer.warmup_epochs": 0}

#: The dead-at-initialisation MLP: the study's MLP (lr 1e-3, 1 warm-up
#: epoch) with hidden biases initialised to -1.
DEADINIT_REGIME = {"model.bias_init": -1.0}

#: The ViT regime: the study's small ViT at 10x the learning rate, without
#: warm-up, at batch 512, on 10,000 training images (9,000 after the hold-out).
VIT_REGIME = {"optimizer.learning_rate": 1e-2, "optimizer.warmup_epochs": 0,
              "run.batch_size": 512}

#: Epochs of the ViT stress runs (the CIFAR study ran 15 on 18,000 images).
VIT_EPOCHS = 10
VIT_TRAIN_LIMIT = 10000

#: Candidate settings of the regime search, as dotted overrides of the
#: study's base configs (``mlp``: ``mnist_mlp_base``, ``vit``: the ViT base
#: on 10,000 training images, 10 epochs).
REGIME_SEARCH = {
    "mlp": {
        "base": {},
        "lr3e-3_nowarmup": {"optimizer.learning_rate": 3e-3,
                            "optimizer.warmup_epochs": 0},
        "lr1e-2_warmup1": {"optimizer.learning_rate": 1e-2},
        "lr1e-2_nowarmup": MLP_REGIME,
        "lr1e-2_nowarmup_batch1024": {**MLP_REGIME, "run.batch_size": 1024},
        "lr1e-2_nowarmup_depth8": {**MLP_REGIME, "model.depth": 8},
        "bias-0.5": {"model.bias_init": -0.5},
        "bias-1.0": {"model.bias_init": -1.0},
    },
    "vit": {
        "base": {},
        "lr3e-3_nowarmup": {"optimizer.learning_rate": 3e-3,
                            "optimizer.warmup_epochs": 0},
        "lr1e-2_nowarmup": {"optimizer.learning_rate": 1e-2,
                            "optimizer.warmup_epochs": 0},
        "lr1e-2_nowarmup_batch512": VIT_REGIME,
        "lr2e-2_nowarmup": {"optimizer.learning_rate": 2e-2,
                            "optimizer.warmup_epochs": 0},
        "bias-0.5": {"model.bias_init": -0.5},
    },
}

#: Dotted overrides of each arm of the stress study.
ARMS = {
    "relu": {"model.activation": "relu", "stripping.enabled": False},
    "relu_strip": {"model.activation": "relu", "stripping.enabled": True},
    "relu_redo": {"model.activation": "relu", "stripping.enabled": False,
                  "remedy.name": "redo"},
    "leaky_relu": {"model.activation": "leaky_relu",
                   "stripping.enabled": False},
    "gelu": {"model.activation": "gelu", "stripping.enabled": False},
}

#: The groups that run every arm: ``{group: (model kind, regime)}``.
ARM_STUDIES = {"stress_mlp": ("mlp", MLP_REGIME),
               "stress_vit": ("vit", VIT_REGIME),
               "stress_deadinit": ("mlp", DEADINIT_REGIME)}

FACTORS = (0.01, 0.05, 0.2)
FREQUENCIES = (1, 5)


def sensitivity_runs() -> dict[str, dict[str, Any]]:
  """``{name: overrides}`` of the sensitivity group (MLP regime, stripping):
  every factor x frequency, except factor 0.05 every epoch (that is
  ``stress_mlp``'s ``relu_strip``), and factor 0.05 every epoch probed on
  the test set."""
  out = {}
  for factor in FACTORS:
    for freq in FREQUENCIES:
      if (factor, freq) != (0.05, 1):
        out[f"f{factor}_e{freq}"] = {"stripping.factor": factor,
                                     "stripping.frequency": freq}
  out["f0.05_e1_probetest"] = {"stripping.probe": "test"}
  return out


def _with(base: ml_collections.ConfigDict, *overrides: dict[str, Any],
          seed: int) -> ml_collections.ConfigDict:
  c = base
  for fields in overrides:
    c.update_from_flattened_dict(fields)
  c.run.seed = seed
  return c


def runs_for(study: str, seeds: list[int], mlp_base, vit_base
             ) -> list[tuple[str, ml_collections.ConfigDict]]:
  """``[(name, config)]`` of a stress group.

  Args:
    study: one of :data:`STUDIES`.
    seeds: the seeds (``stress_regime`` uses the first only).
    mlp_base, vit_base: the study's base config factories (no arguments).

  Raises:
    ValueError: unknown group (named).
  """
  def vit():
    c = vit_base()
    c.data.train_limit = VIT_TRAIN_LIMIT
    c.run.num_epochs = VIT_EPOCHS
    return c

  bases = {"mlp": mlp_base, "vit": vit}
  off = {"stripping.enabled": False, "model.activation": "relu"}
  if study == "stress_regime":
    return [(f"{kind}_{name}_s{seeds[0]}",
             _with(bases[kind](), off, fields, seed=seeds[0]))
            for kind, group in REGIME_SEARCH.items()
            for name, fields in group.items()]
  if study in ARM_STUDIES:
    kind, regime = ARM_STUDIES[study]
    return [(f"{arm}_s{seed}", _with(bases[kind](), regime, fields,
                                     seed=seed))
            for arm, fields in ARMS.items() for seed in seeds]
  if study == "stress_sensitivity":
    return [(f"{name}_s{seed}", _with(mlp_base(), MLP_REGIME,
                                      ARMS["relu_strip"], fields, seed=seed))
            for name, fields in sensitivity_runs().items() for seed in seeds]
  raise ValueError(f"unknown stress study {study!r}")


def probe_overlap(config: ml_collections.ConfigDict, workdir) -> dict:
  """Dead sets of the run's final parameters on the held-out split and on
  the test set, per stripped kernel and in total.

  Returns ``{"holdout": n, "test": n, "both": n, "either": n, "jaccard": x,
  "per_layer": {path: {...}}}`` where ``n`` counts dead neurons (``both``:
  dead on both probes; ``jaccard``: both / either, 1.0 when none is dead).

  Raises:
    ValueError: the run does not probe on a held-out split.
  """
  if config.stripping.probe != "train_holdout":
    raise ValueError("probe_overlap needs a run probed on the held-out split")
  state, data, evaluate = evaluation.final_evaluator(config, workdir,
                                               collect_stats=True)

  def dead_on(x, y):
    out = evaluate(x, y)
    tree = probe.dead_tree(state.params, out["stats"], None)
    return {p: np.asarray(v) for p, v in _flat(tree).items()}

  holdout = dead_on(data.x_probe, data.y_probe)
  test = dead_on(data.x_test, data.y_test)
  per_layer = {p: _overlap(holdout[p], test[p]) for p in holdout}
  total = {k: sum(v[k] for v in per_layer.values())
           for k in ("holdout", "test", "both", "either")}
  total["jaccard"] = (total["both"] / total["either"] if total["either"]
                      else 1.0)
  return {**total, "per_layer": per_layer}


def _flat(tree) -> dict[str, Any]:
  """``{'a/b/kernel': dead vector}`` of a dead tree (None leaves dropped)."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in leaves if leaf is not None}


def _overlap(a: np.ndarray, b: np.ndarray) -> dict[str, int]:
  a, b = a.astype(bool), b.astype(bool)
  return {"holdout": int(a.sum()), "test": int(b.sum()),
          "both": int((a & b).sum()), "either": int((a | b).sum())}


STUDIES = ("stress_regime", "stress_mlp", "stress_vit", "stress_sensitivity",
           "stress_deadinit")

__all__ = ["ARMS", "ARM_STUDIES", "DEADINIT_REGIME", "MLP_REGIME", "REGIME_SEARCH", "STUDIES", "VIT_REGIME",
           "probe_overlap", "runs_for", "sensitivity_runs"]
