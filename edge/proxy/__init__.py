"""The data path: L4 TCP and L7 HTTP/1.1 listeners."""
