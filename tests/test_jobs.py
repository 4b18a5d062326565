"""Jobs of many photos: folders, output names, batches, progress, the index, resume and shards."""
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import invert
import torchvision
from bad_inputs import photo
from conftest import FAST, INVERT

# what --precision auto asks, before conftest makes it answer as INVERT_AUTO_PRECISION says
NATIVE_BF16 = invert.native_bf16
# two layers of the random SqueezeNet: each photo gives two rows
LAYERS = ["--layer_name", "features_3", "features_7"]


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder of four small photos, plus what a folder of photos also holds: a note, a hidden
    file and a subfolder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, name in enumerate(["d.png", "a.jpg", "c.webp", "b.png"]):
        photo((40 + 8 * index, 48)).rotate(90 * index).save(folder / name)
    (folder / "notes.txt").write_text("not a photo\n")
    (folder / ".hidden.png").write_bytes(b"not even a png")
    (folder / "more").mkdir()
    photo().save(folder / "more" / "deeper.png")
    return folder


def outputs(folder: Path) -> dict:
    """Every file under `folder` by relative path, PNGs as pixel arrays and the rest as text."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            name = str(path.relative_to(folder))
            found[name] = np.asarray(Image.open(path)) if path.suffix == ".png" else path.read_text()
    return found


def index_of(folder: Path) -> list:
    """The rows of a job's index.csv."""
    with open(folder / "index.csv", newline="", encoding="utf-8", errors="surrogateescape") as file:
        return list(csv.DictReader(file))


def test_a_folder_means_the_images_directly_inside_it_by_name(photos, tmp_path, cli):
    code, _, err = cli("--image_path", photos, *FAST, "--epochs", "1", "--output_dir", tmp_path / "out")
    assert code == 0, err
    assert [row["image_path"] for row in index_of(tmp_path / "out")] == \
           [str(photos / name) for name in ("a.jpg", "b.png", "c.webp", "d.png")]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing to see\n")
    code, _, err = cli("--image_path", photos, empty, *FAST, "--output_dir", tmp_path / "refused")
    assert code == 2 and f"--image_path {empty} is a folder with no images" in err
    assert not (tmp_path / "refused").exists()


