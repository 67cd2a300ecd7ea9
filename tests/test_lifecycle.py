"""The round lifecycle as data (coordinator.lifecycle): its transition table, FedAvg's
one-phase plan, and what a multi-phase plan's verdicts make of a round."""

from __future__ import annotations

import pytest

from coordinator.lifecycle import (
    FEDAVG,
    TRANSITIONS,
    Event,
    IllegalTransition,
    MessageKind,
    Participants,
    Phase,
    PhasePlan,
    RoundPlan,
    Verdict,
    next_status,
    quorum,
)
from edgefl.config import RunConfig
from edgefl.protocol import RoundStatus


def test_every_status_and_event_pair_either_has_a_transition_or_is_refused():
    for status in RoundStatus:
        for event in Event:
            if (status, event) in TRANSITIONS:
                assert next_status(status, event) == TRANSITIONS[status, event]
            else:
                with pytest.raises(IllegalTransition, match=f"{status}.*{event}"):
                    next_status(status, event)
    # Finished rounds are final.
    assert not [key for key in TRANSITIONS if key[0] in (RoundStatus.COMMITTED, RoundStatus.ABANDONED)]


@pytest.mark.parametrize(
    ("messages", "past_deadline", "expected"),
    [(4, False, Verdict.ENOUGH), (3, False, Verdict.WAIT), (3, True, Verdict.ENOUGH), (1, True, Verdict.TOO_FEW)],
)
def test_fedavgs_close_rule_is_its_target_then_its_minimum_at_the_deadline(messages, past_deadline, expected):
    config = RunConfig(target_reports=4, min_reports=2)
    assert quorum(config, messages, past_deadline) == expected
    event = FEDAVG.outcome(FEDAVG.first, expected)
    assert event == {Verdict.ENOUGH: Event.COLLECTED, Verdict.TOO_FEW: Event.TOO_FEW, Verdict.WAIT: None}[expected]


def test_a_multi_phase_plan_moves_on_phase_by_phase_and_aggregates_after_its_last():
    def phase(name: Phase, participants: Participants) -> PhasePlan:
        return PhasePlan(name, frozenset({MessageKind.UPDATE}), participants, lambda c: c.round_timeout_s, quorum)

    first, second = phase(Phase.COLLECT, Participants.COHORT), phase("second", Participants.SURVIVORS)  # type: ignore[arg-type]
    plan = RoundPlan("two", (first, second))
    assert plan.phase(None) is first and plan.phase("second") is second
    assert plan.after(first) is second and plan.after(second) is None and plan.before(second) is first
    assert plan.outcome(first, Verdict.ENOUGH) == Event.NEXT_PHASE
    assert next_status(RoundStatus.OPEN, Event.NEXT_PHASE) == RoundStatus.OPEN
    assert plan.outcome(second, Verdict.ENOUGH) == Event.COLLECTED
    assert plan.outcome(second, Verdict.TOO_FEW) == Event.TOO_FEW
