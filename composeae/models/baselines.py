"""Simple baselines: concatenation, image-only and text-only queries.

Image-only and text-only are the sanity floor of every benchmark: on a benchmark where the text is
necessary, image-only R@1 stays near 1 / (variants per reference) and text-only near chance.
"""

from __future__ import annotations

import torch
from torch import nn

from composeae.config import LossConfig, ModelConfig
from composeae.models.base import RetrievalModel
from composeae.models.text import TextTokenizer, Tokens
from composeae.models.zoo import register_model


@register_model("concat")
class Concat(RetrievalModel):
    """Concat: an MLP on the concatenated image and text features."""

    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig, tokenizer: TextTokenizer):
        super().__init__(cfg, loss_cfg, tokenizer)
        joint = cfg.image_dim + cfg.text_dim
        # TIRG's Concat composer: BN, ReLU, Linear, BN, ReLU, Dropout 0.1, Linear.
        self.mlp = nn.Sequential(nn.BatchNorm1d(joint), nn.ReLU(), nn.Linear(joint, joint),
                                 nn.BatchNorm1d(joint), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(joint, cfg.embed_dim))

    def compose_features(self, x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        return self.mlp(torch.cat([x, q], dim=1))


@register_model("image_only")
class ImageOnly(RetrievalModel):
    """Image only: the query is the reference image's embedding; the text is ignored."""

    uses_text = False

    def compose_features(self, x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        return self.image_to_embed(x)


@register_model("text_only")
class TextOnly(RetrievalModel):
    """Text only: the query is the modifier text's embedding; the reference image is ignored."""

    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig, tokenizer: TextTokenizer):
        super().__init__(cfg, loss_cfg, tokenizer)
        self.text_to_embed = nn.Linear(cfg.text_dim, cfg.embed_dim)

    def compose(self, reference: torch.Tensor, texts: "list[str] | Tokens") -> torch.Tensor:
        return self.text_to_embed(self.encode_text(texts))

    def compose_features(self, x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        return self.text_to_embed(q)
