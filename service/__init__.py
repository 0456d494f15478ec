"""The REST front of linearize: FastAPI app, settings, job/artifact stores, auth.

Never imports torch or the `linearize` engine package: the API image ships without them.
The worker reuses the torch-free store modules (settings, db, store, artifacts, modelcheck, broker).
"""
