"""Staged unfreezing under `accelerate launch --multi_gpu --num_processes 2` (two CPU processes with gloo here),
its head-only first stage trained on the feature cache.

DDP runs strict (`ddp_find_unused_parameters false`): a block waiting for its stage must still get a
(zero) gradient every step, the stage change must need no re-wrapping, and every rank must end
with the same weights.
"""

from __future__ import annotations

import json
import os

import torch
from conftest import SAMPLE, block_tensors, changed_blocks, launch_processes, load, save_timm_model, weights

from hf_transfer.checksums import checksum


def test_staged_unfreezing_under_two_process_ddp(tmp_path):
    model_dir = save_timm_model(tmp_path / "model", "test_efficientnet")
    out = tmp_path / "run"
    command = [
        "--dataset", str(SAMPLE), "--model", str(model_dir), "--output_dir", str(out),
        "--validation_size", "8", "--max_train_samples", "32", "--max_eval_samples", "8", "--max_test_samples", "16",
        "--per_device_train_batch_size", "4", "--max_steps", "6", "--learning_rate", "0.01", "--warmup_steps", "0",
        "--augmentation", "none", "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "1",
        "--save_total_limit", "10", "--load_best_model_at_end", "false", "--ddp_find_unused_parameters", "false",
        "--freeze", "staged", "--layer_decay", "0.7", "--batchnorm", "frozen",
        "--stages", "[{at_step: 0, train: head}, {at_step: 3, train: 'last_n:2'}]",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    result = launch_processes(*command, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    plan = json.loads((out / "freeze_plan.json").read_text())
    assert [(h["train"], h["started_at_step"]) for h in plan["history"]] == [("head", 0), ("last_n:2", 3)]
    cache = json.loads((out / "all_results.json").read_text())["feature_cache"]
    assert cache["head_stage"]["epoch"] > 0 and cache["splits"]["train"]["images"] == 32, "the head stage trained on cached features"
    integrity = plan["integrity"]
    assert integrity["at_step"] == 6 and integrity["frozen_unchanged"]
    ranks = integrity["parameter_checksums_by_rank"]
    assert len(ranks) == 2 and ranks[0] == ranks[1], "both ranks hold bit-identical weights"

    final = weights(out)
    parameters = [name for name, _ in load(model_dir).named_parameters()]
    assert checksum({name: final[name] for name in parameters}) == ranks[0], "the saved model is the weights the ranks agreed on"

    blocks = block_tensors(model_dir)
    names = list(blocks)
    initial = weights(model_dir)
    late = {names[-3], names[-2]}
    for step in range(1, 7):  # checkpoint-N: the weights after N optimizer steps, saved by rank 0
        moved = changed_blocks(blocks, initial, weights(out / f"checkpoint-{step}"))
        assert moved == ({"head"} if step <= 3 else {"head"} | late), f"after step {step}"
    frozen = [tensor for name in names[:-3] for tensor in blocks[name]]
    assert all(torch.equal(initial[t], final[t]) for t in frozen), "frozen weights and BatchNorm statistics are bit-identical"
