"""The model registry: trained models as numbered versions and named aliases in object storage
(`store.py`, compare-and-swap on one aliases file), and the `composeae registry` commands."""
