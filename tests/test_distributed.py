"""DistributedDataParallel on CPU (gloo): two torchrun processes end with identical weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import make_tiny_dataset, tiny_gan_recipe, write

SCRIPT = '''
import sys
from pathlib import Path
import torch
import torch.distributed as dist
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
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_ranks_end_identical(tmp_path: Path) -> None:
    data = make_tiny_dataset(tmp_path / "data", subjects=6)
    text = tiny_gan_recipe(data)
    text = text.replace("epochs: 3", "epochs: 2").replace("steps_per_epoch: 6", "steps_per_epoch: 3")
    recipe = write(tmp_path / "r.yaml", text)
    script = write(tmp_path / "ddp_script.py", SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(recipe), str(tmp_path / "run"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
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
