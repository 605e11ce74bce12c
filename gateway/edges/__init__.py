"""The edges: the proxy handler, the admin app and reload."""
