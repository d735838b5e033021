"""Orbax checkpoints of a training run: save, resume, fall back, never lose work.

A checkpoint holds one item, ``state``: the :class:`~synstrip_vit.steps.
TrainState` pytree (step, params, optimizer state with the stripping masks,
RNG, the running sums of the epoch's training metrics). The loop derives its
position from ``state.step`` alone, so the state is all a resumed run needs
to compute exactly what an uninterrupted one computes.

Checkpoints are numbered by the global optimizer step. Saving is collective:
every process calls :func:`save`; orbax writes array shards from the
processes that own them and the JSON from process 0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

PyTree = Any

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  """No checkpoint of a run can be restored (all candidates failed)."""


def make_manager(workdir: str | Path, *, max_to_keep: int = 2
                 ) -> ocp.CheckpointManager:
  """A ``CheckpointManager`` at ``<workdir>/checkpoints`` (created if absent).

  ``max_to_keep >= 2`` keeps a previous checkpoint to fall back on when the
  latest one is unreadable.
  """
  if max_to_keep < 1:
    raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
  directory = Path(workdir).absolute() / CHECKPOINT_DIR
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options,
                               item_names=("state",))


def save(manager: ocp.CheckpointManager, step: int, state: PyTree) -> None:
  """Save ``state`` as checkpoint ``step`` (blocking, every process)."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state)), force=True)
  manager.wait_until_finished()


def _abstract(target: PyTree) -> PyTree:
  """ShapeDtypeStructs (with shardings) describing ``target``."""
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, target)


def restore_latest(manager: ocp.CheckpointManager, target: PyTree, *,
                   quarantine_dir: Optional[str | Path] = None
                   ) -> Optional[tuple[int, PyTree]]:
  """Restore the newest readable checkpoint, falling back to older ones.

  Newer checkpoints that failed to restore are moved (by process 0) into
  ``quarantine_dir`` when it is given, so that the resumed run can write its
  own checkpoints at those steps; they are never deleted.

  Args:
    manager: from :func:`make_manager`.
    target: a state with the structure, shapes, dtypes and shardings the
      restored arrays should have (e.g. a freshly initialised state placed on
      the current mesh). Restoring onto a different device count works: the
      arrays take ``target``'s shardings.

  Returns:
    ``(step, state)``, or ``None`` if the directory holds no
    checkpoint at all.

  Raises:
    CheckpointError: checkpoints exist but none can be restored (the message
      lists each step and its error). Never silently returns ``None`` then.
  """
  manager.reload()
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  errors = []
  abstract = _abstract(target)
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
      if errors:
        logging.warning("restored checkpoint %d after newer ones failed: %s",
                        step, "; ".join(errors))
        if quarantine_dir is not None:
          _quarantine(manager, [s for s in steps if s > step], quarantine_dir)
      return step, restored["state"]
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
  raise CheckpointError(
      f"no checkpoint in {manager.directory} could be restored: "
      + " | ".join(errors) + ". Move the directory away to start afresh.")


def _quarantine(manager: ocp.CheckpointManager, steps: list[int],
                dest: str | Path) -> None:
  """Move unreadable checkpoints out of the manager's directory."""
  if jax.process_index() == 0:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for step in steps:
      src = Path(manager.directory) / str(step)
      target = dest / str(step)
      n = 0
      while target.exists():
        n += 1
        target = dest / f"{step}.{n}"
      if src.exists():
        src.rename(target)
        logging.warning("moved unreadable checkpoint %s to %s", src, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("synstrip_quarantine")
  manager.reload()


__all__ = ["CHECKPOINT_DIR", "CheckpointError", "make_manager",
           "restore_latest", "save"]
