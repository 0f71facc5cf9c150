"""Speed benchmark on the CPU: Gemma/train_deepspeed.py vs TRL's SFTTrainer (full and LoRA each) vs a bare loop.

    .venv/bin/python benchmarks/speed.py [--model tiny|MODEL_DIR] [--repeats 3] [--steps 20] [--same_batches]
        [--runners RUNNER ...] [--profile] [--output FILE]

(install the benchmark-only packages first: .venv/bin/pip install -r benchmarks/requirements.txt)

The real model, Gemma 3 270M (the demo model), every main runner on the same batches:

    .venv/bin/python benchmarks/speed.py --model Gemma/models/gemma-3-270m --same_batches --repeats 3 --steps 8 \\
        --output benchmarks/results/speed_gemma-3-270m.md

On 2 cores a LoRA launch of the real model takes about 20-25 s of start-up plus 12 s/step (ours) or 21 s/step (TRL);
the full fine-tuning runners are slower and need about 5 GB of RAM per process (10+ GB for a launch): check
`free -g` first. (DeepSpeed's CPU all-reduce buffers, /dev/shm/deepspeed_allreduce_buffer_*, 66 MB per process, used
to outlive every launch; finetune.runtime now unlinks them, and the benchmark warns when old ones fill /dev/shm.)
Size --steps from the launch wall column of a short run (e.g. --repeats 1 --steps 3).

The tiny model (the default; a few minutes): .venv/bin/python benchmarks/speed.py
Only some runners: --runners "ours, LoRA" "TRL SFTTrainer, LoRA" (names as in the report's table).

Everything runs in this one invocation so that ratios are fair on a noisy, shared machine: each measurement is
repeated (--repeats), the runners take turns within each repeat (the order rotates between repeats), and the table
gives the median with the spread (min-max). Ratios between runners are taken within a repeat (e.g. ours / TRL of the
same repeat), then summarised the same way.

Setup: the model (--model: "tiny", a tiny random Gemma 3 from tests/tiny_gemma.py (hidden 64, 2 layers, vocab ~1k)
built in a temporary directory; or a model directory such as Gemma/models/gemma-3-270m), the shipped demo training
data (Gemma/data/demo/train.jsonl, 2,000 users) and the shipped config.json's training and DeepSpeed settings (batch 4
per process, max_length 256, bf16, activation checkpointing, ZeRO-3 with parameters and optimizer offloaded to the
CPU), with the model swapped for the chosen one, no validation or test file, no checkpoint before the end, and --steps
optimizer steps. 2 processes, OMP_NUM_THREADS=1 each. One untimed warm-up launch of our script (3 steps; full
fine-tuning, or LoRA when "ours" itself is not measured) comes first (DeepSpeed's compiled ops, file cache); it also
writes the DeepSpeed JSON that both TRL runners reuse (the report says whether each run of ours wrote the same one).

Runners (each a separate 2-process launch; the same token sequences). Default: the first five; "ours, plain padded"
too with the tiny model (without --same_batches); --runners picks any of them, in that order of turns. TRL and the
bare loop train the same shuffled, padded batches; ours does too with --same_batches (every run of ours gets
`--set training.group_by_length=false --set training.padding_free=false`), otherwise it uses its default batching
(length-grouped). The report checks which runners trained the same batches (token counts of every micro-batch).
- "ours": `accelerate launch --use_deepspeed --num_processes 2` of train_deepspeed.py's main()
  (benchmarks/ours_probed.py), full fine-tuning.
- "ours, LoRA": the same with `--set lora.enabled=true` (peft, lora defaults: r 16, alpha 32, dropout 0.05,
  "all-linear" = every nn.Linear under the decoder, adapters in bf16).
- "TRL SFTTrainer": benchmarks/trl_sft.py, SFTTrainer with the same DeepSpeed JSON and settings, full fine-tuning.
- "TRL SFTTrainer, LoRA": the same with --lora: SFTTrainer(peft_config=peft.LoraConfig(r=16, lora_alpha=32,
  lora_dropout=0.05, target_modules=the decoder's linear layers as one regular expression, bias="none",
  task_type="CAUSAL_LM")), the same DeepSpeed JSON. TRL 1.16 under ZeRO-3 keeps the adapters in bf16 as ours
  (autocast_adapter_dtype=False) but forces reentrant activation checkpointing (ours: non-reentrant). Both TRL
  runners compute the LM head at every position and TRL's entropy and token accuracy each step.
- "bare PyTorch loop": benchmarks/bare_loop.py, torch.distributed gloo + DDP, bf16 AdamW, full fine-tuning, no ZeRO,
  offload or checkpointing; the loss is the usual `model(input_ids, attention_mask, labels=...).loss`, from the full
  logits (LM head at every position, logits_to_keep=0), where ours computes the LM head at labelled positions only.
- "ours, plain padded": ours with `--set training.group_by_length=false --set training.padding_free=false` (skipped
  when the measured script has no such keys).
The LoRA runners are skipped when the measured script has no lora section or peft is missing, the TRL ones when trl
is missing.
All are timed the same way (benchmarks/step_probe.py): a step lasts from one step's end to the next, median over
steps 3..N; tokens/s = real (non-padding) tokens of both ranks over those steps / their wall time (the first two steps
under DeepSpeed carry one-off costs: on Gemma 3 270M, step 2 took 1.8x (ours) to 4x (ours, LoRA) a later step, the
bare loop's did not; left in, they dominated tokens/s of a short launch); peak RSS
per rank (getrusage: the whole launch, model loading included). For ours, results.json's own "throughput" figures are
shown too (they time a step from on_step_begin to on_step_end, i.e. without fetching and collating the batch). The
report's ratio section gives, per pair, s/step A / B and tokens/s A / B of the same repeat: ours / TRL (full), ours /
TRL (LoRA), LoRA / full, and every runner / bare.

Also measured: padding efficiency (real / processed tokens) over one whole epoch of the demo data, with plain random
batches and with length-grouped batches, for the trained model's tokenizer and the real Gemma 3 tokenizer; and the time
to tokenize and build the demo training split (finetune.data.build_split), in this process.
--profile (about 4 more minutes with the tiny model) adds three variants of ours to the rotation, each pricing one
cost seen in the profile (reduce_bucket_size=auto: transformers' hidden_size^2 bucket, one gradient reduce-scatter per
h^2 elements, instead of the script's 5e7 floor; cpu_checkpointing=false: no save_on_cpu wrapper;
activation_checkpointing=false: no recomputation), and one launch of ours with cProfile on rank 0 over steps 2..N,
reported as per-step costs.

The measured train_deepspeed.py is copied into the work directory at the start (so an edit during the benchmark
cannot mix versions); --gemma_dir measures another copy (e.g. an older commit's, from `git show`).
A launch that runs past --launch_timeout (default 900 s with the tiny model, 3 h with a model directory) is killed and
reported as failed; the others go on.

Output: a Markdown report printed and written atomically to benchmarks/results/speed.md (--output to change).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
VENV_BIN = Path(sys.executable).parent
DEMO_TRAIN = REPO / "Gemma" / "data" / "demo" / "train.jsonl"
REAL_MODEL = REPO / "Gemma" / "models" / "gemma-3-270m"
ABLATION = "profile_and_history"
WARMUP_STEPS = 2  # steps left out of every timing: DeepSpeed's one-off costs fall in them (module docstring)
PLAIN_BATCHING = ["training.group_by_length=false", "training.padding_free=false"]
# Variants of ours: (--set overrides, extra environment, zero_optimization keys changed in a copy of the generated
# DeepSpeed JSON passed as --deepspeed_config). The first two are the main table's; --profile adds the rest to price
# single costs seen in the profile (each is compared with "ours" of the same repeat).
OURS_VARIANTS: dict[str, tuple[list[str], dict[str, str], dict]] = {
    "ours": ([], {}, {}),
    # LoRA with the lora section's defaults (r 16, alpha 32, dropout 0.05, all-linear); TRL's LoRA runner mirrors them.
    "ours, LoRA": (["lora.enabled=true"], {}, {}),
    "ours, plain padded": (PLAIN_BATCHING, {}, {}),
    # transformers' "auto" reduce bucket is hidden_size^2 elements (4,096 for the tiny model, 409,600 for Gemma 3
    # 270M): one reduce-scatter per bucket. The generated config now floors it at 5e7 elements; this prices that.
    "ours, reduce_bucket_size=auto (h^2)": ([], {}, {"reduce_bucket_size": "auto"}),
    # Our save_on_cpu wrapper around each checkpointed layer (copies and counts the saved layer inputs).
    "ours, cpu_checkpointing=false": (["deepspeed.cpu_checkpointing=false"], {}, {}),
    # No recomputation in backward at all.
    "ours, activation_checkpointing=false": (["training.activation_checkpointing=false"], {}, {}),
}
PROFILE_VARIANTS = ["ours, reduce_bucket_size=auto (h^2)", "ours, cpu_checkpointing=false",
                    "ours, activation_checkpointing=false"]
MAIN_RUNNERS = ["ours", "ours, LoRA", "TRL SFTTrainer", "TRL SFTTrainer, LoRA", "bare PyTorch loop"]
ALL_RUNNERS = MAIN_RUNNERS + ["ours, plain padded"] + PROFILE_VARIANTS
LORA_RUNNERS = ["ours, LoRA", "TRL SFTTrainer, LoRA"]
TRL_RUNNERS = ["TRL SFTTrainer", "TRL SFTTrainer, LoRA"]
BARE = "bare PyTorch loop"
# Pairs compared within each repeat in the report's ratio section (A, B): A / B; "every runner / bare" is added.
RATIO_PAIRS = [("ours", "TRL SFTTrainer"), ("ours, LoRA", "TRL SFTTrainer, LoRA"), ("ours, LoRA", "ours"),
               ("TRL SFTTrainer, LoRA", "TRL SFTTrainer")]
# One launch; a hung run is killed (whole process tree) and reported, the rest go on. --launch_timeout overrides.
RUN_TIMEOUT_S = {"tiny": 900, "model directory": 3 * 3600}


# ----------------------------------------------------------------------------------------------------------------------
# Settings and environment
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny",
                   help='"tiny" (a tiny random Gemma 3, tests/tiny_gemma.py) or a model directory, e.g. '
                        f"{REAL_MODEL.relative_to(REPO)} (default: %(default)s)")
    p.add_argument("--runners", nargs="+", choices=ALL_RUNNERS, default=None, metavar="RUNNER",
                   help="the runners to launch, in this order of turns (default: " + ", ".join(map(repr, MAIN_RUNNERS))
                        + ", and 'ours, plain padded' with the tiny model); any of: " + ", ".join(map(repr, ALL_RUNNERS)))
    p.add_argument("--same_batches", action="store_true",
                   help="every run of ours with plain padded batches in the shuffled order (training.group_by_length="
                        "false, padding_free=false), so that all runners train the same batches (checked in the report)")
    p.add_argument("--launch_timeout", type=float, default=None,
                   help="seconds before one launch is killed (default: 900 with the tiny model, 10800 otherwise)")
    p.add_argument("--repeats", type=int, default=3, help="launches per runner (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per launch (default: %(default)s)")
    p.add_argument("--profile", action="store_true", help="also profile one run of ours (cProfile, rank 0)")
    p.add_argument("--gemma_dir", type=Path, default=None,
                   help="directory holding the train_deepspeed.py to measure, next to an ablation_configs/ "
                        "(default: this repository's Gemma/)")
    p.add_argument("--output", type=Path, default=BENCH / "results" / "speed.md", help="report (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs' files here (default: a temporary "
                   "directory, deleted at the end unless a run failed)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < WARMUP_STEPS + 2:
        p.error(f"--repeats must be at least 1 and --steps at least {WARMUP_STEPS + 2} (the first {WARMUP_STEPS} "
                "steps are left out of the timings)")
    if args.model != "tiny" and not (Path(args.model) / "config.json").is_file():
        p.error(f"--model: {args.model} is neither \"tiny\" nor a model directory (no config.json)")
    if args.runners is not None:
        args.runners = list(dict.fromkeys(args.runners))
    if args.launch_timeout is None:
        args.launch_timeout = RUN_TIMEOUT_S["tiny" if args.model == "tiny" else "model directory"]
    return args


def subprocess_env(gemma_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONWARNINGS="ignore::FutureWarning", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["SPEED_BENCH_GEMMA_DIR"] = str(gemma_dir.resolve())
    return env


def machine_description() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        vm = psutil.virtual_memory()
        mem = f", {vm.total / 2**30:.0f} GiB RAM ({vm.available / 2**30:.1f} GiB available now)"
    except ImportError:
        mem = ""
    return f"{model}, {os.cpu_count()} logical cores{mem}, {platform.system()} {platform.release()}"


def leaked_shm_bytes() -> int:
    """Bytes held in /dev/shm by DeepSpeed's CPU all-reduce buffers (deepspeed_allreduce_buffer_*): each launch on a
    new port leaves its pair behind, and they take RAM until deleted."""
    try:
        return sum(f.stat().st_size for f in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    except OSError:
        return 0


def library_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"python {platform.python_version()}"]
    for name in ("torch", "transformers", "accelerate", "deepspeed", "datasets", "trl"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


# ----------------------------------------------------------------------------------------------------------------------
# Setup: model, benchmark config
# ----------------------------------------------------------------------------------------------------------------------


def prepare_model(choice: str, work: Path) -> tuple[Path, str]:
    """The model directory to train and its description for the report: "tiny" builds the tiny random Gemma 3 in the
    work directory; anything else is a model directory, used in place."""
    if choice == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_gemma import build_tiny_gemma

        path = build_tiny_gemma(work / "tiny_gemma")
        return path, "tiny random Gemma 3 from tests/tiny_gemma.py (" + model_shape(path) + ")"
    path = Path(os.path.abspath(choice))  # not resolve(): Gemma/models may be a link, name it as given
    where = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    return path, f"{where} ({model_shape(path)})"


def model_shape(path: Path) -> str:
    """Architecture, size and parameter count (from the safetensors headers) of a model directory."""
    import struct

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or config
    params = 0
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                params += n
    size = f"{params / 1e6:.1f}M parameters, " if params else ""
    return (f"{'/'.join(config.get('architectures') or [config.get('model_type', '?')])}, {size}hidden "
            f"{text.get('hidden_size')}, {text.get('num_hidden_layers')} layers, {text.get('num_attention_heads')} "
            f"heads, vocab {text.get('vocab_size')}")


def write_bench_config(work: Path, model_dir: Path, steps: int) -> Path:
    """The shipped config.json with the chosen model, the demo train file only, and no saving before the end."""
    cfg = json.loads((REPO / "config.json").read_text(encoding="utf-8"))
    cfg["model"]["model_name_or_path"] = str(model_dir)
    cfg["data"]["train_file"] = str(DEMO_TRAIN)
    cfg["data"]["validation_file"] = None
    cfg["data"]["test_file"] = None
    cfg["training"].update(max_steps=steps, eval_steps=None, save_steps=steps + 1_000_000)
    path = work / "bench_config.json"
    path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return path


def snapshot_script(gemma_dir: Path, work: Path) -> tuple[Path, str]:
    """Copy the measured train_deepspeed.py and its package Gemma/finetune/ (and the ablation profiles it reads) into
    the work directory, so that every launch of this benchmark runs the same code even if the files are edited
    meanwhile; returns the copy's Gemma/ directory and a description (path, sha256, git state) for the report."""
    import hashlib

    src = gemma_dir.resolve() / "train_deepspeed.py"
    package = src.parent / "finetune"
    dest = work / "measured"
    (dest / "Gemma").mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest / "Gemma" / "train_deepspeed.py")
    shutil.copytree(package, dest / "Gemma" / "finetune", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(src.parent.parent / "ablation_configs", dest / "ablation_configs", dirs_exist_ok=True)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [src, *sorted(package.glob("*.py"))])).hexdigest()[:12]
    where = str(src.relative_to(REPO)) if src.is_relative_to(REPO) else str(src)
    git = ""
    if src.is_relative_to(REPO):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", str(src), str(package)],
                               cwd=REPO).returncode != 0
        git = f", git {head.stdout.strip()}{' + uncommitted changes' if dirty else ''}"
    return dest / "Gemma", f"{where} (sha256 {digest}{git})"


