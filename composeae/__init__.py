"""composeae: composed image retrieval (ComposeAE and baselines) trained on Ray.

Importing the package loads nothing heavy: `composeae.load` imports PyTorch when called.
"""

from importlib import metadata

try:
    __version__ = metadata.version("composeae")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


def load(checkpoint: str, device: str = "cpu"):
    """A trained model from a checkpoint (a `final/` directory, a `model.pt`, local or
    `s3://`), ready to embed images, texts and composed queries: `composeae.api.Model`."""
    from composeae.api import load as load_model  # deferred: it imports PyTorch

    return load_model(checkpoint, device)
