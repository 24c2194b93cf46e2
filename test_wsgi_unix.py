"""Tests for wsgi_unix.py: real server processes, real sockets, real HTTP.

    python3 -m unittest -v test_wsgi_unix

Each test names the promise it checks.  Servers run as subprocesses in a temporary directory;
tests wait on conditions with deadlines (the readiness line, a connect), never on sleeps.
"""

import contextlib
import errno
import grp
import http.client
import io
import json
import os
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "wsgi_unix.py")
sys.path.insert(0, HERE)
import wsgi_unix  # noqa: E402

DEADLINE = 10.0  # seconds any single wait may take before the test fails
# Who may connect to a socket file the tests make, as the readiness line says it.
MODE_600_OURS = " (mode 600, owner %s, group %s)" % (pwd.getpwuid(os.getuid()).pw_name,
                                                      grp.getgrgid(os.getgid()).gr_name)

# The WSGI apps the tests serve, written next to each server as testapp.py.
TEST_APP = r'''
import io, json, os, sys, threading, time

barrier = None
inflight, peak, counting = 0, 0, threading.Lock()  # app calls at once, and the most seen
seen = set()  # the inodes of client sockets
kept = []  # what /grow keeps


def first_then_hang():
    yield b"first"
    time.sleep(3600)
    yield b"never"


class NoRead(io.FileIO):
    """A file that may be sent (sendfile) but not read: proof that nobody copied it."""

    def read(self, *args):
        raise AssertionError("read() called: the file was copied, not sent")

    readinto = read


class Closing:
    """A response iterable whose close() leaves a mark in a file."""

    def __init__(self, marker, size):
        self.marker, self.size = marker, size

    def __iter__(self):
        for _ in range(self.size // 65536):
            yield b"x" * 65536

    def close(self):
        with open(self.marker, "w") as f:
            f.write("closed")


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path in ("/slow", "/forever"):
        print("app: %s started" % path, file=environ["wsgi.errors"], flush=True)
    if path.startswith("/env"):
        body = json.dumps({k: v for k, v in environ.items()
                           if isinstance(v, (str, bool, int, tuple))})
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/slow":
        time.sleep(float(environ["QUERY_STRING"] or 1))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slow done\n"]
    if path == "/forever":
        threading.Event().wait()
    if path == "/barrier":
        global barrier
        if barrier is None:
            barrier = threading.Barrier(int(environ["QUERY_STRING"]))
        barrier.wait(timeout=10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"together\n"]
    if path == "/error":
        raise RuntimeError("boom")
    if path == "/error-after-headers":
        start_response("200 OK", [("Content-Length", "100")])

        def body():
            yield b"x" * 10
            raise RuntimeError("late boom")
        return body()
    if path == "/not-iterable":
        start_response("200 OK", [])
        return None
    if path == "/bad-status":
        start_response("OK", [])
        return [b""]
    if path == "/wide-status":
        start_response("200 \u0100K", [])
        return [b""]
    if path == "/bad-header":
        start_response("200 OK", [("X-A", "1\r\nSet-Cookie: evil=1")])
        return [b""]
    if path == "/closing":
        marker, size = environ["QUERY_STRING"].split(",")
        start_response("200 OK", [("Content-Length", size)])
        return Closing(marker, int(size))
    if path == "/input":
        stream = environ["wsgi.input"]
        first = stream.readline()
        rest = stream.read()
        body = json.dumps({"first": first.decode("latin-1"), "rest": rest.decode("latin-1"),
                           "terminated": environ["wsgi.input_terminated"],
                           "after": stream.read().decode("latin-1")})
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]
    if path == "/osenv":
        body = json.dumps(sorted(os.environ))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]
    if path == "/big":
        size = int(environ["QUERY_STRING"])
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size))])
        return (bytes([i % 251]) * 65536 for i in range(size // 65536))
    if path == "/count":
        stream, count = environ["wsgi.input"], 0
        while True:
            chunk = stream.read(8192)
            if not chunk:
                break
            count += len(chunk)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % count]
    if path == "/stream-echo":
        stream, chunks = environ["wsgi.input"], []
        while True:
            chunk = stream.read(8192)
            if not chunk:
                break
            chunks.append(chunk)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [b"".join(chunks)]
    if path == "/file":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](NoRead(environ["QUERY_STRING"]))
    if path == "/pipe":
        r, w = os.pipe()
        os.write(w, b"through a pipe\n")
        os.close(w)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](os.fdopen(r, "rb"))
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written, ")
        return [b"then returned\n"]
    if path == "/exc-info":
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("changed my mind")
        except ValueError:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")],
                           sys.exc_info())
        return [b"sorry\n"]
    if path == "/counted":
        global inflight, peak
        with counting:
            inflight += 1
            peak = max(peak, inflight)
        try:
            time.sleep(float(environ["QUERY_STRING"] or 0.01))
        finally:
            with counting:
                inflight -= 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"counted\n"]
    if path == "/count-connections":  # how many connections requests came on
        seen.add(os.fstat(environ["wsgi_unix.socket"].fileno()).st_ino)  # one per socket
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % len(seen)]
    if path == "/pid":  # which process served it (workers)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % os.getpid()]
    if path == "/peak":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d" % peak]
    if path == "/stream":  # no Content-Length, a generator: the server must frame it
        size = int(environ["QUERY_STRING"] or 10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"s" * min(8192, size - at) for at in range(0, size, 8192))
    if path == "/stream-error":  # no Content-Length, and the app fails after its head
        start_response("200 OK", [("Content-Type", "text/plain")])

        def failing():
            yield b"x" * int(environ["QUERY_STRING"] or 10)
            raise RuntimeError("late boom")
        return failing()
    if path == "/overrun":  # says 5 bytes, gives 10 (or says 0)
        start_response("200 OK", [("Content-Length", environ["QUERY_STRING"] or "5")])
        return iter([b"12345", b"67890"])
    if path == "/early-hints":  # a 1xx is no final answer
        start_response("103 Early Hints", [("Link", "</style.css>; rel=preload")])
        return [b""]
    if path == "/two-lengths":
        start_response("200 OK", [("Content-Length", "5"), ("Content-Length", environ["QUERY_STRING"])])
        return [b"12345"]
    if path == "/drip":  # HTTP/1.0 streaming: many small blocks, no Content-Length
        count = int(environ["QUERY_STRING"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"d" for _ in range(count))
    if path == "/short":  # says 100 bytes, gives 10, and no error
        start_response("200 OK", [("Content-Length", "100")])
        return iter([b"x" * 10])
    if path == "/no-content":
        start_response("204 No Content", [])
        return iter([b"ignored"])
    if path == "/not-modified":
        start_response("304 Not Modified", [("ETag", '"1"')])
        return iter([b"ignored"])
    if path == "/grow":  # keeps 20 MB more on each request (a leak); says its pid and RSS
        kept.append(b"g" * (20 << 20))
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d %d" % (os.getpid(), resident)]
    if path == "/hang":  # an app stuck on a dead database; ?head: after its response's head
        if environ["QUERY_STRING"] == "head":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return first_then_hang()
        time.sleep(float(environ["QUERY_STRING"] or 3600))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"late\n"]
    if path == "/":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello\n"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]
'''


FLASK_APP = r'''
from flask import Flask, Response, jsonify, redirect, request

app = Flask(__name__)


@app.route("/hello/<name>")
def hello(name):
    return "hello, " + name


@app.route("/echo", methods=["POST"])
def echo():
    return jsonify(json=request.get_json(), remote=request.remote_addr, scheme=request.scheme)


@app.route("/old")
def old():
    return redirect("/hello/moved")


@app.route("/stream")
def stream():
    return Response(str(i) for i in range(10))


@app.route("/boom")
def boom():
    raise RuntimeError("flask boom")
'''

DJANGO_APP = r'''
from django.conf import settings
from django.http import HttpResponse
from django.urls import path

settings.configure(DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, MIDDLEWARE=[],
                   SECRET_KEY="test-only")


def hello(request, name):
    return HttpResponse("hello, " + name)


def upload(request):
    return HttpResponse(f"{len(request.body)} bytes")


urlpatterns = [path("hello/<name>/", hello), path("upload/", upload)]

from django.core.wsgi import get_wsgi_application  # noqa: E402 -- after settings

application = get_wsgi_application()
'''


def connect(address, timeout=DEADLINE):
    """The tests' one way to connect: a socket connected to ``address`` (a Unix socket's
    path, or a (host, port) tuple), with ``timeout`` on each of its operations."""
    family = socket.AF_UNIX
    if isinstance(address, tuple):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def unix_connection(path, timeout=DEADLINE):
    """An http.client connection over a connected AF_UNIX socket."""
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    conn.sock = connect(path, timeout)
    return conn


def exchange(conn, method, url, body=None, headers=None):
    """One request on the http.client connection ``conn``; returns (status, response, body)."""
    try:
        conn.request(method, url, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def get(path, url="/", method="GET", body=None, headers=None, timeout=DEADLINE):
    """One request over the socket at ``path``; returns (status, response, body)."""
    return exchange(unix_connection(path, timeout), method, url, body, headers)


def raw_request(path, data, timeout=DEADLINE):
    """Send raw bytes, return everything the server answers until it closes."""
    with connect(path, timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def read_text(path):
    with open(path) as f:
        return f.read()


def status_of(response_bytes):
    return int(response_bytes.split(b" ", 2)[1])


def wait_for(condition, what, deadline=DEADLINE):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        result = condition()
        if result:
            return result
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def connectable_tcp(port):
    return connectable(("127.0.0.1", port))


def run_together(function, count):
    """Run ``function`` in ``count`` threads at once, and wait for them all."""
    threads = [threading.Thread(target=function) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)


@contextlib.contextmanager
def steady_load(request, clients=4, pause=0.0):
    """While the block runs, ``clients`` threads call ``request()`` (it returns a status) in a
    loop, ``pause`` seconds apart; yields the lists (done, errors) they fill."""
    done, errors, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                status = request()
                (done if status == 200 else errors).append(status)
            except (OSError, EOFError, http.client.HTTPException) as exc:
                errors.append(repr(exc))
            stop.wait(pause)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield done, errors
    finally:
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)


def connectable(path):
    try:
        connect(path).close()
        return True
    except OSError:
        return False


class Server:
    """A wsgi_unix.py process; its stderr is collected line by line."""

    def __init__(self, command, cwd, env=None, pass_fds=(), preexec_fn=None):
        self.lines = []
        self._new_line = threading.Condition()
        self.proc = subprocess.Popen(
            command, cwd=cwd, env=env, pass_fds=pass_fds,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=preexec_fn)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self._new_line:
                self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self.lines.append(None)  # end of output
            self._new_line.notify_all()

    def wait_line(self, text, deadline=DEADLINE):
        """Wait for a stderr line containing ``text``; return it (or fail with the log)."""
        end = time.monotonic() + deadline
        with self._new_line:
            while True:
                for line in self.lines:
                    if line is not None and text in line:
                        return line
                if None in self.lines or time.monotonic() > end:
                    raise AssertionError(f"no line with {text!r}; stderr was:\n" + self.log())
                self._new_line.wait(0.1)

    def wait_ready(self):
        return self.wait_line("serving on")

    def log(self):
        with self._new_line:
            return "\n".join(line for line in self.lines if line is not None)

    def signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout=DEADLINE):
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(DEADLINE)
        self.proc.stderr.close()


class ServerTestCase(unittest.TestCase):
    """A temporary directory with testapp.py in it, and servers that die with the test."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="wsgi_unix-test-")
        os.chmod(self.dir, 0o755)  # other users (the tests' "nobody") may reach sockets here
        with open(os.path.join(self.dir, "testapp.py"), "w") as f:
            f.write(TEST_APP)
        self.sock = os.path.join(self.dir, "app.sock")
        self.servers = []

    def tearDown(self):
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, *args, env=None, ready=True, command=None, **kwargs):
        """Start wsgi_unix.py with ``args`` (or run ``command``) and wait for its readiness."""
        if env is None:
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        server = Server(command or [sys.executable, SERVER] + list(args), self.dir, env=env, **kwargs)
        self.servers.append(server)
        if ready:
            server.wait_ready()
        return server

    def start_app(self, *args, **kwargs):
        return self.start("--app", "testapp:app", *(args or (self.sock,)), **kwargs)

    def run_cli(self, *args, env=None, timeout=DEADLINE, **kwargs):
        """Run wsgi_unix.py to completion; return (exit status, stderr lines)."""
        result = subprocess.run([sys.executable, SERVER] + list(args), cwd=self.dir,
                                env=env or {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, timeout=timeout, **kwargs)
        return result.returncode, result.stderr.decode().splitlines()

    def assertOneLineError(self, args, status, fragment, **kwargs):
        code, lines = self.run_cli(*args, **kwargs)
        self.assertEqual(code, status, lines)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(fragment, lines[0])
        self.assertTrue(lines[0].startswith("wsgi_unix: "), lines)
        return lines[0]

    def assert_served_within(self, seconds):
        """A normal request on self.sock gets 200 within ``seconds``."""
        started = time.monotonic()
        self.assertEqual(get(self.sock, timeout=seconds + 3)[0], 200)
        self.assertLess(time.monotonic() - started, seconds)

    def make_stale_socket(self, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.close()  # the file stays; nobody listens on it
        self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode))


def as_nobody():
    os.setgid(65534)
    os.setgroups([])
    os.setuid(65534)


def python_for_nobody():
    """A Python interpreter the unprivileged user may run (pyenv's may sit under /root)."""
    for candidate in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
        try:
            if subprocess.run([candidate, "-c", "pass"], preexec_fn=as_nobody,
                              stderr=subprocess.DEVNULL).returncode == 0:
                return candidate
        except (OSError, TypeError):
            continue
    raise AssertionError("no Python that user nobody may run; install python3 from apt")


# --- Helpers ------------------------------------------------------------------------------

def request_bytes(path="/", method="GET", headers=(), body=b"", close=True):
    """An HTTP/1.1 request; with ``close``, one that asks the server to close after it."""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"] + list(headers)
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def split_response(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    return status_of(answer), head.decode("latin-1"), body


def process_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def process_threads(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])


def process_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_idle(path, count):
    sockets = []
    for _ in range(count):
        sockets.append(connect(path))
    return sockets


def process_alive(pid):
    """True while ``pid`` runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def readme_block(language, containing):
    """The README's code block in ``language`` that contains ``containing``."""
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    blocks = text.split(f"```{language}\n")[1:]
    found = [block.split("```", 1)[0] for block in blocks if containing in block]
    if len(found) != 1:
        raise AssertionError(f"README has {len(found)} {language} blocks with {containing!r}")
    return found[0]


def readme_site(sock, port, static):
    """The README's nginx site, for a socket at ``sock``, on 127.0.0.1:``port``."""
    site = readme_block("nginx", "proxy_http_version")
    for text, replacement in (("/run/app/app.sock", sock), ("listen 80;", f"listen 127.0.0.1:{port};"),
                              ("listen [::]:80;", ""), ("/opt/app/static/", static + "/")):
        if text not in site:
            raise AssertionError(f"the README's site has no {text!r}")
        site = site.replace(text, replacement)
    return site


def require_tool(test, name):
    """Skip without ``name`` -- but fail in CI, which must have installed it."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            test.fail(f"{name} is missing; .ci/run should have installed it")
        test.skipTest(f"{name} is not installed")
    return path


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NginxCase(ServerTestCase):
    """Real nginx in front, configured with the README's own snippet."""

    server_args = ()  # added to the README's command line

    def setUp(self):
        super().setUp()
        nginx = require_tool(self, "nginx")
        self.port = free_port()
        prefix = os.path.join(self.dir, "nginx")
        os.mkdir(prefix)
        for temp in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.mkdir(os.path.join(prefix, temp))
            shutil.chown(os.path.join(prefix, temp), "www-data")
        snippet = readme_site(self.sock, self.port, self.dir)
        # A cache in front, for requests that ask for it (X-Test-Cache: 1), to see that a
        # truncated response is never taken for a whole one; and a location rule.
        snippet = snippet.replace("location / {", "location /admin { return 403; }\n"
                                  "    location / {\n        proxy_cache test;\n"
                                  "        proxy_cache_valid 200 1m;\n"
                                  "        proxy_cache_bypass $no_cache;\n"
                                  "        proxy_no_cache $no_cache;\n"
                                  "        add_header X-Cache $upstream_cache_status;")
        config = os.path.join(prefix, "nginx.conf")
        with open(config, "w") as f:
            f.write(f"""
user www-data;
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    proxy_cache_path {prefix}/cache keys_zone=test:1m;
    map $http_x_test_cache $no_cache {{ default 1; "1" 0; }}
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{snippet}
}}
""")
        self.error_log = os.path.join(prefix, "error.log")
        self.nginx = subprocess.Popen([nginx, "-p", prefix, "-c", config, "-e", self.error_log],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(self.stop_nginx)
        wait_for(lambda: self.nginx.poll() is not None or self.port_open(), "nginx to listen")
        self.assertIsNone(self.nginx.poll(), self.nginx.stderr.read())
        # The README's command line, with the test's app and socket.
        self.server = self.start("--mode", "660", "--group", "www-data", "--proxy-headers",
                                 *self.server_args, "--app", "testapp:app", self.sock)

    def port_open(self):
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop_nginx(self):
        self.nginx.terminate()
        self.nginx.wait(DEADLINE)
        self.nginx.stderr.close()

    def fetch(self, method, url, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE)
        return exchange(conn, method, url, body, headers)


def read_all(data, step=None, max_body=1 << 30):
    """Feed ``data`` to a request reader whole, or ``step`` bytes at a time; return the whole
    requests as (method, path, query, version, keep_alive, body), and the bytes left over."""
    reader = wsgi_unix._RequestReader(max_body, wsgi_unix._BodySink)
    requests = []
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        reader.receive(piece)
        while True:
            event = reader.next_event()
            if event is None:
                break
            kind, request = event
            if kind == "request":
                requests.append((request.method, request.path, request.query, request.version,
                                 request.keep_alive, request.body.read()))
    return requests, bytes(reader.buffer)


def refusal(data, step=None, max_body=1 << 30):
    """The status a request reader refuses ``data`` with, or None."""
    try:
        read_all(data, step, max_body)
    except wsgi_unix._HTTPError as error:
        return error.status
    return None


CHUNKED = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


def get11(path=b"/", *headers):
    return b"\r\n".join([b"GET %s HTTP/1.1" % path, b"Host: a"] + list(headers)) + b"\r\n\r\n"


def drawn_moves(text):
    """The moves a drawing shows, in lines such as ``serving -> idle | head | closed``."""
    moves = {}
    for line in text.splitlines():
        match = re.match(r"\s*(?:a connection.*:)?\s*([a-z]+)\s+->\s+([a-z |]+?)\s*(?:\(.*)?$", line)
        if match and match.group(1) in wsgi_unix._MOVES:
            moves[match.group(1)] = {state.strip() for state in match.group(2).split("|")}
    return moves


class Responses:
    """Read HTTP responses one after another from a socket (keep-alive, pipelining)."""

    def __init__(self, sock):
        self.sock, self.buffer = sock, b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.buffer += data

    def _until(self, marker):
        while marker not in self.buffer:
            self._fill()
        part, _, self.buffer = self.buffer.partition(marker)
        return part

    def _take(self, count):
        while len(self.buffer) < count:
            self._fill()
        part, self.buffer = self.buffer[:count], self.buffer[count:]
        return part

    def next(self, method="GET"):
        """(version, status, headers with lower-case names, body) of the next response."""
        status_line, *lines = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        version, status = status_line.split(" ")[0], int(status_line.split(" ")[1])
        headers = dict((name.lower(), value) for name, value in
                       (line.split(": ", 1) for line in lines))
        if method == "HEAD" or status < 200 or status in (204, 304):
            body = b""
        elif "content-length" in headers:
            body = self._take(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self._until(b"\r\n"), 16)
                if not size:
                    self._until(b"\r\n")
                    break
                body += self._take(size)
                assert self._take(2) == b"\r\n"
        else:
            body = self.rest()
        return version, status, headers, body

    def rest(self):
        """Everything until the server closes."""
        while True:
            try:
                self._fill()
            except EOFError:
                part, self.buffer = self.buffer, b""
                return part

    def closed(self):
        """True once the server has closed (fails if it sends more, or not within DEADLINE)."""
        return self.rest() == b""


def children(pid):
    """The pids of ``pid``'s children that still run (from /proc)."""
    found = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.update(int(child) for child in f.read().split())
    except OSError:
        pass
    return {child for child in found if process_alive(child)}


def worker_pids(line):
    """The pids a readiness line ("... with 2 workers (pids 12 13)") names."""
    return {int(pid) for pid in line.rsplit("(pids ", 1)[1].rstrip(")").split()}


# --- The file itself: its map, and each section using only those above it -----------------

class FileLayoutUnitTests(unittest.TestCase):
    """The map at the top of wsgi_unix.py is true: its sections, in the order they depend."""

    def sections(self):
        with open(SERVER) as f:
            text = f.read()
        headers = [(number + 1, int(match.group(1)), match.group(2))
                   for number, line in enumerate(text.splitlines())
                   for match in [re.match(r"# --- §(\d+) (.*?) -+$", line)] if match]
        return text, headers

    def test_no_section_uses_a_name_defined_in_a_later_one(self):
        import ast
        text, headers = self.sections()
        tree = ast.parse(text)

        def section(line):
            return max([number for start, number, _ in headers if start <= line], default=0)
        defined = {}
        for node in tree.body:
            targets = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                       [name.id for target in getattr(node, "targets", ())
                        for name in ast.walk(target) if isinstance(name, ast.Name)])
            for name in targets:
                defined.setdefault(name, section(node.lineno))
        later = sorted({(section(node.lineno), used.id, defined[used.id])
                        for node in tree.body for used in ast.walk(node)
                        if isinstance(used, ast.Name) and used.id in defined
                        and defined[used.id] > section(node.lineno)})
        self.assertEqual(later, [], "(section, name, the later section that defines it)")

    def test_the_map_names_every_section_in_order(self):
        text, headers = self.sections()
        self.assertEqual([number for _, number, _ in headers], list(range(1, len(headers) + 1)))
        mapped = re.findall(r"^  §(\d+) ", wsgi_unix.__doc__, re.M)
        self.assertEqual([int(number) for number in mapped], list(range(1, len(headers) + 1)))


# --- §1 Settings and errors: the settings table, the log writer ---------------------------

class SettingsUnitTests(unittest.TestCase):
    """_checked(), which serve(), make_server() and WSGIServer share: no socket."""

    def test_each_bad_value_is_refused_naming_its_keyword(self):
        for keywords, error, naming in [
                ({"workers": 0}, ValueError, "workers=0"),
                ({"max_requests": 0}, ValueError, "max_requests=0: must be above 0"),
                ({"max_requests": 1.5}, TypeError, "max_requests must be a number"),
                ({"max_requests_jitter": -1}, ValueError, "max_requests_jitter"),
                ({"max_requests_jitter": 5}, ValueError, "goes with max_requests"),
                ({"max_worker_memory": 0}, ValueError, "max_worker_memory"),
                ({"max_worker_memory": "1G"}, TypeError, "max_worker_memory"),
                ({"request_timeout": 0}, ValueError, "request_timeout=0"),
                ({"request_timeout": float("inf")}, ValueError, "request_timeout"),
                ({"request_timeout": True}, TypeError, "request_timeout")]:
            with self.subTest(keywords=keywords):
                with self.assertRaises(error) as caught:
                    wsgi_unix._checked(dict(wsgi_unix.DEFAULTS, **keywords))
                self.assertIn(naming, str(caught.exception))
        fine = dict(wsgi_unix.DEFAULTS, max_requests=1000, max_requests_jitter=50,
                    max_worker_memory=1 << 29, request_timeout=30)
        self.assertIs(wsgi_unix._checked(fine), fine)

    def test_recycling_keywords_are_serves_not_a_servers(self):
        for name in wsgi_unix._RECYCLING:
            with self.subTest(name=name):
                with self.assertRaisesRegex(TypeError, f"{name} is serve"):
                    wsgi_unix.WSGIServer("unused.sock", **{name: 5})


class CommandLineUnitTests(unittest.TestCase):
    """The command line read into settings, from the settings table: no process."""

    def parse(self, *argv):
        return wsgi_unix._parse_command_line(list(argv) + ["app.sock"])

    def refused(self, *argv):
        with contextlib.redirect_stderr(io.StringIO()) as said:
            with self.assertRaises(SystemExit) as caught:
                self.parse(*argv)
        self.assertEqual(caught.exception.code, 2)
        return said.getvalue()

    def test_what_each_option_becomes(self):
        # argv -> (server settings that differ from DEFAULTS, command app settings that
        # differ from COMMAND_DEFAULTS); a command's --max-body (1M) bounds the request body
        for argv, server, app in [
                ((), {}, {}),
                (("--keep-alive", "0"), {"keep_alive": 0.0}, {}),
                (("--group", "www-data"), {"group": "www-data", "mode": 0o660}, {}),
                (("--mode", "640", "--group", "1"), {"group": "1", "mode": 0o640}, {}),
                (("--threads", "3", "--max-body", "64K"), {"threads": 3, "max_request_body": 65536},
                 {"max_procs": 3, "max_body": 65536}),
                (("--pass-env", "A,B", "--pass-env", "C"), {}, {"pass_env": ["A", "B", "C"]}),
                (("--workers", "1", "--max-requests", "100", "--max-requests-jitter", "10"),
                 {"max_requests": 100, "max_requests_jitter": 10}, {}),
                (("--max-worker-memory", "500M", "--workers", "2"),
                 {"workers": 2, "max_worker_memory": 500 << 20}, {}),
                (("--allow-uid", "0,www-data", "--script-name", "/app"),
                 {"allow_uids": ["0", "www-data"], "script_name": "/app"}, {})]:
            with self.subTest(argv=argv):
                _, _, got, got_app = self.parse(*argv)
                self.assertEqual(got, {**wsgi_unix.DEFAULTS, "max_request_body": 1 << 20, **server})
                self.assertEqual(got_app, {**wsgi_unix.COMMAND_DEFAULTS, "pass_env": [], **app})

    def test_bad_values_and_combinations_are_one_usage_line(self):
        for argv, fragment in [
                (("--threads", "0"), "'0' is not a number from 1 up"),
                (("--timeout", "nan"), "'nan' is not a positive number"),
                (("--max-spool", "lots"), "'lots' is not a size like 65536, 64K or 16M"),
                (("--mode", "999"), "not an octal mode"),
                (("--script-name", "app/"), "should look like /prefix"),
                (("--methods", "GET,P OST"), "not a list like GET,HEAD,POST"),
                (("--forwarded-allow-ips", "10.0.0.0/8", "--proxy-headers"), "not an IP address"),
                (("--request-timeout", "5"), "needs --workers N"),
                (("--app", "x:y", "--cgi"), "--cgi is for the command app"),
                (("--forwarded-allow-ips", "10.0.0.1"), "goes with --proxy-headers")]:
            with self.subTest(argv=argv):
                said = self.refused(*argv)
                self.assertIn(fragment, said)
                self.assertEqual(said.count("\n"), 1, said)


class FaultTests(ServerTestCase):
    """A log that cannot be written (a dead log pipe, a full disk) costs no request and no
    thread: the line is dropped and counted; a full spool disk is a 503."""

    def small_tmpfs(self):
        spool = os.path.join(self.dir, "spool")
        os.mkdir(spool)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", spool],
                                 stderr=subprocess.DEVNULL).returncode == 0
        if not mounted:
            if os.environ.get("CI"):
                self.fail("cannot mount a tmpfs (CI runs as root)")
            self.skipTest("mounting a tmpfs needs root")
        self.addCleanup(subprocess.run, ["umount", "-l", spool])
        return spool

    def start_logging_to(self, stderr, *args):
        proc = subprocess.Popen([sys.executable, SERVER, *args, "--app", "testapp:app", self.sock],
                                cwd=self.dir, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        self.addCleanup(proc.wait)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc

    def assert_still_serves(self, proc, threads):
        # Requests that log (the access log, a refusal, an app's traceback), more of each than
        # there are threads: the old server lost a thread to each line it could not write.
        for _ in range(3 * threads):
            self.assertEqual(get(self.sock, timeout=5)[0], 200)
            self.assertEqual(status_of(raw_request(self.sock, b"NONSENSE\r\n\r\n", timeout=5)), 400)
            self.assertEqual(get(self.sock, "/error", timeout=5)[0], 500)
        self.assertEqual(process_threads(proc.pid), threads + 1)
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(DEADLINE), 0)

    def test_a_dead_log_pipe(self):
        reader, writer = os.pipe()
        proc = self.start_logging_to(writer, "--threads", "2")
        os.close(writer)
        with os.fdopen(reader, "rb") as log:
            self.assertIn(b"serving on", log.readline())
        # The reader is gone (a log shipper that died): every write now fails with EPIPE.
        self.assert_still_serves(proc, 2)

    def test_a_full_disk(self):
        with open("/dev/full", "w") as full:  # every write: ENOSPC
            proc = self.start_logging_to(full, "--threads", "2")
        wait_for(lambda: connectable(self.sock), "the server to listen")
        self.assert_still_serves(proc, 2)

    def test_a_spool_disk_that_fills_mid_body_gets_503_and_frees_everything(self):
        spool = self.small_tmpfs()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": spool}
        server = self.start_app("--threads", "2", "--timeout", "3", "--keep-alive", "3",
                                self.sock, env=env)
        pid = server.proc.pid
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
        answers = []

        def upload():  # in 3,000-byte writes, as a slow client or nginx's buffers send it
            with connect(self.sock) as sock:
                sock.sendall(request_bytes("/count", "POST", ["Content-Length: 900000"]))
                try:
                    for _ in range(300):
                        sock.sendall(b"x" * 3000)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # it answered, and stopped reading
                answers.append(Responses(sock).next()[1])
        run_together(upload, 4)  # the four fill the disk, each with a piece in its last write
        self.assertIn(503, answers)
        self.assertEqual(set(answers) - {200, 503}, set())
        self.assertEqual(get(self.sock)[0], 200)
        wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) == descriptors, "every slot freed")
        self.assertEqual(os.statvfs(spool).f_bfree, os.statvfs(spool).f_blocks)  # files gone
        self.assertEqual(server.log().count("Traceback"), 0, server.log())
        # The timeouts of the others still run: a silent client gets its 408.
        with connect(self.sock) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n")
            self.assertEqual(Responses(sock).next()[1], 408)

    def test_a_body_whose_last_piece_meets_a_full_disk_gets_503(self):
        # The spool file was buffered: a last piece that fit in its buffer was written when the
        # body was complete, outside the error path; the connection was left unanswered and
        # its slot taken for good.
        spool = self.small_tmpfs()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": spool}
        server = self.start_app("--threads", "2", "--max-spool", "1M", self.sock, env=env)
        pid = server.proc.pid
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/count", "POST", ["Content-Length: 605000"]))
            sock.sendall(b"x" * 600000)  # spooled: over 512 KiB
            wait_for(lambda: os.statvfs(spool).f_bfree < os.statvfs(spool).f_blocks - 100,
                     "the body to be spooled")
            with open(os.path.join(spool, "filler"), "wb", buffering=0) as filler:
                with contextlib.suppress(OSError):  # the disk fills
                    while True:
                        filler.write(b"f" * 4096)
            sock.sendall(b"x" * 5000)  # the last piece: new pages, less than a buffer
            self.assertEqual(Responses(sock).next()[1], 503)
        wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) == descriptors, "the slot freed")
        os.unlink(os.path.join(spool, "filler"))
        self.assertEqual(get(self.sock)[0], 200)
        self.assertEqual(server.log().count("Traceback"), 0, server.log())

    def test_spooled_bodies_have_a_budget_that_is_given_back(self):
        # 8 clients holding 9.4 MB each kept a 64 MiB temporary directory full.
        self.start_app("--max-spool", "1M", self.sock)
        holder = connect(self.sock)
        holder.sendall(request_bytes("/count", "POST", ["Content-Length: 2000000"]))
        holder.sendall(b"h" * 800000)  # spooled: 800,000 of the budget's 1,048,576
        body = b"b" * 600000
        wait_for(lambda: get(self.sock, "/count", "POST", body)[0] == 503, "the budget to be full")
        holder.close()  # its bytes go back
        wait_for(lambda: get(self.sock, "/count", "POST", body)[0] == 200, "the budget to be free")
        for _ in range(3):  # and each finished body gives back what it took (just after its
            # response went out: the next may come a moment too early)
            wait_for(lambda: get(self.sock, "/count", "POST", body)[::2] == (200, b"600000"),
                     "the budget to be given back")

    def test_lines_that_could_not_be_written_are_counted_and_said_once(self):
        class Flaky(io.StringIO):
            failures = 3

            def write(self, text):
                if self.failures:
                    self.failures -= 1
                    raise OSError(errno.ENOSPC, "No space left on device")
                return super().write(text)
        stream = Flaky()
        for number in range(5):
            wsgi_unix._log_write(stream, f"line {number}\n")  # never raises
        self.assertEqual(stream.getvalue().splitlines(), [
            "wsgi_unix: 3 log line(s) could not be written (No space left on device) and were "
            "dropped", "line 3", "line 4"])


