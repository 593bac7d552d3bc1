"""Run metrics: `metrics.jsonl`, TensorBoard events, a progress bar, a loss plot
and profiles.

Each `metrics.jsonl` line is one JSON object for one logged step, with
namespaced keys: `step`, `train/loss`, `lr`, `perf/step_time`,
`perf/tokens_per_sec`, `opt/state_bytes`, and `eval/loss`, `eval/ppl` when the
step was evaluated. The same scalars go to TensorBoard event files in
`workdir/tensorboard` (tensorboardX; `tensorboard --logdir WORKDIR/tensorboard`),
where `profile_steps` also puts a `jax.profiler` trace (the Profile tab). Only
process 0 writes metrics; every process writes its own trace.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import tensorboardX
import tqdm

from train import errors

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


def read(workdir: str) -> list[dict[str, Any]]:
  """All records of `workdir/metrics.jsonl` (empty if there is none).

  A last line cut short by a killed run is skipped.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    complete = f.read().split("\n")[:-1]
  return [json.loads(line) for line in complete if line.strip()]


class Writer:
  """Appends records to metrics.jsonl and TensorBoard, and drives the progress bar.

  On resume from step `start`, records after `start` (written by the run that
  was interrupted after its last checkpoint) are dropped, so that every step
  appears once (TensorBoard purges its events after `start` too).
  """

  def __init__(self, workdir: str, *, start: int, total: int, enabled: bool):
    self._enabled = enabled
    self._path = os.path.join(workdir, METRICS_FILE)
    if not enabled:
      return
    kept = [r for r in read(workdir) if r["step"] <= start]
    with open(self._path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    self._bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    self._tb = tensorboardX.SummaryWriter(
        os.path.join(workdir, TENSORBOARD_DIR), purge_step=start + 1 if start else None)

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one record (plain Python numbers) and updates the bar."""
    if not self._enabled:
      return
    with open(self._path, "a") as f:
      f.write(json.dumps(dict(record)) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, global_step=record["step"])
    postfix = {"loss": f"{record['train/loss']:.3f}",
               "tok/s": f"{record['perf/tokens_per_sec']:,.0f}"}
    if "eval/loss" in record:
      postfix["eval"] = f"{record['eval/loss']:.3f}"
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(record["step"] - self._bar.n)

  def close(self) -> None:
    """Closes the progress bar and flushes the TensorBoard events."""
    if self._enabled:
      self._bar.close()
      self._tb.close()


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """The `profile_steps` field: "a,b" (steps a to b) or "a" (one step).

  Returns:
    (first, last), or None for "".

  Raises:
    errors.UserError: not one or two steps with 1 <= a <= b.
  """
  if not str(spec).strip():
    return None
  try:
    steps = [int(part) for part in str(spec).split(",")]
  except ValueError:
    steps = []
  if len(steps) == 1:
    steps *= 2
  if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
    raise errors.UserError(
        f"profile_steps must be 'a,b' with 1 <= a <= b (or one step 'a'), got "
        f"{spec!r}; e.g. --config.profile_steps=10,12")
  return steps[0], steps[1]


class Profiler:
  """Captures a `jax.profiler` trace of steps first..last of a run.

  Example:
    profiler = Profiler("10,12", workdir)
    for step in ...:
      profiler.before(step)
      state, metrics = train_step(state, batch)
      profiler.after(step, metrics)
    profiler.close()
  """

  def __init__(self, spec: str, workdir: str):
    self._steps = parse_profile_steps(spec)
    self._logdir = os.path.join(workdir, TENSORBOARD_DIR)
    self._active = False

  def before(self, step: int) -> None:
    """Starts the trace before the first profiled step."""
    if self._steps and step == self._steps[0]:
      jax.profiler.start_trace(self._logdir)
      self._active = True

  def after(self, step: int, outputs: Any) -> None:
    """Ends the trace once the last profiled step's `outputs` are computed."""
    if self._active and step == self._steps[1]:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    """Ends a trace still running (a run that stopped inside the window)."""
    if self._active:
      jax.profiler.stop_trace()
      self._active = False
      print(f"wrote a profile of steps {self._steps[0]}-{self._steps[1]} to "
            f"{self._logdir} (tensorboard --logdir {self._logdir}, Profile tab)",
            flush=True)


def plot(workdir: str, title: str) -> str:
  """Draws train and eval loss against step into `workdir/loss.png`.

  Returns:
    The path of the PNG.
  """
  records = read(workdir)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot([r["step"] for r in records], [r["train/loss"] for r in records],
          label="train", linewidth=1)
  evals = [r for r in records if "eval/loss" in r]
  if evals:
    ax.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-",
            label="eval")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, PLOT_FILE)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
