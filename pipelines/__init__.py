"""Beam pipelines: passthrough (baseline), tickets, documents."""
