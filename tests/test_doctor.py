"""Data doctor: the repo's own photos with planted problems (flipped labels; exact, resized and re-encoded copies across
splits), checked on real ImageNet features (EfficientNet-Lite0, offline weights) through the feature cache."""

from __future__ import annotations

import copy
import io
import json
import logging
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from conftest import IMAGE, LABEL, doctor_features, sample_rows, write_dataset
from huggingface_hub import constants as hub_constants
from PIL import Image

from hf_transfer import finetune, offline
from hf_transfer.card import data_quality_section
from hf_transfer.cli import main
from hf_transfer.data import load_image_dataset
from hf_transfer.data_check import exclude, flagged_indices, image_names, split_features, summary_text, write_report
from hf_transfer.doctor import class_balance, diagnose, find_label_issues, similar_pairs
from hf_transfer.errors import DoctorError
from hf_transfer.feature_files import cache_root
from hf_transfer.options import DataArguments, DoctorArguments
from hf_transfer.pipeline import prepare, run_arguments, run_doctor
from hf_transfer.recipe import parse_recipe
from hf_transfer.repo_files import DATA_REPORT, DATA_SUSPECTS_PNG

LITE0 = "timm/tf_efficientnet_lite0.in1k"
FLIPPED = 6


def _reencoded(cell: dict, kind: str) -> dict:
    image = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
    if kind == "resized":  # 3/4 of the side, as a re-saved smaller copy would be
        image = image.resize((round(image.width * 0.75), round(image.height * 0.75)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90 if kind == "resized" else 50)
    return {"bytes": buffer.getvalue(), "path": f"{kind}-{cell['path']}"}


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory):
    """No Hub, and a datasets cache (with its feature cache) of this module's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
        patch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.delenv("HF_TRANSFER_DEBUG", raising=False)
        offline.hub_reachable.cache_clear()
        yield
        offline.hub_reachable.cache_clear()


@pytest.fixture(scope="module")
def planted(offline_cache, tmp_path_factory):
    """56 train photos with 6 labels flipped, plus an exact, a resized (3/4) and a JPEG-50 copy of three test photos;
    8 validation and 40 test photos; all distinct photos otherwise. The doctor runs once on it, end to end."""
    rows = sample_rows("train")
    train, validation, test = rows[:56], rows[56:64], sample_rows("test")[:40]
    flipped = sorted(np.random.default_rng(0).choice(len(train), FLIPPED, replace=False).tolist())
    train_labels = [1 - row["labels"] if index in flipped else row["labels"] for index, row in enumerate(train)]
    copies = {"exact": test[0], "resized": test[1], "reencoded": test[2]}
    copy_cells = [{"bytes": copies["exact"]["image"]["bytes"], "path": f"exact-{copies['exact']['image']['path']}"},
                  _reencoded(copies["resized"]["image"], "resized"), _reencoded(copies["reencoded"]["image"], "reencoded")]
    folder = tmp_path_factory.mktemp("planted")
    (folder / "data").mkdir()
    write_dataset(folder, {
        "train": {"image": [row["image"] for row in train] + copy_cells,
                  "labels": train_labels + [row["labels"] for row in copies.values()]},
        "validation": {"image": [row["image"] for row in validation], "labels": [row["labels"] for row in validation]},
        "test": {"image": [row["image"] for row in test], "labels": [row["labels"] for row in test]},
    }, {"image": IMAGE, "labels": LABEL})
    output_dir = tmp_path_factory.mktemp("doctor") / "out"
    recipe = parse_recipe([], dataset=str(folder), model=LITE0, output_dir=str(output_dir), per_device_eval_batch_size=64, seed=42)
    report = run_doctor(recipe)
    return SimpleNamespace(
        report=report, recipe=recipe, folder=folder, output_dir=output_dir, train=train, test=test,
        flipped={train[index]["image"]["path"] for index in flipped},
        true_label={row["image"]["path"]: ["cat", "dog"][row["labels"]] for row in train},
        copies={(cell["path"], source["image"]["path"]) for cell, source in zip(copy_cells, copies.values())},
    )


def test_flipped_labels_rank_at_the_top_with_their_true_label_suggested(planted):
    ranked = planted.report["label_issues"]
    top = [issue["image"] for issue in ranked[:FLIPPED + 2]]
    found = planted.flipped & set(top)
    assert len(found) >= FLIPPED - 1, (top, planted.flipped)
    for issue in ranked:
        if issue["image"] in found:
            assert issue["split"] == "train" and issue["suggested_label"] == planted.true_label[issue["image"]] != issue["label"]
            assert issue["label_quality"] < 0.5 < issue["suggested_probability"]
    assert 0.8 < planted.report["summary"]["probe_accuracy"] < 1  # out of fold, against the given (partly flipped) labels
    qualities = [issue["label_quality"] for issue in ranked]
    assert qualities == sorted(qualities)  # most suspect first
    assert planted.report["summary"]["label_issues"] == len(ranked)


def test_every_planted_cross_split_copy_is_a_leak_and_no_distinct_photos_are(planted):
    leaks = planted.report["leaks"]
    found = set()
    for pair in leaks:
        first, second = pair["images"]
        assert (first["split"], second["split"]) in {("train", "test"), ("test", "train")}
        found.add((first["image"], second["image"]) if first["split"] == "train" else (second["image"], first["image"]))
        assert pair["similarity"] >= planted.report["settings"]["duplicate_threshold"]
    assert found == planted.copies  # all three copies, nothing else
    exact = next(pair for pair in leaks if any(image["image"].startswith("exact-") for image in pair["images"]))
    assert exact["similarity"] > 0.999
    assert planted.report["summary"]["leaks_by_splits"] == {"train-test": {"pairs": 3, "test_images": 3}}
    assert planted.report["near_duplicates"] == []  # the sample's photos are all distinct


def test_findings_point_at_the_images_in_the_run_split(planted):
    data = load_image_dataset(planted.recipe.data, seed=42)
    for issue in planted.report["label_issues"]:
        row = data.splits[issue["split"]][issue["index"]]
        assert row["image"]["path"] == issue["image"] and ["cat", "dog"][row["labels"]] == issue["label"]
    for pair in planted.report["leaks"]:
        for image in pair["images"]:
            assert data.splits[image["split"]][image["index"]]["image"]["path"] == image["image"]


def test_report_contact_sheet_and_summary_are_written(planted):
    report = json.loads((planted.output_dir / DATA_REPORT).read_text())
    assert {"label_issues", "near_duplicates", "leaks", "class_balance", "summary", "settings"} <= set(report)
    assert report["contact_sheet"] == DATA_SUSPECTS_PNG and report["label_issues"] == planted.report["label_issues"]
    sheet = Image.open(planted.output_dir / DATA_SUSPECTS_PNG)
    assert sheet.format == "PNG" and sheet.width > 800
    pixels = np.asarray(sheet.convert("L"), dtype=float)
    assert pixels.std() > 20  # photos, not an empty figure
    text = summary_text(report)
    assert "leaks across splits: 3 pair(s) (train-test: 3 pair(s), 3 test image(s) with a copy in train)" in text
    assert f"label issues: {len(report['label_issues'])} likely wrong label(s)" in text
    top = report["label_issues"][0]
    assert f"train #{top['index']} {top['image']} labelled {top['label']}, looks like {top['suggested_label']}" in text
    assert "the probe is right on only" not in text
    weak = {**report, "summary": {**report["summary"], "probe_accuracy": 0.781}}
    assert "the probe is right on only 78.1% of the images (out of fold)" in summary_text(weak)


def test_class_balance_counts_every_split(planted):
    balance = planted.report["class_balance"]
    data = load_image_dataset(planted.recipe.data, seed=42)
    for split, rows in data.splits.items():
        labels = rows["labels"]
        assert balance["images_per_class"][split] == {"cat": labels.count(0), "dog": labels.count(1)}
    counts = balance["images_per_class"]["train"]
    few = class_balance({"train": np.array([0] * counts["cat"] + [1] * counts["dog"]), "test": np.array([0, 0])}, ["cat", "dog"],
                        minimum=max(counts.values()))
    assert few["below_minimum"] == [{"split": "train", "class": min(counts, key=counts.get), "images": min(counts.values())},
                                    {"split": "test", "class": "dog", "images": 0}]
    assert few["largest_to_smallest"]["test"] is None


def test_exclude_flagged_removes_train_copies_and_suspects_never_test_unless_asked(planted):
    report = planted.report
    data = load_image_dataset(planted.recipe.data, seed=42)
    copy_rows = {image["index"] for pair in report["leaks"] for image in pair["images"] if image["split"] == "train"}
    suspects = {split: {issue["index"] for issue in report["label_issues"] if issue["split"] == split} for split in ("train", "test")}
    assert flagged_indices(report, "leaks") == {"train": sorted(copy_rows)}
    assert flagged_indices(report, "label_issues") == {"train": sorted(suspects["train"])}
    assert flagged_indices(report, "both") == {"train": sorted(copy_rows | suspects["train"])}
    assert flagged_indices(report, None) == {}
    with_test = flagged_indices(report, "both", ("train", "test"))
    assert with_test.get("test", []) == sorted(suspects["test"])  # leaks never take the test side
    kept = exclude(data, flagged_indices(report, "both"))
    assert len(kept.splits["train"]) == len(data.splits["train"]) - len(copy_rows | suspects["train"])
    assert len(kept.splits["test"]) == len(data.splits["test"])
    names = {cell["path"] for cell in kept.splits["train"]["image"]}
    assert not names & {copy for copy, _ in planted.copies}
    assert not names & {issue["image"] for issue in report["label_issues"] if issue["split"] == "train"}


def test_the_doctor_command_reads_the_cache_and_prints_its_summary(planted, tmp_path, capsys, caplog):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset: {planted.folder}\nmodel: {LITE0}\nper_device_eval_batch_size: 64\nseed: 42\n")
    with caplog.at_level(logging.INFO, logger="hf_transfer"):
        main(["doctor", str(recipe), "--output_dir", str(tmp_path / "again")])
    hits = [record.getMessage() for record in caplog.records if "feature cache hit" in record.getMessage()]
    assert len(hits) == 3, hits  # train, validation, test: nothing extracted again
    out = capsys.readouterr().out
    assert "Data doctor" in out and "leaks across splits: 3 pair(s)" in out
    again = json.loads((tmp_path / "again" / DATA_REPORT).read_text())
    assert again["label_issues"] == planted.report["label_issues"] and again["leaks"] == planted.report["leaks"]  # seeded


def test_faiss_inverted_index_finds_the_same_pairs_as_the_exhaustive_search(planted):
    features = doctor_features(planted.recipe)
    pooled = np.concatenate([features[split][0] for split in ("train", "validation", "test")])
    for threshold in (0.9, 0.75):  # 0.75 also pairs distinct photos: more pairs to compare
        exhaustive = similar_pairs(pooled, threshold)
        inverted = similar_pairs(pooled, threshold, exact_up_to=10)
        assert {tuple(pair) for pair in exhaustive[:, :2].astype(int)} == {tuple(pair) for pair in inverted[:, :2].astype(int)}
        assert len(exhaustive) >= 3 and np.all(np.diff(exhaustive[:, 2]) <= 0)
    assert len(similar_pairs(pooled, 0.75)) > len(similar_pairs(pooled, 0.9))


def test_a_runs_feature_store_gives_the_same_features_from_the_cache(planted, caplog):
    """The call `pipeline.run` makes: the run's model, transforms and store (here one that trains on 2 augmented views)."""
    recipe = planted.recipe
    store = prepare(recipe, run_arguments(recipe)).store
    store.views = 2
    with caplog.at_level(logging.INFO, logger="hf_transfer"):
        found = split_features(store)
    assert sum("feature cache hit" in record.getMessage() for record in caplog.records) == 3
    alone = doctor_features(recipe)
    for split in ("train", "validation", "test"):
        assert np.array_equal(found[split][0], alone[split][0]) and np.array_equal(found[split][1], alone[split][1])
    assert store.views == 2 and store.summary["splits"] == {}  # the run's store keeps its views and its own record
    fp32 = copy.deepcopy(recipe)
    fp32.run.inference_precision = "fp32"
    assert prepare(fp32, run_arguments(fp32)).store.precision.dtype == "fp32", "the recipe's choice"


