"""GPU check: a few optimizer steps of Gemma/train_deepspeed.py per model and offload choice on one GPU, each measured
against the --dry_run memory estimate for the same choice. A benchmark, not a test.

What it does, in about 8 minutes on one H200 (--budget_s 450; every launch has a timeout inside that budget, and a
launch that fails, runs out of memory or times out becomes a row with its error, never a crash of the check):

1. probe: the GPU as torch reports it (name, memory), the library versions, and that deepspeed/datasets import;
2. in the background: DeepSpeed's CPU Adam and fused Adam ops are compiled (once per machine), and the --dry_run of
   every model runs (`--dry_run --gpus_per_node 1 --gpu_memory_gib <the GPU's> --cpu_memory_gib <host>`, the same
   --set values as the training runs: its plan.json holds memory.options[...].total_gpu per offload choice);
3. per model, smallest first (270M, 4B, E4B; the budget cuts the tail): a random-weight bf16 safetensors checkpoint
   is built on the GPU from the model's config (no download: weights do not change throughput), then one launch per
   offload choice of
       python Gemma/train_deepspeed.py --config config.json --ablation_config profile_and_history
           --output_dir ... --set model.model_name_or_path=<checkpoint> --set model.tokenizer_name_or_path=<demo>
           --set model.attn_implementation=<eager|sdpa> --set training.max_steps=N --set training.eval_steps=null
           --set data.validation_file=null --set data.test_file=null --set training.save_steps=1000000
           --set training.logging_steps=1 --set deepspeed.offload_optimizer=.. --set deepspeed.offload_params=..
   (plain python runs one process; bf16, batch 4, max_length 256, activation checkpointing with CPU checkpointing as
   in the shipped config.json). A choice whose estimate does not fit is skipped with its reason: never one that does
   not fit the host's memory (a host out-of-memory can take the machine down), and one that does not fit in 90% of
   the GPU unless --try_unfitting; a model whose checkpoint and final/ would not fit on the disk is skipped too. The
   run's final/ model and, after the model's last run, its checkpoint are deleted (the machine's disk: 64 GiB);
4. the report: $OUT/gpu_check.md (else benchmarks/results/gpu_check.md), the raw numbers as gpu_check.json and every
   log, results.json and plan.json in gpu_check_logs.tar.gz (the device returns at most 8 files).

Models (MODELS below): Gemma 3 270M (benchmarks/dry_run/gemma-3-270m/config.json, the config setup.sh converts from
the GGUF, a copy of Gemma/models/gemma-3-270m/config.json), Gemma 3 4B (benchmarks/dry_run/gemma-3-4b, the published
config.json of google/gemma-3-4b-it) and Gemma 4 E4B (benchmarks/dry_run/gemma-4-e4b). Tokenizer: the demo's Gemma 3
tokenizer for all three (Gemma/models/gemma-3-270m; on the GPU machine, where that git-ignored folder is absent, it
comes from .gpu_check/tokenizer.tar.xz, see below). Attention: sdpa for every language model (the shipped config says
eager, which Gemma 2's soft-capping needs; Gemma 3 and 4 have none, and sdpa is the fast path on GPUs; it trained
the tiny Gemma 3, Gemma 3 multimodal and Gemma 4 multimodal classes in --cpu_smoke here); multimodal towers stay eager
(Gemma/finetune/modeling.py); --attn eager for the shipped choice. Offload choices: none, optimizer,
optimizer+parameters for each; Gemma 4 E4B also parameters-only, the only choice its estimate says fits one H200 and
128 GiB of host memory (none needs ~137 GiB of GPU; optimizer offload ~167 GiB of host).

Figures per run (from results.json): throughput.seconds_per_step (median over steps 2..N), tokens_per_second (real
tokens of all steps over their time, the first, warm-up step included), a steady tokens/s (real tokens per step over
seconds_per_step), throughput.peak_gpu_memory_bytes (torch.cuda.max_memory_allocated) against the dry run's
total_gpu for the same choice, peak RSS, and MFU = achieved model FLOP/s / the GPU's peak dense bf16 FLOP/s, model
FLOPs counted as 6 x trained-and-active parameters x real tokens (all three models are dense, so active = trained =
the language model; the frozen towers never run on text). That count is an approximation that overstates the work:
the LM head runs only at the supervised positions (logits_to_keep), and the embedding tables (Gemma 4's per-layer
embeddings: 2.8 of its 7.5B trained parameters) are lookups; the table also gives MFU without the embedding
parameters. Recomputation by activation checkpointing is not counted (MFU, not hardware FLOPs utilisation). Peak:
989.4 TFLOP/s for 'NVIDIA H200' (the SXM datasheet's dense BF16 figure, 1,979 with 2:4 sparsity, which these dense
matmuls cannot use; /work/.library/device/KINDS.md measured about 790 TFLOP/s on an 8192^3 bf16 matmul here),
835 for an H200 NVL, --peak_tflops otherwise.

Commands
--------
Here (CPU, no GPU): the same plumbing with the tiny random Gemma of tests/tiny_gemma.py, 2 steps, one offload choice,
no GPU figures (about 1 minute on 2 cores; --tiny_arch gemma3_mm / gemma4_mm for the multimodal classes; it writes
benchmarks/results/gpu_check_cpu_smoke.* unless --out_dir says elsewhere):

    .venv/bin/python benchmarks/gpu_check.py --cpu_smoke --out_dir /tmp/gpu_check_smoke

LoRA instead of full fine-tuning (every dry run and training run with --set lora.enabled=true; on the GPU, a second
call after the full one: `bash benchmarks/gpu_check.sh --lora`):

    .venv/bin/python benchmarks/gpu_check.py --cpu_smoke --lora --out_dir /tmp/gpu_check_smoke_lora

The real models' plan without a GPU, e.g. the 270M for 2 steps (about 2.5 minutes here):

    .venv/bin/python benchmarks/gpu_check.py --allow_cpu --models gemma-3-270m --offloads both --steps 2 \
        --budget_s 900 --out_dir /tmp/gpu_check_cpu

Preparing the GPU call (here, with the package registry; once per checkout):

    bash benchmarks/gpu_check.sh prepare

It adds /.whl/ and /.gpu_check/ to .git/info/exclude, downloads the wheels the H200 image lacks into .whl/ with the
command of /work/.library/device/README.md

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \\
        datasets==5.2.0 transformers==5.24.0 hjson==3.1.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 \\
        pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 fsspec==2026.9.0

plus deepspeed 0.19.8, which PyPI has only as a source archive: `.venv/bin/pip wheel --no-deps --no-build-isolation
-w .whl deepspeed==0.19.8` builds its pure-Python wheel (ops are compiled on first use, step 2). The image
(KINDS.md) lacks deepspeed, datasets and these dependencies of theirs; it has transformers 5.17.0, and
requirements.txt pins 5.24.0, so that travels too. torch stays the image's (2.11.0+cu130, not the pinned 2.13.0: a
CUDA torch is far over the 64 MiB a call carries); so do accelerate 1.15.0 (the pinned version), tokenizers 0.23.2
(0.23.3 pinned), huggingface_hub 1.33.0 (2.4.0 pinned; transformers and datasets accept >=1.31) and safetensors.
The demo tokenizer (tokenizer.json 33 MB, git-ignored) travels xz-compressed: .gpu_check/tokenizer.tar.xz, 3.5 MB
(raw it would leave 64 - 19 - 33 MiB for everything else). About 25 MB travel in all with the working tree.

On the GPU machine, one call of the device tool `run` (a session that has a GPU):

    command:   bash benchmarks/gpu_check.sh
    carry:     [".whl", ".gpu_check"]
    timeout_s: 600

gpu_check.sh installs .whl/*.whl into /tmp/site (PYTHONPATH), then runs `python3 benchmarks/gpu_check.py --out_dir
$OUT`; 450 s of checks plus about 20 s of installing leaves the rest of the 600 s as margin. The reply's output_tail
ends with the summary table; the files come back under files_at. Expected (estimates, not measured): about 100 s of
set-up (ops compiled on 16 cores, beside the dry runs and the 270M checkpoint), 270M runs of 20-35 s each, the 4B
checkpoint ~25 s and its runs ~45 / 75 / 90 s (none / optimizer / both), the E4B checkpoint ~40 s and its run
100-150 s: about 600 s in all, so the 450 s budget most likely skips Gemma 4 E4B ("budget" rows). Then copy the
first call's files out of files_at, and make a second call with the same carry (on a machine still warm, 30 s after a
call, the compiled ops in /tmp stay; a fresh machine costs 1-2 minutes to start and compiles them again, ~100 s):

    command:   bash benchmarks/gpu_check.sh --models gemma-4-e4b --budget_s 300
    timeout_s: 360

Or one call for everything, if the session can spend about 11 minutes of device time on it: `bash
benchmarks/gpu_check.sh --budget_s 560` with timeout_s 600.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "Gemma" / "train_deepspeed.py"
SHIPPED_CONFIG = REPO / "config.json"
DRY_RUN_CONFIGS = REPO / "benchmarks" / "dry_run"
DEMO_TOKENIZER = REPO / "Gemma" / "models" / "gemma-3-270m"
CARRIED_TOKENIZER = REPO / ".gpu_check" / "tokenizer.tar.xz"
ABLATION = "profile_and_history"
GIB = 1024**3
H200_HOST_MEMORY_GIB = 128  # KINDS.md; MemTotal starts lower on that machine and grows as memory is used
REPORT_RESERVE_S = 20  # kept back from the budget for the report

# Dense BF16 tensor-core peaks by the name torch reports (NVIDIA datasheets; the sparse figures are twice these).
PEAK_BF16_TFLOPS = {"NVIDIA H200": 989.4, "NVIDIA H200 NVL": 835.5, "NVIDIA H100 80GB HBM3": 989.4}

OFFLOADS = {"none": (False, False), "optimizer": (True, False), "parameters": (False, True),
            "both": (True, True)}  # (deepspeed.offload_optimizer, deepspeed.offload_params)


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    config_dir: Path  # holds the published config.json the random checkpoint is built from
    attn: str
    offloads: tuple[str, ...]
    train_timeout_s: int  # one launch: start-up, N steps, saving final/
    min_run_s: int  # a run is not started with less budget left
    build_s: int  # about what building its checkpoint on an H200 takes


MODELS = {
    "gemma-3-270m": ModelSpec("gemma-3-270m", "Gemma 3 270M", DRY_RUN_CONFIGS / "gemma-3-270m", "sdpa",
                              ("none", "optimizer", "both"), 150, 40, 15),
    "gemma-3-4b": ModelSpec("gemma-3-4b", "Gemma 3 4B", DRY_RUN_CONFIGS / "gemma-3-4b", "sdpa",
                            ("none", "optimizer", "both"), 240, 80, 30),
    "gemma-4-e4b": ModelSpec("gemma-4-e4b", "Gemma 4 E4B", DRY_RUN_CONFIGS / "gemma-4-e4b", "sdpa",
                             ("none", "optimizer", "parameters", "both"), 300, 120, 45),
}


# Smallest first: a budget that runs short cuts the tail, most likely Gemma 4 E4B's one run that fits (parameters
# offload, about 3 minutes with its checkpoint); then a second call runs it (module docstring).
RUN_ORDER = ("gemma-3-270m", "gemma-3-4b", "gemma-4-e4b")
DISK_MARGIN = 1.1  # a checkpoint and the run's final/ (both bf16) must fit on the disk, with this margin


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GPU check: a few optimizer steps of Gemma/train_deepspeed.py per model "
                                            "and offload choice on one GPU, against the --dry_run estimate (see the "
                                            "module docstring).")
    p.add_argument("--cpu_smoke", action="store_true",
                   help="the same plumbing on this CPU with the tiny Gemma of tests/tiny_gemma.py, 2 steps, "
                        "one offload choice")
    p.add_argument("--allow_cpu", action="store_true",
                   help="run the real models' plan without a GPU (slow; to test the plumbing with their configs)")
    p.add_argument("--tiny_arch", default="gemma3",
                   help="--cpu_smoke: the tests/tiny_gemma.py arch (default: %(default)s)")
    p.add_argument("--models", default=",".join(RUN_ORDER),
                   help="comma-separated keys of MODELS, run in this order (default: %(default)s)")
    p.add_argument("--offloads", default=None,
                   help=f"comma-separated offload choices for every model, of {', '.join(OFFLOADS)} (default: each "
                        "model's own list)")
    p.add_argument("--attn", choices=("eager", "sdpa"), default=None,
                   help="attention of every model's language model (default: sdpa; eager is the shipped "
                        "config's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 5; --cpu_smoke: 2)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="wall-clock budget of the whole check (default: 450; --cpu_smoke: 600)")
    p.add_argument("--out_dir", type=Path, default=None,
                   help="report, JSON and logs archive (default: $OUT if set, else benchmarks/results)")
    p.add_argument("--work_dir", type=Path, default=REPO / "Gemma" / "outputs" / "gpu_check",
                   help="checkpoints, runs and logs (default: %(default)s, git-ignored)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="demo tokenizer directory (default: Gemma/models/gemma-3-270m, else "
                        ".gpu_check/tokenizer.tar.xz)")
    p.add_argument("--gpu_memory_gib", type=float, default=None,
                   help="GPU memory for the dry run (default: the GPU's, as torch reports it; --cpu_smoke: 80)")
    p.add_argument("--host_memory_gib", type=float, default=None,
                   help=f"host memory for the dry run (default: {H200_HOST_MEMORY_GIB}; --cpu_smoke: MemTotal)")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: by GPU name)")
    p.add_argument("--try_unfitting", action="store_true",
                   help="also run choices whose estimate exceeds 90%% of the GPU (never those over the host memory)")
    p.add_argument("--lora", action="store_true",
                   help="LoRA runs (--set lora.enabled=true, r 16, all-linear) instead of full fine-tuning, dry runs "
                        "included; model FLOPs are then 4 x the base parameters per token (no weight gradients)")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep the random-weight checkpoints")
    p.add_argument("--worker", choices=("probe", "build_checkpoint", "build_op"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker_args", nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.cpu_smoke else 5)
    args.budget_s = args.budget_s or (600 if args.cpu_smoke else 450)
    if args.out_dir is None:
        args.out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown and not args.cpu_smoke:
        p.error(f"--models: unknown {', '.join(unknown)}; known: {', '.join(MODELS)}")
    if args.offloads and any(o not in OFFLOADS for o in args.offloads.split(",")):
        p.error(f"--offloads: use {', '.join(OFFLOADS)}")
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step is left out of seconds_per_step)")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Workers: run in child processes (`--worker NAME`), so that this process never holds the GPU
# ----------------------------------------------------------------------------------------------------------------------


def worker_probe(out_json: str) -> None:
    """The GPU as torch sees it, the versions, and that the packages the runs need import and work."""
    import importlib.metadata
    import platform

    import torch

    info: dict = {"python": platform.python_version(), "executable": sys.executable, "cpu_count": os.cpu_count(),
                  "host_memtotal_bytes": meminfo_total_bytes(), "cuda_available": torch.cuda.is_available(),
                  "torch_cuda": torch.version.cuda, "packages": {}}
    for name in ("torch", "transformers", "accelerate", "deepspeed", "datasets", "tokenizers", "huggingface_hub",
                 "safetensors", "numpy", "pyarrow", "fsspec", "pydantic"):
        info["packages"][name] = importlib.metadata.version(name)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "total_memory_bytes": props.total_memory,
                       "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                       "bf16": torch.cuda.is_bf16_supported(), "count": torch.cuda.device_count()}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    sys.path.insert(0, str(REPO / "Gemma"))
    import datasets
    import finetune.trainer  # noqa: F401  (what a run imports: deepspeed, datasets, transformers' Trainer)

    datasets.Dataset.from_list([{"a": 1}])  # pyarrow works with this datasets
    Path(out_json).write_text(json.dumps(info, indent=2))


def worker_build_checkpoint(config_dir: str, out_dir: str, device: str, counts_json: str) -> None:
    """A random-weight bf16 safetensors checkpoint from a published config.json, built on `device`, and its parameter
    counts: total, trained (what Gemma/finetune trains: the language model and head), embedding tables among them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "Gemma"))
    from finetune.modeling import trained_parameters

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    started = time.time()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    built = time.time()
    model.save_pretrained(out_dir)
    trained = trained_parameters(model)
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    counts = {"class": type(model).__name__,
              "total": sum(p.numel() for p in model.parameters()),
              "trained": sum(p.numel() for p in model.parameters() if id(p) in trained),
              "trained_embedding": sum(p.numel() for p in model.parameters() if id(p) in trained & embedding),
              "build_s": round(built - started, 1), "save_s": round(time.time() - built, 1)}
    Path(counts_json).write_text(json.dumps(counts, indent=2))


