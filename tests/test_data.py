"""Tests of the trainer's data pipeline (train/data.py) on generated text, offline."""

import glob
import os

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds

from configs import base
from train import data as data_lib
from train import tokenizer as tokenizer_lib

SEQ_LEN = 32
VOCAB = 384  # byte fallback needs 256 bytes + 3 control + the corpus's characters
_WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from "
    "not have all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more "
    "her two like him see time could no make than first been its who now people "
    "my made over did down only way find use may water long little very after "
    "words called just where most know get through back much before go good new "
    "write our used me man too any day same right look think also around another "
    "came come work three word must because does part even place well such here "
    "take why things help put years different away again off went old number "
    "king queen lord sword crown night love death heart blood fair sweet"
).split()


def _pseudo_english(rng: np.random.Generator, n_lines: int) -> str:
  lines = []
  for _ in range(n_lines):
    words = rng.choice(_WORDS, size=rng.integers(4, 14))
    lines.append(" ".join(words).capitalize() + rng.choice([".", ",", ";", "?"]))
  return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Three text files of pseudo-English (about 300 KB) and a cache directory."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  texts = [_pseudo_english(rng, 2000) for _ in range(3)]
  for i, text in enumerate(texts):
    (root / f"doc{i}.txt").write_text(text)
  return {"files": str(root / "doc*.txt"), "texts": texts, "dir": str(root / "cache")}


def _tfds_texts():
  rng = np.random.default_rng(1)
  return [_pseudo_english(rng, 40) for _ in range(100)]


class PseudoEnglishForTest(tfds.core.GeneratorBasedBuilder):
  """A tfds dataset of documents with a text feature "content"."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"content": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, text in enumerate(_tfds_texts()):
      yield i, {"content": text}


def _cfg(env, **overrides):
  cfg = base.default_data_config()
  cfg.corpus = "text_files"
  cfg.files = env["files"]
  cfg.dir = env["dir"]
  cfg.vocab_size = VOCAB
  cfg.update(overrides)
  return cfg


def _build(corpus, *, seed=0, global_batch_size=8, seq_len=SEQ_LEN, cfg=None, **kw):
  return data_lib.build_data(cfg or _cfg(corpus), seq_len=seq_len,
                             global_batch_size=global_batch_size, seed=seed, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _epoch_rows(data, local_batch):
  """The rows of the first epoch of this process's train iterator."""
  batches = _take(data.train_iter, -(-data.epoch_windows // local_batch))
  return [row.tobytes() for row in np.concatenate(batches)[:data.epoch_windows]]


def test_shapes_and_dtypes(corpus):
  data = _build(corpus)
  assert data.vocab_size == VOCAB
  assert isinstance(data.tokenizer, spm.SentencePieceProcessor)
  for batch in _take(data.train_iter, 3) + list(data.eval_batches()):
    assert batch.shape == (8, SEQ_LEN + 1)
    assert batch.dtype == np.int32
    assert 0 <= batch.min() and batch.max() < VOCAB
  assert len(list(data.eval_batches())) >= 1


def test_tokens_decode_to_corpus_text(corpus):
  data = _build(corpus)
  eos = data.tokenizer.eos_id()
  full_text = "".join(corpus["texts"])
  rows = np.concatenate(_take(data.train_iter, 4) + list(data.eval_batches()))
  for row in rows:
    # A window may span the end of one file (the </s> token) and the next.
    pieces = np.split(row, np.flatnonzero(row == eos))
    for piece in pieces:
      text = data.tokenizer.decode([int(t) for t in piece if t != eos])
      assert text in full_text


def test_unshuffled_windows_are_consecutive(corpus):
  data = _build(corpus, cfg=_cfg(corpus, shuffle=False))
  batch = next(data.train_iter)
  # Consecutive windows share one token: the last target is the next first input.
  np.testing.assert_array_equal(batch[:-1, -1], batch[1:, 0])
  eval_rows = np.concatenate(list(data.eval_batches()))
  np.testing.assert_array_equal(eval_rows[:-1, -1], eval_rows[1:, 0])


def test_train_and_eval_are_disjoint(corpus):
  data = _build(corpus)
  train_rows = _epoch_rows(data, 8)
  assert len(set(train_rows)) == data.epoch_windows  # an epoch is a permutation
  eval_rows = {row.tobytes() for b in data.eval_batches() for row in b}
  assert eval_rows and not eval_rows & set(train_rows)


def test_eval_batches_are_the_same_every_call(corpus):
  data = _build(corpus)
  first, second = list(data.eval_batches()), list(data.eval_batches())
  assert len(first) == len(second) > 0
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_iterator_state_round_trip_across_an_epoch(corpus):
  data = _build(corpus)
  steps_per_epoch = data.epoch_windows // 8
  _take(data.train_iter, steps_per_epoch - 2)
  state = data.train_iter.get_state()
  assert isinstance(state, dict)
  expected = _take(data.train_iter, 5)  # crosses into the second epoch
  resumed = _build(corpus).train_iter
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 5)):
    np.testing.assert_array_equal(want, got)


