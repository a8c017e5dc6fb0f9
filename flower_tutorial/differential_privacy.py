"""flower_tutorial: differential privacy: clipping, noise only its owner can draw, ε.

Central DP wraps the strategy in Flower's client-side clipping wrappers; local DP
clips and noises each update on its client. The app's versions differ from
Flower's where Flower's do not hold (docs/privacy.md names each upstream defect):

- the noise comes from randomness its owner alone holds: the server's secret
  (`ServerNoise`) or the client's OS, never NumPy's global generator, which the
  app seeds from the public `seed` for reproducible shuffling;
- adaptive clipping moves the norm toward its target quantile, and the noise is
  made for the norm that the clients clipped to;
- local DP's noise is made for a sensitivity of twice the clipping norm.

`PrivacyLedger` counts, with Flower's RDP accountant, the noise actually added.
Nothing here imports PyTorch (the ClientApp's mods are defined here).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
from flwr.app.message_type import MessageType
from flwr.client.mod import LocalDpMod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Context,
    Message,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import (
    KEY_NORM_BIT,
    compute_clip_model_update,
    compute_stdv,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from flower_tutorial.config import PrivacySettings, clipped_count_stddev

SECRET_BYTES = 32


def add_gaussian_noise(
    arrays: NDArrays, std: float, rng: np.random.Generator
) -> NDArrays:
    """Return `arrays` plus N(0, std^2) noise drawn from `rng`, in their dtypes."""
    return [a + rng.normal(0.0, std, a.shape).astype(a.dtype) for a in arrays]


class ServerNoise:
    """Gaussian noise from a secret that only the server holds.

    The secret is drawn from the OS's entropy when a run starts and kept in the
    run's checkpoint (mode 0600), so that a resumed run draws what the
    uninterrupted one would. Each round's update noise and count noise come
    from a stream of their own, seeded by SHA-256 of the secret and the round:
    one round's noise says nothing of another's.
    """

    UPDATE, COUNT = "update", "count"

    def __init__(self, secret: bytes | None = None) -> None:
        self.secret = secrets.token_bytes(SECRET_BYTES) if secret is None else secret

    def generator(self, server_round: int, purpose: str) -> np.random.Generator:
        """Return the generator of `purpose`'s noise in `server_round`."""
        digest = hashlib.sha256(
            self.secret + f"{purpose} {server_round}".encode()
        ).digest()
        return np.random.default_rng(int.from_bytes(digest, "little"))


class Release(Protocol):
    """The Gaussian mechanisms a round releases, as noise multipliers.

    A multiplier is the noise's standard deviation over the sensitivity of what
    it hides; the ledger composes them.
    """

    def planned_release(self) -> list[float]:
        """Return the multipliers the next round will add, before it runs."""

    def last_release(self) -> list[float]:
        """Return the multipliers the last aggregation added (none if it added none)."""


class _SecretNoise:
    """The central wrappers' noise: per round's clients, from the server's secret.

    Flower's wrappers take a fixed `num_sampled_clients`, but how many a round
    samples depends on how many SuperNodes are connected; and they draw from
    NumPy's global generator.
    """

    noise: ServerNoise
    noise_multiplier: float
    num_sampled_clients: int
    clipping_norm: float
    _added: list[float]
    _sent_norm: float

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        """Ask the wrapped strategy; note how many clients, and the norm they get."""
        instructions = super().configure_fit(  # type: ignore[misc]
            server_round, parameters, client_manager
        )
        self.num_sampled_clients = max(len(instructions), 1)
        self._sent_norm = self.clipping_norm
        return instructions

    def _use(self, noise: ServerNoise) -> None:
        """Draw the noise from `noise`; until a round samples, clip to C as given."""
        self.noise = noise
        self._sent_norm = self.clipping_norm
        self._added = []

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, Any]],
        failures: list[Any],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Average the clipped updates and noise the mean; none after a failure."""
        self._added = []
        if failures:
            return None, {}
        aggregated, metrics = self.strategy.aggregate_fit(  # type: ignore[attr-defined]
            server_round, results, []
        )
        if aggregated is None:
            return None, metrics
        noised = self._noised(aggregated, server_round)
        self._after_the_noise(results, server_round)
        return noised, metrics

    def _after_the_noise(
        self, results: list[tuple[ClientProxy, Any]], server_round: int
    ) -> None:
        """Finish the round once its noise is drawn (adaptive clipping moves C)."""

    def _noised(self, aggregated: Parameters, server_round: int) -> Parameters:
        """Add the mean's noise: z * C / m, C the norm this round's clients used."""
        std = compute_stdv(
            self.noise_multiplier, self._sent_norm, self.num_sampled_clients
        )
        rng = self.noise.generator(server_round, ServerNoise.UPDATE)
        arrays = add_gaussian_noise(parameters_to_ndarrays(aggregated), std, rng)
        # The sensitivity of a mean over m clipped updates is C / m.
        self._added = [std / (self._sent_norm / self.num_sampled_clients)]
        return ndarrays_to_parameters(arrays)

    def last_release(self) -> list[float]:
        """Return the multipliers the last aggregation added."""
        return self._added


class FixedClipping(_SecretNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's central DP with client-side fixed clipping, the server's noise."""

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        noise: ServerNoise,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self._use(noise)

    def planned_release(self) -> list[float]:
        """Return the update's multiplier: dp-noise-multiplier."""
        return [self.noise_multiplier]


