"""singularity-stack: four services that talk only through a durable Postgres (pgmq) queue."""

__version__ = "0.1.0"
