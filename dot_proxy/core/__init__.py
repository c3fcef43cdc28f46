"""The pure core: DNS wire format, framing, EDNS, pins, access list, health.

Bytes in, values or bytes out. Nothing in this folder imports trio, opens a socket or reads the
clock (a function that needs the time takes ``now=``), so all of it is tested without an event
loop, with dnspython as the oracle (tests/test_purity.py keeps it so).
"""
