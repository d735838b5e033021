"""Study results as tables: loading the runs, their statistics, markdown.

Shared by ``experiments/report.py`` and ``experiments/stress_report.py``.
A run's records are ``<results>/<study>/<run>.jsonl`` (read with
:func:`synstrip_vit.writers.scan_jsonl`), with ``<run>.config.json`` and,
for some studies, ``<run>.robustness.json`` beside it. Every value is mean
+- sample std (ddof=1) over the seeds found, with n shown.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from experiments.design import SEEDS
from synstrip_vit import writers
from synstrip_vit import workdir as workdir_lib

ARM_LABELS = {"relu": "ReLU", "relu_strip": "ReLU + stripping",
              "gelu": "GELU", "relu_redo": "ReLU + ReDo",
              "strip": "ReLU + stripping"}
ARM_STYLE = {"relu": ("C0", "-"), "relu_strip": ("C1", "-"),
             "gelu": ("C2", "-"), "relu_redo": ("C3", "-"),
             "strip": ("C1", "-")}


# ------------------------------------------------------------------ loading

def number(v: Any) -> float:
  """A metric value as float (NaN when missing or not a number)."""
  if v is None or isinstance(v, bool):
    return float(v) if isinstance(v, bool) else math.nan
  try:
    return float(v)
  except (TypeError, ValueError):
    return math.nan


def read_records(path: Path) -> list[dict]:
  """Per-epoch records sorted by epoch (last wins on a duplicate epoch).

  Damaged lines are skipped, so a partly written file never crashes the
  report.
  """
  by_epoch = {r["epoch"]: r for r in writers.scan_jsonl(path).records}
  return [by_epoch[e] for e in sorted(by_epoch)]


def read_json(path: Path) -> Any:
  """The JSON value of ``path``; None when it is missing or unreadable."""
  status, value = workdir_lib.read_json(path)
  return value if status == "ok" else None


class Run:
  """One finished run: records, config and (maybe) robustness."""

  def __init__(self, name: str, records: list[dict], config, robustness):
    self.name = name
    self.records = records
    self.config = config or {}
    self.robustness = robustness

  def series(self, key: str) -> np.ndarray:
    """``key`` per epoch, indexed by the 0-based epoch (NaN where missing)."""
    n = max(int(r["epoch"]) for r in self.records) + 1
    out = np.full(n, np.nan)
    for r in self.records:
      out[int(r["epoch"])] = number(r.get(key))
    return out

  def final(self, key: str) -> float:
    return number(self.records[-1].get(key))

  def max(self, key: str) -> float:
    s = self.series(key)
    return float(np.nanmax(s)) if np.isfinite(s).any() else math.nan


def load_run(study_dir: Path, name: str) -> Optional[Run]:
  """The run ``name`` of ``study_dir`` (None when it has no records)."""
  records = read_records(study_dir / f"{name}.jsonl")
  if not records:
    return None
  return Run(name, records, read_json(study_dir / f"{name}.config.json"),
             read_json(study_dir / f"{name}.robustness.json"))


def load_arms(results: Path, study: str, arms: Sequence[str],
              seeds: Sequence[int] = SEEDS, extra_study: Optional[str] = None,
              extra_arm: Optional[str] = None) -> dict[str, list[Run]]:
  """``{arm: [Run]}`` over the seeds found (empty arms are dropped)."""
  out = {}
  for arm in arms:
    runs = [load_run(results / study, f"{arm}_s{s}") for s in seeds]
    out[arm] = [r for r in runs if r is not None]
  if extra_study and extra_arm:
    runs = [load_run(results / extra_study, f"{extra_arm}_s{s}")
            for s in seeds]
    out[extra_arm] = [r for r in runs if r is not None]
  return {a: rs for a, rs in out.items() if rs}


# --------------------------------------------------------------- statistics

def mean_std(values) -> tuple[float, float, int]:
  """Mean, sample std (ddof=1; NaN for n < 2) and n of the finite values."""
  v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
  n = len(v)
  if n == 0:
    return math.nan, math.nan, 0
  return float(v.mean()), (float(v.std(ddof=1)) if n > 1 else math.nan), n


def fmt(values, scale: float = 1.0, digits: int = 2) -> str:
  """``'mean ± std'`` of ``values * scale`` (``–`` where undefined)."""
  m, s, n = mean_std([x * scale for x in values])
  if n == 0:
    return "–"
  if digits == 0:
    ms, ss = f"{m:,.0f}", f"{s:,.0f}"
  else:
    ms, ss = f"{m:.{digits}f}", f"{s:.{digits}f}"
  return f"{ms} ± {ss if math.isfinite(s) else '–'}"


def curve(runs: list[Run], key: str
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-epoch mean and std (std 0 where fewer than 2 seeds) over runs."""
  series = [r.series(key) for r in runs]
  n = max(len(s) for s in series)
  arr = np.full((len(series), n), np.nan)
  for i, s in enumerate(series):
    arr[i, :len(s)] = s
  mean = np.full(n, np.nan)
  std = np.zeros(n)
  for e in range(n):
    m, s, k = mean_std(arr[:, e])
    mean[e] = m
    std[e] = s if k > 1 else 0.0
  return np.arange(1, n + 1), mean, std


def hidden_neurons(run: Run, depth: int = 0, width: int = 0) -> int:
  """Neurons of the stripped layers: MLP ``depth * width``, ViT ``depth *
  (mlp_dim + hidden_size)`` (both MLP layers of every block). ``depth`` and
  ``width`` are the defaults for the flat configs of runs made before the
  config had sections."""
  model = run.config.get("model")
  model = model if isinstance(model, dict) else run.config
  if model.get("name") == "vit":
    return int(model["depth"]) * (int(model["mlp_dim"])
                                  + int(model["hidden_size"]))
  return int(model.get("depth", depth)) * int(model.get("width", width))


# ------------------------------------------------------------------- tables

def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]
             ) -> str:
  """A markdown table."""
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def runs_found_line(groups: dict, expected: int) -> str:
  """``_Runs found: n of expected (per group)._``"""
  total = sum(len(v) for v in groups.values())
  parts = ", ".join(f"{_label(k)}: {len(v)}" for k, v in groups.items()
                    ) if len(groups) <= 4 else f"{len(groups)} groups"
  return (f"_Runs found: {total} of {expected} expected"
          + (f" ({parts})._" if parts else "._"))


def _label(key) -> str:
  if isinstance(key, tuple):
    d, w, arm = key
    return f"d{d}_w{w}_{arm}"
  return key


def arm_rows(arms: dict[str, list[Run]],
             columns: Sequence[Callable[[list[Run]], Any]],
             labels: Optional[dict[str, str]] = None) -> list[list[Any]]:
  """One table row per arm: its label, its n, then each column of its runs."""
  labels = ARM_LABELS if labels is None else labels
  return [[labels.get(arm, arm), len(runs)] + [col(runs) for col in columns]
          for arm, runs in arms.items()]


def column(value: Callable[[Run], float], scale: float = 1.0,
           digits: int = 2) -> Callable[[list[Run]], str]:
  """A table column for :func:`arm_rows`: :func:`fmt` of ``value(run)``
  over an arm's runs."""
  return lambda runs: fmt([value(r) for r in runs], scale, digits)


__all__ = ["ARM_LABELS", "ARM_STYLE", "Run", "arm_rows", "column", "curve",
           "fmt", "hidden_neurons", "load_arms", "load_run",
           "md_table", "mean_std", "number", "read_json", "read_records",
           "runs_found_line"]
