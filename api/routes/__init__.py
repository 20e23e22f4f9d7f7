"""HTTP routes, one module per resource; `common` holds auth and the revisioned-write helper."""
