"""Benchmark: the tutorial's pipeline, this app and bare PyTorch, side by side.

    python bench/run.py --dataset /abs/path/to/cifar10

runs, one after the other on the same data and machine, (a) the tutorial's pipeline
as written (bench/tutorial_pipeline.py), (b) this app, both as simulated
federations of the same size, and (c) the bare-PyTorch floor: the same model,
optimizer, batch size and number of training samples on pre-made tensors, one
single-threaded process per core. Then (b) again with many clients. Each runs in a
fresh process whose whole tree (Ray included) is measured and then stopped.
Writes bench/results.json, and the report into docs/performance.md (with
docs/benchmark.png).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT = "BENCH_RESULT="
BATCH_SIZE = 32


# --- the parent: start each measurement in its own process tree -----------------


def _tree(root: int) -> list[int]:
    """PIDs of `root` and its live descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            text = stat.read_text()
            state, ppid = text[text.rindex(")") + 2 :].split()[:2]
            if state != "Z":
                children.setdefault(int(ppid), []).append(int(stat.parent.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a child process; add wall time and peak tree RSS."""
    started = time.time()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec), str(started)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        peak = 0
        try:
            while proc.poll() is None and time.time() - started < timeout:
                peak = max(peak, _rss_bytes(_tree(proc.pid)))
                time.sleep(0.2)
            wall = time.time() - started
        finally:  # also on an error or Ctrl-C
            _stop_descendants()
            proc.wait()
        log.seek(0)
        output = log.read()
    lines = [line for line in output.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['kind']} failed:\n{output[-3000:]}")
    result = json.loads(lines[-1][len(RESULT) :])
    result.update(wall_seconds=wall, peak_rss_mb=peak / 2**20, spec=spec)
    print(f"  {spec['name']}: {json.dumps(_summary(result))}", flush=True)
    return result


def _stop_descendants() -> None:
    """Stop, by PID, whatever this process started and what it adopted.

    This process is a child subreaper (see main), so Ray's processes that outlive
    the measured child are re-parented here rather than to PID 1.
    """
    for _ in range(3):
        left = [p for p in _tree(os.getpid()) if p != os.getpid()]
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if not left:
            break
        time.sleep(0.5)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "server_seconds",
        "seconds",
        "wall_seconds",
        "samples_per_second",
        "accuracy",
    )
    return {k: round(result[k], 4) for k in keys if result.get(k) is not None}


# --- the workers ------------------------------------------------------------------


def _train_samples(num_images: int, clients: int) -> int:
    """Training images of one client: its share, less the 20 % validation split."""
    share = num_images // clients
    return share - math.ceil(0.2 * share)


def simulate(spec: dict[str, Any], started: float) -> dict[str, Any]:
    """Run one simulated federation; time the ServerApp and each round."""
    from flwr.server import Server, ServerApp
    from flwr.simulation import run_simulation

    timings: dict[str, Any] = {
        "round_starts": [],
        "fit_seconds": [],
        "eval_seconds": [],
    }
    base_fit, base_fit_round = Server.fit, Server.fit_round
    base_evaluate_round = Server.evaluate_round

    def fit(self, num_rounds, timeout):  # noqa: ANN001, ANN202
        t0 = time.time()
        history, _ = base_fit(self, num_rounds, timeout)
        timings["server_seconds"] = time.time() - t0
        timings["fit_end"] = time.time()
        timings["history"] = history
        timings["parameters"] = self.parameters
        return history, timings["server_seconds"]

    def fit_round(self, server_round, timeout):  # noqa: ANN001, ANN202
        t0 = time.time()
        timings["round_starts"].append(t0)
        res = base_fit_round(self, server_round, timeout)
        timings["fit_seconds"].append(time.time() - t0)
        return res

    def evaluate_round(self, server_round, timeout):  # noqa: ANN001, ANN202
        t0 = time.time()
        res = base_evaluate_round(self, server_round, timeout)
        timings["eval_seconds"].append(time.time() - t0)
        return res

    # Patched in this worker process only.
    Server.fit, Server.fit_round = fit, fit_round
    Server.evaluate_round = evaluate_round
    backend = {"client_resources": {"num_cpus": spec["cpus"], "num_gpus": 0.0}}
    clients, rounds = spec["clients"], spec["rounds"]
    if spec["kind"] in ("tutorial", "flower"):
        server_fn, client_app = _bench_apps(spec)
        run_simulation(
            server_app=ServerApp(server_fn=server_fn),
            client_app=client_app,
            num_supernodes=clients,
            backend_config=backend,
        )
    else:
        from flower_tutorial.simulation import run_tutorial_simulation

        with tempfile.TemporaryDirectory() as out:
            run_tutorial_simulation(
                num_supernodes=clients,
                run_config=spec["run_config"] | {"output-dir": out},
                backend_config=backend,
            )
    history = timings["history"]
    starts = timings["round_starts"] + [timings["fit_end"]]
    per_client = _train_samples(50_000, clients)
    samples = sum(spec["fit_clients"] * per_client for _ in range(rounds))
    return {
        "server_seconds": timings["server_seconds"],
        "startup_seconds": timings["round_starts"][0] - started,
        "round_seconds": [b - a for a, b in zip(starts, starts[1:], strict=False)],
        "fit_seconds": timings["fit_seconds"],
        "federated_eval_seconds": timings["eval_seconds"],
        "train_samples": samples,
        "samples_per_second": samples / timings["server_seconds"],
        "fit_samples_per_second": samples / sum(timings["fit_seconds"]),
        **_accuracies(history, timings["parameters"], spec),
    }


def _bench_apps(spec: dict[str, Any]) -> tuple[Any, Any]:
    """Return (server_fn, client_app) of the pipeline in bench/ that `spec` names.

    Imported here, so that no other measurement pays for importing it.
    """
    # bench/ is the script's folder
    if spec["kind"] == "tutorial":
        from tutorial_pipeline import make_apps

        return make_apps(spec["dataset"], spec["clients"], spec["rounds"])
    from flower_floor import make_apps

    return make_apps(spec["clients"], spec["rounds"])


def _accuracies(history: Any, parameters: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Federated accuracy per round and the final model's test accuracy."""
    if spec["kind"] == "flower":  # its clients train nothing
        return {}
    accuracy = [a for _, a in history.metrics_distributed["accuracy"]]
    return {
        "accuracy": accuracy[-1],
        "accuracy_per_round": accuracy,
        "test_accuracy": _test_accuracy(parameters, spec["dataset"]),
    }


def _test_accuracy(parameters: Any, dataset: str) -> float:
    """Accuracy of a final global model on the whole test split (any pipeline)."""
    import torch
    from flwr.common import parameters_to_ndarrays

    from flower_tutorial.config import DataSettings, app_run_config
    from flower_tutorial.task import Net, load_test_data, set_parameters, test

    net = Net()
    set_parameters(net, parameters_to_ndarrays(parameters))
    data = DataSettings.from_run_config(app_run_config({"dataset": dataset}))
    return test(net, load_test_data(data), torch.device("cpu"))[1]


def _floor_process(samples: int, seed: int) -> float:
    import torch

    from flower_tutorial.task import Net

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    images = torch.randn(samples, 3, 32, 32)
    labels = torch.randint(0, 10, (samples,))
    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.001)
    criterion = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for start in range(0, samples, BATCH_SIZE):
        optimizer.zero_grad()
        loss = criterion(
            net(images[start : start + BATCH_SIZE]), labels[start : start + BATCH_SIZE]
        )
        loss.backward()
        optimizer.step()
    return time.perf_counter() - t0


def floor(spec: dict[str, Any], started: float) -> dict[str, Any]:
    """Bare PyTorch on pre-made tensors: one single-threaded process per core."""
    from concurrent.futures import ProcessPoolExecutor

    processes, samples = spec["processes"], spec["train_samples"]
    with ProcessPoolExecutor(processes) as pool:
        t0 = time.perf_counter()
        times = list(
            pool.map(
                _floor_process, [samples // processes] * processes, range(processes)
            )
        )
        seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "process_seconds": times,
        "train_samples": samples,
        "samples_per_second": samples / max(times),
    }


# --- the report -------------------------------------------------------------------


def federation_spec(
    kind: str,
    args: argparse.Namespace,
    clients: int,
    *,
    rounds: int | None = None,
    cpus: int = 1,
    cache: str = "warm",
) -> dict[str, Any]:
    """Describe a federation to measure; with many clients, ~10 train per round.

    `cache` (the app only): "warm", the bench's data cache, filled by an earlier
    measurement; "cold", an empty one; "off", no cache (the pipeline before it).
    """
    fraction = 1.0 if clients <= 10 else 10 / clients
    fit_clients = max(int(clients * fraction), 2)
    if rounds is None:
        rounds = args.rounds if clients <= 10 else args.scale_rounds
    run_config = {
        "dataset": args.dataset,
        "num-server-rounds": rounds,
        "fraction-fit": fraction,
        "fraction-evaluate": fraction / 2,
        "min-fit-clients": min(clients, fit_clients),
        "min-evaluate-clients": max(1, min(clients, fit_clients) // 2),
        "min-available-clients": clients,
    }
    if kind == "app":
        cache_dir = args.cache_dir / (
            "warm" if cache == "warm" else f"{cache}-{clients}"
        )
        run_config |= {"data-cache": cache != "off", "data-cache-dir": str(cache_dir)}
    name = f"{kind}-{clients}-r{rounds}-cpu{cpus}" + (
        f"-{cache}" if kind == "app" else ""
    )
    return {
        "name": name,
        "kind": kind,
        "cpus": cpus,
        "cache": cache if kind == "app" else None,
        "dataset": args.dataset,
        "clients": clients,
        "rounds": rounds,
        "fit_clients": fit_clients,
        "run_config": run_config,
    }


def deploy(spec: dict[str, Any], started: float) -> dict[str, Any]:
    """Run the app through the Deployment Engine on loopback; time each round.

    A local SuperLink and SuperNodes (flower_tutorial.deployment), `flwr run`
    against them, the round times from the run's history.json. The run uses the
    bench's warm data cache, as the same federation's simulation left it.
    """
    from flower_tutorial.deployment import local

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FLWR_HOME"] = str(Path(tmp) / "flwr-home")
        out = Path(tmp) / "outputs"
        run_config = spec["run_config"] | {"output-dir": str(out)}
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        deployment = local.start(Path(tmp) / "deployment", spec["clients"])
        try:
            done = subprocess.run(
                [local._bin("flwr"), "run", str(ROOT), deployment.connection]
                + ["--stream", "--run-config", overrides],
                capture_output=True,
                text=True,
                timeout=1800,
            )
        finally:
            local.stop(deployment.directory)
        (run_dir,) = out.iterdir()
        history = json.loads((run_dir / "history.json").read_text())
    rounds = [r["seconds"] for r in history["rounds"] if r["round"] > 0]
    if len(rounds) != spec["rounds"]:
        raise RuntimeError(f"the deployment run failed:\n{done.stdout[-3000:]}")
    return {
        "server_seconds": sum(rounds),
        "round_seconds": rounds,
        "accuracy": history["rounds"][-1]["distributed_accuracy"],
        "test_accuracy": history["rounds"][-1]["centralized_accuracy"],
        "samples_per_second": 0.0,
    }


def main() -> None:
    """Parse arguments; run the workers or the whole benchmark."""
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        spec, started = json.loads(sys.argv[2]), float(sys.argv[3])
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        worker = {"floor": floor, "deployment": deploy}.get(spec["kind"], simulate)
        print(RESULT + json.dumps(worker(spec, started)), flush=True)
        return

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", required=True, help="a local CIFAR-10 folder (absolute)"
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--short-rounds", type=int, default=2)
    parser.add_argument("--scale", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--scale-rounds", type=int, default=3)
    parser.add_argument("--deployment-nodes", type=int, default=3)
    args = parser.parse_args()
    args.dataset = str(Path(args.dataset).resolve())
    if sys.platform == "linux":  # adopt orphaned Ray processes, to stop them by PID
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        args.cache_dir = Path(cache_dir)
        results = _measure_all(args)
    for result in _all_results(results):
        result.get("spec", {}).pop("dataset", None)
        run_config = result.get("spec", {}).get("run_config", {})
        for key in ("dataset", "data-cache-dir"):
            run_config.pop(key, None)
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2))
    from report import write_report

    write_report(results, ROOT)


def _measure_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, in an order that fills the data cache before "warm"."""
    n, short = args.clients, args.short_rounds

    def spec(kind: str, **kwargs: Any) -> dict[str, Any]:
        return federation_spec(kind, args, kwargs.pop("clients", n), **kwargs)

    # Client resources: 1 CPU is the tutorial's own backend_config; 2 is Flower
    # 1.42's default for `flwr run` (on 2 cores: one client at a time).
    results: dict[str, Any] = {
        # The data's path is this machine's business, not the report's.
        "command": "python bench/run.py --dataset /abs/path/to/cifar10 "
        + " ".join(sys.argv[sys.argv.index("--dataset") + 2 :]),
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
        "app_cold": measure(spec("app", cache="cold"), 1800),
        "app_off": measure(spec("app", cache="off"), 1800),
    }
    # The warm cache is filled once; every "warm" measurement then finds it full.
    measure(spec("app", rounds=1), 1800)
    for cpus in (1, 2):
        suffix = "" if cpus == 1 else "_cpu2"
        for rounds, label in ((args.rounds, ""), (short, "_short")):
            for kind in ("tutorial", "app"):
                results[f"{kind}{label}{suffix}"] = measure(
                    spec(kind, rounds=rounds, cpus=cpus), 1800
                )
    results["flower"] = measure(spec("flower"), 1800)
    samples = results["app"]["train_samples"]
    results["floor"] = measure(
        {
            "name": "floor",
            "kind": "floor",
            "processes": os.cpu_count(),
            "train_samples": samples,
        },
        1800,
    )
    results["scale"] = [results["app"]] + [
        measure(spec("app", clients=c, cache="cold"), 3600) for c in args.scale
    ]
    nodes = args.deployment_nodes
    results["simulation_nodes"] = measure(
        spec("app", clients=nodes, rounds=short), 1800
    )
    results["deployment_nodes"] = measure(
        spec("deployment", clients=nodes, rounds=short)
        | {"run_config": spec("app", clients=nodes, rounds=short)["run_config"]},
        1800,
    )
    return results


def _all_results(results: dict[str, Any]) -> list[dict[str, Any]]:
    singles = [v for v in results.values() if isinstance(v, dict) and "spec" in v]
    return singles + results["scale"]


if __name__ == "__main__":
    main()
