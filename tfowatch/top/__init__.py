"""`tfowatch top`: the sampling session, its rows model, and the interactive screen."""
