"""edgectl: the operator CLI, a client of the GSLB API."""
