#!/usr/bin/env python
"""Convert MovieLens ML-100K or ML-1M, as you downloaded it from GroupLens, into this project's records.

Usage (from the repository root; download and unzip the data yourself, see below):

    python Gemma/convert_movielens.py --input_dir ~/data/ml-100k --output_dir Gemma/data/ml-100k
    python Gemma/convert_movielens.py --input_dir ~/data/ml-1m --output_dir Gemma/data/ml-1m --train_per_user 20
    # options: [--history_items 20] [--train_per_user N] [--overwrite]

The format is recognised by the files in --input_dir: ML-100K's ``u.data`` (user, item, rating, timestamp; tabs),
``u.item`` (``|``-separated: id, title, release dates, IMDb URL, 19 genre flags) and ``u.user``
(id|age|gender|occupation|zip), or ML-1M's ``ratings.dat``, ``movies.dat`` (id::title::genre|genre) and
``users.dat`` (id::gender::age code::occupation code::zip), all ``::``-separated. Both are read as latin-1, the
encoding of their accented titles. ML-1M's age and occupation codes become the words of its README.
GroupLens' licences forbid redistributing the data: this project ships the converter, never the data
(https://grouplens.org/datasets/movielens/).

Writes ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` into --output_dir (each atomically; existing ones
only with --overwrite). One record per (user, rated movie), here user 7's rating of movie 31 (an illustration):

    {"id": "ml100k-u7-i31",
     "profile": {"age": 49, "gender": "male", "occupation": "writer"},
     "history": [{"title": "Kolya (1996)", "genres": "Comedy", "rating": 3}, ...],    # oldest first, at most K
     "query": "How would this user rate \"Jurassic Park (1993)\" (Action, Adventure, Sci-Fi) on a scale of 1 to 5?
               Answer with one number.",
     "target": "4"}

Leave-last-out by time, per user. A user's ratings are put in time order (timestamp, then item id: ML-1M users
often rate several films in the same second, and the tie needs a fixed order). In that order:
- the last rating is the user's test example, the one before it the validation example;
- every earlier rating that has at least one rating before it is a training example; --train_per_user N keeps
  only the N most recent of them (the ones nearest in time to what is evaluated; ML-1M has a million ratings);
- an example's history is the K (--history_items) ratings just before it in that order, oldest first: title,
  genres and rating only, no ids or times. No example ever sees a later rating, so a training example never holds
  the validation or test item, and the test example's history is the user's past, validation item included.
Every user is in every split, with different items: the task is predicting a user's next rating. The cut is per
user, not one date for everyone (the usual leave-one-out protocol), so one user's training example can be later in
calendar time than another user's test example. Users with fewer than 3 ratings (none in ML-100K or ML-1M, which
have at least 20) are left out and counted.
The profile is age, gender and occupation; the zip code is left out (a code the model cannot look up).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from finetune.errors import UserError, positive_int
from finetune.outputs import SPLIT_FILES, check_split_files, write_splits

T = TypeVar("T")

QUERY = 'How would this user rate "{title}" ({genres}) on a scale of 1 to 5? Answer with one number.'
MIN_RATINGS = 3  # a test, a validation and one earlier rating for their history
MAX_PROBLEMS = 20  # malformed lines reported at once, like the training script's data checks

# ML-100K's u.genre: the order of u.item's 19 genre flags.
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
# ML-1M's README: users.dat holds codes for these.
ML1M_AGES = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
ML1M_OCCUPATIONS = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
                    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer")
GENDERS = {"M": "male", "F": "female"}  # words, not letters: what a language model has read about


@dataclass(frozen=True)
class Rating:
    user: int
    item: int
    rating: int
    timestamp: int


@dataclass(frozen=True)
class Movie:
    title: str
    genres: tuple[str, ...]


@dataclass
class MovieLens:
    name: str  # the id prefix: ml100k or ml1m
    users: dict[int, dict]  # user id -> profile
    movies: dict[int, Movie]
    ratings: dict[int, list[Rating]]  # user id -> ratings in time order (timestamp, then item id)


# ----------------------------------------------------------------------------------------------------------------------
# Parsing one line of each file: ValueError with what is wrong; the reader adds the file and line
# ----------------------------------------------------------------------------------------------------------------------


def split_fields(line: str, sep: str, names: tuple[str, ...]) -> list[str]:
    fields = line.split(sep)
    if len(fields) != len(names):
        raise ValueError(f"expected {len(names)} fields separated by {sep!r} ({', '.join(names)}), got {len(fields)}")
    return fields


def whole_number(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a whole number") from None


def rating_from(fields: list[str]) -> Rating:
    user, item, rating, timestamp = (whole_number(f, n) for f, n in zip(fields, ("user id", "item id", "rating",
                                                                                  "timestamp"), strict=True))
    if not 1 <= rating <= 5:
        raise ValueError(f"rating {rating} is outside 1-5")
    return Rating(user, item, rating, timestamp)


def gender_from(text: str) -> str:
    if text not in GENDERS:
        raise ValueError(f"gender {text!r} is neither M nor F")
    return GENDERS[text]


def parse_100k_rating(line: str) -> Rating:
    return rating_from(split_fields(line, "\t", ("user id", "item id", "rating", "timestamp")))


def parse_100k_movie(line: str) -> tuple[int, Movie]:
    names = ("movie id", "title", "release date", "video release date", "IMDb URL", *ML100K_GENRES)
    fields = split_fields(line, "|", names)
    flags = fields[5:]
    if any(flag not in ("0", "1") for flag in flags):
        raise ValueError("the 19 genre flags must each be 0 or 1")
    return whole_number(fields[0], "movie id"), Movie(fields[1], tuple(g for g, f in zip(ML100K_GENRES, flags,
                                                                                         strict=True) if f == "1"))


def parse_100k_user(line: str) -> tuple[int, dict]:
    user, age, gender, occupation, _zip = split_fields(line, "|", ("user id", "age", "gender", "occupation", "zip"))
    return whole_number(user, "user id"), {"age": whole_number(age, "age"), "gender": gender_from(gender),
                                           "occupation": occupation}


def parse_1m_rating(line: str) -> Rating:
    return rating_from(split_fields(line, "::", ("user id", "movie id", "rating", "timestamp")))


def parse_1m_movie(line: str) -> tuple[int, Movie]:
    movie, title, genres = split_fields(line, "::", ("movie id", "title", "genres"))
    return whole_number(movie, "movie id"), Movie(title, tuple(g for g in genres.split("|") if g))


def parse_1m_user(line: str) -> tuple[int, dict]:
    user, gender, age, occupation, _zip = split_fields(line, "::", ("user id", "gender", "age code",
                                                                    "occupation code", "zip"))
    age_code, occupation_code = whole_number(age, "age code"), whole_number(occupation, "occupation code")
    if age_code not in ML1M_AGES:
        raise ValueError(f"age code {age_code} is not one of ML-1M's ({', '.join(map(str, ML1M_AGES))})")
    if not 0 <= occupation_code < len(ML1M_OCCUPATIONS):
        raise ValueError(f"occupation code {occupation_code} is outside ML-1M's 0-{len(ML1M_OCCUPATIONS) - 1}")
    return whole_number(user, "user id"), {"age": ML1M_AGES[age_code], "gender": gender_from(gender),
                                           "occupation": ML1M_OCCUPATIONS[occupation_code]}


@dataclass(frozen=True)
class Format:
    name: str
    title: str  # as GroupLens names it
    ratings: str
    movies: str
    users: str
    parse_rating: Callable[[str], Rating]
    parse_movie: Callable[[str], tuple[int, Movie]]
    parse_user: Callable[[str], tuple[int, dict]]

    @property
    def files(self) -> tuple[str, str, str]:
        return self.ratings, self.movies, self.users


FORMATS = (
    Format("ml100k", "ML-100K", "u.data", "u.item", "u.user", parse_100k_rating, parse_100k_movie, parse_100k_user),
    Format("ml1m", "ML-1M", "ratings.dat", "movies.dat", "users.dat", parse_1m_rating, parse_1m_movie, parse_1m_user),
)


# ----------------------------------------------------------------------------------------------------------------------
# Reading a directory
# ----------------------------------------------------------------------------------------------------------------------


def detect_format(directory: Path) -> Format:
    """The format whose three files are all in `directory`."""
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory; give the unzipped ml-100k or ml-1m folder as --input_dir.")
    complete = [f for f in FORMATS if all((directory / name).is_file() for name in f.files)]
    if len(complete) == 1:
        return complete[0]
    if complete:
        raise UserError(f"{directory}: holds the files of both ML-100K and ML-1M; give a directory with one of them.")
    expected = " or ".join(f"{f.title}'s {', '.join(f.files)}" for f in FORMATS)
    partial = [f"{f.title} lacks {', '.join(n for n in f.files if not (directory / n).is_file())}" for f in FORMATS
               if any((directory / name).is_file() for name in f.files)]
    raise UserError(f"{directory}: expected {expected} (as unzipped from GroupLens' download)"
                    + (f"; {'; '.join(partial)}" if partial else "; found neither") + ".")


def parse_file(path: Path, parse: Callable[[str], T]) -> list[tuple[str, T]]:
    """(location, parsed value) of every non-blank line; every malformed line (up to MAX_PROBLEMS) in one error."""
    rows, problems = [], []
    with open(path, encoding="latin-1") as f:  # GroupLens' encoding; every byte decodes, so no decode errors
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                rows.append((where, parse(line)))
            except ValueError as e:
                problems.append(f"{where}: {e}.")
    raise_problems(problems, path)
    return rows


def raise_problems(problems: list[str], path: Path) -> None:
    if problems:
        more = len(problems) - MAX_PROBLEMS
        raise UserError(problems[:MAX_PROBLEMS] + ([f"... and {more} more problems in {path}"] if more > 0 else []))


def keyed(rows: list[tuple[str, tuple[int, T]]], path: Path, what: str) -> dict[int, T]:
    found: dict[int, T] = {}
    first: dict[int, str] = {}
    problems = []
    for where, (key, value) in rows:
        if key in found:
            problems.append(f"{where}: {what} {key} is already on {first[key].rpartition(': ')[2]}.")
        found[key], first[key] = value, first.get(key, where)
    raise_problems(problems, path)
    return found


def read_movielens(directory: Path) -> MovieLens:
    """The three files of the format found in `directory`, checked against each other: every rating's user and
    movie exist, and no user rates a movie twice (the record ids would collide)."""
    fmt = detect_format(directory)
    movies = keyed(parse_file(directory / fmt.movies, fmt.parse_movie), directory / fmt.movies, "movie id")
    users = keyed(parse_file(directory / fmt.users, fmt.parse_user), directory / fmt.users, "user id")
    ratings_path = directory / fmt.ratings
    problems, seen, by_user = [], {}, {}
    for where, r in parse_file(ratings_path, fmt.parse_rating):
        if r.user not in users:
            problems.append(f"{where}: user {r.user} is not in {fmt.users}.")
        elif r.item not in movies:
            problems.append(f"{where}: movie {r.item} is not in {fmt.movies}.")
        elif (r.user, r.item) in seen:
            problems.append(f"{where}: user {r.user} already rated movie {r.item} on "
                            f"{seen[r.user, r.item].rpartition(': ')[2]}.")
        else:
            seen[r.user, r.item] = where
            by_user.setdefault(r.user, []).append(r)
    raise_problems(problems, ratings_path)
    ordered = {user: sorted(rs, key=lambda r: (r.timestamp, r.item)) for user, rs in sorted(by_user.items())}
    return MovieLens(fmt.name, users, movies, ordered)


# ----------------------------------------------------------------------------------------------------------------------
# Splitting and records
# ----------------------------------------------------------------------------------------------------------------------


def example_positions(n_ratings: int, train_per_user: int | None) -> dict[str, range] | None:
    """Which of a user's ratings (positions in time order) are the examples of each split; None for a user with too
    few ratings. Test: the last; validation: the one before; train: every earlier one with a rating before it (the
    `train_per_user` most recent of them when given)."""
    if n_ratings < MIN_RATINGS:
        return None
    validation = n_ratings - 2
    first_train = 1 if train_per_user is None else max(1, validation - train_per_user)
    return {"train": range(first_train, validation), "validation": range(validation, validation + 1),
            "test": range(n_ratings - 1, n_ratings)}


def genre_text(movie: Movie) -> str:
    return ", ".join(movie.genres) or "unknown"


def make_record(data: MovieLens, user: int, position: int, history_items: int) -> dict:
    """The example of the user's rating at `position` (time order), with the `history_items` ratings before it."""
    ratings = data.ratings[user]
    rated = ratings[position]
    movie = data.movies[rated.item]
    earlier = ratings[max(0, position - history_items):position]
    return {
        "id": f"{data.name}-u{user}-i{rated.item}",
        "profile": data.users[user],
        "history": [{"title": data.movies[r.item].title, "genres": genre_text(data.movies[r.item]),
                     "rating": r.rating} for r in earlier],
        "query": QUERY.format(title=movie.title, genres=genre_text(movie)),
        "target": str(rated.rating),
    }


