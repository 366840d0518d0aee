"""``blindhub web``: serve the browser client from this installation, on 127.0.0.1 only.

The page and its JavaScript come from the files installed with blindhub (client/web/), never
from the hub: an end-to-end encrypted web app served by the operator of its relay can be
changed by that operator to read the keys, call by call (docs/howto/browser-peer.md). The
server sends a fixed set of files, each with a Content-Security-Policy that allows scripts from
this origin only (no inline script, no eval, no other origin) and network connections to this
origin and the one hub named on the command line. The page learns the hub's URL from a
``<meta>`` element written into index.html here, so that nothing in the URL or the page can
point it at another hub.
"""

import argparse
import html
import http.server
import sys
from functools import partial
from importlib import resources
from typing import Final
from urllib.parse import urlsplit

from client.exit_codes import ExitCode

DEFAULT_PORT: Final = 8470
HUB_PLACEHOLDER: Final = "{{HUB_URL}}"

# The files the page is made of; every other path is 404. Media types are fixed here rather
# than guessed from the system's tables.
FILES: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/audit.js": ("audit.js", "text/javascript; charset=utf-8"),
    "/call.js": ("call.js", "text/javascript; charset=utf-8"),
    "/group.js": ("group.js", "text/javascript; charset=utf-8"),
    "/hub.js": ("hub.js", "text/javascript; charset=utf-8"),
    "/protocol.js": ("protocol.js", "text/javascript; charset=utf-8"),
    "/senderkeys.js": ("senderkeys.js", "text/javascript; charset=utf-8"),
    "/sframe.js": ("sframe.js", "text/javascript; charset=utf-8"),
    "/steps.js": ("steps.js", "text/javascript; charset=utf-8"),
    "/store.js": ("store.js", "text/javascript; charset=utf-8"),
    "/worker.js": ("worker.js", "text/javascript; charset=utf-8"),
}


def hub_url(value: str) -> str:
    """A ws:// or wss:// URL with a host, and nothing that could break out of the policy."""
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise argparse.ArgumentTypeError("must be ws://HOST:PORT or wss://HOST:PORT")
    if any(char in value for char in " ;,'\"<>\\") or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("must be a plain ws:// or wss:// URL")
    return value


def content_security_policy(hub: str) -> str:
    """Scripts, workers and styles from this origin only; connections to this origin and the
    hub's; nothing framed, no plugin, no form, no base URL."""
    parts = urlsplit(hub)
    hub_origin = f"{parts.scheme}://{parts.netloc}"
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "worker-src 'self'",
            "style-src 'self'",
            "img-src 'self'",
            "media-src 'self'",
            f"connect-src 'self' {hub_origin}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def load_files(hub: str) -> dict[str, tuple[bytes, str]]:
    """Every file's bytes, read once at start: the server never opens a path a request names."""
    package = resources.files("client") / "web"
    loaded: dict[str, tuple[bytes, str]] = {}
    for path, (name, media_type) in FILES.items():
        data = (package / name).read_bytes()
        if name == "index.html":
            data = data.replace(HUB_PLACEHOLDER.encode(), html.escape(hub, quote=True).encode())
        loaded[path] = (data, media_type)
    return loaded


class WebHandler(http.server.BaseHTTPRequestHandler):
    server_version = "blindhub-web"
    sys_version = ""

    def __init__(
        self, *args: object, files: dict[str, tuple[bytes, str]], policy: str, quiet: bool
    ) -> None:
        self.files = files
        self.policy = policy
        self.quiet = quiet
        super().__init__(*args)  # type: ignore[arg-type]

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, *, send_body: bool) -> None:
        found = self.files.get(urlsplit(self.path).path)
        body, media_type = found if found is not None else (b"not found\n", "text/plain")
        self.send_response(200 if found is not None else 404)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", self.policy)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        if not self.quiet:
            super().log_message(format, *args)


def make_server(hub: str, port: int, *, quiet: bool = True) -> http.server.ThreadingHTTPServer:
    """The page's server on 127.0.0.1:``port`` (0: any free port); not started."""
    handler = partial(
        WebHandler, files=load_files(hub), policy=content_security_policy(hub), quiet=quiet
    )
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hub",
        required=True,
        type=hub_url,
        help="the hub's URL, ws://HOST:PORT or wss://HOST:PORT",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"the local port to serve the page on (default {DEFAULT_PORT}; 0: any free port)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")


def run(args: argparse.Namespace) -> int:
    try:
        server = make_server(args.hub, args.port, quiet=not args.verbose)
    except OSError as error:
        print(f"blindhub web: cannot listen on 127.0.0.1:{args.port}: {error}", file=sys.stderr)
        return ExitCode.LOCAL_PROBLEM
    host, port = str(server.server_address[0]), server.server_address[1]
    print(f"blindhub web: open http://{host}:{port}/ (calls through {args.hub})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    finally:
        server.server_close()
    return ExitCode.OK
