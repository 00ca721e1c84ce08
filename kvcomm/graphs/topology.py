"""Who speaks when, and whom each speaker hears: the topologies of an agent graph as steps.

Agents ``0..n-1`` each hold one piece of an item's context. A topology unrolls into an ordered list
of :class:`Step` (agent, round, the earlier turns it hears); the last step's reply is the graph's
answer. Spatial edges join turns of the same round (run in order), temporal edges turns of the
previous round, as in KVCOMM's GPTSwarm-style graphs:

- ``chain``: ``j`` hears ``j-1``; from round 2 on, agent 0 hears the last agent's previous turn.
  The last agent of the last round answers (a relay).
- ``star``: every agent reads its piece alone (fan-out); a decision agent hears them all (fan-in).
- ``full``: ``j`` hears every earlier agent of its round and, from round 2 on, every other
  agent's previous turn (not its own); a decision agent hears the last round.
- ``debate``: round 1, every agent alone; later rounds, every agent hears every agent's previous
  turn (its own too); a decision agent hears the last round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from kvcomm.errors import ConfigError

TopologyName = Literal["chain", "star", "full", "debate"]
"""Who hears whom, as :func:`unroll` lays it out (the module's docstring says each): ``chain`` (a
relay), ``star`` (fan-out and a decision agent's fan-in), ``full``, ``debate``."""
TOPOLOGIES: tuple[str, ...] = get_args(TopologyName)
DECISION = -1  # the agent index of a decision agent (holds no piece, hears, answers)


@dataclass(frozen=True)
class Turn:
    """A turn's address: ``agent`` (``DECISION`` for the decision agent) in ``round`` (from 0)."""

    agent: int
    round: int


@dataclass(frozen=True)
class Step:
    """One turn to take: who speaks, in which round, and the earlier turns it hears, in order."""

    turn: Turn
    hears: tuple[Turn, ...]

    @property
    def agent(self) -> int:
        return self.turn.agent


def unroll(topology: str, agents: int, rounds: int = 1) -> list[Step]:
    """The steps of ``topology`` with ``agents`` piece-holding agents over ``rounds`` rounds.

    Raises:
        ConfigError: an unknown topology, fewer than 1 agent or round, a graph too small to
            have edges, or a star of more than one round.
    """
    if topology not in TOPOLOGIES:
        raise ConfigError(f"unknown topology {topology!r}; valid: {', '.join(TOPOLOGIES)}")
    if agents < 1 or rounds < 1:
        raise ConfigError(f"a graph needs at least 1 agent and 1 round, got {agents} agents, {rounds} rounds")
    if topology == "chain" and agents * rounds < 2:
        raise ConfigError("a chain needs at least 2 turns (2 agents, or 2 rounds)")
    if topology == "star" and rounds > 1:  # its agents hear no one: a later round repeats the first, unheard
        raise ConfigError(f"a star has one round (its agents read alone and the decision agent hears them once), not "
                          f"{rounds}; for rounds use full or debate")
    steps: list[Step] = []
    for r in range(rounds):
        for j in range(agents):
            steps.append(Step(Turn(j, r), _hears(topology, j, r, agents)))
    if topology != "chain":
        last = rounds - 1
        steps.append(Step(Turn(DECISION, last), tuple(Turn(j, last) for j in range(agents))))
    return steps


def _hears(topology: str, j: int, r: int, agents: int) -> tuple[Turn, ...]:
    previous = tuple(Turn(i, r - 1) for i in range(agents)) if r else ()
    if topology == "chain":
        if j:
            return (Turn(j - 1, r),)
        return (Turn(agents - 1, r - 1),) if r else ()
    if topology == "star":
        return ()  # every round reads alone; the decision agent fans in
    if topology == "full":
        return tuple(t for t in previous if t.agent != j) + tuple(Turn(i, r) for i in range(j))
    return previous  # debate
