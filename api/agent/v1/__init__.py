"""tessera.agent.v1, generated from agent.proto: `python -m tessera.api.agent.protogen`."""
