"""The files of a human review: what Argilla and Label Studio import, and what they export after people labelled.

Checked against the tools' sources (Argilla 2.8 `Dataset.to_disk`/`from_disk`, `Record.to_dict`,
`Settings.serialize`; Label Studio's task import JSON, the `Pairwise` control tag and its JSON export):
- Argilla: a `Dataset.to_disk` folder that `rg.Dataset.from_disk(DIR)` loads: `.argilla/dataset.json` (the
  dataset model), `.argilla/settings.json` (fields prompt, left, right; a label question `preference` with
  left, right and tie; metadata task_id and pair_id) and `records.json` (a list of records, each with `id` =
  the task id). After annotation, `dataset.to_disk(DIR)` writes each record's answers as
  `"responses": {"preference": [{"value": "left", "user_id": "..."}]}`; import that folder or its records.json.
  Argilla's records carry no answer time, so `labelled_at` stays empty for them.
- Label Studio: `tasks.json` (a list of `{"data": {...}}` tasks: task_id, pair_id, prompt, left, right) and
  `label_config.xml` (a `<Pairwise name="preference" toName="left,right"/>` and a `tie` choice). Its JSON
  export holds each task with `annotations`, each with `completed_by` (a user id, or a dict with email),
  `created_at` and `updated_at` (the time of the last edit: preferred), `was_cancelled` and `result` items
  `{"type": "pairwise", "value": {"selected": "left"}}` or `{"type": "choices", "from_name": "tie", ...}`;
  import that file. A cancelled (skipped) annotation, or one with no selection, is a `skip`; a pairwise
  selection counts over a tie choice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefsynth.schemas.records import ReviewTask
from prefsynth.tasks.review import ReviewError

QUESTION = "preference"
TIE_CHOICE = "Tie: neither is better"
GUIDELINES = ("Read the prompt and the two responses. Pick the better response (left or right), or tie if "
              "neither is better. The sides are shuffled: neither is the machine's pick more often.")  # fmt: skip
LABEL_CONFIG = f"""<View>
  <Header value="{GUIDELINES}"/>
  <Text name="prompt" value="$prompt"/>
  <Pairwise name="{QUESTION}" toName="left,right"/>
  <View style="display: flex;">
    <View style="flex: 1; margin-right: 1em;"><Header value="Left"/><Text name="left" value="$left"/></View>
    <View style="flex: 1;"><Header value="Right"/><Text name="right" value="$right"/></View>
  </View>
  <Choices name="tie" toName="prompt" choice="single" showInline="true">
    <Choice value="{TIE_CHOICE}"/>
  </Choices>
</View>
"""
FILES = {"argilla": ("records.json", ".argilla/settings.json", ".argilla/dataset.json"),
         "label-studio": ("tasks.json", "label_config.xml")}  # fmt: skip


def conversation(messages_json: str) -> str:
    """A prompt's messages as text: one `role: content` paragraph per message."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in json.loads(messages_json))


