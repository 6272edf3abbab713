"""ModelDeployment: a model to serve, its latency SLOs, its traffic and where it may run.

Field names follow the anchors where that costs nothing: Dynamo's `sla`/`workload`/`hardware`
split (here `slo`, `traffic`, `hardware`), OME/llm-d's accelerator classes, AIBrix's roles.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from tessera.api.common import (
    ApiModel,
    Condition,
    CustomResource,
    CustomResourceInfo,
    PriorityTier,
    cel_rules,
)
from tessera.api.scheduler import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    SchedulerConfig,
)


class Dtype(StrEnum):
    """Numeric format of weights and KV cache."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"
    FP32 = "fp32"

    @property
    def bytes(self) -> float:
        return {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "fp32": 4.0}[self.value]


class ServingMode(StrEnum):
    """How prefill and decode are laid out. `auto` lets the planner choose."""

    AUTO = "auto"
    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"
    ATTENTION_OFFLOAD = "attention-offload"


class PoolRole(StrEnum):
    """What a pool of replicas does."""

    COLOCATED = "colocated"
    PREFILL = "prefill"
    DECODE = "decode"
    ATTENTION = "attention"


class Objective(StrEnum):
    """What the planner minimises once the SLO holds."""

    COST = "cost"
    POWER = "power"
    ACCELERATORS = "accelerators"


class ModelArchitecture(ApiModel):
    """Shape of a decoder-only transformer: enough to size weights, KV cache and FLOPs."""

    model_config = cel_rules(
        (
            "self.numAttentionHeads % self.numKeyValueHeads == 0",
            "numAttentionHeads must be a multiple of numKeyValueHeads",
        )
    )

    num_layers: int = Field(gt=0, description="Number of transformer layers.")
    hidden_size: int = Field(gt=0, description="Model (residual) dimension.")
    num_attention_heads: int = Field(gt=0, description="Query heads per layer.")
    num_key_value_heads: int = Field(
        gt=0, description="Key/value heads per layer (fewer than query heads with GQA)."
    )
    head_dim: int | None = Field(
        default=None, gt=0, description="Dimension per head; defaults to hiddenSize/heads."
    )
    intermediate_size: int = Field(gt=0, description="Feed-forward (SwiGLU) inner dimension.")
    vocab_size: int = Field(gt=0, description="Vocabulary size.")
    dtype: Dtype = Field(default=Dtype.BF16, description="Weights and KV-cache format.")
    parameter_count: int | None = Field(
        default=None,
        gt=0,
        description="Total parameters; derived from the shape when omitted.",
    )
    max_context_tokens: int = Field(
        default=8192, gt=0, description="Longest prompt+output a request may have."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelArchitecture:
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                "numAttentionHeads must be a multiple of numKeyValueHeads "
                f"(got {self.num_attention_heads} and {self.num_key_value_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError("hiddenSize must be divisible by numAttentionHeads, or set headDim")
        return self

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def resolved_parameter_count(self) -> int:
        """Parameters from the shape (Llama layout) unless declared."""
        if self.parameter_count is not None:
            return self.parameter_count
        head_dim = self.resolved_head_dim
        attention = (
            self.hidden_size
            * head_dim
            * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        )
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attention + mlp + 2 * self.hidden_size
        return self.num_layers * per_layer + 2 * self.vocab_size * self.hidden_size

    @property
    def weight_bytes(self) -> float:
        return self.resolved_parameter_count * self.dtype.bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """Bytes of K and V per token across all layers."""
        return (
            2 * self.num_layers * self.num_key_value_heads * self.resolved_head_dim
        ) * self.dtype.bytes


class ModelSpec(ApiModel):
    """Which model to serve."""

    name: str = Field(min_length=1, description="Model name, e.g. meta-llama/Llama-3.1-8B.")
    weights_uri: str | None = Field(
        default=None,
        description="Where the weights are (hf://, s3://, pvc://, file://); agents load from here.",
    )
    architecture: ModelArchitecture = Field(description="Shape of the model.")


class SloSpec(ApiModel):
    """Latency targets. A request meets its SLO when both TTFT and TPOT are within target."""

    ttft_ms: float = Field(gt=0, description="Time-to-first-token target, milliseconds.")
    tpot_ms: float = Field(
        gt=0, description="Time-per-output-token (inter-token latency) target, milliseconds."
    )
    percentile: float = Field(
        default=90.0,
        gt=0,
        le=100,
        description="Percentile at which the targets apply (e.g. 90 for p90).",
    )
    attainment_target: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Fraction of requests that must meet both targets.",
    )


