"""A round's life as data: the statuses it passes through, the table of what moves it
from one to the next, and its plan.

A plan is the list of phases devices take part in. Each phase names the message kinds
it accepts, its own deadline, its close rule (given how many messages it holds and
whether its deadline has passed: wait, enough, or too few) and who may take part: the
round's cohort, or the survivors of the previous phase. The round driver's step is:
look up the round's phase, ask its close rule, and apply the transition the verdict
names (``outcome`` then ``next_status``); no other code decides what follows what.

FedAvg is a one-phase plan (devices upload their updates; the round closes on its
target, or at its deadline with its minimum). Secure aggregation's four phases
(advertise keys, share keys, masked upload, unmask) are another plan of the same kind.
Everything here is pure: the store keeps a round's status and phase, ``coordinator.rounds``
writes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from edgefl.config import RunConfig
from edgefl.protocol import RoundStatus


class Phase(StrEnum):
    COLLECT = "collect"  # FedAvg's one phase: selected devices upload their updates


class MessageKind(StrEnum):
    UPDATE = "update"  # a device's weight delta (POST /v1/rounds/{id}/updates)


class Participants(StrEnum):
    COHORT = "cohort"  # the devices selected into the round
    SURVIVORS = "survivors"  # the devices that sent a message in the previous phase


class Verdict(StrEnum):
    """What a phase's close rule says of it now."""

    WAIT = "wait"  # keep collecting
    ENOUGH = "enough"  # the phase has what it needs
    TOO_FEW = "too_few"  # its deadline passed without what it needs


class Event(StrEnum):
    """What happens to a round; ``TRANSITIONS`` says where each leads."""

    NEXT_PHASE = "next_phase"  # a phase closed with enough, and another follows
    COLLECTED = "collected"  # the plan's last phase closed with enough: aggregate
    TOO_FEW = "too_few"  # a phase's deadline passed without enough
    COMMITTED = "committed"  # the new model is durable
    FAILED = "failed"  # its aggregate was refused (not finite, diverged) or closing it kept failing


TRANSITIONS: dict[tuple[RoundStatus, Event], RoundStatus] = {
    (RoundStatus.OPEN, Event.NEXT_PHASE): RoundStatus.OPEN,
    (RoundStatus.OPEN, Event.COLLECTED): RoundStatus.AGGREGATING,
    (RoundStatus.OPEN, Event.TOO_FEW): RoundStatus.ABANDONED,
    (RoundStatus.OPEN, Event.FAILED): RoundStatus.ABANDONED,
    (RoundStatus.AGGREGATING, Event.COMMITTED): RoundStatus.COMMITTED,
    (RoundStatus.AGGREGATING, Event.FAILED): RoundStatus.ABANDONED,
}
LIVE = (RoundStatus.OPEN, RoundStatus.AGGREGATING)  # a run has at most one live round
FINISHED = (RoundStatus.COMMITTED, RoundStatus.ABANDONED)


class IllegalTransition(RuntimeError):
    pass


def next_status(status: str, event: Event) -> RoundStatus:
    """Where ``event`` takes a round in ``status``; IllegalTransition if nowhere."""
    try:
        return TRANSITIONS[RoundStatus(status), event]
    except KeyError:
        raise IllegalTransition(f"a round that is {status} cannot take the event {event}") from None


CloseRule = Callable[[RunConfig, int, bool], Verdict]


def quorum(config: RunConfig, messages: int, past_deadline: bool) -> Verdict:
    """Enough at the target; at the deadline, enough with the minimum, else too few."""
    if messages >= config.target_reports:
        return Verdict.ENOUGH
    if past_deadline:
        return Verdict.ENOUGH if messages >= config.min_reports else Verdict.TOO_FEW
    return Verdict.WAIT


@dataclass(frozen=True)
class PhasePlan:
    phase: Phase
    accepts: frozenset[MessageKind]
    participants: Participants
    deadline_s: Callable[[RunConfig], float]  # from the phase's start
    close: CloseRule


@dataclass(frozen=True)
class RoundPlan:
    name: str
    phases: tuple[PhasePlan, ...]

    @property
    def first(self) -> PhasePlan:
        return self.phases[0]

    def phase(self, name: str | None) -> PhasePlan:
        """The plan's phase called ``name`` (a round stored without one is in the first)."""
        if not name:
            return self.first
        for phase in self.phases:
            if phase.phase == name:
                return phase
        raise ValueError(f"the {self.name} plan has no phase {name!r}")

    def after(self, phase: PhasePlan) -> PhasePlan | None:
        i = self.phases.index(phase)
        return self.phases[i + 1] if i + 1 < len(self.phases) else None

    def before(self, phase: PhasePlan) -> PhasePlan | None:
        i = self.phases.index(phase)
        return self.phases[i - 1] if i else None

    def outcome(self, phase: PhasePlan, verdict: Verdict) -> Event | None:
        """The event a phase's verdict makes of the round (None: nothing happens yet)."""
        if verdict == Verdict.WAIT:
            return None
        if verdict == Verdict.TOO_FEW:
            return Event.TOO_FEW
        return Event.NEXT_PHASE if self.after(phase) else Event.COLLECTED


FEDAVG = RoundPlan(
    "fedavg",
    (
        PhasePlan(
            Phase.COLLECT,
            accepts=frozenset({MessageKind.UPDATE}),
            participants=Participants.COHORT,
            deadline_s=lambda config: config.round_timeout_s,
            close=quorum,
        ),
    ),
)


def plan_for(config: RunConfig) -> RoundPlan:
    """The plan a run's rounds follow (every aggregator so far: FedAvg's)."""
    return FEDAVG
