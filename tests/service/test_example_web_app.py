"""The example web app in examples/, against the real worker (needs `pip install flask`)."""

from __future__ import annotations

import importlib.util
import io
import time

import pytest
from service_helpers import REPO_ROOT

pytestmark = pytest.mark.service
flask = pytest.importorskip("flask")


@pytest.fixture(scope="module")
def web(session_worker, redis_url, service_files):
    spec = importlib.util.spec_from_file_location("example_web_app", REPO_ROOT / "examples" / "web_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.create_app(broker_url=f"{redis_url}/0", storage_dir=str(service_files.storage)).test_client()


def poll(web, status_url: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while (response := web.get(status_url)).status_code == 202:
        assert time.monotonic() < deadline, response.json
        time.sleep(0.05)
    return response


def test_enqueue_then_download_the_audio(web):
    import soundfile as sf

    created = web.post("/speech", json={"text": "Served over HTTP.", "format": "flac"})
    assert created.status_code == 202

    done = poll(web, created.json["status_url"])

    assert done.status_code == 200 and done.mimetype == "audio/flac"
    samples, rate = sf.read(io.BytesIO(done.data))
    assert rate == 24000 and len(samples) > 0


def test_a_failed_job_reports_its_error(web):
    created = web.post("/speech", json={"text": "Hi.", "voice": "nobody"})

    failed = poll(web, created.json["status_url"])

    assert failed.status_code == 422 and "unknown voice 'nobody'" in failed.json["error"]


def test_text_is_required(web):
    assert web.post("/speech", json={"voice": "alba"}).status_code == 400
