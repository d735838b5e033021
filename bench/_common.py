"""What every benchmark script shares: arguments, machine info, JSONL output.

The scripts import it as a sibling module (``python bench/<script>.py`` puts
``bench/`` first on ``sys.path``); the package itself comes from the install
(``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np

#: Where the scripts append their rows by default.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def make_parser(doc: str, default_out: str, *, quick: str,
                reps: str) -> argparse.ArgumentParser:
  """An argument parser with the options every benchmark takes.

  Args:
    doc: the script's docstring; its first paragraph is the description.
    default_out: file name under ``bench/results/`` for ``--out``.
    quick: help text of ``--quick`` (what the short run leaves out).
    reps: help text of ``--reps`` (the default repetitions).

  Returns:
    A parser with ``--quick``, ``--reps N`` and ``--out FILE`` (``''``: write
    nothing); the script adds its own options.
  """
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help=quick)
  parser.add_argument("--reps", type=int, default=None, help=reps)
  parser.add_argument(
      "--out", default=str(RESULTS_DIR / default_out),
      help=f"JSON-lines file to append results to ('' = none; default "
      f"bench/results/{default_out})")
  return parser


def machine_info() -> dict[str, Any]:
  """The machine and versions a row was measured with, and the time (UTC)."""
  dev = jax.devices()[0]
  return {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "machine": platform.machine(), "node": platform.node(),
      "cpu_count": os.cpu_count(), "python": platform.python_version(),
      "jax": jax.__version__, "jaxlib": __import__("jaxlib").__version__,
      "numpy": np.__version__, "backend": dev.platform,
      "device_kind": dev.device_kind, "device_count": jax.device_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
  }


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
  """Appends one JSON line per row to ``path`` (folders made as needed).

  Returns:
    The number of rows written.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  n = 0
  with path.open("a") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
      n += 1
  return n
