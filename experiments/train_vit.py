"""Train a ViT (or MLP) with synaptic stripping.

  python experiments/train_vit.py                       # offline default
  python experiments/train_vit.py --config=experiments/configs/default.py:mlp
  python experiments/train_vit.py --config=experiments/configs/vit_cifar10.py
      --workdir=runs/c10 [--config.run.num_epochs=50 ...]

Every config field is set on the command line as --config.<section>.<field>
(e.g. --config.stripping.factor=0.1); the fields, the files a run writes and
its metrics are described in docs/training.md.

Rerunning the same command resumes from the latest checkpoint in --workdir;
Ctrl-C (or SIGTERM) saves the step reached first. A finished run says so at
once; --extend with a larger --config.run.num_epochs trains it further (on
the schedule of the new length). Every visible device (of every process) is
used, data-parallel; on several hosts, start the same command on each (see
docs/multi_device.md).

Compiled programs are kept in JAX's persistent compilation cache (default
~/.cache/synstrip_jax/jax_cache; --config.run.compilation_cache_dir=DIR
moves it, --config.run.compilation_cache_dir= turns it off), so a rerun or
a resume skips compiling. Stage timings go to <workdir>/timings.json.
"""

import time

_START = time.perf_counter()  # before the imports: timings.json counts them

# pylint: disable=wrong-import-position
import datetime
import gc
import os
import re
import sys
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

#: XLA:CPU flags this script sets before JAX starts (see bench/README.md,
#: "bench_torch.py"): no YNNPACK fusions. Measured side by side on a 2-core
#: CPU (bench/bench_torch.py, bench/results/torch.jsonl): train step 1.07-1.13x,
#: eval 1.5x, probe 1.25x faster than XLA's default. They only affect
#: XLA:CPU. A flag of the same name already in the user's XLA_FLAGS wins;
#: SYNSTRIP_DEFAULT_XLA_FLAGS=0 sets none.
DEFAULT_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def apply_default_xla_flags(environ=os.environ) -> str:
  """Prepend :data:`DEFAULT_XLA_FLAGS` to ``XLA_FLAGS`` (before JAX starts),
  leaving out any flag the user's ``XLA_FLAGS`` already sets; returns the
  new value."""
  user = environ.get("XLA_FLAGS", "")
  if environ.get("SYNSTRIP_DEFAULT_XLA_FLAGS", "1") == "0":
    return user
  named = {f.split("=", 1)[0] for f in user.split()}
  extra = [f for f in DEFAULT_XLA_FLAGS if f.split("=", 1)[0] not in named]
  if extra:
    environ["XLA_FLAGS"] = " ".join(extra + ([user] if user else []))
  return environ.get("XLA_FLAGS", "")


apply_default_xla_flags()

from synstrip_vit import checkpointing, compile_cache, distributed, loop  # noqa: E402
from synstrip_vit import config as config_lib  # noqa: E402
from synstrip_vit import interrupt, paths, resume  # noqa: E402
from synstrip_vit import workdir as workdir_lib  # noqa: E402
from synstrip_vit.timings import StageTimer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = REPO / "experiments" / "configs" / "default.py"

def _unescape(text: str) -> str:
  """``text`` without the backslash escapes of nested reprs (ml_collections
  wraps its messages in ``KeyError`` reprs): one line, plain quotes."""
  for _ in range(4):
    text = text.replace("\\\\", "\\").replace("\\'", "'").replace(
        '\\"', '"')
  return " ".join(text.replace("\\n", " ").split())


def _unknown_field(error: Exception) -> str:
  """The one-line error for an unknown ``--config.<field>`` (its full path
  and ml_collections' suggestion, as plain text)."""
  message = _unescape(str(error.args[0]) if error.args else str(error))
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', message)
  key = hint.group(2) if hint else message.split(" Did you")[0].strip("\"' ")
  suggestion = hint.group(1) if hint else None
  for arg in sys.argv[1:]:
    if arg.startswith("--config."):
      path = arg[len("--config."):].split("=")[0]
      if key in path.split("."):
        if suggestion:
          suggestion = ".".join(suggestion if p == key else p
                                for p in path.split("."))
        key = path
        break
  if key in config_lib.REPLACED_FIELDS:
    return f"error: {config_lib.replaced_field(key)}"
  return (f"error: unknown config field {key!r} on the command line"
          + (f"; did you mean {suggestion!r}?" if suggestion else ""))


