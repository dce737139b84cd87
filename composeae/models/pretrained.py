"""The pre-flight check that a run's encoders get the pretrained weights the run depends on.

What belongs here: rules about which encoder settings need weights, checked on the config alone
before any worker starts (whether a named file exists on every node is `composeae.run.nodefiles`'s
concern). A frozen encoder without weights computes fixed random features; a config that
reproduces a published result (`model.pretrained: true`) means nothing with a random ResNet or
BERT. Either stops with one line naming the keys and what to download, unless
`model.allow_random_init` is true.
"""

from __future__ import annotations

from composeae.config import ModelConfig
from composeae.errors import UserError
from composeae.models.zoo import model_class

TORCHVISION_URL = "https://download.pytorch.org/models/"
RESNET_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-11ad3fa6.pth"}
"""torchvision's ImageNet state dicts (resnet18 IMAGENET1K_V1, the one the paper used; resnet50
IMAGENET1K_V2); `model.image_weights` takes such a file as it is downloaded."""
BERT_NAME = "bert-base-uncased"
"""The paper's text encoder (768-d, frozen)."""


def _image_problem(cfg: ModelConfig) -> str | None:
    if cfg.image_encoder in RESNET_FILES:
        if cfg.image_weights or not (cfg.pretrained or cfg.freeze_image):
            return None
        why = "frozen" if cfg.freeze_image else "needed by model.pretrained=true"
        file = RESNET_FILES[cfg.image_encoder]
        return (f"model.image_weights is unset but the {cfg.image_encoder} is {why} (download "
                f"{TORCHVISION_URL}{file} and set model.image_weights to its path)")
    if cfg.freeze_image:
        return (f"model.freeze_image=true freezes a {cfg.image_encoder}, which has no pretrained "
                f"weights (set model.freeze_image=false)")
    if cfg.pretrained:
        return (f"model.pretrained=true but model.image_encoder={cfg.image_encoder} has no "
                f"pretrained weights (use resnet18 or resnet50 with model.image_weights)")
    return None


def _text_problem(cfg: ModelConfig) -> str | None:
    if not model_class(cfg.name).uses_text:
        return None
    if cfg.text_encoder == "bert":
        if cfg.bert_path or not (cfg.pretrained or cfg.freeze_text):
            return None
        why = "frozen" if cfg.freeze_text else "needed by model.pretrained=true"
        return (f"model.bert_path is unset but the BERT text encoder is {why} (save "
                f"{BERT_NAME} with save_pretrained, model and tokenizer, into a directory and "
                f"set model.bert_path to it)")
    if cfg.freeze_text:
        return (f"model.freeze_text=true freezes the {cfg.text_encoder} text encoder, which has "
                f"no pretrained weights (set model.freeze_text=false)")
    return None


def missing_pretrained(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg`'s encoders from their pretrained weights: one clause per encoder; empty
    when nothing does (or `allow_random_init` accepts it)."""
    if cfg.allow_random_init:
        return []
    return [p for p in (_image_problem(cfg), _text_problem(cfg)) if p]


def check_pretrained(cfg: ModelConfig) -> None:
    """Raise `UserError` (one line) when `missing_pretrained(cfg)` finds anything."""
    problems = missing_pretrained(cfg)
    if problems:
        raise UserError(f"random encoder weights: {'; '.join(problems)}; weights are a path on "
                        f"every node or an s3:// URL; --set model.allow_random_init=true runs "
                        f"anyway")
