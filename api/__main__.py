"""Filled in by the GSLB control-plane issue."""
