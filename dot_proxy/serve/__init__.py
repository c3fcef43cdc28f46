"""The client side, on trio: the listening sockets, the UDP and TCP serve loops, the server."""
