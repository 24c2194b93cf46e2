#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The wsgi_unix.py authors
"""Serve a WSGI application on a Unix domain socket, safely, with the standard library only.

Copy this one file next to your app, in a bare container behind nginx, and run::

    python3 wsgi_unix.py --app myapp:application /run/app/app.sock
    python3 wsgi_unix.py /run/app/app.sock -- uptime     # the example app: a command per request

It extends ``wsgiref.simple_server`` (subclasses, not a rewrite) where wsgiref falls short:

- any address: a Unix socket file, a Linux abstract socket, TCP over IPv4 or IPv6, or a socket
  inherited from systemd -- and no DNS look-up at start-up or per request;
- the socket file done right: a stale one is removed, a live one or anything that is not a socket
  is never touched, its mode and group are in force before anyone can connect, and only the file
  this process created is removed at exit;
- a fixed set of threads that each accept their own connections, a large listen backlog, time
  limits, and a waiting room so that silent or slow clients cannot occupy them;
- a strict request parser with wsgiref's limits that drops header names containing "_";
- nothing from ``os.environ`` reaches the application (wsgiref copies all of it, secrets included);
- SIGTERM and SIGINT stop it gracefully: no new connections, requests in flight may finish.

What it deliberately does not do: TLS, HTTP/2, keep-alive, worker processes or reloading.
Put nginx in front for the first three, and use gunicorn or uWSGI when you need the rest;
the same WSGI app runs there unchanged.
"""

import errno
import fcntl
import grp
import os
import re
import selectors
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import deque
from email.utils import formatdate
from wsgiref import simple_server

__version__ = "0.1.0"
__all__ = [
    "AddressError", "ServeError", "ListenAddress", "WSGIServer", "WSGIRequestHandler",
    "ServerHandler", "command_app", "make_server", "serve", "main",
]

PROG = "wsgi_unix"
SERVER_SOFTWARE = "wsgi_unix/" + __version__

# The limits of http.server, which wsgiref parses with: a request line or a header line of at
# most 64 KiB, at most 100 header lines.  The whole head is capped too, so that one connection
# cannot hold more than this much of our memory before it is answered.
MAX_LINE = 65536
MAX_HEADERS = 100
MAX_HEAD = 256 * 1024


class AddressError(ValueError):
    """The address is malformed or names nothing usable (the CLI exits with status 2)."""


class ServeError(Exception):
    """The server cannot start or run as asked (the CLI exits with status 1)."""


# --- Addresses ----------------------------------------------------------------------------

# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_PATH = 107


