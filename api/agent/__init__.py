"""The node agent's protocol: `v1/agent.proto` and the Python modules generated from it."""