def write(tool: str, out: Path, tasks: list[ReviewTask], texts: dict[str, dict[str, str]], name: str) -> list[Path]:
    """Write `tasks` for `tool` into `out` (which must not hold such files already); texts: {pair_id: {prompt,
    chosen, rejected}}. Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    there = [f for f in FILES[tool] if (out / f).exists()]
    if there:
        raise ReviewError(f"{out} already holds {', '.join(there)}: choose an empty --out folder")
    items = []
    for t in tasks:
        shown = texts[t.pair_id]
        left, right = ((shown["chosen"], shown["rejected"]) if t.chosen_side == "left"
                       else (shown["rejected"], shown["chosen"]))  # fmt: skip
        items.append({"task_id": t.task_id, "pair_id": t.pair_id, "prompt": shown["prompt"], "left": left,
                      "right": right})  # fmt: skip
    files = _argilla(out, items, name) if tool == "argilla" else _label_studio(out, items)
    return files


def _dump(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def _argilla(out: Path, items: list[dict[str, str]], name: str) -> list[Path]:
    def prop(name: str, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"id": None, "inserted_at": None, "updated_at": None, "name": name, "settings": settings,
                "title": name, **extra, "dataset_id": None}  # fmt: skip

    text = {"type": "text", "use_markdown": False}
    options = [{"text": "Left is better", "value": "left"}, {"text": "Right is better", "value": "right"},
               {"text": TIE_CHOICE, "value": "tie"}]  # fmt: skip
    question = prop(QUESTION, {"type": "label_selection", "options": options, "visible_options": 3},
                    description="Which response is better?", required=True, type="label_selection")
    terms = {"visible_for_annotators": False, "type": "terms", "values": None}
    settings = {
        "guidelines": GUIDELINES,
        "questions": [question],
        "fields": [prop(f, text, required=True, description=None, type="text") for f in ("prompt", "left", "right")],
        "vectors": [],
        "metadata": [prop(m, terms, visible_for_annotators=False) for m in ("task_id", "pair_id")],
        "allow_extra_metadata": False,
        "distribution": {"strategy": "overlap", "min_submitted": 1},
        "mapping": None,
    }  # fmt: skip
    dataset = {"id": None, "inserted_at": None, "updated_at": None, "name": name, "status": "draft",
               "guidelines": GUIDELINES, "allow_extra_metadata": False, "distribution": None, "workspace_id": None,
               "last_activity_at": None}  # fmt: skip
    records = [{"id": i["task_id"], "fields": {k: i[k] for k in ("prompt", "left", "right")},
                "metadata": {"task_id": i["task_id"], "pair_id": i["pair_id"]}, "suggestions": {}, "responses": {},
                "vectors": {}, "status": "pending", "_server_id": None} for i in items]  # fmt: skip
    return [_dump(out / "records.json", records), _dump(out / ".argilla" / "settings.json", settings),
            _dump(out / ".argilla" / "dataset.json", dataset)]  # fmt: skip


def _label_studio(out: Path, items: list[dict[str, str]]) -> list[Path]:
    config = out / "label_config.xml"
    config.write_text(LABEL_CONFIG, encoding="utf-8")
    return [_dump(out / "tasks.json", [{"data": i} for i in items]), config]


# ---- reading what the tools export after people labelled ---------------------------------------------------


def read_export(path: Path) -> tuple[str, Path, str, list[dict[str, Any]]]:
    """(tool, the file read, its SHA-256, verdicts) of an Argilla `to_disk` folder or records.json, or a Label
    Studio JSON export. Verdicts: task_id, selected (left | right | tie | skip), annotator, labelled_at."""
    file = path / "records.json" if path.is_dir() else path
    if not file.is_file():
        raise ReviewError(f"{path}: no such file" + (" (an Argilla folder holds records.json)" if path.is_dir()
                                                     else ""))  # fmt: skip
    data = file.read_bytes()
    try:
        items = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReviewError(f"{file}: not JSON ({err}); import the JSON file Argilla or Label Studio exported") from None
    sha = hashlib.sha256(data).hexdigest()
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise ReviewError(f"{file}: expected a non-empty JSON list of records (Argilla) or tasks (Label Studio)")
    if all("fields" in i and "responses" in i for i in items):
        return "argilla", file, sha, [v for i, item in enumerate(items) for v in _argilla_verdicts(file, i, item)]
    if all("data" in i for i in items):
        return "label-studio", file, sha, [v for i, item in enumerate(items) for v in _ls_verdicts(file, i, item)]
    raise ReviewError(f"{file}: neither Argilla records (fields, responses) nor Label Studio tasks (data, "
                      "annotations): import Argilla's `dataset.to_disk` folder or Label Studio's JSON export")


def _task_id(file: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ReviewError(f"{file}: {where} has no prefsynth task_id: not a task of `prefsynth review export`")
    return value


def _argilla_verdicts(file: Path, index: int, record: dict[str, Any]) -> list[dict[str, Any]]:
    tid = _task_id(file, f"record {index}", (record.get("metadata") or {}).get("task_id") or record.get("id"))
    answers = (record.get("responses") or {}).get(QUESTION) or []
    out = []
    for answer in answers:
        if answer.get("status") == "draft":  # not submitted
            continue
        value = answer.get("value")
        selected = "skip" if answer.get("status") == "discarded" or value is None else value
        if selected not in ("left", "right", "tie", "skip"):
            raise ReviewError(f"{file}: record {index}: answer {value!r} to `{QUESTION}` is not left, right or tie")
        out.append({"task_id": tid, "selected": selected, "annotator": f"argilla:{answer.get('user_id')}",
                    "labelled_at": None})  # fmt: skip
    return out


def _ls_verdicts(file: Path, index: int, task: dict[str, Any]) -> list[dict[str, Any]]:
    tid = _task_id(file, f"task {index}", (task.get("data") or {}).get("task_id"))
    out = []
    for a in task.get("annotations") or []:
        results = a.get("result") or []
        picks = [r.get("value", {}).get("selected") for r in results if r.get("type") == "pairwise"]
        tie = any(r.get("type") == "choices" and r.get("from_name") == "tie" for r in results)
        if a.get("was_cancelled"):
            selected = "skip"
        elif picks:
            selected = picks[-1]
        else:
            selected = "tie" if tie else "skip"
        if selected not in ("left", "right", "tie", "skip"):
            raise ReviewError(f"{file}: task {index}: pairwise selection {selected!r} is not left or right")
        out.append({"task_id": tid, "selected": selected, "annotator": f"label-studio:{_ls_user(a)}",
                    "labelled_at": a.get("updated_at") or a.get("created_at")})  # edited: updated_at  # fmt: skip
    return out


def _ls_user(annotation: dict[str, Any]) -> str:
    """The annotator: an email when the export has one (completed_by as a dict, or completed_by_info), else the
    user id."""
    for who in (annotation.get("completed_by"), annotation.get("completed_by_info")):
        if isinstance(who, dict) and (who.get("email") or who.get("id") is not None):
            return str(who.get("email") or who["id"])
    return str(annotation.get("completed_by"))
