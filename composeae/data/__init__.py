"""The data plane: shard schema, storage (local and S3), dataset writing, CSS-synth, streaming.

Nothing here imports a model or a trainer; importing this package has no side effects.
"""
