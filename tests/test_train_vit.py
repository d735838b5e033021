"""End-to-end tests of experiments/train_vit.py and synstrip_vit.loop.

Tiny runs on scikit-learn's digits (offline): the script as a subprocess
(metrics, plots, config, resume, errors, a real SIGKILL, 8 fake devices) and
the loop in-process (resume equivalence at many interruption points,
checkpoint fall-back, NaN loss, TFDS through ``tfds.testing.mock_data``).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from _shared import (CACHE_DIR, assert_bitwise_equal, finish, start_python,
                     subprocess_env)

from synstrip_jax.transform import get_masks
from synstrip_vit import (checkpointing, compile_cache, config as config_lib,
                          evaluation, finite, loop, resume, startup, timings,
                          writers)
from synstrip_vit.config import base_config
from synstrip_vit.steps import chunk_bounds

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "train_vit.py"
DEFAULT_CONFIG = REPO / "experiments" / "configs" / "default.py"

TINY = {
    "data.dataset": "digits", "data.train_limit": 320, "data.test_limit": 96,
    "data.crop_padding": 1, "data.flip": False,
    "model.patch_size": 4, "model.hidden_size": 16, "model.depth": 2,
    "model.num_heads": 2, "model.mlp_dim": 32,
    "optimizer.warmup_epochs": 1, "optimizer.learning_rate": 3e-3,
    "run.batch_size": 32, "run.eval_batch_size": 64, "run.num_epochs": 2,
    "run.progress_bar": False,
}
REQUIRED = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc",
            "dead_neurons", "active_params", "sparsity")


#: The model of the tiny runs: the package's MLP compiles in about half the
#: time of the tiny ViT, and nothing the loop does depends on the model (the
#: ViT's steps are tested in test_steps.py, its runs under ``-m slow``).
MODEL = "mlp"


def _tiny(model: str) -> dict:
  return {k: v for k, v in TINY.items()
          if model == "vit" or not k.startswith("model.")}


def tiny_config(overrides=None, model=MODEL):
  """The tiny run's config; ``overrides``: dotted field -> value."""
  c = base_config(model)
  c.update_from_flattened_dict({**_tiny(model), **(overrides or {})})
  return c


def overrides_argv(overrides=None, model=MODEL):
  """The script's arguments that give :func:`tiny_config` (the ViT is the
  script's default config)."""
  values = {**_tiny(model), **(overrides or {})}
  return ([] if model == "vit" else [f"--config={DEFAULT_CONFIG}:{model}"]) + [
      f"--config.{k}={v}" for k, v in values.items()]


class Interrupt(Exception):
  """Raised by :func:`interrupt_after` (simulates a kill)."""


def interrupt_after(n):
  """An ``on_step`` callback that raises after ``n`` steps of this call."""
  count = itertools.count(1)

  def on_step(step):
    if next(count) >= n:
      raise Interrupt(f"interrupted after {n} steps (at step {step})")
  return on_step


def script_env(devices=None):
  """Subprocess environment; compiled programs are cached across runs, and
  the script keeps XLA's default flags (``SYNSTRIP_DEFAULT_XLA_FLAGS=0``) so
  that its runs compute bit for bit as the in-process runs they are compared
  with (:func:`test_default_xla_flags` checks the flags themselves)."""
  return subprocess_env(devices or None,
                        JAX_COMPILATION_CACHE_DIR=str(CACHE_DIR),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                        SYNSTRIP_DEFAULT_XLA_FLAGS="0")


@pytest.mark.parametrize("user, switch, expected", [
    ("", None, "--xla_cpu_experimental_ynn_fusion_type="),
    pytest.param("--xla_foo=1", None,
                 "--xla_cpu_experimental_ynn_fusion_type= --xla_foo=1",
                 marks=pytest.mark.slow),
    pytest.param("--xla_cpu_experimental_ynn_fusion_type=dot", None,
                 "--xla_cpu_experimental_ynn_fusion_type=dot",
                 marks=pytest.mark.slow),
    pytest.param("--xla_foo=1", "0", "--xla_foo=1", marks=pytest.mark.slow),
])
def test_default_xla_flags(user, switch, expected):
  """train_vit.py sets its XLA:CPU flags before JAX starts; the user's
  XLA_FLAGS win, SYNSTRIP_DEFAULT_XLA_FLAGS=0 sets none."""
  code = ("import os, runpy; runpy.run_path(os.environ['SCRIPT'], "
          "run_name='imported'); print(os.environ.get('XLA_FLAGS', ''))")
  env = subprocess_env(None, SCRIPT=str(SCRIPT), XLA_FLAGS=user)
  env.pop("SYNSTRIP_DEFAULT_XLA_FLAGS", None)
  if switch is not None:
    env["SYNSTRIP_DEFAULT_XLA_FLAGS"] = switch
  proc = start_python(["-c", code], env=env)
  stdout, stderr = finish(proc, 120, "train_vit.py import")
  assert proc.returncode == 0, stderr[-2000:]
  assert stdout.strip().splitlines()[-1] == expected


