"""The one web server of the served pages: the listening page (`train_feedback.py --listen`, listening.py)
and the blind comparison (`--compare`, blind_compare.py). It holds the address flags and their check, the
server and what every request goes through; a page's module holds only its routes (`Handler.routes`) and
its page, whose head is completed with the head both pages share (page_head.html).

The server is the standard library's ThreadingHTTPServer: one listener on one machine sends a few requests
a minute, so a web framework would add a dependency and nothing else. Every request, whatever the page:
its Host and Origin are checked (other sites' pages, DNS rebinding), its body is limited by its
Content-Length before it is read and dropped when it does not arrive, a JSON body is parsed with a depth
limit, and whatever it holds the answer is JSON (a 4xx for a bad request), never a traceback, with the
security headers of every answer. No path from a request is ever joined to a folder: routes address rows by
number.
"""

import errno
import ipaddress
import json
import os
import re
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from voicetune.common import run_errors

HEAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page_head.html")
HEAD_MARK = b"<!-- page_head.html -->"  # where a page's <head> takes the shared head
MAX_JSON_BYTES = 1024  # a mark is {"mark": "needs_work"}, a choice {"choice": "same"}
MAX_JSON_DEPTH = 4
MAX_INDEX_DIGITS = 9  # row numbers in paths, and the digits of a Content-Length
READ_TIMEOUT_S = 20  # a client that announces a body and sends none is dropped after this long
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PORT_ERRORS = {errno.EADDRINUSE, errno.EACCES, getattr(errno, "WSAEACCES", errno.EACCES)}
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",  # no other site may show the page in a frame and click it for the listener
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


