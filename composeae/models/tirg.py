"""TIRG (Vo et al., CVPR 2019): a gated residual on the image feature.

    f = a0 * sigmoid(W_g [x, q]) * x + a1 * W_r [x, q],   a initialised to (1, model.a_init = 10)

W_g = BN, ReLU, Linear; W_r = BN, ReLU, Linear, ReLU, Linear (TIRG's gated and residual
composers). x here is the image feature mapped to the embedding size.
"""

from __future__ import annotations

import torch
from torch import nn

from composeae.config import LossConfig, ModelConfig
from composeae.models.base import RetrievalModel
from composeae.models.text import TextTokenizer
from composeae.models.zoo import register_model


@register_model("tirg")
class TIRG(RetrievalModel):
    """TIRG: gated residual text-image composition (the paper's main baseline)."""

    family_keys = ("a_init",)

    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig, tokenizer: TextTokenizer):
        super().__init__(cfg, loss_cfg, tokenizer)
        joint = cfg.embed_dim + cfg.text_dim
        self.gate = nn.Sequential(nn.BatchNorm1d(joint), nn.ReLU(), nn.Linear(joint, cfg.embed_dim))
        self.residual = nn.Sequential(nn.BatchNorm1d(joint), nn.ReLU(), nn.Linear(joint, joint),
                                      nn.ReLU(), nn.Linear(joint, cfg.embed_dim))
        self.a = nn.Parameter(torch.tensor([1.0, cfg.a_init]))

    def compose_features(self, x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        x = self.image_to_embed(x)  # (B, E)
        joint = torch.cat([x, q], dim=1)  # (B, E + text_dim)
        return self.a[0] * torch.sigmoid(self.gate(joint)) * x + self.a[1] * self.residual(joint)