def test_photos_that_share_a_stem_are_told_apart_by_folder_then_extension(tmp_path, cli):
    for name in ("cats/001.png", "dogs/001.png", "dogs/001.jpg", "dogs/002.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        photo().save(tmp_path / name)
    code, _, err = cli("--image_path", tmp_path / "cats", tmp_path / "dogs", *FAST, "--epochs", "1",
                       "--output_dir", tmp_path / "out")
    assert code == 0, err
    pngs = sorted(path.name for path in (tmp_path / "out").glob("*features_3.png"))
    assert pngs == ["002_squeezenet1_1_features_3.png", "cats_001_png_squeezenet1_1_features_3.png",
                    "dogs_001_jpg_squeezenet1_1_features_3.png", "dogs_001_png_squeezenet1_1_features_3.png"]
    # folders of different depths: as many parent folders as tell the photos apart, from the file up
    assert invert.photo_names(["/x/cats/001.png", "/x/dogs/001.png", "/y/001.png", "/a/b/002.png",
                               "/x/a/b/002.png"]) == {
        "/x/cats/001.png": "cats_001", "/x/dogs/001.png": "dogs_001", "/y/001.png": "y_001",
        "/a/b/002.png": "a_b_002", "/x/a/b/002.png": "x_a_b_002"}


def test_any_batch_size_gives_the_same_pictures(photos, tmp_path, cli):
    pictures = {}
    for size in ("1", "5", "auto"):
        code, _, err = cli("--image_path", photos, *FAST, *LAYERS, "--epochs", "4", "--batch_size", size,
                           "--output_dir", tmp_path / size)
        assert code == 0, err
        pictures[size] = {name: value for name, value in outputs(tmp_path / size).items() if name.endswith(".png")}
        batches = {json.loads(path.read_text())["batch"] for path in (tmp_path / size).glob("*.json")}
        most = {"1": 1, "5": 5, "auto": invert.BATCH_CAP[0]}[size]
        assert batches == {min(most, 4), 4 % most or min(most, 4)}  # each layer's 4 rows, `most` at a time
    assert pictures["1"].keys() == pictures["5"].keys() == pictures["auto"].keys() and len(pictures["1"]) == 12
    for name, picture in pictures["1"].items():
        for size in ("5", "auto"):
            # oneDNN picks this SqueezeNet's kernels by batch size, and Adam grows their rounding at a
            # few pixels; invert's own arithmetic is the same in any batch (tests/README.md)
            assert np.abs(picture.astype(int) - pictures[size][name]).mean() < 1, (name, size)


def estimate(cli, args: list, folder: Path) -> float:
    """The GiB a row needs by the memory estimate, read from the refusal of a run with 1 MiB free."""
    code, _, err = cli(*args, "--output_dir", folder)
    assert code == 2 and "more than the" in err, err
    return float(err.split("needs about ")[1].split(" GiB")[0])


def test_rows_that_do_not_fit_together_run_in_smaller_batches(photos, tmp_path, cli, monkeypatch):
    args = ["--image_path", photos, *FAST, "--layer_name", "features_7", "--epochs", "2"]
    monkeypatch.setattr(invert, "available_memory", lambda device: 2 ** 20)
    one = estimate(cli, args, tmp_path / "refused") * 2 ** 30
    assert not (tmp_path / "refused").exists()
    # a safe share (half) of this is two rows' estimate, and a little more
    monkeypatch.setattr(invert, "available_memory", lambda device: 4.5 * one)
    code, _, err = cli(*args, "--output_dir", tmp_path / "out")
    assert code == 0, err  # never refused for the number of photos
    assert [json.loads(path.read_text())["batch"] for path in (tmp_path / "out").glob("*.json")] == [2] * 4


def test_the_memory_estimate_uses_the_jitter_the_run_uses(photos, tmp_path, cli, monkeypatch):
    # auto jitter at a layer of stride 8 is a pixel: it barely changes what a row needs
    monkeypatch.setattr(invert, "available_memory", lambda device: 2 ** 20)
    args = ["--image_path", photos / "a.jpg", *FAST, "--layer_name", "features_7", "--input_size", "256"]
    needs = {jitter: estimate(cli, [*args, "--jitter", jitter], tmp_path / jitter) for jitter in ("0", "auto", "64")}
    assert needs["auto"] == pytest.approx(needs["0"], rel=0.01) and needs["64"] > 1.05 * needs["0"]


def test_progress_counts_images_over_the_whole_job(photos, tmp_path, cli):
    loud = [flag for flag in FAST if flag != "--quiet"]
    code, out, err = cli("--image_path", photos, *loud, "--epochs", "2", "--batch_size", "3",
                         "--output_dir", tmp_path / "out")
    assert code == 0
    assert "4/4" in err and "image" in err  # the job's bar: done, total, and time left
    assert out.count("saved ") == 4 and "4 inversion(s)" in out


def test_the_index_has_a_line_per_row_with_what_its_record_says(photos, tmp_path, cli):
    code, _, err = cli("--image_path", photos, *FAST, *LAYERS, "--epochs", "3", "--precision", "fp32",
                       "--output_dir", tmp_path / "out")
    assert code == 0, err
    lines = index_of(tmp_path / "out")
    assert len(lines) == 8 and {"image_path", "layer_name", "kind", "unit", "png", "feature_error", "status",
                                "error"} - set(lines[0]) == {"error"}  # no row failed
    for line in lines:
        record = json.loads((tmp_path / "out" / line["png"]).with_suffix(".json").read_text())
        assert line["image_path"] == record["image_path"] and line["layer_name"] == record["layer_name"]
        assert float(line["feature_error"]) == record["feature_error"] and int(line["iterations"]) == 3
        assert (line["status"], line["stopped"], line["precision"], line["device"]) == ("done", "epochs", "fp32", "cpu")
        assert float(line["seconds"]) == record["seconds"] > 0
    assert [line["layer_name"] for line in lines[:3]] == ["features_3", "features_7", "features_3"]


def test_the_index_covers_every_record_in_its_folder_whichever_call_wrote_it(photos, tmp_path, cli):
    # the README's shell loop: one call per layer, into one folder
    for layer in ("features_3", "features_7", "features_12"):
        assert cli("--image_path", photos / "a.jpg", *FAST, "--layer_name", layer, "--epochs", "1",
                   "--output_dir", tmp_path / "out")[0] == 0
    assert [line["layer_name"] for line in index_of(tmp_path / "out")] == ["features_3", "features_7", "features_12"]
    # another model, and a shard of other photos, into the same folder
    assert cli("--image_path", photos, *FAST, "--model", "alexnet", "--layer_name", "features_1", "--input_size",
               "64", "--epochs", "1", "--shard", "1/2", "--output_dir", tmp_path / "out")[0] == 0
    assert [(line["model"], Path(line["image_path"]).name) for line in index_of(tmp_path / "out")] == [
        ("squeezenet1_1", "a.jpg")] * 3 + [("alexnet", "b.png"), ("alexnet", "d.png")]


def test_resume_skips_finished_rows_and_reruns_the_others(photos, tmp_path, cli):
    # batches of one, so that a redone row gives the same picture bit for bit (see the batch-size test)
    args = ["--image_path", photos, *FAST, *LAYERS, "--epochs", "3", "--batch_size", "1",
            "--output_dir", tmp_path / "out"]
    assert cli(*args)[0] == 0
    first = outputs(tmp_path / "out")
    done = sorted((tmp_path / "out").glob("*.json"))
    done[0].unlink()  # as if killed before this row's record
    done[1].write_text(done[1].read_text().replace('"stopped": "epochs"', '"stopped": "interrupted"'))
    times = {path: path.stat().st_mtime_ns for path in done[2:]}
    code, out, err = cli(*args[:-2], "--resume", "--output_dir", tmp_path / "out")
    assert code == 0, err
    assert {path: path.stat().st_mtime_ns for path in done[2:]} == times  # not redone
    after = outputs(tmp_path / "out")
    assert after.keys() == first.keys()
    for name in after:
        if name.endswith(".png"):
            assert np.array_equal(after[name], first[name]), name
    code, _, err = cli(*args[:-2], "--resume", "--lr", "0.02", "--output_dir", tmp_path / "out")
    assert all(json.loads(path.read_text())["settings"]["lr"] == 0.02 for path in done)  # other settings: redone


def test_shards_together_write_what_one_run_writes(photos, tmp_path, cli, monkeypatch):
    # batches of one, so that the pictures are bit for bit the same (see the batch-size test)
    args = [*FAST, *LAYERS, "--epochs", "3", "--batch_size", "1", "--image_path", photos]
    assert cli(*args, "--output_dir", tmp_path / "whole")[0] == 0
    assert cli(*args, "--shard", "1/3", "--output_dir", tmp_path / "sharded")[0] == 0
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")  # an array --array=5-7: tasks 0, 1 and 2 of 3
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert cli(*args, "--output_dir", tmp_path / "sharded")[0] == 0
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    assert cli(*args, "--output_dir", tmp_path / "sharded")[0] == 0
    compare_jobs(tmp_path / "whole", tmp_path / "sharded")
    code, _, err = cli(*args, "--shard", "3/3", "--output_dir", tmp_path / "bad")
    assert code == 2 and "--shard" in err and "K from 0 to N-1" in err


def compare_jobs(whole: Path, sharded: Path, rel: float = 0.0) -> None:
    """The same files; the same pictures; the same records but for timings, their losses within `rel`."""
    one, many = outputs(whole), outputs(sharded)
    assert one.keys() == many.keys()
    timing = ("seconds", "ms_per_iteration", "batch")
    for name in one:
        if name.endswith(".png"):
            assert np.array_equal(one[name], many[name]), name
        elif name.endswith(".json"):
            records = [{key: value for key, value in json.loads(text).items() if key not in timing}
                       for text in (one[name], many[name])]
            losses = ("feature_error", "rec_loss", "alpha_loss", "tv_loss")
            for key in losses:  # a task without a feature error has none in either
                values = records[0].pop(key, None), records[1].pop(key, None)
                assert values[0] == values[1] if None in values else \
                    values[0] == pytest.approx(values[1], rel=rel), (name, key)
            assert records[0] == records[1], name
    lines = [[{key: value for key, value in line.items() if key not in timing + ("feature_error", "rec_loss",
                                                                              "alpha_loss", "tv_loss")}
              for line in index_of(folder)] for folder in (whole, sharded)]
    assert lines[0] == lines[1] and len(lines[0]) == len([name for name in one if name.endswith(".json")])


@pytest.mark.slow
def test_torchrun_with_two_processes_shares_the_photos(photos, tmp_path, cli):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    # exact values, and child processes: fp32 on every CPU
    args = [*FAST, *LAYERS, "--epochs", "3", "--batch_size", "1", "--precision", "fp32", "--image_path", str(photos)]
    assert cli(*args, "--output_dir", tmp_path / "whole")[0] == 0
    environment = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--standalone", INVERT, *args, "--device", "cpu",
                             "--output_dir", str(tmp_path / "sharded")], capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    # torchrun gives each process one thread (OMP_NUM_THREADS=1), which adds some sums in another order
    compare_jobs(tmp_path / "whole", tmp_path / "sharded", rel=1e-5)


