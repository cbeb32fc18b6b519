"""CurveZMQ keys: generating them, and arming a client socket with them.

`python launch.py keygen DIR` writes a server key pair, one client key pair, and
`DIR/allowed/client.key` (the client public keys the broker admits). Give the broker
host `server.key_secret` and `allowed/`; give every actor and learner host
`server.key` and `client.key_secret`. More clients: `launch.py keygen DIR NAME` adds
the pair `NAME.key(_secret)` and allows it. Secret files are written mode 0600.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import zmq
import zmq.auth

from protocol.config import RunConfig


def keygen(keys_dir: Path, client: str = "client") -> None:
    """Create the server pair (once), the client pair `client`, and allow that client."""
    keys_dir = Path(keys_dir)
    (keys_dir / "allowed").mkdir(parents=True, exist_ok=True)
    if not (keys_dir / "server.key_secret").exists():
        zmq.auth.create_certificates(keys_dir, "server")
    public, _ = zmq.auth.create_certificates(keys_dir, client)
    shutil.copy(public, keys_dir / "allowed" / f"{client}.key")
    for secret in keys_dir.glob("*.key_secret"):
        secret.chmod(0o600)


def client_keys_dir(config: RunConfig) -> Path | None:
    """Where a role finds its CURVE client keys, or None when broker.curve is off."""
    return config.broker.curve.keys_dir if config.broker.curve.enabled else None


def arm_client(socket: zmq.Socket, keys_dir: Path, client: str = "client") -> None:
    """Make `socket` a CURVE client that trusts only the server key in `keys_dir`."""
    public, secret = zmq.auth.load_certificate(Path(keys_dir) / f"{client}.key_secret")
    server_public, _ = zmq.auth.load_certificate(Path(keys_dir) / "server.key")
    socket.curve_publickey, socket.curve_secretkey, socket.curve_serverkey = public, secret, server_public


def keygen_main(argv: list[str]) -> int:
    """`launch.py keygen DIR [CLIENT]`."""
    if not 1 <= len(argv) <= 2:
        print("usage: launch.py keygen DIR [CLIENT_NAME]")
        return 2
    keygen(Path(argv[0]), *argv[1:])
    print(f"keys written to {argv[0]} (allowed clients: {sorted(p.stem for p in (Path(argv[0]) / 'allowed').glob('*.key'))})")
    return 0