class UploadError(ValueError):
    """A request the page refuses; `status` is the HTTP status it answers with."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------------
# The address flags of a served page, and their check.

def add_address_flags(group):
    """--host, --port, --allow_remote and --allowed_host onto `group` (a parser or one of its argument groups)."""
    group.add_argument("--host", default="127.0.0.1",
                       help="Address the page is served on; another than this machine's needs --allow_remote.")
    group.add_argument("--port", type=int, default=8000, help="Port of the page (0: any free port).")
    group.add_argument("--allow_remote", action="store_true",
                       help="Allow a --host other machines can reach. There is no password and the page is plain "
                            "http: anyone on the network who can reach the port can hear the voice, mark the "
                            "sentences and save recordings into --feedback_dir. Requests are still answered only "
                            "when they name this machine (an IP address, localhost, this machine's host names, or "
                            "an --allowed_host), so a web site cannot reach the page by pointing its own domain "
                            "name at this machine (DNS rebinding), and other sites' pages cannot post to it.")
    group.add_argument("--allowed_host", action="append", default=None, metavar="NAME",
                       help="With --allow_remote: one more name the page may be opened under, such as a DNS name "
                            "or alias of this machine (repeatable). Requests naming any other host are refused.")


def check_address_args(parser, args):
    """--host, --allow_remote and --allowed_host of a served page (--listen, --compare): a page is served on
    this machine unless --allow_remote says otherwise."""
    if args.host not in LOCAL_HOSTS and not args.allow_remote:
        parser.error(f"--host {args.host} would let other machines write into --feedback_dir: add --allow_remote "
                     "to mean it")
    if args.allowed_host and not args.allow_remote:
        parser.error("--allowed_host names the page may be opened under from other machines: it needs "
                     "--allow_remote (a local page answers only localhost)")
    for name in args.allowed_host or []:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\.?", name):
            parser.error(f"--allowed_host {name!r}: give a host name (letters, digits, dots and hyphens; no "
                         "scheme, port or path)")
    args.allowed_host = [name.rstrip(".").lower() for name in args.allowed_host or []]


# ----------------------------------------------------------------------------------------------------
# Requests: checked, routed to the page's own answers, refused as one line of JSON.

class Handler(BaseHTTPRequestHandler):
    """GET / answers the page (`page`, with the shared head); `routes` answer the rest.

    A page's subclass sets `page` and `routes`: (method, path pattern, function) rows, where `{row}` in a
    pattern is a row number, handed to the function as the int `row` (with the pattern's other named groups
    as strings). A path only another method routes is a 405; any other unrouted path a 404."""

    page = None  # the page's HTML file
    routes = ()
    session = None  # what the page shows and changes (a listening Session, a Comparison): set by make_server
    local = True  # bound to this machine only: then only a local Host header is answered
    allowed_hosts = frozenset()  # with --allow_remote: the names a request may give in its Host header

    def setup(self):
        self.timeout = READ_TIMEOUT_S  # on every read of the socket: a client that stops sending is dropped
        super().setup()  # (StreamRequestHandler.setup applies it)

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.answer()

    def do_POST(self):  # noqa: N802
        self.answer()

    def answer(self):
        try:
            self.check_origin()
            self.url = urlsplit(self.path)
            self.route()
        except UploadError as err:
            self.send_json(dict(error=str(err)), err.status)

    def route(self):
        other_methods = []
        for method, pattern, function in (("GET", "/", Handler.send_page), *self.routes):
            m = re.fullmatch(pattern.replace("{row}", "(?P<row>[0-9]+)"), self.url.path)
            if m is None:
                continue
            if method != self.command:
                other_methods.append(method)
                continue
            groups = m.groupdict()
            if "row" in groups:
                if len(groups["row"]) > MAX_INDEX_DIGITS:  # names no row (and int() of 5000 digits raises)
                    continue
                groups["row"] = int(groups["row"])
            return function(self, **groups)
        if other_methods:
            raise UploadError(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} {self.url.path}: only {other_methods[0]}")
        raise UploadError(HTTPStatus.NOT_FOUND, "not found")

    def check_origin(self):
        """Refuse what another web site's page makes the browser send here: cross-origin posts, and requests
        through a domain name that was re-pointed at this machine (DNS rebinding).

        A rebinding page controls both its Host and Origin headers (they name its own domain), so the Host
        itself must be one this server knows: a local name when bound to this machine, else an IP address,
        this machine's names or an --allowed_host. An IP address is safe to answer: a page loaded from a
        domain name never sends an IP address as its Host, and an address cannot be re-pointed."""
        host = self.headers.get("Host", "")
        if not self.host_allowed(host_name(host)):
            raise UploadError(HTTPStatus.FORBIDDEN, "requests must name this machine (localhost)" if self.local else
                              "requests must name this machine: its address, its name or an --allowed_host")
        if self.headers.get("Origin") not in (None, f"http://{host}"):
            raise UploadError(HTTPStatus.FORBIDDEN, "cross-origin request refused")

    def host_allowed(self, name):
        if self.local:
            return name in LOCAL_HOSTS
        if name in self.allowed_hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def read_body(self, limit):
        """The request's body: a Content-Length of ASCII digits, at most `limit` bytes, all of it sent."""
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise UploadError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        length = lengths[0].strip(" \t")
        if len(set(lengths)) > 1 or not re.fullmatch(r"[0-9]+", length):
            raise UploadError(HTTPStatus.BAD_REQUEST, "Content-Length must be one number of bytes (ASCII digits)")
        if len(length) > MAX_INDEX_DIGITS or int(length) > limit:
            raise UploadError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"upload larger than {limit // 2**20} MiB"
                              if limit >= 2**20 else f"body larger than {limit} bytes")
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            raise UploadError(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {self.timeout} s") from None
        if len(body) < int(length):
            raise UploadError(HTTPStatus.BAD_REQUEST, f"body of {len(body)} bytes, shorter than its Content-Length")
        return body

    def read_json_object(self, shape):
        """The body as a small JSON object (an empty body is {}); UploadError 400 naming the `shape` expected."""
        return parse_json_object(self.read_body(MAX_JSON_BYTES) or b"{}", shape)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line or header, a method without a do_*) as JSON,
        with the headers of every answer; an unknown method is a 405, not http.server's 501."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} not allowed: GET or POST"
        self.close_connection = True
        self.send_json(dict(error=message or HTTPStatus(code).phrase), code)

    def send_page(self):
        self.send_bytes(served_page(self.page), "text/html; charset=utf-8")

    def send_state(self):
        self.send_json(self.session.state())

    def send_file(self, path):
        if path is None or not os.path.isfile(path):
            raise UploadError(HTTPStatus.NOT_FOUND, "no such audio")
        with open(path, "rb") as f:
            self.send_bytes(f.read(), "audio/wav")

    def send_json(self, data, status=HTTPStatus.OK):
        self.send_bytes(json.dumps(data, ensure_ascii=False).encode(), "application/json", status)

    def send_bytes(self, body, content_type, status=HTTPStatus.OK):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # a redo must never play the old take
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET, POST")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        pass  # what a page changes is printed by its session; one line per request would bury it


