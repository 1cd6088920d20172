"""Multi-host training: two real processes on localhost form one 4-device mesh;
and the README's two-process command runs the CLIP smoke recipe to its summary.

Each worker (tests/helpers/multihost_worker.py) joins the cluster through
`jax.distributed.initialize` (CPU collectives over gloo), owns 2 simulated
devices and feeds only its half of every global batch; checkpoints are written
by both into one shared directory and the run is resumed by restarting both.
One process with 4 devices on the same global batches is the reference.

Not bitwise: the cross-process all-reduce (gloo) sums the per-device gradients
in another order than the in-process one, so values drift by an ulp or so.
Within the multi-host run, resuming is bitwise exact.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common import checkpoint as ckpt
from common import metrics

REPO = Path(__file__).resolve().parents[1]
N_PROCESSES = 2
TOTAL_DEVICES = 4  # simulated CPU devices, split evenly over the processes
TIMEOUT_S = 150  # per launch; a hung collective fails the test instead of the suite
README_TIMEOUT_S = 400  # the README's command: 50 CLIP smoke steps, then zero-shot on two shapes splits
# Variables that make `initialize_distributed` join some other cluster.
_CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
                 "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _xla_flags(devices: int) -> str:
    """A launch's own simulated device count, plus the suite's other XLA flags (conftest.py's compile level)."""
    others = [f for f in os.environ.get("XLA_FLAGS", "").split()
              if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *others])


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


class _Workers:
    """One launch of the worker as `processes` cooperating processes."""

    def __init__(self, root: Path, leg: str, processes: int, steps: int, runs: list[str]):
        self.out, logs = root / f"out_{leg}", root / "logs"
        self.out.mkdir(parents=True)
        logs.mkdir(exist_ok=True)
        self.logs = [logs / f"{leg}_{i}.log" for i in range(processes)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_VARS)}
        devices = TOTAL_DEVICES // processes
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=_xla_flags(devices))
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
        cmd = [sys.executable, "-m", "tests.helpers.multihost_worker", "--workdir", str(root / "work"),
               "--out", str(self.out), "--steps", str(steps)] + [a for run in runs for a in ("--run", run)]
        self.procs = []
        for i, path in enumerate(self.logs):
            with open(path, "w") as log:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=dict(env, JAX_PROCESS_ID=str(i)),
                                                   stdout=log, stderr=subprocess.STDOUT))

    def wait(self) -> Path:
        """Waits for every process to succeed; returns their --out folder.

        A dead worker leaves the others blocked in a collective, so the first
        failure (or TIMEOUT_S) kills them all and fails with their output.
        """
        deadline = time.monotonic() + TIMEOUT_S
        while not all(p.poll() == 0 for p in self.procs):
            codes = [p.poll() for p in self.procs]
            if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
                self.kill()
                why = f"exit codes {codes}" if any(c is not None for c in codes) else f"timed out after {TIMEOUT_S} s"
                outputs = "\n".join(f"--- {path.name} ---\n{_tail(path)}" for path in self.logs)
                pytest.fail(f"workers failed ({why}):\n{outputs}")
            time.sleep(0.1)
        return self.out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def start_workers():
    """`start_workers(root, leg, processes, steps, runs) -> _Workers`; none outlives the test."""
    started = []

    def start(*args) -> _Workers:
        started.append(_Workers(*args))
        return started[-1]

    yield start
    for workers in started:
        workers.kill()


def _losses(out: Path, name: str, process: int = 0) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in json.loads((out / f"history_{name}_{process}.json").read_text())}


