"""The GSLB control plane. Imports nothing else of ours."""
