"""The training loop of ``experiments/train_vit.py``: train, probe, strip, log.

One epoch (see ``DESIGN.md``)::

  train batches -> train_step (jit, data-parallel) -> state, train sums
  test batches  -> eval_step  -> test loss/acc (+ activation stats if probe=test)
  probe batches -> eval_step(collect_stats) -> stats -> dead tree
  every `stripping_frequency` epochs: strip_event(params, opt_state, dead)
  metrics -> metrics.jsonl (process 0) -> checkpoint (all processes)

Everything a resumed run needs is in the checkpoint (state, epoch, batch
position, partial training sums), and the data order is a pure function of
``(seed, epoch)``, so a run killed anywhere and resumed ends with the same
parameters, bit for bit, as one that never stopped (on the same devices).
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synstrip_jax import metrics, probe, redo
from synstrip_vit import checkpointing, datasets, models, steps as training
from synstrip_vit import input_pipeline as pipeline
from synstrip_vit.augment import random_crop_flip
from synstrip_vit import writers as run_logging
from synstrip_vit import config as config_lib
from synstrip_jax.activations import check_finite
from synstrip_jax.transform import get_masks, strip_event

PyTree = Any
CONFIG_FILE = "config.json"


class RunError(RuntimeError):
  """A run cannot start or continue (message says why and what to do)."""


# ---------------------------------------------------------------- the data

class RunData:
  """The arrays of one run: train, probe (held-out or test) and test parts.

  Attributes:
    x_train, y_train, x_probe, y_probe, x_test, y_test: NumPy arrays (every
      process holds them; each reads only its rows of every batch).
    num_classes: number of classes.
    mean, std: per-channel statistics of the training part (normalisation).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    ds = datasets.load_dataset(config.dataset, data_dir=config.data_dir or None)
    x_train, y_train = ds.x_train, ds.y_train
    x_test, y_test = ds.x_test, ds.y_test
    if config.train_limit:
      x_train, y_train = x_train[:config.train_limit], y_train[:config.train_limit]
    if config.test_limit:
      x_test, y_test = x_test[:config.test_limit], y_test[:config.test_limit]
    if len(x_train) == 0:
      raise ValueError(f"dataset {config.dataset!r} has no training images")
    if config.probe == "train_holdout":
      x_train, y_train, x_probe, y_probe = pipeline.split_holdout(
          x_train, y_train, fraction=config.probe_fraction, seed=config.seed)
    else:
      x_probe, y_probe = x_test, y_test
    self.x_train, self.y_train = x_train, y_train
    self.x_probe, self.y_probe = x_probe, y_probe
    self.x_test, self.y_test = x_test, y_test
    self.num_classes = ds.num_classes
    self.image_shape = ds.image_shape
    self.mean, self.std = pipeline.channel_stats(x_train)


def input_fns(config, run_data: RunData):
  """``augment(key, uint8) -> float`` and ``preprocess(uint8) -> float``."""
  mean, std = jnp.asarray(run_data.mean), jnp.asarray(run_data.std)

  def preprocess(images):
    return pipeline.normalize(images, mean, std)

  def augment(key, images):
    if config.augment:
      images = random_crop_flip(key, images, padding=config.crop_padding,
                                flip=config.flip)
    return preprocess(images)

  return augment, preprocess


# ------------------------------------------------------------ the workdir

def _check_config_file(workdir: Path, config: ml_collections.ConfigDict,
                       is_main: bool) -> None:
  """Write ``config.json``; on resume refuse a config that changed."""
  path = workdir / CONFIG_FILE
  new = json.loads(config.to_json())
  if path.exists():
    old = json.loads(path.read_text())
    diff = config_lib.config_diff(old, new)
    if diff:
      raise RunError(
          f"{workdir} holds a run with a different config "
          + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
          + "; use another --workdir")
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(new, indent=2, sort_keys=True))


def _sums_to_host(sums: Optional[dict]) -> dict[str, float]:
  if sums is None:
    return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  return {k: float(np.asarray(v)) for k, v in sums.items()}


def _sums_to_device(sums: dict[str, float]) -> Optional[dict]:
  if not sums or sums.get("count", 0.0) == 0.0:
    return None
  return {"loss_sum": jnp.asarray(sums["loss_sum"], jnp.float32),
          "correct": jnp.asarray(int(sums["correct"]), jnp.int32),
          "count": jnp.asarray(sums["count"], jnp.float32)}


class Interrupt(Exception):
  """Raised by the test hook ``interrupt_after_steps`` (simulates a kill)."""


