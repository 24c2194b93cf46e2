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
- threads without a hand-off per request (one accepts and serves; another takes over when a
  request is slow), a large listen backlog, time limits, and a waiting room so that silent or
  slow clients hold no thread;
- a strict request parser with wsgiref's limits that drops header names containing "_";
- nothing from ``os.environ`` reaches the application (wsgiref copies all of it, secrets included);
- SIGTERM and SIGINT stop it gracefully: no new connections, requests in flight may finish.

What it deliberately does not do: TLS, HTTP/2, keep-alive, worker processes or reloading.
Put nginx in front for the first three, and use gunicorn or uWSGI when you need the rest;
the same WSGI app runs there unchanged.
"""

import atexit
import errno
import fcntl
import grp
import http
import os
import pwd
import re
import select
import selectors
import shutil
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
import urllib.parse
from collections import deque
from email.utils import formatdate
from wsgiref import simple_server
from wsgiref import util as wsgiref_util

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
# After its head, a client must send (or read) at least this much per --timeout seconds: with a
# deadline per recv() or send() alone, a few bytes now and then would hold a thread for good.
PROGRESS = 64 * 1024
# How long a stopping server waits for connections it accepted to send their request.
_STOP_LINGER = 1.0
# How long one request may keep the accepting thread before another thread takes over.
_PROMOTE_AFTER = 0.01


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
        self._identity = None  # (st_dev, st_ino) of the socket file we created
        self._directory = None  # its directory, open, for remove_socket_file()
        self._parse(text)

    def _parse(self, text):
        if text.startswith("fd:"):
            number = text[3:]
            if not (number.isascii() and number.isdigit()):
                raise AddressError(f"{text}: fd:N needs a file descriptor number, e.g. fd:3")
            self.kind, self.fd = "fd", int(number)
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

    @property
    def inherited(self):
        """True for fd:N: the socket belongs to whoever passed it to us (systemd)."""
        return self.kind == "fd"

    def __str__(self):
        if self.kind in ("unix", "abstract"):
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
        except (OSError, OverflowError) as exc:
            raise AddressError(f"{self}: file descriptor {self.fd} is not an open socket "
                               f"({getattr(exc, 'strerror', None) or exc})") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET,
                                                                  socket.SO_ACCEPTCONN):
            sock.detach()  # not ours to close
            raise AddressError(f"{self}: file descriptor {self.fd} is not a listening stream socket")
        if os.environ.get("LISTEN_PID") == str(os.getpid()):
            # systemd's socket-activation variables describe our descriptors, not a child's.
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)
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
                    raise ServeError(f"{self}: no permission to give the socket to group {group}; "
                                     f"run as a member of that group, or as root") from None
            sock.listen(backlog)
        except BaseException:
            self._unlink_own_file()  # if bind() made it
            os.close(lock)
            raise
        # Kept open (unlocked) until remove_socket_file(): by then every descriptor may be
        # taken by a client, or the directory may be gone.
        fcntl.flock(lock, fcntl.LOCK_UN)
        self._directory = lock

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
        try:
            now = os.lstat(self.path)
            if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
                os.unlink(self.path)
        except FileNotFoundError:
            pass  # someone else removed it meanwhile
        except PermissionError:  # e.g. another user's, in a sticky directory like /tmp
            raise ServeError(f"{self}: cannot remove the stale socket {self.path} (not ours "
                             f"to remove); remove it as its owner, or choose another path") from None

    def remove_socket_file(self):
        """Remove the socket file if the path still holds the one this process created.

        A file another process has put there since (same path, another device or inode) is
        left alone.  Idempotent; a no-op for addresses without a file.
        """
        directory, self._directory = self._directory, None
        if directory is None:
            return
        try:
            fcntl.flock(directory, fcntl.LOCK_EX)  # no starter is between probe and bind
            self._unlink_own_file()
        finally:
            os.close(directory)

    def _unlink_own_file(self):
        identity, self._identity = self._identity, None
        if identity is None:
            return
        try:
            info = os.lstat(self.path)
            if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass  # its directory may be gone too


def _describe(info):
    kinds = [(stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO")]
    return next((name for test, name in kinds if test(info.st_mode)), "a device or other file")


def _user_id(user):
    if isinstance(user, int) or (user.isascii() and user.isdigit()):
        return _check_id(int(user), "uid")
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ServeError(f"user {user!r} does not exist; give a user name or a uid") from None


def _check_id(number, kind):
    if not 0 <= number < 2 ** 32 - 1:  # (uid_t)-1 means "no change" to chown()
        raise ServeError(f"{kind} {number} is out of range")
    return number


def _ip_addresses(texts):
    """The set of IP addresses in ``texts``, in the form the kernel reports a peer's address."""
    if not texts:
        return set()
    import ipaddress  # only here: 2 ms of start-up for those who need it
    addresses = set()
    for text in texts:
        try:
            addresses.add(_unmapped(str(ipaddress.ip_address(text.strip()))))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address like 127.0.0.1 or ::1 (networks "
                             f"and names are not accepted)") from None
    return addresses


def _unmapped(address):
    # On a dual-stack [::] socket an IPv4 peer shows up as ::ffff:127.0.0.1.
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def _group_id(group):
    if group is None or isinstance(group, int):
        return group
    if group.isascii() and group.isdigit():
        return _check_id(int(group), "gid")
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ServeError(f"group {group!r} does not exist; give a group name or a number") from None


# --- The server ---------------------------------------------------------------------------

