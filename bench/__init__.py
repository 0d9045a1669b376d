"""Benchmarks against a real mosquitto: each prints its figure, a baseline measured in the same run, and their ratio."""
