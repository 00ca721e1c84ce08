"""Qwen Tipsheets, the answer rule with a given calibration objective (choice, fidelity), 4
calibration items, greedy to 9 steps (ratio 0.3 needs ceil(0.3*28)=9 layers; the first 9 greedy
steps are what the full 20-step run makes), evaluated at ratio 0.3 on the same 100 test items as
qwen-tipsheets.json. Writes OUT and OUT's profile beside it (OUT with -profile before .json).

    python benchmarks/results/selection/qwen-tipsheets-objective-0.3.py choice \
        benchmarks/results/selection/qwen-tipsheets-choice-0.3.json
"""
import sys
import time
from pathlib import Path

from kvcomm import Agents, EvalConfig, evaluate, load_task, make_method
from kvcomm.selection.calibrate import calibrate

objective, out = sys.argv[1], Path(sys.argv[2])
agents = Agents.load("qwen2.5-coder-1.5b")
task = load_task("tipsheets", "../shared/data/tipsheets.jsonl")
config = EvalConfig(limit=100, calib_size=4, batch_size=16, objective=objective)
test, calib = config.split(task.items)
print("calib", [i.id for i in calib], flush=True)
t = time.perf_counter()
profile = calibrate(agents, task, calib, batch_size=16, rule="answer", steps=9, objective=objective)
print("calibration s", time.perf_counter() - t, profile.ranking[:9], profile.details["objective"], flush=True)
profile.save(out.with_name(out.stem + "-profile.json"))
report = evaluate(agents, task, [make_method("kvcomm", ratio=0.3)], config, profile=profile)
report.save(out)
for r in report.runs:
    print(r.label, r.scores)
