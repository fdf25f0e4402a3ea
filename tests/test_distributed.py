"""DistributedDataParallel on CPU (gloo): torchrun processes (one machine, or two "nodes" on localhost) end
with identical weights; resuming on another world size is refused; SyncBatchNorm conversion."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_dataset, tiny_gan_recipe, tiny_recipe, write
from torch import nn

from lowdose_toolkit.core.checkpoint import load_checkpoint
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe
from lowdose_toolkit.errors import RecipeError, UserError
from lowdose_toolkit.models.lowdose_model import build_model
from lowdose_toolkit.train.distributed import DistInfo, check_sync_batchnorm, convert_sync_batchnorm
from lowdose_toolkit.train.engine import Trainer

SCRIPT = '''
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from lowdose_toolkit.train.distributed import leave_process
from lowdose_toolkit.train.engine import Trainer
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe

recipe_path, run_dir, out = sys.argv[1:4]
recipe = resolve_recipe(load_recipe(recipe_path), get_registry())
trainer = Trainer(recipe, Path(run_dir), get_registry())
info = trainer.dist
assert info.world == 2, info
subjects = sorted({s["subject_id"] for s in trainer.train_set._subjects})
trainer.fit()  # destroys the process group at the end
state = {"model": trainer.model.state_dict(), "disc": trainer.discriminator.state_dict(), "subjects": subjects}
torch.save(state, Path(out) / f"rank{info.rank}.pt")
leave_process(info)  # as `ldt run` ends a distributed worker: no abort at interpreter exit (exit code 0)
print("not reached")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_setup(tmp_path: Path) -> tuple[Path, Path]:
    """The two-rank recipe (two epochs of three steps) and the script each rank runs."""
    data = make_tiny_dataset(tmp_path / "data", subjects=6)
    text = tiny_gan_recipe(data)
    text = text.replace("epochs: 3", "epochs: 2").replace("steps_per_epoch: 6", "steps_per_epoch: 3")
    return write(tmp_path / "r.yaml", text), write(tmp_path / "ddp_script.py", SCRIPT)


def check_identical_ranks(tmp_path: Path) -> None:
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # Each rank drew its own subjects...
    assert set(r0["subjects"]).isdisjoint(r1["subjects"])
    # ...and both end with identical weights and BatchNorm buffers.
    for part in ("model", "disc"):
        for key, value in r0[part].items():
            assert torch.equal(value, r1[part][key]), (part, key)
    # Only rank 0 wrote the run directory.
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2


def test_two_cpu_ranks_end_identical(tmp_path: Path) -> None:
    recipe, script = ddp_setup(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(recipe), str(tmp_path / "run"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not reached" not in done.stdout  # each rank left through leave_process
    check_identical_ranks(tmp_path)


def test_leave_process_ends_only_a_distributed_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowdose_toolkit.train import distributed

    exits: list[int] = []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    distributed.leave_process(DistInfo())  # one process: returns, the interpreter exits as usual
    assert exits == []
    distributed.leave_process(DistInfo(rank=1, world=2))
    assert exits == [0]


def test_two_nodes_on_localhost_end_identical(tmp_path: Path) -> None:
    """Two torchrun agents ("nodes") of one process each meet through the c10d rendezvous on 127.0.0.1."""
    recipe, script = ddp_setup(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"ldt-test-{uuid.uuid4().hex[:8]}"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
               f"--rdzv-conf=is_host={int(node == 0)},join_timeout=120", "--max-restarts=0",
               str(script), str(recipe), str(tmp_path / "run"), str(tmp_path)]
        log = open(tmp_path / f"node{node}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [proc.wait(timeout=300) for proc, _ in procs]
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join(f"--- node {n}\n" + (tmp_path / f"node{n}.log").read_text()[-2000:] for n in (0, 1))
    assert codes == [0, 0], logs
    check_identical_ranks(tmp_path)


def test_resuming_on_another_world_size_is_refused_in_one_line(tmp_path: Path) -> None:
    data = make_tiny_dataset(tmp_path / "data", subjects=4)
    text = tiny_recipe(data).replace("epochs: 3", "epochs: 1").replace("steps_per_epoch: 6", "steps_per_epoch: 1")
    path = write(tmp_path / "r.yaml", text)
    recipe = resolve_recipe(load_recipe(path), get_registry(), str(path))
    Trainer(recipe, tmp_path / "run", get_registry()).fit()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    dataclasses.replace(load_checkpoint(last), world_size=4).save(last)  # as if saved by 2 nodes x 2 GPUs
    trainer = Trainer(recipe, tmp_path / "run", get_registry(), resume=True)
    with pytest.raises(UserError) as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message
    assert "saved by 4 process(es), resumed by 1; resume with 4 in all" in message
    assert "--nnodes" in message


# SyncBatchNorm trains on CUDA only (torch raises "SyncBatchNorm expected input tensor to be on GPU" for a
# CPU input under an initialised process group), so on CPU the conversion and the refusal are tested.
def test_sync_batchnorm_conversion_keeps_names_and_inference(tmp_path: Path) -> None:
    data = make_tiny_dataset(tmp_path / "data", subjects=3)
    path = write(tmp_path / "r.yaml", tiny_gan_recipe(data))
    recipe = resolve_recipe(load_recipe(path), get_registry(), str(path))
    assert recipe["train"]["sync_batchnorm"] is False
    model, disc = build_model(recipe, get_registry())
    x = torch.randn(1, 1, 16, 16, 16)
    disc.eval()
    before = disc(x, x)
    for module in (model, disc):
        assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
        names = set(module.state_dict())
        converted = convert_sync_batchnorm(module)
        norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
        assert set(converted.state_dict()) == names  # checkpoints load either way
    assert torch.equal(disc(x, x), before)  # eval mode: running statistics, no collective


def test_sync_batchnorm_is_refused_on_cpu_ranks_and_checked_as_a_bool(tmp_path: Path) -> None:
    check_sync_batchnorm(True, DistInfo(), torch.device("cpu"))  # one process: plain BatchNorm, no error
    check_sync_batchnorm(False, DistInfo(rank=0, world=2), torch.device("cpu"))
    with pytest.raises(UserError, match=r"train.sync_batchnorm: true needs CUDA .* 2 processes on cpu: set "
                                        r"train.sync_batchnorm: false or train on GPUs"):
        check_sync_batchnorm(True, DistInfo(rank=0, world=2), torch.device("cpu"))
    data = make_tiny_dataset(tmp_path / "data", subjects=3)
    path = write(tmp_path / "r.yaml", tiny_recipe(data).replace("train:\n", "train:\n  sync_batchnorm: maybe\n"))
    with pytest.raises(RecipeError, match="train.sync_batchnorm"):
        resolve_recipe(load_recipe(path), get_registry(), str(path))
