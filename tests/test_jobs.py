"""Jobs of many photos: folders, output names, batches, progress, the index, resume and shards."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import invert
from bad_inputs import photo
from conftest import FAST, INVERT

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
    with open(folder / "index.csv", newline="") as file:
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


def test_a_damaged_photo_among_many_is_named_before_any_work(photos, tmp_path, cli):
    (photos / "e.png").write_bytes((photos / "a.jpg").read_bytes()[:100])  # a truncated file
    code, _, err = cli("--image_path", photos, *FAST, "--epochs", "1000", "--output_dir", tmp_path / "out")
    assert code == 2 and f"{photos / 'e.png'} is not a readable image" in err
    assert not (tmp_path / "out").exists()


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
    assert invert.photo_names(["x/cats/001.png", "x/dogs/001.png", "y/001.png", "001.webp"]) == {
        "x/cats/001.png": "cats_001", "x/dogs/001.png": "dogs_001", "y/001.png": "y_001",
        "001.webp": f"{Path.cwd().name}_001"}


def test_any_batch_size_gives_the_same_pictures(photos, tmp_path, cli):
    pictures = {}
    for size in ("1", "5", "auto"):
        code, _, err = cli("--image_path", photos, *FAST, *LAYERS, "--epochs", "10", "--batch_size", size,
                           "--output_dir", tmp_path / size)
        assert code == 0, err
        pictures[size] = {name: value for name, value in outputs(tmp_path / size).items() if name.endswith(".png")}
        batches = {json.loads(path.read_text())["batch"] for path in (tmp_path / size).glob("*.json")}
        most = {"1": 1, "5": 5, "auto": invert.BATCH_CAP[0]}[size]
        assert batches == {min(most, 8), 8 % most or min(most, 8)}  # 8 rows, in batches of at most `most`
    assert pictures["1"].keys() == pictures["5"].keys() == pictures["auto"].keys() and len(pictures["1"]) == 12
    for name, picture in pictures["1"].items():
        for size in ("5", "auto"):
            # oneDNN picks this SqueezeNet's kernels by batch size, and Adam grows their rounding at a
            # few pixels; invert's own arithmetic is the same in any batch (tests/README.md)
            assert np.abs(picture.astype(int) - pictures[size][name]).mean() < 1, (name, size)


def test_rows_that_do_not_fit_together_run_in_smaller_batches(photos, tmp_path, cli, monkeypatch):
    model = invert.load_model("squeezenet1_1", "none", progress=False)
    settings = invert.resolve(invert.Settings(), invert.torch.device("cpu"))
    one = sum(invert.row_bytes(model, model.features[7], 64, settings, 0, invert.torch.device("cpu")).values())
    # a safe share (half) of this is two rows' estimate, and a little more
    monkeypatch.setattr(invert, "available_memory", lambda device: 4.5 * one)
    code, _, err = cli("--image_path", photos, *FAST, "--layer_name", "features_7", "--epochs", "2",
                       "--output_dir", tmp_path / "out")
    assert code == 0, err  # never refused for the number of photos
    assert [json.loads(path.read_text())["batch"] for path in (tmp_path / "out").glob("*.json")] == [2] * 4
    monkeypatch.setattr(invert, "available_memory", lambda device: 0.5 * one)  # not even one row
    code, _, err = cli("--image_path", photos, *FAST, "--layer_name", "features_7", "--output_dir", tmp_path / "refused")
    assert code == 2 and "more than the" in err and "use a smaller --input_size" in err
    assert not (tmp_path / "refused").exists()


def test_progress_counts_images_over_the_whole_job(photos, tmp_path, cli):
    loud = [flag for flag in FAST if flag != "--quiet"]
    code, out, err = cli("--image_path", photos, *loud, "--epochs", "2", "--batch_size", "3",
                         "--output_dir", tmp_path / "out")
    assert code == 0
    assert "4/4" in err and "image" in err  # the job's bar: done, total, and time left
    assert out.count("saved ") == 4 and "4 inversion(s)" in out


def test_the_index_has_a_line_per_row_with_what_its_record_says(photos, tmp_path, cli):
    code, _, err = cli("--image_path", photos, *FAST, *LAYERS, "--epochs", "3", "--output_dir", tmp_path / "out")
    assert code == 0, err
    lines = index_of(tmp_path / "out")
    assert len(lines) == 8 and list(lines[0]) == list(invert.INDEX_COLUMNS)
    for line in lines:
        record = json.loads(Path(line["png"]).with_suffix(".json").read_text())
        assert line["image_path"] == record["image_path"] and line["layer_name"] == record["layer_name"]
        assert float(line["feature_error"]) == record["feature_error"] and int(line["iterations"]) == 3
        assert (line["stopped"], line["precision"], line["device"]) == ("epochs", "fp32", "cpu")
        assert float(line["seconds"]) == record["seconds"] > 0
    assert [line["layer_name"] for line in lines[:3]] == ["features_3", "features_7", "features_3"]


def test_resume_skips_finished_rows_and_reruns_the_others(photos, tmp_path, cli):
    args = ["--image_path", photos, *FAST, *LAYERS, "--epochs", "3", "--output_dir", tmp_path / "out"]
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


def compare_jobs(whole: Path, sharded: Path) -> None:
    """The same files; the same pictures; the same records but for timings and the shard."""
    one, many = outputs(whole), outputs(sharded)
    assert one.keys() == many.keys()
    for name in one:
        if name.endswith(".png"):
            assert np.array_equal(one[name], many[name]), name
        elif name.endswith(".json"):
            timing = ("seconds", "ms_per_iteration", "args", "batch")
            assert {key: value for key, value in json.loads(one[name]).items() if key not in timing} == \
                   {key: value for key, value in json.loads(many[name]).items() if key not in timing}
    lines = [[{**line, "png": Path(line["png"]).name, "seconds": None} for line in index_of(folder)]
             for folder in (whole, sharded)]
    assert lines[0] == lines[1] and len(lines[0]) == len([name for name in one if name.endswith(".json")])


@pytest.mark.slow
def test_torchrun_with_two_processes_shares_the_photos(photos, tmp_path, cli):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    args = [*FAST, *LAYERS, "--epochs", "3", "--batch_size", "1", "--image_path", str(photos)]
    assert cli(*args, "--output_dir", tmp_path / "whole")[0] == 0
    environment = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--standalone", INVERT, *args, "--device", "cpu",
                             "--output_dir", str(tmp_path / "sharded")], capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    compare_jobs(tmp_path / "whole", tmp_path / "sharded")


@pytest.mark.slow
def test_resume_after_kill_9_ends_as_one_uninterrupted_run(photos, tmp_path, cli):
    args = [*FAST, *LAYERS, "--epochs", "60", "--batch_size", "1", "--image_path", str(photos)]
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
    line = next(line for line in index_of(tmp_path / "three") if line["png"] == f"{stem}.png")
    assert (line["mean_png"], line["spread_png"], float(line["spread"])) == \
           (f"{stem}_mean.png", f"{stem}_spread.png", record["spread"])
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
