"""Keeping an accelerator busy: chunks of steps per dispatch, data resident
on the devices, no device-to-host transfer inside an epoch, and resume.

Runs on CPU (the guarantees checked here are XLA:CPU's; see
docs/accelerators.md): the chunked and resident paths give the parameters of
the per-step path bit for bit, and an interrupted chunked run resumes to the
uninterrupted one's parameters.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json

import jax
import numpy as np
import pytest

from _shared import assert_bitwise_equal, bitwise_equal
from test_train_vit import (REPO, Interrupt, final_params, interrupt_after,
                            strip_times, tiny_config)

from synstrip_vit import config as config_lib, loop, rundata, startup, steps
from synstrip_vit import writers


@pytest.mark.parametrize("first, start, stop, per, every, expected", [
    (0, 0, 10, 1, 0, [(b, b + 1) for b in range(10)]),
    (0, 0, 10, 4, 0, [(0, 4), (4, 8), (8, 10)]),
    (0, 5, 10, 4, 0, [(5, 8), (8, 10)]),
    (10, 0, 10, 4, 3, [(0, 2), (2, 4), (4, 5), (5, 8), (8, 10)]),
    (0, 0, 6, 100, 0, [(0, 6)]),
])
def test_chunk_bounds(first, start, stop, per, every, expected):
  """Cuts at multiples of the chunk size (counted from the epoch start) and
  after every checkpoint step; nothing lost, nothing repeated."""
  bounds = steps.chunk_bounds(first, start, stop, per, every)
  assert bounds == expected
  assert [b for b0, b1 in bounds for b in range(b0, b1)] == \
      list(range(start, stop))


@pytest.mark.parametrize("mode, platform, expected", [
    ("auto", "cpu", False), ("auto", "gpu", True), ("auto", "tpu", True),
    ("yes", "cpu", True), ("no", "gpu", False)])
def test_resident_rule(mode, platform, expected):
  c = tiny_config({"data.on_device": mode})
  assert rundata.resident(c, rundata.RunData(c), platform) is expected


class HostRead(Exception):
  """Raised by :func:`no_device_to_host` on a read of an array's values."""


@contextlib.contextmanager
def no_device_to_host(monkeypatch):
  """``transfer_guard_device_to_host('disallow')`` (refuses the transfers
  on GPU/TPU) plus, since XLA:CPU reads device buffers without a transfer
  the guard could refuse, the ways Python reads an array's values
  (``__array__``, ``int``, ``float``, ``bool``, ``item``, ``tolist``,
  ``jax.device_get``) made to raise :class:`HostRead`. NumPy's buffer
  protocol (``np.asarray`` of a CPU array) is not intercepted on CPU; the
  guard refuses it on GPU/TPU."""
  def refuse(*args, **kwargs):
    raise HostRead("device-to-host read inside the epoch")
  with monkeypatch.context() as patch:
    array_type = type(jax.numpy.zeros(()))
    for method in ("__array__", "__int__", "__float__", "__bool__",
                   "__index__", "item", "tolist"):
      patch.setattr(array_type, method, refuse)
    patch.setattr(jax, "device_get", refuse)
    with jax.transfer_guard_device_to_host("disallow"):
      yield


def test_resident_chunks_transfer_nothing_to_the_host(tmp_path, monkeypatch):
  """An epoch's steps, chunked (3 per dispatch) over data resident on the
  device, read nothing back to the host (:func:`no_device_to_host`) and
  give the per-step path's state bit for bit (XLA:CPU)."""
  config = tiny_config({"data.on_device": "yes",
                        "run.steps_per_dispatch": 3})
  run, state = startup.prepare(config, tmp_path, log=lambda _: None)
  assert run.resident is not None and run.train_steps is not None
  order = loop.epoch_order(run, 0)
  bounds = steps.chunk_bounds(0, 0, run.steps_per_epoch, 3, 0)
  reference = jax.device_get(state)
  by_step = steps.replicate(reference, run.mesh)
  for rows in order:
    batch = steps.global_batch((run.data.x_train[rows],
                                run.data.y_train[rows]), run.mesh)
    by_step, _ = run.train_step(by_step, *batch)
  with no_device_to_host(monkeypatch):
    for b0, b1 in bounds:
      state = loop.run_steps(run, state, order[b0:b1])
    jax.block_until_ready(state)
  assert int(state.step) == run.steps_per_epoch
  assert_bitwise_equal(jax.device_get(by_step), jax.device_get(state))
  for read in (lambda: int(state.step), lambda: state.step.item(),
               lambda: jax.device_get(state.params)):
    with pytest.raises(HostRead), no_device_to_host(monkeypatch):
      read()  # the check is live


