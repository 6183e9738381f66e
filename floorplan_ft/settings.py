"""One settings object for the whole pipeline, grouped by phase.

Sources, lowest priority first: field defaults (the plans' numbers) < named profile < config file
(TOML or YAML, passed with ``--config``) < ``.env`` < environment variables < explicit overrides.
Environment variables use the prefix ``FTP_`` and ``__`` between group and field, e.g.
``FTP_SAMPLING__SAMPLE_SIZE=500``. Provider keys also accept their usual names
(``OPENAI_API_KEY``, ``GEMINI_API_KEY``/``GOOGLE_API_KEY``) and the provider switch also accepts
``LLM_PROVIDER`` / ``EMBEDDING_PROVIDER``.

Unknown keys anywhere (file, ``FTP_*`` in ``.env``, ``FTP_*`` variables) are rejected with the key named.

The team's own ``python/.env`` keys (their ``RAGConfig``) may sit in the same ``.env`` or in the
environment: those that mean what one of ours means are read (``LLM_BACKEND``, ``VLLM_BASE_URL``,
``VLLM_MODEL_NAME``, ``OPENAI_MODEL``, ``EMBEDDING_DIM``, ``TOP_K``, ``POSTGRES_*``,
``RUNPOD_ENDPOINT_ID``; see ``TEAM_KEYS``) at the lowest priority, just above the defaults, so
every setting of ours (``FTP_*``, config file, profile) wins; the others are ignored with one log
line naming them (never their values).
"""

from __future__ import annotations

import contextvars
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "FTP_"
log = logging.getLogger(__name__)
ProfileName = Literal["production", "local-8gb", "demo"]


class SettingsError(ValueError):
    """A configuration problem; the message names the setting (or file) and what is wrong."""


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathSettings(_Group):
    data_root: str = Field(
        "./data",
        description="Root of every artifact: a local directory or an fsspec URL (s3://bucket/prefix).",
    )
    image_dir: str | None = Field(None, description="Floor-plan PNGs. Default: {data_root}/images.")
    annotation_dir: str | None = Field(
        None,
        description="COCO annotation files, one per image ({stem}.json). Default: {data_root}/annotations.",
    )
    annotation_file: str | None = Field(
        None, description="A single COCO file for the whole set (instead of annotation_dir)."
    )
    corpus_path: str | None = Field(
        None,
        description="Criteria corpus JSON ({id, content, source, keywords} chunks). Default: the shipped one.",
    )
    team_code: str | None = Field(
        None,
        description="The team's repository `python/` folder, put on the import path for cv.source=team-pipeline and prompts.style=team.",
    )


class SamplingSettings(_Group):
    sample_size: int = Field(2000, gt=0, description="Number of plans to sample (phase 0).")
    seed: int = Field(42, description="Random seed for sampling.")
    group_pattern: str | None = Field(
        None,
        description="Regex whose group 'complex' (or group 1) is the complex key; default: filename prefix.",
    )
    group_prefix_len: int = Field(3, gt=0, description="Prefix length of the complex key without a regex.")
    size_low_pct: float = Field(1.0, ge=0, le=100, description="Leave out files below this size percentile.")
    size_high_pct: float = Field(99.0, ge=0, le=100, description="Leave out files above this size percentile.")

    @model_validator(mode="after")
    def _check_percentiles(self) -> SamplingSettings:
        if self.size_low_pct >= self.size_high_pct:
            raise ValueError("size_low_pct must be below size_high_pct")
        return self


class CVSettings(_Group):
    source: Literal["annotations", "plugin", "runpod", "team-pipeline"] = Field(
        "annotations",
        description="Where phase 1 gets its graphs: COCO annotation files (also what synth writes), a detector plugin, the team's RunPod Serverless CV endpoint, or the team's InferencePipeline in process.",
    )
    plugin: str | None = Field(
        None, description="'package.module:factory' returning an object with predict(image) -> detections."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device for the CV plugin.")
    concurrency: int = Field(1, gt=0, description="Images processed at once (1 on a single GPU).")
    chunk_size: int = Field(
        20,
        gt=0,
        description="Images per mapped task run (1: a task run per image; larger cuts engine overhead and keeps run history bounded).",
    )
    clear_cache_every: int = Field(50, gt=0, description="Clear the CUDA cache every N images.")
    overlay: bool = Field(False, description="Also render the graph over the plan (costs 2-3x).")
    strict_categories: bool = Field(
        False,
        description="Reject a whole plan whose detections name an unknown category (default: skip that annotation, counted in the sidecar).",
    )
    runpod_endpoint_id: str | None = Field(
        None,
        validation_alias=AliasChoices("runpod_endpoint_id", "RUNPOD_ENDPOINT_ID"),
        description="RunPod Serverless endpoint id of the team's CV worker (cv.source=runpod; also EMBEDDING_PROVIDER=runpod).",
    )
    runpod_base_url: str = Field("https://api.runpod.ai/v2", description="Base URL of RunPod Serverless endpoints.")
    runpod_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for one RunPod job, polling included (cold starts take minutes)."
    )
    runpod_poll_interval_s: float = Field(2.0, gt=0, description="Seconds between status polls of an IN_PROGRESS job.")
    runpod_max_attempts: int = Field(
        3, gt=0, description="Attempts per image when the job FAILED or its output holds an error."
    )


