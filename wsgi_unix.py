#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The wsgi_unix.py authors
"""Serve a WSGI application on a Unix domain socket, safely, with the standard library only.

Copy this one file next to your app, in a bare container behind nginx, and run::

    python3 wsgi_unix.py --app myapp:application /run/app/app.sock
    python3 wsgi_unix.py /run/app/app.sock -- uptime     # the example app: a command per request

It extends ``wsgiref.simple_server`` (subclasses, not a rewrite) where wsgiref falls short:

- any address: a Unix socket file, a Linux abstract socket, TCP over IPv4 or IPv6 (a host
  name is resolved once, at start-up, through the system resolver; a numeric address never
  is), or a socket inherited from systemd;
- the socket file done right: a stale one is removed, a live one or anything that is not a socket
  is never touched, its mode and group are in force before anyone can connect, and only the file
  this process created is removed at exit;
- HTTP/1.1 with persistent connections and chunked responses, served by exactly ``--threads``
  threads: connections that are not ready (a head or body still arriving, idle between requests)
  wait in a selector and hold no thread, and request bodies are received before the app runs;
- a strict request parser with wsgiref's limits that drops header names containing "_";
- nothing from ``os.environ`` reaches the application (wsgiref copies all of it, secrets included);
- SIGTERM and SIGINT stop it gracefully: no new connections, requests in flight may finish;
- ``--workers N``: N processes on one socket, a master that replaces one that dies and
  reloads them all on SIGHUP without losing a request, and recycles a worker after N
  requests, past a memory size, or when one request runs too long;
- ``--check ADDRESS``: a health probe for containers that have no curl.

What it deliberately does not do: TLS, HTTP/2, asyncio.  Put nginx in front for the first
two; the same WSGI app runs unchanged under gunicorn or uWSGI when you need more.

Map of this file.  Each section uses only those above it (a test checks):

  §1 settings and errors     the settings table (DEFAULTS, checks, options), limits, log writer
  §2 addresses               ListenAddress: parsing, bind/listen, the socket file's lifecycle
  §3 HTTP/1.x on bytes       no I/O: the request reader, body decoders, the error answer
  §4 socket I/O              the progress rule, sending with deadlines, the received body
  §5 the engine              connection states, the selector, leader/followers, the watchdog
  §6 wsgiref glue            WSGIServer, WSGIRequestHandler (environ, log), ServerHandler
  §7 processes               signals, systemd's notification, loading the app, prctl
  §8 worker processes        the master's decisions (start, recycle, reload, kill), a worker
  §9 API                     make_server, serve
  §10 the example app        command_app: a command per request
  §11 CLI                    argparse from the settings table, --check, main

To change how threads take connections, read §5; to change parsing, §3; what the app sees, §6;
how processes are managed, §8.
"""

import atexit
import errno
import fcntl
import grp
import http
import io
import os
import pwd
import random
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
import traceback
import urllib.parse
from collections import OrderedDict, deque
from email.utils import formatdate
from wsgiref import simple_server
from wsgiref import util as wsgiref_util

__version__ = "0.2.0"
__all__ = [
    "AddressError", "ServeError", "ListenAddress", "WSGIServer", "WSGIRequestHandler",
    "ServerHandler", "command_app", "make_server", "serve", "main", "DEFAULTS",
]

PROG = "wsgi_unix"
_LOG_PREFIX = PROG  # how our log lines begin; a worker process adds its pid: wsgi_unix[1234]
SERVER_SOFTWARE = "wsgi_unix/" + __version__


# --- §1 Settings and errors ---------------------------------------------------------------

# An HTTP token (RFC 9110 §5.6.2): a method, a header name.
_TOKEN_CHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN = re.compile(_TOKEN_CHARS + rb"+\Z")


def _number(integer=False, low=0, above=False, size=False):
    """A kind of setting, (check, read): check(name, value) a value from Python, read(text) one
    from the command line, each the value or TypeError/ValueError; here a number from ``low``
    up (``above``: past it), whole if ``integer``, a ``size`` read as 65536, 64K, 16M or 1G."""
    kinds = (int,) if integer else (int, float)
    expected = ("a size like 65536, 64K or 16M" if size else "a positive number" if above
                else f"a number from {low} up")

    def fits(value):
        return (value > low if above else value >= low) and value < float("inf")  # (nan: no)

    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise TypeError(f"{name} must be a number, not {type(value).__name__} {value!r}")
        if not fits(value):
            raise ValueError(f"{name}={value!r}: must be {'above' if above else 'at least'} {low}")
        return value

    def read(text):
        match = re.fullmatch(r"(\d+)([KMG]?)", text.upper()) if size else None
        try:
            value = (int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]
                     if match else None if size else int(text) if integer else float(text))
        except ValueError:
            value = None
        if value is None or not fits(value):
            raise ValueError(f"{text!r} is not {expected}")
        return value
    return check, read


def _check_mode(name, mode):
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise TypeError(f"{name} must be an int like 0o660, not {type(mode).__name__} {mode!r}")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{name}={mode:#o}: must be from 0o000 to 0o777")
    return mode


def _read_mode(text):
    try:
        return _check_mode("mode", int(text, 8))
    except ValueError:
        raise ValueError(f"{text!r} is not an octal mode from 000 to 777, like 660") from None


def _read_prefix(text):
    if text and (not text.startswith("/") or text.endswith("/")):
        raise ValueError(f"{text!r} should look like /prefix")
    return text


def _read_methods(text):
    names = [name.strip().upper() for name in text.split(",")]
    if not all(_TOKEN.match(name.encode()) for name in names):
        raise ValueError(f"{text!r} is not a list like GET,HEAD,POST")
    return names


def _read_list(text):
    return [name.strip() for name in text.split(",") if name.strip()]


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


def _as_is(name, value):
    return value  # checked where it is used (a group name, a user name, a stream)


_COUNT, _SIZE = _number(integer=True, low=1), _number(integer=True, size=True)
_SECONDS = _number(above=True)
_FLAG = (_as_is, None)
_TEXT = (_as_is, str)

# Every setting: its keyword (serve()'s, make_server()'s, WSGIServer's; or command_app()'s),
# default, kind, option (--name unless given), metavar, default as shown, and help.  DEFAULTS,
# the checks, argparse and the README's options table (a test compares) read it.
_SETTINGS = [dict(zip(("for", "name", "default", "kind", "option", "metavar", "shown", "help"),
                      row)) for row in [
    ("server", "mode", 0o600, (_check_mode, _read_mode), None, "OCTAL", "600; 660 with --group",
     "the socket file's mode, in force before listen(); one that lets others connect (666) is "
     "warned about"),
    ("server", "group", None, _TEXT, None, "NAME|GID", "the process's",
     "the socket file's group, e.g. www-data (nginx's)"),
    ("server", "workers", 1, _COUNT, None, "N", "1",
     "processes, each with --threads threads, on one socket: above 1 (or with a recycling "
     "option) a master starts them, replaces one that dies, reloads them on SIGHUP"),
    ("server", "threads", 8, _COUNT, None, "N", "8",
     "threads that run the app: at most N requests at once, whatever clients do"),
    ("server", "timeout", 30.0, _SECONDS, None, "SECONDS", "30; 5 with --check",
     "for the request head to arrive, then for each 64 KiB of the body or of the response; "
     "then 408 or a close (a line says when every thread has been in one request this long)"),
    ("server", "keep_alive", 180.0, _number(), None, "SECONDS", "180",
     "how long an idle connection stays open, longer than proxies keep theirs (nginx 60 s, "
     "Caddy 120 s: the proxy closes it, never we under its feet); 0: one request each"),
    ("server", "graceful_timeout", 10.0, _SECONDS, None, "SECONDS", "10",
     "for requests in flight to finish after SIGTERM"),
    ("server", "max_connections", 1024, _COUNT, None, "N", "1024",
     "open at once; when all are taken, the longest idle or unfinished one gives way"),
    ("server", "max_request_body", 1 << 30, _SIZE, None, "SIZE", "1G",
     "the largest request body, received before the app runs; larger: 413"),
    ("server", "max_spool", None, _SIZE, None, "SIZE",
     "half the free space of TMPDIR at start-up",
     "bytes of request bodies (those over 512K) spooled to TMPDIR at once; a body that does "
     "not fit: 503"),
    ("server", "allow_uids", None, (_as_is, _read_list), "--allow-uid", "UID[,UID...]",
     "everyone", "only these users (names or numbers) may send requests; others get 403 "
     "(Unix sockets, Linux)"),
    ("server", "proxy_headers", False, _FLAG, None, None, "off",
     "take REMOTE_ADDR from X-Forwarded-For and the scheme from X-Forwarded-Proto, from Unix "
     "peers and --forwarded-allow-ips only"),
    ("server", "forwarded_allow_ips", (), (_as_is, lambda text: _ip_addresses(text.split(","))),
     None, "IP[,IP...]", "none", "TCP peers whose proxy headers are trusted"),
    ("server", "script_name", "", (_as_is, _read_prefix), None, "/PREFIX", "none",
     "mount the app under this path; requests outside it get 404"),
    ("server", "access_log", True, _TEXT, None, "PATH|-", "stderr",
     "the access log: a file (appended to; SIGUSR1 reopens it), or - for stdout (what "
     "containers collect)"),
    ("server", "max_requests", None, _number(integer=True, above=True), None, "N", "off",
     "replace a worker after N requests (an app that leaks)"),
    ("server", "max_requests_jitter", 0, _number(integer=True), None, "J", "0",
     "after N plus 0 to J requests, drawn for each worker (so that they do not all go at once)"),
    ("server", "max_worker_memory", None, _number(integer=True, above=True, size=True), None,
     "SIZE", "off", "replace a worker whose resident memory passed SIZE (500M) after a request"),
    ("server", "request_timeout", None, _SECONDS, None, "SECONDS", "off",
     "a request that ran this long gets 504 and its worker is replaced (a thread cannot be "
     "killed); its other requests get --graceful-timeout"),
    ("command", "cgi", False, _FLAG, None, None, "off",
     "the output starts with CGI headers (Status:, Content-Type:, Location:); malformed ones "
     "give 502"),
    ("command", "pass_env", (), (_as_is, _read_list), None, "NAME[,NAME...]", "none",
     "pass these variables of ours to the command (repeatable); it gets PATH and the "
     "request's CGI variables, nothing else"),
    ("command", "max_body", 1 << 20, _SIZE, None, "SIZE", "1M",
     "the largest request body, for its stdin; larger: 413, and it is not run"),
    ("command", "max_output", 16 << 20, _SIZE, None, "SIZE", "16M",
     "the largest output; more: it is killed, 502"),
    ("command", "timeout", 30.0, _SECONDS, "--command-timeout", "SECONDS", "30",
     "to finish; then SIGTERM to its process group, SIGKILL a second later, 504"),
    ("command", "methods", ("GET", "HEAD", "POST"), (_as_is, _read_methods), None, "LIST",
     "GET,HEAD,POST", "allowed request methods; others get 405 with Allow"),
    ("command", "max_procs", 8, _COUNT, None, "N", "--threads; command_app(): 8",
     "commands running at once in each process (with --workers N, N times as many in all); "
     "others wait up to --command-timeout, then 503"),
]]
for _setting in _SETTINGS:
    _setting["option"] = _setting["option"] or "--" + _setting["name"].replace("_", "-")
DEFAULTS = {s["name"]: s["default"] for s in _SETTINGS if s["for"] == "server"}
COMMAND_DEFAULTS = {s["name"]: s["default"] for s in _SETTINGS if s["for"] == "command"}
_SETTING = {(s["for"], s["name"]): s for s in _SETTINGS}

# The keywords that ask serve() for a master (any of them set, even with one worker): a thread
# cannot be killed, and a process cannot be replaced without a gap but by a master.
_RECYCLING = ("max_requests", "max_requests_jitter", "max_worker_memory", "request_timeout")

# The limits of http.server, which wsgiref parses with: a request line or a header line of at
# most 64 KiB, at most 100 header lines.  The whole head is capped too, so that one connection
# cannot hold more than this much of our memory before it is answered.
MAX_LINE = 65536
MAX_HEADERS = 100
MAX_HEAD = 256 * 1024
RECV_SIZE = 65536
# After its head, a client must send (or read) at least this much per timeout: with a deadline
# per recv() or send() alone, a few bytes now and then would hold a connection for good.
MIN_PROGRESS_BYTES = 64 * 1024
# A request body up to this size is kept in memory; a larger one goes to an anonymous
# temporary file (waitress's inbuf_overflow), so 1,024 uploads cost at most 512 MiB.
BODY_IN_MEMORY = 512 * 1024
# A response to HTTP/1.0 with no Content-Length is held back up to this size: if it ends
# within it, it gets a Content-Length, so that a truncation can show (see ServerHandler).
FIRST_BUFFER = 64 * 1024
# After an error answer, how long we read and discard what the client still sends (a lingering
# close, as nginx and Apache do): closing with unread bytes makes the kernel send a reset, and
# the client loses the answer.
LINGER_AFTER_ERROR = 5.0
# When requests take this long on average, the leader hands the selector to a follower before
# it runs one (see _Leadership): a hand-over costs about 40 us, under 4 % of such a request.
HAND_OVER_ABOVE = 0.001
# How long one request served inline may keep the leader before a follower takes over.
PROMOTE_AFTER = 0.01
# A leader that waited this long in the selector for nothing finds the server idle; then,
# if this many connections closed since it last did, it returns freed memory to the system.
IDLE_AFTER = 0.1
TRIM_AFTER_CLOSED = 100
# After an accept() that found a connection, how many more the leader may try before it looks
# at the selector again (a select() per connection cost 25 % of the close c=16 rate).
ACCEPTS_IN_A_ROW = 16
# Refusals (400, 403, 408, ...) logged a second at most; the rest are counted in one line.
REFUSALS_LOGGED = 20
# How long to wait for the socket directory's lock (held for a moment by another starter;
# for longer, by someone who may read the directory), at start-up and at exit.
LOCK_WAIT = 5.0
STOP_LOCK_WAIT = 2.0
# How long a stopping server waits for connections it accepted, or idle ones, to send a request.
IDLE_GRACE_AT_STOP = 1.0
# A worker process that ends within WORKER_QUICK_DEATH seconds of its start (or before it
# serves) failed to start: the next one waits WORKER_RETRY seconds, doubled for each such
# failure in a row, and after WORKER_GIVE_UP in a row the master stops (a broken deploy must
# not spin).  A stopping worker gets --graceful-timeout plus WORKER_KILL_AFTER, then SIGKILL.
WORKER_QUICK_DEATH = 1.0
WORKER_RETRY = 0.1
WORKER_GIVE_UP = 5
WORKER_KILL_AFTER = 5.0


def _checked(settings, whose="server"):
    """``settings`` (DEFAULTS' keys, or COMMAND_DEFAULTS' for "command") if every value is of
    its setting's kind; else TypeError or ValueError naming the keyword (as the CLI's usage
    errors do)."""
    for name, value in settings.items():
        setting = _SETTING.get((whose, name))  # (others are not settings: server_class, ...)
        if setting and not (value is None and setting["default"] is None):  # None: off
            setting["kind"][0](name, value)
    if settings.get("max_requests_jitter") and not settings.get("max_requests"):
        raise ValueError("max_requests_jitter goes with max_requests")
    return settings


class AddressError(ValueError):
    """The address is malformed or names nothing usable (the CLI exits with status 2)."""


class ServeError(Exception):
    """The server cannot start or run as asked (the CLI exits with status 1)."""


class _HTTPError(Exception):
    """A request we answer ourselves with ``status`` (400, 408, 413, ...) and close."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


# Log lines that could not be written since the last one that could, and why.
_unwritten = {"lines": 0, "why": ""}


def _log_write(stream, text):
    """Write whole log lines to ``stream`` and flush them, so that each reaches its stream at
    once on every Python version (3.8's stderr is block-buffered in a pipe or a file).

    A line that cannot be written -- a dead log pipe, a full disk -- is dropped and counted,
    never raised: logging must not cost a request or a thread.  The next line that can be
    written is preceded by one that says how many were lost.
    """
    try:
        lost = _unwritten["lines"]
        if lost:
            stream.write(f"{_LOG_PREFIX}: {lost} log line(s) could not be written "
                         f"({_unwritten['why']}) and were dropped\n")
            _unwritten["lines"] -= lost
        stream.write(text)
        stream.flush()
    except (OSError, ValueError) as exc:  # ValueError: a closed file, or one it cannot encode
        _unwritten["lines"] += text.count("\n") or 1
        _unwritten["why"] = getattr(exc, "strerror", None) or str(exc)


def _flush_standard_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass  # none (pythonw), closed, or a dead pipe: nothing to keep


def _descriptors_kept(threads):
    """Descriptors kept for other uses than connections: ours (listener, selector, pipes, logs)
    and, per thread, what one request may open (a spooled body, a command's pipes)."""
    return 16 + 4 * threads


def _descriptor_room(threads):
    """How many connections the limit on open files leaves room for (None: no limit known)."""
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft - _descriptors_kept(threads)


def _raise_descriptor_limit():
    """The soft limit on open files up to the hard one, where allowed: systemd gives services
    1,024 soft (and 524,288 hard), fewer than --max-connections and the rest need."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass  # not Unix, or a hard limit the kernel will not grant: the server says what it got


class _LogFile:
    """An --access-log file that can be reopened at its path (SIGUSR1), as nginx's: after
    logrotate moved it, lines go to a new file there, not on into the moved one."""

    def __init__(self, path):
        self.path = path
        self._file = self._open()

    def _open(self):
        return open(self.path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")

    def write(self, text):
        return self._file.write(text)

    def flush(self):
        self._file.flush()

    def reopen(self):
        """Open the path anew; on failure keep writing to the old file and raise OSError."""
        new = self._open()
        old, self._file = self._file, new
        try:
            old.close()
        except (OSError, ValueError):
            pass  # (what it held could not be written: counted where it was written)

    def close(self):
        self._file.close()


# --- §2 Addresses and the socket file ----------------------------------------------------

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
        if isinstance(text, tuple) and len(text) == 2:  # wsgiref's (host, port)
            host, port = text
            text = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        elif isinstance(text, os.PathLike):
            text = os.fspath(text)
        if not isinstance(text, str):
            raise TypeError(f"an address is text like /run/app.sock or 127.0.0.1:8000, a path, "
                            f"or a (host, port) tuple, not {type(text).__name__}")
        self.text = text
        self.kind = None  # "unix", "abstract", "tcp" or "fd"
        self.path = self.host = self.port = self.fd = None
        self._identity = None  # (st_dev, st_ino) of the socket file we created
        self._directory = None  # its directory, open, for remove_socket_file()
        self._listener = None  # the socket listen() made at a socket file
        self._parse(text)

    def _parse(self, text):
        scheme = text.partition("://")[0].lower()
        if scheme in ("http", "https", "unix", "tcp"):  # gunicorn's, uvicorn's, curl's habits
            rest = text.split("://", 1)[1]
            right = f"unix:{rest}" if scheme == "unix" else rest.split("/", 1)[0] or "127.0.0.1:8000"
            raise AddressError(f"{text}: an address, not a URL: write {right}")
        if (text.isascii() and text.isdigit()) or text == "localhost":
            raise AddressError(f"{text}: for TCP write 127.0.0.1:{text if text.isdigit() else 8000}; "
                               f"for a socket file named so, ./{text}")
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
            if port.isidentifier() and all(part.isidentifier() for part in host.split(".")):
                # gunicorn's habit: the app where the address goes.
                raise AddressError(f"{text}: that looks like an app, not an address: give it "
                                   f"with --app, then the address, e.g. --app {text} "
                                   f"/run/app/app.sock")
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
                self._listener = sock
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
        if sockaddr[0] in ("0.0.0.0", "::") and self.host not in ("0.0.0.0", "::"):
            # "0", "0.0", "0x0" all mean every interface, as ":8000" would: say it in full.
            raise AddressError(f"{self}: {self.host!r} means every interface; to listen on all "
                               f"of them say 0.0.0.0:{self.port} or [::]:{self.port}")
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
        os.set_inheritable(self.fd, False)  # an app's child (os.system) must not hold it
        if os.environ.get("LISTEN_PID") == str(os.getpid()):
            # systemd's socket-activation variables describe our descriptors, not a child's.
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)
        return sock

    # --- The socket file -------------------------------------------------------------------

    def _lock_directory(self, wait=LOCK_WAIT):
        """Open and flock the socket's directory; return the descriptor (close it to unlock).

        Probing, removing and binding a socket file are three steps, and between another
        starter's bind() and its listen() our probe would see ECONNREFUSED -- "stale" -- and
        remove a live socket.  An exclusive flock on the directory makes the three steps one
        for every wsgi_unix process; it is taken on the directory because the file itself is
        what comes and goes, and it is released on close, also when the process dies.  Anyone
        who may read the directory can hold that lock too, so we wait ``wait`` seconds at most,
        saying so, then raise ServeError naming the holder.
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
        deadline, said = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                pass
            holder = _lock_holder(fd)
            if time.monotonic() > deadline:
                os.close(fd)
                raise ServeError(f"{self}: the lock on {directory} has been held by {holder} for "
                                 f"{wait:g} s; stop it, or use a directory only this user can read")
            if not said:
                _log_write(sys.stderr, f"{PROG}: waiting for the lock on {directory}, held by "
                                       f"{holder}\n")
                said = True
            time.sleep(0.05)

    def _listen_unix_file(self, sock, mode, group, backlog):
        size = len(os.fsencode(self.path))
        if size > _MAX_UNIX_PATH:
            raise ServeError(f"{self}: the path is {size} bytes, longer than the {_MAX_UNIX_PATH} "
                             f"a Unix socket allows; use a shorter path")
        gid = _group_id(group)
        lock = self._lock_directory()
        private = None
        try:
            self._remove_stale_socket()
            # The socket is made in a private directory beside its path (mode 0700: no one else
            # can reach it), given its mode and group, set listening, then linked into place:
            # from its first instant at the path it is final.  The process umask, which other
            # threads' files depend on, is never touched; and link(), unlike rename(), fails
            # if something appeared at the path meanwhile instead of replacing it.
            private = self._private_directory()
            temp = os.path.join(private, "s")
            short = temp if len(os.fsencode(temp)) <= _MAX_UNIX_PATH else (
                f"/proc/self/fd/{lock}/{os.path.basename(private)}/s")  # the same, shorter
            self._bind(sock, short)
            os.chmod(temp, mode)
            if gid is not None:
                try:
                    os.chown(temp, -1, gid, follow_symlinks=False)
                except PermissionError:
                    raise ServeError(f"{self}: no permission to give the socket to group {group}; "
                                     f"run as a member of that group, or as root") from None
            sock.listen(backlog)
            try:
                os.link(temp, self.path, follow_symlinks=False)
            except FileExistsError:
                raise ServeError(f"{self}: something appeared at {self.path} while the socket "
                                 f"was made; refusing to replace it") from None
            info = os.lstat(self.path)
            self._identity = (info.st_dev, info.st_ino)
        except BaseException:
            self._unlink_own_file()  # if link() made it
            os.close(lock)
            raise
        finally:
            if private is not None:
                for remove, path in ((os.unlink, os.path.join(private, "s")), (os.rmdir, private)):
                    try:
                        remove(path)
                    except FileNotFoundError:
                        pass
        # Kept open (unlocked) until remove_socket_file(): by then every descriptor may be
        # taken by a client, or the directory may be gone.
        fcntl.flock(lock, fcntl.LOCK_UN)
        self._directory = lock

    def _private_directory(self):
        directory = os.path.dirname(self.path)
        while True:
            private = os.path.join(directory, f".wsgi_unix-{os.urandom(6).hex()}")
            try:
                os.mkdir(private, 0o700)
                return private
            except FileExistsError:
                continue
            except (PermissionError, OSError) as exc:
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise ServeError(f"{self}: no permission to create the socket in {directory}; "
                                     f"run as a user who may write there, or choose another "
                                     f"directory") from None
                raise

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
        listener, self._listener = self._listener, None
        try:
            if listener is not None and listener.fileno() != -1:
                # While we still listen, no starter takes our file for stale (its probe
                # connects), so none replaces it under us: no lock needed, and another user
                # holding the directory's lock cannot make us leave it behind.
                self._unlink_own_file()
                return
            # No starter may be between probe and bind when we remove the file.  A lock held
            # for longer than STOP_LOCK_WAIT is no starter's: leave the file (the next start
            # removes it as stale) rather than wait for ever.
            deadline = time.monotonic() + STOP_LOCK_WAIT
            while True:
                try:
                    fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        _log_write(sys.stderr, f"{PROG}: {self}: left the socket file: the lock "
                                               f"on its directory is held by "
                                               f"{_lock_holder(directory)}\n")
                        return
                    time.sleep(0.05)
            self._unlink_own_file()
        finally:
            os.close(directory)

    def who_may_connect(self):
        """For the readiness line: who may connect to the socket file (connect() needs write
        permission), as " (mode 600, owner root, group root)"; "" without a file.  nginx
        running as www-data gets 502 from a 600 socket of root's, and only its log says why."""
        if self.kind != "unix":
            return ""
        try:
            info = os.stat(self.path)
            owner = pwd.getpwuid(info.st_uid).pw_name
        except (OSError, KeyError):
            return ""
        try:
            group = grp.getgrgid(info.st_gid).gr_name
        except KeyError:
            group = str(info.st_gid)
        return f" (mode {stat.S_IMODE(info.st_mode):o}, owner {owner}, group {group})"

    def disown(self):
        """Forget the socket file without removing it: in a forked worker, whose copy of this
        object must never remove what the master owns."""
        directory, self._directory, self._identity = self._directory, None, None
        if directory is not None:
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


def _lock_holder(fd):
    """Who holds a lock on the file open as ``fd``: "pid N (user)", from /proc/locks (Linux)."""
    info = os.fstat(fd)
    inode = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks") as f:
            pid = next(line.split()[4] for line in f
                       if "->" not in line and line.split()[5:6] == [inode])
        with open(f"/proc/{pid}/status") as f:
            uid = int(next(line.split()[1] for line in f if line.startswith("Uid:")))
        return f"pid {pid} ({pwd.getpwuid(uid).pw_name})"
    except (OSError, StopIteration, KeyError, ValueError, IndexError):
        return "another process"


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


def _group_id(group):
    if group is None:
        return group
    if isinstance(group, int) and not isinstance(group, bool):
        return _check_id(group, "gid")  # -1 would leave the group alone; 2**32 overflows
    if group.isascii() and group.isdigit():
        return _check_id(int(group), "gid")
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ServeError(f"group {group!r} does not exist; give a group name or a number") from None


# --- §3 HTTP/1.x on bytes -----------------------------------------------------------------
#
# No I/O in this section: bytes in, a parsed request (or decoded body bytes) or an _HTTPError
# out.  The engine (§5) feeds it what it receives; the unit tests feed it one byte at a time.

_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line that ends a head, CRLF or bare LF
_EMPTY_LINES = re.compile(rb"(?:\r?\n)+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f#]")  # a fragment (#) is never part of a target
_VERSION = re.compile(rb"HTTP/\d\.\d\Z")
_HOST = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]*|\[[0-9A-Fa-f:.]+\])(?::\d*)?\Z")
# chunk = chunk-size *( BWS ";" BWS ext-name [ BWS "=" BWS ext-value ] ) CRLF (RFC 9112 §7.1)
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)(?:[ \t]*;[ \t]*" + _TOKEN_CHARS + rb"+(?:[ \t]*=[ \t]*(?:" + _TOKEN_CHARS
    + rb"+|" + _QUOTED + rb"))?)*\r?\n")
_MAX_CHUNK_DIGITS = 15  # 2**60 bytes: any more is no real body
_PLAIN_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})\r\n")  # no extension: the fast path
# Header fields that are one value, never a list: two different values are refused.
_SINGLETONS = {"host", "content-type", "content-length", "authorization"}
_FRAMING_FIELDS = _SINGLETONS | {"transfer-encoding", "connection", "expect"}
# Fields that frame or route a message: a trailer with one is refused (we drop trailers, but
# a proxy in front might not).
_NOT_TRAILERS = {"content-length", "transfer-encoding", "host"}


