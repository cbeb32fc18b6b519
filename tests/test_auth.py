"""CURVE on the broker's socket and the weight channel: only clients whose public key is allowed get in; the others are counted."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
import zmq.auth

from actors.weights import WeightClient
from broker.server import Broker
from learner.weights import WeightServer
from protocol import messages as m
from protocol.config import load_config
from protocol.curve import Guard, arm_client, keygen, keygen_main
from protocol.errors import ConfigError, WeightTransferError
from protocol.transport import Client
from tests.test_broker import VOCAB, get_batch, group_samples, send
from tests.test_launch import launch, read_metrics


@pytest.fixture
def curve_broker(tmp_path, endpoints):
    keys = tmp_path / "keys"
    keygen(keys)
    config = load_config(None, [
        f"run.dir={tmp_path}", f"endpoints.broker={endpoints['broker']}", "sampling.group_size=4",
        "train.groups_per_step=1", "broker.curve.enabled=true", f"broker.curve.keys_dir={keys}",
    ])  # fmt: skip
    server = Broker(config, VOCAB)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    yield server, endpoints["broker"], keys
    stop.set()
    thread.join(5)


def stranger_keys(tmp_path, keys):
    """A valid client key pair that is not on the allow-list, trusting the right server."""
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    zmq.auth.create_certificates(stranger, "client")
    (stranger / "server.key").write_bytes((keys / "server.key").read_bytes())
    return stranger


def test_keygen_writes_server_and_client_pairs_and_the_allow_list(tmp_path, capsys):
    assert keygen_main([str(tmp_path / "k"), "actor-7"]) == 0
    names = sorted(p.relative_to(tmp_path / "k").as_posix() for p in (tmp_path / "k").rglob("*") if p.is_file())
    assert names == ["actor-7.key", "actor-7.key_secret", "allowed/actor-7.key", "server.key", "server.key_secret"]
    assert (tmp_path / "k" / "server.key_secret").stat().st_mode & 0o077 == 0
    assert keygen_main([]) == 2


def test_keygen_never_replaces_a_client_pair(tmp_path, capsys):
    """Running it again replaced the client pair, locking out every host holding the old one."""
    keys = tmp_path / "k"
    assert keygen_main([str(keys)]) == 0
    before = (keys / "client.key_secret").read_bytes(), (keys / "server.key_secret").read_bytes()
    assert keygen_main([str(keys)]) == 2 and "client.key_secret exists" in capsys.readouterr().out
    assert keygen_main([str(keys), "actor-3"]) == 0  # another client, under the same server pair
    assert ((keys / "client.key_secret").read_bytes(), (keys / "server.key_secret").read_bytes()) == before
    assert sorted(p.name for p in (keys / "allowed").iterdir()) == ["actor-3.key", "client.key"]


def test_keygen_writes_secrets_no_one_else_can_read_at_any_time_and_refuses_names_that_would_harm(tmp_path, monkeypatch):
    """Found by a helper's hunt: secrets were written with the umask's 0644 and made private only at the end;
    `keygen DIR server` replaced the server's pair, and a name with `..` wrote outside DIR."""
    modes = []
    real = zmq.auth.create_certificates

    def watched(keys_dir, name, metadata=None):
        made = real(keys_dir, name, metadata)
        modes.append(oct(Path(made[1]).stat().st_mode & 0o777))
        return made

    monkeypatch.setattr(zmq.auth, "create_certificates", watched)
    keygen(tmp_path / "k")
    assert modes == ["0o600", "0o600"] and (tmp_path / "k").stat().st_mode & 0o077 == 0
    for name in ("server", "../outside", ".hidden", "a/b"):
        assert keygen_main([str(tmp_path / "k"), name]) == 2
    assert not (tmp_path / "outside.key_secret").exists()


@pytest.mark.parametrize("damage", ["no allowed key", "public key as the client secret", "short server key", "bad allowed key"])
def test_curve_key_files_that_cannot_work_are_config_errors_naming_the_file(tmp_path, endpoints, damage):
    """Found by a helper's hunt: an empty allow-list started a broker that refused everyone, silently (a run that
    waited for ever); bad key files raised TypeError, ZMQError or a Z85 ValueError naming no file."""
    keys = tmp_path / "keys"
    keygen(keys)
    if damage == "no allowed key":
        (keys / "allowed" / "client.key").unlink()
    elif damage == "public key as the client secret":
        (keys / "client.key_secret").write_bytes((keys / "client.key").read_bytes())
    elif damage == "short server key":
        (keys / "server.key_secret").write_text('curve\n    public-key = "abc"\n    secret-key = "abc"\n')
    else:
        (keys / "allowed" / "client.key").write_text('curve\n    public-key = "abc"\n')
    with pytest.raises(ConfigError, match=str(keys)):
        if damage == "public key as the client secret":
            arm_client(zmq.Context.instance().socket(zmq.DEALER), keys)
        else:
            Guard(keys).arm(zmq.Context.instance().socket(zmq.ROUTER))


