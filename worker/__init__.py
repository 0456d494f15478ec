"""Celery workers: thin tasks around `linearize.pipeline.run`.

Nothing here imports torch at import time: the prefork pool forks its children from a parent
that never touched CUDA, and each child imports the engine inside the task.
"""
