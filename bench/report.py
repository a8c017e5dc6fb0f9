"""Write the benchmark report into docs/performance.md, and docs/benchmark.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from federations import later_mean, write_between_markers  # noqa: E402 - bench/

# docs/performance.md holds the report between these two lines.
REPORT_START = (
    "<!-- benchmark report: written by bench/report.py from bench/results.json -->"
)
REPORT_END = "<!-- end of benchmark report -->"
HEADER = (
    "| pipeline | CPUs per client | data cache | wall s | ServerApp s | start-up s "
    "| round 1 / later rounds s | training samples/s | of floor | peak RSS GiB "
    "| federated acc | test acc |\n"
    "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
    "| ---: |"
)
SHORT_HEADER = (
    "| CPUs per client | (a) tutorial s | (b) app s | (a) / (b) "
    "| (b) round 1 / round 2 s |\n| ---: | ---: | ---: | ---: | ---: |"
)
SCALE_HEADER = (
    "| clients | sampled per round | training images each | rounds | start-up s "
    "| round 1 s | later rounds s | peak RSS GiB |\n"
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def _row(name: str, r: dict[str, Any], floor: dict[str, Any]) -> str:
    rounds = r.get("round_seconds")
    cells = [
        name,
        r["spec"].get("cpus", "1 each"),
        r["spec"].get("cache") or "",
        f"{r['wall_seconds']:.1f}",
        f"{r.get('server_seconds', r.get('seconds')):.1f}",
        f"{r['startup_seconds']:.1f}" if "startup_seconds" in r else "",
        f"{rounds[0]:.1f} / {later_mean(rounds):.1f}" if rounds else "",
        f"{r['samples_per_second']:,.0f}",
        f"{r['samples_per_second'] / floor['samples_per_second']:.0%}",
        f"{r['peak_rss_mb'] / 1024:.2f}",
        f"{r['accuracy']:.1%}" if "accuracy" in r else "",
        f"{r['test_accuracy']:.1%}" if "test_accuracy" in r else "",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _short_row(a: dict[str, Any], b: dict[str, Any]) -> str:
    rounds = b["round_seconds"]
    cells = [
        a["spec"]["cpus"],
        f"{a['server_seconds']:.1f}",
        f"{b['server_seconds']:.1f}",
        f"**{a['server_seconds'] / b['server_seconds']:.2f}x**",
        f"{rounds[0]:.1f} / {rounds[1]:.1f}",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def scale_row(r: dict[str, Any]) -> str:
    """One row of the table of many clients (SCALE_HEADER)."""
    spec, rounds = r["spec"], r["round_seconds"]
    cells = [
        spec["clients"],
        spec["fit_clients"],
        r["train_samples"] // (spec["rounds"] * spec["fit_clients"]),
        spec["rounds"],
        f"{r['startup_seconds']:.1f}",
        f"{rounds[0]:.1f}",
        f"{later_mean(rounds):.1f}",
        f"{r['peak_rss_mb'] / 1024:.2f}",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _verdict(value: float, target: float, at_most: bool) -> str:
    met = value <= target if at_most else value >= target
    return "met" if met else "**not met**"


def targets(results: dict[str, Any]) -> list[tuple[str, float, str, str]]:
    """Each target of the cold-start work: (what, value, target, verdict)."""
    b, floor = results["app"], results["floor"]
    rows = [
        (
            "ServerApp time / floor, warm cache, 10 x 5, 1 CPU",
            b["server_seconds"] / floor["seconds"],
            "<= 1.25",
            _verdict(b["server_seconds"] / floor["seconds"], 1.25, True),
        ),
        (
            "round 1 / later round, same run",
            b["round_seconds"][0] / later_mean(b["round_seconds"]),
            "<= 2",
            _verdict(b["round_seconds"][0] / later_mean(b["round_seconds"]), 2, True),
        ),
    ]
    for cpus in ("", "_cpu2"):
        for label, name in (("", "5 rounds"), ("_short", "2 rounds")):
            a, app = results[f"tutorial{label}{cpus}"], results[f"app{label}{cpus}"]
            ratio = a["server_seconds"] / app["server_seconds"]
            rows.append(
                (
                    f"tutorial / app, {name}, {2 if cpus else 1} CPU(s) per client",
                    ratio,
                    ">= 2",
                    _verdict(ratio, 2, False),
                )
            )
    later = results["simulation_nodes"]["round_seconds"][-1]
    worst = max(results["deployment_nodes"]["round_seconds"]) / later
    rows.append(
        (
            "deployment round / simulated later round (worst round)",
            worst,
            "<= 2",
            _verdict(worst, 2, True),
        )
    )
    cold = results["app_cold"]["server_seconds"] / results["app_off"]["server_seconds"]
    rows.append(
        (
            "cold cache / no cache (the pipeline before)",
            cold,
            "<= 1",
            _verdict(cold, 1.0, True),
        )
    )
    return rows


def write_report(results: dict[str, Any], root: Path) -> None:
    """Render the side-by-side tables and the plot."""
    a, b, floor = results["tutorial"], results["app"], results["floor"]
    a2, b2 = results["tutorial_cpu2"], results["app_cpu2"]
    clients, rounds = b["spec"]["clients"], b["spec"]["rounds"]
    machine = results["machine"]
    later = b["round_seconds"][-1]
    fit, evaluate = b["fit_seconds"][-1], b["federated_eval_seconds"][-1]
    steady_fit = b["train_samples"] / rounds / fit
    fit_ratio = b["fit_samples_per_second"] / floor["samples_per_second"]
    steady_ratio = steady_fit / floor["samples_per_second"]
    sim, dep = results["simulation_nodes"], results["deployment_nodes"]
    nodes, dep_rounds = dep["spec"]["clients"], dep["spec"]["rounds"]
    rows_by_engine = "\n".join(
        f"| {engine} | {' / '.join(f'{x:.1f}' for x in r['round_seconds'])} "
        f"| {r['accuracy']:.1%} | {r['test_accuracy']:.1%} |"
        for engine, r in (("simulation", sim), ("deployment", dep))
    )
    target_rows = "\n".join(
        f"| {what} | {value:.2f} | {target} | {verdict} |"
        for what, value, target, verdict in targets(results)
    )
    flower = results["flower"]
    overhead = floor["seconds"] + flower["server_seconds"]
    flower_round_1 = flower["round_seconds"][0]
    app_round_1 = b["round_seconds"][0] - flower_round_1
    text = f"""## Benchmark report

