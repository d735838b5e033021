"""After-training evaluation: a finished run's latest checkpoint, evaluated.

Used by ``experiments/`` (the study's robustness table, the stress study's
probe overlap): :func:`final_state` restores the run's latest checkpoint,
:func:`final_evaluator` pairs it with a compiled eval step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import ml_collections
import numpy as np
from flax import linen as nn

from synstrip_vit import checkpointing, rundata, startup, steps
from synstrip_vit.rundata import RunData


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


__all__ = ["final_evaluator", "final_state"]