class WSGIServer(simple_server.WSGIServer):
    """wsgiref's WSGIServer on any ListenAddress, served by up to ``threads`` threads.

    The thread that accepts a connection serves it: no hand-off and no thread start per
    request (see _accept_loop for why only one accepts at a time).  A connection whose request
    head has not fully arrived goes to the waiting room -- a selector in the thread that runs
    ``serve_forever()`` -- so that silent and slow clients hold no thread; once its head is
    complete it is served in a thread of its own.  At most ``max_connections`` are open at
    once; beyond that, new connections wait in the kernel's listen backlog.
    """

    request_queue_size = 1024  # wsgiref's 5 makes nginx answer 502 under the lightest load

    def __init__(self, address, RequestHandlerClass=None, *, mode=0o600, group=None, threads=8,
                 timeout=30.0, graceful_timeout=10.0, max_connections=1024, access_log=True,
                 allow_uids=None, proxy_headers=False, forwarded_allow_ips=(), script_name=""):
        self.listen_address = address if isinstance(address, ListenAddress) else ListenAddress(address)
        self.allow_uids = None if allow_uids is None else {_user_id(user) for user in allow_uids}
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
        self.proxy_headers = proxy_headers
        self.forwarded_allow_ips = _ip_addresses(forwarded_allow_ips)
        self.script_name = script_name
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
        self._leadership = threading.Semaphore(1)  # held by the thread that accepts
        self._generation = 0  # counts promotions; a leader whose generation passed, follows
        self._leader_busy_since = None
        self._followers = 0
        self._logged = set()  # messages said once
        self.on_ready = None  # see serve_forever()
        if self.allow_uids is not None and (self.address_family != socket.AF_UNIX
                                            or _PEERCRED is None):
            self.server_close()
            raise ServeError(f"{self}: --allow-uid needs a Unix socket, and SO_PEERCRED (Linux)")

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

    def _wake(self):
        try:
            self._wakeup_w.send(b"!")
        except OSError:
            pass  # already full (a wake-up is pending) or closed (stopped)

    def serve_forever(self, poll_interval=1.0):
        """Serve until shutdown() or request_stop(), then stop gracefully.

        New connections are refused at once; requests in flight get ``graceful_timeout``
        seconds to finish.  This thread is the waiting room meanwhile; ``poll_interval`` is
        how often it looks for clients that have run out of time.  Once its threads are there
        to serve, it calls ``on_ready()`` if set (serve() says so on stderr then).
        """
        self._stopped.clear()
        self._poll_interval, self._next_expiry_scan = poll_interval, 0.0
        # Made before the threads start: once they accept, descriptors may run out.
        selector = selectors.DefaultSelector()
        selector.register(self._wakeup_r, selectors.EVENT_READ)
        accepters = [threading.Thread(target=self._accept_loop, name=f"{PROG}-{number}", daemon=True)
                     for number in range(self.threads)]
        try:
            for thread in accepters:
                thread.start()
        except RuntimeError as exc:
            self._stop_requested = True
            raise ServeError(f"{self}: cannot start {self.threads} threads ({exc}); lower "
                             f"--threads, or raise the limit on processes") from None
        if self.on_ready is not None:
            self.on_ready()
        waiting = {}  # connection -> [client address, bytes received, deadline]
        stop_began = time.monotonic()
        try:
            while not self._stop_requested:
                self._promote_if_leader_is_stuck()
                self._waiting_room(selector, waiting, _PROMOTE_AFTER if self._leader_busy_since
                                   else min(poll_interval, 0.1))
            stop_began = time.monotonic()
            self._stop_accepting(stop_began + self.graceful_timeout)
            # Connections accepted just before the stop may not have sent their request yet,
            # and the accept threads may still be parking some: keep the waiting room open.
            linger_end = stop_began + _STOP_LINGER
            while time.monotonic() < linger_end and (waiting or self._arrivals or any(
                    thread.is_alive() for thread in accepters if not self.listen_address.inherited)):
                self._waiting_room(selector, waiting, 0.01)
        finally:
            self._stop_requested = True
            for conn in list(waiting) + [entry[0] for entry in self._arrivals]:
                self._close(conn)
            selector.close()
            deadline = stop_began + self.graceful_timeout
            if not self.listen_address.inherited:
                # Each ends once its request is done and accept() fails; joining them closes
                # the gap between a thread's accept() and its count in self._busy.
                for thread in accepters:
                    thread.join(max(0.0, deadline - time.monotonic()))
            with self._idle:
                while self._busy and time.monotonic() < deadline:
                    self._idle.wait(deadline - time.monotonic())
            self._stopped.set()

    def _waiting_room(self, selector, waiting, timeout):
        """Wait up to ``timeout`` for connections to send more; serve those whose head is complete."""
        for key, _ in selector.select(timeout):
            if key.fileobj is self._wakeup_r:
                self._wakeup_r.recv(4096)
                while self._arrivals:
                    conn, address, received = self._arrivals.popleft()
                    # a bytearray: appending to bytes would copy the whole head each time
                    waiting[conn] = [address, bytearray(received), time.monotonic() + self.timeout]
                    selector.register(conn, selectors.EVENT_READ)
            else:
                self._on_waiting_readable(key.fileobj, waiting, selector)
        now = time.monotonic()
        if now < self._next_expiry_scan:
            return
        self._next_expiry_scan = now + self._poll_interval
        for conn in [c for c, entry in waiting.items() if entry[2] < now]:
            selector.unregister(conn)
            del waiting[conn]
            self._close(conn, _bare_answer("408 Request Timeout"))
            self._log_line("a request did not arrive in time: 408")

    def _on_waiting_readable(self, conn, waiting, selector):
        entry = waiting[conn]
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            scanned = len(entry[1])
            entry[1] += data
            if not _head_ready(entry[1], scanned):
                return
        selector.unregister(conn)
        del waiting[conn]
        if not data:
            self._close(conn)  # the client gave up before sending a whole request
            return
        self._begin()
        try:
            threading.Thread(target=self._serve_connection, args=(conn, entry[0], bytes(entry[1])),
                             name=f"{PROG}-waited", daemon=True).start()
        except RuntimeError as exc:  # out of threads: a container's pids limit, say
            self._end()
            self._close(conn, _bare_answer("503 Service Unavailable"))
            self._log_line(f"cannot start a thread ({exc}); answering 503", once=True)

    def _stop_accepting(self, deadline):
        """Refuse new connections, serve the ones already queued, stop the accept threads."""
        self._stop_requested = True
        for _ in range(self.threads):
            self._leadership.release()  # every follower helps drain the backlog, then ends
        if self.listen_address.inherited:
            # Shared with systemd, which keeps it for the next start: leave it listening.
            # The accept threads are daemons and end with the process.
            return
        if self.listen_address.kind == "unix":
            # Without its file no one can connect any more, yet the connections already in
            # the backlog can still be accepted: serve them rather than reset them.
            self.listen_address.remove_socket_file()
            poller = select.poll()
            poller.register(self.socket, select.POLLIN)
            while poller.poll(0) and time.monotonic() < deadline:
                time.sleep(0.005)
        # Wakes every thread blocked in accept() (EINVAL) and refuses new connections at once,
        # so nginx answers 502 now instead of queueing.
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _begin(self):
        with self._idle:
            self._busy += 1

    def _end(self):
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def _accept_loop(self):
        """One of the threads: a follower until promoted, then the leader until demoted.

        Threads that are all runnable at once fight over the GIL, and every blocking call
        hands it over: measured here, 8 threads accepting side by side serve less than half
        of what one thread does alone.  So one thread at a time -- the leader -- accepts and
        serves; the others wait.  Only when the leader has been busy with one request for
        _PROMOTE_AFTER seconds (a slow app) does the waiting room promote a follower.
        """
        while True:
            with self._idle:
                self._followers += 1
            self._leadership.acquire()
            with self._idle:
                self._followers -= 1
            generation = self._generation
            while generation == self._generation:
                self._slots.acquire()
                try:
                    conn, address = self.socket.accept()
                except OSError as exc:
                    self._slots.release()
                    if self._stop_requested:
                        return
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        # Out of descriptors or memory: the connection stays in the backlog,
                        # and retrying at once would spin a core; wait for others to close.
                        self._log_line(f"accept() failed: {exc.strerror}; retrying", once=True)
                        time.sleep(0.1)
                    continue
                self._begin()
                self._leader_busy_since = time.monotonic()
                self._serve_connection(conn, address, b"")
                if generation == self._generation:
                    self._leader_busy_since = None

    def _promote_if_leader_is_stuck(self, after=_PROMOTE_AFTER):
        since = self._leader_busy_since
        if since is not None and time.monotonic() - since >= after and self._followers:
            self._leader_busy_since = None
            self._generation += 1
            self._leadership.release()

    def will_block(self):
        """Let another thread accept now: the calling request is about to wait on something.

        Apps reach it as ``environ["wsgi_unix.will_block"]``; the command app calls it before
        running its command, so that commands run side by side from the first millisecond.
        """
        self._promote_if_leader_is_stuck(after=0)

    def _serve_connection(self, conn, address, received):
        """Read the request head if it is there already, else send the connection to the
        waiting room; serve it once the head is complete.  The caller has called _begin()."""
        try:
            while not _head_ready(received):
                try:
                    data = conn.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    conn.setblocking(False)
                    self._arrivals.append((conn, address, received))
                    self._wake()
                    conn = None  # the waiting room's now
                    return
                except OSError:
                    data = b""  # reset (TCP)
                if not data:
                    return  # the client gave up before sending a whole request
                received += data
            conn.settimeout(self.timeout)
            self.finish_request(conn, address, received)
        except Exception:
            self.handle_error(conn, address)
        finally:
            if conn is not None:
                self._close(conn)
            self._end()

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

    def _log_line(self, message, once=False):
        if not (once and message in self._logged):
            self._logged.add(message)
            sys.stderr.write(f"{PROG}: {message}\n")


