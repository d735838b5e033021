"""Tests of the study's run groups (experiments/study.py, experiments/stress.py).

The studies themselves are not run here (hours of CPU); these tests check
that each group defines the runs RESULTS.md describes, and that the dead-set
comparison of the two probes counts what a direct computation counts.
"""

import sys

import numpy as np
import pytest

from experiments import stress, study
from synstrip_jax import probe
from synstrip_vit import evaluation, loop, rundata

SEEDS = [0, 1, 2]


@pytest.fixture(scope="module", autouse=True)
def _absl_flags():
  """study.py defines absl flags; parse them once so configs can be built."""
  if not study.flags.FLAGS.is_parsed():
    study.flags.FLAGS(sys.argv[:1])


def _runs(group):
  return dict(study.runs_for(group, SEEDS))


def test_stress_arms_share_the_regime_and_differ_only_in_the_arm():
  for group, (_, regime) in stress.ARM_STUDIES.items():
    runs = _runs(group)
    assert sorted(runs) == sorted(f"{a}_s{s}" for a in stress.ARMS
                                  for s in SEEDS)
    for name, c in runs.items():
      flat = {f"{s}.{k}": v for s in ("optimizer", "run", "stripping", "remedy",
                                      "model")
              for k, v in c[s].items()}
      for key, value in regime.items():
        assert flat[key] == value, (name, key)
      arm = name.rsplit("_s", 1)[0]
      for key, value in stress.ARMS[arm].items():
        assert flat[key] == value, (name, key)
      assert c.run.seed == int(name.rsplit("_s", 1)[1])
  vit = _runs("stress_vit")["relu_s0"]
  assert (vit.data.train_limit, vit.run.num_epochs) == (
      stress.VIT_TRAIN_LIMIT, stress.VIT_EPOCHS)


def test_sensitivity_grid_and_probe_arm():
  runs = _runs("stress_sensitivity")
  grid = {(c.stripping.factor, c.stripping.frequency, c.stripping.probe)
          for c in runs.values()}
  expected = {(f, e, "train_holdout") for f in stress.FACTORS
              for e in stress.FREQUENCIES} - {(0.05, 1, "train_holdout")}
  assert grid == expected | {(0.05, 1, "test")}
  assert len(runs) == 6 * len(SEEDS)
  assert all(c.stripping.enabled and c.model.activation == "relu"
             for c in runs.values())


def test_regime_search_is_relu_without_stripping():
  runs = _runs("stress_regime")
  assert len(runs) == sum(len(g) for g in stress.REGIME_SEARCH.values())
  assert all(not c.stripping.enabled and c.remedy.name == "none"
             and c.model.activation == "relu" and c.run.seed == 0
             for c in runs.values())
  assert runs["mlp_bias-1.0_s0"].model.bias_init == -1.0
  assert runs["vit_base_s0"].optimizer.learning_rate == 1e-3


def test_unknown_group_is_named():
  with pytest.raises(ValueError, match="'stress_nope'"):
    stress.runs_for("stress_nope", SEEDS, None, None)


@pytest.mark.slow
def test_probe_overlap_counts_the_dead_sets_of_both_probes(tmp_path):
  c = study.mnist_mlp_base()
  c.update_from_flattened_dict({
      "data.dataset": "digits", "data.train_limit": 300,
      "data.test_limit": 120, "model.width": 16, "model.depth": 2,
      "model.bias_init": -0.6, "stripping.enabled": False,
      "run.num_epochs": 1, "run.batch_size": 50, "run.eval_batch_size": 64})
  loop.train_and_evaluate(c, tmp_path, log=lambda m: None)
  got = stress.probe_overlap(c, tmp_path)
  # Direct: the final parameters applied to each split, dead iff sum == 0.
  state, model, data = evaluation.final_state(c, tmp_path)
  _, preprocess = rundata.input_fns(c, data)

  def dead(x):
    _, sown = model.apply({"params": state.params}, preprocess(x),
                          train=False, mutable=["activations"])
    stats = probe.reduce_stats_tree(sown["activations"])
    return {k: np.asarray(v["kernel"])
            for k, v in probe.dead_tree(state.params, stats).items()
            if v["kernel"] is not None}

  a, b = dead(data.x_probe), dead(data.x_test)
  assert set(got["per_layer"]) == {f"{k}/kernel" for k in a}
  for k in a:
    layer = got["per_layer"][f"{k}/kernel"]
    assert layer == {"holdout": int(a[k].sum()), "test": int(b[k].sum()),
                     "both": int((a[k] & b[k]).sum()),
                     "either": int((a[k] | b[k]).sum())}
  assert got["holdout"] == sum(int(v.sum()) for v in a.values())
  assert 0 < got["holdout"] < 32  # the bias init killed some, not all
  assert 0.0 <= got["jaccard"] <= 1.0
  c.stripping.probe = "test"
  with pytest.raises(ValueError, match="held-out"):
    stress.probe_overlap(c, tmp_path)
