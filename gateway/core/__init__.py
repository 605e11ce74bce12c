"""Pure rules: config, routing, balancers, breaker, limits, retry, headers, errors, CORS,
systemd notifications. No tasks, no sockets of their own; clocks are passed in.
"""
