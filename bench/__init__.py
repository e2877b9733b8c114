"""The benchmark harness (`make bench`, `python -m bench`).

Not part of the tests or CI. What the tests share with it lives in `proxy/tools/`:
`process.py`, which starts a server subprocess and waits for it, and `chaos.py`, the
chaos rig `tests/test_chaos.py` and `bench/soak.py` share. `bench/upstream.py` is the
fake upstream, `bench/loadgen.py` the load generator, `bench/baselines/` the proxies
sluice is compared with, `bench/admission.py` the admission-core micro-benchmark and
`bench/report.py` the table, plot and `bench/RESULTS.md`.
"""