# --- §2 Addresses and the socket file -----------------------------------------------------

class AddressTests(unittest.TestCase):
    def test_address_forms_are_parsed_as_documented(self):
        cases = {
            "/run/app.sock": ("unix", "/run/app.sock"),
            "unix:/run/app.sock": ("unix", "/run/app.sock"),
            "app.sock": ("unix", os.path.abspath("app.sock")),
            "./app.sock": ("unix", os.path.abspath("app.sock")),
            "unix:weird:name": ("unix", os.path.abspath("weird:name")),
            "unix:@app": ("abstract", "@app"),
        }
        for text, (kind, path) in cases.items():
            address = wsgi_unix.ListenAddress(text)
            self.assertEqual((address.kind, address.path), (kind, path), text)
        tcp = {"127.0.0.1:8000": ("127.0.0.1", 8000), "[::1]:8000": ("::1", 8000),
               "localhost:8000": ("localhost", 8000), "0.0.0.0:0": ("0.0.0.0", 0)}
        for text, (host, port) in tcp.items():
            address = wsgi_unix.ListenAddress(text)
            self.assertEqual((address.kind, address.host, address.port), ("tcp", host, port))
            self.assertEqual(str(address), text)
        self.assertEqual(wsgi_unix.ListenAddress("fd:3").fd, 3)

    def test_malformed_addresses_raise_address_error(self):
        for text in ["unix:", "unix:@", "host:", ":8000", ":99999", "fd:x", "fd:", "::1:80",
                     "h:port", "h:-1", "", "a\0b"]:
            with self.assertRaises(wsgi_unix.AddressError, msg=text):
                wsgi_unix.ListenAddress(text)


class CommandLineAddressTests(ServerTestCase):
    def test_malformed_address_is_a_usage_error_with_status_2(self):
        for text in ["unix:", "host:", ":99999", ":8000", "fd:x"]:
            self.assertOneLineError([text], 2, text)

    def test_fd_that_is_not_a_listening_socket_is_a_usage_error(self):
        with open(os.path.join(self.dir, "plain"), "w") as plain:
            self.assertOneLineError([f"fd:{plain.fileno()}"], 2, "not an open socket",
                                    pass_fds=[plain.fileno()])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
            self.assertOneLineError([f"fd:{unbound.fileno()}"], 2, "not a listening stream socket",
                                    pass_fds=[unbound.fileno()])
        self.assertOneLineError(["fd:99"], 2, "fd:99")
        self.assertOneLineError(["fd:99999999999999999999"], 2, "not an open socket")

    def test_serves_on_ipv4_with_the_port_it_was_given(self):
        server = self.start_app("127.0.0.1:0")
        port = int(server.wait_ready().rsplit(":", 1)[1])
        self.assertNotEqual(port, 0)
        answer = raw_request(("127.0.0.1", port), b"GET /env HTTP/1.0\r\n\r\n")
        self.assertEqual(status_of(answer), 200)
        environ = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(environ["REMOTE_ADDR"], "127.0.0.1")
        self.assertEqual(environ["SERVER_NAME"], "127.0.0.1")
        self.assertEqual(environ["SERVER_PORT"], str(port))

    @unittest.skipUnless(socket.has_ipv6, "no IPv6 here")
    def test_short_forms_of_every_interface_are_refused(self):
        for address in ("0:0", "0.0:0", "0x0:0"):
            self.assertOneLineError([address], 2, "means every interface")

    def test_serves_on_ipv6(self):
        server = self.start_app("[::1]:0")
        line = server.wait_ready()
        self.assertIn("[::1]:", line)
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("::1", port), timeout=DEADLINE) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            self.assertTrue(sock.recv(100).startswith(b"HTTP/1.0 200"))

    def test_serves_on_an_inherited_socket_and_leaves_its_file(self):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.sock)
        listener.listen(16)
        with listener:
            server = self.start_app(f"fd:{listener.fileno()}", pass_fds=[listener.fileno()])
            self.assertIn(f"fd:{listener.fileno()}", server.wait_ready())
            self.assertEqual(get(self.sock)[0], 200)
            server.signal(signal.SIGTERM)
            self.assertEqual(server.wait(), 0)
            self.assertTrue(stat.S_ISSOCK(os.lstat(self.sock).st_mode))  # not ours to remove

    def test_mode_and_group_without_a_socket_file_are_usage_errors(self):
        # Silently ignored, they would let a user believe the permissions were set.
        for address in ("127.0.0.1:0", "unix:@wsgi_unix-test", "fd:3"):
            for option in (["--mode", "660"], ["--group", "0"]):
                self.assertOneLineError(option + [address], 2, "--mode and --group")

    def test_a_mode_that_lets_every_user_connect_is_honoured_with_a_warning(self):
        server = self.start_app("--mode", "666", self.sock)
        self.assertIn("every local user", server.wait_line("warning"))
        self.assertEqual(stat.S_IMODE(os.lstat(self.sock).st_mode), 0o666)
        self.assertEqual(get(self.sock)[0], 200)

    def test_abstract_socket_serves_and_warns(self):
        name = f"@wsgi_unix-test-{os.getpid()}-{id(self)}"
        server = self.start_app("unix:" + name)
        warning = server.wait_line("warning")
        self.assertIn("anyone", warning)
        self.assertEqual(get("\0" + name[1:])[0], 200)


class SocketFileTests(ServerTestCase):
    def test_stale_socket_is_removed_and_replaced(self):
        self.make_stale_socket(self.sock)
        self.start_app()
        self.assertEqual(get(self.sock)[0], 200)

    def test_live_server_is_never_displaced(self):
        first = self.start_app()
        before = os.lstat(self.sock)
        self.assertOneLineError(["--app", "testapp:app", self.sock], 1,
                                "is in use by a running server")
        after = os.lstat(self.sock)
        self.assertEqual((before.st_dev, before.st_ino), (after.st_dev, after.st_ino))
        self.assertEqual(get(self.sock)[0], 200)
        self.assertIsNone(first.proc.poll())

    def test_server_with_a_full_backlog_counts_as_live(self):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.sock)
        listener.listen(0)
        clients = []
        try:
            while True:  # fill the backlog of a server that never accepts
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                clients.append(client)
                try:
                    client.connect(self.sock)
                except BlockingIOError:
                    break
            self.assertOneLineError([self.sock], 1, "in use by a running server")
            self.assertTrue(stat.S_ISSOCK(os.lstat(self.sock).st_mode))
        finally:
            for client in clients:
                client.close()
            listener.close()

    def test_regular_file_at_path_is_never_removed(self):
        with open(self.sock, "w") as f:
            f.write("precious data")
        line = self.assertOneLineError([self.sock], 1, "is a regular file, not a socket")
        self.assertIn("refusing to remove it", line)
        with open(self.sock) as f:
            self.assertEqual(f.read(), "precious data")

    def test_directory_at_path_is_never_removed(self):
        os.mkdir(self.sock)
        self.assertOneLineError([self.sock], 1, "is a directory, not a socket")
        self.assertTrue(os.path.isdir(self.sock))

    def test_symlink_at_path_is_never_followed_or_removed(self):
        stale = os.path.join(self.dir, "stale.sock")
        self.make_stale_socket(stale)  # a link to a stale socket is still not ours
        os.symlink(stale, self.sock)
        self.assertOneLineError([self.sock], 1, "is a symbolic link, not a socket")
        self.assertTrue(os.path.islink(self.sock))
        self.assertTrue(stat.S_ISSOCK(os.lstat(stale).st_mode))

    def test_two_instances_started_at_once_exactly_one_serves(self):
        for attempt in range(20):
            if os.path.lexists(self.sock):
                os.unlink(self.sock)
            pair = [self.start_app(ready=False) for _ in range(2)]
            codes = wait_for(lambda: [s.proc.poll() for s in pair]
                             if any(s.proc.poll() is not None for s in pair) else None,
                             "one of two starters to exit")
            loser = next(s for s, code in zip(pair, codes) if code is not None)
            survivor = next(s for s in pair if s is not loser)
            self.assertEqual(loser.wait(), 1, f"attempt {attempt}: {loser.log()}")
            self.assertIn("in use by a running server", loser.log())
            survivor.wait_ready()
            self.assertEqual(get(self.sock)[0], 200, f"attempt {attempt}")
            self.assertIsNone(survivor.proc.poll())
            survivor.signal(signal.SIGTERM)
            self.assertEqual(survivor.wait(), 0)

    def hold_directory_lock_as_nobody(self):
        """A process of user nobody holding the flock on the socket's directory (anyone who may
        read the directory can): return it once it holds the lock."""
        script = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                  "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")
        holder = subprocess.Popen([python_for_nobody(), "-c", script, self.dir],
                                  preexec_fn=as_nobody, stdout=subprocess.PIPE, text=True)
        self.addCleanup(holder.stdout.close)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        return holder

    def test_another_user_holding_the_directory_lock_cannot_freeze_start_up(self):
        holder = self.hold_directory_lock_as_nobody()
        code, lines = self.run_cli("--app", "testapp:app", self.sock, timeout=3 * DEADLINE)
        self.assertEqual(code, 1, lines)
        self.assertEqual(len(lines), 2, lines)
        self.assertIn(f"waiting for the lock on {self.dir}, held by pid {holder.pid} (nobody)",
                      lines[0])
        self.assertIn(f"held by pid {holder.pid} (nobody) for 5 s", lines[1])
        self.assertFalse(os.path.lexists(self.sock))

    def test_another_user_holding_the_directory_lock_cannot_freeze_shutdown(self):
        server = self.start_app()
        holder = self.hold_directory_lock_as_nobody()
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        # And it removes its own file all the same: while it listens, no starter can take the
        # file for stale, so it needs no lock (it used to leave the file behind).
        self.assertFalse(os.path.lexists(self.sock))
        self.assertNotIn("left the socket file", server.log())
        holder.kill()
        holder.wait()
        self.start_app()
        self.assertEqual(get(self.sock)[0], 200)

    def test_make_server_leaves_the_process_umask_alone(self):
        # The umask is process-wide: changed around bind(), it gave other threads' files the
        # socket's mode (446 of 986 came out 0666 when it was).
        made, stop = [], threading.Event()

        def create_files():
            while not stop.is_set():
                path = os.path.join(self.dir, f"file-{len(made)}")
                with open(path, "w"):
                    pass
                made.append(path)
        old_umask = os.umask(0o022)
        thread = threading.Thread(target=create_files)
        thread.start()
        try:
            for _ in range(300):
                with wsgi_unix.make_server(self.sock, None, mode=0o666) as server:
                    self.assertEqual(stat.S_IMODE(os.lstat(self.sock).st_mode), 0o666)
                    self.assertIsNotNone(server.socket)
        finally:
            stop.set()
            thread.join()
            os.umask(old_umask)
        modes = {stat.S_IMODE(os.stat(path).st_mode) for path in made}
        self.assertEqual(modes, {0o644}, f"{len(made)} files")
        self.assertEqual([name for name in os.listdir(self.dir) if name.startswith(".wsgi_unix")],
                         [])  # no private directory left behind

    def test_default_mode_is_600(self):
        self.start_app()
        self.assertEqual(stat.S_IMODE(os.lstat(self.sock).st_mode), 0o600)

    def test_mode_and_group_are_in_force_from_the_first_instant(self):
        # Watch the path while the server starts: every mode ever seen must be the final one.
        seen = set()
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                try:
                    info = os.lstat(self.sock)
                    seen.add((stat.S_IMODE(info.st_mode), info.st_gid))
                except FileNotFoundError:
                    pass
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            self.start_app("--mode", "660", "--group", "nogroup", self.sock)
            wait_for(lambda: seen, "the watcher to see the socket")
        finally:
            stop.set()
            watcher.join()
        info = os.lstat(self.sock)
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_gid), (0o660, 65534))
        self.assertEqual({mode for mode, _ in seen}, {0o660})

    def test_mode_decides_who_may_connect(self):
        def connect_as_nobody():
            code = subprocess.run(
                [python_for_nobody(), "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX);"
                 "s.connect(sys.argv[1])", self.sock], preexec_fn=as_nobody,
                stderr=subprocess.DEVNULL).returncode
            return code == 0
        server = self.start_app()  # 600, owned by root: nobody may not connect
        self.assertFalse(connect_as_nobody())
        server.signal(signal.SIGTERM)
        server.wait()
        self.start_app("--mode", "660", "--group", "nogroup", self.sock)
        self.assertTrue(connect_as_nobody())

    def test_unknown_group_is_an_error(self):
        self.assertOneLineError(["--group", "no-such-group-here", self.sock], 1, "does not exist")
        self.assertFalse(os.path.lexists(self.sock))

    def test_socket_file_is_removed_on_sigterm_and_sigint(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            server = self.start_app()
            server.signal(signum)
            self.assertEqual(server.wait(), 0)
            self.assertFalse(os.path.lexists(self.sock))
            self.assertNotIn("Traceback", server.log())

    def test_socket_file_is_removed_when_serve_returns(self):
        done = threading.Event()
        server = wsgi_unix.make_server(self.sock, lambda e, s: [], access_log=False)
        thread = threading.Thread(target=lambda: (server.serve_forever(), done.set()))
        thread.start()
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.sock).st_mode))
        server.shutdown()
        server.server_close()
        thread.join(DEADLINE)
        self.assertTrue(done.is_set())
        self.assertFalse(os.path.lexists(self.sock))

    def test_file_put_there_by_another_process_is_left_alone(self):
        server = self.start_app()
        os.unlink(self.sock)
        self.make_stale_socket(self.sock)  # somebody else's socket, same path
        replaced = os.lstat(self.sock)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        now = os.lstat(self.sock)
        self.assertEqual((now.st_dev, now.st_ino), (replaced.st_dev, replaced.st_ino))

    def test_regular_file_put_in_its_place_survives_shutdown(self):
        server = self.start_app()
        os.unlink(self.sock)
        with open(self.sock, "w") as f:
            f.write("not yours")
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        with open(self.sock) as f:
            self.assertEqual(f.read(), "not yours")

    def test_a_vanished_directory_does_not_spoil_the_shutdown(self):
        # e.g. /run/app removed by a clean-up job while the server runs
        directory = os.path.join(self.dir, "run")
        os.mkdir(directory)
        server = self.start_app("--graceful-timeout", "60", os.path.join(directory, "app.sock"))
        shutil.rmtree(directory)
        server.signal(signal.SIGTERM)
        # It used to wait out the graceful timeout, then exit 1 for the missing directory.
        self.assertEqual(server.wait(timeout=DEADLINE), 0)
        self.assertNotIn("does not exist", server.log())

    def test_missing_directory_is_a_one_line_error(self):
        path = os.path.join(self.dir, "missing", "app.sock")
        self.assertOneLineError([path], 1, "does not exist; create it first")

    def test_directory_without_permission_is_a_one_line_error(self):
        locked = os.path.join(self.dir, "locked")
        os.mkdir(locked, 0o755)  # root's; nobody may not create files in it
        shutil.copy(SERVER, self.dir)  # where nobody may read it
        result = subprocess.run(
            [python_for_nobody(), os.path.join(self.dir, "wsgi_unix.py"),
             os.path.join(locked, "app.sock")], preexec_fn=as_nobody, capture_output=True, text=True)
        lines = result.stderr.splitlines()
        self.assertEqual(result.returncode, 1, lines)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("no permission", lines[0])
        self.assertIn(locked, lines[0])

    def test_another_users_stale_socket_in_a_sticky_directory_is_a_one_line_error(self):
        sticky = os.path.join(self.dir, "sticky")
        os.mkdir(sticky)
        os.chmod(sticky, 0o1777)  # like /tmp: only a file's owner may remove it
        path = os.path.join(sticky, "app.sock")
        self.make_stale_socket(path)  # root's
        os.chmod(path, 0o777)  # nobody may connect (and learn it is stale), not remove it
        shutil.copy(SERVER, self.dir)
        result = subprocess.run([python_for_nobody(), os.path.join(self.dir, "wsgi_unix.py"), path],
                                preexec_fn=as_nobody, capture_output=True, text=True)
        lines = result.stderr.splitlines()
        self.assertEqual((result.returncode, len(lines)), (1, 1), lines)
        self.assertIn("cannot remove the stale socket", lines[0])
        self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode))

    def test_an_unforeseen_os_error_is_one_line_too(self):
        unsearchable = os.path.join(self.dir, "unsearchable")
        os.mkdir(unsearchable, 0o644)  # nobody may list it, not look inside: lstat() fails
        shutil.copy(SERVER, self.dir)
        result = subprocess.run([python_for_nobody(), os.path.join(self.dir, "wsgi_unix.py"),
                                 os.path.join(unsearchable, "app.sock")],
                                preexec_fn=as_nobody, capture_output=True, text=True)
        lines = result.stderr.splitlines()
        self.assertEqual((result.returncode, len(lines)), (1, 1), lines)
        self.assertIn("Permission denied", lines[0])

    def test_a_fifo_at_path_is_never_removed(self):
        os.mkfifo(self.sock)
        self.assertOneLineError([self.sock], 1, "is a FIFO, not a socket")
        self.assertTrue(stat.S_ISFIFO(os.lstat(self.sock).st_mode))

    def test_path_too_long_is_a_one_line_error(self):
        path = os.path.join(self.dir, "x" * 120 + ".sock")
        self.assertOneLineError([path], 1, "longer than the 107")


class PeerCredentialTests(ServerTestCase):
    def test_unix_requests_carry_the_peer_credentials(self):
        self.start_app()
        status, _, body = get(self.sock, "/env")
        self.assertEqual(json.loads(body)["wsgi_unix.peer"], [os.getpid(), os.getuid(), os.getgid()])

    def test_allow_uid_refuses_other_users_with_403_before_the_app_runs(self):
        server = self.start_app("--mode", "666", "--allow-uid", "nobody", self.sock)
        status, _, body = get(self.sock, "/slow?0")
        self.assertEqual(status, 403)
        self.assertIn(b"uid 0 may not connect", body)
        self.assertNotIn("app: /slow started", server.log())
        script = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
                  "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(100).split()[1].decode())")
        result = subprocess.run([python_for_nobody(), "-c", script, self.sock],
                                preexec_fn=as_nobody, capture_output=True, text=True)
        self.assertEqual(result.stdout.strip(), "200")

    def test_a_refused_client_hears_its_403_even_when_its_request_comes_late(self):
        # It was answered and closed before its request arrived: most curls got a reset.
        self.start_app("--mode", "666", "--allow-uid", "nobody", self.sock)
        for _ in range(20):
            with connect(self.sock) as sock:
                time.sleep(0.005)  # the answer is out before the request
                sock.sendall(request_bytes("/"))  # no broken pipe: curl gives up on one
                self.assertEqual(status_of(Responses(sock).rest()), 403)

    def test_a_disallowed_user_is_refused_at_once_and_holds_no_slot(self):
        # Refused when it connects, before it says anything: it holds no slot while silent.
        self.start_app("--mode", "666", "--allow-uid", "nobody", "--max-connections", "5",
                       self.sock)
        silent = [connect(self.sock) for _ in range(20)]
        for sock in silent:
            answer = Responses(sock).rest()
            self.assertEqual(status_of(answer), 403)
            sock.close()

    def test_allow_uid_on_tcp_is_a_start_up_error(self):
        self.assertOneLineError(["--allow-uid", "0", "127.0.0.1:0"], 1, "Unix socket")


# --- §3 HTTP/1.x on bytes -----------------------------------------------------------------

