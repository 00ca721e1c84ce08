"""Running ``eval`` and ``sweep``: every task of the command into one run folder, resumably.

Everything that can be wrong with the command is found before a model loads: the tasks and
their data, the item split, the profile, the run folder and the files in it, and (with
``--resume``) whether the run recorded there is the one this command describes.

The run folder is ``--resume FOLDER``, else ``--out-dir``, else the folder of ``eval --out``,
else a new ``results/<YYYYmmdd-HHMMSS>-<model>/`` (UTC). A file the run would write that exists
already is refused unless ``--overwrite``, which discards that task's checkpoint and the files
an earlier run left (results, samples, plots) once the models have loaded, before the task's work
begins (a command that fails before leaves them as they were; the checkpoints go at once), so that
a later ``--resume`` never takes them for this run's; with ``--resume`` the run's own files are
replaced and its finished tasks are skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvcomm.agents import Agents
from kvcomm.cli.common import RunOptions, check_folder, console, quiet_libraries, remove_replaced
from kvcomm.cli.group import command_line
from kvcomm.errors import ConfigError
from kvcomm.eval import EvalConfig, Report, evaluate, plot_sweep, print_table
from kvcomm.eval.checkpoint import Checkpoint, remove_checkpoint
from kvcomm.eval.cluster import Cluster, RayCluster, check_apart
from kvcomm.eval.harness import (
    NEEDS_BLOCK,
    NEEDS_RANKING,
    calibration_identity,
    check_calibration,
    check_distinct,
    check_pieces,
    check_prior_given,
    check_profile,
    named_rules,
)
from kvcomm.eval.outputs import TaskFiles, new_run_folder
from kvcomm.eval.provenance import profiles_identity, run_identity
from kvcomm.eval.samples import write_samples
from kvcomm.methods import Method
from kvcomm.models import resolve_model
from kvcomm.models.allocator import malloc_mode
from kvcomm.selection import Profile
from kvcomm.selection.blocks import BlockProfile, read_profile
from kvcomm.tasks import Task

MethodFactory = Callable[[], list[Method]]  # fresh configurations for each task


@dataclass
class TaskRun:
    """One task of the command: its files and checkpoint, and whether a resumed run finished it."""

    task: Task
    files: TaskFiles
    checkpoint: Checkpoint
    finished: bool
    replaced: list[Path]  # an earlier run's files that --overwrite removes once the models have loaded


@dataclass
class Plan:
    folder: Path
    config: EvalConfig
    profile: Profile | None
    blocks: BlockProfile | None
    tasks: list[TaskRun]
    notes: list[str]  # what the run does otherwise than asked, said before it starts


def plan_run(run: RunOptions, build: MethodFactory, out: Path | None = None, plots: bool = False) -> Plan:
    """Checks the whole command and decides where everything goes; loads no model.

    Raises:
        ConfigError: an impossible split, a profile of another task, an existing file without
            ``--overwrite``, or a ``--resume`` folder with nothing to resume or another run in it.
    """
    malloc_mode()  # a bad KVCOMM_MALLOC, before a run folder is claimed (before: at the model's load, after it)
    tasks = run.load_tasks()
    config = run.eval_config()
    check_distinct(build())
    given = read_profile(run.profile) if run.profile else None
    if isinstance(given, Profile) and run.selection is not None and run.selection != given.rule:
        raise ConfigError(f"--selection {run.selection} and a profile ranked by {given.rule}: the profile's ranking is "
                          f"what runs; leave out --selection, or calibrate with --selection {run.selection}")
    profile = given if isinstance(given, Profile) else None
    blocks = given if isinstance(given, BlockProfile) else None
    methods = build()
    if blocks is not None and not any(m.name == "droidspeak" for m in methods):  # before: ignored, and a ranking
        # calibrated in its place (or, with --calib-size 0, "pass --profile" although one was passed)
        raise ConfigError(f"--profile {run.profile} is a droidspeak block profile, and no method of this run reads "
                          "blocks; a layer ranking is made by `kvcomm calibrate` (without --method droidspeak)")
    rules, profiled = named_rules(methods), profile.rule if profile is not None else None
    ranking, prior_used = any(m.ranks_layers for m in methods), any(m.uses_prior for m in methods)
    ranks = given is None and ranking  # a ranking this run calibrates
    notes: list[str] = []  # said once every check has passed
    if config.calib_size == 0:  # before, said once the models had loaded
        if profile is None and ranking:
            raise ConfigError(NEEDS_RANKING)
        if blocks is None and any(m.name == "droidspeak" and getattr(m.options, "block", None) is None
                                  for m in methods):
            raise ConfigError(NEEDS_BLOCK)
    for task in tasks:
        test, calib = config.split(task.items, rules)
        check_pieces(methods, test, calib)
        check_calibration(config, rules, len(task.items), profiled, ranks=ranking)
        if any(value is not None for value in (run.alpha, run.mu, run.sigma)):
            check_prior_given(config, rules, profiled, prior_used, ranks=ranking)
        if ranks and (short := config.calibration_shortfall(len(task.items), rules)):
            notes.append(f"note: {task.name}: the layers are ranked on {short[0]} calibration item(s), not the "
                         f"{short[1]} the rule was measured with: --limit leaves no more (lower --limit, or give "
                         "--calib-size)")
        if given is not None:  # the depth where the model's name tells it: before a model loads
            check_profile(given, task, test, resolve_model(run.model).num_layers,
                          pair=(run.model, run.receiver or run.model), pieces=config.pieces)
    folder = _folder(run, out, len(tasks))
    planned = []
    for task in tasks:
        files = TaskFiles.beside(out) if out is not None else TaskFiles.for_task(folder, task.name)
        # --overwrite removes only what this command writes (eval's --out x.json: no x.png): every task's
        # checkpoint now (so that a --resume after an interruption never takes another task's earlier
        # run for this one's), its results, samples and plots once the models have loaded (a run that
        # fails before its work begins leaves those)
        if run.overwrite:
            remove_checkpoint(files.checkpoint)
        replaced = [p for p in files.existing(plots) if p != files.checkpoint] if run.overwrite else []
        if run.resume is None and not run.overwrite and (existing := files.existing(plots)):
            raise ConfigError(f"{existing[0]} exists; pass --overwrite to replace the run's files, or "
                              f"--resume {folder} to continue the run there")
        identity = run_identity(task, build(), config.model_dump(mode="json"), run.model, run.receiver or run.model,
                                run.dtype, profiles_identity(profile, blocks), run.linear,
                                calibration_identity(config, rules, len(task.items), profiled))
        checkpoint = Checkpoint(files.checkpoint, identity, command_line(), resume=run.resume is not None)
        planned.append(TaskRun(task, files, checkpoint, finished=checkpoint.continued and files.results.is_file(),
                               replaced=replaced))
    if run.resume is not None and not any(p.checkpoint.continued for p in planned):
        raise ConfigError(f"nothing to resume in {folder}: it holds no checkpoint of "
                          f"{', '.join(p.task.name for p in planned)}")
    return Plan(folder, config, profile, blocks, planned, notes)


def run_tasks(run: RunOptions, build: MethodFactory, out: Path | None = None, plots: bool = False,
              ray: RayCluster | None = None) -> list[Report]:
    """Runs every task of the command (models loaded once, after every check), printing a table
    and writing the results JSON, the samples file and (``plots``) the plots of each; with ``ray``,
    every task's batches run on that cluster's workers."""
    if ray is not None:
        check_apart(build())
    plan = plan_run(run, build, out, plots)
    console.print(f"run folder: {plan.folder}", markup=False, soft_wrap=True)
    for note in plan.notes:
        console.print(note, markup=False, soft_wrap=True)
    with quiet_libraries(run.quiet), contextlib.ExitStack() as stack:
        return _run_planned(run, build, plan, plots, stack, ray)


def _run_planned(run: RunOptions, build: MethodFactory, plan: Plan, plots: bool, stack: contextlib.ExitStack,
                 ray: RayCluster | None) -> list[Report]:
    agents: Agents | None = None
    cluster: Cluster | None = None
    reports = []
    for task_run in plan.tasks:
        files = task_run.files
        if task_run.finished:
            console.print(f"{task_run.task.name}: finished already: {files.results}", markup=False, soft_wrap=True)
            continue
        agents = agents or Agents.load(run.model, run.receiver, run.dtype, run.linear)
        if ray is not None and cluster is None:
            cluster = stack.enter_context(Cluster(ray, run.model, run.receiver or run.model, run.dtype, run.linear))
            console.print(f"ray: {cluster.workers} workers, {ray.threads} thread(s) each", markup=False)
        remove_replaced(task_run.replaced)
        try:
            report = evaluate(agents, task_run.task, build(), plan.config, plan.profile, progress=not run.quiet,
                              checkpoint=task_run.checkpoint, blocks=plan.blocks, cluster=cluster)
        except KeyboardInterrupt:
            console.print(f"interrupted; to continue, repeat the command with --resume {plan.folder}",
                          markup=False, soft_wrap=True)
            raise
        _write(report, agents, files, plots)
        reports.append(report)
    return reports


def _write(report: Report, agents: Agents, files: TaskFiles, plots: bool) -> None:
    """Prints the table; writes the samples, the plots, and last the results (the mark of a finished task)."""
    print_table(report)
    lines = [f"samples: {write_samples(report, agents, files.samples)}"]
    if plots:
        fraction, by_bytes = files.plots
        lines.append(f"plots: {plot_sweep(report, fraction)}, {plot_sweep(report, by_bytes, x='bytes')}")
    report.save(files.results)
    for line in [f"results: {files.results}", *lines]:
        console.print(line, markup=False, soft_wrap=True)


def _folder(run: RunOptions, out: Path | None, count: int) -> Path:
    """The run folder (see the module's docstring); a new default folder is not created yet."""
    if out is not None and count > 1:
        raise ConfigError("--out names one results file; with several tasks use --out-dir")
    if out is not None and run.out_dir is not None:
        raise ConfigError("give --out (one results file) or --out-dir (a run folder), not both")
    if run.resume is not None:
        if run.overwrite:
            raise ConfigError("--resume continues a run and --overwrite starts it again: give one of them")
        for given, name in ((run.out_dir, "--out-dir"), (out.parent if out is not None else None, "--out")):
            if given is not None and given.resolve() != run.resume.resolve():
                raise ConfigError(f"{name} is not in the --resume folder {run.resume}; leave it out or make them agree")
        return run.resume
    if out is not None:
        return out.parent
    if run.out_dir is not None:
        return check_folder(run.out_dir, "--out-dir")
    try:  # made now, atomically: runs started in the same second shared one folder and overwrote each other
        return new_run_folder(run.model, claim=True)
    except OSError as err:  # e.g. ./results is a file: before, a traceback after all the work
        raise ConfigError(f"cannot make a run folder here ({type(err).__name__}: {err}); give --out-dir") from None