@pytest.mark.slow
def test_resume_after_kill_9_ends_as_one_uninterrupted_run(photos, tmp_path, cli):
    args = [*FAST, *LAYERS, "--epochs", "60", "--batch_size", "1", "--precision", "fp32",
            "--image_path", str(photos)]  # exact values, and a child process: fp32 on every CPU
    assert cli(*args, "--output_dir", tmp_path / "whole")[0] == 0
    out = tmp_path / "killed"
    for wait in (0, 1, 3):  # records written: none, one, several
        process = subprocess.Popen([sys.executable, INVERT, *args, "--output_dir", str(out), "--resume"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.json"))) < wait and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = {path: path.stat().st_mtime_ns for path in out.glob("*.json")}
    assert 3 <= len(finished) < 8, len(finished)
    code, _, err = cli(*args, "--output_dir", out, "--resume")
    assert code == 0, err
    assert all(path.stat().st_mtime_ns == time for path, time in finished.items())  # not redone
    compare_jobs(tmp_path / "whole", out)


# ---------------------------------------------------------------- several pre-images per row


def test_samples_are_rows_of_the_result_and_the_first_is_the_single_call(tiny):
    model = invert.torch.nn.Sequential(invert.torch.nn.Identity()).eval()  # no batch-dependent kernel
    references = invert.torch.randn(2, 3, 24, 24)
    single = invert.invert(model, model[0], references, epochs=15)
    several = invert.invert(model, model[0], references, epochs=15, samples=3)
    assert several.images.shape == (6, 3, 24, 24) and len(several.losses) == len(several.stopped) == 6
    for row in range(2):
        assert invert.torch.equal(several.images[3 * row], single.images[row])  # bit for bit
        others = several.images[3 * row + 1:3 * row + 3]
        assert not invert.torch.equal(others[0], single.images[row]) and not invert.torch.equal(*others)
    again = invert.invert(model, model[0], references[1:], epochs=15, samples=3)  # another batch
    assert invert.torch.equal(again.images, several.images[3:])


def test_samples_write_each_picture_their_mean_and_their_spread(photos, tmp_path, cli):
    args = ["--image_path", photos / "a.jpg", *FAST, "--layer_name", "features_3", "features_6",
            "--epochs", "8", "--batch_size", "1"]
    assert cli(*args, "--output_dir", tmp_path / "one")[0] == 0
    code, _, err = cli(*args, "--samples", "3", "--output_dir", tmp_path / "three")
    assert code == 0, err
    stem = tmp_path / "three" / "a_squeezenet1_1_features_6"
    names = {path.name for path in (tmp_path / "three").iterdir()}
    assert {f"{stem.name}{end}" for end in (".png", "_sample2.png", "_sample3.png", "_mean.png", "_spread.png",
                                            ".json")} <= names
    # the first sample is the picture a call without --samples gives, to float rounding: a row's
    # samples run in one batch, whose kernels this SqueezeNet picks by its size
    single = np.asarray(Image.open(tmp_path / "one" / f"{stem.name}.png")).astype(int)
    assert np.abs(single - np.asarray(Image.open(f"{stem}.png"))).mean() < 1
    samples = np.stack([np.asarray(Image.open(f"{stem}{end}.png")).astype(float)
                        for end in ("", "_sample2", "_sample3")])
    record = json.loads(Path(f"{stem}.json").read_text())
    assert len(record["samples"]) == 3 and record["samples"][0]["feature_error"] == record["feature_error"]
    assert record["spread"] == pytest.approx(samples.std(0).mean(), abs=0.5)  # 8-bit pictures: half a level
    assert np.abs(np.asarray(Image.open(f"{stem}_mean.png")) - samples.mean(0)).max() <= 1
    spread = np.asarray(Image.open(f"{stem}_spread.png")).astype(float)
    assert spread.ndim == 2 and np.abs(spread - np.minimum(255, samples.std(0).mean(2) * 255 / 64)).max() <= 2
    line = next(line for line in index_of(tmp_path / "three") if line["png"] == f"{stem.name}.png")
    assert (line["mean_png"], line["spread_png"], float(line["spread"])) == \
           (f"{stem.name}_mean.png", f"{stem.name}_spread.png", record["spread"])
    grid = Image.open(tmp_path / "three" / "a_squeezenet1_1_montage.png")  # the original, each layer's mean and spread
    assert grid.size == (3 * 64, 2 * (64 + 16))
    tiles = [np.asarray(grid.crop((left, top, left + 64, top + 64))) for top in (0, 80) for left in (0, 64, 128)]
    first_layer = tmp_path / "three" / "a_squeezenet1_1_features_3"
    assert np.array_equal(tiles[1], np.asarray(Image.open(f"{first_layer}_mean.png")))
    assert np.array_equal(tiles[2], np.asarray(Image.open(f"{first_layer}_spread.png").convert("RGB")))
    # a run that asks for more samples than fit is refused before the work, saying so
    code, _, err = cli(*args, "--samples", "1000000", "--output_dir", tmp_path / "refused")
    assert code == 2 and "fewer --samples" in err and not (tmp_path / "refused").exists()


def test_the_spread_picture_is_black_where_samples_agree_and_white_from_64_levels():
    shown = invert.torch.zeros(2, 3, 2, 2)
    shown[1, :, 0, 0] = 1.0  # one pixel differs by 255 levels: a standard deviation of 127.5
    shown[1, :, 0, 1] = 32 / 255  # one by 32: a standard deviation of 16
    mean = invert.torch.tensor(invert.IMAGENET_MEAN).view(3, 1, 1)
    std = invert.torch.tensor(invert.IMAGENET_STD).view(3, 1, 1)
    mean_picture, spread_picture, spread = invert.mean_and_spread((shown - mean) / std)
    assert np.asarray(spread_picture).tolist() == [[255, 64], [0, 0]]  # 16 levels: a quarter of white
    assert np.asarray(mean_picture)[0, 0].tolist() == [127] * 3
    assert spread == pytest.approx((127.5 + 16) / 4, abs=1e-3)


# ---------------------------------------------------------------- jobs that are never silently wrong


def test_resume_keeps_only_a_record_of_the_same_photo_weights_and_settings(photos, tmp_path, cli):
    weights = tmp_path / "weights.pth"
    invert.torch.save(torchvision.models.get_model("squeezenet1_1").state_dict(), weights)
    args = ["--image_path", photos / "a.jpg", *FAST, "--weights", weights, "--epochs", "2", "--resume",
            "--output_dir", tmp_path / "out"]
    record = tmp_path / "out" / "a_squeezenet1_1_features_3.json"

    def redone(*extra) -> bool:
        before = record.stat().st_mtime_ns if record.exists() else None
        code, _, err = cli(*args, *extra)
        assert code == 0, err
        return record.stat().st_mtime_ns != before

    assert redone() and not redone()
    photo().rotate(45).save(photos / "a.jpg", format="JPEG")  # the same path, another photo
    assert redone() and not redone()
    invert.torch.save(torchvision.models.get_model("squeezenet1_1").state_dict(), weights)  # the same name, other weights
    assert redone() and not redone()
    assert redone("--lr", "0.02") and not redone("--lr", "0.02")
    # another photo of the same name, into the same folder: refused, not mistaken for the first
    (tmp_path / "dogs").mkdir()
    photo().save(tmp_path / "dogs" / "a.jpg")
    code, _, err = cli(*args[:-3], "--resume", "--image_path", tmp_path / "dogs", "--output_dir", tmp_path / "out")
    assert code == 2 and "holds the result of another photo" in err and str(photos / "a.jpg") in err


def test_a_damaged_record_of_any_shape_is_redone(photos, tmp_path, cli):
    args = ["--image_path", photos / "a.jpg", *FAST, "--epochs", "1", "--resume", "--output_dir", tmp_path]
    assert cli(*args)[0] == 0
    record = tmp_path / "a_squeezenet1_1_features_3.json"
    for damage in ["", "{", "[]", "null", "7", '"done"', '{"status": "done"}', "[" * 100000, '{"a": ' * 5000,
                   '{"status": "done", "settings": [[[]]], "image_path": 5}', "\udcff garbage"]:
        record.write_bytes(damage.encode(errors="surrogateescape"))
        code, _, err = cli(*args)
        assert code == 0 and "Traceback" not in err, (damage[:20], err)
        assert json.loads(record.read_text())["status"] == "done"


def all_zero_for_black_photos(path: Path) -> Path:
    """SqueezeNet weights whose first layers give a black photo all-zero activations, any other not."""
    model = torchvision.models.get_model("squeezenet1_1")
    model.features[0].weight.data.abs_()
    model.features[0].bias.data.zero_()
    invert.torch.save(model.state_dict(), path)
    return path


def test_a_photo_that_cannot_be_inverted_stops_only_its_own_rows(photos, tmp_path, cli):
    (photos / "e.png").write_bytes((photos / "a.jpg").read_bytes()[:100])  # unreadable
    Image.new("RGB", (48, 48)).save(photos / "black.png")  # nothing to invert at these weights
    args = ["--image_path", photos, *FAST, *LAYERS, "--epochs", "2", "--batch_size", "4",
            "--weights", all_zero_for_black_photos(tmp_path / "w.pth"), "--output_dir", tmp_path / "out"]
    code, _, err = cli(*args)
    assert code == 2 and "4 of 12 image(s) failed" in err.splitlines()[-1]
    assert f"{photos / 'e.png'} at features_3: failed: --image_path {photos / 'e.png'} is not a readable" in err
    assert f"{photos / 'black.png'} at features_7: failed: the layer's activations for this photo are all zero" in err
    status = {(Path(line["image_path"]).name, line["layer_name"]): line["status"] for line in index_of(tmp_path / "out")}
    assert status == {(name, layer): "failed" if name in ("e.png", "black.png") else "done"
                      for name in ("a.jpg", "b.png", "black.png", "c.webp", "d.png", "e.png") for layer in LAYERS[1:]}
    lines = [line for line in index_of(tmp_path / "out") if line["status"] == "failed"]
    assert all(line["error"] and not line["feature_error"] for line in lines)
    assert len(list((tmp_path / "out").glob("*features_*.png"))) == 8  # the four good photos' rows
    code, _, err = cli(*args, "--resume")  # the failed rows are tried again, the others kept
    assert code == 2 and "4 of 4 image(s) failed" in err


@pytest.mark.parametrize("environment, answer", [
    ({"WORLD_SIZE": "2"}, "RANK is not set, but WORLD_SIZE is"),
    ({"RANK": "1"}, "WORLD_SIZE is not set, but RANK is"),
    ({"LOCAL_RANK": "0"}, "WORLD_SIZE is not set, but LOCAL_RANK is"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 is below 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 is below 0"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_MIN is not set, but SLURM_ARRAY_TASK_ID is"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0"}, "SLURM_ARRAY_TASK_COUNT is not set"),
    ({"SLURM_ARRAY_TASK_COUNT": "4"}, "SLURM_ARRAY_TASK_ID is not set, but SLURM_ARRAY_TASK_COUNT is"),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4"},
     "SLURM_ARRAY_TASK_ID=9 is not one of the array's tasks"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_COUNT": "3"}, "make 7 tasks"),  # --array=1,3,7 is not a range
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_STEP": "2"}, "SLURM_ARRAY_TASK_ID=2 is not one of"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_STEP": "0"}, "SLURM_ARRAY_TASK_STEP=0 is below 1"),
    # what splits: a task of --array=1-7:2 (4 tasks, this one the third), and torchrun inside it
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, ["c.webp"]),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1",
      "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["c.webp"]),  # part 1 * 2 + 0 of 4
    ({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"}, ["b.png"]),
])
def test_every_value_the_launchers_set_gets_an_answer(environment, answer, photos, tmp_path, cli, monkeypatch):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    code, _, err = cli("--image_path", photos, *FAST, "--epochs", "1", "--device", "cpu", "--output_dir", tmp_path)
    if isinstance(answer, str):
        assert code == 2 and len(err.splitlines()) == 1 and answer in err, err
        assert not any(tmp_path.glob("*.json"))
    else:
        assert code == 0, err
        assert [Path(line["image_path"]).name for line in index_of(tmp_path)] == answer


def test_outputs_never_overwrite_or_become_inputs(photos, tmp_path, cli):
    code, _, err = cli("--image_path", photos / "b.png", *FAST, "--output", photos / "b.png")
    assert code == 2 and f"would overwrite the input photo {photos / 'b.png'}: use another --output" in err
    code, _, err = cli("--image_path", photos / "b.png", *FAST, "--output", photos / ".." / photos.name / "b.png")
    assert code == 2 and "would overwrite the input photo" in err
    named = photos / "b_squeezenet1_1_features_3.png"  # a photo named as an output of another
    photo().save(named)
    (tmp_path / "link").symlink_to(photos)
    for flags in (["--output_dir", photos], ["--output_dir", tmp_path / "link"],  # by any path
                  ["--output_dir", photos, "--shard", "1/2"]):  # the photo is in the other shard
        code, _, err = cli("--image_path", photos, *FAST, *flags)
        assert code == 2 and f"overwrite the input photo {named}" in err, flags
    named.unlink()
    (photos / "report.pdf").write_bytes(b"%PDF-1.4 Pillow writes PDFs but cannot read them")
    for extra in ([], ["--resume"], []):  # the job's outputs in an input folder are never photos
        code, _, err = cli("--image_path", photos, *FAST, "--epochs", "1", "--output_dir", photos, *extra)
        assert code == 0, err
        assert sorted(Path(line["image_path"]).name for line in index_of(photos)) == \
               ["a.jpg", "b.png", "c.webp", "d.png"]
    code, _, err = cli("--image_path", "", *FAST)
    assert code == 2 and "--image_path: must not be empty" in err


def test_a_photo_is_read_once_so_a_pipe_works(photos, tmp_path, cli):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    data = (photos / "a.jpg").read_bytes()

    def feed():
        with open(fifo, "wb") as pipe:
            pipe.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    code, _, err = cli("--image_path", fifo, *FAST, *LAYERS, "--epochs", "1", "--output_dir", tmp_path / "out")
    writer.join(timeout=10)
    assert code == 0, err
    assert (tmp_path / "out" / "pipe_squeezenet1_1_montage.png").exists()  # it needs the photo once more
    assert json.loads((tmp_path / "out" / "pipe_squeezenet1_1_features_3.json").read_text())["image_sha256"] == \
           hashlib.sha256(data).hexdigest()


def test_files_are_written_through_new_temporary_files_only(photos, tmp_path, cli):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a_squeezenet1_1_features_3.png", "a_squeezenet1_1_features_3.json", "index.csv"):
        (out / f".{name}.{os.getpid()}.tmp").symlink_to(victim)  # the temporary names of before
    assert cli("--image_path", photos / "a.jpg", *FAST, "--epochs", "1", "--output_dir", out)[0] == 0
    assert victim.read_text() == "keep me\n"
    assert not [path for path in out.iterdir() if path.name.startswith(".invert-")]
    assert (out / "a_squeezenet1_1_features_3.png").stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_any_name_the_file_system_holds_works_and_every_error_stays_one_line(tmp_path, cli):
    folder = tmp_path / "photos"
    folder.mkdir()
    long_name = "x" * 240 + ".png"  # legal, but the outputs' names would be longer than 255 bytes
    undecodable = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes in a UTF-8 world
    for name in (long_name, undecodable, "two\nlines.png"):
        photo().save(folder / name)
    code, out, err = cli("--image_path", folder, *FAST, "--epochs", "1", "--output_dir", tmp_path / "out")
    assert code == 0, err
    lines = index_of(tmp_path / "out")
    assert len(lines) == 3 and all((tmp_path / "out" / line["png"]).is_file() for line in lines)
    assert all(len(os.fsencode(path.name)) <= 255 for path in (tmp_path / "out").iterdir())
    assert {Path(line["image_path"]).name for line in lines} == {long_name, undecodable, "two\nlines.png"}
    code, _, err = cli("--image_path", tmp_path / "missing\nfile.png", *FAST, "--output_dir", tmp_path / "x")
    assert code == 2 and len(err.splitlines()) == 1 and "missing\\nfile.png: no such file" in err


def test_a_record_describes_its_own_row_and_not_the_job(photos, tmp_path, cli):
    names = ("a.jpg", "b.png", "c.webp", "d.png")
    assert cli("--image_path", *[photos / name for name in names], *FAST, "--epochs", "1",
               "--output_dir", tmp_path)[0] == 0
    records = {path.name: path.read_text() for path in tmp_path.glob("*.json")}
    assert len(records) == 4
    for name, text in records.items():
        others = [other for other in names if not name.startswith(other[0])]
        assert not any(other in text for other in others), name


def test_invert_says_what_is_wrong_with_its_tensors(tiny):
    for references, message in [(invert.torch.rand(3, 16, 16), "3-D tensor of shape 3x16x16, torch.float32 on cpu; add"),
                                (invert.torch.rand(0, 3, 16, 16), "got a 4-D tensor of shape 0x3x16x16"),
                                (invert.torch.rand(1, 1, 16, 16), "shape 1x1x16x16"),
                                (invert.torch.zeros(1, 3, 16, 16, dtype=invert.torch.uint8), "torch.uint8 on cpu"),
                                (invert.torch.rand(1, 3, 16, 16).double(), "float32 on cpu, normalised as"),
                                ([[0.0]], "got a list")]:
        with pytest.raises(invert.UsageError, match=message.replace(".", r"\.")):
            invert.invert(tiny, tiny[1], references, epochs=1)


def test_free_memory_honours_ulimit(photos, tmp_path, cli, monkeypatch):
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    used = int(status["VmSize"].split()[0]) * 1024
    monkeypatch.setattr(invert.resource, "getrlimit", lambda kind: (used + 2 ** 24, invert.resource.RLIM_INFINITY))
    code, _, err = cli("--image_path", photos / "a.jpg", *FAST, "--input_size", "512", "--output_dir", tmp_path)
    assert code == 2 and "more than the" in err and "GiB free on cpu" in err, err


def test_a_launchers_task_that_names_its_own_photo_runs_it_and_an_empty_part_says_so(photos, tmp_path, cli,
                                                                                    monkeypatch):
    for name, value in {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "3"}.items():
        monkeypatch.setenv(name, value)
    code, _, err = cli("--image_path", photos / "c.webp", *FAST, "--epochs", "1", "--output_dir", tmp_path / "one")
    assert code == 0 and [Path(line["image_path"]).name for line in index_of(tmp_path / "one")] == ["c.webp"]
    code, _, err = cli("--image_path", photos / "a.jpg", photos / "b.png", *FAST, "--epochs", "1",
                       "--output_dir", tmp_path / "two")
    assert code == 0 and "part, 2 of 3" in err and "has no photos" in err
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():  # torchrun's still split
        monkeypatch.setenv(name, value)
    code, _, err = cli("--image_path", photos / "c.webp", *FAST, "--epochs", "1", "--device", "cpu",
                       "--output_dir", tmp_path / "torchrun")
    assert code == 0 and "part, 1 of 2" in err and not (tmp_path / "torchrun").exists()


def test_a_batch_that_runs_out_of_memory_runs_again_row_by_row(photos, tmp_path, cli, monkeypatch):
    convolve = invert.torch.nn.Conv2d._conv_forward

    def small_memory(self, images, weight, bias):  # as a device with room for one image at a time
        if len(images) > 1 and images.requires_grad:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return convolve(self, images, weight, bias)

    monkeypatch.setattr(invert.torch.nn.Conv2d, "_conv_forward", small_memory)
    code, _, err = cli("--image_path", photos, *FAST, "--epochs", "2", "--batch_size", "4", "--output_dir", tmp_path)
    assert code == 0, err
    assert [json.loads(path.read_text())["batch"] for path in sorted(tmp_path.glob("*.json"))] == [1] * 4


def test_the_index_survives_what_else_is_in_its_folder(photos, tmp_path, cli):
    (tmp_path / "other.json").write_text(json.dumps({"image_path": "\ud800x", "layer_name": "features_3",
                                                     "status": "done", "model": "m"}))  # a lone surrogate
    code, _, err = cli("--image_path", photos / "a.jpg", *FAST, "--epochs", "1", "--output_dir", tmp_path)
    assert code == 0, err
    assert [line["image_path"] for line in index_of(tmp_path)] == [str(photos / "a.jpg"), "\\ud800x"]
    (tmp_path / "index.csv.lock").unlink()
    (tmp_path / "index.csv.lock").symlink_to(tmp_path / "loop")
    (tmp_path / "loop").symlink_to(tmp_path / "index.csv.lock")
    code, _, err = cli("--image_path", photos / "a.jpg", *FAST, "--epochs", "1", "--output_dir", tmp_path)
    errors = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert code == 2 and len(errors) == 1 and "could not rebuild" in errors[0]
    assert (tmp_path / "a_squeezenet1_1_features_3.png").exists()  # the work is done, and the index says why not


def test_a_photo_that_cannot_be_read_on_resume_keeps_its_finished_record(photos, tmp_path, cli):
    args = ["--image_path", photos / "a.jpg", photos / "b.png", *FAST, "--epochs", "1", "--resume",
            "--output_dir", tmp_path]
    assert cli(*args)[0] == 0
    (photos / "a.jpg").unlink()  # as a share that is away for a moment
    code, _, err = cli(*args)
    assert code == 2 and "no such file" in err
    assert json.loads((tmp_path / "a_squeezenet1_1_features_3.json").read_text())["status"] == "done"


# ---------------------------------------------------------------- the other pre-images as jobs


@pytest.mark.parametrize("task", ["caricature", "maximize"])
def test_a_task_with_samples_resumes_and_shards_as_inversions_do(task, photos, tmp_path, cli):
    units = ["--units", "0", "5"] if task == "maximize" else []
    args = [*FAST, "--task", task, *units, "--samples", "2", "--epochs", "3", "--batch_size", "1",
            "--image_path", photos]
    assert cli(*args, "--output_dir", tmp_path / "whole")[0] == 0
    assert cli(*args, "--shard", "0/2", "--output_dir", tmp_path / "sharded")[0] == 0
    assert cli(*args, "--shard", "1/2", "--output_dir", tmp_path / "sharded")[0] == 0
    compare_jobs(tmp_path / "whole", tmp_path / "sharded")
    lines = index_of(tmp_path / "whole")
    assert len(lines) == 4 * (2 if units else 1) and {line["task"] for line in lines} == {task}
    measure = "unit_activation" if units else "projection"
    assert all(float(line[measure]) and float(line["spread"]) > 0 and line["mean_png"] for line in lines)
    if units:  # a mosaic of each layer's units, and the unit's activation on the photo beside it
        assert [line["unit"] for line in lines[:2]] == ["0", "5"]
        assert all(float(line["photo_max"]) >= float(line["photo_activation"]) for line in lines)
        assert len(list((tmp_path / "whole").glob("*_units.png"))) == 4
    else:
        assert all(-1 <= float(line["cosine"]) <= 1 for line in lines)
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "whole").glob("*.json")}
    code, _, err = cli(*args, "--resume", "--output_dir", tmp_path / "whole")
    assert code == 0 and {path: path.stat().st_mtime_ns for path in before} == before, err
    if not units:  # another task is another row, with its own files: the caricatures stay
        assert cli(*args, "--resume", "--task", "invert", "--output_dir", tmp_path / "whole")[0] == 0
        assert {path: path.stat().st_mtime_ns for path in before} == before
        assert len(index_of(tmp_path / "whole")) == 8 and all(path.stem.endswith("_caricature") for path in before)


