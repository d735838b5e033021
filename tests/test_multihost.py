"""experiments/train_vit.py as 2 JAX processes on localhost (CPU, gloo).

Two processes with 2 fake CPU devices each (coordinator on 127.0.0.1) against
one process with 4: the same dead neurons and masks at every epoch, the
same final parameters up to float reassociation (the cross-process gradient
all-reduce sums in another order than the in-process one: measured, the
losses agree to ~1e-7 relative, not bit for bit), and checkpoints written by
8 (1) devices that restore onto 1 (8) devices and train on alike. Every
process is started with a deadline and killed if a peer fails.

Several JAX processes per test: the whole module runs under ``-m slow``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from _shared import REPO, start_python

from synstrip_vit import evaluation, writers
from synstrip_vit.config import base_config
from synstrip_jax.transform import get_masks

pytestmark = pytest.mark.slow

SCRIPT = REPO / "experiments" / "train_vit.py"
TIMEOUT = 240

# A small MLP at a high learning rate: neurons die, stripping happens.
# The model section is the MLP's: ``default.py:mlp`` on the command line.
CONFIG_FILE = f"{REPO / 'experiments' / 'configs' / 'default.py'}:mlp"
CONFIG = {
    "data.dataset": "digits", "data.train_limit": 320, "data.test_limit": 96,
    "run.batch_size": 32, "run.eval_batch_size": 64, "model.width": 32,
    "model.depth": 4, "data.augment": False, "data.crop_padding": 1,
    "data.flip": False, "optimizer.learning_rate": 0.03,
    "optimizer.warmup_epochs": 0, "run.num_epochs": 3,
    "run.progress_bar": False,
}
NUM_EPOCHS = CONFIG["run.num_epochs"]


def config(**kw):
  """The runs' config (as ``CONFIG_FILE`` + ``CONFIG``); ``kw``: dotted."""
  c = base_config("mlp")
  c.update_from_flattened_dict({**CONFIG, **kw})
  return c


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def argv(workdir, **kw):
  values = {**CONFIG, **kw}
  return [SCRIPT, f"--workdir={workdir}",
          f"--config={CONFIG_FILE}",
          *[f"--config.{k}={v}" for k, v in values.items()]]


def run_group(cmds_devices, timeout=TIMEOUT):
  """Start ``(args, device count)`` processes; kill all if one fails or the
  deadline passes.

  Returns ``(returncodes, outputs)``.
  """
  procs = [start_python(c, d, stderr=subprocess.STDOUT)
           for c, d in cmds_devices]
  deadline = time.time() + timeout
  try:
    while time.time() < deadline:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes):
        break
      if any(c not in (None, 0) for c in codes):
        time.sleep(2)  # let the others report, then stop them
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    outs = [p.communicate(timeout=30)[0] for p in procs]
  return [p.returncode for p in procs], outs


def two_process_cmds(workdir, devices_each=2, timeout_s=30, **kw):
  port = free_port()
  return [(argv(workdir, **kw) + [
      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
      f"--process_id={i}", f"--distributed_timeout={timeout_s}"],
           devices_each) for i in range(2)]


def final(workdir, **kw):
  state, _, _ = evaluation.final_state(config(**kw), workdir)
  return jax.device_get(state.params), jax.device_get(get_masks(
      state.opt_state)), int(state.step)


def timeless(records):
  return [{k: v for k, v in r.items() if not k.endswith("_time_s")}
          for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mh")
  codes, outs = run_group(two_process_cmds(root / "two"))
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
  codes, outs = run_group([(argv(root / "one"), 4)])
  assert codes == [0], outs[0][-3000:]
  return root


def test_two_processes_match_one_process(runs):
  two = timeless(writers.read_jsonl(runs / "two" / "metrics.jsonl"))
  one = timeless(writers.read_jsonl(runs / "one" / "metrics.jsonl"))
  assert len(two) == len(one) == NUM_EPOCHS
  assert any(r["dead_neurons"] > 0 for r in one), "no dead neuron: weak test"
  assert one[-1]["stripped_weights"] > 0
  for a, b in zip(one, two):
    exact = {k: v for k, v in a.items() if k.startswith(("dead", "active",
                                                         "stripped", "sparsity"))}
    assert exact == {k: b[k] for k in exact}
    for k in ("train_loss", "test_loss", "probe_loss"):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5)
  p1, m1, _ = final(runs / "one")
  p2, m2, _ = final(runs / "two")
  for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_only_process_zero_writes_logs(runs):
  out = (runs / "two" / "metrics.jsonl").read_text().splitlines()
  assert len(out) == NUM_EPOCHS  # not written twice


@pytest.mark.parametrize("written, restored", [
    (8, 1), pytest.param(1, 8, marks=pytest.mark.slow)])
def test_restore_on_another_device_count(tmp_path, written, restored):
  """A run on ``written`` devices; its last checkpoint is dropped and the run
  resumes from the previous one (end of epoch 2) on ``restored`` devices. It
  restores, redoes epoch 3 and matches the run that never moved: the same
  history, dead neurons and masks; params to float tolerance (different
  device counts reduce the gradient in a different order)."""
  ref = tmp_path / "ref"
  codes, outs = run_group([(argv(ref), written)])
  assert codes == [0], outs[0][-3000:]
  moved = tmp_path / "moved"
  shutil.copytree(ref, moved)
  ckpts = sorted((moved / "checkpoints").iterdir(), key=lambda p: int(p.name))
  assert len(ckpts) == 2
  shutil.rmtree(ckpts[-1])
  codes, outs = run_group([(argv(moved), restored)])
  assert codes == [0], outs[0][-3000:]
  assert f"resuming from checkpoint {ckpts[0].name}" in outs[0]
  a = timeless(writers.read_jsonl(moved / "metrics.jsonl"))
  b = timeless(writers.read_jsonl(ref / "metrics.jsonl"))
  assert len(a) == len(b) == NUM_EPOCHS
  assert a[:2] == b[:2]
  for key in ("dead_neurons", "stripped_weights", "active_params"):
    assert a[2][key] == b[2][key], key
  np.testing.assert_allclose(a[2]["train_loss"], b[2]["train_loss"], rtol=1e-5)
  pa, ma, _ = final(moved)
  pb, mb, _ = final(ref)
  for u, v in zip(jax.tree.leaves(ma), jax.tree.leaves(mb)):
    np.testing.assert_array_equal(u, v)
  for u, v in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_failing_process_stops_the_other(tmp_path):
  """Process 1 is killed right after start-up: process 0 must end by itself
  (JAX's heartbeat timeout, here 10 s), not hang."""
  (c0, d0), (c1, d1) = two_process_cmds(tmp_path / "wd", timeout_s=10,
                                        **{"run.num_epochs": 50})
  p0 = start_python(c0, d0, stderr=subprocess.STDOUT)
  p1 = start_python(c1, d1, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
  try:
    # Wait until training has started (process 0 wrote its config).
    deadline = time.time() + 120
    while not (tmp_path / "wd" / "config.json").exists():
      assert time.time() < deadline and p0.poll() is None
      time.sleep(0.1)
    time.sleep(2)
    p1.kill()
    p1.wait(timeout=30)
    t0 = time.time()
    p0.wait(timeout=120)
    elapsed = time.time() - t0
  finally:
    for p in (p0, p1):
      if p.poll() is None:
        p.kill()
  assert p0.returncode != 0
  assert elapsed < 120
