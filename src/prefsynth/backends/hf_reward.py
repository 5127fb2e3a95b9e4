"""An in-process reward model: a local Hugging Face sequence-classification folder, run on the CPU.

Optional: needs the extra `prefsynth[transformers]` (torch + transformers), imported only when the model
loads. Nothing is downloaded (`local_files_only=True`), and the folder must hold a trained classification
head (a causal-LM checkpoint would get a random one, so it is refused).

- Input text: the tokenizer's chat template applied to the conversation, the response being the last,
  assistant turn (no generation prompt, no extra special tokens); without a template, plain lines
  "User: ...\\nAssistant: ..." tokenized with the tokenizer's special tokens.
- Inputs longer than max_length tokens keep their last max_length tokens (the reward is read at the end).
- Batches are right-padded with the model's pad_token_id; a model without one is run one input at a time.
- Reward = logits[label_index], the raw output (no activation), in float32, eval mode, no grad.
- Identity: a SHA-256 over the content hashes of the files that determine values (config, weights,
  tokenizer and chat-template files), not the folder's path; `render_id` stands for the plain-lines format.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefsynth.backends.local import file_sha256
from prefsynth.backends.templates import conversation_text
from prefsynth.errors import ConfigError
from prefsynth.warehouse.ids import PLACEHOLDER_TURNS, template_id

INSTALL_HINT = "pip install 'prefsynth[transformers]'"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


@dataclass
class RewardResult:
    """One conversation's reward, or why there is none."""

    value: float | None = None
    details: dict[str, Any] | None = None
    error: str | None = None


def render_id() -> str:
    """The id of the text format given to a model without a chat template (its template is in its identity)."""
    return template_id(conversation_text(PLACEHOLDER_TURNS))


def folder_identity(folder: Path) -> str:
    """`hf:sha256:<hex>` over the names and SHA-256 of the files transformers reads from `folder`."""
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not weights:
        raise ConfigError(f"reward model folder {folder} has no weights (*.safetensors or pytorch_model*.bin)")
    files = [folder / "config.json", *weights, *(p for n in _TOKENIZER_FILES if (p := folder / n).is_file())]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return f"hf:sha256:{digest.hexdigest()}"


_shared: dict[tuple[str, int, str], HFRewardModel] = {}
_shared_lock = threading.Lock()


def shared_model(path: str, max_length: int, identity: str) -> HFRewardModel:
    """This process's one instance of a model folder, so that a worker process (a Ray worker) loads it once for
    every batch it runs. ConfigError when the folder here is missing or its files are not those of `identity`
    (the flow's copy): a worker never scores with other weights than the scorer id names."""
    key = (path, max_length, identity)
    with _shared_lock:
        if key not in _shared:
            model = HFRewardModel(path, max_length)
            if model.identity != identity:
                raise ConfigError(f"reward model folder {path} here has other files ({model.identity}) than the "
                                  f"flow's ({identity})")  # fmt: skip
            _shared[key] = model
        return _shared[key]


class HFRewardModel:
    """A transformers `AutoModelForSequenceClassification` + `AutoTokenizer` from a local folder."""

    def __init__(self, path: str | Path, max_length: int) -> None:
        self.path = Path(path)
        self.max_length = max_length
        if not self.path.is_dir():
            raise ConfigError(f"reward model folder does not exist: {self.path}")
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"reward model folder {self.path} has no config.json (is it a Hugging Face model?)")
        missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f"the in-process reward model needs {' and '.join(missing)}: {INSTALL_HINT}")
        self.identity = folder_identity(self.path)
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None  # (tokenizer, model)

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._loaded is None:
                import torch
                from transformers import AutoModelForSequenceClassification, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    self.path, local_files_only=True, dtype=torch.float32, output_loading_info=True
                )
                if info.get("missing_keys"):
                    raise ValueError(
                        f"{self.path} has no trained classification head (missing {sorted(info['missing_keys'])}); "
                        "is it a reward model?"
                    )
                self._loaded = tokenizer, model.eval()
            return self._loaded

    def rewards(
        self, conversations: list[list[dict[str, str]]], label_index: int, batch_size: int
    ) -> list[RewardResult]:
        """One result per conversation (blocking; run it off the event loop). Never raises."""
        try:
            tokenizer, model = self._load()
        except Exception as err:  # a folder transformers cannot load fails every item, clearly
            return [RewardResult(error=f"cannot load reward model {self.path}: {err}")] * len(conversations)
        num_labels = model.config.num_labels
        if not label_index < num_labels:
            error = f"label_index {label_index} is out of range: the model has {num_labels} label(s)"
            return [RewardResult(error=error)] * len(conversations)
        results = [RewardResult() for _ in conversations]
        encoded: list[tuple[int, list[int]]] = []
        for i, conversation in enumerate(conversations):
            try:
                encoded.append((i, self._encode(tokenizer, conversation)))
            except Exception as err:  # e.g. a chat template that rejects these roles
                results[i].error = f"cannot render the conversation: {type(err).__name__}: {err}"
        pad_id = model.config.get_text_config().pad_token_id
        size = batch_size if pad_id is not None else 1
        for start in range(0, len(encoded), size):
            batch = encoded[start : start + size]
            try:
                logits = self._forward(model, [ids[-self.max_length :] for _, ids in batch], pad_id)
            except Exception as err:
                for i, _ in batch:
                    results[i].error = f"forward pass failed: {type(err).__name__}: {err}"
                continue
            for (i, ids), row in zip(batch, logits, strict=True):
                kept = min(len(ids), self.max_length)
                details = {"logits": row, "tokens": kept, "truncated": len(ids) > kept}
                results[i] = RewardResult(value=row[label_index], details=details)
        return results

    def _encode(self, tokenizer: Any, conversation: list[dict[str, str]]) -> list[int]:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(conversation_text(conversation))["input_ids"])

    def _forward(self, model: Any, rows: list[list[int]], pad_id: int | None) -> list[list[float]]:
        import torch

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for n, row in enumerate(rows):
            input_ids[n, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[n, : len(row)] = 1
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.float().tolist()
