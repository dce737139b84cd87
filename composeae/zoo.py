"""The model zoo: architecture names map to model classes, so no code branches on a model's name.

    @register_model("tirg")
    class TIRG(RetrievalModel): ...

    model = create_model(cfg.model, cfg.loss, tokenizer)

`list_models()` imports `composeae.models` so every built-in model is registered before listing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

from composeae.errors import UserError

if TYPE_CHECKING:
    from composeae.config import LossConfig, ModelConfig
    from composeae.models.base import RetrievalModel
    from composeae.models.text import TextTokenizer

_MODELS: dict[str, type] = {}


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator registering a `RetrievalModel` subclass under `name`."""
    def decorator(cls: type) -> type:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model {name!r} is already registered by {_MODELS[name].__name__}")
        cls.registered_name = name
        _MODELS[name] = cls
        return cls
    return decorator


def _ensure_builtin_models() -> None:
    importlib.import_module("composeae.models")


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _ensure_builtin_models()
    return sorted(_MODELS)


def model_class(name: str) -> type:
    _ensure_builtin_models()
    if name not in _MODELS:
        raise UserError(f"config key model.name: unknown model {name!r}; "
                        f"registered: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def describe_models() -> dict[str, str]:
    """Name -> first line of the model class docstring (for `composeae models`)."""
    return {name: (model_class(name).__doc__ or "").strip().splitlines()[0] for name in list_models()}


def create_model(model_cfg: "ModelConfig", loss_cfg: "LossConfig",
                 tokenizer: "TextTokenizer") -> "RetrievalModel":
    """Build the model named by `model_cfg.name`."""
    return model_class(model_cfg.name)(model_cfg, loss_cfg, tokenizer)