class RetrievalSettings(_Group):
    provider: Literal["local", "openai", "openai-compatible", "runpod"] = Field(
        "local",
        validation_alias=AliasChoices("provider", "EMBEDDING_PROVIDER"),
        description="Embedding backend.",
    )
    model: str = Field("Qwen/Qwen3-Embedding-0.6B", description="Embedding model id or local directory.")
    dimensions: int = Field(
        768,
        gt=0,
        description="Embedding width (Matryoshka truncation); 1024 by default with the team's table (retrieval.corpus=pgvector:...) or EMBEDDING_PROVIDER=runpod.",
    )
    corpus: str = Field(
        "shipped",
        description="Where the criteria come from: 'shipped' (paths.corpus_path or the packaged corpus) or 'pgvector:TABLE' (the team's table with document, metadata, embedding; DSN serving.pg_dsn).",
    )
    top_k: int = Field(5, gt=0, description="Criteria chunks retrieved per plan.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device for local embeddings.")
    base_url: str | None = Field(None, description="Base URL of an OpenAI-compatible embeddings server.")
    batch_size: int = Field(32, gt=0, description="Texts per embedding call.")

    @model_validator(mode="after")
    def _team_table_width(self) -> RetrievalSettings:
        # The team's pgvector table and their RunPod embedder are 1024 wide: follow them unless
        # dimensions was set (EMBEDDING_DIM, FTP_RETRIEVAL__DIMENSIONS, a file or a profile).
        if "dimensions" not in self.model_fields_set:
            team = self.corpus.startswith("pgvector:") or self.provider == "runpod"
            self.__dict__["dimensions"] = TEAM_EMBEDDING_DIM if team else DEFAULT_EMBEDDING_DIM
        return self


DEFAULT_EMBEDDING_DIM = 768
TEAM_EMBEDDING_DIM = 1024


class PromptSettings(_Group):
    style: Literal["project", "team"] = Field(
        "project",
        description="Whose prompt every phase sends: ft-pipeline's own, or the team's SYSTEM_PROMPT + build_analysis_prompt (what production serves).",
    )
    module: str = Field(
        "CV.rag_system.prompts",
        description="With style=team: module providing SYSTEM_PROMPT and build_analysis_prompt(topology_data, rag_context) (found through paths.team_code or the import path).",
    )


class ModelPrice(_Group):
    input_per_m: float = Field(ge=0, description="US$ per 1M input tokens.")
    output_per_m: float = Field(ge=0, description="US$ per 1M output tokens.")


class ProviderLimits(_Group):
    requests_per_minute: int | None = Field(
        None,
        ge=0,
        description="Requests per minute (0: no client-side limit; None: the built-in default for this teacher).",
    )
    tokens_per_minute: int | None = Field(
        None, ge=0, description="Tokens per minute, input + output budget (0: no limit; None: the built-in default)."
    )


def _default_limits() -> dict[str, ProviderLimits]:
    # What we assume of an account that announces nothing. OpenAI: usage tier 1 for gpt-4o
    # (500 RPM, 30K TPM; OpenAI's responses carry x-ratelimit-* headers, which replace these).
    # Gemini sends no such headers and no longer publishes a static per-tier table: 60 RPM is below
    # the last published tier-1 figure for a Pro model (gemini-2.5-pro: 150 RPM, 2M TPM) because
    # preview models are documented as more restricted; the adaptive rate finds a lower real limit.
    # An OpenAI-compatible server (vLLM) and the in-process model have no per-minute quota.
    table = {"openai": (500, 30_000), "gemini": (60, 1_000_000), "compatible": (0, 0), "local": (0, 0)}
    return {k: ProviderLimits(requests_per_minute=r, tokens_per_minute=t) for k, (r, t) in table.items()}


def _default_prices() -> dict[str, ModelPrice]:
    # Public list prices (US$ per 1M tokens); live prices change, override in your config.
    table = {
        "gpt-4o": (2.50, 10.00),
        "gpt-4o-mini": (0.15, 0.60),
        "gpt-4.1": (2.00, 8.00),
        "gemini-3-pro-preview": (2.00, 12.00),
        "gemini-2.5-pro": (1.25, 10.00),
        "gemini-2.5-flash": (0.30, 2.50),
        "text-embedding-3-small": (0.02, 0.0),
    }
    return {k: ModelPrice(input_per_m=i, output_per_m=o) for k, (i, o) in table.items()}