class LengthDistribution(ApiModel):
    """A token-length distribution (prompt or output)."""

    distribution: Literal["fixed", "normal", "lognormal", "exponential"] = Field(
        default="lognormal", description="Family of the distribution."
    )
    mean: float = Field(gt=0, description="Mean length in tokens.")
    stddev: float = Field(default=0.0, ge=0, description="Standard deviation in tokens.")
    max: int | None = Field(default=None, gt=0, description="Lengths are clipped to this.")

    @model_validator(mode="after")
    def _max_not_below_mean(self) -> LengthDistribution:
        if self.max is not None and self.max < self.mean:
            raise ValueError(f"max ({self.max}) must not be below mean ({self.mean})")
        return self


class TrafficProfile(StrEnum):
    """Named traffic shapes, from the Azure LLM inference traces (Splitwise)."""

    CHAT = "chat"
    CODE = "code"
    SUMMARIZATION = "summarization"
    LONG_CONTEXT = "long-context"


class TrafficSpec(ApiModel):
    """The load the deployment must carry."""

    model_config = cel_rules(
        (
            "has(self.profile) || (has(self.promptTokens) && has(self.outputTokens))",
            "set traffic.profile, or both traffic.promptTokens and outputTokens",
        )
    )

    request_rate_per_second: float = Field(
        gt=0, description="Expected arrival rate, requests per second."
    )
    profile: TrafficProfile | None = Field(
        default=None,
        description="Named length profile; fills promptTokens/outputTokens when those are omitted.",
    )
    prompt_tokens: LengthDistribution | None = Field(
        default=None, description="Prompt (input) length distribution."
    )
    output_tokens: LengthDistribution | None = Field(
        default=None, description="Output length distribution."
    )

    @model_validator(mode="after")
    def _lengths_known(self) -> TrafficSpec:
        if self.profile is None and (self.prompt_tokens is None or self.output_tokens is None):
            raise ValueError("set traffic.profile, or both traffic.promptTokens and outputTokens")
        return self

    def resolved_lengths(self) -> tuple[LengthDistribution, LengthDistribution]:
        """Prompt and output distributions, from the explicit fields or the profile."""
        profile = PROFILE_LENGTHS.get(self.profile) if self.profile else None
        prompt = self.prompt_tokens or (profile[0] if profile else None)
        output = self.output_tokens or (profile[1] if profile else None)
        assert prompt is not None and output is not None  # ensured by the validator
        return prompt, output


# Means and spreads measured on the Azure 2023 traces (conversation, code) in ../shared/data;
# summarization and long-context are the usual shapes of those workloads.
PROFILE_LENGTHS: dict[TrafficProfile, tuple[LengthDistribution, LengthDistribution]] = {
    TrafficProfile.CHAT: (
        LengthDistribution(mean=1155, stddev=1109, max=8192),
        LengthDistribution(mean=211, stddev=163, max=2048),
    ),
    TrafficProfile.CODE: (
        LengthDistribution(mean=2048, stddev=1973, max=8192),
        LengthDistribution(mean=28, stddev=60, max=1024),
    ),
    TrafficProfile.SUMMARIZATION: (
        LengthDistribution(mean=4096, stddev=2048, max=16384),
        LengthDistribution(mean=256, stddev=128, max=1024),
    ),
    TrafficProfile.LONG_CONTEXT: (
        LengthDistribution(mean=32768, stddev=16384, max=131072),
        LengthDistribution(mean=512, stddev=256, max=4096),
    ),
}


class HardwareSpec(ApiModel):
    """Which hardware the deployment may use."""

    accelerator_classes: list[str] = Field(
        default_factory=list,
        description="AcceleratorClass names allowed; empty allows every class.",
    )
    max_accelerators: int | None = Field(
        default=None, gt=0, description="Upper bound on accelerators across all pools."
    )


