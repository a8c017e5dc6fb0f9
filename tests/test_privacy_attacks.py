"""Attacks on the privacy the app promises, each by the party it protects against.

A curious server under SecAgg+, which holds every message it relays and may lie
about who dropped out: each attack runs the protocol's real messages between the
app's client mods and Flower's server workflow (tests/secagg_protocol.py). Anyone
holding the run config, history.json and every message of a run, against the DP
noise (docs/threat-model.md). Each attack is checked to succeed where what it
needs is given to it, so that a test that it fails can fail.
"""

import importlib
import json
import pickle
import stat
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import default_run_config, in_process
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from secagg_protocol import (
    Plan,
    as_update,
    ask_for_shares,
    federation,
    masked_update,
    plausible,
    revealed_secrets,
    run_until_masked,
    shares_revealed,
    strip_pairwise_masks,
    update_of,
)

from flower_tutorial import checkpoint, secure_aggregation
from flower_tutorial.config import RunSettings
from flower_tutorial.secure_aggregation import secure_fit_workflow

# The module, not the mod of the same name that its package exports.
CLIENT_PROTOCOL = importlib.import_module(
    "flwr.client.mod.secure_aggregation.secaggplus_mod"
)
NUM_NODES = 5
TARGET = 2  # the client whose update the server is after
pytestmark = pytest.mark.usefixtures("task_identity")


def _protocol_masks():
    """The mask generator the clients use: the attacker knows the code."""
    return CLIENT_PROTOCOL.pseudo_rand_gen


def _secure_run(cifar_dir) -> tuple[dict, object]:
    """The run config of a SecAgg+ run with the app's defaults, and its workflow."""
    run_config = default_run_config() | {
        "dataset": str(cifar_dir),
        "secure-aggregation": True,
    }
    settings = RunSettings.from_run_config(run_config)
    return run_config, secure_fit_workflow(settings.privacy, settings.data)


def _without_pairwise_masks(state, grid, first_keys) -> list[np.ndarray] | None:
    """TARGET's masked update less its pairwise masks; None if some cannot go."""
    masked = masked_update(grid, TARGET)
    return strip_pairwise_masks(state, masked, TARGET, first_keys, _protocol_masks())


def _unmasked(state, left, seed) -> list[np.ndarray] | None:
    """TARGET's update from `left` (no pairwise masks) and a private mask seed.

    None where what is left does not look like a quantized update.
    """
    if seed is None or left is None:
        return None
    own = _protocol_masks()(seed, state.mod_range, [a.shape for a in left])
    quantized = [(a - m) % state.mod_range for a, m in zip(left, own, strict=True)]
    return as_update(state, quantized) if plausible(state, quantized) else None


def _plans(state) -> dict[str, Plan]:
    """Stage-3 requests by which a lying server could collect both of TARGET's secrets.

    - "both lists": each holder of TARGET's shares is told it is active and
      dropped out at once;
    - "split": half of them are told it is active, the others that it dropped;
    - "neighbours dropped": every client is told TARGET is active and its
      neighbours dropped, as far as each can be while `threshold` stay active.
    Every request names at least `threshold` active nodes, as clients demand.
    """
    holders = sorted(
        h for h in state.active_node_ids if TARGET in state.nid_to_neighbours[h]
    )
    near = {
        h: sorted(state.nid_to_neighbours[h] & state.active_node_ids) for h in holders
    }
    both = {h: (near[h], [TARGET]) for h in holders}
    split = {
        h: (near[h], [])
        if i % 2 == 0
        else ([n for n in near[h] if n != TARGET], [TARGET])
        for i, h in enumerate(holders)
    }
    neighbours = state.nid_to_neighbours[TARGET] - {TARGET}
    dropped = {}
    for h in sorted(state.active_node_ids):
        known = sorted(state.nid_to_neighbours[h] & state.active_node_ids)
        dead = [n for n in known if n in neighbours]
        active = [n for n in known if n not in neighbours]
        while len(active) < state.threshold and dead:
            active.append(dead.pop())
        dropped[h] = (active, dead)
    return {"both lists": both, "split": split, "neighbours dropped": dropped}


@pytest.mark.parametrize("plan", ["both lists", "split", "neighbours dropped"])
def test_a_server_lying_about_dropouts_cannot_unmask_a_client(cifar_dir, plan):
    # The server runs stages 0 to 2 honestly, then tells the clients whatever
    # story of who dropped out gets it both TARGET's private mask seed and its
    # pairwise masks. Clients answer one unmasking request per round.
    run_config, workflow = _secure_run(cifar_dir)
    grid, context = federation(run_config, NUM_NODES)
    state = run_until_masked(workflow, grid, context)
    shares = ask_for_shares(grid, _plans(state)[plan])
    seeds, first_keys = revealed_secrets(shares, state.threshold)
    left = _without_pairwise_masks(state, grid, first_keys)
    got = _unmasked(state, left, seeds.get(TARGET))
    assert got is None, f"the server unmasked client {TARGET}'s update: {got}"


