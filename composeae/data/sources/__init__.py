"""Converters from published composed-retrieval datasets to the project's shard schema.

One module per dataset registers a converter under the dataset's name, like the model registry:

    @register_converter("fashion200k")
    def convert(src: Path, out_url: str, *, shard_size: int = 1000, ...) -> dict: ...

The command line only calls `list_converters()` and `convert(name, src, out_url, **options)`, so
adding a dataset means adding a module and importing it below. Importing this package registers
the built-in converters and does nothing else.
"""

from __future__ import annotations

from pathlib import Path

# Imported for their @register_converter side effect.
from composeae.data.sources import cirr, css3d, fashion200k, fashioniq, mitstates  # noqa: F401
from composeae.data.sources.common import check_options, register_converter, registered_converters
from composeae.errors import UserError

__all__ = ["convert", "list_converters", "register_converter"]


def list_converters() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(registered_converters())


def convert(name: str, src: Path, out_url: str, **options) -> dict:
    """Convert the dataset `name` found under `src` into shards at `out_url`; returns the manifest."""
    converters = registered_converters()
    if name not in converters:
        raise UserError(f"unknown dataset {name!r}; converters: {', '.join(sorted(converters))}")
    src = Path(src)
    if not src.exists():
        raise UserError(f"source directory does not exist: {src}")
    if not src.is_dir():
        raise UserError(f"source is not a directory: {src}")
    fn = converters[name]
    check_options(name, fn, options)
    return fn(src, out_url, **options)
