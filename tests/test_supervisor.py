"""The run directory a fresh run starts in: a previous run's state is moved aside, never replayed or deleted."""

from __future__ import annotations

from protocol.config import load_config
from scripts.supervisor import prepare_run_dir


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


def test_an_empty_or_new_run_directory_is_used_as_it_is(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    prepare_run_dir(load_config(None, [f"run.dir={run_dir}"]))
    prepare_run_dir(load_config(None, [f"run.dir={tmp_path / 'new'}"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "run"]