def test_the_attack_unmasks_a_client_whose_two_secrets_it_holds(cifar_dir):
    # Given TARGET's private mask seed (its holders, told the truth, reveal it)
    # and its first secret key (read from its own state: no request gets it),
    # the attack recovers TARGET's update, up to quantization.
    run_config, workflow = _secure_run(cifar_dir)
    grid, context = federation(run_config, NUM_NODES)
    state = run_until_masked(workflow, grid, context)
    truth = {h: (sorted(state.nid_to_neighbours[h]), []) for h in state.active_node_ids}
    seeds, _ = revealed_secrets(ask_for_shares(grid, truth), state.threshold)
    record = grid.contexts[TARGET].state.config_records[RECORD_KEY_STATE]
    first_key = SecAggPlusState(**record).sk1
    left = _without_pairwise_masks(state, grid, {TARGET: first_key})
    got = _unmasked(state, left, seeds[TARGET])
    assert got is not None
    for array, want in zip(got, update_of(TARGET), strict=True):
        np.testing.assert_allclose(array, want, atol=1e-4)


FOLD_BITS = 16  # the seeds an attacker of Flower's masks searches, in bits


def _seeds_folding_below(bits: int) -> types.SimpleNamespace:
    """os.urandom for SecAgg+'s mask seeds: 32 random bytes whose 32-bit fold is small.

    Flower's mask generator XORs a seed's eight 4-byte words into one. These
    seeds keep 224 random bits, but their fold lies below 2**bits: an attacker
    who searches the fold tries 2**bits seeds instead of 2**32, the same attack
    in seconds (docs/privacy.md has the cost of the whole search).
    """
    rng = np.random.default_rng()

    def urandom(size: int) -> bytes:
        words = [int(w) for w in rng.integers(0, 2**32, size=size // 4)]
        fold = 0
        for word in words[1:]:
            fold ^= word
        words[0] = fold ^ int(rng.integers(0, 2**bits))
        return b"".join(w.to_bytes(4, "little") for w in words)

    return types.SimpleNamespace(urandom=urandom)


@pytest.mark.parametrize("rigged", [False, True], ids=["app", "attack-check"])
def test_a_late_update_stays_masked_by_its_own_seed(cifar_dir, monkeypatch, rigged):
    # TARGET's masked update reaches the server after stage 2 ended: the
    # protocol treats TARGET as dropped out and has its neighbours reveal its
    # first secret key, which removes every pairwise mask. Only its private mask
    # seed still hides the update, and the server searches for it. The
    # attack-check run uses Flower's mask generator: there the search succeeds.
    monkeypatch.setattr(CLIENT_PROTOCOL, "os", _seeds_folding_below(FOLD_BITS))
    if rigged:
        flowers = importlib.import_module(
            "flwr.common.secure_aggregation.secaggplus_utils"
        )
        monkeypatch.setattr(secure_aggregation, "secure_masks", flowers.pseudo_rand_gen)
    run_config, workflow = _secure_run(cifar_dir)
    grid, context = federation(run_config, NUM_NODES)
    grid.late = {TARGET}
    state = run_until_masked(workflow, grid, context)
    assert TARGET not in state.active_node_ids
    assert workflow.unmask_stage(grid, context, state)  # the others' sum is fine
    _, first_keys = revealed_secrets(shares_revealed(grid), state.threshold)
    assert TARGET in first_keys  # as the protocol intends, for a dropped client
    left = _without_pairwise_masks(state, grid, first_keys)
    found = [
        guess
        for guess in range(2**FOLD_BITS)
        if _unmasked(state, left, guess.to_bytes(4, "little") + bytes(28))
    ]
    assert bool(found) is rigged, f"seed guesses {found} unmasked the late update"


# The DP noise, against anyone holding the run config (its `seed`), history.json
# and every training message of a run: the global model sent, each reply.
RECORDED_RUN = """
import pickle
import sys
from flwr.app.message_type import MessageType
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
import flower_tutorial.simulation as simulation

privacy_mod = simulation.privacy_mod
seen = []


def recording_mod(msg, context, call_next):
    # What crosses the network: each training message, and its reply as the
    # client's mods leave it.
    reply = privacy_mod(msg, context, call_next)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    seen.append(
        {
            "partition": context.node_config["partition-id"],
            "round": ins.config["server-round"],
            "sent": parameters_to_ndarrays(ins.parameters),
            "reply": parameters_to_ndarrays(res.parameters),
        }
    )
    return reply


simulation.privacy_mod = recording_mod
run_dir = simulation.run_tutorial_simulation(NODES, RUN_CONFIG)
with open(OUT, "wb") as f:
    pickle.dump({"run_dir": str(run_dir), "seen": seen}, f)
"""
NODES, ROUNDS = 3, 2


def _recorded_run(run_python, cifar_dir, tmp_path, dp: str) -> dict:
    """A small run under `dp`, its messages recorded; what the attacker holds."""
    run_config = {
        "dataset": str(cifar_dir),
        "num-server-rounds": ROUNDS,
        "min-fit-clients": NODES,
        "min-available-clients": NODES,
        "min-evaluate-clients": 1,
        "batch-size": 32,
        "dp": dp,
        "dp-noise-multiplier": 0.5,
        "output-dir": str(tmp_path / "out"),
    }
    out = tmp_path / "seen.pickle"
    code = (
        f"{in_process()}NODES, RUN_CONFIG, OUT = {NODES}, {run_config!r}, {str(out)!r}"
        f"\n{RECORDED_RUN}"
    )
    exit_code, output = run_python(code, timeout=300)
    assert exit_code == 0, output[-4000:]
    held = pickle.loads(out.read_bytes())
    held["history"] = json.loads((Path(held["run_dir"]) / "history.json").read_text())
    held["log"] = output
    return held


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64)


def _public_streams(seed: int, size: int) -> dict[tuple, np.ndarray]:
    """Standard normals from every generator the app seeds from public values.

    `set_seed(seed)` on the server, `set_seed(seed, partition, round)` on each
    client, as task.set_seed derives them; `size` draws of each.
    """
    keys = [(seed,)] + [
        (seed, p, r) for p in range(NODES) for r in range(1, ROUNDS + 1)
    ]
    streams = {}
    for key in keys:
        value = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
        streams[key] = np.random.RandomState(value).normal(size=size)
    return streams


def _reproduced_by(noise: np.ndarray, seed: int) -> list[tuple]:
    """The public generators (and offsets, in rounds) whose draws are `noise`."""
    d = noise.size
    found = []
    for key, draws in _public_streams(seed, d * (ROUNDS + 1)).items():
        for offset in range(ROUNDS + 1):
            window = draws[offset * d : (offset + 1) * d]
            if np.corrcoef(noise, window)[0, 1] > 0.9:
                found.append((key, offset))
    return found


def test_the_noise_attack_finds_noise_drawn_from_a_public_seed():
    # The attack's own check: noise drawn as Flower's mods draw it, from NumPy's
    # global generator right after the client seeded it, is found.
    from flower_tutorial.task import set_seed

    set_seed(42, 1, 2)
    noise = np.random.normal(0, 0.3, 5000)
    assert _reproduced_by(noise, 42) == [((42, 1, 2), 0)]


def _central_noise(held: dict) -> list[np.ndarray]:
    """Each round's central noise: the next model less the mean of the replies."""
    by_round = {}
    for record in held["seen"]:
        by_round.setdefault(record["round"], []).append(record)
    final = torch.load(Path(held["run_dir"]) / "final_model.pt")
    noises = []
    for server_round in range(1, ROUNDS + 1):
        replies = [_flat(r["reply"]) for r in by_round[server_round]]
        if server_round < ROUNDS:
            after = _flat(by_round[server_round + 1][0]["sent"])
        else:
            after = _flat(v.numpy() for v in final.values())
        noises.append(after - np.mean(replies, axis=0))
    return noises


@pytest.mark.parametrize("dp", ["central-fixed", "local"])
def test_nobody_holding_the_run_config_and_messages_can_redraw_the_noise(
    run_python, cifar_dir, tmp_path, dp
):
    held = _recorded_run(run_python, cifar_dir, tmp_path, dp)
    seed = held["history"]["run_config"]["seed"]
    if dp == "central-fixed":
        noises = _central_noise(held)
    else:
        # A client's noise: its reply less the model sent, less a clipped
        # update of norm 1 that 60,000 noised weights drown.
        noises = [_flat(r["reply"]) - _flat(r["sent"]) for r in held["seen"]]
    assert len(noises) == (ROUNDS if dp != "local" else ROUNDS * NODES)
    for noise in noises:
        assert noise.std() > 0.01  # noise there is, and enough to matter
        assert _reproduced_by(noise, seed) == []
    # The server's secret is in its checkpoint, readable by its owner only, and
    # nowhere else it writes.
    run_dir = Path(held["run_dir"])
    saved = checkpoint.load(run_dir)
    mode = stat.S_IMODE((run_dir / checkpoint.CHECKPOINT).stat().st_mode)
    assert mode == 0o600
    if dp == "central-fixed":
        secret = saved.noise_secret
        assert isinstance(secret, bytes) and len(secret) == 32
        published = (run_dir / "history.json").read_text() + held["log"]
        for shown in (secret.hex(), repr(secret), str(list(secret))[1:-1]):
            assert shown not in published
    else:
        assert saved.noise_secret is None  # the noise is the clients' alone
