"""The promotion gate: @champion moves only to a version that beats the champion (or, with none, the
best scored version still registered), promotions at the same time settle on the best of them, and
each decision is recorded on its version (`promotion.*` tags, shown and searchable in the MLflow UI)."""

from __future__ import annotations

import dataclasses
import getpass
import math
import os
import socket
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flows.config import RegistryConfig
from flows.errors import RegistrationError
from flows.registry import Scores, champion_version, require_gate, scores_of
from flows.steps import UNRECORDED_STEPS

RECORD_PREFIX = "promotion."  # a version's record of its last gate decision
PASSED_TAG = RECORD_PREFIX + "passed"  # on each version that ever passed: what concurrent promotions settle on
# Set-then-check rounds before giving up: a round moves @champion again only if another promotion moved
# it since, so a few promotions at once settle in a few rounds.
SETTLE_ROUNDS = 20
USER_VARIABLE = "MLFLOW_TRACKING_USERNAME"  # who promotes, on a server with auth (never the password)


@dataclasses.dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reason: str
    version: str
    previous_champion: str | None


@dataclasses.dataclass(frozen=True)
class Scored:
    """A version's value of the gate's metric, and its scores (with how they were measured)."""

    version: str
    value: float
    scores: Scores


@dataclasses.dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    compared: Scored | None  # the version the candidate was compared with, if any


def promote(registry: RegistryConfig, version: str | None = None) -> GateDecision:
    """Move @champion to `version` (default: the candidate) if it passes the gate, then settle with
    promotions running at the same time; record the decision on the version."""
    require_gate(registry)
    gate = Gate(registry, MlflowClient())
    version = str(
        version or gate.client.get_model_version_by_alias(registry.model_name, registry.candidate_alias).version
    )
    candidate = gate.scored(version)
    champion = champion_version(registry)
    if champion == version:
        return GateDecision(False, f"v{version} is already @{registry.champion_alias}", version, champion)
    verdict = gate.judge(candidate, champion)
    if not verdict.passed:
        gate.record_refusal(candidate, verdict, champion)
        return GateDecision(False, verdict.reason, version, champion)
    gate.record(candidate, "promoted", verdict, champion, passed=True)
    holder = gate.settle(candidate)
    if holder == version:
        return GateDecision(True, "promoted: " + verdict.reason, version, champion)
    outranked = (
        f"outranked: v{version} passed the gate ({verdict.reason}), but @{registry.champion_alias} settled on "
        f"v{holder}, {gate.describe(holder)}"
    )
    gate.record(candidate, "outranked", dataclasses.replace(verdict, reason=outranked), champion, passed=True)
    return GateDecision(False, outranked, version, champion)


