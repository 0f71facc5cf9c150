#!/usr/bin/env python
"""Generate the small user-modelling demo data set, with a planted signal and known accuracy ceilings.

Usage:
    python Gemma/make_demo_data.py [--out Gemma/data/demo] [--seed 0]
                                   [--n-train 2000] [--n-validation 200] [--n-test 200]
                                   [--occupation-prob 0.7] [--flip-prob 0.15] [--check-users 0]

Run from the repository root. Writes ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (one JSON object
per line, UTF-8) and a short ``README.md`` into ``--out``; every file is written to a temporary name first and
then renamed, so a crash never leaves a truncated file. The output is a pure function of the arguments: two runs
with the same arguments give byte-identical files.

Each record is one user (users never repeat across splits):

    {"id": "u000123",
     "profile": {"age": 34, "occupation": "librarian", "city": "Lisbon"},
     "history": [{"title": "The Glass Forest", "genre": "fantasy", "rating": 5}, ...],   # 4 items, oldest first
     "query": "Which genre should we recommend to this user next? Answer with one word.",
     "target": "fantasy"}

The generative model (the recipe that a 2-core CPU fine-tune of Gemma 3 270M was seen to learn in minutes):
- each user has a hidden preferred genre, uniform over five genres whose names are single Gemma 3 tokens;
  the target is that genre's name;
- the occupation is one of the preferred genre's two occupations with probability ``--occupation-prob``,
  otherwise one of the other genres' eight; age and city are pure noise;
- the history has 4 items; one slot (at a uniform position) is always of the preferred genre, the others are of
  uniform genres; an item is liked when its genre is the preferred one, and that liked status is then flipped
  with probability ``--flip-prob``; liked items are rated 4-5, others 1-2; titles are noise given the genre.

Because age, city, titles and the exact rating within {1,2} / {4,5} are independent of the preferred genre given
the rest, the Bayes-optimal accuracy of each information set (what a prompt shows the model) is computed here
exactly, by enumerating every occupation and every history of (genre, liked) pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from finetune.outputs import write_atomic  # temporary file, fsync, rename: never a partial file

# Single common words that the real Gemma 3 tokenizer encodes as ONE token both with and without a leading
# space (checked with the GGUF tokenizer: e.g. "romance" and "scifi" split into two tokens without the space,
# so they are not used). One-token answers keep "first answer token" scoring equal to whole-answer scoring.
GENRES: tuple[str, ...] = ("comedy", "drama", "fantasy", "horror", "mystery")

# Two occupations per genre. They are plausible on purpose: the demo shows fine-tuning sharpening an association,
# and the profile-only ceiling is fixed by --occupation-prob whatever the words are.
OCCUPATIONS: dict[str, tuple[str, str]] = {
    "comedy": ("comedian", "radio host"),
    "drama": ("actor", "social worker"),
    "fantasy": ("librarian", "game designer"),
    "horror": ("mortician", "night guard"),
    "mystery": ("detective", "lawyer"),
}

# Invented titles (no real works), eight per genre; a user never sees the same title twice.
TITLES: dict[str, tuple[str, ...]] = {
    "comedy": ("Pancake Tuesday", "The Accidental Mayor", "Two Left Feet", "My Neighbour's Llama",
               "Office Party Disaster", "The Wrong Best Man", "Grandma Goes Viral", "Lost in the Car Park"),
    "drama": ("The Quiet Harbour", "Letters to Marianne", "A Winter Inheritance", "The Long Shift",
              "Brothers of the Mill", "After the Verdict", "Small Town Hearts", "The Last Lesson"),
    "fantasy": ("The Dragon's Apprentice", "Crown of Ash", "The Glass Forest", "The Wizard's Ledger",
                "Beyond the Silver Gate", "Song of Seven Rivers", "The Stolen Star", "Realm of the Tide King"),
    "horror": ("The Cellar Door", "Whispers in Room 9", "The Hollow Farm", "Night Shift at St. Agnes",
               "It Came from the Lake", "The Doll Collector", "Do Not Answer", "Blood Moon Motel"),
    "mystery": ("The Locked Study", "Murder at Millbrook", "The Missing Heiress", "Clue in the Clocktower",
                "The Silent Witness", "Death on the Night Train", "The Vanishing Painter", "A Case of Two Keys"),
}

CITIES: tuple[str, ...] = ("Austin", "Berlin", "Chicago", "Dublin", "Lisbon",
                           "Melbourne", "Osaka", "Seattle", "Toronto", "Warsaw")
AGE_MIN, AGE_MAX = 18, 70
HISTORY_LENGTH = 4
LIKED_RATINGS, DISLIKED_RATINGS = (4, 5), (1, 2)
QUERY = "Which genre should we recommend to this user next? Answer with one word."

# Information sets, named as the training script's ablations: which record fields a prompt shows.
INFO_SETS: tuple[str, ...] = ("profile_and_history", "profile_only", "history_only", "query_only")
# Splits in generation order: test first, so the test users stay the same when --n-train changes.
SPLITS: tuple[str, ...] = ("test", "validation", "train")
# Bump when the generative model changes, so that new data never silently reuses old seeds' streams.
GENERATOR_VERSION = "demo-v1"

Record = dict[str, Any]


def user_rng(seed: int, index: int) -> random.Random:
    """A private RNG per user: user ``index`` is the same whatever the split sizes.

    Seeding with a str is deterministic across runs and platforms (CPython hashes it with SHA-512, unaffected
    by PYTHONHASHSEED).
    """
    return random.Random(f"{GENERATOR_VERSION}:{seed}:{index}")


def make_user(index: int, seed: int, occupation_prob: float, flip_prob: float) -> Record:
    """Draw one user from the generative model described in the module docstring."""
    rng = user_rng(seed, index)
    preferred = rng.choice(GENRES)

    if rng.random() < occupation_prob:
        occupation_genre = preferred
    else:
        occupation_genre = rng.choice([g for g in GENRES if g != preferred])
    profile = {
        "age": rng.randint(AGE_MIN, AGE_MAX),
        "occupation": rng.choice(OCCUPATIONS[occupation_genre]),
        "city": rng.choice(CITIES),
    }

    forced_slot = rng.randrange(HISTORY_LENGTH)
    used_titles: set[str] = set()
    history = []
    for slot in range(HISTORY_LENGTH):
        genre = preferred if slot == forced_slot else rng.choice(GENRES)
        liked = genre == preferred
        if rng.random() < flip_prob:
            liked = not liked
        title = rng.choice([t for t in TITLES[genre] if t not in used_titles])
        used_titles.add(title)
        rating = rng.choice(LIKED_RATINGS if liked else DISLIKED_RATINGS)
        history.append({"title": title, "genre": genre, "rating": rating})

    return {"id": f"u{index:06d}", "profile": profile, "history": history, "query": QUERY, "target": preferred}


# ----------------------------------------------------------------------------------------------------------
# Exact Bayes posterior. Written from the model's definition, independently of make_user, so that
# applying it to generated users (the per-split figures and --check-users) cross-checks the generator.
# ----------------------------------------------------------------------------------------------------------

def occupation_likelihoods(occupation: str, occupation_prob: float) -> list[float]:
    """P(occupation | preferred genre g) for each g in GENRES."""
    n_other = sum(len(OCCUPATIONS[g]) for g in GENRES) - len(OCCUPATIONS[GENRES[0]])
    return [occupation_prob / len(OCCUPATIONS[g]) if occupation in OCCUPATIONS[g]
            else (1.0 - occupation_prob) / n_other for g in GENRES]


def history_likelihoods(items: Sequence[tuple[str, bool]], flip_prob: float) -> list[float]:
    """P(sequence of (genre, liked) | preferred genre g) for each g, summing over the forced slot's position."""
    result = []
    for preferred in GENRES:
        total = 0.0
        for forced_slot in range(len(items)):
            p = 1.0 / len(items)
            for slot, (genre, liked) in enumerate(items):
                if slot == forced_slot:
                    if genre != preferred:
                        p = 0.0
                        break
                else:
                    p /= len(GENRES)
                unflipped = genre == preferred  # True for the forced slot too
                p *= (1.0 - flip_prob) if liked == unflipped else flip_prob
            total += p
        result.append(total)
    return result