def worker_build_op(name: str) -> None:
    """Compile one DeepSpeed op into the cache the runs use (Gemma/finetune/deepspeed_ops.py), so that the runs'
    timings do not include it."""
    sys.path.insert(0, str(REPO / "Gemma"))
    from finetune.deepspeed_ops import clear_stale_build_locks, use_environment_cache

    use_environment_cache()
    clear_stale_build_locks()
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder(name).load(verbose=False)


WORKERS = {"probe": worker_probe, "build_checkpoint": worker_build_checkpoint, "build_op": worker_build_op}


def meminfo_total_bytes() -> int | None:
    path = Path("/proc/meminfo")
    if not path.is_file():
        return None
    line = next(line for line in path.read_text().splitlines() if line.startswith("MemTotal:"))
    return int(line.split()[1]) * 1024


# ----------------------------------------------------------------------------------------------------------------------
# Launching child processes with timeouts
# ----------------------------------------------------------------------------------------------------------------------


class Budget:
    """The check's wall-clock budget: every launch's timeout is cut to what is left of it."""

    def __init__(self, seconds: float):
        self.started, self.seconds = time.monotonic(), seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - REPORT_RESERVE_S - self.elapsed()

    def timeout(self, cap: float) -> float:
        return max(1.0, min(cap, self.left()))


