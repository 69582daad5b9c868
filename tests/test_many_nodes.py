"""Two torchrun "nodes" on one machine (c10d rendezvous over loopback, one launcher process tree each, as two
machines would run them): they train like one process on the global batch, and when one node dies the other
exits within a bounded time with one line saying so, and ``--resume latest`` on both continues the run."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from torch.distributed import DistError

from codebridge.config import save_config
from codebridge.train.checkpoint import find_checkpoint
from codebridge.train.parallel import lost_contact
from helpers import free_port, kill_tree
from test_distributed import assert_same_training, two_rank_config
from test_trainer import one_thread, read_metrics, shapes, tiny_config  # noqa: F401  (fixtures)

WAIT_S = 300  # for any launcher to finish; a hang fails the test instead of the suite


@contextlib.contextmanager
def two_nodes(config: Path, logs: Path, *args: str) -> Iterator[list[subprocess.Popen]]:
    """``torchrun --nnodes 2 --nproc-per-node 1 -m codebridge train --config CONFIG ARGS`` started twice; node 0
    hosts the rendezvous store (``is_host``: on one machine both would match the endpoint). Each node's output
    goes to LOGS/node<n>.log; whatever is still running at the end is killed with its workers."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes: list[subprocess.Popen] = []
    logs.mkdir(exist_ok=True)
    try:
        for node in range(2):
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
            command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
            command += ["--rdzv-conf", f"is_host={int(node == 0)}", "--max-restarts", "0"]
            command += ["-m", "codebridge", "train", "--config", str(config), *args]
            with open(logs / f"node{node}.log", "w") as log:
                nodes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        yield nodes
    finally:
        for process in nodes:
            if process.poll() is None:
                kill_tree(process.pid)
            process.wait(timeout=60)


def finish(nodes: list[subprocess.Popen], logs: Path) -> None:
    for node, process in enumerate(nodes):
        assert process.wait(timeout=WAIT_S) == 0, (logs / f"node{node}.log").read_text()[-3000:]


def test_two_nodes_match_one_process_with_the_global_batch(shapes: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """Batch 8 on each node against one process with batch 16; both nodes share the run folder, rank 0 writes."""
    single, config = two_rank_config(shapes, tmp_path, "nodes")
    with two_nodes(config, tmp_path) as nodes:
        finish(nodes, tmp_path)
    assert_same_training(single, tmp_path / "nodes")


def test_a_dead_node_ends_the_run_cleanly_and_resume_continues(shapes: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """Node 1's launcher and worker are SIGKILLed once a checkpoint exists; node 0 (the rendezvous host) exits
    within the bound with the one-line message, then both nodes resume the run to its end."""
    run, config = tmp_path / "run", tmp_path / "run.yaml"
    overrides = ("train.steps=60", "train.batch_size=8", "train.checkpoint_every=5", "train.log_every=5")
    save_config(tiny_config(shapes, run, *overrides, "data.val=null", "train.dist_timeout_minutes=0.5"), config)
    with two_nodes(config, tmp_path / "killed") as (survivor, victim):
        deadline = time.monotonic() + WAIT_S
        while not (run / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert victim.poll() is None and survivor.poll() is None, "the run ended before a node could be killed"
        kill_tree(victim.pid)
        killed = time.monotonic()
        code = survivor.wait(timeout=WAIT_S)
        seconds = time.monotonic() - killed
    output = (tmp_path / "killed" / "node0.log").read_text()
    # every wait for the dead node is bounded by dist_timeout_minutes (30 s here); a dead process's closed sockets
    # usually end it at once
    assert code != 0 and seconds < 60, (code, seconds, output[-3000:])
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert re.fullmatch(
        r"error: rank [01] lost contact with the other ranks after step \d+ \(.*\); .*--resume latest", errors[0]
    )
    assert not re.search(r'File ".*codebridge', output), "the worker printed a traceback"
    checkpoint = find_checkpoint(run, "latest")
    assert str(checkpoint) in errors[0]

    with two_nodes(config, tmp_path / "resumed", "--resume", "latest") as nodes:
        finish(nodes, tmp_path / "resumed")
    assert f"resumed from {checkpoint}" in (run / "out.log").read_text()
    assert [r["step"] for r in read_metrics(run)] == list(range(5, 61, 5))
    assert (run / "model" / "model.safetensors").is_file()


def test_lost_contact_names_the_cause_of_collective_failures_only() -> None:
    gloo = "[/w/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:21429: Connection reset by "
    gloo += "peer. This is typically caused by a remote worker hanging or bugs in the application."
    assert lost_contact(RuntimeError(gloo)) == "Read error [10.0.0.2]:21429: Connection reset by peer"
    timeout = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 6000ms for recv"
    assert lost_contact(RuntimeError(timeout)) == "Timed out waiting 6000ms for recv"
    assert (
        lost_contact(DistError("NCCL communicator was aborted on rank 1.")) == "NCCL communicator was aborted on rank 1"
    )
    assert lost_contact(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert lost_contact(ValueError("Connection reset by peer")) is None
