"""Where ../shared (data, reference fixtures) lives, for tests and conftest."""

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
  """``$SYNSTRIP_SHARED`` or ``<repo>/../shared``; None when absent."""
  env = os.environ.get("SYNSTRIP_SHARED")
  path = Path(env) if env else REPO.parent / "shared"
  return path if path.is_dir() else None


def load_fixtures() -> dict[str, np.ndarray]:
  """The original implementation's outputs, or skip the calling test."""
  root = shared_dir()
  path = root / "fixtures" / "stripping_reference.npz" if root else None
  if path is None or not path.exists():
    pytest.skip("reference fixtures not found (../shared/fixtures/"
                "stripping_reference.npz; set SYNSTRIP_SHARED): equivalence "
                "with the original is not checked in this run")
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def subprocess_env(num_devices: int | None = None, **extra: str) -> dict:
  """Environment for a child Python process running this checkout on CPU.

  The repository is prepended to ``PYTHONPATH``; ``num_devices`` fake CPU
  devices via ``XLA_FLAGS`` (``None``: the variable is removed, so the child
  sees one device); ``extra`` variables are added.
  """
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + ([os.environ["PYTHONPATH"]]
                     if os.environ.get("PYTHONPATH") else []))
  if num_devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env.update(extra)
  return env
