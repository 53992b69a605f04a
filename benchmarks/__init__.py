"""pruneserve's benchmark harness: model-, server-, optimizer- and scaling-level measurements.

Run ``python -m benchmarks --quick`` (minutes) or ``--full`` (~40 min on 2 cores, what ``make bench`` runs).
Results land in ``benchmarks/results/`` (CSV, JSON, PNG) and the tables in ``BENCHMARKS.md``.
Benchmarks measure; they never assert a speed (the smoke test only checks that they run).
"""
