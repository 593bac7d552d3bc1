"""SentencePiece BPE: training on a corpus and encoding it into one token stream.

The trained tokenizer keeps text exactly (identity normalization, no dummy prefix,
spaces kept) and falls back to bytes, so `decode(encode(text)) == text`. Text is
encoded line by line, which is much faster than whole documents; a newline becomes
the byte token <0x0A> and each document ends with the end-of-sequence token.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm


def train_bpe(lines: Iterable[str], vocab_size: int) -> bytes:
  """Trains a byte-fallback BPE tokenizer.

  Args:
    lines: the training text, one line per item, without newlines.
    vocab_size: size of the vocabulary, including the 256 byte tokens and the
      <unk>, <s>, </s> control tokens.

  Returns:
    The serialized model (the bytes of a `.model` file).
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size,
      byte_fallback=True,
      character_coverage=1.0,
      num_threads=2,
      normalization_rule_name="identity",
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      input_sentence_size=5_000_000,  # a uniform sample of lines beyond that
      shuffle_input_sentence=True,
      minloglevel=2,
  )
  return model.getvalue()


def encode_documents(sp: spm.SentencePieceProcessor,
                     records: Iterable[tuple[str, bool]]) -> np.ndarray:
  """Encodes text records into one flat token stream.

  Args:
    sp: the tokenizer.
    records: `(text, ends_document)` pairs in corpus order; the end-of-sequence
      token follows each record that ends a document.

  Returns:
    The tokens, uint16 if the vocabulary fits, else uint32.
  """
  dtype = np.uint16 if sp.vocab_size() <= 1 << 16 else np.uint32
  newline = _newline_ids(sp)
  eos = [sp.eos_id()] if sp.eos_id() >= 0 else []
  parts = [
      np.asarray(_encode_record(sp, text, newline, eos if ends else []), dtype)
      for text, ends in records
  ]
  return np.concatenate(parts) if parts else np.zeros((0,), dtype)


def _newline_ids(sp: spm.SentencePieceProcessor) -> list[int]:
  """The tokens of a line break: the byte token <0x0A>, or none without one."""
  piece = sp.piece_to_id("<0x0A>")
  return [] if piece == sp.unk_id() else [piece]


def _encode_record(sp: spm.SentencePieceProcessor, text: str,
                   newline: list[int], end: list[int]) -> list[int]:
  ids = []
  for i, line_ids in enumerate(sp.encode(text.split("\n"))):
    if i:
      ids.extend(newline)
    ids.extend(line_ids)
  ids.extend(end)
  return ids


def text_lines(records: Iterable[tuple[str, bool]]) -> Iterator[str]:
  """The non-blank lines of text records, to train a tokenizer on.

  Args:
    records: `(text, ends_document)` pairs.

  Yields:
    Each non-blank line, without its newline.
  """
  for text, _ in records:
    yield from (line for line in text.split("\n") if line.strip())
