"""flower_tutorial: the client's side of the run's privacy settings, as one mod.

The run config chooses; `privacy_mod` puts the mods of secure aggregation
(secure_aggregation.py) and differential privacy (differential_privacy.py) in
place, in the order their guarantees need. What each protects, against whom:
docs/threat-model.md.
"""

from __future__ import annotations

from typing import Any

from flwr.client.mod import adaptiveclipping_mod, fixedclipping_mod, secaggplus_mod
from flwr.client.mod.utils import make_ffn
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Message

from flower_tutorial.config import PrivacySettings
from flower_tutorial.differential_privacy import LocalDp, withhold_client_values
from flower_tutorial.secure_aggregation import (
    refuse_an_unmaskable_update,
    refuse_unmasking_a_live_client,
    use_secure_masks,
)


def privacy_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Apply the client's side of the run's privacy settings, as Flower's mods.

    Mods are fixed when the ClientApp is made, before a run config exists; this
    one reads the run's settings from each message's context. A reply passes the
    mods from the last to the first: the client's values are withheld, its update
    clipped (and noised, with local DP), then checked and masked by SecAgg+.
    """
    privacy = PrivacySettings.from_run_config(context.run_config)
    mods: list[Any] = []
    if privacy.secure_aggregation:
        use_secure_masks()
        mods += [refuse_unmasking_a_live_client, secaggplus_mod]
        mods.append(refuse_an_unmaskable_update)
    if privacy.dp == "central-fixed":
        mods.append(fixedclipping_mod)
    elif privacy.dp == "central-adaptive":
        mods.append(adaptiveclipping_mod)
    elif privacy.dp == "local":
        mods.append(
            LocalDp(
                privacy.dp_clipping_norm, privacy.dp_local_epsilon, privacy.dp_delta
            )
        )
    if privacy.dp != "none":
        mods.append(withhold_client_values)
    return make_ffn(call_next, mods)(msg, context)
