"""Continual learning: does stripping keep a network able to learn?

Two task sequences, scaled down from Dohare et al. (Nature 2024, "Loss of
plasticity in deep continual learning") to a CPU:

  mnist  online permuted MNIST: every task draws a fresh fixed permutation of
         the 784 pixels and ``examples`` training images (without
         replacement, from the 60,000); each is seen once, one SGD step per
         mini-batch (batch 1, as in the reference code). ReLU MLP ``depth x
         width``, Kaiming-uniform kernels, zero biases.
  cifar  the first 3,200 CIFAR-10 training images (the lossless 4k subset,
         2x2-average-pooled to 16 x 16 x 3) with a fresh permutation of the
         10 labels per task, ``epochs`` passes per task in mini-batches; the
         same kind of ReLU MLP (a convolutional network costs 20-100 ms a
         step on this CPU, 100x the MLP).

Every arm of a seed starts from the same parameters and sees the same tasks
and batches. Per task one JSONL record (``epoch`` = the 0-based task index):
online accuracy (over all the task's training examples and over its last
``tail`` examples, Dohare's metric), held-out accuracy on a probe set (test
images under the task's permutation), dead (exact zero), dormant (active on
< 1 % of the probe, Dohare's rule; ReDo score <= 0.1) fractions of the hidden
neurons, the effective rank (Roy & Vetterli, as Dohare's
``compute_effective_rank``) and srank (Kumar et al., delta 0.01) of the last
hidden layer's features on the probe, the mean absolute weight, the
sparsity and active parameters, and the time of the task's training and of
its boundary remedy. Runs resume task by task from a checkpoint in
``<out>/<bench>/ckpt/`` (deleted when the run ends; never committed).

  python experiments/continual.py --out experiments/results/continual \
      [--bench mnist cifar] [--arms relu relu_strip ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
    "intra_op_parallelism_threads=1")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, NamedTuple, Optional  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import synstrip_jax as ss  # noqa: E402
from experiments.continual_metrics import count_marked, task_metrics  # noqa: E402
from experiments.continual_tasks import (BENCHES, Bench, Data, Task,  # noqa: E402
                                         load_data, make_task)
from experiments.design import SEEDS  # noqa: E402
from synstrip_jax import probe, remedies  # noqa: E402
from synstrip_jax import linen as ss_linen  # noqa: E402
from synstrip_vit import writers  # noqa: E402

PyTree = Any


# -------------------------------------------------------------------- design

class Arm(NamedTuple):
  """One arm: an activation and at most one remedy.

  Attributes:
    activation: ``'relu'``, ``'leaky_relu'`` (slope 0.01) or ``'gelu'``.
    boundary: ``'strip'`` or ``'redo'`` after every ``every``-th task, or
      None.
    step: ``'cbp'`` or ``'snp'`` after every SGD step, or None.
    factor: stripping factor.
    every: tasks between boundary events.
    tau: ReDo threshold.
    rate: CBP replacement rate (per step and layer, accumulated).
    weight_decay: L2 (added to the gradient, as torch's SGD ``weight_decay``;
      for ``'snp'`` folded into its shrink ``1 - lr * weight_decay``).
    sigma: shrink & perturb noise std per step.
  """
  activation: str = "relu"
  boundary: Optional[str] = None
  step: Optional[str] = None
  factor: float = 0.05
  every: int = 1
  tau: float = 0.1
  rate: float = 1e-4
  weight_decay: float = 0.0
  sigma: float = 0.0


ARMS = {
    "relu": Arm(),
    "relu_strip": Arm(boundary="strip"),
    "relu_strip_f0.2": Arm(boundary="strip", factor=0.2),
    "relu_strip_e5": Arm(boundary="strip", every=5),
    "relu_redo": Arm(boundary="redo"),
    "relu_cbp": Arm(step="cbp"),
    "relu_snp": Arm(step="snp", weight_decay=1e-4, sigma=1e-5),
    "relu_l2": Arm(weight_decay=1e-4),
    "relu_l2_1e-3": Arm(weight_decay=1e-3),
    "leaky_relu": Arm(activation="leaky_relu"),
    "gelu": Arm(activation="gelu"),
}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu, "leaky_relu": nn.leaky_relu,
    "gelu": functools.partial(nn.gelu, approximate=False)}

# -------------------------------------------------------------------- models

class MLP(nn.Module):
  """``depth`` Dense(``width``) + activation layers ``fc0..``, then ``head``
  (10 logits). ``features=True`` also returns the last hidden ``[B, width]``."""
  width: int
  depth: int
  activation: str

  @nn.compact
  def __call__(self, x, features: bool = False):
    act = ACTIVATIONS[self.activation]
    h = x.reshape(x.shape[0], -1)
    for i in range(self.depth):
      h = act(nn.Dense(self.width, kernel_init=remedies.KAIMING_UNIFORM,
                       name=f"fc{i}")(h))
    out = nn.Dense(10, kernel_init=remedies.KAIMING_UNIFORM, name="head")(h)
    return (out, h) if features else out


def make_model(bench: Bench, activation: str) -> nn.Module:
  return MLP(bench.width, bench.depth, activation)


# ------------------------------------------------------------------ training

class State(NamedTuple):
  """What a run carries from task to task (``cbp`` is None but for CBP;
  ``key`` a raw uint32 key)."""
  params: PyTree
  opt_state: Any
  cbp: Optional[remedies.CBPState]
  key: jax.Array


class Learner(NamedTuple):
  """A run's compiled programs and fixed structure."""
  model: nn.Module
  tx: optax.GradientTransformation
  outgoing: dict
  train: Callable[[State, jax.Array, jax.Array], tuple[State, jax.Array]]
  probe: Callable[[PyTree, jax.Array, jax.Array], tuple]


