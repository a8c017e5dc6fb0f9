"""flower_tutorial: a strategy wrapper: checks client results, records each round.

`CheckedStrategy` wraps any strategy of Flower's (FedAvg here; FedProx, FedAdam and
the other FedAvg-family strategies alike) the way Flower's differential-privacy
wrappers do, and can itself be wrapped by them. It only uses the strategy methods
that every Flower loop calls, so the same checks and the same history come out of
the legacy Server (`server_fn`) and of `DefaultWorkflow`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from logging import INFO, WARNING
from typing import Any, TypeVar

from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from flower_tutorial import checkpoint
from flower_tutorial.aggregation import ROBUST_RULES, robust_combination
from flower_tutorial.checks import (
    FIT_METRICS,
    check_evaluation,
    check_fit_report,
    check_secure_aggregate,
    check_update,
    cut,
)
from flower_tutorial.client_manager import SeededClientManager
from flower_tutorial.config import PrivacySettings, trimmed
from flower_tutorial.differential_privacy import PrivacyLedger, ServerNoise
from flower_tutorial.recording import RunRecorder
from flower_tutorial.secure_aggregation import SecAggClientError

Res = TypeVar("Res", FitRes, EvaluateRes)
Failure = tuple[ClientProxy, FitRes | EvaluateRes] | BaseException


class CheckedStrategy(Strategy):
    """Leaves unsound client results out, combines the rest in partition order.

    An update with the wrong arrays, shapes or dtypes, non-finite values or no
    examples is left out like a client that failed, and the history says which
    and why; the round goes on with the rest. When every client of a round failed,
    the run ends with the first error: Flower's strategies would skip the round and
    carry on, so a setting that breaks every client (a wrong dataset path, say)
    would run all rounds and report nothing. Results reach the wrapped strategy in
    partition order, which keeps its sums, and so the run, bit-identical. With a
    robust `aggregation` rule, every sound update is replaced by their robust
    combination before the wrapped strategy averages them, so the rule composes
    with server-side optimizers (FedAdam, ...) and client metrics still average.
    Every round is recorded through `recorder`. `privacy` says which of the
    app's privacy rules apply (docs/threat-model.md); `ledger` counts epsilon and
    `noise` holds the server's noise secret, which checkpoints keep.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        client_manager: SeededClientManager,
        recorder: RunRecorder,
        aggregation: str = "fedavg",
        trim_fraction: float = 0.2,
        krum_byzantine: int = 1,
        privacy: PrivacySettings | None = None,
        ledger: PrivacyLedger | None = None,
        noise: ServerNoise | None = None,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.client_manager = client_manager
        self.recorder = recorder
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.krum_byzantine = krum_byzantine
        self.privacy = privacy
        self.ledger = ledger
        self.noise = noise
        self.central_dp = bool(privacy and privacy.central_dp)
        self.secure_aggregation = bool(privacy and privacy.secure_aggregation)
        # What the clients send besides their updates, and what may be recorded.
        self.client_metrics = privacy is None or privacy.client_metrics
        self._fit_metrics = FIT_METRICS if self.client_metrics else {}
        self._norm_bit = bool(privacy and privacy.dp == "central-adaptive")
        self._log_privacy()
        self.first_round = 0  # the initial model's evaluation; later when resuming
        self.last_round = recorder.num_rounds  # earlier, if the privacy budget ends
        self._sent: NDArrays = []  # the global model sent out for training
        self._asked = 0  # clients asked to train this round
        self._unsampled: list[str] = []  # nodes left out of this round's sample
        self._evaluate_unsampled: list[str] = []  # ...and of its evaluation
        self._global: Parameters | None = None  # the model after this round

    def _log_privacy(self) -> None:
        """Say what the run's privacy settings change in what is checked and kept."""
        if self.secure_aggregation:
            log(
                INFO,
                "Secure aggregation: the server sees only the example-weighted mean "
                "of the updates, so the per-update checks apply to that aggregate; "
                "counts and metrics are still checked per client.",
            )
        if self.privacy and self.privacy.dp != "none":
            if self.client_metrics:
                log(
                    WARNING,
                    "dp-client-metrics = true: the clients' metrics (training loss, "
                    "validation loss and accuracy) leave them without noise, and "
                    "epsilon does not cover them.",
                )
            else:
                log(
                    INFO,
                    "Differential privacy: clients send no metrics and count as one "
                    "example each; no federated evaluation, and no per-organization "
                    "value in history.json.",
                )

    def __repr__(self) -> str:
        """Name the wrapped strategy too."""
        return f"CheckedStrategy({self.strategy!r}, aggregation={self.aggregation!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Start round 0 (the initial model's evaluation) with the inner strategy's."""
        if not self._done(0):
            self.recorder.start_round(0)
        return self.strategy.initialize_parameters(client_manager)

    def _done(self, server_round: int) -> bool:
        """Whether `server_round` is not this run's to run.

        Done before a resumed run's first round (Flower's loops always start
        from round 0), or after the last round the privacy budget allows.
        """
        return not self.first_round <= server_round <= self.last_round

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Start the round; keep the model sent out: updates are checked against it.

        A round after the last (the privacy budget is spent) asks no client.
        """
        if self._done(server_round):
            return []
        if self.ledger and self.ledger.would_exceed():
            self._stop_at_the_budget(server_round, parameters)
            return []
        self.recorder.start_round(server_round)
        self._sent = parameters_to_ndarrays(parameters)
        instructions = self.strategy.configure_fit(
            server_round, parameters, client_manager
        )
        self._asked = len(instructions)
        self._unsampled = self.client_manager.unsampled()
        if instructions and KEY_CLIPPING_NORM in instructions[0][1].config:
            # Public: the DP wrapper sends it to every client it asks.
            norm = instructions[0][1].config[KEY_CLIPPING_NORM]
            self.recorder.record(server_round, clipping_norm=norm)
        self.recorder.record_federation(
            self.client_manager.num_partitions,
            list(self.client_manager.unidentified.values()),
        )
        return instructions

    def _stop_at_the_budget(self, server_round: int, parameters: Parameters) -> None:
        """End the run before the round that would spend more than dp-max-epsilon."""
        self.last_round = server_round - 1
        log(
            WARNING,
            "Round %s would take epsilon past dp-max-epsilon = %s (at delta = %s); "
            "the run ends after round %s, epsilon = %.3f.",
            server_round,
            self.ledger.max_epsilon,
            self.ledger.delta,
            self.last_round,
            self.ledger.epsilon,
        )
        self.recorder.stop_early(
            self.last_round, parameters, "the next would pass dp-max-epsilon"
        )

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Combine the sound updates; record the others with their reasons."""
        good, refused = self._sort_out("fit", server_round, results, self._check_fit)
        # A client that failed only at unmasking: its update is in the sum.
        summed = [f for f in failures if isinstance(f, SecAggClientError) and f.summed]
        reasons = self._failed("fit", server_round, _without(failures, summed))
        reasons += refused
        # Never asked (they could not say who they are): no part of the round.
        self.recorder.record(
            server_round,
            fit_clients=len(good),
            fit_failures=self._unsampled + reasons,
        )
        if summed:
            self.recorder.record(
                server_round,
                fit_unmasking_failures=[self._describe(f) for f in summed],
            )
        if self.client_metrics:
            named = list(zip(self._organizations(good), good, strict=True))
            self.recorder.record(
                server_round,
                fit_examples={name: res.num_examples for name, (_, res) in named},
                fit_train_loss={
                    name: res.metrics["train_loss"] for name, (_, res) in named
                },
            )
        self._end_if_none_left("fit", server_round, good, self._unsampled + reasons)
        if self.secure_aggregation:
            good = self._with_the_aggregate_as_sent(good)
        voided = self._why_void(good, reasons, refused)
        if voided:
            log(
                WARNING,
                "Round %s: no update, the model stays: %s",
                server_round,
                voided,
            )
            self.recorder.record(server_round, fit_voided=voided)
            return None, {}
        parameters, metrics = self.strategy.aggregate_fit(
            server_round, self._prepared(good), []
        )
        if parameters is not None:
            parameters = self._as_sent(parameters)
        self.recorder.record(server_round, train_loss=metrics.get("train_loss"))
        if self.ledger and parameters is not None:
            self.recorder.record(server_round, epsilon=self.ledger.spend())
        return parameters, metrics

    def _check_fit(self, res: FitRes) -> str | None:
        """Return why a training result is left out, or None.

        Under secure aggregation every result carries the same aggregate: only
        its count and metrics are the client's own.
        """
        if self.secure_aggregation:
            return check_fit_report(res, self._fit_metrics, self._norm_bit)
        return check_update(res, self._sent, self._fit_metrics, self._norm_bit)

    def _with_the_aggregate_as_sent(
        self, good: list[tuple[ClientProxy, FitRes]]
    ) -> list[tuple[ClientProxy, FitRes]]:
        """Give every result SecAgg+'s aggregate, converted once to the model's dtypes.

        Every result carries Flower's example-weighted mean, in float64. One that
        cannot be converted (unreadable, or too few or too many arrays) stays as
        it came, for `_why_void` to say what is wrong with it.
        """
        aggregate = good[0][1].parameters
        with suppress(Exception):  # whatever bytes came, they must not end the run
            aggregate = self._as_sent(aggregate)
        return [(proxy, replace(res, parameters=aggregate)) for proxy, res in good]

    def _why_void(
        self, good: list, reasons: list[str], refused: list[str]
    ) -> str | None:
        """Return why this round must change nothing, or None."""
        if self.central_dp and reasons:
            # The noise is calibrated to a mean over every client asked; a mean
            # over fewer would reveal more than the noise hides.
            return "central DP needs every client asked, and some were left out"
        if self.aggregation == "trimmed-mean" and not trimmed(
            self.trim_fraction, len(good)
        ):
            # Flower's trimmed mean would cut nothing: the plain mean, which one
            # poisoned update moves as far as it likes.
            return (
                f"the trimmed mean of {len(good)} sound update(s) trims none at "
                f"trim-fraction = {self.trim_fraction:g}: too few to resist a "
                "poisoned one"
            )
        if not self.secure_aggregation:
            return None
        if refused:
            # SecAgg+ summed every masked update before any report was checked.
            return (
                f"the secure sum includes {len(refused)} update(s) whose report was "
                f"refused (the first: {refused[0]})"
            )
        unsound = check_secure_aggregate(
            good[0][1].parameters, self._sent, self.privacy.secagg_clipping_range
        )
        return unsound and f"the secure aggregate is unsound: {unsound}"

    def _prepared(self, good: list[tuple[ClientProxy, FitRes]]) -> list:
        """Return the sound results as the wrapped strategy is to average them."""
        if self.central_dp:
            # Each clipped update weighs the same: a count of examples would
            # scale it past the clipping norm that the noise is made for.
            good = [(proxy, replace(res, num_examples=1)) for proxy, res in good]
        if not self.client_metrics:
            # A client that sends metrics anyway: they would reach history.json.
            good = [
                (proxy, replace(res, metrics=_dp_covered(res))) for proxy, res in good
            ]
        if self.aggregation in ROBUST_RULES:
            combined = ndarrays_to_parameters(
                robust_combination(
                    self.aggregation,
                    [res for _, res in good],
                    self.trim_fraction,
                    self.krum_byzantine,
                )
            )
            good = [(proxy, replace(res, parameters=combined)) for proxy, res in good]
        return good

    def record_halted_fit(
        self, server_round: int, failures: list[SecAggClientError]
    ) -> None:
        """Record a round whose secure sum was never unmasked: it changes nothing.

        SecAgg+ halts a round (and never calls aggregate_fit) when too few
        clients, or too few of their shares, are left for its threshold
        (`SecureFitWorkflow` calls this then). When every client asked failed
        before its update was summed, the run ends, as in any round.
        """
        summed = [f for f in failures if f.summed]
        reasons = self._failed("fit", server_round, _without(failures, summed))
        why = (
            f"secure aggregation halted before the sum was unmasked: "
            f"{len(reasons)} of the {self._asked} clients asked failed before "
            f"their update was summed, {len(summed)} at unmasking (fit_failures "
            "says why); too few were left for secagg-reconstruction-threshold"
        )
        self.recorder.record(
            server_round, fit_clients=0, fit_failures=self._unsampled + reasons
        )
        if len(reasons) >= self._asked:
            self._end_if_none_left("fit", server_round, [], self._unsampled + reasons)
        log(WARNING, "Round %s: no update, the model stays: %s", server_round, why)
        self.recorder.record(server_round, fit_voided=why)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Evaluate centrally (if the inner strategy does) and record the result."""
        if self._done(server_round):  # a resumed run has round 0 on record
            return None
        res = self.strategy.evaluate(server_round, parameters)
        if res is not None:
            loss, metrics = res
            self.recorder.record(
                server_round,
                centralized_loss=loss,
                centralized_accuracy=metrics.get("accuracy"),
            )
        if server_round == 0:  # all that round 0 does
            self.recorder.end_round(0, parameters)
        return res

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Ask clients to evaluate; without any (fraction-evaluate 0) the round ends."""
        if self._done(server_round):
            return []
        self._global = parameters
        instructions = []
        if self.client_metrics:  # under DP an evaluation leaves a client un-noised
            instructions = self.strategy.configure_evaluate(
                server_round, parameters, client_manager
            )
        self._evaluate_unsampled = self.client_manager.unsampled()
        if not instructions:  # Flower's loops then skip aggregate_evaluate
            self.recorder.end_round(server_round, parameters, self._resume_state())
        return instructions

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Average the sound losses and metrics, record the others; end the round."""
        good, refused = self._sort_out(
            "evaluate", server_round, results, check_evaluation
        )
        failed = self._failed("evaluate", server_round, failures)
        reasons = [*self._evaluate_unsampled, *failed, *refused]
        self.recorder.record(
            server_round, evaluate_clients=len(good), evaluate_failures=reasons
        )
        if self.client_metrics:  # each organization's own, not only their mean
            named = list(zip(self._organizations(good), good, strict=True))
            self.recorder.record(
                server_round,
                evaluate_loss={name: res.loss for name, (_, res) in named},
                evaluate_accuracy={
                    name: res.metrics["accuracy"] for name, (_, res) in named
                },
            )
        self._end_if_none_left("evaluate", server_round, good, reasons)
        loss, metrics = self.strategy.aggregate_evaluate(server_round, good, [])
        self.recorder.record(
            server_round,
            distributed_loss=loss,
            distributed_accuracy=metrics.get("accuracy"),
        )
        self.recorder.end_round(server_round, self._global, self._resume_state())
        return loss, metrics

    def _resume_state(self) -> dict[str, Any]:
        """Return what the rounds to come depend on, besides model and history."""
        numpy_rng, python_rng = checkpoint.random_states()
        return {
            "strategy": checkpoint.strategy_state(self.strategy),
            "privacy": self.ledger.state_dict() if self.ledger else None,
            "sampler": self.client_manager.sampler_state(),
            "numpy_rng": numpy_rng,
            "python_rng": python_rng,
            "noise_secret": self.noise.secret if self.noise else None,
        }

    def resume(self, saved: checkpoint.Checkpoint) -> None:
        """Go on after the checkpoint's round, with every state it saved.

        Every state is checked first (`checkpoint.check_restorable`): a refused
        checkpoint changes nothing.
        """
        checkpoint.check_restorable(
            saved,
            self.recorder.run_dir,
            self.strategy,
            accountant=self.ledger is not None,
            noise_secret=self.noise is not None,
        )
        self.first_round = saved.server_round + 1
        self.recorder.restore(saved.history, saved.server_round)
        checkpoint.restore_strategy_state(self.strategy, saved.strategy)
        if self.ledger:
            self.ledger.load_state_dict(saved.privacy)
        self.client_manager.restore_sampler(saved.sampler)
        checkpoint.restore_random_states(saved.numpy_rng, saved.python_rng)

    def _sort_out(
        self,
        stage: str,
        server_round: int,
        results: list[tuple[ClientProxy, Res]],
        check: Callable[[Res], str | None],
    ) -> tuple[list[tuple[ClientProxy, Res]], list[str]]:
        """Split results into sound ones, in partition order, and reasons for the rest.

        Results arrive in completion order; summing in a fixed order keeps the
        average bit-identical between runs.
        """
        good, refused = [], []
        for proxy, res in sorted(results, key=lambda r: self._order(r[0])):
            reason = check(res)
            if reason is None:
                good.append((proxy, res))
            else:
                refused.append(f"partition {self._name(proxy)}: {reason}")
                _log_left_out(stage, server_round, refused[-1])
        return good, refused

    def _end_if_none_left(
        self, stage: str, server_round: int, good: list, reasons: list[str]
    ) -> None:
        """End the run when every client failed: averaging nothing would carry on."""
        if reasons and not good:
            self.recorder.write_history()
            raise RuntimeError(
                f"All {len(reasons)} clients failed in round {server_round} "
                f"({stage}); the first said: {reasons[0]}"
            )

    def _as_sent(self, parameters: Parameters) -> Parameters:
        """Return `parameters` in the dtypes of the model sent out.

        Server-side optimizers (FedAdam and kin) compute in float64; the model,
        its clients and the checks of the next round stay in the model's own.
        """
        arrays = parameters_to_ndarrays(parameters)
        return ndarrays_to_parameters(
            [
                a.astype(s.dtype, copy=False)
                for a, s in zip(arrays, self._sent, strict=True)
            ]
        )

    def _order(self, proxy: ClientProxy) -> tuple[int, str]:
        partition_id = self.client_manager.partition_id(proxy.cid)
        return (-1 if partition_id is None else partition_id, proxy.cid)

    def _name(self, proxy: ClientProxy) -> str:
        partition_id = self.client_manager.partition_id(proxy.cid)
        return f"? (node {proxy.cid})" if partition_id is None else str(partition_id)

    def _failed(
        self, stage: str, server_round: int, failures: list[Failure]
    ) -> list[str]:
        """Return (and log) the reason of each client that failed."""
        reasons = [self._describe(f) for f in failures]
        for reason in reasons:
            _log_left_out(stage, server_round, reason)
        return reasons

    def _describe(self, failure: Failure) -> str:
        """Say why a client failed, in no more of its own words than `cut` allows.

        Under SecAgg+ each failure names its client's partition and its stage.
        """
        if isinstance(failure, SecAggClientError):
            proxy = self.client_manager.clients.get(str(failure.node_id))
            name = self._name(proxy) if proxy else f"? (node {failure.node_id})"
            return (
                f"partition {name}, SecAgg+ stage {failure.stage}: {cut(str(failure))}"
            )
        if isinstance(failure, BaseException):
            text = cut(f"{type(failure).__name__}: {failure}")
            # Flower's words for a message whose TTL (the round-timeout) ran out.
            if "expired due to its TTL" in text:
                return f"no reply within round-timeout ({text})"
            return text
        return cut(failure[1].status.message)

    def _organizations(self, good: list[tuple[ClientProxy, FitRes]]) -> list[str]:
        """Name each result by its partition (and node, if two share a partition)."""
        names: list[str] = []
        for proxy, _ in good:
            name = self._name(proxy)
            names.append(f"{name} (node {proxy.cid})" if name in names else name)
        return names


def _without(failures: list, these: list) -> list:
    """Return `failures` without the (identical) objects in `these`."""
    return [f for f in failures if not any(f is t for t in these)]


def _log_left_out(stage: str, server_round: int, reason: str) -> None:
    log(
        WARNING, "Round %s (%s): a client was left out: %s", server_round, stage, reason
    )


def _dp_covered(res: FitRes) -> dict[str, Scalar]:
    """Return the metrics of `res` that DP's analysis covers: the norm bit alone."""
    return {k: v for k, v in res.metrics.items() if k == KEY_NORM_BIT}