class RequestReaderUnitTests(unittest.TestCase):
    """§3 on bytes: each input whole, one byte at a time, and followed by another request."""

    VALID = [
        (get11(), [("GET", "/", "", "HTTP/1.1", True, b"")]),
        (b"GET /p%41th?q=%41 HTTP/1.0\r\n\r\n", [("GET", "/pAth", "q=%41", "HTTP/1.0", False, b"")]),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
         [("GET", "/", "", "HTTP/1.0", True, b"")]),
        (get11(b"/", b"Connection: TE, Close"), [("GET", "/", "", "HTTP/1.1", False, b"")]),
        (b"GET http://a.example/x/y?z HTTP/1.1\r\nHost: a.example\r\n\r\n",
         [("GET", "/x/y", "z", "HTTP/1.1", True, b"")]),
        (b"GET https://a.example HTTP/1.1\r\nHost: a.example\r\n\r\n",
         [("GET", "/", "", "HTTP/1.1", True, b"")]),
        (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", [("OPTIONS", "*", "", "HTTP/1.1", True, b"")]),
        (b"\r\n\r\n" + get11(), [("GET", "/", "", "HTTP/1.1", True, b"")]),  # RFC 9112 §2.2
        (b"GET / HTTP/1.1\nHost: a\n\n", [("GET", "/", "", "HTTP/1.1", True, b"")]),  # bare LF
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 005\r\n\r\nhello",
         [("POST", "/", "", "HTTP/1.1", True, b"hello")]),
        (CHUNKED + b"5;a=b;c=\"d;\\\"e\" ; f\r\nhello\r\n0006\r\n, more\r\n0\r\nX-T: 1\r\n\r\n",
         [("POST", "/up", "", "HTTP/1.1", True, b"hello, more")]),
        (CHUNKED.replace(b": chunked", b": , chunked") + b"0\r\n\r\n",
         [("POST", "/up", "", "HTTP/1.1", True, b"")]),  # RFC 9110 §5.6.1: empty elements
        (CHUNKED + b"3\nabc\n0\n\n", [("POST", "/up", "", "HTTP/1.1", True, b"abc")]),
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
         [("GET", "/", "", "HTTP/1.1", True, b"")]),  # a later 1.x is 1.1 (RFC 9110 §2.5)
        (get11(b"/1") + b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok" + get11(b"/3"),
         [("GET", "/1", "", "HTTP/1.1", True, b""), ("POST", "/2", "", "HTTP/1.1", True, b"ok"),
          ("GET", "/3", "", "HTTP/1.1", True, b"")]),  # pipelined
    ]

    INVALID = [
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /" + b"a" * 70000, 414),  # known before the line ends
        (get11(b"/", *[b"X-H%d: 1" % i for i in range(101)]), 431),
        (get11(b"/", b"X: " + b"b" * 70000), 431),
        (get11(b"/", *[b"X-%d: " % i + b"b" * 60000 for i in range(5)]), 431),  # > 256 KiB
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 60000, 431),  # never ends, too big
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),  # RFC 9112 3.2: one Host
        (b"GET / FTP/1.1\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /public#/../admin HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # a fragment
        (b"GET x/y://z/admin HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET %2F://x/admin HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET a.example:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
        (get11(b"/", b"Content-Type: a/b", b"Content-Type: c/d"), 400),
        (get11(b"/", b"Host : x"), 400),
        (get11(b"/", b"X-A: b", b"  folded"), 400),
        (get11(b"/", b"X-A: a\x7fb"), 400),
        (get11(b"/", b"Content-Length: -1"), 400),
        (get11(b"/", b"Content-Length: 1,1"), 400),
        (get11(b"/", b"Content-Length: 5", b"Content-Length: 6"), 400),
        (get11(b"/", b"Content-Length: " + b"9" * 5000), 413),  # not int() on 5,000 digits
        (get11(b"/", b"Content-Length: 5", b"Transfer-Encoding: chunked"), 400),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),  # RFC 9112 §6.1
        (get11(b"/", b"Transfer-Encoding: gzip"), 501),
        (get11(b"/", b"Transfer-Encoding: gzip, chunked"), 501),
        (get11(b"/", b"Transfer-Encoding: chunked, chunked"), 501),
        (CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"3\r\nhello\r\n0\r\n\r\n", 400),  # data longer than its size
        (CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"\x0b5\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"5\r\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"5\r;x\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"5;a\rb\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"5;a\x00\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"5;\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"5;a=\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
        (CHUNKED + b"1" * 20 + b"\r\n", 413),
        (CHUNKED + b"5" * 70000, 400),  # a chunk line that never ends
        (CHUNKED + b"0\r\nX\x01Y: z\r\n\r\n", 400),  # trailers follow header rules
        (CHUNKED + b"0\r\n" + b"T: 1\r\n" * 101 + b"\r\n", 431),
        (CHUNKED + b"5\r\nhello\r\n0\r\nContent-Length: 99\r\n\r\n", 400),  # RFC 9110 §6.5.1
        (CHUNKED + b"5\r\nhello\r\n0\r\nHost: evil.example\r\n\r\n", 400),
        (CHUNKED + b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", 400),
        (b"M-SEARCH * HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # * is for OPTIONS only
        (b"GET http://user:pass@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # no userinfo
        (b"OPTIONS / RTSP/1.0\r\nHost: a\r\n\r\n", 400),
    ]

    def test_valid_requests_whole_byte_by_byte_and_pipelined(self):
        for data, expected in self.VALID:
            for step in (None, 1, 7):
                with self.subTest(data=data[:60], step=step):
                    self.assertEqual(read_all(data, step), (expected, b""))
            with self.subTest(data=data[:60], followed=True):
                # Bytes of a next request stay for it, untouched.
                self.assertEqual(read_all(data + b"GET /next HT"), (expected, b"GET /next HT"))

    def test_invalid_requests_get_their_status_however_they_arrive(self):
        for data, status in self.INVALID:
            for step in (None, 1) if len(data) < 20000 else (None, 4096):
                with self.subTest(data=data[:60], step=step):
                    self.assertEqual(refusal(data, step), status)

    def test_bodies_over_the_limit_get_413(self):
        limit = 10
        length = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n"
        chunked = CHUNKED + b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
        for data in (length, chunked):  # a length over it is refused before any body byte
            for step in (None, 1):
                with self.subTest(data=data[:60], step=step):
                    self.assertEqual(refusal(data, step, max_body=limit), 413)
        self.assertEqual(read_all(CHUNKED + b"a\r\n0123456789\r\n0\r\n\r\n", max_body=limit)[0][0][5],
                         b"0123456789")
        # What a body costs beyond its bytes counts too: 41 MB of chunk extensions passed a
        # 1M limit.
        for padded in (CHUNKED + b"1;" + b"e" * 20 + b"\r\nx\r\n0\r\n\r\n",
                       CHUNKED + b"1\r\nx\r\n0\r\nX-Trailer: " + b"t" * 20 + b"\r\n\r\n"):
            for step in (None, 1):
                with self.subTest(data=padded[60:], step=step):
                    self.assertEqual(refusal(padded, step, max_body=limit), 413)

    def test_a_large_body_goes_to_a_temporary_file_and_reads_back_whole(self):
        body = os.urandom(3 * wsgi_unix.BODY_IN_MEMORY)
        data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        reader = wsgi_unix._RequestReader(1 << 30, wsgi_unix._BodySink)
        reader.receive(data)
        self.assertEqual(reader.next_event()[0], "head")
        kind, request = reader.next_event()
        self.assertEqual(kind, "request")
        self.assertNotIsInstance(request.body, io.BytesIO)  # spooled
        self.assertEqual(request.body.read(10), body[:10])
        self.assertEqual(request.body.read(), body[10:])
        request.body.close()

    def test_one_byte_chunks_cost_about_what_the_bytes_cost(self):
        # 1-byte chunks are 6 bytes on the wire per body byte: decoding them must stay linear.
        small, large = (CHUNKED + b"1\r\nx\r\n" * count + b"0\r\n\r\n" for count in (2000, 20000))
        timings = []
        for data in (small, large):
            started = time.process_time()
            self.assertEqual(len(read_all(data, 4096)[0][0][5]), data.count(b"\r\nx\r\n"))
            timings.append(time.process_time() - started)
        self.assertLess(timings[1], 30 * max(timings[0], 0.001))  # linear, not quadratic


class MalformedRequestTests(ServerTestCase):
    CASES = [
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
        (request_bytes(headers=[f"X-H{i}: {i}" for i in range(101)]), 431),
        (request_bytes(headers=["X-Big: " + "b" * 70000]), 431),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),
        (b"GET /a\x00b HTTP/1.1\r\n\r\n", 400),
        (b"GET /\x1b[31m HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX\x01Y: z\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-A: b\r\n  folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-A: a\x7fb\r\n\r\n", 400),
        (b"GET / \r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),  # RFC 9112 3.2: one Host
        (b"GET / FTP/1.1\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
        (request_bytes("/echo", "POST", ["Content-Length: -1"]), 400),
        (request_bytes("/echo", "POST", ["Content-Length: abc"]), 400),
        (request_bytes("/echo", "POST", ["Content-Length: 5", "Content-Length: 6"], b"hello!"), 400),
        (request_bytes("/echo", "POST", ["Content-Length: 5", "Transfer-Encoding: chunked"],
                       b"5\r\nhello\r\n0\r\n\r\n"), 400),
        (request_bytes("/echo", "POST", ["Transfer-Encoding: gzip"]), 501),
        (request_bytes("/echo", "POST", ["Transfer-Encoding: gzip, chunked"]), 501),
        (request_bytes("/echo", "POST", ["Transfer-Encoding: chunked"], b"zz\r\nhello\r\n0\r\n\r\n"),
         400),
        (request_bytes("/echo", "POST", ["Transfer-Encoding: chunked"], b"3\r\nhello\r\n0\r\n\r\n"),
         400),
    ]

    def test_each_malformed_request_gets_its_status_and_the_next_is_served(self):
        server = self.start_app()
        for data, expected in self.CASES:
            answer = raw_request(self.sock, data)
            self.assertEqual(status_of(answer), expected, data[:60])
            self.assertEqual(get(self.sock)[0], 200)
        self.assertNotIn("Traceback", server.log())

    def test_refusals_in_a_loop_are_logged_a_few_a_second(self):
        # A refused client reconnecting in a loop wrote 100,092 lines (7 MB) in 16 s.
        server = self.start_app("--quiet", self.sock)
        for _ in range(300):
            self.assertEqual(status_of(raw_request(self.sock, b"NONSENSE\r\n\r\n")), 400)

        def summary():
            raw_request(self.sock, b"NONSENSE\r\n\r\n")
            return "more refusals were not logged" in server.log()
        wait_for(summary, "the line that counts the rest")
        refusals = [line for line in server.log().splitlines() if '"NONSENSE" 400' in line]
        self.assertLess(len(refusals), 100)
        counted = sum(int(line.split(": ")[1].split()[0]) for line in server.log().splitlines()
                      if "more refusals were not logged" in line)
        self.assertGreaterEqual(len(refusals) + counted, 300)

    def test_a_client_that_hangs_up_before_its_error_answer_costs_one_line_not_a_traceback(self):
        server = self.start_app()
        for data, _ in self.CASES * 3:
            with connect(self.sock) as sock:
                sock.sendall(data)  # and goes, before the answer can be sent
        self.assertEqual(get(self.sock)[0], 200)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertNotIn("Traceback", server.log())
        self.assertIn("client went away", server.log())

    def test_tcp_clients_that_reset_their_connection_cost_no_traceback(self):
        server = self.start_app("127.0.0.1:0")
        target = ("127.0.0.1", int(server.wait_ready().rsplit(":", 1)[1]))
        for data in [b"", b"GET / HTTP/1.0\r\n", b"GET / HTTP/1.0\r\n\r\n"] * 30:
            with connect(target) as sock:
                sock.sendall(data)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # closed with SO_LINGER 0: a reset, not a FIN
        self.assertEqual(status_of(raw_request(target, request_bytes())), 200)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertNotIn("Traceback", server.log())

    def test_chunked_body_is_decoded_and_input_is_terminated(self):
        self.start_app()
        chunks = b"6;ext=1\r\nhello\n\r\nB\r\nworld, more\r\n0\r\nTrailer: x\r\n\r\n"
        answer = raw_request(self.sock, request_bytes("/input", "POST",
                                                      ["Transfer-Encoding: chunked"], chunks))
        status, _, body = split_response(answer)
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body), {"first": "hello\n", "rest": "world, more",
                                            "terminated": True, "after": ""})

    def test_a_huge_chunk_is_streamed_not_buffered(self):
        server = self.start_app()
        size = 64 * 1024 * 1024
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/count", "POST", ["Transfer-Encoding: chunked"],
                                       b"%x\r\n" % size))
            block = b"x" * (1024 * 1024)
            for _ in range(size // len(block)):
                sock.sendall(block)
            sock.sendall(b"\r\n0\r\n\r\n")
            answer = b""
            while not answer.endswith(b"%d" % size):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        self.assertEqual(split_response(answer)[0::2], (200, b"%d" % size))
        with open(f"/proc/{server.proc.pid}/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        self.assertLess(peak / 1024, 48)  # MiB, far below the 64 MiB chunk

    def test_wsgi_input_never_reads_past_the_body(self):
        self.start_app()
        # A timeout far below the server's 30 s: a read past the body would hang.
        with connect(self.sock, 5) as sock:
            sock.sendall(request_bytes("/input", "POST", ["Content-Length: 9"], b"ab\ncdefgh"))
            sock.sendall(b"NEXT REQUEST")  # and the connection stays open
            answer = b""
            while b"}" not in answer:
                answer += sock.recv(65536)
        body = json.loads(split_response(answer)[2])
        self.assertEqual((body["first"], body["rest"], body["after"]), ("ab\n", "cdefgh", ""))

    def test_expect_100_continue_is_answered_when_the_body_is_read(self):
        self.start_app()
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/echo", "POST", ["Content-Length: 5",
                                                          "Expect: 100-continue"]))
            self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b"hello")
            answer = sock.recv(65536)
        self.assertEqual(split_response(answer)[0::2], (200, b"hello"))

    def test_head_gets_the_get_headers_and_no_body(self):
        self.start_app()
        answer = raw_request(self.sock, request_bytes("/", "HEAD"))
        status, head, body = split_response(answer)
        self.assertEqual((status, body), (200, b""))
        self.assertIn("Content-Length: 6", head)

    def test_log_escapes_unicode_line_separators_in_a_request(self):
        # U+2028 sent as UTF-8 reaches us as latin-1 text with \x80 in it: escaped, so that a
        # reader that decodes the log as UTF-8 never sees a line separator.
        server = self.start_app()
        raw_request(self.sock, request_bytes("/a\u2028b".encode().decode("latin-1")))
        line = server.wait_line('" 404')
        self.assertIn("\\x80", line)
        self.assertNotIn("\u2028", server.log())

    def test_log_escapes_control_characters(self):
        server = self.start_app()
        raw_request(self.sock, b"GET /\x1b[2J\rfake HTTP/1.1\r\n\r\n")
        line = server.wait_line('" 400')
        self.assertIn("\\x1b[2J\\x0dfake", line)
        self.assertNotIn("\x1b", server.log())

    def test_fuzzed_requests_get_well_formed_answers_and_the_server_lives(self):
        import random
        import re
        count = int(os.environ.get("WSGI_UNIX_FUZZ", "10000"))
        server = self.start_app("--quiet", "--timeout", "2", self.sock)
        rng = random.Random(20261126)
        seeds = [request_bytes("/"), request_bytes("/env?x=1", headers=["Cookie: a=b"]),
                 request_bytes("/echo", "POST", ["Content-Length: 5"], b"hello"),
                 request_bytes("/echo", "POST", ["Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
                 request_bytes("/", "HEAD"), b"GET / HTTP/1.0\r\n\r\n"]
        alphabet = b"\x00\r\n :;,\t\x7f\xff-_/?%0123456789aAzZ"

        def mutate(data):
            data = bytearray(data)
            for _ in range(rng.randint(1, 6)):
                at = rng.randrange(len(data) + 1)
                kind = rng.random()
                if kind < 0.3 and data:
                    data[min(at, len(data) - 1)] = rng.choice(alphabet)
                elif kind < 0.5:
                    data[at:at] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
                elif kind < 0.7:
                    del data[at:at + rng.randint(1, 8)]
                elif kind < 0.8:
                    data[at:at] = rng.choice(seeds)[:rng.randint(0, 40)]
                else:
                    data = data[:at] + b"\r\n\r\n"
            return bytes(data)
        cases = [mutate(rng.choice(seeds)) if i % 10 else bytes(rng.randrange(256) for _ in
                 range(rng.randint(1, 200))) + b"\r\n\r\n" for i in range(count)]
        response = re.compile(rb"HTTP/1\.[01] [1-5]\d\d [^\r\n]*\r\n(?:[!-9;-~]+: [^\r\n]*\r\n)*\r\n",
                              re.S)
        bad = []

        def one(data):
            with connect(self.sock) as sock:
                try:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the server answered and closed before all was sent
                answer = b""
                try:
                    while True:
                        chunk = sock.recv(65536)
                        if not chunk:
                            break
                        answer += chunk
                except ConnectionResetError:
                    pass
            if not answer:
                return  # a clean close is a valid answer to an incomplete request
            match = response.match(answer)
            length = re.search(rb"\r\nContent-Length: (\d+)\r\n", answer[:match.end()] if match
                               else b"")
            end = match.end() + int(length.group(1)) if length else len(answer)
            # Exactly the body the head announced, then nothing, or the answer to a request
            # that the mutation made follow the first (pipelined).
            if (not match or (length and not data.startswith(b"HEAD") and (
                    len(answer) < end or (len(answer) > end and not response.match(answer, end))))):
                bad.append((data, answer[:200]))

        def worker(part):
            for data in part:
                one(data)
        workers = [threading.Thread(target=worker, args=(cases[i::4],)) for i in range(4)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(120)
        self.assertEqual(bad[:5], [])
        self.assertIsNone(server.proc.poll())
        self.assertEqual(get(self.sock)[0], 200)
        self.assertNotIn("Traceback", server.log())


# --- §4 Socket I/O with deadlines ---------------------------------------------------------

class SlowClientTests(ServerTestCase):
    def test_silent_and_trickling_clients_do_not_delay_a_normal_request(self):
        self.start_app()
        silent = open_idle(self.sock, 100)
        tricklers = open_idle(self.sock, 10)
        stop, sent = threading.Event(), []

        def trickle():
            data = request_bytes("/")
            for i in range(len(data) - 1):
                if stop.wait(0.05):
                    return
                for sock in tricklers:
                    sock.send(data[i:i + 1])
                sent.append(i)
        thread = threading.Thread(target=trickle)
        thread.start()
        try:
            wait_for(lambda: len(sent) >= 3, "the tricklers to be under way")
            started = time.monotonic()
            self.assertEqual(get(self.sock)[0], 200)
            took = time.monotonic() - started
            print(f"\n    a normal request beside 100 silent and 10 trickling clients: "
                  f"{took * 1000:.1f} ms", file=sys.stderr)
            self.assertLess(took, 1.0)
        finally:
            stop.set()
            thread.join()
            for sock in silent + tricklers:
                sock.close()

    def test_a_request_that_does_not_arrive_in_time_gets_408(self):
        server = self.start_app("--timeout", "1", self.sock)
        for partial in (b"", b"GET / HT", request_bytes("/echo", "POST", ["Content-Length: 10"],
                                                        b"12345")):
            with connect(self.sock) as sock:
                sock.sendall(partial)
                started = time.monotonic()
                answer = sock.recv(65536)
                self.assertEqual(status_of(answer), 408, partial)
                self.assertLess(time.monotonic() - started, 3.5)
                self.assertEqual(sock.recv(100), b"")  # and closed
        self.assertEqual(get(self.sock)[0], 200)
        self.assertNotIn("Traceback", server.log())
        server.wait_line("did not arrive in time")

    def trickle(self, sock, send=b"", chunk=100, pause=0.05):
        """Send ``send``, or else read, ``chunk`` bytes per ``pause`` seconds; return what was
        read once the server closes (or fail at the deadline)."""
        received, end = b"", time.monotonic() + DEADLINE
        for start in range(0, len(send), chunk):
            try:
                sock.sendall(send[start:start + chunk])
            except OSError:
                break  # answered and closed
            time.sleep(pause)
            self.assertLess(time.monotonic(), end, "still taking a trickled body")
        while True:
            data = sock.recv(chunk)
            if not data:
                return received
            received += data
            time.sleep(0 if send else pause)
            self.assertLess(time.monotonic(), end, "still reading")

    def test_a_body_trickled_a_few_bytes_at_a_time_gets_408(self):
        # Each piece comes well within --timeout, but 64 KiB must come per --timeout.
        server = self.start_app("--timeout", "1", self.sock)
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/count", "POST", ["Content-Length: 1000000"]))
            answer = self.trickle(sock, send=b"x" * 1000000)
        self.assertEqual(status_of(answer), 408)
        server.wait_line("did not arrive in time")

    def test_a_client_that_reads_a_few_bytes_at_a_time_is_cut_off(self):
        server = self.start_app("--timeout", "1", self.sock)
        big_file = os.path.join(self.dir, "big")
        with open(big_file, "wb") as f:
            f.write(b"f" * 8000000)
        for count, url in enumerate(("/big?8000000", f"/file?{big_file}"), 1):  # and sendfile()
            with connect(self.sock) as sock:
                sock.sendall(request_bytes(url))
                # What the socket buffers hold still comes after the server gives up.
                end = time.monotonic() + DEADLINE
                while server.log().count("client stopped reading") < count:
                    self.assertTrue(sock.recv(100), url)
                    time.sleep(0.05)
                    self.assertLess(time.monotonic(), end, f"still serving {url} to a trickler")
        self.assertNotIn("Traceback", server.log())

    def test_a_slow_but_steady_client_is_served_in_full(self):
        self.start_app("--timeout", "1", self.sock)
        with connect(self.sock) as sock:  # ~256 KiB/s each way
            sock.sendall(request_bytes("/count", "POST", ["Content-Length: 600000"]))
            answer = self.trickle(sock, send=b"x" * 600000, chunk=16384, pause=0.0625)
        self.assertEqual(split_response(answer)[::2], (200, b"600000"))
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/big?655360"))
            answer = self.trickle(sock, chunk=16384, pause=0.0625)
        self.assertEqual(len(split_response(answer)[2]), 655360)

    def test_a_thousand_idle_connections_stay_cheap_and_the_server_serves(self):
        server = self.start_app()
        idle = open_idle(self.sock, 1000)
        try:
            self.assertEqual(get(self.sock)[0], 200)
            rss_mib = process_rss_kb(server.proc.pid) / 1024
            self.assertLess(rss_mib, 150)
            print(f"\n    RSS with 1,000 idle connections: {rss_mib:.1f} MiB", file=sys.stderr)
        finally:
            for sock in idle:
                sock.close()


# --- §5 The engine ------------------------------------------------------------------------

class ConnectionMovesUnitTests(unittest.TestCase):
    """A connection's states and moves are data (§5's _MOVES), and the drawings agree."""

    def test_the_engine_docstring_and_the_readme_draw_the_table(self):
        table = {state: moves for state, moves in wsgi_unix._MOVES.items() if moves}
        with open(os.path.join(HERE, "README.md")) as f:
            readme = f.read()
        readme = readme[readme.index("a connection (accept()"):]
        for where, text in (("docstring", wsgi_unix._Engine.__doc__), ("README", readme)):
            with self.subTest(where=where):
                self.assertEqual(drawn_moves(text), table)

    def test_a_move_not_in_the_table_is_refused(self):
        conn = wsgi_unix._Connection(None, None, None, 0.0)
        for state in ("ready", "serving", "idle", "head", "ready", "serving", "closed"):
            conn.move(state)
        for start, bad in (("closed", "closed"), ("closed", "head"), ("ready", "idle")):
            with self.subTest(start=start, bad=bad):
                conn.state = start
                with self.assertRaises(RuntimeError):
                    conn.move(bad)


class LeadershipUnitTests(unittest.TestCase):
    """How threads take work (§5's _Leadership), decided without threads or sockets."""

    QUICK, WAITS = wsgi_unix.HAND_OVER_ABOVE / 10, wsgi_unix.HAND_OVER_ABOVE * 10

    def leadership(self, app_time, followers=0, ready=("conn",), returned=()):
        lead = wsgi_unix._Leadership()
        lead.leader, lead.followers, lead.app_time = "me", followers, app_time
        lead.ready.extend(ready)
        lead.returned.extend(returned)
        return lead

    def test_who_serves_a_ready_request(self):
        # (apps take, followers waiting) -> (still leading, served inline: busy_since set)
        table = [
            (self.WAITS, 1, False, None),   # apps wait: a follower leads before the app runs
            (self.WAITS, 0, True, 5.0),     # nobody to hand over to: inline
            (self.QUICK, 3, True, 5.0),     # quick apps: inline, the lead kept
            (self.QUICK, 0, True, 5.0),
        ]
        for app_time, followers, leading, busy_since in table:
            with self.subTest(app_time=app_time, followers=followers):
                lead = self.leadership(app_time, followers)
                self.assertEqual(lead.take_work("me", 5.0), (leading, "conn", ()))
                self.assertEqual(lead.leader, "me" if leading else None)
                self.assertEqual(lead.busy_since, busy_since)

    def test_handed_back_connections_come_first_and_alone(self):
        lead = self.leadership(self.WAITS, 1, returned=("back1", "back2"))
        self.assertEqual(lead.take_work("me", 0.0), (True, None, ["back1", "back2"]))
        self.assertEqual(list(lead.ready), ["conn"])
        self.assertEqual(lead.take_work("me", 0.0), (False, "conn", ()))

    def test_only_the_leader_takes_work(self):
        lead = self.leadership(self.QUICK)
        self.assertEqual(lead.take_work("other", 0.0), (False, None, ()))
        self.assertEqual(lead.take_work("me", 0.0), (True, "conn", ()))
        self.assertEqual(lead.take_work("me", 0.0), (True, None, ()))  # nothing left
        lead.finish()
        self.assertEqual(lead.take_work("me", 0.0), (False, None, ()))

    def test_app_time_is_a_running_mean_that_says_when_apps_turn_quick(self):
        lead = self.leadership(self.WAITS)
        turned = []
        for _ in range(40):  # quick requests, one after another
            turned.append(lead.end_app("me", 0.0)[1])
        self.assertEqual(turned.count(True), 1)  # said once, when it turned
        self.assertFalse(lead.apps_wait)
        lead.end_app("other", 0.1)  # one request of 100 ms
        self.assertTrue(lead.apps_wait)

    def test_end_app_tells_whether_the_thread_still_leads(self):
        lead = self.leadership(self.QUICK)
        lead.take_work("me", 0.0)
        self.assertEqual(lead.end_app("me", 0.0), (True, False))
        self.assertIsNone(lead.busy_since)
        self.assertEqual(lead.end_app("someone else", 0.0), (False, False))

    def test_the_watchdog_promotes_only_a_leader_stuck_in_an_app_with_a_follower_waiting(self):
        after = wsgi_unix.PROMOTE_AFTER
        # (busy since, followers, now) -> promoted
        table = [(None, 1, 10.0, False), (10.0, 0, 11.0, False),
                 (10.0, 1, 10.0 + after / 2, False), (10.0, 1, 10.0 + after * 2, True)]
        for busy_since, followers, now, promoted in table:
            with self.subTest(busy_since=busy_since, followers=followers, now=now):
                lead = self.leadership(self.QUICK, followers)
                lead.busy_since = busy_since
                lead.promote_if_stuck(after, now)
                self.assertEqual(lead.leader is None, promoted)
                self.assertEqual(lead.apps_wait, promoted)  # a stuck app is one that waits

    def test_a_thread_back_from_an_app_takes_the_lead_from_a_leader_in_one(self):
        lead = self.leadership(self.QUICK, ready=())
        lead.busy_since = 1.0
        self.assertEqual(lead.follow("back"), (True, None))  # at once: no waiting
        self.assertEqual((lead.leader, lead.busy_since), ("back", None))
        self.assertEqual(lead.end_app("me", 0.0), (False, False))  # the old leader learns it

    def test_a_thread_that_served_without_the_lead_takes_it_if_vacant_or_busy(self):
        # (leader, busy since) when a request served without the lead ends -> it leads now
        for leader, busy_since, leads in (("other", None, False), ("other", 2.0, True),
                                          (None, None, True)):
            with self.subTest(leader=leader, busy_since=busy_since):
                lead = self.leadership(self.WAITS)
                lead.leader, lead.busy_since = leader, busy_since
                self.assertEqual(lead.end_app("me", self.WAITS)[0], leads)
                self.assertEqual(lead.leader, "me" if leads else leader)

    def test_what_a_follower_takes(self):
        # (leader, apps take, ready) -> what follow() returns, without waiting
        table = [(None, self.WAITS, ["conn"], (True, None)),     # a vacant lead comes first
                 ("other", self.WAITS, ["conn"], (False, "conn")),  # apps wait: serve it
                 (None, self.QUICK, [], (True, None))]
        for leader, app_time, ready, taken in table:
            with self.subTest(leader=leader, app_time=app_time, ready=ready):
                lead = self.leadership(app_time, ready=ready)
                lead.leader = leader
                self.assertEqual(lead.follow("me"), taken)
                self.assertEqual(lead.followers, 0)
        lead = self.leadership(self.QUICK)
        lead.finish()
        self.assertEqual(lead.follow("me"), (False, None))

    def test_followers_are_woken_for_ready_requests_only_when_apps_wait(self):
        for app_time, served_by_follower in ((self.WAITS, True), (self.QUICK, False)):
            with self.subTest(app_time=app_time):
                lead = self.leadership(app_time, ready=())
                lead.leader = "leader"
                taken = []
                follower = threading.Thread(target=lambda: taken.append(lead.follow("f")))
                follower.start()
                wait_for(lambda: lead.followers == 1, "the follower to wait")
                lead.queue_request("conn")
                follower.join(0.2)
                if served_by_follower:
                    self.assertEqual(taken, [(False, "conn")])
                else:  # it waits on: the leader serves quick requests inline
                    self.assertEqual((taken, list(lead.ready)), ([], ["conn"]))
                    lead.finish()
                    follower.join(DEADLINE)
                    self.assertEqual(taken, [(False, None)])

    def test_a_vacant_lead_is_taken_and_a_finished_one_refused(self):
        lead = wsgi_unix._Leadership()
        self.assertEqual(lead.follow("me"), (True, None))
        self.assertEqual(lead.leader, "me")
        lead.resign("me")
        self.assertIsNone(lead.leader)
        lead.finish()
        self.assertEqual(lead.follow("me"), (False, None))

    def test_after_a_pause_requests_are_handed_over_until_they_show_they_are_quick(self):
        lead = self.leadership(self.QUICK)
        lead.idle()
        self.assertTrue(lead.apps_wait)


class ThreadBoundTests(ServerTestCase):
    """--threads is the bound: at most that many app calls, threads + 1 in the process."""

    def watch_threads(self, pid):
        """Sample the process's thread count until stopped; return (stop, samples)."""
        samples, stop = [], threading.Event()

        def watch():
            while not stop.is_set():
                samples.append(process_threads(pid))
                stop.wait(0.005)
        thread = threading.Thread(target=watch)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(stop.set)
        return stop, samples

    def finish_all(self, clients, rest):
        statuses = []
        for sock in clients:
            sock.sendall(rest)
        for sock in clients:
            with sock:
                statuses.append(Responses(sock).next()[1])
        return statuses

    def test_500_slow_heads_and_500_trickled_bodies_hold_no_thread(self):
        server = self.start_app("--threads", "2", "--quiet", self.sock)
        pid = server.proc.pid
        wait_for(lambda: process_threads(pid) == 3, "2 threads and the main one")
        stop, samples = self.watch_threads(pid)
        for request, cut in ((request_bytes("/counted?0.002"), 20),
                             (request_bytes("/counted?0.002", "POST", ["Content-Length: 100"],
                                            b"b" * 100), -50)):
            clients = []
            for _ in range(500):
                sock = connect(self.sock)
                sock.sendall(request[:cut])  # half a head, or a head and half a body
                clients.append(sock)
            wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) > 500, "all to be accepted")
            self.assertEqual(self.finish_all(clients, request[cut:]), [200] * 500)
        stop.set()
        self.assertLessEqual(max(samples), 3, "threads: --threads 2 and the main one")
        self.assertLessEqual(int(get(self.sock, "/peak")[2]), 2)  # app calls at once
        self.assertLess(process_rss_kb(pid) / 1024, 100)  # it was 549 MB with a thread each

    def test_a_thousand_idle_keep_alive_connections_hold_no_thread(self):
        server = self.start_app("--threads", "2", "--quiet", self.sock)
        pid = server.proc.pid
        idle = []
        for _ in range(1000):
            sock = connect(self.sock)
            sock.sendall(request_bytes("/", close=False))
            self.assertEqual(Responses(sock).next()[1], 200)  # and it stays open
            idle.append(sock)
        try:
            self.assertEqual(process_threads(pid), 3)
            self.assertEqual(get(self.sock)[0], 200)
            for sock in idle[:10]:  # and they still serve
                sock.sendall(request_bytes("/", close=False))
                self.assertEqual(Responses(sock).next()[1], 200)
        finally:
            for sock in idle:
                sock.close()

    def test_the_command_app_is_bounded_too(self):
        server = self.start("--threads", "2", "--quiet", self.sock, "--", "cat")
        pid = server.proc.pid
        stop, samples = self.watch_threads(pid)
        request = request_bytes("/", "POST", ["Content-Length: 10"], b"0123456789")
        clients = []
        for _ in range(200):
            sock = connect(self.sock)
            sock.sendall(request[:-5])
            clients.append(sock)
        wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) > 200, "all to be accepted")
        self.assertEqual(self.finish_all(clients, request[-5:]), [200] * 200)
        stop.set()
        self.assertLessEqual(max(samples), 3)

    def test_a_slow_upload_holds_no_thread(self):
        # Two uploads trickling at 16 KiB/s held both threads of --threads 2: a normal request
        # waited 15 s.  Now bodies are received in the selector before the app runs.
        self.start_app("--threads", "1", self.sock)
        uploads, stop = [], threading.Event()
        for _ in range(2):
            sock = connect(self.sock)
            sock.sendall(request_bytes("/count", "POST", ["Content-Length: 1000000"]))
            uploads.append(sock)

        def trickle():
            while not stop.wait(0.05):
                for sock in uploads:
                    sock.sendall(b"x" * 800)
        thread = threading.Thread(target=trickle)
        thread.start()
        try:
            started = time.monotonic()
            self.assertEqual(get(self.sock)[0], 200)
            self.assertLess(time.monotonic() - started, 1.0)
        finally:
            stop.set()
            thread.join()
            for sock in uploads:
                sock.close()

    def test_a_slow_app_makes_another_thread_lead(self):
        self.start_app("--threads", "3", self.sock)
        answers = []

        def slow():
            answers.append(get(self.sock, "/counted?0.5")[0])
        run_together(slow, 3)
        self.assertEqual(answers, [200] * 3)
        self.assertEqual(get(self.sock, "/peak")[2], b"3")  # side by side, not one after another