def served_page(path):
    """The page in the HTML file `path` as it is served: the shared head (page_head.html) in its <head>."""
    with open(path, "rb") as f:
        page = f.read()
    with open(HEAD, "rb") as f:
        head = f.read()
    return page.replace(HEAD_MARK, head.rstrip(b"\r\n"), 1)


def host_name(header):
    """The host of a Host header: lowercased, without its port, IPv6 brackets or a trailing dot; '' if malformed."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]*)(:[0-9]{0,5})?", header.strip())
    return m.group(1).strip("[]").rstrip(".").lower() if m else ""


def parse_json_object(body, shape):
    """A small JSON object from a request body: UploadError 400 (naming the `shape` expected) for anything
    else, deep nesting included."""
    try:
        text = body.decode("utf-8")
        if json_depth(text) > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH}")
        data = json.loads(text)
    except ValueError as err:
        raise UploadError(HTTPStatus.BAD_REQUEST, f"body must be JSON {shape} ({err})") from None
    if not isinstance(data, dict):
        raise UploadError(HTTPStatus.BAD_REQUEST, f"body must be JSON {shape}")
    return data


def json_depth(text):
    """How deeply `text` nests JSON arrays and objects (brackets inside strings not counted), without parsing
    it: the json module recurses once per level and raises RecursionError past about a thousand."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


# ----------------------------------------------------------------------------------------------------
# The server: bound, announced, served until Ctrl-C.

def machine_hosts(host, allowed=()):
    """The names a request to a server bound to `host` may give in its Host header when --allow_remote is on:
    localhost, the bound address, this machine's names and each --allowed_host (any IP address also goes)."""
    names = {*LOCAL_HOSTS, host, socket.gethostname(), socket.getfqdn(), *allowed}
    return frozenset(n.strip("[]").rstrip(".").lower() for n in names if n)


class Server(ThreadingHTTPServer):
    """The standard server, but a browser that goes away mid-answer (the page closed or reloaded while audio
    was being sent) is no error: nothing is lost, so nothing is printed."""

    allow_reuse_address = os.name != "nt"  # Windows' SO_REUSEADDR would let a second page take a port in use

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):  # BrokenPipe, ConnectionReset, ConnectionAborted
            return
        super().handle_error(request, client_address)


class Server6(Server):
    address_family = socket.AF_INET6


def make_server(handler, session, host, port, allowed_hosts=()):
    """A Server serving `session` with `handler` (a page's Handler; port 0: any free port); the caller runs
    serve_forever. An address that cannot be served (the port in use) is a TrainingError naming it.

    Bound to a local address, only local Host names are answered; else `allowed_hosts` and machine_hosts."""
    local = host in LOCAL_HOSTS
    handler = type("SessionHandler", (handler,), dict(
        session=session, local=local, allowed_hosts=frozenset() if local else machine_hosts(host, allowed_hosts)))
    address = f"{f'[{host}]' if ':' in host else host}:{port}"
    try:
        server = (Server6 if ":" in host else Server)((host, port), handler)
    except OSError as err:
        # In use, or a port this user may not open (below 1024; one Windows reserves): another port will do.
        hint = "give another --port, or --port 0 for any free one" if err.errno in PORT_ERRORS else "check --host"
        raise run_errors.TrainingError(f"cannot serve the page on {address} ({err.strerror or err}): {hint}") from None
    server.url = f"http://{address.rsplit(':', 1)[0]}:{server.server_address[1]}/"
    return server


def warn_remote(server, host, what):
    """The warning a page served beyond this machine prints: who can reach it and `what` they can do there."""
    if host not in LOCAL_HOSTS:
        print(f"warning: --host {host} lets other machines on the network open this page and {what}")
        names = ", ".join(sorted(server.RequestHandlerClass.allowed_hosts))
        print(f"answering only requests that name this machine by an IP address or as one of: {names} "
              "(add names with --allowed_host)")


def serve_until_interrupted(server, announce=None):
    """Serve until Ctrl-C, then close the port; `announce()` says where first (default: the page to open)."""
    if announce is None:
        print(f"open {server.url} in a browser (Ctrl-C to stop)")
    else:
        announce()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
