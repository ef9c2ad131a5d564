"""CentralCloud: owner of shared_queue (queues, retention) and analytics over its archives."""
