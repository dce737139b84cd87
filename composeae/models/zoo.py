"""The model zoo: architecture names map to model classes, so no code branches on a model's name.

    @register_model("tirg")
    class TIRG(RetrievalModel): ...

    model = create_model(cfg.model, cfg.loss, tokenizer)

This module imports no model: the built-in models import it to register themselves, and
`composeae.models` imports them after it, so any import of the zoo (which runs the package's
`__init__` first) finds every built-in model registered. The model's files (`model.image_weights`,
`model.bert_path`) are local paths here; `composeae.run.build` resolves `s3://` ones first.
"""

from __future__ import annotations

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


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def model_class(name: str) -> type:
    """The class registered as `name`; `UserError` naming the config key for an unknown one."""
    if name not in _MODELS:
        raise UserError(f"config key model.name: unknown model {name!r}; "
                        f"registered: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def model_reads_key(name: str, key: str) -> bool:
    """Whether config key `section.key` can change model `name` (`RetrievalModel.reads_key`):
    a sweep searches a key only for the models that read it."""
    return model_class(name).reads_key(key)


def describe_models() -> dict[str, str]:
    """Name -> first line of the model class docstring (for `composeae models`)."""
    return {name: (model_class(name).__doc__ or "").strip().splitlines()[0] for name in list_models()}


def create_model(model_cfg: "ModelConfig", loss_cfg: "LossConfig",
                 tokenizer: "TextTokenizer") -> "RetrievalModel":
    """Build the model named by `model_cfg.name`."""
    return model_class(model_cfg.name)(model_cfg, loss_cfg, tokenizer)
