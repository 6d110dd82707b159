"""Side by side: llm-loadtest's agent, guidellm and aiperf against the same pinned mock.

    .venv/bin/python bench/peers/run.py                 # installs the peers once, ~6 minutes
    .venv/bin/python bench/peers/run.py --streams 16,128 --duration 15

The peers are installed from PyPI into their own environment, `bench/.peers-venv` (never
the project's venv): `guidellm==0.8.1` and `aiperf==0.13.0`, by pip, on first use. Both
want a Hugging Face tokenizer; with no hub reachable, a word-level tokenizer (one token per
whitespace-separated word, as the mock counts) is built locally with `tokenizers` into
`bench/.peers-venv/word-tokenizer` and handed to both.

For each stream count (16, 128, 512) a fresh mock (`--ttft-ms 100 --itl-ms 10
--output-tokens 128`, pinned to CPU 0) serves each client in turn; the client runs pinned
to CPU 1 for `--duration` seconds. CPU per 1000 output tokens is measured the same way for
every client: the CPU time of its whole process tree (peers start helper processes) over
the tokens the mock wrote, in the steady window (from `--warmup` s to 1 s before the end;
for a peer, counted from the mock's first token to it, as the peers take seconds to start).
TTFT p99 error is the client's own reported TTFT p99 minus the injected 100 ms (ours: from
its samples in the window; peers: from their JSON export, over their whole run). A peer
that cannot be installed or run is reported with the reason, and the rest still runs.
Printed: a table of every figure and the ratios (their CPU per token / ours, their TTFT
error / ours).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import CLIENT_CPU, ROOT, machine, measure, mock_server, pin, run_client, table

VENV = ROOT / "bench" / ".peers-venv"
PY = VENV / "bin" / "python"
TOKENIZER = VENV / "word-tokenizer"
PACKAGES = ("guidellm==0.8.1", "aiperf==0.13.0")
TTFT_MS, ITL_MS, TOKENS = 100.0, 10.0, 128


def ensure_venv() -> str:
    """Create the peers' venv and install them if needed; '' or why it failed."""
    try:
        if not PY.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
        missing = [p for p in PACKAGES if not (VENV / "bin" / p.split("==")[0]).exists()]
        if missing:
            print(f"installing {' '.join(missing)} into {VENV} ...", flush=True)
            done = subprocess.run(
                [str(PY), "-m", "pip", "install", "-q", *missing],
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
            if done.returncode != 0:
                return f"pip install failed: {done.stderr.strip()[-400:]}"
        if not (TOKENIZER / "tokenizer.json").exists():
            build = subprocess.run(
                [str(PY), "-c", _TOKENIZER_SCRIPT, str(TOKENIZER)],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if build.returncode != 0:
                return f"building the local tokenizer failed: {build.stderr.strip()[-400:]}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


_TOKENIZER_SCRIPT = r"""
import json, sys
from pathlib import Path
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
sys.path.insert(0, ROOT_DIR)
from agent.prompts import WORDS
vocab = {"[UNK]": 0, "[PAD]": 1, "<s>": 2, "</s>": 3}
for w in list(WORDS) + ["word", "hi", "the", "of", "and", "to"]:
    vocab.setdefault(w, len(vocab))
tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                               eos_token="</s>")
fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
fast.save_pretrained(sys.argv[1])
""".replace("ROOT_DIR", repr(str(ROOT)))


def peer_command(name: str, url: str, streams: int, duration: float, out: Path) -> list[str]:
    if name == "aiperf":
        return [
            str(VENV / "bin" / "aiperf"),
            "profile",
            "--model",
            "mock",
            "--url",
            url.removesuffix("/v1"),
            "--endpoint-type",
            "chat",
            "--streaming",
            "--tokenizer",
            str(TOKENIZER),
            "--concurrency",
            str(streams),
            "--benchmark-duration",
            str(duration),
            "--synthetic-input-tokens-mean",
            "128",
            "--synthetic-input-tokens-stddev",
            "0",
            "--output-tokens-mean",
            "128",
            "--output-tokens-stddev",
            "0",
            "--output-artifact-dir",
            str(out),
            "--ui-type",
            "none",
            "--no-auto-plot",
        ]
    return [
        str(VENV / "bin" / "guidellm"),
        "run",
        "--backend",
        f"kind=openai_http,target={url.removesuffix('/v1')}",
        "--profile",
        f"kind=concurrent,streams={streams}",
        "--constraint",
        f"kind=max_duration,seconds={duration}",
        "--data",
        "kind=synthetic_text,prompt_tokens=128,output_tokens=128",
        "--tokenizer",
        f"kind=huggingface_auto,model={TOKENIZER}",
        "--output",
        f"kind=json,path={out / 'guidellm.json'}",
        "--disable-console-interactive",
    ]


def find_ttft_p99(obj: Any) -> float | None:
    """The first p99 under a key naming time to first token, anywhere in a JSON export."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if "time_to_first_token" in str(key).lower() or str(key).lower() == "ttft":
                found = _p99(value)
                if found is not None:
                    return found
        for value in obj.values():
            found = find_ttft_p99(value)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for value in obj:
            found = find_ttft_p99(value)
            if found is not None:
                return found
    return None


def _p99(obj: Any) -> float | None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if str(key).lower() in ("p99", "p99_ms", "percentile_99") and isinstance(value, int | float):
                return float(value)
        for value in obj.values():
            found = _p99(value)
            if found is not None:
                return found
    return None


def run_peer(name: str, url: str, streams: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{name}-{streams}"
    out.mkdir()
    log_path = out / "log.txt"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            peer_command(name, url, streams, args.duration, out),
            stdout=log,
            stderr=log,
            cwd=out,
            preexec_fn=pin(CLIENT_CPU),  # noqa: PLW1509
        )
        try:
            window = measure(proc, url, args.warmup, args.duration, first_token_within_s=args.peer_startup)
            proc.wait(args.duration + args.peer_startup + 300)
        except Exception as exc:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            return {"error": f"{exc}; log tail: {_tail(log_path)}"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}; log tail: {_tail(log_path)}"}
    ttft = None
    for path in sorted(out.rglob("*.json")):
        try:
            ttft = find_ttft_p99(json.loads(path.read_text()))
        except ValueError:
            continue
        if ttft is not None:
            break
    if ttft is not None and ttft > 10_000:  # reported in µs or ns
        ttft = ttft / 1000.0 if ttft < 1e7 else ttft / 1e6
    return {
        "cpu": window.cpu_ms_per_1k_tokens,
        "ttft_err": (ttft - TTFT_MS) if ttft is not None else math.nan,
        "tok_s": window.tokens_per_s,
    }


def _tail(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-4:])[-600:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="16,128,512", help="comma-separated stream counts (default: %(default)s)")
    parser.add_argument("--peers", default="guidellm,aiperf", help="which peers (default: %(default)s)")
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds of load per client (default: %(default)s)"
    )
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before the window (default: %(default)s)")
    parser.add_argument(
        "--peer-startup",
        type=float,
        default=120.0,
        help="at most this many seconds for a peer's first token; its window starts --warmup s "
        "after that token (default: %(default)s)",
    )
    args = parser.parse_args()
    print(machine())
    problem = ensure_venv()
    peers = args.peers.split(",")
    if problem:
        print(f"peers unavailable: {problem}")
    rows, ratios, notes = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp_dir:
        tmp = Path(tmp_dir)
        for streams in [int(s) for s in args.streams.split(",")]:
            with mock_server(TTFT_MS, ITL_MS, TOKENS) as url:
                ours = run_client("agent", url, streams, args.duration, args.warmup, tmp)
            our_cpu, our_err = ours.window.cpu_ms_per_1k_tokens, ours.ttft_p99_error_ms(TTFT_MS)
            rows.append(
                [streams, "llm-loadtest agent", round(our_cpu, 1), round(our_err, 1), round(ours.window.tokens_per_s)]
            )
            print(
                f"  {streams} streams llm-loadtest: {our_cpu:.1f} ms/1k tok, TTFT p99 err {our_err:.1f} ms", flush=True
            )
            for name in peers:
                if problem:
                    notes.append(f"{name} @ {streams}: not run ({problem})")
                    continue
                with mock_server(TTFT_MS, ITL_MS, TOKENS) as url:
                    r = run_peer(name, url, streams, args, tmp)
                if "error" in r:
                    notes.append(f"{name} @ {streams}: could not run: {r['error']}")
                    print(f"  {streams} streams {name}: FAILED", flush=True)
                    continue
                rows.append([streams, name, round(r["cpu"], 1), round(r["ttft_err"], 1), round(r["tok_s"])])
                ratios.append(
                    [
                        streams,
                        name,
                        f"{r['cpu'] / our_cpu:.1f}x",
                        f"{r['ttft_err'] / our_err:.1f}x" if our_err > 0 else "-",
                    ]
                )
                print(
                    f"  {streams} streams {name}: {r['cpu']:.1f} ms/1k tok, TTFT p99 err {r['ttft_err']:.1f} ms",
                    flush=True,
                )
    print()
    print(table(["streams", "client", "CPU ms / 1k tok", "TTFT p99 err ms", "tok/s"], rows))
    if ratios:
        print()
        print(table(["streams", "peer", "their CPU/token / ours", "their TTFT err / ours"], ratios))
    for note in notes:
        print(f"\nNOTE {note}")


if __name__ == "__main__":
    main()