class _Request:
    """A request head, parsed; ``body`` is set (a readable file) once the whole body is in."""

    __slots__ = ("method", "target", "version", "headers", "path", "query", "keep_alive",
                 "expect_continue", "length", "chunked", "body", "line")

    def __init__(self, method, target, version, headers, line):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.line = line  # the request line, for the log
        self.path = self.query = ""
        self.keep_alive = version == "HTTP/1.1"
        self.expect_continue = self.chunked = False
        self.length = 0  # of the body; None when chunked
        self.body = None


def _header_field(line):
    """(name, value) of a header or trailer line without its line end, or raise 400."""
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.match(name):
        raise _HTTPError(400, "malformed header line")
    value = value.strip(b" \t")
    if _CONTROL.search(value):
        raise _HTTPError(400, "control character in a header value")
    return name.decode("ascii"), value.decode("latin-1")


def _parse_head(head):
    """Parse a request head (the bytes before its blank line) into a _Request, or raise.

    Enforces http.server's limits (414 for a long request line, 431 for a long header line or
    too many of them) and refuses what proxies could disagree about: bare HTTP/0.9, control
    bytes, whitespace before a colon, folded header lines, two framings.
    """
    lines = head.split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    request_line = lines[0]
    if len(request_line) > MAX_LINE:
        raise _HTTPError(414, "request line too long")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise _HTTPError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method) or not target or _BAD_TARGET.search(target):
        raise _HTTPError(400, "malformed request line")
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        if not _VERSION.match(version):
            raise _HTTPError(400, "malformed request line")
        if not version.startswith(b"HTTP/1."):
            raise _HTTPError(505, "HTTP version not supported")
        version = b"HTTP/1.1"  # a later 1.x minor is understood as 1.1 (RFC 9110 §2.5)
    if len(lines) - 1 > MAX_HEADERS:
        raise _HTTPError(431, "too many header lines")
    headers = []
    for line in lines[1:]:
        if len(line) > MAX_LINE:
            raise _HTTPError(431, "header line too long")
        headers.append(_header_field(line))
    request = _Request(method.decode("ascii"), target.decode("latin-1"), version.decode("ascii"),
                       headers, request_line.decode("latin-1"))
    _read_target(request)
    _read_framing(request)
    return request


def _read_target(request):
    """Split the request target into path and query; only the forms RFC 9112 §3.2 allows."""
    target = request.target
    if target.startswith("/"):
        path, _, request.query = target.partition("?")
    elif target == "*" and request.method == "OPTIONS":
        path = "*"
    elif target[:7].lower() == "http://" or target[:8].lower() == "https://":
        rest = target.split("://", 1)[1]  # absolute-form: authority, then path and query
        cut = min([at for at in (rest.find("/"), rest.find("?")) if at >= 0] or [len(rest)])
        if not rest[:cut] or not _HOST.match(rest[:cut].encode("latin-1")):
            raise _HTTPError(400, "malformed request target")
        tail = rest[cut:]
        path, _, request.query = (tail if tail.startswith("/") else "/" + tail).partition("?")
    else:
        raise _HTTPError(400, "malformed request target")
    request.path = urllib.parse.unquote(path, "latin-1")


def _read_framing(request):
    """How the body is framed, and what the connection does after it (RFC 9112 §6, §9)."""
    fields = {}
    for name, value in request.headers:
        name = name.lower()
        if name in _FRAMING_FIELDS:
            fields.setdefault(name, []).append(value)
    for name in _SINGLETONS.intersection(fields):
        if len(set(fields[name])) > 1:
            raise _HTTPError(400, f"two different {name} fields")
    hosts = fields.get("host")
    if hosts and len(hosts) > 1:  # RFC 9112 §3.2: even the same one twice
        raise _HTTPError(400, "more than one Host field")
    if request.version == "HTTP/1.1" and not hosts:
        raise _HTTPError(400, "no Host header (HTTP/1.1 requires one)")
    if hosts and not _HOST.match(hosts[0].encode("latin-1")):
        raise _HTTPError(400, "malformed Host header")
    codings = fields.get("transfer-encoding")
    if codings:
        if request.version == "HTTP/1.0":
            raise _HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if "content-length" in fields:
            raise _HTTPError(400, "both Content-Length and Transfer-Encoding")
        codings = [item.strip().lower() for item in ",".join(codings).split(",") if item.strip()]
        if codings != ["chunked"]:
            raise _HTTPError(501, "the only transfer coding understood is chunked")
        request.chunked, request.length = True, None
    elif "content-length" in fields:
        length = fields["content-length"][0]
        if not (length.isascii() and length.isdigit()):
            raise _HTTPError(400, "invalid Content-Length")
        if len(length.lstrip("0")) > 18:  # and never int() on 4,300 digits (Python refuses)
            raise _HTTPError(413, "the request body is too large")
        request.length = int(length)
    tokens = {token.strip().lower() for value in fields.get("connection", ())
              for token in value.split(",")}
    if request.version == "HTTP/1.1":
        request.keep_alive = "close" not in tokens
        request.expect_continue = any(value.lower() == "100-continue"
                                      for value in fields.get("expect", ()))
    else:
        request.keep_alive = "keep-alive" in tokens


class _LengthDecoder:
    """The body of a request with a Content-Length: that many bytes, then the next request."""

    extra = 0  # bytes the body costs beyond its own (see _ChunkedDecoder)

    def __init__(self, length):
        self.left = length

    @property
    def done(self):
        return not self.left

    def decode(self, data):
        """Return (body pieces, bytes of ``data`` used)."""
        take = min(self.left, len(data))
        self.left -= take
        return ([bytes(data[:take])] if take else []), take


class _ChunkedDecoder:
    """The body of a request in chunked transfer coding (RFC 9112 §7.1), strictly.

    A chunk line is a hex size (1*HEXDIG) with optional extensions (token[=token|quoted]), then
    CRLF (or LF, as header lines); chunk data must end in CRLF; trailer lines follow the rules
    and limits of header lines and are dropped.
    """

    _SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

    def __init__(self):
        self._state, self._left, self._trailers = self._SIZE, 0, 0
        self.extra = 0  # bytes of chunk extensions and trailers: they count against the limit

    @property
    def done(self):
        return self._state == self._DONE

    def decode(self, data):
        """Return (body pieces, bytes of ``data`` used); raise _HTTPError on bad framing."""
        pieces, pos, end = [], 0, len(data)
        while self._state != self._DONE and pos < end:
            if self._state == self._DATA:
                take = min(self._left, end - pos)
                pieces.append(bytes(data[pos:pos + take]))
                pos += take
                self._left -= take
                if not self._left:
                    self._state = self._DATA_END
                continue
            if self._state == self._DATA_END:  # CRLF or LF, checked as it comes
                if data[pos:pos + 1] == b"\n" or data[pos:pos + 2] == b"\r\n":
                    pos += 1 if data[pos] == 10 else 2
                    self._state = self._SIZE
                    continue
                if data[pos:pos + 1] == b"\r" and pos + 1 == end:
                    break  # the LF is still to come
                raise _HTTPError(400, "chunk data longer than its size")
            if self._state == self._SIZE:
                # Whole small chunks in a row, each in one step (1-byte chunks cost 330 ns a
                # byte one state at a time); anything else takes the general path below.
                plain = _PLAIN_CHUNK_LINE.match(data, pos)
                while plain is not None:
                    start = plain.end()
                    stop = start + int(plain.group(1), 16)
                    if stop == start or data[stop:stop + 2] != b"\r\n":
                        break
                    pieces.append(bytes(data[start:stop]))
                    pos = stop + 2
                    plain = _PLAIN_CHUNK_LINE.match(data, pos)
                if pos >= end:
                    break
            newline = data.find(b"\n", pos, pos + MAX_LINE + 1)
            if newline < 0:
                if end - pos > MAX_LINE:
                    raise _HTTPError(400, "chunk line too long")
                break
            if self._state == self._SIZE:
                match = _CHUNK_LINE.match(data, pos, newline + 1)
                if match is None or match.end() != newline + 1:
                    raise _HTTPError(400, "malformed chunk line")
                digits = match.group(1).lstrip(b"0")
                if len(digits) > _MAX_CHUNK_DIGITS:
                    raise _HTTPError(413, "chunk size too large")
                self._left = int(digits or b"0", 16)
                self.extra += match.end() - pos - len(match.group(1)) - (
                    2 if data[newline - 1:newline] == b"\r" else 1)
                self._state = self._DATA if self._left else self._TRAILER
            else:  # a trailer line, or the blank line that ends the body
                line = data[pos:newline]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line:
                    self._state = self._DONE
                else:
                    self._trailers += 1
                    self.extra += newline + 1 - pos
                    if self._trailers > MAX_HEADERS:
                        raise _HTTPError(431, "too many trailer lines")
                    name = _header_field(bytes(line))[0].lower()
                    if name in _NOT_TRAILERS:  # RFC 9110 §6.5.1: never in a trailer
                        raise _HTTPError(400, f"{name} in a trailer")
            pos = newline + 1
        return pieces, pos


class _RequestReader:
    """One connection's incoming bytes in, whole requests out (h11's model: no I/O here).

    ``receive(data)`` adds bytes.  ``next_event()`` returns None while more bytes are needed,
    ``("head", request)`` once a head is parsed and a body follows, ``("request", request)``
    once a request is complete, with ``request.body`` a readable file; it raises _HTTPError for
    what cannot be served.  Bytes after a request stay in ``buffer`` for the next one.
    """

    def __init__(self, max_body, sink):
        self.buffer = bytearray()
        self.max_body = max_body
        self._sink_class = sink  # makes the file a body goes to: write(), size, finish() (§4)
        self._scanned = 0  # bytes of buffer searched for the end of a head
        self._request = self._decoder = self._sink = None
        self._head_line = None  # the request line of the request being read, for the log

    def receive(self, data):
        self.buffer += data

    def next_event(self):
        if self._request is None:
            return self._read_head()
        return self._read_body()

    def _read_head(self):
        buffer = self.buffer
        if not buffer:
            return None
        if buffer[:1] in (b"\r", b"\n"):
            empty = _EMPTY_LINES.match(buffer)  # RFC 9112 §2.2: ignored before a request line
            if empty:
                del buffer[:empty.end()]
                self._scanned = 0
        # A client that trickles a head a byte at a time must not make us scan it again each time.
        end = _HEAD_END.search(buffer, max(0, self._scanned - 2))
        if end is None:
            self._scanned = len(buffer)
            if len(buffer) > MAX_LINE and buffer.find(b"\n", 0, MAX_LINE + 1) < 0:
                raise _HTTPError(414, "request line too long")
            if len(buffer) > MAX_HEAD:
                raise _HTTPError(431, "request head too large")
            return None
        if end.start() > MAX_HEAD:  # however the bytes arrived
            raise _HTTPError(431, "request head too large")
        head = bytes(buffer[:end.start()])
        del buffer[:end.end()]
        self._scanned = 0
        self._head_line = head.split(b"\n", 1)[0]
        request = _parse_head(head)
        if request.length and request.length > self.max_body:
            raise _HTTPError(413, f"the request body is over {self.max_body} bytes")
        if not (request.length or request.chunked):
            request.body, self._head_line = io.BytesIO(), None
            return "request", request
        self._request = request
        self._decoder = _ChunkedDecoder() if request.chunked else _LengthDecoder(request.length)
        self._sink = self._sink_class()
        return "head", request

    def _read_body(self):
        pieces, used = self._decoder.decode(self.buffer)
        if used:
            del self.buffer[:used]
        if pieces:
            self._sink.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        # What a body costs beyond its bytes counts too: chunk extensions, trailers.
        if self._sink.size + self._decoder.extra > self.max_body:
            raise _HTTPError(413, f"the request body is over {self.max_body} bytes")
        if not self._decoder.done:
            return None
        request, self._request, self._head_line = self._request, None, None
        request.body, self._sink = self._sink.finish(), None
        return "request", request

    @property
    def line(self):
        """The request line being read (or what has come of it), for the log."""
        line = self._head_line if self._head_line is not None else self.buffer[:200].split(b"\n", 1)[0]
        return bytes(line[:200]).rstrip(b"\r").decode("latin-1")

    def close(self):
        """Drop a body being received (its temporary file, if any)."""
        if self._sink is not None:
            self._sink.finish().close()
            self._sink = None


