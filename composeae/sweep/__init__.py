"""Hyperparameter sweeps on Ray Tune: the sweep file (`load`, `spec`), the Tune objects built from
it (`tune_objects`), the driver that runs the trials through the run layer's seams (`driver`),
the chosen trial as an experiment file (`best`), the sweep's live page (`page/`) and the
`composeae tune` command."""
