"""Pipeline configuration: the YAML file a user writes, validated before any model call.

Relative paths of inputs (prompt files, GGUF files) resolve against the config file's folder; the
warehouse path, an output, resolves against the current directory (like `--db`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

from prefsynth.errors import ConfigError, not_utf8

PACKAGED_MODELS = ("smollm2-135m-instruct", "gemma3-270m-base")


class Strict(BaseModel):
    """Config models: unknown keys are errors, values are immutable, and errors never quote the input (a value
    refused for holding a secret must not be printed by the error that refuses it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class Price(Strict):
    """What an endpoint charges, in money units (e.g. USD) per million tokens."""

    input_per_mtok: float = Field(0.0, ge=0, description="Per 1M prompt (input) tokens.")
    output_per_mtok: float = Field(0.0, ge=0, description="Per 1M completion (output) tokens.")


class Budget(Strict):
    """A run's limit on model calls: once its calls have used this many tokens or cost this much, no new call
    is made and the run ends with status budget_exhausted (a rerun resumes; cached calls are free)."""

    max_tokens: int | None = Field(None, ge=1, description="Prompt + completion tokens of the run's new calls.")
    max_cost: float | None = Field(None, gt=0, description="Cost of the run's new calls (needs a `price` on "
                                   "every endpoint model).")  # fmt: skip

    @model_validator(mode="after")
    def _some_limit(self) -> Budget:
        if self.max_tokens is None and self.max_cost is None:
            raise ValueError("give `max_tokens`, `max_cost` or both")
        return self


def _unset(value: Any) -> bool:
    """Optional sections left out are left out of dumps too: a config's stored form (and the ids made from it,
    e.g. a loop's) stays what it was before the section existed."""
    return value is None


class Replica(Strict):
    """One server of an endpoint with several replicas (`base_urls`)."""

    base_url: str = Field(description="OpenAI-compatible API root of this replica, e.g. http://host-2:8000/v1")
    max_concurrency: int | None = Field(None, ge=1, le=1024, description="Requests in flight at once on this "
                                        "replica (default: the model's max_concurrency, else 16).")  # fmt: skip


class ModelSpec(Strict):
    """A model: an OpenAI-compatible endpoint (`base_url` + `model`, or several replicas in `base_urls`) or a
    local GGUF file (`gguf`)."""

    name: str | None = Field(None, description="Label used in records; defaults to `model` or the GGUF alias.")
    base_url: str | None = Field(None, description="OpenAI-compatible API root, e.g. http://host:8000/v1")
    base_urls: list[str | Replica] | None = Field(
        None, exclude_if=_unset, description="Several replicas of one model instead of `base_url`: URLs, or "
        "{base_url, max_concurrency} each. Requests go to the replica with the most free slots; a replica that "
        "keeps failing is taken out and probed back (see backends/replicas.py). With more than one, give "
        "`revision`: the cache then knows the model by name and revision, whichever replica answers.")  # fmt: skip
    model: str | None = Field(None, description="Model name sent to the endpoint.")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the API key.")
    revision: str | None = Field(
        None, min_length=1, description="Version of an endpoint model's weights (a checkpoint tag or hash). With it, "
        "the cache knows the model by name and revision instead of its URL: a new revision is a new model, and a "
        "server that moves keeps its cache.")  # fmt: skip
    server: Literal["openai", "vllm", "llama-cpp"] = Field(
        "openai", description="Kind of endpoint server, for its quirks (local GGUF models are llama-cpp)."
    )
    gguf: str | None = Field(None, description=f"Path to a .gguf file or a packaged alias: {PACKAGED_MODELS}.")
    chat_template: str | None = Field(
        None, description="Jinja chat template (text, or a .jinja file) for log-prob scoring of an endpoint model."
    )
    logprobs: Literal["auto", "prompt_logprobs", "echo"] = Field(
        "auto", description="How to ask for prompt log-probs (auto: prompt_logprobs for vLLM and local models)."
    )
    n_ctx: int = Field(2048, ge=256, description="Context length of a local server.")
    n_threads: int | None = Field(None, ge=1, description="CPU threads of a local server (default: the cores / "
                                  "`replicas`).")  # fmt: skip
    replicas: int | None = Field(None, ge=1, le=16, exclude_if=_unset, description="A local GGUF model: how many "
                                 "llama.cpp servers to start (each answers one request at a time; requests spread "
                                 "over them as over `base_urls`). Endpoints list `base_urls` instead.")  # fmt: skip
    max_concurrency: int | None = Field(None, ge=1, le=50_000, description="Requests in flight at once (at "
                                        "most 1024; with `batch`, the requests one batch job can hold; with "
                                        "`base_urls`, each replica's default).")  # fmt: skip
    batch: bool = Field(False, description="Send chat requests as OpenAI-style batch jobs (files + batches API): "
                        "cheaper and slower; set max_concurrency to the batch size.")  # fmt: skip
    timeout_s: float = Field(300.0, gt=0, description="Timeout of one request, queueing included.")
    price: Price | None = Field(None, exclude_if=_unset, description="What the endpoint charges per 1M tokens; "
                                "`prefsynth stats` then shows costs, and a budget's max_cost counts them.")  # fmt: skip
    max_retries: int = Field(
        3, ge=0, le=20, description="Retries of one request after a 429 (waits its Retry-After), a 408/409/5xx, a "
        "timeout or a dropped connection (exponential backoff with jitter).")  # fmt: skip
    requests_per_minute: int | None = Field(
        None, ge=1, description="Requests sent per minute at most (retries count), shared by every stage using it.")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Tokens per minute at most, estimated before each request as the prompt's characters "
        "/ 4 + max_tokens (hosted APIs count prompt and completion tokens).")  # fmt: skip
    global_limit: bool = Field(
        False, description="Also hold max_concurrency across concurrent flow runs, with a Prefect global "
        "concurrency limit (only when PREFECT_API_URL names a Prefect server; one API round trip per request).")

    @model_validator(mode="after")
    def _one_kind(self) -> ModelSpec:
        if self.base_urls is not None:
            self._check_replicas()
        if self.gguf and (self.base_url or self.base_urls or self.model):
            raise ValueError("give either `gguf` (a local model) or `base_url` + `model` (an endpoint), not both")
        if self.replicas is not None and not self.gguf:
            raise ValueError("`replicas` starts local servers of a `gguf` model; an endpoint lists `base_urls`")
        if self.gguf and self.batch:
            raise ValueError("`batch` is for endpoint models: a local model has no batch API")
        if not self.batch and (self.max_concurrency or 0) > 1024:
            raise ValueError("max_concurrency is at most 1024 (more only with `batch: true`)")
        if self.gguf and self.revision:
            raise ValueError("`revision` is for endpoint models; a local model is known by its file's hash")
        if not self.gguf:
            if not (self.base_url or self.base_urls) or not self.model:
                raise ValueError("an endpoint model needs both `base_url` and `model` (or give `gguf`)")
            for url, _ in self.servers:
                if not url.startswith(("http://", "https://")):
                    raise ValueError(f"`base_url` must start with http:// or https://, got {url!r}")
                _no_credentials(url)
        if self.api_key_env is not None and not self.api_key_env.isidentifier():
            raise ValueError("`api_key_env` is the *name* of an environment variable, e.g. OPENAI_API_KEY")
        return self

    def _check_replicas(self) -> None:
        assert self.base_urls is not None
        if self.base_url is not None:
            raise ValueError("give either `base_url` (one server) or `base_urls` (replicas), not both")
        if not self.base_urls:
            raise ValueError("`base_urls` lists at least one replica")
        urls = [url.rstrip("/") for url, _ in self.servers]
        if len(set(urls)) < len(urls):
            raise ValueError("`base_urls` lists a replica twice")
        if len(urls) > 1 and self.batch:
            raise ValueError("`batch` jobs go to one server: give one `base_url`, not replicas")
        if len(urls) > 1 and not self.revision:
            raise ValueError("replicas in `base_urls` need `revision` (the weights' tag or hash they all serve): the "
                             "cache knows the model by name and revision, whichever replica answers")  # fmt: skip

    @property
    def servers(self) -> list[tuple[str, int]]:
        """(base_url, max_concurrency) of each server of an endpoint model: one, or the `base_urls`."""
        if self.base_urls is None:
            return [(str(self.base_url), self.concurrency)] if self.base_url else []
        return [(r, self.concurrency) if isinstance(r, str)
                else (r.base_url, r.max_concurrency or self.concurrency) for r in self.base_urls]  # fmt: skip

    @property
    def is_local(self) -> bool:
        return self.gguf is not None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.gguf:
            return self.gguf if self.gguf in PACKAGED_MODELS else Path(self.gguf).stem
        return str(self.model)

    @property
    def identity(self) -> str:
        """An endpoint model's cache identity: name and revision, or without a revision its URL and name (one
        server: `base_urls: [url]` is the same model as `base_url: url`). Never which replica answers."""
        if self.revision:
            return f"{self.model}@{self.revision}"
        return f"{self.servers[0][0].rstrip('/')}#{self.model}"

    @property
    def concurrency(self) -> int:
        # llama-cpp-python serves one request at a time, and a second one waiting slows it down (measured:
        # 12 grammar-constrained judge calls took 23.9 s one at a time, 31.3 s two at a time).
        return self.max_concurrency or (1 if self.is_local else 16)

    def api_key(self) -> str:
        if self.api_key_env is None:
            return "not-needed"
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ConfigError(f"environment variable {self.api_key_env} (api_key_env) is not set")
        return value


