"""Running PostgreSQL locally and installing pgmq."""
