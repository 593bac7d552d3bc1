"""SIGINT (Ctrl-C) and SIGTERM (how clusters preempt jobs) during training.

While `watch()` is active:

* before the training loop (`Watch.arm`), a signal raises `Interrupted` at
  once: nothing new has been trained, so there is nothing to save;
* inside it, the first signal only sets `Watch.signum`: the loop finishes its
  step, saves a checkpoint and then calls `Watch.raise_if_stopped`, so the
  restart continues bit-exactly where the run stopped;
* a second signal exits the process at once (`os._exit`, status 128 + signal)
  without waiting for the checkpoint being written. Orbax writes a step into a
  temporary directory and renames it only when it is complete, so the newest
  complete checkpoint is left as it was.

The command line prints `Interrupted`'s one-line message and exits with
`exit_status`: 130 for SIGINT, 143 for SIGTERM, as a shell reports a process
ended by that signal.

Example:

  with preemption.watch() as stop:
    ...  # build and compile
    stop.arm()
    for step in steps:
      ...  # train one step
      if stop.signum:
        ...  # save a checkpoint
        break
    stop.raise_if_stopped(f"saved a checkpoint at step {step}")
"""

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """The run stopped on a signal; `exit_status` is 128 + the signal number.

  A KeyboardInterrupt, so that `except Exception` does not swallow it.
  """

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.exit_status = 128 + signum


class Watch:
  """The signal state of a run; see the module docstring."""

  def __init__(self):
    self.signum: int | None = None  # the first signal received inside the loop
    self._armed = False

  def arm(self) -> None:
    """From now on, the first signal lets the current step finish."""
    self._armed = True

  def raise_if_stopped(self, what_was_saved: str) -> None:
    """Raises `Interrupted` if a signal stopped the loop.

    Args:
      what_was_saved: the end of the one-line message, e.g. "saved a
        checkpoint at step 12 in runs/x".
    """
    if self.signum is not None:
      raise Interrupted(self.signum, f"stopped by {_name(self.signum)}: "
                        f"{what_was_saved}; run the same command to resume")

  def _handle(self, signum: int, frame) -> None:  # pylint: disable=unused-argument
    if not self._armed:
      raise Interrupted(signum, f"stopped by {_name(signum)} before the first "
                        "step; nothing new to save")
    if self.signum is None:
      self.signum = signum  # the loop finishes the step, saves and stops
      return
    print(f"{_name(signum)} again: quitting without saving; the newest complete "
          "checkpoint is kept", file=sys.stderr, flush=True)
    os._exit(128 + signum)  # pylint: disable=protected-access


@contextlib.contextmanager
def watch() -> Iterator[Watch]:
  """Handles SIGINT and SIGTERM inside the block (main thread only).

  Off the main thread (where Python cannot install signal handlers) the block
  runs with the handlers unchanged and `Watch.signum` stays None.

  Yields:
    The run's `Watch`.
  """
  state = Watch()
  if threading.current_thread() is not threading.main_thread():
    yield state
    return
  previous = {s: signal.signal(s, state._handle) for s in SIGNALS}  # pylint: disable=protected-access
  try:
    yield state
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _name(signum: int) -> str:
  return signal.Signals(signum).name
