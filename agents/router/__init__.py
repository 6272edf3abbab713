"""`tessera router`: the OpenAI-compatible entry of a disaggregated ModelDeployment.

It picks a prefill and a decode instance with `policies.dispatch` (the code the simulator
runs), fed by each instance's live load, and orchestrates prefill then decode.
"""
