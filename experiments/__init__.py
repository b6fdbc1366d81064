"""Studies and benchmarks: each file states its question and writes a table and JSON."""
