"""tessera.sim."""
