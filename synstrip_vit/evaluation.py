"""After-training evaluation.

:func:`write_corrupted` evaluates a run's final params on the corrupted test
sets of ``config.eval`` (the loop's last phase). Used by ``experiments/``
(the study's robustness table, the stress study's probe overlap):
:func:`final_state` restores the run's latest checkpoint,
:func:`final_evaluator` pairs it with a compiled eval step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import ml_collections
import numpy as np
from flax import linen as nn

from synstrip_vit import checkpointing, rundata, startup, steps
from synstrip_vit import workdir as workdir_lib
from synstrip_vit.rundata import RunData
from synstrip_vit.startup import Run

PyTree = Any


def sums_mean(sums: dict[str, Any], key: str) -> float:
  """``sums[key] / sums['count']`` of summed step outputs, a float."""
  return float(sums[key]) / float(sums["count"])


#: Where :func:`evaluate_corrupted`'s results go in the workdir.
CORRUPTED_FILE = "corrupted.json"


def evaluate_corrupted(run: Run, params: PyTree) -> dict[str, Any]:
  """Loss and accuracy of ``params`` on the corrupted test sets of
  ``config.eval`` (:func:`synstrip_vit.corruptions.iter_corrupted` of the
  test images, one ``(corruption, severity)`` block in memory at a time).

  Returns ``{"blocks": [{corruption, severity, loss, accuracy}, ...],
  "per_corruption": {name: {loss, accuracy}}, "mean": {loss, accuracy}}``
  (means over blocks; every block has the test set's size).
  """
  # Imported here: SciPy is only needed for this evaluation.
  from synstrip_vit import corruptions  # pylint: disable=import-outside-toplevel
  c, d = run.config, run.data
  blocks = []
  for name, severity, x in corruptions.iter_corrupted(
      d.x_test, c.eval.corruptions, c.eval.severities,
      c.eval.corruption_seed, frost_dir=c.eval.frost_dir or None):
    sums = steps.evaluate(run.eval_step, params, x, d.y_test,
                          batch_size=c.run.eval_batch_size, mesh=run.mesh)
    blocks.append({"corruption": name, "severity": int(severity),
                   "loss": sums_mean(sums, "loss_sum"),
                   "accuracy": sums_mean(sums, "correct")})

  def means(rows):
    return {k: float(np.mean([r[k] for r in rows]))
            for k in ("loss", "accuracy")}

  return {"blocks": blocks,
          "per_corruption": {n: means([b for b in blocks
                                       if b["corruption"] == n])
                             for n in c.eval.corruptions},
          "mean": means(blocks)}


def write_corrupted(run: Run, params: PyTree) -> None:
  """:func:`evaluate_corrupted`, written to ``<workdir>/corrupted.json``
  with a one-line summary (process 0)."""
  corrupted = evaluate_corrupted(run, params)
  if run.is_main:
    workdir_lib.atomic_write_text(run.workdir / CORRUPTED_FILE,
                                  json.dumps(corrupted, indent=1) + "\n")
    run.log(f"corrupted test sets: mean accuracy "
            f"{corrupted['mean']['accuracy']:.4f} over "
            f"{len(corrupted['blocks'])} blocks -> {CORRUPTED_FILE}")


def final_state(config: ml_collections.ConfigDict, workdir: str | Path
                ) -> tuple[steps.TrainState, nn.Module, RunData]:
  """``(state, model, run_data)`` of a run's latest checkpoint."""
  run_data = RunData(config)
  model, _, state, _ = startup.build_state(config, run_data,
                                           steps.make_mesh())
  manager = checkpointing.make_manager(workdir)
  restored = checkpointing.restore_latest(manager, state)
  manager.close()
  if restored is None:
    raise checkpointing.CheckpointError(f"no checkpoint in {workdir}")
  return restored[1], model, run_data


def final_evaluator(config: ml_collections.ConfigDict, workdir: str | Path,
                    *, collect_stats: bool
                    ) -> tuple[steps.TrainState, RunData, Callable]:
  """``(state, run_data, evaluate)`` of a run's latest checkpoint.

  ``evaluate(x, y)`` runs the compiled eval step (with the activation
  statistics when ``collect_stats``) over every example of ``(x, y)`` and
  returns its outputs summed (:func:`synstrip_vit.steps.evaluate`).
  """
  state, model, run_data = final_state(config, workdir)
  mesh = steps.make_mesh()
  _, preprocess = rundata.input_fns(config, run_data)
  step = steps.jit_eval_step(model, preprocess, mesh,
                             collect_stats=collect_stats)

  def evaluate(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    return steps.evaluate(step, state.params, x, y,
                          batch_size=config.run.eval_batch_size, mesh=mesh)

  return state, run_data, evaluate


__all__ = ["CORRUPTED_FILE", "evaluate_corrupted", "final_evaluator",
           "final_state", "sums_mean", "write_corrupted"]
