"""experiments/configs/paper.py: the original's recipe, and the script on it.

The script runs ``paper.py:cifar10`` on a tiny 32x32x3 ``.npz`` with
AutoAugment on (the model shrunk by overrides so it is quick), and evaluates
a corrupted test set after training.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from _shared import finish, start_python
from test_train_vit import REPO, SCRIPT, script_env

from synstrip_vit import config as config_lib, rundata


PAPER = REPO / "experiments" / "configs" / "paper.py"


def paper_config(dataset):
  spec = importlib.util.spec_from_file_location("paper_config", PAPER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(dataset)


@pytest.mark.parametrize("dataset, name, flip", [
    ("cifar10", "cifar10", True), ("cifar100", "cifar100", True),
    ("svhn", "svhn_cropped", False),
    ("tinyimagenet", "tinyimagenet:tiny-imagenet-200", True)])
def test_paper_config_is_the_original_recipe(dataset, name, flip):
  c = paper_config(dataset)
  config_lib.validate(c)
  assert c.data.dataset == name and c.data.flip is flip
  assert c.data.autoaugment and c.data.augment and c.data.crop_padding == 4
  assert (c.model.depth, c.model.hidden_size, c.model.num_heads,
          c.model.mlp_dim, c.model.patch_size) == (7, 384, 8, 1536, 4)
  assert c.model.activation == "relu" and c.model.dropout == 0.0
  assert (c.optimizer.learning_rate, c.optimizer.weight_decay,
          c.optimizer.warmup_epochs, c.optimizer.min_learning_rate) == \
      (1e-3, 5e-5, 5, 1e-5)
  assert (c.run.num_epochs, c.run.batch_size) == (200, 128)
  assert c.stripping.enabled and c.stripping.factor == 0.05
  assert c.stripping.frequency == 1 and c.stripping.probe == "test"
  assert len(c.data.mean) == len(c.data.std) == (
      0 if dataset == "tinyimagenet" else 3)


def test_paper_config_refuses_an_unknown_dataset():
  with pytest.raises(ValueError, match="'mnist'"):
    paper_config("mnist")


@pytest.mark.parametrize("mean, std, expected", [
    ((), (), None), ((0.5, 0.25, 0.125), (0.5, 0.5, 0.25), "scaled"),
    ((0.5,), (0.5,), "3 values")])
def test_normalization_constants(mean, std, expected):
  x = np.random.default_rng(0).integers(0, 256, (4, 2, 2, 3), np.uint8)
  c = paper_config("cifar10")
  c.data.update(mean=mean, std=std)
  if expected == "3 values":
    with pytest.raises(ValueError, match=expected):
      rundata.normalization(c.data, x)
    return
  m, s = rundata.normalization(c.data, x)
  if expected is None:
    np.testing.assert_allclose(m, x.reshape(-1, 3).mean(0), rtol=1e-5)
  else:
    np.testing.assert_allclose(m, np.asarray(mean) * 255, rtol=1e-6)
    np.testing.assert_allclose(s, np.asarray(std) * 255, rtol=1e-6)


@pytest.mark.slow
def test_script_runs_the_paper_config_with_autoaugment(tmp_path):
  """``--config=paper.py:cifar10 --config.data.dataset=npz:<32x32x3>
  --config.run.num_epochs=1``, shrunk, with one corrupted block."""
  rng = np.random.default_rng(0)
  npz = tmp_path / "c.npz"
  np.savez(npz, x_train=rng.integers(0, 256, (64, 32, 32, 3), np.uint8),
           y_train=rng.integers(0, 10, 64).astype(np.int32),
           x_test=rng.integers(0, 256, (16, 32, 32, 3), np.uint8),
           y_test=rng.integers(0, 10, 16).astype(np.int32))
  workdir = tmp_path / "wd"
  args = [SCRIPT, f"--config={PAPER}:cifar10", f"--workdir={workdir}",
          f"--config.data.dataset=npz:{npz}", "--config.run.num_epochs=1",
          "--config.model.depth=1", "--config.model.hidden_size=16",
          "--config.model.num_heads=2", "--config.model.mlp_dim=32",
          "--config.model.patch_size=8", "--config.run.batch_size=16",
          "--config.run.eval_batch_size=16", "--config.run.progress_bar=False",
          "--config.run.steps_per_dispatch=2",
          "--config.eval.corruptions=('contrast',)",
          "--config.eval.severities=(5,)"]
  proc = start_python(args, env=script_env())
  stdout, stderr = finish(proc, 600, "train_vit.py")
  assert proc.returncode == 0, stderr[-3000:]
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["autoaugment"] is True
  assert config["stripping"]["probe"] == "test"
  assert "corrupted test sets" in stdout
  corrupted = json.loads((workdir / "corrupted.json").read_text())
  assert [(b["corruption"], b["severity"]) for b in corrupted["blocks"]] == \
      [("contrast", 5)]
  assert 0.0 <= corrupted["mean"]["accuracy"] <= 1.0
  assert corrupted["per_corruption"]["contrast"] == corrupted["mean"]
