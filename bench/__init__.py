"""The benchmark harness (`make bench`, `python -m bench`; issue 6).

Not part of the tests or CI, though the tests import two of its modules:
`bench/process.py`, which starts a server subprocess and waits for it, and
`bench/chaos.py`, the chaos rig `tests/test_chaos.py` and `bench/soak.py` share.
`bench/upstream.py` is the fake upstream, `bench/loadgen.py` the load generator,
`bench/baselines/` the proxies sluice is compared with, `bench/admission.py` the
admission-core micro-benchmark and `bench/report.py` the table, plot and
`bench/RESULTS.md`.
"""
