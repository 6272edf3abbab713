"""tessera.agents.serving: `tessera serve`, the engine behind an OpenAI-compatible HTTP server.

The map, in the order a request travels:
- `cli.py`: the `tessera serve` flags (every flag `operator/render.py` emits) -> `ServeConfig`.
- `app.py`: FastAPI routes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`,
  `/health`, `/ready`, `/metrics`) and the OpenAI-style error bodies.
- `protocol.py`: the request and response models, in OpenAI's shapes.
- `tokenizer.py`: tokenizer.json and the chat template from the weights folder.
- `engine_loop.py`: the engine on its own thread; submit, stream tokens, abort.
- `metrics.py`: Prometheus metrics under vLLM's names.

Only `cli.py` is imported by `tessera --help`; the rest needs the `serve` extra.
"""
