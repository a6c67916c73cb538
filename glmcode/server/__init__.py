"""`glmcode serve`: the engine loaded once, behind an OpenAI-compatible HTTP API.

- main.py: the command (bind, load, serve, stop on Ctrl-C/SIGTERM), on uvicorn.
- app.py: the FastAPI routes and the error shapes; guards.py: API key and body size.
- protocol.py: the request as accepted; completions.py: engine output to OpenAI deltas.
- service.py: loading state, the bounded queue, requests in flight; engine_bridge.py: one
  engine stream on a worker thread, read from asyncio.
- state.py: the state files through which `chat`, `ask`, `fix` and `doctor` find a running
  server; status.py: what `glmcode serve --status` prints.
"""