def _bare_answer(status):
    """A response with no body, for a connection that never reached the request handler."""
    return f"HTTP/1.0 {status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".encode()


def _head_ready(received, scanned=0):
    """True once ``received`` holds a whole request head, or too much to be a valid one.

    Only what came after the first ``scanned`` bytes is searched: a client that trickles a
    256 KiB head a byte at a time must not make us scan it 256 Ki times.
    """
    if _HEAD_END.search(received, max(0, scanned - 3)) or len(received) > MAX_HEAD:
        return True
    return len(received) > MAX_LINE and received.find(b"\n", 0, MAX_LINE + 1) == -1


# --- The request handler ------------------------------------------------------------------

# What a send to a client that hung up (or stopped reading: see _SocketWriter) raises.
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


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


def _parse_request_head(received):
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


# struct ucred {pid_t pid; uid_t uid; gid_t gid;}: Linux only; elsewhere no peer credentials.
_PEERCRED = struct.Struct("3i") if hasattr(socket, "SO_PEERCRED") else None


class WSGIRequestHandler(simple_server.WSGIRequestHandler):
    """wsgiref's request handler with a strict, lean parser, and Unix peers made sane.

    The server hands it the bytes it has already read (the request head, at least).  Header
    names with ``_`` are dropped, so that ``X_Auth_User`` cannot pose as ``X-Auth-User``.
    A Unix peer has no address: REMOTE_ADDR is ``""`` and the access log shows ``-``.
    """

    server_version = SERVER_SOFTWARE
    # http.server's error page is HTML; a status, its phrase and the reason suit curl and logs.
    error_message_format = "%(code)d %(message)s: %(explain)s\n"
    error_content_type = "text/plain; charset=utf-8"

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
             rest) = _parse_request_head(self.received)
            environ = self.get_environ()
            body = _request_body(self.connection, rest, self.request_version, self.request_headers)
            allowed = self.server.allow_uids
            if allowed is not None and environ["wsgi_unix.peer"][1] not in allowed:
                raise _HTTPError(403, f"uid {environ['wsgi_unix.peer'][1]} may not connect")
        except _HTTPError as error:
            try:
                self.send_error(error.status, None, str(error))
            except _CLIENT_GONE as exc:  # it hung up without waiting for the answer
                self.log_error("client went away: %s", exc)
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
        env["wsgi_unix.socket"] = self.connection  # to watch for a client that went away
        env["wsgi_unix.will_block"] = self.server.will_block
        path, _, query = self.path.partition("?")
        if not path.startswith("/") and "://" in path:
            path = "/" + path.split("://", 1)[1].partition("/")[2]  # absolute-form target
        path = urllib.parse.unquote(path, "latin-1")
        prefix = self.server.script_name
        if prefix:
            if path != prefix and not path.startswith(prefix + "/"):
                raise _HTTPError(404, f"not under {prefix}")
            env["SCRIPT_NAME"], path = prefix, path[len(prefix):]
        env["PATH_INFO"] = path
        env["QUERY_STRING"] = query
        if self.server.address_family == socket.AF_UNIX:
            env["REMOTE_ADDR"] = ""
            if _PEERCRED is not None:
                env["wsgi_unix.peer"] = _PEERCRED.unpack(self.connection.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
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
        trusted = (self.server.address_family == socket.AF_UNIX or
                   _unmapped(self.client_address[0]) in self.server.forwarded_allow_ips)
        if self.server.proxy_headers and trusted:
            # nginx's $proxy_add_x_forwarded_for appends the address it saw: the last one.
            forwarded_for = env.get("HTTP_X_FORWARDED_FOR", "").rsplit(",", 1)[-1].strip()
            if forwarded_for:
                env["REMOTE_ADDR"] = forwarded_for
            if env.get("HTTP_X_FORWARDED_PROTO", "").strip().lower() == "https":
                env["HTTPS"] = "on"  # what wsgiref reads wsgi.url_scheme from
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


def _request_body(sock, received, request_version, headers):
    """wsgi.input for a request: its body as Content-Length or chunked coding frames it.

    Anything two parsers could frame two ways -- the root of request smuggling -- is refused.
    """
    codings = [value for name, value in headers if name.lower() == "transfer-encoding"]
    lengths = {value for name, value in headers if name.lower() == "content-length"}
    expect = request_version == "HTTP/1.1" and any(
        name.lower() == "expect" and value.lower() == "100-continue" for name, value in headers)
    if codings:
        if lengths:
            raise _HTTPError(400, "both Content-Length and Transfer-Encoding")
        if [coding.strip().lower() for coding in ",".join(codings).split(",")] != ["chunked"]:
            raise _HTTPError(501, "the only transfer coding understood is chunked")
        return _Body(sock, received, None, expect)
    if not lengths:
        return _Body(sock, b"", 0)
    length = lengths.pop()
    if lengths or not (length.isascii() and length.isdigit()):
        raise _HTTPError(400, "invalid Content-Length")
    return _Body(sock, received, int(length), expect)


class _Body:
    """wsgi.input: the request body and never a byte more (the next request's, or a hang).

    It decodes chunked transfer coding, and sends "100 Continue" when a client that asked for
    it (curl does, for bodies over 1 KiB) is first read from.  A body that stops arriving
    raises _HTTPError(408); a malformed chunk, _HTTPError(400).
    """

    def __init__(self, sock, received, length, expect_continue=False):
        self._sock = sock
        self._raw = received  # bytes received after the head, not yet decoded
        self._data = bytearray()  # decoded body bytes the application has not read yet
        self._chunked = length is None
        self._left = length or 0  # bytes of the body (or of the current chunk) still to come
        self._done = length == 0
        self._after_chunk = False  # a chunk's data was read: its CRLF comes next
        self._expect_continue = expect_continue
        self._timeout = sock.gettimeout()  # the server's --timeout
        self._window_end, self._window_left = 0.0, 0  # PROGRESS bytes are due by _window_end

    def _recv(self, size):
        if self._expect_continue:
            self._expect_continue = False
            self._sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._window_left <= 0:
            self._window_end, self._window_left = time.monotonic() + self._timeout, PROGRESS
        # Past the window's end, only what has arrived already counts (timeout 0).
        self._sock.settimeout(max(0.0, self._window_end - time.monotonic()))
        try:
            data = self._sock.recv(min(size, 65536))
        except (socket.timeout, BlockingIOError):
            raise _HTTPError(408, "the request body did not arrive in time") from None
        finally:
            self._sock.settimeout(self._timeout)  # for the response
        if not data:
            raise ConnectionResetError("the client closed before sending the whole body")
        self._window_left -= len(data)
        return data

    def _more(self):
        """Decode up to 64 KiB more of the body into self._data; False at its end.

        Never more: a chunk may claim a petabyte, and the app reads it 8 KiB at a time.
        """
        if self._done:
            return False
        if self._chunked and not self._left:
            self._left = self._next_chunk_size()
            if not self._left:
                self._done = True
                return False
        piece = self._raw or self._recv(self._left)
        piece, self._raw = piece[:self._left], piece[self._left:]
        self._left -= len(piece)
        self._done = not (self._chunked or self._left)
        self._data += piece
        return True

    def _next_chunk_size(self):
        """Read a chunk-size line (after the previous chunk's CRLF); 0 for the last chunk."""
        if self._after_chunk and self._raw_line():
            raise _HTTPError(400, "chunk data longer than its size")
        self._after_chunk = True
        size = self._raw_line().split(b";", 1)[0].strip()  # chunk extensions are ignored
        if not size or len(size) > 15 or size.strip(b"0123456789abcdefABCDEF"):
            raise _HTTPError(400, "malformed chunk size")
        if int(size, 16):
            return int(size, 16)
        for _ in range(MAX_HEADERS + 1):  # trailers, ignored
            if not self._raw_line():
                return 0
        raise _HTTPError(431, "too many trailer lines")

    def _raw_line(self):
        while b"\n" not in self._raw:
            if len(self._raw) > MAX_LINE:
                raise _HTTPError(400, "chunk line too long")
            self._raw += self._recv(65536)
        line, _, self._raw = self._raw.partition(b"\n")
        return line[:-1] if line.endswith(b"\r") else line

    def _take(self, size):
        data = bytes(self._data[:size])
        del self._data[:size]
        return data

    def read(self, size=-1):
        if size is None or size < 0:
            while self._more():
                pass
            return self._take(len(self._data))
        while len(self._data) < size and self._more():
            pass
        return self._take(size)

    def readline(self, size=-1):
        size = -1 if size is None else size
        while True:
            end = self._data.find(b"\n") + 1
            if end or 0 <= size <= len(self._data) or not self._more():
                break
        end = end or len(self._data)
        return self._take(min(end, size) if size >= 0 else end)

    def readlines(self, hint=-1):
        return list(self)

    def __iter__(self):
        return iter(self.readline, b"")


class _SocketWriter:
    """wfile for http.server's send_error(), and stdout for ServerHandler."""

    def __init__(self, sock):
        self._sock = sock

    def write(self, data):
        # sendall()'s timeout covers the whole call: PROGRESS bytes at a time, each within the
        # timeout -- a slow but steady reader is served, a trickling one does not hold us.
        try:
            with memoryview(data) as view:
                for start in range(0, len(view), PROGRESS):
                    self._sock.sendall(view[start:start + PROGRESS])
        except socket.timeout:
            # A client that stops reading has gone away as surely as one that hung up.
            raise ConnectionAbortedError("the client stopped reading") from None

    def flush(self):
        pass


# --- The environment-scrubbing ServerHandler ----------------------------------------------

_STATUS = re.compile(r"[1-9]\d\d [^\x00-\x1f\x7f]*\Z")
_HEADER_NAME = re.compile(_TOKEN.pattern.decode())  # the request's token rule, for str
_HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]|[^\x00-\xff]")
_date_cache = [0, ""]