class TeacherSettings(_Group):
    teachers: list[str] = Field(
        default_factory=lambda: ["openai", "gemini"],
        description="Teachers that label every plan, in step order 3a, 3b (openai, gemini, compatible, local, reference).",
    )
    openai_model: str = Field("gpt-4o", description="OpenAI teacher model.")
    gemini_model: str = Field("gemini-3-pro-preview", description="Gemini teacher model.")
    compatible_model: str | None = Field(None, description="Model of an OpenAI-compatible teacher server.")
    compatible_base_url: str | None = Field(None, description="Base URL of that server.")
    local_model_path: str | None = Field(
        None, description="Model directory of the in-process 'local' teacher (the demo's tiny model)."
    )
    temperature: float = Field(0.2, ge=0, le=2, description="Sampling temperature for both teachers.")
    max_output_tokens: int = Field(4096, gt=0, description="Output token budget per answer.")
    concurrency: int = Field(5, gt=0, description="Requests in flight per teacher.")
    requests_per_minute: int | None = Field(
        None,
        gt=0,
        description="Explicit request limit for every remote teacher; when set it wins over teachers.limits and the built-in per-provider default (precedence: this > teachers.limits.<teacher> > built-in); limits a provider announces in x-ratelimit-* headers replace all of them at run time.",
    )
    tokens_per_minute: int | None = Field(
        None,
        gt=0,
        description="Explicit token limit for every remote teacher (same precedence as teachers.requests_per_minute).",
    )
    limits: dict[str, ProviderLimits] = Field(
        default_factory=_default_limits,
        description="Per-teacher limits (openai: tier 1 for gpt-4o, 500 RPM / 30K TPM; gemini: 60 RPM / 1M TPM; compatible, local: 0 = unthrottled); a teacher or field left out keeps its built-in default.",
    )
    rate_window_s: float = Field(
        60.0,
        gt=0,
        description="Length of the providers' rate-limit window (seconds): requests are spaced window/rate apart and counted over it.",
    )
    retry_after_cap_s: float = Field(
        60.0,
        gt=0,
        description="Longest pause of a teacher after one HTTP 429 (the provider's Retry-After, else until the oldest request of the window expires).",
    )
    rate_limit_max_wait_s: float = Field(
        180.0,
        gt=0,
        description="Longest time one item keeps retrying after its first HTTP 429 before it is given up as rate_limited.",
    )
    backoff_s: list[float] = Field(default_factory=lambda: [2.0, 4.0, 8.0], description="Backoff for 5xx/timeouts.")
    request_timeout_s: float = Field(120.0, gt=0, description="Timeout of one teacher request.")
    budget_usd: float = Field(60.0, ge=0, description="Stop labeling before spending more than this per teacher.")
    max_rate_limit_retries: int = Field(
        5,
        ge=0,
        description="Retries of one item after HTTP 429 before it may be given up; it is kept at least rate_window_s + 25% after its first 429 and at most rate_limit_max_wait_s.",
    )
    truncation_budget_factor: float = Field(
        2.0, ge=1, description="Output budget multiplier for the one retry after a cut-off answer."
    )
    max_output_tokens_cap: int = Field(16_384, gt=0, description="Upper bound of that larger budget.")
    max_invalid_attempts: int = Field(
        4,
        ge=0,
        description="Retries of one item after answers that are not valid JSON / fail the schema: a re-ask quoting the error, the re-ask with a larger output budget, then fresh asks with the original messages (1: the old single re-ask).",
    )
    max_truncated_attempts: int = Field(
        3,
        ge=0,
        description="Retries of one item after answers cut at the output-token limit: a larger budget each time (teachers.truncation_budget_factor, up to max_output_tokens_cap), then fresh asks (1: the old single retry).",
    )
    max_attempts_per_item: int = Field(
        12,
        gt=0,
        description="Most requests sent for one item, every failure class together except HTTP 429 (not billed; bounded by the rate-limit settings).",
    )
    max_item_cost_usd: float = Field(
        1.0,
        gt=0,
        description="Most US$ one item may cost, failed attempts included: an attempt is sent only if the item's spend so far plus its worst case fits.",
    )
    expected_output_tokens: int = Field(1500, gt=0, description="Output tokens per answer, for estimates.")
    prices: dict[str, ModelPrice] = Field(
        default_factory=_default_prices, description="Price per model (US$ per 1M tokens in/out)."
    )
    batch_discount: float = Field(0.5, gt=0, le=1, description="Price factor of the providers' batch APIs.")
    use_batch_api: bool = Field(False, description="Label through the providers' batch APIs (half price, ≤ 24 h).")
    batch_poll_interval_s: float = Field(60.0, gt=0, description="Seconds between polls of a batch job.")
    batch_max_wait_s: float = Field(
        3600.0, ge=0, description="Wait this long for batch jobs, then return; a rerun resumes polling."
    )
    batch_max_enqueued_tokens: int = Field(
        90_000,
        gt=0,
        description="OpenAI: tokens (prompt + expected output, estimated) kept in running batch jobs at once; "
        "more waits for earlier jobs to finish. 90,000 is tier 1's enqueued-token limit for gpt-4o "
        "(see the organisation's limits page).",
    )
    batch_max_enqueued_tokens_gemini: int = Field(
        5_000_000,
        gt=0,
        description="Gemini: the same for batch mode; 5,000,000 is the batch enqueued-token limit Google "
        "publishes for tier 1 (Gemini 2.5 Pro); AI Studio shows the model's own.",
    )


