"""Receiver time to first token over a shaped link: two network namespaces, a veth pair, `tc tbf`.

The sender agent (`kvcomm serve`) runs in one namespace, this process (the receiver) in the
other; the link between them is shaped with a token bucket (`tc qdisc ... tbf`) at each
``--rates`` Mbit/s, both directions (this kernel has `tbf` but not `netem`: no added delay). Per
rate, context length and method, the receiver's time to first token, median of ``--runs``:

- kvcomm with each codec: GET of the stored message over the link, decoded layer by layer while
  it arrives, and the question's prefill running layer by layer behind it (``Client.arriving``:
  layer l of the prefill starts once layer l is decoded), then one token; ``auto`` is told the
  rate (``bandwidth_mbit``) and its choice is reported; ``auto-prefill`` is told the rate and the
  receiver's own computing behind the message (``receiver_compute_s``: this receiver's question
  prefill and first token, timed alone before the rows), which its decoding competes with for the
  CPU; ``auto-measured`` is told nothing: the
  receiver's client declares the link it measured fetching the earlier messages (the measured
  Mbit/s is reported beside the shaped rate). Two kinds of rows show what each overlap saves:
  ``+serial`` decodes while the message arrives but prefills only once it is whole
  (``Client.receive_message``), and ``+whole`` reads the whole body first and then decodes;
- skyline: the context as text (its bytes at the link's rate, computed) + the prefill of context
  and question + one token;
- NLD: the sender's summary as text (bytes at the link's rate) + its prefill with the question +
  one token; the sender's time to write the summary is reported beside it (not in the TTFT).

``--linears dense,packed`` measures every row once per way the receiver's linear layers compute
(``load_model(..., linear=...)``; the sender agent stays ``dense``), each in its own receiver
process; packed rows are labelled ``(packed)``.

The sender prefills and encodes before any timing (messages are stored, content-addressed).
Everything it creates (namespaces ``kvn-snd``/``kvn-rcv``, the veth pair, addresses 10.231.0.1/2)
is removed at the end, also on errors; nothing else is touched. One run at a time: a second one
exits while the first holds ``/run/lock/kvcomm-network.lock``. Where namespaces cannot be made
(not root, no ``ip``), it says so and exits 0 without measuring.

    sudo python benchmarks/network.py --model smollm2-135m --lengths 1024 --rates 10,100,1000 \\
        --out benchmarks/results/network/network-smollm2.json
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from record import (  # benchmarks/record.py, beside this file
    add_out,
    at_least_one,
    check_out,
    layer_fraction,
    run_record,
    write_json,
)

SENDER_NS, RECEIVER_NS = "kvn-snd", "kvn-rcv"
SENDER_IF, RECEIVER_IF = "kvn-veth-s", "kvn-veth-r"
SENDER_IP, RECEIVER_IP = "10.231.0.1", "10.231.0.2"
QUESTION = "Which city does Omar live in? Answer with the city name only."
SUMMARY_PROMPT = "Summarise the context in at most three sentences, keeping every name and city."


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


LOCK = Path("/run/lock/kvcomm-network.lock")  # held while a run's namespaces exist


class Link:
    """Two namespaces joined by a veth pair; removed on exit, whatever happened. One run at a time
    holds :data:`LOCK` (the names are fixed), so that removing an interrupted run's leftovers never
    removes those of a run still measuring."""

    def __enter__(self) -> Link:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        # no O_TRUNC, and no link followed: /run/lock is anyone's to write in, and this runs as root
        self.lock = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock)
            raise SystemExit(f"another network.py run holds {LOCK} (its namespaces {SENDER_NS}/{RECEIVER_NS} are "
                             "in use): wait for it to finish") from None
        self.close()  # leftovers of an interrupted run
        try:
            sh("ip", "netns", "add", SENDER_NS)
            sh("ip", "netns", "add", RECEIVER_NS)
            sh("ip", "link", "add", SENDER_IF, "type", "veth", "peer", "name", RECEIVER_IF)
            for ns, dev, ip in ((SENDER_NS, SENDER_IF, SENDER_IP), (RECEIVER_NS, RECEIVER_IF, RECEIVER_IP)):
                sh("ip", "link", "set", dev, "netns", ns)
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:  # a step failed (or was interrupted): what the earlier ones made goes too
            self.__exit__()
            raise
        return self

    def shape(self, mbit: float) -> None:
        burst = max(32, int(mbit * 1e6 / 8 / 100 / 1024))  # kB: at least one 10 ms tick of tokens
        for ns, dev in ((SENDER_NS, SENDER_IF), (RECEIVER_NS, RECEIVER_IF)):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
               f"{mbit}mbit", "burst", f"{burst}kb", "latency", "100ms")

    def close(self) -> None:
        for ns in (SENDER_NS, RECEIVER_NS):
            sh("ip", "netns", "del", ns, check=False)  # takes its end of the veth pair with it
        for dev in (SENDER_IF, RECEIVER_IF):  # an end still in the root namespace (deleting one deletes both)
            sh("ip", "link", "del", dev, check=False)

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            os.close(self.lock)  # releases the lock


def can_make_namespaces() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs the `ip` and `tc` commands (iproute2)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    probe = sh("ip", "netns", "add", "kvn-probe", check=False)
    sh("ip", "netns", "del", "kvn-probe", check=False)
    return None if probe.returncode == 0 else f"cannot create a network namespace: {probe.stderr.strip()}"


def outer(args: argparse.Namespace) -> None:
    from kvcomm.models.packing import LINEARS

    unknown = [way for way in args.linears.split(",") if way not in LINEARS]
    if unknown:
        raise SystemExit(f"--linears: unknown {', '.join(map(repr, unknown))}; valid: {', '.join(LINEARS)}")
    reason = can_make_namespaces()
    if reason is not None:
        print(f"skipped: {reason}")
        return
    record = run_record(args)  # taken at the start: the code that ran
    rows: list[dict] = []
    layers: list[int] | None = None
    env = {**os.environ, "KVCOMM_LOG_LEVEL": "warning"}
    env.pop("KVCOMM_LINEAR", None)  # the sender computes as usual; --linears applies to the receiver
    with Link() as link:
        sender = subprocess.Popen(["ip", "netns", "exec", SENDER_NS, sys.executable, "-m", "kvcomm", "serve",
                                   "--model", args.model, "--host", SENDER_IP, "--port", str(args.port),
                                   "--max-request-mb", "1024", "--timeout", "3000"], env=env)
        try:
            for rate in (float(r) for r in args.rates.split(",")):
                link.shape(rate)
                print(f"link shaped to {rate:g} Mbit/s", flush=True)
                for linear in args.linears.split(","):
                    part = Path(f"{args.out}.part-{rate:g}-{linear}.json")
                    subprocess.run(["ip", "netns", "exec", RECEIVER_NS, sys.executable, __file__, "--inner",
                                    "--rate", str(rate), "--model", args.model, "--lengths", args.lengths,
                                    "--codecs", args.codecs, "--serial", args.serial, "--whole", args.whole,
                                    "--ratio", str(args.ratio), "--linears", linear,
                                    "--runs", str(args.runs), "--threads", str(args.threads),
                                    "--port", str(args.port), "--out", str(part)], check=True, env=env)
                    measured = json.loads(part.read_text())
                    rows += measured["rows"]
                    layers = measured["layers"]
                    part.unlink()
        finally:
            sender.terminate()
            sender.wait(timeout=60)
    report(args, rows, {**record, "layers": layers})


def inner(args: argparse.Namespace) -> None:
    import torch
    from ttft import context_of, first_token, middle_layers  # benchmarks/ttft.py

    from kvcomm import Client, load_model
    from kvcomm.protocol import empty_input, receiver_input
    from kvcomm.wire import KVMessage, check_fingerprint

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, linear=args.linears)
    label = "" if args.linears == "dense" else f" ({args.linears})"
    url = f"http://{SENDER_IP}:{args.port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            httpx.get(f"{url}/healthz", timeout=2).raise_for_status()
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise SystemExit("the sender agent did not come up") from None
            time.sleep(1)
    client = Client(url, timeout=3000)
    layers = middle_layers(model.num_layers, args.ratio)
    wire = args.rate * 1e6 / 8  # bytes per second
    asked = f"Question: {QUESTION}"
    question = model.encode_message(asked)
    first_token(model, empty_input(model.model, 1), model.encode_message("warm up"))
    rows = []

    def question_alone() -> float:
        began = time.perf_counter()
        first_token(model, empty_input(model.model, 1), question)
        return time.perf_counter() - began

    question_alone()
    compute_s = round(statistics.median(question_alone() for _ in range(5)), 3)  # what auto-prefill declares

    def median(measure, *given) -> float:
        return statistics.median(measure(*given) for _ in range(args.runs))

    def text_ttft(prompt: str) -> float:
        began = time.perf_counter()
        first_token(model, empty_input(model.model, 1), model.encode_message(prompt))
        return time.perf_counter() - began

    def kv_ttft(message_id: str, how: str) -> float:
        began = time.perf_counter()  # the question is tokenised inside, as the skyline's prompt is
        if how == "pipelined":  # prefill layer l once layer l is in, while the rest arrives
            with client.arriving(message_id, receiver=model.fingerprint) as arrival:
                first_token(model, arrival.receiver_input(model.dtype), model.encode_message(asked))
            return time.perf_counter() - began
        if how == "serial":  # decode layer i while layer i+1 arrives, prefill once all is in
            message = client.receive_message(message_id, receiver=model.fingerprint)
        else:
            message = KVMessage.from_bytes(client.get_message(message_id))
            check_fingerprint(message.fingerprint, model.fingerprint)
        first_token(model, receiver_input(message.to_shared(model.dtype)), model.encode_message(asked))
        return time.perf_counter() - began

    for length in (int(x) for x in args.lengths.split(",")):
        context = context_of(model, length)
        text_ttft(f"Context: {context} Question: {QUESTION}")  # untimed: first calls fill caches
        sky = median(text_ttft, f"Context: {context} Question: {QUESTION}") + len(context.encode()) / wire
        base = {"rate_mbit": args.rate, "context_tokens": len(model.encode_message(context)),
                "linear": args.linears}
        rows.append({**base, "method": f"skyline{label}", "bytes": len(context.encode()), "ttft_s": sky})
        began = time.perf_counter()
        summary = client.chat([{"role": "user", "content": f"{context}\n\n{SUMMARY_PROMPT}"}], max_tokens=64)
        summary_s = time.perf_counter() - began
        summary_text = summary["choices"][0]["message"]["content"]
        nld = median(text_ttft, f"Context: {summary_text} Question: {QUESTION}")
        rows.append({**base, "method": f"nld{label}", "bytes": len(summary_text.encode()),
                     "ttft_s": nld + len(summary_text.encode()) / wire, "sender_summary_s": summary_s})
        for codec in args.codecs.split(","):
            measured = codec == "auto-measured"  # no bandwidth given: the client's measurement of this link
            told = codec in ("auto", "auto-prefill")
            sent = client.create_context(context, layers=layers, codec="auto" if codec.startswith("auto") else codec,
                                         bandwidth_mbit=args.rate if told else None,
                                         receiver_compute_s=compute_s if codec == "auto-prefill" else None)
            kv_ttft(sent["id"], "pipelined")  # untimed: compiles the codec's kernels, loads its codebook
            choice = sent.get("codec_choice")
            chosen = {"chosen": choice["chosen"], "expected_s": {name: estimate["seconds"] for name, estimate
                                                                 in choice["candidates"].items()}} if choice else {}
            if measured:
                chosen |= {"measured_mbit": sent["bandwidth_mbit"], "bandwidth_source": sent["bandwidth_source"]}
            if codec == "auto-prefill":  # what auto was told (rounded to two figures), and what was measured
                chosen |= {"receiver_compute_s": choice["receiver_compute_s"], "measured_compute_s": compute_s}
            rows.append({**base, "method": f"kvcomm {codec}{label}", "bytes": sent["bytes"],
                         "ttft_s": median(kv_ttft, sent["id"], "pipelined"), **chosen})
            for how in ("serial", "whole"):
                if codec in getattr(args, how).split(","):
                    rows.append({**base, "method": f"kvcomm {codec}+{how}{label}", "bytes": sent["bytes"],
                                 "ttft_s": median(kv_ttft, sent["id"], how)})
        for row in rows:
            if row["context_tokens"] == base["context_tokens"]:
                row["speedup_vs_skyline"] = sky / row["ttft_s"]
    write_json(args.out, {"rows": rows, "layers": layers})


def report(args: argparse.Namespace, rows: list[dict], record: dict | None = None) -> None:
    """Prints the table and writes the JSON (with ``record``: the run's provenance, environment and
    the layers sent) and the plot."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"receiver TTFT over a shaped link · {args.model} · ratio {args.ratio} · median of {args.runs}")
    for column in ("Mbit/s", "context tokens", "method", "bytes", "TTFT s", "× vs skyline", "note"):
        table.add_column(column, justify="right")
    for r in rows:
        note = f"chose {r['chosen']}" if "chosen" in r else (f"summary took {r['sender_summary_s']:.1f} s"
                                                            if "sender_summary_s" in r else "")
        if r.get("bandwidth_source") is not None:
            note += f" for {r['measured_mbit']:g} Mbit/s ({r['bandwidth_source']})"
        if "receiver_compute_s" in r:
            note += f", told {r['receiver_compute_s']:g} s of prefill"
        table.add_row(f"{r['rate_mbit']:g}", str(r["context_tokens"]), r["method"], f"{r['bytes']:,}",
                      f"{r['ttft_s']:.3f}", f"{r['speedup_vs_skyline']:.1f}", note)
    Console(width=150).print(table)
    write_json(args.out, {**(record or {}), "model": args.model, "ratio": args.ratio, "runs": args.runs,
                          "threads": args.threads, "rows": rows})
    plot(rows, args.out.with_suffix(".png"), args.model)
    print(f"written: {args.out} and {args.out.with_suffix('.png')}")


