"""Runtime state: targets and pools, health checks, the config snapshot, metrics
and logs.
"""
