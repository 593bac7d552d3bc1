"""Memory of the shard pipeline (data.corpus="files"): flat in the corpus size.

Writes a generated corpus of pseudo-English documents as gzipped JSON lines and
parquet shards (as C4 and FineWeb ship), then, for each size, runs
`train.data.build_data` on it in a fresh process (tokenizing it into the token
cache), reads `--batches` training batches, and samples the process's resident
memory (/proc/self/status: RssAnon, the heap, and RssFile, mapped files) every
50 ms. The tokenizer is trained once beforehand on the first shard and given as
`data.tokenizer`, so only the streaming is measured.

  python -m bench.data_stream --sizes_mb 64,256,1024

RssAnon must not grow with the corpus; RssFile grows as the memory-mapped token
cache is read (those pages are the kernel's page cache and are dropped under
memory pressure).
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from bench import _common

NAME = "data_stream"
_SHARD_MB = 32  # text per shard
_SEQ_LEN = 256
_BATCH = 8


def _words(rng: np.random.Generator, n: int) -> np.ndarray:
  """A vocabulary of `n` pronounceable made-up words."""
  consonants, vowels = list("bcdfghjklmnprstvwz"), list("aeiou")
  return np.array(["".join(rng.choice(consonants) + rng.choice(vowels)
                           for _ in range(rng.integers(1, 4))) for _ in range(n)])


def write_corpus(root: str, megabytes: int, seed: int = 0) -> list[str]:
  """Writes about `megabytes` MB of documents as shards; returns their paths.

  Every fourth shard is parquet, the others gzipped JSON lines with a "text"
  and a "url" field.
  """
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  vocab = _words(rng, 5000)
  weights = 1.0 / np.arange(1, len(vocab) + 1)  # Zipf-like word frequencies
  weights /= weights.sum()
  paths, written, index = [], 0, 0
  os.makedirs(root, exist_ok=True)
  while written < megabytes << 20:
    docs, size = [], 0
    while size < _SHARD_MB << 20 and written + size < megabytes << 20:
      words = vocab[rng.choice(len(vocab), size=int(rng.integers(100, 800)), p=weights)]
      lines = [" ".join(words[i:i + 12]).capitalize() + "."
               for i in range(0, len(words), 12)]
      docs.append("\n".join(lines))
      size += len(docs[-1]) + 1
    if index % 4 == 3:
      path = os.path.join(root, f"part-{index:05d}.parquet")
      pq.write_table(pa.table({"text": docs}), path, row_group_size=1000)
    else:
      path = os.path.join(root, f"part-{index:05d}.jsonl.gz")
      with gzip.open(path, "wt", compresslevel=1) as f:
        for i, doc in enumerate(docs):
          f.write(json.dumps({"text": doc, "url": f"doc-{index}-{i}"}) + "\n")
    paths.append(path)
    written += size
    index += 1
  return paths


class _Sampler:
  """Samples RssAnon and RssFile (MiB) of this process every 50 ms."""

  def __init__(self):
    self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  @staticmethod
  def now() -> dict[str, float]:
    values = {}
    with open("/proc/self/status") as f:
      for line in f:
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile"):
          values[key] = int(rest.split()[0]) / 1024
    return values

  def _sample(self):
    for key, value in self.now().items():
      self.peak[key] = max(self.peak[key], value)

  def _run(self):
    while not self._stop.wait(0.05):
      self._sample()

  def __enter__(self):
    self._sample()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self._sample()


def _child(spec: dict) -> dict:
  """One measurement, in a fresh process: build_data on the shards, then batches."""
  from configs import base  # pylint: disable=import-outside-toplevel
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  cfg = base.default_data_config()
  cfg.corpus, cfg.files, cfg.dir = "files", spec["files"], spec["cache"]
  cfg.tokenizer, cfg.eval_fraction = spec["tokenizer"], 0.001
  baseline = _Sampler.now()
  with _Sampler() as build:
    start = time.perf_counter()
    data = data_lib.build_data(cfg, seq_len=_SEQ_LEN, global_batch_size=_BATCH, seed=0)
    build_s = time.perf_counter() - start
  with _Sampler() as read:
    start = time.perf_counter()
    for _ in range(spec["batches"]):
      next(data.train_iter)
    read_s = time.perf_counter() - start
  tokens = (data.epoch_windows + 1) * _SEQ_LEN
  return {"baseline_anon_mib": baseline["RssAnon"],
          "build_peak_anon_mib": build.peak["RssAnon"],
          "read_peak_anon_mib": read.peak["RssAnon"],
          "read_peak_file_mib": read.peak["RssFile"],
          "build_s": build_s, "read_s": read_s, "train_tokens": tokens}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes_mb", default="64,256,1024",
                      help="comma-separated corpus sizes, MB of text")
  parser.add_argument("--batches", type=int, default=2000,
                      help="training batches (8 x 257 tokens) read after the build")
  parser.add_argument("--workdir", default="",
                      help="where the corpora go (default: a temporary directory)")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_child(json.loads(args.child))), flush=True)
    return
  sizes = [int(s) for s in args.sizes_mb.split(",")]
  root = args.workdir or tempfile.mkdtemp(prefix="data_stream_")
  from train import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  rows, results = [], []
  for size in sizes:
    corpus = os.path.join(root, f"corpus_{size}mb")
    start = time.perf_counter()
    paths = write_corpus(corpus, size)
    print(f"wrote {len(paths)} shards, {size} MB of text, in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    model = os.path.join(root, "bpe8192.model")
    if not os.path.exists(model):  # trained once, on the first shard's text
      with gzip.open(paths[0], "rt") as f:
        lines = [line for row in f for line in json.loads(row)["text"].split("\n")]
      with open(model, "wb") as f:
        f.write(tokenizer_lib.train_bpe(lines, 8192))
    spec = {"files": os.path.join(corpus, "part-*"), "cache": corpus + "_cache",
            "tokenizer": model, "batches": args.batches}
    out = subprocess.run(
        [sys.executable, "-m", "bench.data_stream", "--child", json.dumps(spec)],
        check=True, capture_output=True, text=True, cwd=_common.ROOT).stdout
    result = {"text_mb": size, "shards": len(paths),
              **json.loads(out.strip().splitlines()[-1])}
    results.append(result)
    rows.append([size, len(paths), f"{result['train_tokens'] / 1e6:.0f}M",
                 f"{result['build_s']:.0f}", f"{result['baseline_anon_mib']:.0f}",
                 f"{result['build_peak_anon_mib']:.0f}",
                 f"{result['read_peak_anon_mib']:.0f}",
                 f"{result['read_peak_file_mib']:.0f}"])
  table = _common.markdown_table(
      ["text MB", "shards", "tokens", "build s", "RssAnon at start MiB",
       "RssAnon peak, build MiB", f"RssAnon peak, {args.batches} batches MiB",
       "RssFile peak MiB"], rows)
  note = (f"build_data on data.corpus=\"files\" (gzipped JSON lines and parquet "
          f"shards of {_SHARD_MB} MB), then {args.batches} shuffled batches of "
          f"{_BATCH} x {_SEQ_LEN + 1} tokens; resident memory sampled every 50 ms. "
          + _common.machine_line(_common.machine()))
  payload = _common.with_call({"results": results}, None,
                              _common.call_record(args, argv, batch=_BATCH,
                                                  seq_len=_SEQ_LEN))
  _common.write_results(NAME, payload, note + "\n\n" + table)


if __name__ == "__main__":
  main()