class ListenAddress:
    """Where to listen, parsed from text, and the socket file that goes with it.

    ``/run/app.sock``, ``app.sock``, ``unix:PATH``: a socket file (any text with a ``/`` or
    without a ``:``).  ``unix:@NAME``: a Linux abstract socket.  ``HOST:PORT`` and
    ``[IPV6]:PORT``: TCP.  ``fd:N``: a listening socket inherited as file descriptor N.

    ``listen()`` returns a bound, listening socket; ``remove_socket_file()`` removes the socket
    file only while it is still the one ``listen()`` created.  Subclass it to add a form.
    """

    def __init__(self, text):
        self.text = text
        self.kind = None  # "unix", "abstract", "tcp" or "fd"
        self.path = self.host = self.port = self.fd = None
        self.inherited = False  # an fd: socket belongs to whoever passed it to us
        self._identity = None  # (st_dev, st_ino) of the socket file we created
        self._parse(text)

    def _parse(self, text):
        if text.startswith("fd:"):
            number = text[3:]
            if not (number.isascii() and number.isdigit()):
                raise AddressError(f"{text}: fd:N needs a file descriptor number, e.g. fd:3")
            self.kind, self.fd, self.inherited = "fd", int(number), True
        elif text.startswith("unix:") or "/" in text or ":" not in text:
            path = text[5:] if text.startswith("unix:") else text
            if path in ("", "@"):
                raise AddressError(f"{text}: no socket path; write e.g. unix:/run/app.sock")
            if "\0" in path:
                raise AddressError(f"{text!r}: a socket path cannot contain a NUL byte")
            if path.startswith("@"):
                self.kind, self.path = "abstract", path
            else:
                self.kind, self.path = "unix", os.path.abspath(path)
        else:
            host, _, port = text.rpartition(":")
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            elif ":" in host:
                raise AddressError(f"{text}: put an IPv6 address in brackets, e.g. [::1]:8000")
            if not host:
                raise AddressError(f"{text}: no host; to listen on every interface say "
                                   f"0.0.0.0:{port or 8000} or [::]:{port or 8000}")
            if not (port.isascii() and port.isdigit()) or int(port) > 65535:
                raise AddressError(f"{text}: the port must be a number from 0 to 65535")
            self.kind, self.host, self.port = "tcp", host, int(port)

    def __str__(self):
        if self.kind == "unix":
            return "unix:" + self.path
        if self.kind == "abstract":
            return "unix:" + self.path
        if self.kind == "fd":
            return f"fd:{self.fd}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def listen(self, mode=0o600, group=None, backlog=1024):
        """Return a socket bound to this address and listening.  Raise ServeError or AddressError."""
        if self.kind == "fd":
            return self._inherit()
        if self.kind == "tcp":
            return self._listen_tcp(backlog)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.kind == "abstract":
                self._bind(sock, "\0" + self.path[1:])
                sock.listen(backlog)
            else:
                self._listen_unix_file(sock, mode, group, backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def _bind(self, sock, target):
        try:
            sock.bind(target)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServeError(f"{self} is in use by a running server") from None
            if exc.errno == errno.EACCES and self.kind == "tcp" and self.port < 1024:
                raise ServeError(f"{self}: ports below 1024 need root or CAP_NET_BIND_SERVICE; "
                                 f"use a higher port") from None
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                where = os.path.dirname(self.path) if self.kind == "unix" else self
                raise ServeError(f"{self}: no permission to create the socket in {where}; run as a "
                                 f"user who may write there, or choose another directory") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ServeError(f"{self}: {self.host} is not an address of this machine") from None
            raise ServeError(f"{self}: cannot bind: {exc.strerror}") from None

    def _listen_tcp(self, backlog):
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as exc:
            raise AddressError(f"{self}: cannot resolve {self.host!r}: {exc}") from None
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Without it a restart fails for a minute while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._bind(sock, sockaddr)
            sock.listen(backlog)
            self.port = sock.getsockname()[1]  # the one the kernel chose for port 0
        except BaseException:
            sock.close()
            raise
        return sock

    def _inherit(self):
        try:
            sock = socket.socket(fileno=self.fd)
        except OSError as exc:
            raise AddressError(f"{self}: file descriptor {self.fd} is not an open socket "
                               f"({exc.strerror})") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET,
                                                                  socket.SO_ACCEPTCONN):
            sock.detach()  # not ours to close
            raise AddressError(f"{self}: file descriptor {self.fd} is not a listening stream socket")
        return sock

    # --- The socket file -------------------------------------------------------------------

    def _lock_directory(self):
        """Open and flock the socket's directory; return the descriptor (close it to unlock).

        Probing, removing and binding a socket file are three steps, and between another
        starter's bind() and its listen() our probe would see ECONNREFUSED -- "stale" -- and
        remove a live socket.  An exclusive flock on the directory makes the three steps one
        for every wsgi_unix process; it is taken on the directory because the file itself is
        what comes and goes, and it is released on close, also when the process dies.
        """
        directory = os.path.dirname(self.path)
        try:
            fd = os.open(directory, os.O_RDONLY)
        except FileNotFoundError:
            raise ServeError(f"{self}: directory {directory} does not exist; create it first") from None
        except PermissionError:
            raise ServeError(f"{self}: no permission to open directory {directory}") from None
        except NotADirectoryError:
            raise ServeError(f"{self}: {directory} is not a directory") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _listen_unix_file(self, sock, mode, group, backlog):
        size = len(os.fsencode(self.path))
        if size > _MAX_UNIX_PATH:
            raise ServeError(f"{self}: the path is {size} bytes, longer than the {_MAX_UNIX_PATH} "
                             f"a Unix socket allows; use a shorter path")
        gid = _group_id(group)
        lock = self._lock_directory()
        try:
            self._remove_stale_socket()
            # bind() creates the file with mode 0777 & ~umask, so the umask sets its mode from
            # its first instant; the group is set before listen(), so the only instant with the
            # process's own group is one in which nobody can connect yet.  (umask is process-wide,
            # but for that instant it is only ever tighter.)
            old_umask = os.umask(0o777 & ~mode)
            try:
                self._bind(sock, self.path)
            finally:
                os.umask(old_umask)
            info = os.lstat(self.path)
            self._identity = (info.st_dev, info.st_ino)
            if gid is not None:
                try:
                    os.chown(self.path, -1, gid, follow_symlinks=False)
                except PermissionError:
                    self.remove_socket_file(locked=True)
                    raise ServeError(f"{self}: no permission to give the socket to group {group}; "
                                     f"run as a member of that group, or as root") from None
            sock.listen(backlog)
        finally:
            os.close(lock)

    def _remove_stale_socket(self):
        """Remove a socket file nobody answers on; refuse anything else at the path."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise ServeError(f"{self}: {self.path} is {_describe(info)}, not a socket; "
                             f"refusing to remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)  # a full backlog answers EAGAIN at once instead of waiting
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            pass  # stale: nobody listens
        except FileNotFoundError:
            return
        except BlockingIOError:
            raise ServeError(f"{self} is in use by a running server (its backlog is full)") from None
        except PermissionError:
            raise ServeError(f"{self}: a socket at {self.path} belongs to someone this user may "
                             f"not connect as; refusing to remove it") from None
        else:
            raise ServeError(f"{self} is in use by a running server")
        finally:
            probe.close()
        # The lock keeps wsgi_unix starters out; this keeps us from removing a file that a
        # different program put there since the probe.
        now = os.lstat(self.path)
        if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
            os.unlink(self.path)

    def remove_socket_file(self, locked=False):
        """Remove the socket file if the path still holds the one this process created.

        A file another process has put there since (same path, another device or inode) is
        left alone.  Idempotent; a no-op for addresses without a file.
        """
        identity, self._identity = self._identity, None
        if identity is None:
            return
        lock = None if locked else self._lock_directory()
        try:
            info = os.lstat(self.path)
            if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            if lock is not None:
                os.close(lock)


def _describe(info):
    kinds = [(stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO")]
    return next((name for test, name in kinds if test(info.st_mode)), "a device or other file")


def _group_id(group):
    if group is None or isinstance(group, int):
        return group
    if group.isascii() and group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ServeError(f"group {group!r} does not exist; give a group name or a number") from None


# --- The server ---------------------------------------------------------------------------

class WSGIServer(simple_server.WSGIServer):
    """wsgiref's WSGIServer on any ListenAddress, served by a fixed set of threads.

    Each of ``threads`` threads accepts its own connections and serves them: no hand-off and
    no thread start per request.  A connection whose request head has not fully arrived goes
    to the waiting room -- a selector in the thread that runs ``serve_forever()`` -- so that
    silent and slow clients hold no thread; once its head is complete it is served in a thread
    of its own.  At most ``max_connections`` are open at once; beyond that, new connections
    wait in the kernel's listen backlog.
    """

    request_queue_size = 1024  # wsgiref's 5 makes nginx answer 502 under the lightest load

    def __init__(self, address, RequestHandlerClass=None, *, mode=0o600, group=None, threads=8,
                 timeout=30.0, graceful_timeout=10.0, max_connections=1024, access_log=True):
        self.listen_address = address if isinstance(address, ListenAddress) else ListenAddress(address)
        # TCPServer.__init__ would make a socket of one fixed family; the address makes ours.
        socketserver.BaseServer.__init__(self, str(self.listen_address),
                                         RequestHandlerClass or WSGIRequestHandler)
        self.socket = self.listen_address.listen(mode, group, self.request_queue_size)
        self.address_family = self.socket.family
        self.server_address = self.socket.getsockname()
        if self.address_family == socket.AF_UNIX:
            # No host name to look up; wsgiref.util.request_uri() builds sane URLs from these.
            self.server_name, self.server_port = "localhost", 80
        else:
            self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()
        self.threads = threads
        self.timeout = timeout
        self.graceful_timeout = graceful_timeout
        self.access_log = access_log
        self._slots = threading.BoundedSemaphore(max_connections)
        self._busy = 0  # connections being served by a thread
        self._idle = threading.Condition()
        self._arrivals = deque()  # connections for the waiting room
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_w.setblocking(False)
        self._stop_requested = False
        self._stopped = threading.Event()

    def __str__(self):
        return str(self.listen_address)

    def server_close(self):
        """Close the listening socket and remove the socket file, if it is still ours."""
        super().server_close()
        self.listen_address.remove_socket_file()
        self._wakeup_r.close()
        self._wakeup_w.close()

    def request_stop(self):
        """Ask serve_forever() to stop, without waiting.  Safe in a signal handler."""
        self._stop_requested = True
        self._wake()

    def shutdown(self):
        """Stop serve_forever() and wait until it has returned (call it from another thread)."""
        self.request_stop()
        self._stopped.wait()

    def _wake(self, byte=b"s"):
        try:
            self._wakeup_w.send(byte)
        except OSError:
            pass  # already full (a wake-up is pending) or closed (stopped)

    def serve_forever(self, poll_interval=1.0):
        """Serve until shutdown() or request_stop(), then stop gracefully.

        New connections are refused at once; requests in flight get ``graceful_timeout``
        seconds to finish.  This thread is the waiting room meanwhile; ``poll_interval`` is
        how often it looks for clients that have run out of time.
        """
        self._stopped.clear()
        for number in range(self.threads):
            threading.Thread(target=self._accept_loop, name=f"{PROG}-{number}", daemon=True).start()
        selector = selectors.DefaultSelector()
        selector.register(self._wakeup_r, selectors.EVENT_READ)
        waiting = {}  # connection -> [client address, bytes received, deadline]
        try:
            while not self._stop_requested:
                for key, _ in selector.select(poll_interval if waiting else None):
                    if key.fileobj is self._wakeup_r:
                        self._wakeup_r.recv(4096)
                        while self._arrivals:
                            conn, address, received = self._arrivals.popleft()
                            waiting[conn] = [address, received, time.monotonic() + self.timeout]
                            selector.register(conn, selectors.EVENT_READ)
                    else:
                        self._on_waiting_readable(key.fileobj, waiting, selector)
                now = time.monotonic()
                for conn in [c for c, entry in waiting.items() if entry[2] < now]:
                    selector.unregister(conn)
                    del waiting[conn]
                    self._close(conn, b"HTTP/1.0 408 Request Timeout\r\nConnection: close\r\n"
                                      b"Content-Length: 0\r\n\r\n")
        finally:
            self._stop_accepting()
            for conn in list(waiting) + [entry[0] for entry in self._arrivals]:
                self._close(conn)
            selector.close()
            self._wait_for_requests(self.graceful_timeout)
            self._stopped.set()

    def _on_waiting_readable(self, conn, waiting, selector):
        entry = waiting[conn]
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            entry[1] += data
            if not _head_ready(entry[1]):
                return
        selector.unregister(conn)
        del waiting[conn]
        if not data:
            self._close(conn)  # the client gave up before sending a whole request
            return
        threading.Thread(target=self._serve_connection, args=(conn, entry[0], entry[1]),
                         name=f"{PROG}-waited", daemon=True).start()

    def _stop_accepting(self):
        self._stop_requested = True
        if not self.listen_address.inherited:
            # Wakes every thread blocked in accept() (EINVAL) and refuses new connections at
            # once, so nginx answers 502 now instead of queueing.  An inherited socket is
            # shared with systemd, which keeps it for the next start: leave it listening.
            try:
                self.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _wait_for_requests(self, timeout):
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())

    def _accept_loop(self):
        while not self._stop_requested:
            self._slots.acquire()
            try:
                conn, address = self.socket.accept()
            except OSError as exc:
                self._slots.release()
                if self._stop_requested:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the connection stays in the backlog, and
                    # retrying at once would spin a core; wait for others to close.
                    self._log_once(f"accept() failed: {exc.strerror}; retrying")
                    time.sleep(0.1)
                continue
            self._serve_connection(conn, address, b"")

    def _serve_connection(self, conn, address, received):
        """Read the request head if it is there already, else send the connection to the
        waiting room; serve it once the head is complete."""
        try:
            while not _head_ready(received):
                try:
                    data = conn.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    conn.setblocking(False)
                    self._arrivals.append((conn, address, received))
                    self._wake(b"p")
                    return
                if not data:
                    self._close(conn)
                    return
                received += data
        except OSError:
            self._close(conn)
            return
        with self._idle:
            self._busy += 1
        try:
            conn.settimeout(self.timeout)
            self.finish_request(conn, address, received)
        except Exception:
            self.handle_error(conn, address)
        finally:
            self._close(conn)
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def finish_request(self, request, client_address, received=b""):
        """Serve one connection whose request head (at least) is in ``received``."""
        self.RequestHandlerClass(request, client_address, self, received)

    def _close(self, conn, last_words=b""):
        try:
            if last_words:
                conn.send(last_words)
            conn.close()
        except OSError:
            pass
        finally:
            self._slots.release()

    _logged = set()

    def _log_once(self, message):
        if message not in self._logged:
            self._logged.add(message)
            sys.stderr.write(f"{PROG}: {message}\n")


def _head_ready(received):
    """True once ``received`` holds a whole request head, or too much to be a valid one."""
    if _HEAD_END.search(received):
        return True
    if len(received) > MAX_HEAD:
        return True
    return b"\n" not in received[:MAX_LINE + 1] and len(received) > MAX_LINE


# --- The request handler ------------------------------------------------------------------

class _HTTPError(Exception):
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line that ends a head, CRLF or bare LF
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_VERSION = re.compile(rb"HTTP/\d\.\d\Z")
_LOG_ESCAPES = {c: f"\\x{c:02x}" for c in list(range(0x20)) + list(range(0x7f, 0xa0))}
_LOG_ESCAPES[ord("\\")] = "\\\\"


def parse_request_head(received):
    """Parse a request head: return (method, target, version, [(name, value)], bytes after it).

    Enforces http.server's limits (414 for a long request line, 431 for a long header line or
    too many headers) and refuses what proxies disagree about: bare HTTP/0.9, control bytes,
    whitespace before a colon, folded header lines.  Raises _HTTPError with the status.
    """
    end = _HEAD_END.search(received)
    if end is None:
        if b"\n" not in received[:MAX_LINE + 1]:
            raise _HTTPError(414, "request line too long")
        raise _HTTPError(431, "request head too large")
    lines = received[:end.start()].split(b"\n")
    line = lines[0][:-1] if lines[0].endswith(b"\r") else lines[0]
    if len(line) > MAX_LINE:
        raise _HTTPError(414, "request line too long")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise _HTTPError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method) or not target or _BAD_TARGET.search(target):
        raise _HTTPError(400, "malformed request line")
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        if _VERSION.match(version):
            raise _HTTPError(505, "HTTP version not supported")
        raise _HTTPError(400, "malformed request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise _HTTPError(431, "too many header lines")
    headers = []
    for line in lines[1:]:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > MAX_LINE:
            raise _HTTPError(431, "header line too long")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise _HTTPError(400, "malformed header line")
        value = value.strip(b" \t")
        if _CONTROL.search(value):
            raise _HTTPError(400, "control character in a header value")
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    return (method.decode("ascii"), target.decode("latin-1"), version.decode("ascii"),
            headers, received[end.end():])


class WSGIRequestHandler(simple_server.WSGIRequestHandler):
    """wsgiref's request handler with a strict, lean parser, and Unix peers made sane.

    The server hands it the bytes it has already read (the request head, at least).  Header
    names with ``_`` are dropped, so that ``X_Auth_User`` cannot pose as ``X-Auth-User``.
    A Unix peer has no address: REMOTE_ADDR is ``""`` and the access log shows ``-``.
    """

    server_version = SERVER_SOFTWARE

    def __init__(self, request, client_address, server, received=b""):
        self.received = received
        super().__init__(request, client_address, server)

    def setup(self):
        # StreamRequestHandler.setup wraps the socket in buffered files; the head is read
        # already, and the body is read through wsgi.input.
        self.connection = self.request
        self.wfile = _SocketWriter(self.request)

    def finish(self):
        pass

    def handle(self):
        """Parse the request head, then run the application through ServerHandler."""
        # Until the request line is understood, answer as HTTP/1.0: http.server's default is
        # HTTP/0.9, which would send an error as a bare body.
        self.request_version, self.command, self.close_connection = "HTTP/1.0", None, True
        self.requestline = self.received[:200].split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        try:
            (self.command, self.path, self.request_version, self.request_headers,
             rest) = parse_request_head(self.received)
            environ = self.get_environ()
            body = _Body(self.connection, rest, _content_length(environ, self.request_headers))
        except _HTTPError as error:
            self.send_error(error.status, str(error))
            return
        handler = ServerHandler(body, self.wfile, self.get_stderr(), environ, multithread=True)
        handler.request_handler = self  # wsgiref's back-pointer, for logging
        handler.run(self.server.get_app())

    def get_environ(self):
        """The request's WSGI environ (CGI keys only; ServerHandler adds the wsgi.* keys)."""
        env = self.server.base_environ.copy()
        env["SERVER_PROTOCOL"] = self.request_version
        env["SERVER_SOFTWARE"] = self.server_version
        env["REQUEST_METHOD"] = self.command
        path, _, query = self.path.partition("?")
        if not path.startswith("/") and "://" in path:
            path = "/" + path.split("://", 1)[1].partition("/")[2]  # absolute-form target
        env["PATH_INFO"] = urllib.parse.unquote(path, "latin-1")
        env["QUERY_STRING"] = query
        if self.server.address_family == socket.AF_UNIX:
            env["REMOTE_ADDR"] = ""
        else:
            env["REMOTE_ADDR"], env["REMOTE_PORT"] = self.client_address[0], str(self.client_address[1])
        for name, value in self.request_headers:
            if "_" in name:
                continue  # CGI maps "-" to "_": a name with "_" would pose as its "-" twin
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            if key in env and key != "CONTENT_LENGTH" and env[key]:
                env[key] += "," + value
            else:
                env[key] = value
        return env

    def address_string(self):
        """The client for the access log: ``-`` for a Unix peer, which has no address."""
        if self.server.address_family == socket.AF_UNIX:
            return "-"
        return self.client_address[0]

    def log_request(self, code="-", size="-"):
        if self.server.access_log:
            super().log_request(code, size)

    def log_message(self, format, *args):
        """One line on stderr, with control characters escaped (no log injection)."""
        message = (format % args).translate(_LOG_ESCAPES)
        sys.stderr.write(f"{self.address_string()} - - [{self.log_date_time_string()}] {message}\n")


