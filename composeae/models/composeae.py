"""ComposeAE (Anwaar et al., WACV 2021) and its real-space ablations.

With x the image feature and q the text feature:
    x~ = eta(x)   = BN, Linear, Dropout, ReLU, Linear
    delta = gamma(q) = BN, Linear, ReLU, Linear
    re = x~ cos(delta),  im = C x~ sin(delta)      (C = +1; C = -1 composes the conjugate)
    phi = [re, im]
    rho(phi)       = BN, ReLU, Linear, ReLU, Linear
    rho_conv(...)  = Conv1d over the stacked channels [x~, delta, x, re, im], adaptive max-pool
                     to 16, flatten, then an MLP shaped like rho
    theta = a1 rho + a0 rho_conv           (a learnable, initialised a1 = model.a_init = 10, a0 = 1)
Decoders map theta back to x and q (MSE), each BN, ReLU, Linear(E, D), ReLU, Linear(D, D) with
D the image or text feature size, as in the official code. The rotational symmetry term composes
the *target* feature with the conjugate (rotation by -delta) and pulls it to the *reference*
feature with the base loss. Total = w_base L_base + w_img L_img_rec + w_txt L_txt_rec + w_sym L_sym.

The complex projection (eta, gamma) comes in two forms, `model.projection`:
* `shared`: one projection feeds both rho and rho_conv, as the paper's figure draws the model;
* `separate`: rho and rho_conv each own a projection (`encoderLinear` and `encoderWithConv` of
  the official code each hold a ComplexProjectionModule); the published numbers come from this.

Unlike the official code this works for any batch size (no fixed CONJUGATE tensor), on CPU and
GPU, and for any image/text/embedding sizes. Under bf16 autocast the angle delta and its cos/sin
stay in float32: a bf16 angle (8-bit mantissa) is off by up to |delta| / 256 radians.

The ablations:
* `realspace_concat_ae` is the paper's (Table 5, the official RealSpaceConcatAE): raw x and q
  concatenated, no eta or gamma; rho is the MLP on [x, q] and rho_conv a one-channel Conv1d over
  [x, q] pooled to 20; the decoders and reconstruction terms of ComposeAE, no symmetry term.
* `realspace_projected_ae` keeps ComposeAE's projections and replaces only the rotation by the
  concatenation [x~, delta], isolating what the complex rotation adds.
* `composeae_angle_to_rho` is ComposeAE whose rho also reads the angle: rho([re, im, delta]).
  In ComposeAE the text reaches rho only as the phase of x~, multiplied by x~'s magnitude; this
  probe gives it an additive path too. It measures no better than ComposeAE (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from composeae.config import LossConfig, ModelConfig
from composeae.losses import reconstruction_loss
from composeae.models.base import RetrievalModel
from composeae.models.text import TextTokenizer
from composeae.models.zoo import register_model

POOLED = 16  # rho_conv's adaptive max-pool length
CONV_CHANNELS = 64
REAL_POOLED = 20  # RealSpaceConcatAE's pool length: 64 x 20 = 1280 = 512 + 768 in the paper


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    """BN, ReLU, Linear(d_in, d_out), ReLU, Linear(d_out, d_out): the shape of rho, of
    rho_conv's head and of both decoders."""
    return nn.Sequential(nn.BatchNorm1d(d_in), nn.ReLU(), nn.Linear(d_in, d_out), nn.ReLU(),
                         nn.Linear(d_out, d_out))


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def rotate(x: torch.Tensor, delta: torch.Tensor, conjugate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of x * exp(i C delta): (B, E), (B, E) -> two (B, E), computed in
    float32 (or float64) whatever autocast or the inputs' precision."""
    sign = -1.0 if conjugate else 1.0
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, delta = _full_precision(x), _full_precision(delta)
        return x * torch.cos(delta), sign * x * torch.sin(delta)


class ComplexProjection(nn.Module):
    """x~ = eta(x) (B, image_dim) -> (B, E) and delta = gamma(q) (B, text_dim) -> (B, E)."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, dropout: float):
        super().__init__()
        e = embed_dim
        self.eta = nn.Sequential(nn.BatchNorm1d(image_dim), nn.Linear(image_dim, e),
                                 nn.Dropout(dropout), nn.ReLU(), nn.Linear(e, e))
        self.gamma = nn.Sequential(nn.BatchNorm1d(text_dim), nn.Linear(text_dim, e),
                                   nn.ReLU(), nn.Linear(e, e))

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # gamma is small (two E-wide layers): in float32 the angle keeps its precision.
        with torch.autocast(device_type=q.device.type, enabled=False):
            delta = self.gamma(_full_precision(q))
        return self.eta(x), delta


class _AutoEncoderComposer(RetrievalModel):
    """What ComposeAE and its real-space ablations share: theta = a1 rho + a0 rho_conv, and the
    decoders from theta back to x and q with their reconstruction terms."""

    loss_terms = ("base", "img_rec", "txt_rec")
    family_keys = ("a_init",)

    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig, tokenizer: TextTokenizer):
        super().__init__(cfg, loss_cfg, tokenizer)
        e = cfg.embed_dim
        self.a = nn.Parameter(torch.tensor([1.0, cfg.a_init]))  # (a0 for rho_conv, a1 for rho)
        self.image_decoder = _mlp(e, cfg.image_dim)  # theta (B, E) -> x (B, image_dim)
        self.text_decoder = _mlp(e, cfg.text_dim)  # theta (B, E) -> q (B, text_dim)

    def auxiliary_losses(self, x, q, x_target, query):
        return {"img_rec": reconstruction_loss(self.image_decoder(query), x),
                "txt_rec": reconstruction_loss(self.text_decoder(query), q)}


class _ProjectedComposer(_AutoEncoderComposer):
    """ComposeAE's body: complex projection(s), rho on phi, rho_conv on the stacked channels;
    `_mix` builds phi and the channels from x~, delta and x."""

    conv_inputs = 5
    phi_parts = 2  # phi is (B, phi_parts * E)
    family_keys = ("a_init", "dropout", "projection")

    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig, tokenizer: TextTokenizer):
        super().__init__(cfg, loss_cfg, tokenizer)
        e = cfg.embed_dim
        self.projection = ComplexProjection(cfg.image_dim, cfg.text_dim, e, cfg.dropout)
        self.projection_conv = (ComplexProjection(cfg.image_dim, cfg.text_dim, e, cfg.dropout)
                                if cfg.projection == "separate" else None)
        self.rho = _mlp(self.phi_parts * e, e)
        self.conv = nn.Sequential(nn.Conv1d(self.conv_inputs, CONV_CHANNELS, 3, padding=1),
                                  nn.AdaptiveMaxPool1d(POOLED))
        self.rho_conv = _mlp(CONV_CHANNELS * POOLED, e)

    def _mix(self, x_tilde: torch.Tensor, delta: torch.Tensor, x_embed: torch.Tensor,
             conjugate: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def _theta(self, x: torch.Tensor, q: torch.Tensor, conjugate: bool = False) -> torch.Tensor:
        x_embed = self.image_to_embed(x)  # (B, E)
        phi, channels = self._mix(*self.projection(x, q), x_embed, conjugate)  # (B, parts * E)
        if self.projection_conv is not None:
            _, channels = self._mix(*self.projection_conv(x, q), x_embed, conjugate)
        stacked = torch.stack(channels, dim=1)  # (B, channels, E), promoted to the widest dtype
        conv = self.conv(stacked).flatten(1)  # (B, 64 * 16)
        return self.a[1] * self.rho(phi) + self.a[0] * self.rho_conv(conv)

    def compose_features(self, x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        return self._theta(x, q)


@register_model("composeae")
class ComposeAE(_ProjectedComposer):
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


@register_model("composeae_angle_to_rho")
class ComposeAEAngleToRho(ComposeAE):
    """ComposeAE with the angle delta beside the rotated image in rho's input (a probe)."""

    phi_parts = 3

    def _mix(self, x_tilde, delta, x_embed, conjugate):
        phi, channels = super()._mix(x_tilde, delta, x_embed, conjugate)
        return torch.cat([phi, (-delta if conjugate else delta).to(phi.dtype)], dim=1), channels


@register_model("realspace_projected_ae")
class RealSpaceProjectedAE(_ProjectedComposer):
    """RealSpaceProjectedAE: ComposeAE with its projections concatenated in real space, not rotated."""

    conv_inputs = 3

    def _mix(self, x_tilde, delta, x_embed, conjugate):
        return torch.cat([x_tilde, delta], dim=1), [x_tilde, delta, x_embed]


@register_model("realspace_concat_ae")
class RealSpaceConcatAE(_AutoEncoderComposer):
    """RealSpaceConcatAE: the paper's ablation, raw image and text features concatenated in real space."""

    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig, tokenizer: TextTokenizer):
        super().__init__(cfg, loss_cfg, tokenizer)
        joint, e = cfg.image_dim + cfg.text_dim, cfg.embed_dim
        self.rho = _mlp(joint, e)
        # One input channel: [x, q] (B, 1, image_dim + text_dim) -> (B, 64, 20).
        self.conv = nn.Sequential(nn.Conv1d(1, CONV_CHANNELS, 3, padding=1),
                                  nn.AdaptiveMaxPool1d(REAL_POOLED))
        # The official head is sized image_dim + text_dim, which equals 64 x 20 only at 512 + 768;
        # sizing it by the pooled width gives the same model there and works at any size.
        self.rho_conv = _mlp(CONV_CHANNELS * REAL_POOLED, e)

    def compose_features(self, x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        joint = torch.cat([x, q], dim=1)  # (B, image_dim + text_dim)
        conv = self.conv(joint.unsqueeze(1)).flatten(1)  # (B, 64 * 20)
        return self.a[1] * self.rho(joint) + self.a[0] * self.rho_conv(conv)
