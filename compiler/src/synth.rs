//! Deterministic random checkpoints of any config, for tests and benchmarks.
