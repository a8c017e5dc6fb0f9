"""Shared fixtures: offline Hugging Face settings and a synthetic CIFAR-10 folder."""

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

# Set before `datasets` is imported anywhere: no hub, and caches of our own (the
# Hugging Face one, and the app's data cache under XDG_CACHE_HOME) so that tests
# neither reach the network nor read or fill the user's caches.
_HF_HOME = tempfile.mkdtemp(prefix="flower-tutorial-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["XDG_CACHE_HOME"] = os.path.join(_HF_HOME, "xdg-cache")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import ClassLabel, Dataset, Features, Image  # noqa: E402
from flwr.common import Context, RecordDict  # noqa: E402
from flwr.common.config import get_project_config  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from flower_tutorial.config import DataSettings  # noqa: E402

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
_PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>
NUM_TRAIN = 240
NUM_TEST = 60


APP_DIR = Path(__file__).resolve().parent.parent


# The first lines of a child's code that runs its simulations without Ray (see
# tests/inprocess.py); `in_process(workers)` for ClientApps that may hang.
def in_process(workers: int = 1) -> str:
    """Code that makes the child's simulations run their ClientApps in threads."""
    return (
        f"import sys; sys.path.insert(0, {str(APP_DIR / 'tests')!r})\n"
        f"from inprocess import use_in_process_backend\n"
        f"use_in_process_backend({workers})\n"
    )


def default_run_config() -> dict:
    """The run config of pyproject.toml, as `flwr run` reads it."""
    return dict(get_project_config(APP_DIR)["tool"]["flwr"]["app"]["config"])


def data_settings(dataset: Path, **overrides: object) -> DataSettings:
    """The default data settings on a local folder, with run-config overrides."""
    config = default_run_config() | {"dataset": str(dataset)} | overrides
    return DataSettings.from_run_config(config)


def make_context(
    run_config: dict, node_config: dict | None = None, run_id: int = 1
) -> Context:
    """A Context as Flower gives a ServerApp or ClientApp (node 1)."""
    return Context(
        run_id=run_id,
        node_id=1,
        node_config=node_config or {},
        state=RecordDict(),
        run_config=run_config,
    )


def run_dir_of(output_dir: Path) -> Path:
    """The only run folder in `output_dir` (fails unless there is exactly one)."""
    (run_dir,) = output_dir.iterdir()
    return run_dir


def history_of(output_dir: Path) -> dict:
    """The history.json of the only run in `output_dir`."""
    return json.loads((run_dir_of(output_dir) / "history.json").read_text())


def logged_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages logged as warnings."""
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


# Fixtures that start processes: a test using any of them is in the slow tier.
PROCESS_FIXTURES = {"run_python", "run_python_module", "deploy"}


# The files of deployments (marked `deployment`): under pytest-xdist one worker
# runs them one after the other. Two at once on 2 cores starve each other's
# ClientApp processes (one per message), and both take longer than in turn.
# In this order they end with test_deployment.py's fast tests: xdist hands a
# worker its next file once it has two tests left, which then waits seconds, not
# the minutes of a deployment.
DEPLOYMENT_FILES = (
    "tests/test_hosts.py",
    "tests/test_ray_cluster.py",
    "tests/test_deployment.py",
)
# The files that go out first, longest first (`--durations`: deployments 250 and
# 250 s, then 120, 75, 55 and 45 s of simulations); then other slow files, then
# fast ones, which even out the end.
FIRST_FILES = (
    *DEPLOYMENT_FILES,
    "tests/test_runs.py",
    "tests/test_flwr_run.py",
    "tests/test_resume.py",
    "tests/test_faults.py",
    "tests/test_simulation.py",
)


def _rank(item: pytest.Item, where: str) -> int:
    """Place in FIRST_FILES; after them, files with a slow test, then the others."""
    if where in FIRST_FILES:
        return FIRST_FILES.index(where)
    return len(FIRST_FILES) + (not item.get_closest_marker("slow"))


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Mark every test that starts processes `slow` (fast tier: -m 'not slow').

    Files of deployments come first, then those with other slow tests: the
    workers start on the longest work, and short files even out the end.
    """
    rank: dict[Path, int] = {}
    for item in items:
        starts_processes = PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))
        deployment = item.get_closest_marker("deployment") is not None
        if starts_processes or deployment:
            item.add_marker(pytest.mark.slow)
        where = item.path.relative_to(config.rootpath).as_posix()
        if deployment and where not in DEPLOYMENT_FILES:
            raise pytest.UsageError(
                f"{item.nodeid}: a deployment outside {DEPLOYMENT_FILES}"
            )
        item_rank = _rank(item, where)
        rank[item.path] = min(rank.get(item.path, item_rank), item_rank)
    items.sort(key=lambda item: rank[item.path])  # stable: file order otherwise


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`--dist loadfile`, but with all of DEPLOYMENT_FILES on the same worker."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class DeploymentsInTurn(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            where = nodeid.split("::", 1)[0]
            return "deployments" if where in DEPLOYMENT_FILES else where

    return DeploymentsInTurn(config, log)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HF_HOME, ignore_errors=True)