def _http_date():
    now = int(time.time())
    if _date_cache[0] != now:  # formatdate costs more than the rest of a small response
        _date_cache[:] = [now, formatdate(now, usegmt=True)]
    return _date_cache[1]


def _send_file(sock, fd, offset, count):
    """os.sendfile() under _SocketWriter's rule: PROGRESS bytes per timeout, or give up.

    (socket.sendfile() waits up to the timeout for each bit of room, however small.)
    """
    timeout, end = sock.gettimeout(), offset + count
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while offset < end:
        due, block_end = time.monotonic() + timeout, min(end, offset + PROGRESS)
        while offset < block_end:
            try:
                sent = os.sendfile(sock.fileno(), fd, offset, block_end - offset)
            except BlockingIOError:  # a socket with a timeout is non-blocking underneath
                left = due - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000):
                    raise ConnectionAbortedError("the client stopped reading") from None
                continue
            if not sent:
                return  # the file is shorter than it was
            offset += sent


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

    def run(self, application):
        # BaseHandler.run, copied to log a client that went away (wsgiref says nothing).
        try:
            self.setup_environ()
            self.result = application(self.environ, self.start_response)
            self.finish_response()
        except _CLIENT_GONE as exc:
            self.request_handler.log_error("client went away: %s", exc)
        except:  # noqa: E722 -- as wsgiref: whatever the app raised, answer 500
            try:
                self.handle_error()
            except _CLIENT_GONE as exc:  # before it could hear of the error
                self.close()
                self.request_handler.log_error("client went away: %s", exc)
            except:  # noqa: E722
                self.close()
                raise

    def setup_environ(self):
        super().setup_environ()
        self.environ["wsgi.input_terminated"] = True  # wsgi.input ends where the body ends

    def start_response(self, status, headers, exc_info=None):
        # wsgiref checks types with assert (gone under -O) and lets CR/LF through: refuse
        # anything that could split the response, whatever the interpreter's flags.
        if not (type(status) is str and _STATUS.match(status)):
            raise ValueError(f"malformed status {status!r}")
        for name, value in headers:
            if not (type(name) is str and type(value) is str and _HEADER_NAME.match(name)
                    and not _HEADER_VALUE_BAD.search(value)):
                raise ValueError(f"malformed response header {name!r}: {value!r}")
        return super().start_response(status, headers, exc_info)

    def handle_error(self):
        """Answer a request that could not be read with its own status; anything else, 500."""
        error = sys.exc_info()[1]
        if not isinstance(error, _HTTPError):
            return super().handle_error()
        self.request_handler.log_error("%s", error)
        if not self.headers_sent:
            self.error_status = f"{error.status} {http.HTTPStatus(error.status).phrase}"
            self.error_body = f"{self.error_status}: {error}\n".encode()
            self.result = self.error_output(self.environ, self.start_response)
            self.finish_response()

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

    def sendfile(self):
        """Send a wsgi.file_wrapper around a real file with os.sendfile (no copies)."""
        try:
            file = self.result.filelike
            offset, info = file.tell(), os.fstat(file.fileno())
        except (AttributeError, OSError, ValueError):
            return False  # not a file with a descriptor: wsgiref iterates over it
        if not stat.S_ISREG(info.st_mode):
            return False  # a pipe or a device has no size to send
        count = max(0, info.st_size - offset)
        if "Content-Length" in self.headers:
            count = min(count, int(self.headers["Content-Length"]))
        else:
            self.headers["Content-Length"] = str(count)
        self.send_headers()
        self._write(b"")  # the head
        if self.environ["REQUEST_METHOD"] != "HEAD" and count:
            _send_file(self.request_handler.connection, file.fileno(), offset, count)
        self.bytes_sent = count
        return True

    def _flush(self):
        pass

    def finish_content(self):
        super().finish_content()
        if self._head:
            self._write(b"")