class WaitingAppTests(ServerTestCase):
    """Apps that wait (a database, a remote call) run --threads at a time."""

    def answered_after(self, count, url):
        """Send ``count`` requests at once; return the seconds until the last is answered."""
        statuses, started = [], time.monotonic()

        def client():
            statuses.append(get(self.sock, url)[0])
        run_together(client, count)
        self.assertEqual(statuses, [200] * count)
        return time.monotonic() - started

    def test_eight_requests_that_wait_run_side_by_side_on_eight_threads(self):
        # The old engine served them one after another (0.2 s each): 1.6 s, or 0.4 s at best.
        self.start_app("--threads", "8", "--quiet", self.sock)
        self.assertLess(self.answered_after(8, "/counted?0.2"), 0.4)
        self.assertEqual(get(self.sock, "/peak")[2], b"8")

    def test_the_thread_bound_still_holds_for_apps_that_wait(self):
        self.start_app("--threads", "2", "--quiet", self.sock)
        elapsed = self.answered_after(4, "/counted?0.2")
        self.assertGreater(elapsed, 0.39)  # two at a time: two rounds, never one
        self.assertLess(elapsed, 0.7)
        self.assertEqual(get(self.sock, "/peak")[2], b"2")

    def test_keep_alive_connections_with_waiting_requests_run_in_parallel(self):
        self.start_app("--threads", "4", "--quiet", self.sock)
        statuses = []

        def client():
            with connect(self.sock) as sock:
                responses = Responses(sock)
                for _ in range(3):  # one after another on one connection
                    sock.sendall(request_bytes("/counted?0.1", close=False))
                    statuses.append(responses.next()[1])
        started = time.monotonic()
        run_together(client, 4)
        elapsed = time.monotonic() - started
        self.assertEqual(statuses, [200] * 12)
        self.assertLess(elapsed, 0.8)  # 0.3 s side by side; 1.2 s one at a time
        self.assertEqual(get(self.sock, "/peak")[2], b"4")

    def test_a_quick_request_is_served_at_once_while_the_other_threads_wait(self):
        # The old engine started the waiting requests one per watchdog look (10-100 ms), and a
        # quick request came after them all: 448 ms with 7 of 8 threads waiting.
        self.start_app("--threads", "8", "--quiet", self.sock)
        slow = [connect(self.sock) for _ in range(7)]
        for sock in slow:
            sock.sendall(request_bytes("/slow?1.5"))
        try:
            slowest = 0.0
            for _ in range(20):
                started = time.monotonic()
                self.assertEqual(get(self.sock)[0], 200)
                slowest = max(slowest, time.monotonic() - started)
            self.assertLess(slowest, 0.2)
            for sock in slow:
                self.assertEqual(Responses(sock).next()[1], 200)
        finally:
            for sock in slow:
                sock.close()


class KeepAliveTests(ServerTestCase):
    """HTTP/1.1 persistent connections, and the framing that makes them safe."""

    def test_an_http11_connection_serves_request_after_request(self):
        self.start_app()
        with connect(self.sock) as sock:
            responses = Responses(sock)
            for url in ("/", "/env", "/stream?100000", "/"):
                sock.sendall(request_bytes(url, close=False))
                version, status, headers, body = responses.next()
                self.assertEqual((version, status), ("HTTP/1.1", 200), url)
                self.assertNotIn("connection", headers)
            sock.sendall(request_bytes("/"))  # Connection: close
            version, status, headers, body = responses.next()
            self.assertEqual((status, headers["connection"], body), (200, "close", b"hello\n"))
            self.assertTrue(responses.closed())

    def test_over_tcp_too(self):
        server = self.start_app("127.0.0.1:0")
        target = ("127.0.0.1", int(server.wait_ready().rsplit(":", 1)[1]))
        with connect(target) as sock:
            responses = Responses(sock)
            for url in ("/", "/stream?100000", "/env"):
                sock.sendall(request_bytes(url, close=False))
                self.assertEqual(responses.next()[1], 200, url)

    def test_readline_of_a_long_body_line_is_one_pass(self):
        # wsgi.input is io's BytesIO or a temporary file: readline() is C, not a loop in Python
        # that copies what it has read each time (quadratic on one long line).
        for size in (1000, 3 * wsgi_unix.BODY_IN_MEMORY // 100 * 100):
            sink = wsgi_unix._BodySink()
            for _ in range(size // 100):
                sink.write(b"x" * 100)
            body = sink.finish()
            self.assertIsInstance(body, (io.BytesIO, io.BufferedReader))
            self.assertEqual((len(body.readline()), body.read()), (size, b""))
            body.close()

    def test_http_clients_reuse_one_connection(self):
        self.start_app()
        conn = unix_connection(self.sock)
        first = conn.sock
        for _ in range(3):
            conn.request("GET", "/")
            response = conn.getresponse()
            self.assertEqual((response.status, response.read()), (200, b"hello\n"))
        self.assertIs(conn.sock, first)  # http.client reconnects if the server closed
        conn.close()

    def test_http10_gets_http10_and_a_close_unless_it_asks_for_keep_alive(self):
        self.start_app()
        with connect(self.sock) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            responses = Responses(sock)
            version, status, headers, body = responses.next()
            self.assertEqual((version, status, headers["connection"]), ("HTTP/1.0", 200, "close"))
            self.assertTrue(responses.closed())
        with connect(self.sock) as sock:
            responses = Responses(sock)
            for _ in range(2):
                sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                version, status, headers, body = responses.next()
                self.assertEqual((version, headers["connection"], body),
                                 ("HTTP/1.0", "keep-alive", b"hello\n"))

    def test_responses_without_a_length_are_chunked_to_http11_and_counted_or_closed_for_10(self):
        self.start_app()
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/stream?100000", close=False))
            version, status, headers, body = Responses(sock).next()
            self.assertEqual((headers["transfer-encoding"], len(body)), ("chunked", 100000))
        for size, framing in ((1000, "content-length"), (200000, None)):
            with connect(self.sock) as sock:
                sock.sendall(b"GET /stream?%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % size)
                responses = Responses(sock)
                version, status, headers, body = responses.next()
                self.assertEqual(len(body), size)
                self.assertNotIn("transfer-encoding", headers)
                if framing:  # ends within the first 64 KiB: counted, and the connection kept
                    self.assertEqual((headers["content-length"], headers["connection"]),
                                     (str(size), "keep-alive"))
                else:  # longer: it ends with the connection
                    self.assertEqual(headers["connection"], "close")
                    self.assertNotIn("content-length", headers)

    def test_head_204_and_304_carry_no_body_and_no_framing_of_ours(self):
        self.start_app()
        with connect(self.sock) as sock:
            responses = Responses(sock)
            for method, url, status in (("HEAD", "/stream?100", 200), ("HEAD", "/", 200),
                                        ("GET", "/no-content", 204),
                                        ("GET", "/not-modified", 304), ("GET", "/", 200)):
                sock.sendall(request_bytes(url, method, close=False))
                version, got, headers, body = responses.next(method)
                self.assertEqual((got, body), (status, b"" if method == "HEAD" or status != 200
                                               else b"hello\n"), url)
                self.assertNotIn("transfer-encoding", headers, url)
                if status == 204:
                    self.assertNotIn("content-length", headers)
            self.assertEqual(responses.buffer, b"")  # not one stray byte of "ignored"

    def test_pipelined_requests_are_answered_in_order(self):
        self.start_app()
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/slow?0.2", close=False) +
                         request_bytes("/echo", "POST", ["Content-Length: 5"], b"hello", close=False)
                         + request_bytes("/stream?70000", close=False) + request_bytes("/env"))
            responses = Responses(sock)
            self.assertEqual(responses.next()[3], b"slow done\n")
            self.assertEqual(responses.next()[3], b"hello")
            self.assertEqual(len(responses.next()[3]), 70000)
            self.assertEqual(json.loads(responses.next()[3])["PATH_INFO"], "/env")
            self.assertTrue(responses.closed())

    def test_one_pipelining_client_does_not_starve_the_others(self):
        # The thread that took a pipelining connection served its queued requests back to
        # back: a lone client waited 228 ms (median) beside one pipelining 2,000 requests.
        self.start_app("--quiet", self.sock)
        greedy, waits, done = connect(self.sock), [], threading.Event()

        def read_answers():  # it reads every answer, as fast as they come
            responses = Responses(greedy)
            for _ in range(4000):
                responses.next()
            done.set()
        reader = threading.Thread(target=read_answers)
        reader.start()
        try:
            greedy.sendall(request_bytes("/", close=False) * 4000)
            while not done.is_set():
                started = time.monotonic()
                self.assertEqual(get(self.sock)[0], 200)
                waits.append(time.monotonic() - started)
        finally:
            reader.join(DEADLINE)
            greedy.close()
        waits.sort()
        self.assertLess(waits[len(waits) // 2], 0.02, waits)

    def test_clients_that_pipeline_and_never_read_hold_no_thread(self):
        # Each thread was held in send() for --timeout by a client that sent many requests in
        # one go and read none of the answers: a normal client waited ~30 s per answer.
        self.start_app("--threads", "2", "--quiet", self.sock)
        hogs = []
        try:
            for _ in range(4):
                sock = connect(self.sock)
                sock.setblocking(False)
                try:
                    sock.send(request_bytes("/big?65536", close=False) * 50)
                except BlockingIOError:
                    pass
                hogs.append(sock)
            for _ in range(5):
                self.assert_served_within(2.0)
        finally:
            for sock in hogs:
                sock.close()

    def test_an_app_that_overruns_its_content_length_keeps_the_connection(self):
        # The excess was cut and the connection closed after a head that did not say so: a
        # proxy's next request on it (often another client's) got 502.
        server = self.start_app(self.sock)
        with connect(self.sock) as sock:
            responses = Responses(sock)
            for url, body in (("/overrun", b"12345"), ("/overrun?0", b""), ("/", b"hello\n")):
                sock.sendall(request_bytes(url, close=False))
                version, status, headers, got = responses.next()
                self.assertEqual((status, got), (200, body))
                self.assertNotIn("connection", headers)  # kept
        server.wait_line("the app sent more than its Content-Length (5) for GET /overrun")

    def test_final_status_and_one_content_length_are_required_of_the_app(self):
        self.start_app(self.sock)
        with connect(self.sock) as sock:
            responses = Responses(sock)
            for url, status in (("/early-hints", 500), ("/two-lengths?6", 500),
                                ("/two-lengths?5", 200), ("/", 200)):
                with self.subTest(url=url):
                    sock.sendall(request_bytes(url, close=False))
                    version, got, headers, body = responses.next()
                    self.assertEqual(got, status)
            sock.sendall(request_bytes("/two-lengths?5", close=False))
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            self.assertEqual(head.lower().count(b"content-length"), 1)

    def test_http10_streaming_is_linear(self):
        # The hold-back that gives short responses a Content-Length summed the held blocks
        # again on every write: 64,000 one-byte blocks took 31.6 s.
        self.start_app("--quiet", self.sock)
        timings = []
        for count in (4000, 32000):
            started = time.monotonic()
            answer = raw_request(self.sock, f"GET /drip?{count} HTTP/1.0\r\n\r\n".encode())
            timings.append(time.monotonic() - started)
            self.assertTrue(answer.endswith(b"d" * count))
        self.assertLess(timings[1], 20 * max(timings[0], 0.01))  # linear: 8x; quadratic: 64x

    def test_a_request_that_cannot_be_framed_ends_the_connection(self):
        self.start_app()
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/", close=False) + b"GET / HTTP/1.1\r\nHost: a\r\n"
                         b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab" + request_bytes("/"))
            responses = Responses(sock)
            self.assertEqual(responses.next()[1], 200)
            self.assertEqual(responses.next()[1], 400)
            self.assertTrue(responses.closed())  # the request after it is never read

    def test_an_idle_connection_closes_after_keep_alive_seconds_and_0_turns_it_off(self):
        self.start_app("--keep-alive", "0.5", self.sock)
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/", close=False))
            responses = Responses(sock)
            self.assertEqual(responses.next()[1], 200)
            started = time.monotonic()
            self.assertTrue(responses.closed())
            self.assertLess(time.monotonic() - started, 3.0)
        other = os.path.join(self.dir, "off.sock")
        self.start_app("--keep-alive", "0", other)
        with connect(other) as sock:
            sock.sendall(request_bytes("/", close=False))
            responses = Responses(sock)
            self.assertEqual(responses.next()[2]["connection"], "close")
            self.assertTrue(responses.closed())

    def test_a_large_upload_is_received_whole_and_one_over_the_limit_gets_413(self):
        server = self.start_app("--max-request-body", "3M", self.sock)
        payload = os.urandom(2 * 1024 * 1024)
        self.assertEqual(get(self.sock, "/echo", "POST", body=payload)[0::2], (200, payload))
        conn = unix_connection(self.sock)
        conn.putrequest("POST", "/echo")
        conn.putheader("Content-Length", str(4 * 1024 * 1024))
        conn.endheaders()  # no body sent: the answer comes from the head alone
        response = conn.getresponse()
        self.assertEqual(response.status, 413)
        conn.close()
        with connect(self.sock) as sock:  # chunked: as soon as the body passes the limit
            sock.sendall(request_bytes("/echo", "POST", ["Transfer-Encoding: chunked"]))
            for _ in range(4):
                sock.sendall(b"100000\r\n" + b"x" * 0x100000 + b"\r\n")
            self.assertEqual(Responses(sock).next()[1], 413)
        self.assertNotIn("Traceback", server.log())


class EarlyAnswerTests(ServerTestCase):
    def test_an_early_413_is_heard_not_reset(self):
        # The server answers from the head while the body is still coming; closing with unread
        # bytes would send a reset, and the client would see that instead of the 413.
        server = self.start_app("--max-request-body", "1M", self.sock)
        body = b"x" * (5 * 1024 * 1024)
        heard, resets = 0, 0
        for _ in range(100):
            with connect(self.sock) as sock:
                try:
                    sock.sendall(request_bytes("/echo", "POST", ["Content-Length: %d" % len(body)])
                                 + body)
                    answer = Responses(sock).rest()
                except (ConnectionResetError, BrokenPipeError):
                    resets += 1
                    continue
                heard += status_of(answer) == 413
        self.assertEqual((heard, resets), (100, 0))
        self.assertNotIn("Traceback", server.log())


class ConnectionSlotTests(ServerTestCase):
    def test_idle_or_unfinished_connections_never_lock_a_new_client_out(self):
        self.start_app("--max-connections", "5", self.sock)
        for hold in (request_bytes("/", close=False), b"GET / HTTP/1.1\r\nHost"):
            with self.subTest(hold=hold):
                holders = []
                for _ in range(5):
                    sock = connect(self.sock)
                    sock.sendall(hold)
                    if hold.endswith(b"\r\n\r\n"):
                        self.assertEqual(Responses(sock).next()[1], 200)  # now idle
                    holders.append(sock)
                started = time.monotonic()
                self.assertEqual(get(self.sock)[0], 200)
                self.assertLess(time.monotonic() - started, 1.0)
                # One gave way: the oldest as the engine sees it, which under load may be the
                # second (a connection served by a follower rejoins the selector a moment after
                # its answer went out); more when the last round's closed ones were not yet seen.
                closed = wait_for(lambda: [sock for sock in holders
                                           if select.select([sock], [], [], 0)[0]], "one to close")
                self.assertEqual([sock.recv(100) for sock in closed], [b""] * len(closed))
                for sock in holders:
                    sock.close()

    def test_the_user_holding_the_most_slots_gives_way_first(self):
        # A local process churning connections got nginx's pooled ones closed (273 of 90,075
        # POSTs got 502): the oldest idle connection was the proxy's.
        pid = self.start_app("--mode", "666", "--max-connections", "6", self.sock).proc.pid
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
        pooled = []
        for _ in range(2):  # ours: the "proxy", connected first
            sock = connect(self.sock)
            sock.sendall(request_bytes("/", close=False))
            self.assertEqual(Responses(sock).next()[1], 200)
            pooled.append(sock)
        churner = subprocess.Popen([python_for_nobody(), "-c", (
            "import socket, sys\n"
            "held = []\n"
            "for _ in range(4):  # silent connections\n"
            "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "    held.append(s)\n"
            "print('held', flush=True); sys.stdin.read()\n"), self.sock],
            preexec_fn=as_nobody, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(churner.stdout.close)
        self.addCleanup(churner.wait)
        self.addCleanup(churner.stdin.close)
        self.assertEqual(churner.stdout.readline(), b"held\n")  # six slots taken: full
        wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) == descriptors + 6,
                 "all six to be accepted")
        self.assertEqual(get(self.sock)[0], 200)  # a seventh: one of nobody's four gives way
        for sock in pooled:  # ours were left alone
            sock.sendall(request_bytes("/", close=False))
            self.assertEqual(Responses(sock).next()[1], 200)
            sock.close()

    def test_a_full_server_closes_nothing_until_someone_waits(self):
        # The tenth idle connection made the oldest close at once, though no one waited for a
        # slot: behind a proxy, a pooled connection closed under it.
        self.start_app("--max-connections", "10", self.sock)
        holders = []
        for _ in range(10):
            sock = connect(self.sock)
            sock.sendall(request_bytes("/", close=False))
            self.assertEqual(Responses(sock).next()[1], 200)
            holders.append(sock)
        try:
            for sock in holders:  # all ten still serve
                sock.sendall(request_bytes("/", close=False))
                self.assertEqual(Responses(sock).next()[1], 200)
            self.assertEqual(get(self.sock)[0], 200)  # an eleventh: the oldest idle gives way
        finally:
            for sock in holders:
                sock.close()

    def test_memory_taken_by_a_flood_of_large_heads_is_given_back(self):
        # 1,000 unfinished 198 KB heads took RSS from 29 to 244 MiB, and 220 MiB stayed after
        # they left.
        server = self.start_app("--quiet", self.sock)
        pid = server.proc.pid
        before = process_rss_kb(pid)
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 198000  # no end: unfinished
        flood = []
        for _ in range(300):
            sock = connect(self.sock)
            sock.sendall(head)
            flood.append(sock)
        wait_for(lambda: process_rss_kb(pid) > before + 40000, "the heads to take memory")
        for sock in flood:
            sock.close()
        self.assertEqual(get(self.sock)[0], 200)
        wait_for(lambda: process_rss_kb(pid) < before + 20000, "the memory to be given back")

    def test_a_low_limit_on_open_files_lowers_max_connections_and_still_serves(self):
        # Under 64 descriptors, 60 idle keep-alive clients took them all: accept() failed with
        # EMFILE, nothing gave way, and a new client waited for the whole keep-alive time.
        import resource

        def limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        server = self.start_app("--threads", "2", self.sock, preexec_fn=limit)
        line = server.wait_line("--max-connections lowered")
        self.assertIn("from 1024 to 40: the limit on open files is 64", line)
        holders = []
        try:
            for _ in range(60):
                sock = connect(self.sock)
                sock.sendall(request_bytes("/", close=False))
                holders.append(sock)
            self.assert_served_within(2.0)
        finally:
            for sock in holders:
                sock.close()


class StopTests(ServerTestCase):
    """SIGTERM, SIGINT and the other signals; graceful and at once; inherited sockets."""

    def test_sigterm_closes_idle_connections_and_exits_at_once(self):
        server = self.start_app("--graceful-timeout", "20", self.sock)
        idle = []
        for _ in range(10):
            sock = connect(self.sock)
            sock.sendall(request_bytes("/", close=False))
            Responses(sock).next()
            idle.append(sock)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertLess(time.monotonic() - started, 5.0)  # not the 20 s grace
        for sock in idle:
            self.assertTrue(Responses(sock).closed())
            sock.close()

    def test_a_response_in_flight_at_sigterm_says_connection_close(self):
        server = self.start_app()
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/slow?0.5", close=False))
            server.wait_line("app: /slow started")
            server.signal(signal.SIGTERM)
            self.assert_last_answer(sock, b"slow done\n")
        self.assertEqual(server.wait(), 0)

    def assert_last_answer(self, sock, body):
        """The next response on ``sock`` is a 200 with ``body`` that says Connection: close,
        and the connection closes after it."""
        responses = Responses(sock)
        version, status, headers, got = responses.next()
        self.assertEqual((status, headers.get("connection"), got), (200, "close", body))
        self.assertTrue(responses.closed())

    def test_a_request_on_an_idle_connection_just_after_sigterm_is_served_not_reset(self):
        # A proxy's pooled connection may carry a request at the moment we stop: it gets an
        # answer that says Connection: close, not a reset.
        server = self.start_app("--quiet", self.sock)
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/", close=False))
            Responses(sock).next()
            server.signal(signal.SIGTERM)
            wait_for(lambda: not os.path.lexists(self.sock), "the stop to begin")
            sock.sendall(request_bytes("/", close=False))
            self.assert_last_answer(sock, b"hello\n")
        self.assertEqual(server.wait(), 0)

    def inherited_listener(self):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.sock)
        listener.listen(1024)
        self.addCleanup(listener.close)
        return listener

    def start_on(self, listener, *args):
        fd = listener.fileno()
        return self.start_app("--quiet", *args, f"fd:{fd}", pass_fds=[fd])

    def test_an_inherited_socket_is_close_on_exec_and_left_listening_at_exit(self):
        listener = self.inherited_listener()
        server = self.start_on(listener, "--graceful-timeout", "20")
        with open(f"/proc/{server.proc.pid}/fdinfo/{listener.fileno()}") as f:
            flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
        self.assertTrue(flags & os.O_CLOEXEC)  # a child the app starts does not hold it
        slow = connect(self.sock)
        slow.sendall(request_bytes("/slow?0.5"))
        server.wait_line("app: /slow started")
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        self.assertEqual(Responses(slow).next()[1], 200)  # the request in flight finishes
        self.assertEqual(server.wait(), 0)
        self.assertLess(time.monotonic() - started, 5.0)  # then it exits: not the 20 s grace
        queued = connect(self.sock)  # still listening (systemd's): the next process serves it
        queued.sendall(request_bytes("/"))
        self.start_on(listener)
        self.assertEqual(Responses(queued).next()[1], 200)
        queued.close()
        slow.close()

    def test_a_restart_on_an_inherited_socket_under_load_loses_no_request(self):
        # As systemd does: the socket outlives the service; SIGTERM, then a new process.
        listener = self.inherited_listener()
        server = self.start_on(listener)

        def request():
            with connect(self.sock) as sock:
                sock.sendall(request_bytes("/counted?0.005"))
                return Responses(sock).next()[1]
        with steady_load(request, clients=8) as (done, errors):
            for _ in range(3):
                before = len(done)
                wait_for(lambda: len(done) > before + 100, "requests to be served")
                server.signal(signal.SIGTERM)
                self.assertEqual(server.wait(), 0)
                server = self.start_on(listener)
            wait_for(lambda: len(done) > before + 200, "requests served after the restarts")
        self.assertEqual(errors, [])

    def test_sigterm_refuses_new_connections_and_lets_requests_finish(self):
        server = self.start_app()
        slow = unix_connection(self.sock)
        slow.request("GET", "/slow?1")
        server.wait_line("app: /slow started")
        server.signal(signal.SIGTERM)
        wait_for(lambda: not connectable(self.sock), "new connections to be refused")
        response = slow.getresponse()
        self.assertEqual((response.status, response.read()), (200, b"slow done\n"))
        self.assertEqual(server.wait(), 0)
        self.assertFalse(os.path.lexists(self.sock))

    def test_graceful_timeout_ends_a_request_that_never_finishes(self):
        server = self.start_app("--graceful-timeout", "1", self.sock)
        stuck = unix_connection(self.sock)
        stuck.request("GET", "/forever")
        server.wait_line("app: /forever started")
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertFalse(os.path.lexists(self.sock))
        stuck.close()

    def test_sighup_and_sigquit_stop_gracefully_and_remove_the_socket_file(self):
        for signum in (signal.SIGHUP, signal.SIGQUIT):
            server = self.start_app()
            slow = unix_connection(self.sock)
            slow.request("GET", "/slow?0.3")
            server.wait_line("app: /slow started")
            server.signal(signum)
            response = slow.getresponse()
            self.assertEqual((response.status, response.read()), (200, b"slow done\n"))
            self.assertEqual(server.wait(), 0, signum)
            self.assertFalse(os.path.lexists(self.sock), signum)
            # It says so, naming the signal; SIGHUP did not stop one process silently.
            line = server.wait_line(f"{signal.Signals(signum).name}: stopping gracefully")
            self.assertEqual("does not reload" in line, signum == signal.SIGHUP)

    def test_sigusr2_is_ignored_with_a_line_and_sigusr1_has_no_file_to_reopen(self):
        server = self.start_app()
        server.signal(signal.SIGUSR2)
        server.wait_line("SIGUSR2 means nothing here")
        server.signal(signal.SIGUSR1)
        server.wait_line("SIGUSR1: no --access-log file to reopen")
        self.assertEqual(get(self.sock)[0], 200)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertFalse(os.path.lexists(self.sock))

    def test_a_burst_of_ignored_signals_while_it_logs_changes_nothing(self):
        # A handler that wrote through sys.stderr while the thread it interrupted was in a
        # write there raised "reentrant call": serve_forever() ended, and the next SIGUSR1
        # killed the process (SIGUSR1 then; it reopens the log now).
        server = self.start_app()
        with steady_load(lambda: get(self.sock)[0]) as (done, errors):
            for _ in range(300):
                server.signal(signal.SIGUSR2)
                time.sleep(0.002)  # a signal at a time, each while requests are logged
        self.assertEqual(get(self.sock)[0], 200)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertEqual(errors, [])
        self.assertNotIn("Traceback", server.log())

    def test_sigusr1_reopens_the_access_log_after_logrotate_moved_it(self):
        # Lines went on into the moved file, and SIGUSR1 said "means nothing here".
        log = os.path.join(self.dir, "access.log")
        for workers in ("1", "2"):
            with self.subTest(workers=workers):
                server = self.start_app("--workers", workers, "--access-log", log, self.sock)
                self.assertEqual(get(self.sock, "/before")[0], 404)
                wait_for(lambda: os.path.exists(log) and "/before" in read_text(log),
                         "the first line")
                os.rename(log, log + ".1")  # what logrotate does
                server.signal(signal.SIGUSR1)
                server.wait_line(f"SIGUSR1: reopened {log}")
                if workers == "2":  # each worker reopens its own, after the master
                    wait_for(lambda: server.log().count(f"SIGUSR1: reopened {log}") == 3,
                             "both workers to reopen it")
                for _ in range(10):
                    self.assertEqual(get(self.sock, "/after")[0], 404)
                server.signal(signal.SIGTERM)
                self.assertEqual(server.wait(), 0)
                with open(log) as f:
                    self.assertEqual(f.read().count('"GET /after HTTP/1.1" 404'), 10)
                with open(log + ".1") as f:
                    self.assertNotIn("/after", f.read())
                os.unlink(log)
                os.unlink(log + ".1")

    def test_a_second_sigterm_stops_at_once_with_status_1(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            server = self.start_app("--graceful-timeout", "30", self.sock)
            stuck = unix_connection(self.sock)
            stuck.request("GET", "/forever")
            server.wait_line("app: /forever started")
            server.signal(signum)
            wait_for(lambda: not os.path.lexists(self.sock), "the stop to begin")
            started = time.monotonic()
            server.signal(signum)
            self.assertEqual(server.wait(), 1)
            self.assertLess(time.monotonic() - started, 5.0)  # not the 30 s grace
            self.assertIn("stopped at once by a second signal", server.log())
            self.assertNotIn("Traceback", server.log())
            stuck.close()

    def test_readiness_line_names_the_resolved_address(self):
        os.symlink(self.dir, os.path.join(self.dir, "here"))
        server = self.start("--app", "testapp:app", "app.sock")
        # Who may connect, too: nginx as www-data gets 502 from a 600 socket of root's.
        self.assertEqual(server.wait_ready(), f"wsgi_unix: serving on unix:{self.sock}"
                                              f"{MODE_600_OURS}")


class LoadTests(ServerTestCase):
    def hammer(self, clients, requests, errors, stop=None):
        def client():
            for _ in range(requests):
                if stop is not None and stop.is_set():
                    return
                try:
                    if status_of(raw_request(self.sock, b"GET / HTTP/1.0\r\n\r\n")) != 200:
                        errors.append("status")
                except (OSError, IndexError, ValueError) as exc:
                    errors.append(repr(exc))
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        return threads

    def test_200_concurrent_clients_get_no_errors(self):
        self.start_app("--quiet", self.sock)
        errors = []
        for thread in self.hammer(200, 50, errors):
            thread.join(120)
        self.assertEqual(errors, [])

    def test_descriptor_exhaustion_neither_crashes_nor_spins(self):
        import resource
        server = self.start_app("--quiet", self.sock, preexec_fn=lambda: resource.setrlimit(
            resource.RLIMIT_NOFILE, (64, 64)))
        idle = []
        for _ in range(100):  # connect() succeeds into the backlog even when accept() cannot
            sock = connect(self.sock)
            idle.append(sock)
        try:
            before = process_cpu_seconds(server.proc.pid)
            time.sleep(1.0)
            self.assertLess(process_cpu_seconds(server.proc.pid) - before, 0.5)
            self.assertIsNone(server.proc.poll(), server.log())
        finally:
            for sock in idle:
                sock.close()
        self.assertEqual(get(self.sock)[0], 200)
        server.wait_line("--max-connections lowered from 1024 to 16")  # (and EMFILE evicts)

    def test_sigterm_with_every_descriptor_taken_still_removes_the_socket_file(self):
        import resource
        # (The backlog cannot drain without descriptors: the stop waits out its grace.)
        server = self.start_app("--quiet", "--graceful-timeout", "2", self.sock,
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
        idle = open_idle(self.sock, 100)  # 64 descriptors are soon taken
        try:
            server.wait_line("every connection slot is taken")
            server.signal(signal.SIGTERM)
            self.assertEqual(server.wait(), 0, server.log())  # it exited 1, leaving the file
        finally:
            for sock in idle:
                sock.close()
        self.assertFalse(os.path.lexists(self.sock))
        self.assertNotIn("Traceback", server.log())

    def run_as_nobody_with_few_threads(self, *args, threads_allowed):
        """Start a copy of wsgi_unix.py as nobody, allowed ``threads_allowed`` threads in all
        (as a container's pids limit would), with its socket in a directory nobody owns."""
        import resource
        shutil.copy(SERVER, self.dir)
        run = os.path.join(self.dir, "run")
        os.mkdir(run)
        os.chown(run, 65534, 65534)

        def limited():
            resource.setrlimit(resource.RLIMIT_NPROC, (threads_allowed, threads_allowed))
            as_nobody()
        command = [python_for_nobody(), os.path.join(self.dir, "wsgi_unix.py"), *args,
                   os.path.join(run, "app.sock")]
        return os.path.join(run, "app.sock"), command, limited

    def test_too_few_threads_at_start_up_is_a_one_line_error(self):
        path, command, limited = self.run_as_nobody_with_few_threads(threads_allowed=5)
        result = subprocess.run(command, cwd=self.dir, preexec_fn=limited, capture_output=True,
                                text=True, timeout=DEADLINE)
        lines = result.stderr.splitlines()
        self.assertEqual(result.returncode, 1, lines)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("cannot start 8 threads", lines[0])
        self.assertFalse(os.path.lexists(path))

    def test_sigterm_under_load_completes_requests_and_exits_cleanly(self):
        server = self.start_app("--quiet", self.sock)
        errors, stop = [], threading.Event()
        threads = self.hammer(16, 100000, errors, stop)
        wait_for(lambda: get(self.sock)[0] == 200, "load to be under way")
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)
        self.assertFalse(os.path.lexists(self.sock))
        # A client either got its whole answer or could not connect; never a broken one.
        broken = [e for e in errors if "ConnectionRefused" not in e and "FileNotFound" not in e]
        self.assertEqual(broken, [], server.log())

    def test_after_sigkill_under_load_the_next_start_serves(self):
        server = self.start_app("--quiet", self.sock)
        errors, stop = [], threading.Event()
        threads = self.hammer(8, 100000, errors, stop)
        server.signal(signal.SIGKILL)
        server.wait()
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.sock).st_mode))  # left behind, stale
        self.start_app("--quiet", self.sock)
        self.assertEqual(get(self.sock)[0], 200)

    @unittest.skipUnless(os.environ.get("WSGI_UNIX_SOAK"), "set WSGI_UNIX_SOAK=SECONDS to soak")
    def test_soak_keeps_memory_descriptors_and_threads_flat(self):
        seconds = float(os.environ["WSGI_UNIX_SOAK"])
        server = self.start_app("--quiet", "--threads", "4", self.sock)
        pid = server.proc.pid
        self.assertEqual(get(self.sock)[0], 200)
        idle_threads = wait_for(lambda: process_threads(pid) == 5 and 5, "4 threads and main")
        idle_fds = len(os.listdir(f"/proc/{pid}/fd"))
        errors, stop = [], threading.Event()
        threads = self.hammer(16, 10 ** 9, errors, stop)
        time.sleep(min(5.0, seconds / 4))
        warm_rss = process_rss_kb(pid)
        time.sleep(seconds)
        end_rss = process_rss_kb(pid)
        stop.set()
        for thread in threads:
            thread.join(DEADLINE)
        # (The idle counts may include the first request's connection, not yet closed.)
        wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= idle_fds, "descriptors back to idle")
        wait_for(lambda: process_threads(pid) <= idle_threads, "threads back to idle")
        print(f"\n    soak {seconds:.0f} s: RSS {warm_rss / 1024:.1f} -> {end_rss / 1024:.1f} MiB, "
              f"fds {idle_fds}, threads {idle_threads}, errors {len(errors)}", file=sys.stderr)
        self.assertLess(end_rss, warm_rss * 1.10)
        self.assertEqual(errors, [])


