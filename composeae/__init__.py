"""composeae: composed image retrieval (ComposeAE and baselines) trained on Ray."""
