"""Active-passive mode: one VIP on one L2 segment, owned by one node of a group at a time."""
