"""`tessera router`: the OpenAI-compatible entry of a disaggregated ModelDeployment.

It picks a prefill and a decode instance with `policies.dispatch` (the code the simulator
runs), fed by each instance's live load, and orchestrates prefill then decode.
"""

PREFILL_HEADER = "x-tessera-prefill"
"""The request header by which the router names, to a decode instance, the prefill instance
(its HTTP base URL) to pull the prompt's KV from. Here, not in the serving code, so that the
router imports neither torch nor the engine."""

MIGRATED_EVENT = "tessera.migrated"
"""The server-sent event name with which a `tessera serve` stream ends its part when its request
migrated to another instance (agents/serving/migration.py documents the protocol); its data is
JSON {"target": base URL, "request_id", "resume": {...}}, to POST to the target's ATTACH_PATH."""
ATTACH_PATH = "/internal/attach"
"""Where the router continues a migrated stream on its target instance."""
