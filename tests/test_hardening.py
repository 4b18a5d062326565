"""Hardening: awkward and hostile inputs, interruptions, divergence, concurrent runs and fuzzing."""
import atexit
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import invert
from bad_inputs import PAYLOAD_MARKER, cases, command, photo
from conftest import FAST, INVERT, ROOT

CORPUS = Path(tempfile.mkdtemp(prefix="invert-corpus-"))
atexit.register(shutil.rmtree, CORPUS, ignore_errors=True)
CASES = cases(CORPUS)


def written_pngs(args: list, out_dir: Path) -> list:
    """The PNGs a case wrote: in its output folder, or at its --output path."""
    found = list(out_dir.glob("*.png")) if out_dir.exists() else []
    if "--output" in args:
        output = Path(args[args.index("--output") + 1])
        found += [output] if output.exists() else []
    return found


def check_outcome(name: str, code: int, err: str, out_dir: Path) -> None:
    """A case either works and writes a valid PNG, or exits 2 with one line and writes nothing."""
    args, expected = CASES[name]
    errors = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert "Traceback" not in err and " at 0x" not in err  # nor an address that differs every run
    if expected == "ok":
        assert code == 0, err
        pngs = written_pngs(args, out_dir)
        side = int(args[args.index("--input_size") + 1]) if "--input_size" in args else 64
        assert len(pngs) == 1 and Image.open(pngs[0]).size == (side, side)
    else:
        assert code == 2 and len(errors) == 1 and errors[0].startswith("invert.py: error: "), err
        assert expected in errors[0]
        assert not written_pngs(args, out_dir)
    assert not (CORPUS / PAYLOAD_MARKER).exists()  # the malicious pickle's payload never ran


