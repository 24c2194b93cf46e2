"""Tests for wsgi_unix.py: real server processes, real sockets, real HTTP.

    python3 -m unittest -v test_wsgi_unix

Each test names the promise it checks.  Servers run as subprocesses in a temporary directory;
tests wait on conditions with deadlines (the readiness line, a connect), never on sleeps.
"""

import errno
import grp
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "wsgi_unix.py")
sys.path.insert(0, HERE)
import wsgi_unix  # noqa: E402

DEADLINE = 10.0  # seconds any single wait may take before the test fails

# The WSGI apps the tests serve, written next to each server as testapp.py.
TEST_APP = r'''
import json, os, sys, threading, time

barrier = None


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path in ("/slow", "/forever"):
        print("app: %s started" % path, file=environ["wsgi.errors"], flush=True)
    if path.startswith("/env"):
        body = json.dumps({k: v for k, v in environ.items() if isinstance(v, (str, bool, int))})
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
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello\n"]
'''


def unix_connection(path, timeout=DEADLINE):
    """An http.client connection over a connected AF_UNIX socket."""
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    conn.sock = sock
    return conn


def get(path, url="/", method="GET", body=None, headers=None):
    """One request over the socket at ``path``; returns (status, headers, body)."""
    conn = unix_connection(path)
    try:
        conn.request(method, url, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def raw_request(path, data, timeout=DEADLINE):
    """Send raw bytes, return everything the server answers until it closes."""
    family = socket.AF_INET if isinstance(path, tuple) else socket.AF_UNIX
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
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


def connectable(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


class Server:
    """A wsgi_unix.py process; its stderr is collected line by line."""

    def __init__(self, args, cwd, env=None, pass_fds=(), preexec_fn=None):
        self.lines = []
        self._new_line = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, SERVER] + list(args), cwd=cwd, env=env, pass_fds=pass_fds,
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

    def start(self, *args, env=None, ready=True, **kwargs):
        if env is None:
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        server = Server(args, self.dir, env=env, **kwargs)
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


# --- Addresses ----------------------------------------------------------------------------

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

    def test_abstract_socket_serves_and_warns(self):
        name = f"@wsgi_unix-test-{os.getpid()}-{id(self)}"
        server = self.start_app("unix:" + name)
        warning = server.wait_line("warning")
        self.assertIn("anyone", warning)
        self.assertEqual(get("\0" + name[1:])[0], 200)


# --- The socket file ----------------------------------------------------------------------

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

    def test_path_too_long_is_a_one_line_error(self):
        path = os.path.join(self.dir, "x" * 120 + ".sock")
        self.assertOneLineError([path], 1, "longer than the 107")


# --- The server and its handler -----------------------------------------------------------

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
        self.assertTrue(answer.startswith(b"HTTP/1.0 400 "), answer[:80])

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
        try:
            for address in (self.sock, "127.0.0.1:0"):
                with wsgi_unix.make_server(address, lambda e, s: (s("200 OK", []), [b"x"])[1],
                                           access_log=True) as server:
                    thread = threading.Thread(target=server.serve_forever)
                    thread.start()
                    target = (server.server_address if server.address_family != socket.AF_UNIX
                              else self.sock)
                    self.assertEqual(status_of(raw_request(target, b"GET / HTTP/1.0\r\n\r\n")), 200)
                    server.shutdown()
                    thread.join(DEADLINE)
        finally:
            for name, function in saved.items():
                setattr(socket, name, function)
        self.assertEqual(calls, [])


class ShutdownTests(ServerTestCase):
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

    def test_readiness_line_names_the_resolved_address(self):
        os.symlink(self.dir, os.path.join(self.dir, "here"))
        server = self.start("--app", "testapp:app", "app.sock")
        self.assertEqual(server.wait_ready(), f"wsgi_unix: serving on unix:{self.sock}")


# --- The command line and the API ---------------------------------------------------------

class CommandLineTests(ServerTestCase):
    def test_default_command_serves_the_date(self):
        self.start(self.sock)
        status, response, body = get(self.sock)
        self.assertEqual(status, 200)
        self.assertEqual(response.getheader("Content-Type"), "text/plain; charset=utf-8")
        self.assertIn(b"UTC", body)

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

    def test_usage_errors_exit_2_and_help_and_version_exit_0(self):
        self.assertOneLineError([], 2, "ADDRESS")
        self.assertOneLineError(["--threads", "0", self.sock], 2, "--threads")
        self.assertOneLineError(["--mode", "999", self.sock], 2, "--mode")
        self.assertOneLineError(["--app", "testapp:app", self.sock, "--", "date"], 2, "not both")
        result = subprocess.run([sys.executable, SERVER, "--help"], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0)
        self.assertIn("ADDRESS", result.stdout)
        result = subprocess.run([sys.executable, SERVER, "--version"], capture_output=True, text=True)
        self.assertEqual((result.returncode, result.stdout.strip()),
                         (0, f"wsgi_unix {wsgi_unix.__version__}"))

    def test_quiet_drops_the_access_log(self):
        server = self.start_app("--quiet", self.sock)
        self.assertEqual(get(self.sock)[0], 200)
        server.signal(signal.SIGTERM)
        server.wait()
        self.assertEqual(server.log().splitlines(), [f"wsgi_unix: serving on unix:{self.sock}"])


class APITests(ServerTestCase):
    def test_serve_in_a_thread_installs_no_signal_handlers(self):
        before = signal.getsignal(signal.SIGTERM)
        servers = []

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"api\n"]

        original = wsgi_unix.WSGIServer.serve_forever

        def serve_forever(server, *args):
            servers.append(server)
            original(server, *args)
        thread = threading.Thread(target=wsgi_unix.serve, args=(app, self.sock),
                                  kwargs={"server_class": type("S", (wsgi_unix.WSGIServer,),
                                                               {"serve_forever": serve_forever}),
                                          "threads": 2, "access_log": False})
        thread.start()
        wait_for(lambda: servers, "the server to start")
        self.assertEqual(get(self.sock)[2], b"api\n")
        self.assertIs(signal.getsignal(signal.SIGTERM), before)
        servers[0].shutdown()
        thread.join(DEADLINE)
        self.assertFalse(os.path.lexists(self.sock))

    def test_public_names_have_docstrings(self):
        for name in wsgi_unix.__all__:
            self.assertTrue(getattr(wsgi_unix, name).__doc__, name)


if __name__ == "__main__":
    unittest.main()