def _content_length(environ, headers):
    """The body's length from Content-Length; refuse what two parsers could read two ways."""
    if any(name.lower() == "transfer-encoding" for name, _ in headers):
        if "CONTENT_LENGTH" in environ and environ["CONTENT_LENGTH"]:
            raise _HTTPError(400, "both Content-Length and Transfer-Encoding")
        raise _HTTPError(411, "chunked request bodies are not supported; send Content-Length")
    values = {value for name, value in headers if name.lower() == "content-length"}
    if not values:
        return 0
    value = values.pop()
    if values or not (value.isascii() and value.isdigit()):
        raise _HTTPError(400, "invalid Content-Length")
    return int(value)


class _Body:
    """wsgi.input: the request body and never a byte more (the next request's, or a hang)."""

    def __init__(self, sock, received, length):
        self._sock = sock
        self._buffer = received[:length]
        self._left = length - len(self._buffer)  # still in the socket

    def _fill(self, size):
        """Receive until the buffer holds ``size`` bytes or the body is complete."""
        chunks = [self._buffer]
        have = len(self._buffer)
        while have < size and self._left:
            data = self._sock.recv(min(self._left, max(size - have, 65536)))
            if not data:
                raise ConnectionResetError("the client closed before sending the whole body")
            self._left -= len(data)
            have += len(data)
            chunks.append(data)
        self._buffer = b"".join(chunks)

    def read(self, size=-1):
        if size is None or size < 0:
            size = len(self._buffer) + self._left
        if len(self._buffer) < size:
            self._fill(size)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def readline(self, size=-1):
        size = -1 if size is None else size
        while b"\n" not in self._buffer and self._left and (size < 0 or len(self._buffer) < size):
            self._fill(len(self._buffer) + 1)
        end = self._buffer.find(b"\n") + 1 or len(self._buffer)
        if size >= 0:
            end = min(end, size)
        data, self._buffer = self._buffer[:end], self._buffer[end:]
        return data

    def readlines(self, hint=-1):
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")