# ------------------------------------------------------------------ the run

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       *, interrupt_after_steps: Optional[int] = None,
                       log: Callable[[str], None] = print
                       ) -> list[dict[str, Any]]:
  """Train (or resume) the run in ``workdir``; return the per-epoch records.

  Args:
    config: see :func:`synstrip_vit.config.base_config`.
    workdir: run directory: ``config.json``, ``metrics.jsonl``, plots and
      ``checkpoints/``. If it holds a checkpoint the run resumes from it.
    interrupt_after_steps: testing hook; raise :class:`Interrupt` right after
      this many optimizer steps of this invocation (like a kill: nothing is
      saved at that moment).
    log: where one-line progress messages go (process 0 only).

  Raises:
    ValueError: invalid config or data (before any training).
    RunError: the workdir holds another run, or metrics but no checkpoint.
    checkpointing.CheckpointError: no checkpoint can be restored.
    FloatingPointError: the training loss became NaN/inf (the last good
      checkpoint is kept).
  """
  config_lib.validate(config)
  workdir = Path(workdir).absolute()
  is_main = jax.process_index() == 0
  log = log if is_main else (lambda _: None)

  # ---- data, mesh, model: every error here comes before any training.
  run_data = RunData(config)
  mesh = training.make_mesh()
  training.check_batch_size(config.batch_size, mesh, "batch_size")
  training.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  n_train = len(run_data.x_train)
  if config.batch_size > n_train:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the "
                     f"{n_train} training images")
  steps_per_epoch = n_train // config.batch_size
  model, schedule, state, tx = _build(config, run_data, mesh)
  augment, preprocess = input_fns(config, run_data)
  train_step = training.jit_train_step(model, tx, augment, mesh)
  eval_step = training.jit_eval_step(model, preprocess, mesh,
                                     collect_stats=False)
  probe_step = training.jit_eval_step(model, preprocess, mesh,
                                      collect_stats=True)
  repl = training.replicated(mesh)
  strip = jax.jit(functools.partial(strip_event,
                                    stripping_factor=config.stripping_factor),
                  out_shardings=repl, donate_argnums=(0, 1))
  recycle = (jax.jit(functools.partial(
      redo.recycle, outgoing=models.outgoing_map(state.params, config.model)),
                     out_shardings=repl, donate_argnums=(0, 1))
             if config.redo else None)

  # ---- workdir: resume or start; never overwrite another run's work.
  _check_config_file(workdir, config, is_main)
  metrics_path = workdir / run_logging.METRICS_FILE
  manager = checkpointing.make_manager(workdir,
                                       max_to_keep=config.max_checkpoints)
  restored = checkpointing.restore_latest(
      manager, state, quarantine_dir=workdir / "unreadable_checkpoints")
  if restored is None:
    if run_logging.read_jsonl(metrics_path):
      raise RunError(f"{metrics_path} has records but {manager.directory} "
                     "holds no checkpoint: refusing to start over and "
                     "overwrite them; use another --workdir")
    position = checkpointing.Position(0, 0, False, {})
  else:
    step, state, position = restored
    log(f"resuming from checkpoint {step} (epoch {position.epoch + 1}, "
        f"batch {position.batch})")
  if position.epoch_done:
    position = checkpointing.Position(position.epoch + 1, 0, False, {})
  records = (run_logging.keep_epochs_before(metrics_path, position.epoch)
             if is_main else [])

  pidx, pcount = jax.process_index(), jax.process_count()
  steps_this_call = 0
  progress = None
  if config.progress_bar and is_main:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    progress = tqdm(total=config.num_epochs * steps_per_epoch,
                    initial=position.epoch * steps_per_epoch + position.batch,
                    unit="step", dynamic_ncols=True, leave=False)

  def evaluate(params, x, y, step_fn):
    return training.evaluate(step_fn, params, x, y,
                             batch_size=config.eval_batch_size, mesh=mesh)

  for epoch in range(position.epoch, config.num_epochs):
    t0 = time.perf_counter()
    order = pipeline.batch_indices(n_train, config.batch_size,
                                   seed=config.seed, epoch=epoch,
                                   process_index=pidx, process_count=pcount)
    start = position.batch if epoch == position.epoch else 0
    sums = (_sums_to_device(position.train_sums)
            if epoch == position.epoch else None)
    for b in range(start, steps_per_epoch):
      idx = order[b]
      images, labels = training.global_batch(
          (run_data.x_train[idx], run_data.y_train[idx]), mesh)
      state, m = train_step(state, images, labels)
      sums = training.accumulate(sums, m)
      steps_this_call += 1
      if progress is not None:
        progress.update(1)
      if (config.checkpoint_every_steps and b + 1 < steps_per_epoch
          and int(state.step) % config.checkpoint_every_steps == 0):
        host = _sums_to_host(sums)
        _check_loss(host, epoch, manager)
        checkpointing.save(manager, int(state.step), state,
                           checkpointing.Position(epoch, b + 1, False, host))
      if (interrupt_after_steps is not None
          and steps_this_call >= interrupt_after_steps):
        raise Interrupt(f"interrupted after {steps_this_call} steps")
    train = _sums_to_host(sums)
    _check_loss(train, epoch, manager)
    t_train = time.perf_counter() - t0

    # Evaluation; with probe='test' the same pass collects the statistics.
    t1 = time.perf_counter()
    probe_is_test = config.probe == "test"
    test = evaluate(state.params, run_data.x_test, run_data.y_test,
                    probe_step if probe_is_test else eval_step)
    probe_res = test if probe_is_test else evaluate(
        state.params, run_data.x_probe, run_data.y_probe, probe_step)
    t_eval = time.perf_counter() - t1
    check_finite(probe_res["stats"])
    tau = None if config.tau < 0 else float(config.tau)
    dead = probe.dead_tree(state.params, probe_res["stats"], tau)

    t2 = time.perf_counter()
    stripped_now = config.strip and (epoch + 1) % config.stripping_frequency == 0
    if stripped_now:
      params, opt_state = strip(state.params, state.opt_state, dead)
      state = state.replace(params=params, opt_state=opt_state)
      jax.block_until_ready(state.params)
    t_strip = time.perf_counter() - t2
    recycled_now = config.redo and (epoch + 1) % config.stripping_frequency == 0
    if recycled_now:
      # A host value, identical on every process (raw uint32[2] key).
      key = np.asarray(jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                          epoch))
      params, opt_state = recycle(state.params, state.opt_state, dead, key)
      state = state.replace(params=params, opt_state=opt_state)

    masks = get_masks(state.opt_state) if config.strip else None
    summary = jax.device_get(metrics.summary(state.params, dead, masks))
    stripped_weights = (sum(int(np.sum(~np.asarray(m)))
                            for m in jax.tree.leaves(masks))
                        if masks is not None else 0)
    record = {
        "epoch": epoch,
        "step": int(state.step),
        "train_loss": train["loss_sum"] / train["count"],
        "train_acc": train["correct"] / train["count"],
        "test_loss": float(test["loss_sum"]) / float(test["count"]),
        "test_acc": float(test["correct"]) / float(test["count"]),
        "probe_loss": float(probe_res["loss_sum"]) / float(probe_res["count"]),
        "probe_acc": float(probe_res["correct"]) / float(probe_res["count"]),
        "dead_neurons": int(summary.pop("dead_neurons")),
        "active_params": int(summary.pop("active_params")),
        "sparsity": float(summary.pop("sparsity")),
        "stripped_weights": stripped_weights,
        "stripped_now": bool(stripped_now),
        "recycled_now": bool(recycled_now),
        "learning_rate": float(schedule(int(state.step))),
        "train_time_s": t_train,
        "eval_time_s": t_eval,
        "strip_time_s": t_strip,
    }
    record.update({k: (float(v) if "sparsity" in k else int(v))
                   for k, v in summary.items()})
    if is_main:
      run_logging.append_jsonl(metrics_path, record)
      records.append(record)
    log(f"epoch {epoch + 1}/{config.num_epochs}: "
        f"train_loss {record['train_loss']:.4f} "
        f"train_acc {record['train_acc']:.4f} "
        f"test_acc {record['test_acc']:.4f} "
        f"dead {record['dead_neurons']} "
        f"active {record['active_params']} "
        f"sparsity {record['sparsity']:.4f}")
    checkpointing.save(manager, int(state.step), state,
                       checkpointing.Position(epoch, steps_per_epoch, True, {}))

  if progress is not None:
    progress.close()
  if is_main and records:
    run_logging.plot_metrics(records, workdir,
                             title=f"{config.model} {config.activation} "
                             f"strip={config.strip} on {config.dataset}")
  manager.close()
  return records