def measured_config_keys(gemma_dir: Path) -> set[str]:
    """The config sections and training.* keys the measured train_deepspeed.py accepts (to know whether plain
    batching and LoRA can be asked for)."""
    code = ("import dataclasses, sys; sys.path.insert(0, sys.argv[1]); "
            "from finetune.config import Config, TrainingConfig; "
            "print(' '.join(f.name for f in dataclasses.fields(TrainingConfig)), "
            "' '.join('section:' + f.name for f in dataclasses.fields(Config)))")
    out = subprocess.run([sys.executable, "-c", code, str(gemma_dir)], capture_output=True,
                         text=True, timeout=120)
    return set(out.stdout.split())


# ----------------------------------------------------------------------------------------------------------------------
# Launching the runners
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    runner: str
    repeat: int
    ok: bool
    wall_s: float
    log: Path
    probe: dict = field(default_factory=dict)  # summarise_probe()
    results_json: dict = field(default_factory=dict)  # ours only: results.json
    resolved: dict = field(default_factory=dict)  # ours only: resolved_config.json
    setup: dict = field(default_factory=dict)  # TRL only: trl_setup.json (trainable parameters, dtypes, LoRA)
    ds_json_diff: list[str] | None = None  # ours only: keys where its DeepSpeed JSON differs from the one TRL uses
    error: str = ""


