"""The kopf operator for SingularityStack resources (named so as not to shadow the standard `operator`)."""
