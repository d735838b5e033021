"""Resume and run identity: which run a workdir holds, and where it stopped.

:func:`restore_or_start` resumes a run from its newest good checkpoint (or
starts it at step 0) after checking that the workdir holds this run: the
same config (``config.json``) and the same data (``run.json``, and the
identity stored in the checkpoint). It repairs ``metrics.jsonl`` from the
records kept with the checkpoint and returns the checkpointer whose
metadata carries the identity and records on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import ml_collections

from synstrip_vit import checkpointing, config as config_lib, integrity
from synstrip_vit import steps, writers
from synstrip_vit import workdir as workdir_lib
from synstrip_vit.startup import Run

#: The run's config in its workdir (checked on resume).
CONFIG_FILE = "config.json"


class RunError(RuntimeError):
  """A run cannot start or continue (message says why and what to do)."""


def _restore_checked(run: Run, state: steps.TrainState, manager: Any,
                     identity: dict[str, str], config_ok: bool,
                     warn: Callable[[str], None]
                     ) -> tuple[steps.TrainState, Optional[dict[str, Any]]]:
  """``(state, checkpoint metadata)`` of the newest good checkpoint, or the
  initial ``state`` and None; refuses another run's checkpoint (identity),
  and metrics without any checkpoint."""
  restored = checkpointing.restore_latest(
      manager, state, quarantine_dir=run.workdir / "unreadable_checkpoints",
      warn=warn)
  if restored is None:
    metrics_path = run.workdir / writers.METRICS_FILE
    found, damaged, _ = writers.scan_jsonl(metrics_path)
    if found or damaged:
      raise RunError(f"{metrics_path} has records but {manager.directory} "
                     "holds no checkpoint: refusing to start over and "
                     "overwrite them; use another --workdir")
    return state, None
  step, state = restored
  meta = integrity.read_meta(Path(manager.directory) / str(step))
  stored = (meta or {}).get("identity")
  if isinstance(stored, dict):
    reason = workdir_lib.identity_mismatch(
        stored, identity, f"checkpoint {step} in {manager.directory}")
    if reason:
      raise RunError(reason)
  elif not config_ok:
    raise RunError(
        f"{run.workdir / CONFIG_FILE} is missing or unreadable and "
        f"checkpoint {step} records no config to check this one against; "
        "restore config.json or use another --workdir")
  epoch, batch = run.position(step)
  run.log(f"resuming from checkpoint {step} (epoch {epoch + 1}, "
          f"batch {batch})")
  return state, meta


def restore_or_start(run: Run, state: steps.TrainState
                     ) -> tuple[steps.TrainState, Any, list[dict[str, Any]]]:
  """Resume from the workdir's newest good checkpoint, or start at 0.

  Checks ``config.json`` and ``run.json`` (config and data fingerprints)
  and the identity stored in the restored checkpoint, refusing a run on
  another config or other data; refuses to overwrite the metrics of a run
  whose checkpoints are gone; repairs ``metrics.jsonl`` from the records
  stored with the checkpoint and drops the records of the epochs that will
  be trained again; (re)writes ``config.json`` and ``run.json`` atomically
  when they are missing, damaged or out of date. Returns ``(state,
  checkpointer, records kept)``.
  """
  identity = run_identity(run)
  config_ok = _check_run_files(run.workdir, run.config, identity)
  metrics_path = run.workdir / writers.METRICS_FILE
  manager = checkpointing.make_manager(
      run.workdir, max_to_keep=run.config.run.max_checkpoints)
  warn = run.log if run.is_main else (lambda _: None)
  try:
    state, meta = _restore_checked(run, state, manager, identity, config_ok,
                                   warn)
  except BaseException:
    manager.close()
    raise
  if run.is_main:
    _write_run_files(run.workdir, run.config, identity, warn)
  epoch, _ = run.position(state.step)
  records: list[dict[str, Any]] = []
  if run.is_main:
    records, warning = integrity.reconcile_metrics(
        metrics_path, epoch, (meta or {}).get("records"))
    if warning:
      warn(warning)

  def checkpoint_meta() -> dict[str, Any]:
    return {"identity": identity,
            "records": [{k: writers.jsonable(v) for k, v in r.items()}
                        for r in records]}

  return state, checkpointing.Checkpointer(manager, checkpoint_meta), records


def run_identity(run: Run) -> dict[str, str]:
  """The config and data fingerprints of ``run`` (see ``run.json``)."""
  return workdir_lib.run_identity(
      _config_dict(run.config), run.data.fingerprint,
      run.config.data.dataset, ignored=tuple(config_lib.RESUMABLE_CHANGES))


def _check_run_files(workdir: Path, config: ml_collections.ConfigDict,
                     identity: dict[str, str]) -> bool:
  """Refuse to resume a run of another config or other data.

  Compares ``config`` with ``config.json`` and ``identity`` with
  ``run.json``, when they are readable. Returns whether ``config.json``
  or ``run.json`` was readable (so the config could be checked).

  Raises:
    RunError: the workdir holds a run with another config or other data.
  """
  status, old = workdir_lib.read_json(workdir / CONFIG_FILE)
  new = _config_dict(config)
  if status == "ok" and isinstance(old, dict):
    diff = config_lib.config_diff(old, new)
    if diff:
      raise RunError(
          f"{workdir} holds a run with a different config "
          + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
          + "; use another --workdir")
  run_status, stored = workdir_lib.read_json(workdir / workdir_lib.RUN_FILE)
  if run_status == "ok" and isinstance(stored, dict):
    reason = workdir_lib.identity_mismatch(
        stored, identity, str(workdir / workdir_lib.RUN_FILE))
    if reason:
      raise RunError(reason)
  return ((status == "ok" and isinstance(old, dict))
          or (run_status == "ok" and isinstance(stored, dict)))


def _write_run_files(workdir: Path, config: ml_collections.ConfigDict,
                     identity: dict[str, str],
                     warn: Callable[[str], None]) -> None:
  """(Re)write ``config.json`` and ``run.json`` atomically when they differ."""
  for name, text in (
      (CONFIG_FILE, json.dumps(_config_dict(config), indent=2, sort_keys=True)),
      (workdir_lib.RUN_FILE, json.dumps(identity, indent=2, sort_keys=True))):
    path = workdir / name
    status, reason = workdir_lib.read_json(path)
    if status == "ok" and path.read_text(encoding="utf-8") == text:
      continue
    if status == "unreadable":
      warn(f"warning: {path} was unreadable ({reason}); rewritten")
    workdir_lib.atomic_write_text(path, text)


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config`` as the plain dict that ``config.json`` holds."""
  return json.loads(config.to_json())


__all__ = ["CONFIG_FILE", "RunError", "restore_or_start", "run_identity"]