def run_script(workdir, *args, devices=None, timeout=300, env=None,
               overrides=None, model=MODEL) -> subprocess.CompletedProcess:
  """Runs the script to its end (``workdir=None``: no ``--workdir``)."""
  cmd = [SCRIPT, *([f"--workdir={workdir}"] if workdir else []),
         *overrides_argv(overrides, model), *args]
  proc = start_python(cmd, env=env or script_env(devices))
  stdout, stderr = finish(proc, timeout, "train_vit.py")
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout,
                                     stderr)


def strip_times(records):
  drop = ("train_time_s", "eval_time_s", "strip_time_s")
  return [{k: v for k, v in r.items() if k not in drop} for r in records]


def final_params(config, workdir):
  """The final params and ``(epoch, batch) = divmod(step, steps/epoch)``."""
  state, _, run_data = evaluation.final_state(config, workdir)
  steps_per_epoch = len(run_data.x_train) // config.run.batch_size
  return (jax.device_get(state.params),
          divmod(int(state.step), steps_per_epoch))


def tensorboard_scalars(logdir):
  """``{tag: [(step, value), ...]}`` of the event files in ``logdir``."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = {}
  for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
    raw, i = path.read_bytes(), 0
    while i < len(raw):  # TFRecord: length, crc, payload, crc
      (n,) = struct.unpack("<Q", raw[i:i + 8])
      event = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out




# --------------------------------------------------------------- the script

@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
  """One tiny run of the script (2 epochs, stripping on) shared by tests."""
  workdir = tmp_path_factory.mktemp("run") / "wd"
  res = run_script(workdir)
  assert res.returncode == 0, res.stderr[-3000:]
  return workdir, res


def test_script_writes_metrics_plots_and_config(script_run):
  workdir, res = script_run
  records = writers.read_jsonl(workdir / "metrics.jsonl")
  assert [r["epoch"] for r in records] == [0, 1]
  for r in records:
    for key in REQUIRED:
      assert key in r, key
    assert any(k.startswith("dead/") for k in r)
    assert 0.0 <= r["test_acc"] <= 1.0
    assert np.isfinite(r["train_loss"])
  for name in ("accuracy", "dead_neurons", "active_params"):
    png = workdir / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["name"] == MODEL
  assert saved["data"]["train_limit"] == TINY["data.train_limit"]
  assert "epoch 2/2" in res.stdout
  assert "compiling (first run of this config: about " in res.stdout
  for name in ("config.json", "run.json", "dead_neurons.png"):
    assert (workdir / name).stat().st_mode & 0o077 == 0o044, name


def test_script_writes_tensorboard_events(script_run):
  """``tensorboard --logdir <workdir>`` shows the curves of metrics.jsonl."""
  pytest.importorskip("tensorboardX")
  workdir, _ = script_run
  records = writers.read_jsonl(workdir / "metrics.jsonl")
  scalars = tensorboard_scalars(workdir / writers.TENSORBOARD_DIR)
  for key in ("train_loss", "test_acc", "dead_neurons", "sparsity"):
    assert [s for s, _ in scalars[key]] == [r["step"] for r in records], key
    np.testing.assert_allclose([v for _, v in scalars[key]],
                               [r[key] for r in records], rtol=1e-6)
  assert any(k.startswith("dead/") for k in scalars)


def test_script_writes_stage_timings(script_run):
  workdir, _ = script_run
  stages = json.loads((workdir / timings.TIMINGS_FILE).read_text())
  for key in ("imports", "data", "init_compile", "restore", "epochs", "saves",
              "plots", "total"):
    assert stages[key] >= 0.0, key
  assert stages["total"] >= sum(v for k, v in stages.items() if k != "total")


@pytest.mark.slow
def test_second_run_loads_every_program_from_the_cache(tmp_path):
  """A second run of a config compiles nothing: it writes no cache entry."""
  cache = tmp_path / "cache"
  arg = f"--config.run.compilation_cache_dir={cache}"
  first = run_script(tmp_path / "a", arg)
  assert first.returncode == 0, first.stderr[-3000:]
  entries = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
  names = {name.split("-")[0] for name in entries}
  assert {"jit_init", "jit_train_step", "jit_eval_step"} <= names, names
  second = run_script(tmp_path / "b", arg)
  assert second.returncode == 0, second.stderr[-3000:]
  assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == entries
  assert (strip_times(writers.read_jsonl(tmp_path / "a" / "metrics.jsonl"))
          == strip_times(writers.read_jsonl(tmp_path / "b" / "metrics.jsonl")))


def test_compilation_cache_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.resolve_dir(None) == compile_cache.default_dir() == (
      tmp_path / "synstrip_jax" / "jax_cache")
  monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
  assert compile_cache.resolve_dir(None) == tmp_path / "env"
  assert compile_cache.resolve_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
  assert compile_cache.resolve_dir("") is None
  config_lib.validate(tiny_config({"run.compilation_cache_dir": ""}))
  config_lib.validate(tiny_config({"run.compilation_cache_dir": "/x"}))


def test_stripped_weights_never_come_back(script_run):
  workdir, _ = script_run
  records = writers.read_jsonl(workdir / "metrics.jsonl")
  stripped = [r["stripped_weights"] for r in records]
  assert stripped == sorted(stripped)
  # The final masks: every stripped weight is exactly 0.0 in the params.
  config = tiny_config()
  state, _, _ = evaluation.final_state(config, workdir)
  from synstrip_jax.transform import get_masks  # pylint: disable=import-outside-toplevel
  masks = get_masks(state.opt_state)
  for p, m in zip(jax.tree.leaves(state.params),
                  jax.tree.leaves(masks, is_leaf=lambda x: x is None)):
    if m is not None:
      assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
  assert int(sum(np.sum(~np.asarray(m)) for m in jax.tree.leaves(masks))) \
      == stripped[-1]


@pytest.mark.slow
def test_without_workdir_a_fresh_named_one_is_used():
  """No --workdir (the quick start): the run goes to runs/default-<time>."""
  res = run_script(None, overrides={"run.num_epochs": 1},
                   env=subprocess_env(None), model="vit")
  assert res.returncode == 0, res.stderr[-3000:]
  line = next(l for l in res.stdout.splitlines() if l.startswith("workdir: "))
  workdir = Path(line[len("workdir: "):])
  try:
    assert workdir.parent == REPO / "runs"
    assert re.fullmatch(r"default-\d{8}-\d{6}", workdir.name), workdir.name
    assert len(writers.read_jsonl(workdir / "metrics.jsonl")) == 1
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def test_rerun_of_a_finished_run_changes_nothing(script_run):
  workdir, _ = script_run
  before = (workdir / "metrics.jsonl").read_text()
  res = run_script(workdir)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.splitlines()[-1] == (
      f"run complete: 2 epochs; metrics in {workdir}/metrics.jsonl")
  assert "compiling" not in res.stdout and "resuming" not in res.stdout
  assert (workdir / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_rerun_with_another_config_is_refused(script_run):
  workdir, _ = script_run
  res = run_script(workdir, overrides={"run.seed": 1})
  assert res.returncode == 1
  assert "different config" in res.stderr and "seed" in res.stderr


# One variant by default (a data set refused before any compile, one line, no
# traceback); the rest under ``-m slow`` (the config checks themselves run
# in-process in test_cli.py and test_train_remedies.py).
@pytest.mark.parametrize("args, expected", [
    (["--config.data.dataset=imagenet"], "unknown dataset 'imagenet'"),
    *[pytest.param(*case, marks=pytest.mark.slow) for case in [
        (["--config.remedy.name=cpb"], "config.remedy.name='cpb' is not one of"),
        (["--config.stripping.facter=0.1"], "did you mean 'stripping.factor'?"),
        (["--config.model.num_heads=3"], "num_heads=3 does not divide"),
        (["--config.stripping.factor=1.5"], "stripping.factor"),
        (["--config.stripping.factor=nan"], "stripping.factor"),
        (["--config.stripping.tau=-1.0"], "config.stripping.tau=-1.0"),
        (["--config.bogus=1"], "unknown config field 'bogus'"),
        (["--config.model.width=8"], "unknown config field 'model.width'"),
        (["--config.stripping.probe=train"], "config.stripping.probe='train'"),
        (["--config.stripping.redo=True"], "use config.remedy.name='redo'"),
        (["--config.run.batch_size=1000"], "batch_size=1000"),
    ]],
])
def test_bad_input_one_line_error_before_training(tmp_path, args, expected):
  res = run_script(tmp_path / "wd", *args, timeout=120, model="vit")
  assert res.returncode != 0
  lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
  assert lines and lines[-1].startswith("error:"), res.stderr[-2000:]
  assert expected in lines[-1], lines[-1]
  assert "Traceback" not in res.stderr
  assert not (tmp_path / "wd" / "checkpoints").exists()


def _write_npz(path, channels=1, **changes):
  """A small random ``.npz`` data set at ``path``; ``changes`` replace its
  arrays (``None`` drops one)."""
  rng = np.random.default_rng(0)
  arrays = {"x_train": rng.integers(0, 256, (64, 8, 8, channels),
                                    dtype=np.uint8),
            "y_train": rng.integers(0, 10, 64).astype(np.int32),
            "x_test": rng.integers(0, 256, (32, 8, 8, channels),
                                   dtype=np.uint8),
            "y_test": rng.integers(0, 10, 32).astype(np.int32)}
  arrays.update(changes)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize("changes, expected", [
    ({"y_train": None}, "y_train"),
    ({"y_test": np.full(32, -1, np.int32)}, "negative label"),
    ({"y_test": np.full(32, 12, np.int32),
      "class_names": np.array([f"c{i}" for i in range(10)])},
     "label 12 >= len\\(class_names\\)"),
    ({"y_train": np.zeros(10, np.int32)}, "y_train"),
    ("missing", "does not exist"),
])
def test_bad_npz_fails_before_training(tmp_path, changes, expected):
  path = tmp_path / "d.npz"
  if changes != "missing":
    _write_npz(path, **changes)
  config = tiny_config({"data.dataset": f"npz:{path}", "data.train_limit": 0,
                        "data.test_limit": 0})
  with pytest.raises(ValueError, match=expected):
    loop.train_and_evaluate(config, tmp_path / "wd")
  assert not (tmp_path / "wd").exists()


@pytest.mark.slow
def test_npz_dataset_trains(tmp_path):
  path = _write_npz(tmp_path / "d.npz")
  config = tiny_config({"data.dataset": f"npz:{path}", "data.train_limit": 0,
                        "data.test_limit": 0, "run.num_epochs": 1})
  records = loop.train_and_evaluate(config, tmp_path / "wd",
                                    log=lambda _: None)
  assert len(records) == 1 and np.isfinite(records[0]["test_loss"])


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
  """A real kill -9 in the middle of the run; rerunning the same command
  ends with exactly the parameters and metrics of an uninterrupted run."""
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  extra = {"run.num_epochs": 3, "run.checkpoint_every_steps": 3}
  res = run_script(ref, overrides=extra)
  assert res.returncode == 0, res.stderr[-3000:]

  proc = start_python(
      [SCRIPT, f"--workdir={killed}", *overrides_argv(extra)],
      env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  ckpts = killed / "checkpoints"
  try:  # kill once a mid-epoch checkpoint of epoch 2 exists
    while time.time() < deadline and proc.poll() is None:
      steps = ([int(p.name) for p in ckpts.iterdir() if p.name.isdigit()]
               if ckpts.exists() else [])
      if steps and max(steps) > 12:
        break
      time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(timeout=60)
  assert len(writers.read_jsonl(killed / "metrics.jsonl")) < 3
  res = run_script(killed, overrides=extra)
  assert res.returncode == 0, res.stderr[-3000:]
  config = tiny_config(extra)
  p_ref, _ = final_params(config, ref)
  p_killed, _ = final_params(config, killed)
  assert_bitwise_equal(p_ref, p_killed)
  assert strip_times(writers.read_jsonl(ref / "metrics.jsonl")) == \
      strip_times(writers.read_jsonl(killed / "metrics.jsonl"))


@pytest.mark.slow
def test_eight_fake_devices(tmp_path, script_run):
  """The same run over 8 (fake CPU) devices: same metrics up to float
  reassociation of the gradient all-reduce; a clear error when the batch
  does not split over the devices."""
  res = run_script(tmp_path / "wd8", devices=8)
  assert res.returncode == 0, res.stderr[-3000:]
  one = writers.read_jsonl(script_run[0] / "metrics.jsonl")
  eight = writers.read_jsonl(tmp_path / "wd8" / "metrics.jsonl")
  assert len(eight) == len(one) == 2
  for a, b in zip(one, eight):
    np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=1e-3)
    np.testing.assert_allclose(b["test_loss"], a["test_loss"], rtol=1e-2)
  bad = run_script(tmp_path / "bad", devices=8, timeout=120,
                   overrides={"run.batch_size": 36})
  assert bad.returncode == 1
  assert "batch_size=36" in bad.stderr and "device count 8" in bad.stderr


# --------------------------------------------------------- in-process loop

@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ref") / "wd"
  # The tiny run's programs (compiled by other modules too), with
  # checkpoints inside epochs (every 4 steps; 9 steps per epoch).
  config = tiny_config({"run.checkpoint_every_steps": 4})
  records = loop.train_and_evaluate(config, workdir, log=lambda _: None)
  params, _ = final_params(config, workdir)
  return config, records, params


@pytest.mark.parametrize("interrupts", [
    [4], *[pytest.param(i, marks=pytest.mark.slow) for i in ([9, 1],
                                                              [5, 11, 3])]])
def test_interrupt_anywhere_then_resume_is_bit_identical(tmp_path,
                                                         reference_run,
                                                         interrupts):
  """Interruptions mid-epoch (between checkpoints), right after a
  checkpoint, at epoch ends, and several in a row."""
  config, ref_records, ref_params = reference_run
  workdir = tmp_path / "wd"
  for n in interrupts:
    with pytest.raises(Interrupt):
      loop.train_and_evaluate(config, workdir, on_step=interrupt_after(n),
                              log=lambda _: None)
  loop.train_and_evaluate(config, workdir, log=lambda _: None)
  params, position = final_params(config, workdir)
  assert position == (2, 0)  # epoch 2 of 2 (index 1) finished
  assert_bitwise_equal(ref_params, params)
  assert strip_times(writers.read_jsonl(workdir / "metrics.jsonl")) == \
      strip_times(ref_records)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_then_errors(tmp_path):
  config = tiny_config({"run.num_epochs": 2})
  workdir = tmp_path / "wd"
  loop.train_and_evaluate(config, workdir, log=lambda _: None)
  ckpts = workdir / "checkpoints"
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert len(steps) == 2
  # Corrupt the newest one: every file of its state item is truncated.
  for f in (ckpts / str(steps[-1]) / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  # The run resumes from the previous checkpoint (epoch 1) and redoes epoch 2.
  records = loop.train_and_evaluate(config, workdir, log=lambda _: None)
  assert [r["epoch"] for r in records] == [0, 1]
  # The unreadable checkpoint was moved aside, not deleted.
  assert (workdir / "unreadable_checkpoints" / str(steps[-1])).is_dir()
  # Now corrupt both: a clear error, and the metrics are not overwritten.
  for f in ckpts.rglob("*"):
    if f.is_file() and "state" in f.parts:
      f.write_bytes(b"garbage")
  before = (workdir / "metrics.jsonl").read_text()
  with pytest.raises(checkpointing.CheckpointError, match="could be restored"):
    loop.train_and_evaluate(config, workdir, log=lambda _: None)
  assert (workdir / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_metrics_without_checkpoints_is_refused(tmp_path):
  config = tiny_config({"run.num_epochs": 1})
  workdir = tmp_path / "wd"
  loop.train_and_evaluate(config, workdir, log=lambda _: None)
  shutil.rmtree(workdir / "checkpoints")
  with pytest.raises(resume.RunError, match="refusing to start over"):
    loop.train_and_evaluate(config, workdir, log=lambda _: None)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config({"run.num_epochs": 3, "optimizer.learning_rate": 1e30,
                        "optimizer.warmup_epochs": 0,
                        "optimizer.weight_decay": 0.0})
  workdir = tmp_path / "wd"
  with pytest.raises(FloatingPointError, match="training loss became"):
    loop.train_and_evaluate(config, workdir, log=lambda _: None)
  records = writers.read_jsonl(workdir / "metrics.jsonl")
  for r in records:
    assert np.isfinite(r["train_loss"])
  steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == len(records)


@pytest.mark.slow  # the TFDS loader itself by default: test_data.py
@pytest.mark.parametrize("model", ["mlp", "vit"])
def test_tfds_path_with_mock_data(tmp_path, model):
  """cifar10 through the TFDS API and the loop (mock data: nothing is read
  or fetched)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  config = tiny_config({"data.dataset": "cifar10", "data.train_limit": 0,
                        "data.test_limit": 0, "run.num_epochs": 1,
                        "data.crop_padding": 4, "data.flip": True,
                        **({"model.patch_size": 8} if model == "vit" else {})},
                       model=model)
  with tfds.testing.mock_data(num_examples=64):
    records = loop.train_and_evaluate(config, tmp_path / "wd",
                                      log=lambda _: None)
  assert len(records) == 1
  assert records[0]["dead_neurons"] >= 0 and np.isfinite(records[0]["test_loss"])


