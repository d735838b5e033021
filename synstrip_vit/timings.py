"""Wall-clock time of a run's stages, written to ``<workdir>/timings.json``.

``experiments/train_vit.py`` starts a :class:`StageTimer` before its imports
and :func:`synstrip_vit.loop.train_and_evaluate` adds its stages to it::

  imports       the script's imports (JAX, Flax, Orbax, ...) and flags
  data          loading the dataset (RunData)
  init_compile  tracing the init, train and eval steps and compiling them
                (or loading them from the persistent cache) in parallel
                threads, running the init, replicating the state
  restore       checkpoint manager, config.json, restore of a checkpoint
  writers       metrics.jsonl and TensorBoard writers
  epochs       every epoch (train, eval+probe, strip, record); the split
               per epoch is in metrics.jsonl (train/eval/strip_time_s)
  saves        checkpoint saves
  plots        the PNG plots
  total        from the timer's start to the file's writing

``bench/bench_startup.py`` reads the file (and metrics.jsonl) of cold and warm
runs.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator, Optional

from synstrip_vit.workdir import atomic_write_text

TIMINGS_FILE = "timings.json"


class StageTimer:
  """Seconds per named stage (a stage timed twice adds up)."""

  def __init__(self, start: Optional[float] = None):
    """``start``: a ``time.perf_counter()`` value the total counts from."""
    self.start = time.perf_counter() if start is None else start
    self.stages: dict[str, float] = {}

  def add(self, name: str, seconds: float) -> None:
    """Add ``seconds`` to stage ``name``."""
    self.stages[name] = self.stages.get(name, 0.0) + float(seconds)

  @contextlib.contextmanager
  def stage(self, name: str) -> Iterator[None]:
    """Time the ``with`` body as (part of) stage ``name``."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - t0)

  def as_dict(self) -> dict[str, float]:
    """The stages in the order first timed, then ``total``."""
    return {**self.stages, "total": time.perf_counter() - self.start}

  def write(self, workdir: str | Path) -> Path:
    """Write :meth:`as_dict` to ``<workdir>/timings.json``."""
    path = Path(workdir) / TIMINGS_FILE
    atomic_write_text(path, json.dumps(self.as_dict(), indent=2) + "\n")
    return path


__all__ = ["StageTimer", "TIMINGS_FILE"]