def test_the_units_of_one_photo_spread_over_shards_a_layer_at_a_time(photo, tmp_path, cli):
    args = [*FAST, *LAYERS, "--task", "maximize", "--units", "0", "5", "--epochs", "2", "--image_path", photo]
    assert cli(*args, "--output_dir", tmp_path / "whole")[0] == 0
    assert cli(*args, "--shard", "1/2", "--output_dir", tmp_path / "sharded")[0] == 0
    assert {path.name for path in (tmp_path / "sharded").glob("*.png")} == {
        "photo_squeezenet1_1_features_7_unit0.png", "photo_squeezenet1_1_features_7_unit5.png",
        "photo_squeezenet1_1_features_7_units.png"}  # the second layer, its mosaic whole
    assert cli(*args, "--shard", "0/2", "--output_dir", tmp_path / "sharded")[0] == 0
    compare_jobs(tmp_path / "whole", tmp_path / "sharded")


def test_a_window_records_its_receptive_field_and_draws_it(photo, tmp_path, cli):
    code, _, err = cli("--image_path", photo, *FAST, "--window", "2", "--precision", "fp32",
                       "--output_dir", tmp_path)
    assert code == 0, err
    record = json.loads((tmp_path / "photo_squeezenet1_1_features_3_window2.json").read_text())
    left, top, right, bottom = record["field_box"]
    assert 0 < left < right < 64 and 0 < top < bottom < 64 and record["settings"]["window"] == 2
    drawn = np.asarray(Image.open(tmp_path / "photo_squeezenet1_1_features_3_window2_field.png")).astype(int)
    plain = np.asarray(Image.open(tmp_path / "photo_squeezenet1_1_features_3_window2.png")).astype(int)
    changed = np.argwhere((drawn != plain).any(2))
    assert (changed.min(0).tolist(), changed.max(0).tolist()) == ([top, left], [bottom - 1, right - 1])
    assert 0 < record["photo_probability"] <= 1 and 0 <= record["preimage_top1"] < 1000
    invert.torch.manual_seed(2023)  # the command line's --seed, before it builds the random network
    model = invert.load_model("squeezenet1_1", "none", progress=False)
    assert record["photo_top1"] == model(invert.preprocess(invert.load_image(photo), 64)).argmax().item()


