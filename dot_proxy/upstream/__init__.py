"""The upstream side, on trio: TLS connections to DoT resolvers, their pools, and the group
policy (failover, hedging, probing) that picks among them for one query.
"""
