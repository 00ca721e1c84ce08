"""Options shared by the CLI commands, written once.

``eval`` and ``sweep`` share one option set (:class:`RunOptions`): the :func:`run_options`
decorator adds those options to a command's signature and hands the command one object. Lists
of valid names in ``--help`` come from the registries (methods, codecs, tasks, metrics, stores);
defaults come from the option models (:class:`~kvcomm.eval.EvalConfig`, the methods' options),
so a CLI option left out is "not given" and the model's default applies.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from kvcomm.errors import ConfigError
from kvcomm.eval import EvalConfig
from kvcomm.eval.cluster import RayCluster, require_ray
from kvcomm.eval.outputs import safe_name
from kvcomm.methods import METHODS
from kvcomm.methods.ac import ACOptions
from kvcomm.methods.adaptive import AdaptiveOptions
from kvcomm.methods.blend import BlendOptions
from kvcomm.methods.debate import CipherOptions
from kvcomm.methods.droidspeak import DroidSpeakOptions
from kvcomm.methods.kvcomm import RandomOptions, SharingOptions
from kvcomm.methods.online import OnlineOptions
from kvcomm.models import DEFAULT_MODEL, resolve_model
from kvcomm.models.packing import Linear
from kvcomm.models.source import DType
from kvcomm.protocol import MaskMode
from kvcomm.protocol.blend import Deviation
from kvcomm.selection import parse_layers
from kvcomm.selection.calibrate import DEFAULT_OBJECTIVE, DEFAULT_RULE, Objective, Rule
from kvcomm.tasks import METRICS, TASKS, Task, load_task
from kvcomm.tasks.base import Pieces
from kvcomm.tasks.options import option_task, parse_options
from kvcomm.wire.codecs import codec_names

console = Console(stderr=True, highlight=False, emoji=False)  # with markup=False, paths print literally
_TASK_PREFIX = re.compile(r"[\w-]+=")  # "countries=" in --data countries=PATH


def task_options_for(name: str, pairs: Sequence[str], run: Sequence[str]) -> dict[str, Any]:
    """The ``--task-option`` pairs for the task ``name``, parsed; a ``TASK:`` prefix must name a
    task of the ``run`` (a "did you mean" for an unknown one).

    Raises:
        ConfigError: a prefix outside the run, or a pair the task refuses (:func:`parse_options`).
    """
    for pair in pairs:
        named = option_task(pair)
        if named is not None and named not in run:
            TASKS.get(named)  # an unknown name: "did you mean"
            raise ConfigError(f"--task-option {pair!r} is for task {named!r}, which is not in this run")
    return parse_options(name, TASKS.get(name).load, pairs)


def names(values: list[str]) -> str:
    return ", ".join(values)


def default_of(model: Any, field: str) -> Any:
    return model.model_fields[field].default


def options_help(what: str, model: Any, field: str) -> str:
    return f"{what} (default: {default_of(model, field)})"


def fraction(value: str) -> float:
    """An option that is a fraction over 0 and at most 1 (``--ratio``, ``--step``): typer's ranges
    close both ends, and would show 0 as allowed."""
    try:
        number = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a valid number") from None
    if not 0 < number <= 1:
        raise typer.BadParameter(f"{value} is not in 0 < x <= 1")
    return number


# -- options every model-running command takes ---------------------------------------------------
Model = Annotated[str, typer.Option(
    "--model", "-m", envvar="KVCOMM_MODEL",
    help="Sender model: an embedded name (`kvcomm models list`), a model directory, a .gguf file or a hub id.")]
Receiver = Annotated[str | None, typer.Option(
    envvar="KVCOMM_RECEIVER", help="Receiver model if different (it must have the same KV shapes).")]
Dtype = Annotated[DType, typer.Option(help="Weights' dtype.")]
LinearOption = Annotated[Linear, typer.Option(
    envvar="KVCOMM_LINEAR",
    help="How linear layers compute: dense (torch's products) or packed (a second, oneDNN-packed copy of "
         "each large weight for calls of up to 128 rows: decoding steps and short prompts run faster on "
         "CPU; those layers' memory doubles; values round differently, ~1e-4).")]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress bars, and no loading messages or warnings from transformers.")]
TaskName = Annotated[str, typer.Option(
    "--task", "-t", envvar="KVCOMM_TASK", help=f"Task: {names(TASKS.names())} (`kvcomm tasks` lists them).")]
TaskNames = Annotated[str, typer.Option(
    "--task", "-t", envvar="KVCOMM_TASK",
    help=f"Task, or several separated by commas (one results JSON each): {names(TASKS.names())} "
         "(`kvcomm tasks` lists them).")]
Data = Annotated[Path | None, typer.Option(
    envvar="KVCOMM_DATA", exists=True, dir_okay=False, readable=True,
    help="Local dataset file (countries, tipsheets, jsonl).")]
TaskOptions = Annotated[list[str] | None, typer.Option(
    "--task-option", metavar="KEY=VALUE",
    help="An option of a generated task, e.g. items=200, seed=1, filler_per_piece=2; TASK:KEY=VALUE for "
         "one task of several (repeatable; `kvcomm tasks` lists each task's).")]
DataFiles = Annotated[list[str] | None, typer.Option(
    "--data",  # KVCOMM_DATA is read whole by data_files: click split it at spaces ("my data.jsonl")
    help="Local dataset file (countries, tipsheets, jsonl); with several tasks TASK=PATH, repeated or "
         "comma-separated (e.g. --data countries=c.jsonl,tipsheets=t.jsonl); also read from KVCOMM_DATA.")]
MaxNewTokens = Annotated[int | None, typer.Option(
    min=1, help="Answer budget in tokens, replacing each task's own (`kvcomm tasks` shows them).")]


def _metric(value: str) -> str:
    if value not in METRICS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(METRICS)}")
    return value


Metric = Annotated[str | None, typer.Option(
    parser=_metric, metavar="|".join(METRICS),
    help="Primary metric, replacing each task's own (every metric is recorded).")]
OutDir = Annotated[Path | None, typer.Option(
    file_okay=False, help="Run folder: per task a results JSON, a samples JSONL (and plots). "
                          "(default: results/<YYYYmmdd-HHMMSS>-<model>/, UTC)")]
Overwrite = Annotated[bool, typer.Option(
    help="Replace the output file where it exists already (without it, an existing file is refused); it is "
         "replaced when the new one is written.")]
RunOverwrite = Annotated[bool, typer.Option(
    help="Replace the run's files where they exist already (without it, an existing file is "
    "refused); they are removed once the models have loaded, before the work begins.")]
Resume = Annotated[Path | None, typer.Option(
    exists=True, file_okay=False,
    help="Continue the interrupted run in this folder: finished batches are kept, the rest runs with the "
         "rankings, block profiles and codebook the run made. Give the options the run had; another "
         "configuration is refused, and so are checkpoint files that are damaged or another run's. Another "
         "kvcomm version or commit is allowed, with a warning, and recorded.")]
Mode = Annotated[MaskMode | None, typer.Option(
    help=options_help("Masks: causal (correct), legacy (reference parity), shift-back (KVComm-S), padded-sink or "
                      "padded-zero (a paged engine's view: sink-only layers padded to the context, unmasked).",
                      SharingOptions, "mode"))]


RayAddress = Annotated[str | None, typer.Option(
    "--ray", metavar="ADDRESS",
    help="Run the batches on a Ray cluster, one model copy per worker, with the serial run's results: 'local' "
         "starts one on this machine, 'auto' joins the cluster this machine is in, or ray://HOST:PORT. "
         "Needs: pip install \"kvcomm\\[ray]\".")]  # \\[: Rich would take [ray] for markup and drop it
Workers = Annotated[int | None, typer.Option(
    min=1, help="--ray: workers. (default: the cluster's CPUs / --worker-threads)")]
WorkerThreads = Annotated[int, typer.Option(min=1, help="--ray: torch threads (and CPUs) per worker.")]


def ray_cluster(address: str | None, workers: int | None, threads: int) -> RayCluster | None:
    """The cluster ``--ray`` names (None without it), once Ray is found to be installed; the worker
    options are refused without it."""
    if address is None:
        if workers is not None or threads != 1:
            raise ConfigError("--workers and --worker-threads are for --ray")
        return None
    require_ray()
    return RayCluster(address=address, workers=workers, threads=threads)


@dataclass(frozen=True)
class RunOptions:
    """The options ``eval``, ``sweep`` and ``calibrate`` share, as the command line gave them (None: not given)."""

    model: str
    receiver: str | None
    task: str
    data: list[str] | None
    task_option: list[str] | None
    max_new_tokens: int | None
    metric: str | None
    limit: int | None
    skip: int | None
    batch_size: int | None
    calib_size: int | None
    profile: Path | None
    selection: str | None
    objective: str | None
    alpha: float | None
    mu: float | None
    sigma: float | None
    mode: str | None
    seed: int | None
    dtype: str
    linear: str
    max_memory: float | None
    bucket: bool | None
    senders: int | None
    round_one_tokens: int | None
    temperature: float | None
    ac_fuse: str | None
    ac_k: int | None
    ac_j: int | None
    interval: int | None
    step: float | None
    patience: int | None
    check_layer: int | None
    deviation: str | None
    pieces: str | None
    block: str | None
    max_recompute: float | None
    block_tolerance: float | None
    out_dir: Path | None
    overwrite: bool
    resume: Path | None
    quiet: bool

    def eval_config(self) -> EvalConfig:
        for flag, value in (("--sigma", self.sigma), ("--max-memory", self.max_memory)):
            if value is not None and value <= 0:  # the flags' lower bound (0) is open; said by flag, not field
                raise ConfigError(f"{flag} must be above 0, not {value:g}")
        given: dict[str, Any] = dict(limit=self.limit, skip=self.skip, batch_size=self.batch_size,
                                     calib_size=self.calib_size,
                                     alpha=self.alpha, mu=self.mu, sigma=self.sigma, max_memory_gb=self.max_memory,
                                     selection=self.selection, objective=self.objective, bucket=self.bucket,
                                     pieces=self.pieces)
        return EvalConfig(**{k: v for k, v in given.items() if v is not None})

    def method_options(self) -> dict[str, Any]:
        """Options for the methods (each method takes those it declares; None = not given)."""
        return dict(mode=self.mode, seed=self.seed, senders=self.senders, round_one_tokens=self.round_one_tokens,
                    temperature=self.temperature, fuse=self.ac_fuse, layer_k=self.ac_k, layer_j=self.ac_j,
                    interval=self.interval, step=self.step, patience=self.patience,
                    check_layer=self.check_layer, deviation=self.deviation, pieces=self.pieces,
                    block=None if self.block is None else parse_block(self.block),
                    max_recompute=self.max_recompute, tolerance=self.block_tolerance)

    def task_names(self) -> list[str]:
        """The ``--task`` names, each checked against the registry (with a "did you mean")."""
        listed = [name.strip() for name in self.task.split(",") if name.strip()]
        if not listed:
            raise ConfigError("--task names no task")
        for name in listed:
            TASKS.get(name)
            if listed.count(name) > 1:
                raise ConfigError(f"--task names {name!r} twice")
        return listed

    def data_files(self, tasks: list[str]) -> dict[str, Path]:
        """The ``--data`` files by task: ``PATH`` for a run of one task, ``TASK=PATH`` for any."""
        files: dict[str, Path] = {}
        given = self.data or ([os.environ["KVCOMM_DATA"]] if os.environ.get("KVCOMM_DATA") else [])
        for value in given:
            pieces = value.split(",")
            for entry in pieces if len(pieces) > 1 and all(_TASK_PREFIX.match(p) for p in pieces) else [value]:
                task, path = _data_entry(entry, tasks)
                if task in files:
                    raise ConfigError(f"--data gives two files for task {task!r}")
                if not path.is_file():
                    raise ConfigError(f"--data {path} does not exist (or is not a file)")
                files[task] = path
        return files

    def load_tasks(self) -> list[Task]:
        """The tasks with their data, budget and metric; refuses two that would share file names."""
        listed = self.task_names()
        files = self.data_files(listed)
        tasks = [load_task(name, files.get(name), max_new_tokens=self.max_new_tokens, metric=self.metric,
                           **task_options_for(name, self.task_option or [], listed))
                 for name in listed]
        stems = [safe_name(task.name) for task in tasks]
        for stem in stems:
            if stems.count(stem) > 1:
                raise ConfigError(f"two tasks of this run would both write {stem}.json; run them separately")
        return tasks

    def check_models(self) -> int | None:
        """Resolves the model names (no weights read); returns the depth where it is known."""
        depth = resolve_model(self.model).num_layers
        if self.receiver is not None:
            resolve_model(self.receiver)
        return depth


BatchSize = Annotated[int | None, typer.Option(
    min=1, envvar="KVCOMM_BATCH_SIZE", help=options_help("Items per forward pass.", EvalConfig, "batch_size"))]
Selection = Annotated[Rule | None, typer.Option(
    help="How calibration ranks layers: prune (backward elimination by the receiver's likelihood of the gold "
         "answer: from every layer, drop the one missed least), answer (greedy forward selection by that "
         "likelihood), prior "
         "(attention and a depth prior fitted per model), paper (attention and the paper's fixed prior). "
         f"(default: {DEFAULT_RULE})")]
CalibrationObjective = Annotated[Objective | None, typer.Option(
    help="What the answer, prune and prior rules maximise on the calibration items: likelihood (the gold answer's "
         "log-probability per token), probability (its exp, averaged over items: an item the model cannot answer "
         "weighs no more than one it answers), choice (the probability of picking the gold option, on items that "
         "list their options; others fall back to likelihood) or fidelity (closeness of the receiver's "
         "next-token distributions to those with every layer shared) or auto (answer and prune rules: "
         "likelihood or probability, whichever's ranking held-out calibration items answer better; takes 8 "
         "calibration items unless told, searches on the later half). "
         f"(default: {DEFAULT_OBJECTIVE} for prune and answer, likelihood for them with fewer than 8 calibration items "
         "and for prior). Refused where the run calibrates no such rule (--selection paper, a --profile's "
         "ranking used as given, or no method that ranks layers).")]
Alpha = Annotated[float | None, typer.Option(
    min=0, max=1, help="paper rule: weight of attention against the depth prior. (default: 1.0 Llama, 0.8 Qwen)")]
Mu = Annotated[float | None, typer.Option(
    min=0, max=1, help=options_help("paper rule (and online): prior centre as a fraction of depth.", EvalConfig,
                                    "mu"))]
Sigma = Annotated[float | None, typer.Option(
    min=0, help=options_help("paper rule (and online): prior width in layers, above 0.", EvalConfig, "sigma"))]

_RUN_OPTIONS: dict[str, tuple[Any, Any]] = {  # name -> (annotation, default)
    "model": (Model, DEFAULT_MODEL),
    "receiver": (Receiver, None),
    "task": (TaskNames, "facts"),
    "data": (DataFiles, None),
    "task_option": (TaskOptions, None),
    "max_new_tokens": (MaxNewTokens, None),
    "metric": (Metric, None),
    "limit": (Annotated[int | None, typer.Option(
        min=1, help="Test items, from the front of the task (after --skip). (default: all but the calibration "
                    "items)")], None),
    "skip": (Annotated[int | None, typer.Option(
        min=0, help="Start the test items after this many (e.g. to confirm on items an earlier run did not "
                    "read; give it that run's --profile or --calib-size so that it ranks the layers the "
                    "same way). (default: 0)")], None),
    "batch_size": (BatchSize, None),
    "calib_size": (Annotated[int | None, typer.Option(
        min=0, help="Calibration items, from the end of the task, disjoint from the test items. (default: 8 for "
                    "prune and answer with the auto objective, their default; 4 for them with another objective "
                    "and for prior; 1 for --selection paper; the most of the rules the run calibrates, "
                    "methods' own (kvcomm~prune) included; fewer if the task cannot spare them)")], None),
    "profile": (Annotated[Path | None, typer.Option(
        "--profile", exists=True, dir_okay=False,
        help="Layer ranking, or droidspeak block profile, from `kvcomm calibrate`; or the results JSON of an "
             "earlier eval/sweep, whose ranking is reused (calibration paid once).")], None),
    "selection": (Selection, None),
    "objective": (CalibrationObjective, None),
    "alpha": (Alpha, None),
    "mu": (Mu, None),
    "sigma": (Sigma, None),
    "mode": (Mode, None),
    "seed": (Annotated[int | None, typer.Option(
        help=options_help("Seed of `random` layer selection.", RandomOptions, "seed"))], None),
    "dtype": (Dtype, "float32"),
    "linear": (LinearOption, "dense"),
    "max_memory": (Annotated[float | None, typer.Option(
        min=0, envvar="KVCOMM_MAX_MEMORY",
        help="Memory budget in GiB, above 0; batches shrink to fit it.")], None),
    "bucket": (Annotated[bool | None, typer.Option(
        "--bucket/--no-bucket", help="Batch items of similar prompt lengths together (less padding, the same "
                                     "answers; results stay in item order). (default: bucket)")], None),
    "senders": (Annotated[int | None, typer.Option(
        min=1, help="Split each context among this many senders (methods that share KV). (default: 1; blend "
                    "and prefix: 2, prefix at least 2)")], None),
    "round_one_tokens": (Annotated[int | None, typer.Option(
        min=1, help=options_help("NLD/CIPHER round-1 budget in tokens (or vectors).", CipherOptions,
                                 "round_one_tokens"))], None),
    "temperature": (Annotated[float | None, typer.Option(
        min=1e-3, max=1e3, help=options_help(
            "CIPHER: softmax temperature of the expected embeddings (0.001 to 1000).", CipherOptions,
            "temperature"))], None),
    "ac_fuse": (Annotated[Literal["replace", "sum", "mean"] | None, typer.Option(
        help=options_help("AC: how the sender's vector is fused.", ACOptions, "fuse"))], None),
    "ac_k": (Annotated[int | None, typer.Option(
        help="AC: sender hidden state after this many layers (<0 from the end). (default: 3/4 of the depth)")], None),
    "ac_j": (Annotated[int | None, typer.Option(
        help="AC: receiver layer the vector enters before (<0 from the end). (default: 3/4 of the depth)")], None),
    "interval": (Annotated[int | None, typer.Option(
        min=1, help=options_help("Online calibration: rebuild the ranking every N items.", OnlineOptions,
                                 "interval"))], None),
    "step": (Annotated[float | None, typer.Option(
        parser=fraction, metavar="FRACTION", help=options_help(
            "adaptive: the fraction of the ranked layers each round adds (0.01 to 1).", AdaptiveOptions,
            "step"))], None),
    "patience": (Annotated[int | None, typer.Option(
        min=1, help=options_help("adaptive: rounds in a row that must leave an item's answer unchanged before it "
                                 "stops fetching layers.", AdaptiveOptions, "patience"))], None),
    "check_layer": (Annotated[int | None, typer.Option(
        min=1, help=options_help("blend: the layer deviations are measured at (earlier layers: every token).",
                                 BlendOptions, "check_layer"))], None),
    "deviation": (Annotated[Deviation | None, typer.Option(
        help=options_help("blend: what the deviation is measured on.", BlendOptions, "deviation"))], None),
    "pieces": (Annotated[Pieces | None, typer.Option(
        help=options_help("blend, prefix, kvcomm, random, contiguous: each piece a sender's chat (the paper's), "
                          "or passages of the receiver's own prompt (each prefilled alone behind its opening; the "
                          "question follows; kvcomm keeps the opening at layers not shared).", BlendOptions,
                          "pieces"))], None),
    "block": (Annotated[str | None, typer.Option(
        help="droidspeak: the layers a:b (a included, b not) the receiver recomputes from the sender's hidden "
             "state. (default: profiled on the calibration items, or taken from a block --profile)")], None),
    "max_recompute": (Annotated[float | None, typer.Option(
        parser=fraction, metavar="FRACTION", help=options_help(
            "droidspeak: the longest block profiling may pick, as a fraction of the layers (0 < FRACTION <= 1).",
            DroidSpeakOptions, "max_recompute"))], None),
    "block_tolerance": (Annotated[float | None, typer.Option(
        min=0, help=options_help("droidspeak: how far (nats per answer token) below the receiver's own prefill "
                                 "a profiled block may score.", DroidSpeakOptions, "tolerance"))], None),
    "out_dir": (OutDir, None),
    "overwrite": (RunOverwrite, False),
    "resume": (Resume, None),
    "quiet": (Quiet, False),
}
assert set(_RUN_OPTIONS) == {f.name for f in fields(RunOptions)}


def run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the shared run options to ``command``'s signature; the command receives them as ``run``."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "run"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
              for name, (annotation, default) in _RUN_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        run = RunOptions(**{name: kwargs.pop(name) for name in _RUN_OPTIONS})
        return command(run=run, **kwargs)

    wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared)
    return wrapper


METHOD_HELP = f"Methods: {names(METHODS.names())}."
CODEC_HELP = f"Codecs: {names(codec_names())}."


def check_method_name(name: str) -> None:
    """Refuses an unknown method name (with the nearest one) before anything loads."""
    METHODS.get(name.partition("@")[0])


def parse_block(spec: str) -> tuple[int, int]:
    """``a:b`` as a block of layers (checked against the depth when the method is set up)."""
    start, colon, stop = spec.partition(":")
    try:
        if not colon:
            raise ValueError
        block = int(start), int(stop)
    except ValueError:
        raise ConfigError(f"--block {spec!r} is not a:b (two layer indices, e.g. 4:9)") from None
    if not 0 <= block[0] < block[1]:
        raise ConfigError(f"--block {spec}: needs 0 <= a < b")
    return block


def check_layers(spec: str, depth: int | None) -> list[int]:
    """Parses a layer list, against the model's depth where it is known without loading it."""
    return parse_layers(spec, depth)


