"""Run metrics: `metrics.jsonl`, a progress bar and a loss plot.

Each `metrics.jsonl` line is one JSON object for one logged step, with
namespaced keys: `step`, `train/loss`, `lr`, `perf/step_time`,
`perf/tokens_per_sec`, `opt/state_bytes`, and `eval/loss`, `eval/ppl` when the
step was evaluated. Only process 0 writes.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import tqdm

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


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
  """Appends records to metrics.jsonl and drives the progress bar.

  On resume from step `start`, records after `start` (written by the run that
  was interrupted after its last checkpoint) are dropped, so that every step
  appears once.
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

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one record (plain Python numbers) and updates the bar."""
    if not self._enabled:
      return
    with open(self._path, "a") as f:
      f.write(json.dumps(dict(record)) + "\n")
    postfix = {"loss": f"{record['train/loss']:.3f}",
               "tok/s": f"{record['perf/tokens_per_sec']:,.0f}"}
    if "eval/loss" in record:
      postfix["eval"] = f"{record['eval/loss']:.3f}"
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(record["step"] - self._bar.n)

  def close(self) -> None:
    """Closes the progress bar."""
    if self._enabled:
      self._bar.close()


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