def make_split(num_images: int, seed: int) -> Dataset:
    """Images in the CIFAR-10 schema whose class sets their mean colour.

    Every image is unique (noise), so partitions can be told apart by content, and
    the colour makes the labels learnable by the tutorial's CNN in a few steps.
    """
    # One palette for every split, so what is learned on train holds on test.
    palette = np.random.default_rng(1234).integers(0, 256, size=(10, 3))
    rng = np.random.default_rng(seed)
    labels = np.arange(num_images) % len(CIFAR10_CLASSES)
    rng.shuffle(labels)
    images = []
    for label in labels:
        noise = rng.integers(-40, 41, size=(32, 32, 3))
        pixels = np.clip(palette[label] + noise, 0, 255).astype(np.uint8)
        images.append(PILImage.fromarray(pixels, mode="RGB"))
    features = Features({"img": Image(), "label": ClassLabel(names=CIFAR10_CLASSES)})
    return Dataset.from_dict({"img": images, "label": labels.tolist()}, features)


def write_hub_layout(root: Path, splits: dict[str, Dataset]) -> Path:
    """Write splits as `uoft-cs/cifar10` lays them out: plain_text/<split>-*.parquet."""
    (root / "plain_text").mkdir(parents=True)
    for name, split in splits.items():
        split.to_parquet(str(root / "plain_text" / f"{name}-00000-of-00001.parquet"))
    return root


@pytest.fixture
def caller_sigint() -> Iterator[list[int]]:
    """A SIGINT handler of the caller's, in place for the test; it notes each call.

    Also where the test process was started with SIGINT ignored (a background
    job), which `stop_on_ctrl_c` would rightly leave ignored.
    """
    calls: list[int] = []

    def handler(signum, frame) -> None:
        calls.append(signum)

    original = signal.signal(signal.SIGINT, handler)
    try:
        yield calls
    finally:
        signal.signal(signal.SIGINT, original)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Who this process is, as Flower's runtime tells a ClientApp process."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def run_config(cifar_dir: Path, tmp_path: Path) -> dict:
    """The default run config on the synthetic data, with small batches."""
    return default_run_config() | {
        "dataset": str(cifar_dir),
        "batch-size": 16,
        "output-dir": str(tmp_path / "outputs"),
    }


def first_round_updates(
    run_config: dict,
    partition_ids: Iterable[int],
    num_partitions: int,
    start: list[np.ndarray] | None = None,
    server_round: int = 1,
) -> list[tuple[list[np.ndarray], int]]:
    """The updates (arrays, examples) of these partitions' clients in a round.

    Trained here as each client would in a Ray worker with one CPU, from `start`
    (by default the initial model that the server makes from the seed).
    """
    from flower_tutorial.client_app import FlowerClient
    from flower_tutorial.config import NodeSettings, RunSettings
    from flower_tutorial.task import Net, get_parameters, load_data, set_seed

    settings = RunSettings.from_run_config(default_run_config() | run_config)
    set_seed(settings.seed)
    initial = get_parameters(Net()) if start is None else start
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        updates = []
        for pid in partition_ids:
            node = NodeSettings(partition_id=pid, num_partitions=num_partitions)
            train, val = load_data(pid, num_partitions, settings.data)
            client = FlowerClient(Net(), train, val, settings, node)
            arrays, n, _ = client.fit(initial, {"server-round": server_round})
            updates.append((arrays, n))
    finally:
        torch.set_num_threads(threads)
    return updates


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic CIFAR-10 copy: NUM_TRAIN train and NUM_TEST test images."""
    root = tmp_path_factory.mktemp("cifar10")
    return write_hub_layout(
        root, {"train": make_split(NUM_TRAIN, 0), "test": make_split(NUM_TEST, 1)}
    )


def _set_child_subreaper() -> None:
    """Adopt orphaned descendants (e.g. Ray workers) so they can be found and reaped.

    Without this, processes whose parent exits are re-parented to PID 1 and a test
    could not tell what its run left behind.
    """
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _live_descendants(root: int) -> dict[int, str]:
    """Return {pid: command} of the live (non-zombie) descendants of `root`."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the process ended while we looked
        pid = int(stat.parent.name)
        name = text[text.index("(") + 1 : text.rindex(")")]
        state, ppid = text[text.rindex(")") + 2 :].split()[:2]
        children.setdefault(int(ppid), []).append(pid)
        info[pid] = (state, name)
    found: dict[int, str] = {}
    helpers = _own_helpers()
    stack = [pid for pid in children.get(root, []) if pid not in helpers]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        if info[pid][0] != "Z":
            found[pid] = _command(pid, info[pid][1])
    return found


