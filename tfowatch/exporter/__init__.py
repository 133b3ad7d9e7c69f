"""`tfowatch run`: the collector (the contract's families from one state), the HTTP server
and its web config, the daemon's settings, and the daemon itself."""
