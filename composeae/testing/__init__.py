"""Helpers for the tests and the benchmarks, never imported by the library itself: a real local
Ray head to submit jobs to, free ports, stopping the processes a test started, random-weights
checkpoints, and clients that load a search service."""
