"""Fault injection: what a run survives, and what it refuses.

One tiny trained run (2 epochs, checkpoints at steps 9 and 18) is shared by
the module; each case copies its workdir and damages the copy: random bytes
in each kind of checkpoint file, truncation of each output file, two runs on
one workdir, a kill -9 during a save, a swapped dataset, a read-only
directory, degenerate data. See docs/training.md, "What is guaranteed".
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from _shared import assert_bitwise_equal, finish, start_python
from test_train_vit import (SCRIPT, _write_npz, overrides_argv, script_env,
                            strip_times, tiny_config)

from synstrip_vit import (checkpointing, evaluation, integrity, loop, resume,
                          rundata, startup, steps, writers)
from synstrip_vit import workdir as workdir_lib

#: The checkpoints of the shared run (test_train_vit's tiny config, whose
#: programs other modules compile too): one per epoch of 9 steps.
FIRST, LAST = 9, 18
QUIET = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """``(config, workdir, records, {step: state}, target)`` of a finished run."""
  config = tiny_config()
  workdir = tmp_path_factory.mktemp("trained") / "wd"
  records = loop.train_and_evaluate(config, workdir, **QUIET)
  run_data = rundata.RunData(config)
  _, _, target, _ = startup.build_state(config, run_data, steps.make_mesh())
  manager = checkpointing.make_manager(workdir)
  states = {s: manager.restore(s, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(checkpointing.abstract(target))))
            ["state"] for s in manager.all_steps()}
  manager.close()
  assert sorted(states) == [FIRST, LAST]
  return config, workdir, records, states, target


def copy_run(trained, tmp_path) -> Path:
  dst = tmp_path / "wd"
  shutil.copytree(trained[1], dst)
  return dst


def flip_bytes(path: Path, rng: np.random.Generator) -> None:
  """Overwrite 1 to 64 random bytes of ``path`` with different values."""
  data = bytearray(path.read_bytes())
  for _ in range(int(rng.integers(1, 65))):
    i = int(rng.integers(len(data)))
    data[i] = (data[i] + int(rng.integers(1, 256))) % 256
  path.write_bytes(bytes(data))


def restore(workdir: Path, target, **kw):
  manager = checkpointing.make_manager(workdir)
  try:
    return checkpointing.restore_latest(manager, target, **kw)
  finally:
    manager.close()


KINDS = {
    "checkpoint_metadata": "_CHECKPOINT_METADATA",
    "item_metadata": "state/_METADATA",
    "sharding": "state/_sharding",
    "ocdbt_manifest": "state/manifest.ocdbt",
    "array_data": "state/ocdbt.process_0/d/*",
    "array_metadatas": "state/array_metadatas/process_0",
    "run_meta": integrity.META_FILE,
    "integrity_manifest": integrity.MANIFEST_FILE,
}


# ------------------------------------------------ 1. checkpoint corruption

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_random_bytes_in_each_checkpoint_file_fall_back(trained, tmp_path,
                                                        kind):
  """Random bytes in any file of the newest checkpoint: the previous one is
  restored, exactly, with one warning line naming both."""
  _, _, _, states, target = trained
  workdir = copy_run(trained, tmp_path)
  rng = np.random.default_rng(sorted(KINDS).index(kind))
  files = sorted((workdir / "checkpoints" / str(LAST)).glob(KINDS[kind]))
  assert files, kind
  flip_bytes(files[int(rng.integers(len(files)))], rng)
  warnings = []
  step, state = restore(workdir, target, warn=warnings.append,
                        quarantine_dir=workdir / "unreadable_checkpoints")
  assert step == FIRST
  assert_bitwise_equal(jax.device_get(states[FIRST]), jax.device_get(state))
  assert len(warnings) == 1 and f"checkpoint {LAST}" in warnings[0] \
      and f"checkpoint {FIRST}" in warnings[0], warnings
  assert (workdir / "unreadable_checkpoints" / str(LAST)).is_dir()


@pytest.mark.slow
def test_random_corruption_trials_never_restore_wrong_state(trained,
                                                            tmp_path):
  """12 trials of random bytes in a random file of the newest checkpoint:
  never a silently wrong state (the issue saw 24 of 40)."""
  _, _, _, states, target = trained
  rng = np.random.default_rng(11)
  pristine = copy_run(trained, tmp_path)
  step_dir = pristine / "checkpoints" / str(LAST)
  files = sorted(p for p in step_dir.rglob("*") if p.is_file())
  for trial in range(12):
    path = files[int(rng.integers(len(files)))]
    saved = path.read_bytes()
    flip_bytes(path, rng)
    step, state = restore(pristine, target, warn=lambda _: None)
    path.write_bytes(saved)
    assert step == FIRST, (trial, path)
    assert_bitwise_equal(jax.device_get(states[FIRST]), jax.device_get(state))


@pytest.mark.slow
def test_corrupt_latest_then_resume_end_to_end(trained, tmp_path):
  """Resume after corrupting the newest checkpoint: falls back, redoes the
  epoch, and ends bit-identical to the uninterrupted run."""
  config, _, records, states, _ = trained
  workdir = copy_run(trained, tmp_path)
  data = sorted((workdir / "checkpoints" / str(LAST)).glob(KINDS["array_data"]))
  flip_bytes(max(data, key=lambda p: p.stat().st_size),
             np.random.default_rng(3))
  lines = []
  out = loop.train_and_evaluate(config, workdir, log=lines.append)
  assert strip_times(out) == strip_times(records)
  assert any(l.startswith("warning:") and f"checkpoint {LAST}" in l
             and f"resuming from checkpoint {FIRST}" in l for l in lines), lines
  state, _, _ = evaluation.final_state(config, workdir)
  assert_bitwise_equal(jax.device_get(states[LAST].params),
                       jax.device_get(state.params))


def test_all_checkpoints_corrupt_clear_error_nothing_overwritten(trained,
                                                                 tmp_path):
  config, _, _, _, _ = trained
  workdir = copy_run(trained, tmp_path)
  rng = np.random.default_rng(5)
  for step in (str(FIRST), str(LAST)):
    data = sorted((workdir / "checkpoints" / step).glob(KINDS["array_data"]))
    flip_bytes(max(data, key=lambda p: p.stat().st_size), rng)
  before = {p: p.read_bytes() for p in workdir.glob("*.json*")}
  with pytest.raises(checkpointing.CheckpointError,
                     match=(f"could be restored.*checkpoint {LAST}.*"
                            f"checkpoint {FIRST}")):
    loop.train_and_evaluate(config, workdir, **QUIET)
  assert {p: p.read_bytes() for p in workdir.glob("*.json*")} == before
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == \
      [FIRST, LAST]


def test_nonfinite_checkpoint_is_not_good(trained, tmp_path):
  """A checkpoint whose (manifest-consistent) state holds NaN is skipped;
  a NaN state is never saved."""
  _, _, _, states, target = trained
  workdir = copy_run(trained, tmp_path)
  bad = jax.tree.map(lambda x: x, states[LAST])
  leaf = jax.tree.leaves(bad.params)[0]
  bad = bad.replace(params=jax.tree.map(
      lambda x: x * np.float32("nan") if x is leaf else x, bad.params))
  manager = checkpointing.make_manager(workdir, max_to_keep=3)
  with pytest.raises(FloatingPointError, match="not finite.*not saved"):
    checkpointing.save(manager, LAST + 1, bad)
  manager.save(LAST + 1, args=ocp.args.Composite(
      state=ocp.args.StandardSave(bad)), force=True)  # bypass the check
  manager.wait_until_finished()
  manager.close()
  integrity.write_manifest(workdir / "checkpoints" / str(LAST + 1))
  warnings = []
  step, _ = restore(workdir, target, warn=warnings.append)
  assert step == LAST
  assert "FloatingPointError" in warnings[0]
  assert f"checkpoint {LAST + 1}" in warnings[0]


# ------------------------------------------- 3, 5. truncated output files

@pytest.mark.parametrize("seed", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_truncated_metrics_is_rebuilt_from_checkpoint(trained, tmp_path,
                                                      seed):
  """metrics.jsonl cut at a random offset (or garbled) and a plot cut: a
  rerun restores every epoch from the checkpoint, with a warning, never
  shorter, and rewrites the plot."""
  config, _, records, _, _ = trained
  workdir = copy_run(trained, tmp_path)
  path = workdir / writers.METRICS_FILE
  raw = path.read_bytes()
  rng = np.random.default_rng(seed)
  cut = int(rng.integers(0, len(raw)))
  path.write_bytes(raw[:cut] if seed != 2 else raw[:cut] + b"\x00garbage\n")
  png = workdir / "accuracy.png"
  png.write_bytes(png.read_bytes()[:int(rng.integers(1, 100))])
  lines = []
  out = loop.train_and_evaluate(config, workdir, log=lines.append)
  assert path.read_bytes() == raw
  assert strip_times(out) == strip_times(records)
  assert any("rewritten from the checkpoint" in l for l in lines), lines
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_truncated_metrics_of_killed_run_keeps_every_epoch(trained, tmp_path):
  """A run stopped after epoch 1 with its last line cut: the resumed run
  has epoch 0 again (the issue's permanent gap)."""
  config, _, records, _, _ = trained
  workdir = copy_run(trained, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / str(LAST))
  path = workdir / writers.METRICS_FILE
  first = path.read_bytes().split(b"\n")[0]
  path.write_bytes(first[:len(first) // 2])
  out = loop.train_and_evaluate(config, workdir, **QUIET)
  assert [r["epoch"] for r in writers.read_jsonl(path)] == [0, 1]
  assert strip_times(out) == strip_times(records)


@pytest.mark.parametrize("name, cut", [
    ("config.json", "empty"),
    pytest.param("run.json", "half", marks=pytest.mark.slow)])
def test_truncated_run_files_are_rewritten(trained, tmp_path, name, cut):
  config, _, _, _, _ = trained
  workdir = copy_run(trained, tmp_path)
  path = workdir / name
  raw = path.read_bytes()
  path.write_bytes(b"" if cut == "empty" else raw[:len(raw) // 2])
  lines = []
  loop.train_and_evaluate(config, workdir, log=lines.append)
  assert path.read_bytes() == raw
  assert any(l.startswith("warning:") and name in l for l in lines), lines


@pytest.mark.slow
def test_unreadable_config_without_identity_is_one_line_error(trained,
                                                              tmp_path):
  """Nothing left to check the config against: refused, clearly."""
  config, _, _, _, _ = trained
  workdir = copy_run(trained, tmp_path)
  (workdir / "config.json").write_text("")
  (workdir / "run.json").unlink()
  for step in (str(FIRST), str(LAST)):
    (workdir / "checkpoints" / step / integrity.META_FILE).unlink()
    (workdir / "checkpoints" / step / integrity.MANIFEST_FILE).unlink()
  with pytest.raises(resume.RunError, match="config.json is missing or "
                     "unreadable"):
    loop.train_and_evaluate(config, workdir, **QUIET)


def test_atomic_write_leaves_old_or_new(tmp_path, monkeypatch):
  """A write that fails midway leaves the old file and no temporary."""
  path = tmp_path / "f.json"
  workdir_lib.atomic_write_text(path, "old")

  def boom(fd):
    raise OSError("disk full")
  monkeypatch.setattr(os, "fsync", boom)
  with pytest.raises(OSError, match="disk full"):
    workdir_lib.atomic_write_text(path, "new")
  assert path.read_text() == "old"
  assert sorted(os.listdir(tmp_path)) == ["f.json"]


# ------------------------------------------------------ 4. data identity

def test_swapped_dataset_is_refused(trained, tmp_path, monkeypatch):
  """Other data under the same name between a kill and a resume (one pixel
  differs): refused with a one-line error; nothing is written."""
  config, _, _, _, _ = trained
  workdir = copy_run(trained, tmp_path)
  from synstrip_vit import datasets  # pylint: disable=import-outside-toplevel
  real = datasets.load_digits

  def swapped():
    ds = real()
    x = ds.x_train.copy()
    x[0, 0, 0, 0] ^= 1
    return dataclasses.replace(ds, x_train=x)
  monkeypatch.setattr(datasets, "load_digits", swapped)
  before = {p.name: p.read_bytes() for p in workdir.glob("*.json*")}
  with pytest.raises(resume.RunError, match="other data"):
    loop.train_and_evaluate(config, workdir, **QUIET)
  (workdir / "run.json").unlink()  # the checkpoint records it too
  with pytest.raises(resume.RunError, match=f"checkpoint {LAST} .* other data"):
    loop.train_and_evaluate(config, workdir, **QUIET)
  after = {p.name: p.read_bytes() for p in workdir.glob("*.json*")}
  assert after == {k: v for k, v in before.items() if k != "run.json"}


def test_hand_edited_config_is_refused(trained, tmp_path):
  """config.json edited to match another config: run.json's fingerprint
  still refuses it."""
  config, _, _, _, _ = trained
  workdir = copy_run(trained, tmp_path)
  other = tiny_config({"run.seed": 7})
  (workdir / "config.json").write_text(other.to_json())
  with pytest.raises(resume.RunError, match="other config"):
    loop.train_and_evaluate(other, workdir, **QUIET)


def test_data_fingerprint_is_cheap_and_sensitive():
  x = np.zeros((10000, 32, 32, 3), np.uint8)  # 30 MB
  t = time.perf_counter()
  a = workdir_lib.data_fingerprint({"x": x})
  assert time.perf_counter() - t < 2.0
  x[5, 1, 2, 0] = 1
  assert workdir_lib.data_fingerprint({"x": x}) != a
  assert workdir_lib.data_fingerprint({"x": x.reshape(20000, 16, 32, 3)}) \
      != workdir_lib.data_fingerprint({"x": x})


# ------------------------------------------------------------ 2. the lock

@pytest.mark.slow
def test_second_run_on_a_held_workdir_exits_at_once(tmp_path):
  """The lock of a live holder: one-line error naming its pid and host;
  after the holder dies its lock is taken over with a notice."""
  workdir = tmp_path / "wd"
  holder = start_python(["-c", (
      "import sys, time; from synstrip_vit import workdir as w\n"
      f"with w.exclusive({str(workdir)!r}):\n"
      "  print('locked', flush=True); time.sleep(120)")])
  try:
    assert holder.stdout.readline().strip() == "locked"
    t = time.perf_counter()
    proc = start_python([SCRIPT, f"--workdir={workdir}", *overrides_argv()],
                        env=script_env())
    _, stderr = finish(proc, 120, "second run")
    lines = stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("error: "), stderr
    assert f"pid {holder.pid}" in lines[-1] and "in use" in lines[-1]
    assert "Traceback" not in stderr
    assert time.perf_counter() - t < 60
    assert not (workdir / "checkpoints").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  notices = []
  with workdir_lib.exclusive(workdir, log=notices.append):
    pass
  assert len(notices) == 1 and f"pid {holder.pid}" in notices[0]


def test_lock_in_process_and_refused_workdir_leaves_no_trace(tmp_path):
  workdir = tmp_path / "wd"
  with workdir_lib.exclusive(workdir):
    with pytest.raises(workdir_lib.WorkdirError, match=f"pid {os.getpid()}"):
      with workdir_lib.exclusive(workdir):
        pass
  with pytest.raises(ValueError):
    with workdir_lib.exclusive(tmp_path / "fresh"):
      raise ValueError("bad data")
  assert not (tmp_path / "fresh").exists()


@pytest.mark.slow
def test_two_concurrent_resumes_one_wins(trained, tmp_path):
  """Two resumes started together: one finishes, the other is refused; the
  metrics hold each epoch once."""
  workdir = copy_run(trained, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / str(LAST))
  procs = [start_python([SCRIPT, f"--workdir={workdir}",
                         *overrides_argv()], env=script_env())
           for _ in range(2)]
  outs = [finish(p, 300, "concurrent run") for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 1], outs
  assert [r["epoch"] for r in writers.read_jsonl(
      workdir / "metrics.jsonl")] == [0, 1]


# ------------------------------------------------ kill -9 during a save

@pytest.mark.slow
def test_kill_during_save_then_resume(tmp_path, trained):
  """kill -9 while checkpoints are written (every step): the rerun ends
  with the uninterrupted run's metrics and params."""
  config, _, records, states, _ = trained
  workdir = tmp_path / "wd"
  extra = {"run.checkpoint_every_steps": 1}
  for delay in (0.0, 0.05):
    proc = start_python([SCRIPT, f"--workdir={workdir}",
                         *overrides_argv(extra)], env=script_env(),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    ckpts = workdir / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
      if ckpts.exists() and any("tmp" in p.name for p in ckpts.iterdir()):
        time.sleep(delay)
        break
      time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  proc = start_python([SCRIPT, f"--workdir={workdir}",
                       *overrides_argv(extra)], env=script_env())
  _, stderr = finish(proc, 300, "resume")
  assert proc.returncode == 0, stderr[-3000:]
  ref = tiny_config(extra)
  state, _, _ = evaluation.final_state(ref, workdir)
  assert_bitwise_equal(jax.device_get(states[LAST].params),
                       jax.device_get(state.params))
  assert strip_times(writers.read_jsonl(workdir / "metrics.jsonl")) == \
      strip_times(records)
  del config


# ------------------------------------------------ 9. read-only directories

@pytest.mark.parametrize("which", [
    "workdir", pytest.param("parent", marks=pytest.mark.slow)])
def test_read_only_workdir_is_one_line_error(tmp_path, which):
  """A workdir (or its parent) that cannot be written: a one-line error.
  As root (which ignores file modes) sysfs stands in for a read-only
  directory."""
  if os.geteuid() == 0:
    workdir = Path("/sys/kernel" if which == "workdir" else "/sys/synstrip_wd")
  else:
    workdir = tmp_path / "ro" / "wd"
    workdir.mkdir(parents=True)
    os.chmod(workdir if which == "workdir" else workdir.parent, 0o555)
  try:
    proc = start_python([SCRIPT, f"--workdir={workdir}", *overrides_argv()],
                        env=script_env())
    _, stderr = finish(proc, 120, "read-only run")
  finally:
    if os.geteuid() != 0:
      os.chmod(tmp_path / "ro", 0o755)
      os.chmod(tmp_path / "ro" / "wd", 0o755)
  lines = stderr.strip().splitlines()
  assert proc.returncode == 1, stderr[-3000:]
  assert lines[-1].startswith("error: cannot write to workdir"), stderr
  assert "Traceback" not in stderr


# -------------------------------------------------- 8. degenerate data

def _constant_alpha():
  x = np.random.default_rng(1).integers(0, 256, (64, 8, 8, 2), np.uint8)
  x[..., 1] = 255
  return {"x_train": x}


@pytest.mark.parametrize("changes, expected", [
    (_constant_alpha(), "channel 1 of the training images is constant "
                        r"\(value 255"),
    ({"x_test": np.zeros((0, 8, 8, 2), np.uint8),
      "y_test": np.zeros((0,), np.int32)}, "no test images"),
    ({"x_train": np.zeros((64, 0, 8, 2), np.uint8),
      "x_test": np.zeros((32, 0, 8, 2), np.uint8)},
     r"height, width and channels >= 1, got shape \(64, 0, 8, 2\)"),
])
def test_degenerate_data_refused_before_training(tmp_path, changes,
                                                 expected):
  _write_npz(tmp_path / "d.npz", channels=2, **changes)
  config = tiny_config({"data.dataset": f"npz:{tmp_path / 'd.npz'}",
                        "data.train_limit": 0, "data.test_limit": 0})
  with pytest.raises(ValueError, match=expected):
    loop.train_and_evaluate(config, tmp_path / "wd", **QUIET)
  assert not (tmp_path / "wd").exists()


# ------------------------------------------------ 9. one-line errors

@pytest.mark.parametrize("case", [
    "missing_config", pytest.param("text_npz", marks=pytest.mark.slow),
    pytest.param("tfds_unprepared", marks=pytest.mark.slow)])
def test_one_line_errors(tmp_path, case):
  args = [f"--workdir={tmp_path / 'wd'}"]
  if case == "missing_config":
    args.append(f"--config={tmp_path / 'nope.py'}")
    expected = "does not exist"
  elif case == "text_npz":
    (tmp_path / "t.npz").write_text("just text\n")
    args.append(f"--config.data.dataset=npz:{tmp_path / 't.npz'}")
    expected = "is not an .npz archive"
  else:
    args += ["--config.data.dataset=cifar10"]
    expected = "is not prepared"
  env = script_env()
  env["TFDS_DATA_DIR"] = str(tmp_path / "tfds")
  env["HOME"] = str(tmp_path)
  proc = start_python([SCRIPT, *args], env=env)
  _, stderr = finish(proc, 120, case)
  lines = [l for l in stderr.strip().splitlines()
           if l.strip() and not l.startswith(("WARNING", "W"))]
  assert proc.returncode != 0
  assert lines and lines[-1].startswith("error:"), stderr[-3000:]
  assert expected in lines[-1], lines[-1]
  assert "Traceback" not in stderr


def test_text_file_as_npz_is_named(tmp_path):
  (tmp_path / "t.npz").write_text("just text\n")
  config = tiny_config({"data.dataset": f"npz:{tmp_path / 't.npz'}"})
  with pytest.raises(ValueError, match="is not an .npz archive.*just text"):
    loop.train_and_evaluate(config, tmp_path / "wd", **QUIET)


def test_tfds_default_data_dir_unprepared_is_data_not_found(tmp_path,
                                                            monkeypatch):
  """The ``splits is empty`` KeyError of TFDS becomes DataNotFoundError."""
  pytest.importorskip("tensorflow_datasets")
  from synstrip_vit import datasets  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  monkeypatch.setenv("HOME", str(tmp_path))
  with pytest.raises(datasets.DataNotFoundError, match="not prepared"):
    datasets.load_dataset("cifar10")


def test_json_of_expected_errors():
  """read_json never raises on damaged files."""
  with tempfile.TemporaryDirectory() as d:
    p = Path(d) / "c.json"
    assert workdir_lib.read_json(p) == ("missing", None)
    p.write_bytes(b"")
    assert workdir_lib.read_json(p)[0] == "unreadable"
    p.write_bytes(b"\xff\xfe{")
    assert workdir_lib.read_json(p)[0] == "unreadable"
    p.write_text(json.dumps({"a": 1}))
    assert workdir_lib.read_json(p) == ("ok", {"a": 1})
