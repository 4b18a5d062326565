"""Offline tests for invert.py: tiny models and images, few iterations, real assertions."""
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import invert

ROOT = Path(__file__).resolve().parent.parent
# A small random network keeps each CLI run to a fraction of a second.
FAST = ["--model", "squeezenet1_1", "--weights", "none", "--input_size", "64",
        "--layer_name", "features_3", "--epochs", "5", "--quiet"]
# the seed's formulation, for tests that rely on its learning rates
SEED = dict(objective="seed", optimizer="sgd", param="pixel")
FLAGS = ["--image_path", "--model", "--weights", "--input_size", "--layer_name", "--list_layers",
         "--objective", "--optimizer", "--param", "--C", "--jitter", "--alpha", "--beta", "--lambda_alpha",
         "--lambda_tv", "--epochs", "--lr", "--momentum",
         "--stdout_epochs", "--decay_factor", "--decay_epochs", "--device", "--seed", "--output",
         "--output_dir", "--save_every", "--precision", "--quiet"]


@pytest.fixture
def photo(tmp_path):
    """A small colourful RGB photo on disk."""
    x = torch.linspace(0, 1, 48)
    pixels = torch.stack([x.expand(48, 48), x.expand(48, 48).T, (1 - x).expand(48, 48)])
    path = tmp_path / "photo.png"
    Image.fromarray((pixels.permute(1, 2, 0) * 255).byte().numpy()).save(path)
    return path