@dataclass
class Job:
    name: str
    cmd: list[str]
    log: Path
    timeout_s: float
    proc: subprocess.Popen
    started: float


@dataclass
class Outcome:
    name: str
    rc: int | None
    wall_s: float  # for a background job: until it was waited for, an upper bound
    timed_out: bool
    log: Path
    cmd: list[str] = field(default_factory=list)
    background: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore::FutureWarning")
    return env


def start(name: str, cmd: list[str], log: Path, timeout_s: float) -> Job:
    """Start `cmd` in its own process group, output to `log`; `finish` waits for it at most timeout_s from now."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    print(f"[{now()}] start {name} (timeout {timeout_s:.0f} s)", flush=True)
    return Job(name, cmd, log, timeout_s, proc, time.monotonic())


def finish(job: Job, background: bool = False) -> Outcome:
    """Wait for the job until its timeout; then kill its whole process group (SIGKILL: nothing of it is kept)."""
    left = job.timeout_s - (time.monotonic() - job.started)
    timed_out = False
    try:
        job.proc.wait(timeout=max(0.1, left))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(job.proc.pid, signal.SIGKILL)
        job.proc.wait()
    outcome = Outcome(job.name, job.proc.returncode, time.monotonic() - job.started, timed_out, job.log, job.cmd,
                      background)
    state = "timed out" if timed_out else f"exit {outcome.rc}"
    why = "" if outcome.ok or timed_out else f": {failure_reason(outcome)}"
    print(f"[{now()}] done  {job.name}: {state} after {'<= ' if background else ''}{outcome.wall_s:.0f} s{why}",
          flush=True)
    return outcome


def run(name: str, cmd: list[str], log: Path, timeout_s: float) -> Outcome:
    return finish(start(name, cmd, log, timeout_s))


def worker_cmd(worker: str, *worker_args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--worker_args", *worker_args]


def now() -> str:
    return time.strftime("%H:%M:%S")


def log_tail(log: Path, lines: int = 3) -> list[str]:
    text = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    return [line.strip()[:300] for line in text if line.strip()][-lines:]


def failure_reason(outcome: Outcome) -> str:
    """One line: timeout, CUDA or host out-of-memory, or the log's last error line."""
    text = outcome.log.read_text(encoding="utf-8", errors="replace") if outcome.log.is_file() else ""
    if outcome.timed_out:
        return f"timed out after {outcome.wall_s:.0f} s"
    if "OutOfMemoryError" in text or "CUDA out of memory" in text:
        return "CUDA out of memory"
    if outcome.rc in (-9, 137):
        return f"killed (exit {outcome.rc}: host out of memory?)"
    errors = [line.strip() for line in text.splitlines() if "Error:" in line or line.startswith("error:")]
    return f"exit {outcome.rc}: " + (errors[-1][:300] if errors else " | ".join(log_tail(outcome.log)))


