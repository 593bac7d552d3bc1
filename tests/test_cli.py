"""The trainer's command line as a user meets it: short runs, small corpora,
relative paths, input errors, damaged checkpoints, restarts and preemption.

Every test runs `python -m train` in a subprocess on the test preset
(configs/test.py), from a temporary working directory, with one CPU device.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import helpers
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ,
       "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
TIMEOUT = 600


def start(cwd, *args):
  """Starts `python -m train ARGS` in `cwd`; stdout and stderr together."""
  return subprocess.Popen([sys.executable, "-m", "train", *map(str, args)], cwd=cwd,
                          env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def run(cwd, *args):
  """Runs `python -m train ARGS` in `cwd`; returns (exit status, output)."""
  proc = start(cwd, *args)
  out, _ = proc.communicate(timeout=TIMEOUT)
  return proc.returncode, out


def preset_args(corpus, workdir, *extra):
  """The test preset on the generated corpus (tests/conftest.py)."""
  return ["--config", "configs/test.py", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in corpus.items()), *extra]


def losses(workdir):
  """(step, train/loss, eval/loss) of every metrics.jsonl record."""
  return [(s, r["train/loss"], r.get("eval/loss"))
          for s, r in sorted(helpers.records(workdir).items())]


def assert_one_line_error(status, out, *fragments):
  lines = [line for line in out.splitlines() if line.strip()]
  assert status == 2, out
  assert "Traceback" not in out, out
  assert lines[-1].startswith("error: "), out
  assert sum(line.startswith("error") for line in lines) == 1, out
  for fragment in fragments:
    assert fragment in lines[-1], (fragment, out)


# ---------------------------------------------------------------- new users


def test_small_corpus_short_run_relative_paths(tmp_path):
  """A 3 KB text, one step and relative paths, as typed in the user's directory."""
  words = ("the", "king", "and", "lord")
  lines, size = [], 0
  for i in range(1000):
    line = " ".join(words[(i * 7 + j * 3) % 4] for j in range(5 + i % 7)).capitalize()
    lines.append(line + ".")
    size += len(line) + 2
    if size > 3000:
      break
  (tmp_path / "small.txt").write_text("\n".join(lines) + "\n")
  status, out = run(tmp_path, "--config", "configs/test.py", "--workdir", "myrun",
                    "--config.data.files=small.txt", "--config.steps=1")
  assert status == 0, out
  assert "note: data.vocab_size=320 is more than this corpus supports" in out
  assert "note: the eval split has 1 window per process, fewer than one batch" in out
  assert "note: opt.warmup_steps=1 is not shorter than steps=1" in out
  assert (tmp_path / "myrun" / "checkpoints" / "1").is_dir()
  assert (tmp_path / "data" / "tokenizers").is_dir()  # data.dir="data/", relative
  assert not os.path.exists(os.path.join(REPO, "myrun"))
  assert helpers.records(tmp_path / "myrun")[1]["eval/loss"] > 0


