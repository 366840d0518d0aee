"""``blindhub web``: the page's files from the install, on 127.0.0.1, under a strict policy."""

import argparse
import urllib.error
import urllib.request

import pytest

from client.web_command import FILES, content_security_policy, hub_url
from tests.browser import web_server


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_every_file_is_served_with_the_policy_and_nothing_else():
    with web_server("ws://hub.example:8765/") as url:
        assert url.startswith("http://127.0.0.1:")
        for path in FILES:
            status, headers, body = fetch(url + path.lstrip("/"))
            assert status == 200 and body, path
            policy = headers["Content-Security-Policy"]
            assert "script-src 'self';" in policy and "'unsafe-inline'" not in policy
            assert "connect-src 'self' ws://hub.example:8765;" in policy
            assert headers["X-Content-Type-Options"] == "nosniff"
        status, _, page = fetch(url)
        assert b'<meta name="blindhub-hub" content="ws://hub.example:8765/">' in page
        # No inline script: every script is a file of this origin.
        assert b"<script>" not in page and b'<script type="module" src="app.js">' in page
        for path in ("favicon.ico", "../pyproject.toml", "web/app.js", "index.html/"):
            assert fetch(url + path)[0] == 404, path


@pytest.mark.parametrize(
    "bad", ["http://hub", "ws://", "ws://hub/x?a=1", "ws://hub 'unsafe-inline'", 'ws://h"x']
)
def test_a_hub_url_that_could_widen_the_policy_is_refused(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        hub_url(bad)


def test_the_policy_names_only_this_origin_and_the_hub():
    policy = content_security_policy("wss://hub.example/path")
    assert "connect-src 'self' wss://hub.example;" in policy
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
