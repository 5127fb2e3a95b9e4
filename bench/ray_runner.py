"""The Ray runner's overhead against threads on the same in-process scoring (issue 15, part 3).

One job: P prompts x 2 samples from bench/engine.py's loopback server (latency 0: generation is not what is
measured), scored by an in-process transformers reward model that this script builds (a randomly initialised
Llama sequence classifier, word-level tokenizer; `--hidden`/`--layers` set its size). A first run generates
and scores (threads) into a base warehouse. Each arm then runs the same config on a copy of it whose reward
scores were deleted, so the arm scores every response again and generates nothing:
  threads     `runner: threads` (forward passes on threads of the flow process)
  ray_cold    `runner: ray`, the run starts its own local Ray instance (as `prefsynth run --runner ray` does):
              Ray's start and its workers' first imports and model load are in the time
  ray_warm    `runner: ray` on a Ray instance already up whose workers already hold the model (a standing
              cluster): the second of two runs on it
Times are the flow's (`timings.flow`: Prefect's temporary API start is left out, it is the same for all).
Values: the largest difference between an arm's rewards and the threads arm's, per response id.

    python bench/ray_runner.py [--prompts 200] [--hidden 256] [--layers 4] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import append_results  # noqa: E402
from bench.engine import WORDS, Loopback  # noqa: E402

EXTRA = ["user", "assistant", "system", "name", "a", "the", "of", "what", "is", "r"]


def make_model(folder: Path, hidden: int, layers: int) -> Path:
    """A randomly initialised Llama sequence classifier over the loopback server's words."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS + EXTRA)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(
        folder)  # fmt: skip
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64) * 2,
                                      num_key_value_heads=max(1, hidden // 64) * 2, max_position_embeddings=512,
                                      num_labels=1, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


def rewards(db: Path) -> dict[str, float]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT response_id, value FROM scores WHERE scorer = 'reward'").fetchall()
    return dict(rows)


def without_rewards(base: Path, db: Path) -> Path:
    import duckdb

    shutil.copy(base, db)
    with duckdb.connect(str(db)) as con:
        con.execute("DELETE FROM scores WHERE scorer = 'reward'")
    return db


def timed(config: dict[str, Any], db: Path, runner: str) -> tuple[float, dict[str, Any]]:
    import prefsynth

    result = prefsynth.run(config, db=db, runner=runner)
    score = result.counts["score[reward]"]
    assert (score.new, result.counts["generate"].new) == (len(rewards(db)), 0), "the arm must score, not generate"
    return result.timings["flow"], score.model_dump()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="prefsynth-ray-bench-"))
    try:
        folder = make_model(work / "rm", args.hidden, args.layers)
        prompts = work / "p.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"Name a thing, number {i}."}) + "\n"
                                   for i in range(args.prompts)))  # fmt: skip
        with Loopback(latency=0.0) as server:
            config = {"name": "ray-bench", "prompts": {"path": str(prompts)},
                      "generation": {"models": [{"base_url": server.url, "model": "m", "max_concurrency": 16}],
                                     "samples_per_prompt": 2, "sampling": {"max_tokens": 64, "seed": 0}},
                      "scorers": [{"kind": "reward_model", "name": "reward", "path": str(folder),
                                   "batch_size": args.batch_size}],
                      "curation": {"min_margin": 0.0, "allow_truncated": True}}  # fmt: skip
            base = work / "base.duckdb"
            import prefsynth

            prefsynth.run(config, db=base)  # generation (and a first scoring) once
            want = rewards(base)
            n = len(want)
            arms: dict[str, float] = {}
            arms["threads"], _ = timed(config, without_rewards(base, work / "t.duckdb"), "threads")
            diff = {"threads": max(abs(v - want[k]) for k, v in rewards(work / "t.duckdb").items())}
            arms["ray_cold"], _ = timed(config, without_rewards(base, work / "rc.duckdb"), "ray")
            diff["ray_cold"] = max(abs(v - want[k]) for k, v in rewards(work / "rc.duckdb").items())
            started = time.monotonic()
            ray.init(num_cpus=None, include_dashboard=False)
            ray_start = time.monotonic() - started
            try:
                timed(config, without_rewards(base, work / "rw0.duckdb"), "ray")  # warms the workers
                arms["ray_warm"], _ = timed(config, without_rewards(base, work / "rw.duckdb"), "ray")
                diff["ray_warm"] = max(abs(v - want[k]) for k, v in rewards(work / "rw.duckdb").items())
                cpus = int(ray.cluster_resources().get("CPU", 1))
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"job: {args.prompts} prompts x 2 samples = {n} responses from the loopback server, an in-process "
             f"Llama classifier (hidden {args.hidden}, {args.layers} layers, batch_size {args.batch_size}); Ray: "
             f"{cpus} CPUs, local"]  # fmt: skip
    for arm, seconds in arms.items():
        lines.append(f"{arm}: flow {seconds:.2f} s ({n / seconds:.0f} responses/s), {seconds / arms['threads']:.2f}x "
                     f"threads; largest reward difference to the first run {diff[arm]:.2e}")  # fmt: skip
    lines.append(f"ray.init of a local instance (timed before the warm arms; ray_cold pays it too): {ray_start:.2f} s")
    for line in lines:
        print(line, flush=True)
    if not args.no_append:
        command = "python bench/ray_runner.py " + " ".join(sys.argv[1:])
        append_results("Ray runner vs threads on in-process scoring (issue 15)", command.strip(), lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