def test_diagnose_on_features_alone_and_small_classes(planted):
    features = doctor_features(planted.recipe)
    train_features, train_labels = features["train"]
    labels = train_labels.copy()
    labels[:3] = 2  # a third class with 3 images: too few for 5 folds
    found = find_label_issues(train_features, labels, folds=5)
    assert found["skipped_classes"] == [2] and not found["checked"][:3].any()
    assert all(row >= 3 for row, *_ in found["ranked"])
    report = diagnose({"train": train_features}, {"train": labels}, ["cat", "dog", "fox"])
    assert report["summary"]["label_check_skipped_classes"] == [2]
    assert report["class_balance"]["below_minimum"] == [{"split": "train", "class": "fox", "images": 3}]
    assert all(issue["image"] == f"#{issue['index']}" for issue in report["label_issues"])  # no names given: `#index`


def test_each_doctor_option_changes_what_it_reports(planted, tmp_path):
    found = doctor_features(planted.recipe)
    features, labels = ({split: pair[index] for split, pair in found.items()} for index in (0, 1))
    classes = planted.report["classes"]

    def report(**options):
        return diagnose(features, labels, classes, options=DoctorArguments(**options))

    default = report()
    assert default["summary"]["leak_pairs"] == 3 and default["summary"]["classes_below_minimum"] == 0
    assert report(doctor_duplicate_threshold=0.999)["summary"]["leak_pairs"] == 1, "only the exact copy is that close"
    assert report(doctor_min_class_images=1000)["summary"]["classes_below_minimum"] == 2
    two_folds = report(doctor_folds=2)
    assert two_folds["settings"]["folds"] == 2
    assert [issue["label_quality"] for issue in two_folds["label_issues"]] != [issue["label_quality"] for issue in default["label_issues"]]
    options = DoctorArguments(exclude_flagged="label_issues", exclude_flagged_from="train,test")
    assert options.excluded_splits == ["train", "test"]  # what check_run_data passes to flagged_indices
    suspects = {split for split in ("train", "test") if any(issue["split"] == split for issue in default["label_issues"])}
    assert set(flagged_indices(default, options.exclude_flagged, options.excluded_splits)) == suspects
    data = load_image_dataset(planted.recipe.data, seed=42)
    sizes = {}
    for sheet_size in (1, 24):
        write_report(default, data, tmp_path / str(sheet_size), sheet_size=sheet_size)
        with Image.open(tmp_path / str(sheet_size) / DATA_SUSPECTS_PNG) as sheet:
            sizes[sheet_size] = sheet.size
    assert sizes[1][0] * sizes[1][1] < sizes[24][0] * sizes[24][1], "one suspect and 3 leaks: a smaller sheet"


