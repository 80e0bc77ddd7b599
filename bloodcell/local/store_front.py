"""The local object store, answering only our own clients.

fake-gcs-server has no login, answers every web origin (``Access-Control-Allow-Origin: *``) and wipes
everything on ``POST /_internal/delete_all``; any page a user opens could reach it on loopback. So it never
listens where a page can reach it: this front owns the store's loopback port and forwards a request only
when it carries the state directory's token (``Authorization: Bearer``, sent by
:func:`bloodcell.storage.client`'s credentials), no ``Origin`` header (no browser page), and the exact
``Host`` it serves (which stops DNS rebinding); ``/_internal/`` is never forwarded. Refusals are 403 (a
401 would make the storage client try to refresh its credentials).

The emulator itself runs in a network namespace of its own (a user and network namespace, no privileges
needed) where only this front reaches it: ``pipeline.py run`` opens the listening socket on the host's
loopback, then starts this module under ``unshare --user --map-root-user --net`` with that socket; a socket
keeps the namespace it was made in, so the front accepts on the host's loopback and connects to the
emulator on the namespace's own. Where the system refuses such namespaces (Ubuntu's AppArmor restriction,
a container without the right), it runs here with the emulator on another loopback port, and says so.

    python -m bloodcell.local.store_front --listen-fd FD --token-file FILE --inner-port PORT [--isolated] -- COMMAND ...
"""

from __future__ import annotations

import argparse
import email.message
import fcntl
import hmac
import http.client
import http.server
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

CHUNK = 1 << 20
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
# Never forwarded upstream: our token, and what could make the emulator build URLs for another host.
DROPPED_UPSTREAM = {"authorization", "expect", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-for", "forwarded"}
BLOCKED_PREFIX = "/_internal/"
START_TIMEOUT_S = 60
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def refusal(headers: email.message.Message, path: str, token: bytes, host: str) -> str | None:
    """Why a request must not reach the store, or None when it may."""
    if headers.get("Origin") is not None:
        return "requests from web pages (with an Origin header) are refused"
    if headers.get("Host") != host:
        return f"the Host header must be {host}"
    if path.startswith(BLOCKED_PREFIX):
        return "the emulator's internal endpoints are refused"
    scheme, _, offered = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(offered.strip().encode(), token):
        return (
            "no valid token: requests need the state directory's object-store token (bloodcell's storage "
            "client sends it; see `bloodcell.local.services.client_env`)"
        )
    return None


class Front(http.server.ThreadingHTTPServer):
    """Serves an already listening socket; forwards checked requests to the emulator at ``inner``."""

    daemon_threads = True

    def __init__(self, listening: socket.socket, inner: tuple[str, int], token: bytes):
        super().__init__(listening.getsockname(), Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listening
        self.inner, self.token = inner, token
        address, port = listening.getsockname()[:2]
        self.host = f"{address}:{port}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in separate writes: with Nagle's algorithm each answer waits for a delayed ACK.
    disable_nagle_algorithm = True
    server: Front
    _upstream: http.client.HTTPConnection | None = None  # one connection to the emulator per client connection
    _answered = False

    def do_any(self) -> None:
        why = refusal(self.headers, self.path, self.server.token, self.server.host)
        if why is None and self.headers.get("Transfer-Encoding"):
            why = "chunked request bodies are not accepted: send a Content-Length"
        if why is not None:
            self._refuse(why)
            return
        self._answered = False
        try:
            self._forward()
        except (OSError, http.client.HTTPException) as exc:
            self._upstream, self.close_connection = None, True
            if not self._answered:
                self._answer(502, {"error": {"code": 502, "message": f"the object store did not answer: {exc}"}})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_any

    def _forward(self) -> None:
        upstream = self._connection()
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP | DROPPED_UPSTREAM:
                upstream.putheader(name, value)
        upstream.endheaders()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(CHUNK, remaining))
            if not chunk:
                raise ConnectionError("the client closed the connection mid-body")
            upstream.send(chunk)
            remaining -= len(chunk)
        response = upstream.getresponse()
        self._answered = True
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP and not name.lower().startswith("access-control-"):
                self.send_header(name, value)
        bodiless = self.command == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200
        sized = response.length is not None or bodiless
        if not sized:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while not bodiless:
            chunk = response.read(CHUNK)
            if not chunk:
                break
            self.wfile.write(chunk if sized else b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if not sized:
            self.wfile.write(b"0\r\n\r\n")
        response.close()
        if response.will_close:
            self._upstream = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection(*self.server.inner, timeout=600)
        return self._upstream

    def _refuse(self, why: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= CHUNK:
            self.rfile.read(length)  # keep the connection usable
        else:
            self.close_connection = True
        self._answer(403, {"error": {"code": 403, "message": f"bloodcell's local object store: {why}"}})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        pass  # the emulator logs what matters; a line per request would fill the log


def bring_loopback_up() -> None:
    """In a new network namespace the loopback interface starts down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


def wait_for(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the object store exited while starting (status {process.returncode})")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"the object store did not listen on port {port} within {START_TIMEOUT_S} s")


def exit_with(process: subprocess.Popen) -> None:
    """The front ends when the emulator does: whoever started them sees the service gone and restarts it."""
    process.wait()
    os._exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen-fd", type=int, required=True, help="the listening socket, inherited")
    parser.add_argument("--token-file", required=True, help="the file holding the token (mode 0600)")
    parser.add_argument("--inner-port", type=int, required=True, help="the port the emulator listens on")
    parser.add_argument("--isolated", action="store_true", help="running in a network namespace of its own")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the emulator's command line")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    token = Path(args.token_file).read_text().strip().encode()
    listening = socket.socket(fileno=args.listen_fd)
    if args.isolated:
        bring_loopback_up()
    emulator = subprocess.Popen(command, stdin=subprocess.DEVNULL)

    def stop(*_) -> None:
        emulator.terminate()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    wait_for(args.inner_port, emulator)
    threading.Thread(target=exit_with, args=(emulator,), daemon=True).start()
    front = Front(listening, ("127.0.0.1", args.inner_port), token)
    print(
        f"object store front on {front.host}: the emulator on port {args.inner_port} "
        + ("in a network namespace of its own" if args.isolated else "of this machine's loopback"),
        flush=True,
    )
    front.serve_forever()


if __name__ == "__main__":
    main()