# --- The example app: a command per request -----------------------------------------------

DEFAULT_COMMAND = ["date", "-u"]  # in coreutils and busybox, and new on every request
_KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL for a command that ran out of time


def command_app(argv, *, cgi=False, pass_env=(), max_body=1 << 20, max_output=16 << 20,
                timeout=30.0, methods=("GET", "HEAD", "POST"), max_procs=8):
    """A WSGI app that runs the command ``argv`` for each request: a small CGI gateway.

    The command is exactly ``argv`` -- no shell, no request data in its arguments.  It gets
    the request as CGI/1.1 meta-variables in a scrubbed environment (PATH and ``pass_env``
    only), and the body on stdin.  Exit status 0 answers 200 with its output as text/plain,
    or, with ``cgi=True``, with the status and headers the output starts with; any other
    status answers 500.  Output past ``max_output`` bytes answers 502, a command still
    running after ``timeout`` seconds 504; either way its whole process group is killed.
    Raises ServeError at once if the command cannot be found.
    """
    return _CommandApp([str(arg) for arg in argv], cgi, pass_env, max_body, max_output, timeout,
                       methods, max_procs)


class _CommandApp:
    def __init__(self, argv, cgi, pass_env, max_body, max_output, timeout, methods, max_procs):
        if not argv:
            raise ServeError("no command given")
        if shutil.which(argv[0], path=_command_path()) is None:
            raise ServeError(f"{argv[0]}: command not found or not executable")
        self.argv, self.cgi, self.max_body, self.max_output = argv, cgi, max_body, max_output
        self.timeout = timeout
        self.methods = [method.upper() for method in methods]
        self.base_env = {"PATH": _command_path()}
        self.base_env.update((name, os.environ[name]) for name in pass_env if name in os.environ)
        self._slots = threading.BoundedSemaphore(max_procs)
        self._running = set()  # process groups of running commands
        atexit.register(self.kill_all)  # none may outlive the server

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] not in self.methods:
            return _plain(start_response, "405 Method Not Allowed", "method not allowed",
                          [("Allow", ", ".join(self.methods))])
        length = environ.get("CONTENT_LENGTH")
        if length and int(length) > self.max_body:
            return _plain(start_response, "413 Content Too Large",
                          f"the request body is over {self.max_body} bytes")
        body = environ["wsgi.input"].read(self.max_body + 1)
        if len(body) > self.max_body:
            return _plain(start_response, "413 Content Too Large",
                          f"the request body is over {self.max_body} bytes")
        env = self._child_environment(environ, body)
        if env is None:
            return _plain(start_response, "400 Bad Request", "NUL byte in the request")
        environ.get("wsgi_unix.will_block", _nothing)()
        if not self._slots.acquire(timeout=self.timeout):
            return _plain(start_response, "503 Service Unavailable", "too many commands running")
        try:
            outcome, code, output = self._run(env, body, environ)
        finally:
            self._slots.release()
        if outcome == "cannot start":
            return _plain(start_response, "500 Internal Server Error",
                          "the command could not be started")
        if outcome == "timeout":
            return _plain(start_response, "504 Gateway Timeout",
                          f"the command ran for more than {self.timeout:g} s")
        if outcome == "too much output":
            return _plain(start_response, "502 Bad Gateway",
                          f"the command wrote more than {self.max_output} bytes")
        if code != 0:
            how = f"status {code}" if code > 0 else f"signal {-code}"
            return _plain(start_response, "500 Internal Server Error", f"the command exited with {how}")
        if not self.cgi:
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                                      ("Content-Length", str(len(output)))])
            return [output]
        try:
            status, headers, output = _parse_cgi_output(output)
        except ValueError as exc:
            self._log(environ, f"{self.argv[0]}: {exc}")
            return _plain(start_response, "502 Bad Gateway", "the command's CGI headers are malformed")
        start_response(status, headers + [("Content-Length", str(len(output)))])
        return [output]

    def _child_environment(self, environ, body):
        """The CGI/1.1 meta-variables (RFC 3875 section 4.1) as bytes, or None for a NUL."""
        env = dict(self.base_env)
        for name in ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE",
                     "SERVER_PROTOCOL", "SERVER_SOFTWARE", "SERVER_NAME", "SERVER_PORT",
                     "GATEWAY_INTERFACE", "REMOTE_ADDR", "SCRIPT_NAME"):
            env[name] = environ.get(name, "")
        if body:
            env["CONTENT_LENGTH"] = str(len(body))
        # HTTP_PROXY would come from a "Proxy:" request header, and curl, wget and most HTTP
        # libraries take it as their proxy ("httpoxy"): never pass it on.
        env.update((key, value) for key, value in environ.items()
                   if key.startswith("HTTP_") and key != "HTTP_PROXY")
        if any("\0" in value for value in env.values()):
            return None
        # Request data is latin-1 text here; as bytes the command sees what the client sent.
        return {key.encode(): value.encode("latin-1", "surrogateescape") if key in environ
                else os.fsencode(value) for key, value in env.items()}

    def _run(self, env, body, environ):
        """Run the command; return (outcome, exit status, standard output)."""
        import subprocess  # here, not at the top: 3 ms less start-up for an --app server
        deadline = time.monotonic() + self.timeout
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:  # gone since start-up, or out of processes or descriptors
            self._log(environ, f"cannot start {self.argv[0]}: {exc.strerror or exc}")
            return "cannot start", None, b""
        self._running.add(proc.pid)
        try:
            outcome, output = self._exchange(proc, body, environ, deadline)
            # Its pipes are closed: it has exited or is about to.  (Popen.wait(timeout)
            # would sleep 0.5 ms at least; a command takes about that long in all.)
            delay = 0.00005
            while outcome == "ok" and proc.poll() is None:
                if time.monotonic() > deadline:
                    outcome = "timeout"
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            if outcome != "ok":
                _kill_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(_KILL_GRACE)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            # Whatever it left running in the background goes too.  The group outlives its
            # leader only while a member lives, so this cannot reach another process group.
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            self._running.discard(proc.pid)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
        return outcome, proc.returncode, output

    def _exchange(self, proc, body, environ, deadline):
        """Feed stdin, collect stdout, log stderr and watch the client, until the pipes close.

        Returns ("ok", output), or ("timeout" | "too much output" | "client gone", b"").
        """
        # poll(2), not epoll: for three or four descriptors once, it costs fewer system calls.
        selector = getattr(selectors, "PollSelector", selectors.SelectSelector)()
        if body:
            os.set_blocking(proc.stdin.fileno(), False)  # a command that does not read: no hang
            selector.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()  # an empty stdin, not the server's
        pipes = {proc.stdout, proc.stderr}
        for pipe in pipes:
            selector.register(pipe, selectors.EVENT_READ)
        client = environ.get("wsgi_unix.socket")
        if client is not None:
            selector.register(client, selectors.EVENT_READ)
        output, size, sent, stderr_tail = [], 0, 0, b""
        try:
            while pipes:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout", b""
                for key, _ in selector.select(left):
                    stream = key.fileobj
                    if stream is proc.stdin:
                        try:
                            sent += os.write(proc.stdin.fileno(), body[sent:sent + 65536])
                        except BrokenPipeError:
                            sent = len(body)  # the command does not want the rest
                        if sent >= len(body):
                            selector.unregister(proc.stdin)
                            proc.stdin.close()
                    elif stream is client:
                        if _client_gone(client):
                            return "client gone", b""
                        selector.unregister(client)  # it sent more, so it is still there
                    else:
                        data = os.read(stream.fileno(), 65536)
                        if not data:
                            selector.unregister(stream)
                            pipes.discard(stream)
                        if stream is proc.stdout:
                            size += len(data)
                            if size > self.max_output:
                                return "too much output", b""
                            output.append(data)
                            continue
                        *lines, stderr_tail = (stderr_tail + data).split(b"\n")
                        if stderr_tail and (not data or len(stderr_tail) > MAX_LINE):
                            lines.append(stderr_tail)  # a last line without "\n", or a huge one
                            stderr_tail = b""
                        for line in lines:
                            self._log(environ, line.decode("utf-8", "replace"))
            return "ok", b"".join(output)
        finally:
            selector.close()

    def _log(self, environ, text):
        """One line of the command's stderr in the server log, prefixed with the request."""
        line = f"{PROG}: {environ['REQUEST_METHOD']} {environ['PATH_INFO']}: {text}"
        environ["wsgi.errors"].write(line.translate(_LOG_ESCAPES) + "\n")

    def kill_all(self):
        """Kill every running command's process group (at exit: none may outlive us)."""
        for pid in list(self._running):
            _kill_group(pid, signal.SIGKILL)