def test_allowed_key_can_push_and_pull_others_cannot_and_are_counted(curve_broker, tmp_path):
    server, endpoint, keys = curve_broker
    actor, learner = Client(endpoint, "actor", curve_dir=keys), Client(endpoint, "learner", curve_dir=keys)
    assert send(actor, group_samples(0, 0))["acked"] == [0, 1, 2, 3]
    assert get_batch(learner, 1, 0)[0] == m.BATCH

    stranger = stranger_keys(tmp_path, keys)
    for client in [Client(endpoint, "plain"), Client(endpoint, "stranger", curve_dir=stranger)]:  # no key, wrong key
        with pytest.raises(TimeoutError):
            client.request(m.SAMPLES, {"actor_id": "a0", "incarnation": "i0"}, samples=group_samples(1, 4), timeout_s=1.0)
        with pytest.raises(TimeoutError):
            client.request(m.GET_BATCH, {"groups": 1, "policy_version": 0}, timeout_s=1.0)
        client.close()
    time.sleep(0.3)
    stats = actor.request(m.STATS)[1]
    assert stats["auth_refused"] >= 2 and stats["accepted"] == 4 and stats["served"] == 4


def test_the_weight_channel_admits_only_allowed_keys_beside_the_broker(curve_broker, tmp_path, endpoints):
    """The learner's weight server guards its socket like the broker (here both in one process, sharing ZAP)."""
    _, broker_endpoint, keys = curve_broker
    server = WeightServer(endpoints["weights"], 1 << 12, curve_dir=keys)
    try:
        weights = {"w": torch.arange(3000, dtype=torch.float32), "b": torch.ones(7, dtype=torch.bfloat16)}
        server.publish(1, weights)
        version, got = WeightClient(endpoints["weights"], "actor", timeout_s=5, shm=False, curve_dir=keys).fetch(0)
        assert version == 1 and all(torch.equal(got[k], weights[k]) for k in weights)
        stranger = stranger_keys(tmp_path, keys)
        for client in [WeightClient(endpoints["weights"], "plain", timeout_s=1, shm=False),
                       WeightClient(endpoints["weights"], "stranger", timeout_s=1, shm=False, curve_dir=stranger)]:  # fmt: skip
            with pytest.raises(WeightTransferError, match="timeout"):
                client.fetch(0)
            client.close()
        deadline = time.monotonic() + 5
        while server.guard.refused < 2:
            assert time.monotonic() < deadline, server.guard.refused
            time.sleep(0.1)
        assert Client(broker_endpoint, "learner", curve_dir=keys).request(m.STATS)[1]["auth_refused"] == 0  # counted apart
    finally:
        server.close()


def test_one_process_guards_sockets_with_one_set_of_keys(curve_broker, tmp_path, endpoints):
    _, endpoint, keys = curve_broker
    Client(endpoint, "probe", curve_dir=keys).request(m.STATS)  # the broker's socket is guarded by now
    other = tmp_path / "other-keys"
    keygen(other)
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    with pytest.raises(ValueError, match="this process already guards sockets with the keys in"):
        Guard(other).arm(socket)
    socket.close(linger=0)


@pytest.mark.slow
def test_a_whole_run_works_with_curve_on_both_channels(tmp_path, endpoints):
    keys = tmp_path / "keys"
    keygen(keys)
    for transport in ("shm", "tcp"):  # the weight channel's control plane is guarded either way
        run_dir = tmp_path / transport
        result = launch(run_dir, endpoints, "train.steps=3", "broker.curve.enabled=true", f"broker.curve.keys_dir={keys}",
                        f"learner.weight_transport={transport}", timeout=400)  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        assert [r["policy_version"] for r in read_metrics(run_dir)] == [1, 2, 3]
        assert "applied weights v2" in (run_dir / "logs" / "actor-0.log").read_text()
        assert "CURVE on" in (run_dir / "logs" / "learner.log").read_text()
