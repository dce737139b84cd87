"""The one interface every retrieval model shares.

A model owns its encoders and its composition. Training and evaluation only ever call:

    model(reference, texts, target) -> {"loss": total, "base": ..., <model-specific terms>}
    model.compose(reference, texts) -> (B, embed_dim) query embeddings
    model.embed_target(images)      -> (B, embed_dim) target / gallery embeddings

so no loop branches on which model it trains. `texts` is the modifier as `Tokens` (token ids
made in the DataLoader workers, what training and evaluation pass) or a list of strings (what a
person passes), tokenised by the model's tokenizer the same way. Subclasses implement `compose_features` (image
feature x (B, image_dim) and text feature q (B, text_dim) -> query (B, embed_dim)) and, when they
have extra loss terms, `auxiliary_losses`.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import nn

from composeae.config import LossConfig, ModelConfig
from composeae.losses import batch_classification_loss, soft_triplet_loss
from composeae.models.encoders import ImageEncoder, TextEncoder
from composeae.models.text import TextTokenizer, Tokens, text_tokens


FAMILY_MODEL_KEYS = ("dropout", "a_init", "projection")
"""`model.*` keys that only some models read, each model naming its own in `family_keys`."""
TEXT_MODEL_KEYS = ("text_encoder", "text_dim", "word_dim", "max_text_len", "bert_path",
                   "bert_layers", "bert_hidden", "bert_heads", "bert_vocab_size", "freeze_text")
"""`model.*` keys of the text encoder, read only by models that read the modifier."""


class RetrievalModel(nn.Module):
    """Base class: encoders, target embedding, base loss and loss weighting."""

    registered_name = ""
    uses_text = True
    """False for models that never read the modifier (they build no text encoder)."""
    loss_terms: tuple[str, ...] = ("base",)
    """The weighted terms of the training loss; term `t` is weighted by `loss.w_<t>`. A model
    with another term declares it here and returns it from `auxiliary_losses`."""
    family_keys: tuple[str, ...] = ()
    """The keys of `FAMILY_MODEL_KEYS` this model reads (`model.<key>`); the others change
    nothing in it, so a sweep never searches them for it (`reads_key`)."""

    @classmethod
    def reads_key(cls, key: str) -> bool:
        """Whether config key `section.key` can change this model or its training: `loss.w_<t>`
        only for its loss terms, the `FAMILY_MODEL_KEYS` it lists in `family_keys`, the text
        encoder's keys only when it reads the modifier; every other key."""
        section, _, name = key.partition(".")
        if section == "loss" and name.startswith("w_"):
            return name[2:] in cls.loss_terms
        if section == "model" and name in FAMILY_MODEL_KEYS:
            return name in cls.family_keys
        if section == "model" and name in TEXT_MODEL_KEYS:
            return cls.uses_text
        return True

    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig, tokenizer: TextTokenizer):
        super().__init__()
        self.cfg, self.loss_cfg = cfg, loss_cfg
        self.tokenizer = tokenizer
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(cfg, tokenizer) if self.uses_text else None
        # Targets live in the joint space; with image_dim == embed_dim this is the identity,
        # as in the paper (ResNet fc 512 = embedding 512).
        self.image_to_embed = (nn.Identity() if cfg.image_dim == cfg.embed_dim
                               else nn.Linear(cfg.image_dim, cfg.embed_dim))
        # The learnable scale s of the official NormalizationLayer (s x / |x|), which both base
        # losses see: logits s^2 cos for classification, distances |s a - s b|^2 for triplets.
        self.scale = nn.Parameter(torch.tensor(float(loss_cfg.init_scale)))
        self.loss_weights = {term: getattr(loss_cfg, f"w_{term}") for term in self.loss_terms}

    # -- what subclasses provide -------------------------------------------------------------
    def compose_features(self, x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def auxiliary_losses(self, x: torch.Tensor, q: torch.Tensor | None, x_target: torch.Tensor,
                         query: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    # -- the shared interface ----------------------------------------------------------------
    def tokenize_fn(self) -> Callable[[Sequence[str]], Tokens] | None:
        """Strings -> `Tokens` as this model tokenises them, for the DataLoader workers (a
        picklable partial). None for a model that never reads the modifier."""
        if self.text_encoder is None:
            return None
        return functools.partial(text_tokens, self.tokenizer, max_len=self.cfg.max_text_len)

    def encode_text(self, texts: "list[str] | Tokens") -> torch.Tensor | None:
        return self.text_encoder(texts) if self.text_encoder is not None else None

    def compose(self, reference: torch.Tensor, texts: "list[str] | Tokens") -> torch.Tensor:
        return self.compose_features(self.image_encoder(reference), self.encode_text(texts))

    def embed_target(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_to_embed(self.image_encoder(images))

    def base_loss(self, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_cfg.base == "batch_classification":
            return batch_classification_loss(query, target, self.scale,
                                             symmetric=self.loss_cfg.symmetric,
                                             gather=self.loss_cfg.gather_negatives)
        return soft_triplet_loss(query, target, scale=self.scale,
                                 gradient=self.loss_cfg.soft_triplet_gradient)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at the lower backbone learning rate."""
        return self.image_encoder.backbone_parameters()

    def forward(self, reference: torch.Tensor, texts: "list[str] | Tokens",
                target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses for a batch of (reference (B,3,H,W), texts, target (B,3,H,W))."""
        batch = reference.shape[0]
        # One backbone pass over references and targets together: (2B, image_dim).
        features = self.image_encoder(torch.cat([reference, target]))
        x, x_target = features[:batch], features[batch:]
        q = self.encode_text(texts)
        query = self.compose_features(x, q)
        terms = {"base": self.base_loss(query, self.image_to_embed(x_target))}
        terms.update(self.auxiliary_losses(x, q, x_target, query))
        if terms.keys() != set(self.loss_terms):
            raise RuntimeError(f"{type(self).__name__} returned loss terms {sorted(terms)}, "
                               f"declared {sorted(self.loss_terms)}")
        terms["loss"] = sum(self.loss_weights[name] * value for name, value in terms.items())
        return terms