def _nothing():
    pass


def _kill_group(pid, signum):
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _client_gone(sock):
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _plain(start_response, status, text, headers=()):
    body = f"{status}: {text}\n".encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))] + list(headers))
    return [body]


def _parse_cgi_output(output):
    """Split a CGI response (RFC 3875 section 6) into status, headers and body."""
    end = _HEAD_END.search(output)
    if end is None:
        raise ValueError("no blank line after the headers")
    status, headers = None, []
    for line in output[:end.start()].split(b"\n"):
        name, colon, value = line.rstrip(b"\r").partition(b":")
        value = value.strip(b" \t").decode("latin-1")
        if not colon or not _TOKEN.match(name) or _HEADER_VALUE_BAD.search(value):
            raise ValueError(f"malformed header line {line[:80]!r}")
        name = name.decode("ascii")
        if name.lower() == "status":
            if not _STATUS.match(value if " " in value else value + " "):
                raise ValueError(f"malformed Status {value!r}")
            status = value if " " in value else f"{value} {http.HTTPStatus(int(value)).phrase}"
        elif name.lower() == "content-length" or wsgiref_util.is_hop_by_hop(name):
            continue  # the server frames the response itself
        else:
            headers.append((name, value))
    if status is None:
        location = any(name.lower() == "location" for name, _ in headers)
        status = "302 Found" if location else "200 OK"
    return status, headers, output[end.end():]


