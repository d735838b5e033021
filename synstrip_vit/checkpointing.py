"""Orbax checkpoints of a training run: save, resume, fall back, never lose work.

A checkpoint holds two items: ``state`` (the :class:`~synstrip_vit.steps.
TrainState` pytree: step, params, optimizer state with the stripping masks,
RNG) and ``meta`` (JSON: the epoch, the position of the data iterator inside
the epoch and the partial sums of the epoch's training metrics). Together
they make a resumed run compute exactly what an uninterrupted one computes.

Checkpoints are numbered by the global optimizer step. Saving is collective:
every process calls :func:`save`; orbax writes array shards from the
processes that own them and the JSON from process 0.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

PyTree = Any

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  """No checkpoint of a run can be restored (all candidates failed)."""


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a run stands: the data iterator position and partial metrics.

  Attributes:
    epoch: the epoch in progress (0-based).
    batch: the number of batches of ``epoch`` already trained on; equal to
      the number of batches per epoch once the epoch's training is done.
    epoch_done: True once the epoch's evaluation, probe, strip event and
      logging are done (the next run starts at ``epoch + 1``, batch 0).
    train_sums: partial sums of the epoch's training metrics
      (``loss_sum``, ``correct``, ``count``) over the batches done.
  """
  epoch: int
  batch: int
  epoch_done: bool
  train_sums: dict[str, float]

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "Position":
    try:
      return cls(epoch=int(d["epoch"]), batch=int(d["batch"]),
                 epoch_done=bool(d["epoch_done"]),
                 train_sums={k: float(v) for k, v in d["train_sums"].items()})
    except (KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"malformed checkpoint metadata {d!r}: {e!r}") from e


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
                               item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: PyTree,
         position: Position) -> None:
  """Save ``state`` and ``position`` as checkpoint ``step`` (blocking)."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave(position.to_json())), force=True)
  manager.wait_until_finished()


def _abstract(target: PyTree) -> PyTree:
  """ShapeDtypeStructs (with shardings) describing ``target``."""
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, target)


def restore_latest(manager: ocp.CheckpointManager, target: PyTree, *,
                   quarantine_dir: Optional[str | Path] = None
                   ) -> Optional[tuple[int, PyTree, Position]]:
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
    ``(step, state, position)``, or ``None`` if the directory holds no
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
          state=ocp.args.StandardRestore(abstract),
          meta=ocp.args.JsonRestore()))
      position = Position.from_json(restored["meta"])
      if errors:
        logging.warning("restored checkpoint %d after newer ones failed: %s",
                        step, "; ".join(errors))
        if quarantine_dir is not None:
          _quarantine(manager, [s for s in steps if s > step], quarantine_dir)
      return step, restored["state"], position
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


__all__ = ["CHECKPOINT_DIR", "CheckpointError", "Position", "make_manager",
           "restore_latest", "save"]
