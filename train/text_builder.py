"""A tensorflow-datasets builder for plain-text corpora, written without TensorFlow.

`SubspaxText` turns a list of UTF-8 text files into an ArrayRecord dataset with one
split, "train", holding the whole corpus in file order. Each record is a chunk of
whole lines (about 64 KiB) of one file, with a flag on the last chunk of each file,
so that a tokenizer can put an end-of-document token between files. Read it back
with `builder.as_data_source("train")`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

_CHUNK_CHARS = 1 << 16  # a record holds whole lines, about this many characters


@dataclasses.dataclass(eq=False)
class TextConfig(tfds.core.BuilderConfig):
  """A corpus: its cache name (`name`) and its text files, in corpus order."""

  files: tuple[str, ...] = ()

  def __repr__(self) -> str:
    return f"TextConfig({self.name!r}, {len(self.files)} files)"


class SubspaxText(tfds.core.GeneratorBasedBuilder):
  """Plain-text files as records {"text": str, "ends_document": bool}."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Plain-text files, in file order, as chunks of whole lines.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "ends_document": tfds.features.Scalar(np.bool_),
        }),
        disable_shuffling=True,  # keep the corpus order: eval is its end
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the files are local
    return {"train": self._generate_examples(self.builder_config.files)}

  def _generate_examples(self, files: Sequence[str]):
    for file_index, path in enumerate(files):
      for chunk_index, (text, is_last) in enumerate(read_line_chunks(path)):
        key = f"{file_index:06d}-{chunk_index:09d}"
        yield key, {"text": text, "ends_document": is_last}

  # tfds prints a banner before and after preparing; build_data prints its own line.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


def read_line_chunks(path: str) -> Iterator[tuple[str, bool]]:
  """Reads a UTF-8 text file as chunks of whole lines.

  Args:
    path: the file. A byte-order mark is dropped and line ends become "\\n".

  Yields:
    `(text, is_last)`: about `_CHUNK_CHARS` characters of whole lines, and whether
    this is the file's last chunk.

  Raises:
    ValueError: the file is not UTF-8 text.
  """
  chunks = _line_chunks(path)
  previous = next(chunks, None)
  for chunk in chunks:
    yield previous, False
    previous = chunk
  if previous is not None:
    yield previous, True


def _line_chunks(path: str) -> Iterator[str]:
  lines, size = [], 0
  try:
    with open(path, encoding="utf-8-sig") as f:
      for line in f:
        lines.append(line)
        size += len(line)
        if size >= _CHUNK_CHARS:
          yield "".join(lines)
          lines, size = [], 0
  except UnicodeDecodeError as e:
    raise ValueError(
        f"data file {path} is not UTF-8 text ({e}); convert it to UTF-8 or "
        "remove it from data.files") from e
  if lines:
    yield "".join(lines)


def prepare(name: str, files: Sequence[str], data_dir: str) -> SubspaxText:
  """Returns the builder of a text corpus, writing its ArrayRecord files once.

  Args:
    name: cache name of the corpus (the tfds config name); a new corpus needs a
      new name.
    files: the corpus's UTF-8 text files, in corpus order.
    data_dir: tfds data directory; the records go to
      `data_dir/subspax_text/<name>/1.0.0/`.

  Returns:
    The prepared builder: `builder.as_data_source("train")` reads the records.
    Processes sharing `data_dir` may prepare it at once: the one that
    finishes second reads the first one's files.
  """
  tfds.disable_progress_bar()
  try:
    return _prepared(name, files, data_dir)
  except FileExistsError:  # another process sharing data_dir finished first
    return _prepared(name, files, data_dir)


def _prepared(name: str, files: Sequence[str], data_dir: str) -> SubspaxText:
  with _absl_errors_only():  # tfds warns about every config not in the class
    builder = SubspaxText(
        config=TextConfig(name=name, files=tuple(files)),
        data_dir=data_dir,
        file_format="array_record",
    )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


@contextlib.contextmanager
def _absl_errors_only() -> Iterator[None]:
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)