def _command_path():
    return os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin"


# --- The API ------------------------------------------------------------------------------

def make_server(address, app, server_class=WSGIServer, handler_class=WSGIRequestHandler, **options):
    """Return a bound, listening WSGIServer for ``app`` on ``address`` (a context manager).

    ``address`` is a ListenAddress or its text; ``options`` are WSGIServer's keywords
    (``mode``, ``group``, ``threads``, ``timeout``, ``proxy_headers``... as on the command line).
    """
    server = server_class(address, handler_class, **options)
    server.set_app(app)
    return server


def serve(app, address, **options):
    """Serve ``app`` on ``address`` until SIGTERM or SIGINT (or shutdown()), then clean up.

    Prints the readiness line ``wsgi_unix: serving on ADDRESS`` on stderr once it serves.
    Signal handlers are installed only when called from the main thread.
    """
    with make_server(address, app, **options) as server:
        def stop(*_):
            _notify_systemd("STOPPING=1")
            server.request_stop()
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                handlers[signum] = signal.signal(signum, stop)
        try:
            if server.listen_address.kind == "abstract":
                sys.stderr.write(f"{PROG}: warning: {server} is an abstract socket; anyone in this "
                                 f"network namespace can connect to it\n")
            elif server.listen_address.kind == "unix" and options.get("mode", 0) & 0o002:
                # connect() needs write permission: "others" may send requests.
                sys.stderr.write(f"{PROG}: warning: mode {options['mode']:o} lets every local user "
                                 f"connect to {server}; 660 with --group is the usual choice\n")

            def ready():
                sys.stderr.write(f"{PROG}: serving on {server}\n")
                sys.stderr.flush()
                _notify_systemd("READY=1")
            server.on_ready = ready
            server.serve_forever()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)


def _notify_systemd(state):
    """Tell systemd (Type=notify) how we are, if it asked: sd_notify(3), in a few lines."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    if not address:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        sys.stderr.write(f"{PROG}: cannot notify systemd at {address!r}: {exc.strerror}\n")


# --- The command line ---------------------------------------------------------------------

_HELP_EPILOG = """\
addresses:
  /run/app/app.sock, app.sock, unix:PATH   a Unix socket file (removed at exit)
  unix:@NAME                               a Linux abstract socket (no file, no permissions)
  127.0.0.1:8000, [::1]:8000, host:8000    TCP; all interfaces only when asked: 0.0.0.0:8000
  fd:3                                     an inherited listening socket (systemd)

examples:
  python3 wsgi_unix.py ./app.sock
      the date, once per request: curl --unix-socket ./app.sock http://localhost/
  python3 wsgi_unix.py --mode 660 --group www-data /run/app/app.sock -- df -h
      a status page that nginx (user www-data) may connect to
  python3 wsgi_unix.py --app myapp:application --proxy-headers /run/app/app.sock
      a WSGI app behind nginx, with the client's address from X-Forwarded-For

