"""Write the benchmark report into docs/performance.md, and docs/benchmark.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# docs/performance.md holds the report between these two lines.
REPORT_START = (
    "<!-- benchmark report: written by bench/report.py from bench/results.json -->"
)
REPORT_END = "<!-- end of benchmark report -->"
HEADER = (
    "| pipeline | CPUs per client | wall s | ServerApp s | start-up s "
    "| round 1 / later rounds s | training samples/s | of floor | peak RSS GiB "
    "| federated acc | test acc |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)
SCALE_HEADER = (
    "| clients | sampled per round | training images each | rounds | start-up s "
    "| round 1 s | later rounds s | peak RSS GiB |\n"
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def _later(rounds: list[float]) -> float:
    return sum(rounds[1:]) / max(1, len(rounds) - 1)


def _row(name: str, r: dict[str, Any], floor: dict[str, Any]) -> str:
    rounds = r.get("round_seconds")
    cells = [
        name,
        r["spec"].get("cpus", "1 each"),
        f"{r['wall_seconds']:.1f}",
        f"{r.get('server_seconds', r.get('seconds')):.1f}",
        f"{r['startup_seconds']:.1f}" if "startup_seconds" in r else "",
        f"{rounds[0]:.1f} / {_later(rounds):.1f}" if rounds else "",
        f"{r['samples_per_second']:,.0f}",
        f"{r['samples_per_second'] / floor['samples_per_second']:.0%}",
        f"{r['peak_rss_mb'] / 1024:.2f}",
        f"{r['accuracy']:.1%}" if "accuracy" in r else "",
        f"{r['test_accuracy']:.1%}" if "test_accuracy" in r else "",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _scale_row(r: dict[str, Any]) -> str:
    spec, rounds = r["spec"], r["round_seconds"]
    cells = [
        spec["clients"],
        spec["fit_clients"],
        r["train_samples"] // (spec["rounds"] * spec["fit_clients"]),
        spec["rounds"],
        f"{r['startup_seconds']:.1f}",
        f"{rounds[0]:.1f}",
        f"{_later(rounds):.1f}",
        f"{r['peak_rss_mb'] / 1024:.2f}",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_report(results: dict[str, Any], root: Path) -> None:
    """Render the side-by-side tables and the plot."""
    a, b, floor = results["tutorial"], results["app"], results["floor"]
    a2, b2 = results["tutorial_cpu2"], results["app_cpu2"]
    clients, rounds = b["spec"]["clients"], b["spec"]["rounds"]
    machine = results["machine"]
    later = b["round_seconds"][-1]
    fit, evaluate = b["fit_seconds"][-1], b["federated_eval_seconds"][-1]
    steady_fit = b["train_samples"] / rounds / fit
    speedup_cpu2 = a2["server_seconds"] / b2["server_seconds"]
    fit_ratio = b["fit_samples_per_second"] / floor["samples_per_second"]
    steady_ratio = steady_fit / floor["samples_per_second"]
    text = f"""## Benchmark report

Measured by `{results["command"]}` on one machine ({machine["cores"]} cores,
Python {machine["python"]}), in one run, each line in a fresh process tree. Absolute
times vary between machines: the ratios are what count.

### The tutorial's federation: {clients} clients, {rounds} rounds, 1 epoch, batch 32

{HEADER}
{_row("(a) tutorial as written", a, floor)}
{_row("(b) this app", b, floor)}
{_row("(a) tutorial as written", a2, floor)}
{_row("(b) this app", b2, floor)}
{_row("(c) bare PyTorch floor", floor, floor)}

**Speed-up of (b) over (a), ServerApp time** (Flower's "Run finished ... in N s": all
rounds, fit and evaluation):

- same resources, 1 CPU per client (the tutorial's own `backend_config`; two clients
  at a time on two cores): **{a["server_seconds"] / b["server_seconds"]:.1f}x**;
- same resources, 2 CPUs per client (what `flwr run` gives in Flower 1.42 unless told
  otherwise; one client at a time): **{speedup_cpu2:.1f}x**;
