"""The one server of the served pages: the listening page and the blind comparison answer through the same
checks (another site's Host or Origin, a body over its limit), the same route table (a path of another
method, a row number too long to be one), the same head, the same address flags, and stop on Ctrl-C."""

import errno
import os
import socket
import sys
import threading

import numpy as np
import pytest

import train_feedback as tf
from voicetune.common import page_server
from voicetune.common import run_errors
from voicetune.common import speech
from voicetune.feedback import blind_compare
from voicetune.feedback import listening
from conftest import raw_request


class Page:
    """One page's server on 127.0.0.1 (any free port) in a thread, with the POST that changes what it shows."""

    def __init__(self, handler, session, post_path, body, changed):
        self.session, self.post_path, self.body, self.changed = session, post_path, body, changed
        self.server = page_server.make_server(handler, session, "127.0.0.1", 0)
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ask(self, method, path, headers=(), body=b"", host=None):
        """(status, response, JSON answer or raw body), naming this server (or `host`) in the Host header."""
        length = [("Content-Length", str(len(body)))] if method == "POST" else []
        return raw_request(self.port, method, path, [("Host", host or self.host), *headers, *length], body)


LISTENER = "0123456789abcdef"  # the comparison's one listener


@pytest.fixture
def pages(tmp_path):
    """{"listen": a two-sentence listening session's page, "compare": a two-pair comparison's page}."""
    rows = [dict(id=f"s00{i}", text="Roj baş.", mark=None, saved=None) for i in (1, 2)]
    (tmp_path / "session" / "model").mkdir(parents=True)
    speech.write_wav(str(tmp_path / "session" / "model" / "s001.wav"), np.zeros(1600, np.float32), 16000)
    session = listening.Session(str(tmp_path / "session"), str(tmp_path / "feedback"), "voice", rows, 16000, None)
    (tmp_path / "run" / blind_compare.FOLDER / "audio").mkdir(parents=True)
    speech.write_wav(str(tmp_path / "run" / blind_compare.FOLDER / "audio" / "000A.wav"), np.zeros(800, np.float32),
                     16000)
    pairs = [dict(text="Roj baş.", kind="eval", tuned=letter) for letter in "AB"]
    listener = dict(id=LISTENER, name="Ava", tuned=["A", "B"], choices=[None, None], finished=None)
    comparison = blind_compare.Comparison(str(tmp_path / "run"), pairs, [listener])
    served = {"listen": Page(listening.Handler, session, "/api/mark/0", b'{"mark": "good"}',
                             lambda: session.rows[0]["mark"] is not None),
              "compare": Page(blind_compare.Handler, comparison, f"/api/choose/{LISTENER}/0", b'{"choice": "A"}',
                              lambda: listener["choices"][0] is not None)}
    yield served
    for page in served.values():
        page.server.shutdown()
        page.server.server_close()


def test_both_pages_refuse_another_sites_requests_and_change_nothing(pages):
    for name, page in pages.items():
        refused = [
            (page.ask("POST", page.post_path, [("Origin", "http://evil.example")], page.body),
             "cross-origin request refused"),
            # A DNS-rebinding page names its own domain as Host and as Origin.
            (page.ask("POST", page.post_path, [("Origin", f"http://evil.example:{page.port}")], page.body,
                      host=f"evil.example:{page.port}"), "requests must name this machine (localhost)"),
            (page.ask("GET", "/", host="evil.example"), "requests must name this machine (localhost)"),
        ]
        for (status, response, answer), error in refused:
            assert (status, answer) == (403, {"error": error}), name
            assert response.getheader("X-Frame-Options") == "DENY"
            assert response.getheader("Content-Security-Policy") == "frame-ancestors 'none'"
            assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert not page.changed(), name
        # The page's own origin is answered.
        status, _, _ = page.ask("POST", page.post_path, [("Origin", f"http://{page.host}")], page.body)
        assert status == 200 and page.changed(), name


