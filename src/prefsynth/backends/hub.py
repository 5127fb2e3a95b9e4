"""Push an exported snapshot to the Hugging Face Hub: its data files byte for byte and its card (README.md), in
one commit to a dataset repo, through huggingface_hub's own API. Only when the user asks for it
(`push_to_hub`, `--push-to-hub`) and has a token; the token and the network are checked before any work.

The Hub reads the splits from the file names (train.parquet, test.parquet, ...), as `datasets` does locally, so
the same commit deletes the files of the same format that an earlier push left and this export does not hold
(test.parquet after an export without splits): no stale split stays in the repo. A failed push (the network,
the Hub's answer, a repo id the Hub refuses) is an ExportError: the export itself stands.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefsynth.errors import ExportError

if TYPE_CHECKING:
    from prefsynth.tasks.export import Exported

CARD = "README.md"


def hub_token() -> str:
    """The user's Hugging Face token (HF_TOKEN, or the file `hf auth login` writes), and the Hub reachable in
    this process; ExportError otherwise."""
    from huggingface_hub import constants, get_token

    token = get_token()
    if not token:
        raise ExportError("push_to_hub needs a Hugging Face token with write access: set HF_TOKEN or run "
                          "`hf auth login`; nothing was exported")  # fmt: skip
    if constants.HF_HUB_OFFLINE:
        raise ExportError("push_to_hub needs the network, but HF_HUB_OFFLINE is set (prefsynth's CLI sets it unless "
                          "told otherwise, so that nothing downloads at run time): run with HF_HUB_OFFLINE=0; "
                          "nothing was exported")  # fmt: skip
    return token


def hub_files(done: Exported) -> list[tuple[str, Path]]:
    """(path in the repo, local file) of what a push uploads: the export's data files, then its card."""
    folder = done.files[0].parent
    return [(path.name, path) for path in done.files] + [(CARD, folder / CARD)]


def stale_files(done: Exported, repo_files: Sequence[str]) -> list[str]:
    """The files of the repo (`repo_files`) of the export's format that it does not hold: an earlier push's."""
    from prefsynth.tasks.export import format_files

    pushed = {name for name, _ in hub_files(done)}
    return sorted(f for f in set(repo_files) & set(format_files(done.format)) if f not in pushed)


def commit_operations(done: Exported, repo_files: Sequence[str] = ()) -> list[Any]:
    """huggingface_hub's CommitOperationAdd of each file to push (it hashes each file here, offline), then a
    CommitOperationDelete of each stale file among the repo's `repo_files`."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    adds = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in hub_files(done)]
    return adds + [CommitOperationDelete(path_in_repo=name) for name in stale_files(done, repo_files)]


def push(done: Exported, repo_id: str, private: bool, token: str) -> tuple[str, list[str]]:
    """Create the dataset repo if missing and commit the export's files, deleting the stale ones; the commit's
    URL and the files deleted. ExportError if the push fails."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    # HfHubHTTPError's bases: the HTTP client's base error (httpx2.HTTPError in huggingface_hub 2.x, which
    # transport errors such as ConnectError share) and OSError; ValueError: a repo id the Hub's rules refuse
    failures = (*HfHubHTTPError.__bases__, OSError, ValueError)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        existing = api.list_repo_files(repo_id, repo_type="dataset")
        info = api.create_commit(repo_id, commit_operations(done, existing), repo_type="dataset",
                                 commit_message=f"prefsynth snapshot {done.snapshot_id[:12]}")  # fmt: skip
    except failures as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"push to the Hub dataset {repo_id} failed ({type(err).__name__}: {first}); the export "
                          "itself is written and recorded") from None  # fmt: skip
    return info.commit_url, stale_files(done, existing)
