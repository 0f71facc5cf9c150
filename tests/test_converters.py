"""Benchmark converters (convert_movielens.py, convert_lamp.py): small files in MovieLens' and LaMP's own formats in,
records out that follow leave-last-out by time and pass the training script's own data checks. Pure Python, no model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import convert_lamp
import convert_movielens
import pytest
from conftest import REPO
from finetune.config import Config, DataConfig, FieldNames, ModelConfig, PromptConfig
from finetune.data import build_split, overlap
from finetune.records import check_record, read_records
from finetune.errors import UserError
from finetune.outputs import SPLIT_FILES
from finetune.prompts import PromptEncoder
from finetune.settings import ABLATION_DIR, load_ablation
from tiny_gemma import build_tiny_tokenizer

# ----------------------------------------------------------------------------------------------------------------------
# MovieLens files
# ----------------------------------------------------------------------------------------------------------------------

# (title, genres): latin-1 accents on purpose; movie 8 is ML-100K's "unknown" movie, which has no real genre.
MOVIES = {1: ("Toy Story (1995)", ("Animation", "Children's", "Comedy")), 2: ("Misérables, Les (1995)", ("Drama",)),
          3: ("Café au lait (1994)", ("Comedy",)), 4: ("GoldenEye (1995)", ("Action", "Adventure", "Thriller")),
          5: ("Four Rooms (1995)", ("Thriller",)), 6: ("Être et avoir (2002)", ("Documentary",)),
          7: ("Heat (1995)", ("Action", "Crime", "Thriller")), 8: ("unknown", ())}
# user -> (item, rating, timestamp), deliberately not in time order; user 1 rates items 2 and 5 in the same second
# (the tie goes to the lower item id), user 3 has too few ratings to be converted.
RATINGS = {1: [(7, 4, 600), (3, 4, 100), (5, 3, 300), (1, 5, 200), (6, 5, 500), (2, 2, 300), (4, 1, 400)],
           2: [(2, 5, 70), (8, 3, 50), (1, 4, 60)],
           3: [(1, 3, 10), (2, 4, 20)]}
ORDER = {1: [3, 1, 2, 5, 4, 6, 7], 2: [8, 1, 2]}  # items of each converted user in time order, worked out by hand


def file_lines(ratings_line, movie_line, user_line, users) -> tuple[str, str, str]:
    """(ratings, movies, users) file texts, the ratings interleaved across users as GroupLens' files are."""
    rows = [(u, *r) for u, rs in RATINGS.items() for r in rs]
    rows.sort(key=lambda row: (row[1] * 7 + row[0]) % 5)  # a scramble: the converter must sort by time itself
    ratings = "".join(ratings_line(*row) + "\n" for row in rows)
    movies = "".join(movie_line(i, title, genres) + "\n" for i, (title, genres) in MOVIES.items())
    return ratings, movies, "".join(user_line(*u) + "\n" for u in users)


def ml100k_movie(i: int, title: str, genres: tuple[str, ...]) -> str:
    flags = ["1" if g in genres or (g == "unknown" and not genres) else "0" for g in convert_movielens.ML100K_GENRES]
    return "|".join([str(i), title, "01-Jan-1995", "", f"http://us.imdb.com/M/title-exact?{i}", *flags])


def write_ml100k(directory: Path) -> Path:
    users = [(1, 24, "M", "technician", "85711"), (2, 53, "F", "other", "94043"), (3, 23, "M", "writer", "32067")]
    texts = file_lines(lambda u, i, r, t: f"{u}\t{i}\t{r}\t{t}", ml100k_movie, lambda *u: "|".join(map(str, u)), users)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in zip(("u.data", "u.item", "u.user"), texts, strict=True):
        (directory / name).write_text(text, encoding="latin-1")
    return directory