def test_card_section_counts_and_says_what_was_excluded(planted):
    report = planted.report
    section = data_quality_section(report)
    assert section.startswith("## Data quality") and "Nothing was excluded" in section
    assert f"| likely wrong labels (cleanlab, out-of-fold probe) | {len(report['label_issues'])} (train " in section
    assert "3 (train-test: 3)" in section and f"]({DATA_SUSPECTS_PNG})" in section
    excluded = {split: len(indices) for split, indices in flagged_indices(report, "leaks").items()}
    assert "Excluded before training (`exclude_flagged: leaks`): 3 from train." in data_quality_section(report, excluded, "leaks")


def test_image_folders_give_paths_relative_to_the_dataset_and_parquet_without_paths_give_index(tmp_path, offline_cache):
    folder = tmp_path / "pets"
    rows = [row for row in sample_rows("train") if row["labels"] == 0][:4] + [row for row in sample_rows("train") if row["labels"] == 1][:4]
    for index, row in enumerate(rows):
        target = folder / ["cat", "dog"][row["labels"]] / f"{index}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(row["image"]["bytes"])
    args = DataArguments(dataset=str(folder), validation_size=2, test_size=2)
    data = load_image_dataset(args)
    names = image_names(data, str(folder))
    on_disk = {path.relative_to(folder).as_posix() for path in folder.rglob("*.jpg")}
    assert sorted(name for split in names.values() for name in split) == sorted(on_disk)
    no_paths = tmp_path / "no_paths"
    (no_paths / "data").mkdir(parents=True)
    write_dataset(no_paths, {"train": {"image": [{"bytes": row["image"]["bytes"], "path": None} for row in rows],
                                       "labels": [row["labels"] for row in rows]}}, {"image": IMAGE, "labels": LABEL})
    data = load_image_dataset(DataArguments(dataset=str(no_paths), validation_size=2, test_size=2))
    assert image_names(data, str(no_paths))["train"] == [f"#{index}" for index in range(len(data.splits["train"]))]


