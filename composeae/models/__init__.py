"""Built-in models; importing this package registers each of them in the model zoo (`composeae.zoo`)."""

from composeae.models import baselines, composeae, tirg  # noqa: F401  (registration)
