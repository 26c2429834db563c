"""Benchmarks and load tools (not tests): perf_analyzer wrapper, the gateway load generator,
the seed-architecture baseline server, the side-by-side comparison and the 720p
micro-benchmark. Reports are written by the tools into `perf/results/`."""