def _no_credentials(url: str) -> None:
    """Refuse a base_url that could carry a secret (user:password@, a query string or a fragment): it would be
    stored in the warehouse (model identities, run configs), shown by `stats` and kept in Prefect's database.
    The message names the URL without those parts."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        what = "credentials (user:password@)"
    elif parts.query or parts.fragment or "?" in url or "#" in url:
        what = "a query string or fragment (it may hold a key)"
    else:
        return
    host = parts.hostname or ""
    safe = f"{parts.scheme}://{host}{f':{parts.port}' if _port(parts) else ''}{parts.path}"
    raise ValueError(f"`base_url` must not contain {what}: it would be stored and printed in clear. Give "
                     f"{safe} and put the key in an environment variable named by `api_key_env`")


def _port(parts: SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None


class SamplingParams(Strict):
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(256, ge=1, le=32768)
    seed: int = Field(0, ge=0, description="Base seed; sample i uses seed + i.")


class PromptSource(Strict):
    """Exactly one of `path`, `hf_dataset`, `warehouse_table`, `builtin`, `in_memory`."""

    path: str | None = Field(None, description="A .jsonl, .json, .csv or .parquet file.")
    hf_dataset: str | None = Field(None, description="A Hugging Face dataset saved with save_to_disk.")
    split: str | None = Field(None, description="Split of a DatasetDict (default: train, or the only one).")
    warehouse_table: str | None = Field(None, description="A table or view in the warehouse: NAME or SCHEMA.NAME.")
    builtin: Literal["quickstart"] | None = Field(None, description="A prompt set shipped with prefsynth.")
    in_memory: str | None = Field(
        None, description="Prompts passed to `prefsynth.run(config, prompts=...)`; the value labels their source."
    )
    prompt_field: str = Field("prompt", description="Column with the user turn as text.")
    messages_field: str = Field("messages", description="Column with a chat message list (used if present).")
    system_field: str | None = Field(None, description="Optional column with a system prompt.")
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts (after de-duplication).")

    @model_validator(mode="after")
    def _one_source(self) -> PromptSource:
        given = [k for k in SOURCE_KINDS if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `path`, `hf_dataset`, `warehouse_table`, `builtin`, `in_memory`"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.path and Path(self.path).suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet"):
            raise ValueError(f"`path` must end in .jsonl, .json, .csv or .parquet: {self.path}")
        parts = self.warehouse_table.split(".") if self.warehouse_table else []
        if parts and (len(parts) > 2 or not all(p.strip() for p in parts) or '"' in self.warehouse_table):
            raise ValueError(f"`warehouse_table` must be NAME or SCHEMA.NAME (no empty part, no double quote): "
                             f"{self.warehouse_table!r}")
        return self

    @property
    def origin(self) -> str:
        """What the prompts' `source` column says."""
        if self.builtin:
            return f"builtin:{self.builtin}"
        if self.in_memory:
            return f"in_memory:{self.in_memory}"
        return str(self.path or self.hf_dataset or self.warehouse_table)


