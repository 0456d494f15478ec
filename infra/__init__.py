"""What the API front (`service`) and the workers (`worker`) share: settings, the job store and
its database, the artifact store, model checks and the Celery configuration.

Never imports torch or the `linearize` engine package: the API image ships without them.
"""
