"""The run-config schema: one YAML file validated by pydantic, shared by every role.

Unknown keys and wrong types are errors that name the dotted key, raised before any
process starts. Command-line overrides are `section.key=value`, parsed as YAML scalars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    dir: Path = Path("runs/default")
    seed: int = 0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class ModelSection(Section):
    path: str = "builtin:smollm2-135m-instruct"
    """An HF folder, or `builtin:smollm2-135m-instruct` / `builtin:tiny-random` (built once into the cache)."""
    cache_dir: Path | None = None
    max_model_len: int = Field(512, gt=0)


class TaskSection(Section):
    name: Literal["arithmetic", "token_range"] = "arithmetic"
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


class SamplingSection(Section):
    group_size: int = Field(4, ge=2)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0.0)


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


class CurveSection(Section):
    enabled: bool = False
    """Encrypt and authenticate every broker connection with CurveZMQ (keys from `launch.py keygen DIR`)."""
    keys_dir: Path = Path("keys")
    """Holds server.key(_secret), the role's client.key_secret, and allowed/*.key (client public keys the broker accepts)."""


class BrokerSection(Section):
    max_policy_lag: int = Field(2, ge=0)
    """Groups whose oldest sample started more than this many versions ago are dropped (counted)."""
    credits_per_actor: int = Field(64, ge=1)
    """Samples an actor may have buffered in the broker; a slow learner makes actors wait."""
    max_message_bytes: int = Field(64 << 20, gt=0)
    """Larger messages are refused (ZeroMQ drops the peer's message, decode rejects it)."""
    memory_budget_mb: float = Field(1024, gt=0)
    """Bytes of sample arrays the broker may buffer, shared equally by actor.count actors; caps each actor's credits."""
    durable: bool = True
    """Write-ahead log every accepted sample and acknowledge it only once fsynced; replayed on restart."""
    wal_dir: Path | None = None
    """Where the write-ahead log lives (default: run.dir/wal)."""
    fsync_interval_ms: float = Field(5.0, ge=0)
    """Group commit: keep taking messages for up to this long before one fsync acknowledges them all."""
    fsync_every: int = Field(1024, ge=1)
    """Group commit: fsync as soon as this many samples wait for their acknowledgement."""
    segment_mb: float = Field(64, gt=0)
    """Log segment size; a segment is deleted once every sample in it was consumed, dropped or expired."""
    actor_ttl_s: float = Field(60.0, gt=0)
    """An actor incarnation silent this long is dead: its partial groups are dropped (counted as expired)."""
    curve: CurveSection = CurveSection()


class ActorSection(Section):
    count: int = Field(1, ge=1)
    engine: Literal["vllm"] = "vllm"
    threads: int = Field(1, ge=1)
    groups_in_flight: int = Field(4, ge=1)
    kv_cache_gb: int = Field(1, ge=1)
    resend_after_s: float = Field(5.0, gt=0)


class LearnerSection(Section):
    threads: int = Field(1, ge=1)
    world_size: int = Field(1, ge=1)
    """Ranks of FSDP2 data parallelism (gloo on CPU, NCCL on GPU); launch.py starts them."""
    master_port: int = Field(29500, gt=0, lt=65536)
    """torch.distributed rendezvous port on the learner's host (world_size > 1)."""
    mixed_precision: bool = True
    """GPU only: bf16 parameters and activations, fp32 gradient reduction."""
    activation_checkpointing: bool = False
    weight_transport: Literal["tcp"] = "tcp"
    """How new weights reach actors; `tcp` is the CPU channel (NCCL lands in a later issue)."""


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
