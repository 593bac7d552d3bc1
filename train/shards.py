"""Corpus shards on disk (parquet, JSON lines), read as a stream of documents.

C4, FineWeb and SlimPajama come as many shards of one document per row:
parquet files (FineWeb), or JSON lines, often compressed (C4's
`c4-train.00000-of-01024.json.gz`, SlimPajama's `.jsonl.zst`). pyarrow reads
both a batch of rows at a time, so memory stays flat whatever the shard's
size: `ParquetFile.iter_batches` one row group after another, and
`pyarrow.json.open_json` one block of lines after another, decompressing on
the fly (the codec is detected from the extension).

Example:

  for text in read_documents("c4/c4-train.00000-of-01024.json.gz", "text"):
    ...
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from train import errors

PARQUET = (".parquet",)
JSON_LINES = (".jsonl", ".json", ".ndjson")
COMPRESSED = ("", ".gz", ".zst", ".bz2", ".lz4")  # pyarrow detects the codec
SUFFIXES = PARQUET + tuple(s + c for s in JSON_LINES for c in COMPRESSED)
_PARQUET_ROWS = 1024  # rows per parquet read
_JSON_BLOCK = 1 << 24  # bytes per JSON read; a document must fit in one block


def check_format(path: str) -> None:
  """Checks that `read_documents` reads `path`'s format, from its name alone.

  Example:
    check_format("c4/c4-train.00000-of-01024.json.gz")  # passes

  Args:
    path: a shard's path.

  Raises:
    UserError: the name ends in none of `SUFFIXES`; the message names the
      formats and `data.corpus="text_files"` for plain text.
  """
  if not path.endswith(SUFFIXES):
    raise errors.UserError(
        f"data.files: {path} is not a .parquet or JSON lines (.jsonl, .json, "
        '.ndjson, optionally .gz or .zst) shard; for plain text use data.corpus='
        '"text_files"')


def read_documents(path: str, text_key: str) -> Iterator[str]:
  """Yields the text of each row of a shard, in order, reading batch by batch.

  Rows whose `text_key` is missing or null are skipped.

  Args:
    path: a `.parquet` file or a JSON lines file (one object per line),
      optionally compressed (`.gz`, `.zst`, `.bz2`, `.lz4`).
    text_key: the column (parquet) or field (JSON) holding the text.

  Yields:
    One document's text per row.

  Raises:
    UserError: the shard has no `text_key` column or field, or cannot be read.
  """
  check_format(path)
  try:
    batches = (_parquet_batches if path.endswith(PARQUET) else _json_batches)(
        path, text_key)
    found = False
    for column in batches:
      found = found or column.null_count < len(column)
      yield from (text for text in column.to_pylist() if text is not None)
  except (pa.ArrowInvalid, OSError) as e:
    raise errors.UserError(f"data.files: cannot read {path}: {_first_line(e)}") from e
  if not found:
    raise errors.UserError(
        f"data.text_key {text_key!r}: no row of {path} has that field; set "
        "data.text_key to the field holding the text")


def _parquet_batches(path: str, text_key: str) -> Iterator[pa.Array]:
  shard = pq.ParquetFile(path)
  names = shard.schema_arrow.names
  if text_key not in names:
    raise errors.UserError(
        f"data.text_key {text_key!r} is not a column of {path}; its columns are "
        f"{', '.join(names)}")
  for batch in shard.iter_batches(batch_size=_PARQUET_ROWS, columns=[text_key]):
    yield batch.column(0).cast(pa.string())


def _json_batches(path: str, text_key: str) -> Iterator[pa.Array]:
  reader = pa_json.open_json(
      pa.input_stream(path, compression="detect"),
      read_options=pa_json.ReadOptions(block_size=_JSON_BLOCK),
      parse_options=pa_json.ParseOptions(
          explicit_schema=pa.schema([(text_key, pa.string())]),
          unexpected_field_behavior="ignore"))
  for batch in reader:
    yield batch.column(0)


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]
