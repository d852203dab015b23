"""effpipe's microbenchmarks: `python -m benchmarks.<name>` from the repo root."""