def observed_history(record: Record) -> tuple[tuple[str, bool], ...]:
    """The genre-relevant part of a record's history: (genre, liked) per item."""
    return tuple((item["genre"], item["rating"] in LIKED_RATINGS) for item in record["history"])


def bayes_prediction(record: Record, info_set: str, occupation_prob: float, flip_prob: float) -> str:
    """The Bayes-optimal guess of the preferred genre from the fields ``info_set`` shows (ties: first genre)."""
    scores = [1.0] * len(GENRES)  # uniform prior
    if info_set in ("profile_and_history", "profile_only"):
        occ = occupation_likelihoods(record["profile"]["occupation"], occupation_prob)
        scores = [s * o for s, o in zip(scores, occ)]
    if info_set in ("profile_and_history", "history_only"):
        hist = history_likelihoods(observed_history(record), flip_prob)
        scores = [s * h for s, h in zip(scores, hist)]
    return GENRES[max(range(len(GENRES)), key=lambda i: scores[i])]


def exact_ceilings(occupation_prob: float, flip_prob: float) -> dict[str, float]:
    """Bayes-optimal accuracy per information set: sum over observations x of max_g P(g) P(x | g)."""
    prior = 1.0 / len(GENRES)
    occupations = [o for g in GENRES for o in OCCUPATIONS[g]]
    occ_liks = [occupation_likelihoods(o, occupation_prob) for o in occupations]
    items = [(g, liked) for g in GENRES for liked in (True, False)]

    history_only = profile_and_history = 0.0
    for history in itertools.product(items, repeat=HISTORY_LENGTH):
        hist = history_likelihoods(history, flip_prob)
        history_only += prior * max(hist)
        for occ in occ_liks:
            profile_and_history += prior * max(h * o for h, o in zip(hist, occ))
    profile_only = sum(prior * max(occ) for occ in occ_liks)
    return {"profile_and_history": profile_and_history, "profile_only": profile_only,
            "history_only": history_only, "query_only": prior}