# ----------------------------------------------------------------------------------------------------------------------
# Preparation: tokenizer, models, commands
# ----------------------------------------------------------------------------------------------------------------------


def locate_tokenizer(args: argparse.Namespace, work: Path) -> Path | None:
    """The demo tokenizer: --tokenizer, Gemma/models/gemma-3-270m, or the carried .gpu_check/tokenizer.tar.xz
    (None: none of them)."""
    if args.tokenizer is not None:
        return args.tokenizer.resolve()
    if (DEMO_TOKENIZER / "tokenizer.json").is_file():
        return DEMO_TOKENIZER
    if not CARRIED_TOKENIZER.is_file():
        return None
    target = work / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(CARRIED_TOKENIZER, "r:xz") as tar:
        tar.extractall(target, filter="data")
    return target


def smoke_model(args: argparse.Namespace, work: Path) -> tuple[ModelSpec, Path]:
    """--cpu_smoke: the tiny Gemma of tests/tiny_gemma.py (its config.json is then rebuilt as a random bf16
    checkpoint by the same worker the GPU uses) and its own tokenizer; Gemma 4's with its chat template, since its
    turn tokens are not Gemma 3's <start_of_turn>/<end_of_turn>."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_gemma import build_tiny_gemma

    tiny = build_tiny_gemma(work / f"tiny-{args.tiny_arch}", arch=args.tiny_arch,
                            chat_template=args.tiny_arch.startswith("gemma4"))
    attn = args.attn or "sdpa"
    return ModelSpec(f"tiny-{args.tiny_arch}", f"tiny {args.tiny_arch} (tests/tiny_gemma.py)", tiny, attn, ("both",),
                     300, 30, 10), tiny


def rel(path: Path) -> str:
    """A path as the launches take it: relative to the repository (their working directory and config.json's)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def set_args(spec: ModelSpec, model_dir: Path, tokenizer: Path, steps: int, lora: bool) -> list[str]:
    """The --set values every launch of a model shares (dry run and training runs alike)."""
    values = {"model.model_name_or_path": rel(model_dir), "model.tokenizer_name_or_path": rel(tokenizer),
              "model.attn_implementation": spec.attn, "training.max_steps": str(steps),
              "training.eval_steps": "null", "data.validation_file": "null", "data.test_file": "null",
              "training.save_steps": "1000000", "training.logging_steps": "1", "lora.enabled": str(lora).lower()}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def train_cmd(shared_sets: list[str], output_dir: Path, offload: str) -> list[str]:
    opt, par = OFFLOADS[offload]
    return [sys.executable, rel(TRAIN_SCRIPT), "--config", rel(SHIPPED_CONFIG), "--ablation_config", ABLATION,
            "--output_dir", rel(output_dir), *shared_sets,
            "--set", f"deepspeed.offload_optimizer={str(opt).lower()}",
            "--set", f"deepspeed.offload_params={str(par).lower()}"]


def dry_run_cmd(shared_sets: list[str], output_dir: Path, gpu_gib: float, host_gib: float) -> list[str]:
    return [sys.executable, rel(TRAIN_SCRIPT), "--config", rel(SHIPPED_CONFIG), "--ablation_config", ABLATION,
            "--output_dir", rel(output_dir), *shared_sets, "--dry_run", "--gpus_per_node", "1",
            "--gpu_memory_gib", f"{gpu_gib:.2f}", "--cpu_memory_gib", f"{host_gib:.1f}"]


def read_plan(plan_json: Path) -> tuple[dict[str, dict], int]:
    """plan.json's memory.options keyed by offload choice name, and the model's parameter count."""
    memory = json.loads(plan_json.read_text())["memory"]
    names = {v: k for k, v in OFFLOADS.items()}
    return ({names[(o["offload_optimizer"], o["offload_params"])]: o for o in memory["options"]},
            memory["model"]["total_params"])


def disk_problem(work: Path, total_params: int | None) -> str | None:
    """The checkpoint and one run's final/ (2 bytes per parameter each) must fit on the work directory's disk."""
    if total_params is None:
        return None
    need, free = 2 * 2 * total_params * DISK_MARGIN, shutil.disk_usage(work).free
    return None if free >= need else f"disk: {free / GIB:.1f} GiB free, a checkpoint and final/ need {need / GIB:.1f}"


def skip_reason(estimate: dict | None, try_unfitting: bool) -> str | None:
    """Why a choice is not run: its estimate does not fit the host (never run), or the GPU (unless asked)."""
    if estimate is None:
        return None
    if estimate["fits_host"] is False:
        return (f"estimate {estimate['total_host_per_node'] / GIB:.1f} GiB of host memory does not fit the host "
                "(a host out-of-memory can take the machine down)")
    if estimate["fits_gpu"] is False and not try_unfitting:
        return (f"estimate {estimate['total_gpu'] / GIB:.1f} GiB per GPU exceeds 90% of the GPU "
                "(--try_unfitting runs it anyway)")
    return None


# ----------------------------------------------------------------------------------------------------------------------
# One run's figures
# ----------------------------------------------------------------------------------------------------------------------


def run_row(spec: ModelSpec, offload: str, outcome: Outcome, run_dir: Path, estimate: dict | None,
            counts: dict, peak_flops: float | None, lora: bool = False) -> dict:
    """The row of the report: what results.json says, next to the dry run's estimate for the same choice."""
    opt, par = OFFLOADS[offload]
    row = {"model": spec.key, "label": spec.label, "attn": spec.attn, "offload": offload, "offload_optimizer": opt,
           "offload_params": par, "launch_wall_s": round(outcome.wall_s, 1), "command": shlex.join(outcome.cmd),
           "estimate_total_gpu_bytes": estimate["total_gpu"] if estimate else None,
           "estimate_host_bytes": estimate["total_host_per_node"] if estimate else None}
    results_path = run_dir / "results.json"
    if not outcome.ok or not results_path.is_file():
        reason = failure_reason(outcome) if not outcome.ok else "no results.json"
        return {**row, "status": "failed", "error": reason, "log_tail": log_tail(outcome.log, 8)}
    results = json.loads(results_path.read_text())
    t = results["throughput"]
    tokens_per_step = t["real_tokens"] / t["steps"]
    steady = tokens_per_step / t["seconds_per_step"]
    peaks = t["peak_gpu_memory_bytes"]
    peak_gpu = max(peaks) if peaks else None
    row.update(status="ok", steps=t["steps"], seconds_per_step=t["seconds_per_step"],
               tokens_per_second=t["tokens_per_second"], tokens_per_step=round(tokens_per_step, 1),
               steady_tokens_per_second=round(steady, 1), padding_efficiency=t["padding_efficiency"],
               peak_gpu_memory_bytes=peak_gpu, peak_rss_bytes=max(t["peak_rss_bytes"]),
               peak_over_estimate=round(peak_gpu / estimate["total_gpu"], 3) if peak_gpu and estimate else None,
               engine=results["deepspeed"], parameters=results["parameters"],
               first_loss=results.get("first_train_loss"), last_loss=results.get("last_train_loss"),
               wall_time_s=results.get("wall_time_s"), versions=results.get("versions"))
    engine = results["deepspeed"]  # what DeepSpeed ran, read back from the engine
    row["engine_offload"] = f"{engine.get('offload_optimizer')}/{engine.get('offload_param')}"
    # Forward 2N and input gradients 2N per token, plus 2N of weight gradients when every weight trains (not LoRA's
    # frozen base; its adapters' FLOPs are a fraction of a percent).
    trained, factor = counts["trained"], 4 if lora else 6
    row["lora"] = lora
    row["model_flops_per_token"] = factor * trained
    row["model_tflops_per_second"] = round(factor * trained * steady / 1e12, 2)
    row["mfu"] = round(factor * trained * steady / peak_flops, 5) if peak_flops else None
    row["mfu_without_embeddings"] = (round(factor * (trained - counts["trained_embedding"]) * steady / peak_flops, 5)
                                     if peak_flops else None)
    return row


def skipped_row(spec: ModelSpec, offload: str, reason: str, estimate: dict | None) -> dict:
    opt, par = OFFLOADS[offload]
    return {"model": spec.key, "label": spec.label, "attn": spec.attn, "offload": offload, "offload_optimizer": opt,
            "offload_params": par, "status": "skipped", "error": reason,
            "estimate_total_gpu_bytes": estimate["total_gpu"] if estimate else None,
            "estimate_host_bytes": estimate["total_host_per_node"] if estimate else None}


# ----------------------------------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Check:
    args: argparse.Namespace
    budget: Budget
    work: Path
    logs: Path
    probe: dict = field(default_factory=dict)
    setup: list[dict] = field(default_factory=list)  # probe, op builds, dry runs, checkpoint builds
    rows: list[dict] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)  # per model: spec, counts, estimates
    gpu_gib: float = 0.0
    host_gib: float = 0.0
    peak_flops: float | None = None
    peak_source: str = ""

    def problem(self, step: str, what: str, error: str) -> None:
        """A set-up step that failed before any launch."""
        print(f"[{now()}] error: {step}: {error}", flush=True)
        self.setup.append({"step": step, "what": what, "ok": False, "wall_s": 0.0, "background": False, "log": "",
                           "error": error})

    def record(self, outcome: Outcome, what: str) -> Outcome:
        entry = {"step": outcome.name, "what": what, "ok": outcome.ok, "wall_s": round(outcome.wall_s, 1),
                 "background": outcome.background, "log": str(outcome.log.relative_to(self.work))}
        if not outcome.ok:
            entry["error"] = failure_reason(outcome)
        self.setup.append(entry)
        return outcome