def test_both_pages_take_a_json_body_up_to_its_limit_and_refuse_one_byte_more(pages):
    assert page_server.MAX_JSON_BYTES == 1024
    for name, page in pages.items():
        over = page.body + b" " * (page_server.MAX_JSON_BYTES + 1 - len(page.body))
        status, _, answer = page.ask("POST", page.post_path, body=over)
        assert (status, answer) == (413, {"error": "body larger than 1024 bytes"}), name
        assert not page.changed(), name
        status, _, answer = page.ask("POST", page.post_path, body=over[:-1])
        assert status == 200 and page.changed(), (name, answer)


def test_each_route_answers_its_own_method_and_row_numbers_of_nine_digits_at_most(pages):
    cases = {
        "listen": [("GET", "/api/mark/0", 405, "GET /api/mark/0: only POST"),
                   ("GET", "/api/save/0", 405, "GET /api/save/0: only POST"),
                   ("POST", "/api/session", 405, "POST /api/session: only GET"),
                   ("POST", "/recorded/0.wav", 405, "POST /recorded/0.wav: only GET"),
                   ("POST", "/", 405, "POST /: only GET"),
                   ("GET", "/audio/123456789.wav", 404, "no sentence 123456789"),
                   ("GET", "/audio/1234567890.wav", 404, "not found"),
                   ("POST", "/api/mark/" + "7" * 5000, 404, "not found"),
                   ("GET", "/api/session/", 404, "not found")],
        "compare": [("GET", f"/api/choose/{LISTENER}/0", 405, f"GET /api/choose/{LISTENER}/0: only POST"),
                    ("POST", "/api/state", 405, "POST /api/state: only GET"),
                    ("POST", f"/audio/{LISTENER}/0/B", 405, f"POST /audio/{LISTENER}/0/B: only GET"),
                    ("POST", "/", 405, "POST /: only GET"),
                    ("GET", f"/audio/{LISTENER}/123456789/A", 404, "no pair 123456789"),
                    ("GET", f"/audio/{LISTENER}/1234567890/A", 404, "not found"),
                    ("GET", f"/audio/{LISTENER}/0/C", 404, "not found"),
                    ("GET", "/api/session", 404, "not found")],
    }
    for name, page in pages.items():
        for method, path, status, error in cases[name]:
            got, response, answer = page.ask(method, path)
            assert (got, answer) == (status, {"error": error}), (name, method, path[:40])
            assert response.getheader("Allow") == ("GET, POST" if status == 405 else None)
        # A path of thousands of digits that only the other method routes is that method's.
        status, _, answer = page.ask("GET", page.post_path.rsplit("/", 1)[0] + "/" + "7" * 5000)
        assert status == 405 and answer["error"].endswith(": only POST"), name
    with open(pages["listen"].session.voice_audio(0), "rb") as f:
        assert pages["listen"].ask("GET", "/audio/0.wav")[::2] == (200, f.read())
    with open(pages["compare"].session.audio(LISTENER, 0, "A"), "rb") as f:
        assert pages["compare"].ask("GET", f"/audio/{LISTENER}/0/A")[::2] == (200, f.read())


def test_both_pages_are_served_with_the_head_they_share(pages):
    with open(page_server.HEAD, "rb") as f:
        head = f.read().rstrip(b"\r\n")
    assert b'<meta charset="utf-8">' in head and b"async function api(" in head
    for name, page, title in [("listen", pages["listen"], b"Listening session"),
                              ("compare", pages["compare"], b"Blind comparison")]:
        status, response, body = page.ask("GET", "/")
        assert status == 200 and response.getheader("Content-Type") == "text/html; charset=utf-8"
        assert body.count(head) == 1 and page_server.HEAD_MARK not in body, name
        assert body.index(b"<head>\n") + len(b"<head>\n") == body.index(head), name
        assert body.index(head) + len(head) + 1 == body.index(b"<title>" + title + b"</title>"), name