def _params(out: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(out / f"params_{name}.npz") as f:
        return dict(f)


def test_two_processes_train_like_one(tmp_path, start_workers):
    multi, single = tmp_path / "multi", tmp_path / "single"
    # The reference: one process with all devices (runs beside the first leg).
    single_run = start_workers(single, "ref", 1, 6, ["fsdp=fsdp", "dp=data_parallel"])
    # Multi-host: "resumed" trains 4 steps, both processes restart and continue
    # to 6; "straight" and "dp" train 6 steps in one go.
    leg1 = start_workers(multi, "leg1", N_PROCESSES, 4, ["resumed=fsdp"]).wait()
    saved = ckpt.CheckpointManager(multi / "work" / "resumed" / "checkpoints")
    assert saved.all_steps() == [2, 4]
    # Every host's own data position is kept, not only process 0's.
    assert saved.restore_metadata(4)["data_state"] == [{"position": 4, "process_index": i} for i in range(N_PROCESSES)]
    saved.close()
    leg2 = start_workers(multi, "leg2", N_PROCESSES, 6, ["resumed=fsdp", "straight=fsdp", "dp=data_parallel"]).wait()
    reference = single_run.wait()

    # Resuming multi-host is exact: same parameters and losses as never stopping.
    resumed = {**_losses(leg1, "resumed"), **_losses(leg2, "resumed")}
    assert resumed == _losses(leg2, "straight")
    for key, value in _params(leg2, "straight").items():
        np.testing.assert_array_equal(_params(leg2, "resumed")[key], value, err_msg=key)

    # Logs come from process 0 only: every step once, in order, across both legs.
    logged = metrics.read_jsonl(multi / "work" / "resumed")
    assert [r["step"] for r in logged] == list(range(1, 7))
    assert {r["step"]: r["loss"] for r in logged} == resumed

    # Restore on another process count (another_mesh): one process with all 4 devices loads the two
    # processes' step 6 with identical parameters, and says the data layout cannot continue bitwise.
    leg3 = start_workers(multi, "leg3", 1, 6, ["resumed=fsdp"])
    leg3.wait()
    assert "cannot continue bitwise" in leg3.logs[0].read_text()
    for key, value in _params(leg2, "resumed").items():
        np.testing.assert_array_equal(_params(leg3.out, "resumed")[key], value, err_msg=key)

    for multi_name, single_name in (("straight", "fsdp"), ("dp", "dp")):
        # The loss is a replicated value: both processes see the same one.
        assert _losses(leg2, multi_name, 0) == _losses(leg2, multi_name, 1)
        want = _losses(reference, single_name)
        assert sorted(want) == list(range(1, 7))
        np.testing.assert_allclose([_losses(leg2, multi_name)[s] for s in want], list(want.values()),
                                   rtol=1e-6, err_msg=multi_name)
        got, expected = _params(leg2, multi_name), _params(reference, single_name)
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=f"{multi_name} {key}")


def test_readme_two_process_command_runs_clip_to_its_summary(tmp_path):
    """The README's multi-host block, as written (only the port, the workdir, the interpreter and the
    suite's XLA compile level are this test's): training, checkpoints and the end-of-training zero-shot
    evaluation on FSDP-sharded parameters that span both processes' devices."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- tests/test_multihost.py runs this block as it is -->\n```bash\n(.*?)```", readme, re.S)
    assert block, "README.md lost its multi-host block (the marker comment and a bash fence after it)"
    script = (block.group(1).replace("localhost:12355", f"localhost:{_free_port()}")
              .replace("runs/two_processes", str(tmp_path / "run")).replace(".venv/bin/python", sys.executable)
              .replace("XLA_FLAGS=--xla_force_host_platform_device_count=4", f"XLA_FLAGS='{_xla_flags(4)}'"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_VARS) and k != "XLA_FLAGS"}
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=README_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # bash and both python processes
            proc.wait()
            pytest.fail(f"the README's command timed out after {README_TIMEOUT_S} s:\n{_tail(log_path)}")
    output = log_path.read_text(errors="replace")
    # Both processes print the summary when they finish; process 0 writes it.
    assert output.count('"steps": 20') == 2, _tail(log_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["mesh"]["fsdp"] == 8 and not summary["preempted"]
    for split in ("shapes_validation", "shapes_heldout"):
        assert summary[split]["step"] == 20
        assert 0.0 <= summary[split]["zeroshot_color_top1"] <= 1.0, summary[split]
        assert 0.0 <= summary[split]["retrieval_image_to_text_R@1"] <= 1.0, summary[split]
    saved = ckpt.CheckpointManager(tmp_path / "run" / "checkpoints")
    assert saved.latest_step() == 20
    assert len(saved.restore_metadata(20)["data_state"]) == N_PROCESSES
    saved.close()