def plot(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["context_tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r["rate_mbit"], r["ttft_s"]) for r in rows
                            if r["method"] == method and r["context_tokens"] == length)
            style = "--" if method.startswith(("skyline", "nld")) else "-"
            ax.plot(*zip(*points), style, marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="link bandwidth (Mbit/s)", ylabel="receiver TTFT (s)",
               title=f"{model}, {length} context tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--rates", default="10,100,1000", help="link bandwidths, Mbit/s")
    parser.add_argument("--codecs", default="fp16,int8,int4-ans,klt,auto,auto-prefill,auto-measured")
    parser.add_argument("--serial", default="klt",
                        help="codecs also measured prefilling only once the message is whole (+serial)")
    parser.add_argument("--whole", default="none", help="codecs also measured reading the whole body first (+whole)")
    parser.add_argument("--ratio", type=layer_fraction, default=0.5, help="fraction of layers shared (middle block)")
    parser.add_argument("--runs", type=at_least_one, default=3)
    parser.add_argument("--linears", default="dense",
                        help="how the receiver's linear layers compute: dense, packed, or both (dense,packed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the receiver (0: torch's default)")
    parser.add_argument("--port", type=int, default=8141)
    add_out(parser)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:  # its --out is the outer run's part file
        inner(args)
    else:
        check_out(parser, args)
        outer(args)


if __name__ == "__main__":
    main()
