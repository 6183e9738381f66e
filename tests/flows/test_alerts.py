"""A failed run says what happened and how to resume, in its log and through the notification block
named by `alerts.notify_block` (a Prefect custom-webhook block posting to a receiver on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flows.ft_pipeline import ft_pipeline

pytestmark = pytest.mark.prefect


@pytest.fixture
def receiver():
    posts: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            posts.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", posts
    server.shutdown()


def test_a_failed_run_notifies_the_block_with_how_to_resume(prefect_api, tmp_path, receiver):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    url, posts = receiver
    CustomWebhookNotificationBlock(
        name="ftp-test-alert",
        url=url,
        json_data={"text": "{{subject}}: {{body}}"},
        allow_private_urls=True,
    ).save("ftp-test-alert", overwrite=True)
    empty = tmp_path / "no-images"
    empty.mkdir()
    with pytest.raises(Exception, match="image"):
        ft_pipeline(
            steps="0", overrides={"paths.data_root": str(empty), "alerts.notify_block": "custom-webhook/ftp-test-alert"}
        )
    (post,) = posts
    text = post["text"]
    assert "ft-pipeline: run" in text and "ended Failed" in text
    assert "run it again with the same parameters" in text and "resumes training from its last checkpoint" in text
    assert "image" in text  # the reason the run failed


def test_without_a_block_the_failure_is_only_logged(prefect_api, tmp_path, receiver, caplog):
    _, posts = receiver
    empty = tmp_path / "no-images"
    empty.mkdir()
    with pytest.raises(Exception, match="image"):
        ft_pipeline(steps="0", overrides={"paths.data_root": str(empty)})
    assert posts == []