# --- §6 wsgiref glue: the server, the environ, response framing, the access log -----------

class ResponseFramingUnitTests(unittest.TestCase):
    """ServerHandler's framing, on bytes: what goes out for each kind of response, no socket."""

    class Wire(io.BytesIO):  # what _SocketWriter is to ServerHandler
        progress = None

        @property
        def sent(self):
            return len(self.getvalue())

    class RequestHandler:  # the request handler's part that ServerHandler uses
        close_connection = False

        def __init__(self):
            self.logged = []
            self.server = types.SimpleNamespace(
                stopping=False, log_line=lambda message, **_: self.logged.append(message))

        def log_request(self, code="-", size="-"):
            self.logged.append(f"{code} {size}")

        def log_error(self, format, *args):
            self.logged.append(format % args)

    def respond(self, app, method="GET", version="1.1"):
        """(what went out, the handler) for ``app``'s answer to a request."""
        wire, request_handler = self.Wire(), self.RequestHandler()
        environ = {"REQUEST_METHOD": method, "SERVER_PROTOCOL": f"HTTP/{version}",
                   "SERVER_NAME": "localhost", "SERVER_PORT": "80", "PATH_INFO": "/",
                   "SCRIPT_NAME": "", "QUERY_STRING": ""}
        handler = wsgi_unix.ServerHandler(io.BytesIO(), wire, io.StringIO(), environ,
                                          multithread=True)
        handler.request_handler, handler.http_version = request_handler, version
        handler.run(app)
        return wire.getvalue(), handler

    @staticmethod
    def app(status, headers, body, fail_after=None):
        def application(environ, start_response):
            start_response(status, list(headers))  # (wsgiref adds to the list it is given)
            if fail_after is None:
                return body

            def failing():
                yield from body[:fail_after]
                raise RuntimeError("late boom")
            return failing()
        return application

    def test_each_kind_of_response_is_framed_as_the_docstring_says(self):
        text = [("Content-Type", "text/plain")]
        # (status, headers, body, method, version) -> (framing header, body on the wire,
        # the connection after it)
        for case, expected in [
                (("200 OK", text, [b"he", b"llo"], "GET", "1.1"),
                 ("Content-Length: 5", b"hello", "kept")),  # a list: counted
                (("200 OK", text, iter([b"he", b"llo"]), "GET", "1.1"),
                 ("Transfer-Encoding: chunked", b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n", "kept")),
                (("200 OK", text, iter([b"he", b"llo"]), "GET", "1.0"),
                 ("Content-Length: 5", b"hello", "kept")),  # held back, then counted
                (("200 OK", text + [("Content-Length", "5")], iter([b"hello"]), "GET", "1.1"),
                 ("Content-Length: 5", b"hello", "kept")),
                (("200 OK", text, [b"hello"], "HEAD", "1.1"),
                 ("Content-Length: 5", b"", "kept")),
                (("204 No Content", [], iter([b"ignored"]), "GET", "1.1"),
                 (None, b"", "kept")),
                (("304 Not Modified", [], iter([b"ignored"]), "GET", "1.1"),
                 (None, b"", "kept")),
                (("103 Early Hints", [], [b""], "GET", "1.1"),
                 ("Content-Length: ", None, "kept"))]:  # no final answer: 500
            with self.subTest(case=case[::3]):
                status, headers, body, method, version = case
                wire, handler = self.respond(self.app(status, headers, body), method, version)
                head, _, sent = wire.partition(b"\r\n\r\n")
                framing, body_sent, after = expected
                if status.startswith("1"):
                    self.assertTrue(head.startswith(b"HTTP/1.1 500 "), wire)
                    continue
                self.assertTrue(head.startswith(f"HTTP/{version} {status}".encode()), wire)
                for header in ("Content-Length: ", "Transfer-Encoding: "):
                    self.assertEqual(header.encode() in head,
                                     bool(framing) and framing.startswith(header), head)
                if framing:
                    self.assertIn(framing.encode(), head)
                self.assertEqual(sent, body_sent)
                self.assertEqual(handler.aborted, after != "kept")

    def test_an_app_that_fails_after_its_head_aborts_without_the_last_chunk(self):
        wire, handler = self.respond(self.app("200 OK", [], [b"first", b"second"], fail_after=1))
        self.assertTrue(wire.endswith(b"5\r\nfirst\r\n"), wire)  # no 0\r\n\r\n: truncated
        self.assertTrue(handler.aborted)

    def test_an_app_that_fails_before_its_head_gets_500(self):
        def failing(environ, start_response):
            raise RuntimeError("early boom")
        with contextlib.redirect_stderr(io.StringIO()):
            wire, handler = self.respond(failing)
        self.assertTrue(wire.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), wire)
        self.assertFalse(handler.aborted)

    def test_a_body_short_of_or_past_its_length(self):
        wire, handler = self.respond(self.app("200 OK", [("Content-Length", "100")],
                                              iter([b"x" * 10])))
        self.assertTrue(handler.aborted)  # short: the connection must not be reused
        self.assertTrue(wire.endswith(b"\r\n\r\n" + b"x" * 10))
        wire, handler = self.respond(self.app("200 OK", [("Content-Length", "5")],
                                              iter([b"12345", b"67890"])))
        self.assertTrue(wire.endswith(b"\r\n\r\n12345"), wire)  # what is past it is dropped
        self.assertFalse(handler.aborted)  # and the connection is good for the next request
        self.assertIn("more than its Content-Length (5) for GET /; the rest was dropped",
                      handler.request_handler.logged[0])


class SocketWriterUnitTests(unittest.TestCase):
    """_SocketWriter.cut(), from the thread that finds a request past --request-timeout."""

    def pair(self):
        ours, client = socket.socketpair()
        ours.setblocking(False)
        self.addCleanup(ours.close)
        self.addCleanup(client.close)
        return wsgi_unix._SocketWriter(ours, 5.0), client

    def read_all(self, client):
        client.settimeout(DEADLINE)
        chunks = []
        while True:
            chunk = client.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def test_the_answer_goes_instead_only_if_nothing_went_out_and_later_writes_fail(self):
        answer = b"HTTP/1.1 504 Gateway Timeout\r\n\r\n"
        # (what went out before the cut) -> (answered, what the client reads)
        for before, answered, wire in [(b"", True, answer),
                                       (b"HTTP/1.1 200 OK\r\n\r\nfirst", False,
                                        b"HTTP/1.1 200 OK\r\n\r\nfirst")]:
            with self.subTest(before=before):
                writer, client = self.pair()
                if before:
                    writer.write(before)
                self.assertEqual(writer.cut(answer), answered)
                with self.assertRaises(BrokenPipeError):
                    writer.write(b"late")
                self.assertEqual(self.read_all(client), wire)

    def test_during_a_write_it_does_not_split_it(self):
        writer, client = self.pair()
        with writer.lock:  # a write under way, in another thread
            self.assertFalse(writer.cut(b"HTTP/1.1 504 Gateway Timeout\r\n\r\n"))
        self.assertEqual(self.read_all(client), b"")


class AccessLogFieldUnitTests(unittest.TestCase):
    """A field of an access line (§6): escaped as nginx does, and cut short."""

    def test_fields(self):
        table = [('plain', 'plain'), ('a"b', 'a\\x22b'), ('back\\slash', 'back\\\\slash'),
                 ('new\nline', 'new\\x0aline'), ('x' * 900, 'x' * 797 + '...'),
                 ('\u00e9' * 500, '\u00e9' * 398 + '...')]  # bytes of UTF-8 count, not characters
        for text, logged in table:
            with self.subTest(text=text[:20]):
                self.assertEqual(wsgi_unix._log_field(text, 800), logged)


class RequestTests(ServerTestCase):
    def environ(self, headers=None, url="/env"):
        status, _, body = get(self.sock, url, headers=headers)
        self.assertEqual(status, 200)
        return json.loads(body)

    def test_unix_peer_has_empty_remote_addr_and_dash_in_log(self):
        server = self.start_app()
        environ = self.environ()
        self.assertEqual(environ["REMOTE_ADDR"], "")
        self.assertEqual(environ["SERVER_NAME"], "localhost")
        self.assertEqual(environ["SERVER_PORT"], "80")
        self.assertTrue(environ["SERVER_PORT"].isdigit())
        self.assertTrue(server.wait_line('"GET /env HTTP/1.1" 200').startswith("- - - ["))

    def test_nothing_from_the_process_environment_reaches_the_app(self):
        env = {"PATH": os.environ["PATH"], "SECRET": "hunter2-secret", "HTTPS": "on",
               "HTTP_X_FOO": "injected", "REMOTE_USER": "root", "SCRIPT_NAME": "/evil"}
        self.start_app(env=env)
        environ = self.environ()
        text = json.dumps(environ)
        for leaked in ("hunter2-secret", "injected", "HTTP_X_FOO", "REMOTE_USER", "SECRET", "/evil"):
            self.assertNotIn(leaked, text)
        self.assertNotIn("PATH", environ)
        self.assertEqual(environ["wsgi.url_scheme"], "http")
        self.assertEqual(environ["SCRIPT_NAME"], "")

    def test_header_names_with_underscores_are_dropped(self):
        self.start_app()
        environ = self.environ({"X_Auth_User": "mallory"})
        self.assertNotIn("HTTP_X_AUTH_USER", environ)
        environ = self.environ({"X-Auth-User": "alice", "X_Auth_User": "mallory"})
        self.assertEqual(environ["HTTP_X_AUTH_USER"], "alice")

    def test_request_keys_are_as_in_cgi(self):
        self.start_app()
        environ = self.environ({"Content-Type": "text/x-test"}, url="/env/%41?q=1&r=%41")
        self.assertEqual(environ["PATH_INFO"], "/env/A")
        self.assertEqual(environ["QUERY_STRING"], "q=1&r=%41")
        self.assertEqual(environ["CONTENT_TYPE"], "text/x-test")
        self.assertEqual(environ["REQUEST_METHOD"], "GET")
        self.assertEqual(environ["SERVER_PROTOCOL"], "HTTP/1.1")
        self.assertIs(environ["wsgi.multithread"], True)

    def test_http_0_9_request_gets_a_status_line_not_a_bare_body(self):
        self.start_app()
        answer = raw_request(self.sock, b"GET /\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:80])

    def test_requests_are_served_concurrently_by_the_threads(self):
        self.start_app("--threads", "4", self.sock)
        results = []
        threads = [threading.Thread(target=lambda: results.append(get(self.sock, "/barrier?4")[0]))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        self.assertEqual(results, [200] * 4)  # the barrier lets none through until all 4 arrive

    def test_listen_backlog_is_large(self):
        # One thread, busy: connections queue in the backlog.  wsgiref's 5 would refuse most.
        server = self.start_app("--threads", "1", self.sock)
        busy = unix_connection(self.sock)
        busy.request("GET", "/forever")
        server.wait_line("app: /forever started")
        clients = []
        try:
            for _ in range(200):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                clients.append(client)
                client.connect(self.sock)  # raises BlockingIOError when the backlog is full
        finally:
            for client in clients:
                client.close()
            busy.close()

    def test_no_dns_lookup_at_start_up_or_per_request(self):
        calls = []
        saved = {name: getattr(socket, name) for name in
                 ("getfqdn", "gethostbyaddr", "gethostbyname", "gethostbyname_ex", "getnameinfo")}

        def spy(name):
            def called(*args, **kwargs):
                calls.append(name)
                return saved[name](*args, **kwargs)
            return called
        for name in saved:
            setattr(socket, name, spy(name))
        log = io.StringIO()
        try:
            with contextlib.redirect_stderr(log):  # the access log, which must not look up either
                for address in (self.sock, "127.0.0.1:0"):
                    with wsgi_unix.make_server(address, lambda e, s: (s("200 OK", []), [b"x"])[1],
                                               access_log=True) as server:
                        thread = threading.Thread(target=server.serve_forever)
                        thread.start()
                        target = (server.server_address if server.address_family != socket.AF_UNIX
                                  else self.sock)
                        answer = raw_request(target, b"GET / HTTP/1.0\r\n\r\n")
                        self.assertEqual(status_of(answer), 200)
                        server.shutdown()
                        thread.join(DEADLINE)
        finally:
            for name, function in saved.items():
                setattr(socket, name, function)
        self.assertEqual(calls, [])
        self.assertEqual(log.getvalue().count('"GET / HTTP/1.0" 200 1'), 2)


class ApplicationFaultTests(ServerTestCase):
    def test_app_error_before_start_response_gives_a_generic_500(self):
        server = self.start_app()
        status, _, body = get(self.sock, "/error")
        self.assertEqual(status, 500)
        self.assertNotIn(b"boom", body)
        server.wait_line("RuntimeError: boom")
        self.assertEqual(get(self.sock)[0], 200)

    def test_app_error_after_headers_closes_the_connection_short(self):
        server = self.start_app()
        conn = unix_connection(self.sock)
        self.addCleanup(conn.close)
        conn.request("GET", "/error-after-headers")
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        with self.assertRaises(http.client.IncompleteRead):
            response.read()
        server.wait_line("RuntimeError: late boom")
        self.assertEqual(server.log().count("RuntimeError: late boom"), 1)

    def test_malformed_app_results_give_500(self):
        server = self.start_app()
        for path in ("/not-iterable", "/bad-status", "/bad-header", "/wide-status"):
            answer = raw_request(self.sock, request_bytes(path))
            self.assertEqual(status_of(answer), 500, path)
            self.assertNotIn(b"Set-Cookie", answer)
        server.wait_line("malformed response header")

    def test_close_is_called_also_when_the_client_goes_away(self):
        server = self.start_app("--threads", "1", self.sock)
        done = os.path.join(self.dir, "closed-1")
        self.assertEqual(get(self.sock, f"/closing?{done},65536")[0], 200)
        wait_for(lambda: os.path.exists(done), "close() after a complete response")
        gone = os.path.join(self.dir, "closed-2")
        with connect(self.sock) as sock:
            sock.sendall(request_bytes(f"/closing?{gone},{10 * 1024 * 1024}"))
            sock.recv(1024)
        wait_for(lambda: os.path.exists(gone), "close() after the client went away")
        server.wait_line(f'"GET /closing?{gone},10485760 HTTP/1.1" 499 ')  # nginx's status
        self.assertEqual(get(self.sock)[0], 200)  # the only thread is free again
        self.assertNotIn("Traceback", server.log())
        self.assertNotIn("client went away", server.log())  # an access line, not an error
        # A client that left before anything went out: 0 bytes sent, as nginx logs it (it
        # showed the app's body size).
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/slow?0.3"))
        server.wait_line('"GET /slow?0.3 HTTP/1.1" 499 0 ')

    def test_the_access_log_is_nginx_combined_with_the_duration(self):
        log = os.path.join(self.dir, "access.log")
        server = self.start_app("--proxy-headers", "--access-log", log, self.sock)
        get(self.sock, "/env", headers={"X-Forwarded-For": "203.0.113.9",
                                        "Referer": "http://ref.example/", "User-Agent": "ua/1.0"})
        get(self.sock, "/")
        conn = unix_connection(self.sock)  # the app fails after its head: still a line
        conn.request("GET", "/error-after-headers")
        conn.getresponse()
        conn.close()
        server.wait_line("RuntimeError: late boom")
        def read_lines():
            with open(log) as f:
                return f.read().splitlines()
        wait_for(lambda: len(read_lines()) >= 3, "three access-log lines")
        # In the order the requests were made (threads may write their lines in another).
        lines = sorted(read_lines(), key=lambda line: ("/env" not in line, "/error" in line))
        self.assertRegex(lines[0], r'^203\.0\.113\.9 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                                   r'"GET /env HTTP/1\.1" 200 \d+ "http://ref\.example/" "ua/1\.0" '
                                   r'\d+\.\d{3}$')
        self.assertTrue(lines[1].startswith("- - - ["), lines[1])  # a Unix peer, no proxy headers
        self.assertIn('"GET /error-after-headers HTTP/1.1" 200 ', lines[2])
        self.assertNotIn("GET /", server.log())  # the access log went to the file only

    def test_an_access_line_cannot_be_forged_and_stays_under_pipe_buf(self):
        server = self.start_app(self.sock)
        agent = 'evil" 200 0 "-" "forged' + "z" * 60000
        self.assertEqual(get(self.sock, "/", headers={"User-Agent": agent})[0], 200)
        line = server.wait_line('"GET / HTTP/1.1" 200')
        self.assertIn('"evil\\x22 200 0 \\x22-\\x22 \\x22forged', line)
        self.assertEqual(line.count('"'), 6)  # the request line, referer, user agent
        self.assertLess(len(line.encode()), 4096)

    def test_the_access_log_to_stdout_and_a_quiet_client_that_left(self):
        proc = subprocess.Popen([sys.executable, SERVER, "--access-log", "-", "--app",
                                 "testapp:app", self.sock], cwd=self.dir, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        wait_for(lambda: connectable(self.sock), "the server")
        get(self.sock)
        self.assertIn('"GET / HTTP/1.1" 200 6 "-" "-" ', proc.stdout.readline())  # line-buffered
        # With --quiet, a client that leaves costs no line at all (it cost one each, as errors).
        quiet = os.path.join(self.dir, "quiet.sock")
        server = self.start_app("--quiet", "--threads", "1", quiet)  # served in turn
        for _ in range(5):
            with connect(quiet) as sock:
                sock.sendall(request_bytes("/big?10000000"))
                sock.recv(100)
        self.assertEqual(get(quiet)[0], 200)
        self.assertEqual(server.log().splitlines(),
                         [f"wsgi_unix: serving on unix:{quiet}{MODE_600_OURS}"])

    def test_when_every_thread_is_stuck_a_line_says_so(self):
        server = self.start_app("--threads", "2", "--timeout", "1", self.sock)
        stuck = [unix_connection(self.sock) for _ in range(2)]
        for conn in stuck:
            conn.request("GET", "/forever")
        line = server.wait_line("threads have been busy")
        self.assertIn("all 2 threads have been busy for more than 1 s; the oldest request, "
                      "GET /forever, for ", line)
        for conn in stuck:
            conn.close()

    def test_an_app_that_blocks_forever_does_not_block_others(self):
        server = self.start_app("--threads", "2", self.sock)
        stuck = unix_connection(self.sock)
        stuck.request("GET", "/forever")
        server.wait_line("app: /forever started")
        self.assertEqual(get(self.sock)[0], 200)
        stuck.close()


class TruncationTests(ServerTestCase):
    """A response that could not be finished never looks complete."""

    def test_a_chunked_response_that_fails_has_no_last_chunk(self):
        server = self.start_app()
        conn = unix_connection(self.sock)
        conn.request("GET", "/stream-error?1000")
        response = conn.getresponse()
        self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
        with self.assertRaises(http.client.IncompleteRead):
            response.read()
        conn.close()
        server.wait_line("RuntimeError: late boom")
        self.assertEqual(get(self.sock)[0], 200)

    def test_a_short_body_is_never_followed_by_another_response(self):
        self.start_app()
        with connect(self.sock) as sock:
            sock.sendall(request_bytes("/short", close=False) + request_bytes("/"))
            responses = Responses(sock)
            with self.assertRaises(EOFError):  # 10 of its 100 bytes, then the end
                responses.next()

    def test_over_tcp_a_truncated_response_is_a_reset(self):
        curl = require_tool(self, "curl")
        server = self.start_app("127.0.0.1:0")
        port = int(server.wait_ready().rsplit(":", 1)[1])
        for url, http10 in (("/error-after-headers", False), ("/stream-error?100000", True),
                            ("/stream-error?10", False)):
            with self.subTest(url=url, http10=http10):
                result = subprocess.run([curl, "-sS", "-o", "/dev/null", "--max-time", "5"]
                                        + (["--http1.0"] if http10 else [])
                                        + [f"http://127.0.0.1:{port}{url}"],
                                        capture_output=True, text=True)
                self.assertNotEqual(result.returncode, 0, result.stderr)  # 18 or 56, not 0
        # An HTTP/1.0 response that ends within 64 KiB got a Content-Length: a short one shows.
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /stream?1000 HTTP/1.0\r\n\r\n")
            self.assertEqual(Responses(sock).next()[2]["content-length"], "1000")


class EngineAPITests(ServerTestCase):
    def test_one_request_entry_points_say_they_do_not_apply(self):
        with wsgi_unix.make_server(self.sock, lambda environ, start_response: []) as server:
            for name in ("handle_request", "process_request", "finish_request"):
                with self.assertRaises(NotImplementedError):
                    getattr(server, name)(*([None, None] if name != "handle_request" else []))

    def test_unknown_keywords_are_a_type_error(self):
        with self.assertRaises(TypeError):
            wsgi_unix.make_server(self.sock, None, thread=4)
        self.assertFalse(os.path.lexists(self.sock))

    def test_keywords_are_checked_as_the_cli_checks_options(self):
        app = None  # no request is ever served here
        for keywords, error, naming in (({"threads": 0}, ValueError, "threads"),
                                        ({"max_connections": -1}, ValueError, "max_connections"),
                                        ({"timeout": float("nan")}, ValueError, "timeout"),
                                        ({"keep_alive": -1}, ValueError, "keep_alive"),
                                        ({"threads": "8"}, TypeError, "threads"),
                                        ({"mode": "660"}, TypeError, "0o660"),
                                        ({"mode": 0o1777}, ValueError, "mode"),
                                        ({"max_spool": -1}, ValueError, "max_spool"),
                                        ({"group": -1}, wsgi_unix.ServeError, "gid -1"),
                                        ({"group": 2 ** 32}, wsgi_unix.ServeError, "gid"),
                                        ({"max_spool": "1M"}, TypeError, "max_spool")):
            with self.subTest(keywords=keywords):
                with self.assertRaises(error) as caught:
                    wsgi_unix.make_server(self.sock, app, **keywords)
                self.assertIn(naming, str(caught.exception))
        self.assertFalse(os.path.lexists(self.sock))
        with self.assertRaises(TypeError) as caught:  # arguments swapped
            wsgi_unix.make_server(lambda environ, start_response: [], self.sock)
        self.assertIn("(host, port) tuple", str(caught.exception))

    def test_an_address_may_be_a_path_or_a_host_and_port_tuple(self):
        import pathlib
        with wsgi_unix.make_server(pathlib.Path(self.sock), None) as server:
            self.assertEqual(str(server), f"unix:{self.sock}")
            # The path it serves on, not the private one it was bound at before the link.
            self.assertEqual(server.server_address, self.sock)
        with wsgi_unix.make_server(("127.0.0.1", 0), None) as server:
            self.assertEqual(server.listen_address.kind, "tcp")


# --- §8 Worker processes (§7, processes, is tested through them and the CLI) --------------

class MasterDecisionUnitTests(unittest.TestCase):
    """The master's decisions on a clock the test moves, its effects recorded: no fork."""

    class Master(wsgi_unix._Master):
        def __init__(self, count=2, **options):
            super().__init__("app:app", "unused.sock", count, dict(options))
            self.did, self.last_pid = [], 100

        def log_line(self, message):
            self.did.append(("log", message))

        def _tell(self, worker, word):
            self.did.append(("tell", worker.pid, word))

        def _signal(self, worker, signum):
            self.did.append(("signal", worker.pid, signal.Signals(signum).name))

        def _notify(self, state):
            self.did.append(("notify", state))

        def _announce(self, pids):
            self.did.append(("announce", pids))

        def _spawn(self, now):
            self.last_pid += 1
            self.did.append(("spawn", self.last_pid))
            worker = self.workers[self.last_pid] = wsgi_unix._Worker(self.last_pid,
                                                                     self.generation, None, now)
            return worker

        def step(self, now, *said):
            """What the loop does at ``now``, after the workers said ``said`` (pid, word)."""
            self.did = []
            for pid, word in said:
                self._heard(self.workers[pid], word, now)
            self._kill_overdue(now)
            if not self.stopping:
                self._keep_up(now)
            return self.did

        def end(self, pid, now, status=0):
            self.did = []
            self._ended(self.workers[pid], status, now)
            return self.did

    def started(self, count=2):
        master = self.Master(count, graceful_timeout=10)
        self.assertEqual(master.step(0.0), [("spawn", 101)])  # the first alone
        self.assertEqual(master.step(0.1), [])  # not until it serves
        self.assertEqual(master.step(0.2, (101, "R")), [("spawn", 102)][:count - 1])
        master.step(0.3, (102, "R")) if count > 1 else None
        return master

    def test_start_one_then_the_rest_then_announce(self):
        master = self.Master(2)
        self.assertEqual(master.step(0.0), [("spawn", 101)])
        self.assertEqual(master.step(0.2, (101, "R")), [("spawn", 102)])
        self.assertEqual(master.step(0.3, (102, "R")),
                         [("announce", "101 102"), ("notify", "READY=1")])
        self.assertEqual(master.step(5.0), [])  # nothing more to do

    def test_first_worker_dying_before_it_serves_is_a_failed_start(self):
        master = self.Master(2)
        master.step(0.0)
        did = master.end(101, 0.5, status=1 << 8)
        self.assertIn("the first worker exited with status 1 before it served", master.error)
        self.assertTrue(master.stopping)
        self.assertEqual(did, [("notify", "STOPPING=1")])

    def test_a_worker_that_dies_is_replaced_at_once_or_after_a_doubling_backoff(self):
        master = self.started()
        quick = wsgi_unix.WORKER_QUICK_DEATH
        self.assertEqual(master.end(101, 5.0, status=signal.SIGKILL),
                         [("log", "worker 101 was killed by SIGKILL; starting another")])
        self.assertEqual(master.step(5.0), [("spawn", 103)])
        delays = []
        now = 5.0
        for attempt in range(1, wsgi_unix.WORKER_GIVE_UP):  # dies at once, again and again
            pid = master.last_pid
            master.step(now + 0.01, (pid, "R"))
            master.end(pid, now + quick / 2, status=1 << 8)
            delays.append(master.retry_at - (now + quick / 2))
            now = master.retry_at
            self.assertEqual(master.step(now - 0.001), [])  # not before the backoff
            self.assertEqual(master.step(now), [("spawn", pid + 1)])
        self.assertEqual([round(delay, 6) for delay in delays],
                         [wsgi_unix.WORKER_RETRY * 2 ** n for n in range(len(delays))])
        master.end(master.last_pid, now + 0.01, status=1 << 8)  # one too many
        self.assertIn("workers keep failing", master.error)

    def test_a_worker_that_asks_is_replaced_by_one_that_serves_first(self):
        master = self.started()
        did = master.step(10.0, (101, "Qserved 57 requests (--max-requests)"))
        self.assertEqual(did, [("log", "worker 101 served 57 requests (--max-requests); "
                                       "replacing it"), ("spawn", 103)])
        self.assertEqual(master.step(10.05), [])  # 101 serves on meanwhile
        self.assertEqual(master.step(10.1, (103, "R")), [("tell", 101, b"S")])
        self.assertEqual(master.workers[101].kill_at, 10.1 + 10 + wsgi_unix.WORKER_KILL_AFTER)
        self.assertEqual(master.step(10.2, (101, "Qran GET / for 2.0 s")),  # retiring: a line
                         [("log", "worker 101 ran GET / for 2.0 s")])
        self.assertEqual(master.end(101, 10.5), [])  # a retiring worker's end is expected

    def test_a_second_word_from_a_replacing_worker_is_logged_without_a_second_replacement(self):
        master = self.started()
        master.step(10.0, (101, "Qran GET /a for 2.0 s (--request-timeout 2)"))
        did = master.step(10.0, (101, "Qran GET /b for 2.0 s (--request-timeout 2)"))
        self.assertEqual(did, [("log", "worker 101 ran GET /b for 2.0 s (--request-timeout 2)")])
        self.assertEqual(master.end(101, 10.1, status=0), [])  # it stopped by itself (memory)
        self.assertEqual(master.step(10.2, (103, "R")), [])  # the replacement serves
        self.assertEqual(len(master.workers), 2)

    def test_a_worker_that_lingers_past_its_grace_is_killed_once(self):
        master = self.started()
        master.step(10.0, (101, "Qserved 50 requests"))
        master.step(10.1, (103, "R"))
        due = master.workers[101].kill_at
        self.assertEqual(master.step(due - 0.01), [])
        self.assertEqual(master.step(due), [
            ("log", "worker 101 still runs 15 s after it was told to stop: killed"),
            ("signal", 101, "SIGKILL")])
        self.assertEqual(master.step(due + 1), [])

    def test_sighup_reloads_one_then_the_rest_then_retires_the_old(self):
        master = self.started()
        master.did = []
        master._on_signal(signal.SIGHUP, 20.0)
        self.assertEqual(master.did, [("notify", "RELOADING=1\nMONOTONIC_USEC=20000000"),
                                      ("log", "SIGHUP: reloading: starting 2 new workers")])
        self.assertEqual(master.step(20.0), [("spawn", 103)])
        self.assertEqual(master.step(20.2, (103, "R")), [("spawn", 104)])
        self.assertEqual(master.step(20.3, (104, "R")), [
            ("tell", 101, b"S"), ("tell", 102, b"S"),
            ("log", "reloaded: workers 103 104 serve; 101 102 finish their requests and exit"),
            ("notify", "READY=1")])

    def test_a_reload_whose_first_worker_fails_keeps_the_old_generation(self):
        master = self.started()
        master._on_signal(signal.SIGHUP, 20.0)
        master.step(20.0)
        did = master.end(103, 20.5, status=1 << 8)
        self.assertEqual(did, [("log", "reload failed: the first new worker exited with status "
                                       "1 before it served; the old workers keep serving"),
                               ("notify", "READY=1")])
        self.assertEqual(master.generation, 1)
        self.assertEqual(master.step(21.0), [])  # the old ones are the generation again

    def test_a_stop_then_a_second_signal(self):
        master = self.started()
        master.did = []
        master._on_signal(signal.SIGTERM, 30.0)
        self.assertEqual(master.did, [("log", "SIGTERM: stopping gracefully"),
                                      ("notify", "STOPPING=1"),
                                      ("tell", 101, b"S"), ("tell", 102, b"S")])
        master.did = []
        master._on_signal(signal.SIGINT, 31.0)
        self.assertEqual(master.did[1:], [("signal", 101, "SIGTERM"), ("signal", 101, "SIGINT"),
                                          ("signal", 102, "SIGTERM"), ("signal", 102, "SIGINT")])
        self.assertTrue(master.at_once)

    def test_the_drawing_is_the_table_and_a_move_outside_it_is_refused(self):
        drawing = wsgi_unix._Master.__doc__.split("refuses any other)::")[1].split("\n\n")[1]
        drawn = set(re.findall(r"^\s+(\w+)\s+--.*?-+> (\w+)", drawing, re.M))
        table = {(a, b) for a, targets in wsgi_unix._WORKER_MOVES.items() for b in targets}
        self.assertEqual(drawn, table)
        worker = wsgi_unix._Worker(1, 1, None, 0.0)
        with self.assertRaisesRegex(RuntimeError, "from forked to replacing"):
            worker.move(wsgi_unix._REPLACING)

    def test_every_move_the_decisions_make_is_in_the_table(self):
        # Each test above went through Worker.move(); here, the states a stop, a kill and a
        # reap leave, and that the dead are forgotten.
        master = self.started()
        master.step(10.0, (101, "Qserved 50 requests"))
        self.assertEqual(master.workers[101].state, "replacing")
        master.step(10.1, (103, "R"))
        self.assertEqual([w.state for w in master.workers.values()],
                         ["retiring", "serving", "serving"])
        master.step(master.workers[101].kill_at)
        self.assertEqual(master.workers[101].state, "killed")
        worker = master.workers[101]
        master.end(101, 30.0, status=signal.SIGKILL)
        self.assertEqual((worker.state, 101 in master.workers), ("reaped", False))


class WorkerTests(ServerTestCase):
    def start_workers(self, count=2, *args, **kwargs):
        server = self.start_app("--workers", str(count), *args, self.sock, **kwargs)
        pids = worker_pids(server.wait_ready())
        self.assertEqual(len(pids), count)
        return server, pids

    def served_by(self, count=20):
        return {int(get(self.sock, "/pid")[2]) for _ in range(count)}

    def test_n_workers_serve_one_socket_and_sigterm_leaves_nothing(self):
        server, pids = self.start_workers(3)
        self.assertEqual(children(server.proc.pid), pids)  # the master's children, in /proc
        self.assertIn(f"serving on unix:{self.sock}{MODE_600_OURS} with 3 workers",
                      server.wait_ready())
        for pid in pids:  # each worker is a wsgi_unix process, not the master
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                self.assertIn(b"wsgi_unix.py", f.read())
        served = set()
        for _ in range(5):  # concurrent requests reach more than one worker
            run_together(lambda: served.add(int(get(self.sock, "/pid?")[2])), 12)
        self.assertTrue(served <= pids, (served, pids))
        self.assertNotIn(server.proc.pid, served)  # the master serves nothing itself
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertFalse(os.path.lexists(self.sock))
        for pid in pids:
            wait_for(lambda: not process_alive(pid), f"worker {pid} to exit")

    def test_a_killed_worker_is_replaced_and_requests_keep_succeeding(self):
        server, pids = self.start_workers(2)
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        line = server.wait_line(f"worker {victim} was killed by SIGKILL")
        self.assertIn("starting another", line)
        now = wait_for(lambda: len(children(server.proc.pid)) == 2 and children(server.proc.pid),
                       "a replacement")
        self.assertNotIn(victim, now)
        self.assertIn(max(pids), now)  # the other one was left alone
        for _ in range(50):
            self.assertEqual(get(self.sock)[0], 200)
        new = (now - pids).pop()
        os.kill(new, signal.SIGKILL)  # and the replacement can be replaced in turn
        server.wait_line(f"worker {new} was killed by SIGKILL")
        wait_for(lambda: len(children(server.proc.pid)) == 2, "another replacement")
        self.assertEqual(get(self.sock)[0], 200)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)

    def test_a_killed_workers_running_command_is_killed(self):
        # Its command came to the master, which let it run on (sleep 20 alive 10 s later).
        pidfile = os.path.join(self.dir, "pid")
        server = self.start("--workers", "2", "--command-timeout", "30", self.sock, "--",
                            "sh", "-c", f"echo $$ > {pidfile}; exec sleep 30", ready=False)
        server.wait_line("serving on")
        client = connect(self.sock)
        self.addCleanup(client.close)
        client.sendall(request_bytes("/"))
        command = wait_for(lambda: read_pid(pidfile), "the command to start")
        with open(f"/proc/{command}/stat") as f:
            worker = int(f.read().rsplit(")", 1)[1].split()[1])  # its parent
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{command}"), "the command to be killed")

    def test_an_app_that_cannot_load_at_start_up_fails_once_with_status_1(self):
        with open(os.path.join(self.dir, "broken.py"), "w") as f:
            f.write("import json\nraise RuntimeError('no database')\n")
        server = self.start("--workers", "4", "--app", "broken:app", self.sock, ready=False)
        self.assertEqual(server.wait(), 1)
        log = server.log()
        self.assertEqual(log.count("Traceback"), 1, log)  # one worker tried, not four
        self.assertEqual(log.count("RuntimeError: no database"), 1, log)
        self.assertIn("the first worker exited with status 1 before it served", log.splitlines()[-1])
        self.assertFalse(os.path.lexists(self.sock))

    def test_a_worker_that_keeps_failing_backs_off_and_the_master_gives_up(self):
        marker = os.path.join(self.dir, "broken")
        with open(os.path.join(self.dir, "flaky.py"), "w") as f:
            f.write(f"import os\nif os.path.exists({marker!r}):\n"
                    f"    raise RuntimeError('the deploy is broken')\n"
                    f"from testapp import app\n")
        server = self.start("--workers", "2", "--app", "flaky:app", self.sock)
        pids = worker_pids(server.wait_ready())
        open(marker, "w").close()
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        server.wait_line("starting another in 0.2 s")
        self.assertEqual(get(self.sock, "/pid")[2], b"%d" % max(pids))  # the other still serves
        self.assertEqual(server.wait(), 1)
        elapsed = time.monotonic() - killed
        lines = server.log().splitlines()
        delays = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in lines
                  if "starting another in" in line]
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8][-len(delays):], lines)  # doubling
        self.assertGreaterEqual(len(delays), 3, lines)
        self.assertGreater(elapsed, sum(delays))  # it waited: no spin
        self.assertIn("workers keep failing within 1 s of their start (5 in a row", lines[-1])
        self.assertFalse(os.path.lexists(self.sock))
        wait_for(lambda: not process_alive(max(pids)), "the last worker to exit")

    def write_app(self, name, text):
        with open(os.path.join(self.dir, name + ".py"), "w") as f:
            f.write(text)

    def loading_pid(self, server):
        """The pid of the worker that is loading the app (it wrote its pid file)."""
        path = os.path.join(self.dir, "loading")
        return wait_for(lambda: read_pid(path), "a worker to load the app")

    def test_a_worker_that_hangs_while_loading_the_app_does_not_hold_the_stop(self):
        self.write_app("hang", "import os, time\nopen('loading', 'w').write(str(os.getpid()))\n"
                               "time.sleep(300)\n")
        server = self.start("--workers", "2", "--app", "hang:app", self.sock, ready=False)
        pid = self.loading_pid(server)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertLess(time.monotonic() - started, 5.0)  # not graceful-timeout + 5 s
        wait_for(lambda: not process_alive(pid), "the loading worker to exit")
        self.assertFalse(os.path.lexists(self.sock))

    def test_a_worker_that_ignores_sigterm_is_killed_after_the_graceful_timeout(self):
        self.write_app("deaf", "import os, signal, time\nsignal.signal(signal.SIGTERM, "
                               "signal.SIG_IGN)\nopen('loading', 'w').write(str(os.getpid()))\n"
                               "time.sleep(300)\n")
        server = self.start("--workers", "2", "--graceful-timeout", "0.5", "--app", "deaf:app",
                            self.sock, ready=False)
        pid = self.loading_pid(server)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertGreater(time.monotonic() - started, 5.0)  # 0.5 + WORKER_KILL_AFTER
        self.assertIn(f"worker {pid} still runs 5.5 s after it was told to stop: killed", server.log())
        wait_for(lambda: not process_alive(pid), "the deaf worker to be killed")

    def test_a_worker_loading_the_app_dies_with_its_master(self):
        self.write_app("hang", "import os, time\nopen('loading', 'w').write(str(os.getpid()))\n"
                               "time.sleep(300)\n")
        server = self.start("--workers", "2", "--app", "hang:app", self.sock, ready=False)
        pid = self.loading_pid(server)
        server.proc.kill()  # it reads no channel yet: PR_SET_PDEATHSIG brings it down
        server.wait()
        wait_for(lambda: not process_alive(pid), "the loading worker to follow its master")

    def test_a_worker_never_outlives_its_master(self):
        server, pids = self.start_workers(2)
        server.proc.kill()  # SIGKILL: the master cannot tell anyone
        server.wait()
        for pid in pids:
            wait_for(lambda: not process_alive(pid), f"worker {pid} to follow its master")

    def test_a_second_sigterm_stops_the_workers_at_once_with_status_1(self):
        server, pids = self.start_workers(2, "--graceful-timeout", "30")
        stuck = connect(self.sock)
        stuck.sendall(request_bytes("/forever"))
        server.wait_line("app: /forever started")
        server.signal(signal.SIGTERM)
        started = time.monotonic()
        wait_for(lambda: not os.path.lexists(self.sock), "the stop to begin")
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 1)
        self.assertLess(time.monotonic() - started, 5.0)  # not the 30 s grace
        self.assertIn("stopped at once by a second signal", server.log().splitlines()[-1])
        for pid in pids:
            wait_for(lambda: not process_alive(pid), f"worker {pid} to exit")
        stuck.close()

    def test_sigterm_to_every_process_at_once_is_one_graceful_stop(self):
        # systemd's KillMode=control-group and Ctrl-C signal the master and each worker.
        server, pids = self.start_workers(2)
        slow = connect(self.sock)
        slow.sendall(request_bytes("/slow?0.5"))
        server.wait_line("app: /slow started")
        for pid in [server.proc.pid] + sorted(pids):
            os.kill(pid, signal.SIGTERM)
        self.assertEqual(Responses(slow).next()[1], 200)  # finished, not cut
        self.assertEqual(server.wait(), 0)
        self.assertNotIn("at once", server.log())
        slow.close()

    def test_one_log_of_whole_lines_and_worker_lines_carry_their_pid(self):
        # Two workers write to one access log file: whole lines, none lost.
        path = os.path.join(self.dir, "access.log")
        server, pids = self.start_workers(2, "--access-log", path)
        run_together(lambda: [get(self.sock, "/" + "y" * 2000) for _ in range(10)], 20)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 200)
        for line in lines:
            self.assertRegex(line, r'^- - - \[[^]]+\] "GET /y{2000} HTTP/1.1" 404 10 "-" "-" '
                                   r'\d+\.\d{3}$')
        # And to stderr, with the lines of their own, which say which worker they come from.
        server, pids = self.start_workers(2)
        run_together(lambda: [get(self.sock, "/" + "x" * 2000) for _ in range(10)], 20)
        victim = min(pids)
        os.kill(victim, signal.SIGUSR2)
        server.wait_line(f"wsgi_unix[{victim}]: SIGUSR2 means nothing here")
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        access = [line for line in server.log().splitlines() if '"GET /xx' in line]
        self.assertEqual(len(access), 200)
        for line in server.log().splitlines():
            self.assertRegex(line, r'^(wsgi_unix(\[\d+\])?: |- - - \[[^]]+\] "GET /x{2000} '
                                   r'HTTP/1.1" 404 10 "-" "-" \d+\.\d{3}$)')
        # Lines longer than a pipe writes whole spliced (215 of 240 with 60 KB user agents):
        # each is cut under PIPE_BUF and written at once.
        server, pids = self.start_workers(2)
        agent = {"User-Agent": "z" * 60000}
        run_together(lambda: [get(self.sock, "/", headers=agent) for _ in range(30)], 8)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        access = [line for line in server.log().splitlines() if not line.startswith("wsgi_unix")]
        self.assertEqual(len(access), 240)
        for line in access:
            self.assertRegex(line, r'^- - - \[[^]]+\] "GET / HTTP/1.1" 200 6 "-" "z{497}\.\.\." '
                                   r'\d+\.\d{3}$')

    def test_a_dead_log_pipe_stops_neither_the_master_nor_its_workers(self):
        # With a broken stderr, a SIGHUP or one killed worker made the master exit 1 with
        # every worker (its flush before fork() raised).
        reader, writer = os.pipe()
        proc = subprocess.Popen([sys.executable, SERVER, "--workers", "2", "--app", "testapp:app",
                                 self.sock], cwd=self.dir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=writer,
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        self.addCleanup(proc.wait)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        os.close(writer)
        with os.fdopen(reader, "rb") as log:
            pids = worker_pids(log.readline().decode().rstrip("\n"))
        self.assertEqual(get(self.sock)[0], 200)  # its access line cannot be written now
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)  # replaced, with a line nobody reads
        wait_for(lambda: len(children(proc.pid)) == 2 and victim not in children(proc.pid),
                 "a new worker")
        proc.send_signal(signal.SIGHUP)  # a reload: new workers, with lines nobody reads
        wait_for(lambda: not set(pids) & set(children(proc.pid)) and
                 len(children(proc.pid)) == 2, "the reload")
        for _ in range(10):
            self.assertEqual(get(self.sock)[0], 200)
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(DEADLINE), 0)

    def test_workers_retired_by_a_reload_are_killed_after_the_graceful_timeout(self):
        # With an app whose exit hangs, both old workers were alive 10 s after SIGHUP, until
        # the next full stop.
        with open(os.path.join(self.dir, "hangs.py"), "w") as f:
            f.write("import atexit, os, time\n"
                    "from testapp import app\n"
                    "if os.path.exists('hang'):  # (the first workers only)\n"
                    "    atexit.register(time.sleep, 3600)  # its exit hangs\n")
        open(os.path.join(self.dir, "hang"), "w").close()
        server = self.start("--workers", "2", "--graceful-timeout", "0.5", "--app", "hangs:app",
                            self.sock, ready=False)
        old = worker_pids(server.wait_ready())
        os.unlink(os.path.join(self.dir, "hang"))
        server.signal(signal.SIGHUP)
        server.wait_line("reloaded")
        wait_for(lambda: not old & children(server.proc.pid), "the old workers to be killed",
                 deadline=0.5 + wsgi_unix.WORKER_KILL_AFTER + DEADLINE)
        for pid in old:
            server.wait_line(f"worker {pid} still runs 5.5 s after it was told to stop: killed")
        self.assertEqual(get(self.sock)[0], 200)

    def test_sighup_starts_new_workers_and_the_old_finish_their_requests(self):
        server, pids = self.start_workers(2)
        slow = connect(self.sock)
        slow.sendall(request_bytes("/slow?1"))
        server.wait_line("app: /slow started")
        server.signal(signal.SIGHUP)
        line = server.wait_line("reloaded: workers")
        new = {int(pid) for pid in line.split("workers ", 1)[1].split(" serve")[0].split()}
        self.assertEqual(len(new), 2)
        self.assertFalse(new & pids)
        self.assertEqual(Responses(slow).next()[1], 200)  # the old worker finished it
        wait_for(lambda: children(server.proc.pid) == new, "the old workers to exit")
        self.assertTrue(self.served_by() <= new)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        slow.close()

    def test_a_reload_loads_new_code_and_one_whose_code_cannot_load_keeps_the_old(self):
        app = os.path.join(self.dir, "deployed.py")
        version = ("import os\n"
                   "def app(environ, start_response):\n"
                   "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
                   "    return [b'%s %%d' %% os.getpid()]\n")

        def served():  # by which code, in which processes
            answers = [get(self.sock)[2].decode().rsplit(" ", 1) for _ in range(20)]
            return {text for text, _ in answers}, {int(pid) for _, pid in answers}
        with open(app, "w") as f:
            f.write(version % "first")
        server = self.start("--workers", "2", "--app", "deployed:app", self.sock)
        pids = worker_pids(server.wait_ready())
        with open(app, "a") as f:
            f.write("raise SyntaxError('half a deploy')\n")
        server.signal(signal.SIGHUP)
        server.wait_line("reload failed: the first new worker exited with status 1")
        self.assertEqual(server.log().count("Traceback"), 1)  # one new worker tried
        self.assertEqual(children(server.proc.pid), pids)
        texts, by = served()
        self.assertEqual(texts, {"first"})
        self.assertTrue(by <= pids)
        with open(app, "w") as f:  # the deploy is mended: the next reload takes
            f.write(version % "the second")  # (another size: a .pyc is checked by size and mtime)
        server.signal(signal.SIGHUP)
        server.wait_line("reloaded: workers")
        wait_for(lambda: children(server.proc.pid).isdisjoint(pids), "the old workers to exit")
        texts, by = served()
        self.assertEqual(texts, {"the second"})  # each new worker imported it anew
        self.assertTrue(by.isdisjoint(pids))
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)

    def test_serve_takes_workers_and_make_server_does_not(self):
        script = ("import sys, wsgi_unix\n"
                  "wsgi_unix.serve('testapp:app', sys.argv[1], workers=2, access_log=False)\n")
        server = self.start(command=[sys.executable, "-c", script, self.sock],
                            env={"PATH": os.environ["PATH"], "PYTHONPATH": HERE})
        self.assertIn("with 2 workers", server.wait_ready())
        self.assertEqual(get(self.sock)[0], 200)
        server.signal(signal.SIGINT)
        self.assertEqual(server.wait(), 0)
        with self.assertRaisesRegex(ValueError, "workers=0"):
            wsgi_unix.serve("testapp:app", self.sock, workers=0)
        with self.assertRaisesRegex(TypeError, "workers must be a number"):
            wsgi_unix.serve("testapp:app", self.sock, workers="2")
        with self.assertRaisesRegex(TypeError, "workers is serve"):
            wsgi_unix.make_server(self.sock, lambda environ, start_response: [], workers=2)
        running = threading.Event()
        thread = threading.Thread(target=running.wait)
        thread.start()
        try:
            with self.assertRaisesRegex(wsgi_unix.ServeError, "before starting any thread"):
                wsgi_unix.serve("testapp:app", self.sock, workers=2)  # a fork now is refused
        finally:
            running.set()
            thread.join()
        self.assertFalse(os.path.lexists(self.sock))

    def test_workers_on_an_inherited_socket_under_systemd_socket_activate(self):
        activate = require_tool(self, "systemd-socket-activate")
        notify = os.path.join(self.dir, "notify")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(notify)
        listener.settimeout(DEADLINE)
        self.addCleanup(listener.close)
        server = self.start(ready=False, command=[
            activate, "-l", self.sock, "-E", "NOTIFY_SOCKET", sys.executable, SERVER,
            "--workers", "2", "--app",
            "testapp:app", "fd:3"], env={"PATH": os.environ["PATH"], "NOTIFY_SOCKET": notify})
        # (Its socket file exists from bind(), a moment before listen(): connect to it.)
        wait_for(lambda: connectable(self.sock), "systemd-socket-activate to listen")
        self.assertEqual(get(self.sock)[0], 200)  # the first connection starts the service
        pids = worker_pids(server.wait_line("serving on fd:3 with 2 workers"))
        self.assertEqual(listener.recv(100), b"READY=1")  # the master's
        # (systemd-socket-activate 262 sends a READY=1 of its own first: skipped below.)
        variables = json.loads(get(self.sock, "/osenv")[2])  # a worker's os.environ
        for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID"):  # the master's, not theirs
            self.assertNotIn(name, variables)
        server.signal(signal.SIGHUP)
        said = listener.recv(100)
        if said == b"READY=1":  # the master's, after systemd-socket-activate's own
            said = listener.recv(100)
        self.assertRegex(said, rb"^RELOADING=1\nMONOTONIC_USEC=\d+$")
        self.assertEqual(listener.recv(100), b"READY=1")
        wait_for(lambda: children(server.proc.pid).isdisjoint(pids), "the old workers to exit")
        self.assertEqual(get(self.sock)[0], 200)
        server.signal(signal.SIGTERM)
        self.assertEqual(listener.recv(100), b"STOPPING=1")
        self.assertEqual(server.wait(), 0)
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.sock).st_mode))  # systemd's, not ours


