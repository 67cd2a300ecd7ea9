"""The round lifecycle as data (coordinator.lifecycle): its transition table, FedAvg's
one-phase plan, and what a multi-phase plan's verdicts make of a round."""

from __future__ import annotations

import pytest

from coordinator.lifecycle import (
    FEDAVG,
    SECURE,
    TRANSITIONS,
    Event,
    IllegalTransition,
    MessageKind,
    Participants,
    Phase,
    PhasePlan,
    RoundPlan,
    Tally,
    Verdict,
    cohort_advertised,
    every_survivor,
    next_status,
    plan_for,
    quorum,
    target_of_survivors,
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
    assert quorum(config, Tally(messages, participants=5, first=messages), past_deadline) == expected
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


def test_the_secure_plan_is_secaggs_four_phases_each_taking_one_kind_from_the_last_ones_survivors():
    config = RunConfig(aggregator="secure", target_reports=10, min_reports=4, secagg_degree=4, secagg_threshold=3)
    assert plan_for(config) is SECURE and plan_for(RunConfig()) is FEDAVG
    assert [p.phase for p in SECURE.phases] == [Phase.ADVERTISE, Phase.SHARE, Phase.MASKED_INPUT, Phase.UNMASK]
    assert [set(p.accepts) for p in SECURE.phases] == [
        {k} for k in (MessageKind.KEYS, MessageKind.SHARES, MessageKind.MASKED, MessageKind.REVEAL)
    ]
    assert [p.close for p in SECURE.phases] == [cohort_advertised, every_survivor, target_of_survivors, every_survivor]
    assert SECURE.first.participants == Participants.COHORT
    assert all(p.participants == Participants.SURVIVORS for p in SECURE.phases[1:])
    # keys are agreed before training; the masked inputs come after it, by the round's deadline
    assert [p.deadline_s(config) for p in SECURE.phases] == [config.round_timeout_s, 30.0, config.round_timeout_s, 30.0]
    assert SECURE.reached("masked_input", Phase.SHARE) and not SECURE.reached("share_keys", Phase.MASKED_INPUT)


@pytest.mark.parametrize(
    ("messages", "participants", "past_deadline", "expected"),
    [
        (6, 6, False, Verdict.ENOUGH),  # every survivor of the previous phase
        (5, 6, False, Verdict.WAIT),
        (5, 6, True, Verdict.ENOUGH),
        (4, 6, True, Verdict.ENOUGH),  # the minimum (4) and the threshold (3)
        (3, 6, True, Verdict.TOO_FEW),  # the threshold, but below the minimum
    ],
)
def test_a_later_secagg_phase_waits_for_every_survivor_then_needs_the_minimum_and_threshold(
    messages, participants, past_deadline, expected
):
    config = RunConfig(aggregator="secure", target_reports=10, min_reports=4, secagg_degree=4, secagg_threshold=3)
    assert every_survivor(config, Tally(messages, participants, first=6), past_deadline) == expected


def test_the_threshold_can_exceed_the_minimum():
    config = RunConfig(aggregator="secure", target_reports=10, min_reports=3, secagg_degree=0, secagg_threshold=0)
    # 10 devices advertised: a complete graph (degree 9), threshold 5
    assert every_survivor(config, Tally(4, 6, first=10), True) == Verdict.TOO_FEW
    assert every_survivor(config, Tally(5, 6, first=10), True) == Verdict.ENOUGH


@pytest.mark.parametrize(
    ("messages", "selected", "past_deadline", "expected"),
    [
        (13, 13, False, Verdict.ENOUGH),  # the whole cohort (10 x 1.3)
        (10, 10, False, Verdict.ENOUGH),  # every device selected so far, at the target: a small fleet
        (10, 12, False, Verdict.WAIT),  # two selected devices have not advertised yet
        (9, 9, False, Verdict.WAIT),  # below the target
        (9, 12, True, Verdict.ENOUGH),  # at the deadline, the minimum
        (3, 12, True, Verdict.TOO_FEW),
    ],
)
def test_the_keys_phase_closes_on_the_cohort(messages, selected, past_deadline, expected):
    config = RunConfig(aggregator="secure", target_reports=10, min_reports=4, over_selection=1.3)
    assert cohort_advertised(config, Tally(messages, selected, first=messages), past_deadline) == expected


@pytest.mark.parametrize(
    ("messages", "shared", "past_deadline", "expected"),
    [
        (10, 13, False, Verdict.ENOUGH),  # the target: the 3 still training count as dropouts
        (8, 8, False, Verdict.ENOUGH),  # fewer shared keys than the target: all of them
        (9, 13, False, Verdict.WAIT),
        (9, 13, True, Verdict.ENOUGH),
        (3, 13, True, Verdict.TOO_FEW),
    ],
)
def test_masked_inputs_close_on_the_target_so_over_selection_works_as_in_fedavg(messages, shared, past_deadline, expected):
    config = RunConfig(aggregator="secure", target_reports=10, min_reports=4, over_selection=1.3)
    assert target_of_survivors(config, Tally(messages, shared, first=13), past_deadline) == expected