SOURCE_KINDS = ("path", "hf_dataset", "warehouse_table", "builtin", "in_memory")


class GenerationSpec(Strict):
    models: list[ModelSpec] = Field(..., min_length=1, description="Policy models; each answers every prompt.")
    samples_per_prompt: int = Field(2, ge=1, le=64)
    sampling: SamplingParams = SamplingParams()
    system_prompt: str | None = Field(None, description="Added to prompts that have no system turn.")

    @field_validator("models")
    @classmethod
    def _unique_labels(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        labels = [m.label for m in models]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"policy models need distinct names; set `name` for: {', '.join(dupes)}")
        return models


class ScorerSpec(Strict):
    """What every scorer kind's config shares. A kind subclasses it next to its scorer class (see
    `prefsynth.tasks.scorers.registry`), with `kind: Literal["its-name"] = "its-name"`."""

    kind: str
    name: str
    compares: ClassVar[bool] = False  # True for kinds that compare two responses (they need 2 per prompt)

    def roles(self) -> dict[str, ModelSpec]:
        """The models it calls, by role (e.g. judge; strong and weak): its scorer gets an endpoint for each."""
        return {}

    def models(self) -> list[ModelSpec]:
        return list(self.roles().values())


def _registered(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A mapping -> the spec class registered for its `kind` (built-in or from an installed package)."""
    if isinstance(value, dict):
        from prefsynth.tasks.scorers.registry import spec_class

        return spec_class(value.get("kind")).model_validate(value)
    return handler(value)


# A scorer entry of a config: validated by its kind's own spec class, serialized with all of its fields.
ScorerEntry = Annotated[SerializeAsAny[ScorerSpec], WrapValidator(_registered)]


class PanelSpec(Strict):
    """Several scorers on the same responses: an aggregate score plus their agreement per prompt."""

    name: str = Field("panel", description="Name of the aggregate scorer (curation.scorer can use it).")
    scorers: list[str] | None = Field(None, min_length=2, description="Member scorer names (default: all).")
    aggregate: Literal["mean_normalized", "majority"] = Field(
        "mean_normalized",
        description="mean_normalized: mean of each member's z-scored values; majority: pairwise majority "
        "votes between a prompt's responses, score = wins (Copeland).",
    )


SampledRule = Literal["best_vs_worst", "best_vs_random", "above_margin", "top_k_vs_bottom_k"]
CurationRule = Literal["best_vs_worst", "best_vs_random", "above_margin", "top_k_vs_bottom_k",
                       "refined_vs_original", "anchor_vs_sampled"]  # fmt: skip
SAMPLED_RULES: tuple[str, ...] = SampledRule.__args__  # type: ignore[attr-defined]


class EvalSet(Strict):
    """An evaluation set whose items must not be among the prompts (decontamination)."""

    path: str = Field(..., description="A .jsonl/.json/.csv/.parquet file, or a folder of a saved HF dataset.")
    field: str = Field("prompt", description="The field holding each item's text.")
    name: str | None = Field(None, description="The benchmark's name in prompt_flags (default: the file's stem).")


class ZMargin(Strict):
    z: float = Field(..., ge=0, description="Margin in standard deviations of the scorer's values over the run.")


class QuantileMargin(Strict):
    quantile: float = Field(..., ge=0, le=1, description="Margin at this quantile of the run's positive gaps "
                            "(each prompt's best - worst).")  # fmt: skip


class CurationSpec(Strict):
    rule: CurationRule | list[CurationRule] = Field(
        "best_vs_worst", description="Over sampled responses (one of): best_vs_worst, best_vs_random (the best "
        "against a seeded random lower one), above_margin (every pair above the margin), top_k_vs_bottom_k. "
        "With a teacher: refined_vs_original (a refinement against its parent), anchor_vs_sampled (the "
        "teacher's own answer against lower-scored samples). One rule or a list of them.")  # fmt: skip
    scorer: str | None = Field(None, description="Name of the scorer whose values rank responses (default: first).")
    min_margin: float | Literal["auto"] | ZMargin | QuantileMargin = Field(
        "auto", description="Pairs need chosen - rejected >= this (and > 0): a number in the scorer's units, "
        "{z: x} standard deviations of its values, {quantile: q} of the run's gaps, or auto (1 point on a "
        "judge's scale; any positive gap for unitless scorers: CDR, pairwise win shares, reward models, "
        "panels).")  # fmt: skip
    max_pairs_per_prompt: int | None = Field(None, ge=1, description="Keep at most this many pairs per prompt "
                                             "(the largest margins first).")  # fmt: skip
    k: int = Field(1, ge=1, description="top_k_vs_bottom_k: the k best against the k worst of each prompt.")
    seed: int = Field(0, description="best_vs_random: the seed of the draw (the same seed, the same pairs).")
    allow_truncated: bool = Field(False, description="Pair replies cut off at max_tokens (finish_reason length).")
    max_length_ratio: float | None = Field(None, ge=1, description="Drop pairs whose longer reply is more than "
                                           "this many times the shorter (in completion tokens).")  # fmt: skip
    length_matched: bool = Field(False, description="Prefer pairs of similar length: each prompt's candidates "
                                 "ranked by length ratio first, margin second (keeps max_pairs_per_prompt, "
                                 "default 1).")  # fmt: skip
    require_agreement: list[str] = Field(
        [], description="Scorers that must each score the chosen response strictly above the rejected one."
    )
    min_panel_agreement: float | None = Field(
        None, ge=-1, le=1, description="With a panel: curate only prompts whose members agree, Krippendorff "
        "alpha per prompt at least this (an undefined alpha does not agree).")  # fmt: skip
    dedup: Literal["none", "exact", "near"] = Field(
        "exact", description="Leave out duplicate prompts (the smallest id of a group stays) and pairs of the same "
        "text: exact (after normalization) or near (MinHash LSH at near_threshold) as well.")  # fmt: skip
    near_threshold: float = Field(0.85, gt=0, le=1, description="Jaccard similarity of near duplicates.")
    dedup_responses: bool = Field(False, description="Also leave out of curation a reply that duplicates a reply "
                                  "to another prompt (per `dedup`: exact, or near as well); listed in "
                                  "prompt_flags.")  # fmt: skip
    decontaminate: list[EvalSet] = Field([], description="Evaluation sets: prompts sharing an n-gram with one of "
                                         "their items are left out and listed in prompt_flags.")  # fmt: skip
    ngram: int = Field(13, ge=3, description="Words per n-gram of the contamination check.")
    human_override: bool = Field(
        True, description="Human verdicts (`prefsynth review import`) override the machine's: a pair people "
        "prefer the other way round is flipped (scorer `human`), a tie drops it. Without labels nothing changes.")
    ngram_min: int = Field(5, ge=1, description="An evaluation item (or a prompt) shorter than `ngram` words but "
                           "of at least this many matches a prompt (an item) that contains its whole word "
                           "sequence; shorter texts match only equal ones.")  # fmt: skip

    @property
    def rules(self) -> list[str]:
        return [self.rule] if isinstance(self.rule, str) else list(dict.fromkeys(self.rule))

    @property
    def sampled_rule(self) -> str | None:
        """The one rule over sampled responses, if any."""
        return next((r for r in self.rules if r in SAMPLED_RULES), None)

    @model_validator(mode="after")
    def _one_sampled_rule(self) -> CurationSpec:
        sampled = [r for r in self.rules if r in SAMPLED_RULES]
        if len(sampled) > 1:
            raise ValueError(f"curation.rule: give one rule over sampled responses, not {sampled}")
        if self.dedup_responses and self.dedup == "none":
            raise ValueError("curation.dedup_responses follows `dedup`: set dedup to exact or near")
        return self


class TeacherSpec(Strict):
    """A strong model that refines sampled responses into contrastive pairs and answers prompts itself."""

    model: ModelSpec
    refine: Literal["lowest", "every", "none"] = Field(
        "lowest", description="Which sampled responses it refines: each prompt's lowest-scored one (by the "
        "curation scorer), every scored one, or none.")  # fmt: skip
    reference: bool = Field(False, description="Show the teacher its own answer (the anchor) as a reference.")
    reply: Literal["tags", "json"] = Field(
        "tags", description="How the refinement comes back: between <explanation>/<kind>/<revised> tags, or as "
        "a JSON object the server must follow (a grammar on llama.cpp: small models then answer).")  # fmt: skip
    min_gap: float = Field(1.0, ge=0, description="Keep a refinement only if its score - its parent's > this.")
    anchors: bool = Field(False, description="Store the teacher's own answer to each prompt (source teacher_anchor).")
    max_tokens: int = Field(256, ge=16, le=32768)
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int = Field(0, ge=0)


class LoopSpec(Strict):
    """An Anyprefer-style synthesis loop (flows/loop.py): rounds of generate, judge, check the pairs, and
    rewrite the target's system prompt and the judge's rubric until enough pairs pass the check."""

    max_rounds: int = Field(3, ge=1, le=50, description="Rounds at most (a round is one pipeline run).")
    accept_threshold: float = Field(7.0, ge=1, le=10, description="A pair is accepted if its check scores >= this.")
    target_rate: float = Field(0.8, gt=0, le=1, description="Stop once a round's acceptance rate reaches this.")
    checker: ModelSpec | None = Field(None, description="Model of the pair-quality check (default: the judge's).")
    optimizer: ModelSpec | None = Field(None, description="Model that rewrites the prompts (default: the judge's).")
    max_tokens: int = Field(256, ge=16, le=32768, description="Of the optimizer's reply (the check's: 96).")
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int = Field(0, ge=0)


ExportFormat = Literal["trl", "jsonl", "openrlhf", "sft"]
MarginMode = Literal["none", "raw", "scaled", "teacher"]


SPLIT_NAMES = ("train", "validation", "test")  # the names `datasets` and the Hub find in file names
REPO_ID = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"


def check_repo_id(value: str) -> str:
    """A Hub dataset repo id ORG/NAME that the Hub's own rules accept (huggingface_hub's validate_repo_id: no
    `--` or `..`, no `.git` at the end, at most 96 characters); ValueError otherwise."""
    from huggingface_hub.utils import validate_repo_id

    if not re.match(REPO_ID, value):
        raise ValueError(f"must be a Hub repo id ORG/NAME, got {value!r}")
    try:
        validate_repo_id(value)
    except ValueError as err:  # HFValidationError
        raise ValueError(f"{value!r} is not a Hub repo id: {err}") from None
    return value


def check_splits(fractions: dict[str, float]) -> dict[str, float]:
    """Split fractions by prompt, in SPLIT_NAMES order: known names, each in (0, 1], summing to 1."""
    if not fractions:
        raise ValueError("splits: name at least one split, e.g. {train: 0.9, test: 0.1}")
    unknown = sorted(set(fractions) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"splits: unknown split name {unknown[0]!r}; use {', '.join(SPLIT_NAMES)} (the names "
                         "`datasets` and the Hub recognise in file names)")
    for name, value in fractions.items():
        if not 0 < value <= 1:
            raise ValueError(f"splits: {name} must be a fraction of the prompts in (0, 1], got {value:g}")
    total = sum(fractions.values())
    if abs(total - 1) > 1e-9:
        raise ValueError(f"splits: the fractions must sum to 1, got {total:g}")
    return {name: fractions[name] for name in SPLIT_NAMES if name in fractions}


class Splits(Strict):
    """Train/test splits by prompt: every pair of a prompt lands in the split its seeded hash draws."""

    fractions: dict[str, float]
    seed: int = 0

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        return check_splits(value)


class ExportTarget(Strict):
    format: ExportFormat = "trl"
    path: str = Field(..., description="Output folder (relative to the current directory).")
    margin: MarginMode = Field(
        "none", description="Write a `margin` column (read by TRL's RewardTrainer): none, raw, scaled or teacher."
    )
    splits: dict[str, float] | None = Field(
        None, description="Split the rows by prompt, e.g. {train: 0.9, test: 0.1}: one file per split (train, "
        "validation, test), a prompt's pairs all in one split, drawn from a seeded hash of its id.")  # fmt: skip
    seed: int = Field(0, description="The seed of the split draw (the same seed, the same split).")
    push_to_hub: str | None = Field(None, pattern=REPO_ID, description="After the export, push its files and "
                                    "card to this Hub dataset repo (ORG/NAME); needs a token (HF_TOKEN).")  # fmt: skip
    private: bool = Field(False, description="push_to_hub: create the repo private.")

    @field_validator("splits")
    @classmethod
    def _splits(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        return None if value is None else check_splits(value)

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        return None if value is None else check_repo_id(value)

    @property
    def split_spec(self) -> Splits | None:
        return None if self.splits is None else Splits(fractions=self.splits, seed=self.seed)


class PipelineConfig(Strict):
    name: str = "prefsynth"
    prompts: PromptSource
    generation: GenerationSpec
    scorers: list[ScorerEntry] = Field(..., min_length=1)
    curation: CurationSpec = CurationSpec()
    export: list[ExportTarget] = []
    warehouse: str = Field("prefsynth.duckdb", description="DuckDB file (relative to the current directory), or a "
                           "DuckLake warehouse: ducklake:postgres://USER@HOST:PORT/DBNAME?data_path=FOLDER "
                           "(password from PGPASSWORD).")  # fmt: skip
    warehouse_wait_s: float = Field(600, ge=0, description="How long a run waits for another process to let "
                                    "go of the warehouse file before it gives up.")  # fmt: skip
    panel: PanelSpec | None = Field(None, description="Aggregate several scorers and measure their agreement.")
    teacher: TeacherSpec | None = Field(None, description="Refine responses and answer prompts with a teacher.")
    loop: LoopSpec | None = Field(None, description="Run as a synthesis loop (`prefsynth loop`).")
    chunk_size: int | None = Field(None, ge=1, description="Ignored: runs stream (kept so older configs load).")
    failures_fatal: bool = Field(False, description="Exit non-zero when any item failed.")
    budget: Budget | None = Field(None, exclude_if=_unset, description="Stop making new calls at this many "
                                  "tokens or this cost (per run; a loop's budget covers all its rounds).")  # fmt: skip
    runner: Literal["threads", "ray"] = Field("threads", exclude_if=lambda v: v == "threads", description=(
        "Where in-process heavy steps (in-process reward models, dedup) run: `threads` of the flow process, or "
        "`ray` (extra prefsynth[ray]): Prefect tasks on a Ray cluster through prefect-ray."))  # fmt: skip
    ray_address: str | None = Field(None, exclude_if=_unset, description="With runner: ray, the Ray cluster "
                                    "(e.g. ray://head:10001); default RAY_ADDRESS, else a local Ray instance.")

    @field_validator("warehouse")
    @classmethod
    def _warehouse(cls, value: str) -> str:
        """A DuckLake name is checked here (no password in it: configs are stored and logged)."""
        from prefsynth.errors import WarehouseError
        from prefsynth.warehouse import ducklake

        if ducklake.is_lake(value):
            try:
                ducklake.parse(value)
            except WarehouseError as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _names(self) -> PipelineConfig:
        names = [s.name for s in self.scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"scorer names must be distinct: {names}")
        per_prompt = self.generation.samples_per_prompt * len(self.generation.models)
        pairwise = [s.name for s in self.scorers if s.compares]
        if pairwise and per_prompt < 2:
            raise ValueError(f"pairwise judges ({', '.join(pairwise)}) compare responses to the same prompt: "
                             "give at least 2 per prompt (samples_per_prompt x models)")  # fmt: skip
        if self.panel is not None:
            if self.panel.name in names:
                raise ValueError(f"panel.name {self.panel.name!r} is also a scorer name")
            members = self.panel.scorers or []
            if len(set(members)) != len(members):
                raise ValueError(f"panel.scorers must be distinct: {members}")
            missing = [n for n in members if n not in names]
            if missing:
                raise ValueError(f"panel.scorers {missing} are not scorer names; have {names}")
            if self.panel.scorers is None and len(names) < 2:
                raise ValueError("a panel needs at least two scorers")
            names = [*names, self.panel.name]
        elif self.curation.min_panel_agreement is not None:
            raise ValueError("curation.min_panel_agreement filters by a panel's agreement: add a `panel`")
        if self.curation.scorer is not None and self.curation.scorer not in names:
            raise ValueError(f"curation.scorer {self.curation.scorer!r} is not a scorer name; have {names}")
        missing = [n for n in self.curation.require_agreement if n not in names]
        if missing:
            raise ValueError(f"curation.require_agreement {missing} are not scorer names; have {names}")
        self._teacher_rules()
        self._loop_rules()
        if self.budget is not None and self.budget.max_cost is not None:
            unpriced = sorted({m.label for m in self.all_models() if m.price is None and not m.is_local})
            if unpriced:
                raise ValueError(f"budget.max_cost counts money, but these endpoint models have no `price`: "
                                 f"{', '.join(unpriced)}")  # fmt: skip
        return self

    def _loop_rules(self) -> None:
        """The loop rewrites a pointwise judge's rubric and pairs sampled responses."""
        if self.loop is None:
            return
        by_name = {s.name: s for s in self.scorers}
        if getattr(by_name.get(self.curation_scorer_name), "kind", None) != "pointwise_judge":
            raise ValueError("`loop` rewrites the curation scorer's rubric: it must be a pointwise_judge")
        if self.curation.rules != ["best_vs_worst"]:
            raise ValueError("`loop` checks sampled best_vs_worst pairs: set curation.rule to best_vs_worst")
        if self.generation.samples_per_prompt * len(self.generation.models) < 2:
            raise ValueError("`loop` pairs the best and the worst sample: give samples_per_prompt >= 2")

    def _teacher_rules(self) -> None:
        """Teacher rules need a teacher that does their part; anchors are ranked by a pointwise scorer."""
        rules, teacher = self.curation.rules, self.teacher
        if not rules:
            raise ValueError("curation.rule is an empty list: name at least one rule")
        if "refined_vs_original" in rules and (teacher is None or teacher.refine == "none"):
            raise ValueError("curation rule refined_vs_original needs a `teacher` whose `refine` is not none")
        for i, target in enumerate(self.export):
            if target.format == "sft" and (teacher is None or not teacher.anchors):
                raise ValueError(f"export.{i}.format sft exports the teacher's anchors: set teacher.anchors: true")
            if target.format == "sft" and target.margin != "none":
                raise ValueError(f"export.{i}.margin is for preference pairs; an sft export has none")
            if target.margin == "teacher" and "refined_vs_original" not in rules:
                raise ValueError(f"export.{i}.margin teacher exports the teacher's calibrated gaps: add the curation "
                                 "rule refined_vs_original (with a `teacher`), or choose margin raw, scaled or none")
        if teacher is not None and teacher.reference and not teacher.anchors:
            raise ValueError("teacher.reference shows the teacher its own answer: set teacher.anchors: true")
        if "anchor_vs_sampled" in rules:
            if teacher is None or not teacher.anchors:
                raise ValueError("curation rule anchor_vs_sampled needs a `teacher` with `anchors: true`")
            by_name = {s.name: s for s in self.scorers}
            if self.curation_scorer_name not in by_name or by_name[self.curation_scorer_name].compares:
                raise ValueError("curation rule anchor_vs_sampled needs a pointwise curation scorer (not a panel "
                                 "or a pairwise judge): it scores the anchor like the samples")  # fmt: skip

    @property
    def curation_scorer_name(self) -> str:
        return self.curation.scorer or self.scorers[0].name

    @property
    def panel_members(self) -> list[str]:
        if self.panel is None:
            return []
        return list(self.panel.scorers or [s.name for s in self.scorers])

    def all_models(self) -> list[ModelSpec]:
        teacher = [self.teacher.model] if self.teacher else []
        loop = [m for m in (self.loop.checker, self.loop.optimizer) if m] if self.loop else []
        return [*self.generation.models, *(m for s in self.scorers for m in s.models()), *teacher, *loop]


