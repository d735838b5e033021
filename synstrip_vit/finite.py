"""The finite checks of a run: NaN/inf in the state or in a loss.

:func:`nonfinite_leaves` is one compiled program over the whole state (the
end-of-epoch check, every checkpoint save and restore);
:func:`check_state` and :func:`check_loss` stop a run whose model blew up,
with one message format (:func:`nonfinite_error`) that names what is not
finite and the last good checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

#: What every non-finite error advises.
ADVICE = "lower optimizer.learning_rate or check the data"


@jax.jit
def _finite_leaves(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: (jnp.all(jnp.isfinite(x))
                 if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)),
      tree)


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of ``tree`` holding a NaN or inf."""
  flags = jax.device_get(_finite_leaves(tree))
  return [jax.tree_util.keystr(path)
          for path, ok in jax.tree_util.tree_leaves_with_path(flags)
          if not bool(ok)]


def nonfinite_check_compiler(abstract: Any) -> Callable[[], Any]:
  """A thunk that compiles :func:`nonfinite_leaves`'s program for trees like
  ``abstract`` (``jax.ShapeDtypeStruct`` leaves with their shardings), so a
  thread can compile it before the first check needs it."""
  return _finite_leaves.lower(abstract).compile


def nonfinite_names(bad: Sequence[str]) -> str:
  """``'NaN/inf in a, b, c ...'``: the first three of ``bad``."""
  return f"NaN/inf in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"


def last_good(manager: Any) -> str:
  """The sentence naming the newest checkpoint of ``manager`` (kept)."""
  step = manager.latest_step()
  if step is None:
    return "No checkpoint was saved (nothing to resume from)"
  return (f"The last good checkpoint (step {step}, verified finite) in "
          f"{manager.directory} is kept")


def nonfinite_error(what: str, action: str, manager: Any
                    ) -> FloatingPointError:
  """``'<what>; <action>. <last good checkpoint>; <advice>'`` as an error."""
  return FloatingPointError(f"{what}; {action}. {last_good(manager)}; "
                            f"{ADVICE}")


def check_state(state: Any, epoch: int, manager: Any,
                losses: Sequence[tuple[str, float]]) -> None:
  """Raise ``FloatingPointError`` if the state (params, optimizer state)
  holds a NaN/inf (names the leaves) or one of the named mean ``losses``
  (test, probe) is not finite (weights blown up to huge finite values);
  nothing of the epoch is written then."""
  # The whole state, as checkpointing.save checks it: one compiled program
  # serves both checks (a first-epoch compile less).
  bad = nonfinite_leaves(state)
  bad += [f"{name} loss" for name, loss in losses if not math.isfinite(loss)]
  if bad:
    raise nonfinite_error(
        f"the model became non-finite in epoch {epoch + 1} "
        f"({nonfinite_names(bad)})", "stopping", manager)


def check_loss(state: Any, epoch: int, manager: Any) -> None:
  """Raise ``FloatingPointError`` if the epoch's running training loss
  (``state.train_sums['loss_sum']``) is not finite."""
  loss = float(np.asarray(state.train_sums["loss_sum"]))
  if not math.isfinite(loss):
    raise nonfinite_error(f"training loss became {loss} in epoch {epoch + 1}",
                          "stopping", manager)


__all__ = ["ADVICE", "check_loss", "check_state", "last_good",
           "nonfinite_check_compiler", "nonfinite_error", "nonfinite_leaves",
           "nonfinite_names"]
