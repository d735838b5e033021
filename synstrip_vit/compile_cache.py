"""JAX's persistent compilation cache for the training script.

``experiments/train_vit.py`` turns the cache on by default, so that a rerun, a
resume or a second run of the same config loads its compiled programs
(train, eval/probe and strip steps, the init) from disk instead of compiling
them again. The location, in order of precedence:

1. ``--config.run.compilation_cache_dir=<path>``; ``''`` disables the cache;
2. the ``JAX_COMPILATION_CACHE_DIR`` environment variable;
3. ``$XDG_CACHE_HOME/synstrip_jax/jax_cache`` (default
   ``~/.cache/synstrip_jax/jax_cache``): :data:`DEFAULT_DIR`.

Every compiled program is cached (``jax_persistent_cache_min_compile_time_secs
= 0``), not only those that compile for a second or more. Entries are keyed by
the program, the compile options, the devices and the JAX/XLA version, so a
change of any of them compiles afresh; the cache is never wrong, only missed.

Several processes may share the directory: JAX writes each entry under its own
key (only process 0 of a multi-process run writes). JAX does not write an entry
atomically, so a process that reads an entry while another is still writing it,
or an entry left half-written by a killed process, gives a warning ("Error
reading persistent compilation cache entry") and a fresh compile, never a
wrong program; deleting the directory clears such an entry. The cache is
never evicted: delete the directory to reclaim the space.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import jax

#: Environment variable JAX reads for the cache location.
ENV_VAR = "JAX_COMPILATION_CACHE_DIR"


def default_dir() -> Path:
  """``$XDG_CACHE_HOME/synstrip_jax/jax_cache`` (``~/.cache`` by default)."""
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "synstrip_jax" / "jax_cache"


def resolve_dir(configured: Optional[str]) -> Optional[Path]:
  """Where the cache goes: see the module docstring; ``None`` = disabled.

  Args:
    configured: ``config.run.compilation_cache_dir``: ``None`` (unset) for
      ``$JAX_COMPILATION_CACHE_DIR`` or :func:`default_dir`, ``''`` to
      disable, else a path (``~`` expanded).
  """
  if configured is None:
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else default_dir()
  if configured == "":
    return None
  return Path(configured).expanduser()


def enable(configured: Optional[str]) -> Optional[Path]:
  """Turn the persistent compilation cache on (or off) for this process.

  Must run before the first compilation of the process. Returns the
  directory used, or ``None`` when the cache is disabled.
  """
  path = resolve_dir(configured)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path


__all__ = ["ENV_VAR", "default_dir", "enable", "resolve_dir"]