def run_probe(check: Check) -> bool:
    out = check.work / "probe.json"
    outcome = check.record(run("probe", worker_cmd("probe", str(out)), check.logs / "probe.log",
                               check.budget.timeout(180)), "GPU, versions, imports")
    if not outcome.ok:
        return False
    check.probe = json.loads(out.read_text())
    gpu = check.probe.get("gpu")
    if gpu is None and not (check.args.cpu_smoke or check.args.allow_cpu):
        print("error: torch sees no GPU; on a CPU use --cpu_smoke (or --allow_cpu).", flush=True)
        check.setup[-1].update(ok=False, error="torch sees no GPU")
        return False
    if gpu is None:  # planning for a nominal GPU and this host
        check.gpu_gib = check.args.gpu_memory_gib or 80.0
        memtotal = check.probe["host_memtotal_bytes"]
        check.host_gib = check.args.host_memory_gib or (memtotal / GIB if memtotal else 16.0)
    else:
        check.gpu_gib = check.args.gpu_memory_gib or gpu["total_memory_bytes"] / GIB
        check.host_gib = check.args.host_memory_gib or H200_HOST_MEMORY_GIB
    if check.args.peak_tflops:
        check.peak_flops, check.peak_source = check.args.peak_tflops * 1e12, "--peak_tflops"
    elif gpu and gpu["name"] in PEAK_BF16_TFLOPS:
        check.peak_flops = PEAK_BF16_TFLOPS[gpu["name"]] * 1e12
        check.peak_source = f"{gpu['name']}: dense BF16 datasheet figure"
    else:
        check.peak_source = "no GPU peak known (no GPU, or an unknown name: give --peak_tflops)"
    return True