exit status: 0 after a clean stop (SIGTERM, SIGINT), 1 if it cannot serve, 2 for a usage error
"""


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
            if not 0 < value < float("inf"):  # also refuses nan
                raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
            return value
        return check

    def script_name(text):
        if text and (not text.startswith("/") or text.endswith("/")):
            raise argparse.ArgumentTypeError(f"{text!r} should look like /prefix")
        return text

    def size(text):
        match = re.fullmatch(r"(\d+)([KMG]?)", text.upper())
        if not match:
            raise argparse.ArgumentTypeError(f"{text!r} is not a size like 65536, 64K or 16M")
        return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]

    def ip_addresses(text):
        try:
            return _ip_addresses(text.split(","))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc))

    def methods(text):
        names = [name.strip().upper() for name in text.split(",")]
        if not all(_TOKEN.match(name.encode()) for name in names):
            raise argparse.ArgumentTypeError(f"{text!r} is not a list like GET,HEAD,POST")
        return names

    parser = Parser(
        prog=f"python3 {os.path.basename(sys.argv[0]) or 'wsgi_unix.py'}",
        usage="%(prog)s [OPTIONS] ADDRESS [-- COMMAND [ARG ...]]\n"
              "       %(prog)s [OPTIONS] --app MODULE:CALLABLE ADDRESS",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a WSGI application -- or, without --app, the output of COMMAND run\n"
                    "once per request (default: date -u) -- on a Unix socket, safely.",
        epilog=_HELP_EPILOG)
    parser.add_argument("address", metavar="ADDRESS", help="where to listen (forms below)")
    server = parser.add_argument_group("server")
    server.add_argument("--app", metavar="MODULE:CALLABLE",
                        help="serve this WSGI callable, imported from the current directory")
    server.add_argument("--mode", type=mode, metavar="OCTAL",
                        help="socket file mode, in force before listen() (default: 600; nginx: 660)")
    server.add_argument("--group", metavar="NAME|GID",
                        help="socket file group, e.g. www-data (default: the process's group)")
    server.add_argument("--threads", type=positive(int), default=8, metavar="N",
                        help="threads that accept and serve connections (default: %(default)s)")
    server.add_argument("--timeout", type=positive(float), default=30.0, metavar="SECONDS",
                        help="for the request head to arrive, then for each 64 KiB of its body "
                             "or of the response (default: %(default)g); then 408 or a close")
    server.add_argument("--graceful-timeout", type=positive(float), default=10.0, metavar="SECONDS",
                        help="for requests in flight to finish after SIGTERM (default: %(default)g)")
    server.add_argument("--max-connections", type=positive(int), default=1024, metavar="N",
                        help="open at once; more wait in the listen backlog (default: %(default)s)")
    server.add_argument("--allow-uid", metavar="UID[,UID...]",
                        help="only these users (names or numbers) may send requests; others get "
                             "403 (Unix sockets, Linux)")
    server.add_argument("--proxy-headers", action="store_true",
                        help="take REMOTE_ADDR from X-Forwarded-For and the scheme from "
                             "X-Forwarded-Proto, from Unix peers and --forwarded-allow-ips only")
    server.add_argument("--forwarded-allow-ips", type=ip_addresses, default=set(), metavar="IP[,IP...]",
                        help="TCP peers whose proxy headers are trusted (default: none)")
    server.add_argument("--script-name", metavar="/PREFIX", type=script_name, default="",
                        help="mount the app under this path; requests outside it get 404")
    server.add_argument("--quiet", action="store_true", help="no access log")
    server.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    gateway = parser.add_argument_group("the command (without --app)")
    gateway.add_argument("--cgi", action="store_true",
                         help="the output starts with CGI headers (Status:, Content-Type:, ...)")
    gateway.add_argument("--pass-env", metavar="NAME", action="append", default=[],
                         help="pass this variable of ours to the command (repeatable); it gets "
                              "PATH and the request's CGI variables, nothing else")
    gateway.add_argument("--max-body", type=size, default="1M", metavar="SIZE",
                         help="largest request body, for stdin (default: 1M); larger gets 413")
    gateway.add_argument("--max-output", type=size, default="16M", metavar="SIZE",
                         help="largest output (default: 16M); more gets 502")
    gateway.add_argument("--command-timeout", type=positive(float), default=30.0, metavar="SECONDS",
                         help="to finish (default: %(default)g); then its process group is killed, 504")
    gateway.add_argument("--methods", type=methods, default="GET,HEAD,POST", metavar="LIST",
                         help="allowed request methods (default: %(default)s); others get 405")
    gateway.add_argument("--max-procs", type=positive(int), metavar="N",
                         help="commands running at once (default: --threads); others wait, then 503")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    args = parser.parse_args(argv)
    if args.app and command:
        parser.error("give either --app or a COMMAND, not both")
    if args.forwarded_allow_ips and not args.proxy_headers:
        parser.error("--forwarded-allow-ips goes with --proxy-headers")
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
        if address.kind != "unix" and (args.mode is not None or args.group is not None):
            where = ("systemd's SocketMode= and SocketGroup= set them" if address.inherited
                     else "this address has no socket file")
            raise AddressError(f"{address}: --mode and --group are a socket file's; {where}")
        if args.app:
            app = _load_app(args.app)
        else:
            app = command_app(command or DEFAULT_COMMAND, cgi=args.cgi, pass_env=args.pass_env,
                              max_body=args.max_body, max_output=args.max_output,
                              timeout=args.command_timeout, methods=args.methods,
                              max_procs=args.max_procs or args.threads)
        serve(app, address, mode=0o600 if args.mode is None else args.mode, group=args.group,
              threads=args.threads, timeout=args.timeout, graceful_timeout=args.graceful_timeout,
              max_connections=args.max_connections, access_log=not args.quiet,
              allow_uids=args.allow_uid.split(",") if args.allow_uid else None,
              proxy_headers=args.proxy_headers, forwarded_allow_ips=args.forwarded_allow_ips,
              script_name=args.script_name)
    except AddressError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 2
    except ServeError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 1
    except OSError as exc:  # what the checks above did not foresee: still one line, not a traceback
        sys.stderr.write(f"{PROG}: {args.address}: {exc}\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