@pytest.mark.slow
def test_redo_arm_recycles_dead_neurons(tmp_path):
  """The ReDo baseline through the loop: with a learning rate high enough
  to kill neurons, recycling events happen and training stays finite."""
  config = tiny_config({"model.width": 16, "model.depth": 3,
                        "run.num_epochs": 3, "stripping.enabled": False,
                        "remedy.name": "redo", "data.augment": False,
                        "optimizer.learning_rate": 3e-2,
                        "optimizer.warmup_epochs": 0}, model="mlp")
  records = loop.train_and_evaluate(config, tmp_path / "wd",
                                    log=lambda _: None)
  assert all(r["recycled_now"] for r in records)
  assert all(not r["stripped_now"] and r["stripped_weights"] == 0
             for r in records)
  assert all(np.isfinite(r["train_loss"]) for r in records)


@pytest.mark.slow
def test_bfloat16_computation_keeps_float32_state(tmp_path):
  """dtype=bfloat16: computation in bf16, params/optimizer state/statistics
  and the stripping thresholds in float32."""
  config = tiny_config({"model.dtype": "bfloat16", "run.num_epochs": 1})
  records = loop.train_and_evaluate(config, tmp_path / "wd",
                                    log=lambda _: None)
  assert np.isfinite(records[0]["train_loss"])
  state, model, _ = evaluation.final_state(config, tmp_path / "wd")
  assert model.dtype == jax.numpy.bfloat16
  for leaf in jax.tree.leaves(state.params):
    assert leaf.dtype == np.float32
  for leaf in jax.tree.leaves(state.opt_state):
    assert leaf.dtype in (np.float32, np.int32, np.bool_), leaf.dtype


