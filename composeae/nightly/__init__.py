"""Nightly retraining: tonight's challenger against the registry's champion (`flow.py`), the
night's report (`report.py`) and the `composeae nightly` command."""
