"""`launch.py --role all`: the run directory a fresh run starts in (a previous run's state is moved aside, never
replayed or deleted), and no role outlives the supervisor, however it is stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from protocol.config import load_config
from scripts.supervisor import prepare_run_dir
from tests.conftest import ROOT
from tests.helpers import wait_for


def previous_run(run_dir):
    (run_dir / "wal").mkdir(parents=True)
    (run_dir / "wal" / "segment-000001.log").write_bytes(b"old samples")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')


def test_a_fresh_run_moves_a_previous_runs_state_aside(tmp_path):
    run_dir = tmp_path / "run"
    previous_run(run_dir)
    config = load_config(None, [f"run.dir={run_dir}"])
    assert prepare_run_dir(config) == run_dir
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "logs", "tmp"]  # nothing to replay
    (moved,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert (moved / "wal" / "segment-000001.log").read_bytes() == b"old samples"  # nothing lost
    previous_run(run_dir)  # twice within the same second: a second, distinct name
    prepare_run_dir(load_config(None, [f"run.dir={run_dir}"]))
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.")]) == 2


def test_resume_keeps_the_run_and_a_fresh_run_moves_an_outside_log(tmp_path):
    run_dir, wal_dir = tmp_path / "run", tmp_path / "log"
    previous_run(run_dir)
    wal_dir.mkdir()
    (wal_dir / "segment-000001.log").write_bytes(b"old")
    prepare_run_dir(load_config(None, [f"run.dir={run_dir}", f"broker.wal_dir={wal_dir}"]), resume=True)
    assert (run_dir / "wal" / "segment-000001.log").exists() and (wal_dir / "segment-000001.log").exists()
    prepare_run_dir(load_config(None, [f"run.dir={run_dir}", f"broker.wal_dir={wal_dir}"]))
    assert not (run_dir / "wal").exists() and not wal_dir.exists()
    assert sorted(p.name.split(".")[0] for p in tmp_path.iterdir()) == ["log", "run", "run"]


def test_a_relative_log_folder_is_made_absolute_where_the_run_starts(tmp_path, monkeypatch):
    """Roles run from the repository root; the folder they log to is the one named where the run started."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "segment-000001.log").write_bytes(b"old")
    config = load_config(None, [f"run.dir={tmp_path / 'run'}", "broker.wal_dir=log"])
    prepare_run_dir(config)
    assert config.broker.wal_dir == tmp_path / "log" and not (tmp_path / "log").exists()
    assert "wal_dir: " + str(tmp_path / "log") in (tmp_path / "run" / "config.yaml").read_text()


def test_every_path_the_roles_read_is_made_absolute_where_the_run_starts(tmp_path, monkeypatch):
    """Found by a helper's hunt: only run.dir and broker.wal_dir were, so a model or dataset named relative to the
    user's folder was looked for in the repository's (where the roles run): "does not exist", or another file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "data.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    config = load_config(None, [
        "run.dir=run", "model.path=mymodel", "model.cache_dir=cache", "task.name=dataset", "task.dataset.source=jsonl",
        "task.dataset.path=data.jsonl", "broker.curve.keys_dir=keys", "eval.out=evals",
    ])  # fmt: skip
    prepare_run_dir(config)
    paths = [config.run.dir, Path(config.model.path), config.model.cache_dir, config.task.dataset.path,
             config.broker.curve.keys_dir, config.eval.out]  # fmt: skip
    assert paths == [tmp_path / name for name in ("run", "mymodel", "cache", "data.jsonl", "keys", "evals")]
    assert load_config(tmp_path / "run" / "config.yaml", []) == config  # what the roles read


def test_a_home_relative_path_means_the_users_home(tmp_path, monkeypatch):
    """Found by a helper's hunt: `~/data.jsonl` was refused as missing (model.path alone expanded `~`)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    config = load_config(None, ["task.name=dataset", "task.dataset.source=jsonl", "task.dataset.path=~/data.jsonl"])
    assert config.task.dataset.path == tmp_path / "data.jsonl"


def test_an_empty_or_new_run_directory_is_used_as_it_is(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    prepare_run_dir(load_config(None, [f"run.dir={run_dir}"]))
    prepare_run_dir(load_config(None, [f"run.dir={tmp_path / 'new'}"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "run"]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def described(pids: list[int]) -> list[str]:
    """What a role that did not stop is doing: its command, state, kernel wait channel and signal masks."""
    out = []
    for pid in pids:
        try:
            status = {k: v.strip() for k, v in (line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())}
            wchan = Path(f"/proc/{pid}/wchan").read_text()
            cmd = " ".join(psutil.Process(pid).cmdline()[-3:])
            masks = {k: status[k] for k in ("State", "PPid", "Threads", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")}
            out.append(f"{pid} ({cmd}) wchan={wchan} {masks}")
        except (OSError, psutil.Error) as exc:
            out.append(f"{pid}: {exc}")
    return out


def start_supervisor(run_dir, endpoints, **popen) -> subprocess.Popen:
    """`launch.py --role all` on the tiny config."""
    return subprocess.Popen([
        sys.executable, str(ROOT / "launch.py"), "--role", "all", "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"run.dir={run_dir}", f"endpoints.broker={endpoints['broker']}", f"endpoints.weights={endpoints['weights']}",
    ], **{"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen})  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, "SIGHUP under nohup"])
def test_no_role_outlives_the_supervisor(tmp_path, endpoints, tiny_model_dir, sig):
    """Found by a helper's hunt: only Ctrl-C stopped the roles; a supervisor stopped by kill, timeout or a
    scheduler left the broker, actors and learner running (the broker holding its port). And by a review: a
    hangup that nohup ignores must stay ignored (the run outlives the terminal)."""
    nohup = sig == "SIGHUP under nohup"
    parent = start_supervisor(tmp_path, endpoints, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN) if nohup else None)
    roles: list[int] = []
    try:
        wait_for(lambda: len(psutil.Process(parent.pid).children()) == 3, 120, "broker, actor and learner to start")
        roles += [child.pid for child in psutil.Process(parent.pid).children()]
        time.sleep(3)  # the roles are importing or loading: a signal must stop them wherever they are
        if nohup:
            parent.send_signal(signal.SIGHUP)
            time.sleep(3)
            assert parent.poll() is None and not any(gone(pid) for pid in roles)
            sig = signal.SIGTERM
        parent.send_signal(sig)
        parent.wait(timeout=60)
        try:
            wait_for(lambda: all(gone(pid) for pid in roles), 60, "every role to stop")
        except AssertionError as err:
            raise AssertionError(f"{err}; still running: {described([pid for pid in roles if not gone(pid)])}") from None
    finally:
        for pid in [parent.pid, *roles]:
            if not gone(pid):
                psutil.Process(pid).kill()


def test_a_learner_stopped_before_its_last_step_fails_the_run(tmp_path, endpoints):
    """Found by a helper's hunt: a learner asked to stop exits 0 (to be resumed later), and the supervisor took
    that for a finished run: exit 0, "done: N steps", with no step trained."""
    parent = start_supervisor(tmp_path, endpoints, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (tmp_path / "logs" / "learner.log").exists() and "learner" in (tmp_path / "logs" / "learner.log").read_text(),
                 120, "the learner to log")  # fmt: skip
        (learner,) = [c for c in psutil.Process(parent.pid).children() if "learner" in c.cmdline()]
        learner.terminate()
        output, _ = parent.communicate(timeout=120)
        assert parent.returncode == 1 and "the learner stopped at step 0 of 32" in output, output[-2000:]
    finally:
        if parent.poll() is None:
            parent.kill()
