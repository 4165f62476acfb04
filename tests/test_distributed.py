"""Bilevel meta-training and meta-testing across processes (torchrun, gloo on the CPU): the same
meta-parameters and per-episode scores as one process, resumable with any number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import (
    TINY,
    assert_same_tensors,
    cli_subprocess,
    final_params,
    flags,
    learner_for,
    random_image_batch,
    tiny_conv,
)
from metareg.data.tasks import TaskBatch
from metareg.meta.distributed import World

FLAGS = flags([*TINY, "dtype=float64", "train.checkpoint_every=1", "train.val_every=1000"])
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def metareg(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    done = cli_subprocess(*args, processes=processes)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_processes_train_and_test_like_one(tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    metareg("train", "--preset", "quickstart", *FLAGS, "--iterations", "3", "--out", str(one))
    done = metareg("train", "--preset", "quickstart", *FLAGS, "--iterations", "3", "--out", str(two), processes=2)
    assert "(2 processes, gloo)" in done.stderr
    assert json.loads((two / "checkpoint.json").read_text())["processes"] == 2
    assert_same_tensors(final_params(one), final_params(two))  # float64, summed in task order: bit for bit
    # The meta-test is shared between the processes and gathered: the same per-episode scores.
    a, b = json.loads((one / "test.json").read_text()), json.loads((two / "test.json").read_text())
    assert len(a["scores"]) == 6 and a["scores"] == b["scores"] and a["episode_nll"] == b["episode_nll"]
    metareg("test", "--checkpoint", str(one), "--episodes", "5", "--out", str(tmp_path / "three.json"), processes=2)
    metareg("test", "--checkpoint", str(one), "--episodes", "5", "--out", str(tmp_path / "single.json"))
    three, single = (json.loads((tmp_path / name).read_text()) for name in ("three.json", "single.json"))
    assert three["scores"] == single["scores"] and len(single["scores"]) == 5  # 5 episodes: blocks of 3 and 2


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_a_run_resumes_with_another_number_of_processes(tmp_path, first, then):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    metareg("train", "--preset", "quickstart", *FLAGS, "--iterations", "4", "--no-test", "--out", str(straight))
    metareg(
        "train", "--preset", "quickstart", *FLAGS, "--iterations", "2", "--no-test", "--out", str(cut), processes=first
    )
    metareg("train", "--out", str(cut), "--resume", "--iterations", "4", "--no-test", processes=then)
    assert json.loads((cut / "checkpoint.json").read_text())["processes"] == then
    assert_same_tensors(final_params(straight), final_params(cut))


@pytest.mark.slow
def test_a_meta_batch_the_processes_do_not_divide_is_one_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "metareg.cli",
            "--no-progress",
            "train",
            "--preset",
            "quickstart",
            *FLAGS,
            "--set",
            "train.meta_batch=3",
            "--iterations",
            "1",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    # Each process says it in one line; torchrun then reports its failed children in its own format.
    assert (
        done.returncode != 0 and "metareg train: error: 3 tasks cannot be shared equally by 2 processes" in done.stderr
    )
    assert (
        "metareg/" not in done.stderr.split("metareg train: error:")[0] and "site-packages/metareg" not in done.stderr
    )


def test_blocks_cover_every_item_once_in_order():
    for count in (1, 5, 6, 7):
        blocks = [World(rank, 3).block(count) for rank in range(3)]
        assert [i for b in blocks for i in b] == list(range(count))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert World(1, 2).share(4) == range(2, 4)


@pytest.mark.slow
def test_a_dead_process_stops_the_run_and_it_resumes_from_the_last_checkpoint(tmp_path):
    import signal
    import time

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    metareg("train", "--preset", "quickstart", *FLAGS, "--iterations", "30", "--no-test", "--out", str(straight))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "metareg.cli",
            "--no-progress",
            "train",
            "--preset",
            "quickstart",
            *FLAGS,
            "--iterations",
            "30",
            "--no-test",
            "--out",
            str(killed),
        ],
        env=ENV | {"METAREG_DIST_TIMEOUT": "20"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    checkpoint = killed / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoint.exists() and json.loads(checkpoint.read_text())["step"] >= 3):
        time.sleep(0.05)
    workers = subprocess.run(
        ["pgrep", "-f", "-P", str(proc.pid), "metareg.cli"], capture_output=True, text=True
    ).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)  # one worker dies
    _, _err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    step = json.loads(checkpoint.read_text())["step"]
    assert 3 <= step < 30, "the run was not stopped mid-way"
    metareg("train", "--out", str(killed), "--resume", "--no-test", processes=2)
    assert_same_tensors(final_params(straight), final_params(killed))


def test_a_failed_collective_is_one_clear_error():
    from metareg.errors import DistributedError
    from metareg.meta.distributed import _collective

    def broken(*_args):
        raise RuntimeError("[gloo] Connection closed by peer\nmore details")

    with pytest.raises(DistributedError, match=r"stopped or did not answer .*Connection closed by peer.*--resume"):
        _collective(broken, None)


def test_task_gradients_of_vmap_and_loop_agree_and_add_up_to_the_meta_gradient():
    """``task_gradients`` (what each process sends to the gather), float64, 4 tasks shared by 2
    "processes" (tasks 0-1 and 2-3): the loop strategy's rows (one per task) and the vmap strategy's
    row (one per share) sum to the same vector, which is, bit for bit for the loop, the ``.grad``
    that ``meta_backward`` accumulates over the whole meta-batch; losses, scores and the parameters
    that get a gradient agree. Catches a share divided by its own size instead of the meta-batch's
    (checked, in either strategy: the rows double) and rows in the wrong parameter order."""
    batch = random_image_batch(tasks=4)
    shares = [
        TaskBatch(*(t[i : i + 2] for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
        for i in (0, 2)
    ]
    summed, metrics, used = {}, {}, {}
    for strategy in ("loop", "vmap"):
        learner = learner_for(tiny_conv(), strategy=strategy, step="meta-sgd")
        parts = [learner.task_gradients(share, total=4) for share in shares]
        assert [rows.shape[0] for rows, _, _ in parts] == ([2, 2] if strategy == "loop" else [1, 1])
        rows = torch.cat([rows for rows, _, _ in parts])  # what the gather gives, in task order
        summed[strategy] = rows[0].clone()
        for row in rows[1:]:  # summed as the distributed trainer sums them
            summed[strategy] += row
        used[strategy] = parts[0][1]
        assert parts[0][1] == parts[1][1]
        metrics[strategy] = {k: torch.cat([m[k] for _, _, m in parts]) for k in ("loss", "score")}
        learner.zero_grad()
        learner.meta_backward(batch)
        params = [p for p in learner.parameters() if p.requires_grad]
        assert used[strategy] == [p.grad is not None for p in params]
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        if strategy == "loop":
            assert torch.equal(summed[strategy], grad)
        else:
            torch.testing.assert_close(summed[strategy], grad, rtol=1e-12, atol=1e-15)
    assert used["loop"] == used["vmap"] and any(used["loop"])
    assert summed["loop"].abs().max() > 0
    torch.testing.assert_close(summed["vmap"], summed["loop"], rtol=1e-10, atol=1e-13)
    for key in ("loss", "score"):
        torch.testing.assert_close(metrics["vmap"][key], metrics["loop"][key], rtol=1e-10, atol=0)


def test_setup_takes_the_gpu_of_its_local_rank_and_nccl_on_cuda_gloo_on_cpu(monkeypatch):
    """torchrun's environment read by ``distributed.setup`` without a GPU (torch's calls recorded):
    on CUDA, process LOCAL_RANK=1 uses cuda:1 and joins with nccl; on the CPU, gloo; one process
    joins nothing. Catches LOCAL_RANK ignored (every process on cuda:0) or the backend swapped."""
    from metareg.meta import distributed

    calls: list[tuple] = []
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(distributed.dist, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        distributed.dist,
        "init_process_group",
        lambda backend, timeout: calls.append(("init", backend, timeout.total_seconds() > 0)),
    )
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = distributed.setup(torch.device("cuda"))
    assert world.device == torch.device("cuda", 1) and (world.rank, world.size) == (1, 2)
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl", True)]
    calls.clear()
    assert distributed.setup(torch.device("cpu")).device == torch.device("cpu") and calls == [("init", "gloo", True)]
    calls.clear()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.setup(torch.device("cuda")).distributed and calls == []