def test_the_receptive_field_of_a_window_is_the_networks_by_construction():
    torch = invert.torch
    torch.manual_seed(0)
    # 20 -> 18 -> 16 -> pooled 8: the central 2x2 (3 and 4) sees pool inputs 6 to 9, conv inputs 6 to 11,
    # and pixels 6 to 13
    model = invert.nn.Sequential(invert.nn.Conv2d(3, 4, 3), invert.nn.ReLU(), invert.nn.Conv2d(4, 4, 3),
                                 invert.nn.MaxPool2d(2)).eval().requires_grad_(False)
    settings = invert.Settings(window=2)
    assert invert.receptive_field(model, model[3], 20, settings, 1, torch.device("cpu")) == [6, 6, 14, 14]
    wide = invert.receptive_field(model, model[3], 20, invert.Settings(window=8), 1, torch.device("cpu"))
    assert wide == [0, 0, 20, 20]


def test_saved_activations_are_inverted_and_a_misfit_is_refused_in_one_line(photo, tmp_path, cli):
    torch = invert.torch
    torch.manual_seed(2023)  # the command line's --seed, before it builds the random network
    model = invert.load_model("squeezenet1_1", "none", progress=False)
    activations = invert.layer_output(model, model.features[3], invert.preprocess(invert.load_image(photo), 64))
    torch.save(activations[0].clone(), tmp_path / "saved.pt")
    torch.save(activations[:, :, :5].clone(), tmp_path / "misfit.pt")
    code, _, err = cli(*FAST, "--features", tmp_path / "saved.pt", "--precision", "fp32", "--output_dir",
                       tmp_path / "out")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "saved_squeezenet1_1_features_3_features.json").read_text())
    assert record["features"] and record["feature_error"] < 0.5 and "photo_top1" not in record
    code, _, err = cli(*FAST, "--features", tmp_path / "misfit.pt", "--output_dir", tmp_path / "bad")
    assert code == 2 and len(err.splitlines()) == 2  # the random-weights warning and the error
    assert "the saved activations are 128x5x15, but the layer gives 128x15x15" in err
    assert not (tmp_path / "bad").exists()
    code, _, err = cli(*FAST, "--features", tmp_path / "saved.pt", "--image_path", photo, "--output_dir",
                       tmp_path / "bad")
    assert code == 2 and "in place of a photo" in err
    code, _, err = cli(*FAST, "--features", tmp_path / "saved.pt", "--task", "caricature", "--output_dir",
                       tmp_path / "bad")
    assert code == 2 and "--features work with --task invert only" in err
    torch.save(torch.tensor(1.0), tmp_path / "scalar.pt")
    code, _, err = cli(*FAST, "--features", tmp_path / "scalar.pt", "--output_dir", tmp_path / "bad")
    assert code == 2 and "the saved activations are one number, but the layer gives 128x15x15" in err


