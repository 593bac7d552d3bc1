"""SentencePiece BPE: training on a corpus and encoding it into one token stream.

`load` also reads a Hugging Face `tokenizer.json` (`JsonTokenizer`).

The trained tokenizer keeps text exactly (identity normalization, no dummy prefix,
spaces kept) and falls back to bytes, so `decode(encode(text)) == text`. Text is
encoded line by line, which is much faster than whole documents; a newline becomes
the byte token <0x0A> and each document ends with the end-of-sequence token.
"""

from __future__ import annotations

import io
import json
import os
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


def token_dtype(sp: spm.SentencePieceProcessor) -> np.dtype:
  """The dtype of a token stream: uint16 if the vocabulary fits, else uint32.

  Example:
    token_dtype(sp)  # dtype('uint16') for a 32,000-token vocabulary
  """
  return np.dtype(np.uint16 if sp.vocab_size() <= 1 << 16 else np.uint32)


def encode_stream(sp: spm.SentencePieceProcessor,
                  records: Iterable[tuple[str, bool]]) -> Iterator[np.ndarray]:
  """Encodes text records one by one, for a token stream of any length.

  Args:
    sp: the tokenizer.
    records: `(text, ends_document)` pairs in corpus order; the end-of-sequence
      token follows each record that ends a document.

  Yields:
    The tokens of each record, in `token_dtype(sp)`.
  """
  dtype = token_dtype(sp)
  newline = _newline_ids(sp)
  eos = [sp.eos_id()] if sp.eos_id() >= 0 else []
  for text, ends in records:
    yield np.asarray(_encode_record(sp, text, newline, eos if ends else []), dtype)


def encode_documents(sp: spm.SentencePieceProcessor,
                     records: Iterable[tuple[str, bool]]) -> np.ndarray:
  """Encodes text records into one flat token array in memory.

  Example:
    tokens = encode_documents(sp, [("Hello there.", True)])

  Args:
    sp: the tokenizer.
    records: `(text, ends_document)` pairs (see `encode_stream`).

  Returns:
    The tokens, uint16 if the vocabulary fits, else uint32.
  """
  parts = list(encode_stream(sp, records))
  return np.concatenate(parts) if parts else np.zeros((0,), token_dtype(sp))


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


class JsonTokenizer:
  """A Hugging Face `tokenizer.json`, with the SentencePiece methods the data
  pipeline calls (`encode`, `decode`, `vocab_size`, `piece_to_id`, `unk_id`,
  `eos_id`, `serialized_model_proto`).

  Text is encoded without special tokens; the end-of-sequence token is the
  `eos_token` of a `tokenizer_config.json` beside the file, else the first of
  </s>, <|end_of_text|>, <|endoftext|>, <eos> the vocabulary has. A line break
  is the `<0x0A>` byte token if there is one, else whatever single token "\\n"
  encodes to.

  Example:
    tok = JsonTokenizer("llama-dir/tokenizer.json")
    ids = tok.encode(["Hello there."])[0]
  """

  _EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    with open(path, "rb") as f:
      self._json = f.read()
    self._tok = tokenizers.Tokenizer.from_str(self._json.decode())
    self._eos = self._find_eos(os.path.join(os.path.dirname(path),
                                            "tokenizer_config.json"))

  def _find_eos(self, config_path: str) -> int:
    names = list(self._EOS_NAMES)
    if os.path.isfile(config_path):
      with open(config_path) as f:
        eos = json.load(f).get("eos_token")
      if isinstance(eos, dict):
        eos = eos.get("content")
      if eos:
        names.insert(0, eos)
    ids = [self._tok.token_to_id(name) for name in names]
    return next((i for i in ids if i is not None), -1)

  def encode(self, lines: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(lines, add_special_tokens=False)]

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(list(ids))

  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def piece_to_id(self, piece: str) -> int:
    found = self._tok.token_to_id(piece)
    if found is None and piece == "<0x0A>":
      ids = self._tok.encode("\n", add_special_tokens=False).ids
      found = ids[0] if len(ids) == 1 else None
    return self.unk_id() if found is None else found

  def unk_id(self) -> int:
    return -1

  def eos_id(self) -> int:
    return self._eos

  def serialized_model_proto(self) -> bytes:
    return self._json


RUN_FILES = ("tokenizer.model", "tokenizer.json")  # `save`'s names in a workdir


def save(tok: spm.SentencePieceProcessor | JsonTokenizer, directory: str) -> str:
  """Writes a tokenizer into a run directory, where `python -m train.generate`
  finds it: `tokenizer.model` (SentencePiece) or `tokenizer.json`.

  Example:
    save(data.tokenizer, workdir)  # -> "<workdir>/tokenizer.model"

  Returns:
    The path written.
  """
  name = RUN_FILES[1] if isinstance(tok, JsonTokenizer) else RUN_FILES[0]
  path = os.path.join(directory, name)
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{name}.tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(tok.serialized_model_proto())
  os.replace(tmp, path)
  return path


def load(path: str) -> spm.SentencePieceProcessor | JsonTokenizer:
  """A tokenizer file: a SentencePiece `.model`, or a Hugging Face `.json`."""
  if path.endswith(".json"):
    return JsonTokenizer(path)
  return spm.SentencePieceProcessor(model_file=path)