@pytest.mark.parametrize("args, fragments", [
    (["--config.steps=0", "--config.opt.learning_rate=-0.01", "--config.opt.name=sgd"],
     ["3 problems", "steps must be a positive int, got 0", "opt.name='sgd'",
      "opt.learning_rate must be positive, got -0.01"]),
    (["--config.data.files=missing.txt"], ["data.files: 'missing.txt' names no file"]),
    (["--config.steps=ten"], ["--config.steps=ten"]),
    (["--config=configs/nonexistent.py"], ["no preset file", "tiny"]),
    (["--config.opt.subtrack.step=fast", "--config.opt.subspace_layers=True"],
     ["2 problems", "opt.subtrack.step='fast' is not one of optimal, normalized, "
      "raw, angle", "opt.subspace_layers=True is a mode of opt.name 'grass' or "
      "'rso', not 'subtrack'"]),
    (["--config.opt.subtrack.etaa=0.5"], ["unknown config key 'etaa'"]),
    # A layer-wise step never holds the whole gradient; its micro-batches add
    # reduced gradients, which the recovery term and APOLLO cannot use.
    (["--config.opt.layerwise=True", "--config.opt.clip_norm=1.0",
      "--config.grad_accum=2", "--config.model.scan=False"],
     ["3 problems", "needs model.scan=True", "set opt.clip_norm=0",
      "opt.subtrack.recovery=True adds the residual of the whole batch's full "
      "gradient; set opt.subtrack.recovery=False or set grad_accum=1",
      "opt.layerwise=False"]),
    (["--config.opt.layerwise=True", "--config.grad_accum=2",
      "--config.opt.name=apollo"],
     ["opt.name='apollo' scales the full gradient of the whole batch"]),
    (["--config.opt.layerwise=True", "--config.grad_accum=2",
      "--config.opt.name=grassjump", "--config.opt.grassjump.recovery=False",
      "--config.opt.grassjump.store_basis=False"],
     ["set opt.grassjump.store_basis=True or set grad_accum=1"]),
    (["--config.opt.layerwise=True", "--config.opt.name=optax_galore"],
     ["does not support opt.name='optax_galore'"]),
    # int8 kernels are updated only where the layer-wise step updates a layer.
    (["--config.model.kernel_format=int8"],
     ["model.kernel_format=int8 updates each layer's int8 kernels inside the "
      "backward scan and needs opt.layerwise=True", "model.kernel_format=float"]),
    (["--config.model.kernel_format=int8", "--config.opt.layerwise=True",
      "--config.grad_accum=2"],
     ["model.kernel_format=int8 is not implemented with micro-batch "
      "accumulation (grad_accum=2); set grad_accum=1"]),
    (["--config.model.kernel_format=int4"],
     ["model.kernel_format must be one of float, int8, got 'int4'"]),
    (["--config.grad_accum=3"], ["batch_size=8 must be a multiple of grad_accum=3"]),
    # A rank above every kernel's smaller side projects nothing.
    (["--config.opt.rank=32", "--config.model.n_kv_heads=2"],
     ["opt.rank=32 must be positive and smaller than the smaller side of one of "
      "the blocks' kernels at least, the largest being 32"]),
    (["--config.opt.projected=atn"],
     ["opt.projected='atn' selects no matrix of the model; its matrices are "
      "blocks.attn.k.kernel, blocks.attn.o.kernel"]),
    (["--config.data.corpus=files", "--config.data.files=notes.txt"],
     ["data.files: notes.txt is not a .parquet or JSON lines"]),
    (["--multihost"], ["--multihost: JAX detects no cluster here"]),
    (["--config.opt.stochastic_rounding=True", "--config.opt.nu_dtype=float16"],
     ["2 problems", "opt.stochastic_rounding=True rounds updates to bfloat16 "
      "weights, but model.param_dtype='float32'; set --config.model.param_dtype="
      "bfloat16", "opt.nu_dtype must be 'float32' or 'bfloat16', got 'float16'"]),
])
def test_input_errors_are_one_line_with_status_2(tmp_path, args, fragments):
  (tmp_path / "notes.txt").write_text("plain text, not a shard\n")
  status, out = run(tmp_path, "--config", "configs/test.py", "--workdir=run", *args)
  assert_one_line_error(status, out, *fragments)
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_method_option_on_the_command_line_trains(corpus, tmp_path):
  """`--config.opt.subtrack.eta=0.5` reaches the run's stored config."""
  status, out = run(tmp_path, *preset_args(
      corpus, "run", "--config.opt.subtrack.eta=0.5",
      "--config.opt.subtrack.step=angle", "--config.steps=2",
      "--config.eval_every=0"))
  assert status == 0, out
  with open(tmp_path / "run" / "checkpoints" / "2" / "config" / "metadata") as f:
    opt = json.load(f)["opt"]
  assert opt["subtrack"]["eta"] == 0.5 and opt["subtrack"]["step"] == "angle"
  assert [s for s, _, _ in losses(tmp_path / "run")] == [1, 2]


