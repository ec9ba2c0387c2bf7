"""asv benchmarks of adamnp (run from the repository root; see benchmarks/README.md)."""
