"""`hf-transfer export` and `hf-transfer predict` on a tiny random-init timm network (seconds): the graphs and their check,
what predict writes for each input kind and backend against `pipeline("image-classification")`, resuming, and bad input.

The trained models (the int8 refusal, the demo's fast path, a transformers backbone through the loopback Hub) are in
tests/test_deploy.py, which is slow.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, SAMPLE, sample_rows, save_timm_model, side_by_side
from PIL import Image
from transformers import AutoImageProcessor, TimmWrapperConfig, TimmWrapperImageProcessor, pipeline

from hf_transfer import predict as predict_module
from hf_transfer.cli import main
from hf_transfer.deploy_options import ExportArguments, PredictArguments
from hf_transfer.export import decide
from hf_transfer.precision import prepare_for_inference

CAT = Path(__file__).parent / "fixtures" / "cat.jpg"


def cli(*argv: str, capsys=None) -> tuple[int, str]:
    """`hf-transfer ...` in this process: (exit code, stdout + stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as stopped:
        code = stopped.code
    captured = capsys.readouterr() if capsys else None
    return code, (captured.out + captured.err) if captured else ""


def error_line(capsys, *argv: str) -> str:
    """Run `hf-transfer ...` here; assert exit code 2, one `error: ` line, no traceback; return the line."""
    code, output = cli(*argv, capsys=capsys)
    assert code == 2, output[-3000:]
    assert "Traceback" not in output
    (line,) = [line[line.index("error: "):] for line in output.splitlines() if "error: " in line]
    return line


def tiny_model(folder: Path) -> Path:
    """test_efficientnet at 32 px, random init (BatchNorm set from real photos), with the image processor it was made for."""
    save_timm_model(folder, "test_efficientnet")
    config = TimmWrapperConfig.from_pretrained(folder)
    TimmWrapperImageProcessor(pretrained_cfg=config.pretrained_cfg).to_json_file(folder / "preprocessor_config.json")
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The tiny model exported once with --int8 (its accuracy is chance, so any int8 drop is allowed here)."""
    folder = tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    main(["export", str(folder), "--dataset", str(SAMPLE), "--int8", "--allow_accuracy_drop", "100", "--calibration_images", "8",
          "--check_images", "40"])
    return folder


@pytest.fixture
def model_copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "model"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Twelve held-out photos filed as <class>/<name>.jpg, with a broken JPEG, an empty file and a text file beside them."""
    folder = tmp_path_factory.mktemp("photos")
    for row in sample_rows("test")[:12]:
        (folder / ("cat", "dog")[row["labels"]]).mkdir(exist_ok=True)
        (folder / ("cat", "dog")[row["labels"]] / row["image"]["path"]).write_bytes(row["image"]["bytes"])
    (folder / "broken.jpg").write_bytes(CAT.read_bytes()[:len(CAT.read_bytes()) // 2])
    (folder / "cat" / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return folder


def rows_of(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def good_photos(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*.jpg") if path.parent != folder)


# ---- export ---------------------------------------------------------------------------------------------------------
def test_export_writes_graphs_that_compute_the_pytorch_logits(exported):
    report = json.loads((exported / "onnx" / "export_report.json").read_text())
    fp32, int8 = report["graphs"]["fp32"], report["graphs"]["int8"]
    assert fp32["status"] == "kept" and fp32["agreement"] >= 0.999 and fp32["max_abs_logit_difference"] < 1e-3
    assert fp32["images"] == report["check"]["images"] == 40 and report["check"]["split_images"] == 96  # --check_images
    assert int8["quantization"].startswith("static: QDQ, per-channel") and "from 8 training images" in int8["quantization"]
    assert int8["max_abs_logit_difference"] > fp32["max_abs_logit_difference"]  # really quantized
    assert [row["model"] for row in report["speed"]["rows"]] == ["PyTorch eager fp32", "PyTorch, inference_precision: auto",
                                                                 "ONNX fp32", "ONNX int8"]
    assert all(row["latency_ms_batch_1"] > 0 and row["images_per_second_batch_32"] > 0 for row in report["speed"]["rows"])
    assert str(exported.parent) not in (exported / "onnx" / "export_report.json").read_text()  # no local path published

    # As a user runs it: onnxruntime directly, with the folder's own image processor, on a batch of any size.
    processor = AutoImageProcessor.from_pretrained(exported)
    images = [Image.open(CAT).convert("RGB"), *(Image.open(path).convert("RGB") for path in sorted((REPO / "tests" / "fixtures").glob("*.*.jpg")))]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    model = pipeline("image-classification", model=str(exported)).model
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.numpy()
    for name in ("model.onnx", "model_quantized.onnx"):
        session = ort.InferenceSession(str(exported / "onnx" / name), providers=["CPUExecutionProvider"])
        logits = session.run(["logits"], {"pixel_values": pixels.numpy()})[0]
        assert logits.shape == expected.shape == (3, 2)
        if name == "model.onnx":
            np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_without_int8_only_the_fp32_graph_is_written_and_opset_applies(tmp_path):
    folder = tiny_model(tmp_path / "model")
    main(["export", str(folder), "--dataset", str(SAMPLE), "--opset", "18", "--check_images", "16"])
    assert sorted(path.name for path in (folder / "onnx").iterdir()) == ["export_report.json", "model.onnx"]
    report = json.loads((folder / "onnx" / "export_report.json").read_text())
    assert list(report["graphs"]) == ["fp32"] and report["opset"] == 18
    graph = onnx.load(str(folder / "onnx" / "model.onnx"))
    assert [entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx")] == [18]
    assert not (folder / ".partial").exists() and not (folder / ".hf_transfer.lock").exists()


def test_the_graph_decisions_follow_the_thresholds():
    figures = {"pytorch": {"accuracy": 0.90}, "fp32": {"accuracy": 0.90, "agreement": 0.998, "images": 1000, "max_abs_logit_difference": 0.3},
               "int8": {"accuracy": 0.885, "agreement": 0.97, "images": 1000, "max_abs_logit_difference": 0.9}}
    args = ExportArguments(model="unused")
    assert decide("fp32", figures, args)["status"] == "refused" and "99.80% of 1000" in decide("fp32", figures, args)["reason"]
    figures["fp32"]["agreement"] = 0.999
    assert decide("fp32", figures, args) == {"status": "kept"}
    assert decide("int8", figures, args) == {"status": "refused", "reason": (
        "its test accuracy is 88.50% against PyTorch's 90.00% on 1000 images, 1.50 points lower (allowed: 1); top-1 agreement 97.00%")}
    assert decide("int8", figures, ExportArguments(model="unused", allow_accuracy_drop=1.5)) == {"status": "kept"}


def test_static_quantization_failing_falls_back_to_dynamic(tmp_path, monkeypatch):
    import onnxruntime.quantization

    def refuse(*args, **kwargs):
        raise RuntimeError("operator not supported by the static quantizer")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", refuse)
    folder = tiny_model(tmp_path / "model")
    main(["export", str(folder), "--dataset", str(SAMPLE), "--int8", "--allow_accuracy_drop", "100", "--check_images", "16"])
    int8 = json.loads((folder / "onnx" / "export_report.json").read_text())["graphs"]["int8"]
    assert int8["quantization"].startswith("dynamic: per-channel int8 weights") and "operator not supported" in int8["quantization"]
    assert (folder / "onnx" / "model_quantized.onnx").is_file()


def test_export_refuses_bad_folders_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "is not a model folder: it has no config.json" in error_line(capsys, "export", str(tmp_path / "empty"))
    message = error_line(capsys, "export", "user/model-on-the-hub")
    assert "The model folder 'user/model-on-the-hub' does not exist" in message and "give a local folder" in message
    folder = save_timm_model(tmp_path / "no-processor", "test_efficientnet")
    message = error_line(capsys, "export", str(folder), "--dataset", str(SAMPLE))
    assert "has no image processor (preprocessor_config.json)" in message and "save_pretrained" in message
    folder = tiny_model(tmp_path / "not-a-run")
    message = error_line(capsys, "export", str(folder))
    assert "was not written by `hf-transfer train`" in message and "--dataset" in message
    assert "`--allow_accuracy_drop -1`" in error_line(capsys, "export", str(folder), "--allow_accuracy_drop", "-1")
    assert not (folder / "onnx").exists()


# ---- predict --------------------------------------------------------------------------------------------------------
def test_predict_a_folder_gives_what_the_pipeline_gives_with_each_backend(exported, photos, tmp_path, capsys):
    classifier = pipeline("image-classification", model=str(exported))
    expected = {path.relative_to(photos).as_posix(): classifier(str(path), top_k=2) for path in good_photos(photos)}
    pixels = classifier.image_processor(images=[Image.open(photos / name).convert("RGB") for name in expected],
                                        return_tensors="pt")["pixel_values"].numpy()
    for backend in ("torch", "onnx", "onnx-int8"):
        output = tmp_path / f"{backend}.csv"
        precision = ["--inference_precision", "fp32"] if backend == "torch" else []
        assert cli("predict", str(exported), str(photos), "--output", str(output), "--backend", backend, *precision)[0] == 0
        rows = {row["image"]: row for row in rows_of(output)}
        assert len(rows) == 14 and "notes.txt" not in rows  # 12 photos, a broken and an empty file
        if backend == "onnx-int8":  # the int8 graph's own scores, on the pipeline's preprocessing
            session = ort.InferenceSession(str(exported / "onnx" / "model_quantized.onnx"), providers=["CPUExecutionProvider"])
            logits = session.run(["logits"], {"pixel_values": pixels})[0]
            scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
            for name, row in zip(expected, scores):
                assert rows[name]["label_1"] == ("cat", "dog")[int(row.argmax())]
                assert float(rows[name]["score_1"]) == pytest.approx(float(row.max()), abs=1e-5)
            assert max(abs(float(rows[name]["score_1"]) - expected[name][0]["score"]) for name in expected) > 1e-4  # not PyTorch's
            continue
        for name, predictions in expected.items():
            assert [rows[name]["label_1"], rows[name]["label_2"]] == [p["label"] for p in predictions], (backend, name)
            assert [float(rows[name]["score_1"]), float(rows[name]["score_2"])] == pytest.approx([p["score"] for p in predictions], abs=1e-5)
            assert rows[name]["true_label"] == name.split("/")[0] and not rows[name]["error"]
    assert rows["broken.jpg"]["error"].startswith("truncated JPEG") and rows["broken.jpg"]["label_1"] == ""
    assert rows["broken.jpg"]["true_label"] == ""  # not in a class folder
    assert rows["cat/empty.png"]["error"] == "empty file" and rows["cat/empty.png"]["true_label"] == "cat"
    out = capsys.readouterr().out
    assert "Accuracy" in out and "on 12 images with a true label" in out and "Confusion matrix" in out
    assert "unreadable: 'broken.jpg': truncated JPEG" in out


def test_inference_precision_auto_predicts_what_the_prepared_pipeline_predicts(exported, photos, tmp_path):
    classifier = pipeline("image-classification", model=str(exported))
    prepare_for_inference(classifier.model)  # as the demo and `inference_precision: auto` run it
    expected = {path.relative_to(photos).as_posix(): classifier(str(path), top_k=1)[0] for path in good_photos(photos)}
    assert cli("predict", str(exported), str(photos), "--output", str(tmp_path / "auto.csv"))[0] == 0
    rows = {row["image"]: row for row in rows_of(tmp_path / "auto.csv")}
    for name, prediction in expected.items():
        assert (rows[name]["label_1"], float(rows[name]["score_1"])) == (prediction["label"], pytest.approx(prediction["score"], abs=1e-5))


def test_top_k_output_format_batches_and_decode_pool(exported, photos, tmp_path):
    csv_run = predict_module.predict(PredictArguments(model=str(exported), images=str(photos), output=str(tmp_path / "p.csv"),
                                                      top_k=1, batch_size=5, num_workers=2))
    parquet_run = predict_module.predict(PredictArguments(model=str(exported), images=str(photos), output=str(tmp_path / "p.parquet"),
                                                          top_k=9, num_workers=0))
    as_csv, as_parquet = rows_of(tmp_path / "p.csv"), rows_of(tmp_path / "p.parquet")
    assert list(as_csv[0]) == ["image", "label_1", "score_1", "true_label", "error"]  # --top_k 1
    assert list(as_parquet[0]) == ["image", "label_1", "score_1", "label_2", "score_2", "true_label", "error"]  # 9, of 2 classes
    assert pq.read_schema(tmp_path / "p.parquet").field("score_1").type == "double"
    assert [(row["image"], row["label_1"]) for row in as_csv] == [(row["image"], row["label_1"] or "") for row in as_parquet]
    assert csv_run["batches"] == math.ceil(14 / 5) and parquet_run["batches"] == 1  # --batch_size
    assert csv_run["decode_processes"] == 2 and parquet_run["decode_processes"] == 0  # --num_workers
    assert csv_run["accuracy"] == parquet_run["accuracy"] and csv_run["with_true_label"] == 12


def test_every_kind_of_images_input(exported, photos, tmp_path):
    names = [path.relative_to(photos).as_posix() for path in good_photos(photos)][:3]
    listing = tmp_path / "list" / "images.txt"
    listing.parent.mkdir()
    listing.write_text("# three photos\n" + "".join(f"{photos / name}\n" for name in names[:2]) + f"\n{os.path.relpath(photos / names[2], listing.parent)}\n")
    runs = {
        "list": str(listing),
        "glob": str(photos / "dog" / "*.jpg"),
        "image": str(photos / names[0]),
        "parquet": str(SAMPLE / "data" / "test-00000-of-00001.parquet"),
    }
    found = {}
    for kind, images in runs.items():
        assert cli("predict", str(exported), images, "--output", str(tmp_path / f"{kind}.csv"))[0] == 0
        found[kind] = rows_of(tmp_path / f"{kind}.csv")
    assert [row["image"] for row in found["list"]] == [str(photos / names[0]), str(photos / names[1]), os.path.relpath(photos / names[2], listing.parent)]
    assert [row["true_label"] for row in found["list"]] == [name.split("/")[0] for name in names]
    assert [row["image"] for row in found["glob"]] == sorted(path.name for path in (photos / "dog").glob("*.jpg"))
    assert len(found["image"]) == 1 and found["image"][0]["image"] == Path(names[0]).name
    test = sample_rows("test")
    assert [row["image"] for row in found["parquet"]] == [str(index) for index in range(len(test))]
    assert [row["true_label"] for row in found["parquet"]] == [("cat", "dog")[row["labels"]] for row in test]
    # The same split as a dataset (a local folder with the Hub layout), by --split.
    assert cli("predict", str(exported), str(SAMPLE), "--split", "test", "--output", str(tmp_path / "split.csv"))[0] == 0
    assert rows_of(tmp_path / "split.csv") == found["parquet"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_an_interrupted_run_resumes_after_its_last_chunk(exported, photos, tmp_path, monkeypatch, suffix, capsys):
    output = tmp_path / f"predictions{suffix}"
    images = tmp_path / "photos"
    shutil.copytree(photos, images)
    argv = ["predict", str(exported), str(images), "--output", str(output), "--chunk_size", "4", "--batch_size", "3",
            "--num_workers", "0"]
    decode = predict_module.DecodePool.__getitems__

    def ctrl_c_in_the_second_chunk(pool, indices):
        if indices[0] >= 4:
            raise KeyboardInterrupt
        return decode(pool, indices)

    monkeypatch.setattr(predict_module.DecodePool, "__getitems__", ctrl_c_in_the_second_chunk)
    with pytest.raises(predict_module.PredictInterrupted) as interrupted:  # what the CLI prints, then ends by SIGINT
        predict_module.predict(PredictArguments(model=str(exported), images=str(images), output=str(output), chunk_size=4,
                                                batch_size=3, num_workers=0))
    assert "holds the first 4 of 14 predictions: run the same command with `--resume`" in str(interrupted.value)
    monkeypatch.undo()
    first = rows_of(output) if suffix == ".csv" else None
    if suffix == ".csv":
        assert len(first) == 4  # --chunk_size 4: the first chunk, and nothing of the second
        with open(output, "a") as file:
            file.write("dog/half-written-row.jpg,do")  # as a kill in the middle of writing a chunk leaves it
    assert "Pass `--resume` to continue it" in error_line(capsys, *argv)
    refused = error_line(capsys, *argv[:-4], "--top_k", "1", "--resume")
    assert "was started with another model, backend, --top_k or other images" in refused

    # The first chunk's first image is emptied: a resumed run does not predict it again.
    order = sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file() and p.name != "notes.txt")
    first_name = next(name for name in order[:4] if name.endswith(".jpg") and "/" in name)  # a photo of the first chunk
    (images / first_name).write_bytes(b"")  # now an empty file: a fresh run would say so
    assert cli(*argv, "--resume", capsys=capsys)[0] == 0
    rows = rows_of(output)
    assert len(rows) == 14 and len({row["image"] for row in rows}) == 14
    assert next(row for row in rows if row["image"] == first_name)["error"] in ("", None)  # kept from before the interruption
    assert not any(path.name.startswith(f".{output.name}") for path in tmp_path.iterdir())  # progress record and parts gone
    fresh = tmp_path / f"fresh{suffix}"
    shutil.copytree(photos, images, dirs_exist_ok=True)
    assert cli(*argv[:4], str(fresh), *argv[5:])[0] == 0
    assert rows_of(fresh) == rows
    code, out = cli(*argv, "--resume", capsys=capsys)
    assert code == 0 and "is complete: nothing to resume" in out


def test_bad_predict_input_gets_one_line(exported, photos, model_copy, tmp_path, capsys):
    model = str(model_copy)
    (tmp_path / "exists.csv").write_text("image\n")
    assert "already exists" in error_line(capsys, "predict", model, str(photos), "--output", str(tmp_path / "exists.csv"))
    assert "must end in .csv or .parquet" in error_line(capsys, "predict", model, str(photos), "--output", str(tmp_path / "p.json"))
    assert "is not a folder, file or pattern here" in error_line(capsys, "predict", model, str(tmp_path / "nothing-here"))
    assert "No file matches" in error_line(capsys, "predict", model, str(tmp_path / "*.jpg"))
    assert "`--inference_precision` applies to `--backend torch`" in error_line(
        capsys, "predict", model, str(photos), "--backend", "onnx", "--inference_precision", "fp32")
    message = error_line(capsys, "predict", model, str(SAMPLE), "--output", str(tmp_path / "a.csv"))
    assert "holds no images" in message and "pass `--split`" in message
    # An output under a file: a folder that cannot be made.
    message = error_line(capsys, "predict", model, str(photos), "--output", str(CAT / "predictions.csv"))
    assert message.startswith(f"error: Cannot write the predictions to {str(CAT / 'predictions.csv')!r}") and "writable `--output`" in message

    graph = model_copy / "onnx" / "model.onnx"
    graph.write_bytes(b"\x08\x07 not a protobuf graph")
    message = error_line(capsys, "predict", model, str(photos), "--backend", "onnx", "--output", str(tmp_path / "b.csv"))
    assert "'onnx/model.onnx' is not a graph onnxruntime can load" in message and "hf-transfer export" in message
    graph.unlink()
    graph.symlink_to(exported / "onnx" / "model.onnx")
    message = error_line(capsys, "predict", model, str(photos), "--backend", "onnx", "--output", str(tmp_path / "c.csv"))
    assert "'onnx/model.onnx' is a symbolic link" in message
    assert cli("predict", model, str(photos), "--backend", "onnx-int8", "--output", str(tmp_path / "d.csv"))[0] == 0  # the other graph
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # other weights than the graphs were made from
    message = error_line(capsys, "predict", model, str(photos), "--backend", "onnx-int8", "--output", str(tmp_path / "e.csv"))
    assert "exported from other weights than the folder's model.safetensors" in message
    shutil.rmtree(model_copy / "onnx")
    message = error_line(capsys, "predict", model, str(photos), "--backend", "onnx-int8", "--output", str(tmp_path / "f.csv"))
    assert "has no exported graphs" in message and "hf-transfer export <model folder> --int8" in message
    assert not any((tmp_path / name).exists() for name in ("b.csv", "c.csv", "e.csv", "f.csv"))


@pytest.fixture(scope="module")
def hard_places(exported, photos, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """`hf-transfer predict` over images with a fifo among them, and onto a read-only disk: each in a process of its own (a
    fifo that hangs must not hang the tests; a mount namespace holds the read-only disk), side by side."""
    root = tmp_path_factory.mktemp("hard_places")
    images = Path(shutil.copytree(photos, root / "photos"))
    os.mkfifo(images / "cat" / "fifo.jpg")
    read_only = root / "read_only"
    read_only.mkdir()
    predict = [sys.executable, "-m", "hf_transfer.cli", "predict", str(exported)]
    mounted = " ".join([*predict, str(photos), "--output", str(read_only / "p.csv")])
    fifo, on_read_only = side_by_side(
        [*predict, str(images), "--output", str(root / "p.csv")],
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         f"set -e; mount --bind {read_only} {read_only}; mount -o remount,bind,ro {read_only}; exec {mounted}"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return {"fifo": (fifo, root / "p.csv"), "read_only": (on_read_only, read_only)}


def test_a_fifo_among_the_images_is_a_row_not_a_hang(hard_places):
    result, predictions = hard_places["fifo"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert next(row for row in rows_of(predictions) if row["image"] == "cat/fifo.jpg")["error"] == "not a regular file"


def test_an_output_on_a_read_only_disk_is_one_line(hard_places):
    result, folder = hard_places["read_only"]
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert line == (f"error: Cannot write the predictions to {str(folder / 'p.csv')!r}: Read-only file system. "
                    "Choose a writable `--output`.")
    assert "Traceback" not in result.stderr and not list(folder.iterdir())


def test_export_and_predict_help_load_no_training_stack():
    for command in ("export", "predict"):
        code = ("import sys\nfrom hf_transfer.cli import main\ntry:\n    main([" + repr(command) + ", '--help'])\n"
                "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers', 'datasets', 'onnx') if m in sys.modules))")
        shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        assert shown.returncode == 0 and "--" in shown.stdout, shown.stderr
        assert shown.stdout.strip().splitlines()[-1] == "[]", f"`{command} --help` imported {shown.stdout.strip().splitlines()[-1]}"


def test_the_space_ships_the_graph_runner_and_onnxruntime(tmp_path):
    from hf_transfer.demo import SHIPPED_MODULES, stage_space

    space = stage_space(tmp_path / "space", "user/cats-model")
    assert (space / SHIPPED_MODULES["onnx_runtime.py"]).read_bytes() == (REPO / "hf_transfer" / "onnx_runtime.py").read_bytes()
    assert (space / SHIPPED_MODULES["repo_files.py"]).is_file()  # what the shipped module imports on a Space
    assert any(line.startswith("onnxruntime") for line in (space / "requirements.txt").read_text().splitlines())
    # Importable there on its own, with hf_transfer absent.
    code = ("import sys; sys.modules['hf_transfer'] = None; import hf_transfer_onnx_runtime as runner; "
            "print(runner.GRAPHS['int8'], issubclass(runner.OnnxModelError, Exception))")
    shown = subprocess.run([sys.executable, "-c", code], cwd=space, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert shown.returncode == 0 and shown.stdout.split() == ["onnx/model_quantized.onnx", "True"], shown.stderr[-2000:]
