"""What every service shares: settings from the environment, JSON logs, health, metrics, lifecycle."""
