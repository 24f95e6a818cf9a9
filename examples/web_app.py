"""A web app that enqueues speech jobs and serves the finished audio.

It needs only Flask, Celery and Redis: jobs are sent by name to the workers
(`pocket_tts.synthesize`), which write the audio to the shared storage volume
that this app also mounts.

    pip install flask "celery[redis]"
    export CELERY_BROKER_URL=redis://:password@localhost:6379/0 POCKET_TTS_STORAGE_DIR=/data/audio
    flask --app examples/web_app.py run

    curl -X POST localhost:5000/speech -H 'content-type: application/json' -d '{"text": "Hello."}'
    curl -o hello.wav localhost:5000/speech/<job_id>     # 202 while queued or running
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery
from flask import Flask, abort, jsonify, request, send_file, url_for

JOB_OPTIONS = ("voice", "temperature", "format")


def create_app(broker_url: str | None = None, storage_dir: str | None = None) -> Flask:
    broker_url = broker_url or os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
    storage = Path(storage_dir or os.environ.get("POCKET_TTS_STORAGE_DIR", "audio")).resolve()
    queue = Celery("speech-web", broker=broker_url, backend=os.environ.get("CELERY_RESULT_BACKEND", broker_url))
    queue.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"]
    )
    app = Flask(__name__)

    @app.post("/speech")
    def create_speech():
        body = request.get_json(silent=True) or {}
        if not isinstance(body.get("text"), str) or not body["text"].strip():
            return jsonify(error="a non-empty 'text' is required"), 400
        options = {key: body[key] for key in JOB_OPTIONS if key in body}
        job = queue.send_task("pocket_tts.synthesize", args=(body["text"],), kwargs=options)
        return jsonify(job_id=job.id, status_url=url_for("get_speech", job_id=job.id)), 202

    @app.get("/speech/<job_id>")
    def get_speech(job_id: str):
        job = queue.AsyncResult(job_id)
        if job.state == "FAILURE":
            return jsonify(state=job.state, error=str(job.result)), 422
        if job.state != "SUCCESS":
            return jsonify(state=job.state), 202  # an unknown id stays PENDING
        path = Path(job.result).resolve()
        if not path.is_relative_to(storage) or not path.is_file():  # only ever serve the shared storage
            abort(404)
        return send_file(path)

    return app


app = create_app()