# ---------------------------------------------------------------- every kind of pre-image, kept apart


def test_each_kind_of_pre_image_has_its_own_files_and_index_line_and_resumes_as_itself(photo, tmp_path, cli):
    out = tmp_path / "out"
    common = ["--image_path", photo, *FAST, "--epochs", "1", "--output_dir", out]
    kinds = [[], ["--window", "3"], ["--channels", "0:8"], ["--channels", "00:08"], ["--task", "caricature"],
             ["--task", "caricature", "--window", "3"], ["--task", "maximize", "--units", "3"],
             ["--task", "maximize", "--units", "3", "--unit_scope", "channel"]]
    for flags in kinds:
        code, _, err = cli(*common, *flags)
        assert code == 0, (flags, err)
    saved = sorted(path.name for path in out.glob("*.json"))
    assert saved == sorted(f"photo_squeezenet1_1_features_3{kind}.json" for kind in (
        "", "_window3", "_channels0-8", "_caricature", "_caricature_window3", "_unit3", "_channel_unit3"))
    assert sorted(line["kind"] for line in index_of(out)) == sorted([
        "invert", "invert window3", "invert channels0-8", "caricature", "caricature window3", "maximize",
        "maximize channel"])
    before = {path: path.stat().st_mtime_ns for path in out.glob("*.json")}
    for flags in kinds:  # each is found again as itself, and not redone
        assert cli(*common, *flags, "--resume")[0] == 0
    assert {path: path.stat().st_mtime_ns for path in out.glob("*.json")} == before