class AdaptiveClipping(_SecretNoise, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's central DP with client-side adaptive clipping, done as published.

    Andrew et al. (arXiv:1905.03871) move the norm C toward the quantile that
    leaves `target_clipped_quantile` of the updates unclipped: C is multiplied
    by exp(-lr * (unclipped fraction - target)). Flower's norm bit says "was
    clipped", and Flower uses it as if it said "was not", so C runs away from
    the target. The fraction is noised as a count of (bit - 1/2), whose
    sensitivity of 1/2 is what Flower's split of the noise multiplier between
    the count and the update assumes (Flower noises the count of bits, whose
    sensitivity is 1). The update's noise is made for the C the clients clipped
    to, before it moves (Flower uses the moved one).
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        num_sampled_clients: int,
        noise: ServerNoise,
        **adaptive: Any,
    ) -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, **adaptive)
        self._use(noise)

    def _after_the_noise(
        self, results: list[tuple[ClientProxy, Any]], server_round: int
    ) -> None:
        """Move C toward the target quantile, from the noised count of the unclipped.

        Every result has a boolean norm bit (CheckedStrategy leaves out those
        without one).
        """
        m = self.num_sampled_clients
        unclipped = sum(not res.metrics[KEY_NORM_BIT] for _, res in results)
        rng = self.noise.generator(server_round, ServerNoise.COUNT)
        noised_count = unclipped - m / 2 + rng.normal(0.0, self.clipped_count_stddev)
        unclipped_fraction = noised_count / m + 1 / 2
        self.clipping_norm *= math.exp(
            -self.clip_norm_lr * (unclipped_fraction - self.target_clipped_quantile)
        )
        self._added.append(self._count_multiplier())

    def _count_multiplier(self) -> float:
        """Return the count's noise over its sensitivity, 1/2."""
        return self.clipped_count_stddev / (1 / 2)

    def planned_release(self) -> list[float]:
        """Return the update's and the count's multipliers."""
        return [self.noise_multiplier, self._count_multiplier()]


def with_central_dp(
    strategy: Strategy,
    privacy: PrivacySettings,
    min_fit_clients: int,
    noise: ServerNoise,
) -> FixedClipping | AdaptiveClipping:
    """Wrap `strategy` in the central-DP wrapper that `privacy.dp` names.

    Each round notes how many clients it sampled; until then, and for adaptive
    clipping's split of the noise between the update and the count of unclipped
    updates (`clipped_count_stddev`), the wrapper expects `min_fit_clients`, the
    fewest a round trains.
    """
    z = privacy.dp_noise_multiplier
    if privacy.dp == "central-fixed":
        return FixedClipping(
            strategy, z, privacy.dp_clipping_norm, min_fit_clients, noise
        )
    return AdaptiveClipping(
        strategy,
        z,
        min_fit_clients,
        noise,
        initial_clipping_norm=privacy.dp_clipping_norm,
        target_clipped_quantile=privacy.dp_target_clipped_quantile,
        clip_norm_lr=privacy.dp_clip_norm_lr,
        clipped_count_stddev=clipped_count_stddev(min_fit_clients),
    )


def local_noise_multiplier(privacy: PrivacySettings) -> float:
    """Return local DP's noise over its sensitivity: sqrt(2 ln(1.25 / delta)) / epsilon.

    The Gaussian mechanism's calibration for `dp-local-epsilon` and `dp-delta`.
    """
    return math.sqrt(2 * math.log(1.25 / privacy.dp_delta)) / privacy.dp_local_epsilon


