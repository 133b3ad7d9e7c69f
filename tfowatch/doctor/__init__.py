"""`tfowatch doctor`: the namespace survey, the socket tables and listeners, the rules, and
the watch window's observation."""
