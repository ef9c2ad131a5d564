"""Singularity: the orchestrator. Runs coding tasks as SPARC workflows over the shared queue."""