@dataclasses.dataclass
class Gate:
    registry: RegistryConfig
    client: MlflowClient
    cache: dict[str, Scored | None] = dataclasses.field(default_factory=dict)  # versions' scores, read once

    def scored(self, version: str) -> Scored:
        """The version's score; an error if it has none the gate can compare."""
        scores = scores_of(self.client, self.registry.model_name, version)
        value = metric_of(scores, self.registry.model_name, version, self.registry.metric)
        scored = self.cache[version] = Scored(version, value, scores)
        return scored

    def scored_or_none(self, version: str) -> Scored | None:
        """The version's score, None if it has none (never evaluated, or not a finite value)."""
        if version not in self.cache:
            scores = scores_of(self.client, self.registry.model_name, version)
            value = scores.metrics.get(self.registry.metric, math.nan)
            self.cache[version] = Scored(version, value, scores) if math.isfinite(value) else None
        return self.cache[version]

    def rank(self, scored: Scored) -> tuple[float, int]:
        """Best first: by the metric, then the older version, as a tie is no improvement."""
        return (-scored.value if self.registry.greater_is_better else scored.value, int(scored.version))

    def beats(self, a: Scored, b: Scored) -> bool:
        return a.value > b.value if self.registry.greater_is_better else a.value < b.value

    def versions(self, passed_only: bool = False) -> list[Scored]:
        """Every scored version still registered (deleted ones are gone), or those that passed the gate."""
        found = self.client.search_model_versions(f"name = '{self.registry.model_name}'")
        chosen = [str(v.version) for v in found if not passed_only or PASSED_TAG in (v.tags or {})]
        return [s for v in chosen if (s := self.scored_or_none(v)) is not None]

    def describe(self, version: str) -> str:
        scored = self.cache.get(version)
        return f"{self.registry.metric}={scored.value:.6g}" if scored else "unscored"

    def judge(self, candidate: Scored, champion: str | None) -> Verdict:
        """Compare with the champion, or, with none (never promoted, or deleted by hand), with the best
        version still registered that was scored the same way."""
        metric, v = self.registry.metric, candidate.version
        direction = "higher" if self.registry.greater_is_better else "lower"
        if champion is not None:
            reference = self.scored(champion)
            if differ := measured_differently(candidate.scores, reference.scores):
                return Verdict(
                    False,
                    f"refused: v{v} and champion v{champion} were scored differently ({'; '.join(differ)}), so "
                    f"their {metric} do not compare; evaluate one with the other's settings",
                    reference,
                )
            if not self.beats(candidate, reference):
                return Verdict(
                    False,
                    f"refused: v{v} has {metric}={candidate.value:.6g}, champion v{champion} has "
                    f"{metric}={reference.value:.6g}; {direction} is better",
                    reference,
                )
            return Verdict(
                True,
                f"v{v} {metric}={candidate.value:.6g} beats champion v{champion} ({reference.value:.6g})",
                reference,
            )
        others = [s for s in self.versions() if s.version != v]
        comparable = [s for s in others if not measured_differently(candidate.scores, s.scores)]
        if not others:
            return Verdict(
                True, f"v{v} {metric}={candidate.value:.6g}; there was no champion and no other scored version", None
            )
        if not comparable:
            names = ", ".join(f"v{s.version}" for s in sorted(others, key=self.rank))
            return Verdict(
                False,
                f"refused: there is no champion, and the scored versions still registered ({names}) were scored "
                f"differently from v{v} ({'; '.join(measured_differently(candidate.scores, others[0].scores))}), "
                f"so their {metric} do not compare; evaluate v{v} with their settings, or set "
                f"@{self.registry.champion_alias} by hand to the version to compare with",
                None,
            )
        best = min(comparable, key=self.rank)
        if not self.beats(candidate, best):
            return Verdict(
                False,
                f"refused: there is no champion; v{v} has {metric}={candidate.value:.6g}, the best scored version "
                f"still registered, v{best.version}, has {metric}={best.value:.6g}; {direction} is better",
                best,
            )
        return Verdict(
            True,
            f"v{v} {metric}={candidate.value:.6g}; there was no champion, and it beats the best scored version "
            f"still registered, v{best.version} ({best.value:.6g})",
            best,
        )

    def settle(self, candidate: Scored) -> str:
        """Set-then-check, so that promotions at once (other users, other machines) end on the best: each
        round reads every version that passed (PASSED_TAG, written before this), then @champion, and
        moves it to the best of them and the holder, until a round finds it there. The last to move it
        checks after its move and every later passer checks too, so whoever moves it last, it ends on the
        best. Returns the version @champion holds at the end."""
        name, alias = self.registry.model_name, self.registry.champion_alias
        for _ in range(SETTLE_ROUNDS):
            passed = self.versions(passed_only=True)
            contenders = {s.version: s for s in passed if not measured_differently(candidate.scores, s.scores)}
            contenders[candidate.version] = candidate  # whether or not the search shows its tag yet
            holder = champion_version(self.registry)
            if holder is not None and holder not in contenders:
                current = self.scored(holder)
                if measured_differently(candidate.scores, current.scores):
                    return holder  # moved by hand to a version scored otherwise: not the gate's to undo
                contenders[holder] = current
            best = min(contenders.values(), key=self.rank).version
            if best == holder:
                return holder
            self.client.set_registered_model_alias(name, alias, best)
        raise RegistrationError(
            f"@{alias} of {name} did not settle in {SETTLE_ROUNDS} rounds: other promotions keep moving it. "
            f"v{candidate.version} passed the gate and says so ({PASSED_TAG}); rerun `python -m flows.promote "
            f"--version {candidate.version}` when they are done"
        )

    def record(self, candidate: Scored, decision: str, verdict: Verdict, champion: str | None, passed: bool) -> None:
        """The audit trail on the version: what was decided, on which values, against whom, when, by whom."""
        compared = verdict.compared
        tags = {
            "decision": decision,
            "reason": verdict.reason,
            "metric": self.registry.metric,
            "value": f"{candidate.value:.6g}",
            "compared_with": f"v{compared.version}" if compared else "none",
            "compared_value": f"{compared.value:.6g}" if compared else "none",
            "previous_champion": f"v{champion}" if champion else "none",
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "user": promoter(),
        }
        if passed:
            tags["passed"] = "true"  # last: a version is a contender only with its whole record
        for key, value in tags.items():
            self.client.set_model_version_tag(self.registry.model_name, candidate.version, RECORD_PREFIX + key, value)

    def record_refusal(self, candidate: Scored, verdict: Verdict, champion: str | None) -> None:
        """A refusal is recorded unless the version passed once: that record is its history, kept."""
        tags = self.client.get_model_version(self.registry.model_name, candidate.version).tags or {}
        if PASSED_TAG not in tags:
            self.record(candidate, "refused", verdict, champion, passed=False)


def metric_of(scores: Scores, name: str, version: str, metric: str) -> float:
    if metric not in scores.metrics:
        raise MlflowException(f"{name} v{version} has no metric {metric!r}; evaluate it first")
    value = scores.metrics[metric]
    if not math.isfinite(value):
        raise MlflowException(
            f"{name} v{version} has {metric}={value}; the gate compares finite values only: evaluate it again"
        )
    return value


def measured_differently(a: Scores, b: Scores) -> list[str]:
    """The settings two evaluations were measured with that differ (those both record); steps recorded
    as unrecorded differ from any, their own kind too."""
    return [
        f"{key} {a.measured[key]} vs {b.measured[key]}"
        for key in sorted(a.measured.keys() & b.measured.keys())
        if a.measured[key] != b.measured[key] or a.measured[key].endswith(UNRECORDED_STEPS)
    ]


def promoter() -> str:
    """Who promotes, for the record: the tracking server's user if one is set, else the OS user; and the host."""
    user = os.environ.get(USER_VARIABLE)
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry for the uid, e.g. in a container
            user = "unknown"
    return f"{user}@{socket.gethostname()}"