def _own_helpers() -> set[int]:
    """PIDs of this process's own multiprocessing helpers, which live as long as it.

    A test that used multiprocessing in this process (the data cache's lock test)
    leaves its resource tracker (and forkserver) running: not a test's leftover.
    """
    from multiprocessing import forkserver, resource_tracker

    pids = {
        getattr(resource_tracker._resource_tracker, "_pid", None),
        getattr(forkserver._forkserver, "_forkserver_pid", None),
    }
    return {pid for pid in pids if pid is not None}


def _command(pid: int, name: str) -> str:
    """The command line of `pid` (shortened), or `name` if it cannot be read."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return name
    line = " ".join(a.decode(errors="replace") for a in argv if a)
    return line[:300] or name


def _kill_descendants() -> dict[int, str]:
    """SIGKILL every live descendant of this process by PID; return them."""
    left = _live_descendants(os.getpid())
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    _reap_adopted()
    return left


def _reap_adopted() -> None:
    """Reap this process's exited children (adopted ones included)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _default_sigint() -> None:
    """In a child: Ctrl-C as from a terminal, also when pytest runs as a background
    job (which starts with SIGINT ignored, and an ignored SIGINT is inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _python_runner() -> Iterator[Callable[..., tuple[int, str]]]:
    """Run Python code in child processes -> (exit code, output).

    Fails if a child outlives `timeout` or leaves processes behind. Whatever the
    children started (Ray's GCS, raylet, workers) is stopped by PID at teardown,
    also when the test fails or times out. As soon as `interrupt_when()` holds, the
    child gets `interrupt_with`: SIGINT is Ctrl-C; SIGKILL goes to the whole tree
    of processes at once, as when a machine loses power.
    """
    _set_child_subreaper()

    def run(
        code: str,
        timeout: float,
        interrupt_when: Callable[[], bool] | None = None,
        interrupt_with: int = signal.SIGINT,
    ) -> tuple[int, str]:
        # A file, not a pipe: a grandchild holding a pipe open would block reading.
        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", code],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_default_sigint,
            )
            deadline = time.monotonic() + timeout
            try:
                if interrupt_when is not None:
                    while not interrupt_when() and proc.poll() is None:
                        time.sleep(0.2)
                        if time.monotonic() > deadline:
                            raise subprocess.TimeoutExpired(proc.args, timeout)
                    proc.send_signal(interrupt_with)
                    if interrupt_with == signal.SIGKILL:
                        proc.wait()  # before the sweep can reap it
                        _kill_descendants()
                proc.wait(timeout=max(deadline - time.monotonic(), 0))
                timed_out = False
            except subprocess.TimeoutExpired:
                # Reaped by Popen first, so the sweep below cannot steal its status.
                proc.kill()
                proc.wait()
                _kill_descendants()
                timed_out = True
            log.seek(0)
            output = log.read()
        if timed_out:
            pytest.fail(f"timed out after {timeout} s:\n{output[-4000:]}")
        return proc.returncode, output

    yield run

    assert_nothing_left()


def assert_nothing_left(grace: float = 60.0) -> None:
    """Fail if a process this test started outlives `grace` s (then kill it).

    Helpers exit on their own once what started them has: Ray's workers after its
    driver, Python's multiprocessing resource tracker after its ClientApp process;
    in seconds, or in a minute on a loaded machine. A leak never exits. The wait
    ends as soon as none is left.
    """
    deadline = time.monotonic() + grace
    while (left := _live_descendants(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        left = _kill_descendants()
    else:
        _reap_adopted()
    assert not left, f"processes left running by the test (now killed): {left}"


@pytest.fixture
def run_python() -> Iterator[Callable[..., tuple[int, str]]]:
    """`_python_runner` for one test."""
    yield from _python_runner()


@pytest.fixture(scope="module")
def run_python_module() -> Iterator[Callable[..., tuple[int, str]]]:
    """`_python_runner` shared by a module's tests (for costly runs made once)."""
    yield from _python_runner()