Measured by `{results["command"]}` on one machine ({machine["cores"]} cores,
Python {machine["python"]}), in one run, each line in a fresh process tree. Absolute
times vary between machines (and on a shared machine, between hours): the ratios,
taken within one run, are what count.

### Targets

| target | reached | wanted | |
| --- | ---: | ---: | --- |
{target_rows}

What bounds them, from (c) and (d) below. (d) runs the same federation and messages
with clients that train nothing: Flower and Ray by themselves take
{flower["server_seconds"]:.1f} s for the {rounds} rounds, {flower_round_1:.1f} s
of it in round 1 (Ray starting its workers, which import Flower and PyTorch). The
floor (c) plus (d) is {overhead / floor["seconds"]:.2f}x the floor, before any
evaluation, so 1.25x cannot be reached on this machine; the app spends
{b["server_seconds"] - overhead:.1f} s more than both, evaluating the model on the
server and on the clients every round. Without (d)'s start-up, the app's round 1
takes {app_round_1:.1f} s, {app_round_1 / later_mean(b["round_seconds"]):.2f}x a later
round. No pipeline can be faster than (c) plus (d): the tutorial's code at 1 CPU per
client is {a["server_seconds"] / overhead:.2f}x that bound, which caps how much
faster than it any app can be. In a deployment every message starts a fresh
ClientApp process, which imports Flower and PyTorch (and PyTorch's compiler
stack, on the first optimizer step) before it trains, and a SuperNode looks for
new messages every 3 s: a round pays that twice, once to train and once to
evaluate.

### The tutorial's federation: {clients} clients, {rounds} rounds, 1 epoch, batch 32

{HEADER}
{_row("(a) tutorial as written", a, floor)}
{_row("(b) this app", b, floor)}
{_row("(b) this app, first run ever", results["app_cold"], floor)}
{_row("(b) this app, no cache", results["app_off"], floor)}
{_row("(a) tutorial as written", a2, floor)}
{_row("(b) this app", b2, floor)}
{_row("(c) bare PyTorch floor", floor, floor)}
{_row("(d) Flower alone: clients that train nothing", results["flower"], floor)}

Data cache: "warm", the cache that an earlier run on this machine filled; "cold",
an empty one (the first run ever, which fills it); "off", `data-cache = false`,
every process decoding its partitions (the pipeline before the cache).

### Two rounds, ServerApp time

{SHORT_HEADER}
{_short_row(results["tutorial_short"], results["app_short"])}
{_short_row(results["tutorial_short_cpu2"], results["app_short_cpu2"])}

### The Deployment Engine: {nodes} SuperNodes on loopback, {dep_rounds} rounds

