"""Per-epoch metric records: writers (JSONL, TensorBoard) and the plots.

A :class:`MetricWriter` takes ``write(step, record)`` / ``close()``;
:func:`make_writer` gives a run's writer: ``metrics.jsonl`` always and
TensorBoard event files (``tensorboard --logdir <workdir>``) when
tensorboardX is installed, on process 0 only (a writer that drops
everything elsewhere).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Protocol, Sequence

from synstrip_vit.workdir import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def jsonable(v: Any) -> Any:
  """``v`` as a JSON value: 0-d arrays as Python scalars, NaN/inf as strings."""
  if hasattr(v, "item") and getattr(v, "shape", None) == ():
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
  """Append ``record`` as one JSON line (scalars only), flushed to disk."""
  line = json.dumps({k: jsonable(v) for k, v in record.items()},
                    sort_keys=False)
  with open(path, "a", encoding="utf-8") as f:
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())


class JsonlRecords(NamedTuple):
  """What :func:`scan_jsonl` read from a file of epoch records.

  Attributes:
    records: the JSON objects with an integer ``epoch``, in file order.
    damaged: 1-based numbers of the other non-blank lines (truncated, binary
      garbage, not JSON, not such an object).
    lines: the number of lines of the file.
  """
  records: list[dict[str, Any]]
  damaged: list[int]
  lines: int


def scan_jsonl(path: str | Path) -> JsonlRecords:
  """Every epoch record of a JSONL file, and its damaged lines (the one
  reader of ``metrics.jsonl`` and the study's result files).

  A missing file reads as ``JsonlRecords([], [], 0)``; blank lines are
  skipped.
  """
  try:
    lines = Path(path).read_bytes().splitlines()
  except FileNotFoundError:
    return JsonlRecords([], [], 0)
  records, damaged = [], []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      r = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
      r = None
    if isinstance(r, dict) and isinstance(r.get("epoch"), int):
      records.append(r)
    else:
      damaged.append(number)
  return JsonlRecords(records, damaged, len(lines))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
  """The epoch records of a JSONL file (``[]`` if it does not exist).

  A damaged last line (a run killed while writing) is ignored; a damaged
  line elsewhere raises ``ValueError`` naming the line number.
  """
  scan = scan_jsonl(path)
  inner = [n for n in scan.damaged if n != scan.lines]
  if inner:
    raise ValueError(f"{path}:{inner[0]}: malformed JSON line (not a JSON "
                     "object with an integer 'epoch')")
  return scan.records


def preload_plotting() -> None:
  """Import matplotlib (Agg) and pyplot now, e.g. in a background thread
  while the steps compile, so that :func:`plot_metrics` at the end of a
  run does not wait for the import (about a second)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot  # pylint: disable=import-outside-toplevel,unused-import


def plot_metrics(records: Sequence[Mapping[str, Any]], out_dir: str | Path,
                 *, title: str = "") -> list[Path]:
  """Write ``accuracy.png``, ``dead_neurons.png``, ``active_params.png``.

  Args:
    records: per-epoch records with ``epoch`` (0-based; plotted 1-based),
      ``train_acc``, ``test_acc``, ``dead_neurons``, ``active_params``; the
      dead neurons are plotted as a fraction of ``strippable_neurons`` when
      every record has it (older files: as counts).
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
  values = {key: [float(r[key]) for r in records]
            for series in panels.values() for key, _ in series}
  ylabels = {name: name.replace("_", " ") for name in panels}
  if records and all(r.get("strippable_neurons") for r in records):
    values["dead_neurons"] = [r["dead_neurons"] / r["strippable_neurons"]
                              for r in records]
    ylabels["dead_neurons"] = (
        f"dead fraction of {records[-1]['strippable_neurons']} neurons")
  paths = []
  for name, series in panels.items():
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for key, label in series:
      ax.plot(epochs, values[key], marker=".", label=label)
    ax.set_xlabel("epoch (1-based)")
    ax.set_ylabel(ylabels[name])
    if title:
      ax.set_title(title)
    if len(series) > 1:
      ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write_bytes(path, png.getvalue())  # never a truncated plot
    plt.close(fig)
    paths.append(path)
  return paths


# ------------------------------------------------------------------ writers

class MetricWriter(Protocol):
  """Where per-epoch records go."""

  def write(self, step: int, record: Mapping[str, Any]) -> None:
    """Write ``record`` (a flat mapping of scalars) at optimizer ``step``."""

  def close(self) -> None:
    """Flush and release whatever the writer holds."""


class JsonlWriter:
  """Appends each record, unchanged, as one line of a JSONL file."""

  def __init__(self, path: str | Path):
    self.path = Path(path)

  def write(self, step: int, record: Mapping[str, Any]) -> None:
    del step  # the record holds its own step
    append_jsonl(self.path, record)

  def close(self) -> None:
    pass


class TensorBoardWriter:
  """Writes each numeric field of a record as a TensorBoard scalar.

  Args:
    logdir: the event files' directory.
    purge_step: on resume, the first step written again: events at this
      step and later (from the interrupted run) are dropped, as the
      records of ``metrics.jsonl`` are.
  """

  def __init__(self, logdir: str | Path, *, purge_step: int | None = None):
    import tensorboardX  # pylint: disable=import-outside-toplevel
    self._writer = tensorboardX.SummaryWriter(str(logdir),
                                              purge_step=purge_step)

  def write(self, step: int, record: Mapping[str, Any]) -> None:
    for key, value in record.items():
      if key != "step" and isinstance(value, (bool, int, float)):
        self._writer.add_scalar(key, float(value), global_step=step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MultiWriter:
  """Writes every record to each of ``writers`` (none: drops them)."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write(self, step: int, record: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write(step, record)

  def close(self) -> None:
    for w in self.writers:
      w.close()


def tensorboard_available() -> bool:
  """Whether tensorboardX can be imported."""
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def make_writer(workdir: str | Path, *, is_main: bool,
                purge_step: int | None = None) -> MultiWriter:
  """A run's writer: ``metrics.jsonl`` + TensorBoard (if importable).

  Args:
    workdir: the run directory (``metrics.jsonl`` and ``tensorboard/``).
    is_main: False on processes other than 0, which write nothing.
    purge_step: see :class:`TensorBoardWriter`.
  """
  if not is_main:
    return MultiWriter([])
  workdir = Path(workdir)
  writers: list[MetricWriter] = [JsonlWriter(workdir / METRICS_FILE)]
  if tensorboard_available():
    writers.append(TensorBoardWriter(workdir / TENSORBOARD_DIR,
                                     purge_step=purge_step))
  else:
    logging.info("tensorboardX not installed: no TensorBoard event files")
  return MultiWriter(writers)


__all__ = ["JsonlRecords", "JsonlWriter", "METRICS_FILE", "MetricWriter",
           "MultiWriter", "TENSORBOARD_DIR", "TensorBoardWriter",
           "append_jsonl", "jsonable", "make_writer", "plot_metrics",
           "read_jsonl", "scan_jsonl", "tensorboard_available"]
