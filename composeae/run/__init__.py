"""Running training on Ray: the run directory's layout, starting or joining Ray and checking the
nodes, the three driver seams, the worker loop, evaluation as a Ray job, and the `train` and
`eval` subcommands. Files a model opens are made node-local here, never inside the models."""
