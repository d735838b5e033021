"""Checkpoint integrity, the metadata kept with each checkpoint, and repair.

Every checkpoint step directory ``checkpoints/<step>/`` gets two files from
process 0 once orbax has finished (and committed) the save:

* ``synstrip_meta.json``: the run's identity (config and data fingerprints,
  :func:`synstrip_vit.workdir.run_identity`) and the metric records of every
  epoch finished before the checkpoint, so that ``metrics.jsonl`` can be
  rebuilt from the checkpoint alone;
* ``synstrip_manifest.json`` (written last): the SHA-256 and size of every
  other file of the step directory.

:func:`verify` checks a step against its manifest before it is restored; a
mismatch (a flipped byte, a truncated or missing file, a damaged manifest)
makes the checkpoint unreadable, and the loader falls back to the previous
one. A step without a manifest (a run killed between orbax's commit and the
manifest, or a checkpoint of an older version) is not verifiable and is
restored as it is (it is still refused if its state is not finite).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from synstrip_vit import workdir as workdir_lib
from synstrip_vit import writers

MANIFEST_FILE = "synstrip_manifest.json"
META_FILE = "synstrip_meta.json"
_FORMAT = 1


class IntegrityError(ValueError):
  """A checkpoint's files do not match its manifest (says which file)."""


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
  """Every file of a step directory but the manifest, sorted."""
  return sorted(p for p in step_dir.rglob("*")
                if p.is_file() and p.name != MANIFEST_FILE
                and not p.name.endswith(".tmp"))


def manifest(step_dir: str | Path) -> dict[str, Any]:
  """``{"format", "files": {relative path: {"sha256", "size"}}}`` of a step."""
  step_dir = Path(step_dir)
  return {"format": _FORMAT,
          "files": {p.relative_to(step_dir).as_posix():
                    {"sha256": _sha256(p), "size": p.stat().st_size}
                    for p in _files(step_dir)}}


def write_manifest(step_dir: str | Path) -> None:
  """Write the step's manifest (atomically; after every other file)."""
  step_dir = Path(step_dir)
  workdir_lib.atomic_write_text(step_dir / MANIFEST_FILE,
                                json.dumps(manifest(step_dir), indent=1))


def verify(step_dir: str | Path) -> bool:
  """Check a step directory against its manifest.

  Returns:
    True if it matches, False if it has no manifest (not verifiable).

  Raises:
    IntegrityError: the manifest is unreadable, or a file is missing,
      extra, of another size or another SHA-256 (names the file).
  """
  step_dir = Path(step_dir)
  status, m = workdir_lib.read_json(step_dir / MANIFEST_FILE)
  if status == "missing":
    return False
  if (status != "ok" or not isinstance(m, dict)
      or not isinstance(m.get("files"), dict)):
    raise IntegrityError(f"{MANIFEST_FILE} is damaged ({m or 'bad layout'})")
  files = {p.relative_to(step_dir).as_posix(): p for p in _files(step_dir)}
  for rel in sorted(set(m["files"]) | set(files)):
    if rel not in files:
      raise IntegrityError(f"{rel} is missing")
    if rel not in m["files"]:
      raise IntegrityError(f"{rel} is not in the manifest")
    want = m["files"][rel]
    if not isinstance(want, dict):
      raise IntegrityError(f"{MANIFEST_FILE} entry of {rel} is damaged")
    size = files[rel].stat().st_size
    if size != want.get("size"):
      raise IntegrityError(f"{rel} has {size} bytes, the manifest says "
                           f"{want.get('size')}")
    if _sha256(files[rel]) != want.get("sha256"):
      raise IntegrityError(f"{rel} does not match its SHA-256")
  return True


def write_meta(step_dir: str | Path, meta: Mapping[str, Any]) -> None:
  """Write ``synstrip_meta.json`` (atomically) into a step directory."""
  workdir_lib.atomic_write_text(Path(step_dir) / META_FILE,
                                json.dumps(dict(meta)))


def read_meta(step_dir: str | Path) -> Optional[dict[str, Any]]:
  """The step's ``synstrip_meta.json`` (None if absent or unreadable)."""
  status, meta = workdir_lib.read_json(Path(step_dir) / META_FILE)
  return meta if status == "ok" and isinstance(meta, dict) else None


# --------------------------------------------------------- metrics repair

def jsonl_text(records: Sequence[Mapping[str, Any]]) -> str:
  """The ``metrics.jsonl`` content of ``records`` (one line each)."""
  return "".join(json.dumps(dict(r)) + "\n" for r in records)


def reconcile_metrics(path: str | Path, epoch: int,
                      checkpointed: Optional[Sequence[Mapping[str, Any]]]
                      ) -> tuple[list[dict[str, Any]], Optional[str]]:
  """Make ``metrics.jsonl`` hold exactly the epochs before ``epoch``.

  Args:
    path: the metrics file.
    epoch: the first epoch the resumed run trains (records of it and later
      ones are recomputed, so they are dropped).
    checkpointed: the records stored with the restored checkpoint (every
      epoch before ``epoch``), or None (a checkpoint of an older version):
      then the file's own records are kept.

  Returns:
    ``(records kept, warning or None)``. When the file is damaged, truncated
    or lacks an epoch the checkpoint has, it is rewritten (atomically) from
    the checkpoint's records and the warning says so. Without checkpointed
    records the file's damaged lines are dropped with a warning.
  """
  path = Path(path)
  found, damaged_lines, _ = writers.scan_jsonl(path)
  damaged = len(damaged_lines)
  kept = [r for r in found if r["epoch"] < epoch]
  warning = None
  if checkpointed is not None:
    want = [dict(r) for r in checkpointed if int(r["epoch"]) < epoch]
    if kept != want:
      have = [r["epoch"] for r in kept]
      warning = (f"warning: {path} was damaged or incomplete (epochs {have}"
                 f"{f', {damaged} unreadable line(s)' if damaged else ''}); "
                 f"rewritten from the checkpoint's {len(want)} records")
    kept = want
  elif damaged:
    warning = (f"warning: {path}: dropped {damaged} unreadable line(s) and "
               "the checkpoint holds no records to rebuild them from")
  text = jsonl_text(kept)
  if (path.read_bytes() != text.encode() if path.exists() else kept):
    workdir_lib.atomic_write_text(path, text)
  return kept, warning


__all__ = ["IntegrityError", "MANIFEST_FILE", "META_FILE", "jsonl_text",
           "manifest", "read_meta", "reconcile_metrics", "verify",
           "write_manifest", "write_meta"]
