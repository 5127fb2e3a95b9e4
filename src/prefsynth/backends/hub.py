"""Push an exported snapshot to the Hugging Face Hub: its data files byte for byte and its card (README.md), in
one commit to a dataset repo, through huggingface_hub's own API. Only when the user asks for it
(`push_to_hub`, `--push-to-hub`) and has a token; the token and the network are checked before any work.

The Hub reads the splits from the file names (train.parquet, test.parquet, ...), as `datasets` does locally.
"""

from __future__ import annotations

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


def commit_operations(done: Exported) -> list[Any]:
    """huggingface_hub's CommitOperationAdd of each file to push (it hashes each file here, offline)."""
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in hub_files(done)]


def push(done: Exported, repo_id: str, private: bool, token: str) -> str:
    """Create the dataset repo if missing and commit the export's files; the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        info = api.create_commit(repo_id, commit_operations(done), repo_type="dataset",
                                 commit_message=f"prefsynth snapshot {done.snapshot_id[:12]}")  # fmt: skip
    except (HfHubHTTPError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"push to the Hub dataset {repo_id} failed: {first}; the export itself is written "
                          "and recorded") from None  # fmt: skip
    return info.commit_url