The same federation ({nodes} organizations, the whole train split, warm cache),
simulated and through a local SuperLink and {nodes} SuperNodes
(`python -m flower_tutorial.deployment start`), where every message starts a
fresh ClientApp process:

| | round times s | federated acc | test acc |
| --- | --- | ---: | ---: |
{rows_by_engine}

What the columns mean:

- ServerApp time: from the ServerApp's first step (the initial model's evaluation)
  to its last (the final model and plots written); round times from the start of
  one round's training to the next's.
- Training samples/s: the {b["train_samples"]:,} training samples of the run over
  ServerApp time; "of floor" compares it with (c). Over the fit phases alone
  (sampling, sending, training, receiving, averaging), (b) trains
  {b["fit_samples_per_second"]:,.0f} samples/s, **{fit_ratio:.0%} of the floor**
  (round 1 included, which starts the Ray workers); in a later round,
  {steady_fit:,.0f} samples/s, **{steady_ratio:.0%} of the floor**.
- Federated accuracy: weighted over the clients evaluated in the last round (half of
  them, a different half per pipeline). Test accuracy: the final global model on all
  10,000 test images, measured the same way for every pipeline. (b), 1 CPU, per
  round: {" / ".join(f"{x:.1%}" for x in b["accuracy_per_round"])}; (a):
  {" / ".join(f"{x:.1%}" for x in a["accuracy_per_round"])}.
- Start-up: from starting the process to the first round (imports, Ray, the
  ServerApp's set-up and the initial model's centralized evaluation, which (a)
  does not do).
- Peak RSS: the sum over the process tree (driver, Ray's processes and workers),
  sampled every 0.2 s; shared libraries and the memory-mapped cache count once per
  process.
- (c): {floor["spec"]["processes"]} processes, one thread each, training the same
  model with Adam, batch 32, on pre-made random tensors: {floor["train_samples"]:,}
  samples in {floor["seconds"]:.1f} s.
- (d): the same federation and messages (the model's real parameters), with clients
  that hand the model back unchanged (bench/flower_floor.py): what Flower and Ray
  cost by themselves, their start-up in round 1 included.

Where a later round of (b), 1 CPU, goes: {later:.2f} s in all: {fit:.2f} s fitting
(ten clients on two workers, with Flower's messaging), {evaluate:.2f} s federated
evaluation, and the rest, {later - fit - evaluate:.2f} s, centralized evaluation of
the 10,000 test images on the server.

### Many clients (this app, 1 CPU per client, cold cache)

About ten clients train each round; all share the same 50,000 training images, so
each holds fewer. Round 1 includes asking every node which partition it holds, once.

{SCALE_HEADER}
{chr(10).join(scale_row(r) for r in results["scale"])}

![benchmark](benchmark.png)
"""
    write_between_markers(
        root / "docs" / "performance.md", REPORT_START, REPORT_END, "\n" + text
    )
    _plot(results, root / "docs" / "benchmark.png")


def _plot(results: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=100)
    bars = {
        "(a) tutorial\n1 CPU": results["tutorial"]["server_seconds"],
        "(b) app\n1 CPU": results["app"]["server_seconds"],
        "(a) tutorial\n2 CPUs": results["tutorial_cpu2"]["server_seconds"],
        "(b) app\n2 CPUs": results["app_cpu2"]["server_seconds"],
        "(c) floor": results["floor"]["seconds"],
        "(d) Flower\nalone": results["flower"]["server_seconds"],
    }
    colours = ["tab:gray", "tab:blue", "silver", "lightsteelblue", "tab:green", "wheat"]
    left.bar(list(bars), list(bars.values()), color=colours)
    for i, seconds in enumerate(bars.values()):
        left.text(i, seconds, f"{seconds:.0f} s", ha="center", va="bottom")
    left.set(ylabel="seconds", title="ServerApp time, 10 clients x 5 rounds")
    sim = results["simulation_nodes"]["round_seconds"]
    dep = results["deployment_nodes"]["round_seconds"]
    rounds = range(1, len(sim) + 1)
    width = 0.38
    right.bar([r - width / 2 for r in rounds], sim, width, label="simulation")
    right.bar([r + width / 2 for r in rounds], dep, width, label="deployment")
    right.set(
        xlabel="round",
        ylabel="seconds",
        title=f"{results['deployment_nodes']['spec']['clients']} organizations: "
        "round times",
        xticks=list(rounds),
    )
    right.legend()
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent.parent
    write_report(json.loads((here / "bench" / "results.json").read_text()), here)