def _capture(model: nn.Module, params: PyTree, x: jax.Array, activation: str,
             **kwargs) -> tuple[Any, PyTree]:
  """The model's output and its hidden layers' reduced statistics."""
  out, per_example = ss_linen.capture_stats(
      model, {"params": params}, x, select="fc*",
      activation=ACTIVATIONS[activation], check_relu="ignore", **kwargs)
  return out, probe.reduce_stats_tree(per_example)


def make_tx(bench: Bench, arm: Arm, targets: PyTree
            ) -> optax.GradientTransformation:
  """SGD (plus L2 as torch's ``weight_decay``; in ``with_stripping`` for
  the stripping arms)."""
  tx = optax.sgd(bench.lr)
  if arm.weight_decay and arm.step != "snp":
    tx = optax.chain(optax.add_decayed_weights(arm.weight_decay), tx)
  if arm.boundary == "strip":
    tx = ss.with_stripping(tx, targets)
  return tx


def _step(state: State, batch: tuple, *, model: nn.Module, tx: Any,
          arm: Arm) -> tuple[State, tuple]:
  """One SGD step; returns the number of correct predictions of the batch
  (made before the step: online) and, for CBP, its hidden statistics."""
  x, y = batch

  def loss_fn(p):
    if arm.step == "cbp":
      logits, stats = _capture(model, p, x, arm.activation)
    else:
      logits, stats = model.apply({"params": p}, x), None
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, stats)

  (_, (logits, stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  correct = jnp.sum(jnp.argmax(logits, -1) == y)
  return state._replace(params=params, opt_state=opt_state), (correct, stats)


def _chunk(state: State, batch: tuple, *, step: Callable, arm: Arm,
           bench: Bench, outgoing: dict) -> tuple[State, jax.Array]:
  """``bench.chunk`` SGD steps, then the arm's step remedy once, on the
  chunk's summed statistics, with its per-step constants rescaled to the
  chunk (CBP: rate x K, maturity / K, decay^K; shrink & perturb: shrink^K,
  sigma x sqrt(K), the same accumulated shrink and noise variance)."""
  state, (correct, stats) = jax.lax.scan(step, state, batch)
  key, k = jax.random.split(state.key)
  params, opt_state, cbp_state = state.params, state.opt_state, state.cbp
  n = bench.chunk
  if arm.step == "cbp":
    stats = jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), stats)
    params, opt_state, cbp_state, _ = remedies.cbp(
        params, opt_state, cbp_state, stats, k, outgoing=outgoing,
        replacement_rate=arm.rate * n, maturity_threshold=max(1, 100 // n),
        decay_rate=0.99 ** n, accumulate=True)
  elif arm.step == "snp":
    params, opt_state = remedies.shrink_perturb(
        params, opt_state, None, k,
        shrink=(1.0 - bench.lr * arm.weight_decay) ** n,
        sigma=arm.sigma * n ** 0.5)
  return State(params, opt_state, cbp_state, key), correct


def init_params(bench: Bench, seed: int, x0: np.ndarray) -> PyTree:
  """The initial parameters of ``seed`` (the same for every arm)."""
  return make_model(bench, "relu").init(jax.random.PRNGKey(seed),
                                        x0)["params"]


@functools.lru_cache(maxsize=None)
def programs(bench: Bench, arm: Arm, input_shape: tuple[int, ...]
             ) -> Learner:
  """The jitted programs of ``arm`` on ``bench`` (cached: the seeds of an
  arm share one compilation)."""
  model = make_model(bench, arm.activation)
  x0 = np.zeros((2,) + input_shape, np.float32)
  params = init_params(bench, 0, x0)
  _, stats = _capture(model, params, x0, arm.activation)
  outgoing = remedies.find_outgoing(
      lambda p, x: model.apply({"params": p}, x), params, x0).outgoing
  tx = make_tx(bench, arm, probe.target_tree(params, stats))
  step = functools.partial(_step, model=model, tx=tx, arm=arm)
  chunk = functools.partial(_chunk, step=step, arm=arm, bench=bench,
                            outgoing=outgoing)

  @jax.jit
  def train(state, x, y):
    shape = (-1, bench.chunk)
    state, correct = jax.lax.scan(chunk, state, (
        x.reshape(shape + x.shape[1:]), y.reshape(shape + y.shape[1:])))
    return state, correct.reshape(-1)

  @jax.jit
  def probe_fn(params, x, y):
    (logits, feats), stats = _capture(model, params, x, arm.activation,
                                      features=True)
    return jnp.mean(jnp.argmax(logits, -1) == y), stats, feats

  return Learner(model, tx, outgoing, train, probe_fn)


def make_learner(bench: Bench, arm: Arm, seed: int, x0: np.ndarray
                 ) -> tuple[Learner, State]:
  """The programs of one run (:func:`programs`) and its initial state."""
  learner = programs(bench, arm, tuple(x0.shape[1:]))
  params = init_params(bench, seed, x0)
  cbp_state = (remedies.cbp_init(params, learner.outgoing)
               if arm.step == "cbp" else None)
  state = State(params, learner.tx.init(params), cbp_state,
                jax.random.fold_in(jax.random.PRNGKey(seed), 1))
  return learner, state


# ---------------------------------------------------------------------- runs

def run_name(arm: str, seed: int) -> str:
  return f"{arm}_s{seed}"


def boundary_event(learner: Learner, arm: Arm, state: State, stats: PyTree,
                   task: int) -> tuple[State, int, float]:
  """The arm's remedy after task ``task`` (if due): ``(state, neurons it
  acted on, seconds)``."""
  if arm.boundary is None or (task + 1) % arm.every:
    return state, 0, 0.0
  t0 = time.perf_counter()
  if arm.boundary == "strip":
    params, opt_state, dead = remedies.strip(
        state.params, state.opt_state, stats, stripping_factor=arm.factor)
  else:
    params, opt_state, dead = remedies.redo(
        state.params, state.opt_state, stats,
        jax.random.fold_in(state.key, task), outgoing=learner.outgoing,
        tau=arm.tau, init_fn=remedies.KAIMING_UNIFORM)
  jax.block_until_ready((params, opt_state))
  seconds = time.perf_counter() - t0
  return state._replace(params=params, opt_state=opt_state), count_marked(dead)[0], \
      seconds


def run_task(learner: Learner, bench: Bench, arm: Arm, state: State,
             task: Task, index: int) -> tuple[State, dict[str, Any]]:
  """Train on one task, probe, record, apply the boundary remedy."""
  t0 = time.perf_counter()
  state, correct = learner.train(state, jnp.asarray(task.x),
                                 jnp.asarray(task.y))
  correct = np.asarray(correct)
  train_s = time.perf_counter() - t0
  acc, stats, feats = learner.probe(state.params, jnp.asarray(task.x_probe),
                                    jnp.asarray(task.y_probe))
  tail_steps = max(1, bench.tail // bench.batch)
  record = {"epoch": index, "task": index,
            "online_acc": float(correct.sum() / correct.size / bench.batch),
            "online_acc_tail": float(correct[-tail_steps:].sum()
                                     / (tail_steps * bench.batch)),
            "heldout_acc": float(acc), "train_s": train_s}
  record.update(task_metrics(state.params, state.opt_state, stats,
                             np.asarray(feats)))
  state, remedied, remedy_s = boundary_event(learner, arm, state, stats,
                                             index)
  record.update(remedied=remedied, remedy_s=remedy_s)
  return state, record


def _save(path: Path, state: State, tasks_done: int) -> None:
  """Pickle the state (host arrays) atomically."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  with open(tmp, "wb") as f:
    pickle.dump({"tasks_done": tasks_done,
                 "state": jax.device_get(tuple(state))}, f)
  os.replace(tmp, path)


def _resume(path: Path, jsonl: Path, fresh: State) -> tuple[State, int]:
  """The checkpointed state and its task count, and the JSONL cut to it;
  ``(fresh, 0)`` (and no JSONL) without a checkpoint."""
  records = writers.scan_jsonl(jsonl).records
  done, state = 0, fresh
  if path.exists():
    with open(path, "rb") as f:
      saved = pickle.load(f)
    done = int(saved["tasks_done"])
    state = State(*jax.tree_util.tree_map(jnp.asarray, saved["state"]))
    if jax.tree_util.tree_structure(state) != jax.tree_util.tree_structure(
        fresh):
      raise ValueError(f"checkpoint {path} does not match the run's state")
  jsonl.unlink(missing_ok=True)
  for r in records[:done]:
    writers.append_jsonl(jsonl, r)
  return state, done


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def run(out: Path, bench: Bench, arm_name: str, seed: int, data: Data
        ) -> str:
  """One run, resumed task by task; ``'done'``, ``'skipped'`` (finished
  before) or ``'resumed'``."""
  d = out / bench.name
  name = run_name(arm_name, seed)
  jsonl, ckpt = d / f"{name}.jsonl", d / "ckpt" / f"{name}.pkl"
  if len(writers.scan_jsonl(jsonl).records) >= bench.tasks:
    return "skipped"
  d.mkdir(parents=True, exist_ok=True)
  arm = ARMS[arm_name]
  (d / f"{name}.config.json").write_text(json.dumps(
      {"bench": bench._asdict(), "arm": arm_name, **arm._asdict(),
       "seed": seed, "jax": jax.__version__}, indent=1))
  wall0, cpu0 = time.perf_counter(), cpu_seconds()
  x0 = make_task(data, bench, seed, 0).x_probe[:2]
  learner, state = make_learner(bench, arm, seed, x0)
  state, start = _resume(ckpt, jsonl, state)
  for t in range(start, bench.tasks):
    state, record = run_task(learner, bench, arm, state,
                             make_task(data, bench, seed, t), t)
    writers.append_jsonl(jsonl, record)
    _save(ckpt, state, t + 1)
  wall = d / f"{name}.wall.json"
  prev = json.loads(wall.read_text()) if start and wall.exists() else {}
  wall.write_text(json.dumps({
      "wall_s": prev.get("wall_s", 0.0) + time.perf_counter() - wall0,
      "cpu_s": prev.get("cpu_s", 0.0) + cpu_seconds() - cpu0,
      "sessions": prev.get("sessions", 0) + 1, "resumed": start > 0}))
  ckpt.unlink(missing_ok=True)
  return "resumed" if start else "done"


def main(argv: Optional[list[str]] = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", type=Path,
                 default=Path("experiments/results/continual"))
  p.add_argument("--bench", nargs="+", default=list(BENCHES),
                 choices=list(BENCHES))
  p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
  p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
  p.add_argument("--tasks", type=int, default=None,
                 help="override every bench's number of tasks")
  p.add_argument("--examples", type=int, default=None,
                 help="override every bench's examples per task")
  p.add_argument("--lr", type=float, default=None,
                 help="override every bench's SGD step size")
  a = p.parse_args(argv)
  for name in a.bench:
    bench = BENCHES[name]
    if a.tasks:
      bench = bench._replace(tasks=a.tasks)
    if a.examples:
      bench = bench._replace(examples=a.examples,
                             tail=min(bench.tail, a.examples))
    if a.lr:
      bench = bench._replace(lr=a.lr)
    data = load_data(bench)
    for seed in a.seeds:
      for arm in a.arms:
        t0 = time.perf_counter()
        status = run(a.out, bench, arm, seed, data)
        print(f"{name} {run_name(arm, seed)}: {status} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
  main()
