"""CurveZMQ: generating keys, arming client sockets, and guarding server sockets with an allow-list.

`python launch.py keygen DIR` writes a server key pair, one client key pair, and
`DIR/allowed/client.key` (the client public keys the servers admit). Two sockets serve:
the broker's and the learner's weight channel, both with the same server key. Give the
broker and learner hosts `server.key_secret` and `allowed/`; give every actor and learner
host `server.key` and `client.key_secret`. More clients: `launch.py keygen DIR NAME` adds
the pair `NAME.key(_secret)` and allows it. Secret files are written mode 0600.

A guarded socket makes every connection complete a CURVE handshake with the server key;
then the ZAP handler (a thread answering libzmq on inproc://zeromq.zap.01) admits it only
if the client's public key is allowed. A client with no key fails the handshake
(mechanism mismatch), one with another key is denied by ZAP; both show up as failed
handshakes on the socket monitor, which is what `Guard.refused` counts. A refused
client never gets a connection, so it can neither send nor receive.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from protocol.config import RunConfig
from protocol.errors import ConfigError

log = logging.getLogger("protocol.curve")
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
CLIENT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
REFUSALS = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH


def keygen(keys_dir: Path, client: str = "client") -> None:
    """Create the server pair (once), the client pair `client`, and allow that client.

    Secret files are never readable by others, not even while they are written (umask 077);
    a client may not be named `server` (it would replace the server's pair) nor name a path, and an
    existing client pair is never replaced (the hosts holding it would be locked out).
    """
    if not CLIENT_NAME.fullmatch(client) or client == "server":
        raise ConfigError(f"CURVE client name {client!r}: use letters, digits, '_', '-' or '.', not starting with '.', and not 'server'")
    keys_dir = Path(keys_dir)
    if (keys_dir / f"{client}.key_secret").exists():
        raise ConfigError(f"{keys_dir / client}.key_secret exists: hosts holding that pair would be locked out if it were "
                          f"replaced; name another client (`launch.py keygen {keys_dir} NAME`) or delete the pair first")  # fmt: skip
    old_umask = os.umask(0o077)
    try:
        (keys_dir / "allowed").mkdir(parents=True, exist_ok=True)
        if not (keys_dir / "server.key_secret").exists():
            zmq.auth.create_certificates(keys_dir, "server")
        public, _ = zmq.auth.create_certificates(keys_dir, client)
        shutil.copy(public, keys_dir / "allowed" / f"{client}.key")
    finally:
        os.umask(old_umask)
    for secret in keys_dir.glob("*.key_secret"):
        secret.chmod(0o600)


def load_key(path: Path, secret: bool = False) -> tuple[bytes, bytes | None]:
    """The (public, secret) Z85 keys of a key file; a missing, unreadable or malformed one is a `ConfigError`
    naming the file (they surfaced as TypeError, ZMQError "Invalid argument" or a Z85 ValueError)."""
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"CURVE key file {path}: {err}") from None
    for name, key in {"public": public, **({"secret": secret_key} if secret else {})}.items():
        if key is None:
            raise ConfigError(f"CURVE key file {path} holds no {name} key (a .key_secret file has both)")
        try:
            if len(zmq.utils.z85.decode(key)) != 32:
                raise ValueError("not 32 bytes")
        except ValueError as err:
            raise ConfigError(f"CURVE key file {path}: the {name} key is not a Z85 CURVE key ({err})") from None
    return public, secret_key


def curve_keys_dir(config: RunConfig) -> Path | None:
    """Where every role finds its CURVE keys, or None when `broker.curve` is off."""
    return config.broker.curve.keys_dir if config.broker.curve.enabled else None


def arm_client(socket: zmq.Socket, keys_dir: Path, client: str = "client") -> None:
    """Make `socket` a CURVE client that trusts only the server key in `keys_dir`."""
    public, secret = load_key(Path(keys_dir) / f"{client}.key_secret", secret=True)
    server_public, _ = load_key(Path(keys_dir) / "server.key")
    socket.curve_publickey, socket.curve_secretkey, socket.curve_serverkey = public, secret, server_public


class Guard:
    """Arms one server socket (before it binds) with the server key and the allow-list; `poll` counts refusals.

    `poll` and `close` belong to the thread that owns the armed socket.
    """

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = Path(keys_dir)
        self.allowed = {zmq.utils.z85.decode(load_key(p)[0]) for p in (self.keys_dir / "allowed").glob("*.key")}
        if not self.allowed:  # every client would be refused, silently: a run that waits for ever
            raise ConfigError(f"CURVE is on but {self.keys_dir / 'allowed'} holds no client key (*.key); run launch.py keygen {self.keys_dir}")
        self.refused = 0
        self.monitor: zmq.Socket | None = None
        self._zap: _ZapHandler | None = None

    def arm(self, socket: zmq.Socket) -> None:
        public, secret = load_key(self.keys_dir / "server.key_secret", secret=True)
        self._zap = _ZapHandler.acquire(socket.context, self.keys_dir, self.allowed)
        socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
        socket.zap_domain = b"streamrl"
        self.monitor = socket.get_monitor_socket(REFUSALS)
        log.info("CURVE on: %d allowed client keys in %s", len(self.allowed), self.keys_dir / "allowed")

    def poll(self) -> None:
        """Count the refusals reported since the last call."""
        while self.monitor is not None and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            self.refused += 1
            log.warning("refused a client at %s (event %s)", event.get("endpoint"), event.get("event"))

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close(linger=0)
            self.monitor = None
        if self._zap is not None:
            self._zap.release()
            self._zap = None


class _ZapHandler:
    """The one ZAP handler of a ZeroMQ context (libzmq asks a single endpoint), shared by every guarded socket in it."""

    _lock = threading.Lock()
    _by_context: dict[int, _ZapHandler] = {}

    def __init__(self, context: zmq.Context, keys_dir: Path, allowed: set[bytes]) -> None:
        self.context_id, self.keys_dir, self.allowed = id(context), keys_dir, allowed
        self.users = 0
        self.stop = threading.Event()
        self.socket = context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)
        self.thread = threading.Thread(target=self._answer, name="zap", daemon=True)
        self.thread.start()

    @classmethod
    def acquire(cls, context: zmq.Context, keys_dir: Path, allowed: set[bytes]) -> _ZapHandler:
        with cls._lock:
            handler = cls._by_context.get(id(context))
            if handler is None:
                handler = cls._by_context[id(context)] = cls(context, keys_dir, allowed)
            elif handler.keys_dir != keys_dir:
                raise ValueError(f"CURVE keys {keys_dir}: this process already guards sockets with the keys in {handler.keys_dir}")
            handler.users += 1
            return handler

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users:
                return
            del self._by_context[self.context_id]
        self.stop.set()
        self.thread.join(2)

    def _answer(self) -> None:
        while not self.stop.is_set():
            if not self.socket.poll(100):
                continue
            version, request_id, _domain, _address, _identity, mechanism, *credentials = self.socket.recv_multipart()
            ok = mechanism == b"CURVE" and bool(credentials) and credentials[0] in self.allowed
            status = [b"200", b"OK"] if ok else [b"400", b"client key not allowed"]
            self.socket.send_multipart([version, request_id, *status, b"", b""])
        self.socket.close(linger=0)


def keygen_main(argv: list[str]) -> int:
    """`launch.py keygen DIR [CLIENT]`."""
    if not 1 <= len(argv) <= 2:
        print("usage: launch.py keygen DIR [CLIENT_NAME]")
        return 2
    try:
        keygen(Path(argv[0]), *argv[1:])
    except ConfigError as err:
        print(f"error: {err}")
        return 2
    print(f"keys written to {argv[0]} (allowed clients: {sorted(p.stem for p in (Path(argv[0]) / 'allowed').glob('*.key'))})")
    return 0