@pytest.mark.slow
def test_eight_bit_moments_train_and_resume_bit_for_bit(corpus, tmp_path):
  """`--config.opt.subtrack.quantize_moments=quantile` trains, and a run resumed
  from its step-1 checkpoint retrains steps 2-3 bit for bit (step 3's loss
  reads the restored 8-bit moments)."""
  args = preset_args(corpus, "run", "--config.opt.subtrack.quantize_moments=quantile",
                     "--config.steps=3", "--config.checkpoint_every=1",
                     "--config.keep_checkpoints=3", "--config.eval_every=0")
  status, out = run(tmp_path, *args)
  assert status == 0, out
  before = losses(tmp_path / "run")
  for step in ("2", "3"):
    shutil.rmtree(tmp_path / "run" / "checkpoints" / step)
  status, out = run(tmp_path, *args)
  assert status == 0, out
  assert "resumed from step 1 in run" in out
  assert losses(tmp_path / "run") == before and len(before) == 3
  with open(tmp_path / "run" / "checkpoints" / "3" / "config" / "metadata") as f:
    assert json.load(f)["opt"]["subtrack"]["quantize_moments"] == "quantile"


def test_a_rank_above_the_gqa_kernels_leaves_them_to_adam_with_one_note(tmp_path):
  """Grouped queries (k and v kernels 32 x 16) at rank 16: k and v get plain
  Adam, said once, and the optimizer state is that of projecting the other
  kernels by name."""
  gqa = ["--config.model.n_kv_heads=2", "--config.opt.rank=16", "--dry_run"]
  status, out = run(tmp_path, "--config", "configs/test.py", "--workdir=gqa", *gqa)
  assert status == 0, out
  notes = [line for line in out.splitlines() if "plain Adam" in line]
  assert notes == [
      "note: opt.rank=16 is not smaller than the smaller side of attn.k (32 x 16), "
      "attn.v (32 x 16): they get plain Adam, the other kernels a rank-16 subspace "
      "(an opt.rank below 16 projects them too)"], out
  status, out = run(tmp_path, "--config", "configs/test.py", "--workdir=named", *gqa,
                    "--config.opt.projected=attn.q,attn.o,mlp")
  assert status == 0, out
  assert "plain Adam" not in out
  by_rank, by_name = (json.loads((tmp_path / w / "memory.json").read_text())
                      for w in ("gqa", "named"))
  assert by_rank["state_bytes"] == by_name["state_bytes"]


def test_verbose_shows_the_traceback(tmp_path):
  status, out = run(tmp_path, "--config", "configs/test.py", "--workdir=run",
                    "--config.steps=0", "--verbose")
  assert status != 0 and "Traceback" in out and "steps must be a positive int" in out


# ---------------------------------------------------------------- restarts


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
  """A finished 5-step optax_galore run (scanned layers) with a checkpoint per step."""
  root = tmp_path_factory.mktemp("finished")
  args = preset_args(corpus, "run", "--config.opt.name=optax_galore",
                     "--config.steps=5", "--config.checkpoint_every=1",
                     "--config.keep_checkpoints=5", "--config.eval_every=0")
  status, out = run(root, *args)
  assert status == 0, out
  assert "note: opt.name='optax_galore' projects 2-D kernels only" in out
  return root, args


def _copy(finished, tmp_path):
  root, args = finished
  shutil.copytree(root / "run", tmp_path / "run")
  return args


def _damage(step_dir, kind):
  if kind == "truncated array file":
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state") for f in fs
             if os.sep + "d" + os.sep in os.path.join(d, f)]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)
  else:
    os.remove(step_dir / kind)


DAMAGES = {5: "truncated array file", 4: "state/_METADATA",
           3: "state/manifest.ocdbt", 2: "data/process_0-of-1.json"}