class ReplicaBounds(ApiModel):
    """Bounds on one pool's replica count."""

    model_config = cel_rules(
        ("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas")
    )

    min_replicas: int = Field(default=0, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(default=64, ge=1, description="Most replicas.")

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaBounds:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) exceeds maxReplicas ({self.max_replicas})"
            )
        return self


class PoolsSpec(ApiModel):
    """Replica bounds per pool role; a role left out is unbounded (0..64)."""

    colocated: ReplicaBounds = Field(default_factory=ReplicaBounds)
    prefill: ReplicaBounds = Field(default_factory=ReplicaBounds)
    decode: ReplicaBounds = Field(default_factory=ReplicaBounds)
    attention: ReplicaBounds = Field(default_factory=ReplicaBounds)

    def bounds(self, role: PoolRole) -> ReplicaBounds:
        bounds: ReplicaBounds = getattr(self, role.value)
        return bounds


class EngineKind(StrEnum):
    """Which server a pool's pods run."""

    TESSERA = "tessera"
    """`tessera serve` (every role: colocated, prefill, decode, attention)."""
    VLLM = "vllm"
    """`vllm serve` from a vLLM image: colocated pools, driven by vLLM's own flags."""


TESSERA_IMAGE = "ghcr.io/tessera-dev/tessera:0.1.0"
VLLM_IMAGE = "vllm/vllm-openai:v0.10.2"
"""vLLM's OpenAI-compatible server image (Docker Hub), for `engine.kind: vllm`."""


class EngineSpec(ApiModel):
    """The serving container each replica runs."""

    kind: EngineKind = Field(
        default=EngineKind.TESSERA,
        description="The server the pods run: tessera (`tessera serve`) or vllm (`vllm serve`, "
        "for vLLM images; colocated serving only). Either way the plan's scheduler settings "
        "and parallelism reach it as flags.",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        description=f"Container image; default {TESSERA_IMAGE}, or {VLLM_IMAGE} for kind vllm.",
    )
    port: int = Field(default=8000, gt=0, lt=65536, description="Serving port.")
    extra_args: list[str] = Field(default_factory=list, description="Extra engine arguments.")

    @property
    def container_image(self) -> str:
        """The image the pods run: `image`, else the kind's default."""
        if self.image:
            return self.image
        return VLLM_IMAGE if self.kind is EngineKind.VLLM else TESSERA_IMAGE


class AutoscalingSpec(ApiModel):
    """The closed loop: observed load re-plans the pools' replicas (operator/autoscaler.py).

    Telemetry (request rate and output lengths the serving instances report through the node
    agents) feeds the re-planner every `intervalSeconds`: pools grow at once when the observed
    rate needs it and shrink only after `scaleDownDelaySeconds` of utilisation below
    `scaleDownUtilization`. A replica taken away drains first: its pod's preStop hook asks the
    server to migrate its running requests to other replicas within `drainDeadlineSeconds`.
    """

    enabled: bool = Field(default=False, description="Re-plan replicas from observed load.")
    interval_seconds: float = Field(
        default=30.0, ge=1, le=3600, description="Seconds between two re-planning rounds."
    )
    window_seconds: float = Field(
        default=120.0, ge=1, le=86400, description="Telemetry window the load is measured over."
    )
    scale_down_delay_seconds: float = Field(
        default=300.0, ge=0, le=86400, description="Least time since the last change to shrink."
    )
    scale_down_utilization: float = Field(
        default=0.6,
        gt=0,
        le=1,
        description="Shrink only when the pools would stay below this busy fraction.",
    )
    drain_deadline_seconds: int = Field(
        default=60,
        ge=1,
        le=3600,
        description="Longest a replica being removed spends migrating its requests away; its "
        "pod's terminationGracePeriodSeconds is this plus a margin.",
    )