def test_units_all_takes_every_unit_of_a_layer_that_has_fewer_and_units_are_digits(photo, tmp_path, cli):
    args = ["--image_path", photo, *FAST, "--task", "maximize", "--epochs", "1", "--output_dir", tmp_path]
    code, _, err = cli(*args, "--layer_name", "features_3_squeeze", "--units", "all")  # 16 channels
    assert code == 0, err
    assert sorted(int(line["unit"]) for line in index_of(tmp_path)) == list(range(16))
    for units in ("²", "1.5", "-1", "9" * 260, "1234567890"):
        code, _, err = cli(*args, "--units", units)
        assert code == 2 and len(err.splitlines()) == 1 and "--units" in err, err
    assert cli(*args, "--units", "0000000003")[0] == 0
    code, _, err = cli(*args, "--layer_name", "features_3_squeeze", "--units", "all", "all", "--resume")
    assert code == 0, err  # all, said twice


def test_ctrl_c_exits_130_whatever_else_happened(photos, tmp_path, cli, monkeypatch):
    (photos / "e.png").write_bytes(b"not a photo")  # a row that fails before the work
    priors, calls = invert.prior_terms, []

    def interrupted(*arguments):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return priors(*arguments)

    monkeypatch.setattr(invert, "prior_terms", interrupted)
    code, _, err = cli("--image_path", photos, *FAST, "--epochs", "20", "--output_dir", tmp_path / "out")
    assert code == 130 and "e.png" in err and "interrupted" in err.splitlines()[-1]
    assert {line["status"] for line in index_of(tmp_path / "out")} == {"failed", "interrupted"}


