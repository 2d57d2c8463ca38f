"""imagerouter-spend-guard: a spend-limiting reverse proxy for ImageRouter."""

__version__ = "0.1.0"