class RecyclingTests(ServerTestCase):
    """--max-requests, --max-worker-memory, --request-timeout: a worker replaced, its
    replacement serving first, and no request of the others lost."""

    start_workers = WorkerTests.start_workers

    def test_max_requests_recycles_workers_under_load_without_a_failed_request(self):
        server, pids = self.start_workers(2, "--max-requests", "50", "--max-requests-jitter", "10")
        served = set()

        def request():
            status, _, body = get(self.sock, "/pid")
            served.add(int(body))
            return status
        with steady_load(request) as (done, errors):
            wait_for(lambda: server.log().count("(--max-requests); replacing it") >= 6,
                     "six recycles", deadline=30)
        self.assertEqual(errors, [])
        counts = [int(n) for n in re.findall(r"served (\d+) requests", server.log())]
        self.assertTrue(all(50 <= n <= 60 + 8 for n in counts), counts)  # (8 threads at once)
        self.assertGreaterEqual(len(served - pids), 3)  # the pids change
        wait_for(lambda: len(children(server.proc.pid)) == 2, "two workers again")
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)

    def test_max_worker_memory_replaces_a_worker_before_it_grows_far(self):
        server, pids = self.start_workers(2, "--max-worker-memory", "100M")
        served, largest = set(), 0
        for _ in range(30):  # 20 MB kept on each: 600 MB in all
            status, _, body = get(self.sock, "/grow")
            self.assertEqual(status, 200)
            pid, resident = map(int, body.split())
            served.add(pid)
            largest = max(largest, resident)
        self.assertLess(largest, 150 << 20)
        lines = re.findall(r"worker \d+ has (\d+) MiB resident after a request "
                           r"\(--max-worker-memory 100M\); replacing it", server.log())
        self.assertGreaterEqual(len(lines), 3, server.log())
        self.assertTrue(all(100 < int(size) < 150 for size in lines), lines)
        self.assertGreaterEqual(len(served - pids), 3)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)

    def test_request_timeout_replaces_a_stuck_worker_and_the_others_keep_serving(self):
        server, pids = self.start_workers(2, "--request-timeout", "2", "--graceful-timeout", "1")
        with steady_load(lambda: get(self.sock)[0], clients=3, pause=0.01) as (done, errors):
            wait_for(lambda: len(done) > 20, "requests before")
            started = time.monotonic()
            answer = raw_request(self.sock, request_bytes("/hang"))
            took = time.monotonic() - started
            line = server.wait_line("ran GET /hang for")
            stuck = int(re.search(r"worker (\d+) ran", line).group(1))
            wait_for(lambda: not process_alive(stuck), "the stuck worker to end")
            before = len(done)
            wait_for(lambda: len(done) > before + 20, "requests after")
        self.assertEqual(errors, [])
        self.assertEqual(status_of(answer), 504)
        self.assertIn(b"ran longer than --request-timeout (2 s)", answer)
        self.assertTrue(1.9 < took < 5, took)
        self.assertIn("(--request-timeout 2); its client got 504; replacing it", line)
        self.assertIn(stuck, pids)
        wait_for(lambda: len(children(server.proc.pid)) == 2, "two workers again")
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)

    def test_a_request_cut_after_its_head_is_closed_and_one_worker_is_enough(self):
        # With --workers 1 the master still replaces it: the new one serves first.
        server, pids = self.start_workers(1, "--request-timeout", "1", "--graceful-timeout", "5")
        answer = raw_request(self.sock, request_bytes("/hang?head", close=False))
        self.assertEqual(status_of(answer), 200)
        self.assertTrue(answer.endswith(b"5\r\nfirst\r\n"), answer)  # no last chunk: cut short
        server.wait_line("(--request-timeout 1); its connection was closed; replacing it")
        # A late answer never follows the 504 on the connection (its app returns in 2 s,
        # within the stuck worker's graceful time).
        answer = raw_request(self.sock, request_bytes("/hang?2"))
        self.assertEqual(answer.count(b"HTTP/1.1"), 1, answer)
        self.assertEqual(status_of(answer), 504)
        self.assertNotIn(b"late", answer)
        self.assertEqual(get(self.sock)[0], 200)
        self.assertNotEqual(worker_pids(server.wait_ready()), set())
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)

    def test_recycling_options_need_workers_and_fit_together(self):
        for args, fragment in [
                (("--max-requests", "5"), "--max-requests needs --workers N"),
                (("--request-timeout", "5"), "a thread cannot be killed"),
                (("--max-worker-memory", "1G"), "--max-worker-memory needs --workers N"),
                (("--workers", "2", "--max-requests-jitter", "5"), "goes with --max-requests"),
                (("--workers", "2", "--max-requests", "0"), "not a positive number"),
                (("--workers", "2", "--request-timeout", "nan"), "not a positive number"),
                (("--workers", "2", "--max-worker-memory", "lots"), "not a size")]:
            with self.subTest(args=args):
                self.assertOneLineError(args + (self.sock,), 2, fragment)


