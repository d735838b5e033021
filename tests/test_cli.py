"""What a user meets at the command line of experiments/train_vit.py.

Ctrl-C and SIGTERM (one line, the step saved, an exact resume), the checks
that come before the first compile, finished and extended runs, readable
one-line errors and ``--help``, file modes under the umask, workdir names.
Tiny runs on scikit-learn's digits (offline), as in test_train_vit.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from _shared import assert_bitwise_equal, finish, start_python, subprocess_env
from test_train_vit import (SCRIPT, final_params, overrides_argv, run_script,
                            script_env, strip_times, tiny_config)

from synstrip_vit import interrupt, loop, resume, rundata, startup, timings
from synstrip_vit import writers
from synstrip_vit import workdir as workdir_lib


INTERRUPTED = re.compile(r"interrupted after epoch (\d+), step (\d+); rerun "
                         r"the same command to resume")
EXTRA = {"run.num_epochs": 3}


def quiet(_):
  """A ``log`` that drops the messages."""


def script_output(*args, env=None, timeout=120):
  """``(returncode, stdout, stderr)`` of the script with ``args`` only."""
  proc = start_python([SCRIPT, *args], env=env or script_env())
  stdout, stderr = finish(proc, timeout, "train_vit.py")
  return proc.returncode, stdout, stderr


# ------------------------------------------------------------ signals

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ref") / "wd"
  res = run_script(workdir, overrides=EXTRA)
  assert res.returncode == 0, res.stderr[-3000:]
  return workdir


def _signal_after_first_epoch(proc, workdir, signum):
  """Send ``signum`` once epoch 1's record is written (training runs)."""
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if writers.scan_jsonl(workdir / writers.METRICS_FILE).records:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be interrupted"
  proc.send_signal(signum)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_one_line_then_rerun_matches_uninterrupted(
    tmp_path, uninterrupted, signum):
  """Ctrl-C / SIGTERM while training: exit 128 + signal with one line, no
  traceback, a checkpoint at the step named; rerunning the same command
  ends exactly as the uninterrupted run."""
  workdir = tmp_path / "wd"
  proc = start_python([SCRIPT, f"--workdir={workdir}",
                       *overrides_argv(EXTRA)], env=script_env(),
                      stdout=subprocess.DEVNULL)
  _signal_after_first_epoch(proc, workdir, signum)
  _, stderr = finish(proc, 300, "interrupted train_vit.py")
  assert proc.returncode == 128 + signum, stderr[-3000:]
  assert "Traceback" not in stderr
  lines = [l for l in stderr.splitlines() if l.strip()]
  match = INTERRUPTED.fullmatch(lines[-1])
  assert match, lines[-1]
  epochs_done, step = int(match.group(1)), int(match.group(2))
  assert (workdir / "checkpoints" / str(step)).is_dir()
  assert len(writers.read_jsonl(workdir / writers.METRICS_FILE)) == epochs_done
  res = run_script(workdir, overrides=EXTRA)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"resuming from checkpoint {step} " in res.stdout
  config = tiny_config(EXTRA)
  assert_bitwise_equal(final_params(config, uninterrupted)[0],
                       final_params(config, workdir)[0])
  assert strip_times(writers.read_jsonl(workdir / "metrics.jsonl")) == \
      strip_times(writers.read_jsonl(uninterrupted / "metrics.jsonl"))