class LocalDp(LocalDpMod):
    """Flower's local DP mod, for the sensitivity of a replaced update, OS noise.

    Two updates clipped to C can be 2C apart: replacing an organization's whole
    data can move its update that far, so the noise is made for a sensitivity of
    2C (Flower's docs pass C). The noise comes from fresh OS entropy: NumPy's
    global generator, which Flower's mod draws from, was just seeded from the
    public `seed` for the client's shuffling.
    """

    def __init__(self, clipping_norm: float, epsilon: float, delta: float) -> None:
        super().__init__(clipping_norm, 2 * clipping_norm, epsilon, delta)

    @property
    def noise_std(self) -> float:
        """Return the noise's standard deviation on every weight."""
        return (
            self.sensitivity
            * math.sqrt(2 * math.log(1.25 / self.delta))
            / (self.epsilon)
        )

    def __call__(
        self, msg: Message, ctxt: Context, call_next: ClientAppCallable
    ) -> Message:
        """Clip the client's update to C and noise it, as Flower's mod does."""
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        sent = compat.recorddict_to_fitins(msg.content, keep_input=True).parameters
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        arrays = parameters_to_ndarrays(res.parameters)
        compute_clip_model_update(
            arrays, parameters_to_ndarrays(sent), self.clipping_norm
        )
        noised = add_gaussian_noise(arrays, self.noise_std, np.random.default_rng())
        res.parameters = ndarrays_to_parameters(noised)
        reply.content = compat.fitres_to_recorddict(res, keep_input=True)
        return reply


class LocalRelease:
    """What a round of local DP releases: each client's noised update."""

    def __init__(self, privacy: PrivacySettings) -> None:
        self._multiplier = local_noise_multiplier(privacy)

    def planned_release(self) -> list[float]:
        """Return the clients' multiplier, the same every round."""
        return [self._multiplier]

    def last_release(self) -> list[float]:
        """Return the clients' multiplier: the mod adds it on every client."""
        return [self._multiplier]


def withhold_client_values(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Under DP, let only what the analysis covers leave the client.

    That is the clipped (and, with local DP, noised) update, and adaptive
    clipping's norm bit, which its count noise covers. The update counts as one
    example: FedAvg would weigh by the organization's size, which no noise hides.
    Its metrics are dropped, and an evaluation is refused, unless the run opts in
    with `dp-client-metrics` (then their values are outside epsilon).
    """
    privacy = PrivacySettings.from_run_config(context.run_config)
    kind = msg.metadata.message_type
    if kind == MessageType.EVALUATE and not privacy.dp_client_metrics:
        raise PermissionError(
            f"refused to evaluate under dp = {privacy.dp!r}: its loss and accuracy "
            "would leave this client without noise (dp-client-metrics = true "
            "allows it, outside epsilon)"
        )
    reply = call_next(msg, context)
    if kind != MessageType.TRAIN or reply.has_error():
        return reply
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    metrics = res.metrics if privacy.dp_client_metrics else {}
    reply.content = compat.fitres_to_recorddict(
        replace(res, num_examples=1, metrics=metrics), keep_input=True
    )
    return reply


class PrivacyLedger:
    """The privacy spent so far, counted by Flower's RDP accountant.

    Every round composes the Gaussian mechanisms its `release` added: the
    server's noise on the mean of the clipped updates (and on adaptive clipping's
    count), or each client's noise on its own update. No amplification by
    sampling is claimed: the count holds however the clients were chosen, which
    makes it an upper bound when only some of them train each round. Without
    sampling, the RDP of a Gaussian mechanism depends only on its multiplier, so
    local DP's replace-one relation (sensitivity 2C, in its multiplier) is counted
    by the same accountant.
    """

    def __init__(self, privacy: PrivacySettings, release: Release) -> None:
        self.delta = privacy.dp_delta
        self.max_epsilon = privacy.dp_max_epsilon
        self.release = release
        self._accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=privacy.dp_delta,
                population_size=1,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )

    @property
    def epsilon(self) -> float:
        """Return ε at the run's δ, for the rounds spent so far (0 before any)."""
        return self._accountant.get_epsilon(self.delta)

    def would_exceed(self) -> bool:
        """Tell whether one more round would take ε past `dp-max-epsilon`."""
        if math.isinf(self.max_epsilon):
            return False
        projected = RdpAccountant(self._accountant.config)
        projected.load_state_dict(self.state_dict())
        for multiplier in self.release.planned_release():
            projected.compose(_event(multiplier))
        return projected.get_epsilon(self.delta) > self.max_epsilon

    def spend(self) -> float:
        """Count what the last round released; return ε so far."""
        for multiplier in self.release.last_release():
            self._accountant.compose(_event(multiplier))
        return self.epsilon

    def state_dict(self) -> dict[str, object]:
        """Return the accountant's state, to resume a run with it."""
        return self._accountant.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the accountant's state saved by `state_dict`."""
        self._accountant.load_state_dict(state)


def _event(noise_multiplier: float) -> GaussianPrivacyEvent:
    # Without amplification the sample sizes are not used: one of one.
    return GaussianPrivacyEvent(noise_multiplier, 1, 1)
