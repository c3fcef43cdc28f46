"""The soak: dot-proxy under mixed load while its upstreams fail (``soak/run_soak.py``)."""
