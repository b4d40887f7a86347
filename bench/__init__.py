"""fusedrnn's benchmark: `python -m bench` (see bench/__main__.py; `python3 dev.py bench` builds first).

Modules: cases (shapes, presets, FLOP model), impls (torch.nn, fusedrnn backends, peers,
built with the same weights), harness (one case: check against torch.nn, then time),
timing (interleaved runs, matmul rate, peak memory), report (table, JSON, CSV, plot),
env (device and versions), progress (progress bar). `pytest bench/ --benchmark-only`
runs the pytest-benchmark suite in bench/test_bench.py.
"""
