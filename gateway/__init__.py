"""The HTTP gateway in front of the worker fleet (`pocket-tts serve`): FastAPI, Celery and Redis clients, no torch.

    from gateway.app import create_app      # an ASGI app; settings from the environment
"""