@pytest.fixture(scope="module")
def uninterrupted_in_process(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ref_ip") / "wd"
  config = tiny_config(EXTRA)
  records = loop.train_and_evaluate(config, workdir, log=quiet)
  return config, records, final_params(config, workdir)[0]


@pytest.mark.slow
@pytest.mark.parametrize("request_at, saved", [(5, (0, 6)), (8, (1, 9)),
                                               (9, (1, 9)), (12, (1, 13))])
def test_stop_saves_the_step_reached_and_resumes_exactly(
    tmp_path, uninterrupted_in_process, request_at, saved):
  """A stop requested after step ``request_at`` (9 steps per epoch) saves
  the next step (at an epoch's last batch: the finished epoch) and raises;
  the resumed run ends bit-identical to the uninterrupted one."""
  config, ref_records, ref_params = uninterrupted_in_process
  workdir = tmp_path / "wd"
  stop = interrupt.StopFlag()

  def on_step(step):
    if step == request_at:
      stop.request(signal.SIGTERM)

  with pytest.raises(interrupt.Interrupted) as info:
    loop.train_and_evaluate(config, workdir, log=quiet, on_step=on_step,
                            stop=stop)
  assert (info.value.epochs_done, info.value.step) == saved
  assert info.value.exit_code == 143
  assert (workdir / "checkpoints" / str(saved[1])).is_dir()
  loop.train_and_evaluate(config, workdir, log=quiet)
  params, position = final_params(config, workdir)
  assert position == (3, 0)
  assert_bitwise_equal(ref_params, params)
  assert strip_times(writers.read_jsonl(workdir / "metrics.jsonl")) == \
      strip_times(ref_records)


def test_stop_flag_raises_at_once_before_training_and_on_a_second_signal():
  with pytest.raises(interrupt.Interrupted,
                     match="before training started") as early:
    interrupt.StopFlag().request(signal.SIGTERM)
  assert early.value.exit_code == 143
  flag = interrupt.StopFlag()
  flag.arm()
  flag.request(signal.SIGINT)  # armed: only recorded
  assert flag.requested
  with pytest.raises(interrupt.Interrupted) as second:
    flag.request(signal.SIGINT)
  assert second.value.exit_code == 130


# ------------------------------------------------ checks before compiling

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 2-epoch tiny run and its records."""
  workdir = tmp_path_factory.mktemp("fin") / "wd"
  config = tiny_config()
  loop.train_and_evaluate(config, workdir, log=quiet)
  return workdir, writers.read_jsonl(workdir / writers.METRICS_FILE)


@pytest.fixture
def compile_spy(monkeypatch, count_compiles):
  """Makes the start-up compile fail loudly; counts backend compiles."""
  def compile_in_parallel(*args, **kwargs):
    raise AssertionError("compiled before the check")
  monkeypatch.setattr(startup, "compile_in_parallel", compile_in_parallel)
  with count_compiles() as counter:
    yield counter


@pytest.mark.parametrize("overrides, expected", [
    ({"run.seed": 1}, "different config run.seed: 0 -> 1"),
    ({"data.train_limit": 288}, "different config data.train_limit"),
    ({"run.num_epochs": 3}, "add --extend to continue it on the 3-epoch"),
    ({"run.num_epochs": 1}, "different config run.num_epochs: 2 -> 1"),
])
def test_refused_config_is_reported_before_any_compile(finished, compile_spy,
                                                       overrides, expected):
  workdir, _ = finished
  timer = timings.StageTimer()
  with pytest.raises(resume.RunError, match=re.escape(expected)):
    loop.train_and_evaluate(tiny_config(overrides), workdir, log=quiet,
                            timer=timer)
  assert compile_spy.count == 0, compile_spy.names
  assert "init_compile" not in timer.stages and "data" in timer.stages


def test_other_data_and_held_lock_are_refused_before_any_compile(
    finished, compile_spy, tmp_path):
  workdir, _ = finished
  run_json = workdir / workdir_lib.RUN_FILE
  saved = run_json.read_text()
  stored = json.loads(saved)
  try:
    run_json.write_text(json.dumps({**stored, "data_sha256": "0" * 64}))
    with pytest.raises(resume.RunError, match="other data"):
      loop.train_and_evaluate(tiny_config(), workdir, log=quiet)
  finally:
    run_json.write_text(saved)
  with workdir_lib.exclusive(workdir, log=quiet):
    with pytest.raises(workdir_lib.WorkdirError, match="in use"):
      loop.train_and_evaluate(tiny_config(), workdir, log=quiet)
  missing = tiny_config({"data.dataset": f"npz:{tmp_path / 'none.npz'}"})
  with pytest.raises(ValueError, match="does not exist"):
    loop.train_and_evaluate(missing, tmp_path / "wd", log=quiet)
  assert compile_spy.count == 0, compile_spy.names


def test_finished_run_says_so_without_restoring_or_compiling(finished,
                                                             compile_spy):
  workdir, records = finished
  before = (workdir / writers.METRICS_FILE).read_text()
  lines, timer = [], timings.StageTimer()
  again = loop.train_and_evaluate(tiny_config(), workdir, log=lines.append,
                                  timer=timer)
  assert lines == [f"run complete: 2 epochs; metrics in "
                   f"{workdir / writers.METRICS_FILE}"]
  assert again == records
  assert "restore" not in timer.stages and "init_compile" not in timer.stages
  assert compile_spy.count == 0, compile_spy.names
  assert (workdir / writers.METRICS_FILE).read_text() == before


@pytest.mark.slow  # by default: the refusal that points at --extend
def test_extend_continues_on_the_longer_schedule_and_records_it(finished,
                                                                tmp_path):
  source, records = finished
  workdir = tmp_path / "wd"
  shutil.copytree(source, workdir)
  longer = tiny_config({"run.num_epochs": 3})
  extended = loop.train_and_evaluate(longer, workdir, log=quiet, extend=True)
  assert [r["epoch"] for r in extended] == [0, 1, 2]
  assert strip_times(writers.read_jsonl(workdir / "metrics.jsonl")[:2]) == \
      strip_times(records)
  # The 3-epoch schedule from step 18 on: a warm restart (the 2-epoch one
  # had decayed to its minimum there).
  _, schedule, _ = startup.model_and_schedule(longer, rundata.RunData(longer))
  assert extended[2]["learning_rate"] == pytest.approx(
      float(schedule(extended[2]["step"])))
  assert float(schedule(records[1]["step"])) > 2 * records[1]["learning_rate"]
  history = json.loads((workdir / workdir_lib.RUN_FILE).read_text())[
      "extended"]
  assert [(h["from_epochs"], h["to_epochs"], h["at_step"])
          for h in history] == [(2, 3, records[1]["step"])]
  lines = []
  loop.train_and_evaluate(longer, workdir, log=lines.append)
  assert lines[-1].startswith("run complete: 3 epochs")


# ------------------------------------------------ messages, files, names

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600),
                                         (0o002, 0o664)])
def test_atomic_write_follows_the_umask(tmp_path, umask, mode):
  old = os.umask(umask)
  try:
    workdir_lib.atomic_write_text(tmp_path / "f.json", "{}")
  finally:
    os.umask(old)
  assert (tmp_path / "f.json").stat().st_mode & 0o777 == mode


def test_run_files_and_plots_are_0644(finished):
  workdir, _ = finished
  for name in ("config.json", "run.json", "timings.json", "metrics.jsonl",
               "accuracy.png", "dead_neurons.png", "active_params.png"):
    assert (workdir / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_records_count_the_strippable_neurons(finished):
  _, records = finished
  for r in records:
    dead = sum(v for k, v in r.items() if k.startswith("dead/"))
    assert dead == r["dead_neurons"] <= r["strippable_neurons"]
    assert r["strippable_neurons"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("arg, expected", [
    ("--config.stripping.facter=0.1",
     "error: unknown config field 'stripping.facter' on the command line; "
     "did you mean 'stripping.factor'?"),
    ("--config.run.num_epoch=3",
     "error: unknown config field 'run.num_epoch' on the command line; "
     "did you mean 'run.num_epochs'?"),
])
def test_typo_is_one_plain_line_with_the_suggestion(arg, expected):
  code, _, stderr = script_output(arg)
  assert code != 0
  assert stderr.strip().splitlines() == [expected]


@pytest.mark.slow
def test_help_is_plain_text_and_points_at_the_reference():
  _, stdout, stderr = script_output("--help")  # absl's exit status: 1
  assert "Traceback" not in stderr, stderr[-2000:]
  assert "``" not in stdout and "docs/training.md" in stdout
  assert "--extend" in stdout


def test_missing_shared_data_names_the_variable(tmp_path):
  env = subprocess_env(None, SYNSTRIP_SHARED=str(tmp_path / "nowhere"))
  code, _, stderr = script_output(
      "--config=experiments/configs/small.py", f"--workdir={tmp_path / 'wd'}",
      env=env)
  assert code == 1
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-2000:]
  assert "$SYNSTRIP_SHARED" in lines[0] and str(tmp_path) in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("config_file, expected", [
    ("experiments/configs/default.py", r"default-\d{8}-\d{6}"),
    ("experiments/configs/default.py:mlp", r"default-mlp-\d{8}-\d{6}"),
])
def test_workdir_name_has_the_config_and_its_argument(config_file, expected):
  code = ("import runpy, sys; print(runpy.run_path(sys.argv[1], run_name="
          "'imported')['_workdir_name'](sys.argv[2]))")
  proc = start_python(["-c", code, SCRIPT, config_file])
  stdout, stderr = finish(proc, 120, "train_vit.py import")
  assert proc.returncode == 0, stderr[-2000:]
  assert re.fullmatch(expected, stdout.strip().splitlines()[-1])


def test_compile_notice_uses_the_last_timings(tmp_path):
  assert "about 5-60 s" in startup.compile_notice(tmp_path)
  (tmp_path / timings.TIMINGS_FILE).write_text(
      json.dumps({"init_compile": 12.4}))
  assert startup.compile_notice(tmp_path) == (
      "compiling (first run of this config: about 12 s last time in this "
      "workdir; cached afterwards)")