def _check_loss(train: dict[str, float], epoch: int, manager) -> None:
  if not math.isfinite(train["loss_sum"]):
    latest = manager.latest_step()
    raise FloatingPointError(
        f"training loss became {train['loss_sum']} in epoch {epoch + 1}; "
        f"stopping. The last good checkpoint (step {latest}) in "
        f"{manager.directory} is kept; lower learning_rate or check the data")


def _build(config, run_data: RunData, mesh):
  """``(model, schedule, replicated initial state, optimizer)`` of a run."""
  steps_per_epoch = max(len(run_data.x_train) // config.batch_size, 1)
  name, kwargs = config_lib.model_kwargs(config, run_data.num_classes)
  model = models.create_model(name, **kwargs)
  schedule = training.make_schedule(
      learning_rate=config.learning_rate,
      min_learning_rate=config.min_learning_rate,
      warmup_steps=config.warmup_epochs * steps_per_epoch,
      total_steps=config.num_epochs * steps_per_epoch)

  def tx_factory(targets):
    return training.make_optimizer(schedule, weight_decay=config.weight_decay,
                                   targets=targets, strip=config.strip)

  state, tx = training.create_train_state(model, tx_factory,
                                          run_data.image_shape, config.seed)
  return model, schedule, training.replicate(state, mesh), tx


def final_state(config: ml_collections.ConfigDict, workdir: str | Path):
  """``(state, position, model, run_data)`` of a run's latest checkpoint."""
  run_data = RunData(config)
  model, _, state, _ = _build(config, run_data, training.make_mesh())
  manager = checkpointing.make_manager(workdir)
  restored = checkpointing.restore_latest(manager, state)
  manager.close()
  if restored is None:
    raise checkpointing.CheckpointError(f"no checkpoint in {workdir}")
  return restored[1], restored[2], model, run_data


__all__ = ["Interrupt", "RunData", "RunError", "final_state",
           "train_and_evaluate"]
