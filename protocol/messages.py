"""Message types of the control plane and how endpoints become ZeroMQ addresses.

Actors and the learner talk to the broker's ROUTER through DEALER sockets; every
request gets exactly one reply. The learner serves weights on its own ROUTER.
"""

HELLO = "hello"  # actor -> broker: announce (actor_id, incarnation); reply STATUS
SAMPLES = "samples"  # actor -> broker: samples; reply ACK
PING = "ping"  # actor -> broker: ask for credits / version / stop; reply STATUS
ACK = "ack"  # broker -> actor: {acked: [seq], rejected: [[seq, reason]], + status fields}
STATUS = "status"  # broker -> actor: {credits, policy_version, stop}

GET_BATCH = "get_batch"  # learner -> broker: {groups, policy_version, ack_batch, wait_ms?}; reply BATCH or NOT_READY
# (with wait_ms the broker holds the request until the batch is complete or wait_ms has passed: a long poll)
BATCH = "batch"  # broker -> learner: samples of complete groups + {batch_id, stats}
NOT_READY = "not_ready"  # broker -> learner: no full batch yet
FINISH = "finish"  # learner -> broker: training is over, tell actors to stop; reply STATUS
STATS = "stats"  # anyone -> broker: reply STATS with every counter

GET_WEIGHTS = "get_weights"  # actor -> learner: {have: version, host, shm: bool}; reply WEIGHTS or NO_UPDATE
WEIGHTS = "weights"  # learner -> actor: {manifest, mode: stream|shm|nccl|cuda_ipc, + where to find the buckets}
BUCKET = "bucket"  # learner -> actor (mode stream): {index}, then the bucket's raw bytes as one frame
NO_UPDATE = "no_update"

ERROR = "error"  # reply to a malformed request: {reason, detail}


def tcp(host_port: str) -> str:
    """The ZeroMQ address for a config endpoint; the bind side listens on the host it names."""
    return f"tcp://{host_port}"