def kill_tree(pid: int) -> None:
    """accelerate's workers live in their own sessions: kill the whole tree, children first."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = parent.children(recursive=True) + [parent]
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def launch(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> tuple[int, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            rc = -9
    return rc, time.perf_counter() - started


def accelerate_cmd(script: Path, args: list[str]) -> list[str]:
    return [str(VENV_BIN / "accelerate"), "launch", "--use_deepspeed", "--num_processes", "2", str(script), *args]


def ours_cmd(config: Path, out: Path, probe: Path, steps: int, overrides: list[str], profile: Path | None = None,
             deepspeed_config: Path | None = None):
    args = ["--probe_dir", str(probe)] + (["--cprofile", str(profile)] if profile else []) + [
        "--config", str(config), "--ablation_config", ABLATION, "--output_dir", str(out),
        "--set", f"training.max_steps={steps}"]
    if deepspeed_config is not None:
        args += ["--deepspeed_config", str(deepspeed_config)]
    for item in overrides:
        args += ["--set", item]
    return accelerate_cmd(BENCH / "ours_probed.py", args)


def summarise_probe(probe_dir: Path) -> dict:
    """Per-run figures from the ranks' probe files (see module docstring)."""
    ranks = [json.loads(p.read_text()) for p in sorted(probe_dir.glob("probe_rank*.json"))]
    if not ranks:
        raise RuntimeError(f"no probe files in {probe_dir}")
    r0 = ranks[0]
    ends = r0["step_ends"]
    if len(ends) <= WARMUP_STEPS + 1:
        raise RuntimeError(f"{len(ends)} steps in {probe_dir}: --steps must be at least {WARMUP_STEPS + 2}")
    timed = ends[WARMUP_STEPS - 1:]  # step k lasts from step k-1's end to its own
    intervals = [b - a for a, b in zip(timed, timed[1:])]
    compute = [e - b for b, e in zip(r0["step_begins"][WARMUP_STEPS:], ends[WARMUP_STEPS:])]
    # Micro-batches per optimizer step (gradient accumulation); the warm-up steps' are left out with them.
    per_step = max(1, len(r0["real_tokens"]) // len(ends))
    real_timed = sum(sum(r["real_tokens"][per_step * WARMUP_STEPS:per_step * len(r["step_ends"])]) for r in ranks)
    return {
        "steps": len(ends),
        "s_per_step": statistics.median(intervals),
        "compute_s_per_step": statistics.median(compute),
        "tokens_per_s": real_timed / (timed[-1] - timed[0]),
        "padding_efficiency": sum(sum(r["real_tokens"]) for r in ranks) / sum(sum(r["processed_tokens"]) for r in ranks),
        "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks],
        "batches": [[r["real_tokens"], r["processed_tokens"]] for r in ranks],  # to check runners trained the same
    }


def run_one(runner: str, repeat: int, ctx: dict) -> RunResult:
    work: Path = ctx["work"] / f"{''.join(c if c.isalnum() else '_' for c in runner)}-{repeat}"
    probe, log = work / "probe", ctx["work"] / "logs" / f"{work.name}.log"
    steps, config = ctx["steps"], ctx["config"]
    env = ctx["env"]
    if runner.startswith("ours"):
        overrides, extra_env, zero_patch = OURS_VARIANTS[runner]
        ds_file = None
        if zero_patch:  # the generated DeepSpeed JSON with some zero_optimization keys changed
            ds = json.loads(ctx["ds_json"].read_text())
            ds["zero_optimization"].update(zero_patch)
            ds_file = work / "ds_config.json"
            ds_file.parent.mkdir(parents=True, exist_ok=True)
            ds_file.write_text(json.dumps(ds, indent=2))
        cmd = ours_cmd(config, work / "run", probe, steps, ctx["ours_batching"] + overrides, deepspeed_config=ds_file)
        env = {**env, **extra_env}
    elif runner in TRL_RUNNERS:
        cmd = accelerate_cmd(BENCH / "trl_sft.py", ["--config", str(config), "--deepspeed_config", str(ctx["ds_json"]),
                                                    "--steps", str(steps), "--probe_dir", str(probe)]
                             + (["--lora"] if runner in LORA_RUNNERS else []))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(BENCH / "bare_loop.py"), "--config", str(config), "--steps", str(steps), "--probe_dir", str(probe)]
    rc, wall = launch(cmd, log, env, ctx["timeout"])
    result = RunResult(runner, repeat, rc == 0, wall, log)
    if rc != 0:
        result.error = f"exit code {rc}" + (" (timed out)" if rc == -9 else "")
        return result
    try:
        result.probe = summarise_probe(probe)
        if runner.startswith("ours"):
            result.results_json = json.loads((work / "run" / "results.json").read_text())
            result.resolved = json.loads((work / "run" / "resolved_config.json").read_text())
            generated = work / "run" / "deepspeed_config" / ctx["ds_json"].name
            if generated.is_file():
                result.ds_json_diff = json_diff(json.loads(ctx["ds_json"].read_text()),
                                                json.loads(generated.read_text()))
        elif runner in TRL_RUNNERS:
            result.setup = json.loads((probe / "trl_setup.json").read_text())
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        result.ok, result.error = False, f"unreadable figures: {e}"
    for name in ("final", "adapter"):  # keep the disk small; the figures are read
        shutil.rmtree(work / "run" / name, ignore_errors=True)
    return result


