"""Training split across two processes on localhost ends with the weights of one process.

Each test starts both processes of `multiprocess_training.py` itself (free ports on 127.0.0.1),
stops them in a `finally`, and fails with their stderr if either fails or they outlive
`TIMEOUT`. Each process also trains the same model alone on one device and reports how far its
final weights are from that. Plain SGD, whose step scales with the gradient, so a process whose
part of the batch were lost or counted twice would show.

The JAX test runs in the JAX test run, the TensorFlow test in the TensorFlow run (as in
`test_distribution.py`): neither depends on the backend of this process.
"""

import json
import os
import socket
import subprocess
import sys
import time

import keras
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "multiprocess_training.py")
# Each test takes 35 to 50 s on 2 cores shared with other work; past this, a process is taken
# to be stuck (a collective waiting for a peer that died, a port taken between choosing and
# binding it).
TIMEOUT = 120


def own_backend(name):
    return pytest.mark.skipif(
        keras.backend.backend() != name, reason=f"runs in the {name} test run"
    )


def free_ports(count):
    """`count` distinct ports free on 127.0.0.1 (all held open until each is chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def base_environment(backend):
    environment = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # gRPC (JAX's coordinator, TensorFlow's workers) would send localhost through a proxy.
    for name in ("NO_PROXY", "no_proxy"):
        environment[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1,localhost"]))
    return environment


def run_processes(tmp_path, processes_args):
    """Runs the script once per (arguments, environment), together; returns each one's report."""
    processes, files = [], []
    timed_out = False
    try:
        for i, (args, environment) in enumerate(processes_args):
            # Files, not pipes: a process that filled a pipe nobody reads yet would block.
            out = open(tmp_path / f"process{i}.out", "w+")
            err = open(tmp_path / f"process{i}.err", "w+")
            files += [out, err]
            processes.append(
                subprocess.Popen(
                    [sys.executable, SCRIPT, *args], stdout=out, stderr=err, env=environment
                )
            )
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in processes):
            # A process that failed leaves the other waiting for it in a collective.
            if any(p.returncode not in (None, 0) for p in processes):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in files:
            f.flush()
            f.seek(0)
        texts = [f.read() for f in files]
        for f in files:
            f.close()
    outputs, errors = texts[0::2], texts[1::2]
    if timed_out or any(p.returncode != 0 for p in processes):
        reason = f"timed out after {TIMEOUT} s" if timed_out else "a process failed"
        details = "\n".join(
            f"--- process {i} (exit status {p.returncode}) stderr:\n{error[-3000:]}"
            for i, (p, error) in enumerate(zip(processes, errors))
        )
        pytest.fail(f"{reason}\n{details}")
    return [
        [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        for output in outputs
    ]


def check(report, devices):
    assert report["processes"] == 2
    assert report["devices"] == devices
    # Training moved the weights by ~0.1; the two runs agree to float32 rounding.
    assert report["moved"] > 0.01
    assert report["weight_gap"] < 1e-5, report
    assert report["loss_gap"] < 1e-5, report


@own_backend("jax")
def test_jax_two_processes_batch_and_sequence_sharded_match_one_device(tmp_path):
    pytest.importorskip("jax")
    (port,) = free_ports(1)
    environment = base_environment("jax")
    # Two CPU devices in each process: a 2 × 2 mesh over the two processes.
    environment["XLA_FLAGS"] = (
        environment.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    environment["JAX_PLATFORMS"] = "cpu"
    layouts = {
        # The batch split between the processes, time between the devices of each.
        "batch-across": [8, 16, 5],
        # Time split between the processes: every scan's shard summaries cross them.
        "sequence-across": [16, 8, 5],
    }
    reports = run_processes(
        tmp_path,
        [(["jax", str(i), f"127.0.0.1:{port}", *layouts], environment) for i in range(2)],
    )
    for process_reports in reports:
        assert [r["layout"] for r in process_reports] == list(layouts)
        for report in process_reports:
            check(report, devices=4)
            # Each process fed only its own part of every global batch of 16 × 16 steps.
            assert report["local_batch"] == layouts[report["layout"]]


@own_backend("tensorflow")
def test_multi_worker_mirrored_strategy_two_workers_match_one_device(tmp_path):
    ports = free_ports(2)
    workers = [f"127.0.0.1:{port}" for port in ports]
    processes_args = []
    for index in range(2):
        environment = base_environment("tensorflow")
        environment["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        )
        # One CPU replica per worker, like the JAX test's processes; no GPU shared between them.
        environment["CUDA_VISIBLE_DEVICES"] = ""
        processes_args.append((["tensorflow"], environment))
    for process_reports in run_processes(tmp_path, processes_args):
        (report,) = process_reports
        check(report, devices=2)