_date_cache = [0, ""]


def _http_date():
    now = int(time.time())
    if _date_cache[0] != now:  # formatdate costs more than the rest of a small response
        _date_cache[:] = [now, formatdate(now, usegmt=True)]
    return _date_cache[1]


def _error_answer(status, reason, version="HTTP/1.1"):
    """The whole answer to a request we refuse ourselves; the connection closes after it."""
    phrase = http.HTTPStatus(status).phrase
    body = f"{status} {phrase}: {reason}\n".encode("utf-8", "replace")
    return (f"{version} {status} {phrase}\r\nDate: {_http_date()}\r\nServer: {SERVER_SOFTWARE}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode("latin-1") + body


# --- §4 Socket I/O with deadlines ---------------------------------------------------------
#
# Every connection socket is non-blocking for its whole life.  The engine reads with the
# selector; a thread that serves a request writes with send() and waits in poll() under the
# progress rule below.

class _Progress:
    """The one progress rule: MIN_PROGRESS_BYTES each way per ``timeout`` seconds.

    A peer that moves fewer bytes in a window is too slow -- its request gets 408, its response
    is cut off.  (nginx's client_body_timeout and send_timeout count between two reads or
    writes, so a client trickling a few bytes at a time holds a connection for ever; nginx can
    afford that, a thread cannot.)
    """

    __slots__ = ("timeout", "due", "_left")

    def __init__(self, timeout):
        self.timeout = timeout
        self.due = time.monotonic() + timeout  # when the current window's bytes are due
        self._left = MIN_PROGRESS_BYTES

    def advance(self, count):
        self._left -= count
        if self._left <= 0:
            self.due, self._left = time.monotonic() + self.timeout, MIN_PROGRESS_BYTES

    def wait_writable(self, sock):
        """Wait until ``sock`` takes more bytes; raise ConnectionAbortedError past ``due``."""
        left = self.due - time.monotonic()
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        if left <= 0 or not poller.poll(left * 1000):
            raise _TooSlow("the client stopped reading")


# struct ucred {pid_t pid; uid_t uid; gid_t gid;}: Linux only; elsewhere no peer credentials.
_PEERCRED = struct.Struct("3i") if hasattr(socket, "SO_PEERCRED") else None

class _TooSlow(ConnectionAbortedError):
    """A client that reads less than the progress rule asks: we cut it off."""


# What a send to a client that hung up (or stopped reading) raises.
_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def _send_all(sock, data, progress):
    """Send all of ``data`` on a non-blocking socket, under the progress rule."""
    with memoryview(data) as view:
        sent, size = 0, len(view)
        while sent < size:
            try:
                count = sock.send(view[sent:])
            except BlockingIOError:
                progress.wait_writable(sock)
                continue
            sent += count
            progress.advance(count)


def _send_file(sock, fd, offset, count, progress):
    """os.sendfile() under the progress rule (socket.sendfile() would wait up to the timeout for
    each bit of room, however small); return the bytes sent."""
    end, start = offset + count, offset
    while offset < end:
        try:
            sent = os.sendfile(sock.fileno(), fd, offset, min(end - offset, MIN_PROGRESS_BYTES))
        except BlockingIOError:
            progress.wait_writable(sock)
            continue
        if not sent:
            break  # the file is shorter than it was
        offset += sent
        progress.advance(sent)
    return offset - start


class _BodySink:
    """A request body as it is received: in memory up to BODY_IN_MEMORY bytes, beyond that in
    an anonymous temporary file.  ``finish()`` returns it as wsgi.input: a file positioned at
    its start that ends where the body ends (read, readline and iteration are io's, in C).

    The file is written unbuffered, so that a full disk shows at the write (503) and never
    later, in a flush outside the request's error path.
    """

    def __init__(self, budget=None):
        self.size = 0
        self._memory = bytearray()
        self._file = None
        self._budget = budget  # a _SpoolBudget, or None: no limit
        self._taken = 0  # bytes of it taken from the budget

    def write(self, data):
        self.size += len(data)
        if self._file is None:
            self._memory += data
            if len(self._memory) <= BODY_IN_MEMORY:
                return
            import tempfile  # only here: most bodies never need it
            try:
                self._file = tempfile.TemporaryFile(buffering=0)
            except OSError as exc:
                raise _HTTPError(503, f"no room for the request body ({exc.strerror})") from None
            data, self._memory = self._memory, None
        if self._budget is not None:
            if not self._budget.take(len(data)):
                raise _HTTPError(503, f"no room for the request body (--max-spool "
                                      f"{self._budget.limit} bytes are taken)")
            self._taken += len(data)
        try:
            with memoryview(data) as view:
                written = 0
                while written < len(view):
                    written += self._file.write(view[written:])
        except OSError as exc:
            raise _HTTPError(503, f"no room for the request body ({exc.strerror})") from None

    def finish(self):
        if self._file is None:
            return io.BytesIO(self._memory)
        self._file.seek(0)
        body = _SpooledBody(self._file)
        body.budget, body.spooled = self._budget, self._taken
        return body


class _SpooledBody(io.BufferedReader):
    """A spooled body as wsgi.input: closing it gives its bytes back to the spool budget."""

    budget, spooled = None, 0

    def close(self):
        if not self.closed and self.budget is not None:
            self.budget.give(self.spooled)
        super().close()


class _SpoolBudget:
    """The bytes of request bodies spooled to disk at once, server-wide, at most ``limit``:
    a few large uploads must not fill the temporary directory for everyone."""

    def __init__(self, limit):
        self.limit, self.taken, self._lock = limit, 0, threading.Lock()

    def take(self, count):
        with self._lock:
            if self.taken + count > self.limit:
                return False
            self.taken += count
            return True

    def give(self, count):
        with self._lock:
            self.taken -= count


def _free_spool_space():
    """Half the free space of the temporary directory (where bodies are spooled)."""
    import tempfile
    try:
        stats = os.statvfs(tempfile.gettempdir())
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize // 2


# --- §5 The engine ------------------------------------------------------------------------

def _malloc_trim():
    """glibc's malloc_trim(0): free memory back to the system (a no-op elsewhere)."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# A connection's states.  Waiting in the selector: _HEAD (awaiting a request head, or the rest
# of one), _BODY (head parsed, body arriving), _IDLE (between requests), _LINGER (answered an
# error, discarding what still comes).  Handled by a thread: _READY (a whole request, queued)
# and _SERVING (its app runs); a keep-alive connection may stay registered meanwhile.
_HEAD, _BODY, _IDLE, _LINGER, _READY, _SERVING, _CLOSED = (
    "head", "body", "idle", "linger", "ready", "serving", "closed")

# The moves between them: _Connection.move() makes every one and refuses any other, and the
# drawing in _Engine's docstring (and the README's) is checked against this table by a test.
_MOVES = {
    _HEAD: {_BODY, _READY, _LINGER, _CLOSED},
    _BODY: {_READY, _LINGER, _CLOSED},
    _READY: {_SERVING},
    _SERVING: {_IDLE, _HEAD, _LINGER, _CLOSED},
    _IDLE: {_HEAD, _CLOSED},
    _LINGER: {_CLOSED},
    _CLOSED: set(),
}

# Those that may give way to a new connection when every slot is taken (idle ones first).
_EVICTABLE = (_IDLE, _LINGER, _HEAD, _BODY)


def _move(self, state):
    """A connection's or a worker's move() (h11's way: the table of moves is the truth)."""
    if state not in self.MOVES[self.state]:
        raise RuntimeError(f"a {type(self).__name__[1:].lower()} cannot go from {self.state} "
                           f"to {state}")
    self.state = state


class _Connection:
    """One client connection, from accept() to close.  One thread owns it at a time: the leader
    while it waits in the selector or in the ready queue, the thread that serves its request."""

    MOVES, move = _MOVES, _move
    __slots__ = ("sock", "address", "peer", "reader", "state", "deadline", "progress", "served",
                 "request", "registered", "outcome", "writer")

    def __init__(self, sock, address, reader, deadline):
        self.sock, self.address, self.reader = sock, address, reader
        self.peer = None  # (pid, uid, gid) of a Unix peer, from SO_PEERCRED
        self.state = _HEAD  # accept() makes a connection that awaits its first head
        self.deadline = deadline  # for the head, or the idle connection, or the lingering close
        self.progress = None  # _Progress of the body being received
        self.served = 0  # requests answered on it
        self.request = None  # the complete request, from ready to answered
        self.registered = 0  # in the selector: for what (EVENT_READ, or EVENT_WRITE)
        self.outcome = None  # how its response ended, for the leader to act on
        self.writer = None  # the _SocketWriter of its latest response


class _Leadership:
    """How threads take work: which one leads -- the only one that may use the selector --,
    who serves a request that is ready, and when the lead changes hands.

    One lock guards all of it.  A thread is a follower (waiting in follow()), the leader, or
    serving a request.  Invariants:
    - at most one leader; a thread becomes leader only when ``leader`` is None, or when the
      leader is in an app (``busy_since`` is set) and the thread has just finished one;
    - the leader loses the lead only while it runs an app, so it never loses it while it uses
      the selector;
    - a thread that is not the leader gives connections to the leader through ``returned`` (to
      put back in the selector), never touching the selector.

    Who serves a ready request depends on how long requests take (``app_time``, a running
    mean).  When apps wait -- HAND_OVER_ABOVE or more, a database, a remote call -- a ready
    request never waits while a thread is idle: a follower is woken for each one queued, and
    the leader that takes one hands the lead to a follower before it runs the app (Schmidt's
    leader/followers), so the next request starts at once whatever the app does.  When apps
    are quick, the leader serves ready requests inline and keeps the lead: a hand-over costs
    about as much as a whole quick request, and under the GIL a second thread gains nothing
    while the app computes.  If a request served inline runs PROMOTE_AFTER seconds, the
    watchdog (``promote_if_stuck``, from the main thread) makes a follower lead and counts that
    request as one that waits.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self._work = threading.Condition(self.lock)  # followers wait here for work
        self.leader = None  # the leading thread's ident; None: the next follower takes over
        self.busy_since = None  # when the leader began running an app inline; None: it is not
        self.followers = 0
        self.ready = deque()  # connections with a whole request, in the order they came
        self.returned = deque()  # connections a non-leader hands back to the selector
        self.finished = False
        # Seconds a request takes, a running mean (weight 1/8).  It starts as if apps wait: the
        # first requests are handed over, until quick ones show that they need not be.
        self.app_time = HAND_OVER_ABOVE

    @property
    def apps_wait(self):
        return self.app_time >= HAND_OVER_ABOVE

    def follow(self, me):
        """Wait for work: (True, None) when this thread leads now, (False, conn) to serve a ready
        request without the lead (apps wait), (False, None) once the engine has finished.

        A thread that comes here from serving a request takes the lead at once from a leader
        that runs an app: the selector is not watched meanwhile.
        """
        with self.lock:
            if self.leader is not None and self.busy_since is not None:
                self.leader = self.busy_since = None
            self.followers += 1
            try:
                while not self.finished:
                    if self.leader is None:
                        self.leader = me
                        return True, None
                    if self.ready and self.apps_wait:
                        return False, self.ready.popleft()
                    self._work.wait()
                return False, None
            finally:
                self.followers -= 1

    def take_work(self, me, now):
        """For the leader: (still leading, a connection to serve or None, handed back ones).

        Handed-back connections come first and alone (the leader puts them in the selector,
        during which it must not lose the lead).  A connection to serve comes with the lead
        handed to a follower when apps wait (``still leading`` is then False), else with
        ``busy_since`` set: the leader serves it inline.
        """
        with self.lock:
            if self.leader != me or self.finished:
                return False, None, ()
            if self.returned:
                returns = list(self.returned)
                self.returned.clear()
                return True, None, returns
            if not self.ready:
                return True, None, ()
            conn = self.ready.popleft()
            if self.followers and self.apps_wait:
                self.leader = None
                self._work.notify()
                return False, conn, ()
            self.busy_since = now
            return True, conn, ()

    def end_app(self, me, took):
        """A request took ``took`` seconds.  Returns (this thread leads, apps have just turned
        quick -- the watchdog should watch closely from now on).

        A thread that served without the lead takes it here if it is vacant or the leader is in
        an app, as in follow(): it then finishes with its connection itself, with no hand-back.
        """
        with self.lock:
            waited = self.apps_wait
            self.app_time += (took - self.app_time) / 8
            turned_quick = waited and not self.apps_wait
            if self.leader == me or self.leader is None or self.busy_since is not None:
                self.leader, self.busy_since = me, None
                return True, turned_quick
            return False, turned_quick

    def resign(self, me):
        with self.lock:
            if self.leader == me:
                self.leader = self.busy_since = None
                self._work.notify()

    def idle(self):
        """Nothing happened for a while: the next requests are handed over until they show
        that they are quick (so that a burst of waiting requests after a pause needs no
        watchdog, and an idle watchdog may sleep)."""
        with self.lock:
            self.app_time = max(self.app_time, HAND_OVER_ABOVE)

    def promote_if_stuck(self, after, now):
        """Let a follower take the lead if the leader has run one app for ``after`` seconds."""
        with self.lock:
            since = self.busy_since
            if since is None or not self.followers or now - since < after:
                return
            self.app_time = max(self.app_time, now - since)
            self.leader = self.busy_since = None
            self._work.notify(1 + len(self.ready))  # a leader, and one for each ready request

    def queue_request(self, conn):
        """(The leader) queue a connection whose request is whole, for a thread to serve."""
        with self.lock:
            self.ready.append(conn)
            if self.apps_wait:
                self._work.notify()  # a follower serves it, while the leader goes on

    def return_connection(self, conn):
        """(A thread that is not the leader) give a served connection back to the leader, for
        the selector."""
        with self.lock:
            self.returned.append(conn)

    def finish(self):
        with self.lock:
            self.finished = True
            self._work.notify_all()


class _Engine:
    """Connections, the selector they wait in, and the threads that serve them.

    A thread's life (exactly ``threads`` of them; with the main thread, threads + 1 in all)::

        follower -> leader    the lead is vacant
        follower -> serving   apps wait and a request is ready: it runs it without the lead
        leader   -> serving   it takes a ready request: inline, keeping the lead, while apps are
                              quick, else it hands the lead to a follower first (if one waits);
                              after PROMOTE_AFTER in one app the watchdog demotes it (if a
                              follower waits to lead)
        serving  -> leader    back from the app: it still leads, or the lead is vacant, or the
                              leader is in an app (then nobody watches the selector)
        serving  -> follower  back from the app while another thread waits in the selector

    The leader loops: take back what others handed over, else take a ready request, else
    accept again if the last accept() found connections, else wait in the selector once and
    act on what it says -- accept (and read at once what came with the connection), read,
    decode, answer errors.  Who runs a ready request is _Leadership's rule: while requests take
    HAND_OVER_ABOVE or more on average (apps that wait), a follower is woken for each one and
    the leader hands the lead over before it runs one; while they are quick, the leader runs
    them inline and keeps the lead, and the main thread's watchdog hands it over when one runs
    PROMOTE_AFTER.

    A connection's life (``_MOVES``; accept() makes a connection in head)::

        head    -> body | ready | linger | closed   (a head; a whole request; an error; it left)
        body    -> ready | linger | closed          (the whole body; 408 or 413; it left)
        ready   -> serving                          (a thread runs the app)
        serving -> idle | head | linger | closed    (kept; pipelined bytes; close with bytes
                                                     unread; close, or abort)
        idle    -> head | closed                    (the next request; it left, or timed out)
        linger  -> closed                           (the client is done, or LINGER_AFTER_ERROR)

    Invariants: a connection is in the selector while it is head, body, idle or linger, and
    may stay there while ready or serving (a keep-alive request costs no unregister and
    register); only the leader touches the selector, so a thread that lost the lead hands such
    a connection back to the leader to finish with; ``open`` counts every connection from
    accept() to close and never exceeds ``max_connections`` (when full, the one that has waited
    longest in the selector gives way, idle ones first); an app runs only in one of the threads.
    """

    def __init__(self, server, poll_interval):
        self.server = server
        self.listener = server.socket
        self.listener.setblocking(False)  # several may accept from it: a restart, workers
        self.lead = _Leadership()
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.accepting = True  # the listener is in the selector
        self._accept_next = 0  # accept() calls to make before the next select() (see _lead)
        self._resume_accept_at = None  # after accept() ran out of descriptors
        self.waiting = OrderedDict()  # connections in the selector, longest there first
        self.open = 0  # under lead.lock
        self._all_closed = threading.Condition(self.lead.lock)
        self.stopping = self._stop_done = False
        self.serving = {}  # thread ident -> (since, request, connection) while it runs an app
        self._pipelined = deque()  # connections whose next request waits for a look around
        self._closed_since_trim = 0  # connections closed since the last _malloc_trim()
        self._new_sink = lambda: _BodySink(server.spool_budget)
        self._scan_every = poll_interval
        self._next_scan = 0.0
        self._unix = self.listener.family == socket.AF_UNIX

    # -- threads --

    def run_thread(self):
        """The body of each of the ``threads`` threads."""
        me = threading.get_ident()
        while True:
            leading, conn = self.lead.follow(me)
            if not leading and conn is None:
                return
            try:
                if conn is not None:
                    self._serve(conn, me)  # which may make this thread the leader
                self._lead(me)
            except Exception:  # a bug here must not take a thread, or the lead, with it
                self.server.handle_error(None, None)
            finally:
                self.lead.resign(me)

    def _lead(self, me):
        while True:
            leading, conn, returns = self.lead.take_work(me, time.monotonic())
            if conn is not None:
                self._serve(conn, me)  # leading or not (apps that wait: a follower leads)
            elif not leading:
                return
            elif returns:
                for back in returns:
                    self._rejoin(back)
            elif self._accept_next and self.accepting and not self.stopping:
                # The last accept() found connections: look for more straight away, as a
                # blocking accept() would, rather than in a select() (a client that reconnects
                # at once is served without our thread going to sleep).  Only so many times in
                # a row, so that the connections in the selector get their turn.
                self._accept_next -= 1
                self._accept()
            else:
                self._poll()

    def _serve(self, conn, me):
        conn.move(_SERVING)
        started = time.monotonic()
        self.serving[me] = (started, conn.request, conn)  # for stuck_report(), recycling
        try:
            outcome = self.server.serve_request(conn)
        except Exception:
            self.server.handle_error(conn.sock, conn.address)
            outcome = "abort"
        finally:
            del self.serving[me]
            still_leading, turned_quick = self.lead.end_app(me, time.monotonic() - started)
        if turned_quick:
            self.server.watch_closely()
        request, conn.request = conn.request, None
        request.body.close()
        if still_leading:
            self._after_response(conn, outcome)
        elif not conn.registered and (outcome == "abort" or outcome == "close"
                                      and not conn.reader.buffer):
            self._close(conn, reset=outcome == "abort")  # no selector needed: no hand-back
        else:  # the selector is the leader's
            conn.outcome = outcome
            self.lead.return_connection(conn)
            self.wake()

    def _after_response(self, conn, outcome):
        """(The leader) close the connection, or let it linger, or read its next request."""
        if outcome == "abort":
            self._close(conn, reset=True)
        elif outcome == "close" and not conn.reader.buffer:
            self._close(conn)
        elif outcome == "close":
            self._linger(conn)  # pipelined bytes we will not read: linger, or they reset
        else:
            conn.served += 1
            conn.move(_HEAD if conn.reader.buffer else _IDLE)
            wait = self.server.timeout if conn.reader.buffer else self.server.keep_alive
            if self.stopping:
                # The stop began after our answer's head said keep-alive: the client may be
                # sending its next request already, which gets IDLE_GRACE_AT_STOP as on an idle one.
                wait = min(wait, IDLE_GRACE_AT_STOP)
            conn.deadline = time.monotonic() + wait
            if conn.reader.buffer:
                # Its next request is here already (pipelined): it takes its turn behind what
                # the selector says now, or one client could keep a thread to itself.
                self._pipelined.append(conn)
            else:
                self._park(conn)

    def _rejoin(self, conn):
        """A connection handed back to the leader goes on: close, linger or read."""
        outcome, conn.outcome = conn.outcome, None
        self._after_response(conn, outcome)

    def wake(self):
        """Make the leader return from select() (safe from any thread, and in a signal handler)."""
        try:
            self._wake_w.send(b"!")
        except OSError:
            pass  # full (a wake-up is pending already) or closed (finished)

    # -- the selector (leader only) --

    def _poll(self):
        now = time.monotonic()
        if self.stopping and not self._stop_done:
            self._stop_accepting(now)
        elif not self.accepting and not self.stopping:
            self._maybe_resume_accepting(now)
        timeout = max(0.0, min(self._next_scan, self._resume_accept_at or self._next_scan) - now)
        events = self.selector.select(0 if self._pipelined else timeout)
        if not events and time.monotonic() - now >= IDLE_AFTER:
            self.lead.idle()
            if self._closed_since_trim >= TRIM_AFTER_CLOSED:
                # Many connections went (a flood of large heads, say): give what their buffers
                # took back to the system, which glibc's malloc keeps otherwise.
                self._closed_since_trim = 0
                _malloc_trim()
        lead = self.lead
        for key, _ in events:
            if lead.ready and lead.apps_wait and not lead.followers:
                # Apps wait, and every other thread is in one: this thread serves what it has
                # read now, and the next thread free reads the rest (the selector reports it
                # again), rather than one thread reading for all while its own turn waits.
                break
            conn = key.data
            if conn is not None:
                try:
                    if conn.registered == selectors.EVENT_WRITE:  # it reads its answers again
                        self._park(conn)
                        self._advance(conn)
                        continue
                    self._on_readable(conn)
                except Exception:  # a bug, or a fault we did not foresee: this one pays
                    self.server.handle_error(conn.sock, conn.address)
                    if conn.state in (_HEAD, _BODY, _IDLE, _LINGER):
                        self._close(conn, reset=True)
            elif key.fileobj is self.listener:
                self._accept()
            else:
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass
        for _ in range(len(self._pipelined)):
            conn = self._pipelined.popleft()
            if conn.state != _HEAD:
                continue  # read on since, or closed
            if not select.select([], [conn.sock], [], 0)[1]:
                # Its answers are not being read: serving the next would hold a thread in
                # send() for --timeout.  Read no more from it until it reads (its requests
                # wait in the kernel); past its deadline it gets 408, or is closed.
                self._park(conn, selectors.EVENT_WRITE)
                continue
            self._advance(conn)
        now = time.monotonic()
        if now >= self._next_scan:
            self._next_scan = now + (0.05 if self.stopping else self._scan_every)
            self._expire(now)

    def _park(self, conn, events=selectors.EVENT_READ):
        if not conn.registered:
            self.selector.register(conn.sock, events, conn)
            self.waiting[conn] = None
        elif conn.registered != events:
            self.selector.modify(conn.sock, events, conn)
        conn.registered = events

    def _unpark(self, conn):
        if conn.registered:
            self.selector.unregister(conn.sock)
            conn.registered = 0
            del self.waiting[conn]

    def _accept(self):
        """Accept what the backlog holds (64 at most), reading what came with each."""
        server = self.server
        accepted = 0
        for _ in range(64):  # then let the connections already here have their turn
            if self.open >= server.max_connections:
                # Full: a connection gives way only to one that is waiting to be accepted
                # (an idle one may be a proxy's pooled connection, about to be used).
                if not select.select([self.listener], [], [], 0)[0]:
                    break
                if not self._evict_one():
                    self._pause_accepting(None)  # until a slot is free
                    break
            try:
                sock, address = self.listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._evict_one():
                    continue  # out of descriptors counts as full: the longest-waiting gives way
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the connection stays in the backlog, and
                    # retrying at once would spin a core; wait for others to close.
                    server.log_line(f"accept() failed: {exc.strerror}; retrying", once=True)
                    self._pause_accepting(time.monotonic() + 0.1)
                    break
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that client gave up (or a firewall said no): the next one
                raise
            conn = self._admit(sock, address, time.monotonic() + server.timeout)
            if conn is None:
                continue
            accepted += 1
            if conn.state == _READY and (not self._accept_next or (
                    self.lead.apps_wait and not self.lead.followers)):
                # The first after a select(): serve it before another accept(), which would
                # find nothing when clients come one at a time, and cost this one latency.
                # So too when apps wait and every other thread is in one (see _poll).
                break
        # After that, accept in batches: measured with 16 clients that reconnect at once,
        # accepting all that wait, then serving them: 21k req/s; accept-serve-accept: 15k.
        self._accept_next = (self._accept_next or ACCEPTS_IN_A_ROW) if accepted else 0

    def _admit(self, sock, address, deadline):
        """A new connection: counted, checked (verify_request, --allow-uid), and read at once
        (a Unix client's request is usually there already).  None if it was refused."""
        server = self.server
        sock.setblocking(False)
        with self.lead.lock:
            self.open += 1
        reader = _RequestReader(server.max_request_body, self._new_sink)
        conn = _Connection(sock, address, reader, deadline)
        if self._unix and _PEERCRED is not None:
            conn.peer = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET,
                                                         socket.SO_PEERCRED, _PEERCRED.size))
        if not server.verify_request(sock, address):
            self._close(conn)
            return None
        if server.allow_uids is not None and conn.peer[1] not in server.allow_uids:
            # Refused now, not after its request: a disallowed user holds no slot.
            self._refuse_at_once(conn, _HTTPError(403, f"uid {conn.peer[1]} may not connect"))
            return None
        self._on_readable(conn)
        return conn

    def _pause_accepting(self, until):
        if self.accepting:
            self.selector.unregister(self.listener)
            self.accepting = False
        self._resume_accept_at = until

    def _maybe_resume_accepting(self, now):
        if self._resume_accept_at is not None and now < self._resume_accept_at:
            return
        if (self._resume_accept_at is None and self.open >= self.server.max_connections
                and not any(conn.state in _EVICTABLE for conn in self.waiting)):
            return  # full of connections being served: until one closes, or may give way
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.accepting, self._resume_accept_at = True, None

    def _evict_one(self):
        """Close a connection that waits in the selector, so that slots held by idle or
        unfinished connections never lock a new client out.  Of a Unix socket's peers, the
        user holding the most slots gives way first (a local process churning connections
        must not push out nginx's pooled ones); then an idle one before an unfinished one, and
        the one that has waited longest."""
        candidates = [conn for conn in self.waiting if conn.state in _EVICTABLE]
        if not candidates:
            return False
        if candidates[0].peer is not None:
            slots = {}
            for conn in self.waiting:
                if conn.peer is not None:
                    slots[conn.peer[1]] = slots.get(conn.peer[1], 0) + 1
            most = max(slots.get(conn.peer and conn.peer[1], 0) for conn in candidates)
            candidates = [conn for conn in candidates
                          if slots.get(conn.peer and conn.peer[1], 0) == most]
        victim = next((conn for conn in candidates if conn.state in (_IDLE, _LINGER)),
                      candidates[0])
        if victim.state in (_HEAD, _BODY):
            self.server.log_line("every connection slot is taken: closing the connection that "
                                 "has waited longest (--max-connections)", once=True)
        self._close(victim)
        return True

    def _on_readable(self, conn):
        if conn.state in (_READY, _SERVING):
            self._unpark(conn)  # more is coming (pipelined): read it after the response
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            self._park(conn)  # a new connection with nothing to read yet
            return
        except OSError:
            data = b""  # reset
        if conn.state == _LINGER:
            if not data:
                self._close(conn)
            return  # what a client sends after our error answer is dropped
        if not data:
            self._close(conn)  # it left: between requests, or giving up on one
            return
        if conn.state == _IDLE:
            conn.move(_HEAD)
            conn.deadline = time.monotonic() + self.server.timeout
        elif conn.state == _BODY:
            conn.progress.advance(len(data))
        conn.reader.receive(data)
        self._advance(conn)

    def _advance(self, conn):
        """Read what the connection's reader can make of its bytes: park it to wait for more,
        queue a whole request, or answer an error."""
        try:
            while True:
                event = conn.reader.next_event()
                if event is None:
                    self._park(conn)
                    return
                kind, request = event
                if conn.state != _BODY:
                    self.server.check_head(request, conn)  # raises 404
                if kind == "head":
                    conn.move(_BODY)
                    conn.progress = _Progress(self.server.timeout)
                    if request.expect_continue and not conn.reader.buffer:
                        try:
                            conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                        except OSError:
                            pass  # full or gone: the body read will tell
                    continue
                # It may stay in the selector meanwhile: a keep-alive connection then costs
                # no unregister and register per request.  (See _on_readable.)
                conn.move(_READY)
                conn.request = request
                self.lead.queue_request(conn)
                return
        except _HTTPError as error:
            self._refuse(conn, error)

    def _refuse(self, conn, error):
        """Answer an error ourselves, then close the connection lingering."""
        conn.reader.close()
        self.server.log_refusal(conn, error)
        try:
            conn.sock.send(_error_answer(error.status, str(error)))
        except OSError as exc:
            self._unpark(conn)
            self.server.log_line(f"client went away: {exc.strerror or exc}")
            self._close(conn)
            return
        self._linger(conn)

    def _refuse_at_once(self, conn, error):
        """Answer an error before the request came (a user --allow-uid refuses), then linger
        briefly, IDLE_GRACE_AT_STOP: a client whose request is on its way hears the answer instead
        of a reset, and holds its slot no longer than that (it gives way first when full)."""
        self.server.log_refusal(conn, error)
        try:
            conn.sock.send(_error_answer(error.status, str(error)))
        except OSError:
            self._close(conn)
            return
        self._linger(conn, IDLE_GRACE_AT_STOP)

    def _linger(self, conn, seconds=LINGER_AFTER_ERROR):
        """Half-close and discard what still arrives, for ``seconds`` at most: a client still
        sending its request hears our answer instead of a reset."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._unpark(conn)
            self._close(conn)
            return
        conn.move(_LINGER)
        conn.deadline = time.monotonic() + seconds
        self._park(conn)

    def _expire(self, now):
        for conn in [conn for conn in self.waiting if conn.state not in (_READY, _SERVING) and
                     (conn.progress.due if conn.state == _BODY else conn.deadline) <= now]:
            if conn.state in (_IDLE, _LINGER) or (conn.state == _HEAD and not conn.reader.buffer
                                                  and (conn.served or self.stopping)):
                self._close(conn)  # nothing was asked of us
            else:
                self._refuse(conn, _HTTPError(408, "the request did not arrive in time"))

    def _close(self, conn, reset=False):
        """Close a connection (from any thread: out of the selector unless the leader closes)."""
        conn.move(_CLOSED)
        if conn.registered:
            self._unpark(conn)
        if conn.reader is not None:
            conn.reader.close()
        try:
            if reset and not self._unix:
                # A reset, not a FIN: the client (curl, nginx) sees the truncation as an error.
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.sock.close()
        except OSError:
            pass
        self._closed_since_trim += 1  # (a count for a hint: no lock)
        with self.lead.lock:
            self.open -= 1
            if not self.open:
                self._all_closed.notify_all()
        if not self.accepting:
            self.wake()  # a slot is free: the leader may accept again

    def stuck_report(self, now, after):
        """A line to log when every thread has run one app for ``after`` seconds, else None.

        --timeout bounds I/O, not the app: a thread cannot be killed (gunicorn kills a stuck
        worker process), so a stuck app is at least made visible.
        """
        serving = list(self.serving.values())
        if len(serving) < self.server.threads:
            return None
        since, request, _ = min(serving, key=lambda item: item[0])
        if now - since < after:
            return None
        return (f"all {len(serving)} threads have been busy for more than {after:g} s; the "
                f"oldest request, {request.method} {request.path}, for {now - since:.0f} s")

    # -- stopping --

    def begin_stop(self):
        """Stop accepting (the leader does it), close idle connections after IDLE_GRACE_AT_STOP,
        answer every request with Connection: close.  Safe from any thread but a signal
        handler."""
        self.stopping = True
        self.wake()

    def _stop_accepting(self, now):
        if not self.server.leave_backlog:
            # Serve what is queued already (a Unix socket's file is gone: nothing new comes).
            while True:
                try:
                    sock, address = self.listener.accept()
                except OSError:
                    break
                self._admit(sock, address, now + IDLE_GRACE_AT_STOP)
        # An inherited socket stays open and listening: systemd keeps it for the next start.
        if self.accepting:
            self.selector.unregister(self.listener)
            self.accepting = False
        if not self.server.listen_address.inherited:
            self.listener.close()
        for conn in list(self.waiting):
            if conn.state in (_IDLE, _HEAD) and not conn.reader.buffer:
                # A proxy may be sending a request on its idle connection right now: closing
                # would reset it (nginx retries, and logs an error).  It has IDLE_GRACE_AT_STOP to
                # arrive, and is answered with Connection: close.
                conn.deadline = min(conn.deadline, now + IDLE_GRACE_AT_STOP)
        with self.lead.lock:  # only now: what was accepted above counts in ``open`` already
            self._stop_done = True

    def watch(self, wake, every, tick):
        """The main thread while it serves: the watchdog.  While apps are quick, the leader
        that turns out to be in one that waits loses the lead after PROMOTE_AFTER; a line says
        when every thread has been in one app for --timeout.  Until ``tick()`` returns True."""
        poller = select.poll()
        poller.register(wake, select.POLLIN)
        next_stuck_check = time.monotonic()
        while True:
            if poller.poll(1000 * (every if self.lead.apps_wait else PROMOTE_AFTER)):
                wake.recv(4096)
            now = time.monotonic()
            self.lead.promote_if_stuck(PROMOTE_AFTER, now)
            if now >= next_stuck_check:
                stuck = self.stuck_report(now, self.server.timeout)
                next_stuck_check = now + (60.0 if stuck else 1.0)
                if stuck:
                    self.server.log_line(stuck)
            if tick():
                return

    def wait_closed(self, deadline, tick):
        """Wait until the stop is done and every connection is closed, or until ``deadline``;
        the watchdog and ``tick()`` run every PROMOTE_AFTER meanwhile; a stop at once (a
        second signal) ends the wait early."""
        with self.lead.lock:
            while (self.open or not self._stop_done) and time.monotonic() < deadline:
                self._all_closed.wait(min(PROMOTE_AFTER, max(0.0, deadline - time.monotonic())))
                self.lead.lock.release()
                try:
                    self.lead.promote_if_stuck(PROMOTE_AFTER, time.monotonic())
                    tick()
                    if self.server.stopped_at_once:
                        return
                finally:
                    self.lead.lock.acquire()

    def finish(self, threads, deadline):
        """End the threads (those still in an app are daemons: they end with the process)."""
        self.lead.finish()
        self.wake()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not any(thread.is_alive() for thread in threads):
            self.selector.close()
            self._wake_r.close()
            self._wake_w.close()


# --- §6 wsgiref glue ----------------------------------------------------------------------

# Control characters, and what str.splitlines() also takes for a line end (U+2028, U+2029),
# are escaped in the log: a request or a command's stderr cannot forge a log line.
_LOG_ESCAPES = {c: f"\\x{c:02x}" for c in list(range(0x20)) + list(range(0x7f, 0xa0))}
_LOG_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029", ord("\\"): "\\\\"})


class WSGIServer(simple_server.WSGIServer):
    """wsgiref's WSGIServer on any ListenAddress, served by exactly ``threads`` threads.

    The engine (§5) accepts, reads and queues requests; this class holds the settings
    (DEFAULTS, as keywords) and the policy.  For the caller: ``serve_forever()``,
    ``shutdown()``, ``request_stop()``, ``server_close()``, ``set_app()``/``get_app()``, and
    use as a context manager; ``leave_backlog`` (True for fd:N) leaves the connections queued
    at a stop to the socket's other listeners instead of serving them first.  May be
    overridden: ``verify_request(request, client_address)`` (False closes a new connection
    unanswered), ``check_head(request, connection)`` (raise to refuse a request before its
    body is read), ``serve_request(connection)``, ``handle_error(request, client_address)``,
    ``service_actions()`` (called by serve_forever() every 0.1 s, every 10 ms while apps are
    quick or it stops; a worker's server reads its master's word there, and cuts requests
    that ran past --request-timeout).  socketserver's
    one-connection-per-call entry points ``handle_request()``, ``process_request()`` and
    ``finish_request()`` do not fit an engine that keeps connections: they raise
    NotImplementedError.
    """

    request_queue_size = 1024  # wsgiref's 5 makes nginx answer 502 under the lightest load

    def __init__(self, address, RequestHandlerClass=None, **settings):
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown keyword(s): {', '.join(sorted(unknown))}")
        for name in ("workers",) + _RECYCLING:
            if name in settings:
                raise TypeError(f"{name} is serve()'s keyword: a WSGIServer is one process")
        settings = _checked(dict(DEFAULTS, **settings))
        self.listen_address = address if isinstance(address, ListenAddress) else ListenAddress(address)
        allow_uids = settings["allow_uids"]
        self.allow_uids = None if allow_uids is None else {_user_id(user) for user in allow_uids}
        # TCPServer.__init__ would make a socket of one fixed family; the address makes ours.
        socketserver.BaseServer.__init__(self, str(self.listen_address),
                                         RequestHandlerClass or WSGIRequestHandler)
        self.socket = self.listen_address.listen(settings["mode"], settings["group"],
                                                 self.request_queue_size)
        self.address_family = self.socket.family
        self.server_address = self.socket.getsockname()
        if self.listen_address.kind == "unix":
            # The socket was bound in a private directory and linked into place (see
            # ListenAddress): its own name is that first path, which no longer exists.
            self.server_address = self.listen_address.path
        if self.address_family == socket.AF_UNIX:
            # No host name to look up; wsgiref.util.request_uri() builds sane URLs from these.
            self.server_name, self.server_port = "localhost", 80
        else:
            self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()
        self.proxy_headers = settings["proxy_headers"]
        self.forwarded_allow_ips = _ip_addresses(settings["forwarded_allow_ips"])
        for name in ("script_name", "threads", "timeout", "keep_alive", "graceful_timeout",
                     "max_connections", "max_request_body", "access_log"):
            setattr(self, name, settings[name])
        spool = settings["max_spool"]
        spool = _free_spool_space() if spool is None else spool
        self.spool_budget = None if spool is None else _SpoolBudget(spool)
        # Wakes the main thread: a stop was asked for, or the watchdog should look again.
        self._main_r, self._main_w = socket.socketpair()
        self._main_w.setblocking(False)
        self._stop_requested = self.stopped_at_once = self._reopen_requested = False
        self._stopped = threading.Event()
        self._engine = None
        self._logged = set()  # messages said once
        self._refusals_since, self._refusals_logged, self._refusals_unlogged = 0.0, 0, 0
        self.on_ready = None  # see serve_forever()
        # At a stop, leave the connections queued in the backlog to whoever else listens on
        # the socket (systemd's next start), rather than serve them first.
        self.leave_backlog = self.listen_address.inherited
        if self.allow_uids is not None and (self.address_family != socket.AF_UNIX
                                            or _PEERCRED is None):
            self.server_close()
            raise ServeError(f"{self}: --allow-uid needs a Unix socket, and SO_PEERCRED (Linux)")
        room = _descriptor_room(self.threads)
        if room is not None and self.max_connections > room:
            self.log_line(f"--max-connections lowered from {self.max_connections} to {room}: "
                          f"the limit on open files is {room + _descriptors_kept(self.threads)}"
                          f" (raise LimitNOFILE=, or ulimit -n)")
            self.max_connections = max(1, room)

    def __str__(self):
        return str(self.listen_address)

    def server_close(self):
        """Remove the socket file, if it is still ours, and close the listening socket."""
        self.listen_address.remove_socket_file()  # (while it listens: see there)
        super().server_close()
        self._main_r.close()
        self._main_w.close()

    def _disown(self):
        """In a forked child: close its copies of our descriptors, and leave the socket
        file -- the parent's -- alone."""
        self.listen_address.disown()
        for sock in (self.socket, self._main_r, self._main_w):
            sock.close()

    def request_stop(self, at_once=False):
        """Ask serve_forever() to stop, without waiting.  Safe in a signal handler.

        Gracefully, or ``at_once``: requests in flight are cut (a second Ctrl-C).
        """
        self.stopped_at_once = self.stopped_at_once or at_once
        self._stop_requested = True
        self._wake_main()

    def _wake_main(self):
        """Make the main thread look at its flags again (safe in a signal handler)."""
        try:
            self._main_w.send(b"!")
        except OSError:
            pass  # a wake-up is pending already, or the server is closed

    def shutdown(self):
        """Stop serve_forever() and wait until it has returned (call it from another thread)."""
        self.request_stop()
        self._stopped.wait()

    def request_reopen(self):
        """Ask serve_forever() to reopen the --access-log file (SIGUSR1).  Safe in a signal
        handler: the main thread reopens it."""
        self._reopen_requested = True
        self._wake_main()

    def reopen_logs(self):
        """Reopen the access log file at its path, and say so in a line."""
        stream = self.access_log
        if not hasattr(stream, "reopen"):
            self.log_line("SIGUSR1: no --access-log file to reopen")
            return
        try:
            stream.reopen()
        except OSError as exc:
            self.log_line(f"SIGUSR1: cannot reopen {stream.path}: {exc.strerror}; writing on "
                          f"to the file it had open")
            return
        self.log_line(f"SIGUSR1: reopened {stream.path}")

    @property
    def stopping(self):
        return self._stop_requested

    def serve_forever(self, poll_interval=1.0):
        """Serve until shutdown() or request_stop(), then stop gracefully.

        Runs ``threads`` threads (§5); this thread runs the engine's watchdog (_Engine.watch).
        ``poll_interval`` is how often timed-out connections are looked for.  Once the threads
        serve, it calls ``on_ready()`` if set (serve() says so on stderr then).  On stop: no new
        connections, idle ones close, requests in flight get ``graceful_timeout`` seconds.
        """
        self._stopped.clear()
        # bpo-44434 (CPython 3.8, 3.9.0-3.9.5): the first thread that ends makes CPython load
        # libgcc_s; with every descriptor taken by clients by then, that load fails and the
        # process aborts.  A thread that ends now loads it while descriptors are free.
        first = threading.Thread(target=lambda: None)
        first.start()
        first.join()
        engine = self._engine = _Engine(self, poll_interval)
        threads = [threading.Thread(target=engine.run_thread, name=f"{PROG}-{number}", daemon=True)
                   for number in range(self.threads)]
        try:
            for thread in threads:
                thread.start()
        except RuntimeError as exc:
            engine.finish([], 0)
            raise ServeError(f"{self}: cannot start {self.threads} threads ({exc}); lower "
                             f"--threads, or raise the limit on processes") from None
        if self.on_ready is not None:
            self.on_ready()
        try:
            engine.watch(self._main_r, min(poll_interval, 0.1), self._look_around)
            stop_began = time.monotonic()
            if self.listen_address.kind == "unix":
                # Without its file no one can connect any more (nginx gets its 502 at once),
                # yet what is already in the backlog can still be accepted and served.
                self.listen_address.remove_socket_file()
            engine.begin_stop()
            engine.wait_closed(stop_began + self.graceful_timeout, self._look_around)
        finally:
            self._stop_requested = True
            engine.finish(threads, time.monotonic() + 0.1)
            self._stopped.set()

    def _look_around(self):
        """The main thread's turn, each time it wakes (see _Engine.watch): True to stop."""
        if self._reopen_requested:
            self._reopen_requested = False
            self.reopen_logs()
        self.service_actions()  # (a worker's --request-timeout holds while it stops too)
        return self._stop_requested

    def watch_closely(self):
        """Wake the main thread, whose watchdog looks at the leader every PROMOTE_AFTER seconds
        from now on (the engine calls it when apps have turned quick)."""
        self._wake_main()

    def handle_request(self, *args):
        raise NotImplementedError("wsgi_unix serves with serve_forever(); it keeps connections "
                                  "open, so there is no one-request step")

    process_request = finish_request = handle_request

    def check_head(self, request, connection):
        """Refuse a request from its head alone (before its body is read): raise _HTTPError."""
        prefix = self.script_name
        if prefix and request.path != prefix and not request.path.startswith(prefix + "/"):
            raise _HTTPError(404, f"not under {prefix}")

    def serve_request(self, connection):
        """Run the app for ``connection.request``; return "keep", "close" or "abort"."""
        handler = self.RequestHandlerClass(connection.sock, connection.address, self, connection)
        return handler.outcome

    def handle_error(self, request, client_address):
        """socketserver's traceback on stderr, through the log writer: it never raises (a
        thread that logs an error must not die of a log that cannot be written)."""
        _log_write(sys.stderr, f"{'-' * 40}\nException occurred during processing of request "
                               f"from {client_address}\n{traceback.format_exc()}{'-' * 40}\n")

    def log_refusal(self, connection, error):
        """One log line for a request we refused ourselves (even without access log), at most
        REFUSALS_LOGGED a second: a client refused in a loop must not fill the disk."""
        now = time.monotonic()  # (only the leader refuses: no lock)
        if now - self._refusals_since >= 1.0:
            unlogged, self._refusals_unlogged = self._refusals_unlogged, 0
            self._refusals_since, self._refusals_logged = now, 0
            if unlogged:
                self.log_line(f"{unlogged} more refusals were not logged (more than "
                              f"{REFUSALS_LOGGED} a second)")
        if self._refusals_logged >= REFUSALS_LOGGED:
            self._refusals_unlogged += 1
            return
        self._refusals_logged += 1
        line = connection.reader.line
        client = "-" if self.address_family == socket.AF_UNIX else connection.address[0]
        self.log_line(f'{client} - - [{_log_time()}] "{line}" {error.status} - {error}',
                      prefix=False)

    def log_line(self, message, once=False, prefix=True):
        if not (once and message in self._logged):
            if once and len(self._logged) < 10000:  # (bounded: messages may name routes)
                self._logged.add(message)
            message = message.translate(_LOG_ESCAPES)
            _log_write(sys.stderr, f"{_LOG_PREFIX}: {message}\n" if prefix else message + "\n")


# In a quoted field of an access line, " and \ are escaped too (as nginx does): a client
# cannot end the field and write one of its own.
_LOG_FIELD_ESCAPES = {**_LOG_ESCAPES, ord('"'): "\\x22"}


def _log_field(text, most):
    """A field of an access line: escaped, and cut to ``most`` bytes of UTF-8 (the whole line
    stays under PIPE_BUF, 4,096 bytes, so that it is written whole)."""
    text = text.translate(_LOG_FIELD_ESCAPES)
    if len(text) * 4 <= most:
        return text  # (the usual case: short enough whatever it holds)
    data = text.encode("utf-8", "replace")
    return text if len(data) <= most else data[:most - 3].decode("utf-8", "ignore") + "..."


def _log_time():
    """The log's time as nginx writes it: local time with its zone, 29/Nov/2026:15:07:06 +0000."""
    now = time.localtime()
    return "%02d/%3s/%04d:%02d:%02d:%02d %s" % (
        now.tm_mday, simple_server.WSGIRequestHandler.monthname[now.tm_mon], now.tm_year,
        now.tm_hour, now.tm_min, now.tm_sec, time.strftime("%z", now))


def _will_block():
    """``environ["wsgi_unix.will_block"]``: apps called it before waiting on something, to hand
    the lead over at once; the engine now hands over by itself (see _Leadership).  A no-op."""


class WSGIRequestHandler(simple_server.WSGIRequestHandler):
    """wsgiref's request handler for a request the engine has read whole, Unix peers made sane.

    Constructed per request as ``(socket, client_address, server, connection)``; ``handle()``
    builds the environ and runs the app through ServerHandler, and leaves ``outcome``: "keep"
    (the connection may carry another request), "close" or "abort".  Header names with ``_``
    are dropped, so that ``X_Auth_User`` cannot pose as ``X-Auth-User``.  A Unix peer has no
    address: REMOTE_ADDR is ``""`` and the access log shows ``-``.
    """

    server_version = SERVER_SOFTWARE
    outcome = "close"

    def __init__(self, request, client_address, server, connection=None):
        self.conn = connection
        super().__init__(request, client_address, server)

    def setup(self):
        # StreamRequestHandler.setup wraps the socket in buffered files; the request is read
        # already, and the response goes out through ServerHandler.
        self.connection = self.request

    def finish(self):
        pass

    def handle(self):
        """Run the application through ServerHandler for the request the engine read."""
        request = self.conn.request
        self.command, self.path, self.request_version = request.method, request.target, request.version
        self.requestline, self.request_headers = request.line, request.headers
        server = self.server
        self.close_connection = not (request.keep_alive and server.keep_alive and not server.stopping)
        self.started = time.monotonic()
        self.environ = self.get_environ()  # (kept for the access log)
        writer = self.conn.writer = _SocketWriter(self.connection, server.timeout)
        handler = ServerHandler(request.body, writer, self.get_stderr(), self.environ,
                                multithread=True)
        handler.request_handler = self  # wsgiref's back-pointer, for logging
        handler.http_version = "1.1" if request.version == "HTTP/1.1" else "1.0"
        handler.run(server.get_app())
        self.outcome = "abort" if handler.aborted else "close" if self.close_connection else "keep"

    def get_environ(self):
        """The request's WSGI environ (CGI keys only; ServerHandler adds the wsgi.* keys)."""
        request, server = self.conn.request, self.server
        env = server.base_environ.copy()
        env["SERVER_PROTOCOL"] = self.request_version
        env["SERVER_SOFTWARE"] = self.server_version
        env["REQUEST_METHOD"] = self.command
        env["wsgi_unix.socket"] = self.connection  # to watch for a client that went away
        env["wsgi_unix.will_block"] = _will_block  # (for apps that call it: no longer needed)
        path = request.path
        if server.script_name:
            env["SCRIPT_NAME"], path = server.script_name, path[len(server.script_name):]
        env["PATH_INFO"] = path
        env["QUERY_STRING"] = request.query
        if server.address_family == socket.AF_UNIX:
            env["REMOTE_ADDR"] = ""
            if self.conn.peer is not None:
                env["wsgi_unix.peer"] = self.conn.peer
        else:
            env["REMOTE_ADDR"], env["REMOTE_PORT"] = self.client_address[0], str(self.client_address[1])
        for name, value in self.request_headers:
            if "_" in name:
                continue  # CGI maps "-" to "_": a name with "_" would pose as its "-" twin
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            if key in env and env[key] and key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                env[key] += "," + value
            else:
                env[key] = value
        trusted = (server.address_family == socket.AF_UNIX or
                   _unmapped(self.client_address[0]) in server.forwarded_allow_ips)
        if server.proxy_headers and trusted:
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
        """One access-log line in the Combined Log Format (nginx's and gunicorn's), then the
        request's duration in seconds: the client as the app saw it (REMOTE_ADDR after proxy
        headers; ``-`` for a Unix peer without them), referer and user agent."""
        stream = self.server.access_log
        if not stream:
            return
        environ = getattr(self, "environ", {})
        if stream is True:
            stream = sys.stderr
        line = '%s - - [%s] "%s" %s %s "%s" "%s" %.3f\n' % (
            _log_field(environ.get("REMOTE_ADDR") or "-", 100), _log_time(),
            _log_field(self.requestline, 2600), code, size,
            _log_field(environ.get("HTTP_REFERER", "-"), 500),
            _log_field(environ.get("HTTP_USER_AGENT", "-"), 500),
            time.monotonic() - getattr(self, "started", time.monotonic()))
        _log_write(stream, line)  # under PIPE_BUF: one write(), whole, beside other workers'

    def log_message(self, format, *args):
        """One line on stderr, with control characters escaped (no log injection)."""
        message = (format % args).translate(_LOG_ESCAPES)
        _log_write(sys.stderr, f"{self.address_string()} - - [{_log_time()}] {message}\n")


class _SocketWriter:
    """ServerHandler's stdout: the response goes out on the non-blocking socket under the
    progress rule (§4), which starts with the response.  Another thread may cut() it."""

    def __init__(self, sock, timeout):
        self.sock = sock
        self.progress = _Progress(timeout)
        self.sent = 0  # bytes that went out whole
        self.stopped = False  # cut: what the app writes from now on fails
        self.lock = threading.Lock()  # held while writing, so that a cut never splits a write

    def write(self, data):
        with self.lock:
            if self.stopped:
                raise BrokenPipeError(errno.EPIPE, "the response was cut (--request-timeout)")
            _send_all(self.sock, data, self.progress)
            self.sent += len(data)

    def cut(self, answer):
        """(From another thread) end this response: ``answer`` goes out instead if nothing of
        it has, then the connection is shut down.  True if ``answer`` went out."""
        answered = False
        if self.lock.acquire(blocking=False):  # else a write is under way: the head is out
            try:
                if not self.sent and not self.stopped:
                    try:
                        answered = self.sock.send(answer) == len(answer)
                    except OSError:
                        pass
            finally:
                self.stopped = True
                self.lock.release()
        self.stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed by the client already
        return answered

    def flush(self):
        pass


_STATUS = re.compile(r"[1-9]\d\d [^\x00-\x1f\x7f\u0100-\U0010ffff]*\Z")  # latin-1 text
_HEADER_NAME = re.compile(_TOKEN.pattern.decode())  # the request's token rule, for str
_HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]|[^\x00-\xff]")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade"}  # wsgiref.util.is_hop_by_hop's


