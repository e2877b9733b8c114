"""The benchmark harness (`make bench`, `python -m bench`; issue 6).

Not part of the tests or CI. `bench/upstream.py` is the fake upstream,
`bench/loadgen.py` the load generator, `bench/baselines/` the proxies sluice is
compared with, `bench/admission.py` the admission-core micro-benchmark and
`bench/report.py` the table, plot and `bench/RESULTS.md`.
"""