@pytest.mark.parametrize(("options", "words"), [
    ({"exclude_flagged": "dupes"}, "`exclude_flagged: dupes` is not one of leaks | label_issues | both"),
    ({"exclude_flagged_from": "train,tset"}, "names ['tset']"),
    ({"doctor_folds": 1}, "at least 2 folds"),
    ({"doctor_duplicate_threshold": 1.5}, "give a number in (0, 1]"),
    ({"exclude_flagged": "leaks", "data_doctor": False}, "but `data_doctor: false` turns the doctor off"),
])
def test_bad_doctor_options_are_refused_with_what_to_write(options, words):
    with pytest.raises(DoctorError) as refused:
        DoctorArguments(**options)
    assert words in str(refused.value)
    assert DoctorArguments(exclude_flagged="none").exclude_flagged is None


# --- in a training run ------------------------------------------------------------------------------------------------
def _cached_run(planted, output_dir, **options) -> dict:
    return finetune(dataset=str(planted.folder), model=LITE0, freeze="head_only", num_train_epochs=1, learning_rate=3e-3,
                    per_device_eval_batch_size=64, load_best_model_at_end=False, disable_tqdm=True, seed=42,
                    output_dir=str(output_dir), **options)


def test_a_cached_run_checks_its_data_and_excludes_what_it_is_told_from_the_same_cache(planted, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_transfer")
    before = sorted(path.name for path in cache_root().glob("train-*"))
    results = _cached_run(planted, tmp_path / "both", exclude_flagged="both")
    assert "Data doctor" in caplog.text and "label issues:" in caplog.text, "the summary at the start of training"
    flagged = flagged_indices(planted.report, "both")
    assert results["data_doctor"]["excluded"] == {"train": len(flagged["train"])} and results["data_doctor"]["leak_pairs"] == 3
    assert results["split_sizes"]["train"] == len(planted.train) + 3 - len(flagged["train"])
    assert results["split_sizes"]["test"] == len(planted.test), "never from test unless asked"
    assert sorted(path.name for path in cache_root().glob("train-*")) == before, "the whole split's cache entry, no second extraction"
    out = tmp_path / "both"
    assert json.loads((out / DATA_REPORT).read_text())["label_issues"] == planted.report["label_issues"]
    assert (out / DATA_SUSPECTS_PNG).stat().st_size > 10_000
    card = (out / "README.md").read_text()
    assert "## Data quality" in card and f"Excluded before training (`exclude_flagged: both`): {len(flagged['train'])} from train." in card


def test_data_doctor_false_leaves_no_report_and_nothing_excluded(planted, tmp_path):
    results = _cached_run(planted, tmp_path / "off", data_doctor=False)
    assert "data_doctor" not in results and results["split_sizes"]["train"] == len(planted.train) + 3
    assert not (tmp_path / "off" / DATA_REPORT).exists() and "## Data quality" not in (tmp_path / "off" / "README.md").read_text()
