"""bench.gpu: skips cleanly without a GPU; its measurements work on the CPU."""

import math

import jax
import numpy as np
import pytest

from bench import _common
from bench import gpu
from train import model as model_lib


def test_skips_cleanly_without_a_gpu(tmp_path, capsys):
  if jax.local_devices()[0].platform == "gpu":
    pytest.skip("a GPU is present")
  assert gpu.main(["--out", str(tmp_path)]) == 0
  assert "no GPU here" in capsys.readouterr().out
  assert not list(tmp_path.iterdir())  # nothing measured, nothing written


@pytest.mark.parametrize("argv, message", [
    (["--presets", "9b"], "--presets: unknown"),
    (["--cases", "adamw,lion"], "--cases: unknown"),
    (["--one-device", "7b"], "--one-device: unknown"),
])
def test_bad_arguments_name_the_flag(argv, message, capsys):
  with pytest.raises(SystemExit):
    gpu.main(argv)
  assert message in capsys.readouterr().err


def test_model_flops_count_every_matmul_weight():
  cfg = gpu.config("60m", "adamw")
  model_cfg = model_lib.LlamaConfig.from_config(cfg.model, cfg.data.vocab_size)
  shapes = model_lib.abstract_model(model_cfg)[1]
  n_params = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
  d, layers, vocab = model_cfg.d_model, model_cfg.n_layers, model_cfg.vocab_size
  norms = (2 * layers + 1) * d
  matmul_weights = n_params - vocab * d - norms  # all but the embedding lookup
  attention = 6 * layers * cfg.seq_len * model_cfg.n_heads * model_cfg.head_dim
  assert gpu.flops_per_token(model_cfg, cfg.seq_len) == 6 * matmul_weights + attention


def test_peak_tflops_from_the_device_kind():
  class Device:
    device_kind = "NVIDIA H100 80GB HBM3"
  assert gpu.peak_tflops(Device(), 0.0) == 989.0
  assert gpu.peak_tflops(Device(), 500.0) == 500.0
  Device.device_kind = "cpu"
  assert gpu.peak_tflops(Device(), 0.0) is None


@pytest.mark.parametrize("case", ["adamw", "grass+sparse"])
def test_measures_a_case_on_the_cpu(case):
  result = gpu.measure_case("test", case, steps=4, warmup=1)
  assert result["tokens_per_s"] > 0 and result["step_s"] > 0
  assert np.isfinite(result["final_loss"])
  assert result["compiled_peak"] > 0
  assert result["compiled_peak"] == gpu.compiled_peak("test", case)


def test_the_one_device_presets_run_as_configured_and_are_tabled():
  cfg = gpu.config("7b_24gb", "as_configured")
  assert cfg.opt.layerwise and cfg.model.param_dtype == "bfloat16"
  assert gpu.config("13b_40gb", "as_configured").opt.subspace_layers
  result = {"preset": "7b_24gb", "tokens_per_s": 100.0, "peak_bytes_in_use": 30 * 2**30,
            "compiled_peak": 21 * 2**30, "budget_gib": 24, "final_loss": 9.0,
            "predicted": {"target": "h100", "peak": 24 * 2**30}}
  payload = {"throughput": [], "fits": [], "one_device": [result], "device": "GPU",
             "peak_tflops": None, "machine": _common.machine()}
  text = gpu.table(payload)
  assert ("| 7b_24gb | 100 | 30,720 | 21,504 | 24,576 | 1.250 | 24 GiB (exceeded) "
          "| 9.000 |") in text


def test_predicted_peak_is_the_deviceless_dry_run():
  """bench.gpu's prediction is the dry run's for the target, run as a user
  would (the test preset compiled for an H100 by the GPU compiler)."""
  predicted = gpu.predicted_peak("test", "h100")
  assert "error" not in predicted, predicted
  assert 0 < predicted["peak"] < 2**30
