"""The eval role: pass@k arithmetic, split selection, and an end-to-end run through launch.py with real vLLM."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from math import comb

import orjson
import pytest

import launch
from actors.datasets import Record
from actors.evaluate import pass_at_k, select, watch_checkpoints
from protocol.config import load_config
from protocol.errors import TaskError
from protocol.files import read_rows
from tests.conftest import ROOT


@pytest.mark.parametrize("n,c,k", [(5, 2, 2), (10, 0, 3), (10, 10, 1), (20, 3, 1), (20, 3, 5), (8, 7, 2), (200, 13, 10)])
def test_pass_at_k_matches_the_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_is_the_chance_a_random_k_subset_holds_a_correct_sample():
    n, c = 6, 2
    for k in range(1, n + 1):
        subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k(7, 3, 1) == pytest.approx(3 / 7)


def test_select_splits_and_limit():
    records = [Record(f"q{i}", str(i), str(i)) for i in range(10)]
    ids = lambda rs: [r.id for r in rs]  # noqa: E731
    assert ids(select(records, "heldout", 3, None)) == ["7", "8", "9"]
    assert ids(select(records, "train", 3, 2)) == ["0", "1"]
    assert ids(select(records, "all", 3, 4)) == ["0", "1", "2", "3"]
    with pytest.raises(TaskError, match="needs task.holdout > 0"):
        select(records, "heldout", 0, None)


PLUGIN = "def even(completion, answer):\n    return (1.0, True) if len(completion) % 2 == 0 else (0.0, False)\n"


@pytest.mark.slow
def test_eval_end_to_end_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "even_rewards.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path / "ipc"))
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": 2 * i}) + "\n" for i in range(6)))
    common = [f"run.dir={tmp_path / 'run'}", "model.path=builtin:tiny-random", "task.name=dataset", "task.dataset.source=jsonl",
              f"task.dataset.path={data}", "task.holdout=3"]  # fmt: skip
    args = ["--role", "eval", *common, "task.reward.function=even_rewards:even", "eval.split=heldout", "eval.limit=2",
            "eval.samples=4", "eval.k=[1,2,4]", "eval.max_tokens=6"]  # fmt: skip
    assert launch.main(args) == 0
    out = tmp_path / "run" / "eval"
    rows = [orjson.loads(line) for line in (out / "results.jsonl").read_bytes().splitlines()]
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert [r["id"] for r in rows] == ["qa-3", "qa-4"] and [r["answer"] for r in rows] == ["6", "8"]
    assert all(r["greedy_correct"] == (len(r["greedy"]) % 2 == 0) and 0 < r["greedy_tokens"] <= 6 for r in rows)
    assert all(r["samples"] == 4 and 0 <= r["samples_correct"] <= 4 for r in rows)
    assert summary["problems"] == 2 and summary["split"] == "heldout" and summary["reward_failures"] == 0
    assert summary["pass@1_greedy"] == sum(r["greedy_correct"] for r in rows) / 2
    for k in (1, 2, 4):
        assert summary[f"pass@{k}"] == pytest.approx(sum(pass_at_k(4, r["samples_correct"], k) for r in rows) / 2)
    assert summary["pass@1"] <= summary["pass@2"] <= summary["pass@4"]
    # greedy decoding is deterministic: a second run writes the same replies
    assert launch.main(args[:-3] + ["eval.samples=0", "eval.k=[1]", "eval.max_tokens=6"]) == 0
    again = [orjson.loads(line) for line in (out / "results.jsonl").read_bytes().splitlines()]
    assert [r["greedy"] for r in again] == [r["greedy"] for r in rows]
    # a task without answers is refused, named, before any generation
    assert launch.main(["--role", "eval", f"run.dir={tmp_path / 'run'}", "model.path=builtin:tiny-random", "task.name=token_range"]) == 2
    assert "eval needs a task with problems and answers" in capsys.readouterr().err


def write_checkpoint(source, target, noise: float) -> None:
    """A checkpoint folder like the learner's (written beside, then renamed), with perturbed weights."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    tmp = target.with_name(target.name + ".tmp")
    shutil.copytree(source, tmp)
    generator = torch.Generator().manual_seed(1)
    weights = {k: v + noise * torch.randn(v.shape, generator=generator) for k, v in load_file(tmp / "model.safetensors").items()}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    tmp.rename(target)