@pytest.fixture
def tiny():
    """A two-conv network with fixed random weights, frozen as invert.py freezes models."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
    return model.eval().requires_grad_(False)


def run_main(args, capsys):
    """Run invert.main and return (exit code, stdout, stderr)."""
    code = invert.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code, err, out_dir):
    """Exit 2, one error line on stderr (beside any warning), no traceback, nothing written."""
    assert code == 2
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("invert.py: error: "), err
    assert "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())


# ---------------------------------------------------------------- the algorithm


def test_loss_falls(tiny):
    reference = torch.randn(1, 3, 16, 16)
    history = []
    result = invert.invert(tiny, tiny[3], reference, **SEED, epochs=40, lr=1.0,
                           callback=lambda step, losses, images: history.append(losses[0]["rec_loss"].item()))
    assert len(history) == 40 and result.iterations == 40 and not result.interrupted
    assert result.losses[0]["rec_loss"] < 0.3 * history[0]


@pytest.mark.parametrize("objective", invert.OBJECTIVES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "lbfgs"])
@pytest.mark.parametrize("param", ["pixel", "fft"])
def test_every_objective_and_optimizer_reduces_its_loss(objective, optimizer, param, tiny):
    # the default rates suit VGG16-BN; SGD on the paper's loss needs a smaller one on this tiny network
    lr = {("paper", "sgd", "pixel"): 0.3, ("paper", "sgd", "fft"): 0.001}.get((objective, optimizer, param))
    history = []
    result = invert.invert(tiny, tiny[3], torch.randn(1, 3, 16, 16), objective=objective,
                           optimizer=optimizer, param=param, epochs=40, lr=lr,
                           callback=lambda step, losses, images: history.append(sum(losses[0].values()).item()))
    assert len(history) == 40
    final = sum(result.losses[0][name] for name in ("rec_loss", "alpha_loss", "tv_loss"))
    assert final < 0.5 * history[0], (history[0], final)
    assert result.losses[0]["feature_error"] < 0.5
    assert result.settings[0]["lr"] == (lr or invert.DEFAULT_LRS[objective, optimizer, param])


def test_paper_terms_are_normalised_in_0_255_units():
    image = torch.zeros(1, 3, 2, 2)
    image[0, :, 0, 0] = torch.tensor([80.0, 0, 0]) / (255 * invert.IMAGENET_STD[0])  # norm B at one pixel
    features, target = torch.ones(1, 4), torch.zeros(1, 4)
    terms = invert.objective_terms("paper", features, target, target.new_tensor(2.0), image, alpha=6, beta=2,
                                   lambda_alpha=1, lambda_tv=1, C=3)
    assert terms["rec_loss"].item() == pytest.approx(3 * 4 / 2)
    assert terms["alpha_loss"].item() == pytest.approx(1 / 4, rel=1e-4)  # one pixel at B, of four
    # that pixel differs by B from its right and lower neighbours: 2 B^2 / (4 V^2) = 2 * 6.5^2 / 4
    assert terms["tv_loss"].item() == pytest.approx(2 * 6.5 ** 2 / 4, rel=1e-4)


def test_jitter_keeps_the_image_shape_and_auto_follows_the_stride(tiny):
    reference = torch.randn(1, 3, 17, 15)
    result = invert.invert(tiny, tiny[3], reference, objective="paper", jitter=3, epochs=6)
    assert result.image.shape == reference.shape and result.settings[0]["jitter"] == 3
    strided = nn.Sequential(nn.Conv2d(3, 4, 16, stride=16)).eval().requires_grad_(False)
    result = invert.invert(strided, strided[0], torch.randn(1, 3, 64, 64), jitter=invert.AUTO_JITTER, epochs=2)
    assert result.settings[0]["jitter"] == 3 and result.image.shape == (1, 3, 64, 64)  # 4 offsets: 0 to 3
    assert invert.invert(strided, strided[0], torch.randn(1, 3, 64, 64), epochs=2).settings[0]["jitter"] == 0
    assert invert.parse_args(["--jitter", "auto"]).jitter == invert.AUTO_JITTER


def test_jitter_stops_at_the_first_decay(tiny, monkeypatch):
    crops = []
    real_layer_outputs = invert.layer_outputs
    monkeypatch.setattr(invert, "layer_outputs",
                        lambda model, layers, images: crops.append(images.detach().clone())
                        or real_layer_outputs(model, layers, images))
    invert.invert(tiny, tiny[3], torch.randn(1, 3, 16, 16), objective="paper", param="pixel", jitter=2,
                  epochs=30, decay_epochs=20, lr=1e-9, optimizer="sgd")  # the image barely moves
    steps = crops[1:-1]  # the reference first, the final evaluation last
    shifted = [not torch.allclose(crop, steps[-1], atol=1e-4) for crop in steps]
    assert len(steps) == 30 and sum(shifted[:20]) >= 10 and not any(shifted[20:])


def test_box_constraint_holds_after_every_step(tiny):
    norms = []

    def record(step, losses, images):
        norms.append(invert.to_paper_units(images()).square().sum(dim=1).sqrt().max().item())

    result = invert.invert(tiny, tiny[3], 5 * torch.randn(1, 3, 16, 16), objective="paper",
                           optimizer="sgd", lr=50.0, epochs=15, callback=record)
    assert len(norms) == 15 and max(norms) <= 2 * invert.PAPER_B * (1 + 1e-5)
    assert max(norms) > 1.9 * invert.PAPER_B  # the constraint was active, not idle
    assert invert.to_paper_units(result.image).square().sum(dim=1).sqrt().max() <= 2 * invert.PAPER_B * 1.00001


def test_result_shape_and_range(tiny):
    reference = torch.randn(1, 3, 20, 20)
    result = invert.invert(tiny, tiny[1], reference, **SEED, epochs=3, lr=1.0)
    assert result.image.shape == reference.shape and not result.image.requires_grad
    picture = invert.deprocess(result.image * 100)  # far outside [0, 1]: must be clamped
    assert picture.size == (20, 20) and picture.mode == "RGB"
    low, high = zip(*picture.getextrema())
    assert min(low) == 0 and max(high) == 255


def test_only_the_image_is_optimised(tiny):
    before = [parameter.clone() for parameter in tiny.parameters()]
    invert.invert(tiny, tiny[3], torch.randn(1, 3, 16, 16), **SEED, epochs=3, lr=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.parameters()))
    assert not any(parameter.requires_grad for parameter in tiny.parameters())


def test_priors_match_their_definitions():
    image = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]])
    assert invert.alpha_prior(image, 6.0).item() == pytest.approx(1 + 64 + 0.5 ** 6 + 729)
    # dx: (-3) at (0,1) and 2.5 at (1,1); dy: -0.5 at (1,0) and 5 at (1,1)
    assert invert.tv_prior(image, 2.0).item() == pytest.approx(9 + 0.25 + 2.5 ** 2 + 25)
    assert invert.tv_prior(image, 1.0).item() == pytest.approx(3 + 0.5 + (2.5 ** 2 + 25) ** 0.5)
    gradient_image = image.clone().requires_grad_()
    invert.tv_prior(gradient_image, 1.0).backward()  # beta < 2 must not give NaN gradients
    assert torch.isfinite(gradient_image.grad).all()


def test_non_integer_alpha_is_finite_for_negative_pixels():
    assert torch.isfinite(invert.alpha_prior(torch.tensor([-0.5, 0.5]), 2.5))


def test_divergence_names_lr(tiny):
    with pytest.raises(invert.UsageError, match="--lr"):
        invert.invert(tiny, tiny[3], torch.randn(1, 3, 16, 16), **SEED, epochs=20, lr=1e30)


def test_all_zero_target_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval().requires_grad_(False)
    nn.init.zeros_(model[0].weight)
    nn.init.constant_(model[0].bias, -1.0)
    with pytest.raises(invert.UsageError, match="all zero"):
        invert.invert(model, model[1], torch.randn(1, 3, 8, 8), epochs=2)


# ---------------------------------------------------------------- layers


def test_both_layer_name_forms_resolve_to_the_same_module():
    alexnet = torchvision.models.alexnet()
    for seed_form, dotted in [("features_4", "features.4"), ("classifier_4", "classifier.4")]:
        assert invert.resolve_layer(alexnet, seed_form) == (dotted, alexnet.get_submodule(dotted))
        assert invert.resolve_layer(alexnet, dotted)[1] is invert.resolve_layer(alexnet, seed_form)[1]
    assert invert.resolve_layer(alexnet, "avgpool")[1] is alexnet.avgpool
    resnet = torchvision.models.resnet18()
    assert invert.resolve_layer(resnet, "layer3.1.conv2")[1] is resnet.layer3[1].conv2
    assert invert.resolve_layer(resnet, "layer3_1_conv2")[1] is resnet.layer3[1].conv2


def test_underscores_inside_module_names_still_resolve():
    model = nn.Sequential()
    model.add_module("Conv2d_1a", nn.Sequential(nn.Conv2d(3, 3, 1)))
    assert invert.resolve_layer(model, "Conv2d_1a")[1] is model.Conv2d_1a
    assert invert.resolve_layer(model, "Conv2d_1a.0")[1] is model.Conv2d_1a[0]
    assert invert.resolve_layer(model, "Conv2d_1a_0")[1] is model.Conv2d_1a[0]


def test_unknown_layer_lists_valid_names():
    with pytest.raises(invert.UsageError) as caught:
        invert.resolve_layer(torchvision.models.alexnet(), "features_99")
    assert "features_4" in str(caught.value) and "classifier_6" in str(caught.value)


def test_hooked_activation_equals_a_manual_forward_pass():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 96, 96)
    alexnet = torchvision.models.alexnet().eval()
    with torch.no_grad():
        assert torch.equal(invert.layer_outputs(alexnet, [alexnet.features[4]], x)[0], alexnet.features[:5](x))
        assert torch.equal(invert.layer_outputs(alexnet, [alexnet.features[3]], x)[0], alexnet.features[:4](x))
        resnet = torchvision.models.resnet18().eval()
        manual = resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))))
        assert torch.allclose(invert.layer_outputs(resnet, [resnet.layer2], x)[0], manual)
    assert not alexnet.features[4]._forward_hooks  # the hook is removed again


def test_layers_after_the_hook_are_not_run():
    calls = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    model[2].register_forward_hook(lambda *args: calls.append(1))
    invert.layer_outputs(model, [model[1]], torch.randn(1, 3, 8, 8))
    assert calls == []


def test_list_layers(capsys):
    code, out, _ = run_main(["--model", "alexnet", "--weights", "none", "--list_layers"], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["features_4"][1:] == ["features.4", "ReLU", "192x27x27"]
    assert rows["avgpool"][-1] == "256x6x6" and rows["classifier_6"][-1] == "1000"
    assert len(rows) == len([name for name, _ in torchvision.models.alexnet().named_modules() if name])


def test_list_layers_marks_layers_that_do_not_run(capsys):
    code, out, _ = run_main(["--model", "googlenet", "--weights", "none", "--list_layers"], capsys)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert rows["aux1"].endswith("not run in eval mode")  # googlenet's auxiliary heads train only
    assert rows["inception4a"].split()[-1] == "512x14x14"
    vit = ["--model", "vit_b_32", "--weights", "none", "--list_layers"]
    code, out, _ = run_main(vit + ["--input_size", "224"], capsys)
    assert code == 0 and {line.split()[0]: line for line in out.splitlines()}["encoder"].endswith("50x768")
    code, out, _ = run_main(vit, capsys)  # ViT asserts a 224x224 input; the default is 227
    assert code == 0 and all(line.endswith("not reached: the model fails at --input_size 227")
                             for line in out.splitlines())


# ---------------------------------------------------------------- images


def make_image(mode, tmp_path, name, **save):
    """Save a 20x20 image of `mode`, with a bright left half, and return its path."""
    image = Image.new(mode, (20, 20))
    bright = {"L": 255, "LA": (255, 255), "RGBA": (255, 0, 0, 255), "CMYK": (0, 255, 255, 0),
              "I;16": 65535, "P": 1}[mode]
    image.paste(bright, (0, 0, 10, 20))
    if mode == "P":
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        save["transparency"] = 0
    path = tmp_path / name
    image.save(path, **save)
    return path


@pytest.mark.parametrize("mode, name", [("L", "grey.png"), ("LA", "la.png"), ("RGBA", "rgba.png"),
                                        ("P", "palette.png"), ("CMYK", "cmyk.jpg"), ("I;16", "sixteen.png")])
def test_every_image_mode_becomes_rgb(mode, name, tmp_path):
    path = make_image(mode, tmp_path, name)
    assert Image.open(path).mode.startswith(mode[0])
    image = invert.load_image(path)
    assert image.mode == "RGB" and image.size == (20, 20)
    left = image.getpixel((2, 10))
    assert max(left) >= 250  # the bright half stays bright: 16-bit is rescaled, not clipped to black
    if mode in ("LA", "P"):
        assert image.getpixel((15, 10)) == (255, 255, 255)  # transparent pixels are laid on white


def test_exif_orientation_is_respected(tmp_path):
    image = Image.new("RGB", (30, 10), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert invert.load_image(tmp_path / "rotated.jpg").size == (10, 30)


def test_preprocess_matches_the_seed_transform(photo):
    tensor = invert.preprocess(invert.load_image(photo), 32)
    assert tensor.shape == (1, 3, 32, 32)
    restored = invert.deprocess(tensor)
    original = invert.load_image(photo).resize((32, 32), Image.BILINEAR)
    as_tensor = torchvision.transforms.functional.pil_to_tensor
    assert (as_tensor(restored).float() - as_tensor(original).float()).abs().mean() < 3


# ---------------------------------------------------------------- the command line, end to end


def test_end_to_end_writes_png_and_json(photo, tmp_path, capsys):
    out_dir = tmp_path / "new" / "outputs"
    code, out, err = run_main(["--image_path", photo, *FAST, "--output_dir", out_dir], capsys)
    assert code == 0, err
    png = out_dir / "photo_squeezenet1_1_features_3.png"
    picture = Image.open(png)
    assert picture.size == (64, 64) and picture.mode == "RGB"
    record = json.loads(png.with_suffix(".json").read_text())
    assert record["args"]["layer_name"] == ["features_3"] and record["args"]["epochs"] == 5
    assert record["layer_name"] == "features_3" and record["image_path"] == str(photo)
    assert record["iterations"] == 5 and record["interrupted"] is False
    assert 0 < record["feature_error"] < 1.5
    assert record["rec_loss"] == pytest.approx(record["settings"]["C"] * record["feature_error"])
    for key in ("alpha_loss", "tv_loss", "seconds", "ms_per_iteration"):
        assert record[key] >= 0
    assert record["ms_per_iteration"] == pytest.approx(1000 * record["seconds"] / 5, abs=0.05)
    assert record["device"] == "cpu"
    assert record["torch_version"] == torch.__version__
    assert record["torchvision_version"] == torchvision.__version__
    assert set(record["args"]) == {flag.lstrip("-") for flag in FLAGS}
    assert sorted(path.suffix for path in out_dir.iterdir()) == [".json", ".png"]


def test_both_layer_forms_name_the_same_output(photo, tmp_path, capsys):
    args = ["--image_path", photo, *FAST, "--output_dir", tmp_path / "out"]
    assert run_main(args + ["--layer_name", "features.3"], capsys)[0] == 0
    assert [path.name for path in (tmp_path / "out").glob("*.png")] == ["photo_squeezenet1_1_features_3.png"]


def test_same_seed_gives_identical_png(photo, tmp_path, capsys):
    outputs = []
    for seed, name in [(7, "a.png"), (7, "b.png"), (8, "c.png")]:
        output = tmp_path / name
        assert run_main(["--image_path", photo, *FAST, "--seed", seed, "--output", output], capsys)[0] == 0
        outputs.append(output.read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_progress_lines_and_quiet(photo, tmp_path, capsys):
    args = ["--image_path", photo, *[a for a in FAST if a != "--quiet"], "--output_dir", tmp_path]
    code, out, _ = run_main(args + ["--stdout_epochs", "2"], capsys)
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("iteration")]
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"]
    assert all("rec_loss" in line and "alpha_loss" in line and "tv_loss" in line for line in lines)
    code, out, err = run_main(args + ["--quiet"], capsys)
    assert code == 0 and out == "" and "it/s" not in err


def test_ctrl_c_saves_the_current_image(photo, tmp_path, capsys, monkeypatch):
    real_layer_outputs, calls = invert.layer_outputs, []

    def interrupt_on_fourth_call(*args):
        calls.append(1)
        if len(calls) == 5:  # the memory probe, the reference, then optimisation steps 1, 2 and 3
            raise KeyboardInterrupt
        return real_layer_outputs(*args)

    monkeypatch.setattr(invert, "layer_outputs", interrupt_on_fourth_call)
    output = tmp_path / "x.png"
    code, _, err = run_main(["--image_path", photo, *FAST, "--epochs", 50, "--output", output], capsys)
    assert code == 130 and "interrupted" in err
    assert Image.open(output).size == (64, 64)
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["interrupted"] is True and record["iterations"] == 2


def test_help_documents_every_flag_with_its_default():
    result = subprocess.run([sys.executable, str(ROOT / "invert.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in FLAGS:
        assert flag in text
    for default in ["(default: alexnet)", "(default: 227)", "(default: avgpool)", "(default: 6.0)",
                    "(default: 2.0)", "(default: 200)", "(default: 0.9)",
                    "(default: 25)", "(default: 0.1)", "(default: 2023)", "(default: DEFAULT)",
                    "(default: auto)", "(default: outputs)", "default: 1e-05 with --objective seed",
                    "(default: paper)", "(default: adam)", "(default: fft)", "100 for seed + sgd + pixel"]:
        assert default in text, default


def test_default_image_ships_with_the_tool():
    assert invert.DEFAULT_IMAGE.is_file()
    assert invert.parse_args([]).image_path == [str(invert.DEFAULT_IMAGE)]
    assert invert.load_image(invert.DEFAULT_IMAGE).size[0] >= 227


# ---------------------------------------------------------------- errors


def bad_files(tmp_path, photo):
    """Image paths that must be refused, by name."""
    (tmp_path / "text.jpg").write_text("not an image at all\n")
    (tmp_path / "empty.png").write_bytes(b"")
    data = photo.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "folder").mkdir()
    return {"missing": tmp_path / "missing.jpg", "text": tmp_path / "text.jpg",
            "empty": tmp_path / "empty.png", "truncated": tmp_path / "truncated.png",
            "directory": tmp_path / "folder"}


@pytest.mark.parametrize("case", ["missing", "text", "empty", "truncated", "directory"])
def test_bad_image_files_fail_cleanly(case, photo, tmp_path, capsys):
    path = bad_files(tmp_path, photo)[case]
    out_dir = tmp_path / "out"
    code, _, err = run_main(["--image_path", path, *FAST, "--output_dir", out_dir], capsys)
    assert_clean_failure(code, err, out_dir)
    assert "--image_path" in err


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-3"], "--epochs"), (["--epochs", "ten"], "--epochs"),
    (["--input_size", "0"], "--input_size"), (["--stdout_epochs", "0"], "--stdout_epochs"),
    (["--lr", "0"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--decay_epochs", "0"], "--decay_epochs"), (["--lambda_tv", "-1"], "--lambda_tv"),
    (["--model", "alexnt"], "alexnet"), (["--model", "vgg16_bm"], "vgg16_bn"),
    (["--layer_name", "features_99"], "features_3"),
    (["--weights", "IMAGENET9K"], "IMAGENET1K_V1"), (["--weights", "missing.pth"], "no such file"),
    (["--device", "banana"], "--device"), (["--device", "cuda:7"], "--device"),
    (["--output", "picture.jpg"], ".png"),
    (["--input_size", "8", "--layer_name", "features_12"], "--input_size"),
    (["--model", "vit_b_32", "--layer_name", "encoder"], "--input_size"),  # ViT asserts 224x224
])
def test_bad_settings_fail_cleanly(flags, message, photo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if flags[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, _, err = run_main(["--image_path", photo, *FAST, *flags], capsys)
    assert_clean_failure(code, err, tmp_path / "outputs")
    assert message in err
    assert list(tmp_path.rglob("*.png")) == [photo]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_fails_cleanly(photo, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, _, err = run_main(["--image_path", photo, *FAST, "--device", "cuda", "--output_dir", out_dir],
                            capsys)
    assert_clean_failure(code, err, out_dir)
    assert "CUDA" in err


def test_auto_device_picks_an_available_one():
    device = invert.pick_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert device.type == expected
    assert invert.pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("args", [["--image_path", "does/not/exist.jpg"], ["--epochs", "0"]])
def test_errors_in_a_real_process_have_no_traceback(args, tmp_path):
    command = [sys.executable, str(ROOT / "invert.py"), *args, "--output_dir", str(tmp_path / "o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- weights


def block_network(monkeypatch):
    """Make every name lookup and connection fail, as on a machine with no network."""
    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_download_failure_says_what_to_do(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    block_network(monkeypatch)
    out_dir = tmp_path / "out"
    # the defaults: alexnet with its DEFAULT weights
    code, _, err = run_main(["--image_path", photo, "--output_dir", out_dir, "--quiet"], capsys)
    assert_clean_failure(code, err, out_dir)
    message = err.strip().splitlines()[-1]
    assert "alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "--weights PATH" in message and "--weights none" in message


def test_weights_download_once_into_torch_home(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    downloads = []

    def fake_download(url, destination, hash_prefix=None, progress=True):
        downloads.append((url, hash_prefix))
        torch.save(torchvision.models.squeezenet1_1().state_dict(), destination)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    args = ["--image_path", photo, *FAST, "--weights", "DEFAULT", "--output_dir", tmp_path / "out"]
    for _ in range(2):
        code, _, err = run_main(args, capsys)
        assert code == 0, err
    assert downloads == [(weights.url, "b8a52dc0")]  # the second run loads the cached file
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / Path(weights.url).name).is_file()


def test_corrupt_cached_weights_fail_cleanly(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / Path(torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url).name).write_bytes(b"half a file")
    out_dir = tmp_path / "out"
    code, _, err = run_main(["--image_path", photo, *FAST, "--weights", "DEFAULT", "--output_dir", out_dir], capsys)
    assert_clean_failure(code, err, out_dir)
    assert "delete it to download again" in err


def test_cached_weights_work_offline(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    block_network(monkeypatch)
    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), cache / Path(weights.url).name)
    args = ["--image_path", photo, *FAST, "--weights", "DEFAULT", "--output_dir", tmp_path / "out"]
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert "warning" not in err


def test_state_dict_file_loads_and_mismatches_are_clear(photo, tmp_path, capsys):
    torch.manual_seed(3)
    model = torchvision.models.squeezenet1_1()
    torch.save(model.state_dict(), tmp_path / "squeeze.pth")
    loaded = invert.load_model("squeezenet1_1", str(tmp_path / "squeeze.pth"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert not loaded.training and not any(parameter.requires_grad for parameter in loaded.parameters())

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet.pth")
    out_dir = tmp_path / "out"
    code, _, err = run_main(["--image_path", photo, *FAST, "--weights", tmp_path / "resnet.pth",
                             "--output_dir", out_dir], capsys)
    assert_clean_failure(code, err, out_dir)
    assert "does not fit squeezenet1_1" in err and "missing keys" in err


def test_non_torch_weights_file_fails_cleanly(photo, tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("these are not weights")
    out_dir = tmp_path / "out"
    code, _, err = run_main(["--image_path", photo, *FAST, "--weights", tmp_path / "notes.pth",
                             "--output_dir", out_dir], capsys)
    assert_clean_failure(code, err, out_dir)
    assert "not a PyTorch state-dict file" in err


class _Payload:
    """A pickle that runs code when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(photo, tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    with open(tmp_path / "evil.pth", "wb") as file:
        pickle.dump({"features.0.weight": _Payload(marker)}, file, protocol=2)
    out_dir = tmp_path / "out"
    code, _, err = run_main(["--image_path", photo, *FAST, "--weights", tmp_path / "evil.pth",
                             "--output_dir", out_dir], capsys)
    assert_clean_failure(code, err, out_dir)
    assert "refused" in err
    assert not marker.exists()


def test_random_weights_warn(photo, tmp_path, capsys):
    code, _, err = run_main(["--image_path", photo, *FAST, "--output_dir", tmp_path], capsys)
    assert code == 0
    assert "warning: --weights none" in err


# ---------------------------------------------------------------- writing


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.png"
    target.write_bytes(b"old")

    def fail_halfway(file):
        file.write(b"half")
        raise OSError("disk full")

    with pytest.raises(invert.UsageError, match="could not write"):
        invert.write_atomically(target, fail_halfway)
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["result.png"]
    invert.write_atomically(target, lambda file: file.write(b"new"))
    assert target.read_bytes() == b"new"


# ---------------------------------------------------------------- batches of layers and images


def full_forward_activations(model: nn.Module, layers: list, x: torch.Tensor) -> list:
    """Each layer's output in a plain run of the whole model, classifier included."""
    recorded = {}

    def recorder(layer):
        def hook(module, inputs, output):  # returns None, so the output passes on unchanged
            recorded.setdefault(layer, output.clone())
        return hook

    handles = [layer.register_forward_hook(recorder(layer)) for layer in set(layers)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return [recorded[layer][row:row + 1] for row, layer in enumerate(layers)]


@pytest.mark.parametrize("name", ["alexnet", "resnet18"])
def test_truncated_forward_matches_the_full_models_activations(name):
    torch.manual_seed(0)
    model = invert.random_model(name).eval().requires_grad_(False)
    modules = ([model.features[index] for index in (3, 0, 8, 3)] if name == "alexnet"  # one per row
               else [model.layer1[0].conv1, model.layer2, model.layer1[0].conv1, model.layer3[1].relu])
    x = torch.randn(4, 3, 64, 64)
    expected = full_forward_activations(model, modules, x)
    with torch.no_grad():
        outputs = invert.layer_outputs(model, modules, x)
    for output, wanted in zip(outputs, expected):
        # alexnet's features_0 and features_3 are convolutions followed by in-place ReLUs
        assert output.shape == wanted.shape and torch.allclose(output, wanted, atol=1e-6)
    assert outputs[0].min() < 0


def test_rows_leave_a_sequential_chain_at_their_layer():
    model = invert.random_model("alexnet").eval().requires_grad_(False)
    batch_sizes = []
    for module in model.features:
        module.register_forward_hook(lambda module, inputs, output: batch_sizes.append(len(inputs[0])))
    invert.layer_outputs(model, [model.features[2], model.features[5], model.features[2]],
                         torch.randn(3, 3, 64, 64))
    assert batch_sizes == [3, 3, 3, 1, 1, 1]  # features_3 onwards run only for the row that needs them
    assert invert.chain_of(model, [model.features[2], model.classifier[1]]) is None


def test_truncated_forward_stops_at_the_deepest_requested_layer():
    alexnet = torchvision.models.alexnet().eval()
    ran = []
    for index, module in enumerate(alexnet.features):
        module.register_forward_hook(lambda module, inputs, output, index=index: ran.append(index))
    invert.layer_outputs(alexnet, [alexnet.features[5], alexnet.features[2]], torch.randn(2, 3, 64, 64))
    assert ran == [0, 1, 2, 3, 4, 5]


def test_one_batched_iteration_matches_single_layer_iterations():
    torch.manual_seed(0)
    model = invert.random_model("squeezenet1_1").eval().requires_grad_(False)
    layers = [model.features[3], model.features[6], model.features[10]]
    references = torch.randn(3, 3, 64, 64)
    # SGD, whose step is linear in the gradient: Adam's first step is lr * sign(gradient), which
    # turns a rounding difference in a near-zero gradient into a full step
    together = invert.invert(model, layers, references, **SEED, lr=1.0, epochs=3)
    for row, layer in enumerate(layers):
        alone = invert.invert(model, layer, references[row:row + 1], **SEED, lr=1.0, epochs=3)
        # a batched convolution adds in another order: equal to float rounding, not bit for bit
        assert torch.allclose(together.image[row], alone.image[0], atol=1e-5)
        assert together.losses[row]["feature_error"] == pytest.approx(alone.losses[0]["feature_error"], rel=1e-5)
        assert together.settings[row] == alone.settings[0]


def test_a_multi_layer_call_matches_single_layer_calls(photo, tmp_path, capsys):
    layers = ["features_3", "features_6"]
    args = ["--image_path", photo, *FAST[:-5], "--epochs", 8, "--quiet"]
    code, _, err = run_main(args + ["--layer_name", *layers, "--output_dir", tmp_path / "together"], capsys)
    assert code == 0, err
    for layer in layers:
        assert run_main(args + ["--layer_name", layer, "--output_dir", tmp_path / "alone"], capsys)[0] == 0
        name = f"photo_squeezenet1_1_{layer}"
        together, alone = (torch.tensor(list(Image.open(tmp_path / folder / f"{name}.png").tobytes())).float()
                           for folder in ("together", "alone"))
        # float rounding in the batched convolutions, grown by the optimisation (see the README)
        assert (together - alone).abs().mean() < 0.5 and (together - alone).abs().max() <= 8
        errors = [json.loads((tmp_path / folder / f"{name}.json").read_text())["feature_error"]
                  for folder in ("together", "alone")]
        assert errors[0] == pytest.approx(errors[1], rel=1e-2)


def test_layers_and_images_combine_with_a_montage_per_image(photo, tmp_path, capsys):
    second = tmp_path / "second.png"
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second)
    out = tmp_path / "out"
    code, _, err = run_main(["--image_path", photo, second, *FAST, "--layer_name", "features_3", "features.6",
                             "--output_dir", out], capsys)
    assert code == 0, err
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted([f"{stem}_squeezenet1_1_{layer}.{suffix}" for stem in ("photo", "second")
                            for layer in ("features_3", "features_6") for suffix in ("png", "json")]
                           + ["photo_squeezenet1_1_montage.png", "second_squeezenet1_1_montage.png"])
    grid = Image.open(out / "photo_squeezenet1_1_montage.png")
    # three tiles (the original and two layers) in a 2x2 grid of 64-pixel tiles with 16-pixel labels
    assert grid.size == (2 * 64, 2 * (64 + 16))
    tiles = [grid.crop((left, top, left + 64, top + 64)) for top in (0, 80) for left in (0, 64)]
    original = invert.deprocess(invert.preprocess(invert.load_image(photo), 64))
    assert tiles[0].tobytes() == original.tobytes()
    assert tiles[1].tobytes() == Image.open(out / "photo_squeezenet1_1_features_3.png").tobytes()
    assert tiles[2].tobytes() == Image.open(out / "photo_squeezenet1_1_features_6.png").tobytes()
    assert tiles[3].getextrema() == ((255, 255),) * 3  # the unused cell stays blank


def test_one_layer_and_image_writes_no_montage(photo, tmp_path, capsys):
    assert run_main(["--image_path", photo, *FAST, "--output_dir", tmp_path], capsys)[0] == 0
    assert not list(tmp_path.glob("*montage*"))


def test_output_with_several_layers_is_refused(photo, tmp_path, capsys):
    code, out, err = run_main(["--image_path", photo, *FAST, "--layer_name", "features_3", "features_6",
                               "--output", tmp_path / "out" / "x.png"], capsys)
    assert_clean_failure(code, err, tmp_path / "out")
    assert "--output_dir" in err


def test_save_every_writes_frames_and_a_gif(photo, tmp_path, capsys):
    code, _, err = run_main(["--image_path", photo, *FAST, "--epochs", 7, "--save_every", 3,
                             "--output_dir", tmp_path], capsys)
    assert code == 0, err
    frames = sorted((tmp_path / "photo_squeezenet1_1_features_3_frames").iterdir())
    assert [frame.name for frame in frames] == ["iteration_00003.png", "iteration_00006.png"]
    assert Image.open(frames[0]).size == (64, 64)
    gif = Image.open(tmp_path / "photo_squeezenet1_1_features_3.gif")
    assert gif.n_frames == 3 and gif.size == (64, 64)  # the two frames and the final image


def test_precision_bf16_runs_and_fp16_needs_cuda(photo, tmp_path, capsys):
    code, _, err = run_main(["--image_path", photo, *FAST, "--precision", "bf16", "--output_dir", tmp_path], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "photo_squeezenet1_1_features_3.json").read_text())
    assert record["precision"] == "bf16" and 0 < record["feature_error"] < 1.5
    code, out, err = run_main(["--image_path", photo, *FAST, "--precision", "fp16",
                               "--output_dir", tmp_path / "fp16"], capsys)
    assert_clean_failure(code, err, tmp_path / "fp16")
    assert invert.resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")


def test_divergence_saves_only_a_diverged_png(photo, tmp_path, capsys):
    output = tmp_path / "out" / "x.png"
    code, _, err = run_main(["--image_path", photo, *FAST, "--objective", "seed", "--optimizer", "sgd",
                             "--param", "pixel", "--lr", "1e9", "--epochs", 50, "--output", output], capsys)
    assert code == 2 and "--lr" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # the random-weights warning and the error
    assert sorted(path.name for path in output.parent.iterdir()) == ["x.diverged.png"]
    picture = Image.open(output.with_suffix(".diverged.png"))
    assert picture.size == (64, 64)
