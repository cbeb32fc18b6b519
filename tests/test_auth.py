"""CURVE on the broker's socket: only clients whose public key is allowed can push or pull; the others are counted."""

from __future__ import annotations

import threading
import time

import pytest
import zmq.auth

from broker.server import Broker
from protocol import messages as m
from protocol.config import load_config
from protocol.curve import keygen, keygen_main
from protocol.transport import Client
from tests.test_broker import VOCAB, get_batch, group_samples, send


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


def test_keygen_writes_server_and_client_pairs_and_the_allow_list(tmp_path, capsys):
    assert keygen_main([str(tmp_path / "k"), "actor-7"]) == 0
    names = sorted(p.relative_to(tmp_path / "k").as_posix() for p in (tmp_path / "k").rglob("*") if p.is_file())
    assert names == ["actor-7.key", "actor-7.key_secret", "allowed/actor-7.key", "server.key", "server.key_secret"]
    assert (tmp_path / "k" / "server.key_secret").stat().st_mode & 0o077 == 0
    assert keygen_main([]) == 2


def test_allowed_key_can_push_and_pull_others_cannot_and_are_counted(curve_broker, tmp_path):
    server, endpoint, keys = curve_broker
    actor, learner = Client(endpoint, "actor", curve_dir=keys), Client(endpoint, "learner", curve_dir=keys)
    assert send(actor, group_samples(0, 0))["acked"] == [0, 1, 2, 3]
    assert get_batch(learner, 1, 0)[0] == m.BATCH

    stranger = tmp_path / "stranger"  # a valid key pair that is not on the allow-list
    stranger.mkdir()
    zmq.auth.create_certificates(stranger, "client")
    (stranger / "server.key").write_bytes((keys / "server.key").read_bytes())
    for client in [Client(endpoint, "plain"), Client(endpoint, "stranger", curve_dir=stranger)]:  # no key, wrong key
        with pytest.raises(TimeoutError):
            client.request(m.SAMPLES, {"actor_id": "a0", "incarnation": "i0"}, samples=group_samples(1, 4), timeout_s=1.0)
        with pytest.raises(TimeoutError):
            client.request(m.GET_BATCH, {"groups": 1, "policy_version": 0}, timeout_s=1.0)
        client.close()
    time.sleep(0.3)
    stats = actor.request(m.STATS)[1]
    assert stats["auth_refused"] >= 2 and stats["accepted"] == 4 and stats["served"] == 4
