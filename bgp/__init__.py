"""Everything BGP: announcement policy, ExaBGP and bfdd drivers. Imports nothing else of ours."""
