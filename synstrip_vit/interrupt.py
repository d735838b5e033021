"""Ctrl-C and SIGTERM: stop at the next step, save it, say how to resume.

:func:`catch_signals` installs handlers for SIGINT and SIGTERM that set a
:class:`StopFlag`. Once the training loop has started (:meth:`StopFlag.arm`)
a signal only sets the flag: the loop saves a checkpoint at the step it has
reached and raises :class:`Interrupted`, so that rerunning the same command
resumes exactly there. Before that (loading, compiling), and on a second
signal, :class:`Interrupted` is raised at once. ``experiments/train_vit.py``
prints :attr:`Interrupted.message` and exits with ``128 + signal``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
  """The run was stopped by a signal.

  Attributes:
    signum: the signal number (``exit_code`` is ``128 + signum``).
    epochs_done: epochs finished (1-based count; None: before training).
    step: the global step of the last checkpoint written (None: none).
  """

  def __init__(self, signum: int, epochs_done: Optional[int] = None,
               step: Optional[int] = None):
    self.signum, self.epochs_done, self.step = signum, epochs_done, step
    super().__init__(self.message)

  @property
  def exit_code(self) -> int:
    """``128 + signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + self.signum

  @property
  def message(self) -> str:
    """The one line the script prints."""
    if self.step is None:
      return ("interrupted before training started; rerun the same command "
              "to start")
    return (f"interrupted after epoch {self.epochs_done}, step {self.step}; "
            "rerun the same command to resume")


class StopFlag:
  """Whether a stop was requested (by a signal, or :meth:`request`)."""

  def __init__(self):
    self.signum: Optional[int] = None
    self.armed = False

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def arm(self) -> None:
    """From now on a first signal only sets the flag (the loop stops at
    its next step, after saving it)."""
    self.armed = True

  def request(self, signum: int = signal.SIGINT) -> None:
    """Ask the loop to stop; raises :class:`Interrupted` at once before
    :meth:`arm` or when a stop was already requested."""
    if not self.armed or self.requested:
      self.signum = signum
      raise Interrupted(signum)
    self.signum = signum

  def interrupted(self, epochs_done: int, step: int) -> Interrupted:
    """The exception the loop raises once ``step`` is saved."""
    return Interrupted(self.signum or signal.SIGINT, epochs_done, step)


@contextlib.contextmanager
def catch_signals(flag: StopFlag) -> Iterator[StopFlag]:
  """Route SIGINT and SIGTERM to ``flag.request`` while inside (main
  thread only; elsewhere the handlers are left as they are)."""
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = {s: signal.getsignal(s) for s in SIGNALS}
  for s in SIGNALS:
    signal.signal(s, lambda signum, _frame: flag.request(signum))
  try:
    yield flag
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


__all__ = ["Interrupted", "SIGNALS", "StopFlag", "catch_signals"]