def test_damaged_checkpoints_fall_back_to_the_newest_good_one(finished, tmp_path):
  args = _copy(finished, tmp_path)
  before = losses(tmp_path / "run")
  for step, kind in DAMAGES.items():
    _damage(tmp_path / "run" / "checkpoints" / str(step), kind)
  status, out = run(tmp_path, *args)
  assert status == 0, out
  warnings = [line for line in out.splitlines() if line.startswith("warning: the checkpoint")]
  assert len(warnings) == 4, out
  for line, (step, kind) in zip(warnings, DAMAGES.items()):
    assert line.startswith(f"warning: the checkpoint at step {step} is damaged ("), line
    what = "its arrays do not read back" if step == 5 else f"{kind} is missing"
    assert what in line and "checkpoints.damaged" in line, line
  assert "resumed from step 1 in run" in out
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints.damaged")) == ["2", "3", "4", "5"]
  assert losses(tmp_path / "run") == before  # steps 2-5 trained again, bit for bit

  # No good checkpoint left: nothing is moved, and the error says how to start fresh.
  shutil.copytree(tmp_path / "run" / "checkpoints.damaged" / "5",
                  tmp_path / "bad" / "checkpoints" / "5")
  status, out = run(tmp_path, *args, "--workdir=bad")
  assert_one_line_error(status, out, "no checkpoint in", "step 5: its arrays do not "
                        "read back", "to start fresh")
  assert os.listdir(tmp_path / "bad" / "checkpoints") == ["5"]


def test_steps_note_describes_the_checkpoint_that_restores(finished, tmp_path):
  """With the newest checkpoint (5) damaged and a longer run asked for, the
  note on the changed schedule speaks of step 4, the one restored, after the
  warning."""
  args = _copy(finished, tmp_path)
  _damage(tmp_path / "run" / "checkpoints" / "5", "truncated array file")
  status, out = run(tmp_path, *args, "--config.steps=7")
  assert status == 0, out
  lines = out.splitlines()
  warning = [i for i, line in enumerate(lines)
             if line.startswith("warning: the checkpoint at step 5 is damaged")]
  notes = [i for i, line in enumerate(lines)
           if line.startswith("note: steps changed")]
  assert len(warning) == 1 and len(notes) == 1, out
  assert warning[0] < notes[0], out
  assert lines[notes[0]].startswith(
      "note: steps changed from 5 to 7 since the checkpoint at step 4: "), out
  assert "so step 5 trains at lr " in lines[notes[0]], out
  assert "resumed from step 4 in run" in out


def test_restarts_of_a_finished_run(finished, tmp_path):
  args = _copy(finished, tmp_path)
  before = losses(tmp_path / "run")
  status, out = run(tmp_path, *args)
  assert status == 0, out
  assert "run holds a finished run (its checkpoint is at step 5, steps=5)" in out
  assert "train step memory" not in out and "step/s" not in out  # no compile, no bar

  model_json = (tmp_path / "run" / "model.json").read_text()
  status, out = run(tmp_path, *args, "--config.opt.rank=4", "--config.seed=1",
                    "--config.model.d_ff=64", "--config.log_every=2")
  assert_one_line_error(status, out, "model.d_ff 96 -> 64", "opt.rank 8 -> 4",
                        "seed 0 -> 1", "--workdir")
  assert "log_every" not in out  # free to change
  assert (tmp_path / "run" / "model.json").read_text() == model_json  # nothing written

  status, out = run(tmp_path, *args, "--config.steps=7")
  assert status == 0, out
  assert "note: steps changed from 5 to 7 since the checkpoint at step 5" in out
  after = losses(tmp_path / "run")
  assert after[:5] == before and [s for s, *_ in after] == list(range(1, 8))


def _export(cwd, *args):
  """Runs `python -m train.export ARGS` in `cwd`; returns (exit status, output)."""
  done = subprocess.run([sys.executable, "-m", "train.export", *map(str, args)],
                        cwd=cwd, env=ENV, capture_output=True, text=True,
                        timeout=TIMEOUT, check=False)
  return done.returncode, done.stdout + done.stderr