def test_same_seed_same_batches_other_seed_other_batches(corpus):
  a, b, c = (_take(_build(corpus, seed=s).train_iter, 3) for s in (0, 0, 1))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0])


def test_process_shards_are_disjoint_and_cover_the_data(corpus):
  full = set(_epoch_rows(_build(corpus), 8))
  shards = [_build(corpus, process_index=p, process_count=2) for p in range(2)]
  rows = [set(_epoch_rows(shard, 4)) for shard in shards]
  assert not rows[0] & rows[1]
  assert rows[0] | rows[1] <= full
  assert len(full) - len(rows[0] | rows[1]) < 2  # an odd last window is dropped
  evals = [[b.tobytes() for b in s.eval_batches()] for s in shards]
  assert len(evals[0]) == len(evals[1]) > 0
  assert not set(evals[0]) & set(evals[1])
  assert next(shards[0].train_iter).shape == (4, SEQ_LEN + 1)


def test_second_build_uses_the_cache(corpus, capsys):
  _build(corpus)
  capsys.readouterr()
  _build(corpus)
  out = capsys.readouterr().out
  assert "tokenizing" not in out and "training" not in out and "building" not in out
  assert not glob.glob(os.path.join(corpus["dir"], "**", ".*tmp*"), recursive=True)


def test_killed_tokenization_leaves_no_cache(corpus, tmp_path, monkeypatch):
  def fail(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(tokenizer_lib, "encode_stream", fail)
  cfg = _cfg(corpus, dir=str(tmp_path))
  with pytest.raises(KeyboardInterrupt):
    _build(corpus, cfg=cfg)
  assert not list((tmp_path / "tokens").iterdir())


def test_tfds_corpus_with_own_tokenizer(corpus, tmp_path):
  PseudoEnglishForTest(data_dir=str(tmp_path), file_format="array_record"
                       ).download_and_prepare()
  _build(corpus)  # trains (or reuses) the corpus's tokenizer: no test order assumed
  model = glob.glob(os.path.join(corpus["dir"], "tokenizers", "*.model"))[0]
  cfg = _cfg(corpus, corpus="tfds", tfds_name="pseudo_english_for_test",
             tfds_data_dir=str(tmp_path), text_key="content", tokenizer=model,
             dir=str(tmp_path / "cache"))
  data = _build(corpus, cfg=cfg)
  assert data.vocab_size == VOCAB
  assert next(data.train_iter).shape == (8, SEQ_LEN + 1)
  full_text = "".join(_tfds_texts())
  eos = data.tokenizer.eos_id()
  for row in next(data.eval_batches()):
    for piece in np.split(row, np.flatnonzero(row == eos)):
      assert data.tokenizer.decode(piece[piece != eos].tolist()) in full_text
  cfg.text_key = "body"
  with pytest.raises(ValueError, match="data.text_key"):
    _build(corpus, cfg=cfg)


@pytest.mark.parametrize("overrides, kwargs, error, match", [
    ({"files": "/nonexistent/a.txt"}, {}, FileNotFoundError, "data.files"),
    ({"files": "/nonexistent/*.txt"}, {}, FileNotFoundError, "data.files"),
    ({"files": ""}, {}, ValueError, "data.files is empty"),
    ({"corpus": "wikipedia"}, {}, ValueError, "unknown data.corpus"),
    ({"tokenizer": "/nonexistent.model"}, {}, FileNotFoundError, "data.tokenizer"),
    ({"eval_fraction": 1.5}, {}, ValueError, "data.eval_fraction"),
    ({}, {"global_batch_size": 6, "process_count": 4}, ValueError, "process_count"),
    ({}, {"seq_len": 100_000}, ValueError, "too small"),
    ({"eval_fraction": 0.9999}, {}, ValueError, "lower data.eval_fraction"),
    ({"vocab_size": 300}, {}, ValueError, "data.vocab_size=300"),
])
def test_bad_input_is_a_clear_error(corpus, overrides, kwargs, error, match):
  with pytest.raises(error, match=match):
    _build(corpus, cfg=_cfg(corpus, **overrides), **kwargs)


def test_empty_file_is_a_clear_error(corpus, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.touch()
  files = f"{corpus['files']},{empty}"
  with pytest.raises(ValueError, match=f"data.files: {empty} is empty"):
    _build(corpus, cfg=_cfg(corpus, files=files))


def test_tokenizer_round_trips_text_exactly(corpus):
  sp = _build(corpus).tokenizer
  text = "  Indented line\n\ttab, ümlaut, 漢字 and emoji 🙂\n\nend"
  tokens = tokenizer_lib.encode_documents(sp, [(text, True)])
  assert tokens[-1] == sp.eos_id()
  assert sp.decode(tokens.tolist()) == text


def test_eval_split_of_no_window_grows_to_one_batch(corpus, capsys):
  data = _build(corpus, cfg=_cfg(corpus, eval_fraction=1e-4))
  assert "holding out 33 (" in capsys.readouterr().out  # one window: SEQ_LEN + 1
  batches = list(data.eval_batches())
  assert len(batches) == 1 and batches[0].shape == (8, SEQ_LEN + 1)
  assert len({row.tobytes() for row in batches[0]}) == 1  # the one window, repeated


# ---------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Four shards of 30 documents each, as C4 / FineWeb / SlimPajama ship them:
  parquet, JSON lines, gzipped and zstd JSON lines (with other fields and a
  row without text)."""
  import gzip, io, json  # pylint: disable=g-import-not-at-top,multiple-imports
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("shards")
  rng = np.random.default_rng(2)
  docs = [[_pseudo_english(rng, 12) for _ in range(30)] for _ in range(4)]
  pq.write_table(pa.table({"url": ["u"] * 30, "text": docs[0]}),
                 root / "part-0.parquet", row_group_size=7)
  zstd = lambda path, mode: io.TextIOWrapper(pa.CompressedOutputStream(str(path), "zstd"))
  for i, (name, opener) in enumerate([("part-1.jsonl", open),
                                      ("part-2.json.gz", gzip.open),
                                      ("part-3.jsonl.zst", zstd)], 1):
    with opener(root / name, "wt") as f:
      for j, text in enumerate(docs[i]):
        f.write(json.dumps({"text": text, "meta": {"timestamp": j}}) + "\n")
      f.write(json.dumps({"url": "a row without text"}) + "\n")
  return {"files": str(root / "part-*"), "docs": docs, "dir": str(root / "cache")}


def _shard_cfg(shards, **overrides):
  return _cfg(shards, **{"corpus": "files", "shuffle": False, "eval_fraction": 0.05,
                         **overrides})


def _stream_rows(data, local_batch=8):
  """The unshuffled train stream of a process, window by window, as tokens."""
  rows = np.concatenate(_take(data.train_iter, data.epoch_windows // local_batch))
  return np.concatenate([rows[0, :1], rows[:, 1:].ravel()])


def test_shards_stream_the_documents_in_order(shards):
  """parquet, .jsonl, .json.gz and .jsonl.zst rows are tokenized with the run's
  tokenizer in shard order, one document each (rows without text skipped)."""
  data = _build(shards, cfg=_shard_cfg(shards))
  expected = tokenizer_lib.encode_documents(
      data.tokenizer, [(d, True) for docs in shards["docs"] for d in docs])
  stream = _stream_rows(data)
  np.testing.assert_array_equal(stream, expected[:len(stream)])
  eval_rows = np.concatenate(list(data.eval_batches()))
  assert stream.size + eval_rows[:, 1:].size > 0.9 * expected.size
  assert data.vocab_size == VOCAB


def test_each_process_reads_its_own_shards(shards):
  """Process p of 2 tokenizes shards p and p + 2 only; both evaluate the
  same number of batches (the smaller of the two)."""
  cfg = _shard_cfg(shards)
  fewest = lambda n: min(n, 1)  # stands for the all-gather of train.run
  parts = [_build(shards, cfg=cfg, global_batch_size=8, process_index=p,
                  process_count=2, min_over_processes=fewest) for p in range(2)]
  for p, data in enumerate(parts):
    own = [(d, True) for docs in shards["docs"][p::2] for d in docs]
    expected = tokenizer_lib.encode_documents(data.tokenizer, own)
    stream = _stream_rows(data, 4)
    np.testing.assert_array_equal(stream, expected[:len(stream)])
    assert len(list(data.eval_batches())) == 1
  with pytest.raises(ValueError, match="names 4 shards for 5 processes"):
    _build(shards, cfg=cfg, global_batch_size=5, process_index=4, process_count=5)


def test_shard_iterator_resumes_exactly(shards):
  cfg = _shard_cfg(shards, shuffle=True)
  data = _build(shards, cfg=cfg)
  _take(data.train_iter, 3)
  state = data.train_iter.get_state()
  expected = _take(data.train_iter, 4)
  resumed = _build(shards, cfg=cfg).train_iter
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 4)):
    np.testing.assert_array_equal(want, got)


@pytest.mark.parametrize("name, text_key, match", [
    ("part-0.parquet", "content",
     "data.text_key 'content' is not a column of .*part-0.parquet; its columns are "
     "url, text"),
    ("part-1.jsonl", "content", "data.text_key 'content': no row of .*part-1.jsonl"),
    ("notes.txt", "text", "notes.txt is not a .parquet or JSON lines"),
    ("", "", "data.text_key must name the field"),
])
def test_bad_shards_are_a_clear_error(shards, tmp_path, name, text_key, match):
  if name == "notes.txt":
    (tmp_path / name).write_text("plain text\n")
    files = str(tmp_path / name)
  else:
    files = shards["files"].replace("part-*", name or "part-*")
  cfg = _shard_cfg(shards, files=files, text_key=text_key, dir=str(tmp_path / "c"))
  with pytest.raises(ValueError, match=match):
    _build(shards, cfg=cfg)