_INPUT_KEYS = ("gguf", "domains_file", "exemplars_file", "path")


def _resolve_inputs(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative input paths absolute against the config file's folder (before validation)."""

    def fix(path: Any) -> Any:
        if not isinstance(path, str) or path in PACKAGED_MODELS or Path(path).is_absolute():
            return path
        return str((base / path).resolve())

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _INPUT_KEYS or (key == "chat_template" and str(value).endswith(".jinja")):
                    node[key] = fix(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    prompts = raw.get("prompts")
    if isinstance(prompts, dict):
        for key in ("path", "hf_dataset"):
            if key in prompts:
                prompts[key] = fix(prompts[key])
    walk(raw.get("generation"))
    walk(raw.get("scorers"))
    walk(raw.get("teacher"))
    walk(raw.get("loop"))
    walk(raw.get("curation"))  # evaluation sets to decontaminate against
    return raw


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} problem{'s' if err.error_count() > 1 else ''})"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(raw: Any, source: str = "config", base_dir: Path | None = None) -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    if base_dir is not None:
        raw = _resolve_inputs(raw, base_dir)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def parse_scorer(raw: Any, base_dir: Path | None = None) -> ScorerSpec:
    """One scorer spec from a mapping shaped like an entry of a config's `scorers`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a scorer is a mapping with a `kind`, got {type(raw).__name__}")
    if base_dir is not None:
        raw = _resolve_inputs({"scorers": [raw]}, base_dir)["scorers"][0]
    try:
        return TypeAdapter(ScorerEntry).validate_python(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error("scorer", err)) from None


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(not_utf8(path, path.read_bytes())) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {err.problem}") from None
    return parse_config(raw, str(path), path.parent.resolve())
