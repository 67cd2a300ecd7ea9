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
(advertise keys, share keys, masked input, unmask) are another plan of the same kind.
Everything here is pure: the store keeps a round's status and phase, ``coordinator.rounds``
writes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from edgefl.config import RunConfig
from edgefl.protocol import RoundStatus
from edgefl.secagg import graph as secagg_graph


class Phase(StrEnum):
    COLLECT = "collect"  # FedAvg's one phase: selected devices upload their updates
    # SecAgg+'s four (edgefl.secagg.protocol), after the devices trained:
    ADVERTISE = "advertise_keys"
    SHARE = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"


class MessageKind(StrEnum):
    UPDATE = "update"  # a device's weight delta (POST /v1/rounds/{id}/updates)
    KEYS = "keys"  # POST /v1/rounds/{id}/secagg/keys
    SHARES = "shares"  # POST /v1/rounds/{id}/secagg/shares
    MASKED = "masked"  # POST /v1/rounds/{id}/secagg/masked
    REVEAL = "reveal"  # POST /v1/rounds/{id}/secagg/reveal


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


@dataclass(frozen=True)
class Tally:
    """What a close rule weighs: the phase's messages, how many participants may send
    one, and how many devices the round's first phase closed with."""

    messages: int
    participants: int
    first: int


CloseRule = Callable[[RunConfig, Tally, bool], Verdict]


def quorum(config: RunConfig, tally: Tally, past_deadline: bool) -> Verdict:
    """Enough at the target; at the deadline, enough with the minimum, else too few."""
    if tally.messages >= config.target_reports:
        return Verdict.ENOUGH
    if past_deadline:
        return Verdict.ENOUGH if tally.messages >= config.min_reports else Verdict.TOO_FEW
    return Verdict.WAIT


def _enough_to_go_on(config: RunConfig, tally: Tally) -> Verdict:
    """At a SecAgg+ phase's deadline: enough with the round's minimum and a threshold
    the round's neighbour graph allows, else too few (the round is abandoned before
    anything is unmasked)."""
    try:
        _, threshold = secagg_graph.round_shape(tally.first or tally.messages, config.secagg_degree, config.secagg_threshold)
    except ValueError:  # too few devices for any graph
        return Verdict.TOO_FEW
    return Verdict.ENOUGH if tally.messages >= max(config.min_reports, threshold) else Verdict.TOO_FEW


def cohort_advertised(config: RunConfig, tally: Tally, past_deadline: bool) -> Verdict:
    """SecAgg+'s first phase, as the cohort is selected: enough once the whole cohort
    has advertised keys, or once every device selected so far has and they reach the
    target (a fleet smaller than the cohort); at the deadline, enough to go on."""
    everyone_so_far = tally.messages >= tally.participants and tally.messages >= config.target_reports
    if tally.messages >= config.cohort_size or everyone_so_far:
        return Verdict.ENOUGH
    return _enough_to_go_on(config, tally) if past_deadline else Verdict.WAIT


def every_survivor(config: RunConfig, tally: Tally, past_deadline: bool) -> Verdict:
    """A SecAgg+ phase that needs everyone: enough once every survivor of the previous
    phase has sent; at the deadline, enough to go on."""
    if tally.messages >= tally.participants:
        return Verdict.ENOUGH
    return _enough_to_go_on(config, tally) if past_deadline else Verdict.WAIT


def target_of_survivors(config: RunConfig, tally: Tally, past_deadline: bool) -> Verdict:
    """SecAgg+'s masked inputs, which come as devices finish training: enough at the
    target (over-selection's slack: the devices still training are dropouts, whose
    masks the others' shares remove), or once every survivor has sent; at the round's
    deadline, enough to go on."""
    if tally.messages >= min(config.target_reports, tally.participants):
        return Verdict.ENOUGH
    return _enough_to_go_on(config, tally) if past_deadline else Verdict.WAIT


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

    def reached(self, current: str | None, phase: Phase) -> bool:
        """Whether a round in phase ``current`` of this plan has reached ``phase``."""
        names = [p.phase for p in self.phases]
        return self.phase(current).phase in names[names.index(phase) :]

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


def _secagg_phase(phase: Phase, kind: MessageKind, close: CloseRule, deadline_s=lambda c: c.secagg_phase_timeout_s) -> PhasePlan:
    participants = Participants.COHORT if phase == Phase.ADVERTISE else Participants.SURVIVORS
    return PhasePlan(phase, accepts=frozenset({kind}), participants=participants, deadline_s=deadline_s, close=close)


# As in Google's production protocol, the keys are agreed while the cohort is selected,
# before training: the masked inputs then come as devices finish training, like
# FedAvg's updates, and over-selection works as it does there. Only each phase's
# senders take part in the next. The keys phase has the round's deadline (a device may
# first need its checkpoint or training file), and closes as soon as the cohort is in.
SECURE = RoundPlan(
    "secagg+",
    (
        _secagg_phase(Phase.ADVERTISE, MessageKind.KEYS, cohort_advertised, lambda c: c.round_timeout_s),
        _secagg_phase(Phase.SHARE, MessageKind.SHARES, every_survivor),
        _secagg_phase(Phase.MASKED_INPUT, MessageKind.MASKED, target_of_survivors, lambda c: c.round_timeout_s),
        _secagg_phase(Phase.UNMASK, MessageKind.REVEAL, every_survivor),
    ),
)


def plan_for(config: RunConfig) -> RoundPlan:
    """The plan a run's rounds follow: SecAgg+'s for ``secure``, FedAvg's otherwise."""
    return SECURE if config.aggregator == "secure" else FEDAVG
