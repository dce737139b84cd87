"""ComposeAE (Anwaar et al., WACV 2021) and its real-space ablation RealSpaceConcatAE.

With x the image feature and q the text feature:
    x~ = eta(x)   = BN, Linear, Dropout, ReLU, Linear
    delta = gamma(q) = BN, Linear, ReLU, Linear
    re = x~ cos(delta),  im = C x~ sin(delta)      (C = +1; C = -1 composes the conjugate)
    phi = [re, im]
    rho(phi)       = BN, ReLU, Linear, ReLU, Linear
    rho_conv(...)  = Conv1d over the stacked channels [x~, delta, x, re, im], adaptive max-pool
                     to 16, flatten, then an MLP shaped like rho
    theta = a1 rho + a0 rho_conv           (a learnable, initialised a1 = 10, a0 = 1)
Decoders map theta back to x and q (MSE). The rotational symmetry term composes the *target*
feature with the conjugate (rotation by -delta) and pulls it to the *reference* feature with the
base loss. Total = w_base L_base + w_img L_img_rec + w_txt L_txt_rec + w_sym L_sym.

Unlike the official code this works for any batch size (no fixed CONJUGATE tensor), on CPU and
GPU, and for any image/text/embedding sizes. The official code gives rho and rho_conv separate
copies of the complex projection; here one projection feeds both, as the paper describes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from composeae.config import LossConfig, ModelConfig
from composeae.losses import reconstruction_loss
from composeae.models.base import RetrievalModel
from composeae.models.text import TextTokenizer
from composeae.zoo import register_model

POOLED = 16  # rho_conv's adaptive max-pool length
CONV_CHANNELS = 64


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    """BN, ReLU, Linear, ReLU, Linear: the shape of rho and of both decoders."""
    return nn.Sequential(nn.BatchNorm1d(d_in), nn.ReLU(), nn.Linear(d_in, d_out), nn.ReLU(),
                         nn.Linear(d_out, d_out))


def rotate(x: torch.Tensor, delta: torch.Tensor, conjugate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of x * exp(i C delta): (B, E), (B, E) -> two (B, E)."""
    sign = -1.0 if conjugate else 1.0
    return x * torch.cos(delta), sign * x * torch.sin(delta)


class _AutoEncoderComposer(RetrievalModel):
    """Shared body of ComposeAE and RealSpaceConcatAE; `_mix` builds phi and the conv channels."""

    conv_inputs = 5
    loss_terms = ("base", "img_rec", "txt_rec")

    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig, tokenizer: TextTokenizer):
        super().__init__(cfg, loss_cfg, tokenizer)
        e = cfg.embed_dim
        self.eta = nn.Sequential(nn.BatchNorm1d(cfg.image_dim), nn.Linear(cfg.image_dim, e),
                                 nn.Dropout(cfg.dropout), nn.ReLU(), nn.Linear(e, e))
        self.gamma = nn.Sequential(nn.BatchNorm1d(cfg.text_dim), nn.Linear(cfg.text_dim, e),
                                   nn.ReLU(), nn.Linear(e, e))
        self.rho = _mlp(2 * e, e)
        self.conv = nn.Sequential(nn.Conv1d(self.conv_inputs, CONV_CHANNELS, 3, padding=1),
                                  nn.AdaptiveMaxPool1d(POOLED))
        self.rho_conv = _mlp(CONV_CHANNELS * POOLED, e)
        self.a = nn.Parameter(torch.tensor([1.0, 10.0]))  # (a0 for rho_conv, a1 for rho)
        self.image_decoder = nn.Sequential(_mlp(e, e), nn.Linear(e, cfg.image_dim))
        self.text_decoder = nn.Sequential(_mlp(e, e), nn.Linear(e, cfg.text_dim))

    def _mix(self, x_tilde: torch.Tensor, delta: torch.Tensor, x_embed: torch.Tensor,
             conjugate: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def _theta(self, x: torch.Tensor, q: torch.Tensor, conjugate: bool = False) -> torch.Tensor:
        x_tilde, delta = self.eta(x), self.gamma(q)  # (B, E) each
        phi, channels = self._mix(x_tilde, delta, self.image_to_embed(x), conjugate)
        stacked = torch.stack(channels, dim=1)  # (B, channels, E)
        conv = self.conv(stacked).flatten(1)  # (B, 64 * 16)
        return self.a[1] * self.rho(phi) + self.a[0] * self.rho_conv(conv)

    def compose_features(self, x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        return self._theta(x, q)

    def auxiliary_losses(self, x, q, x_target, query):
        return {"img_rec": reconstruction_loss(self.image_decoder(query), x),
                "txt_rec": reconstruction_loss(self.text_decoder(query), q)}


@register_model("composeae")
class ComposeAE(_AutoEncoderComposer):
    """ComposeAE: complex-space rotation of the image by the text, autoencoder and symmetry losses."""

    loss_terms = ("base", "img_rec", "txt_rec", "sym")

    def _mix(self, x_tilde, delta, x_embed, conjugate):
        re, im = rotate(x_tilde, delta, conjugate)
        return torch.cat([re, im], dim=1), [x_tilde, delta, x_embed, re, im]

    def auxiliary_losses(self, x, q, x_target, query):
        terms = super().auxiliary_losses(x, q, x_target, query)
        # Rotating the target back by -delta should land on the reference.
        symmetric = self._theta(x_target, q, conjugate=True)
        terms["sym"] = self.base_loss(F.normalize(symmetric, dim=-1),
                                      F.normalize(self.image_to_embed(x), dim=-1))
        return terms


@register_model("realspace_concat_ae")
class RealSpaceConcatAE(_AutoEncoderComposer):
    """RealSpaceConcatAE: ComposeAE with concatenation in real space instead of the rotation."""

    conv_inputs = 3

    def _mix(self, x_tilde, delta, x_embed, conjugate):
        return torch.cat([x_tilde, delta], dim=1), [x_tilde, delta, x_embed]