class ModelDeploymentSpec(ApiModel):
    """What the user declares."""

    model_config = cel_rules(
        (
            "!has(self.engine) || !has(self.engine.kind) || self.engine.kind != 'vllm' || "
            "(has(self.servingMode) && self.servingMode == 'colocated')",
            "engine.kind vllm serves colocated pools only: set servingMode: colocated",
        )
    )

    model: ModelSpec = Field(description="The model to serve.")
    slo: SloSpec = Field(description="Latency targets and how often they must hold.")
    traffic: TrafficSpec = Field(description="Expected load and request shapes.")
    serving_mode: ServingMode = Field(
        default=ServingMode.AUTO, description="Prefill/decode layout; auto lets Tessera choose."
    )
    hardware: HardwareSpec = Field(
        default_factory=HardwareSpec, description="Where the deployment may run."
    )
    pools: PoolsSpec = Field(default_factory=PoolsSpec, description="Replica bounds per role.")
    objective: Objective = Field(
        default=Objective.COST, description="What to minimise once the SLO holds."
    )
    priority: PriorityTier = Field(
        default="normal",
        description="Tier used by power capping and migration: low tiers are capped first.",
    )
    priority_class_name: str | None = Field(
        default=None, description="Kubernetes PriorityClass for the pods."
    )
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Serving container.")
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec,
        description="Scale pools from observed load (off by default: the plan follows traffic).",
    )

    @model_validator(mode="after")
    def _vllm_is_colocated(self) -> ModelDeploymentSpec:
        # vLLM pods take no KV from another pool here (no prefill/decode transport, no
        # attention workers), so the planner must not split the roles for them.
        if self.engine.kind is EngineKind.VLLM and self.serving_mode is not ServingMode.COLOCATED:
            raise ValueError(
                "engine.kind vllm serves colocated pools only: set servingMode: colocated "
                f"(got {self.serving_mode.value})"
            )
        return self


class PoolLoad(ApiModel):
    """The load the planner expects one pool to carry."""

    request_rate_per_second: float = Field(ge=0, description="Requests/s into the pool.")
    tokens_per_second: float = Field(ge=0, description="Tokens/s the pool processes.")
    utilization: float = Field(ge=0, description="Busy fraction per replica (0..1).")


class PoolPlan(ApiModel):
    """One pool of the plan in force, with the engine scheduler the plan was scored with."""

    name: str = Field(description="Pool name, unique in the deployment (e.g. prefill-h100).")
    role: PoolRole = Field(description="What the pool does.")
    accelerator_class: str = Field(description="AcceleratorClass the pool runs on.")
    tensor_parallel: int = Field(ge=1, description="Accelerators per replica (TP degree).")
    replicas: int = Field(ge=0, description="Number of replicas.")
    predicted_load: PoolLoad | None = Field(default=None, description="Expected load.")
    prefill_chunk_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Chunked prefill: tokens per engine iteration (vLLM's max_num_batched_tokens "
        "with chunked prefill), running decodes first and prompt chunks in the rest. Absent: "
        "whole prompts, prefilled in iterations of their own that stall running decodes.",
    )
    max_running_requests: int | None = Field(
        default=None,
        ge=1,
        description="Requests one replica runs at once (vLLM's max_num_seqs), as the plan was "
        "sized. Absent (attention pools, plans written before it was recorded): the engine's "
        "default.",
    )
    attention_for: str | None = Field(
        default=None,
        min_length=1,
        description="Attention pools only: the decode pool whose attention (and KV cache) this "
        "pool serves (Lamina's attention offload); each of its replicas serves one replica of "
        "that pool.",
    )

    def scheduler(self, max_context_tokens: int) -> SchedulerConfig:
        """The engine scheduler this pool records, in vLLM's terms (the one translation from
        the CRD's fields): chunked prefill under a `prefillChunkTokens` budget, or whole
        prompts under a budget of at least one longest prompt, as vLLM sizes it (an engine
        must fit a whole prompt into one step); `maxRunningRequests` or vLLM's default cap."""
        max_num_seqs = self.max_running_requests or DEFAULT_MAX_NUM_SEQS
        if self.prefill_chunk_tokens is not None:
            return SchedulerConfig(max_num_seqs, self.prefill_chunk_tokens, True)
        budget = max(max_context_tokens, DEFAULT_MAX_NUM_BATCHED_TOKENS)
        return SchedulerConfig(max_num_seqs, budget, False)