def test_saved_features_are_refused_in_one_line_naming_the_file_before_any_allocation(tmp_path, cli):
    torch = invert.torch
    torch.manual_seed(2023)  # the command line's --seed, before it builds the random network
    model = invert.load_model("squeezenet1_1", "none", progress=False)
    good = invert.layer_output(model, model.features[3], torch.randn(1, 3, 64, 64))[0].clone()
    cases = {"nan.pt": good.masked_fill(good > good.mean(), float("nan")), "huge.pt": good.double() * 1e20,
             "graph.pt": good.clone().requires_grad_(), "wide.pt": torch.zeros(1).expand(2 ** 20, 2 ** 20)}
    cases["zeros.pt"] = torch.zeros_like(good)
    for name, tensor in cases.items():
        torch.save(tensor, tmp_path / name)
    torch.save(good, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # sizes it need not hold
    damaged = bytearray((tmp_path / "nan.pt").read_bytes())
    damaged[damaged.rfind(b"PK\x01\x02") + 3] ^= 0xFF  # the zip's central directory
    (tmp_path / "damaged.pt").write_bytes(damaged)
    data = bytearray((tmp_path / "graph.pt").read_bytes())
    at = data.find(good.numpy().tobytes()[:64])  # inside the values, where no zip index notices
    data[at:at + 16] = bytes(16)
    (tmp_path / "crc.pt").write_bytes(data)
    with zipfile.ZipFile(tmp_path / "zipped.pt", "w", zipfile.ZIP_DEFLATED) as zipped:
        for entry in zipfile.ZipFile(tmp_path / "nan.pt").infolist():
            zipped.writestr(entry.filename, zipfile.ZipFile(tmp_path / "nan.pt").read(entry.filename))
    for name, message in [("nan.pt", "holds values that are not finite"), ("huge.pt", "their squares overflow"),
                          ("wide.pt", "the saved activations are 1048576x1048576"),
                          ("zipped.pt", "is compressed, and torch.save never compresses"),
                          ("zeros.pt", "holds activations that are all zero"),
                          ("legacy.pt", "is not a tensor that torch.save wrote"),
                          ("damaged.pt", "is not a tensor that torch.save wrote"),
                          ("crc.pt", "its CRC does not match")]:
        code, _, err = cli(*FAST, "--features", tmp_path / name, "--output_dir", tmp_path / "out")
        errors = [line for line in err.splitlines() if not line.startswith("warning:")]
        assert code == 2 and len(errors) == 1 and f"--features {tmp_path / name}" in errors[0], err
        assert message in errors[0] and not (tmp_path / "out").exists()
    code, _, err = cli(*FAST, "--features", tmp_path / "graph.pt", "--output_dir", tmp_path / "out")
    assert code == 0, err
    code, _, err = cli(*FAST, "--features", tmp_path / "graph.pt", "--image_path", invert.DEFAULT_IMAGE)
    assert code == 2 and "in place of a photo" in err  # even the photo that is the default
    code, _, err = cli(*FAST, "--features", tmp_path / "graph.pt", "--layer_name", "features_3", "features.3",
                       "--output_dir", tmp_path / "out")
    assert code == 0, err  # one layer, spelt twice


def test_a_folder_named_as_the_weights_does_not_hide_them(photo, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DEFAULT").mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(invert.torch.hub, "download_url_to_file", lambda url, destination, *args, **kwargs:
                        invert.torch.save(torchvision.models.squeezenet1_1().state_dict(), destination))
    code, _, err = cli("--image_path", photo, *FAST, "--weights", "DEFAULT", "--output_dir", tmp_path / "out")
    assert code == 0, err
    assert json.loads(next((tmp_path / "out").glob("*.json")).read_text())["weights_id"].startswith("https://")


def test_the_memory_estimate_counts_a_model_that_takes_one_input_size(photo, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(invert, "available_memory", lambda device: 2 ** 20)
    args = ["--image_path", photo, *FAST, "--model", "vit_b_32", "--input_size", "224", "--layer_name",
            "encoder_layers_encoder_layer_1"]  # a ViT asserts its input size
    needs = estimate(cli, args, tmp_path / "refused") * 2 ** 30
    canvas = 3 * 224 * 224
    assert needs > 2 * (24 * 224 * 224 + 72 * canvas)  # its activations, beside the images' own share


def test_each_torchrun_process_sets_its_own_cuda_device_and_asks_it(monkeypatch):
    torch, chosen, asked = invert.torch, [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (8, 0))
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    device = invert.pick_device("auto")
    assert device == torch.device("cuda:1") and chosen == [device]
    assert NATIVE_BF16(device) and asked == [device]  # as --precision auto asks it