- each as it runs by default, the tutorial's code under `flwr run` (2 CPUs per
  client) against this app as its README runs it (1 CPU per client):
  **{a2["server_seconds"] / b["server_seconds"]:.1f}x**.

What the columns mean:

- Training samples/s: the {b["train_samples"]:,} training samples of the run over
  ServerApp time; "of floor" compares it with (c). Over the fit phases alone
  (sampling, sending, training, receiving, averaging), (b) trains
  {b["fit_samples_per_second"]:,.0f} samples/s, **{fit_ratio:.0%} of the floor**
  (round 1 included, which starts the Ray workers and decodes the data); in a
  later round, {steady_fit:,.0f} samples/s, **{steady_ratio:.0%} of the floor**.
- Federated accuracy: weighted over the clients evaluated in the last round (half of
  them, a different half per pipeline). Test accuracy: the final global model on all
  10,000 test images, measured the same way for every pipeline. (b), 1 CPU, per
  round: {" / ".join(f"{x:.1%}" for x in b["accuracy_per_round"])}; (a):
  {" / ".join(f"{x:.1%}" for x in a["accuracy_per_round"])}.
- Start-up: from starting the process to the first round (imports, Ray, the
  ServerApp's set-up; (b) decodes the test split there for its centralized
  evaluation, which (a) does not do).
- Peak RSS: the sum over the process tree (driver, Ray's processes and workers),
  sampled every 0.2 s; shared libraries count once per process.
- (c): {floor["spec"]["processes"]} processes, one thread each, training the same
  model with Adam, batch 32, on pre-made random tensors: {floor["train_samples"]:,}
  samples in {floor["seconds"]:.1f} s.

Where a later round of (b), 1 CPU, goes: {later:.2f} s in all: {fit:.2f} s fitting
(ten clients on two workers, with Flower's messaging), {evaluate:.2f} s federated
evaluation, and the rest, {later - fit - evaluate:.2f} s, centralized evaluation of
the 10,000 test images on the server.

### Many clients (this app, 1 CPU per client)

About ten clients train each round; all share the same 50,000 training images, so
each holds fewer. Round 1 includes asking every node which partition it holds, once,
for reproducible sampling.

{SCALE_HEADER}
{chr(10).join(_scale_row(r) for r in results["scale"])}

![benchmark](benchmark.png)
"""
    _write_between_markers(root / "docs" / "performance.md", text)
    _plot(results, root / "docs" / "benchmark.png")


def _write_between_markers(path: Path, text: str) -> None:
    """Replace what stands between the report's two markers in `path`."""
    page = path.read_text()
    before, rest = page.split(REPORT_START, 1)
    _, after = rest.split(REPORT_END, 1)
    path.write_text(f"{before}{REPORT_START}\n\n{text}\n{REPORT_END}{after}")


def _plot(results: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=100)
    bars = {
        "(a) tutorial\n1 CPU": results["tutorial"]["server_seconds"],
        "(b) app\n1 CPU": results["app"]["server_seconds"],
        "(a) tutorial\n2 CPUs": results["tutorial_cpu2"]["server_seconds"],
        "(b) app\n2 CPUs": results["app_cpu2"]["server_seconds"],
        "(c) floor": results["floor"]["seconds"],
    }
    colours = ["tab:gray", "tab:blue", "silver", "lightsteelblue", "tab:green"]
    left.bar(list(bars), list(bars.values()), color=colours)
    for i, seconds in enumerate(bars.values()):
        left.text(i, seconds, f"{seconds:.0f} s", ha="center", va="bottom")
    left.set(ylabel="seconds", title="ServerApp time, 10 clients x 5 rounds")
    clients = [r["spec"]["clients"] for r in results["scale"]]
    right.plot(
        clients,
        [r["peak_rss_mb"] / 1024 for r in results["scale"]],
        marker="o",
        label="peak RSS (GiB)",
    )
    right.plot(
        clients,
        [_later(r["round_seconds"]) for r in results["scale"]],
        marker="s",
        label="seconds per later round",
    )
    right.set(xscale="log", xlabel="clients", title="This app with many clients")
    right.set_ylim(bottom=0)
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent.parent
    write_report(json.loads((here / "bench" / "results.json").read_text()), here)
