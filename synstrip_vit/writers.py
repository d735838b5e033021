"""Per-epoch metric records: JSONL files and the standard plots.

Only process 0 of a multi-process run should call the writers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

METRICS_FILE = "metrics.jsonl"


def _jsonable(v: Any) -> Any:
  if hasattr(v, "item") and getattr(v, "shape", None) == ():
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
  """Append ``record`` as one JSON line (scalars only), flushed to disk."""
  line = json.dumps({k: _jsonable(v) for k, v in record.items()},
                    sort_keys=False)
  with open(path, "a", encoding="utf-8") as f:
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
  """All records of a JSONL file (``[]`` if it does not exist).

  A truncated last line (a run killed while writing) is ignored; a malformed
  line elsewhere raises ``ValueError`` naming the line number.
  """
  path = Path(path)
  if not path.exists():
    return []
  lines = path.read_text(encoding="utf-8").splitlines()
  out = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        break
      raise ValueError(f"{path}:{i + 1}: malformed JSON line: {e}") from e
  return out


def keep_epochs_before(path: str | Path, epoch: int) -> list[dict[str, Any]]:
  """Rewrite ``path`` keeping only records with ``record['epoch'] < epoch``.

  Used on resume: epochs after the restored checkpoint are recomputed and
  logged again, so the file never holds an epoch twice.
  """
  records = [r for r in read_jsonl(path) if int(r["epoch"]) < epoch]
  path = Path(path)
  if path.exists():
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
  return records


def plot_metrics(records: Sequence[Mapping[str, Any]], out_dir: str | Path,
                 *, title: str = "") -> list[Path]:
  """Write ``accuracy.png``, ``dead_neurons.png``, ``active_params.png``.

  Args:
    records: per-epoch records with ``epoch``, ``train_acc``, ``test_acc``,
      ``dead_neurons``, ``active_params``.
    out_dir: where the PNGs go.

  Returns:
    The written paths.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  out_dir = Path(out_dir)
  epochs = [r["epoch"] + 1 for r in records]
  panels = {
      "accuracy": (("train_acc", "train"), ("test_acc", "test")),
      "dead_neurons": (("dead_neurons", "dead neurons"),),
      "active_params": (("active_params", "active parameters"),),
  }
  paths = []
  for name, series in panels.items():
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for key, label in series:
      ax.plot(epochs, [float(r[key]) for r in records], marker=".",
              label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(name.replace("_", " "))
    if title:
      ax.set_title(title)
    if len(series) > 1:
      ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  return paths


__all__ = ["METRICS_FILE", "append_jsonl",
           "keep_epochs_before", "plot_metrics", "read_jsonl"]
