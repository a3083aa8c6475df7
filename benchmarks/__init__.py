"""quickdraft's benchmark harness (issue 7): see benchmarks/README.md."""
