"""Data-parallel training (rlprim/distributed.py) with real processes, plus single-process units.

The multi-process tests launch ``tests/scripts/dist_train.py`` as real jobs —
``python -m torch.distributed.run --nproc_per_node 2`` on 127.0.0.1 with the gloo backend, one
torch thread per process — and the same script as one plain process for the reference run. All
launches share one module fixture (started together, the resume after the run it resumes) so
the file stays around two minutes on two cores. What they check:

* two ranks trained for 3 iterations equal one process trained on the same global batch (SGD, so
  the weights are linear in every gradient normalisation), within 1e-6, for token-mean (with KL
  and an adaptive β), seq-mean-token-mean (with whitening and minibatches some ranks have no row
  of) and PPO (critic, GAE, whitening); both ranks hold bit-identical weights and statistics;
* a checkpoint written by two ranks resumes on two ranks bit-identically;
* a rank that raises ends the job: non-zero exit, the error in the output, within seconds;
* ``gather_rows`` and ``synchronize_gradients`` on hand-made tensors.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import rlprim.distributed as rd
from rlprim.batching import microbatch_loss_totals, microbatch_loss_weights
from rlprim.losses import aggregate_loss
from rlprim.types import Batch, TrainingState

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "dist_train.py"
LAUNCH_TIMEOUT = 400  # seconds for all launches (about a minute of work; CI may be busy)
EQUIVALENCE_JOBS = ("token_mean", "seq_mean", "ppo", "tis", "fsdp", "fsdp_ppo")


# ------------------------------------------------------------------------------ launching


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # PYTHONFAULTHANDLER: a rank killed by a signal (e.g. an abort in C++) prints where it was.
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONFAULTHANDLER="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _launch(command: list[str], log: Path) -> tuple[subprocess.Popen, Path]:
    with open(log, "w") as file:  # a file, not a pipe: nobody has to drain it while we wait
        process = subprocess.Popen(command, env=_env(), stdout=file, stderr=subprocess.STDOUT)
    return process, log


def _torchrun(out: Path, log: str, *jobs: str) -> tuple[subprocess.Popen, Path]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(SCRIPT), str(out), *jobs,
    ]
    return _launch(command, out / log)


def _single(out: Path, log: str, *jobs: str) -> tuple[subprocess.Popen, Path]:
    return _launch([sys.executable, str(SCRIPT), str(out), *jobs], out / log)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch everything once: 2-rank runs, the 1-process reference, the failing job, and the
    resume once the run it resumes has finished. Returns ``{name: (exit code, output, end
    time)}`` plus the output directories."""
    out = tmp_path_factory.mktemp("dist")
    failing_dir = tmp_path_factory.mktemp("dist_fail")
    running = {
        "distributed": _torchrun(out, "distributed.log", *EQUIVALENCE_JOBS, "ckpt_full",
                                 "fsdp_ckpt_full", "dapo", "nan", "fsdp_nan", "collectives"),
        "single": _single(out, "single.log", *EQUIVALENCE_JOBS),
        "fail": _torchrun(failing_dir, "fail.log", "fail"),
    }
    results: dict = {"out": out, "failing_dir": failing_dir}
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while running:
        for name, (process, log) in list(running.items()):
            if process.poll() is None:
                continue
            results[name] = (process.returncode, log.read_text(), time.time())
            del running[name]
            if name == "distributed" and process.returncode == 0:
                running["resume"] = _torchrun(
                    out, "resume.log", "ckpt_resume", "fsdp_ckpt_resume"
                )
        if time.monotonic() > deadline:
            for process, _ in running.values():
                process.kill()
                process.wait()
            pytest.fail(f"launches {sorted(running)} timed out after {LAUNCH_TIMEOUT} s")
        time.sleep(0.1)
    return results


def _ok(runs, name: str) -> None:
    if name not in runs:
        pytest.fail("the 2-rank run failed, so the resume was not launched")
    code, output, _ = runs[name]
    assert code == 0, f"{name} exited with {code}:\n{output[-6000:]}"


def _weights(out: Path, job: str, world: int, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"{job}_w{world}_r{rank}.safetensors"))


def _stats(out: Path, job: str, world: int, rank: int, local: bool = False) -> dict:
    """A run's saved stats; ``local=True`` keeps the per-rank count of scored rollouts."""
    saved = json.loads((out / f"{job}_w{world}_r{rank}.json").read_text())
    if not local:
        for record in saved["stats"]:
            record.pop("local_rollouts_scored", None)
    return saved


