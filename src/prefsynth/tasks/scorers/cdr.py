"""CDR: Customizable Density Ratio scoring (arXiv 2411.02481).

reward(x, y) = log p_strong(y | x) - log p_weak(y | x), summed over the reply's tokens including the
end-of-turn token that closes it; also per-token means (each model's sum over its own token count),
which the reference implementation returns and curation uses by default.

Both models score the same *text*: the context is rendered once with the strong model's chat template
(or, as an option, with each model's own), and each model returns log p(context + reply) - log p(context)
for that text with its own tokenizer. Customization puts a domain's criteria in the system turn and
good/bad exemplars before the user turn; a router LLM picks each prompt's domain.

A router's answer is a cached call (recorded with the prompt's first scored reply), so the domain it gives
(or the default, for an answer naming none) is a function of the score's id: H(response, scorer), the
scorer's id covering the router, its texts and the domains. A router call that *fails* is not cached: its
prompt's replies are not scored (a failure, retried by the next run, as for any failed model call), since a
default-domain score stored under that id would never be recomputed once the router answers.

Each model scores context + reply in one forward pass; the reply's tokens are those after the first
len(tokenize(context)) tokens, as the reference implementation masks them. Where a tokenizer merges the
context's last characters with the reply's first (a reply starting with spaces after the template's
"\n"), that merged token counts as the context's. The context's token count comes from a log-prob
request for the context alone, answered by the embedded server from the pass before it at no cost.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from prefsynth.backends.client import ChatOutcome, Endpoint, ModelClient, Recent
from prefsynth.backends.quirks import json_response_format
from prefsynth.backends.templates import conversation_text
from prefsynth.errors import ConfigError
from prefsynth.schemas.config import ModelSpec, ScorerSpec, Strict
from prefsynth.schemas.records import LogprobRow, Message, Route, Score
from prefsynth.tasks.scorers.base import Clients, PointwiseScorer, ScoreItem, ScoreOutcome, by_prompt
from prefsynth.tasks.scorers.judging import placeholder_turns
from prefsynth.warehouse.ids import canonical_json, content_id, template_id


class CDRCustomization(Strict):
    """The "C" in CDR: per-domain criteria, in-context exemplars, and a router that picks the domain."""

    criteria: bool = Field(False, description="Put the domain's criteria system prompt before the conversation.")
    exemplars: int = Field(0, ge=0, le=8, description="In-context good/bad exemplars prepended to the user turn.")
    router: ModelSpec | None = Field(None, description="LLM that classifies each prompt into a domain.")
    domain: str | None = Field(None, description="Use this domain for every prompt (instead of a router).")
    domains_file: str | None = Field(None, description="YAML of domains and criteria (default: packaged).")
    exemplars_file: str | None = Field(None, description="YAML of exemplars per domain (default: packaged).")
    seed: int = Field(0, description="Seed of the per-prompt exemplar choice.")

    @model_validator(mode="after")
    def _router_or_domain(self) -> CDRCustomization:
        if self.router is not None and self.domain is not None:
            raise ValueError("give `router` or a fixed `domain`, not both")
        return self


class CDRSpec(ScorerSpec):
    """Customizable Density Ratio: log p_strong(y|x) - log p_weak(y|x) (arXiv 2411.02481)."""

    kind: Literal["cdr"] = "cdr"
    name: str = "cdr"
    strong: ModelSpec
    weak: ModelSpec
    value: Literal["mean", "sum"] = Field(
        "mean", description="Score used for curation: per-token means (the reference) or sums of log-probs."
    )
    template: Literal["strong", "own"] = Field(
        "strong", description="Render the context with the strong model's chat template, or each model's own."
    )
    customization: CDRCustomization = CDRCustomization()

    def roles(self) -> dict[str, ModelSpec]:
        router = self.customization.router
        return {"strong": self.strong, "weak": self.weak, **({"router": router} if router else {})}


ROUTER_SYSTEM = "You route requests to evaluation domains."
ROUTER_PARAMS = {"temperature": 0.0, "max_tokens": 24, "seed": 0}
ROUTER_TEMPLATE = """Which domain does this request belong to?

Domains:
{domains}

Request:
{conversation}