def check_output(path: Path, what: str = "results", overwrite: bool = True, given_as: str = "--out") -> Path:
    """Refuses an output path that is a folder (a finished run would have nowhere to go), and an
    existing file unless ``overwrite``; ``given_as`` names the option or argument that gave it."""
    if path.is_dir():
        raise ConfigError(f"{given_as} {path} is a folder; give a file name for the {what}")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it, or give another {given_as}")
    check_writable(path, given_as, path.absolute().parents)
    return path


def check_folder(path: Path, given_as: str) -> Path:
    """Refuses a folder for outputs that is a file or sits where nothing can be written (before, found
    after the work, with a traceback); ``given_as`` names the option that gave it."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{given_as} {path} is a file, not a folder")
    check_writable(path, given_as, (path.absolute(), *path.absolute().parents))
    return path


def check_writable(path: Path, given_as: str, folders: Iterable[Path]) -> None:
    """The nearest of ``folders`` that exists (where ``path`` would be made) is a folder this
    process can write in (before, the write failed after the work, with a traceback)."""
    blocked = next((folder for folder in folders if folder.exists()), None)
    if blocked is not None and not blocked.is_dir():
        raise ConfigError(f"{given_as} {path}: {blocked} is a file, not a folder")
    if blocked is None:
        return
    try:  # a file made and removed at once: os.access says yes to root everywhere (/proc, a read-only mount)
        with tempfile.TemporaryFile(dir=blocked):
            pass
    except OSError as err:
        raise ConfigError(f"{given_as} {path}: cannot write in {blocked} (a test file could not be made there: "
                          f"{err.strerror or err})") from None


def remove_replaced(paths: Sequence[Path]) -> None:
    """An earlier run's files, which --overwrite replaces: removed once the models have loaded (a
    run that cannot load leaves them), and before the run writes (a run that then fails leaves no
    earlier run's file to be taken for its own)."""
    for path in paths:
        path.unlink(missing_ok=True)


def check_output_and_plot(path: Path, what: str = "results", overwrite: bool = True) -> tuple[Path, Path]:
    """The output file (checked as by :func:`check_output`) and the plot written beside it (its
    name with ``.png``, checked too): refused where the two would be one file (``--out x.png``)."""
    check_output(path, what, overwrite)
    plot = path.with_suffix(".png")
    if plot == path:
        raise ConfigError(f"--out {path}: the plot is written beside the {what} as {plot.name}; give the {what} "
                          "another name (e.g. .json)")
    return path, check_output(plot, "plot", overwrite)


@contextlib.contextmanager
def quiet_libraries(quiet: bool = True) -> Iterator[None]:
    """``-q``: inside, transformers logs errors only and, like the hub, shows no progress bars, and
    the Python warnings that transformers, peft and the hub raise are hidden; their settings are
    restored on leaving."""
    if not quiet:
        yield
        return
    import huggingface_hub.utils as hub
    from transformers.utils import logging

    verbosity, bars, hub_bars = logging.get_verbosity(), logging.is_progress_bar_enabled(), \
        not hub.are_progress_bars_disabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(transformers|peft|huggingface_hub)(\..*)?$")
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
        if hub_bars:
            hub.enable_progress_bars()


def _data_entry(entry: str, tasks: list[str]) -> tuple[str, Path]:
    """``(task, path)`` of one ``--data`` value: ``TASK=PATH``, or ``PATH`` in a run of one task."""
    task, given, path = entry.partition("=")
    if given and task in TASKS:
        if task not in tasks:
            raise ConfigError(f"--data {entry}: task {task!r} is not in this run (--task {','.join(tasks)})")
        return task, Path(path)
    if given and not Path(entry).exists() and _TASK_PREFIX.fullmatch(task + "="):
        TASKS.get(task)  # "countrys=…": an unknown task, with the nearest name
    if len(tasks) > 1:
        raise ConfigError(f"--data {entry}: with several tasks, say which one a file is for: --data TASK=PATH")
    return tasks[0], Path(entry)

