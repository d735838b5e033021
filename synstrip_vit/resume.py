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
                     accepted: list[dict[str, str]], config_ok: bool,
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
    _check_identity(stored, accepted,
                    f"checkpoint {step} in {manager.directory}")
  elif not config_ok:
    raise RunError(
        f"{run.workdir / CONFIG_FILE} is missing or unreadable and "
        f"checkpoint {step} records no config to check this one against; "
        "restore config.json or use another --workdir")
  epoch, batch = run.position(step)
  run.log(f"resuming from checkpoint {step} (epoch {epoch + 1}, "
          f"batch {batch})")
  return state, meta


def restore_or_start(run: Run, state: steps.TrainState, *,
                     extend: bool = False
                     ) -> tuple[steps.TrainState, Any, list[dict[str, Any]]]:
  """Resume from the workdir's newest good checkpoint, or start at 0.

  Checks ``config.json`` and ``run.json`` (config and data fingerprints)
  and the identity stored in the restored checkpoint, refusing a run on
  another config or other data; refuses to overwrite the metrics of a run
  whose checkpoints are gone; repairs ``metrics.jsonl`` from the records
  stored with the checkpoint and drops the records of the epochs that will
  be trained again; (re)writes ``config.json`` and ``run.json`` atomically
  when they are missing, damaged or out of date. Returns ``(state,
  checkpointer, records kept)``. ``extend``: see :func:`check_workdir`.
  """
  identity = run_identity(run)
  config_ok, accepted, history = _check_run_files(
      run.workdir, run.config, identity, extend=extend)
  metrics_path = run.workdir / writers.METRICS_FILE
  manager = checkpointing.make_manager(
      run.workdir, max_to_keep=run.config.run.max_checkpoints)
  warn = run.log if run.is_main else (lambda _: None)
  try:
    state, meta = _restore_checked(run, state, manager, accepted, config_ok,
                                   warn)
  except BaseException:
    manager.close()
    raise
  if run.is_main:
    if len(history) > len(_stored_history(run.workdir)):
      history[-1]["at_step"] = int(state.step)
      warn(f"extending the run to {run.config.run.num_epochs} epochs from "
           f"step {int(state.step)}: the learning rate follows the "
           f"{run.config.run.num_epochs}-epoch schedule from here on")
    _write_run_files(run.workdir, run.config,
                     {**identity, **({"extended": history} if history else {})},
                     warn)
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
  return _identity(_config_dict(run.config), run.data.fingerprint)


def _identity(config: dict[str, Any], data_sha256: str) -> dict[str, str]:
  """:func:`workdir_lib.run_identity` of a config dict and its data."""
  return workdir_lib.run_identity(
      config, data_sha256, config["data"]["dataset"],
      ignored=tuple(config_lib.RESUMABLE_CHANGES))


def _check_identity(stored: dict[str, Any], accepted: list[dict[str, str]],
                    where: str) -> None:
  """Raise :class:`RunError` unless ``stored`` matches one of ``accepted``
  (the reason names the first, the run's own identity)."""
  reasons = [workdir_lib.identity_mismatch(stored, a, where)
             for a in accepted]
  if all(reasons):
    raise RunError(reasons[0])


def check_workdir(workdir: Path, config: ml_collections.ConfigDict,
                  data_sha256: str, steps_per_epoch: int, *,
                  extend: bool = False) -> Optional[list[dict[str, Any]]]:
  """Every check of the workdir that needs nothing compiled; returns the
  records of a finished run (None if there is anything left to train).

  Refuses another config (``config.json``), other data (``run.json``) and
  a newest checkpoint that records another run. ``extend`` accepts a
  config whose only change is a larger ``run.num_epochs``: the run
  continues with the schedule of the new length (recorded under
  ``extended`` in ``run.json``). A run is finished when its newest
  checkpoint is at the last step and matches its manifest, its
  ``config.json`` and ``run.json`` are readable and ``metrics.jsonl`` holds
  every epoch; nothing is restored to tell.

  Raises:
    RunError: the workdir holds another run (or ``extend`` cannot apply).
  """
  identity = _identity(_config_dict(config), data_sha256)
  _, accepted, _ = _check_run_files(workdir, config, identity, extend=extend)
  ckpts = workdir / checkpointing.CHECKPOINT_DIR
  saved = sorted(int(p.name) for p in ckpts.iterdir()
                 if p.name.isdigit()) if ckpts.is_dir() else []
  if not saved:
    return None
  step_dir = ckpts / str(saved[-1])
  stored = (integrity.read_meta(step_dir) or {}).get("identity")
  if isinstance(stored, dict):
    _check_identity(stored, accepted, f"checkpoint {saved[-1]} in {ckpts}")
  if saved[-1] != config.run.num_epochs * steps_per_epoch or any(
      workdir_lib.read_json(workdir / name)[0] != "ok"
      for name in (CONFIG_FILE, workdir_lib.RUN_FILE)):
    return None  # the resume rewrites a damaged config.json or run.json
  try:
    if not integrity.verify(step_dir):
      return None
  except integrity.IntegrityError:
    return None  # the restore falls back (and says so)
  scan = writers.scan_jsonl(workdir / writers.METRICS_FILE)
  epochs = [r["epoch"] for r in scan.records]
  if scan.damaged or epochs != list(range(config.run.num_epochs)):
    return None  # the resume repairs metrics.jsonl from the checkpoint
  return scan.records