def json_diff(a, b, prefix: str = "") -> list[str]:
    """The dotted keys where two JSON documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in json_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


# ----------------------------------------------------------------------------------------------------------------------
# Data preparation time and padding efficiency (in this process)
# ----------------------------------------------------------------------------------------------------------------------


def import_measured_package(gemma_dir: Path) -> None:
    """Put the measured copy's Gemma/ first on sys.path, so that `finetune` is the measured package."""
    path = str(gemma_dir.resolve())
    if path not in sys.path:
        sys.path.insert(0, path)


def time_data_preparation(config: Path, model_dir: Path, repeats: int, gemma_dir: Path) -> dict:
    """Seconds to load the tokenizer and to build the demo training split (read, check, fit history, tokenize,
    mask), and the examples' token lengths."""
    import_measured_package(gemma_dir)
    from finetune.data import build_split
    from finetune.prompts import PromptEncoder, load_tokenizer
    from finetune.settings import load_settings

    cfg, _ = load_settings(config, ABLATION, [f"model.model_name_or_path={model_dir}"])
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(str(model_dir))
    load_s = time.perf_counter() - t0
    seconds, split = [], None
    for _ in range(repeats):
        encoder = PromptEncoder.for_prompt(tokenizer, cfg.training.max_length, cfg.prompt)
        t0 = time.perf_counter()
        split = build_split(DEMO_TRAIN, "train", cfg, encoder)
        seconds.append(time.perf_counter() - t0)
    lengths = [len(e["input_ids"]) for e in split.examples]
    return {"tokenizer_load_s": load_s, "build_split_s": seconds, "examples": len(lengths), "lengths": lengths,
            "vocab": len(tokenizer)}