def test_export_is_readable_refuses_a_full_out_and_overwrites_on_request(
    finished, tmp_path):
  _copy(finished, tmp_path)
  umask = os.umask(0o022)
  try:
    status, out = _export(tmp_path, "--workdir=run", "--out=hf")
    assert status == 0, out
    files = sorted(os.listdir(tmp_path / "hf"))
    assert "model.safetensors" in files and "config.json" in files, files
    modes = {f: oct(os.stat(tmp_path / "hf" / f).st_mode & 0o777) for f in files}
    assert set(modes.values()) == {"0o644"}, modes
    assert oct(os.stat(tmp_path / "hf").st_mode & 0o777) == "0o755"
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]  # no staging left
    written = {f: (tmp_path / "hf" / f).read_bytes() for f in files}

    status, out = _export(tmp_path, "--workdir=run", "--out=hf", "--step=4")
    assert_one_line_error(status, out, "--out='hf' is not empty",
                          "--overwrite")
    assert {f: (tmp_path / "hf" / f).read_bytes() for f in files} == written

    status, out = _export(tmp_path, "--workdir=run", "--out=hf", "--step=4",
                          "--overwrite")
    assert status == 0 and "step 4 of run" in out, out
    assert sorted(os.listdir(tmp_path / "hf")) == files
    assert ((tmp_path / "hf" / "model.safetensors").read_bytes()
            != written["model.safetensors"])
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]
  finally:
    os.umask(umask)


# ---------------------------------------------------------------- preemption


def _interrupt(cwd, args, signals, workdir):
  """Starts a run, sends `signals` once it trained 3 steps; returns (status, out)."""
  done = len(helpers.records(workdir)) if (workdir / "metrics.jsonl").exists() else 0
  proc = start(cwd, *args)
  deadline = time.time() + TIMEOUT
  while proc.poll() is None and time.time() < deadline:
    if (workdir / "metrics.jsonl").exists():
      with open(workdir / "metrics.jsonl") as f:
        if sum(1 for _ in f) >= done + 3:
          break
    time.sleep(0.02)
  for sig in signals:
    proc.send_signal(sig)
  out, _ = proc.communicate(timeout=TIMEOUT)
  return proc.returncode, out


@pytest.mark.slow
def test_sigterm_and_sigint_then_restart_equal_an_uninterrupted_run(corpus, tmp_path):
  args = preset_args(corpus, "{}", "--config.opt.name=adamw", "--config.steps=150",
                     "--config.eval_every=0", "--config.checkpoint_every=1000")
  with_workdir = lambda name: [a.format(name) if a.startswith("--workdir") else a
                               for a in args]
  status, out = run(tmp_path, *with_workdir("straight"))
  assert status == 0, out
  workdir, split = tmp_path / "split", with_workdir("split")
  saved = []
  for signals, expected in (([signal.SIGTERM], 143), ([signal.SIGINT], 130)):
    status, out = _interrupt(tmp_path, split, signals, workdir)
    assert status == expected, out
    last = out.strip().splitlines()[-1]
    name = signal.Signals(signals[0]).name
    assert last.startswith(f"stopped by {name}: saved a checkpoint at step "), out
    assert last.endswith("run the same command to resume"), last
    saved.append(int(last.split("at step ")[1].split()[0]))
    assert str(saved[-1]) in os.listdir(workdir / "checkpoints")
  assert 0 < saved[0] < saved[1] < 150
  # Two signals in a row: out at once, the newest complete checkpoint intact.
  status, out = _interrupt(tmp_path, split, [signal.SIGINT, signal.SIGTERM], workdir)
  assert status in (130, 143) and "again: quitting without saving" in out, out
  status, out = run(tmp_path, *split)
  assert status == 0, out
  assert "damaged" not in out and "resumed from step " in out
  assert losses(workdir) == losses(tmp_path / "straight")
  final = [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]
  assert final["step"] == 150 and final["eval/loss"] > 0
