"""Simulated edge devices that speak the /v1 protocol: agents (a state machine per
device), hosts (many agents per OS process) and the fleet of host processes."""
