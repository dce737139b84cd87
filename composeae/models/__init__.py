"""Built-in models; importing this package registers each of them with `composeae.registry`."""

from composeae.models import baselines, composeae, tirg  # noqa: F401  (registration)
