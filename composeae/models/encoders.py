"""Image and text encoders shared by every model.

Image: torchvision ResNet-18/50 (weights from a state-dict file, never from a model hub) or a small
CNN for 64 px synthetic scenes; each ends in a linear layer to `image_dim`.
Text: an LSTM over the corpus vocabulary (TIRG's text model), or BERT through `transformers`,
loaded from a pretrained directory or built from a small config for a scratch WordPiece
vocabulary. Either can be frozen.
The weights file and the BERT directory are local paths on this node: the run layer turns an
`s3://` URL into a node-local copy before it builds a model (`composeae.run.build`), so nothing
here knows about object storage or the cluster.
"""

from __future__ import annotations

import torch
from torch import nn

from composeae.config import ModelConfig
from composeae.errors import UserError
from composeae.models.text import TextTokenizer, Tokens, text_tokens


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class SmallCNN(nn.Module):
    """Four stride-2 conv blocks: (B, 3, 64, 64) -> (B, 256, 4, 4) -> pooled (B, 256)."""

    out_channels = 256

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, 32, 64, 128, self.out_channels]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def _resnet(name: str, weights_path: str | None) -> tuple[nn.Module, int]:
    import torchvision  # deferred: only ResNet backbones need it, and it is slow to import

    net = getattr(torchvision.models, name)(weights=None)
    if weights_path:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("fc.")]:
            raise UserError(f"model.image_weights: {weights_path} is not a torchvision {name} "
                            f"state dict")
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


class ImageEncoder(nn.Module):
    """Backbone + linear projection: images (B, 3, H, W) -> features (B, image_dim).

    The backbone's parameters form their own optimizer group (`backbone_parameters`), so the
    paper's lower learning rate for the pretrained CNN applies to it alone.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.image_encoder == "small_cnn":
            self.backbone, width = SmallCNN(), SmallCNN.out_channels
        else:
            self.backbone, width = _resnet(cfg.image_encoder, cfg.image_weights)
        self.fc = nn.Linear(width, cfg.image_dim)
        self.frozen = cfg.freeze_image
        if self.frozen:
            _freeze(self.backbone)

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        if self.frozen:  # a frozen backbone keeps its BatchNorm statistics
            self.backbone.eval()
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(images))


class LSTMTextEncoder(nn.Module):
    """Word embeddings -> LSTM -> hidden state at each text's last token -> (B, text_dim)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, cfg.word_dim, padding_idx=0)
        self.lstm = nn.LSTM(cfg.word_dim, cfg.text_dim, batch_first=True)
        self.fc = nn.Sequential(nn.Dropout(0.1), nn.Linear(cfg.text_dim, cfg.text_dim))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        words = self.embedding(ids)  # (B, T, word_dim)
        if words.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # oneDNN has a bf16 LSTM only on CPUs with AVX512-BF16/AMX and fails on the others;
            # on CPU the LSTM runs in float32 (CUDA autocast keeps its own rule).
            with torch.autocast("cpu", enabled=False):
                out, _ = self.lstm(words.float())  # (B, T, text_dim)
        else:
            out, _ = self.lstm(words)  # (B, T, text_dim)
        last = (mask.sum(1) - 1).clamp(min=0)  # index of each text's last real token
        return self.fc(out[torch.arange(out.shape[0], device=out.device), last])


class BertTextEncoder(nn.Module):
    """BERT with masked mean pooling over the last layer -> (B, text_dim)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        from transformers import BertConfig, BertModel  # deferred: slow to import

        if cfg.bert_path:
            # local_files_only: a path must never turn into a model hub download.
            self.bert = BertModel.from_pretrained(cfg.bert_path, add_pooling_layer=False,
                                                  local_files_only=True)
        else:
            self.bert = BertModel(BertConfig(
                vocab_size=vocab_size, hidden_size=cfg.bert_hidden,
                num_hidden_layers=cfg.bert_layers, num_attention_heads=cfg.bert_heads,
                intermediate_size=4 * cfg.bert_hidden,
                max_position_embeddings=max(cfg.max_text_len, 64)), add_pooling_layer=False)
        hidden = self.bert.config.hidden_size
        self.fc = nn.Identity() if hidden == cfg.text_dim else nn.Linear(hidden, cfg.text_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.fc(pooled)


class TextEncoder(nn.Module):
    """Encodes `Tokens` (or strings, tokenised with the model's tokenizer) -> (B, text_dim)."""

    def __init__(self, cfg: ModelConfig, tokenizer: TextTokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.max_len = cfg.max_text_len
        encoder_cls = LSTMTextEncoder if cfg.text_encoder == "lstm" else BertTextEncoder
        self.encoder = encoder_cls(cfg, tokenizer.vocab_size)
        self.frozen = cfg.freeze_text
        if self.frozen:
            _freeze(self.encoder)

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        if self.frozen:  # no dropout in a frozen encoder: its features stay deterministic
            self.encoder.eval()
        return self

    def forward(self, texts: "list[str] | Tokens") -> torch.Tensor:
        tokens = text_tokens(self.tokenizer, texts, self.max_len)
        device = next(self.encoder.parameters()).device
        return self.encoder(tokens.ids.to(device), tokens.mask.to(device))
