"""kvc.serve: an OpenAI-compatible HTTP server for kvc models (`python -m kvc.serve MODEL`).

`engine.Engine` is the interface between the HTTP app and generation; `engine.BatchEngine` runs
every request on one paged KV cache with continuous batching (`scheduler.Scheduler` decides each
step's batch); `app.create_app(engine)` is the ASGI app (FastAPI).
"""