# ------------------------------------------------------------------------------ multi-process


@pytest.mark.slow
@pytest.mark.parametrize("job", EQUIVALENCE_JOBS)
def test_two_ranks_equal_one_process_on_the_global_batch(runs, job):
    _ok(runs, "distributed")
    _ok(runs, "single")
    out = runs["out"]
    single = _weights(out, job, 1, 0)
    rank0, rank1 = _weights(out, job, 2, 0), _weights(out, job, 2, 1)
    assert single.keys() == rank0.keys() == rank1.keys()
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
        difference = (single[name] - rank0[name]).abs().max().item()
        assert difference <= 1e-6, f"{job}: {name} differs by {difference}"
    # The comparison means something: the weights moved far more than the tolerance.
    from rlprim.testing import tiny_model

    initial = dict(tiny_model("qwen2", seed=0).named_parameters())
    moved = max(
        (single[f"policy.{n}"] - p.detach()).abs().max().item() for n, p in initial.items()
    )
    assert moved > 1e-2

    stats_single = _stats(out, job, 1, 0)
    stats0, stats1 = _stats(out, job, 2, 0), _stats(out, job, 2, 1)
    assert stats0 == stats1  # every rank gets the same (global) statistics and β
    assert stats0["kl_coef"] == pytest.approx(stats_single["kl_coef"], abs=1e-12)
    assert stats0["step"] == stats_single["step"]
    for one, two in zip(stats_single["stats"], stats0["stats"], strict=True):
        assert one["num_tokens"] == two["num_tokens"] and one["num_sequences"] == 20
        assert one["num_sequences"] == two["num_sequences"]
        assert one["reward_mean"] == two["reward_mean"]
        assert one["reward_std"] == two["reward_std"]
        assert one["skipped_updates"] == two["skipped_updates"] == 0
        for key in ("loss", "policy_loss", "value_loss", "kl", "entropy", "grad_norm"):
            a, b = one[key], two[key]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-7)
    if job in ("token_mean", "fsdp"):
        assert stats0["kl_coef"] != 0.05  # the adaptive controller moved β, identically
    if job == "token_mean":  # a tool tracker's values are averaged over ranks
        for one, two in zip(stats_single["stats"], stats0["stats"], strict=True):
            assert (one["extra"]["tools/rank"], one["extra"]["tools/rollouts"]) == (0.0, 20.0)
            assert (two["extra"]["tools/rank"], two["extra"]["tools/rollouts"]) == (0.5, 10.0)
            assert "tools/ids" not in one["extra"]
    if job == "tis":  # the TIS diagnostics are those of the global batch
        for one, two in zip(stats_single["stats"], stats0["stats"], strict=True):
            names = {k for k in one["extra"] if k.startswith("tis_")}
            assert names == {
                "tis_weight_mean", "tis_clip_fraction", "tis_ratio_max", "tis_mismatch_kl",
                "tis_logprob_abs_diff",
            } == {k for k in two["extra"] if k.startswith("tis_")}
            for name in names:
                assert one["extra"][name] == pytest.approx(two["extra"][name], rel=1e-5)
            assert 0.0 < one["extra"]["tis_clip_fraction"] < 1.0
            assert one["extra"]["tis_ratio_max"] == pytest.approx(math.exp(0.8), rel=1e-4)


