"""The prepared-data cache: each split is read, checked and encoded once, stored as Arrow, and memory-mapped by every
rank of every run that asks for the same thing.

An entry is keyed by everything its content follows from (key_of): the data file's content hash, the split's name,
the field names, max_length, the run's prompt and the full prompt the examples are fitted on, the tokenizer (its
serialised vocabulary and merges, added tokens and chat template) and the source of the modules that read, check and
encode (so that a changed encoding can never be served from an old entry). An entry is written into a temporary
directory, its manifest (each file's size) last, and renamed into place: a killed build leaves only a temporary
directory, which is never taken for an entry and is removed by the next build. An entry whose files no longer match
their manifest is rebuilt. A file lock per key makes concurrent builders (the ranks of a launch, two runs of a study
sharing the cache) take turns: the first builds, the others wait and then load what it wrote.

    <cache_dir>/<key>/manifest.json    key, file sizes, the split's statistics (data.SplitStats), its first record
    <cache_dir>/<key>/examples/        datasets.Dataset.save_to_disk: one row per example
    <cache_dir>/<key>.lock             the builders' lock
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
EXAMPLES_DIRNAME = "examples"
# The modules whose code decides what an entry holds: a change to any of them makes new keys.
ENCODING_MODULES = ("data.py", "records.py", "prompts.py", "chat_format.py", "config.py", "data_cache.py")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer by what it does: the fast tokenizer's serialised model (vocabulary, merges, normalisation, added
    tokens), its special tokens and chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                              sorted(map(str, tokenizer.all_special_tokens)), tokenizer.chat_template or ""],
                             sort_keys=True).encode())
    return digest.hexdigest()


def code_fingerprint() -> str:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ENCODING_MODULES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def key_of(parts: dict[str, Any]) -> str:
    """The entry's key: a hash of what determines it (`parts`, JSON-serialisable), the format and the code."""
    content = {"format": FORMAT_VERSION, "code": code_fingerprint(), **parts}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def read_entry(directory: Path, key: str) -> dict | None:
    """The entry's manifest when the entry is complete and its files are as written, else None."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key or not isinstance(manifest.get("files"), dict):
        return None
    for name, size in manifest["files"].items():  # files added later (a reader's own cache files) do not matter
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return manifest


def cached_build(cache_dir: Path, key: str, build: Callable[[Path], dict]) -> tuple[Path, dict, bool]:
    """(entry directory, manifest, whether this call built it). `build(directory)` writes the entry's files into an
    empty directory and returns what the manifest should also hold; a UserError it raises leaves nothing behind."""
    from filelock import FileLock

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"data.cache_dir: cannot create {cache_dir} ({e.strerror}); set data.cache_dir in config.json "
                        "to a writable directory.") from None
    entry = cache_dir / key
    with FileLock(str(cache_dir / f"{key}.lock")):
        if (manifest := read_entry(entry, key)) is not None:
            return entry, manifest, False
        if entry.exists():
            logger.warning("%s: the prepared data does not match its manifest (changed or damaged); rebuilding it.",
                           entry)
            shutil.rmtree(entry)
        for stale in cache_dir.glob(f"{key}.tmp-*"):  # left by a build that was killed: the lock is ours now
            shutil.rmtree(stale, ignore_errors=True)
        building = cache_dir / f"{key}.tmp-{os.getpid()}"
        building.mkdir()
        try:
            started = time.time()
            manifest = {**build(building), "key": key, "built_s": round(time.time() - started, 1)}
            manifest["files"] = _file_sizes(building)
            (building / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            os.rename(building, entry)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return entry, manifest, True