def _check_run_files(workdir: Path, config: ml_collections.ConfigDict,
                     identity: dict[str, str], *, extend: bool = False
                     ) -> tuple[bool, list[dict[str, str]], list[dict]]:
  """Refuse to resume a run of another config or other data.

  Compares ``config`` with ``config.json`` and ``identity`` with
  ``run.json``, when they are readable. Returns whether ``config.json``
  or ``run.json`` was readable (so the config could be checked), the
  identities a checkpoint of this run may record (this one, and those
  before each extension) and the extensions (``run.json``'s ``extended``,
  plus this one if ``extend`` applies).

  Raises:
    RunError: the workdir holds a run with another config or other data.
  """
  status, old = workdir_lib.read_json(workdir / CONFIG_FILE)
  new = _config_dict(config)
  history = _stored_history(workdir)
  accepted = [identity] + [{**identity, "config_sha256": h["config_sha256"]}
                           for h in history if "config_sha256" in h]
  if status == "ok" and isinstance(old, dict):
    if config_lib.upgrade(old) is not old:  # its run.json hashes it as is
      accepted.append(_identity(old, identity["data_sha256"]))
    diff = config_lib.config_diff(old, new)
    if diff:
      _refuse_or_extend(workdir, diff, extend)
      before = _identity(old, identity["data_sha256"])["config_sha256"]
      history = history + [{"from_epochs": diff["run.num_epochs"][0],
                            "to_epochs": diff["run.num_epochs"][1],
                            "config_sha256": before}]
      accepted.append({**identity, "config_sha256": before})
  run_status, stored = workdir_lib.read_json(workdir / workdir_lib.RUN_FILE)
  if run_status == "ok" and isinstance(stored, dict):
    _check_identity(stored, accepted, str(workdir / workdir_lib.RUN_FILE))
  config_ok = ((status == "ok" and isinstance(old, dict))
               or (run_status == "ok" and isinstance(stored, dict)))
  return config_ok, accepted, history


def _refuse_or_extend(workdir: Path, diff: dict[str, tuple],
                      extend: bool) -> None:
  """Raise :class:`RunError` unless ``extend`` and the only change of the
  config is a larger ``run.num_epochs``."""
  changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
  epochs = diff.get("run.num_epochs")
  if set(diff) == {"run.num_epochs"} and epochs[1] > epochs[0]:
    if extend:
      return
    raise RunError(
        f"{workdir} holds a {epochs[0]}-epoch run ({changes}): the "
        "learning-rate schedule depends on run.num_epochs; add --extend to "
        f"continue it on the {epochs[1]}-epoch schedule (see "
        "docs/training.md), or use another --workdir")
  raise RunError(
      f"{workdir} holds a run with a different config {changes}; "
      + ("--extend only allows a larger run.num_epochs; " if extend else "")
      + "use another --workdir")


def _stored_history(workdir: Path) -> list[dict[str, Any]]:
  """The ``extended`` entries of the workdir's ``run.json`` ([] if none)."""
  status, stored = workdir_lib.read_json(workdir / workdir_lib.RUN_FILE)
  history = stored.get("extended") if (
      status == "ok" and isinstance(stored, dict)) else None
  return [h for h in history if isinstance(h, dict)] if isinstance(
      history, list) else []


def _write_run_files(workdir: Path, config: ml_collections.ConfigDict,
                     identity: dict[str, Any],
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


__all__ = ["CONFIG_FILE", "RunError", "check_workdir", "restore_or_start",
           "run_identity"]
