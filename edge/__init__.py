"""The edge node agent: proxy, health, node state and flow table for one node."""