def rule_accuracy(records: Iterable[Record], occupation_prob: float, flip_prob: float) -> dict[str, float]:
    """Accuracy of the Bayes rule on actual records, per information set (sampling noise included)."""
    records = list(records)
    return {s: sum(bayes_prediction(r, s, occupation_prob, flip_prob) == r["target"] for r in records)
            / len(records) for s in INFO_SETS}


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------

def to_jsonl(records: Iterable[Record]) -> str:
    # Key order is the insertion order of make_user, so the bytes are deterministic without sort_keys.
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def command_line(args: argparse.Namespace, defaults: argparse.Namespace) -> str:
    """The command that regenerates this output, naming only the non-default options."""
    parts = ["python Gemma/make_demo_data.py"]
    for key in ("out", "seed", "n_train", "n_validation", "n_test", "occupation_prob", "flip_prob"):
        value = getattr(args, key)
        if value != getattr(defaults, key):
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def readme_text(args: argparse.Namespace, command: str, ceilings: dict[str, float],
                split_acc: dict[str, dict[str, float]], hashes: dict[str, str]) -> str:
    occupations = "; ".join(f"{g}: {', '.join(OCCUPATIONS[g])}" for g in GENRES)
    rows = "\n".join(
        f"| {s} | {ceilings[s]:.4f} | " + " | ".join(f"{split_acc[split][s]:.3f}" for split in SPLITS) + " |"
        for s in INFO_SETS)
    files = "\n".join(f"- `{name}`: sha256 `{digest}`" for name, digest in hashes.items())
    return f"""# Demo data: which genre does this user prefer?

Synthetic user-modelling data with a planted signal, small enough to fine-tune Gemma 3 270M on a CPU in minutes.
Generated by `Gemma/make_demo_data.py` (its docstring has the full generative model). Regenerate, byte for byte:

    {command}

Splits: {args.n_train} train, {args.n_validation} validation, {args.n_test} test records, one per user; users
never repeat across splits. Each record has `id`, `profile` (age, occupation, city), `history` (4 items, oldest
first: title, genre, rating 1-5), a fixed `query` and the `target`, the user's hidden preferred genre, one of
{", ".join(GENRES)} (each a single Gemma 3 token, with or without a leading space).

The signal (seed {args.seed}):
- the occupation belongs to the preferred genre with probability {args.occupation_prob}
  ({occupations}); age and city are noise;
- one history item is always of the preferred genre, the other three of uniform genres; an item is liked
  (rating 4-5, else 1-2) when its genre is the preferred one, with that status flipped with probability
  {args.flip_prob}; titles are noise given the genre.

## Accuracy ceilings

Best possible accuracy (Bayes-optimal, computed exactly) when the prompt shows only some fields, and what that
same Bayes rule scores on each written split (sampling noise included; with 200 test users one standard error
is about 3 points):

| information shown | expected ceiling | test | validation | train |
|---|---|---|---|---|
{rows}

## Files

{files}
"""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(description="Generate the demo data set with a planted genre signal.")
    parser.add_argument("--out", type=Path, default=Path("Gemma/data/demo"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--n-train", type=int, default=2000, help="train users (default: 2000)")
    parser.add_argument("--n-validation", type=int, default=200, help="validation users (default: 200)")
    parser.add_argument("--n-test", type=int, default=200, help="test users (default: 200)")
    parser.add_argument("--occupation-prob", type=float, default=0.7,
                        help="P(occupation belongs to the preferred genre) (default: 0.7)")
    parser.add_argument("--flip-prob", type=float, default=0.15,
                        help="P(a history item's liked status is flipped) (default: 0.15)")
    parser.add_argument("--check-users", type=int, default=0,
                        help="also simulate this many extra users (not written) and report the Bayes rule's "
                             "accuracy on them, as a Monte Carlo check of the exact ceilings (default: 0)")
    args = parser.parse_args(argv)
    for name in ("n_train", "n_validation", "n_test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("occupation_prob", "flip_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    if args.n_train + args.n_validation + args.n_test + args.check_users > 1_000_000:
        parser.error("at most 1,000,000 users in all (ids have six digits)")
    return args, parser.parse_args([])


def main(argv: list[str] | None = None) -> int:
    args, defaults = parse_args(argv)
    sizes = {"test": args.n_test, "validation": args.n_validation, "train": args.n_train}

    # Consecutive, disjoint ranges of user indices per split (test first, see SPLITS).
    splits: dict[str, list[Record]] = {}
    start = 0
    for split in SPLITS:
        splits[split] = [make_user(i, args.seed, args.occupation_prob, args.flip_prob)
                         for i in range(start, start + sizes[split])]
        start += sizes[split]

    ceilings = exact_ceilings(args.occupation_prob, args.flip_prob)
    split_acc = {split: rule_accuracy(records, args.occupation_prob, args.flip_prob)
                 for split, records in splits.items()}

    args.out.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for split in ("train", "validation", "test"):
        path = args.out / f"{split}.jsonl"
        write_atomic(path, to_jsonl(splits[split]))
        hashes[path.name] = sha256_of(path)
    command = command_line(args, defaults)
    write_atomic(args.out / "README.md", readme_text(args, command, ceilings, split_acc, hashes))

    print(f"wrote {args.out}: " + ", ".join(f"{s} {sizes[s]}" for s in ("train", "validation", "test"))
          + " users, and README.md")
    print(f"{'information shown':<22}{'ceiling':>9}" + "".join(f"{s:>12}" for s in SPLITS))
    for s in INFO_SETS:
        print(f"{s:<22}{ceilings[s]:>9.4f}" + "".join(f"{split_acc[split][s]:>12.3f}" for split in SPLITS))
    if args.check_users:
        # Users beyond the written ones: same model, fresh draws, never written anywhere.
        extra = (make_user(i, args.seed, args.occupation_prob, args.flip_prob)
                 for i in range(start, start + args.check_users))
        mc = rule_accuracy(extra, args.occupation_prob, args.flip_prob)
        print(f"Monte Carlo, {args.check_users:,} extra users: "
              + ", ".join(f"{s} {mc[s]:.4f}" for s in INFO_SETS))
    for name, digest in hashes.items():
        print(f"sha256 {digest}  {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
