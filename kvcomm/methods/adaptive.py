"""The adaptive budget: each item fetches ranked layers until its answer stops changing.

A fixed ratio sends every item the same number of layers, though some answers are settled by the
first few and others need most of them. Here the receiver fetches the calibrated ranking in rounds
(``step`` of the layers each: the top 10%, then the top 20%, …), answers after each round, and
stops once ``patience`` further rounds leave its answer's text as it was; the answer it keeps is
the last one, and the layers it was sent are those it fetched. The signal costs no gold answer
and nothing at the sender: only the receiver's own (short) prompt and answer are recomputed each
round.

Both ends are ``kvcomm@1``: ``step=1`` is one round with every layer, and a patience of as many
rounds as there are lets no item stop before the last. In between, each item's answer is what
``kvcomm`` answers at the ratio it stopped at.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from kvcomm.errors import ConfigError
from kvcomm.methods.base import METHODS, Method, MethodOptions, Output, Setup
from kvcomm.protocol import greedy_generate, receiver_input, share
from kvcomm.selection.calibrate import Rule
from kvcomm.selection.rules import layer_count

if TYPE_CHECKING:
    from kvcomm.eval.batch import Batch


class AdaptiveOptions(MethodOptions):
    """Options of :class:`AdaptiveKVComm`.

    Attributes:
        step: the fraction of the layers each round adds (rounds at ``ceil(k·step·L)`` layers),
            0.01 to 1.
        patience: rounds in a row that must leave the answer unchanged before an item stops.
        selection: the rule whose ranking is fetched (None: the run's rule).
    """

    step: float = Field(default=0.1, ge=0.01, le=1)  # at most 101 rounds (a smaller step looped ~1/step times)
    patience: int = Field(default=1, ge=1, le=100)  # up to every round of the smallest step (0.01)
    selection: Rule | None = None


def round_counts(num_layers: int, step: float) -> list[int]:
    """The layer counts of the rounds: ``ceil(k·step·L)`` for k = 1, 2, … up to every layer, each once."""
    counts = {layer_count(min(1.0, k * step), num_layers) for k in range(1, int(1 / step + 1e-9) + 2)}
    return sorted(counts | {num_layers})


@METHODS.register("adaptive")
class AdaptiveKVComm(Method):
    """KVComm with a budget per item: ranked layers in rounds until the answer is stable."""

    name = "adaptive"
    options_model: ClassVar[type[MethodOptions]] = AdaptiveOptions
    options: AdaptiveOptions

    @property
    def ranks_layers(self) -> bool:
        return True

    def __init__(self, options: MethodOptions | None = None, **given: Any) -> None:
        super().__init__(options, **given)
        self._ranking: list[int] | None = None
        self._stops: Counter[int] = Counter()  # layers fetched -> items that stopped there
        self._last: list[int] = []  # the layers each item of the batch just run fetched

    @property
    def label(self) -> str:
        o = self.options
        own = (f"/{o.step:g}" if o.step != 0.1 else "") + (f"x{o.patience}" if o.patience != 1 else "")
        return f"{self.name}{own}" + (f"~{o.selection}" if o.selection else "")

    def setup(self, setup: Setup) -> None:
        self._ranking = list(setup.ranking(self.options.selection, "chats"))  # it reads the paper's chats
        self._stops, self._last = Counter(), []

    def run(self, batch: Batch) -> Output:
        if self._ranking is None:
            raise ConfigError(f"{self.label}: setup() must run before run()")
        receiver = batch.agents.receiver
        sender = batch.sender_kv()
        prompt = batch.prompt("receiver", batch.task.receiver_message)
        rows = len(batch.items)
        history: list[list[str]] = [[] for _ in range(rows)]  # each round's answer, as text
        fetched = [0] * rows
        counts = round_counts(len(self._ranking), self.options.step)
        for count in counts:
            active = [row for row in range(rows) if not fetched[row]]
            if not active:
                break
            every = len(active) == rows  # later rounds answer only the items still fetching
            asked = prompt if every else prompt.rows(active)
            shared = share(receiver.model, sender if every else sender.rows(active), sorted(self._ranking[:count]))
            answers = greedy_generate(receiver.model, receiver_input(shared), asked.input_ids, asked.valid,
                                      batch.task.max_new_tokens, receiver.stop_ids, receiver.pad_id)
            for row, answer in zip(active, answers, strict=True):
                history[row].append(receiver.decode(answer))
                recent = history[row][-(self.options.patience + 1):]
                stable = len(recent) > self.options.patience and all(text == recent[-1] for text in recent)
                if stable or count == counts[-1]:
                    fetched[row] = count
        self._stops.update(fetched)
        self._last = fetched
        sizes = {count: share(None, sender, sorted(self._ranking[:count])).kv_bytes for count in set(fetched)}
        kv_bytes = [int(sizes[count][row]) for row, count in enumerate(fetched)]
        return Output(
            answers=[history[row][-1] for row in range(rows)],
            receiver_ids=prompt.ids,
            sender_ids=batch.prompt("sender", batch.task.sender_message).ids,
            kv_bytes=kv_bytes,
        )

    def state(self) -> dict[str, Any] | None:
        """The layers each item of the batch fetched: a resumed run, or one whose batches a cluster
        ran, counts them in :meth:`details` as if the batch had run here."""
        return {"layers_fetched": list(self._last)}

    def restore(self, state: dict[str, Any]) -> None:
        self._stops.update(int(count) for count in state["layers_fetched"])

    def details(self) -> dict[str, Any] | None:
        """How many layers the items fetched: the histogram, and the mean as a fraction of the depth."""
        if self._ranking is None or not self._stops:
            return None
        items = sum(self._stops.values())
        mean = sum(count * n for count, n in self._stops.items()) / items
        return {"layers_fetched": {str(count): n for count, n in sorted(self._stops.items())},
                "mean_ratio": mean / len(self._ranking), "rounds": round_counts(len(self._ranking), self.options.step)}
