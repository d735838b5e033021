"""Helpers shared by the tests: shared data, bit-exact trees, subprocesses.

* :func:`shared_file_or_skip`, :func:`load_fixtures`: files of the shared
  folder (:func:`synstrip_vit.paths.shared_dir`), or skip the calling test.
* :func:`bits`, :func:`assert_bitwise_equal`, :func:`bitwise_equal`:
  the one bit-for-bit comparison of arrays and pytrees.
* :func:`subprocess_env`, :func:`start_python`, :func:`run_python`,
  :func:`json_verdict`: the one harness for child processes (fake CPU devices,
  multi-process runs, workers that print a JSON line of results).
"""

from __future__ import annotations

import json
import os
import tempfile
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import pytest

from synstrip_vit import paths

REPO = Path(__file__).resolve().parents[1]
#: JAX's persistent compilation cache of the end-to-end tests and of the
#: processes they start (``$SYNSTRIP_TEST_CACHE`` or
#: ``<tmp>/synstrip_test_jax_cache``), so the many tiny runs compile once and
#: nothing is written to the user's cache.
CACHE_DIR = Path(os.environ.get(
    "SYNSTRIP_TEST_CACHE",
    Path(tempfile.gettempdir()) / "synstrip_test_jax_cache"))


# ------------------------------------------------------------ shared data

def shared_file_or_skip(*parts: str) -> Path:
  """``shared_dir() / parts``, or skip the calling test when it is missing."""
  try:
    return paths.shared_file(*parts)
  except paths.SharedDataNotFoundError as e:
    pytest.skip(str(e))


def load_fixtures() -> dict[str, np.ndarray]:
  """The original implementation's outputs, or skip the calling test."""
  try:
    path = paths.shared_file("fixtures", "stripping_reference.npz")
  except paths.SharedDataNotFoundError as e:
    pytest.skip(f"{e}: equivalence with the original is not checked in this "
                "run")
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


# ----------------------------------------------------- bit-exact comparison

def bits(x: Any) -> np.ndarray:
  """Bit pattern of an array (so that -0.0 != 0.0 and NaN == NaN).

  Booleans are returned as they are; every other dtype is viewed as the
  unsigned integer of its width.
  """
  x = np.asarray(x)
  if x.dtype == np.bool_:
    return x
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32,
                 8: np.uint64}[x.dtype.itemsize])


def bitwise_differences(a: Any, b: Any) -> list[str]:
  """Where pytrees ``a`` and ``b`` differ: structure, dtype, shape or bits.

  Returns:
    One line per difference (empty when the trees are equal bit for bit).
  """
  fa = jax.tree_util.tree_leaves_with_path(a)
  fb = jax.tree_util.tree_leaves_with_path(b)
  if (jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b)
      or [p for p, _ in fa] != [p for p, _ in fb]):
    return [f"tree structures differ:\n{jax.tree_util.tree_structure(a)}\n"
            f"{jax.tree_util.tree_structure(b)}"]
  out = []
  for (path, x), (_, y) in zip(fa, fb):
    x, y = np.asarray(x), np.asarray(y)
    where = jax.tree_util.keystr(path) or "(leaf)"
    if x.dtype != y.dtype or x.shape != y.shape:
      out.append(f"{where}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
    elif not np.array_equal(bits(x), bits(y)):
      at = np.argwhere(bits(x) != bits(y))[:5].tolist()
      out.append(f"{where}: differ at {at}\n{x}\nvs\n{y}")
  return out


def bitwise_equal(a: Any, b: Any) -> bool:
  """Same structure, dtypes and shapes, and every leaf equal bit for bit."""
  return not bitwise_differences(a, b)


def assert_bitwise_equal(a: Any, b: Any, msg: str = "") -> None:
  """Asserts :func:`bitwise_equal`; the message lists the differences.

  Arrays are pytrees of one leaf, so this compares single arrays too.
  """
  diffs = bitwise_differences(a, b)
  if diffs:
    raise AssertionError(f"{msg}: " + "\n".join(diffs) if msg
                         else "\n".join(diffs))


# ------------------------------------------------------- child processes

def subprocess_env(num_devices: int | None = None, **extra: str) -> dict:
  """Environment for a child Python process running this checkout on CPU.

  The repository is prepended to ``PYTHONPATH``; ``num_devices`` fake CPU
  devices via ``XLA_FLAGS`` (``None``: the variable is removed, so the child
  sees one device); JAX's persistent compilation cache is
  :data:`CACHE_DIR` unless ``JAX_COMPILATION_CACHE_DIR`` is set (so
  ``experiments/train_vit.py`` never writes to ``~/.cache``); ``extra``
  variables are added.
  """
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  # The training script caches compiled programs; never in the user's cache.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE_DIR))
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + ([os.environ["PYTHONPATH"]]
                     if os.environ.get("PYTHONPATH") else []))
  if num_devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env.update(extra)
  return env


def start_python(args: Sequence[str], num_devices: int | None = None,
                 **popen_kwargs: Any) -> subprocess.Popen:
  """Starts ``python *args`` in the repository on ``num_devices`` CPU devices.

  Output is captured as text (``stdout``/``stderr`` pipes) unless
  ``popen_kwargs`` say otherwise; ``env`` defaults to
  :func:`subprocess_env` of ``num_devices``.
  """
  kwargs = dict(env=subprocess_env(num_devices), cwd=REPO,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  kwargs.update(popen_kwargs)
  return subprocess.Popen([sys.executable, *map(str, args)], **kwargs)


def finish(proc: subprocess.Popen, timeout: float,
           what: str) -> tuple[str, str]:
  """``(stdout, stderr)`` of ``proc``; on a timeout kills it, fails the test."""
  try:
    return proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    _, stderr = proc.communicate()
    pytest.fail(f"{what} timed out after {timeout} s:\n"
                f"{(stderr or '')[-3000:]}")


def run_python(args: Sequence[str], num_devices: int | None = None, *,
               timeout: float, what: str = "the child process") -> list[str]:
  """Runs ``python *args`` to the end; fails the test unless it exits 0.

  Returns:
    The lines of its stdout.
  """
  proc = start_python(args, num_devices)
  stdout, stderr = finish(proc, timeout, what)
  assert proc.returncode == 0, (
      f"{what} exited {proc.returncode}\nstdout:\n{stdout[-3000:]}\n"
      f"stderr:\n{stderr[-6000:]}")
  return stdout.splitlines()


def json_verdict(proc: subprocess.Popen, timeout: float,
                 what: str = "the worker") -> dict:
  """The JSON object a worker printed as its last stdout line.

  Fails the test (with the worker's stdout and stderr tails) when the worker
  times out or crashed before printing it. The worker's stderr is returned
  under ``"stderr"``.
  """
  stdout, stderr = finish(proc, timeout, what)
  try:
    out = json.loads(stdout.strip().splitlines()[-1])
  except (IndexError, json.JSONDecodeError):
    pytest.fail(f"{what} crashed (exit {proc.returncode}):\n"
                f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-6000:]}")
  out["stderr"] = stderr
  return out
