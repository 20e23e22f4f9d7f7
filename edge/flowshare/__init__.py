"""Flow sharing among the edges of a site, so planned route changes break no connection.

Each edge tells its peers which TCP flows it owns (accept/close deltas plus periodic
snapshots, authenticated); each edge marks the non-SYN packets of flows a peer owns and
policy routing hands them to that peer, whose socket takes them. Pure cores: `wire`
(frames and their authentication), `table` (what each peer owns, and who gets a packet),
`render` (the nft ruleset, ip rules/routes, the VXLAN overlay and sysctls as data).
Drivers: `kernel` (libnftables, pyroute2, /proc/sys), `link` (the TCP streams among
peers), `extension` (the agent extension) and `metrics` (its Prometheus series).
"""
