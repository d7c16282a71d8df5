"""The dashboard's HTTP server: standard library, 127.0.0.1 only, every request checked against a token.

The token comes in the URL once (`/?token=…`, as Jupyter's) and then lives in an HttpOnly, SameSite=Strict
cookie. Actions (stop a run, add a tag) are POSTs that must also carry the token in `X-Dstack-Token` and come
from the page's own origin. Each server thread has its own read connection to the WAL state, so reading
never blocks a run writing.
"""

from __future__ import annotations

import hmac
import json
import logging
import mimetypes
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from dstack.errors import DstackError, NotFoundError

if TYPE_CHECKING:
    from dstack.store.state import State

log = logging.getLogger("dstack.dashboard")
STATIC = Path(__file__).with_name("static")
COOKIE = "dstack_ui_token_{port}"  # per port: cookies ignore ports, and two dashboards may run at once
CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"  # no script but ours


class Dashboard(ThreadingHTTPServer):
    """The server: holds the token and one state connection per thread."""

    daemon_threads = True

    def __init__(self, port: int = 0, token: str | None = None) -> None:
        self.token = token or secrets.token_urlsafe(24)
        self._states: list[State] = []
        self._idle: list[State] = []
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", port), Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?token={self.token}"

    @contextmanager
    def state(self) -> Iterator[State]:
        """A read connection for one request, from a pool (a thread per request must not open one each)."""
        with self._lock:
            st = self._idle.pop() if self._idle else None
        if st is None:
            from dstack.store.state import open_state

            st = open_state()
            with self._lock:
                self._states.append(st)
        try:
            yield st
        finally:
            with self._lock:
                self._idle.append(st)

    def server_close(self) -> None:
        super().server_close()
        with self._lock:
            for st in self._states:
                st.close()
            self._states.clear()
            self._idle.clear()


class Handler(BaseHTTPRequestHandler):
    server: Dashboard
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    # -- checks ---------------------------------------------------------------------------------------
    def _origin_ok(self) -> bool:
        """The Host header names this server (a DNS-rebinding page can't talk to it)."""
        host = self.headers.get("Host", "")
        return host in (f"127.0.0.1:{self.server.port}", f"localhost:{self.server.port}")

    def _authorized(self, query: dict[str, list[str]]) -> bool:
        given = query.get("token", [""])[0] or self.headers.get("X-Dstack-Token", "")
        if not given:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
            name = COOKIE.format(port=self.server.port)
            given = cookie[name].value if name in cookie else ""
        return bool(given) and hmac.compare_digest(given, self.server.token)

    # -- responses ------------------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", CSP)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, code: int = 200) -> None:
        self._send(code, json.dumps(data, default=str).encode(), "application/json")

    def _error(self, code: int, message: str) -> None:
        self._json({"error": message}, code)

    # -- routing --------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self._origin_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unknown Host header")
        if not self._authorized(query):
            return self._error(HTTPStatus.FORBIDDEN, "open the URL `dstack ui` printed (it has the token)")
        try:
            with self.server.state() as state:
                self._get(state, url.path, query)
        except NotFoundError as e:
            self._error(HTTPStatus.NOT_FOUND, str(e))
        except DstackError as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_HEAD = do_GET

    def _get(self, state: State, path: str, query: dict[str, list[str]]) -> None:
        from dstack.dashboard import views

        def arg(name: str) -> str:
            return query.get(name, [""])[0]

        if path == "/":
            html = (STATIC / "index.html").read_text().replace("{{token}}", self.server.token)
            name = COOKIE.format(port=self.server.port)
            cookie = f"{name}={self.server.token}; HttpOnly; SameSite=Strict; Path=/"
            return self._send(200, html.encode(), "text/html; charset=utf-8", {"Set-Cookie": cookie})
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            file = STATIC / name
            if "/" in name or name.startswith(".") or not file.is_file():
                return self._error(HTTPStatus.NOT_FOUND, "no such asset")
            ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
            return self._send(200, file.read_bytes(), ctype)
        if path == "/api/runs":
            return self._json(views.runs_view(state))
        if path == "/api/run":
            return self._json(views.run_view(state, arg("name")))
        if path == "/api/metrics":
            return self._json(views.metrics_view(state, arg("run")))
        if path == "/api/hosts":
            return self._json(views.hosts_view(state))
        if path == "/api/tags":
            return self._json(views.tags_view(state))
        if path == "/api/log":
            offset = int(arg("offset") or 0) if arg("offset").isdigit() else 0
            data, end = views.log_chunk(state, arg("job"), offset)
            return self._send(200, data, "text/plain; charset=utf-8", {"X-Log-Offset": str(end)})
        if path == "/api/artifact":
            return self._artifact(state, arg("job"), arg("path"))
        self._error(HTTPStatus.NOT_FOUND, f"no page {path}")

    def _artifact(self, state: State, job_id: str, path: str) -> None:
        from dstack.dashboard.views import artifact_file
        from dstack.store import open_object_store

        digest, _, name = artifact_file(state, job_id, path)
        data = open_object_store(state).get_bytes(digest)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "artifact"
        self._send(
            200, data, "application/octet-stream", {"Content-Disposition": f'attachment; filename="{safe}"'}
        )

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        if not self._origin_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unknown Host header")
        origin = self.headers.get("Origin")
        own = {f"http://127.0.0.1:{self.server.port}", f"http://localhost:{self.server.port}"}
        header = self.headers.get("X-Dstack-Token", "")
        if (origin is not None and origin not in own) or not (
            header and hmac.compare_digest(header, self.server.token)
        ):
            return self._error(HTTPStatus.FORBIDDEN, "actions need the page's token and its own origin")
        try:
            length = min(int(self.headers.get("Content-Length") or 0), 65536)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        with self.server.state() as state:
            self._act(state, url.path, body)

    def _act(self, state: State, path: str, body: dict[str, Any]) -> None:
        try:
            if path == "/api/stop":
                from dstack.runs import stop_run

                run = stop_run(state, str(body.get("run", "")))
                return self._json({"run": run.name, "status": run.status})
            if path == "/api/tag":
                from dstack.tags import add_tag

                tag = add_tag(state, str(body.get("name", "")), str(body.get("run", "")))
                return self._json({"tag": tag.name, "run": tag.run_name})
        except DstackError as e:
            return self._error(HTTPStatus.BAD_REQUEST, str(e))
        self._error(HTTPStatus.NOT_FOUND, f"no action {path}")


def serve(port: int = 0) -> Dashboard:
    """A dashboard bound to 127.0.0.1:`port` (0: any free port), not yet serving."""
    try:
        return Dashboard(port)
    except OSError as e:
        from dstack.errors import UsageError

        raise UsageError(f"can't listen on 127.0.0.1:{port}: {e.strerror}", hint="pick another --port") from e