@pytest.mark.slow
def test_watch_scores_each_checkpoint_as_it_lands_with_weights_swapped_in_place(tmp_path, tiny_model_dir, monkeypatch):
    import threading
    import time

    from actors.evaluate import run_eval
    from protocol.config import load_config

    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path / "ipc"))
    run_dir, data = tmp_path / "run", tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": 2 * i}) + "\n" for i in range(3)))
    (run_dir / "checkpoints").mkdir(parents=True)
    write_checkpoint(tiny_model_dir, run_dir / "checkpoints" / "step_000001", noise=0.0)
    overrides = [f"run.dir={run_dir}", "model.path=builtin:tiny-random", "task.name=dataset", "task.dataset.source=jsonl",
                 f"task.dataset.path={data}", "task.reward.function=exact", "train.steps=2", "eval.max_tokens=8"]  # fmt: skip
    stop, metrics = threading.Event(), run_dir / "eval_metrics.jsonl"

    def learner_writes_step_2():  # after the first evaluation, as a learner would
        deadline = time.monotonic() + 300
        while not metrics.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        write_checkpoint(tiny_model_dir, run_dir / "checkpoints" / "step_000002", noise=0.5)

    threading.Thread(target=learner_writes_step_2, daemon=True).start()
    give_up = threading.Timer(300, stop.set)  # never hang the suite
    give_up.daemon = True
    give_up.start()
    assert run_eval(load_config(None, [*overrides, "eval.watch=true"]), stop) is None
    give_up.cancel()
    assert [orjson.loads(line)["step"] for line in metrics.read_bytes().splitlines()] == [1, 2]
    greedy = {s: [orjson.loads(x)["greedy"] for x in (run_dir / "eval" / f"step_00000{s}" / "results.jsonl").read_bytes().splitlines()]
              for s in (1, 2)}  # fmt: skip
    assert greedy[1] != greedy[2]
    fresh = load_config(None, [*overrides, f"eval.model={run_dir / 'checkpoints' / 'step_000002'}", f"eval.out={tmp_path / 'fresh'}"])
    run_eval(fresh)
    assert [orjson.loads(x)["greedy"] for x in (tmp_path / "fresh" / "results.jsonl").read_bytes().splitlines()] == greedy[2]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_eval_stops_at_once_when_asked_while_it_generates(tmp_path, sig):
    """Found by a helper's hunt: the eval role set a stop flag that nothing checked while vLLM generated, so
    Ctrl-C and SIGTERM were ignored until the whole eval was done (minutes); only kill -9 stopped it."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": 2 * i}) + "\n" for i in range(2000)))
    eval_role = subprocess.Popen([
        sys.executable, str(ROOT / "launch.py"), "--role", "eval", f"run.dir={tmp_path / 'run'}", "model.path=builtin:tiny-random",
        "task.name=dataset", "task.dataset.source=jsonl", f"task.dataset.path={data}", "task.reward.function=exact",
        "eval.samples=16", "eval.max_tokens=64",
    ], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    # as a background job of a script, SIGINT comes ignored: the role kept ignoring it (a CI run in the background failed)
    try:
        for line in eval_role.stdout:
            if "evaluating" in line:  # the engine is up and generating
                break
        threading.Thread(target=eval_role.stdout.read, daemon=True).start()  # a full pipe would hold its exit
        time.sleep(2)
        asked = time.monotonic()
        eval_role.send_signal(sig)
        assert eval_role.wait(timeout=60) == 130 and time.monotonic() - asked < 30
        assert not (tmp_path / "run" / "eval" / "summary.json").exists()
    finally:
        if eval_role.poll() is None:
            eval_role.kill()


class EvaluatorStandIn:
    """Stands in for the vLLM evaluator (its engine takes a minute to start): the learner prunes the checkpoint
    being loaded and saves a newer one meanwhile, so the load fails on a folder that is gone."""

    def __init__(self, run_dir):
        self.config = load_config(None, [f"run.dir={run_dir}", "train.steps=2"])
        self.evaluated = []

    def evaluate(self, path, out, name):
        if path.name == "step_000001":
            (path.parent / "step_000002").mkdir()
            shutil.rmtree(path)
            raise FileNotFoundError(path / "model.safetensors")
        self.evaluated.append(path.name)
        return {"problems": 3, "pass@1": 0.5}


def test_watch_goes_on_when_the_checkpoint_it_loads_is_pruned(tmp_path):
    """A review found the watcher died when `train.keep_checkpoints` deleted the checkpoint it was loading."""
    (tmp_path / "checkpoints" / "step_000001").mkdir(parents=True)
    evaluator = EvaluatorStandIn(tmp_path)
    watch_checkpoints(evaluator, tmp_path / "eval", threading.Event())
    assert evaluator.evaluated == ["step_000002"]
    assert read_rows(tmp_path / "eval_metrics.jsonl") == [{"step": 2, "problems": 3, "pass@1": 0.5}]
