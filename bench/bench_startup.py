"""Time to first result: the short training run, cold and warm, stage by stage.

Usage, with the package installed (``pip install -e ".[test]"``)::

    python bench/bench_startup.py [--quick] [--reps N] [--epochs 3]
        [--out bench/results/startup.jsonl]

Runs ``python experiments/train_vit.py --config.run.num_epochs=3`` (the
offline default: ViT on digits) as subprocesses, in pairs:

* **cold**: a fresh, empty compilation cache directory and a fresh workdir
  (every program is compiled, and written to the cache);
* **warm**: the same cache directory (now populated) and another fresh
  workdir (what a rerun, a second run of the config or a resume sees).

Each run's stages come from the ``timings.json`` the script writes to its
workdir (imports, data, init_compile, restore + writers, saves, plots, total;
see ``synstrip_vit/timings.py``) and from ``metrics.jsonl`` (epoch 0's train,
eval + probe and strip times, the later epochs); ``exit`` is the wall time the
parent measured minus the script's own total (interpreter start and exit).
The CPU time (user + sys) of each child is reported too: on a shared machine
it moves less with the load than the wall time. The load average
(``os.getloadavg``) is printed and stored with every row.

``--before DIR`` adds a column: the script of another checkout (e.g. ``git
archive <rev> | tar -x -C DIR``), run cold first in every rep (an empty
``JAX_COMPILATION_CACHE_DIR``) without the cache option (stages it does not report are ``nan``).

Prints the breakdown side by side (the median over ``--reps`` pairs, default
2; ``--quick``: 1 pair), whether the issue's targets are met (3-epoch run at
most 15 s cold and 8 s warm on the 2-core CPU; printed, not asserted), and
appends one JSON line per run with machine info to ``--out`` (``''``: none).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from _common import append_jsonl, machine_info, make_parser

from synstrip_vit import writers

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "train_vit.py"
TARGETS = {"cold": 15.0, "warm": 8.0}

#: Rows of the printed breakdown: (key, label).
ROWS = (
    ("imports", "imports + flags"),
    ("data", "data (digits)"),
    ("init_compile", "init + compile (init, train, eval)"),
    ("restore", "restore + writers"),
    ("epoch0_train", "epoch 0: train"),
    ("epoch0_eval", "epoch 0: eval + probe"),
    ("epoch0_strip", "epoch 0: strip"),
    ("later_epochs", "later epochs (train+eval+strip)"),
    ("epochs_other", "records, logs (all epochs)"),
    ("saves", "checkpoint saves"),
    ("plots", "plots"),
    ("exit", "interpreter start + exit"),
    ("wall", "total wall"),
    ("cpu", "CPU time (user + sys)"),
)


def run_once(cache_dir: Optional[Path], workdir: Path, epochs: int,
             repo: Path = REPO) -> dict[str, Any]:
  """One run of ``repo``'s script; its stages in seconds.

  ``cache_dir=None`` (the ``before`` arm): run without the cache option,
  with ``JAX_COMPILATION_CACHE_DIR`` set to a fresh empty directory, so a
  checkout with or without a default cache runs cold (compiles everything);
  stages missing from its outputs are NaN.
  """
  cmd = [sys.executable, str(repo / "experiments" / "train_vit.py"),
         f"--workdir={workdir}", f"--config.run.num_epochs={epochs}",
         "--config.run.progress_bar=False"]
  env = dict(os.environ)
  if cache_dir is None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(workdir) + "_empty_cache"
  else:
    cmd.append(f"--config.run.compilation_cache_dir={cache_dir}")
  env["PYTHONPATH"] = str(repo)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        check=False)
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  path = workdir / "timings.json"
  nan = float("nan")
  timings = (json.loads(path.read_text()) if path.exists() else
             {k: nan for k in ("imports", "data", "init_compile", "restore",
                               "epochs", "saves", "plots")} | {"total": nan})
  records = writers.read_jsonl(workdir / writers.METRICS_FILE)
  first, later = records[0], records[1:]
  per_epoch = sum(r["train_time_s"] + r["eval_time_s"] + r["strip_time_s"]
                  for r in records)
  return {
      "imports": timings["imports"], "data": timings["data"],
      "init_compile": timings["init_compile"],
      "restore": timings["restore"] + timings.get("writers", 0.0),
      "epoch0_train": first["train_time_s"],
      "epoch0_eval": first["eval_time_s"],
      "epoch0_strip": first["strip_time_s"],
      "later_epochs": sum(r["train_time_s"] + r["eval_time_s"]
                          + r["strip_time_s"] for r in later),
      "epochs_other": timings["epochs"] - per_epoch,
      "saves": timings["saves"], "plots": timings.get("plots", 0.0),
      "exit": wall - timings["total"], "wall": wall,
      "cpu": (after.ru_utime - before.ru_utime
              + after.ru_stime - before.ru_stime),
      "script_total": timings["total"],
  }


def main() -> None:
  parser = make_parser(__doc__, "startup.jsonl",
                       quick="one cold/warm pair", reps="cold/warm pairs "
                       "(default 2)")
  parser.add_argument("--epochs", type=int, default=3,
                      help="run.num_epochs of each run (default 3)")
  parser.add_argument(
      "--before", default="",
      help="another checkout (e.g. `git archive <rev> | tar -x -C DIR`) whose "
      "script also runs once per rep, first, as the 'before' column")
  args = parser.parse_args()
  reps = args.reps or (1 if args.quick else 2)
  info = machine_info()
  arms = (("before",) if args.before else ()) + ("cold", "warm")
  results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
  rows = []
  with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
    for rep in range(reps):
      cache = Path(tmp) / f"cache{rep}"  # fresh: the cold run fills it
      cache.mkdir()
      for arm in arms:
        load = os.getloadavg()[0]
        stages = run_once(None if arm == "before" else cache,
                          Path(tmp) / f"{arm}{rep}", args.epochs,
                          Path(args.before) if arm == "before" else REPO)
        results[arm].append(stages)
        print(f"rep {rep} {arm}: wall {stages['wall']:.1f} s, cpu "
              f"{stages['cpu']:.1f} s (load {load:.1f})", flush=True)
        rows.append({"bench": "startup", "arm": arm, "rep": rep,
                     "epochs": args.epochs, "load_avg_1m": load,
                     "cache_files": len(list(cache.iterdir())),
                     **{k: round(v, 4) for k, v in stages.items()}, **info})

  def med(arm: str, key: str) -> float:
    return statistics.median(r[key] for r in results[arm])

  print(f"\nexperiments/train_vit.py --config.run.num_epochs={args.epochs}"
        f" (median of {reps}; seconds; load avg {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs)\n")
  print("| stage | " + " | ".join(arms) + " |")
  print("|---|" + "---:|" * len(arms))
  for key, label in ROWS:
    print(f"| {label} | "
          + " | ".join(f"{med(arm, key):.2f}" for arm in arms) + " |")
  if args.epochs == 3:
    for arm, target in TARGETS.items():
      wall = med(arm, "wall")
      print(f"{arm}: {wall:.1f} s wall, target <= {target:.0f} s: "
            f"{'met' if wall <= target else 'NOT met'}")
  if args.out:
    n = append_jsonl(args.out, rows)
    print(f"appended {n} rows to {args.out}")


if __name__ == "__main__":
  main()
