"""Text tokenizers: strings -> padded token ids, with a JSON-able state for checkpoints.

Two kinds, both built from the training corpus so nothing is downloaded:
- `WordTokenizer`: lower-cased words, for the LSTM encoder (TIRG's vocabulary).
- `WordPieceTokenizer`: a `tokenizers` WordPiece model, for BERT. Trained on the corpus for a
  scratch BERT, or taken from a local pretrained directory (`save_pretrained` layout; the run
  layer fetches an `s3://` one to the node first, `composeae.run.build`).

`state()` returns plain strings and lists, so checkpoints stay loadable with
`torch.load(weights_only=True)`; `tokenizer_from_state` rebuilds the same tokenizer.

Training and evaluation tokenise in the DataLoader workers (`composeae.data.stream`), so the
trainer's process receives `Tokens` and never walks strings; a model handed strings tokenises
them itself, the same way (`text_tokens`). Rows are padded to the batch's longest row and no
further: padding never changes an encoder's output (the LSTM reads the hidden state at each
row's last real token, BERT masks it out), but the LSTM runs over it (measured on CPU: padding
CSS-like modifiers to a multiple of 8 cost 8-10% of a batch-128 step). A compiled model takes
the varying width as a dynamic size (`composeae.run.compiling.dynamic_text`).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, NamedTuple, Protocol, Sequence

import numpy as np
import torch

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
PAD, UNK = 0, 1


class Tokens(NamedTuple):
    """A batch of tokenised texts: ids (B, T) int64 and attention mask (B, T) int64."""
    ids: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Tokens":
        return Tokens(self.ids.to(device, non_blocking=non_blocking),
                      self.mask.to(device, non_blocking=non_blocking))


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) int64 and attention mask (B, T) int64: T is the longest row's
        length; rows are cut at `max_len` tokens."""

    def state(self) -> dict: ...


def _pad(rows: list[list[int]], max_len: int,
         pad_id: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (ids, mask) (B, T), filled in numpy: one tensor per batch, not per row."""
    rows = [r[:max_len] or [UNK] for r in rows]  # an empty text still yields one token
    width = max((len(r) for r in rows), default=1)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    mask = np.arange(width) < lengths[:, None]  # (B, T) bool
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    ids[mask] = np.fromiter((t for r in rows for t in r), dtype=np.int64,
                            count=int(lengths.sum()))
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


class WordTokenizer:
    """Lower-cased word vocabulary; id 0 pads, id 1 is unknown."""

    def __init__(self, words: list[str]):
        self.words = list(words)
        self.index = {w: i + 2 for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words) + 2

    @classmethod
    def from_corpus(cls, texts: Iterable[str], min_count: int = 1) -> "WordTokenizer":
        counts = Counter(w for t in texts for w in _WORD.findall(t.lower()))
        # Sorted by (-count, word) so the vocabulary is identical for the same corpus.
        return cls([w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                    if c >= min_count])

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _pad([[self.index.get(w, UNK) for w in _WORD.findall(t.lower())] for t in texts],
                    max_len)

    def state(self) -> dict:
        return {"kind": "word", "words": self.words}


class WordPieceTokenizer:
    """A `tokenizers.Tokenizer` (BERT WordPiece) with [CLS] ... [SEP] framing."""

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer  # deferred: only WordPiece needs it

        self.json = tokenizer_json
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "WordPieceTokenizer":
        from tokenizers import BertWordPieceTokenizer  # deferred: see __init__

        wp = BertWordPieceTokenizer(lowercase=True)
        wp.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1,
                               show_progress=False)
        return cls(wp._tokenizer.to_str())

    @classmethod
    def from_pretrained_dir(cls, path: str) -> "WordPieceTokenizer":
        """The tokenizer of a local `save_pretrained` directory."""
        from transformers import AutoTokenizer  # deferred: transformers is slow to import

        # local_files_only: a path must never turn into a model hub download.
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(tokenizer.backend_tokenizer.to_str())

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [e.ids[:max_len] for e in self.tokenizer.encode_batch(list(texts))]
        return _pad(rows, max_len, self.pad_id)

    def state(self) -> dict:
        return {"kind": "wordpiece", "json": self.json}


def text_tokens(tokenizer: TextTokenizer, texts: "Sequence[str] | Tokens",
                max_len: int) -> Tokens:
    """`texts` as `Tokens`: strings are tokenised, `Tokens` (made in a loader) pass as they are."""
    if isinstance(texts, Tokens):
        return texts
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    return Tokens(*tokenizer.encode(texts, max_len))


def tokenizer_from_state(state: dict) -> TextTokenizer:
    if state["kind"] == "word":
        return WordTokenizer(state["words"])
    if state["kind"] == "wordpiece":
        return WordPieceTokenizer(state["json"])
    raise ValueError(f"unknown tokenizer kind {state['kind']!r}")


def build_tokenizer(text_encoder: str, corpus: Iterable[str], *, bert_path: str | None = None,
                    vocab_size: int = 2000) -> TextTokenizer:
    """The tokenizer a text encoder needs, built from the training corpus or `bert_path`."""
    if text_encoder == "lstm":
        return WordTokenizer.from_corpus(corpus)
    if bert_path:
        return WordPieceTokenizer.from_pretrained_dir(bert_path)
    return WordPieceTokenizer.train(corpus, vocab_size)