@pytest.mark.parametrize("field, value, message", [
    ("data.on_device", "maybe", "config.data.on_device='maybe'"),
    ("run.steps_per_dispatch", 0, "config.run.steps_per_dispatch=0"),
    ("eval.corruptions", ("fogg",), "config.eval.corruptions"),
    ("eval.severities", (0,), "config.eval.severities"),
    ("data.mean", ("a",), "config.data.mean"),
])
def test_new_fields_are_checked(field, value, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(tiny_config({field: value}))


@pytest.mark.slow
def test_chunked_resident_resume_is_bit_identical(tmp_path):
  """Interrupted twice (mid-chunk callbacks, mid-epoch checkpoints every 4
  steps) and resumed, a chunked resident run ends as the uninterrupted one,
  which ends as the per-step run."""
  fields = {"run.num_epochs": 2, "run.checkpoint_every_steps": 4}
  chunked = tiny_config({**fields, "data.on_device": "yes",
                         "run.steps_per_dispatch": 3})
  ref = loop.train_and_evaluate(chunked, tmp_path / "ref", log=lambda _: None)
  for n in (5, 6):
    with pytest.raises(Interrupt):
      loop.train_and_evaluate(chunked, tmp_path / "wd",
                              on_step=interrupt_after(n), log=lambda _: None)
  loop.train_and_evaluate(chunked, tmp_path / "wd", log=lambda _: None)
  assert strip_times(writers.read_jsonl(tmp_path / "wd" / "metrics.jsonl")) \
      == strip_times(ref)
  p_ref, _ = final_params(chunked, tmp_path / "ref")
  p_res, position = final_params(chunked, tmp_path / "wd")
  assert position == (2, 0)
  assert_bitwise_equal(p_ref, p_res)
  plain = tiny_config(fields)
  loop.train_and_evaluate(plain, tmp_path / "plain", log=lambda _: None)
  assert bitwise_equal(final_params(plain, tmp_path / "plain")[0], p_ref)


@pytest.mark.slow
def test_accelerator_check_smoke(tmp_path):
  """bench/accelerator_check.py --smoke on CPU: the bench figures, a short
  paper-config run (AutoAugment and stripping on) and the strip parity in
  one summary.json."""
  data = tmp_path / "d.npz"
  rng = np.random.default_rng(0)
  np.savez(data, x_train=rng.integers(0, 256, (64, 32, 32, 3), np.uint8),
           y_train=rng.integers(0, 10, 64).astype(np.int32),
           x_test=rng.integers(0, 256, (32, 32, 32, 3), np.uint8),
           y_test=rng.integers(0, 10, 32).astype(np.int32))
  spec = importlib.util.spec_from_file_location(
      "accelerator_check", REPO / "bench" / "accelerator_check.py")
  check = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(check)
  summary = check.main(["--out", str(tmp_path / "out"), "--smoke",
                        "--data", str(data), "--epochs", "1"])
  written = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert written["strip_parity"]["identical"] is True
  assert written["strip_parity"]["pruned_weights"] > 0
  bench = summary["bench"]
  assert bench["train_gflop_per_image"] > bench["probe_gflop_per_image"] > 0
  assert bench["utilisation"] is None  # CPU: no peak known
  assert bench["projected_h100_total_h"] > 0
  config = written["paper_run"]["config"]
  assert config["data"]["autoaugment"] and config["stripping"]["enabled"]
  assert written["paper_run"]["records"][0]["stripped_now"] is True
