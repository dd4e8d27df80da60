"""unwrap_model and is_fsdp_module on real DDP and FSDP2 modules (one gloo process)."""

import subprocess
import sys
import textwrap

import torch

import rlprim
from rlprim import distributed, model_wrappers


def test_plain_modules_pass_through_and_distributed_re_exports_the_same_functions():
    model = torch.nn.Linear(2, 2)
    assert model_wrappers.unwrap_model(model) is model
    assert model_wrappers.unwrap_model(None) is None
    assert not model_wrappers.is_fsdp_module(model)
    assert distributed.unwrap_model is model_wrappers.unwrap_model is rlprim.unwrap_model
    assert distributed.is_fsdp_module is model_wrappers.is_fsdp_module is rlprim.is_fsdp_module


def test_unwrap_ddp_and_detect_fsdp2_in_a_real_process_group(tmp_path):
    script = textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel as DDP
        from rlprim.model_wrappers import is_fsdp_module, unwrap_model

        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
        inner = torch.nn.Linear(2, 2)
        wrapped = DDP(inner)
        assert unwrap_model(wrapped) is inner and not is_fsdp_module(wrapped)
        sharded = fully_shard(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        assert is_fsdp_module(sharded) and unwrap_model(sharded) is sharded
        dist.destroy_process_group()
        print("ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
