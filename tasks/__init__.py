"""Celery tasks of the Pocket TTS worker service.

    from tasks import synthesize
    path = synthesize.delay("Hello there.").get()

Importing this package does not import torch nor load a model; workers load
the model in each prefork child (see tasks.celery_app).
"""

from tasks.celery_app import app
from tasks.synthesis import synthesize, worker_info

__all__ = ["app", "synthesize", "worker_info"]
