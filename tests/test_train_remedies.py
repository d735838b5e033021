"""The remedies of the ``remedy`` config section through the training loop.

Tiny MLP runs on scikit-learn's digits (offline), in-process: one run per
remedy, a remedy combined with stripping, the resume bit-identity of
continual backprop's running state, and the config checks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _shared import assert_bitwise_equal
from conftest import CompileCounter
from test_train_vit import Interrupt, interrupt_after, strip_times, tiny_config

from synstrip_jax.remedies import CBPState
from synstrip_jax.transform import get_masks
from synstrip_vit import checkpointing, config as config_lib, evaluation, loop
from synstrip_vit import remedy, startup, steps, writers


WIDTH = 16
#: A tiny MLP that loses neurons (high learning rate, no augmentation) and
#: a CBP that replaces a quarter of every layer at every event.
MLP = {"model.width": WIDTH, "model.depth": 2, "data.augment": False,
       "data.train_limit": 192, "run.num_epochs": 2,
       "optimizer.learning_rate": 3e-2, "optimizer.warmup_epochs": 0,
       "stripping.enabled": False, "remedy.replacement_rate": 0.25,
       "remedy.maturity_threshold": 0}


def mlp_config(overrides=None):
  return tiny_config({**MLP, **(overrides or {})}, model="mlp")


def run(config, workdir, **kwargs):
  return loop.train_and_evaluate(config, workdir, log=lambda _: None,
                                 **kwargs)


@pytest.fixture(scope="module")
def no_remedy(tmp_path_factory):
  """The records and final state of the run without a remedy."""
  workdir = tmp_path_factory.mktemp("none") / "wd"
  config = mlp_config()
  records = run(config, workdir)
  return records, evaluation.final_state(config, workdir)[0]


# ReDo through the loop by default, shrink & perturb by
# test_remedy_frequency_and_progress_line; CBP under -m slow.
@pytest.mark.parametrize("name", [
    "redo", *[pytest.param(n, marks=pytest.mark.slow)
              for n in ("cbp", "shrink_perturb")]])
def test_each_remedy_runs_at_its_events(tmp_path, no_remedy, name):
  config = mlp_config({"remedy.name": name})
  records = run(config, tmp_path / "wd")
  state, _, _ = evaluation.final_state(config, tmp_path / "wd")
  assert [r["remedy"] for r in records] == [name] * len(records)
  assert all(r["recycled_now"] and np.isfinite(r["train_loss"])
             for r in records)
  ref_records, ref_state = no_remedy
  # The first epoch trains identically; its event changes what follows.
  same = ("train_loss", "test_loss", "probe_loss", "dead_neurons")
  assert [records[0][k] for k in same] == [ref_records[0][k] for k in same]
  assert records[1]["train_loss"] != ref_records[1]["train_loss"]
  if name == "cbp":  # a quarter of each layer with a consumer kernel
    assert all(r["recycled_neurons"] == 2 * (WIDTH // 4) for r in records)
    assert isinstance(state.remedy, CBPState)
    ages = jax.device_get(state.remedy.ages)
    assert sorted(ages) == ["fc0/kernel", "fc1/kernel"]
    assert all(np.sum(a == 0) == WIDTH // 4 for a in ages.values())
  else:
    assert state.remedy is None and ref_state.remedy is None
  if name == "shrink_perturb":
    assert all(r["recycled_neurons"] == 0 for r in records)
  if name == "redo":  # the high learning rate kills neurons
    assert sum(r["recycled_neurons"] for r in records) > 0
    # remedy.tau and stripping.tau unset: the dead neurons are recycled.
    assert all(r["recycled_neurons"] == r["dead_neurons"] for r in records)


def test_no_remedy_records_none(no_remedy):
  records, _ = no_remedy
  assert all(r["remedy"] == "none" and not r["recycled_now"]
             and r["recycled_neurons"] == 0 for r in records)


def test_remedy_frequency_and_progress_line(tmp_path):
  lines = []
  config = mlp_config({"remedy.name": "shrink_perturb",
                       "remedy.frequency": 2})
  records = loop.train_and_evaluate(config, tmp_path / "wd", log=lines.append)
  assert [r["recycled_now"] for r in records] == [False, True]
  epochs = [line for line in lines if line.startswith("epoch ")]
  assert "shrink_perturb" not in epochs[0]
  assert epochs[1].endswith(" shrink_perturb reset 0")


@pytest.fixture(scope="module")
def cbp_reference(tmp_path_factory):
  """An uninterrupted CBP run that also strips (every event: strip, then
  CBP), with checkpoints inside epochs."""
  workdir = tmp_path_factory.mktemp("cbp") / "wd"
  config = mlp_config({"remedy.name": "cbp", "stripping.enabled": True,
                       "stripping.factor": 0.5, "run.num_epochs": 3,
                       "run.checkpoint_every_steps": 4,
                       "remedy.maturity_threshold": 1})
  records = run(config, workdir)
  return config, records, jax.device_get(
      evaluation.final_state(config, workdir)[0])


@pytest.mark.slow
def test_cbp_combines_with_stripping(cbp_reference):
  _, records, state = cbp_reference
  assert all(r["stripped_now"] and r["recycled_now"] for r in records)
  # maturity 1: no neuron is old enough at the first event.
  assert [r["recycled_neurons"] > 0 for r in records] == [False, True, True]
  assert records[-1]["stripped_weights"] > 0
  masks = jax.tree.leaves(get_masks(state.opt_state), is_leaf=lambda x: x is None)
  for leaf, mask in zip(jax.tree.leaves(state.params), masks):
    if mask is not None:
      assert np.all(leaf[~mask] == 0.0)


@pytest.mark.slow  # resume bit-identity by default: test_train_vit.py
@pytest.mark.parametrize("interrupts", [[5], [6, 9]])
def test_cbp_resume_is_bit_identical(tmp_path, cbp_reference, interrupts):
  """Killed mid-epoch or at an epoch end (after its event), the resumed run
  ends with the same params, CBP state and records."""
  config, ref_records, ref_state = cbp_reference
  for n in interrupts:
    with pytest.raises(Interrupt):
      run(config, tmp_path / "wd", on_step=interrupt_after(n))
  run(config, tmp_path / "wd")
  state = jax.device_get(evaluation.final_state(config, tmp_path / "wd")[0])
  assert_bitwise_equal(ref_state.params, state.params)
  assert_bitwise_equal(ref_state.remedy, state.remedy)
  assert strip_times(writers.read_jsonl(tmp_path / "wd" / "metrics.jsonl")
                     ) == strip_times(ref_records)


@pytest.mark.parametrize("field, value, message", [
    ("remedy.name", "dropout", "config.remedy.name='dropout' is not one of"),
    ("remedy.frequency", 0, "config.remedy.frequency=0 must be an int >= 1"),
    ("remedy.tau", -1.0, "config.remedy.tau=-1.0 must be unset"),
    ("remedy.replacement_rate", 2.0,
     "config.remedy.replacement_rate=2.0 must be a number in [0.0, 1.0]"),
    ("remedy.maturity_threshold", -1,
     "config.remedy.maturity_threshold=-1 must be an int >= 0"),
    ("remedy.decay_rate", 1.0,
     "config.remedy.decay_rate=1.0 must be a number in [0.0, 1.0)"),
    ("remedy.shrink", -0.1, "config.remedy.shrink=-0.1 must be a number"),
    ("remedy.sigma", float("inf"), "config.remedy.sigma=inf must be a"),
])
def test_remedy_fields_are_checked(field, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    config_lib.validate(tiny_config({field: value}))


def test_stripping_redo_names_its_replacement():
  c = tiny_config()
  c.stripping.redo = True
  with pytest.raises(ValueError, match=re.escape(
      "config.stripping.redo no longer exists: use "
      "config.remedy.name='redo'")):
    config_lib.validate(c)


@pytest.mark.parametrize("redo, name", [(True, "redo"), (False, "none")])
def test_config_without_remedy_section_reads_as_its_equivalent(redo, name):
  """A ``config.json`` with ``stripping.redo`` resumes as the config whose
  ``remedy`` does the same (the stripping events' tau and frequency)."""
  new = json.loads(tiny_config({"remedy.name": name, "remedy.tau": 0.1,
                                "stripping.tau": 0.1,
                                "remedy.frequency": 2,
                                "stripping.frequency": 2}).to_json())
  old = {k: dict(v) for k, v in new.items() if k != "remedy"}
  old["stripping"]["redo"] = redo
  if not redo:  # the remedy fields keep their defaults
    new["remedy"] = config_lib.base_config().remedy.to_dict()
  assert config_lib.config_diff(old, new) == {}
  assert config_lib.config_diff(old, {**new, "remedy": {
      **new["remedy"], "name": "cbp"}}) == {"remedy.name": (name, "cbp")}


def test_event_key_is_the_seeds_fold_in():
  key = remedy.event_key(3, 7)
  assert key.dtype == np.uint32 and key.shape == (2,)
  np.testing.assert_array_equal(
      key, jax.random.fold_in(jax.random.PRNGKey(3), 7))
  assert not np.array_equal(key, remedy.event_key(3, 8))


@flax.struct.dataclass
class _StateWithoutRemedy:
  """A :class:`steps.TrainState` as checkpoints hold it without a remedy
  field."""
  step: jax.Array
  params: dict
  opt_state: tuple
  rng: jax.Array
  train_sums: dict


def test_checkpoint_without_remedy_field_restores(tmp_path):
  old = _StateWithoutRemedy(
      step=jnp.asarray(7, jnp.int32), params={"w": jnp.arange(3.0)},
      opt_state=(), rng=jnp.asarray([1, 2], jnp.uint32),
      train_sums=steps.zero_sums())
  manager = checkpointing.make_manager(tmp_path)
  checkpointing.save(manager, 7, old)
  target = steps.TrainState(**{
      k: jax.tree.map(jnp.zeros_like, v) for k, v in vars(old).items()})
  step, state = checkpointing.restore_latest(manager, target)
  manager.close()
  assert step == 7 and state.remedy is None
  assert_bitwise_equal(vars(old), {k: getattr(state, k) for k in vars(old)})
  with pytest.raises(checkpointing.CheckpointError, match="do not match"):
    checkpointing.restore_latest(
        checkpointing.make_manager(tmp_path),
        target.replace(remedy={"util": jnp.zeros(3)}))


@pytest.mark.parametrize("name", [
    "redo", pytest.param("cbp", marks=pytest.mark.slow)])
def test_prepare_compiles_the_remedy_event(tmp_path, name):
  """After prepare, an epoch's probe and its remedy event compile nothing
  new of the remedy (it compiled at start-up with the other programs)."""
  config = mlp_config({"remedy.name": name})
  run, state = startup.prepare(config, tmp_path, log=lambda _: None)
  (_, probed), dead = loop.evaluate_and_probe(run, state.params)
  with CompileCounter() as counter:
    _, (_, reset) = loop.strip_or_recycle(run, state, probed["stats"], dead,
                                          0)
  assert reset is not None
  assert counter.count_of("remedy_event") == 0, counter.names


def test_docs_remedy_table_matches_the_default_config():
  """docs/training.md's remedy table lists every field with its default."""
  text = (Path(__file__).resolve().parents[1] / "docs" / "training.md"
          ).read_text()
  rows = dict(re.findall(r"^\| `remedy\.(\w+)` \| (.*?) \|", text, re.M))
  defaults = config_lib.base_config().remedy
  assert set(rows) == set(defaults)
  for name, shown in rows.items():
    value = defaults[name]
    assert shown == ("unset" if value is None else f"`{value}`"), name
