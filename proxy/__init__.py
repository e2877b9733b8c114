"""sluice: a reverse proxy that keeps a fleet of agents under an LLM provider's concurrency cap."""

__version__ = "0.1.0"