class QualityWeights(_Group):
    schema_compliance: float = Field(0.30, ge=0, description="Weight of the schema_compliance metric.")
    field_completeness: float = Field(0.20, ge=0, description="Weight of the field_completeness metric.")
    space_count_accuracy: float = Field(0.10, ge=0, description="Weight of the space_count_accuracy metric.")
    bay_count_consistency: float = Field(0.10, ge=0, description="Weight of the bay_count_consistency metric.")
    compliance_reasoning: float = Field(0.10, ge=0, description="Weight of the compliance_reasoning metric.")
    analysis_depth: float = Field(0.07, ge=0, description="Weight of the analysis_depth metric.")
    recommendation_quality: float = Field(0.06, ge=0, description="Weight of the recommendation_quality metric.")
    json_validity: float = Field(0.07, ge=0, description="Weight of the json_validity metric.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> QualityWeights:
        total = sum(self.model_dump().values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1.0, got {total:.4f}")
        return self


class QualitySettings(_Group):
    sample_size: int = Field(100, gt=0, description="Plans compared in phase 4.")
    seed: int = Field(42, description="Seed of the comparison sample and the bootstrap.")
    weights: QualityWeights = Field(default_factory=QualityWeights, description="Metric weights.")
    min_schema_compliance: float = Field(0.95, ge=0, le=1, description="A teacher below this cannot win.")
    tie_margin: float = Field(0.05, ge=0, description="A gap under this goes to the cheaper teacher.")
    force_teacher: str | None = Field(None, description="Skip the comparison's decision and use this teacher.")
    bootstrap_samples: int = Field(1000, gt=0, description="Bootstrap resamples for 95% intervals.")
    review_plans: int = Field(20, ge=0, description="Plans on the side-by-side manual review page.")
    extra_teachers: list[str] = Field(
        default_factory=list,
        description="Answer sets compared beside teachers.teachers without being labeled in phase 3 (e.g. 'production', imported by `ft-pipeline import analyses`).",
    )


class DatasetSettings(_Group):
    train_ratio: float = Field(
        0.9,
        gt=0,
        lt=1,
        description="Share of rows in train (whole complexes move together; val gets the complexes closest to 1 - ratio).",
    )
    drop_overlong: bool = Field(
        False, description="Drop rows longer than finetune.max_length instead of only flagging them."
    )
    seed: int = Field(42, description="Seed of the grouped split.")


class FinetuneSettings(_Group):
    base_model: str = Field("Qwen/Qwen3-8B", description="Student base model id or local directory.")
    student_name: str = Field("student", description="Output folder name under the data root.")
    backend: Literal["auto", "unsloth", "trl"] = Field("auto", description="auto: Unsloth on CUDA, else TRL.")
    load_in_4bit: bool = Field(
        True, description="QLoRA: NF4 base weights through bitsandbytes (CUDA; CPU kernels from bitsandbytes 0.50)."
    )
    lora_r: int = Field(64, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(128, gt=0, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Projections that get adapters.",
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warm-up share of steps.")
    epochs: float = Field(3, gt=0, description="Training epochs.")
    max_steps: int = Field(-1, description="Stop after this many steps (-1: by epochs).")
    batch_size: int = Field(2, gt=0, description="Per-device batch size.")
    grad_accum: int = Field(8, gt=0, description="Gradient accumulation steps.")
    max_length: int = Field(4096, gt=0, description="Longest training sequence in tokens.")
    logging_steps: int = Field(10, gt=0, description="Log every N steps.")
    eval_steps: int = Field(100, gt=0, description="Validation loss every N steps.")
    save_steps: int = Field(100, gt=0, description="Checkpoint every N steps.")
    early_stopping_patience: int = Field(
        3, ge=0, description="Evaluations without improvement before stopping (0: off)."
    )
    optim: str = Field(
        "adamw_8bit",
        description="Optimizer: adamw_8bit (bitsandbytes), adamw_torch, paged_adamw_8bit, ... (any optim name transformers knows)",
    )
    merge: bool = Field(False, description="Also write a merged bf16 model for vLLM.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Training device.")
    cpu_threads: int | None = Field(None, gt=0, description="Torch threads on CPU (1 is fastest for tiny models).")
    eval_limit: int | None = Field(None, gt=0, description="Evaluate the student on the first N val rows only.")
    eval_base_url: str | None = Field(
        None,
        description="Evaluate through an OpenAI-compatible server (e.g. vLLM serving merged_model/) at this URL instead of in-process transformers.",
    )
    eval_model: str | None = Field(
        None,
        description="Model name on that server, e.g. the LoRA module name 'cv_agent' (default: the first it lists).",
    )
    eval_max_tokens: int = Field(
        8000, gt=0, description="max_tokens of one evaluation request through that server (the team client sends 8000)."
    )
    vllm_max_lora_rank: int = Field(
        64,
        description="The serving vLLM's --max-lora-rank (vLLM's default is 16): the adapter's rank is checked against it before training.",
    )
    trust_remote_code: bool = Field(False, description="Allow the base model's own code (EXAONE needs it).")
    gradient_checkpointing: bool | None = Field(None, description="Trade compute for memory (None: on for CUDA only).")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on disk.")
    seed: int = Field(42, description="Training seed.")


class AlertSettings(_Group):
    notify_block: str | None = Field(
        None,
        description="A Prefect notification block, as 'type-slug/name' (e.g. 'slack-webhook/ft-alerts', "
        "'custom-webhook/ops'), told when a pipeline run fails, crashes or times out. None: the run's log only.",
    )


class ServingSettings(_Group):
    llm_provider: Literal["openai", "gemini", "openai-compatible", "local", "reference"] = Field(
        "openai",
        validation_alias=AliasChoices("llm_provider", "LLM_PROVIDER"),
        description="Chat backend of the analysis service; 'openai' is the rollback.",
    )
    llm_model: str = Field("gpt-4o-mini", description="Model served by that backend.")
    base_url: str | None = Field(None, description="Base URL of an OpenAI-compatible server (vLLM …).")
    enable_thinking: bool | None = Field(
        None,
        description="Qwen3 thinking on that server: None sends enable_thinking=false to models named *qwen*; set false for a student served under its own name (it was trained non-thinking).",
    )
    adapter_path: str | None = Field(None, description="LoRA adapter or merged model for the local backend.")
    max_new_tokens: int = Field(3072, gt=0, description="Output token limit of one analysis.")
    cpu_threads: int | None = Field(
        None, gt=0, description="Torch threads for an in-process model on CPU (1 is fastest for tiny models)."
    )
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one provider call.")
    temperature: float | None = Field(
        0.2,
        ge=0,
        le=2,
        description="Sampling temperature sent to remote providers (None: provider default); the local student decodes greedily.",
    )
    chat_max_tokens: int = Field(1024, gt=0, description="Output token limit of one /chat answer.")
    vector_store: Literal["memory", "pgvector"] = Field(
        "memory",
        description="Where the service reads criteria vectors: memory (embedded at start-up, cached under {data_root}/cache/embeddings) or pgvector (serving.pg_dsn).",
    )
    pg_dsn: SecretStr | None = Field(
        None,
        description="PostgreSQL DSN of the pgvector store; also the default --dsn of `ft-pipeline vectors`. Never logged.",
    )
    vector_table: str | None = Field(
        None,
        description="Pin the service to this vector table (a canary); default: the live table in vector_store_active.",
    )
    max_upload_mb: float = Field(
        20.0, gt=0, description="Largest plan image POST /analyze accepts as an upload (larger: 413)."
    )
    cv_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Longest wait for the CV step of an uploaded plan (None: cv.runpod_timeout_s plus 10 s, cold starts included).",
    )
    host: str = Field("127.0.0.1", description="HTTP API bind address.")
    port: int = Field(8000, gt=0, lt=65536, description="HTTP API port.")
    max_request_mb: float = Field(
        2.0,
        gt=0,
        description="Largest JSON body (POST /analyze, /chat) the API reads; larger: 413, judged from Content-Length before reading or while a chunked body streams in. Uploads have serving.max_upload_mb.",
    )
    max_concurrency: int | None = Field(
        None,
        gt=0,
        description="Model calls run at once per backend (None: 1 for the in-process local model, 8 for remote providers).",
    )
    max_queue: int = Field(
        8,
        ge=0,
        description="Requests that may wait for a model slot beyond those running; when full (or a wait passes serving.timeout_s): 503 with Retry-After at once.",
    )
    shutdown_grace_s: float = Field(
        5.0,
        gt=0,
        description="On SIGTERM/SIGINT: how long in-flight requests may finish (local generations are cancelled at once) before uvicorn cancels them.",
    )


class Settings(BaseSettings):
    """All of ft-pipeline's configuration. Print it with `ft-pipeline config show`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        validate_assignment=True,
        populate_by_name=True,
    )

    profile: ProfileName | None = Field(None, description="Named profile applied under file and env.")
    paths: PathSettings = Field(default_factory=PathSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    cv: CVSettings = Field(default_factory=CVSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    prompts: PromptSettings = Field(default_factory=PromptSettings)
    teachers: TeacherSettings = Field(default_factory=TeacherSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)

    openai_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("openai_api_key", "FTP_OPENAI_API_KEY", "OPENAI_API_KEY"),
        description="OpenAI key (or a Prefect block, see blocks/).",
    )
    openai_base_url: str | None = Field(
        None,
        validation_alias=AliasChoices("openai_base_url", "FTP_OPENAI_BASE_URL"),
        description="Override of the OpenAI API base URL (a proxy or a test server).",
    )
    gemini_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("gemini_api_key", "FTP_GEMINI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"),
        description="Google Gemini key.",
    )
    runpod_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("runpod_api_key", "FTP_RUNPOD_API_KEY", "RUNPOD_API_KEY"),
        description="RunPod key for the team's Serverless CV/embedding endpoint (or a Prefect block). Never logged or written.",
    )
    gemini_base_url: str | None = Field(
        None,
        validation_alias=AliasChoices("gemini_base_url", "FTP_GEMINI_BASE_URL"),
        description="Override of the Gemini API base URL (a test server).",
    )

    @field_validator("profile", mode="before")
    @classmethod
    def _empty_profile(cls, value: Any) -> Any:
        return None if value == "" else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        layered = _LAYERED.get() or {}
        return (
            init_settings,
            env_settings,
            _ShortcutEnvSource(settings_cls),
            _OwnDotEnvSource(settings_cls),
            _DictSource(settings_cls, layered.get("file", {})),
            _DictSource(settings_cls, layered.get("profile", {})),
            _TeamKeysSource(settings_cls),
        )

    # Derived paths: the only place that knows the default layout under the data root.
    def image_dir(self) -> str:
        return self.paths.image_dir or _join(self.paths.data_root, "images")

    def annotation_dir(self) -> str:
        return self.paths.annotation_dir or _join(self.paths.data_root, "annotations")


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


_LAYERED: contextvars.ContextVar[dict[str, dict] | None] = contextvars.ContextVar("_LAYERED", default=None)


class _DictSource(PydanticBaseSettingsSource):
    """A fixed mapping as a settings source (profile values, config file values)."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]):
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class _ShortcutEnvSource(PydanticBaseSettingsSource):
    """``LLM_PROVIDER`` and ``EMBEDDING_PROVIDER``: the one-variable switch the service team asked for."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if os.environ.get("LLM_PROVIDER"):
            out["serving"] = {"llm_provider": os.environ["LLM_PROVIDER"]}
        if os.environ.get("EMBEDDING_PROVIDER"):
            out["retrieval"] = {"provider": os.environ["EMBEDDING_PROVIDER"]}
        return out


# Top-level aliases of ours that .env may hold without the FTP_ prefix (read by pydantic itself).
_DOTENV_ALIASES = frozenset({"openai_api_key", "gemini_api_key", "google_api_key", "runpod_api_key"})
# The team's RAGConfig keys (and our two switches) that map onto settings here, read from the
# environment and from .env by `_TeamKeysSource`.
TEAM_KEYS = (
    "LLM_BACKEND",
    "VLLM_BASE_URL",
    "VLLM_MODEL_NAME",
    "OPENAI_MODEL",
    "EMBEDDING_DIM",
    "TOP_K",
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_DB",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "RUNPOD_ENDPOINT_ID",
    "LLM_PROVIDER",
    "EMBEDDING_PROVIDER",
)
_ANNOUNCED: set[tuple[str, tuple[str, ...]]] = set()


def _is_ours(key: str) -> bool:
    low = key.lower()
    return low.startswith(ENV_PREFIX.lower()) or low in _DOTENV_ALIASES


class _OwnDotEnvSource(DotEnvSettingsSource):
    """``.env`` as pydantic-settings reads it, limited to our keys (``FTP_*`` and the provider key
    aliases): an ``FTP_*`` typo still fails naming the key; anything else is `_TeamKeysSource`'s."""

    def _load_env_vars(self):  # type: ignore[override]
        return {k: v for k, v in super()._load_env_vars().items() if _is_ours(k)}


def _dotenv_path() -> Path | None:
    name = Settings.model_config.get("env_file")
    path = Path(str(name)) if name else None
    return path if path is not None and path.is_file() else None


def _read_dotenv(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path, encoding="utf-8").items() if v is not None}


def _postgres_dsn(keys: dict[str, str]) -> str:
    """A libpq URL from POSTGRES_* (their RAGConfig defaults for the parts not given, password only
    when given); user and password URL-quoted."""
    user = quote(keys.get("POSTGRES_USER") or "postgres", safe="")
    password = keys.get("POSTGRES_PASSWORD")
    auth = f"{user}:{quote(password, safe='')}" if password else user
    host = keys.get("POSTGRES_HOST") or "localhost"
    port = keys.get("POSTGRES_PORT") or "5432"
    db = quote(keys.get("POSTGRES_DB") or "arae", safe="")
    return f"postgresql://{auth}@{host}:{port}/{db}"


def team_keys_to_settings(keys: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Map the team's ``.env`` keys onto our nested settings: (values, keys not understood)."""
    out: dict[str, dict[str, Any]] = {}
    unused: list[str] = []

    def put(group: str, field: str, value: Any) -> None:
        out.setdefault(group, {})[field] = value

    backend = (keys.get("LLM_BACKEND") or "").strip().lower()
    if backend == "vllm":
        put("serving", "llm_provider", "openai-compatible")
        # Their client sends enable_thinking=false to whatever name it serves (cv_agent is Qwen3).
        put("serving", "enable_thinking", False)
        put("serving", "max_new_tokens", 8000)  # their client's max_tokens for one analysis
        if keys.get("VLLM_BASE_URL"):
            put("serving", "base_url", keys["VLLM_BASE_URL"])
        if keys.get("VLLM_MODEL_NAME"):
            put("serving", "llm_model", keys["VLLM_MODEL_NAME"])
    elif backend == "openai":
        put("serving", "llm_provider", "openai")
        if keys.get("OPENAI_MODEL"):
            put("serving", "llm_model", keys["OPENAI_MODEL"])
    elif backend:
        unused.append("LLM_BACKEND")
    if keys.get("LLM_PROVIDER"):  # ours wins over their LLM_BACKEND
        put("serving", "llm_provider", keys["LLM_PROVIDER"])
    if keys.get("EMBEDDING_PROVIDER"):
        put("retrieval", "provider", keys["EMBEDDING_PROVIDER"])
    for key, group, field in (("EMBEDDING_DIM", "retrieval", "dimensions"), ("TOP_K", "retrieval", "top_k")):
        if keys.get(key):
            if keys[key].strip().isdigit() and int(keys[key]) > 0:
                put(group, field, int(keys[key]))
            else:
                unused.append(key)  # not a positive whole number: theirs would fail too; ours ignores it
    if any(keys.get(k) for k in TEAM_KEYS if k.startswith("POSTGRES_")):
        put("serving", "pg_dsn", _postgres_dsn(keys))
    if keys.get("RUNPOD_ENDPOINT_ID"):
        put("cv", "runpod_endpoint_id", keys["RUNPOD_ENDPOINT_ID"])
    return out, unused


class _TeamKeysSource(PydanticBaseSettingsSource):
    """The team's keys from ``.env`` and the environment (the environment wins), mapped by
    `team_keys_to_settings`. Keys of a ``.env`` that are neither ours nor mapped are ignored, named
    once per process in one warning (values never shown)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _dotenv_path()
        dotenv = _read_dotenv(path) if path else {}
        keys = {k.upper(): v for k, v in dotenv.items() if k.upper() in TEAM_KEYS}
        keys.update({k: os.environ[k] for k in TEAM_KEYS if os.environ.get(k)})
        values, unused = team_keys_to_settings(keys)
        ignored = sorted(
            {k for k in dotenv if not _is_ours(k) and k.upper() not in TEAM_KEYS} | {k for k in unused if k in dotenv}
        )
        if ignored and path is not None:
            marker = (str(path.resolve()), tuple(ignored))
            if marker not in _ANNOUNCED:
                _ANNOUNCED.add(marker)
                log.warning("%s: ignored keys ft-pipeline does not use: %s", path, ", ".join(ignored))
        return values


# ----------------------------------------------------------------------------------- profiles

PROFILES: dict[str, dict[str, Any]] = {
    # Qwen3-8B QLoRA on a rented A100 80 GB: the plan's numbers, which are also the defaults.
    "production": {
        "finetune": {"base_model": "Qwen/Qwen3-8B", "device": "cuda", "merge": True},
        "retrieval": {"device": "cuda"},
        "cv": {"device": "cuda"},
    },
    # EXAONE 2.4B QLoRA on an 8 GB consumer card.
    "local-8gb": {
        "finetune": {
            "base_model": "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct",
            "device": "cuda",
            "lora_r": 16,
            "lora_alpha": 32,
            "batch_size": 4,
            "grad_accum": 4,
            "max_length": 2048,
            # EXAONE names its projections differently from Qwen/Llama, and ships its own code.
            "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc_0", "c_fc_1", "c_proj"],
            "trust_remote_code": True,
        },
        "serving": {"llm_provider": "local", "max_new_tokens": 2048},
        "cv": {"device": "cuda"},
    },
    # Everything offline on a CPU in minutes: synthetic plans, a small packaged embedding model,
    # the rule-based reference teacher and a tiny student.
    "demo": {
        "paths": {"data_root": "./demo-data"},
        "sampling": {"sample_size": 24, "size_low_pct": 0.0, "size_high_pct": 100.0},
        "cv": {"source": "annotations", "device": "cpu", "concurrency": 2, "chunk_size": 8},
        "retrieval": {"device": "cpu", "model": "packaged:all-MiniLM-L6-v2", "dimensions": 384},
        # Teacher A: the rule-based reference. Teacher B: a tiny random local model under
        # schema-constrained decoding, built by `ft-pipeline demo`: valid JSON, meaningless text,
        # there to run phases 3-4 offline (phase 4 rightly prefers the reference).
        "teachers": {"teachers": ["reference", "local"], "max_output_tokens": 1024},
        "quality": {"sample_size": 12, "bootstrap_samples": 200},
        "finetune": {
            "device": "cpu",
            "load_in_4bit": False,
            "optim": "adamw_torch",
            "lora_r": 8,
            "lora_alpha": 16,
            "batch_size": 1,
            "grad_accum": 1,
            "epochs": 1,
            "max_steps": 30,
            "eval_steps": 10,
            "save_steps": 10,
            "logging_steps": 2,
            # The tiny byte-level tokenizer needs ~4 tokens per Korean character; a random tiny
            # model needs a large step to move at all.
            "max_length": 16384,
            "learning_rate": 5e-3,
            "cpu_threads": 1,
            "merge": True,
            "eval_limit": 4,
        },
        "serving": {"llm_provider": "reference", "cpu_threads": 1},
    },
}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into a dict, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"config file {path}: not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in {".yaml", ".yml"}:
            data = yaml.safe_load(text) or {}
        else:
            raise SettingsError(f"config file {path}: use a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise SettingsError(f"config file {path}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: the top level must be a table/mapping")
    return data


def _check_env_keys() -> None:
    """Reject FTP_* variables that name no setting (a typo would otherwise be silently ignored)."""
    known_top = {name.upper() for name in Settings.model_fields}
    aliases = {"OPENAI_API_KEY", "OPENAI_BASE_URL", "GEMINI_API_KEY", "GEMINI_BASE_URL", "RUNPOD_API_KEY"}
    for key in os.environ:
        if not key.startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX) :]
        group, _, field = rest.partition("__")
        if rest in aliases:
            continue
        if group not in known_top:
            raise SettingsError(f"environment variable {key}: no setting '{group.lower()}'")
        if field:
            annotation = Settings.model_fields[group.lower()].annotation
            sub_fields = getattr(annotation, "model_fields", None)
            first = field.split("__")[0].lower()
            if sub_fields is None or first not in sub_fields:
                raise SettingsError(f"environment variable {key}: no setting '{group.lower()}.{first}'")


def _format_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown setting '{loc}'")
        else:
            lines.append(f"setting '{loc}': {err['msg']}")
    return f"invalid configuration ({origin}): " + "; ".join(lines)


def load_settings(
    config_file: str | Path | None = None,
    profile: str | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings from defaults, profile, config file, .env, environment and overrides.

    The profile comes from the argument, else ``FTP_PROFILE``, else the config file's ``profile``.
    """
    file_data = read_config_file(config_file) if config_file else {}
    chosen = profile or os.environ.get(f"{ENV_PREFIX}PROFILE") or file_data.get("profile")
    if chosen and chosen not in PROFILES:
        raise SettingsError(f"setting 'profile': unknown profile '{chosen}' (choose one of {', '.join(PROFILES)})")
    _check_env_keys()
    layered = {"file": file_data, "profile": PROFILES.get(chosen, {}) if chosen else {}}
    if chosen:
        overrides.setdefault("profile", chosen)
    token = _LAYERED.set(layered)
    origin = f"config file {config_file}" if config_file else "environment/defaults"
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_format_error(exc, origin)) from None
    finally:
        _LAYERED.reset(token)


# Where each secret may come from, for the message that refuses it as an override.
_SECRET_SOURCES = {
    "openai_api_key": "OPENAI_API_KEY (environment or .env) or the ft-openai-credentials/openai block",
    "gemini_api_key": "GEMINI_API_KEY (environment or .env) or the ft-gemini-credentials/gemini block",
    "runpod_api_key": "RUNPOD_API_KEY (environment or .env) or the ft-runpod-credentials/runpod block",
    "serving.pg_dsn": "FTP_SERVING__PG_DSN (environment or .env) or [serving] pg_dsn in a config file",
}


def secret_setting_names() -> dict[str, str]:
    """Every secret setting (a ``SecretStr`` field) by lower-case dotted name and alias, mapped to
    its dotted name: what ``--set`` and a flow's ``overrides`` may never carry."""
    names: dict[str, str] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            if SecretStr not in (getattr(annotation, "__args__", None) or (annotation,)):
                continue
            dotted = prefix + name
            names[dotted.lower()] = dotted
            alias = info.validation_alias
            for choice in getattr(alias, "choices", None) or ([alias] if isinstance(alias, str) else []):
                if isinstance(choice, str):
                    names[(prefix + choice).lower()] = dotted

    walk(Settings, "")
    return names


def check_no_secret_overrides(overrides: Mapping[str, Any] | None, where: str = "--set") -> None:
    """Refuse overrides that carry a secret: a secret field by any of its names, or a URL/DSN with a
    password in it. Overrides become flow parameters, which Prefect stores in its database and shows
    in the UI; secrets belong in the environment, ``.env``, a config file or a block."""
    from floorplan_ft.redact import mask_url

    secret = secret_setting_names()
    problems: list[str] = []

    def visit(dotted: str, value: Any) -> None:
        if dotted.lower() in secret:
            name = secret[dotted.lower()]
            problems.append(
                f"{where} {dotted}: '{name}' is a secret and cannot be an override (overrides are "
                f"flow parameters, stored in Prefect's database and shown in the UI); set it with "
                f"{_SECRET_SOURCES.get(name, 'the environment, .env or a config file')}"
            )
        elif isinstance(value, Mapping):
            for key, inner in value.items():
                visit(f"{dotted}.{key}", inner)
        elif isinstance(value, str) and mask_url(value) != value:
            problems.append(
                f"{where} {dotted}: the value has a password in it ({mask_url(value)}); overrides are "
                "flow parameters, stored in Prefect's database and shown in the UI: put this setting in "
                "the environment, .env or a config file"
            )

    for key, value in (overrides or {}).items():
        visit(str(key), value)
    if problems:
        raise SettingsError("; ".join(problems))


def describe_settings() -> list[tuple[str, str, str]]:
    """(dotted name, default, description) for every setting: the README table and `config show`."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            rows.append((prefix + name, repr(default), info.description or ""))

    walk(Settings, "")
    return rows