Answer with JSON: {{"domain": "<one of: {names}>"}}"""
EXEMPLARS = "Here are examples of a good and a bad answer:\n\n{shots}\n\nNow the actual request:\n{request}"
EXEMPLAR = "Example {n}\nUser: {user}\nGood answer: {good}\nBad answer: {bad}"
EXEMPLAR_WHY = "\nWhy: {why}"
CRITERIA = "{criteria}\n\n{system}"  # the domain's criteria before a conversation's own system turn


@dataclass(frozen=True)
class Customization:
    default_domain: str
    domains: dict[str, dict[str, str]]  # name -> {description, system}
    exemplars: dict[str, list[dict[str, str]]]  # name -> [{user, good, bad, why}]

    @classmethod
    def load(cls, domains_file: str | None, exemplars_file: str | None) -> Customization:
        data = resources.files("prefsynth").joinpath("data", "cdr")
        criteria = _yaml(Path(domains_file) if domains_file else Path(str(data.joinpath("criteria.yaml"))))
        examples = _yaml(Path(exemplars_file) if exemplars_file else Path(str(data.joinpath("exemplars.yaml"))))
        domains = criteria.get("domains")
        if not isinstance(domains, dict) or not domains:
            raise ConfigError("CDR domains file needs a non-empty `domains` mapping")
        for name, d in domains.items():
            if not isinstance(d, dict) or not isinstance(d.get("system"), str) or not d.get("description"):
                raise ConfigError(f"CDR domain {name!r} needs `description` and `system` texts")
        default = criteria.get("default_domain", next(iter(domains)))
        if default not in domains:
            raise ConfigError(f"CDR default_domain {default!r} is not one of {sorted(domains)}")
        for name, rows in (examples or {}).items():
            if not isinstance(rows, list) or any(not isinstance(r, dict) or set(r) < {"user", "good", "bad"}
                                                 for r in rows):  # fmt: skip
                raise ConfigError(f"CDR exemplars of {name!r} must be a list of {{user, good, bad, why}}")
        return cls(default, domains, examples or {})


def _yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"CDR customization file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    return data


class CDRScorer(PointwiseScorer):
    Spec = CDRSpec

    def __init__(self, spec: CDRSpec, endpoints: dict[str, Endpoint]) -> None:
        """`endpoints`: strong, weak and (with a router) router."""
        super().__init__(spec, endpoints)
        self.spec = spec
        c = spec.customization
        self.custom = Customization.load(c.domains_file, c.exemplars_file) if c.criteria or c.exemplars else None
        if self.custom and c.domain is not None and c.domain not in self.custom.domains:
            raise ConfigError(f"CDR customization.domain {c.domain!r} is not one of {sorted(self.custom.domains)}")
        self._domains: dict[str, str] = {}
        self._unrouted: dict[str, str] = {}  # prompt_id -> why its router call failed (this run)
        self._router_calls: dict[str, ChatOutcome] = {}  # prompt_id -> router call not yet in a result
        self._known = Recent()  # log-probs computed this run, committed or not
        self._render = self._render_id()  # once: scorer_id is read for every score

    def _render_id(self) -> str:
        """The chat template's rendering of placeholder turns: a changed template is a new scorer."""
        turns = [m.model_dump() for m in placeholder_turns()]
        strong = self.endpoints["strong"].template.split_turn(turns, "<response>")
        weak = self.endpoints["weak"].template.split_turn(turns, "<response>") if self.spec.template == "own" else None
        return template_id(strong, weak)

    def identity(self) -> dict[str, Any]:
        c = self.spec.customization
        custom = None
        if self.custom:
            used = {"criteria": c.criteria, "exemplars": c.exemplars, "seed": c.seed, "domain": c.domain,
                    "domains": self.custom.domains, "default_domain": self.custom.default_domain,
                    "examples": self.custom.exemplars if c.exemplars else None}  # fmt: skip
            custom = content_id("cdr-customization", used, self._template_id())
        return {"value": self.spec.value, "template": self.spec.template, "render": self._render,
                "customization": custom, "method": 1}  # fmt: skip

    def _template_id(self) -> str:
        """The texts added to the data: the router's request for placeholder turns, and the formats of the
        exemplars and criteria (constants: which of them a prompt gets depends on its domain)."""
        router = None
        if "router" in self.endpoints:
            router = [*self._router_request(placeholder_turns()), ROUTER_PARAMS]
        return template_id(router, EXEMPLARS, EXEMPLAR, EXEMPLAR_WHY, CRITERIA)

    # ---- texts --------------------------------------------------------------------------------
    def domain_of(self, prompt_id: str) -> str | None:
        if self.custom is None:
            return None
        return self._domains.get(prompt_id) or self.spec.customization.domain or self.custom.default_domain

    def customized(self, item: ScoreItem) -> list[dict[str, str]]:
        messages = [m.model_dump() for m in item.messages]
        domain = self.domain_of(item.prompt_id)
        if self.custom is None or domain is None:
            return messages
        c = self.spec.customization
        if c.exemplars:
            pool = self.custom.exemplars.get(domain, [])
            chosen = random.Random(f"{c.seed}:{item.prompt_id}").sample(pool, min(c.exemplars, len(pool)))
            if chosen:
                shots = "\n\n".join(
                    EXEMPLAR.format(n=n, user=e["user"], good=e["good"], bad=e["bad"])
                    + (EXEMPLAR_WHY.format(why=e["why"]) if e.get("why") else "")
                    for n, e in enumerate(chosen, start=1)
                )
                last = max(i for i, m in enumerate(messages) if m["role"] == "user")
                content = EXEMPLARS.format(shots=shots, request=messages[last]["content"])
                messages[last] = {"role": "user", "content": content}
        if c.criteria:
            criteria = self.custom.domains[domain]["system"]
            if messages[0]["role"] == "system":
                content = CRITERIA.format(criteria=criteria, system=messages[0]["content"])
                messages[0] = {"role": "system", "content": content}
            else:
                messages.insert(0, {"role": "system", "content": criteria})
        return messages

    def texts(self, item: ScoreItem) -> dict[str, str]:
        """The exact strings each model scores: contexts and continuations."""
        messages = self.customized(item)
        s_ctx, s_cont = self.endpoints["strong"].template.split_turn(messages, item.response)
        if self.spec.template == "own":
            w_ctx, w_cont = self.endpoints["weak"].template.split_turn(messages, item.response)
        else:
            w_ctx, w_cont = s_ctx, s_cont
        return {"strong_context": s_ctx, "strong_continuation": s_cont, "weak_context": w_ctx,
                "weak_continuation": w_cont}  # fmt: skip

    def _lp_id(self, role: str, context: str, continuation: str) -> str:
        return content_id("logprob", self.endpoints[role].identity, _h(context), _h(continuation))

    # ---- routing and cache ----------------------------------------------------------------------
    async def prepare(self, clients: Clients, items: Sequence[ScoreItem]) -> list[Route]:
        if self.custom is None or "router" not in clients:
            return []
        firsts = {item.prompt_id: item for item in reversed(items)}
        todo = [item for pid, item in firsts.items() if pid not in self._domains and pid not in self._unrouted]
        routes = await asyncio.gather(*(self._route(clients["router"], item) for item in todo))
        self._domains.update({r.prompt_id: r.domain for r in routes if r is not None})
        return [r for r in routes if r is not None]

    def _router_request(self, turns: Sequence[Message]) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """The router's messages and the JSON schema of its answer, for a conversation."""
        assert self.custom is not None
        names = list(self.custom.domains)
        listing = "\n".join(f"- {n}: {d['description']}" for n, d in self.custom.domains.items())
        user = ROUTER_TEMPLATE.format(domains=listing, conversation=conversation_text(turns), names=", ".join(names))
        schema = {"type": "object", "properties": {"domain": {"type": "string", "enum": names}}, "required": ["domain"]}
        return [{"role": "system", "content": ROUTER_SYSTEM}, {"role": "user", "content": user}], schema

    async def _route(self, client: ModelClient, item: ScoreItem) -> Route | None:
        """The prompt's route; None when the router call failed (the prompt is then not scored this run)."""
        assert self.custom is not None
        messages, schema = self._router_request(item.messages)
        fmt = json_response_format(self.endpoints["router"], "domain", schema)
        outcome = await client.chat(client.request_body(messages, **ROUTER_PARAMS, response_format=fmt))
        if not outcome.cached:  # a call shared with a concurrent request is recorded by that one
            self._router_calls[item.prompt_id] = outcome
        if not outcome.ok:
            self._unrouted[item.prompt_id] = f"router call failed: {outcome.call.error}"
            return None
        raw = outcome.text or ""
        domain = parse_domain(raw, list(self.custom.domains))
        return Route(route_id=content_id("route", item.prompt_id, outcome.call.call_id), prompt_id=item.prompt_id,
                     router=self.endpoints["router"].identity, domain=domain or self.custom.default_domain,
                     parsed=domain is not None, raw=raw, call_id=outcome.call.call_id)  # fmt: skip

    # ---- scoring --------------------------------------------------------------------------------
    def schedule(self, items: Sequence[ScoreItem]) -> tuple[list[list[ScoreItem]], int]:
        """Replies to one prompt go together, so a one-slot server reuses their shared context from its
        KV cache; servers with more slots get proportionally more prompts in flight."""
        slots = min(self.endpoints["strong"].concurrency, self.endpoints["weak"].concurrency)
        return by_prompt(items), max(1, slots // 2)

    async def _logprob(
        self, client: ModelClient, role: str, context: str, continuation: str, out: ScoreOutcome
    ) -> tuple[float, int] | str:
        lp_id = self._lp_id(role, context, continuation)
        known = self._known.get(lp_id) or await client.cached_logprob(lp_id)
        if known is not None:
            return known
        # The full text first: the context's request (only its token count is used) then comes right after
        # a pass that contains it, which the embedded server answers without evaluating anything.
        full = await client.text_logprob(context + continuation)
        ctx = await client.text_logprob(context)
        out.keep(full)
        out.keep(ctx)
        for part in (full, ctx):
            if not part.ok:
                return f"{role} model log-prob call failed: {part.call.error}"
        reply = full.values[len(ctx.values) :]
        if not reply or any(v is None for v in reply):
            return f"{role} model returned no log-probs for the reply's tokens"
        value = (float(sum(reply)), len(reply))  # type: ignore[arg-type]
        self._known.put(lp_id, value)
        out.logprobs.append(LogprobRow(lp_id=lp_id, model=self.endpoints[role].identity, context_hash=_h(context),
                                       continuation_hash=_h(continuation), logprob=value[0], tokens=value[1],
                                       call_ids=[full.call.call_id, ctx.call.call_id]))  # fmt: skip
        return value

    async def score(self, clients: Clients, item: ScoreItem) -> ScoreOutcome:
        out = ScoreOutcome()
        routed = self._router_calls.pop(item.prompt_id, None)
        if routed is not None:  # into the ledger and the cache, once per prompt
            out.keep(routed)
        if item.prompt_id in self._unrouted:
            return self.failed(out, item, self._unrouted[item.prompt_id], None)
        try:
            t = self.texts(item)
        except ValueError as err:
            return self.failed(out, item, f"cannot render the conversation: {err}", None)
        strong, weak = await asyncio.gather(
            self._logprob(clients["strong"], "strong", t["strong_context"], t["strong_continuation"], out),
            self._logprob(clients["weak"], "weak", t["weak_context"], t["weak_continuation"], out),
        )
        for part in (strong, weak):
            if isinstance(part, str):
                return self.failed(out, item, part, None)
        (s_lp, s_n), (w_lp, w_n) = strong, weak  # type: ignore[misc]
        details = cdr_values(s_lp, s_n, w_lp, w_n)
        details["domain"] = self.domain_of(item.prompt_id)
        out.score = Score(
            score_id=item.score_id, response_id=item.response_id, scorer_id=self.scorer_id, scorer=self.name,
            value=details["cdr_mean"] if self.spec.value == "mean" else details["cdr_sum"], rationale=None, raw="",
            call_ids=[], details=canonical_json(details),
        )  # fmt: skip
        return out


def cdr_values(strong_lp: float, strong_n: int, weak_lp: float, weak_n: int) -> dict[str, Any]:
    return {
        "strong_logprob": strong_lp,
        "weak_logprob": weak_lp,
        "strong_tokens": strong_n,
        "weak_tokens": weak_n,
        "cdr_sum": strong_lp - weak_lp,
        "cdr_mean": strong_lp / strong_n - weak_lp / weak_n,
    }


def parse_domain(raw: str, names: list[str]) -> str | None:
    """The domain a router named: JSON {"domain": ...} or the first domain name in the text."""
    try:
        data = json.loads(raw.strip())
        if isinstance(data, dict) and data.get("domain") in names:
            return data["domain"]
    except ValueError:
        pass
    lowered = raw.lower()
    hits = sorted((lowered.find(n.lower()), n) for n in names if n.lower() in lowered)
    return hits[0][1] if hits else None


def _h(text: str) -> str:
    return content_id("text", text)
