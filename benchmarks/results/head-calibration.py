"""Answer-rule calibration with the language-model head's contiguous-input hook off (as before the
fix) and on, in one process, taking turns (round r runs off-then-on when r is even, on-then-off
when odd); prints each calibration's seconds and top layers, and whether every ranking is the same.

    python benchmarks/results/head-calibration.py smollm2-135m facts "" 4 1
    python benchmarks/results/head-calibration.py qwen2.5-coder-1.5b tipsheets ../shared/data/tipsheets.jsonl 1 1

Arguments: model, task, data file ("" for a generated task of 200 items), calibration items (the
task's last ones), rounds.
"""
import sys
import time

from kvcomm import Agents, load_task
from kvcomm.models.loading import _contiguous_input, contiguous_head
from kvcomm.selection.calibrate import calibrate

model, task_name, data = sys.argv[1], sys.argv[2], sys.argv[3] or None
count, rounds = int(sys.argv[4]), int(sys.argv[5])
agents = Agents.load(model)
task = load_task(task_name, data) if data else load_task(task_name, items=200)
items = task.items[-count:]
head = agents.receiver.model.get_output_embeddings()


def unhook() -> None:
    for key, hook in list(head._forward_pre_hooks.items()):
        if hook is _contiguous_input:
            del head._forward_pre_hooks[key]


rankings = []
for r in range(rounds):
    for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
        unhook() if mode == "off" else contiguous_head(agents.receiver.model)
        began = time.perf_counter()
        profile = calibrate(agents, task, items, batch_size=16, progress=False, rule="answer", objective="likelihood")
        print(f"hook {mode}: {time.perf_counter() - began:.1f} s, top layers {profile.ranking[:10]}", flush=True)
        rankings.append(profile.ranking)
print("same rankings:", all(ranking == rankings[0] for ranking in rankings))