class _SocketWriter:
    """wfile for http.server's send_error(), and stdout for ServerHandler."""

    def __init__(self, sock):
        self._sock = sock

    def write(self, data):
        # Not sendall(): its timeout covers the whole call, and a large response to a slow
        # but steady reader must not fail; the timeout here is per send().
        sent = self._sock.send(data)
        if sent < len(data):
            with memoryview(data) as view:
                while sent < len(data):
                    sent += self._sock.send(view[sent:])

    def flush(self):
        pass


# --- The environment-scrubbing ServerHandler ----------------------------------------------

_date_cache = [0, ""]


def _http_date():
    now = int(time.time())
    if _date_cache[0] != now:  # formatdate costs more than the rest of a small response
        _date_cache[:] = [now, formatdate(now, usegmt=True)]
    return _date_cache[1]


class ServerHandler(simple_server.ServerHandler):
    """wsgiref's ServerHandler, with nothing from ``os.environ`` in the request environ.

    wsgiref copies the whole process environment into every request (database passwords,
    and ``HTTPS=on``, which changes wsgi.url_scheme).  Here the environ holds the request and
    the server's keys only.  It also sends the response head with the first body bytes in one
    send, and no body at all for HEAD.
    """

    os_environ = {}
    server_software = SERVER_SOFTWARE
    _head = b""  # the response head, sent with the first body bytes

    def send_headers(self):
        # BaseHandler.send_headers and send_preamble, joined: one buffer instead of four sends.
        self.cleanup_headers()
        self.headers_sent = True
        lines = [f"HTTP/{self.http_version} {self.status}\r\n"]
        if "Date" not in self.headers:
            lines.append(f"Date: {_http_date()}\r\n")
        if "Server" not in self.headers:
            lines.append(f"Server: {self.server_software}\r\n")
        self._head = "".join(lines).encode("latin-1") + bytes(self.headers)

    def _write(self, data):
        if self.environ["REQUEST_METHOD"] == "HEAD":
            data = b""
        if self._head:
            head, self._head = self._head, b""
            if len(data) < 65536:
                data = head + data
            else:
                self.stdout.write(head)
        if data:
            self.stdout.write(data)

    def _flush(self):
        pass

    def finish_content(self):
        super().finish_content()
        if self._head:
            self._write(b"")