def epoch_padding_efficiency(lengths: list[int], batch_size: int, world: int, seed: int) -> dict[str, float]:
    """Real / processed tokens over one epoch of per-process batches, padded to each batch's longest example.
    plain: the Trainer's default random order. grouped: transformers' LengthGroupedSampler order (megabatches of
    50 x the global batch sorted by length), the reference for `group_by_length`. padding-free: 1 by construction."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    def efficiency(order: list[int]) -> float:
        real = processed = 0
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = [lengths[j] for j in order[i:i + batch_size]]
            real, processed = real + sum(batch), processed + max(batch) * len(batch)
        return real / processed

    plain = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    grouped = get_length_grouped_indices(lengths, batch_size * world, generator=torch.Generator().manual_seed(seed))
    return {"plain": efficiency(plain), "grouped": efficiency(list(grouped))}


# ----------------------------------------------------------------------------------------------------------------------
# Profiling one run of ours
# ----------------------------------------------------------------------------------------------------------------------


# (label, file path suffix, function name): the costs the report prices per step. Cumulative times nest (the Adam step
# is inside the engine step, hooks inside forward and backward), so the rows do not add up.
PROFILE_ITEMS = [
    ("whole training step (Trainer.training_step)", "transformers/trainer.py", "training_step"),
    ("  forward (DeepSpeed engine)", "deepspeed/runtime/engine.py", "forward"),
    ("  backward (engine, incl. recomputation and gradient reduce-scatter)", "deepspeed/runtime/engine.py", "backward"),
    ("    checkpointed layers recomputed in backward (unpack_hook)", "torch/utils/checkpoint.py", "unpack_hook"),
    ("    ZeRO-3 gradient reduce-scatter (reduce_partition_and_remove_grads)", "deepspeed/runtime/zero/stage3.py",
     "reduce_partition_and_remove_grads"),
    ("      cpu_accelerator.device_count (forks `numactl --hardware` unless LOCAL_SIZE is set)",
     "deepspeed/accelerator/cpu_accelerator.py", "device_count"),
    ("  optimizer step (engine.step: CPU Adam, parameter re-partition)", "deepspeed/runtime/engine.py", "step"),
    ("    DeepSpeedCPUAdam.step", "deepspeed/ops/adam/cpu_adam.py", "step"),
    ("ZeRO-3 parameter fetch hooks (pre_sub_module_forward)", "deepspeed/runtime/zero/parameter_offload.py",
     "pre_sub_module_forward_function"),
    ("ZeRO-3 parameter release hooks (post_sub_module_forward)", "deepspeed/runtime/zero/parameter_offload.py",
     "post_sub_module_forward_function"),
    ("waiting on gloo collectives (c10d wait)", "~", "<built-in method torch._C._distributed_c10d.wait>"),
    ("Trainer logging / save / evaluate check (_maybe_log_save_evaluate)", "transformers/trainer.py",
     "_maybe_log_save_evaluate"),
    ("fetching + collating batches (get_batch_samples)", "transformers/trainer.py", "get_batch_samples"),
    ("callbacks: on_step_end (all)", "transformers/trainer_callback.py", "on_step_end"),
]


def profile_table(stats_file: Path, steps: int, measured_script: Path) -> str:
    """Per-step cumulative ms of the PROFILE_ITEMS, then every function of the measured script, by cumulative time."""
    import pstats

    st = pstats.Stats(str(stats_file)).stats
    lines = ["| cost | calls/step | ms/step (cumulative) |", "|---|---|---|"]
    for label, suffix, name in PROFILE_ITEMS:
        hits = [v for (f, _, n), v in st.items() if n == name and f.endswith(suffix)]
        if hits:
            calls, cum = sum(v[1] for v in hits), sum(v[3] for v in hits)
            lines.append(f"| {label} | {calls / steps:.1f} | {1000 * cum / steps:.1f} |")
    code = [measured_script, *measured_script.parent.glob("finetune/*.py")]
    ours = sorted(((v[3], v[2], v[1], n, Path(f).name, line) for (f, line, n), v in st.items() if Path(f) in code),
                  reverse=True)
    lines += ["", f"Functions of {measured_script.name} and its package finetune/, per step. Cumulative time includes "
              "what they call: training_step and CpuOffloadedCheckpoint.__call__ wrap the model's own work (the whole "
              "step; each decoder layer's forward), so their own time is what they add.", "",
              "| function | calls/step | ms/step cumulative | ms/step own |", "|---|---|---|---|"]
    lines += [f"| {n} ({file}:{line}) | {calls / steps:.1f} | {1000 * cum / steps:.2f} | {1000 * own / steps:.3f} |"
              for cum, own, calls, n, file, line in ours[:15]]
    return "\n".join(lines)


def profile_ours(ctx: dict) -> str:
    """One launch of ours with cProfile on rank 0 (steps 2..N); returns the report section."""
    work = ctx["work"] / "profile"
    stats_file = work / "rank0.prof"
    cmd = ours_cmd(ctx["config"], work / "run", work / "probe", ctx["steps"], ctx["ours_batching"],
                   profile=stats_file)
    rc, _ = launch(cmd, ctx["work"] / "logs" / "profile.log", ctx["env"], ctx["timeout"])
    if rc != 0 or not stats_file.is_file():
        return f"profiling run failed (exit code {rc}); see {ctx['work'] / 'logs' / 'profile.log'}"
    import io
    import pstats

    probe = summarise_probe(work / "probe")
    steps = probe["steps"] - 1
    text = io.StringIO()
    text.write(f"cProfile on rank 0 over steps 2..{steps + 1} of one launch ({probe['s_per_step']:.3f} s/step under "
               "the profiler, which slows Python-heavy code such as hooks more than C++ kernels).\n\n")
    text.write(profile_table(stats_file, steps, ctx["gemma_dir"] / "train_deepspeed.py"))
    text.write("\n\nTop functions by cumulative and by own time (whole run of steps 2..N):\n\n```\n")
    stats = pstats.Stats(str(stats_file), stream=text)
    stats.strip_dirs().sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(25)
    text.write("```\n")
    return text.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    med = format(statistics.median(values), fmt)
    return med if len(values) == 1 else f"{med} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def gb(values: list[float]) -> str:
    return spread([v / 1e9 for v in values], ".2f")


def runner_rows(results: list[RunResult], runners: list[str]) -> list[str]:
    ours = {r.repeat: r for r in results if r.runner == "ours" and r.ok}
    rows = []
    for name in runners:
        runs = [r for r in results if r.runner == name]
        ok = [r for r in runs if r.ok]
        if not ok:
            errors = "; ".join(f"repeat {r.repeat}: {r.error} ({r.log.name})" for r in runs) or "not run"
            rows.append(f"| {name} | failed: {errors} |  |  |  |  |  |  |")
            continue
        vs_ours = [r.probe["s_per_step"] / ours[r.repeat].probe["s_per_step"] for r in ok if r.repeat in ours]
        rss = [[r.probe["peak_rss_bytes"][i] for r in ok] for i in range(len(ok[0].probe["peak_rss_bytes"]))]
        failed = f" ({len(runs) - len(ok)} failed)" if len(ok) < len(runs) else ""
        rows.append(
            f"| {name}{failed} | {spread([r.probe['s_per_step'] for r in ok], '.3f')} "
            f"| {spread([r.probe['compute_s_per_step'] for r in ok], '.3f')} "
            f"| {spread([r.probe['tokens_per_s'] for r in ok], '.0f')} "
            f"| {spread(vs_ours, '.2f') + 'x' if vs_ours else 'n/a'} "
            f"| {spread([r.probe['padding_efficiency'] for r in ok], '.3f')} "
            f"| {' / '.join(gb(v) for v in rss)} | {spread([r.wall_s for r in ok], '.0f')} |")
    return rows


def ratio_rows(results: list[RunResult], runners: list[str]) -> list[str]:
    """A / B within each repeat where both launches succeeded, summarised over the repeats: s/step, tokens/s, and
    the larger rank's peak RSS."""
    by = {(r.runner, r.repeat): r for r in results if r.ok}
    pairs = [(a, b) for a, b in RATIO_PAIRS if a in runners and b in runners]
    pairs += [(a, BARE) for a in runners if a != BARE and BARE in runners]
    rows = []
    for a, b in pairs:
        both = [(by[a, k], by[b, k]) for k in sorted({k for n, k in by if n == a}) if (b, k) in by]
        if not both:
            rows.append(f"| {a} / {b} | 0 | n/a | n/a | n/a |")
            continue
        step = [x.probe["s_per_step"] / y.probe["s_per_step"] for x, y in both]
        tokens = [x.probe["tokens_per_s"] / y.probe["tokens_per_s"] for x, y in both]
        rss = [max(x.probe["peak_rss_bytes"]) / max(y.probe["peak_rss_bytes"]) for x, y in both]
        rows.append(f"| {a} / {b} | {len(both)} | {spread(step, '.2f')} | {spread(tokens, '.2f')} "
                    f"| {spread(rss, '.2f')} |")
    return rows


