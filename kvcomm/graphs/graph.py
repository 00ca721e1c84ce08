"""An agent graph over one model: agents that read their own piece, hear earlier turns as KV or as
text, and reply; the last turn's reply is the answer.

A turn sent ``via="kv"`` is, by default, the KV of the agent's reply tokens (``content="reply"``;
``"turn"``: its prompt and its reply, :func:`~kvcomm.protocol.reply.generate_turn`), moved to
start at position 0, cut to the edge's layers (sink token elsewhere) and, with a codec, put
through a real :class:`~kvcomm.wire.KVMessage` and back, whose size is the bytes counted. By
default a hearer reads it inline, where a text edge puts the words (``place="inline"``). Placed
as a prefix instead, an agent hearing several turns gets them joined in the order of its step's
``hears`` with consistent positions (:func:`~kvcomm.protocol.concat_shared`), and its own message
follows as the conversation's next user turn
(:meth:`~kvcomm.models.loading.LoadedModel.follow_up_ids`). With whole turns at every layer
placed as a prefix in process, an agent that hears every earlier turn computes exactly what it would
on the concatenated multi-turn chat (the tests check a chain of two and a full graph); where it
hears only some (the third agent of a chain hears the second, whose turn was computed after the
first's), the turn it hears keeps what its speaker heard only in its own KV. ``via="text"`` is
the natural-language baseline: an agent reads the replies it hears inside its own prompt.

One model copy serves every agent (roles differ by prompt and piece); items run in batches, and a
batch's answers equal those of one item at a time, up to float rounding: with ``blend``, a
rounding-level difference can move a near tie in the choice of tokens to recompute, and so an
answer.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Self

import torch
from pydantic import BaseModel, Field, field_validator, model_validator
from tqdm.auto import tqdm

from kvcomm.config import Options, listed
from kvcomm.errors import ConfigError, DataError, ProtocolError
from kvcomm.eval.results import Score, summarize
from kvcomm.graphs.anchors import Anchor, AnchorOptions, AnchorPool, Segment
from kvcomm.graphs.topology import DECISION, Step, Turn, unroll
from kvcomm.methods.base import WARM_TEXT
from kvcomm.models.loading import LoadedModel
from kvcomm.protocol import (
    MaskMode,
    ReceiverInput,
    SenderKV,
    SharedKV,
    concat_shared,
    empty_input,
    generate_turn,
    pad_left,
    prefill,
    prefill_shared,
    receiver_input,
    splice,
)
from kvcomm.protocol.blend import blend
from kvcomm.protocol.reply import outgoing, rebase
from kvcomm.selection.rules import check_layer_choice, format_layers, gaussian_prior, rank_layers, top_layers
from kvcomm.tasks.base import Item, Task
from kvcomm.tasks.metrics import contains, score_all
from kvcomm.tasks.relay import HOPS
from kvcomm.wire import KVMessage
from kvcomm.wire.codecs import CodecName
from kvcomm.wire.codecs.auto import encoded_on_demand

if TYPE_CHECKING:
    from kvcomm.agents import Agents
    from kvcomm.eval.cluster import Cluster

clock: Callable[[], float] = time.perf_counter
RESULTS_VERSION = 1
QUESTION = "\x00kvcomm-question\x00"  # where an agent's message is cut before its question (reuse)
ASKED = "\x00kvcomm-asked\x00"  # and after it, before the chat's closing


class EdgeOptions(Options):
    """How turns travel between agents.

    Attributes:
        via: ``kv`` (KV, placed as ``place`` says) or ``text`` (read inside the hearer's prompt).
        content: what travels: the speaker's ``reply`` (for KV: the reply tokens' KV, computed in
            the speaker's context) or its whole ``turn`` (its message and its reply; for KV placed
            inline, only from speakers that hear nothing, without reuse: see :class:`Graph`).
        place: where heard KV goes: ``inline``, inside the hearer's prompt where a text edge puts
            the words (after "Message from agent1:"; KVCOMM's placeholders), or ``prefix``, before
            the hearer's chat, its message then continuing the conversation the turns hold.
        blend: with ``inline``, recompute this fraction of the hearer's context tokens (its own
            and those heard) where the reused KV deviates most (CacheBlend, check layer 1): heard
            KV was computed in the speaker's context, never next to the hearer's words.
        ratio: fraction of layers sent in full, ranked by the depth prior (the paper's Gaussian,
            no calibration); with neither ratio nor layers, every layer.
        layers: the layers sent in full, explicitly.
        codec: what KV goes through on the wire (``fp16``, ``int8``, ``klt`` …); None: in process,
            and the bytes counted are the float tensors'.
        mode: the hearer's mask mode with ``prefix`` (``causal``, ``shift-back``; ``legacy`` is for
            parity runs); inline KV is always causal (the hearer's own first token is the sink).
    """

    what = "graph edge"
    via: Literal["kv", "text"] = "kv"
    content: Literal["reply", "turn"] = "reply"
    place: Literal["inline", "prefix"] = "inline"
    blend: float | None = Field(default=None, ge=0, le=1)
    ratio: float | None = Field(default=None, gt=0, le=1)
    layers: tuple[int, ...] | None = None
    codec: CodecName | None = "fp16"
    mode: MaskMode = "causal"

    @field_validator("layers")
    @classmethod
    def _layer_set(cls, layers: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """One spelling per set of layers (its label names the run: (1, 0) and (0, 1, 1) were other runs)."""
        return None if layers is None else tuple(sorted(set(layers)))

    @model_validator(mode="before")
    @classmethod
    def _no_codec_on_text(cls, data: Any) -> Any:
        """A text edge carries words: its codec is None (the default fp16 is a kv edge's)."""
        if isinstance(data, dict) and data.get("via") == "text":
            if data.get("codec", "fp16") not in (None, "fp16"):
                raise ValueError("a codec is for kv edges: a text edge carries words")
            data = data | {"codec": None}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        check_layer_choice(self.ratio, self.layers)
        if self.via == "text" and (self.ratio is not None or self.layers is not None or self.place != "inline"
                                   or self.mode != "causal"):
            raise ValueError("ratio, layers, place and mode are for kv edges: a text edge carries words")
        if self.blend is not None and (self.via != "kv" or self.place != "inline"):
            raise ValueError("blend recomputes heard KV placed inline: it needs via kv and place inline")
        if self.mode != "causal" and self.place == "inline":
            raise ValueError("a mask mode other than causal is for place prefix (inline KV uses the hearer's sinks)")
        return self

    @property
    def label(self) -> str:
        if self.via == "text":
            return "text" if self.content == "reply" else "text-turn"
        what = "all" if self.ratio is None and self.layers is None else \
            f"{self.ratio:g}" if self.ratio is not None else format_layers(list(self.layers or ()))
        codec = f"+{self.codec}" if self.codec else ""
        mode = "" if self.mode == "causal" else f"[{self.mode}]"
        place = "/prefix" if self.place == "prefix" else ""
        blend = "" if self.blend is None else f"~blend{self.blend:g}"
        return f"kv{'-turn' if self.content == 'turn' else ''}{place}@{what}{codec}{mode}{blend}"

    def chosen_layers(self, num_layers: int) -> list[int] | None:
        """The layers a kv edge sends in full (None for text)."""
        if self.via == "text":
            return None
        if self.layers is not None:
            if max(self.layers) >= num_layers:
                raise ConfigError(f"graph edge: layer {max(self.layers)} is out of range for a {num_layers}-layer "
                                  f"model (0..{num_layers - 1})")
            return sorted(set(self.layers))
        if self.ratio is None:
            return list(range(num_layers))
        return sorted(top_layers(rank_layers(gaussian_prior(num_layers).tolist()), self.ratio))


class AgentRow(BaseModel):
    """One step of the graph over all items: what it heard, sent and cost."""

    agent: str
    round: int
    hears: list[str]
    bytes_in: float  # per item: what the turns it heard weighed (messages, or reply text in UTF-8)
    bytes_out: float  # per item: what its turn weighs as sent (0 if nobody hears it)
    ttft_s: float  # per batch: from the step's start (messages joined) to its first token
    seconds: float  # all batches: the whole step (decoding and encoding its turn included)
    tokens: float  # per item: reply tokens generated
    hop_accuracy: float | None = None  # share of items whose reply names this agent's gold hop
    prompt_tokens: float = 0.0  # per item: the agent's context, heard KV included
    reused_tokens: float = 0.0  # per item: of those, tokens whose KV it took from elsewhere (heard, shared)
    recomputed_tokens: float = 0.0  # per item: context tokens blend recomputed in the agent's own context

    @property
    def reuse_rate(self) -> float:
        """The share of the agent's context whose KV it did not compute in its own context: the
        tokens taken from elsewhere less those blend recomputed (all counted against it, though
        some may be the agent's own: a lower bound)."""
        kept = max(self.reused_tokens - self.recomputed_tokens, 0.0)
        return kept / self.prompt_tokens if self.prompt_tokens else 0.0


class GraphItem(BaseModel):
    id: str
    answer: str
    gold: list[str]
    scores: dict[str, float]
    replies: list[str]  # every step's reply, in step order


class GraphRun(BaseModel):
    """One graph configuration over the test items."""

    label: str
    topology: str
    agents: int
    rounds: int
    edge: dict[str, Any]
    reuse: bool = False
    anchors: dict[str, Any] | None = None  # the anchor correction's options, when reuse used it
    anchored: float | None = None  # with anchors: share of the askings of shared questions (an item's question
    # at one step) reused with correction; the rest were computed in the agent's context (anchors' offsets)
    layers: list[int] | None
    n: int
    scores: dict[str, Score]
    seconds: float
    seconds_per_item: float
    bytes_per_item: float  # everything sent over every edge, per item
    steps: list[AgentRow]
    items: list[GraphItem]


class GraphReport(BaseModel):
    """What :func:`~kvcomm.graphs.compare.compare` and ``kvcomm graph`` report: the configuration, provenance and
    environment, and one :class:`GraphRun` per graph run (its score, bytes and per-agent rows)."""

    version: int = RESULTS_VERSION
    config: dict[str, Any]
    provenance: dict[str, Any] = {}
    environment: dict[str, str]
    runs: list[GraphRun]

    def save(self, path: Any) -> None:
        from kvcomm.files import atomic_write

        atomic_write(path, self.model_dump_json(indent=1) + "\n")


@dataclass
class _Sent:
    """What one turn sends onward, per row of a batch."""

    texts: list[str]  # what a text edge carries, per row (the reply, or the whole turn)
    shared: list[SharedKV] | None  # per row, after the wire (kv edges, when someone hears it)
    sizes: list[int]


def unmarked(message: str) -> str:
    """``message`` without the markers reuse cuts it at (what the agent was asked, as words)."""
    return message.replace(QUESTION, "").replace(ASKED, "")


def hop_turns(steps: Sequence[Step]) -> set[Turn]:
    """The turns asked their own hop of a relay: the first agent's, and those of an agent whose last
    heard turn (the "previous message" its hop's question points to) is the agent before it, itself
    asked its hop. A star's other agents hear no one; in a debate's later rounds an agent hears every
    agent of the round before, the last of them not the one before it (before, such a turn was
    asked about "the previous message", which held another agent's reply)."""
    asked: set[Turn] = set()
    for step in steps:  # in order: a heard turn was decided before
        last = step.hears[-1] if step.hears else None
        if step.agent == 0 or (last is not None and last.agent == step.agent - 1 and last in asked):
            asked.add(step.turn)
    return asked


def asked(item: Item, step: Step, agents: int, hops: set[Turn]) -> str:
    """What ``step``'s agent is asked: its own hop's question where the item has one per agent and
    the step is among ``hops`` (:func:`hop_turns`), else the item's question."""
    return item.asks[step.agent] if agents > 1 and len(item.asks) == agents and step.turn in hops else item.question


def shares_question(steps: Sequence[Step], agents: int, items: Sequence[Item]) -> bool:
    """Whether two of ``steps`` are asked the same question on some item: where none are (each agent
    of a relay chain is asked its own hop), reusing the question reuses nothing."""
    hops = hop_turns(steps)
    return any(len({asked(item, step, agents, hops) for step in steps}) < len(steps) for item in items)


def agent_name(agent: int) -> str:
    return "decision" if agent == DECISION else f"agent{agent + 1}"


def turn_name(turn: Turn) -> str:
    return f"{agent_name(turn.agent)}/r{turn.round + 1}"


def check_graph(steps: Sequence[Step], agents: int, edge: EdgeOptions | dict[str, Any] | None = None,
                reply_tokens: int | None = None, reuse: bool | AnchorOptions = False) -> EdgeOptions:
    """Refuses a graph that cannot run, before any model is needed (a command checks its whole grid
    before loading one): steps that hear what was not said, an agent out of range, a turn budget or
    reuse setting of the wrong kind, and edges that cannot do what they are asked. Returns the edge
    (a dict of its fields read as one; None: the default).

    Raises:
        ConfigError: naming what cannot run.
    """
    if not steps:
        raise ConfigError("a graph needs at least one step")
    if isinstance(agents, bool) or not isinstance(agents, int) or agents < 1:  # before: 0 or -5 ran, 2.5 a TypeError
        raise ConfigError(f"a graph's agents (those that hold a piece of the context) are a whole number >= 1, "
                          f"not {agents!r}")
    if isinstance(edge, dict):
        edge = EdgeOptions(**edge)  # its fields checked, a refusal one ConfigError
    elif edge is not None and not isinstance(edge, EdgeOptions):
        raise ConfigError(f"a graph's edge is an EdgeOptions (or a dict of its fields), not {type(edge).__name__}")
    edge = edge or EdgeOptions()
    seen: set[Turn] = set()
    for step in steps:
        if step.turn in seen:
            raise ConfigError(f"{turn_name(step.turn)} speaks twice: a turn is one step")
        if len(set(step.hears)) != len(step.hears):
            raise ConfigError(f"{turn_name(step.turn)} hears a turn twice")
        if missing := [turn_name(t) for t in step.hears if t not in seen]:
            raise ConfigError(f"{turn_name(step.turn)} hears {', '.join(missing)}, which has not spoken yet")
        if step.agent != DECISION and not 0 <= step.agent < agents:
            raise ConfigError(f"step {turn_name(step.turn)}: agent index out of range for {agents} agents")
        seen.add(step.turn)
    if reply_tokens is not None and (not isinstance(reply_tokens, int) or isinstance(reply_tokens, bool)
                                     or reply_tokens < 1):
        raise ConfigError(f"reply_tokens is the budget of a turn, a whole number at least 1, not {reply_tokens!r}")
    if not isinstance(reuse, bool | AnchorOptions):  # 0 or None would read as on where truthiness is not asked
        raise ConfigError(f"reuse is True, False or AnchorOptions, not {reuse!r}")
    if reuse and edge.via == "kv" and edge.place == "prefix":
        raise ConfigError("reuse places the shared question after each agent's own text: it needs text edges or "
                          "kv edges placed inline, not place prefix")
    heard = {t for step in steps for t in step.hears}
    if edge.via == "kv" and edge.content == "turn" and edge.place == "inline":
        # inline, an agent prefills its message around what it hears (and with reuse, after the
        # shared question's KV): its last forward, the turn's KV, would hold only what follows
        if reuse:
            raise ConfigError("whole turns as KV placed inline cannot reuse the question (the turn sent would "
                              "lack it): reuse off, or send replies (content reply)")
        if relays := [turn_name(s.turn) for s in steps if s.hears and s.turn in heard]:
            raise ConfigError(f"{relays[0]} hears turns inline and is heard: no one piece of KV holds its whole "
                              "turn; place whole turns as a prefix (place prefix), or send replies")
    return edge


class Graph:
    """Agents of one model taking the turns of ``steps``; every edge travels as ``edge`` says.

    Args:
        model: the one model every agent runs on.
        steps: the turns, in order (:func:`~kvcomm.graphs.topology.unroll` makes them from a topology).
        agents: how many agents hold a piece of each item's context (agent ``i`` reads piece ``i``);
            1: a single agent reads the whole context.
        edge: how turns travel (default: KV at every layer, fp16 on the wire).
        reply_tokens: the budget of every turn but the last (default: the task's answer budget).
        topology: a name for reports.
        reuse: reuse across agents (KVCOMM's shared input): the question closing each agent's
            prompt, where several agents are asked the same (the same text behind different
            prefixes), is prefilled once per item (behind the chat's opening, then moved to
            position 0) and placed after each agent's own text with re-rotated positions; each
            agent prefills the chat's closing after it. With the edges' ``blend`` the reused
            question is blended with the rest of each agent's context. Not with KV placed as a
            prefix (the question then continues the heard conversation). An
            :class:`~kvcomm.graphs.anchors.AnchorOptions` reuses with KVCOMM's anchor-based offset
            correction (and, by default, the chat's closing too): items that fail its shareability
            test are computed in every agent's context and become anchors, in item order, so
            answers depend on the batch size, and a run with anchors takes no cluster.
    """

    def __init__(self, model: LoadedModel, steps: Sequence[Step], agents: int, edge: EdgeOptions | None = None,
                 reply_tokens: int | None = None, topology: str = "custom",
                 reuse: bool | AnchorOptions = False) -> None:
        if not isinstance(model, LoadedModel):
            raise ConfigError(f"a graph's agents share one LoadedModel (kvcomm.load_model), not {type(model).__name__}")
        self.edge = check_graph(steps, agents, edge, reply_tokens, reuse)
        self.model, self.steps, self.agents = model, list(steps), agents
        self.reply_tokens, self.topology = reply_tokens, topology
        self.reuse, self.anchors = reuse is not False, reuse if isinstance(reuse, AnchorOptions) else None
        self._pool = AnchorPool(self.anchors) if self.anchors is not None else None
        self._anchored = [0, 0]  # askings of shared questions reused with correction, computed densely
        heard = {t for step in self.steps for t in step.hears}
        self._hops = hop_turns(self.steps)
        self.layers = self.edge.chosen_layers(model.num_layers)
        self._codec = None
        if self.edge.via == "kv" and self.edge.codec is not None:
            from kvcomm.wire.bootstrap import model_codebook

            self._codec = encoded_on_demand(self.edge.codec).bind(lambda: model_codebook(model))
        self._heard = heard

    @classmethod
    def build(cls, model: LoadedModel, topology: str, agents: int, rounds: int = 1, edge: EdgeOptions | None = None,
              reply_tokens: int | None = None, reuse: bool | AnchorOptions = False) -> Graph:
        """A graph of a named topology (``chain``, ``star``, ``full``, ``debate``).

        Raises:
            ConfigError: ``agents`` or ``rounds`` not a whole number, or ``edge`` not an
                :class:`EdgeOptions` (a dict of its fields is read as one).
        """
        for name, value in (("agents", agents), ("rounds", rounds)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} is a whole number, not {value!r}")
        return cls(model, unroll(topology, agents, rounds), agents, edge, reply_tokens, topology, reuse)

    @classmethod
    def single(cls, model: LoadedModel) -> Graph:
        """The reference: one agent reads the whole context and answers."""
        return cls(model, [Step(Turn(0, 0), ())], 1, EdgeOptions(via="text"), topology="single")

    @property
    def label(self) -> str:
        if self.topology == "single":
            return "single agent"
        rounds = 1 + max(s.turn.round for s in self.steps)
        reuse = "" if not self.reuse else " +reuse" + (f"/{self.anchors.label}" if self.anchors else "")
        return f"{self.topology}×{self.agents}" + (f"×{rounds}r" if rounds > 1 else "") + f" {self.edge.label}{reuse}"

    def message(self, task: Task, item: Item, step: Step, heard: Sequence[tuple[str, str]],
                mark_question: bool = False) -> str:
        """The user message of ``step`` for ``item``: the instruction, the agent's piece, the
        replies it hears as text (text edges), and what it is asked (between ``QUESTION`` and
        ``ASKED`` with ``mark_question``, to cut the message there: the space before it goes with it)."""
        parts = [f"Instruction: {task.instruction}"]
        if step.agent != DECISION:
            piece = item.context if self.agents == 1 else item.parts(self.agents)[step.agent]
            parts.append(f"Context: {piece}")
        parts += [f"Message from {name}: {reply}" for name, reply in heard]
        question = f" Question: {self.ask(item, step)}"
        return " ".join(parts) + (f"{QUESTION}{question}{ASKED}" if mark_question else question)

    def ask(self, item: Item, step: Step) -> str:
        """What ``step``'s agent is asked: :func:`asked`."""
        return asked(item, step, self.agents, self._hops)

    def shares_question(self, items: Sequence[Item]) -> bool:
        """Whether two steps are asked the same question on some item (what reuse reuses)."""
        return shares_question(self.steps, self.agents, items)

    def _reuses(self, batch: list[Item], step: Step) -> list[bool]:
        """Per row, whether ``step`` reuses the item's question: reuse is on and another step of the
        graph is asked the same (a question only one agent asks is computed in its context). Decided
        per item, so an item's answers do not depend on the others in its batch."""
        return [self.reuse and sum(self.ask(item, s) == self.ask(item, step) for s in self.steps) > 1
                for item in batch]

    def prompt_ids(self, step: Step, message: str) -> list[int]:
        """The tokens ``step`` prefills when what it hears is not placed inside its prompt: its
        message as a new chat, or, when it hears whole turns as a KV prefix, as the next user turn
        of the conversation those turns hold (so with every layer sent, it reads as one multi-turn
        chat)."""
        if self.edge.via == "kv" and self.edge.place == "prefix" and self.edge.content == "turn" and step.hears:
            return self.model.follow_up_ids(message)
        return self.model.encode_message(message)

    def run(self, task: Task, items: Sequence[Item], batch_size: int = 8, progress: bool = True,
            cluster: Cluster | None = None) -> GraphRun:
        """Runs every item through the graph, ``batch_size`` at a time; the last step's reply is
        scored with the task's metrics. With a ``cluster``, its workers run the batches (each on its
        own copy of the model) and the results are taken in order: the same replies and scores."""
        items = listed(items, "items")
        if not all(isinstance(item, Item) for item in items):
            raise ConfigError("a graph runs a list of items (task.items, or some of them)")
        if not items:
            raise ConfigError("a graph run needs at least one item")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"the batch size is a whole number at least 1, not {batch_size!r}")
        if cluster is not None and self.anchors is not None:
            raise ConfigError("anchor correction keeps one pool of anchors across a run's batches: run it without "
                              "a cluster")
        if cluster is not None:  # a graph's agents are one model: the workers must hold it
            model = self.model
            cluster.check_models((model.weights_digest,) * 2, model.dtype_name, model.linear)
        if self.anchors is not None:
            self._pool, self._anchored = AnchorPool(self.anchors), [0, 0]
        for item in items if self.agents > 1 else ():
            try:
                item.parts(self.agents)
            except DataError as err:  # before any work: which item cannot be split among the agents
                raise DataError(f"item {item.id}: {err}") from None
        if self.agents > 1 and (other := next((i for i in items if i.pieces and len(i.pieces) != self.agents), None)):
            hops = " and every agent is asked the item's question (no hop accuracy)" if other.asks else ""
            warnings.warn(f"item {other.id} comes in {len(other.pieces)} pieces of its own (a relay's hops, "
                          f"multihop's pieces) but the graph has {self.agents} agents: its context is split "
                          f"at sentence ends (or between words) instead{hops}. Make the task with as many pieces "
                          f"as agents, as kvcomm graph does (a relay has {HOPS[0]} to {HOPS[-1]} hops).", UserWarning,
                          stacklevel=2)
        if self.reuse and not self.shares_question(items):
            warnings.warn("reuse is on, but no two agents are asked the same question (each agent of a relay here "
                          "is asked its own hop): nothing is reused, and the run is the graph without reuse",
                          UserWarning, stacklevel=2)
        rows: list[GraphItem] = []
        tally = [_StepTally() for _ in self.steps]
        if self._codec is not None and cluster is None:  # one-off costs (compiled kernels, tables) are no item's
            ids = self.model.encode_message(WARM_TEXT)
            warm = prefill(self.model.model, *pad_left([ids], self.model.pad_id))
            self._send([warm], [len(ids) - 1])
        began = clock()
        bar = tqdm(total=len(items) * len(self.steps), desc=self.label, unit="turn", disable=not progress)
        batches = [list(items[start:start + batch_size]) for start in range(0, len(items), batch_size)]
        remote = None
        with bar:  # closed however the run ends
            if cluster is not None:
                job = _GraphJob(self.steps, self.agents, self.edge, self.reply_tokens, self.topology, self.reuse)
                remote = cluster.submit(task, job, [(index, batch, None) for index, batch in enumerate(batches)],
                                        bar.update)
            for index, batch in enumerate(batches):
                if remote is None:
                    replies = self._run_batch(task, batch, tally, bar)
                else:
                    replies, parts = remote.take(index)
                    for whole, part in zip(tally, parts):
                        whole.merge(part)
                for row, item in enumerate(batch):
                    answer = replies[-1][row]
                    rows.append(GraphItem(id=item.id, answer=answer, gold=list(item.answers),
                                          scores=score_all(answer, item.answers),
                                          replies=[r[row] for r in replies]))
        seconds = clock() - began
        n = len(items)
        steps = [t.row(step, n, self._hop_golds(items, step)) for t, step in zip(tally, self.steps)]
        return GraphRun(label=self.label, topology=self.topology, agents=self.agents,
                        rounds=1 + max(s.turn.round for s in self.steps), edge=self.edge.model_dump(mode="json"),
                        reuse=self.reuse, anchors=None if self.anchors is None else self.anchors.model_dump(),
                        anchored=None if self.anchors is None or not sum(self._anchored) else
                        self._anchored[0] / sum(self._anchored),
                        layers=self.layers, n=n, scores=summarize([r.scores for r in rows]), seconds=seconds,
                        seconds_per_item=seconds / n, bytes_per_item=sum(s.bytes_out * len(self._listeners(st))
                                                                         for s, st in zip(steps, self.steps)),
                        steps=steps, items=rows)

    def _listeners(self, step: Step) -> list[Step]:
        return [s for s in self.steps if step.turn in s.hears]

    def _hop_golds(self, items: Sequence[Item], step: Step) -> list[str] | None:
        if self.agents == 1 or step.turn not in self._hops or any(len(i.ask_answers) != self.agents for i in items):
            return None
        return [item.ask_answers[step.agent] for item in items]

    def _run_batch(self, task: Task, batch: list[Item], tally: list[_StepTally], bar: Any) -> list[list[str]]:
        model = self.model
        sent: dict[Turn, _Sent] = {}
        shared: dict[tuple[str, tuple[int, ...]], _Question] = {}  # reuse: each item's question, computed once
        replies: list[list[str]] = []
        for index, step in enumerate(self.steps):
            began = clock()
            heard = [sent[t] for t in step.hears]
            start = self._prompt(task, batch, index, heard, shared)
            assembled = clock() - began
            last = index == len(self.steps) - 1
            budget = task.max_new_tokens if last or self.reply_tokens is None else self.reply_tokens
            turn = generate_turn(model.model, start.cache, start.ids, start.valid, budget, model.stop_ids, model.pad_id)
            for row, anchor in start.dense:  # an anchor's offsets: the question and closing as computed here
                base = anchor.base
                dense = rebase(model.model, turn.kv[row].first(base.columns))
                anchor.offsets[index] = Segment.of(dense, base.length, base.tail).minus(base)
            texts_out = [model.decode(r) for r in turn.replies]
            carried = texts_out if self.edge.content == "reply" or self.edge.via == "kv" else [
                f"{unmarked(m)} Answer: {r}" for m, r in zip(start.messages, texts_out)]
            out = _Sent(carried, None, [0] * len(batch))
            if step.turn in self._heard:
                if self.edge.via == "kv":
                    out.shared, out.sizes = self._send(turn.kv, [len(reply) for reply in turn.replies])
                else:
                    out.sizes = [len(text.encode()) for text in carried]
            sent[step.turn] = out
            replies.append(texts_out)
            tally[index].add(assembled + turn.first_token_s, clock() - began, [len(r) for r in turn.replies],
                             sum(sum(h.sizes) for h in heard), sum(out.sizes), texts_out, start.context, start.reused,
                             start.recomputed)
            bar.update(len(batch))
        for question in shared.values():  # the questions computed densely become anchors, in item order
            if self._pool is not None and question.anchor is not None and question.anchor.offsets:
                self._pool.add(question.anchor)
        return replies

    def _prompt(self, task: Task, batch: list[Item], index: int, heard: list[_Sent],
                shared: dict[tuple[str, tuple[int, ...]], _Question]) -> _Start:
        """Where step ``index`` starts for each row: the cache of what it heard (as KV) and of the
        shared question (reuse), the tokens it prefills, its messages, and how many context tokens
        it has and took from elsewhere."""
        model, rows, step = self.model, range(len(batch)), self.steps[index]
        names = [agent_name(t.agent) for t in step.hears]
        reusing = self._reuses(batch, step)
        reuse, alone = any(reusing), {r for r in rows if not reusing[r]}
        if self.edge.via == "text" or not heard:
            messages = [self.message(task, item, step, [(n, h.texts[r]) for n, h in zip(names, heard)], reuse)
                        for r, item in enumerate(batch)]
            if not reuse:
                ids, valid = pad_left([self.prompt_ids(step, m) for m in messages], model.pad_id)
                return _Start(empty_input(model.model, len(batch)), ids, valid, messages, int(valid.sum()), 0)
            segments = [model.encode_message_parts(m, [QUESTION, ASKED]) for m in messages]
            mine = SharedKV.whole(prefill(model.model, *pad_left([s[0] for s in segments], model.pad_id)))
            pieces: list[list[SharedKV]] = [[mine.row(r)] for r in rows]
            return self._reusing(batch, index, segments, pieces, self.edge.blend, messages, shared, alone)
        if self.edge.place == "prefix":
            joined = [concat_shared(model.model, [h.shared[r] for h in heard]) for r in rows]  # type: ignore[index]
            messages = [self.message(task, item, step, []) for item in batch]
            ids, valid = pad_left([self.prompt_ids(step, m) for m in messages], model.pad_id)
            context = SharedKV.stack(joined)
            received = int(context.context_len.sum())
            return _Start(receiver_input(context), ids, valid, messages, received + int(valid.sum()), received)
        # inline: each heard turn's KV sits where text would, after "Message from …:"
        markers = [f"\x00kvcomm-heard-{i}\x00" for i in range(len(heard))]
        messages = [self.message(task, item, step, list(zip(names, markers)), reuse) for item in batch]
        segments = [model.encode_message_parts(m, markers + ([QUESTION, ASKED] if reuse else [])) for m in messages]
        # the hearer's own text before each heard turn, each computed after what precedes it (its own text
        # and the turns heard so far), as its whole prompt's prefill would (before, each alone from position 0)
        pieces = [[] for _ in rows]
        for i, turn_heard in enumerate(heard):
            ids, valid = pad_left([s[i] for s in segments], model.pad_id)
            if i == 0:
                whole = SharedKV.whole(prefill(model.model, ids, valid))
                texts = [whole.row(r) for r in rows]
            else:
                texts = continued(model, [splice(model.model, row) for row in pieces], ids, valid)
            for r in rows:
                pieces[r] += [texts[r], turn_heard.shared[r]]  # type: ignore[index]
        if reuse:
            if any(s[len(heard)] for s in segments):
                raise ProtocolError("reuse expects the question right after the last heard turn")
            return self._reusing(batch, index, [s[-2:] for s in segments], pieces, self.edge.blend, messages, shared,
                                 alone)
        context, recomputed = self._blended(SharedKV.stack([splice(model.model, row) for row in pieces]),
                                            self.edge.blend)
        ids, valid = pad_left([s[-1] for s in segments], model.pad_id)
        received = sum(int(p.context_len[0]) for row in pieces for p in row[1::2])  # the heard turns
        return _Start(receiver_input(context), ids, valid, messages, int(context.context_len.sum()) + int(valid.sum()),
                      received, recomputed=recomputed)

    def _reusing(self, batch: list[Item], index: int, segments: list[list[list[int]]], pieces: list[list[SharedKV]],
                 blending: float | None, messages: list[str],
                 shared: dict[tuple[str, tuple[int, ...]], _Question], alone: set[int]) -> _Start:
        """Each row's pieces followed by its item's question, computed once for every agent that
        asks it (``segments[r]``: the question, then the chat's closing); the agent prefills the
        closing itself, in its own context (where its answer starts to form). With anchors, the
        question (and the closing but its last token, which the agent prefills) is corrected by
        them, or, for an item that fails the shareability test, computed in the agent's context
        and recorded (``_Start.dense``). Rows in ``alone`` (a question no other step asks) compute
        theirs in the agent's context."""
        model, rows, anchors = self.model, range(len(batch)), self.anchors
        questions, closings = [s[-2] for s in segments], [s[-1] for s in segments]
        if not all(questions) or not all(closings):
            raise ProtocolError("reuse needs a question and a chat closing of at least one token each")
        keys = [(item.id, tuple(question)) for item, question in zip(batch, questions)]
        missing = list(dict.fromkeys(k for r, k in enumerate(keys) if k not in shared and r not in alone))
        if missing:  # behind the chat's opening (not its own position 0: no second sink), then moved to 0
            opening, tail = model.turn_opening(), closings[0] if anchors is not None else []
            kv = prefill_shared(model.model, [opening + list(k[1]) + tail for k in missing], model.pad_id)
            made = rebase(model.model, kv.last([len(k[1]) + len(tail) for k in missing]))
            for i, key in enumerate(missing):
                row = made.row(i)
                base = None if anchors is None else Segment.of(row, len(key[1]), tuple(tail))
                shared[key] = _Question(row, base, None if base is None else Anchor(base))
        context_rows, ids, dense = [], [], []

        def in_context(r: int) -> None:  # the question computed in the agent's own context
            context_rows.append(splice(model.model, pieces[r]))
            ids.append(questions[r] + closings[r])

        for r in rows:
            if r in alone:
                in_context(r)
                continue
            question = shared[keys[r]]
            if question.base is None:  # plain reuse
                context_rows.append(splice(model.model, [*pieces[r], SharedKV.whole(question.kv)]))
                ids.append(closings[r])
                continue
            if question.base.tail != tuple(closings[r]):
                raise ProtocolError("anchor correction expects every agent's chat closing to be the same tokens")
            assert self._pool is not None and anchors is not None and question.anchor is not None
            reused = self._pool.shareable(question.base, index)
            self._anchored[0 if reused else 1] += 1
            if not reused:  # computed here, in the agent's context: the anchor's offsets for this step
                in_context(r)
                dense.append((r, question.anchor))
                continue
            corrected = self._pool.correct(index, question.base)
            keep = len(questions[r]) + (len(closings[r]) - 1 if anchors.closing else 0)
            kv = replace(question.kv, keys=[k[None] for k in corrected.keys],
                         values=[v[None] for v in corrected.values])
            context_rows.append(splice(model.model, [*pieces[r], SharedKV.whole(kv.first(keep))]))
            ids.append(closings[r][-1:] if anchors.closing else closings[r])
        context, recomputed = self._blended(SharedKV.stack(context_rows), blending)
        padded, valid = pad_left(ids, model.pad_id)
        own = sum(int(p.context_len[0]) for r in rows for p in pieces[r][::2])  # the agent's own segments
        return _Start(receiver_input(context), padded, valid, messages,
                      int(context.context_len.sum()) + int(valid.sum()), int(context.context_len.sum()) - own, dense,
                      recomputed)

    def _blended(self, context: SharedKV, fraction: float | None) -> tuple[SharedKV, int]:
        """``context`` blended at ``fraction`` (None: as it is), and the tokens recomputed (all rows)."""
        if fraction is None:
            return context, 0
        blended, stats = blend(self.model.model, context, fraction)
        return blended, sum(stats.recomputed)

    def _send(self, kv: list[SenderKV], reply_tokens: list[int]) -> tuple[list[SharedKV], list[int]]:
        """Each row's turn as it arrives: its reply or whole turn, re-based to 0, cut to the edge's
        layers, through the wire."""
        model = self.model
        assert self.layers is not None
        shared, sizes = [], []
        for row, count in zip(kv, reply_tokens):
            piece = outgoing(model.model, row, count, self.edge.content, self.layers, self.edge.mode)
            if self._codec is not None:
                piece, size = KVMessage.round_trip(piece, model.fingerprint, model.fingerprint, self._codec,
                                                   model.dtype)
                sizes.append(size[0])
            else:
                sizes.append(int(piece.kv_bytes[0]))
            shared.append(piece)
        return shared, sizes


def continued(model: LoadedModel, before: Sequence[SharedKV], ids: torch.Tensor, valid: torch.Tensor) -> list[SharedKV]:
    """Each row's tokens ``ids`` (``[B, T]``, left-padded) prefilled on its cache ``before`` (what
    a prefill of the whole sequence computes for them, where ``before`` is that prefill's KV), moved
    to start at position 0: the pieces to splice after ``before``."""
    turn = generate_turn(model.model, receiver_input(SharedKV.stack(list(before))), ids, valid, 0, model.stop_ids,
                         model.pad_id)
    return [SharedKV.whole(rebase(model.model, kv)) for kv in turn.kv]


@dataclass
class _Start:
    """Where a step starts: the cache, the tokens to prefill, the messages, and context counts."""

    cache: ReceiverInput
    ids: torch.Tensor
    valid: torch.Tensor
    messages: list[str]
    context: int  # tokens in the agents' contexts (all rows), heard KV and the prefilled prompt included
    reused: int  # of those, tokens whose KV came from elsewhere (heard turns, a shared question)
    dense: list[tuple[int, Anchor]] = field(default_factory=list)  # rows computing an anchor's question
    recomputed: int = 0  # context tokens blend recomputed (all rows)


@dataclass
class _Question:
    """An item's shared question, prefilled once (reuse): its KV row in the position-0 frame (with
    anchors, the chat's closing after it) and, with anchors, that KV as a base to correct and the
    anchor it becomes where it fails the shareability test at a step (that agent computes it in its
    own context, and the anchor records the offsets there)."""

    kv: SenderKV
    base: Segment | None = None
    anchor: Anchor | None = None


@dataclass
class _StepTally:
    ttft: float = 0.0
    seconds: float = 0.0
    batches: int = 0
    tokens: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    replies: list[str] | None = None
    context: int = 0
    reused: int = 0
    recomputed: int = 0

    def add(self, ttft: float, seconds: float, tokens: list[int], bytes_in: int, bytes_out: int,
            replies: list[str], context: int = 0, reused: int = 0, recomputed: int = 0) -> None:
        self.ttft += ttft
        self.seconds += seconds
        self.batches += 1
        self.tokens += sum(tokens)
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.replies = (self.replies or []) + replies
        self.context += context
        self.reused += reused
        self.recomputed += recomputed

    def merge(self, other: _StepTally) -> None:
        """Adds the batches ``other`` counted (a worker's), after this one's."""
        self.ttft += other.ttft
        self.seconds += other.seconds
        self.batches += other.batches
        self.tokens += other.tokens
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.replies = (self.replies or []) + (other.replies or [])
        self.context += other.context
        self.reused += other.reused
        self.recomputed += other.recomputed

    def row(self, step: Step, n: int, golds: list[str] | None) -> AgentRow:
        hop = None
        if golds is not None and self.replies is not None:
            if not len(self.replies) == len(golds) == n:  # zip would drop what does not pair, n would not
                raise ProtocolError(f"{agent_name(step.agent)} has {len(self.replies)} replies and {len(golds)} "
                                    f"hop answers for {n} items")
            hop = sum(contains(r, [g]) for r, g in zip(self.replies, golds)) / n
        return AgentRow(agent=agent_name(step.agent), round=step.turn.round + 1,
                        hears=[turn_name(t) for t in step.hears],
                        bytes_in=self.bytes_in / n, bytes_out=self.bytes_out / n, ttft_s=self.ttft / self.batches,
                        seconds=self.seconds, tokens=self.tokens / n, hop_accuracy=hop, prompt_tokens=self.context / n,
                        reused_tokens=self.reused / n, recomputed_tokens=self.recomputed / n)


@dataclass
class _GraphJob:
    """What a cluster's worker does with a batch of a graph run: the same graph on its own copy of
    the model (the model itself never travels)."""

    steps: list[Step]
    agents: int
    edge: EdgeOptions
    reply_tokens: int | None
    topology: str
    reuse: bool | AnchorOptions = False

    def run_batch(self, agents: Agents, task: Task, items: list[Item],
                  extra: None) -> tuple[list[list[str]], list[_StepTally]]:
        graph = Graph(agents.sender, self.steps, self.agents, self.edge, self.reply_tokens, self.topology, self.reuse)
        tally = [_StepTally() for _ in self.steps]
        replies = graph._run_batch(task, items, tally, tqdm(disable=True))
        return replies, tally

    def answers(self, result: tuple[list[list[str]], list[_StepTally]]) -> int:
        return sum(len(replies) for replies in result[0])