# ------------------------------------------------- config, writers, warm-up

@pytest.mark.slow
def test_without_tensorboardx_only_jsonl_is_written(tmp_path, monkeypatch):
  """tensorboardX absent (its import fails): the run writes no event files
  and everything else as usual."""
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  assert not writers.tensorboard_available()
  path = _write_npz(tmp_path / "d.npz")
  config = tiny_config({"data.dataset": f"npz:{path}", "data.train_limit": 0,
                        "data.test_limit": 0, "run.num_epochs": 1})
  records = loop.train_and_evaluate(config, tmp_path / "wd",
                                    log=lambda _: None)
  assert writers.read_jsonl(tmp_path / "wd" / "metrics.jsonl") == records
  assert not (tmp_path / "wd" / writers.TENSORBOARD_DIR).exists()


def test_writers_of_other_processes_write_nothing(tmp_path):
  writer = writers.make_writer(tmp_path, is_main=False)
  writer.write(1, {"epoch": 0, "step": 1, "test_acc": 0.5})
  writer.close()
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_warmup_as_long_as_the_run_is_clamped_with_a_notice(tmp_path):
  """2 epochs with 3 warm-up epochs: a one-line notice, and the learning
  rate reaches its peak (after 1 epoch of warm-up)."""
  path = _write_npz(tmp_path / "d.npz")
  config = tiny_config({"data.dataset": f"npz:{path}", "data.train_limit": 0,
                        "data.test_limit": 0, "optimizer.warmup_epochs": 3})
  assert config_lib.warmup_epochs(config)[0] == 1
  lines = []
  records = loop.train_and_evaluate(config, tmp_path / "wd",
                                    log=lines.append)
  notices = [l for l in lines if l.startswith("notice:")]
  assert notices == [
      "notice: optimizer.warmup_epochs=3 >= run.num_epochs=2; warming up "
      "for 1 epoch(s) instead so the learning rate reaches its peak"]
  assert records[0]["learning_rate"] == pytest.approx(3e-3, rel=1e-6)
  config.optimizer.warmup_epochs = 1
  assert config_lib.warmup_epochs(config) == (1, None)