def split_records(data: MovieLens, split: str, history_items: int, train_per_user: int | None) -> Iterator[dict]:
    """One split's records, user by user (ascending id), each user's in time order; made as they are written."""
    for user, ratings in data.ratings.items():
        positions = example_positions(len(ratings), train_per_user)
        for position in positions[split] if positions else ():
            yield make_record(data, user, position, history_items)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="convert_movielens.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--input_dir", type=Path, required=True,
                   help="the unzipped ml-100k (u.data, u.item, u.user) or ml-1m (ratings.dat, movies.dat, users.dat).")
    p.add_argument("--output_dir", type=Path, required=True, help="where train/validation/test.jsonl go.")
    p.add_argument("--history_items", type=positive_int, default=20,
                   help="ratings shown before each example, the most recent (default 20: about 620 prompt tokens "
                        "with Gemma 3's tokenizer).")
    p.add_argument("--train_per_user", type=positive_int, default=None,
                   help="keep only each user's N most recent training examples (default: all of them).")
    p.add_argument("--overwrite", action="store_true", help="replace train/validation/test.jsonl in --output_dir.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_split_files(args.output_dir, args.overwrite)
        data = read_movielens(args.input_dir)
        counts = write_splits(args.output_dir, {split: split_records(data, split, args.history_items,
                                                                     args.train_per_user) for split in SPLIT_FILES})
    except UserError as e:
        print("\n".join(f"error: {line}" for line in e.problems), file=sys.stderr)
        return e.exit_code
    skipped = sum(len(r) < MIN_RATINGS for r in data.ratings.values())
    print(f"{data.name}: {len(data.ratings)} users with ratings ({skipped} left out: fewer than {MIN_RATINGS}), "
          f"{len(data.movies)} movies -> {args.output_dir}: "
          + ", ".join(f"{split} {count}" for split, count in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