def write_ml1m(directory: Path) -> Path:
    # gender, age code, occupation code: 1 = Under 18 / 10 = K-12 student, 56 = 56+ / 16 = self-employed.
    users = [(1, "F", 1, 10, "48067"), (2, "M", 56, 16, "70072"), (3, "M", 25, 15, "55117")]
    texts = file_lines(lambda u, i, r, t: f"{u}::{i}::{r}::{t}", lambda i, t, g: f"{i}::{t}::{'|'.join(g)}",
                       lambda *u: "::".join(map(str, u)), users)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in zip(("ratings.dat", "movies.dat", "users.dat"), texts, strict=True):
        (directory / name).write_text(text, encoding="latin-1")
    return directory


def read_splits(directory: Path) -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in (directory / name).read_text(encoding="utf-8").splitlines()]
            for split, name in SPLIT_FILES.items()}


def item_of(record_id: str) -> tuple[int, int]:
    _, user, item = record_id.split("-")
    return int(user[1:]), int(item[1:])


# ----------------------------------------------------------------------------------------------------------------------
# The project's own data checks, as train_deepspeed.prepare_data runs them
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    return PromptEncoder(build_tiny_tokenizer(), max_length=1024)


def check_like_training(directory: Path, encoder: PromptEncoder, ablation: str) -> dict:
    """build_split for every file and the overlap check between them: what a run does before the model loads."""
    prompt = PromptConfig(**load_ablation(ABLATION_DIR / f"{ablation}.json", []).prompt)
    splits = {}
    for split, name in SPLIT_FILES.items():
        path = directory / name
        cfg = Config(model=ModelConfig("x"), data=DataConfig(str(path)), prompt=prompt)
        splits[split] = build_split(path, split, cfg, encoder)
        assert splits[split].stats.dropped_too_long == splits[split].stats.history_shortened == 0
    assert overlap(splits) == {}
    return splits


# ----------------------------------------------------------------------------------------------------------------------
# MovieLens
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("write, name", [(write_ml100k, "ml100k"), (write_ml1m, "ml1m")])
def test_movielens_leave_last_out_by_time(tmp_path, encoder, write, name):
    out = tmp_path / "out"
    assert convert_movielens.main(["--input_dir", str(write(tmp_path / "raw")), "--output_dir", str(out),
                                   "--history_items", "3"]) == 0
    splits = read_splits(out)
    # User 1 (7 ratings): test, validation and the 4 earlier ones that have history; user 2 (3): test and
    # validation only; user 3 (2 ratings) is left out.
    assert {split: len(records) for split, records in splits.items()} == {"train": 4, "validation": 2, "test": 2}
    ids = [r["id"] for records in splits.values() for r in records]
    assert len(ids) == len(set(ids)) and all(i.startswith(f"{name}-u") for i in ids)
    for user, order in ORDER.items():
        ratings = {item: rating for item, rating, _ in RATINGS[user]}
        items = {split: [item for u, item in map(item_of, (r["id"] for r in records)) if u == user]
                 for split, records in splits.items()}
        assert items == {"train": order[1:-2], "validation": [order[-2]], "test": [order[-1]]}
        for record in (r for records in splits.values() for r in records if item_of(r["id"])[0] == user):
            position = order.index(item_of(record["id"])[1])
            earlier = order[max(0, position - 3):position]  # the K=3 ratings just before, oldest first
            assert record["history"] == [{"title": MOVIES[i][0], "genres": ", ".join(MOVIES[i][1]) or "unknown",
                                          "rating": ratings[i]} for i in earlier]
            assert record["target"] == str(ratings[order[position]])
            title, genres = MOVIES[order[position]]
            assert f'"{title}" ({", ".join(genres) or "unknown"})' in record["query"]
            # Nothing from the user's future: never the test item, and in training never the validation item.
            later = order[position:]
            assert not {h["title"] for h in record["history"]} & {MOVIES[i][0] for i in later}
    assert "Misérables, Les (1995)" in json.dumps(splits["test"], ensure_ascii=False)  # latin-1 read as latin-1
    check_like_training(out, encoder, "profile_and_history")


def test_movielens_profiles_and_ml1m_codes(tmp_path):
    profiles = {}
    for write in (write_ml100k, write_ml1m):
        data = convert_movielens.read_movielens(write(tmp_path / write.__name__))
        profiles[data.name] = data.users
    assert profiles["ml100k"][1] == {"age": 24, "gender": "male", "occupation": "technician"}
    assert profiles["ml1m"][1] == {"age": "Under 18", "gender": "female", "occupation": "K-12 student"}
    assert profiles["ml1m"][2] == {"age": "56+", "gender": "male", "occupation": "self-employed"}


def test_movielens_train_per_user_keeps_the_most_recent(tmp_path):
    out = tmp_path / "out"
    assert convert_movielens.main(["--input_dir", str(write_ml100k(tmp_path / "raw")), "--output_dir", str(out),
                                   "--train_per_user", "2"]) == 0
    train = read_splits(out)["train"]
    assert [item_of(r["id"]) for r in train] == [(1, 5), (1, 4)]  # user 1's two nearest the validation rating
    assert len(train[-1]["history"]) == 4  # --history_items defaults to 20: every earlier rating


def test_movielens_refuses_to_overwrite(tmp_path, capsys):
    raw, out = write_ml100k(tmp_path / "raw"), tmp_path / "out"
    argv = ["--input_dir", str(raw), "--output_dir", str(out)]
    assert convert_movielens.main(argv) == 0
    before = {name: (out / name).read_bytes() for name in SPLIT_FILES.values()}
    (raw / "u.data").write_text("", encoding="latin-1")  # would convert to nothing, if it were read at all
    assert convert_movielens.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in SPLIT_FILES.values()} == before
    write_ml100k(raw)
    assert convert_movielens.main([*argv, "--overwrite"]) == 0
    assert not list(out.glob(".*tmp*"))  # the atomic writer left no temporary file


@pytest.mark.parametrize("write, name, line, bad, message", [
    (write_ml100k, "u.data", 3, "1\t9", "line 3: expected 4 fields"),
    (write_ml100k, "u.data", 2, "1\t1\t7\t5", "line 2: rating 7 is outside 1-5"),
    (write_ml100k, "u.data", 1, "1\t99\t3\t5", "line 1: movie 99 is not in u.item"),
    (write_ml100k, "u.item", 4, "4|GoldenEye (1995)|x|y|z", "line 4: expected 24 fields"),
    (write_ml100k, "u.user", 2, "2|old|F|other|94043", "line 2: age 'old' is not a whole number"),
    (write_ml1m, "users.dat", 2, "2::M::7::16::70072", "line 2: age code 7 is not one of ML-1M's"),
    (write_ml1m, "users.dat", 3, "3::M::25::21::55117", "line 3: occupation code 21 is outside"),
    (write_ml1m, "ratings.dat", 5, "1::3::4", "line 5: expected 4 fields"),
])
def test_movielens_malformed_line_names_file_and_line(tmp_path, capsys, write, name, line, bad, message):
    raw = write(tmp_path / "raw")
    lines = (raw / name).read_text(encoding="latin-1").splitlines()
    lines[line - 1] = bad
    (raw / name).write_text("\n".join(lines) + "\n", encoding="latin-1")
    with pytest.raises(UserError, match=re.escape(f"{raw / name}: {message}")):
        convert_movielens.read_movielens(raw)
    assert convert_movielens.main(["--input_dir", str(raw), "--output_dir", str(tmp_path / "out")]) == 2
    assert f"error: {raw / name}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_movielens_duplicate_rating_and_unknown_directory(tmp_path):
    raw = write_ml100k(tmp_path / "raw")
    with open(raw / "u.data", "a", encoding="latin-1") as f:
        f.write("2\t1\t3\t999\n")
    with pytest.raises(UserError, match=r"u.data: line 13: user 2 already rated movie 1 on line \d+"):
        convert_movielens.read_movielens(raw)
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "ratings.dat").write_text("")
    with pytest.raises(UserError, match=r"expected ML-100K's u.data, u.item, u.user or ML-1M's ratings.dat, "
                                        r"movies.dat, users.dat .*ML-1M lacks movies.dat, users.dat"):
        convert_movielens.read_movielens(tmp_path / "neither")


def test_movielens_script_runs_as_a_subprocess_and_is_deterministic(tmp_path):
    raw = write_ml1m(tmp_path / "raw")
    assert convert_movielens.main(["--input_dir", str(raw), "--output_dir", str(tmp_path / "a")]) == 0
    done = subprocess.run([sys.executable, "Gemma/convert_movielens.py", "--input_dir", str(raw), "--output_dir",
                           str(tmp_path / "b")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ml1m: 3 users with ratings (1 left out" in done.stdout and "train 4, validation 2, test 2" in done.stdout
    for name in SPLIT_FILES.values():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# ----------------------------------------------------------------------------------------------------------------------
# LaMP
# ----------------------------------------------------------------------------------------------------------------------


def lamp_question(qid: int, n_docs: int) -> dict:
    """A LaMP-3-like question: its profile documents in no particular date order."""
    dates = [f"2011-{(7 * d) % 12 + 1:02d}-0{d % 9 + 1}" for d in range(n_docs)]
    return {"id": str(qid), "input": f"What is the score of this review? review: café {qid}",
            "profile": [{"text": f"review {qid}.{d}", "score": d % 5 + 1, "id": f"{qid}{d}", "date": dates[d]}
                        for d in range(n_docs)]}


def write_lamp(directory: Path, split: str, ids: range, nested: bool = True) -> None:
    folder = directory / split if nested else directory
    folder.mkdir(parents=True, exist_ok=True)
    questions = [lamp_question(i, n_docs=i % 4 + 2) for i in ids]
    golds = {"task": "LaMP_3", "golds": [{"id": str(i), "output": str(i % 5 + 1)} for i in ids]}
    (folder / f"{split}_questions.json").write_text(json.dumps(questions, indent=2), encoding="utf-8")
    (folder / f"{split}_outputs.json").write_text(json.dumps(golds, indent=2), encoding="utf-8")


def test_lamp_directory_maps_train_and_dev_and_keeps_recent_documents(tmp_path, encoder):
    write_lamp(tmp_path / "LaMP_3", "train", range(100, 108))
    write_lamp(tmp_path / "LaMP_3", "dev", range(200, 203))
    out = tmp_path / "out"
    assert convert_lamp.main(["--lamp_dir", str(tmp_path / "LaMP_3"), "--output_dir", str(out),
                              "--validation_size", "2", "--history_items", "3"]) == 0
    splits = read_splits(out)
    assert {split: len(records) for split, records in splits.items()} == {"train": 6, "validation": 2, "test": 3}
    assert [r["id"] for r in splits["test"]] == ["200", "201", "202"]  # LaMP's dev is our test, its ids kept
    assert sorted(r["id"] for r in splits["train"] + splits["validation"]) == [str(i) for i in range(100, 108)]
    for record in (r for records in splits.values() for r in records):
        question = lamp_question(int(record["id"]), n_docs=int(record["id"]) % 4 + 2)
        by_date = sorted(question["profile"], key=lambda doc: doc["date"])[-3:]
        assert record["history"] == [{"text": doc["text"], "score": str(doc["score"])} for doc in by_date]
        assert record["query"] == question["input"] and record["target"] == str(int(record["id"]) % 5 + 1)
        assert "profile" not in record
    splits_checked = check_like_training(out, encoder, "history_only")
    assert splits_checked["test"].ids == ["200", "201", "202"]
    # No profile: the ablations that show one refuse the records, as the docstring says.
    rec = read_records(out / "test.jsonl", FieldNames())[0]
    assert "profile is missing" in " ".join(check_record(rec, "test.jsonl: line 1", PromptConfig()))


def test_lamp_validation_hold_out_does_not_depend_on_file_order(tmp_path):
    for name, ids in (("a", range(100, 110)), ("b", range(109, 99, -1))):
        write_lamp(tmp_path / name, "train", ids, nested=False)
        write_lamp(tmp_path / name, "dev", range(200, 202), nested=False)
        assert convert_lamp.main(["--lamp_dir", str(tmp_path / name), "--output_dir", str(tmp_path / f"out_{name}"),
                                  "--validation_size", "3"]) == 0
    held = [sorted(r["id"] for r in read_splits(tmp_path / f"out_{name}")["validation"]) for name in "ab"]
    assert held[0] == held[1] and len(held[0]) == 3


def test_lamp_explicit_files_and_subprocess(tmp_path, capsys):
    for split, ids in (("train", range(1, 5)), ("validation", range(5, 7)), ("dev", range(7, 9))):
        write_lamp(tmp_path, split, ids, nested=False)
    files = {"train": "train", "validation": "validation", "test": "dev"}
    argv = [arg for split, lamp in files.items() for kind in ("questions", "outputs")
            for arg in (f"--{split}_{kind}", str(tmp_path / f"{lamp}_{kind}.json"))]
    done = subprocess.run([sys.executable, "Gemma/convert_lamp.py", *argv, "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train 4, validation 2, test 2" in done.stdout
    assert [r["id"] for r in read_splits(tmp_path / "out")["validation"]] == ["5", "6"]
    assert convert_lamp.main([*argv, "--output_dir", str(tmp_path / "again"), "--validation_size", "1"]) == 2
    assert "--validation_size holds train questions out only when no validation files" in capsys.readouterr().err


def test_lamp_errors_name_the_file(tmp_path, capsys):
    write_lamp(tmp_path, "train", range(1, 6), nested=False)
    write_lamp(tmp_path, "dev", range(1, 3), nested=False)  # the same ids as train: two files of one split?
    argv = ["--lamp_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--validation_size", "1"]
    assert convert_lamp.main(argv) == 2
    assert "ids are in both the train and the test questions" in capsys.readouterr().err
    write_lamp(tmp_path, "dev", range(10, 12), nested=False)
    golds = json.loads((tmp_path / "dev_outputs.json").read_text())
    golds["golds"].pop()
    (tmp_path / "dev_outputs.json").write_text(json.dumps(golds))
    assert convert_lamp.main(argv) == 2
    assert "1 questions have no gold output (e.g. 11)" in capsys.readouterr().err
    text = (tmp_path / "train_questions.json").read_text().splitlines()
    text[3] = text[3].rstrip(",")  # a missing comma, on line 4
    (tmp_path / "train_questions.json").write_text("\n".join(text))
    with pytest.raises(UserError, match=r"train_questions.json: line \d+: invalid JSON"):
        convert_lamp.read_questions(tmp_path / "train_questions.json")
    assert convert_lamp.main(["--output_dir", str(tmp_path / "out")]) == 2
    assert "the train split needs --train_questions and --train_outputs (or --lamp_dir)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lamp_gold_outputs_and_validation_size(tmp_path):
    path = tmp_path / "train_outputs.json"
    path.write_text(json.dumps({"task": "LaMP_3", "golds": [{"id": "1", "output": 4}, {"id": 2, "output": "5"}]}))
    assert convert_lamp.read_golds(path) == ("LaMP_3", {"1": "4", "2": "5"})  # a number score becomes its text
    path.write_text(json.dumps({"task": "LaMP_3", "golds": [{"id": "1", "output": " "}]}))
    with pytest.raises(UserError, match="train_outputs.json: gold 1: expected"):
        convert_lamp.read_golds(path)
    write_lamp(tmp_path, "train", range(1, 4), nested=False)
    write_lamp(tmp_path, "dev", range(5, 6), nested=False)
    with pytest.raises(UserError, match="--validation_size 3 would leave no training question"):
        convert_lamp.convert({"train": convert_lamp.SplitFiles(tmp_path / "train_questions.json",
                                                                tmp_path / "train_outputs.json"),
                              "test": convert_lamp.SplitFiles(tmp_path / "dev_questions.json",
                                                               tmp_path / "dev_outputs.json")}, 20, 3)