class ServerHandler(simple_server.ServerHandler):
    """wsgiref's ServerHandler, with nothing from ``os.environ`` and HTTP/1.1 framing.

    wsgiref copies the whole process environment into every request (database passwords,
    and ``HTTPS=on``, which changes wsgi.url_scheme); here the environ holds the request and
    the server's keys only.  How a response is framed, decided when its head goes out:

    - a Content-Length from the app, or one we can count (a list of bytes, or a response to
      HTTP/1.0 that ends within FIRST_BUFFER bytes, held back until then): the connection
      may be kept; a body that stops short of its length aborts the connection;
    - else, to HTTP/1.1, ``Transfer-Encoding: chunked``: the last chunk is sent only when the
      app finished without error;
    - else (HTTP/1.0) the body ends with the connection.
    HEAD, 1xx, 204 and 304 responses carry no body and no framing of ours.  An app that fails
    after the head went out gets the connection aborted (a reset on TCP), so that the
    truncation shows: curl exits non-zero and nginx does not cache.
    """

    os_environ = {}
    server_software = SERVER_SOFTWARE
    http_version = "1.0"  # set per request to the client's
    aborted = False  # the response could not be finished: the connection must not be reused
    _started = False  # the head went out (or is about to): too late for a 500
    _head = b""  # the response head, sent with the first body bytes
    _head_size = 0
    _held = None  # body blocks held back to count them (HTTP/1.0, no Content-Length)
    _held_size = 0  # their bytes
    _chunked = _no_body = False
    _length = None  # the Content-Length the body must match
    _body_sent = 0
    _names = frozenset()  # the response header names, lower case (see cleanup_headers)

    def run(self, application):
        # BaseHandler.run, copied to log a client that went away (wsgiref says nothing).
        try:
            self.setup_environ()
            self.result = application(self.environ, self.start_response)
            self.finish_response()
        except _DISCONNECTS as exc:
            self._client_went_away(exc)
        except:  # noqa: E722 -- as wsgiref: whatever the app raised, answer 500
            try:
                self.handle_error()
            except _DISCONNECTS as exc:  # before it could hear of the error
                self._client_went_away(exc)
            except:  # noqa: E722
                self.aborted = True
                self.close()
                raise

    def _client_went_away(self, exc):
        """One access-log line with nginx's 499 ("client closed request"), not an error; a
        client we cut off for reading too slowly is an error too, and keeps its status.

        (The app's iterable is closed already: by finish_response(), or it never came.)
        """
        self.aborted = True
        code = 499
        if isinstance(exc, _TooSlow):
            self.request_handler.log_error("%s: cut off after %d bytes", exc, self.bytes_sent)
            code = self._started and self.status and self.status[:3] or 499
        # The body bytes that went out (nginx's $body_bytes_sent), not what the app gave.
        sent = max(0, getattr(self.stdout, "sent", self.bytes_sent) - self._head_size)
        self.request_handler.log_request(code, sent)

    def setup_environ(self):
        super().setup_environ()
        self.environ["wsgi.input_terminated"] = True  # wsgi.input ends where the body ends

    def start_response(self, status, headers, exc_info=None):
        # BaseHandler.start_response, with its assert checks (gone under -O, and they let CR/LF
        # through) replaced: refuse anything that could split the response or break its
        # framing, whatever the interpreter's flags.
        if exc_info:
            try:
                if self._started:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # no reference cycle
            self._held = None  # the body held back belonged to the response it replaces
        elif self.headers is not None:
            raise AssertionError("start_response() called twice without exc_info")
        if not (type(status) is str and _STATUS.match(status)):
            raise ValueError(f"malformed status {status!r}")
        if status[0] == "1":  # the client would wait on for the final response
            raise ValueError(f"status {status!r}: a WSGI response needs a final status")
        lengths = set()
        for name, value in headers:
            if not (type(name) is str and type(value) is str and _HEADER_NAME.match(name)
                    and not _HEADER_VALUE_BAD.search(value)):
                raise ValueError(f"malformed response header {name!r}: {value!r}")
            lower = name.lower()
            if lower in _HOP_BY_HOP:
                raise ValueError(f"hop-by-hop header {name!r}: the server frames the response")
            if lower == "content-length":
                if not (value.isascii() and value.isdigit()):
                    raise ValueError(f"malformed Content-Length {value!r}")
                lengths.add(int(value))
        if len(lengths) > 1:  # RFC 9110 §8.6: clients and proxies would not agree on the body
            raise ValueError(f"Content-Length given twice: {sorted(lengths)}")
        self.status, self.headers = status, self.headers_class(headers)
        if lengths and len(self.headers.get_all("Content-Length")) > 1:
            self.headers["Content-Length"] = str(lengths.pop())  # the same twice: once
        return self.write

    def log_exception(self, exc_info):
        # BaseHandler.log_exception, through the log writer (which never raises).
        _log_write(self.get_stderr(), "".join(traceback.format_exception(
            exc_info[0], exc_info[1], exc_info[2], limit=self.traceback_limit)))

    def handle_error(self):
        """Answer 500 if nothing went out yet; else abort the connection (and log it)."""
        if not self._started:
            self._held = None  # what the app wrote before it failed is not the answer
            return super().handle_error()
        self.log_exception(sys.exc_info())
        self.aborted = True
        if self.status is not None:  # (wsgiref before 3.9 has closed and logged already)
            self.request_handler.log_request(self.status.split(" ", 1)[0], self.bytes_sent)

    def write(self, data):
        # BaseHandler.write, with the first blocks held back when they may yet be counted.
        if type(data) is not bytes:
            raise TypeError(f"write() argument must be bytes, not {type(data).__name__}")
        if not self.status:
            raise AssertionError("write() before start_response()")
        if not self.headers_sent:
            if self._holding():
                self._held.append(data)
                self._held_size += len(data)
                if self._held_size < FIRST_BUFFER:
                    return
                data, self._held = b"".join(self._held), None
            self.bytes_sent = len(data)
            self.send_headers()
        else:
            self.bytes_sent += len(data)
        self._write(data)

    def _holding(self):
        """Whether the first blocks are held back to be counted: a response to HTTP/1.0 with no
        Content-Length, from an iterable of unknown length (or from write())."""
        if (self._held is None and self.http_version == "1.0"
                and not isinstance(self.result, (list, tuple))
                and "Content-Length" not in self.headers):
            self._held = []
        return self._held is not None

    def cleanup_headers(self):
        # BaseHandler.cleanup_headers, with the header names lowered once (each lookup in a
        # wsgiref Headers object lowers every name again).
        self._names = {name.lower() for name, _ in self.headers.items()}
        if "content-length" not in self._names:
            self.set_content_length()

    def set_content_length(self):
        # wsgiref counts a one-block list; any list of bytes can be counted before it is sent.
        result = self.result
        if isinstance(result, (list, tuple)) and all(type(block) is bytes for block in result):
            self.headers["Content-Length"] = str(sum(map(len, result)))
            self._names.add("content-length")

    def send_headers(self):
        # BaseHandler.send_headers and send_preamble, joined into one buffer, with our framing.
        self.cleanup_headers()
        self.headers_sent = self._started = True
        code, headers, names = int(self.status[:3]), self.headers, self._names
        self._no_body = self.environ["REQUEST_METHOD"] == "HEAD" or code < 200 or code in (204, 304)
        if "content-length" in names and (code < 200 or code == 204):
            del headers["Content-Length"]
            names.discard("content-length")
        if "content-length" in names:
            self._length = int(headers["Content-Length"])
        elif not self._no_body:
            if self.http_version == "1.1":
                headers["Transfer-Encoding"] = "chunked"
                self._chunked = True
            else:
                self.request_handler.close_connection = True  # the body ends with the connection
        if self.request_handler.server.stopping:
            self.request_handler.close_connection = True  # SIGTERM came while the app ran
        if self.request_handler.close_connection:
            headers["Connection"] = "close"
        elif self.http_version == "1.0":
            headers["Connection"] = "keep-alive"
        lines = [f"HTTP/{self.http_version} {self.status}\r\n"]
        if "date" not in names:
            lines.append(f"Date: {_http_date()}\r\n")
        if "server" not in names:
            lines.append(f"Server: {self.server_software}\r\n")
        self._head = "".join(lines).encode("latin-1") + bytes(headers)
        self._head_size = len(self._head)

    def _write(self, data):
        if self._no_body:
            data = b""
        elif self._length is not None:
            room = self._length - self._body_sent
            if len(data) > room:
                # More than it said: the rest would be read as the next response.  Dropped, as
                # gunicorn does; the connection stays good for the next request (a proxy's
                # pooled one, often another client's).
                environ = self.environ
                self.request_handler.server.log_line(
                    f"the app sent more than its Content-Length ({self._length}) for "
                    f"{environ['REQUEST_METHOD']} {environ.get('SCRIPT_NAME', '')}"
                    f"{environ['PATH_INFO']}; the rest was dropped", once=True)
                data = data[:room]
            self._body_sent += len(data)
        elif self._chunked and data:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._send(data)

    def _send(self, data):
        """Send framed bytes, after the head if it has not gone out yet (one send for both)."""
        if self._head:
            data, self._head = self._head + data, b""
        if data:
            self.stdout.write(data)

    def finish_content(self):
        if not self.headers_sent:
            data, self._held = b"".join(self._held or ()), None
            code = int(self.status[:3])
            if code >= 200 and code not in (204, 304):
                self.headers.setdefault("Content-Length", str(len(data)))
            self.bytes_sent = len(data)
            self.send_headers()
            self._write(data)
        elif self._chunked:
            self._send(b"0\r\n\r\n")  # the last chunk: the response is whole
        elif self._length is not None and self._body_sent < self._length and not self._no_body:
            self.aborted = True  # the client would wait for the rest
            self.request_handler.log_error("the app sent %d of the %d bytes of its Content-Length",
                                           self._body_sent, self._length)
        self._send(b"")  # the head of a response without a body

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
        self._send(b"")  # the head
        if not self._no_body and count:
            self._body_sent = self.bytes_sent = _send_file(
                self.request_handler.connection, file.fileno(), offset, count, self.stdout.progress)
        self.finish_content()
        return True

    def _flush(self):
        pass


