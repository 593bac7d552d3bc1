"""What a (re)start decides before it builds anything: config adaptations and
whether the checkpoints in the workdir belong to this config.

A run stores its config with every checkpoint (train/checkpoint.py). A restart
compares it with its own:

* fields that change the parameters' or optimizer state's shapes, the optimizer
  or the data order (`RESUME_FIXED`) must be equal, or the restart is refused
  with every differing field listed; of the `opt.<method>` sections only the
  one of `opt.name` counts (the others are not read);
* a changed `steps` is allowed and explained (`steps_note`, for the
  checkpoint that restores, which may be older than the newest one when that
  one is damaged): the learning-rate schedule (warmup and cosine) is
  recomputed for the new length, so the remaining steps follow a different
  schedule than the trained ones did;
* every other field (logging, evaluation, checkpointing, the mesh, cache
  directories) may change freely.

Example:

  cfg = resume.adapt(cfg)  # prints a note per adapted field
  resume.check_config(checkpointer.saved_config(), cfg)
  ...  # restore the newest checkpoint that reads back, at step `start`
  print(resume.steps_note(checkpointer.saved_config(start), cfg) or "")
"""

import json
from typing import Any

import ml_collections

from train import errors
from train import optimizers

# Fields a restart may not change (a dotted prefix covers a whole section).
RESUME_FIXED = ("seed", "batch_size", "seq_len", "model.", "opt.", "data.")
# Fields under those prefixes that may change anyway.
RESUME_FREE = ("model.remat", "model.attention", "model.attention_block",
               "opt.layerwise", "data.dir", "data.tfds_data_dir")


def adapt(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adapts fields that cannot work as set, printing a one-line note for each.

  * `opt.name="optax_galore"` on scanned layers: optax.contrib.galore projects
    2-D kernels only, so the model is unrolled (`model.scan=False`).
  * `opt.warmup_steps` not shorter than the run: `opt.warmup_fraction` of it
    (optimizers.warmup_steps).

  Args:
    cfg: A full config (not modified).

  Returns:
    The config to train with.
  """
  cfg = ml_collections.ConfigDict(cfg.to_dict())  # an unlocked copy
  if cfg.opt.name == "optax_galore" and cfg.model.scan:
    print("note: opt.name='optax_galore' projects 2-D kernels only; unrolling the "
          "layers (model.scan=False)", flush=True)
    cfg.model.scan = False
  if isinstance(cfg.steps, int) and cfg.steps > 0:
    note = optimizers.warmup_note(cfg.opt, cfg.steps)
    if note:
      print(note, flush=True)
  return cfg


def check_config(saved: tuple[int, dict] | None,
                 cfg: ml_collections.ConfigDict) -> None:
  """Refuses a restart whose config does not fit the workdir's checkpoints.

  A changed `steps` is not refused; `steps_note` explains it once the
  checkpoint that actually restores is known.

  Args:
    saved: (step, config dict) from `Checkpointer.saved_config`, or None (no
      checkpoint, or one saved without a config: nothing to compare).
    cfg: This run's config, after `adapt`.

  Raises:
    UserError: listing each fixed field that differs, old -> new.
  """
  if saved is None:
    return
  step, old = saved
  new = _flatten(to_json(cfg))
  old = _flatten(old)
  changed = [key for key in sorted(old.keys() & new.keys())
             if old[key] != new[key] and _fixed(key)
             and not _unread_option(key, cfg.opt.name)]
  if changed:
    listed = ", ".join(f"{key} {old[key]!r} -> {new[key]!r}" for key in changed)
    raise errors.UserError(
        f"the checkpoints in this workdir were trained with another config "
        f"({listed}); restore those values to resume from step {step}, or pass a "
        "new --workdir to start a new run")


def steps_note(restored: tuple[int, dict] | None,
               cfg: ml_collections.ConfigDict) -> str | None:
  """The note on a changed `steps` for the checkpoint the run resumes from.

  Example:
    note = steps_note(checkpointer.saved_config(start), cfg)

  Args:
    restored: (step, config dict) of the checkpoint that was restored
      (`Checkpointer.saved_config(step)`), or None.
    cfg: This run's config.

  Returns:
    One line saying how the learning-rate schedule changes from that step on,
    or None when `steps` is unchanged (or the checkpoint stored no config).
  """
  if restored is None:
    return None
  step, old = restored
  old_steps = old.get("steps")
  if not (isinstance(old_steps, int) and old_steps > 0 and old_steps != cfg.steps):
    return None
  lr_new = float(optimizers.schedule(cfg.opt, cfg.steps)(step))
  lr_old = float(optimizers.schedule(cfg.opt, old_steps)(step))
  return (f"note: steps changed from {old_steps} to {cfg.steps} since the "
          f"checkpoint at step {step}: the learning-rate schedule (warmup, cosine "
          f"decay) now spans {cfg.steps} steps, so step {step + 1} trains at lr "
          f"{lr_new:.3g} instead of {lr_old:.3g}; steps 1-{step} keep the "
          f"{old_steps}-step schedule they were trained with")


def to_json(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as stored with the checkpoints (JSON types: lists, not tuples)."""
  return json.loads(cfg.to_json())


def _fixed(key: str) -> bool:
  if key in RESUME_FREE:
    return False
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUME_FIXED)


def _unread_option(key: str, opt_name: str) -> bool:
  """Whether `key` is a field of another optimizer's section `opt.<name>`."""
  parts = key.split(".")
  return (len(parts) > 2 and parts[0] == "opt" and parts[1] in optimizers.NAMES
          and parts[1] != opt_name)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat
