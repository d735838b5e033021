"""Orbax checkpoints of a training run: save, resume, fall back, never lose work.

A checkpoint holds one item, ``state``: the :class:`~synstrip_vit.steps.
TrainState` pytree (step, params, optimizer state with the stripping masks,
RNG, the running sums of the epoch's training metrics, the remedy's running
state). The loop derives its
position from ``state.step`` alone, so the state is all a resumed run needs
to compute exactly what an uninterrupted one computes.

Checkpoints are numbered by the global optimizer step. Saving is collective:
every process calls :func:`save`; orbax writes array shards from the
processes that own them and the JSON from process 0. Then process 0 adds
the run's metadata (records, identity) and a SHA-256 manifest of the step
(:mod:`synstrip_vit.integrity`); :func:`restore_latest` verifies a step
against its manifest before restoring it and refuses a state that is not
finite, falling back to the previous checkpoint. A state that is not finite
is never saved.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from synstrip_vit import distributed, finite, integrity

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


@dataclasses.dataclass
class Checkpointer:
  """A manager plus the metadata every checkpoint of a run carries.

  ``meta`` is called at each :func:`save` (on process 0) and returns the
  JSON-able ``synstrip_meta.json`` content (records so far, identity).
  """
  manager: ocp.CheckpointManager
  meta: Callable[[], dict[str, Any]]

  @property
  def directory(self):
    return self.manager.directory

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def close(self) -> None:
    self.manager.close()


def save(manager: ocp.CheckpointManager | Checkpointer, step: int,
         state: PyTree) -> None:
  """Save ``state`` as checkpoint ``step`` (blocking, every process).

  With a :class:`Checkpointer`, process 0 then writes its metadata into the
  step directory; in every case it writes the step's SHA-256 manifest last.

  Raises:
    FloatingPointError: the state holds a NaN or inf (names the leaves);
      nothing is saved, the previous checkpoints are kept.
  """
  meta = None
  if isinstance(manager, Checkpointer):
    meta, manager = manager.meta, manager.manager
  bad = finite.nonfinite_leaves(state)
  if bad:
    raise finite.nonfinite_error(
        f"the state at step {step} is not finite "
        f"({finite.nonfinite_names(bad)})", "not saved", manager)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state)), force=True)
  manager.wait_until_finished()
  if distributed.is_main():
    step_dir = Path(manager.directory) / str(step)
    if meta is not None:
      integrity.write_meta(step_dir, meta())
    integrity.write_manifest(step_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f"synstrip_manifest_{step}")


def abstract(target: PyTree) -> PyTree:
  """ShapeDtypeStructs (with shardings) describing ``target``."""
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, target)


def restore_latest(manager: ocp.CheckpointManager, target: PyTree, *,
                   quarantine_dir: Optional[str | Path] = None,
                   warn: Callable[[str], None] = logging.warning
                   ) -> Optional[tuple[int, PyTree]]:
  """Restore the newest good checkpoint, falling back to older ones.

  A checkpoint is good if its files match its manifest (when it has one,
  see :mod:`synstrip_vit.integrity`), orbax restores it and every float in
  its state is finite. When newer ones are not, ``warn`` gets one line
  naming them, why, and the step resumed from.

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
  like = abstract(target)
  for step in steps:
    try:
      integrity.verify(Path(manager.directory) / str(step))
      restored = {"state": _restore(manager, step, target, like)}
      bad = finite.nonfinite_leaves(restored["state"])
      if bad:
        raise FloatingPointError(finite.nonfinite_names(bad))
      if errors:
        moved = (f"moved to {quarantine_dir}" if quarantine_dir is not None
                 else "left in place")
        warn(f"warning: newest checkpoint(s) in {manager.directory} "
             f"unreadable ({'; '.join(errors)}; {moved}); resuming from "
             f"checkpoint {step}")
        if quarantine_dir is not None:
          _quarantine(manager, [s for s in steps if s > step], quarantine_dir)
      return step, restored["state"]
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"checkpoint {step}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:300] if str(e) else ''}")
  raise CheckpointError(
      f"no checkpoint in {manager.directory} could be restored: "
      + " | ".join(errors) + ". Move the directory away to start afresh.")


def _restore(manager: ocp.CheckpointManager, step: int, target: PyTree,
             like: PyTree) -> PyTree:
  """Checkpoint ``step`` restored as ``like`` (:func:`abstract` of
  ``target``). A checkpoint of a state without the fields that are None in
  a dataclass ``target`` (a :class:`~synstrip_vit.steps.TrainState` saved
  without its ``remedy`` field) restores into ``target`` with them None."""
  def restore(item):
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(item)))["state"]
  try:
    return restore(like)
  except ValueError:
    fields = ([f.name for f in dataclasses.fields(target)
               if getattr(target, f.name) is None]
              if dataclasses.is_dataclass(target) else [])
    if not fields:
      raise
    present = {f.name: getattr(like, f.name)
               for f in dataclasses.fields(target) if f.name not in fields}
    return target.replace(**restore(present))


def _quarantine(manager: ocp.CheckpointManager, steps: list[int],
                dest: str | Path) -> None:
  """Move unreadable checkpoints out of the manager's directory."""
  if distributed.is_main():
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


__all__ = ["CHECKPOINT_DIR", "CheckpointError", "Checkpointer", "abstract",
           "make_manager", "restore_latest", "save"]
