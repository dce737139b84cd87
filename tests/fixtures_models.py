"""Small model files the tests build: a "pretrained" BERT directory as a user would have one."""

from __future__ import annotations

from pathlib import Path

CORPUS = ["add a red circle", "remove the blue square", "make the green triangle small",
          "change the gray circle to yellow"]


def save_tiny_bert(directory: Path):
    """A tiny BERT (model + WordPiece tokenizer over CORPUS) written with `save_pretrained`
    into `directory`; returns the model that was saved."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from composeae.models.text import WordPieceTokenizer

    tok = WordPieceTokenizer.train(CORPUS * 5, vocab_size=100)
    vocab = sorted(tok.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    (directory / "vocab.txt").write_text("\n".join(w for w, _ in vocab) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(3)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32),
                      add_pooling_layer=False)
    model.save_pretrained(directory)
    return model