def test_the_address_flags_serve_either_page_on_this_machine_unless_allow_remote(tiny_model_dir, tmp_path, capsys):
    for job in (["--listen", str(tmp_path), "--model", tiny_model_dir], ["--compare", str(tmp_path)]):
        args = tf.parse_args(job)
        assert (args.host, args.port, args.allow_remote, args.allowed_host) == ("127.0.0.1", 8000, False, []), job
        with pytest.raises(SystemExit):
            tf.parse_args(job + ["--host", "0.0.0.0"])
        assert "--host 0.0.0.0 would let other machines write into --feedback_dir: add --allow_remote" in \
            capsys.readouterr().err
        args = tf.parse_args(job + ["--host", "0.0.0.0", "--port", "0", "--allow_remote",
                                    "--allowed_host", "Voice.LAN.", "--allowed_host", "b"])
        assert (args.host, args.port, args.allow_remote, args.allowed_host) == ("0.0.0.0", 0, True, ["voice.lan", "b"])


def test_ctrl_c_stops_the_server_and_frees_its_port(pages, capsys, monkeypatch):
    server = page_server.make_server(listening.Handler, pages["listen"].session, "127.0.0.1", 0)
    port = server.server_address[1]

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "serve_forever", interrupted)
    try:
        page_server.serve_until_interrupted(server)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C reached the caller: a traceback instead of the lines saying what to run next")
    assert capsys.readouterr().out == f"open http://127.0.0.1:{port}/ in a browser (Ctrl-C to stop)\n"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_page_served_on_an_ipv6_address_is_announced_in_brackets(pages):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as err:
        pytest.skip(f"no IPv6 loopback on this machine ({err})")
    server = page_server.make_server(blind_compare.Handler, pages["compare"].session, "::1", 0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert server.url == f"http://[::1]:{port}/"
        status, _, state = raw_request(port, "GET", "/api/state", [("Host", f"[::1]:{port}")], address="::1")
        assert status == 200 and state["total"] == 2
    finally:
        server.shutdown()
        server.server_close()


def test_a_port_in_use_ends_in_one_line_naming_it_before_any_sentence_is_spoken(tiny_model_dir, tmp_path, capsys):
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    said = (f"error: cannot serve the page on 127.0.0.1:{port} ({os.strerror(errno.EADDRINUSE)}): give another "
            "--port, or --port 0 for any free one\n")
    try:
        with pytest.raises(run_errors.TrainingError) as refused:
            page_server.make_server(blind_compare.Handler, None, "127.0.0.1", port)
        assert f"error: {refused.value}\n" == said
        sentences = tmp_path / "sentences.txt"
        sentences.write_text("Roj baş.\n", encoding="utf-8")
        kit = tmp_path / "kit"
        assert tf.main(["--listen", str(sentences), "--model", tiny_model_dir, "--output_dir", str(kit),
                        "--port", str(port), "--device", "cpu"]) == 2
    finally:
        busy.close()
    assert capsys.readouterr().err == said  # one line, no traceback
    assert not kit.exists()  # refused before the voice spoke the kit


def test_a_browser_that_leaves_mid_answer_prints_nothing(pages, capsys, monkeypatch):
    """Closing the page while audio is being sent breaks the connection: the server carries on, silent."""
    page = pages["listen"]
    speech.write_wav(page.session.voice_audio(0), np.zeros(8_000_000, np.float32), 16000)  # 16 MB: never buffered
    done, errors = threading.Event(), []
    handle_error, shutdown_request = page.server.handle_error, page.server.shutdown_request

    def recorded(request, address):
        errors.append(sys.exc_info()[1])
        handle_error(request, address)

    monkeypatch.setattr(page.server, "handle_error", recorded)
    monkeypatch.setattr(page.server, "shutdown_request", lambda request: shutdown_request(request) or done.set())
    with socket.create_connection(("127.0.0.1", page.port), timeout=30) as sock:
        sock.sendall(f"GET /audio/0.wav HTTP/1.1\r\nHost: {page.host}\r\n\r\n".encode())
        sock.recv(1024)  # the answer has begun
    assert done.wait(30)
    assert len(errors) == 1 and isinstance(errors[0], ConnectionError)  # the write did break
    assert capsys.readouterr().err == ""
    assert page.ask("GET", "/api/session")[0] == 200  # and the page is still served
