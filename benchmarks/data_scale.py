"""Benchmark (not a test): preparing the training split at scale, first build vs reuse of the prepared-data cache.

For each size, writes that many synthetic demo records (Gemma/make_demo_data.py's users), then starts 1 and then 2
processes at once, as the ranks of a launch would, each preparing the split with Gemma/train_deepspeed.py's own
calls (load_settings, load_tokenizer, PromptEncoder, build_split) into a fresh cache: one builds, the others wait and
memory-map what it wrote. Then the same again, served from the cache. Each process reports its wall time for the
split, its resident memory before (torch, transformers, datasets and the tokenizer loaded) and at its peak, and the
peak of the preparation workers it started. Prints the table and records it in benchmarks/results/data_scale.md.

    .venv/bin/python benchmarks/data_scale.py [--sizes 10000 100000 1000000] [--ranks 1 2]

    # another setting, e.g. the history kept by relevance (BM25) instead of recency, recorded apart
    .venv/bin/python benchmarks/data_scale.py --sizes 100000 --ranks 1 --set prompt.history_selection=bm25 \
        --set prompt.max_history_items=2 --record benchmarks/results/data_scale_bm25.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "Gemma"))
RECORD_NAME = "data_scale.md"


def write_records(path: Path, count: int) -> None:
    import make_demo_data as demo

    defaults, _ = demo.parse_args([])
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, count, 10_000):
            f.write(demo.to_jsonl(demo.make_user(i, defaults.seed, defaults.occupation_prob, defaults.flip_prob)
                                  for i in range(start, min(count, start + 10_000))))


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, RssAnon, ...), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakPrivateMemory:
    """The peak of RssAnon (memory private to the process, not file pages it has mapped) sampled every 50 ms:
    ru_maxrss also counts the pages of memory-mapped Arrow files the process has read, which the kernel can drop."""

    def __enter__(self) -> PeakPrivateMemory:
        self.peak, self.running = status_mb("RssAnon"), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, status_mb("RssAnon"))
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, status_mb("RssAnon"))


def prepare(train_file: Path, cache: Path, overrides: list[str]) -> dict:
    """One process: the split as a run's rank prepares it (the demo config with `overrides`, profile_and_history)."""
    from finetune.data import build_split
    from finetune.prompts import PromptEncoder, load_tokenizer
    from finetune.settings import load_settings, resolve_path

    config = REPO / "config.json"
    cfg, ablation = load_settings(config, "profile_and_history", overrides)
    tokenizer = load_tokenizer(str(resolve_path(cfg.model.model_name_or_path, config.parent)))
    encoder = PromptEncoder.for_prompt(tokenizer, cfg.training.max_length, cfg.prompt, ablation.study_prompt)
    before, private_before = status_mb("VmRSS"), status_mb("RssAnon")
    started = time.perf_counter()
    with PeakPrivateMemory() as private:
        split = build_split(train_file, "train", cfg, encoder, cache)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "examples": len(split), "rss_before_mb": before, "private_before_mb": private_before,
            "private_peak_mb": private.peak,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_ranks(ranks: int, train_file: Path, cache: Path, overrides: list[str]) -> list[dict]:
    """`ranks` processes preparing the split at once; their reports."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    procs = [subprocess.Popen([sys.executable, __file__, "--prepare", str(train_file), str(cache), *sets],
                              stdout=subprocess.PIPE, text=True) for _ in range(ranks)]
    reports = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a preparing process failed (exit {proc.returncode})")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--record", type=Path, default=REPO / "benchmarks" / "results" / RECORD_NAME)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config.json override for the preparation, as train_deepspeed.py's --set (repeatable)")
    p.add_argument("--prepare", nargs=2, type=Path, help=argparse.SUPPRESS)  # one preparing process (internal)
    args = p.parse_args(argv)
    if args.prepare:
        print(json.dumps(prepare(*args.prepare, args.overrides)))
        return 0
    if args.overrides and args.record == p.get_default("record"):
        p.error("--set changes what is measured: give --record a file of its own (the default holds the demo "
                "config's table).")

    rows = ["| records | ranks | first build: wall (s) | per rank: private before → peak (resident before → peak), MB | "
            "workers' peak resident (MB) | cached: wall (s) | cached, per rank: private (resident), MB |",
            "|---|---|---|---|---|---|---|"]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="data_scale-") as tmp:
        for size in args.sizes:
            train_file = Path(tmp) / f"train_{size}.jsonl"
            write_records(train_file, size)
            for ranks in args.ranks:
                cache = Path(tmp) / f"cache_{size}_{ranks}"
                first = run_ranks(ranks, train_file, cache, args.overrides)
                cached = run_ranks(ranks, train_file, cache, args.overrides)
                def memory(reports: list[dict]) -> str:
                    return ", ".join(f"{r['private_before_mb']:.0f} → {r['private_peak_mb']:.0f} "
                                     f"({r['rss_before_mb']:.0f} → {r['rss_peak_mb']:.0f})" for r in reports)

                row = (f"| {size:,} | {ranks} | {max(r['wall_s'] for r in first):.1f} | {memory(first)} | "
                       f"{max(r['workers_peak_mb'] for r in first):.0f} | {max(r['wall_s'] for r in cached):.2f} | "
                       f"{memory(cached)} |")
                rows.append(row)
                print(row, flush=True)
    record = "\n".join([
        "# Preparing the training split at scale (benchmarks/data_scale.py)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()} "
        f"({len(os.sched_getaffinity(0))} CPUs), Gemma 3 270M's tokenizer, the demo config "
        f"(max_length 256, profile_and_history{', with the --set below' if args.overrides else ''}), synthetic demo "
        f"records; `.venv/bin/python benchmarks/data_scale.py "
        f"--sizes {' '.join(map(str, args.sizes))} --ranks {' '.join(map(str, args.ranks))}"
        f"{''.join(f' --set {shlex.quote(o)}' for o in args.overrides)}` "
        f"({(time.time() - started) / 60:.1f} min in all).",
        "Wall: the slowest rank, from build_split's call to its return. Private: the process's RssAnon (sampled every "
        "50 ms), the memory that is its own; resident: ru_maxrss, which also counts the pages of memory-mapped Arrow "
        "files the process has read (page cache the kernel can drop). The preparation workers a rank started "
        "(data.preprocessing_num_workers, default one per CPU from 20,000 records) are reported apart, resident.",
        "",
        *rows,
        "",
    ])
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(record, encoding="utf-8")
    print(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