def setup_lines(results: list[RunResult]) -> list[str]:
    """What each runner trained (from the first successful launch): parameters, LoRA settings, adapter dtypes,
    checkpointing; and whether our runs' generated DeepSpeed JSON is the one the TRL runners were given."""
    lines = []
    first = {}
    for r in results:
        if r.ok:
            first.setdefault(r.runner, r)
    for name in ("ours", "ours, LoRA"):
        if name in first:
            r = first[name]
            params = r.results_json.get("parameters") or {}
            lora = r.resolved.get("lora") or {}
            text = (f"trains {params['trained']:,} of {params.get('total', params['trained'] + params['frozen']):,} "
                    "parameters" if "trained" in params else "parameters n/a")
            if lora.get("enabled"):
                text += (f"; lora r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
                         f"target_modules={json.dumps(lora.get('target_modules'))}, "
                         f"use_rslora={lora.get('use_rslora')} (adapters in the model dtype: "
                         "autocast_adapter_dtype=False)")
            if r.resolved.get("training", {}).get("activation_checkpointing"):
                text += "; activation checkpointing non-reentrant"
            lines.append(f"- {name}: {text}")
    for name in TRL_RUNNERS:
        if name in first:
            st = first[name].setup
            text = (f"trains {st['trainable_parameters']:,} of {st['total_parameters']:,} parameters "
                    f"({', '.join(st['trainable_dtypes'])})")
            if st.get("lora"):
                lo = st["lora"]
                text += (f"; peft LoraConfig r={lo['r']}, lora_alpha={lo['lora_alpha']}, "
                         f"lora_dropout={lo['lora_dropout']}, bias={lo['bias']}, "
                         f"target_modules=`{lo['target_modules']}` ({lo['adapted_modules']} modules adapted)")
            text += f"; gradient_checkpointing_kwargs {json.dumps(st.get('gradient_checkpointing_kwargs'))}"
            lines.append(f"- {name}: {text}")
    groups: list[list[str]] = []  # runners whose first launch trained the same batches (token counts per micro-batch)
    for name, r in first.items():
        same = next((g for g in groups if first[g[0]].probe["batches"] == r.probe["batches"]), None)
        if same is None:
            groups.append([name])
        else:
            same.append(name)
    if len(first) > 1:
        lines.append("- Batches (real and processed tokens of every micro-batch of both ranks): " + (
            "the same for all runners" if len(groups) == 1 else
            "different; the same within each group: " + " | ".join(", ".join(g) for g in groups)))
    for name, r in first.items():
        if r.ds_json_diff is not None:
            lines.append(f"- DeepSpeed JSON written by {name}: " + (
                "identical to" if not r.ds_json_diff else f"differs in {', '.join(r.ds_json_diff)} from") +
                " the one the TRL runners use (written by the warm-up launch)")
    return lines


def ours_rows(results: list[RunResult]) -> list[str]:
    """Our script's own figures: results.json "throughput" (when the script writes it) and train_runtime."""
    rows = []
    for name in ("ours", "ours, LoRA", "ours, plain padded"):
        ok = [r for r in results if r.runner == name and r.ok]
        if not ok:
            continue
        tp = [r.results_json.get("throughput") or {} for r in ok]
        training = ok[0].resolved.get("training", {})
        batching = ", ".join(f"{k}={json.dumps(training[k])}" for k in ("group_by_length", "padding_free")
                             if k in training) or "plain padded (no batching keys)"
        per_step = [r.results_json["train"]["train_runtime"] / r.results_json["global_step"] for r in ok
                    if r.results_json.get("train", {}).get("train_runtime") and r.results_json.get("global_step")]
        rss = [t.get("peak_rss_bytes") or [] for t in tp]
        rss_text = " / ".join(gb([x[i] for x in rss]) for i in range(min(map(len, rss)))) or "n/a"
        rows.append(
            f"| {name} | {batching} | {spread([t.get('seconds_per_step') for t in tp], '.3f')} "
            f"| {spread([t.get('tokens_per_second') for t in tp], '.0f')} "
            f"| {spread([t.get('padding_efficiency') for t in tp], '.3f')} | {rss_text} "
            f"| {spread(per_step, '.3f')} | {spread([r.results_json.get('wall_time_s') for r in ok], '.0f')} |")
    return rows