class Plan(ApiModel):
    """The placement the operator applies, with why."""

    mode: ServingMode = Field(description="Chosen layout.")
    pools: list[PoolPlan] = Field(description="Pools to run.")
    cost_per_hour: float = Field(ge=0, description="Accelerator cost of the plan, per hour.")
    power_w: float = Field(ge=0, description="Provisioned (TDP) power of the plan, watts.")
    predicted_ttft_ms: float | None = Field(default=None, description="Predicted TTFT.")
    predicted_tpot_ms: float | None = Field(default=None, description="Predicted TPOT.")
    predicted_attainment: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Fraction of requests the planner's queueing model predicts meet the SLO.",
    )
    simulated_attainment: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Fraction of requests that met the SLO in a short simulation of the plan.",
    )
    rationale: str = Field(description="Why this plan: the binding constraint and the choice.")

    @model_validator(mode="after")
    def _attention_pools_name_their_decode_pool(self) -> Plan:
        decode = {p.name for p in self.pools if p.role is PoolRole.DECODE}
        for pool in self.pools:
            if pool.role is not PoolRole.ATTENTION:
                if pool.attention_for is not None:
                    raise ValueError(
                        f"pools[{pool.name}].attentionFor: only attention pools serve another "
                        f"pool (this one is {pool.role.value})"
                    )
            elif pool.attention_for not in decode:
                raise ValueError(
                    f"pools[{pool.name}].attentionFor: {pool.attention_for!r} must name a decode "
                    f"pool of this plan ({', '.join(sorted(decode)) or 'none'})"
                )
        return self

    def attention_pool_for(self, decode_pool: str) -> PoolPlan | None:
        """The attention pool serving `decode_pool`, if its attention is offloaded."""
        return next((p for p in self.pools if p.attention_for == decode_pool), None)

    @property
    def accelerators(self) -> int:
        return sum(p.tensor_parallel * p.replicas for p in self.pools)

    def devices_by_class(self) -> dict[str, int]:
        """Devices the plan takes from each accelerator class."""
        devices: dict[str, int] = {}
        for pool in self.pools:
            count = pool.tensor_parallel * pool.replicas
            devices[pool.accelerator_class] = devices.get(pool.accelerator_class, 0) + count
        return devices


class AutoscalingStatus(ApiModel):
    """What the closed loop observed and decided in its last round."""

    observed_request_rate_per_second: float | None = Field(
        default=None, ge=0, description="Requests/s the serving instances took in the window."
    )
    observed_mean_output_tokens: float | None = Field(
        default=None, ge=0, description="Mean output tokens of the requests finished in it."
    )
    instances: int = Field(default=0, ge=0, description="Serving instances that reported.")
    last_round_time: str | None = Field(default=None, description="When the last round ran.")
    last_scale_time: str | None = Field(
        default=None, description="When the loop last changed the plan (hysteresis starts here)."
    )
    replicas: dict[str, int] = Field(
        default_factory=dict, description="Replicas per pool after the last round."
    )
    reason: str = Field(default="", description="Why the last round kept or changed the plan.")


class ModelDeploymentStatus(ApiModel):
    """What the operator reports."""

    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation this status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Progressing, Degraded."
    )
    plan: Plan | None = Field(default=None, description="The plan in force.")
    ready_replicas: int = Field(default=0, ge=0, description="Ready replicas across all pools.")
    endpoint: str | None = Field(default=None, description="In-cluster URL of the service.")
    autoscaling: AutoscalingStatus | None = Field(
        default=None, description="The closed loop's last round (autoscaling.enabled only)."
    )


class ModelDeployment(CustomResource):
    """A model served at its SLO, at least cost, on the hardware it is allowed."""

    crd: ClassVar[CustomResourceInfo] = CustomResourceInfo(
        kind="ModelDeployment",
        plural="modeldeployments",
        singular="modeldeployment",
        short_names=["md", "mdep"],
        scope="Namespaced",
        printer_columns=[
            {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
            {"name": "Mode", "type": "string", "jsonPath": ".status.plan.mode"},
            {
                "name": "Ready",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
            },
            {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Cost/h", "type": "number", "jsonPath": ".status.plan.costPerHour"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )

    kind: Literal["ModelDeployment"] = "ModelDeployment"
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None