# --- §7 Processes -------------------------------------------------------------------------
# What the single server (§9), the master and its workers (§8) share.

# The signals serve() handles.  Every signal whose default action ends the process and that a
# server may be sent by an operator or a supervisor stops it gracefully (the socket file is
# removed), reopens the access log (SIGUSR1, as nginx's), or is ignored with a log line;
# SIGKILL cannot be caught, and a fault (SIGSEGV, ...) or a profiler's signal (SIGPROF,
# SIGVTALRM) is left as it is.  SIGPIPE and SIGXFSZ are ignored by Python already.
_SIGNALS = [(getattr(signal, name), action) for name, action in (
    ("SIGTERM", "stop"), ("SIGINT", "stop"), ("SIGHUP", "stop"), ("SIGQUIT", "stop"),
    ("SIGALRM", "stop"), ("SIGXCPU", "stop"), ("SIGPWR", "stop"),
    ("SIGUSR1", "reopen"), ("SIGUSR2", "ignore")) if hasattr(signal, name)]


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
        _log_write(sys.stderr, f"{PROG}: cannot notify systemd at {address!r}: {exc.strerror}\n")


def _serve_until_signal(server, on_ready, in_worker=False):
    """server.serve_forever() with the _SIGNALS handlers in place (from the main thread
    only); ServeError if a second signal stopped it at once."""
    signalled = []

    def say(line):
        try:
            # The handler may have interrupted this thread in a write to stderr: another write
            # through sys.stderr would raise "reentrant call" (and end serve_forever()); one
            # os.write() of the whole line cannot.
            os.write(sys.stderr.fileno(), f"{_LOG_PREFIX}: {line}\n".encode("utf-8", "replace"))
        except (AttributeError, ValueError, io.UnsupportedOperation):
            server.log_line(line)  # a stream with no descriptor (redirected in-process)
        except OSError:
            pass  # a log that cannot be written: nothing to say it with

    def stop(signum, frame):
        # A second signal stops at once (as gunicorn's and uvicorn's users expect); a stop
        # begun otherwise (a worker's master, shutdown()) does not count as a first.
        name = signal.Signals(signum).name
        if signalled:
            say(f"{name}: a second signal: stopping at once")
            server.request_stop(at_once=True)
            return
        signalled.append(signum)
        why = ""
        if signum == getattr(signal, "SIGHUP", None) and not in_worker:
            why = " (one process does not reload: with --workers N, SIGHUP reloads)"
        say(f"{name}: stopping gracefully{why}")
        _notify_systemd("STOPPING=1")
        server.request_stop()

    def ignore(signum, frame):
        say(f"{signal.Signals(signum).name} means nothing here; ignored (SIGTERM stops, "
            f"SIGHUP too, SIGUSR1 reopens the access log)")

    def reopen(signum, frame):
        server.request_reopen()
    actions = {"stop": stop, "ignore": ignore, "reopen": reopen}
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum, action in _SIGNALS:
            handlers[signum] = signal.signal(signum, actions[action])
    try:
        server.on_ready = on_ready
        server.serve_forever()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if server.stopped_at_once:
        raise ServeError(f"{server}: stopped at once by a second signal; requests in flight "
                         f"were cut")