# --- §9 API -------------------------------------------------------------------------------

class APITests(ServerTestCase):
    def test_serve_in_a_thread_installs_no_signal_handlers(self):
        before = signal.getsignal(signal.SIGTERM)
        servers = []

        class RecordingServer(wsgi_unix.WSGIServer):
            def serve_forever(self, *args):
                servers.append(self)
                super().serve_forever(*args)

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"api\n"]

        log = io.StringIO()
        with contextlib.redirect_stderr(log):
            thread = threading.Thread(target=wsgi_unix.serve, args=(app, self.sock), kwargs={
                "server_class": RecordingServer, "threads": 2, "access_log": False})
            thread.start()
            wait_for(lambda: servers, "the server to start")
            self.assertEqual(get(self.sock)[2], b"api\n")
            self.assertIs(signal.getsignal(signal.SIGTERM), before)
            servers[0].shutdown()
            thread.join(DEADLINE)
        self.assertFalse(os.path.lexists(self.sock))
        self.assertEqual(log.getvalue(), f"wsgi_unix: serving on unix:{self.sock}{MODE_600_OURS}\n")

    def test_public_names_have_docstrings(self):
        for name in wsgi_unix.__all__:
            self.assertTrue(getattr(wsgi_unix, name).__doc__, name)


# --- §10 The example app ------------------------------------------------------------------

class CGIOutputUnitTests(unittest.TestCase):
    """The command app's CGI output parser (§9), on bytes."""

    def test_status_lines(self):
        # (what the command prints, the status that goes out; None: a 502)
        table = [(b"Status: 201 Made\n\n", "201 Made"), (b"Status: 404\n\n", "404 Not Found"),
                 (b"Status: 299\n\n", "299 Unknown"), (b"Status: 599 Odd\n\n", "599 Odd"),
                 (b"Location: /x\n\n", "302 Found"), (b"Content-Type: a/b\n\n", "200 OK"),
                 (b"Status: 100\n\n", None), (b"Status: 103 Early Hints\n\n", None),
                 (b"Status: 600\n\n", None), (b"Status: OK\n\n", None), (b"no blank line", None)]
        for output, status in table:
            with self.subTest(output=output):
                if status is None:
                    with self.assertRaises(ValueError):
                        wsgi_unix._parse_cgi_output(output)
                else:
                    self.assertEqual(wsgi_unix._parse_cgi_output(output)[0], status)


class CommandAppTests(ServerTestCase):
    def serve_command(self, *command, options=(), env=None):
        return self.start(*options, self.sock, "--", *command, env=env)

    def write_script(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + text)
        os.chmod(path, 0o755)
        return path

    def test_the_command_gets_cgi_variables_and_no_secrets(self):
        env = {"PATH": os.environ["PATH"], "SECRET_TOKEN": "hunter2-secret", "LANG": "C.UTF-8",
               "LISTEN_FDS": "1"}
        self.serve_command("env", options=["--pass-env", "LANG"], env=env)
        status, _, body = get(self.sock, "/some/path?a=1&b=%41", headers={
            "X-Custom": "yes", "X_Sneaky": "no", "Proxy": "http://evil:3128",
            "Content-Type": "text/x-test"})
        self.assertEqual(status, 200)
        child = dict(line.split("=", 1) for line in body.decode().splitlines())
        self.assertNotIn("hunter2-secret", body.decode())
        self.assertNotIn("LISTEN_FDS", child)
        expected = {"REQUEST_METHOD": "GET", "PATH_INFO": "/some/path", "QUERY_STRING": "a=1&b=%41",
                    "SERVER_PROTOCOL": "HTTP/1.1", "GATEWAY_INTERFACE": "CGI/1.1",
                    "SERVER_NAME": "localhost", "SERVER_PORT": "80", "REMOTE_ADDR": "",
                    "SCRIPT_NAME": "", "CONTENT_TYPE": "text/x-test", "HTTP_X_CUSTOM": "yes",
                    "LANG": "C.UTF-8", "PATH": os.environ["PATH"]}
        for key, value in expected.items():
            self.assertEqual(child.get(key), value, key)
        self.assertTrue(child["SERVER_SOFTWARE"].startswith("wsgi_unix/"))
        self.assertIn("HTTP_HOST", child)
        self.assertNotIn("HTTP_X_SNEAKY", child)
        self.assertNotIn("HTTP_PROXY", child)  # httpoxy
        self.assertEqual(set(child) - set(expected) - {"SERVER_SOFTWARE", "HTTP_HOST",
                                                       "HTTP_ACCEPT_ENCODING"}, set())

    def test_nul_in_the_request_is_refused_with_400(self):
        self.serve_command("env")
        self.assertEqual(get(self.sock, "/a%00b")[0], 400)

    def test_shell_syntax_in_the_request_runs_nothing(self):
        self.serve_command("printf", "%s|", "fixed", "args")
        status, _, body = get(self.sock, "/$(touch%20pwned);touch%20pwned2?q=$(touch%20p3);`touch%20p4`",
                              headers={"X-A": "$(touch pwned5); touch pwned6"})
        self.assertEqual((status, body), (200, b"fixed|args|"))
        self.assertEqual(sorted(os.listdir(self.dir)), ["app.sock", "testapp.py"])

    def test_the_body_is_on_stdin_and_stdin_is_empty_without_one(self):
        self.serve_command("cat")
        self.assertEqual(get(self.sock, "/", "POST", body=b"posted data")[2], b"posted data")
        self.assertEqual(get(self.sock, "/")[2], b"")
        chunked = raw_request(self.sock, request_bytes("/", "POST", ["Transfer-Encoding: chunked"],
                                                       b"3\r\nabc\r\n0\r\n\r\n"))
        self.assertEqual(split_response(chunked)[0::2], (200, b"abc"))

    def test_a_body_over_max_body_gets_413_without_running_the_command(self):
        self.serve_command("sh", "-c", "touch ran; cat", options=["--max-body", "1K"])
        self.assertEqual(get(self.sock, "/", "POST", body=b"x" * 1025)[0], 413)
        chunked = raw_request(self.sock, request_bytes("/", "POST", ["Transfer-Encoding: chunked"],
                                                       b"401\r\n" + b"x" * 1025 + b"\r\n0\r\n\r\n"))
        self.assertEqual(status_of(chunked), 413)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "ran")))
        self.assertEqual(get(self.sock, "/", "POST", body=b"x" * 1024)[2], b"x" * 1024)

    def test_a_command_that_ignores_its_stdin_does_not_deadlock(self):
        self.serve_command("echo", "ignored your body")
        status, _, body = get(self.sock, "/", "POST", body=b"y" * (1 << 20))
        self.assertEqual((status, body), (200, b"ignored your body\n"))

    def test_failure_gives_500_naming_the_status_and_stderr_goes_to_the_log(self):
        server = self.serve_command("sh", "-c", "echo out; echo 'first problem' >&2;"
                                    "printf 'second\\033[31m' >&2; exit 7")
        status, _, body = get(self.sock, "/job")
        self.assertEqual(status, 500)
        self.assertIn(b"status 7", body)
        self.assertNotIn(b"problem", body)
        self.assertEqual(server.wait_line("first problem"), "wsgi_unix: GET /job: first problem")
        self.assertEqual(server.wait_line("second"), "wsgi_unix: GET /job: second\\x1b[31m")
        # The reason goes to the operator too, with the request.
        self.assertEqual(server.wait_line("exited with"),
                         "wsgi_unix: GET /job: sh: the command exited with status 7")

    def test_output_that_is_not_utf8_is_not_labelled_utf8(self):
        self.serve_command("printf", "\\377\\376binary")
        status, response, body = get(self.sock)
        self.assertEqual((status, body), (200, b"\xff\xfebinary"))
        self.assertEqual(response.getheader("Content-Type"), "application/octet-stream")

    def test_unicode_line_separators_in_stderr_are_escaped_in_the_log(self):
        # A log reader that splits on U+2028/U+2029 (str.splitlines does) could be fooled.
        server = self.serve_command("sh", "-c", "printf 'real\\342\\200\\250forged\\342\\200\\251"
                                    "line' >&2; exit 1")
        self.assertEqual(get(self.sock, "/job")[0], 500)
        self.assertEqual(server.wait_line("real"), "wsgi_unix: GET /job: real\\u2028forged\\u2029line")

    def test_cgi_mode_takes_status_and_headers_from_the_output(self):
        self.serve_command("printf", "Status: 404 Not Found\r\nContent-Type: text/html\r\n"
                           "X-Script: yes\r\n\r\n<p>nope</p>", options=["--cgi"])
        status, response, body = get(self.sock)
        self.assertEqual((status, body), (404, b"<p>nope</p>"))
        self.assertEqual(response.getheader("Content-Type"), "text/html")
        self.assertEqual(response.getheader("X-Script"), "yes")
        self.assertEqual(response.getheader("Content-Length"), "11")

    def test_cgi_location_without_status_redirects(self):
        self.serve_command("printf", "Location: /elsewhere\n\n", options=["--cgi"])
        status, response, _ = get(self.sock)
        self.assertEqual((status, response.getheader("Location")), (302, "/elsewhere"))

    def test_cgi_malformed_headers_give_502(self):
        for output in ["no blank line after this", "Bad Header Line\n\nbody", "Status: abc\n\n",
                       "X-A: b\rc\n\n"]:
            self.serve_command("printf", "%s", output, options=["--cgi"])
            self.assertEqual(get(self.sock)[0], 502, output)
            self.servers.pop().stop()

    def test_too_much_output_gives_502_and_memory_stays_bounded(self):
        server = self.serve_command("head", "-c", "20M", "/dev/zero")
        self.assertEqual(get(self.sock)[0], 502)
        self.assertLess(process_rss_kb(server.proc.pid) / 1024, 100)

    def test_timeout_kills_the_whole_process_group_and_gives_504(self):
        self.serve_command("sh", "-c", "sleep 300 & echo $! > grandchild; wait",
                           options=["--command-timeout", "1"])
        self.assertEqual(get(self.sock)[0], 504)
        with open(os.path.join(self.dir, "grandchild")) as f:
            grandchild = int(f.read())
        wait_for(lambda: not process_alive(grandchild), "the grandchild to be killed")

    def test_background_leftovers_are_killed_when_the_command_exits(self):
        self.serve_command("sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!")
        status, _, body = get(self.sock)
        self.assertEqual(status, 200)
        wait_for(lambda: not process_alive(int(body)), "the leftover to be killed")

    def test_a_missing_or_non_executable_command_fails_at_start_up(self):
        self.assertOneLineError([self.sock, "--", "no-such-command-xyz"], 1, "command not found")
        script = self.write_script("script.sh", "echo hi\n")
        os.chmod(script, 0o644)
        self.assertOneLineError([self.sock, "--", "./script.sh"], 1, "not executable")
        self.assertFalse(os.path.lexists(self.sock))

    def test_a_command_gone_since_start_up_gives_500_and_one_log_line(self):
        script = self.write_script("script.sh", "echo hi\n")
        server = self.serve_command(script)
        self.assertEqual(get(self.sock)[0:3:2], (200, b"hi\n"))
        os.unlink(script)  # e.g. mid-upgrade
        for _ in range(2):
            status, _, body = get(self.sock)
            self.assertEqual((status, body), (500, b"500 Internal Server Error: the command could "
                                                   b"not be started\n"))
        self.assertIn("cannot start", server.wait_line("cannot start"))
        self.assertNotIn("Traceback", server.log())

    def test_methods_are_limited_and_head_runs_without_a_body(self):
        self.serve_command("echo", "hello")
        status, response, _ = get(self.sock, "/", "PUT", body=b"x")
        self.assertEqual((status, response.getheader("Allow")), (405, "GET, HEAD, POST"))
        answer = raw_request(self.sock, request_bytes("/", "HEAD"))
        status, head, body = split_response(answer)
        self.assertEqual((status, body), (200, b""))
        self.assertIn("Content-Length: 6", head)
        self.servers.pop().stop()
        self.serve_command("echo", "put ok", options=["--methods", "GET,PUT"])
        self.assertEqual(get(self.sock, "/", "PUT", body=b"x")[0:3:2], (200, b"put ok\n"))
        self.assertEqual(get(self.sock, "/", "POST", body=b"x")[0], 405)

    def test_max_procs_bounds_the_commands_running_at_once(self):
        self.assert_commands_at_once_at_most(2, "--max-procs", "2", least=2)

    def test_max_procs_is_each_workers(self):
        # As --help and the README say: with --workers 2, twice as many in all.
        self.assert_commands_at_once_at_most(2, "--max-procs", "1", "--workers", "2", least=1)

    def assert_commands_at_once_at_most(self, most, *options, least):
        events = os.path.join(self.dir, "events")
        self.serve_command("sh", "-c", f"echo + >> {events}; sleep 0.2; echo - >> {events}",
                           options=list(options))
        results = []
        threads = [threading.Thread(target=lambda: results.append(get(self.sock)[0]))
                   for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        self.assertEqual(results, [200] * 10)
        running = peak = 0
        with open(events) as f:
            for event in f.read().split():
                running += 1 if event == "+" else -1
                peak = max(peak, running)
        self.assertLessEqual(peak, most)
        self.assertGreaterEqual(peak, least)

    def test_a_request_waiting_longer_than_the_timeout_for_its_turn_gets_503(self):
        started = os.path.join(self.dir, "started")
        self.serve_command("sh", "-c", f"trap '' TERM; touch {started}; sleep 5",
                           options=["--max-procs", "1", "--command-timeout", "1"])
        first = unix_connection(self.sock)
        self.addCleanup(first.close)
        first.request("GET", "/")
        wait_for(lambda: os.path.exists(started), "the first command to start")
        self.assertEqual(get(self.sock)[0], 503)
        self.assertEqual(first.getresponse().status, 504)

    def test_a_client_that_goes_away_gets_its_command_killed(self):
        pidfile = os.path.join(self.dir, "pid")
        server = self.serve_command("sh", "-c", f"echo $$ > {pidfile}; exec sleep 300")
        client = unix_connection(self.sock)
        client.request("GET", "/")
        pid = wait_for(lambda: read_pid(pidfile), "the command to start")
        client.close()
        wait_for(lambda: not process_alive(pid), "the command to be killed")
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "the command to be reaped")
        self.assertNotIn("Traceback", server.log())

    def test_a_setsid_daemon_of_a_command_is_killed_at_the_timeout(self):
        pidfile = os.path.join(self.dir, "pid")
        self.serve_command("sh", "-c", f"setsid sleep 300 & echo $! > {pidfile}; exec sleep 300",
                           options=["--command-timeout", "1"])
        self.assertEqual(get(self.sock)[0], 504)
        daemon = wait_for(lambda: read_pid(pidfile), "the daemon's pid")
        wait_for(lambda: not os.path.exists(f"/proc/{daemon}"), "the setsid daemon to be killed")

    def test_a_command_that_exits_is_answered_though_a_child_holds_its_output(self):
        pidfile = os.path.join(self.dir, "pid")
        self.serve_command("sh", "-c", f"echo hello; sleep 300 & echo $! > {pidfile}",
                           options=["--command-timeout", "20"])
        started = time.monotonic()
        self.assertEqual(get(self.sock)[0::2], (200, b"hello\n"))  # not 504 after 20 s
        self.assertLess(time.monotonic() - started, 5.0)
        child = read_pid(pidfile)
        wait_for(lambda: not process_alive(child), "the background child to be killed")

    def test_a_commands_stderr_is_capped_in_the_log(self):
        # One 3 s request wrote 23.7 MB of log.
        server = self.serve_command("sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' 'e' >&2; "
                                    "echo out")
        self.assertEqual(get(self.sock)[0::2], (200, b"out\n"))
        line = server.wait_line("more bytes of stderr, not logged")
        dropped = int(line.split("(and ")[1].split()[0])
        self.assertEqual(len(server.log()) < 200000, True)
        self.assertGreater(dropped, 1000000 - wsgi_unix.COMMAND_LOG_MAX - 1)

    def test_a_client_that_half_closes_after_its_request_gets_its_answer(self):
        # nc -N and socat shut their sending side once the request is out: that is no leaving.
        self.serve_command("sh", "-c", "sleep 0.2; echo done")
        for _ in range(3):
            with connect(self.sock) as sock:
                sock.sendall(request_bytes("/"))
                sock.shutdown(socket.SHUT_WR)
                self.assertEqual(Responses(sock).next()[1::2], (200, b"done\n"))

    def test_a_client_that_leaves_after_sending_more_gets_its_command_killed(self):
        pidfile = os.path.join(self.dir, "pid")
        server = self.serve_command("sh", "-c", f"echo $$ > {pidfile}; exec sleep 300")
        client = connect(self.sock)
        client.sendall(request_bytes("/", close=False))
        pid = wait_for(lambda: read_pid(pidfile), "the command to start")
        client.sendall(b"\r\n")  # stray bytes after the request: not a sign of life for ever
        client.close()
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "the command to be killed")
        server.wait_line('"GET / HTTP/1.1" 499 ')  # one access-log line: no answer written
        self.assertEqual(len(server.log().splitlines()), 2, server.log())

    def assert_no_command_outlives_the_server(self, *options):
        pidfile, daemonfile = os.path.join(self.dir, "pid"), os.path.join(self.dir, "daemon")
        server = self.serve_command("sh", "-c", f"setsid sleep 300 & echo $! > {daemonfile}; "
                                    f"echo $$ > {pidfile}; exec sleep 300",
                                    options=["--graceful-timeout", "1", *options])
        client = unix_connection(self.sock)
        client.request("GET", "/")
        pid = wait_for(lambda: read_pid(pidfile), "the command to start")
        daemon = read_pid(daemonfile)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        wait_for(lambda: not process_alive(pid), "the command to die with the server")
        wait_for(lambda: not process_alive(daemon), "the setsid daemon to die with the server")
        client.close()

    def test_no_command_nor_its_setsid_daemon_outlives_the_server(self):
        self.assert_no_command_outlives_the_server()

    def test_nor_one_of_a_worker_process(self):
        # A worker is forked: it must become the subreaper itself, and run the command app's
        # atexit kill when it ends.
        self.assert_no_command_outlives_the_server("--workers", "2")

    def test_readme_status_page_webhook_and_cgi_status(self):
        # The three uses the README shows, as it shows them.
        self.serve_command("uptime")
        status, _, body = get(self.sock)
        self.assertEqual(status, 200)
        self.assertIn(b"load average", body)
        self.servers.pop().stop()
        self.write_script("deploy.sh", 'echo "Content-Type: text/plain"\necho\n'
                                       'echo "deploying $(cat | wc -c) bytes of payload"\n')
        self.serve_command("./deploy.sh", options=["--cgi", "--methods", "POST"])
        self.assertEqual(get(self.sock)[0], 405)  # a plain curl deploys nothing
        self.assertEqual(get(self.sock, "/", "POST", body=b'{"ref": "main"}')[0::2],
                         (200, b"deploying 15 bytes of payload\n"))
        self.servers.pop().stop()
        self.write_script("status.sh", 'if [ "$QUERY_STRING" = "name=world" ]; then\n'
                                       '  printf "Content-Type: text/plain\\n\\nhello, world\\n"\n'
                                       'else\n'
                                       '  printf "Status: 404 Not Found\\nContent-Type: text/plain\\n\\n'
                                       'who?\\n"\nfi\n')
        self.serve_command("./status.sh", options=["--cgi"])
        self.assertEqual(get(self.sock, "/?name=world")[0::2], (200, b"hello, world\n"))
        self.assertEqual(get(self.sock, "/?name=x")[0::2], (404, b"who?\n"))


# --- §11 The command line -----------------------------------------------------------------

