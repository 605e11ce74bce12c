"""HTTP/1.1 on the wire: the server the proxy listeners run, the upstream client,
request vetting, write flow control and zero-copy relays. Knows bytes and sockets,
nothing of routes.
"""
