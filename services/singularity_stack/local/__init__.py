"""Running the whole stack on one machine, without a cluster."""
