"""The continual-learning harness (``experiments/continual.py``) on a few
tiny tasks of synthetic images: records, resumption, the remedies' effects."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import continual, continual_report
from experiments.continual_metrics import (effective_rank, srank,
                                           stripping_masks, task_metrics)
from experiments.continual_tasks import BENCHES, Data, make_task
from synstrip_vit import writers

#: 3 tasks x 48 examples, batch 2, 4 steps per remedy chunk, MLP 2 x 16.
TINY = BENCHES["mnist"]._replace(
    tasks=3, examples=48, batch=2, lr=0.05, width=16, depth=2, probe=64,
    tail=16, chunk=4)

FIELDS = {"epoch", "task", "online_acc", "online_acc_tail", "heldout_acc",
          "train_s", "dead_frac", "dormant_frac", "redo_dormant_frac",
          "dead_neurons", "hidden_neurons", "dead_last_frac", "erank_last",
          "srank_last", "weight_mean_abs", "sparsity", "active_params",
          "remedied", "remedy_s"}


@pytest.fixture(scope="module")
def data() -> Data:
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(160, 28, 28, 1)).astype(np.float32)
  x[:, :4] = 0.0  # always-zero pixels, as MNIST's border
  y = rng.integers(0, 10, 160).astype(np.int32)
  return Data(x[:96], y[:96], x[96:], y[96:])


def _records(path) -> list[dict]:
  return writers.scan_jsonl(path).records


def _strip_times(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if not k.endswith("_s")}
          for r in records]


# relu_cbp by default: test_resumed_run_equals_uninterrupted_run runs it too
# (its programs compile once).
@pytest.mark.parametrize("arm", [
    "relu_cbp", pytest.param("relu_snp", marks=pytest.mark.slow)])
def test_run_writes_one_record_per_task(tmp_path, data, arm):
  assert continual.run(tmp_path, TINY, arm, 0, data) == "done"
  records = _records(tmp_path / "mnist" / f"{arm}_s0.jsonl")
  assert [r["epoch"] for r in records] == [0, 1, 2]
  for r in records:
    assert set(r) == FIELDS
    assert 0.0 <= r["online_acc"] <= 1.0 and 0.0 <= r["dead_frac"] <= 1.0
    assert r["hidden_neurons"] == TINY.depth * TINY.width
    assert np.isfinite(r["weight_mean_abs"])
  config = json.loads((tmp_path / "mnist" / f"{arm}_s0.config.json"
                       ).read_text())
  assert config["arm"] == arm and config["bench"]["tasks"] == 3
  wall = json.loads((tmp_path / "mnist" / f"{arm}_s0.wall.json").read_text())
  assert wall["cpu_s"] > 0 and not wall["resumed"]
  assert not (tmp_path / "mnist" / "ckpt" / f"{arm}_s0.pkl").exists()
  assert continual.run(tmp_path, TINY, arm, 0, data) == "skipped"


@pytest.mark.slow
def test_report_tables_and_figures_of_finished_runs(tmp_path, data,
                                                    monkeypatch):
  monkeypatch.setitem(BENCHES, "mnist", TINY)
  for arm in ("relu", "relu_strip"):
    continual.run(tmp_path, TINY, arm, 0, data)
  text = continual_report.report(tmp_path, tmp_path / "figures")
  assert "| ReLU | 1 |" in text and "| ReLU + stripping 0.05 | 1 |" in text
  assert f"_Runs found: 2 of {3 * len(continual.ARMS)} expected" in text
  assert (tmp_path / "figures" / "continual_mnist.png").stat().st_size > 0
  assert not (tmp_path / "figures" / "continual_cifar.png").exists()
  assert (tmp_path / "tables.md").read_text() in text


def test_resumed_run_equals_uninterrupted_run(tmp_path, data, monkeypatch):
  arm = "relu_cbp"  # the most state: CBP's statistics and the key
  continual.run(tmp_path / "a", TINY, arm, 1, data)
  real = continual.run_task

  def crash_at_task_2(learner, bench, arm_, state, task, index):
    if index == 2:
      raise KeyboardInterrupt
    return real(learner, bench, arm_, state, task, index)

  monkeypatch.setattr(continual, "run_task", crash_at_task_2)
  with pytest.raises(KeyboardInterrupt):
    continual.run(tmp_path / "b", TINY, arm, 1, data)
  assert len(_records(tmp_path / "b" / "mnist" / f"{arm}_s1.jsonl")) == 2
  monkeypatch.setattr(continual, "run_task", real)
  assert continual.run(tmp_path / "b", TINY, arm, 1, data) == "resumed"
  a = _records(tmp_path / "a" / "mnist" / f"{arm}_s1.jsonl")
  b = _records(tmp_path / "b" / "mnist" / f"{arm}_s1.jsonl")
  assert _strip_times(a) == _strip_times(b)


def test_every_arm_starts_from_the_same_params_and_tasks(data):
  x0 = make_task(data, TINY, 0, 0).x_probe[:2]
  first = {arm: continual.make_learner(TINY, spec, 0, x0)[1].params
           for arm, spec in continual.ARMS.items()}
  ref = first["relu"]
  for params in first.values():
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)
  a, b = (make_task(data, TINY, 0, 1) for _ in range(2))
  np.testing.assert_array_equal(a.x, b.x)
  assert not np.array_equal(a.x, make_task(data, TINY, 0, 2).x)


def _with_dead_neuron(arm: str, data) -> tuple:
  """A learner of ``arm`` whose neuron 0 of ``fc1`` is dead (bias -1e3)."""
  task = make_task(data, TINY, 0, 0)
  learner, state = continual.make_learner(TINY, continual.ARMS[arm], 0,
                                          task.x_probe[:2])
  params = jax.tree_util.tree_map(lambda a: a, state.params)
  params["fc1"]["bias"] = params["fc1"]["bias"].at[0].set(-1e3)
  return learner, state._replace(params=params), task


def test_strip_event_sparsifies_the_dead_neuron(data):
  learner, state, task = _with_dead_neuron("relu_strip", data)
  state, record = continual.run_task(learner, TINY, continual.ARMS[
      "relu_strip"], state, task, 0)
  assert record["dead_neurons"] >= 1 and record["remedied"] >= 1
  masks = stripping_masks(state.opt_state)
  keep = np.asarray(masks["fc1"]["kernel"][:, 0])
  assert not keep.all()
  np.testing.assert_array_equal(
      np.asarray(state.params["fc1"]["kernel"][:, 0])[~keep], 0.0)
  assert task_metrics(state.params, state.opt_state, *_probe(
      learner, state, task))["sparsity"] > 0


def _probe(learner, state, task) -> tuple:
  _, stats, feats = learner.probe(state.params, jnp.asarray(task.x_probe),
                                  jnp.asarray(task.y_probe))
  return stats, np.asarray(feats)


def test_redo_event_revives_the_dead_neuron(data):
  learner, state, task = _with_dead_neuron("relu_redo", data)
  arm = continual.ARMS["relu_redo"]
  state, record = continual.run_task(learner, TINY, arm, state, task, 0)
  assert record["dead_neurons"] >= 1 and record["remedied"] >= 1
  assert float(state.params["fc1"]["bias"][0]) == 0.0
  after = task_metrics(state.params, state.opt_state,
                                 *_probe(learner, state, task))
  assert after["dead_neurons"] < record["dead_neurons"]


@pytest.mark.parametrize("sv,erank,expected_srank", [
    (np.ones(10), 10.0, 10), (np.array([3.0, 0.0, 0.0]), 1.0, 1),
    (np.zeros(4), 0.0, 0), (np.array([1.0, 1.0, 0.001]), 2.0, 2)])
def test_ranks(sv, erank, expected_srank):
  assert effective_rank(sv) == pytest.approx(erank, rel=1e-2)
  assert srank(sv) == expected_srank
