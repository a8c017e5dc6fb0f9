"""flower_tutorial: secure aggregation and differential privacy, Flower's pieces wired.

The run config chooses; this module hands Flower's parts their settings: the
client's mods (`secaggplus_mod`, `fixedclipping_mod`, `adaptiveclipping_mod`,
`LocalDpMod`), the server's DP wrappers, SecAgg+'s workflow, and Flower's RDP
accountant, which counts the privacy spent. What each protects: docs/privacy.md.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from flwr.app.message_type import MessageType
from flwr.client.mod import (
    LocalDpMod,
    adaptiveclipping_mod,
    fixedclipping_mod,
    secaggplus_mod,
)
from flwr.client.mod.utils import make_ffn
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Message
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    Strategy,
)
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from flower_tutorial.config import (
    SECAGG_MODULUS,
    DataSettings,
    PrivacySettings,
    clipped_count_stddev,
)


def privacy_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Apply the client's side of the run's privacy settings, as Flower's mods.

    Mods are fixed when the ClientApp is made, before a run config exists; this
    one reads the run's settings from each message's context. Its update is
    clipped (and noised, with local DP) before SecAgg+ masks it.
    """
    privacy = PrivacySettings.from_run_config(context.run_config)
    mods: list[Any] = []
    if privacy.secure_aggregation:
        mods.append(secaggplus_mod)
        if privacy.central_dp:
            mods.append(weigh_as_one)
    if privacy.dp == "central-fixed":
        mods.append(fixedclipping_mod)
    elif privacy.dp == "central-adaptive":
        mods.append(adaptiveclipping_mod)
    elif privacy.dp == "local":
        norm = privacy.dp_clipping_norm
        # A clipped update moves by at most the clipping norm: its sensitivity.
        epsilon, delta = privacy.dp_local_epsilon, privacy.dp_delta
        mods.append(LocalDpMod(norm, norm, epsilon, delta))
    return make_ffn(call_next, mods)(msg, context)


def weigh_as_one(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Report one example for the update, as central DP weighs every client.

    SecAgg+ scales each update by its count of examples on the client, before
    masking it: the server, which counts each clipped update once, cannot undo
    that inside the masked sum. So under central DP each client counts as one.
    """
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    reply.content = compat.fitres_to_recorddict(
        replace(res, num_examples=1), keep_input=True
    )
    return reply


class _NoiseForTheSampled:
    """Calibrate a DP wrapper's noise to the clients of each round.

    Flower's wrappers take a fixed `num_sampled_clients`, but how many a round
    samples depends on how many SuperNodes are connected.
    """

    num_sampled_clients: int

    def configure_fit(
        self, server_round: int, parameters: Any, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        """Ask the wrapped strategy, then note how many clients it asked."""
        instructions = super().configure_fit(  # type: ignore[misc]
            server_round, parameters, client_manager
        )
        self.num_sampled_clients = max(len(instructions), 1)
        return instructions


class FixedClipping(_NoiseForTheSampled, DifferentialPrivacyClientSideFixedClipping):
    """Flower's central DP with client-side fixed clipping, noise per round."""


class AdaptiveClipping(
    _NoiseForTheSampled, DifferentialPrivacyClientSideAdaptiveClipping
):
    """Flower's central DP with client-side adaptive clipping, noise per round."""


def with_central_dp(
    strategy: Strategy, privacy: PrivacySettings, min_fit_clients: int
) -> Strategy:
    """Wrap `strategy` in Flower's central-DP wrapper that `privacy.dp` names.

    Each round notes how many clients it sampled (`_NoiseForTheSampled`); until
    then, and for adaptive clipping's split of the noise between the update and
    the count of clipped updates (`clipped_count_stddev`), the wrapper expects
    `min_fit_clients`, the fewest a round trains.
    """
    if privacy.dp == "central-fixed":
        return FixedClipping(
            strategy,
            privacy.dp_noise_multiplier,
            privacy.dp_clipping_norm,
            min_fit_clients,
        )
    return AdaptiveClipping(
        strategy,
        privacy.dp_noise_multiplier,
        min_fit_clients,
        initial_clipping_norm=privacy.dp_clipping_norm,
        target_clipped_quantile=privacy.dp_target_clipped_quantile,
        clip_norm_lr=privacy.dp_clip_norm_lr,
        clipped_count_stddev=clipped_count_stddev(min_fit_clients),
    )


def secure_fit_workflow(
    privacy: PrivacySettings, data: DataSettings
) -> SecAggPlusWorkflow:
    """Return SecAgg+'s fit workflow with the run's settings.

    SecAgg+ scales each update by examples / max_weight before masking, and
    anything above 1 can overflow: max_weight is the size of the train split,
    which no partition exceeds. Under central DP every client reports one
    example (`weigh_as_one`), and max_weight 1 leaves its update unscaled. The
    workflow's waits for replies end at round-timeout: the grid it is given
    ends them.
    """
    # Here, not at the top: data.py imports PyTorch, which the ClientApp's
    # privacy_mod, also defined here, does without (client_app.py says why).
    from flower_tutorial.data import train_split_size

    max_weight = 1 if privacy.central_dp else train_split_size(data)
    return SecAggPlusWorkflow(
        num_shares=privacy.secagg_num_shares,
        reconstruction_threshold=privacy.secagg_reconstruction_threshold,
        max_weight=max_weight,
        clipping_range=privacy.secagg_clipping_range,
        quantization_range=privacy.secagg_quantization_range,
        modulus_range=SECAGG_MODULUS,
    )


class PrivacyLedger:
    """The privacy spent so far, counted by Flower's RDP accountant.

    Every round releases one Gaussian mechanism: the server's noise on the mean
    of the clipped updates (central DP), or each client's noise on its own
    update (local DP). No amplification by sampling is claimed: the count holds
    however the clients were chosen, which makes it an upper bound when only
    some of them train each round.
    """

    def __init__(self, privacy: PrivacySettings) -> None:
        self.delta = privacy.dp_delta
        self.max_epsilon = privacy.dp_max_epsilon
        self.noise_multiplier = noise_multiplier(privacy)
        self._accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=privacy.dp_delta,
                population_size=1,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )

    def _event(self) -> GaussianPrivacyEvent:
        # Without amplification the sample sizes are not used: one of one.
        return GaussianPrivacyEvent(self.noise_multiplier, 1, 1)

    @property
    def epsilon(self) -> float:
        """Return ε at the run's δ, for the rounds spent so far (0 before any)."""
        return self._accountant.get_epsilon(self.delta)

    def would_exceed(self) -> bool:
        """Tell whether one more round would take ε past `dp-max-epsilon`."""
        if math.isinf(self.max_epsilon):
            return False
        return self._accountant.would_exceed(self._event(), self.max_epsilon)

    def spend(self) -> float:
        """Count one round's release; return ε so far."""
        self._accountant.compose(self._event())
        return self.epsilon

    def state_dict(self) -> dict[str, object]:
        """Return the accountant's state, to resume a run with it."""
        return self._accountant.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the accountant's state saved by `state_dict`."""
        self._accountant.load_state_dict(state)


def noise_multiplier(privacy: PrivacySettings) -> float:
    """Return the noise's standard deviation over the sensitivity, per round.

    Central DP: `dp-noise-multiplier`. Local DP: Flower's `LocalDpMod` adds
    Gaussian noise of sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon.
    """
    if privacy.dp == "local":
        return math.sqrt(2 * math.log(1.25 / privacy.dp_delta)) / (
            privacy.dp_local_epsilon
        )
    return privacy.dp_noise_multiplier
