"""tessera.policies."""