def model_specs(check: Check) -> list[tuple[ModelSpec, Path]]:
    """(spec, directory of its published config.json) for each model to check."""
    if check.args.cpu_smoke:
        return [smoke_model(check.args, check.work)]
    specs = [MODELS[key] for key in check.args.models.split(",")]
    if check.args.offloads:
        specs = [dataclasses.replace(s, offloads=tuple(check.args.offloads.split(","))) for s in specs]
    if check.args.attn:
        specs = [dataclasses.replace(s, attn=check.args.attn) for s in specs]
    return [(spec, spec.config_dir) for spec in specs]


def start_background(check: Check, models: list[tuple[ModelSpec, Path]], tokenizer: Path) -> dict[str, Job]:
    """DeepSpeed's ops (CPU Adam: optimizer offload; fused Adam: no offload) and every model's dry run, side by
    side on the CPU while the first checkpoint is built."""
    jobs = {}
    for op in ("CPUAdamBuilder", "FusedAdamBuilder"):
        jobs[op] = start(f"build {op}", worker_cmd("build_op", op), check.logs / f"build_op_{op}.log",
                         check.budget.timeout(300))
    for spec, config_dir in models:
        out = check.work / spec.key / "dry_run_out"
        shutil.rmtree(out, ignore_errors=True)
        cmd = dry_run_cmd(set_args(spec, config_dir, tokenizer, check.args.steps, check.args.lora), out, check.gpu_gib, check.host_gib)
        jobs[f"dry_run {spec.key}"] = start(f"dry run {spec.key}", cmd, check.logs / f"dry_run_{spec.key}.log",
                                            check.budget.timeout(240))
    return jobs


def build_checkpoint(check: Check, spec: ModelSpec, config_dir: Path) -> tuple[Path, dict] | None:
    """The random-weight checkpoint (on the GPU; on the CPU for --cpu_smoke) and its parameter counts."""
    ckpt = check.work / spec.key / "checkpoint"
    counts_json = check.work / spec.key / "counts.json"
    shutil.rmtree(ckpt, ignore_errors=True)
    device = "cuda" if check.probe.get("gpu") else "cpu"
    source = rel(config_dir)
    outcome = run(f"checkpoint {spec.key}", worker_cmd("build_checkpoint", str(config_dir), str(ckpt), device,
                                                      str(counts_json)),
                  check.logs / f"checkpoint_{spec.key}.log", check.budget.timeout(300))
    check.record(outcome, f"random bf16 checkpoint from {source}/config.json on {device}")
    return (ckpt, json.loads(counts_json.read_text())) if outcome.ok else None


def wait_background(check: Check, background: dict[str, Job], waited: dict[str, Outcome]) -> None:
    """Wait for the ops and the dry runs, so that no training run times a compilation."""
    for name, job in background.items():
        waited[name] = check.record(finish(job, background=True),
                                    "DeepSpeed op" if name.endswith("Builder") else "memory estimate")
    background.clear()


def model_plan(check: Check, spec: ModelSpec, dry_run: Outcome | None) -> tuple[dict[str, dict], int | None]:
    """The dry run's estimates per offload choice and the parameter count ({} and None when it failed)."""
    plan_json = check.work / spec.key / "dry_run_out" / "dry_run" / "plan.json"
    return read_plan(plan_json) if dry_run is not None and dry_run.ok and plan_json.is_file() else ({}, None)