def test_config_sections_validate_and_diff():
  c = tiny_config()
  config_lib.validate(c)
  assert set(c) == set(config_lib.SECTIONS)
  assert c.stripping.tau is None  # unset: the exact rule
  import synstrip_jax  # pylint: disable=import-outside-toplevel
  assert c.stripping.factor == synstrip_jax.DEFAULT_STRIPPING_FACTOR
  for field, value, message in [
      ("stripping.tau", float("nan"), "config.stripping.tau=nan"),
      ("run.num_epochs", 0, "config.run.num_epochs=0 must be an int >= 1"),
      ("model.dropout", 1.5, "config.model: ViT.dropout must be in"),
      ("model.activation", "tanhh", "unknown activation 'tanhh'")]:
    bad = tiny_config({field: value}, model="vit")
    with pytest.raises(ValueError, match=re.escape(message)):
      config_lib.validate(bad)
  old = json.loads(tiny_config().to_json())
  new = json.loads(tiny_config({"run.seed": 3, "run.progress_bar": True,
                                "stripping.tau": 0.1}).to_json())
  assert config_lib.config_diff(old, new) == {"run.seed": (0, 3),
                                              "stripping.tau": (None, 0.1)}
  mlp = base_config("mlp").model
  assert mlp.name == "mlp" and "width" in mlp and "patch_size" not in mlp