def _warn_about(server, options):
    if os.getpid() == 1:
        _log_write(sys.stderr, f"{PROG}: warning: running as PID 1: orphaned processes that the "
                               f"app's subprocesses leave are not reaped; run the container "
                               f"with an init (docker run --init)\n")
    if server.listen_address.kind == "abstract":
        _log_write(sys.stderr, f"{PROG}: warning: {server} is an abstract socket: anyone in this "
                               f"network namespace can connect to it, and while this server is "
                               f"down, bind it and receive its requests; a socket file is safer\n")
    elif server.listen_address.kind == "unix" and options.get("mode", 0) & 0o002:
        # connect() needs write permission: "others" may send requests.
        _log_write(sys.stderr, f"{PROG}: warning: mode {options['mode']:o} lets every local user "
                               f"connect to {server}; 660 with --group is the usual choice\n")


_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option, value):
    """Linux prctl(2) through ctypes; False where it cannot be done."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _become_subreaper():
    """Make orphaned descendants our children (Linux prctl(PR_SET_CHILD_SUBREAPER)), so that
    a command's setsid() daemon can be found and killed.  False where it cannot be done."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


_SUBREAPER = False  # set when the command app made us the subreaper


def _children():
    """The pids of this process's children (from /proc; empty where there is none)."""
    children = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                children.extend(int(pid) for pid in f.read().split())
    except OSError:
        return []
    return children


def _kill_group(pid, signum):
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _nothing():
    pass


def _load_app(spec):
    """The WSGI app ``spec`` names: ``MODULE[:NAME[.NAME]]``, or ``MODULE:FACTORY(ARGS)``
    (gunicorn's form: the factory is called once, with literal arguments only -- no eval)."""
    import importlib
    module_name, _, target = spec.partition(":")
    target, arguments = target or "application", None
    call = re.fullmatch(r"([\w.]+)\((.*)\)", target, re.S)
    if call:
        target, arguments = call.group(1), _literal_arguments(spec, call.group(2))
    sys.path.insert(0, os.getcwd())  # as gunicorn does: the app sits next to us
    try:
        obj = importlib.import_module(module_name)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        if isinstance(exc, ModuleNotFoundError) and exc.name in (module_name.split(".")[0],
                                                                 module_name):
            hint = ""  # (else the module is there, and what it imports is not)
            if module_name.endswith(".py"):  # a file name where a module name goes
                hint = f"; the module of {module_name} is {module_name[:-3]}: --app " \
                       f"{module_name[:-3]}:{target}"
            raise ServeError(f"--app {spec}: no module {module_name} in {os.getcwd()}"
                             f"{hint}") from None
        _print_app_traceback(exc)
        raise ServeError(f"--app {spec}: importing {module_name} failed (its traceback is "
                         f"above)") from None
    for part in target.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            import difflib
            close = difflib.get_close_matches(part, [name for name in dir(obj)
                                                     if not name.startswith("_")], 1)
            hint = f"; did you mean {module_name}:{close[0]}?" if close else ""
            raise ServeError(f"--app {spec}: {module_name} has no {target}{hint}") from None
    if arguments is not None:
        try:
            obj = obj(*arguments[0], **arguments[1])
        except Exception as exc:
            _print_app_traceback(exc)
            raise ServeError(f"--app {spec}: calling {target}() failed (its traceback is "
                             f"above)") from None
    _check_wsgi_callable(obj, spec, f"{module_name}:{target}")
    return obj


def _literal_arguments(spec, text):
    """(args, kwargs) of a factory call written with literals only, or ServeError."""
    import ast
    try:
        node = ast.parse(f"f({text})", mode="eval").body
        return ([ast.literal_eval(arg) for arg in node.args],
                {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords})
    except (SyntaxError, ValueError, TypeError):
        raise ServeError(f"--app {spec}: the factory's arguments must be literals, like "
                         f"create_app('production', debug=False)") from None


def _check_wsgi_callable(obj, spec, name):
    """Refuse at start-up what every request would answer with 500."""
    import inspect
    if not callable(obj):
        raise ServeError(f"--app {spec}: {name} is not callable")
    try:
        inspect.signature(obj).bind(object(), object())
    except TypeError:
        try:
            factory = not inspect.signature(obj).parameters
        except (TypeError, ValueError):
            factory = False
        hint = f"; is it a factory? write --app '{name}()'" if factory else ""
        raise ServeError(f"--app {spec}: {name} cannot be called with (environ, start_response), "
                         f"so it is not a WSGI app{hint}") from None
    except ValueError:
        pass  # no signature to read (a builtin): let it be