def render_report(args, ctx: dict, results: list[RunResult], runners: list[str], skipped: dict[str, str],
                  data: dict, padding: dict, profile_text: str | None, total_s: float) -> str:
    lines = [
        "# Training speed: Gemma/train_deepspeed.py vs TRL SFTTrainer vs a bare PyTorch loop, full and LoRA (CPU)",
        "",
        f"- Date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}; whole benchmark {total_s / 60:.1f} min",
        f"- Machine: {ctx['machine']}; shared with other work, so timings are noisy",
        f"- Libraries: {library_versions()}",
        f"- Command: `{ctx['command']}`",
        f"- Measured script: {ctx['measured']}, copied once at the start and run from the copy; untimed "
        f"warm-up launch: {ctx['warmup']} (3 steps), whose DeepSpeed JSON the TRL runners use",
        f"- Model: {ctx['model']} (--model {args.model})",
        f"- Data: {DEMO_TRAIN.relative_to(REPO)} ({data['trained']['examples']} examples; with this model's tokenizer: "
        f"mean {statistics.mean(data['trained']['lengths']):.0f}, max {max(data['trained']['lengths'])} tokens), "
        f"ablation {ABLATION}",
        f"- Settings: {args.steps} optimizer steps per launch, {args.repeats} launches per runner (runners take turns, "
        "order rotating), 2 processes with OMP_NUM_THREADS=1, per-process batch "
        f"{ctx['cfg']['training']['batch_size']}, max_length {ctx['cfg']['training']['max_length']}, bf16, "
        "activation checkpointing (ours, TRL), DeepSpeed ZeRO-3 with parameter + optimizer offload (ours, TRL: the "
        "same JSON, full and LoRA); LoRA: r 16, alpha 32, dropout 0.05, every linear layer of the decoder, bf16 "
        "adapters (ours and TRL); bare loop: DDP, no ZeRO, loss from the full logits",
        "- Figures: median (min–max) over launches. s/step: from one step's end to the next (batch fetch and "
        f"collation included), median over steps {WARMUP_STEPS + 1}..N, rank 0. compute s/step: on_step_begin to "
        f"on_step_end. tokens/s: real (non-padding) tokens of both ranks over steps {WARMUP_STEPS + 1}..N / their wall "
        "time. vs ours: s/step over "
        "ours' s/step of the same repeat. padding eff.: real / processed tokens of the batches trained. "
        "Peak RSS per rank (getrusage, whole launch). launch wall: the whole launch (start-up, model loading, "
        "the steps, the final save).",
        "",
        "## Training throughput",
        "",
        "| runner | s/step | compute s/step | tokens/s | vs ours | padding eff. "
        "| peak RSS rank 0 / 1 (GB) | launch wall (s) |",
        "|---|---|---|---|---|---|---|---|",
        *runner_rows(results, runners),
    ]
    for name, why in skipped.items():
        lines.append(f"| {name} | skipped: {why} |  |  |  |  |  |  |")
    ratios = ratio_rows(results, runners)
    if ratios:
        lines += ["", "## Ratios (A / B within each repeat, then median (min–max) over the repeats)", "",
                  "s/step ratio above 1: A is slower. tokens/s ratio above 1: A is faster. Peak RSS: the larger "
                  "rank's of each launch.", "",
                  "| A / B | repeats | s/step A / B | tokens/s A / B | peak RSS A / B |", "|---|---|---|---|---|",
                  *ratios]
    setup = setup_lines(results)
    if setup:
        lines += ["", "## What each runner trained", "", *setup]
    rows = ours_rows(results)
    if rows:
        lines += ["", "Our script's own figures (results.json):", "",
                  "| run | batching (resolved_config.json) | throughput.seconds_per_step | tokens_per_second "
                  "| padding_efficiency | peak_rss_bytes rank 0 / 1 (GB) | train.train_runtime / steps (s) "
                  "| wall_time_s |",
                  "|---|---|---|---|---|---|---|---|", *rows]
    lines += ["", "## Padding efficiency over one epoch of the demo data (computed from the token lengths)", "",
              f"Per-process batches of {ctx['cfg']['training']['batch_size']}, padded to the longest example "
              "of each batch. Length-grouped: transformers' LengthGroupedSampler order (the reference for "
              "`group_by_length`). Padding-free batches (concatenated, no padding) are 1.000 by construction.", "",
              "| tokenizer | examples | mean / max tokens | plain random batches | length-grouped batches |",
              "|---|---|---|---|---|"]
    for key, label in (("trained", "the trained model's"), ("real", f"real Gemma 3 ({REAL_MODEL.relative_to(REPO)})")):
        if key in data:
            ls = data[key]["lengths"]
            lines.append(f"| {label} | {len(ls)} | {statistics.mean(ls):.0f} / {max(ls)} "
                         f"| {padding[key]['plain']:.3f} | {padding[key]['grouped']:.3f} |")
    lines += ["", "## Data preparation (demo training split, in one process)", "",
              "finetune.data.build_split: read the JSONL, check every record, fit the history into max_length, "
              f"render and tokenize, mask the prompt; {args.repeats} times.", "",
              "| tokenizer | vocab | load tokenizer (s) | build_split (s) |", "|---|---|---|---|"]
    for key, label in (("trained", "the trained model's"), ("real", "real Gemma 3 270M")):
        if key in data:
            d = data[key]
            lines.append(f"| {label} | {d['vocab']} | {d['tokenizer_load_s']:.2f} | {spread(d['build_split_s'], '.2f')} |")
    if "real" not in data and not ctx["real_model_trained"]:
        lines.append(f"| real Gemma 3 270M | not present at {REAL_MODEL} (run Gemma/prepare_gemma.py) | | |")
    failed = [r for r in results if not r.ok]
    if failed:
        lines += ["", "Failed launches: " + "; ".join(f"{r.runner} #{r.repeat}: {r.error}, log {r.log}" for r in failed)]
    if profile_text:
        lines += ["", "## Profile of ours (--profile)", "", profile_text.rstrip()]
    return "\n".join(lines) + "\n"