# --- The example app: a command per request -----------------------------------------------

DEFAULT_COMMAND = ["date", "-u"]


def command_app(argv):
    """A WSGI app that runs ``argv`` for each request and returns its standard output.

    No shell, and no request data in the argument list: the command is exactly ``argv``.
    Exit status 0 gives 200 with the output as text/plain; anything else gives 500.
    """
    argv = [str(arg) for arg in argv]
    if not argv:
        raise ServeError("no command given")
    if _find_executable(argv[0]) is None:
        raise ServeError(f"{argv[0]}: command not found or not executable")

    def application(environ, start_response):
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={"PATH": _command_path()})
        if result.returncode != 0:
            body = f"command exited with status {result.returncode}\n".encode()
            start_response("500 Internal Server Error", [
                ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                                  ("Content-Length", str(len(result.stdout)))])
        return [result.stdout]

    return application


def _command_path():
    return os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin"


def _find_executable(name):
    import shutil
    return shutil.which(name, path=_command_path())


# --- The API ------------------------------------------------------------------------------

def make_server(address, app, server_class=WSGIServer, handler_class=WSGIRequestHandler, **options):
    """Return a bound, listening WSGIServer for ``app`` on ``address`` (a context manager).

    ``address`` is a ListenAddress or its text; ``options`` are WSGIServer's keywords:
    ``mode``, ``group``, ``threads``, ``timeout``, ``graceful_timeout``, ``max_connections``,
    ``access_log``.
    """
    server = server_class(address, handler_class, **options)
    server.set_app(app)
    return server