def _print_app_traceback(exc):
    """The app's traceback on stderr: its frames, not ours nor importlib's."""
    tb, ours = exc.__traceback__, os.path.abspath(__file__)
    while tb is not None and (os.path.abspath(tb.tb_frame.f_code.co_filename) == ours
                              or "importlib" in tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    _log_write(sys.stderr, "".join(traceback.format_exception(type(exc), exc, tb)))


# --- §8 Worker processes ------------------------------------------------------------------

# A worker's states (drawn in _Master's docstring), and the moves between them.
_FORKED, _WORKING, _REPLACING, _RETIRING, _KILLED, _REAPED = (
    "forked", "serving", "replacing", "retiring", "killed", "reaped")
_WORKER_MOVES = {
    _FORKED: {_WORKING, _RETIRING, _REAPED},
    _WORKING: {_REPLACING, _RETIRING, _REAPED},
    _REPLACING: {_RETIRING, _REAPED},
    _RETIRING: {_KILLED, _REAPED},
    _KILLED: {_REAPED},
    _REAPED: set(),
}
_STOPPING = (_RETIRING, _KILLED)  # told to stop


class _Worker:
    """One worker process, as its master sees it."""

    MOVES, move = _WORKER_MOVES, _move

    def __init__(self, pid, generation, channel, now):
        self.pid, self.generation, self.channel, self.started = pid, generation, channel, now
        self.state = _FORKED
        self.ready = False      # it said it serves (it stays so once retiring)
        self.heard_end = False  # its end of the channel is closed: it is exiting
        self.kill_at = float("inf")  # once it is told to stop: when it is killed if it lingers
        self.unread = b""  # what it said, up to an unfinished line


class _Master:
    """``workers`` processes serving one listening socket; the master serves nothing itself.

    The master binds the address (a WSGIServer it never runs holds the socket and its file;
    only the master removes that file), then forks the workers.  Each loads the app after the
    fork (so that a reload loads new code), runs serve_forever() on its copy of the socket
    with ``threads`` threads, and says "R" on its channel -- a socketpair -- once it serves.
    The master stops a worker gracefully by writing on that channel; a worker also stops when
    the channel ends, or at the SIGTERM the kernel sends it when the master dies
    (PR_SET_PDEATHSIG).  A worker's signals are a single process's (a second SIGTERM stops it
    at once): so the master never signals a serving worker for a graceful stop, and a SIGTERM
    sent to every process of the group (systemd's KillMode, Ctrl-C) is still one signal to
    each.

    Generations: the start makes the first, and each SIGHUP a new one.  Its first worker starts
    alone, the others once it serves -- an app that cannot load fails once, not N times.  When
    all of a generation serve, the older workers are told to stop (each finishes its requests;
    the new ones accept meanwhile, so a reload loses nothing).  If a new generation's first
    worker dies before it serves, a start-up fails (exit 1) and a reload is abandoned: the old
    workers keep serving, and the generation is theirs again.

    Recycling: a worker that reached a limit (_WorkerServer) says "Q" and why; it no longer
    counts for its generation, so another is started, and once that one serves, it is told
    to stop -- the same way as at a reload, one worker at a time.

    A worker's life (_WORKER_MOVES; Worker.move() refuses any other)::

        forked     --"R"------------------> serving    it loaded the app and serves
        forked     --told to stop---------> retiring   a reload began again, or a stop
        forked     --dies-----------------> reaped     it failed to start: a backoff
        serving    --"Q"------------------> replacing  a recycling limit: another is started
        serving    --told to stop---------> retiring   a newer generation serves, or a stop
        serving    --dies-----------------> reaped     replaced at once if it served
                                                       WORKER_QUICK_DEATH, else after a backoff
        replacing  --told to stop---------> retiring   its replacement serves, or a stop
        replacing  --exits----------------> reaped     --max-worker-memory: it stops by itself
        retiring   --kill_at passes-------> killed     SIGKILL: it lingered past the grace
        retiring   --exits----------------> reaped
        killed     --dies-----------------> reaped

    The decisions -- _heard(), _ended(), _on_signal(), _keep_up(), _kill_overdue() -- read the
    clock they are given and the workers' states, and act only through _spawn(), _tell(),
    _signal(), _announce(), _notify() and log_line() (the unit tests replace those six).

    Invariants: the master forks only from its one thread, with the signals it handles
    blocked, and the child resets them before it unblocks them; a child never returns into the
    master's code (it ends with os._exit(), after the atexit handlers); the master's loop does
    everything -- signal handlers only queue the signal.
    """

    def __init__(self, app, address, workers, options):
        self.app = app  # a WSGI callable (forked with us), or "MODULE:CALLABLE" (each loads it)
        self.address, self.count = address, workers
        self.recycling = {name: options.pop(name) for name in _RECYCLING if name in options}
        self.options = options  # the workers' WSGIServer keywords
        self.graceful_timeout = options.get("graceful_timeout", DEFAULTS["graceful_timeout"])
        self.server = None
        self.workers = {}  # pid -> _Worker
        self.generation = 1  # the start's; a SIGHUP adds one, a failed reload goes back
        self.proven = False  # a worker of this generation has served
        self.announced = self.reloading = self.stopping = self.at_once = False
        self.failures, self.last_failure, self.retry_at = 0, 0.0, 0.0
        self.signals = deque()
        self.error = None  # why the master stops with exit 1
        self.pid = os.getpid()

    def run(self):
        if threading.current_thread() is not threading.main_thread():
            raise ServeError("workers need the main thread: it handles SIGCHLD and SIGHUP")
        if threading.active_count() > 1:
            raise ServeError(f"workers are forked, and a fork copies no thread but the caller: "
                             f"call serve(..., workers=N) before starting any thread "
                             f"({threading.active_count()} run now)")
        with WSGIServer(self.address, **self.options) as self.server:
            _warn_about(self.server, self.options)
            self.wake_r, self.wake_w = os.pipe()
            os.set_blocking(self.wake_r, False)
            os.set_blocking(self.wake_w, False)
            handlers = {signum: signal.signal(signum, self._queue) for signum in self.handled()}
            wakeup = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
            try:
                self._loop()
            finally:
                signal.set_wakeup_fd(wakeup)
                for signum, handler in handlers.items():
                    signal.signal(signum, handler)
                os.close(self.wake_r)
                os.close(self.wake_w)
                for worker in self.workers.values():  # after a bug of ours: they see the end
                    worker.channel.close()
        if self.error:
            raise ServeError(f"{self.server}: {self.error}")
        if self.at_once:
            raise ServeError(f"{self.server}: stopped at once by a second signal; requests in "
                             f"flight were cut")

    @staticmethod
    def handled():
        return [signum for signum, _ in _SIGNALS] + [signal.SIGCHLD]

    def _queue(self, signum, frame):
        self.signals.append(signum)

    def _loop(self):
        while True:
            now = time.monotonic()
            self._reap(now)
            while self.signals:
                self._on_signal(self.signals.popleft(), now)
            if self.stopping and not self.workers:
                return
            self._kill_overdue(now)
            if not self.stopping:
                self._keep_up(now)
            self._wait(now)

    def _wait(self, now):
        """Sleep until a signal, a worker's word, or the next thing due."""
        until = min([now + 1.0] + [worker.kill_at for worker in self.workers.values()
                                   if worker.state == _RETIRING])
        if not self.stopping and self.retry_at > now:
            until = min(until, self.retry_at)
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        listening = {}
        for worker in self.workers.values():
            if not worker.heard_end:
                poller.register(worker.channel, select.POLLIN)
                listening[worker.channel.fileno()] = worker
        for fd, _ in poller.poll(max(0.0, until - now) * 1000):
            if fd == self.wake_r:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            worker = listening[fd]
            try:
                said = worker.channel.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                said = b""
            if not said:
                worker.heard_end = True  # it is exiting: SIGCHLD follows
                continue
            *lines, worker.unread = (worker.unread + said).split(b"\n")
            for line in lines:
                self._heard(worker, line.decode("utf-8", "replace"), now)

    # -- the decisions --

    def _heard(self, worker, message, now):
        """A worker said ``message``: "R" (it serves), or "Q" and why it wants replacing."""
        if message == "R" and not worker.ready:
            worker.ready = True
            if worker.state == _FORKED:
                worker.move(_WORKING)
            self.proven = self.proven or worker.generation == self.generation
        elif message.startswith("Q"):  # (said again, or while it stops: a line, no more)
            first = worker.state == _WORKING
            self.log_line(f"worker {worker.pid} {message[1:]}{'; replacing it' if first else ''}")
            if first:
                worker.move(_REPLACING)

    def _on_signal(self, signum, now):
        if signum == signal.SIGCHLD:
            return
        if dict(_SIGNALS).get(signum) == "ignore":
            self.log_line(f"{signal.Signals(signum).name} means nothing here; ignored "
                          f"(SIGTERM stops, SIGHUP reloads, SIGUSR1 reopens the access log)")
        elif dict(_SIGNALS).get(signum) == "reopen":
            self.server.reopen_logs()  # for the workers it starts from now on
            for worker in self.workers.values():
                self._signal(worker, signum)
        elif signum == signal.SIGHUP:
            if self.stopping:
                return
            self.generation += 1
            self.proven, self.reloading = False, True
            self.failures, self.retry_at = 0, 0.0  # a deliberate new start
            self._notify(f"RELOADING=1\nMONOTONIC_USEC={int(now * 1e6)}")
            for worker in self.workers.values():
                if not worker.ready:  # of an unfinished reload: not worth waiting for
                    self._retire(worker, now)
            self.log_line(f"SIGHUP: reloading: starting {self.count} new workers")
        elif self.stopping:  # a second one: the workers stop at once too
            self.log_line(f"{signal.Signals(signum).name}: a second signal: stopping at once")
            self.at_once = True
            for worker in self.workers.values():
                # Two signals, as a second Ctrl-C is (two of one kind could merge in one).
                self._signal(worker, signal.SIGTERM)
                self._signal(worker, signal.SIGINT)
        else:
            self.log_line(f"{signal.Signals(signum).name}: stopping gracefully")
            self._stop(now)

    def _stop(self, now):
        self.stopping = True
        self._notify("STOPPING=1")
        if self.server is not None and self.server.listen_address.kind == "unix":
            # Without its file no one can connect any more; the workers serve the backlog.
            self.server.listen_address.remove_socket_file()
        for worker in self.workers.values():
            self._retire(worker, now)

    def _retire(self, worker, now):
        """Tell a worker to stop: it finishes its requests within --graceful-timeout, or is
        killed WORKER_KILL_AFTER later (an app whose exit hangs must not linger for good)."""
        if worker.state not in _STOPPING:
            worker.kill_at = now + self.graceful_timeout + WORKER_KILL_AFTER
            worker.move(_RETIRING)
        self._tell(worker, b"S")
        if not worker.ready:  # still loading the app: it serves nothing, and reads nothing
            self._signal(worker, signal.SIGTERM)

    def _kill_overdue(self, now):
        for worker in self.workers.values():
            if worker.state == _RETIRING and now >= worker.kill_at:  # told to stop long ago
                self.log_line(f"worker {worker.pid} still runs "
                              f"{self.graceful_timeout + WORKER_KILL_AFTER:g} s after it was "
                              f"told to stop: killed")
                self._signal(worker, signal.SIGKILL)
                worker.move(_KILLED)

    def _keep_up(self, now):
        """Start what is missing of this generation; once all of it serves, retire the rest."""
        current = [w for w in self.workers.values()
                   if w.generation == self.generation and w.state in (_FORKED, _WORKING)]
        if len(current) < self.count and now >= self.retry_at:
            for _ in range(self.count - len(current) if self.proven else 1 - len(current)):
                current.append(self._spawn(now))
        if self.failures and any(w.ready and w.started > self.last_failure
                                 and now - w.started >= WORKER_QUICK_DEATH for w in current):
            self.failures = 0
        if not (self.proven and len(current) == self.count and all(w.ready for w in current)):
            return
        old = [w for w in self.workers.values() if w not in current and w.state not in _STOPPING]
        for worker in old:
            self._retire(worker, now)
        pids = " ".join(str(w.pid) for w in current)
        if not self.announced:  # (a SIGHUP before it counts as no reload)
            self.announced, self.reloading = True, False
            self._announce(pids)
            self._notify("READY=1")
        elif self.reloading:
            self.reloading = False
            self.log_line(f"reloaded: workers {pids} serve; "
                          f"{' '.join(str(w.pid) for w in old) or 'none'} finish their "
                          f"requests and exit")
            self._notify("READY=1")

    def _ended(self, worker, status, now):
        """A worker was reaped with ``status`` (os.waitpid's)."""
        del self.workers[worker.pid]
        ended_as = worker.state
        worker.move(_REAPED)
        if self.stopping or ended_as in _STOPPING:
            return
        if os.WIFSIGNALED(status):
            how = f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
        else:
            how = f"exited with status {os.WEXITSTATUS(status)}"
        lived = now - worker.started
        if worker.generation == self.generation and not self.proven:
            if not self.announced:
                self.error = (f"the first worker {how} before it served (what it said is "
                              f"above); not starting more")
                self._stop(now)
                return
            serving = [w.generation for w in self.workers.values() if w.ready and w.state not in _STOPPING]
            if serving:  # the new code does not start: keep the old
                self.generation, self.proven, self.reloading = max(serving), True, False
                self.log_line(f"reload failed: the first new worker {how} before it served; "
                              f"the old workers keep serving")
                self._notify("READY=1")
                return
        if ended_as == _REPLACING:  # it stopped by itself (--max-worker-memory), or died
            if status:
                self.log_line(f"worker {worker.pid} {how} before its replacement served")
            return
        if worker.ready and lived >= WORKER_QUICK_DEATH:
            self.log_line(f"worker {worker.pid} {how}; starting another")
            return
        self.failures += 1
        self.last_failure = now
        if self.failures >= WORKER_GIVE_UP:
            self.error = (f"workers keep failing within {WORKER_QUICK_DEATH:g} s of their start "
                          f"({self.failures} in a row, the last {how}); stopping")
            self._stop(now)
            return
        delay = WORKER_RETRY * 2 ** (self.failures - 1)
        self.retry_at = now + delay
        self.log_line(f"worker {worker.pid} {how} {lived:.1f} s after its start; starting "
                      f"another in {delay:g} s")

    # -- what the decisions do (the hooks the unit tests replace) --

    def log_line(self, message):
        self.server.log_line(message)

    def _tell(self, worker, word):
        try:
            worker.channel.send(word)
        except OSError:
            pass  # it is gone already

    def _signal(self, worker, signum):
        try:
            os.kill(worker.pid, signum)
        except OSError:
            pass  # gone: SIGCHLD follows

    def _notify(self, state):
        _notify_systemd(state)

    def _announce(self, pids):
        _log_write(sys.stderr, f"{PROG}: serving on {self.server}"
                               f"{self.server.listen_address.who_may_connect()} with "
                               f"{self.count} worker{'s' if self.count > 1 else ''} (pids {pids})\n")

    def _spawn(self, now):
        mine, theirs = socket.socketpair()
        _flush_standard_streams()  # or the child would write our buffered text again
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.handled())
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            mine.close()
            theirs.close()
            raise
        if pid == 0:
            self._work(theirs, mine, mask)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        mine.setblocking(False)
        worker = self.workers[pid] = _Worker(pid, self.generation, mine, now)
        return worker

    def _reap(self, now):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.get(pid)
            if worker is not None:  # else an orphan a command left us (the command app)
                worker.channel.close()
                self._ended(worker, status, now)
                if _SUBREAPER:
                    # The commands it was running came to us: nobody reads them any more.
                    for child in _children():
                        if child not in self.workers:
                            _kill_group(child, signal.SIGKILL)  # a command leads its group
                            try:
                                os.kill(child, signal.SIGKILL)
                            except OSError:
                                pass  # gone with its group already

    def _work(self, channel, masters_end, mask):
        """The child: become a worker, serve until told to stop, and exit -- never return."""
        status = 1
        try:
            global _LOG_PREFIX
            _LOG_PREFIX = f"{PROG}[{os.getpid()}]"
            # If the master dies, SIGTERM -- even while the app loads, before the channel is
            # watched (Linux; elsewhere the channel alone).  It may have died already.
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != self.pid:
                return
            signal.set_wakeup_fd(-1)
            for signum, action in _SIGNALS:
                signal.signal(signum, signal.SIG_IGN if action == "ignore" else signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            # What the master holds is not ours: its channels, its wake-up pipe, and above all
            # the socket file, which only the master removes.
            for worker in self.workers.values():
                worker.channel.close()
            masters_end.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            listener = os.dup(self.server.socket.fileno())
            self.server._disown()
            os.environ.pop("NOTIFY_SOCKET", None)  # the master speaks to systemd
            if _SUBREAPER:  # not inherited by fork(); the command app's orphans come to us
                _become_subreaper()
            app = _load_app(self.app) if isinstance(self.app, str) else self.app
            with _WorkerServer(ListenAddress(f"fd:{listener}"), channel, self.recycling,
                               **self.options) as server:
                # What is queued when it stops, it serves (at a reload the new workers would
                # too; at a stop, no one else), unless the socket is systemd's to keep.
                server.leave_backlog = self.server.listen_address.inherited
                server.set_app(app)
                _serve_until_signal(server, lambda: server.tell_master("R"), in_worker=True)
            status = 0
        except ServeError as exc:
            _log_write(sys.stderr, f"{_LOG_PREFIX}: {exc}\n")
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            _log_write(sys.stderr, traceback.format_exc())
        finally:
            try:
                # A worker ends as a process does: the app's atexit handlers run (the command
                # app's kills what its commands left).
                getattr(atexit, "_run_exitfuncs", _nothing)()
                _flush_standard_streams()
            finally:
                os._exit(status)


def _resident_memory(limit):
    """This process's resident memory in bytes (from /proc/self/statm, Linux), or 0 when it is
    surely below ``limit``: its peak, from getrusage() (1 us), is -- a read of /proc costs ten
    times that, and is needed only then."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (Linux gives KiB)
    if peak < limit:
        return 0
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak  # no /proc: the peak is what there is


class _WorkerServer(WSGIServer):
    """A worker's server: it stops when its master says so, or is gone, and asks its master
    to replace it when a recycling limit is reached (see DEFAULTS):

    - max_requests (+ jitter, drawn once per worker): counted after each request;
    - max_worker_memory: looked at when the app returned, unless it was less than a millisecond
      ago (a quick request cannot make it grow much, and hello world would pay 4 % for a look
      at each: one getrusage()); past it, the worker stops taking connections before that
      answer goes out (gracefully, leaving its backlog to the others);
    - request_timeout: the main thread looks at the requests in the apps each time it wakes
      (every 0.1 s at most); one that ran longer is cut -- its client gets 504 if nothing of
      its response went out yet, else the connection is shut down -- and the worker asks to be
      replaced: the thread stays in the app (a thread cannot be killed), and the process ends
      once its other requests had --graceful-timeout after its replacement serves.
    """

    def __init__(self, address, channel, recycling, **settings):
        self.channel = channel
        most, jitter = recycling.get("max_requests"), recycling.get("max_requests_jitter") or 0
        self.max_requests = most + random.randint(0, jitter) if most else None
        self.max_memory = recycling.get("max_worker_memory")
        self.request_timeout = recycling.get("request_timeout")
        self.served, self.asked = 0, False  # asked: to be replaced, for a limit it reached
        self.memory_seen = 0.0  # when _resident_memory() last looked
        super().__init__(address, **settings)

    def tell_master(self, message):
        try:
            self.channel.send(message.translate(_LOG_ESCAPES).encode() + b"\n")
        except OSError:
            pass  # the master is gone: service_actions() sees it

    def serve_request(self, connection):
        outcome = super().serve_request(connection)
        self.served += 1  # (threads may lose one now and then: a recycle comes a request later)
        if self.asked:
            return outcome
        if self.max_requests is not None and self.served >= self.max_requests:
            self.asked = True
            self.tell_master(f"Qserved {self.served} requests (--max-requests)")
        return outcome

    def set_app(self, app):
        super().set_app(app if self.max_memory is None else self._memory_watched(app))

    def _memory_watched(self, app):
        def looked_at(environ, start_response):  # after the app, before its response goes out
            result = app(environ, start_response)
            if not self.asked and time.monotonic() - self.memory_seen >= 0.001:
                self.memory_seen = time.monotonic()
                resident = _resident_memory(self.max_memory)
                if resident > self.max_memory:
                    self.asked = True
                    self.tell_master(f"Qhas {resident / 2**20:.0f} MiB resident after a request "
                                     f"(--max-worker-memory {self.max_memory / 2**20:g}M)")
                    # Every further request could grow it: it stops taking them before this
                    # answer goes out (its client may come back at once), as at a stop, but
                    # leaves the queued connections to the others and to its replacement.
                    self.leave_backlog = True
                    self.request_stop()
                    self._engine.begin_stop()
            return result
        return looked_at

    def service_actions(self):
        if self.request_timeout is not None:
            self._cut_overdue(time.monotonic())
        try:
            self.channel.recv(16, socket.MSG_DONTWAIT)  # a word, or the end: either way, stop
        except BlockingIOError:
            return
        except OSError:
            pass
        self.request_stop()

    def _cut_overdue(self, now):
        for since, request, conn in list(self._engine.serving.values()):
            writer = conn.writer
            if now - since < self.request_timeout or writer is None or writer.stopped:
                continue
            answer = _error_answer(504, f"the request ran longer than --request-timeout "
                                        f"({self.request_timeout:g} s)", request.version)
            answered = writer.cut(answer)
            self.tell_master(f"Qran {request.method} {request.path} for {now - since:.1f} s "
                             f"(--request-timeout {self.request_timeout:g}); "
                             f"{'its client got 504' if answered else 'its connection was closed'}")


# --- §9 API -------------------------------------------------------------------------------

def make_server(address, app, server_class=WSGIServer, handler_class=WSGIRequestHandler, **options):
    """Return a bound, listening WSGIServer for ``app`` on ``address`` (a context manager).

    ``address`` is a ListenAddress or its text; ``options`` are WSGIServer's keywords
    (``mode``, ``group``, ``threads``, ``timeout``, ``proxy_headers``... as on the command line).
    One process: for worker processes, use serve().
    """
    server = server_class(address, handler_class, **options)
    server.set_app(app)
    return server


def serve(app, address, workers=DEFAULTS["workers"], **options):
    """Serve ``app`` on ``address`` until SIGTERM or SIGINT (or shutdown()), then clean up.

    ``app`` is a WSGI callable, or its name as text, ``"MODULE:CALLABLE"`` (as --app takes it).
    With ``workers`` above 1, a master process forks that many workers (§8): a name is then
    imported by each worker, so that SIGHUP's reload loads new code; a callable is inherited
    as it is.  The recycling keywords (``max_requests``, ``max_requests_jitter``,
    ``max_worker_memory``, ``request_timeout``: see DEFAULTS) need that master: with any of
    them, it runs even for one worker.  Prints the readiness line ``wsgi_unix: serving on
    ADDRESS`` on stderr once it serves.  Signal handlers are installed only when called from the main thread (workers
    need it).  Raises ServeError with the reason when it stops for a failure.
    """
    _checked(dict(DEFAULTS, workers=workers, **options))
    _raise_descriptor_limit()
    free = _free_spool_space() if workers > 1 and options.get("max_spool") is None else None
    if free:
        options["max_spool"] = free // workers  # the default, shared by the workers
    if workers > 1 or any(options.get(name) for name in _RECYCLING):
        return _Master(app, address, workers, options).run()
    for name in _RECYCLING:
        options.pop(name, None)  # (all off)
    if isinstance(app, str):
        app = _load_app(app)
    with make_server(address, app, **options) as server:
        _warn_about(server, options)

        def ready():
            _log_write(sys.stderr, f"{PROG}: serving on {server}"
                                   f"{server.listen_address.who_may_connect()}\n")
            _notify_systemd("READY=1")
        _serve_until_signal(server, ready)


# --- §10 The example app: a command per request -------------------------------------------

DEFAULT_COMMAND = ["date", "-u"]  # in coreutils and busybox, and new on every request
_KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL for a command that ran out of time


def command_app(argv, **settings):
    """A WSGI app that runs the command ``argv`` for each request: a small CGI gateway.

    The command is exactly ``argv`` -- no shell, no request data in its arguments.  It gets
    the request as CGI/1.1 meta-variables in a scrubbed environment (PATH and ``pass_env``
    only), and the body on stdin.  Exit status 0 answers 200 with its output as text/plain,
    or, with ``cgi=True``, with the status and headers the output starts with; any other
    status answers 500.  Output past ``max_output`` bytes answers 502, a command still
    running after ``timeout`` seconds 504; either way its whole process group is killed.
    Raises ServeError at once if the command cannot be found.
    """
    unknown = set(settings) - set(COMMAND_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown keyword(s): {', '.join(sorted(unknown))}")
    return _CommandApp([str(arg) for arg in argv],
                       **_checked(dict(COMMAND_DEFAULTS, **settings), "command"))


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
        self._spawning = threading.Lock()  # held from fork() until the pid is in _running
        global _SUBREAPER
        _SUBREAPER = _SUBREAPER or _become_subreaper()
        atexit.register(self.kill_all)  # none may outlive the server

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] not in self.methods:
            return _plain(start_response, "405 Method Not Allowed", "method not allowed",
                          [("Allow", ", ".join(self.methods))])
        length = environ.get("CONTENT_LENGTH")
        if length and int(length) > self.max_body:
            return _plain(start_response, "413 Content Too Large",
                          f"the request body is over {self.max_body} bytes")
        # The server has received the body already; the slot comes first all the same, so
        # that a request waiting for its turn holds nothing but its thread.
        if not self._slots.acquire(timeout=self.timeout):
            return _plain(start_response, "503 Service Unavailable", "too many commands running")
        try:
            body = environ["wsgi.input"].read(self.max_body + 1)
            if len(body) > self.max_body:
                return _plain(start_response, "413 Content Too Large",
                              f"the request body is over {self.max_body} bytes")
            env = self._child_environment(environ, body)
            if env is None:
                return _plain(start_response, "400 Bad Request", "NUL byte in the request")
            outcome, code, output = self._run(env, body, environ)
        finally:
            self._slots.release()
        if outcome == "client gone":
            # Nothing to answer, and no one to answer: the server logs one line for it.
            raise ConnectionAbortedError("its command was killed")
        if outcome != "ok" or code != 0:
            if outcome == "ok":
                outcome = "failed"
            status, reason = _FAILURES[outcome]
            reason = reason.format(timeout=self.timeout, max_output=self.max_output,
                                   how=f"status {code}" if code and code > 0 else f"signal {-(code or 0)}")
            if outcome != "cannot start":  # (_run has said why it could not)
                self._log(environ, f"{self.argv[0]}: {reason}")  # the operator hears it too
            return _plain(start_response, status, reason)
        if not self.cgi:
            try:
                output.decode("utf-8")
                kind = "text/plain; charset=utf-8"
            except UnicodeDecodeError:
                kind = "application/octet-stream"  # not text we can name a charset for
            start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(output)))])
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
            with self._spawning:  # a command is never taken for an orphan (_kill_orphans)
                proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env, start_new_session=True)
                self._running.add(proc.pid)
        except OSError as exc:  # gone since start-up, or out of processes or descriptors
            self._log(environ, f"cannot start {self.argv[0]}: {exc.strerror or exc}")
            return "cannot start", None, b""
        try:
            outcome, output = self._exchange(proc, body, environ, deadline)
            # Its pipes are closed, or it has exited: it is gone or about to be.  (Popen.wait
            # with a timeout would sleep 0.5 ms at least; a command takes about that long.)
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
            # leader only while a member lives, so this cannot reach another process group;
            # what left the group (setsid) is found as an orphan, if we are its subreaper.
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            self._running.discard(proc.pid)
            self._kill_orphans([proc.pid])
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
        return outcome, proc.returncode, output

    def _exchange(self, proc, body, environ, deadline):
        """Feed stdin, collect stdout, log stderr and watch the client, until the command has
        exited and its pipes are drained (a background child may hold them open for ever).

        Returns ("ok", output), or ("timeout" | "too much output" | "client gone", b"").
        """
        # poll(2), not epoll: for a few descriptors once, it costs fewer system calls.
        poller, stdin, client = select.poll(), proc.stdin.fileno(), environ.get("wsgi_unix.socket")
        if body:
            os.set_blocking(stdin, False)  # a command that does not read: no hang
            poller.register(stdin, select.POLLOUT)
        else:
            proc.stdin.close()  # an empty stdin, not the server's
        pipes = {proc.stdout.fileno(): proc.stdout, proc.stderr.fileno(): proc.stderr}
        for fd in pipes:
            os.set_blocking(fd, False)
            poller.register(fd, select.POLLIN)
        if client is not None:
            # A Unix client that closed its socket gives POLLHUP, one that only half-closed
            # (nc -N, socat: done sending, still reading) none.  Over TCP the two look the same
            # (a FIN): POLLRDHUP (Linux) says the client left even when it sent more bytes than
            # its request; elsewhere a readable socket is peeked at.
            unix = client.family == socket.AF_UNIX
            poller.register(client, _POLL_PEER_CLOSED if unix else _POLL_PEER_HUNG_UP or select.POLLIN)
        exited = _pidfd(proc.pid)  # readable once the command has exited (Linux 5.3+)
        if exited is not None:
            poller.register(exited, select.POLLIN)
        output, size, sent, stderr_tail, done = [], 0, 0, b"", False
        logged = dropped = 0  # bytes of its stderr
        try:
            while pipes:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout", b""
                # Once it has exited, only what its pipes hold already; without a pidfd, look
                # at it every 50 ms.
                wait = 0 if done else left if exited is not None else min(left, 0.05)
                events = poller.poll(wait * 1000)
                if done and not events:
                    break  # exited, and its pipes are drained (a child may still hold them)
                for fd, event in events:
                    if fd == exited:
                        done = True
                        poller.unregister(exited)
                    elif fd == stdin:
                        try:
                            sent += os.write(stdin, body[sent:sent + 65536])
                        except BrokenPipeError:
                            sent = len(body)  # the command does not want the rest
                        if sent >= len(body):
                            poller.unregister(stdin)
                            proc.stdin.close()
                    elif client is not None and fd == client.fileno():
                        if unix or _POLL_PEER_HUNG_UP or _peer_closed(client):
                            return "client gone", b""
                        poller.unregister(client)  # it sent more, so it is still there
                    else:
                        try:
                            data = os.read(fd, 65536)
                        except BlockingIOError:
                            continue
                        if not data:
                            poller.unregister(fd)
                            del pipes[fd]
                        if fd == proc.stdout.fileno():
                            size += len(data)
                            if size > self.max_output:
                                return "too much output", b""
                            output.append(data)
                            continue
                        if dropped or logged + len(data) > COMMAND_LOG_MAX:
                            dropped += len(data)  # read on (or it blocks), but log no more
                            continue
                        logged += len(data)
                        *lines, stderr_tail = (stderr_tail + data).split(b"\n")
                        if stderr_tail and (not data or len(stderr_tail) > MAX_LINE):
                            lines.append(stderr_tail)  # a last line without "\n", or a huge one
                            stderr_tail = b""
                        for line in lines:
                            self._log(environ, line.decode("utf-8", "replace"))
                if exited is None and not done and proc.poll() is not None:
                    done = True
            if stderr_tail:
                self._log(environ, stderr_tail.decode("utf-8", "replace"))
            if dropped:
                self._log(environ, f"(and {dropped} more bytes of stderr, not logged: at most "
                                   f"{COMMAND_LOG_MAX} are)")
            return "ok", b"".join(output)
        finally:
            if exited is not None:
                os.close(exited)

    def _kill_orphans(self, groups):
        """Kill what finished commands left outside their process ``groups`` (a setsid()
        daemon, say).

        Orphans are reparented to us when we are the child subreaper (Linux); any child of ours
        that is not a running command is one.  While a group still has members, or an orphan
        had children of its own, more may come: look again (for _KILL_GRACE at most).
        """
        if not _SUBREAPER:
            return
        end = time.monotonic() + _KILL_GRACE
        while time.monotonic() < end:
            members = False
            for pid in groups:
                try:
                    os.killpg(pid, 0)
                    members = True  # still dying: its members may orphan more
                except (ProcessLookupError, PermissionError):
                    pass
            with self._spawning:
                orphans = [child for child in _children() if child not in self._running]
                for child in orphans:
                    try:
                        os.kill(child, signal.SIGKILL)
                        os.waitpid(child, 0)
                    except (ProcessLookupError, ChildProcessError):
                        pass
            if not orphans and not members:
                return
            time.sleep(0.005)

    def _log(self, environ, text):
        """One line of the command's stderr in the server log, prefixed with the request."""
        line = f"{_LOG_PREFIX}: {environ['REQUEST_METHOD']} {environ['PATH_INFO']}: {text}"
        _log_write(environ["wsgi.errors"], line.translate(_LOG_ESCAPES) + "\n")

    def kill_all(self):
        """Kill every running command's process group, and what they left (at exit: none may
        outlive us)."""
        groups = list(self._running)
        for pid in groups:
            _kill_group(pid, signal.SIGKILL)
        self._running.clear()
        self._kill_orphans(groups)


# How much of one command's stderr goes to the log: the log is for messages, not a data
# channel (a command that writes on gets the rest counted, not logged).
COMMAND_LOG_MAX = 64 * 1024

# How a command that did not succeed is answered: the status, and the reason (the client gets
# it in the body, the log with the request).
_FAILURES = {
    "cannot start": ("500 Internal Server Error", "the command could not be started"),
    "timeout": ("504 Gateway Timeout", "the command ran for more than {timeout:g} s"),
    "too much output": ("502 Bad Gateway", "the command wrote more than {max_output} bytes"),
    "failed": ("500 Internal Server Error", "the command exited with {how}"),
}


# Linux: poll() flags a peer that hung up even while unread bytes wait (0 elsewhere).
_POLL_PEER_HUNG_UP = getattr(select, "POLLRDHUP", 0) and (select.POLLRDHUP | select.POLLHUP
                                                          | select.POLLERR)
_POLL_PEER_CLOSED = select.POLLHUP | select.POLLERR


def _pidfd(pid):
    """A descriptor that becomes readable when process ``pid`` exits, or None (no pidfd)."""
    try:
        return os.pidfd_open(pid)  # Python 3.9+, Linux 5.3+
    except (AttributeError, OSError):
        return None


def _peer_closed(sock):
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
            code = int(value[:3])
            if not 200 <= code <= 599:  # a 1xx is not an answer: the client would wait on
                raise ValueError(f"Status {code} is not a final status (200 to 599)")
            status = value if " " in value else f"{code} {_phrase(code)}"
        elif name.lower() == "content-length" or wsgiref_util.is_hop_by_hop(name):
            continue  # the server frames the response itself
        else:
            headers.append((name, value))
    if status is None:
        location = any(name.lower() == "location" for name, _ in headers)
        status = "302 Found" if location else "200 OK"
    return status, headers, output[end.end():]


def _phrase(code):
    """The reason phrase of a status, or a neutral one for a code Python does not know."""
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


def _command_path():
    return os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin"


# --- §11 The command line -----------------------------------------------------------------

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
  python3 wsgi_unix.py --workers 4 --app myapp:application /run/app/app.sock
      four processes on one socket; SIGHUP reloads them with the code as it is now
  python3 wsgi_unix.py --check /run/app/app.sock /health
      a health probe (Docker HEALTHCHECK, Kubernetes): exit 0 on a 2xx or 3xx within 5 s

exit status: 0 after a clean stop (SIGTERM, SIGINT), 1 if it cannot serve, 2 for a usage error
"""


CHECK_TIMEOUT = 5.0  # --check's --timeout: a probe that waits long only delays the verdict


def _parse_command_line(argv):
    """(args, command, server settings, command app settings) from the command line; a usage
    error exits with status 2 and one line."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, not argparse's usage block
            self.exit(2, f"{PROG}: {message} (see --help)\n")

    def typed(read):
        def convert(text):
            try:
                return read(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return convert

    parser = Parser(
        prog=f"python3 {os.path.basename(sys.argv[0]) or 'wsgi_unix.py'}",
        usage="%(prog)s [OPTIONS] ADDRESS [-- COMMAND [ARG ...]]\n"
              "       %(prog)s [OPTIONS] --app MODULE:CALLABLE ADDRESS\n"
              "       %(prog)s --check ADDRESS [PATH] [--timeout SECONDS]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a WSGI application -- or, without --app, the output of COMMAND run\n"
                    "once per request (default: date -u) -- on a Unix socket, safely.",
        epilog=_HELP_EPILOG)
    parser.add_argument("address", metavar="ADDRESS", help="where to listen (forms below)")
    groups = {"server": parser.add_argument_group("server"),
              "recycling": parser.add_argument_group(
                  "recycling (with --workers N, N >= 1: a worker is replaced, its replacement "
                  "serving first)"),
              "command": parser.add_argument_group("the command (without --app)")}
    groups["server"].add_argument("--app", metavar="MODULE:CALLABLE",
                                  help="serve this WSGI callable, imported from the current "
                                       "directory")
    for setting in _SETTINGS:
        group = groups["recycling" if setting["name"] in _RECYCLING else setting["for"]]
        if setting["kind"] is _FLAG:
            group.add_argument(setting["option"], action="store_true", help=setting["help"])
        else:
            group.add_argument(setting["option"], type=typed(setting["kind"][1]),
                               metavar=setting["metavar"],
                               action="append" if setting["name"] == "pass_env" else "store",
                               help=f"{setting['help']} (default: {setting['shown']})")
    groups["server"].add_argument("--quiet", action="store_true", help="no access log")
    groups["server"].add_argument("--check", action="store_true",
                                  help="be a health probe instead: GET PATH (default: /) from "
                                       "the server at ADDRESS; exit 0 on a 2xx or 3xx within "
                                       "--timeout, else 1 with a line saying why")
    groups["server"].add_argument("--version", action="version", version=f"{PROG} {__version__}")
    argv = list(sys.argv[1:] if argv is None else argv)
    at = argv.index("--") if "--" in argv else len(argv)
    argv, command = argv[:at], argv[at + 1:]
    args, unknown = parser.parse_known_args(argv)
    args.path = "/"
    if args.check and unknown and not unknown[0].startswith("-"):
        args.path = unknown.pop(0)
        if not re.fullmatch(r"/[!-~]*", args.path):
            parser.error(f"--check {args.address} {args.path!r}: a PATH begins with / and has "
                         f"no spaces or control characters (encode them: %20)")
    if unknown:  # named, rather than taken for the address (--workers 2 ./app.sock)
        options = [arg for arg in unknown if arg.startswith("-")]
        if not options:
            parser.error(f"unexpected argument {unknown[0]!r} (a command goes after --: "
                         f"{PROG}.py {args.address} -- {' '.join(unknown)})")
        option = options[0].split("=", 1)[0]
        parser.error(f"unknown option {options[0]}" + _HABITS.get(option, ""))
    given = {}  # keyword -> value, of the settings given
    for setting in _SETTINGS:
        value = getattr(args, setting["option"][2:].replace("-", "_"))
        if value is not None and value is not False:  # (0 is given: --keep-alive 0)
            given[setting["for"], setting["name"]] = (setting["option"], value)
    if args.check:
        others = [option for (_, name), (option, _) in given.items() if name != "timeout"]
        others += (["--app"] * bool(args.app) + ["--quiet"] * args.quiet
                   + ["a command"] * bool(command))
        if others:
            parser.error(f"--check takes an ADDRESS, a PATH and --timeout, not {others[0]}")
        args.timeout = args.timeout or CHECK_TIMEOUT
        return args, command, {}, {}
    recycling = [option for (_, name), (option, _) in given.items() if name in _RECYCLING]
    if recycling and args.workers is None:
        parser.error(f"{recycling[0]} needs --workers N (1 or more): a worker is recycled by "
                     f"starting another process before it stops (a thread cannot be killed), "
                     f"which a master does")
    if args.max_requests_jitter and not args.max_requests:
        parser.error("--max-requests-jitter goes with --max-requests")
    if args.app and command:
        parser.error("give either --app or a COMMAND, not both")
    for_command = [option for (whose, _), (option, _) in given.items() if whose == "command"]
    if args.app and for_command:
        parser.error(f"{for_command[0]} is for the command app; it does nothing with --app")
    if args.forwarded_allow_ips and not args.proxy_headers:
        parser.error("--forwarded-allow-ips goes with --proxy-headers")
    server = dict(DEFAULTS, **{name: value for (whose, name), (_, value) in given.items()
                               if whose == "server"})
    # A group is given so that its members may connect, which needs write permission.
    server["mode"] = args.mode if args.mode is not None else 0o660 if args.group else 0o600
    app = dict(COMMAND_DEFAULTS, max_procs=server["threads"])
    app.update((name, value) for (whose, name), (_, value) in given.items() if whose == "command")
    app["pass_env"] = [name for names in app["pass_env"] for name in names]
    if not args.app:  # a command gets no more than --max-body: refuse a larger one before it comes
        server["max_request_body"] = min(server["max_request_body"], app["max_body"])
    return args, command, server, app


# Options from gunicorn's habits, and how to say them here.
_HABITS = {
    "-b": " (the address is the last argument: --app app:application /run/app/app.sock; "
          "unix:PATH and HOST:PORT work as gunicorn's -b takes them)",
    "-w": " (say --workers N)",
    "-k": " (there are no worker classes: --threads N threads in each of --workers N processes)",
    "--reload": " (no reloading on file changes: with --workers N, SIGHUP loads the new code)",
    "--preload": " (--app loads the app in each worker, after the fork; pass a callable to "
                 "serve() to load it once)",
    "--log-level": " (there is one level: errors and --access-log lines; --quiet drops the "
                   "latter)",
}
_HABITS["--bind"] = _HABITS["-b"]

def _check(text, path, timeout):
    """--check: one GET, as a health probe makes it; 0 for a 2xx or 3xx, else 1 and why."""
    def fail(why):
        _log_write(sys.stderr, f"{PROG} --check: {text}: {why}\n")
        return 1
    try:
        address = ListenAddress(text)
    except AddressError as exc:
        _log_write(sys.stderr, f"{PROG}: {exc}\n")
        return 2
    if address.inherited:
        return fail("fd:N is a socket passed at start-up; check the address it listens on")
    deadline = time.monotonic() + timeout
    try:
        if address.kind == "tcp":
            sock, host = socket.create_connection((address.host, address.port), timeout), text
        else:
            sock, host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "localhost"
        with sock:
            sock.settimeout(timeout)
            if address.kind == "unix":
                sock.connect(address.path)
            elif address.kind == "abstract":
                sock.connect("\0" + address.path[1:])
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {PROG}-check\r\n"
                         f"Connection: close\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head and len(head) < MAX_LINE:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = sock.recv(4096)
                if not data:
                    break
                head += data
    except FileNotFoundError:
        return fail("no such socket (is the server running? is this its path?)")
    except ConnectionRefusedError:
        return fail("connection refused: nothing listens there")
    except socket.timeout:
        return fail(f"no answer within {timeout:g} s (--timeout)")
    except OSError as exc:
        return fail(exc.strerror or str(exc))
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    status = re.match(r"HTTP/1\.[01] ([1-5]\d\d)(?: |\Z)", line)
    if not status:
        return fail(f"not an HTTP answer: {line[:80]!r}" if head else
                    "the connection closed without an answer")
    if not 200 <= int(status.group(1)) < 400:
        return fail(f"GET {path}: {line[9:].translate(_LOG_ESCAPES)}")
    _log_write(sys.stdout, f"{PROG} --check: {text}: GET {path}: "
                           f"{line[9:].translate(_LOG_ESCAPES)}\n")
    return 0


def _access_log(args):
    """The access log's stream: False (--quiet), True (stderr), stdout, or a file, whole lines."""
    if args.quiet:
        return False
    if args.access_log is None:
        return True
    try:
        if args.access_log == "-":
            return open(sys.stdout.fileno(), "w", buffering=1, closefd=False,
                        encoding="utf-8", errors="backslashreplace")
        return _LogFile(args.access_log)
    except OSError as exc:
        raise ServeError(f"--access-log {args.access_log}: cannot open it: {exc.strerror}") from None


def main(argv=None):
    """The command line; returns the exit status (0 clean stop, 1 failure, 2 usage error)."""
    args, command, settings, app_settings = _parse_command_line(argv)
    if args.check:
        return _check(args.address, args.path, args.timeout)
    access_log = None
    try:
        address = ListenAddress(args.address)
        if address.kind != "unix" and (args.mode is not None or args.group is not None):
            where = ("systemd's SocketMode= and SocketGroup= set them" if address.inherited
                     else "this address has no socket file")
            raise AddressError(f"{address}: --mode and --group are a socket file's; {where}")
        # serve() imports an --app: in each worker, if there are workers
        app = args.app or command_app(command or DEFAULT_COMMAND, **app_settings)
        access_log = settings["access_log"] = _access_log(args)
        serve(app, address, **settings)
    except AddressError as exc:
        _log_write(sys.stderr, f"{PROG}: {exc}\n")
        return 2
    except ServeError as exc:
        _log_write(sys.stderr, f"{PROG}: {exc}\n")
        return 1
    except OSError as exc:  # what the checks above did not foresee: still one line, not a traceback
        _log_write(sys.stderr, f"{PROG}: {args.address}: {exc}\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        return 130
    finally:
        if hasattr(access_log, "close"):
            try:
                access_log.close()
            except (OSError, ValueError):
                pass  # what it held could not be written
        _drop_unwritable_output()
    return 0


def _drop_unwritable_output():
    """At exit, what is still buffered for a stream that cannot take it is dropped: else the
    interpreter's last flush fails, and the process exits with status 120 instead of ours."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
            except (OSError, ValueError, io.UnsupportedOperation):
                pass
        except AttributeError:
            pass  # no stream at all (pythonw)


if __name__ == "__main__":
    sys.exit(main())