def test_seq_mean_minibatches_leave_some_rank_without_rows():
    # Checks the premise of the seq_mean job: rows [0, 12) are rank 0's, [12, 20) rank 1's;
    # minibatches of 3 of a random permutation seeded by step * 1009 + epoch.
    empty = 0
    for iteration in range(3):
        for epoch in range(2):
            step = iteration * 14 + epoch * 7
            order = torch.randperm(20, generator=torch.Generator().manual_seed(step * 1009 + epoch))
            for start in range(0, 20, 3):
                ranks = {0 if i < 12 else 1 for i in order[start : start + 3].tolist()}
                empty += len(ranks) == 1
    assert empty > 0


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_exactly_on_two_ranks(runs):
    _ok(runs, "distributed")
    _ok(runs, "resume")
    out = runs["out"]
    step2 = out / "ckpt" / "step_00000002"
    assert (step2 / "rng.json").is_file() and (step2 / "rng_rank_1.json").is_file()
    assert not any(name.startswith("module.") for name in load_file(
        str(step2 / "policy" / "model.safetensors")
    ))
    full = _weights(out, "ckpt_full", 2, 0)
    for rank in (0, 1):
        resumed = _weights(out, "ckpt_resume", 2, rank)
        assert full.keys() == resumed.keys()
        for name in full:
            assert torch.equal(full[name], resumed[name]), f"rank {rank}: {name} differs"
    # rank 0 logged the resumed iteration; its stats equal the uninterrupted run's last ones.
    last = _stats(out, "ckpt_full", 2, 0)["stats"][-1]
    (resumed_stats,) = _stats(out, "ckpt_resume", 2, 0)["stats"]
    for key in ("loss", "reward_mean", "kl", "grad_norm", "num_tokens"):
        assert resumed_stats[key] == last[key]
    assert _stats(out, "ckpt_full", 2, 1)["stats"] == []  # only rank 0 logs


@pytest.mark.slow
@pytest.mark.parametrize("job", ["nan", "fsdp_nan"])
def test_a_nan_loss_on_one_rank_skips_the_update_on_every_rank(runs, job):
    _ok(runs, "distributed")
    out = runs["out"]
    for rank in (0, 1):
        before, after = _weights(out, f"{job}_it0", 2, rank), _weights(out, f"{job}_it1", 2, rank)
        assert all(torch.equal(before[name], after[name]) for name in before), rank
        final = _weights(out, job, 2, rank)
        assert any(not torch.equal(after[name], final[name]) for name in after)  # later: trains
    stats0, stats1 = _stats(out, job, 2, 0), _stats(out, job, 2, 1)
    assert stats0 == stats1
    assert [s["skipped_updates"] for s in stats0["stats"]] == [0, 1, 0]
    assert math.isnan(stats0["stats"][1]["loss"])


