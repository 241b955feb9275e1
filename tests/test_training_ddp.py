"""DistributedDataParallel on CPU: two gloo processes train the tiny dataset through all four steps."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _training_fixture import make_dataset  # noqa: E402

DATASET_ID = 903
OVERRIDE = {
    "training": {
        "validation_interval_epochs": 1,
        "checkpoint_interval_iterations": 2,
        "steps": [
            {"step": 1, "epochs": 1, "iterations_per_epoch": 2},
            {"step": 2, "epochs": 1, "iterations_per_epoch": 2},
            {"step": 3, "epochs": 1, "iterations_per_epoch": 3},
            {"step": 4, "epochs": 1, "iterations_per_epoch": 2},
        ],
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, env: dict, out: str) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from heartcascade.training.trainer import Trainer

    import hashlib

    from heartcascade.training.dataloading import BatchStream

    trainer = Trainer(DATASET_ID, 0, device="cpu", progress=False, num_workers=0, plans_override=OVERRIDE,
                      predict_validation=False)
    initial, digests = {}, []
    build, next_batch = trainer._build_networks, BatchStream.__next__

    def build_and_record() -> None:  # the weights training starts from
        build()
        initial.update({name: {k: v.detach().clone() for k, v in net.state_dict().items()}
                        for name, net in trainer.networks.items()})

    def next_and_record(stream):  # what this rank trained on
        batch = next_batch(stream)
        digests.append(hashlib.sha1(torch.as_tensor(batch["data"]).cpu().numpy().tobytes()).hexdigest())
        return batch

    trainer._build_networks = build_and_record
    BatchStream.__next__ = next_and_record
    result = trainer.run()
    state = {name: {k: v.detach().clone() for k, v in net.state_dict().items()}
             for name, net in trainer.networks.items()}
    torch.save({"networks": state, "initial": initial, "batches": digests, "losses": result.epoch_losses,
                "rank": trainer.dist.rank}, Path(out) / f"rank{rank}.pt")


def test_ddp_two_processes_gloo(tmp_path):
    env = {}
    for key, var in (("raw", "HC_RAW"), ("pre", "HC_PREPROCESSED"), ("res", "HC_RESULTS")):
        (tmp_path / key).mkdir()
        env[var] = str(tmp_path / key)
    env["HC_N_PROC_DA"] = "0"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        pre = make_dataset(tmp_path / "raw", num_cases=4, dataset_id=DATASET_ID)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = tmp_path / "ranks"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), env, str(out)), nprocs=2, join=True)

    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    folder = tmp_path / "res" / pre.name / "cascade" / "fold_0"
    final = torch.load(folder / "checkpoint_final.pth", weights_only=True)
    latest = torch.load(folder / "checkpoint_latest.pth", weights_only=True)
    # gradients were averaged: both ranks end with identical weights, and rank 0 saved them
    for net in ("net1", "net2"):
        for key, value in r0["networks"][net].items():
            assert torch.equal(value, r1["networks"][net][key]), (net, key)
            assert torch.equal(value, final["networks"][net][key]), (net, key)
    assert r0["losses"] == r1["losses"]  # epoch losses are all-reduced means
    # both ranks started from the same weights, and training moved every network away from them
    for net in ("net1", "net2"):
        assert all(torch.equal(v, r1["initial"][net][k]) for k, v in r0["initial"][net].items()), net
        assert any(not torch.equal(v, r0["initial"][net][k]) for k, v in r0["networks"][net].items()), net
    # each rank drew its own data: no batch of rank 0 equals rank 1's batch of the same iteration
    assert len(r0["batches"]) == len(r1["batches"]) == 2 + 2 + 3 + 2
    assert all(a != b for a, b in zip(r0["batches"], r1["batches"]))
    assert final["world_size"] == 2
    assert isinstance(latest["rng"], list) and len(latest["rng"]) == 2  # every rank's RNG state kept
    assert "world_size=2" in (folder / "training_log.txt").read_text()
