"""A graph run read by a person: the configuration table, the per-agent table, and a plot of
score against bytes sent and against time per item."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402

from kvcomm.eval.plot import byte_label  # noqa: E402
from kvcomm.files import save_figure  # noqa: E402
from kvcomm.graphs.graph import AgentRow, GraphReport  # noqa: E402


def graph_table(report: GraphReport) -> Table:
    """One row per configuration: score and interval, bytes per item, time per item, and with
    anchor correction the share of the shared questions' askings (an item's question at one step)
    reused with correction (the others were computed in context, as anchors)."""
    cfg = report.config
    metric = cfg["metric"]
    table = Table(title=Text(f"{cfg['task']} · {cfg['model']} · {cfg['topology']} of {cfg['agents']} agents · "
                             f"n={cfg['items']}"))
    anchors = any(run.anchored is not None for run in report.runs)
    for column in ("configuration", metric, "95% CI", "bytes/item", "s/item", "hop accuracy by agent",
                   *(["questions anchor-corrected"] if anchors else [])):
        table.add_column(Text(column), justify="left" if column in ("configuration", "hop accuracy by agent")
                         else "right", overflow="fold")
    for run in report.runs:
        score = run.scores[metric]
        hops = _hop_column(run.steps)
        table.add_row(Text(run.label), f"{score.mean:.3f}", f"{score.ci95[0]:.2f}–{score.ci95[1]:.2f}",
                      byte_label(run.bytes_per_item) if run.bytes_per_item else "0", f"{run.seconds_per_item:.2f}",
                      hops, *([] if not anchors else ["-" if run.anchored is None else f"{run.anchored:.0%}"]))
    return table


def _hop_column(steps: list[AgentRow]) -> str:
    """Each step's hop accuracy in step order ("-" where a step was asked no hop), bare for one
    round of agents (agent 1, 2, ...), else each named by its turn."""
    if all(step.hop_accuracy is None for step in steps):
        return "-"
    values = ["-" if step.hop_accuracy is None else f"{step.hop_accuracy:.2f}" for step in steps]
    if all(step.round == 1 and step.agent != "decision" for step in steps):
        return " ".join(values)
    return ", ".join(f"{step.agent}{'' if step.round == 1 else f'/r{step.round}'} {value}"
                     for step, value in zip(steps, values))


def agents_table(report: GraphReport) -> Table:
    """One row per configuration and step: what each agent heard, sent and cost."""
    batch = min(report.config["batch_size"], report.config["items"])
    table = Table(title=Text(f"per agent (bytes per item; TTFT per batch of {'' if batch == 1 else 'up to '}{batch})"))
    for column in ("configuration", "agent", "round", "hears", "bytes in", "bytes out", "TTFT s", "step s",
                   "tokens", "reuse"):
        table.add_column(Text(column), justify="left" if column in ("configuration", "agent", "hears") else "right",
                         overflow="fold")
    for run in report.runs:
        for row in run.steps:
            table.add_row(Text(run.label), row.agent, str(row.round), ", ".join(row.hears) or "-",
                          byte_label(row.bytes_in) if row.bytes_in else "0",
                          byte_label(row.bytes_out) if row.bytes_out else "0", f"{row.ttft_s:.3f}",
                          f"{row.seconds:.1f}", f"{row.tokens:.1f}", f"{row.reuse_rate:.0%}")
    return table


def print_graph(report: GraphReport, console: Console | None = None, agents: bool = True) -> None:
    console = console or Console(width=140)
    console.print(graph_table(report))
    if agents:
        console.print(agents_table(report))


def plot_graph(report: GraphReport, path: str | Path) -> Path:
    """Score (95% interval) against bytes sent per item (log) and against seconds per item."""
    metric = report.config["metric"]
    fig, (by_bytes, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True, sharey=True)
    for index, run in enumerate(report.runs):
        score = run.scores[metric]
        err = [[score.mean - score.ci95[0]], [score.ci95[1] - score.mean]]
        style = dict(marker="osD^vP*X<>"[index % 10], linestyle="none", capsize=3, label=run.label)
        by_bytes.errorbar([max(run.bytes_per_item, 1.0)], [score.mean], yerr=err, **style)
        by_time.errorbar([run.seconds_per_item], [score.mean], yerr=err, **style)
    by_bytes.set_xscale("log")
    by_bytes.set_xlabel("bytes sent per item, all edges (log; 1 = nothing sent)")
    by_time.set_xlabel("seconds per item, end to end")
    by_bytes.set_ylabel(f"{metric} (95% interval)")
    by_bytes.set_ylim(bottom=0)
    cfg = report.config
    fig.suptitle(f"{cfg['task']} · {cfg['model']} · {cfg['topology']} of {cfg['agents']} agents · n={cfg['items']}",
                 fontsize=9)
    by_time.legend(fontsize=7, loc="best")
    saved = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return saved