class CommandLineTests(ServerTestCase):
    def test_default_command_serves_the_date(self):
        self.start(self.sock)
        status, response, body = get(self.sock)
        self.assertEqual(status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/plain; charset=utf-8")
        self.assertIn(b"UTC", body)

    def test_it_also_runs_as_a_module_from_its_directory(self):
        # python3 -m wsgi_unix: the README's way to start from cached bytecode
        shutil.copy(SERVER, self.dir)
        self.start(command=[sys.executable, "-m", "wsgi_unix", "--app", "testapp:app", self.sock])
        self.assertEqual(get(self.sock)[0], 200)

    def test_command_failure_gives_500(self):
        self.start(self.sock, "--", "sh", "-c", "echo partial; exit 3")
        status, _, body = get(self.sock)
        self.assertEqual(status, 500)
        self.assertIn(b"status 3", body)

    def test_request_data_never_reaches_a_shell_or_argv(self):
        self.start(self.sock, "--", "echo", "fixed")
        status, _, body = get(self.sock, "/$(touch%20pwned);touch%20pwned2?$(touch%20pwned3);x`touch%20pwned4`")
        self.assertEqual((status, body), (200, b"fixed\n"))
        self.assertEqual(sorted(os.listdir(self.dir)), ["app.sock", "testapp.py"])

    def test_missing_command_is_found_at_start_up(self):
        self.assertOneLineError([self.sock, "--", "no-such-command-xyz"], 1, "command not found")
        self.assertFalse(os.path.lexists(self.sock))

    def test_app_import_error_is_one_line_and_status_1(self):
        self.assertOneLineError(["--app", "nosuchmodule:app", self.sock], 1, "nosuchmodule")
        self.assertOneLineError(["--app", "testapp:nothing", self.sock], 1, "testapp:nothing")
        # A file name, a misspelt name: the right spelling.
        self.assertOneLineError(["--app", "testapp.py:app", self.sock], 1,
                                "the module of testapp.py is testapp: --app testapp:app")
        self.assertOneLineError(["--app", "testapp:ap", self.sock], 1,
                                "testapp has no ap; did you mean testapp:app?")

    def test_an_app_that_fails_to_import_shows_its_own_traceback(self):
        with open(os.path.join(self.dir, "broken.py"), "w") as f:
            f.write("import os\n\nDATABASE = os.environ['DATABASE_URL']\n")
        code, lines = self.run_cli("--app", "broken:app", self.sock)
        self.assertEqual(code, 1, lines)
        text = "\n".join(lines)
        self.assertIn('broken.py", line 3, in <module>', text)
        self.assertIn("KeyError: 'DATABASE_URL'", text)
        self.assertNotIn("wsgi_unix.py", text)  # the app's frames, not ours
        self.assertEqual(lines[-1], "wsgi_unix: --app broken:app: importing broken failed (its "
                                    "traceback is above)")
        self.assertFalse(os.path.lexists(self.sock))

    def test_an_app_factory_is_called_once_with_literal_arguments(self):
        with open(os.path.join(self.dir, "factory.py"), "w") as f:
            f.write("calls = []\n"
                    "def create_app(greeting, punctuation='!'):\n"
                    "    calls.append(1)\n"
                    "    def app(environ, start_response):\n"
                    "        start_response('200 OK', [('Content-Type', 'text/plain')])\n"
                    "        return [('%s%s %d' % (greeting, punctuation, len(calls))).encode()]\n"
                    "    return app\n"
                    "def make():\n"
                    "    return create_app('made')\n")
        self.start("--app", "factory:create_app('hello', punctuation='?')", self.sock)
        self.assertEqual(get(self.sock)[2], b"hello? 1")
        self.assertEqual(get(self.sock)[2], b"hello? 1")  # once, not per request
        other = os.path.join(self.dir, "other.sock")
        self.assertOneLineError(["--app", "factory:make", other], 1,
                                "is it a factory? write --app 'factory:make()'")
        self.assertOneLineError(["--app", "factory:create_app(__import__('os'))", other], 1,
                                "must be literals")
        self.assertFalse(os.path.lexists(other))

    def test_usage_errors_exit_2_and_help_and_version_exit_0(self):
        self.assertOneLineError([], 2, "ADDRESS")
        self.assertOneLineError(["--threads", "0", self.sock], 2, "--threads")
        self.assertOneLineError(["--workers", "0", self.sock], 2, "--workers")
        self.assertOneLineError(["--workers", "1.5", self.sock], 2, "--workers")
        self.assertOneLineError(["--mode", "999", self.sock], 2, "--mode")
        self.assertOneLineError(["--timeout", "nan", self.sock], 2, "--timeout")
        self.assertOneLineError(["--graceful-timeout", "inf", self.sock], 2, "--graceful-timeout")
        self.assertOneLineError(["--group", "4294967296", self.sock], 1, "out of range")
        self.assertOneLineError(["--allow-uid", "4294967295", self.sock], 1, "out of range")
        self.assertFalse(os.path.lexists(self.sock))  # refused before the socket was made
        self.assertOneLineError(["--app", "testapp:app", self.sock, "--", "date"], 2, "not both")
        result = subprocess.run([sys.executable, SERVER, "--help"], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0)
        self.assertIn("ADDRESS", result.stdout)
        result = subprocess.run([sys.executable, SERVER, "--version"], capture_output=True, text=True)
        self.assertEqual((result.returncode, result.stdout.strip()),
                         (0, f"wsgi_unix {wsgi_unix.__version__}"))

    def test_addresses_typed_from_habit_get_the_right_spelling(self):
        for typed, right in (("http://localhost:8000", "write localhost:8000"),
                             ("https://127.0.0.1:8443/", "write 127.0.0.1:8443"),
                             ("unix://app.sock", "write unix:app.sock"),
                             ("8000", "127.0.0.1:8000"), ("localhost", "./localhost")):
            self.assertOneLineError([typed], 2, right)
        self.assertEqual([name for name in os.listdir(self.dir) if not name.endswith(".py")], [])
        # An unknown option is named, not the address after it.
        line = self.assertOneLineError(["--bind", "2", self.sock], 2, "unknown option --bind")
        self.assertNotIn(self.sock, line)
        # gunicorn's habits get the spelling here.
        for typed, right in ((["-b", "unix:/run/app.sock", "--app", "app:application"],
                              "the address is the last argument"),
                             (["-w", "4", self.sock], "say --workers N"),
                             (["--reload", self.sock], "SIGHUP loads the new code"),
                             (["app:application"], "--app app:application /run/app/app.sock"),
                             (["myproject.wsgi:application"], "--app myproject.wsgi:application"),
                             ([self.sock, "uptime"], "-- uptime")):
            with self.subTest(typed=typed):
                self.assertOneLineError(typed, 2, right)

    def test_command_app_options_with_app_are_usage_errors(self):
        for option in (["--cgi"], ["--pass-env", "HOME"], ["--max-body", "2M"],
                       ["--max-output", "1M"], ["--command-timeout", "5"], ["--methods", "GET"],
                       ["--max-procs", "2"]):
            self.assertOneLineError(option + ["--app", "testapp:app", self.sock], 2,
                                    f"{option[0]} is for the command app")

    def test_pass_env_takes_a_comma_list(self):
        self.start(self.sock, "--pass-env", "API_TOKEN,HOME", "--", "sh", "-c",
                   'echo "$API_TOKEN $HOME"',
                   env={"PATH": os.environ["PATH"], "API_TOKEN": "t0k", "HOME": "/h"})
        self.assertEqual(get(self.sock)[0::2], (200, b"t0k /h\n"))

    def test_group_without_mode_makes_the_socket_usable_by_that_group(self):
        self.start_app("--group", str(os.getgid()), self.sock)
        self.assertEqual(stat.S_IMODE(os.lstat(self.sock).st_mode), 0o660)

    def test_quiet_drops_the_access_log(self):
        server = self.start_app("--quiet", self.sock)
        self.assertEqual(get(self.sock)[0], 200)
        server.signal(signal.SIGTERM)
        server.wait()
        self.assertEqual(server.log().splitlines(),
                         [f"wsgi_unix: serving on unix:{self.sock}{MODE_600_OURS}",
                          "wsgi_unix: SIGTERM: stopping gracefully"])


class HealthCheckTests(ServerTestCase):
    """--check ADDRESS [PATH]: a probe for containers with no curl."""

    def check(self, *args, timeout=DEADLINE):
        result = subprocess.run([sys.executable, SERVER, "--check"] + list(args), cwd=self.dir,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout)
        return result.returncode, (result.stdout + result.stderr).strip()

    def test_a_live_server_then_a_bad_status_then_a_hang(self):
        self.start_app("--threads", "2", self.sock)
        self.assertEqual(self.check(self.sock), (0, f"wsgi_unix --check: {self.sock}: GET /: "
                                                    f"200 OK"))
        self.assertEqual(self.check(self.sock, "/error")[0], 1)
        self.assertIn("GET /error: 500 Internal Server Error", self.check(self.sock, "/error")[1])
        self.assertEqual(self.check(self.sock, "/nowhere")[0], 1)  # 404
        started = time.monotonic()
        code, line = self.check(self.sock, "/forever", "--timeout", "0.5")
        self.assertEqual(code, 1)
        self.assertIn("no answer within 0.5 s", line)
        self.assertLess(time.monotonic() - started, 5)

    def test_no_socket_a_refused_one_and_tcp(self):
        code, line = self.check(self.sock)
        self.assertEqual(code, 1)
        self.assertIn("no such socket", line)
        self.make_stale_socket(self.sock)
        code, line = self.check(self.sock)
        self.assertEqual(code, 1)
        self.assertIn("connection refused", line)
        os.unlink(self.sock)
        port = free_port()
        self.assertEqual(self.check(f"127.0.0.1:{port}")[0], 1)
        self.start_app(f"127.0.0.1:{port}", ready=True)
        self.assertEqual(self.check(f"127.0.0.1:{port}", "/env?x=1")[0], 0)
        name = f"@wsgi_unix-check-{os.getpid()}-{port}"
        self.start_app(f"unix:{name}")
        self.assertEqual(self.check(f"unix:{name}")[0], 0)

    def test_usage_errors(self):
        for args, fragment in [
                (("--check", self.sock, "health"), "a PATH begins with /"),
                (("--check", self.sock, "/a b"), "a PATH begins with /"),
                (("--check", "--app", "testapp:app", self.sock), "not --app"),
                (("--check", "--workers", "2", self.sock), "not --workers"),
                (("--check", self.sock, "--", "date"), "not a command"),
                (("--check", "localhost"), "for TCP write 127.0.0.1")]:
            with self.subTest(args=args):
                self.assertOneLineError(args, 2, fragment)
        self.assertEqual(self.check("fd:3")[0], 1)


# --- Where it lives: nginx, proxies, systemd, containers, frameworks ----------------------

class NginxTests(NginxCase):
    def test_requests_pass_through_nginx_intact(self):
        self.assertEqual(self.fetch("GET", "/")[0::2], (200, b"hello\n"))
        status, response, body = self.fetch("HEAD", "/")
        self.assertEqual((status, body, response.getheader("Content-Length")), (200, b"", "6"))
        payload = os.urandom(5 * 1024 * 1024)
        self.assertEqual(self.fetch("POST", "/echo", payload)[0::2], (200, payload))
        self.assertEqual(self.fetch("GET", "/error")[0], 500)
        self.assertEqual(self.fetch("GET", "/no/such/page")[0], 404)
        size = 4 * 1024 * 1024  # far beyond proxy_buffers: nginx spools it to disk
        status, _, body = self.fetch("GET", f"/big?{size}")
        self.assertEqual((status, len(body)), (200, size))
        self.assertEqual(body[65536 * 7:65536 * 7 + 3], bytes([7]) * 3)

    def test_nginx_keeps_its_connections_to_the_socket(self):
        for _ in range(50):
            self.assertEqual(self.fetch("GET", "/count-connections")[0], 200)
        # One connection per request without keep-alive; here nginx reuses a few.
        self.assertLessEqual(int(self.fetch("GET", "/count-connections")[2]), 4)

    def test_a_truncated_response_is_neither_completed_nor_cached(self):
        cache = {"X-Test-Cache": "1"}
        for _ in range(2):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE)
            conn.request("GET", "/stream-error?100000", headers=cache)
            response = conn.getresponse()
            self.assertEqual(response.getheader("X-Cache"), "MISS")  # never a HIT
            with self.assertRaises(http.client.IncompleteRead):
                response.read()
            conn.close()
        with open(self.error_log) as f:
            self.assertIn("upstream prematurely closed", f.read())
        # The same response, whole, is cached: the cache works, it just never had the other.
        self.assertEqual(self.fetch("GET", "/stream?100000", headers=cache)[1].getheader("X-Cache"),
                         "MISS")
        status, response, body = self.fetch("GET", "/stream?100000", headers=cache)
        self.assertEqual((status, response.getheader("X-Cache"), len(body)), (200, "HIT", 100000))

    def test_a_fragment_cannot_sneak_past_an_nginx_location_rule(self):
        # nginx routes on the path before "#", and passes the raw target on: /public#/../admin
        # would reach the app, whose PATH_INFO normalises to /admin.  We refuse it.
        with socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE) as sock:
            sock.sendall(b"GET /public#/../admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            answer = Responses(sock).rest()
        self.assertEqual(status_of(answer), 400)
        self.assertEqual(self.fetch("GET", "/admin/x")[0], 403)  # the rule nginx enforces
        self.assertNotIn('"GET /public#/../admin HTTP/1.1" 200', self.server.log())
        self.server.wait_line('"GET /public#/../admin HTTP/1.1" 400')

    def test_the_client_address_and_scheme_come_from_nginx(self):
        environ = json.loads(self.fetch("GET", "/env", headers={"X-Forwarded-For": "6.6.6.6"})[2])
        self.assertEqual(environ["REMOTE_ADDR"], "127.0.0.1")  # what nginx appended, not the spoof
        self.assertEqual(environ["HTTP_X_FORWARDED_FOR"], "6.6.6.6, 127.0.0.1")
        self.assertEqual(environ["wsgi.url_scheme"], "http")

    def test_fifty_concurrent_requests_get_no_502(self):
        statuses = []

        def one():
            try:
                statuses.append(self.fetch("GET", "/")[0])
            except OSError as exc:
                statuses.append(repr(exc))
        run_together(one, 50)
        self.assertEqual(statuses, [200] * 50)
        with open(self.error_log) as f:
            self.assertNotIn("connect() to unix:", f.read())


class DebianNginxTests(ServerTestCase):
    """The README's site file in a copy of the nginx package's own /etc/nginx, next to its
    default site: with the stock configuration, not a minimal one."""

    def test_the_readme_site_works_beside_the_stock_default_site(self):
        nginx = require_tool(self, "nginx")
        if not os.path.exists("/etc/nginx/sites-available/default"):
            if os.environ.get("CI"):
                self.fail("no stock /etc/nginx; .ci/run installs Debian's nginx")
            self.skipTest("no stock /etc/nginx here")
        port, etc = free_port(), os.path.join(self.dir, "etc-nginx")
        shutil.copytree("/etc/nginx", etc, symlinks=True)
        os.mkdir(os.path.join(self.dir, "static"))
        with open(os.path.join(self.dir, "static", "style.css"), "w") as f:
            f.write("body {}\n")
        conf = os.path.join(etc, "nginx.conf")
        with open(conf) as f:
            text = f.read()
        # Only the paths move into the copy (and the logs and pid into the test's directory).
        text = text.replace("/etc/nginx/", etc + "/").replace("/run/nginx.pid",
                                                                 os.path.join(etc, "nginx.pid"))
        text = text.replace("/var/log/nginx/", self.dir + "/")
        with open(conf, "w") as f:
            f.write(text)
        default = os.path.join(etc, "sites-enabled", "default")
        os.unlink(default)  # a link to the real one
        with open("/etc/nginx/sites-available/default") as f:
            text = f.read().replace("listen 80 default_server;",
                                    f"listen 127.0.0.1:{port} default_server;")
        with open(default, "w") as f:
            f.write(text.replace("listen [::]:80 default_server;", ""))
        with open(os.path.join(etc, "sites-available", "app"), "w") as f:
            f.write(readme_site(self.sock, port, os.path.join(self.dir, "static")))
        os.symlink("../sites-available/app", os.path.join(etc, "sites-enabled", "app"))
        check = subprocess.run([nginx, "-t", "-c", conf, "-e", os.path.join(self.dir, "e.log")],
                               capture_output=True, text=True)
        self.assertEqual(check.returncode, 0, check.stderr)
        proc = subprocess.Popen([nginx, "-c", conf, "-e", os.path.join(self.dir, "e.log"),
                                 "-g", "daemon off;"], stderr=subprocess.DEVNULL)
        self.addCleanup(proc.wait, DEADLINE)
        self.addCleanup(proc.terminate)
        self.start("--group", "www-data", "--proxy-headers", "--app", "testapp:app", self.sock)

        def fetch(host, url="/"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
            return exchange(conn, "GET", url, headers={"Host": host})
        wait_for(lambda: proc.poll() is not None or connectable_tcp(port), "nginx to listen")
        self.assertEqual(fetch("app.example.com")[0::2], (200, b"hello\n"))
        self.assertEqual(fetch("app.example.com", "/static/style.css")[0::2], (200, b"body {}\n"))
        status, _, body = fetch("localhost")  # any other name: the package's default site
        self.assertEqual(status, 200)
        self.assertIn(b"nginx", body)
        self.assertNotEqual(body, b"hello\n")


class WorkerNginxTests(NginxCase):
    server_args = ("--workers", "2")

    def test_sighup_under_load_through_nginx_loses_no_request(self):
        pids = worker_pids(self.server.wait_ready())
        # About 200 requests/s through nginx's keep-alive pool, as the issue has it.
        request = lambda: self.fetch("GET", "/counted?0.005")[0]  # noqa: E731
        with steady_load(request, pause=0.02) as (done, errors):
            for reload in (1, 2):
                before = len(done)
                wait_for(lambda: len(done) > before + 100, "requests to be served")
                self.server.signal(signal.SIGHUP)
                wait_for(lambda: self.server.log().count("reloaded: workers") == reload,
                         "the reload")
            before = len(done)
            wait_for(lambda: len(done) > before + 100, "requests after the reloads")
        self.assertEqual(errors, [])
        wait_for(lambda: len(children(self.server.proc.pid)) == 2, "the old workers to exit")
        self.assertTrue(children(self.server.proc.pid).isdisjoint(pids))
        with open(self.error_log) as f:
            self.assertNotIn("[error]", f.read())


class ProxyHeaderTests(ServerTestCase):
    HEADERS = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7", "X-Forwarded-Proto": "https"}

    def environ_via(self, target, headers):
        request = request_bytes("/env", headers=[f"{k}: {v}" for k, v in headers.items()])
        return json.loads(split_response(raw_request(target, request))[2])

    def test_proxy_headers_from_a_unix_peer_set_remote_addr_and_scheme(self):
        self.start_app("--proxy-headers", self.sock)
        environ = self.environ_via(self.sock, self.HEADERS)
        self.assertEqual(environ["REMOTE_ADDR"], "198.51.100.7")
        self.assertEqual(environ["wsgi.url_scheme"], "https")
        self.assertEqual(environ["HTTP_X_FORWARDED_FOR"], self.HEADERS["X-Forwarded-For"])
        environ = self.environ_via(self.sock, {"X-Forwarded-Proto": "gopher"})
        self.assertEqual((environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]), ("", "http"))

    def test_proxy_headers_are_ignored_unless_asked_for(self):
        self.start_app()
        environ = self.environ_via(self.sock, self.HEADERS)
        self.assertEqual((environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]), ("", "http"))

    def test_a_spoofed_header_from_an_untrusted_tcp_peer_changes_nothing(self):
        server = self.start_app("--proxy-headers", "127.0.0.1:0")
        target = ("127.0.0.1", int(server.wait_ready().rsplit(":", 1)[1]))
        environ = self.environ_via(target, self.HEADERS)
        self.assertEqual((environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]), ("127.0.0.1", "http"))
        server.stop()
        server = self.start_app("--proxy-headers", "--forwarded-allow-ips", "10.9.9.9,127.0.0.1",
                                "127.0.0.1:0")
        target = ("127.0.0.1", int(server.wait_ready().rsplit(":", 1)[1]))
        environ = self.environ_via(target, self.HEADERS)
        self.assertEqual((environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]),
                         ("198.51.100.7", "https"))

    def test_forwarded_allow_ips_needs_proxy_headers(self):
        self.assertOneLineError(["--forwarded-allow-ips", "127.0.0.1", self.sock], 2,
                                "--proxy-headers")

    def test_forwarded_allow_ips_takes_addresses_only(self):
        # A network or a name would silently match no peer: refuse it instead.
        for wrong in ("10.0.0.0/8", "*", "proxy.example", "127.0.0.1,"):
            self.assertOneLineError(["--proxy-headers", "--forwarded-allow-ips", wrong, self.sock],
                                    2, "is not an IP address")

    def test_an_ipv4_proxy_on_a_dual_stack_socket_is_trusted_by_its_ipv4_address(self):
        server = self.start_app("--proxy-headers", "--forwarded-allow-ips", "127.0.0.1", "[::]:0")
        port = int(server.wait_ready().rsplit(":", 1)[1])
        environ = self.environ_via(("127.0.0.1", port), self.HEADERS)  # arrives as ::ffff:127.0.0.1
        self.assertEqual((environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]),
                         ("198.51.100.7", "https"))
        environ = self.environ_via(("::1", port), self.HEADERS)  # not on the list
        self.assertEqual((environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]), ("::1", "http"))

    def test_script_name_mounts_the_app_under_a_prefix(self):
        self.start_app("--script-name", "/app", self.sock)
        environ = json.loads(get(self.sock, "/app/env?x=1")[2])
        self.assertEqual((environ["SCRIPT_NAME"], environ["PATH_INFO"], environ["QUERY_STRING"]),
                         ("/app", "/env", "x=1"))
        for outside in ("/", "/other/env", "/application/env"):
            self.assertEqual(get(self.sock, outside)[0], 404, outside)
        self.assertOneLineError(["--script-name", "app/", self.sock], 2, "/prefix")


class SystemdTests(ServerTestCase):
    def test_socket_activation_under_systemd_socket_activate(self):
        activate = require_tool(self, "systemd-socket-activate")
        server = self.start(ready=False, command=[activate, "-l", self.sock, sys.executable,
                                                  SERVER, "--app", "testapp:app", "fd:3"])
        # (Its socket file exists from bind(), a moment before listen(): connect to it.)
        wait_for(lambda: connectable(self.sock), "systemd-socket-activate to listen")
        self.assertEqual(get(self.sock)[0], 200)  # the first connection starts the service
        self.assertIn("serving on fd:3", server.wait_ready())
        variables = json.loads(get(self.sock, "/osenv")[2])
        self.assertNotIn("LISTEN_FDS", variables)
        self.assertNotIn("LISTEN_PID", variables)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.sock).st_mode))  # systemd's, not ours

    def notify_listener(self, address):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(address)
        listener.settimeout(DEADLINE)
        self.addCleanup(listener.close)
        return listener

    def test_type_notify_gets_ready_and_stopping(self):
        for name in (os.path.join(self.dir, "notify"), f"@wsgi_unix-notify-{os.getpid()}"):
            listener = self.notify_listener(name if name[0] != "@" else "\0" + name[1:])
            server = self.start_app(env={"PATH": os.environ["PATH"], "NOTIFY_SOCKET": name})
            self.assertEqual(listener.recv(100), b"READY=1")
            server.signal(signal.SIGTERM)
            self.assertEqual(listener.recv(100), b"STOPPING=1")
            self.assertEqual(server.wait(), 0)

    def test_readme_units_verify_and_their_command_serves(self):
        analyze = require_tool(self, "systemd-analyze")
        activate = require_tool(self, "systemd-socket-activate")
        units = os.path.join(self.dir, "units")
        os.mkdir(units)
        socket_unit = readme_block("ini", "ListenStream=")
        service_unit = readme_block("ini", "ExecStart=")
        # The units as written, with /opt/app where the test keeps the app (and its venv).
        opt_app = os.path.join(self.dir, "opt-app")
        os.makedirs(os.path.join(opt_app, "venv", "bin"))
        os.symlink(sys.executable, os.path.join(opt_app, "venv", "bin", "python"))
        for name, text in (("app.socket", socket_unit), ("app.service", service_unit)):
            with open(os.path.join(units, name), "w") as f:
                f.write(text.replace("/opt/app", opt_app))
        result = subprocess.run([analyze, "verify", "app.socket", "app.service"], cwd=units,
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SocketMode=0660", socket_unit)
        self.assertIn("SocketGroup=www-data", socket_unit)
        # Run the service's command as systemd would: the socket as fd 3, NOTIFY_SOCKET set.
        self.assertIn("StateDirectory=app", service_unit)  # a writable place under DynamicUser
        shutil.copy(SERVER, opt_app)
        with open(os.path.join(opt_app, "app.py"), "w") as f:
            f.write("def application(environ, start_response):\n"
                    "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
                    "    return [b'from the unit\\n']\n")
        command = [line.split("=", 1)[1] for line in service_unit.splitlines()
                   if line.startswith("ExecStart=")][0].replace("/opt/app", opt_app).split()
        command[0] = sys.executable if not os.path.exists(command[0]) else command[0]
        notify = self.notify_listener(os.path.join(self.dir, "notify"))
        server = Server([activate, "-l", self.sock, "-E", "NOTIFY_SOCKET=" +
                         os.path.join(self.dir, "notify")] + command, opt_app)
        self.servers.append(server)
        wait_for(lambda: os.path.exists(self.sock), "the socket")
        self.assertEqual(get(self.sock)[0::2], (200, b"from the unit\n"))
        self.assertEqual(notify.recv(100), b"READY=1")


class FrameworkTests(ServerTestCase):
    """What real WSGI apps do, each done by the test app."""

    def test_wsgi_input_read_in_pieces(self):
        self.start_app()
        payload = os.urandom(300000)
        self.assertEqual(get(self.sock, "/stream-echo", "POST", body=payload)[2], payload)

    def test_file_wrapper_is_sent_with_sendfile(self):
        self.start_app()
        path = os.path.join(self.dir, "served.txt")
        with open(path, "wb") as f:
            f.write(b"0123456789" * 100000)
        status, response, body = get(self.sock, f"/file?{path}")
        self.assertEqual((status, body), (200, b"0123456789" * 100000))
        self.assertEqual(response.getheader("Content-Length"), "1000000")
        answer = raw_request(self.sock, request_bytes(f"/file?{path}", "HEAD"))
        self.assertEqual(split_response(answer)[0::2], (200, b""))
        self.assertEqual(get(self.sock, "/pipe")[0::2], (200, b"through a pipe\n"))  # not sendfile

    def test_write_from_start_response_and_exc_info(self):
        self.start_app()
        self.assertEqual(get(self.sock, "/write")[0::2], (200, b"written, then returned\n"))
        self.assertEqual(get(self.sock, "/exc-info")[0::2], (503, b"sorry\n"))

    def test_the_readme_dockerfile_cmd_serves_as_its_user(self):
        dockerfile = readme_block("dockerfile", "CMD")
        self.assertIn("COPY wsgi_unix.py app.py requirements.txt ./", dockerfile)
        self.assertIn("USER 1000:101", dockerfile)
        command = json.loads(dockerfile.split("\nCMD ", 1)[1].split("\n", 1)[0])
        app_dir, run_dir = os.path.join(self.dir, "app"), os.path.join(self.dir, "run-app")
        for directory in (app_dir, run_dir):
            os.mkdir(directory)
        os.chown(run_dir, 1000, 101)  # as the RUN line does for /run/app
        shutil.copy(SERVER, app_dir)
        with open(os.path.join(app_dir, "app.py"), "w") as f:
            f.write("def application(environ, start_response):\n"
                    "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
                    "    return [b'in a container\\n']\n")
        python = python_for_nobody()
        command = [python if arg == "python" else arg.replace("/run/app", run_dir) for arg in command]

        def as_container_user():
            os.setgid(101)
            os.setgroups([])
            os.setuid(1000)
        server = Server(command, app_dir, env={"PATH": os.environ["PATH"]},
                        preexec_fn=as_container_user)
        self.servers.append(server)
        server.wait_ready()
        sock = os.path.join(run_dir, "app.sock")
        self.assertEqual(get(sock)[0::2], (200, b"in a container\n"))
        info = os.lstat(sock)
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_gid), (0o660, 101))
        # The HEALTHCHECK, and the Kubernetes pod's probes, which run in the same image.
        health = dockerfile.split("\nHEALTHCHECK ", 1)[1].split("\n", 1)[0]
        pod = readme_block("yaml", "kind: Pod")
        probes = [json.loads(health.split(" CMD ", 1)[1])] + [
            json.loads(line.split("command:", 1)[1]) for line in pod.splitlines()
            if "command:" in line]
        self.assertEqual(len(probes), 3)

        def probe(command):
            return subprocess.run(
                [python if arg == "python" else arg.replace("/run/app", run_dir)
                 for arg in command], cwd=app_dir, env={"PATH": os.environ["PATH"]},
                preexec_fn=as_container_user, capture_output=True, text=True, timeout=DEADLINE)
        for command in probes:
            result = probe(command)
            self.assertEqual((result.returncode, result.stderr), (0, ""), command)
        # Both containers mount the socket's volume where the probes and the site look.
        self.assertEqual(pod.count("- {name: run-app, mountPath: /run/app}"), 2)
        self.assertIn("server unix:/run/app/app.sock;", readme_block("nginx", "proxy_http_version"))
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        result = probe(probes[0])
        self.assertEqual(result.returncode, 1)
        self.assertIn("no such socket", result.stderr)

    def test_help_and_the_readme_list_the_same_options(self):
        import re
        text = subprocess.run([sys.executable, SERVER, "--help"], capture_output=True,
                              text=True).stdout
        in_help = set(re.findall(r"^\s+(--[a-z-]+)", text, re.M)) - {"--help", "--version"}
        with open(os.path.join(HERE, "README.md")) as f:
            rows = [line for line in f.read().splitlines() if line.startswith("| `--")]
        self.assertEqual(in_help, set(re.findall(r"`(--[a-z-]+)", "\n".join(rows))))
        # Each setting's row is the settings table's: option, default, help.
        for setting in wsgi_unix._SETTINGS:
            name = setting["option"] + (" " + setting["metavar"] if setting["metavar"] else "")
            self.assertIn("| `%s` | %s | %s |" % (name.replace("|", "\\|"), setting["shown"],
                                                  setting["help"]), rows)

    def test_as_pid_1_it_says_to_run_with_an_init(self):
        # As PID 1 (a container's first process) orphans of the app's subprocesses became
        # zombies for good (200 after 200 requests); the README says docker run --init.
        require_tool(self, "unshare")
        server = self.start(command=["unshare", "--pid", "--fork", "--kill-child",
                                     "--mount-proc", sys.executable, SERVER, "--app",
                                     "testapp:app", self.sock], ready=False)
        line = server.wait_line("warning")
        self.assertIn("running as PID 1", line)
        self.assertIn("docker run --init", line)
        server.wait_ready()
        self.assertEqual(get(self.sock)[0], 200)

    def test_bare_container_run_serves(self):
        # No environment at all, no site-packages, isolated mode: as in a scratch container.
        shutil.copy(SERVER, self.dir)
        self.start(env={}, command=[sys.executable, "-I", "-S", "wsgi_unix.py", self.sock])
        status, _, body = get(self.sock)
        self.assertEqual(status, 200)
        self.assertIn(b"UTC", body)

    def framework_python(self):
        """A Python with Flask and Django (.ci/run makes one); skipped elsewhere, failed in CI."""
        python = os.environ.get("WSGI_UNIX_FRAMEWORK_PYTHON")
        if not python:
            if os.environ.get("CI"):
                self.fail("WSGI_UNIX_FRAMEWORK_PYTHON is not set; .ci/run should set it")
            self.skipTest("set WSGI_UNIX_FRAMEWORK_PYTHON to a Python with flask and django")
        return python

    def test_a_real_flask_app(self):
        python = self.framework_python()
        with open(os.path.join(self.dir, "flaskapp.py"), "w") as f:
            f.write(FLASK_APP)
        self.start(env={"PATH": os.environ["PATH"]}, command=[
            python, SERVER, "--proxy-headers", "--app", "flaskapp:app", self.sock])
        self.assertEqual(get(self.sock, "/hello/world")[0::2], (200, b"hello, world"))
        status, _, body = get(self.sock, "/echo", "POST", body=b'{"a": [1, 2]}',
                              headers={"Content-Type": "application/json",
                                       "X-Forwarded-For": "192.0.2.1",
                                       "X-Forwarded-Proto": "https"})
        self.assertEqual((status, json.loads(body)),
                         (200, {"json": {"a": [1, 2]}, "remote": "192.0.2.1", "scheme": "https"}))
        status, response, _ = get(self.sock, "/old")
        self.assertEqual((status, response.getheader("Location")), (302, "/hello/moved"))
        self.assertEqual(get(self.sock, "/stream")[0::2], (200, b"0123456789"))
        self.assertEqual(get(self.sock, "/nowhere")[0], 404)
        self.assertEqual(get(self.sock, "/boom")[0], 500)

    def test_a_real_django_app(self):
        python = self.framework_python()
        with open(os.path.join(self.dir, "djangoapp.py"), "w") as f:
            f.write(DJANGO_APP)
        self.start(env={"PATH": os.environ["PATH"]}, command=[
            python, SERVER, "--app", "djangoapp:application", self.sock])
        self.assertEqual(get(self.sock, "/hello/django/")[0::2], (200, b"hello, django"))
        self.assertEqual(get(self.sock, "/upload/", "POST", body=b"x" * 100000,
                             headers={"Content-Type": "application/octet-stream"})[0::2],
                         (200, b"100000 bytes"))
        self.assertEqual(get(self.sock, "/nowhere/")[0], 404)

    def test_help_reads_like_a_man_page(self):
        result = subprocess.run([sys.executable, SERVER, "--help"], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0)
        text = result.stdout
        for part in ("usage:", "ADDRESS [-- COMMAND", "--app MODULE:CALLABLE", "addresses:",
                     "unix:@NAME", "fd:3", "examples:", "exit status:"):
            self.assertIn(part, text)
        options = ["--mode", "--group", "--threads", "--timeout", "--keep-alive",
                   "--max-request-body", "--graceful-timeout",
                   "--max-connections", "--allow-uid", "--proxy-headers", "--forwarded-allow-ips",
                   "--script-name", "--quiet", "--version", "--cgi", "--pass-env", "--max-body",
                   "--max-output", "--command-timeout", "--methods", "--max-procs"]
        for option in options:
            self.assertIn(option, text)
        self.assertGreaterEqual(text.count("default"), 12)


if __name__ == "__main__":
    unittest.main()