def serve(app, address, **options):
    """Serve ``app`` on ``address`` until SIGTERM or SIGINT (or shutdown()), then clean up.

    Prints the readiness line ``wsgi_unix: serving on ADDRESS`` on stderr once listening.
    Signal handlers are installed only when called from the main thread.
    """
    with make_server(address, app, **options) as server:
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                handlers[signum] = signal.signal(signum, lambda *_: server.request_stop())
        try:
            if server.listen_address.kind == "abstract":
                sys.stderr.write(f"{PROG}: warning: {server} is an abstract socket; anyone in this "
                                 f"network namespace can connect to it\n")
            sys.stderr.write(f"{PROG}: serving on {server}\n")
            sys.stderr.flush()
            server.serve_forever()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)


# --- The command line ---------------------------------------------------------------------

def _parse_command_line(argv):
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, not argparse's usage block
            self.exit(2, f"{PROG}: {message} (see --help)\n")

    def mode(text):
        try:
            value = int(text, 8)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 600 or 660")
        if not 0 <= value <= 0o777:
            raise argparse.ArgumentTypeError(f"{text!r} is not a mode from 000 to 777")
        return value

    def positive(kind):
        def check(text):
            try:
                value = kind(text)
            except ValueError:
                value = 0
            if value <= 0:
                raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
            return value
        return check

    parser = Parser(
        prog=f"python3 {os.path.basename(sys.argv[0]) or 'wsgi_unix.py'}",
        usage="%(prog)s [OPTIONS] ADDRESS [-- COMMAND [ARG ...]]\n"
              "       %(prog)s [OPTIONS] --app MODULE:CALLABLE ADDRESS",
        description="Serve a WSGI application, or a command's output, on a Unix socket.")
    parser.add_argument("address", metavar="ADDRESS")
    parser.add_argument("--app", metavar="MODULE:CALLABLE")
    parser.add_argument("--mode", type=mode, default=0o600)
    parser.add_argument("--group")
    parser.add_argument("--threads", type=positive(int), default=8)
    parser.add_argument("--timeout", type=positive(float), default=30.0)
    parser.add_argument("--graceful-timeout", type=positive(float), default=10.0)
    parser.add_argument("--max-connections", type=positive(int), default=1024)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    args = parser.parse_args(argv)
    if args.app and command:
        parser.error("give either --app or a COMMAND, not both")
    return args, command


def _load_app(spec):
    import importlib
    module_name, _, attribute = spec.partition(":")
    sys.path.insert(0, os.getcwd())  # as gunicorn does: the app sits next to us
    try:
        obj = importlib.import_module(module_name)
        for part in (attribute or "application").split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise ServeError(f"--app {spec}: cannot load it: {type(exc).__name__}: {exc}") from None
    if not callable(obj):
        raise ServeError(f"--app {spec}: {attribute or 'application'} is not callable")
    return obj


def main(argv=None):
    """The command line; returns the exit status (0 clean stop, 1 failure, 2 usage error)."""
    args, command = _parse_command_line(argv)
    try:
        address = ListenAddress(args.address)
        app = _load_app(args.app) if args.app else command_app(command or DEFAULT_COMMAND)
        serve(app, address, mode=args.mode, group=args.group, threads=args.threads,
              timeout=args.timeout, graceful_timeout=args.graceful_timeout,
              max_connections=args.max_connections, access_log=not args.quiet)
    except AddressError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 2
    except ServeError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
