"""The models: the zoo (`register_model`, `create_model`) and the built-in models registered in it.

Pure PyTorch: nothing here imports Ray, the data plane or checkpoint I/O. The zoo is imported
first; each built-in model module registers itself in it when imported below.
"""

from composeae.models.zoo import (create_model, describe_models, list_models, model_class,
                                  model_reads_key, register_model)
from composeae.models import baselines, composeae, tirg  # noqa: F401  (registration)

__all__ = ["create_model", "describe_models", "list_models", "model_class", "model_reads_key",
           "register_model"]
