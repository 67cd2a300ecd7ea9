"""Simulated edge devices: separate OS processes that speak the /v1 protocol."""
