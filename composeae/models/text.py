"""Text tokenizers: strings -> padded token ids, with a JSON-able state for checkpoints.

Two kinds, both built from the training corpus so nothing is downloaded:
- `WordTokenizer`: lower-cased words, for the LSTM encoder (TIRG's vocabulary).
- `WordPieceTokenizer`: a `tokenizers` WordPiece model, for BERT. Trained on the corpus for a
  scratch BERT, or taken from a local pretrained directory (`save_pretrained` layout; the run
  layer fetches an `s3://` one to the node first, `composeae.run.build`).

`state()` returns plain strings and lists, so checkpoints stay loadable with
`torch.load(weights_only=True)`; `tokenizer_from_state` rebuilds the same tokenizer.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Protocol

import torch

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
PAD, UNK = 0, 1


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) int64 and attention mask (B, T) int64, T <= max_len."""

    def state(self) -> dict: ...


def _pad(rows: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [r[:max_len] or [UNK] for r in rows]  # an empty text still yields one token
    width = max(len(r) for r in rows) if rows else 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


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

    def encode(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
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

    def encode(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [e.ids[:max_len] for e in self.tokenizer.encode_batch(list(texts))]
        ids, mask = _pad(rows, max_len)
        ids[mask == 0] = self.pad_id
        return ids, mask

    def state(self) -> dict:
        return {"kind": "wordpiece", "json": self.json}


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
