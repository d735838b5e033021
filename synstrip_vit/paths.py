"""Where the shared data (data sets, reference fixtures) lives.

One resolver for configs, tests, benches and the study: the folder named by
``$SYNSTRIP_SHARED`` when set, else ``shared/`` beside the repository
(``<repo>/../shared``, the layout of a checkout next to its data).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that overrides the shared folder.
SHARED_ENV = "SYNSTRIP_SHARED"
#: The repository root (the folder holding ``synstrip_vit/``).
REPO = Path(__file__).resolve().parents[1]


class SharedDataNotFoundError(FileNotFoundError):
  """A file expected in the shared folder is missing."""


def shared_dir() -> Path:
  """``$SYNSTRIP_SHARED`` if set, else ``<repo>/../shared`` (not checked).

  Returns the path whether or not it exists, so that a config can name a
  file in it before anything is read; use :func:`shared_file` to require it.
  """
  env = os.environ.get(SHARED_ENV)
  return Path(env).expanduser() if env else REPO.parent / "shared"


def shared_file(*parts: str) -> Path:
  """``shared_dir() / parts``, which must exist.

  Raises:
    SharedDataNotFoundError: (a ``FileNotFoundError``) naming the path tried
      and how to point at another folder.
  """
  path = shared_dir().joinpath(*parts)
  if not path.exists():
    raise SharedDataNotFoundError(
        f"shared data {'/'.join(parts)!r} not found at {str(path)!r} (set "
        f"{SHARED_ENV} to the folder holding {'/'.join(parts)})")
  return path


__all__ = ["REPO", "SHARED_ENV", "SharedDataNotFoundError", "shared_dir",
           "shared_file"]