@pytest.mark.parametrize("name", list(CASES))
def test_each_case_through_main(name, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code = invert.main(command(CASES[name][0], out_dir))
    check_outcome(name, code, capsys.readouterr().err, out_dir)


# one case of each kind in a real process too: a photo that works, one refused, weights that would run code,
# a resize refused for memory (the others run through main() above)
IN_A_PROCESS = ["WebP", "truncated JPEG", "malicious pickle", "--input_size 100000"]


@pytest.mark.slow
@pytest.mark.parametrize("name", IN_A_PROCESS)
def test_each_kind_of_case_in_a_real_process(name, tmp_path):
    out_dir = tmp_path / "out"
    result = subprocess.run([sys.executable, INVERT, *command(CASES[name][0], out_dir)],
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    check_outcome(name, result.returncode, result.stderr, out_dir)


def test_exif_orientation_is_applied():
    args, _ = CASES["EXIF-rotated JPEG"]
    image = invert.load_image(args[1])
    assert image.size == (10, 30)  # stored 30x10, shown upright


def test_a_failed_rewrite_keeps_the_previous_output(tmp_path, capsys, monkeypatch):
    good = CORPUS / "good.png"
    output = tmp_path / "x.png"
    assert invert.main([*FAST, "--image_path", str(good), "--output", str(output)]) == 0
    before = output.read_bytes()
    real_save = Image.Image.save

    def full_disk(self, file, *args, **kwargs):
        real_save(self, file, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    code = invert.main([*FAST, "--image_path", str(good), "--seed", "5", "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and "could not write" in err and "Traceback" not in err
    assert output.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["x.json", "x.png"]


EXTREMES = ["0", "-1", "0.5", "1", "2", "12.5", "1e-300", "1e300", "nan", "-inf", str(2 ** 64), "1" + "0" * 400,
            "auto"]


def numeric_flags() -> list:
    """Every flag that takes a number: the settings' and the command line's own."""
    return sorted(name for name, value in vars(invert.parse_args([])).items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)
                  or name in {field.name for field in dataclasses.fields(invert.Settings)
                              if field.metadata.get("type")})


@pytest.mark.slow
@pytest.mark.parametrize("flag", numeric_flags())
def test_every_numeric_flag_takes_a_value_or_refuses_it_in_one_line(flag, tmp_path, capsys):
    for value in EXTREMES:
        if flag == "epochs" and value in ("1e300", str(2 ** 64)):
            continue  # valid, and they would run for ever
        out_dir = tmp_path / value
        code = invert.main([*FAST, "--image_path", str(CORPUS / "good.png"), "--epochs", "2",
                            f"--{flag}", value, "--output_dir", str(out_dir)])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if not line.startswith("warning:")]
        assert "Traceback" not in err
        assert code == 0 or (code == 2 and len(errors) == 1 and f"--{flag}" in errors[0]), (value, err)


# ---------------------------------------------------------------- interruptions


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_run_saves_the_current_image(signum, tmp_path):
    output = tmp_path / "x.png"
    loud = [flag for flag in FAST if flag != "--quiet"]
    process = subprocess.Popen(
        [sys.executable, INVERT, *loud, "--image_path", str(CORPUS / "good.png"), "--epochs", "100000",
         "--stdout_epochs", "1", "--output", str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # a shell's background job inherits SIGINT ignored; a user's Ctrl-C reaches a foreground one
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:
        if line.startswith("iteration"):  # the optimisation is under way
            break
    process.send_signal(signum)
    process.communicate(timeout=120)
    assert process.returncode == 130
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["stopped"] == "interrupted" and 1 <= record["iterations"] < 100000
    assert Image.open(output).size == (64, 64)


@pytest.mark.slow
def test_kill_9_mid_write_never_leaves_a_truncated_png(tmp_path):
    target = tmp_path / "big.png"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from pathlib import Path\nfrom PIL import Image\nimport invert\n"
              "noise = Image.effect_noise((1200, 1200), 80).convert('RGB')\n"
              f"while True:\n    invert.save_png(Path({str(target)!r}), noise)\n")
    for attempt in range(6):
        process = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.monotonic() + 60
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05 + 0.07 * attempt)  # somewhere in the middle of a later save
        process.kill()
        process.wait()
        with Image.open(target) as picture:
            picture.load()  # complete: a truncated PNG raises here
            assert picture.size == (1200, 1200)
    # a killed writer leaves at most its hidden temporary file, never a partial file at the real name
    assert {path.name for path in tmp_path.iterdir() if not path.name.startswith(".invert-")} == {"big.png"}


# ---------------------------------------------------------------- divergence and concurrency


def test_divergence_stops_at_once_and_writes_only_the_diverged_png(tmp_path, capsys):
    output = tmp_path / "x.png"
    code = invert.main([*FAST, "--image_path", str(CORPUS / "good.png"), "--objective", "seed",
                        "--optimizer", "sgd", "--param", "pixel", "--lr", "1e9", "--epochs", "500",
                        "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and "--lr 1e+09 is too large" in err and "Traceback" not in err
    iteration = int(err.split("after iteration ")[1].split(":")[0])
    assert iteration < 20
    assert sorted(path.name for path in tmp_path.iterdir()) == ["x.diverged.png", "x.json"]
    record = json.loads((tmp_path / "x.json").read_text())
    assert (record["status"], record["iterations"]) == ("diverged", iteration)  # --resume redoes it
    assert Image.open(tmp_path / "x.diverged.png").size == (64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("same_names", [True, False])
def test_two_runs_at_once_leave_only_complete_files(same_names, tmp_path):
    out_dir = tmp_path / "outputs"
    layers = ["features_3", "features_3"] if same_names else ["features_3", "features_6"]
    processes = [subprocess.Popen([sys.executable, INVERT, *FAST, "--image_path", str(CORPUS / "good.png"),
                                   "--epochs", "30", "--layer_name", layer, "--output_dir", str(out_dir)],
                                  stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL) for layer in layers]
    assert [process.wait(timeout=300) for process in processes] == [0, 0]
    expected = {f"good_squeezenet1_1_{layer}.{suffix}" for layer in layers for suffix in ("png", "json")}
    assert {path.name for path in out_dir.iterdir()} == expected | {"index.csv", "index.csv.lock"}  # no temporaries
    for path in out_dir.iterdir():
        if path.suffix == ".png":
            Image.open(path).load()
        elif path.suffix == ".json":
            assert json.loads(path.read_text())["iterations"] == 30
    # the index lists every record in the folder, and the last run to finish saw both
    assert (out_dir / "index.csv").read_text().count("\n") == 1 + len(set(layers))


# ---------------------------------------------------------------- fuzzing

FUZZ_EXAMPLES = 150


def encoded(format_name: str) -> bytes:
    """The test photo encoded in one format."""
    import io
    buffer = io.BytesIO()
    photo((40, 30)).save(buffer, format=format_name)
    return buffer.getvalue()


REAL_FILES = {name: encoded(name) for name in ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")}


def loads_or_refuses(data: bytes, folder: Path) -> None:
    """load_image gives an RGB image or a UsageError, never anything else."""
    path = folder / "fuzz.img"
    path.write_bytes(data)
    try:
        image = invert.load_image(path)
    except invert.UsageError as error:
        assert "\n" not in str(error)
    else:
        assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


@pytest.mark.slow
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_fuzz_random_bytes(data, tmp_path):
    loads_or_refuses(data, tmp_path)


@pytest.mark.slow
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(REAL_FILES)), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=6))
def test_fuzz_corrupted_real_images(name, cut, flips, tmp_path):
    data = bytearray(REAL_FILES[name])
    for where, value in flips:
        data[int(where * len(data))] = value
    loads_or_refuses(bytes(data[:max(1, int(cut * len(data)))] if cut < 0.9 else data), tmp_path)


@pytest.mark.slow
def test_a_real_ulimit_refuses_a_row_that_would_not_fit_in_one_line(tmp_path):
    import resource
    script = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import invert; print(open('/proc/self/status').read())"
    status = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    used = int(next(line for line in status.splitlines() if line.startswith("VmSize")).split()[1]) * 1024
    limit = used + 2 ** 31  # room for vgg16_bn's weights, not for a 1024-pixel row of features_5
    result = subprocess.run([sys.executable, INVERT, "--model", "vgg16_bn", "--weights", "none", "--input_size",
                             "1024", "--layer_name", "features_5", "--epochs", "1", "--quiet", "--image_path",
                             str(CORPUS / "good.png"), "--output_dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert result.returncode == 2 and len(errors) == 1 and "GiB free on cpu" in errors[0], result.stderr[-500:]