def check_model(check: Check, spec: ModelSpec, config_dir: Path, tokenizer: Path, background: dict[str, Job],
                waited: dict[str, Outcome]) -> None:
    """One model: its checkpoint (the first model's while the background jobs run), then one training run per
    offload choice, or a row saying why not."""
    entry = {"model": spec.key, "label": spec.label, "config_dir": rel(config_dir), "attn": spec.attn}
    check.models.append(entry)
    built = None
    if background:
        built = build_checkpoint(check, spec, config_dir)
        wait_background(check, background, waited)
    estimates, total_params = model_plan(check, spec, waited.get(f"dry_run {spec.key}"))
    entry.update(estimates=estimates, dry_run_ok=bool(estimates))
    disk = None if built is not None else disk_problem(check.work, total_params)
    reasons = {o: skip_reason(estimates.get(o), check.args.try_unfitting) or disk for o in spec.offloads}
    if built is None and all(reasons.values()):
        check.rows += [skipped_row(spec, o, reasons[o], estimates.get(o)) for o in spec.offloads]
        return
    enough = check.budget.left() >= spec.build_s + spec.min_run_s  # for its checkpoint and one run
    if built is None and enough:
        built = build_checkpoint(check, spec, config_dir)
    if built is None:
        why = ("its checkpoint could not be built (see the set-up steps)" if enough else
               f"budget: {check.budget.left():.0f} s left, its checkpoint and a run need about "
               f"{spec.build_s + spec.min_run_s} s")
        check.rows += [skipped_row(spec, o, reasons[o] or why, estimates.get(o)) for o in spec.offloads]
        return
    ckpt, counts = built
    entry["counts"] = counts
    shared = set_args(spec, ckpt, tokenizer, check.args.steps, check.args.lora)
    for offload in spec.offloads:
        reason = reasons[offload]
        if reason is None and check.budget.left() < spec.min_run_s:
            reason = f"budget: {check.budget.left():.0f} s left, a run needs about {spec.min_run_s} s"
        if reason is not None:
            print(f"[{now()}] skip  {spec.key} offload {offload}: {reason}", flush=True)
            check.rows.append(skipped_row(spec, offload, reason, estimates.get(offload)))
            continue
        run_dir = check.work / spec.key / f"run_{offload}"
        shutil.rmtree(run_dir, ignore_errors=True)
        outcome = run(f"train {spec.key} offload {offload}", train_cmd(shared, run_dir, offload),
                      check.logs / f"train_{spec.key}_{offload}.log", check.budget.timeout(spec.train_timeout_s))
        check.rows.append(run_row(spec, offload, outcome, run_dir, estimates.get(offload), counts,
                                  check.peak_flops, check.args.lora))
        shutil.rmtree(run_dir / "final", ignore_errors=True)  # the figures are read; the disk is small
    if not check.args.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)


def main_check(args: argparse.Namespace) -> int:
    budget = Budget(args.budget_s)
    work = args.work_dir.resolve()
    shutil.rmtree(work / "logs", ignore_errors=True)
    check = Check(args, budget, work, work / "logs")
    check.logs.mkdir(parents=True, exist_ok=True)
    print(f"[{now()}] gpu_check: budget {args.budget_s:.0f} s, work dir {work}", flush=True)
    tokenizer = None if args.cpu_smoke else locate_tokenizer(args, work)
    if tokenizer is None and not args.cpu_smoke:
        check.problem("tokenizer", "the demo tokenizer", f"neither {rel(DEMO_TOKENIZER)}/tokenizer.json nor "
                      f"{rel(CARRIED_TOKENIZER)}: run `bash benchmarks/gpu_check.sh prepare` where setup.sh made the "
                      "demo model, and carry .gpu_check")
    elif run_probe(check):
        models = model_specs(check)
        if args.cpu_smoke:
            tokenizer = models[0][1]  # the tiny model's own tokenizer
        background = start_background(check, models, tokenizer)
        waited: dict[str, Outcome] = {}
        for spec, config_dir in models:
            check_model(check, spec, config_dir, tokenizer, background, waited)
    write_outputs(check, tokenizer)
    return 0 if check.rows else 1  # 1: the check could not start (see the set-up steps); failed runs are rows


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def gib(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value / GIB:.{digits}f}"


def fmt(value, spec: str = "") -> str:
    return "" if value is None else format(value, spec)


def in_model_order(rows: list[dict]) -> list[dict]:
    """Rows by model as MODELS lists them (smallest first), whatever order they ran in; then by offload choice."""
    models, offloads = list(MODELS), list(OFFLOADS)
    return sorted(rows, key=lambda r: (models.index(r["model"]) if r["model"] in models else -1,
                                       offloads.index(r["offload"])))