def choose_runners(args: argparse.Namespace, keys: set[str]) -> tuple[list[str], dict[str, str]]:
    """The runners to launch, in their order of turns, and those left out with the reason."""
    import importlib.util

    runners = list(args.runners or MAIN_RUNNERS + (
        ["ours, plain padded"] if args.model == "tiny" and not args.same_batches else []))
    if args.profile:
        runners += [v for v in PROFILE_VARIANTS if v not in runners]
    why = {"ours, plain padded": None if {"group_by_length", "padding_free"} <= keys else (
        "the measured train_deepspeed.py has no training.group_by_length / padding_free keys: its only batching is "
        "plain padded (= ours above)")}
    for name in LORA_RUNNERS:
        if "section:lora" not in keys:
            why[name] = "the measured train_deepspeed.py has no lora section"
        elif importlib.util.find_spec("peft") is None:
            why[name] = "peft is not installed (pip install -r benchmarks/requirements.txt)"
    for name in TRL_RUNNERS:
        if importlib.util.find_spec("trl") is None:
            why[name] = "trl is not installed (pip install -r benchmarks/requirements.txt)"
    skipped = {name: why[name] for name in runners if why.get(name)}
    return [name for name in runners if name not in skipped], skipped


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore::FutureWarning")
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="speed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    command = shlex.join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO))
                          else sys.executable, os.path.relpath(__file__, REPO), *(sys.argv[1:] if argv is None else argv)])
    print(f"speed benchmark: work directory {work}", flush=True)

    gemma_dir, measured = snapshot_script(args.gemma_dir or REPO / "Gemma", work)
    keys = measured_config_keys(gemma_dir)
    runners, skipped = choose_runners(args, keys)
    if not runners:
        print("error: no runner left to launch: " + "; ".join(f"{n}: {w}" for n, w in skipped.items()),
              file=sys.stderr)
        return 1
    model_dir, model_text = prepare_model(args.model, work)
    config = write_bench_config(work, model_dir, args.steps)
    ctx = {"work": work, "steps": args.steps, "config": config, "env": subprocess_env(gemma_dir),
           "command": command, "cfg": json.loads(config.read_text()), "gemma_dir": gemma_dir, "measured": measured,
           "model": model_text, "timeout": args.launch_timeout, "machine": machine_description(),
           "real_model_trained": model_dir.resolve() == REAL_MODEL.resolve(),
           # --same_batches: plain padded batches for every run of ours (a script without the keys has only those)
           "ours_batching": PLAIN_BATCHING if args.same_batches and {"group_by_length", "padding_free"} <= keys else []}
    print(f"model: {model_text}; runners: {', '.join(runners)}", flush=True)
    if leaked_shm_bytes() > 2**30:
        print(f"warning: /dev/shm holds {leaked_shm_bytes() / 2**30:.1f} GiB of DeepSpeed all-reduce buffers "
              "(/dev/shm/deepspeed_allreduce_buffer_*, left by earlier launches), which the runs cannot use; full "
              "fine-tuning of a real model may run out of memory", file=sys.stderr, flush=True)

    # Untimed warm-up launch: compiled ops, file cache, and the DeepSpeed JSON for TRL. Full fine-tuning, or LoRA when
    # only the LoRA run of ours is measured (less memory; each run of ours reports whether its JSON is the same).
    ctx["warmup"] = "ours, LoRA" if "ours, LoRA" in runners and "ours" not in runners else "ours"
    print(f"warm-up launch of {ctx['warmup']} ...", flush=True)
    warm = work / "warmup"
    rc, wall = launch(ours_cmd(config, warm / "run", warm / "probe", 3,
                               ctx["ours_batching"] + OURS_VARIANTS[ctx["warmup"]][0]),
                      work / "logs" / "warmup.log", ctx["env"], ctx["timeout"])
    ctx["ds_json"] = warm / "run" / "deepspeed_config" / "ds_config_zero3.json"
    if rc != 0 or not ctx["ds_json"].is_file():
        print(f"error: the warm-up run of our script failed (exit code {rc}); see {work / 'logs' / 'warmup.log'}",
              file=sys.stderr)
        return 1
    for name in ("final", "adapter"):
        shutil.rmtree(warm / "run" / name, ignore_errors=True)
    print(f"  done in {wall:.0f} s", flush=True)

    results: list[RunResult] = []
    for repeat in range(1, args.repeats + 1):
        shift = (repeat - 1) % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            print(f"repeat {repeat}/{args.repeats}: {runner} ...", flush=True)
            r = run_one(runner, repeat, ctx)
            results.append(r)
            print(f"  {'%.3f s/step' % r.probe['s_per_step'] if r.ok else 'FAILED: ' + r.error} "
                  f"(launch {r.wall_s:.0f} s)", flush=True)

    print("data preparation and padding ...", flush=True)
    data = {"trained": time_data_preparation(config, model_dir, args.repeats, gemma_dir)}
    if (REAL_MODEL / "tokenizer.json").is_file() and not ctx["real_model_trained"]:
        data["real"] = time_data_preparation(config, REAL_MODEL, args.repeats, gemma_dir)
    t = ctx["cfg"]["training"]
    padding = {k: epoch_padding_efficiency(d["lengths"], t["batch_size"], 2, t.get("seed", 42)) for k, d in data.items()}

    profile_text = None
    if args.profile:
        print("profiling one run of ours ...", flush=True)
        profile_text = profile_ours(ctx)

    report = render_report(args, ctx, results, runners, skipped, data, padding, profile_text,
                           time.perf_counter() - started)
    write_atomic(args.output, report)
    print(report)
    print(f"written to {args.output}")
    if args.workdir is None and all(r.ok for r in results):
        shutil.rmtree(work, ignore_errors=True)
    elif not all(r.ok for r in results):
        print(f"some launches failed; their logs are in {work / 'logs'}", file=sys.stderr)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