@pytest.mark.slow
def test_dynamic_sampling_statistics_are_the_jobs(runs):
    _ok(runs, "distributed")
    out = runs["out"]
    rank0, rank1 = _stats(out, "dapo", 2, 0, local=True), _stats(out, "dapo", 2, 1, local=True)
    w0, w1 = _weights(out, "dapo", 2, 0), _weights(out, "dapo", 2, 1)
    assert all(torch.equal(w0[name], w1[name]) for name in w0)
    group_size, shares = 4, (3, 2)  # 5 prompts per iteration: 3 on rank 0, 2 on rank 1
    saw_resampling = False
    for one, two in zip(rank0["stats"], rank1["stats"], strict=True):
        local = [one.pop("local_rollouts_scored"), two.pop("local_rollouts_scored")]
        assert one == two  # every statistic, dynamic_sampling/* included, is the job's
        extra = one["extra"]
        # Each round samples and scores every prompt of the rank's share once.
        rounds = [n // (group_size * share) for n, share in zip(local, shares, strict=True)]
        assert [n % (group_size * share) for n, share in zip(local, shares, strict=True)] == [0, 0]
        assert extra["dynamic_sampling/groups_sampled"] == sum(local) // group_size
        assert extra["dynamic_sampling/rounds"] == max(rounds)
        assert 0 < extra["dynamic_sampling/groups_returned"] <= 5
        assert extra["dynamic_sampling/groups_informative"] <= sum(local) // group_size
        saw_resampling |= max(rounds) > 1
    assert saw_resampling  # the "0+" prompts forced a second round at least once


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_exactly_and_loads_in_one_process(runs):
    _ok(runs, "distributed")
    _ok(runs, "resume")
    out = runs["out"]
    full = _weights(out, "fsdp_ckpt_full", 2, 0)
    for rank in (0, 1):
        resumed = _weights(out, "fsdp_ckpt_resume", 2, rank)
        assert full.keys() == resumed.keys()
        for name in full:
            assert torch.equal(full[name], resumed[name]), f"rank {rank}: {name} differs"
    # The checkpoint is a single-process one: the model's own class, full tensors.
    last = out / "fsdp_ckpt" / "step_00000003"
    config = json.loads((last / "policy" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    import rlprim as rp
    from rlprim.testing import tiny_model, tiny_tokenizer

    config = rp.create_algorithm_config("grpo", kl_coef=0.05, micro_batch_size=3)
    state = rp.create_training_state(
        tiny_model("qwen2", seed=0), tiny_tokenizer(), config, learning_rate=1e-3
    )
    state = rp.load_checkpoint(str(last), state)
    for name, tensor in state.policy.state_dict().items():
        assert torch.equal(tensor, full[f"policy.{name}"]), name
    assert state.optimizer.state_dict()["state"][0]["exp_avg"].shape == (
        state.policy.model.embed_tokens.weight.shape
    )


@pytest.mark.slow
def test_a_rank_that_raises_brings_the_job_down(runs):
    code, output, ended = runs["fail"]
    assert code != 0
    assert "rank 1 failed on purpose in its reward function" in output
    raised = float((runs["failing_dir"] / "raised_at").read_text())
    # Rank 0 was waiting in a collective: it must not hang until the 120 s timeout.
    assert ended - raised < 30, f"the job took {ended - raised:.1f} s to stop after the error"


@pytest.mark.slow
def test_gather_rows_and_synchronize_gradients(runs):
    _ok(runs, "distributed")
    results = [
        json.loads((runs["out"] / f"collectives_r{rank}.json").read_text()) for rank in (0, 1)
    ]
    assert results[0] == results[1]
    result = results[0]
    # rank 0: [[0, 1]]; rank 1: [[100, 101, 102], [103, 104, 105]]; columns padded with -1.
    assert result["gathered"] == [[0, 1, -1], [100, 101, 102], [103, 104, 105]]
    assert result["counts"] == [1, 2]
    assert result["vector"] == [0.0, 0.0, 1.0]
    assert result["a"] == [3.0, 3.0, 3.0]
    assert result["b"] == [1.0, 2.0, 3.0]
    assert result["c_is_none"] is True
    # flags (3 float32) + one bucket of a and b (6 float32)
    assert result["bytes"] == 3 * 4 + 6 * 4


# ------------------------------------------------------------------------------ single process


@settings(max_examples=200, deadline=None)
@given(num=st.integers(1, 60), world=st.integers(1, 9))
def test_shard_prompts_covers_every_prompt_once_in_order(num, world):
    prompts = [f"p{i}" for i in range(num)]
    if num < world:
        with pytest.raises(ValueError, match="every rank needs at least one prompt"):
            rd.shard_prompts(prompts, 0, world)
        return
    shards = [rd.shard_prompts(prompts, rank, world) for rank in range(world)]
    assert [p for shard in shards for p in shard] == prompts  # each once, in rank order
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # the first num % world ranks take one more
    for rank in range(world):
        start, stop = rd.shard_bounds(num, rank, world)
        assert prompts[start:stop] == shards[rank]


def test_shard_prompts_keeps_groups_whole():
    # A prompt is a group: sampling happens after sharding, so all G samples of a prompt are
    # drawn on the rank holding it. Uneven: 5 prompts over 2 ranks -> 3 and 2.
    prompts = [{"prompt": f"q{i}", "answer": i} for i in range(5)]
    assert rd.shard_prompts(prompts, 0, 2) == prompts[:3]
    assert rd.shard_prompts(prompts, 1, 2) == prompts[3:]
    assert rd.shard_bounds(5, 1, 2) == (3, 5)
    assert rd.shard_bounds(7, 2, 3) == (5, 7)


@pytest.mark.parametrize(
    "args, error",
    [
        ((["a"], 2, 2), ValueError),
        ((["a"], -1, 2), ValueError),
        ((["a"], 0, 0), ValueError),
        (("abc", 0, 1), TypeError),
        ((["a"], 0.0, 1), TypeError),
    ],
)
def test_shard_prompts_rejects_bad_input(args, error):
    with pytest.raises(error):
        rd.shard_prompts(*args)


def test_rank_seed():
    assert rd.RANK_SEED_STRIDE == 1_000_003
    assert rd.rank_seed(7, 0) == 7
    assert rd.rank_seed(7, 3) == 7 + 3 * 1_000_003
    assert rd.rank_seed(None, 3) is None
    with pytest.raises(TypeError):
        rd.rank_seed("7", 1)


def _micro(masks: list[list[float]]) -> Batch:
    mask = torch.tensor(masks)
    rows, tc = mask.shape
    return Batch(
        prompt_ids=torch.ones(rows, 1, dtype=torch.long),
        completion_ids=torch.ones(rows, tc, dtype=torch.long),
        attention_mask=torch.cat([torch.ones(rows, 1), (mask > 0).float()], 1).long(),
        completion_mask=mask,
    )


def test_global_loss_weights_hand_computed():
    # Rank A holds two micro-batches, rank B one; 7 trainable tokens, 4 rows, 3 with tokens.
    rank_a = [_micro([[1, 1, 0], [1, 0, 0]]), _micro([[1, 1, 1]])]
    rank_b = [_micro([[1, 0], [0, 0]])]  # the second row has no trainable token
    totals = {
        mode: tuple(
            a + b
            for a, b in zip(
                microbatch_loss_totals(rank_a, mode), microbatch_loss_totals(rank_b, mode),
                strict=True,
            )
        )
        for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
    }
    assert totals["token-mean"] == (7.0, 5.0)
    assert totals["seq-mean-token-mean"] == (4.0, 5.0)
    assert totals["seq-mean-token-sum"] == (5.0, 5.0)
    weights = lambda micro, mode: microbatch_loss_weights(micro, mode, totals[mode])  # noqa: E731
    assert weights(rank_a, "token-mean") == [3 / 7, 3 / 7]
    assert weights(rank_b, "token-mean") == [1 / 7]
    assert weights(rank_a, "seq-mean-token-mean") == [2 / 4, 1 / 4]
    assert weights(rank_b, "seq-mean-token-mean") == [1 / 4]
    assert weights(rank_a, "seq-mean-token-sum") == [2 / 5, 1 / 5]
    assert weights([], "token-mean") == []  # a rank without rows


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_global_weights_give_the_global_loss_not_a_mean_of_rank_means(mode):
    generator = torch.Generator().manual_seed(0)
    # Rank 0: 3 rows, 3 with tokens, 7 tokens; rank 1: 5 rows, 4 with tokens, 9 tokens.
    ranks = [
        [_micro([[1, 1, 0, 0], [1, 1, 1, 1]]), _micro([[1, 0, 0, 0]])],
        [_micro([[1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]])],
    ]
    losses = [
        [torch.randn(m.completion_mask.shape, generator=generator) for m in micro]
        for micro in ranks
    ]
    totals = [0.0, 0.0]
    for micro in ranks:
        totals = [t + x for t, x in zip(totals, microbatch_loss_totals(micro, mode), strict=True)]
    combined = 0.0
    for micro, loss in zip(ranks, losses, strict=True):
        weights = microbatch_loss_weights(micro, mode, tuple(totals))
        for w, m, per_token in zip(weights, micro, loss, strict=True):
            combined += w * float(aggregate_loss(per_token, m.completion_mask, mode))
    # Independent reference: plain loops over every row of every rank.
    rows = [
        (loss_row.tolist(), mask_row.tolist())
        for micro, loss in zip(ranks, losses, strict=True)
        for m, per_token in zip(micro, loss, strict=True)
        for loss_row, mask_row in zip(per_token, m.completion_mask, strict=True)
    ]
    sums = [sum(x * k for x, k in zip(ls, ms, strict=True)) for ls, ms in rows]
    counts = [sum(ms) for _, ms in rows]
    if mode == "token-mean":
        expected = sum(sums) / sum(counts)
    elif mode == "seq-mean-token-mean":
        kept = [(s, c) for s, c in zip(sums, counts, strict=True) if c > 0]
        expected = sum(s / c for s, c in kept) / len(kept)
    else:
        expected = sum(sums) / len(rows)
    assert combined == pytest.approx(expected, abs=1e-6)  # float32 losses
    # What a mean of the ranks' own means would give instead: not the global loss.
    rank_means = []
    for micro, loss in zip(ranks, losses, strict=True):
        weights = microbatch_loss_weights(micro, mode)
        rank_means.append(
            sum(
                w * float(aggregate_loss(per_token, m.completion_mask, mode))
                for w, m, per_token in zip(weights, micro, loss, strict=True)
            )
        )
    assert abs(sum(rank_means) / 2 - expected) > 1e-3


def test_global_loss_weights_reject_bad_totals():
    micro = [_micro([[1, 1]])]
    with pytest.raises(ValueError, match="at least this rank's own totals"):
        microbatch_loss_weights(micro, "token-mean", (1.0, 1.0))
    with pytest.raises(TypeError, match="global_totals"):
        microbatch_loss_weights(micro, "token-mean", (2.0,))
    with pytest.raises(ValueError, match="must not be empty"):
        microbatch_loss_weights([], "token-mean")
    # the fallback when no token trains anywhere: rows
    assert microbatch_loss_weights([_micro([[0, 0]])], "token-mean", (0.0, 4.0)) == [0.25]


def test_init_distributed_without_torchrun_is_a_no_op(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    info = rd.init_distributed()
    assert isinstance(info, rd.DistributedInfo)
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, None)
    assert rd.DEFAULT_TIMEOUT.total_seconds() == 600
    module = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in module.parameters()]
    assert rd.broadcast_module(module) is module  # one process: nothing to copy
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        rd.broadcast_module("policy")
    assert not torch.distributed.is_initialized()
    assert info == rd.get_distributed_info()
    assert rd.is_main_process() and not rd.is_distributed()
    rd.barrier()
    rd.destroy_distributed()
    with rd.distributed_context() as context:
        assert context.world_size == 1
    assert rd.all_reduce_scalars([1.5, 2]) == [1.5, 2.0]
    assert rd.all_gather_objects({"a": 1}) == [{"a": 1}]
    rows = torch.ones(2, 3)
    assert rd.gather_rows(rows) == (rows, [2])
    parameter = torch.nn.Parameter(torch.zeros(2))
    parameter.grad = torch.ones(2)
    assert rd.synchronize_gradients([parameter]) == 0 and parameter.grad.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="timeout must be positive"):
        rd.init_distributed(timeout=0)
    with pytest.raises(TypeError, match="backend"):
        rd.init_distributed(backend=3)


def test_wrap_training_state_without_a_process_group_and_unwrap():
    model = torch.nn.Linear(2, 2)
    state = TrainingState(policy=model, tokenizer=None, optimizer=None)
    assert rd.wrap_training_state(state) is state
    assert rd.unwrap_model(model) is model
    assert rd.wrap_training_state(state, strategy="fsdp") is state  # one process: no-op
    assert not rd.is_fsdp_module(model) and rd.model_class(model) is torch.nn.Linear
    assert rd.full_state_dict(model).keys() == model.state_dict().keys()
    with rd.gathered_parameters(model, None):  # nothing sharded: a no-op
        pass
    target = torch.nn.Linear(2, 2)
    rd.load_full_state_dict(target, rd.full_state_dict(model))
    assert torch.equal(target.weight, model.weight)
    with pytest.raises(ValueError, match="missing"):
        rd.load_full_state_dict(target, {"weight": model.weight})
    with torch.no_grad():
        rd.copy_into(target.bias, torch.tensor([3.0, 4.0]))
    assert target.bias.tolist() == [3.0, 4.0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduled = state._replace(
        optimizer=optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1)
    )
    with pytest.raises(ValueError, match="scheduler"):
        rd.wrap_training_state(scheduled, strategy="fsdp")
    with pytest.raises(ValueError, match="strategy"):
        rd.wrap_training_state(state, strategy="zero3")
    with pytest.raises(TypeError, match="TrainingState"):
        rd.wrap_training_state(model)
    with rd.no_sync(model, None):  # a plain module has no no_sync: skipped
        pass


def test_the_single_process_collectives_are_identities():
    parallel = rd.create_single_process_parallel()
    assert isinstance(parallel, rd.DataParallel)
    assert rd.current_data_parallel()._fields == parallel._fields  # one process: the identity
    assert rd.current_data_parallel().is_main_process() and not parallel.is_sharded(None)
    prompts = ["a", "b", "c"]
    assert parallel.shard_prompts(prompts) == (prompts, 0) and parallel.rank_seed(7) == 7
    rows = torch.arange(6.0).reshape(3, 2)
    gathered, counts = parallel.gather_rows(rows)
    assert gathered is rows and counts == [3] and parallel.local_rows(counts) == range(3)
    assert parallel.all_reduce([1, 2.5], "max") == [1.0, 2.5]
    with pytest.raises(ValueError, match="op must be one of"):
        parallel.all_reduce([1.0], "mean")
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    assert parallel.synchronize_gradients([param]) == 0 and torch.equal(param.grad, torch.ones(2))
    model = torch.nn.Linear(2, 2)
    with parallel.no_sync(model), parallel.gathered_parameters(model):
        pass
    assert parallel.full_model(model, None) is model
