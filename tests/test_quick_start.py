"""Tests for rlprim.quick_start: the one-liner sits above the loop and the tasks."""

import ast
import json
from pathlib import Path

import pytest

import rlprim as rp
import rlprim.quick_start
from rlprim.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_the_loop_imports_no_task():
    # quick_start_training's default task is the only reason the loop ever needed rlprim.tasks.
    tree = ast.parse((ROOT / "rlprim" / "training.py").read_text(encoding="utf-8"))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [m for m in imported if m.startswith("rlprim.tasks")]
    assert rp.quick_start_training is rlprim.quick_start.quick_start_training


def test_other_models_need_prompts_and_a_reward(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model("qwen2", seed=0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    with pytest.raises(ValueError, match="prompts and reward_fn are required"):
        rp.quick_start_training(str(model_dir), num_iterations=1, progress=False)


def test_bundled_model_trains_on_its_default_task_and_writes_its_outputs(tmp_path):
    logged = []
    state = rp.quick_start_training(
        num_iterations=2, prompts_per_iteration=2, num_samples=2, max_new_tokens=4,
        eval_fn=lambda s: {"step": float(s.step)}, eval_every=1, output_dir=str(tmp_path),
        logger=logged.append, progress=False, kl_coef=0.0,
    )
    assert state.iteration == 2 and state.step == 2 and state.config.kl_coef == 0.0
    assert [s.extra["eval/step"] for s in logged] == [1.0, 2.0]
    # arithmetic_reward scores the default task's prompts: every reward is 0 or 1
    assert all(0.0 <= s.reward_mean <= 1.0 for s in logged)
    lines = (tmp_path / "stats.jsonl").read_text().splitlines()
    assert [json.loads(line)["eval/step"] for line in lines] == [1.0, 2.0]
    assert (tmp_path / "reward_curve.png").exists() and (tmp_path / "checkpoint").is_dir()
