"""Proxies to compare sluice with, each runnable as `python -m bench.baselines.<name>`."""
