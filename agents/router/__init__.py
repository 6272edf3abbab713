"""`tessera router`: the OpenAI-compatible entry of a disaggregated ModelDeployment.

It picks a prefill and a decode instance with `policies.dispatch` (the code the simulator
runs), fed by each instance's live load, and orchestrates prefill then decode.
"""

PREFILL_HEADER = "x-tessera-prefill"
"""The request header by which the router names, to a decode instance, the prefill instance
(its HTTP base URL) to pull the prompt's KV from. Here, not in the serving code, so that the
router imports neither torch nor the engine."""