def _workdir_name(config_file: str) -> str:
  """``<config file stem>[-<argument>]-<time>``, e.g. ``default-mlp-...``."""
  stem, _, argument = config_file.partition(":")
  name = "-".join(p for p in (Path(stem).stem, re.sub(r"[^\w.-]+", "_",
                                                      argument)) if p)
  return f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _with_hints(message: str) -> str:
  """``message``, and when it names a missing path under the shared folder,
  where that folder came from and how to point elsewhere."""
  shared = str(paths.shared_dir())
  if shared not in message or "exist" not in message:
    return message
  source = (f"${paths.SHARED_ENV}" if os.environ.get(paths.SHARED_ENV)
            else f"the default <repo>/../shared (${paths.SHARED_ENV} unset)")
  return (f"{message} (the shared folder {shared} comes from {source}; set "
          f"{paths.SHARED_ENV} to the folder holding data/)")


try:  # ml_collections applies --config.<field> overrides already here
  _CONFIG = config_flags.DEFINE_config_file(
      "config", str(DEFAULT_CONFIG), "Config file (ml_collections).",
      lock_config=True)
except (AttributeError, KeyError) as _e:
  sys.exit(_unknown_field(_e))
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Run directory (default: a fresh runs/<config>[-<argument>]-<time>).")
_EXTEND = flags.DEFINE_bool(
    "extend", False,
    "Continue the run in --workdir with a larger --config.run.num_epochs "
    "(the learning rate follows the schedule of the new length from the "
    "step reached; recorded in run.json; see docs/training.md).")
distributed.define_flags()


def _parse_flags(argv):
  """absl's parser, with a one-line error for a bad command line."""
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:  # ml_collections: an unknown --config.<field>
    print(_unknown_field(e), file=sys.stderr)
  except (flags.Error, KeyError, TypeError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  timer = StageTimer(start=_START)
  timer.add("imports", time.perf_counter() - _START)
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  if not Path(config_file.split(":")[0]).is_file():
    sys.exit(f"error: --config file {config_file.split(':')[0]!r} does not "
             "exist")
  try:
    config = _CONFIG.value
  except Exception as e:  # pylint: disable=broad-except  # a broken config file
    sys.exit(f"error: cannot load --config {config_file!r}: "
             + " ".join(str(e).split()))
  distributed.initialize_from_flags()
  compile_cache.enable(config.run.compilation_cache_dir)
  workdir = _WORKDIR.value
  if workdir is None:
    workdir = str(REPO / "runs" / _workdir_name(config_file))
  print(f"workdir: {workdir}", flush=True)
  try:
    with interrupt.catch_signals(interrupt.StopFlag()) as stop:
      loop.train_and_evaluate(config, workdir, timer=timer,
                              extend=_EXTEND.value, stop=stop)
  except interrupt.Interrupted as e:
    print(e.message, file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except (ValueError, resume.RunError, FloatingPointError, OSError,
          checkpointing.CheckpointError, workdir_lib.WorkdirError) as e:
    print(f"error: {_with_hints(' '.join(str(e).split()))}", file=sys.stderr,
          flush=True)
    sys.exit(1)
  if "init_compile" in timer.stages:  # else: a finished run, said so
    print(f"done: metrics in {workdir}/metrics.jsonl, plots "
          f"{workdir}/{{accuracy,dead_neurons,active_params}}.png",
          flush=True)
  # Everything is written. Exclude the objects of JAX, Flax, Orbax, ... from
  # the interpreter's final garbage collections: exiting takes ~0.1 s, not
  # ~1.3 s (atexit handlers still run).
  gc.freeze()


if __name__ == "__main__":
  absl_logging.set_verbosity(absl_logging.WARNING)
  app.run(main, flags_parser=_parse_flags)
