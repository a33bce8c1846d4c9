"""The scripts behind every figure and table in docs/. Run them from the repository root as modules:
python -m benchmarks.NAME --help."""
