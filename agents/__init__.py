"""tessera.agents."""