def test_docs_stripping_table_matches_the_default_config():
  """docs/training.md's stripping table shows what the no-argument run uses."""
  spec = importlib.util.spec_from_file_location(
      "default_config", REPO / "experiments" / "configs" / "default.py")
  default = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(default)
  c = default.get_config()
  text = (REPO / "docs" / "training.md").read_text()
  rows = re.findall(r"^\| `stripping\.(\w+)` \| (.*?) \|", text, re.M)
  assert {name for name, _ in rows} == set(c.stripping)
  for name, shown in rows:
    value = c.stripping[name]
    expected = "unset" if value is None else f"`{value}`"
    assert shown == expected, (name, shown, expected)


@pytest.mark.parametrize("overrides", [
    {}, pytest.param({"run.steps_per_dispatch": 4}, marks=pytest.mark.slow),
    pytest.param({"run.steps_per_dispatch": 4, "data.on_device": "yes"},
                 marks=pytest.mark.slow)])
def test_prepare_leaves_nothing_to_compile(tmp_path, overrides):
  """After prepare, an epoch's train steps (one per dispatch, or chunks of
  4 and the remainder, on host or resident data), the end-of-epoch
  finite-state check (compiled with the steps) and the eager strip event
  (compiled at start-up) compile nothing."""
  run, state = startup.prepare(tiny_config(overrides), tmp_path,
                               log=lambda m: None)
  assert (run.train_steps is None) == (not overrides)
  order = loop.epoch_order(run, 0)
  bounds = chunk_bounds(0, 0, run.steps_per_epoch,
                        run.config.run.steps_per_dispatch, 0)
  assert len({b1 - b0 for b0, b1 in bounds}) == (2 if overrides else 1)
  masks = get_masks(state.opt_state)
  dead = jax.tree.map(lambda m: np.arange(m.shape[-1]) % 2 == 0, masks)
  compiled = []

  def listen(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    for b0, b1 in bounds:
      state = loop.run_steps(run, state, order[b0:b1])
    assert finite.nonfinite_leaves(state) == []
    params, opt_state = run.strip(state.params, state.opt_state, dead)
    jax.block_until_ready((params, opt_state))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiled == []
  assert not all(bool(np.asarray(m).all())
                 for m in jax.tree.leaves(get_masks(opt_state)))