def results_table(rows: list[dict]) -> list[str]:
    lines = ["| model | offload | status | s/step | tokens/s (results.json) | tokens/s steady | peak GPU GiB "
             "(allocated) | estimate GiB / GPU | peak / estimate | estimate host GiB | peak RSS GiB | MFU | "
             "MFU (no embeddings) | loss step 1 → N | launch s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in in_model_order(rows):
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**: {r.get('error', '')}"
        engine = f" (engine: {r['engine_offload']})" if "engine_offload" in r else ""
        loss = (f"{r['first_loss']:.2f} → {r['last_loss']:.2f}" if r.get("first_loss") is not None
                and r.get("last_loss") is not None else "")
        lines.append(
            f"| {r['label']} ({r['attn']}{', LoRA' if r.get('lora') else ''}) | {r['offload']}{engine} | {status} | "
            f"{fmt(r.get('seconds_per_step'), '.3f')} | {fmt(r.get('tokens_per_second'), '.0f')} | "
            f"{fmt(r.get('steady_tokens_per_second'), '.0f')} | "
            f"{gib(r.get('peak_gpu_memory_bytes'), 2)} | {gib(r.get('estimate_total_gpu_bytes'), 2)} | "
            f"{fmt(r.get('peak_over_estimate'), '.2f')} | {gib(r.get('estimate_host_bytes'))} | "
            f"{gib(r.get('peak_rss_bytes'))} | {fmt(r.get('mfu'), '.2%')} | "
            f"{fmt(r.get('mfu_without_embeddings'), '.2%')} | {loss} | {fmt(r.get('launch_wall_s'), '.0f')} |")
    return lines


def report_markdown(check: Check, tokenizer: Path | None, command: str) -> str:
    p, args = check.probe, check.args
    gpu = p.get("gpu")
    title = "GPU check (CPU smoke run: plumbing only, no GPU figures)" if args.cpu_smoke else "GPU check"
    lines = [f"# {title}: Gemma/train_deepspeed.py on one GPU, measured against --dry_run", "",
             f"- Date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}; whole check "
             f"{check.budget.elapsed():.0f} s of a {args.budget_s:.0f} s budget",
             f"- Command: `{command}`"]
    if gpu:
        lines.append(f"- GPU (torch): {gpu['name']}, {gpu['total_memory_bytes'] / GIB:.1f} GiB "
                     f"({gpu['total_memory_bytes']:,} bytes), compute capability {gpu['capability']}, "
                     f"{gpu['multiprocessors']} multiprocessors, {gpu['count']} visible")
    else:
        lines.append("- GPU: none (torch.cuda.is_available() is False)")
    if p.get("nvidia_smi"):
        lines.append(f"- nvidia-smi: {p['nvidia_smi']}")
    if p:
        lines.append(f"- Host: {p['cpu_count']} logical CPUs, MemTotal {gib(p['host_memtotal_bytes'])} GiB "
                     f"(dry runs plan for {check.host_gib:.0f} GiB of host and {check.gpu_gib:.1f} GiB of GPU memory)")
        versions = ", ".join(f"{k} {v}" for k, v in p["packages"].items())
        lines.append(f"- Versions: python {p['python']}, {versions}; torch CUDA {p['torch_cuda']}")
    lines += [f"- Settings: shipped config.json (batch 4, max_length 256, bf16, activation checkpointing with CPU "
              f"checkpointing, pin_memory), ablation {ABLATION}, demo data Gemma/data/demo/train.jsonl, "
              f"{args.steps} optimizer steps per run, no evaluation, no test set, no checkpoint before final/; "
              f"tokenizer {rel(tokenizer) if tokenizer else 'none'}",
              f"- Peak for MFU: {check.peak_flops / 1e12:.1f} TFLOP/s ({check.peak_source})" if check.peak_flops
              else f"- Peak for MFU: none ({check.peak_source})",
              "", "## Runs", "", *results_table(check.rows), "",
              "s/step: results.json throughput.seconds_per_step, the median over steps 2..N (one step = forward, "
              "backward and optimizer of one batch of 4). tokens/s (results.json): real tokens of all steps over their "
              "time, the warm-up step 1 included. tokens/s steady: real tokens per step (mean of all steps) / s/step. "
              "Offload (engine: optimizer/parameters): the devices DeepSpeed's engine reports it used. Peak GPU: "
              "throughput.peak_gpu_memory_bytes, torch.cuda.max_memory_allocated (not the allocator's reserve, nor the "
              "CUDA context). Estimate: the dry run's memory.options[...].total_gpu for the same offload choice "
              "(model states by DeepSpeed's ZeRO-3 arithmetic + activations of the longest micro-batch). "
              "MFU = 6 x trained parameters (LoRA: 4 x the base's, no weight gradients) x steady tokens/s / peak: an "
              "approximation that overstates the work, "
              "since the LM head runs only at the supervised positions and embedding tables are lookups; "
              "recomputation by activation checkpointing is not counted.", ""]
    lines += ["## Models", "", "| model | config | class | parameters | trained (language model) | "
              "of which embedding tables | attention | dry run |", "|---|---|---|---|---|---|---|---|"]
    for m in check.models:
        c = m.get("counts", {})
        lines.append(f"| {m['label']} | {m['config_dir']} | {c.get('class', '')} | {fmt(c.get('total'), ',')} | "
                     f"{fmt(c.get('trained'), ',')} | {fmt(c.get('trained_embedding'), ',')} | {m['attn']} | "
                     f"{'ok' if m['dry_run_ok'] else 'failed'} |")
    lines += ["", "## Set-up steps", "", "Background steps (ops, dry runs) ran beside the first checkpoint's build; "
              "their time is until they were waited for (an upper bound).", "",
              "| step | what | ok | s | log / error |", "|---|---|---|---|---|"]
    for s in check.setup:
        seconds = f"{'≤ ' if s['background'] else ''}{s['wall_s']:.0f}"
        lines.append(f"| {s['step']} | {s['what']} | {'yes' if s['ok'] else '**no**'} | {seconds} | "
                     f"{s.get('error', s['log'])} |")
    failed = [r for r in check.rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs: last log lines", ""]
        for r in failed:
            lines += [f"**{r['label']}, offload {r['offload']}**: {r['error']}", "", "```",
                      *r.get("log_tail", []), "```", ""]
    lines += ["", "Commands of the runs:", ""]
    lines += [f"- `{r['command']}`" for r in check.rows if "command" in r]
    return "\n".join(lines) + "\n"


def write_outputs(check: Check, tokenizer: Path | None) -> None:
    """gpu_check.md, gpu_check.json and gpu_check_logs.tar.gz (logs, results.json, plan.json) in --out_dir."""
    args = check.args
    prefix = "gpu_check_cpu_smoke" if args.cpu_smoke else "gpu_check"
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join([Path(sys.executable).name, "benchmarks/gpu_check.py", *sys.argv[1:]])
    report = report_markdown(check, tokenizer, command)
    (out / f"{prefix}.md").write_text(report, encoding="utf-8")
    raw = {"command": command, "elapsed_s": round(check.budget.elapsed(), 1), "budget_s": args.budget_s,
           "steps": args.steps, "gpu_memory_gib_planned": check.gpu_gib, "host_memory_gib_planned": check.host_gib,
           "peak_flops": check.peak_flops, "peak_source": check.peak_source, "probe": check.probe,
           "setup": check.setup, "models": check.models, "rows": check.rows}
    (out / f"{prefix}.json").write_text(json.dumps(raw, indent=2, default=str) + "\n", encoding="utf-8")
    with tarfile.open(out / f"{prefix}_logs.tar.gz", "w:gz") as tar:
        for path in sorted(check.work.rglob("*")):
            if path.is_file() and (path.suffix == ".log" or path.name in ("results.json", "plan.json", "report.md",
                                                                         "probe.json", "counts.json")
                                   or path.parent.name == "deepspeed_config"):
                tar.add(path, arcname=str(path.relative_to(check.work)))
    print("\n".join(results_table(check.rows)), flush=True)
    print(f"[{now()}] report: {out / (prefix + '.md')}  raw: {prefix}.json  logs: {prefix}_logs.tar.gz "
          f"({check.budget.elapsed():.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        WORKERS[args.worker](*args.worker_args)
        return 0
    return main_check(args)


if __name__ == "__main__":
    sys.exit(main())
