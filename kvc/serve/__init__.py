"""kvc.serve: an OpenAI-compatible HTTP server for kvc models (`python -m kvc.serve MODEL`).

`engine.Engine` is the interface between the HTTP app and generation; `engine.WorkerEngine` is
today's engine (N workers, each owning a kvc.Model, one FIFO queue); `app.create_app(engine)`
is the ASGI app (FastAPI).
"""
