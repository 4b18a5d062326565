"""Offline tests of invert.py's method, settings, layers and command line: tiny models, few iterations."""
import dataclasses
import hashlib
import json
import pickle
import math
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import invert
from bad_inputs import Payload
from conftest import FAST, assert_clean_failure

# the seed's method, with a learning rate that suits the tiny network
SEED = dict(objective="seed", lr=1.0)


def identity_network() -> nn.Module:
    """A 1x1 convolution that passes its input through: the feature error is ||x - t||^2 / ||t||^2."""
    model = nn.Conv2d(3, 3, 1, bias=False)
    model.weight.data = torch.eye(3).view(3, 3, 1, 1)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- settings


def test_the_objective_decides_its_defaults_and_flags_override_them():
    cpu = torch.device("cpu")
    seed = invert.resolve(invert.Settings(objective="seed"), cpu)
    assert (seed.optimizer, seed.param, seed.lr, seed.lambda_alpha, seed.C, seed.decay_epochs) == \
           ("sgd", "pixel", 100.0, 1e-5, 1.0, 200)
    paper = invert.resolve(invert.Settings(epochs=70), cpu)
    assert (paper.optimizer, paper.param, paper.lr, paper.decay_epochs) == ("adam", "fft", "auto", "auto")
    assert invert.decay_iterations(paper) == 60  # six sevenths of --epochs, decided where it is used
    assert paper.C == invert.OBJECTIVE_DEFAULTS["paper"]["C"]
    mixed = invert.resolve(invert.Settings(objective="seed", optimizer="adam", C=7.0), cpu)
    assert (mixed.optimizer, mixed.param, mixed.lr, mixed.C) == ("adam", "pixel", 0.1, 7.0)
    assert invert.resolve(seed, cpu) == seed  # resolving twice changes nothing
    assert None not in dataclasses.asdict(paper).values()  # each setting decided, or 'auto'
    assert paper.precision in ("fp32", "bf16")
    with pytest.raises(invert.UsageError, match="--optimizer must be one of sgd, adam, got 'adagrad'"):
        invert.resolve(invert.Settings(optimizer="adagrad"), cpu)


def test_a_flag_that_takes_auto_also_takes_a_number():
    assert (invert.parse_args(["--C", "3"]).C, invert.parse_args(["--C", "auto"]).C) == (3.0, "auto")
    assert invert.parse_args(["--jitter", "2"]).jitter == 2 and invert.parse_args([]).jitter == 0


def test_help_documents_every_flag_and_default(capsys):
    with pytest.raises(SystemExit):
        invert.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(invert.Settings):
        if field.default is not None:
            assert f"(default: {field.default})" in text, field.name
    assert "sgd with --objective seed, adam with --objective paper" in text and "SUPPRESS" not in text
    assert "1e-05 with --objective seed, 1 with --objective paper" in text
    assert "the paper's first stage, 6/7 of --epochs" in text and "auto with --objective paper" in text
    assert "100 for seed + sgd + pixel" in text and "auto for paper + adam + fft" in text


def test_objective_seed_alone_is_the_three_flag_spelling(photo, tmp_path, cli):
    outputs = []
    for index, flags in enumerate([["--objective", "seed"],
                                   ["--objective", "seed", "--optimizer", "sgd", "--param", "pixel"]]):
        output = tmp_path / f"{index}.png"
        assert cli("--image_path", photo, *FAST, *flags, "--output", output)[0] == 0
        outputs.append(output.read_bytes())
    assert outputs[0] == outputs[1]
    record = json.loads((tmp_path / "0.json").read_text())
    assert record["settings"]["optimizer"] == "sgd" and record["settings"]["lr"] == 100.0


# ---------------------------------------------------------------- the method


@pytest.mark.parametrize("objective", invert.OBJECTIVES)
@pytest.mark.parametrize("optimizer", invert.OPTIMIZERS)
@pytest.mark.parametrize("param", invert.PARAMS)
def test_every_objective_optimizer_and_param_reduces_its_loss(objective, optimizer, param, tiny):
    # the default rates suit VGG16-BN; SGD needs smaller ones on this tiny network
    lr = {("paper", "sgd", "pixel"): 0.3, ("paper", "sgd", "fft"): 0.001,
          ("seed", "sgd", "pixel"): 1.0}.get((objective, optimizer, param))
    history = []
    result = invert.invert(tiny, tiny[3], torch.randn(1, 3, 16, 16), objective=objective,
                           optimizer=optimizer, param=param, epochs=40, lr=lr,
                           callback=lambda step, losses, images: history.append(sum(losses.values()).item()))
    assert len(history) == 40 and result.iterations == [40] and result.stopped == ["epochs"]
    final = sum(result.losses[0][name] for name in ("rec_loss", "alpha_loss", "tv_loss"))
    assert final < 0.5 * history[0], (history[0], final)
    assert result.losses[0]["feature_error"] < 0.5
    assert result.settings.lr == (lr or invert.DEFAULT_LRS[objective, optimizer, param])


def test_a_results_losses_are_the_objectives_terms_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval().requires_grad_(False)
    reference = torch.randn(1, 3, 8, 8)
    scale = 255 * torch.tensor(invert.IMAGENET_STD).view(1, 3, 1, 1)
    for objective in invert.OBJECTIVES:
        result = invert.invert(model, model[0], reference, objective=objective, param="pixel", C=3.0, epochs=3,
                               precision="fp32")
        image, losses = result.images, result.losses[0]
        features, target = model(image), model(reference)
        assert losses["rec_loss"] == pytest.approx(3 * (features - target).square().sum() / target.square().sum())
        dx, dy = image[..., :, 1:] - image[..., :, :-1], image[..., 1:, :] - image[..., :-1, :]
        if objective == "seed":  # 1e-5 sum |x|^6 and 1e-5 sum dx^2 + dy^2
            alpha, tv = 1e-5 * image.abs().pow(6).sum(), 1e-5 * (dx.square().sum() + dy.square().sum())
        else:  # in 0-255 units, each normalised by the area and a typical pixel, B = 80 and V = B / 6.5
            pixels = image * scale
            alpha = pixels.square().sum(1).pow(3).sum() / (64 * 80 ** 6)
            tv = ((dx * scale).square().sum() + (dy * scale).square().sum()) / (64 * (80 / 6.5) ** 2)
        assert (losses["alpha_loss"], losses["tv_loss"]) == (pytest.approx(alpha.item(), rel=1e-4),
                                                             pytest.approx(tv.item(), rel=1e-4)), objective


def test_priors_match_their_definitions():
    image = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]])
    assert invert.alpha_prior(image, 6.0).item() == pytest.approx(1 + 64 + 0.5 ** 6 + 729)
    assert torch.isfinite(invert.alpha_prior(torch.tensor([[-0.5, 0.5]]), 2.5)).all()  # |x| before the power
    # dx: (-3) at (0,1) and 2.5 at (1,1); dy: -0.5 at (1,0) and 5 at (1,1)
    assert invert.tv_prior(image, 2.0).item() == pytest.approx(9 + 0.25 + 2.5 ** 2 + 25)
    assert invert.tv_prior(image, 1.0).item() == pytest.approx(3 + 0.5 + (2.5 ** 2 + 25) ** 0.5)
    gradient_image = image.clone().requires_grad_()
    invert.tv_prior(gradient_image, 1.0).backward()  # beta < 2 must not give NaN gradients
    assert torch.isfinite(gradient_image.grad).all()


def test_the_papers_priors_have_autograds_gradient():
    pixels = (60 * torch.randn(2, 3, 9, 7)).requires_grad_()
    alpha, tv = invert.PaperPriors.apply(pixels, 6.0, 0.5, 4.0)  # with weights, as the tool calls it
    (2 * alpha + 3 * tv).sum().backward()
    written, pixels.grad = pixels.grad, None
    expected_alpha, expected_tv = invert.pixel_norm_prior(pixels, 6.0) * 0.5, invert.tv_prior(pixels, 2.0) * 4
    (2 * expected_alpha + 3 * expected_tv).sum().backward()
    assert torch.allclose(alpha, expected_alpha, rtol=1e-5) and torch.allclose(tv, expected_tv, rtol=1e-5)
    assert torch.allclose(written, pixels.grad, rtol=1e-4, atol=1e-3 * pixels.grad.abs().max().item())
    smooth = 100 + 0.01 * torch.randn(1, 3, 40, 40).cumsum(-1).cumsum(-2)  # <x, Lx> cancels most here
    assert invert.PaperPriors.apply(smooth, 6.0)[1].item() == pytest.approx(invert.tv_prior(smooth, 2.0).item(),
                                                                          rel=1e-3)


def test_fourier_images_use_fast_fft_lengths():
    assert [invert.fft_size(length) for length in (224, 227, 64, 17, 1)] == [224, 240, 64, 18, 1]
    image = invert.FourierImage((17, 15), torch.device("cpu"), "paper")
    assert image.render(image.initial(torch.Generator().manual_seed(0)))[0].shape == (1, 3, 17, 15)


def test_jitter_keeps_the_image_shape_and_auto_settings_follow_the_stride(tiny):
    reference = torch.randn(1, 3, 17, 15)
    result = invert.invert(tiny, tiny[3], reference, jitter=3, epochs=6)
    assert result.images.shape == reference.shape and result.layer_settings["jitter"] == 3
    strided = nn.Sequential(nn.Conv2d(3, 4, 16, stride=16)).eval().requires_grad_(False)
    result = invert.invert(strided, strided[0], torch.randn(1, 3, 64, 64), jitter="auto", epochs=2)
    assert result.layer_settings["jitter"] == 3 and result.settings.jitter == "auto"  # 4 offsets: 0 to 3
    assert result.layer_settings["C"] == invert.PAPER_C * (4 / 16) ** 2 and result.settings.C == "auto"
    assert result.layer_settings["lr"] == invert.AUTO_LR / 2 and result.settings.lr == "auto"
    shallow = invert.invert(tiny, tiny[3], torch.randn(1, 3, 16, 16), epochs=2).layer_settings
    assert (shallow["C"], shallow["surrogate"], shallow["lr"]) == (invert.PAPER_C, True, invert.AUTO_LR)
    assert result.images.shape == (1, 3, 64, 64)
    assert invert.invert(strided, strided[0], torch.randn(1, 3, 64, 64), epochs=2).layer_settings["jitter"] == 0
    # a non-square input: the stride is still 16 (a 4x2 output of 64x32), not 64 / 2
    tall = invert.invert(strided, strided[0], torch.randn(1, 3, 64, 32), epochs=2).layer_settings
    assert tall["C"] == invert.PAPER_C * (4 / 16) ** 2


def test_jitter_stops_at_the_first_decay(tiny):
    latest, shifted = [], {}
    tiny.register_forward_pre_hook(lambda module, inputs: latest.append(inputs[0].detach().clone()))

    def compare(step, losses, images):  # what the network saw this iteration, against the middle crop
        shifted[step] = not torch.allclose(latest[-1], images(), atol=1e-4)

    invert.invert(tiny, tiny[3], torch.randn(1, 3, 16, 16), objective="paper", param="pixel", jitter=2,
                  epochs=30, decay_epochs=20, lr=1e-9, optimizer="sgd", callback=compare)  # the image barely moves
    assert sum(shifted[step] for step in range(1, 21)) >= 10
    assert not any(shifted[step] for step in range(21, 31))


def test_box_constraint_holds_after_every_step(tiny):
    norms = []

    def record(step, losses, images):
        norms.append(invert.to_paper_units(images()).square().sum(dim=1).sqrt().max().item())

    for param in invert.PARAMS:
        norms.clear()
        result = invert.invert(tiny, tiny[3], 5 * torch.randn(1, 3, 16, 16), objective="paper", param=param,
                               optimizer="sgd", lr=50.0 if param == "pixel" else 5.0, epochs=15, callback=record)
        assert len(norms) == 15 and max(norms) <= 2 * invert.PAPER_B * (1 + 1e-5)
        assert max(norms) > 1.9 * invert.PAPER_B, param  # the constraint was active, not idle
        final = invert.to_paper_units(result.images).square().sum(dim=1).sqrt().max()
        assert final <= 2 * invert.PAPER_B * (1 + 1e-5)


def test_only_the_image_is_optimised_and_the_result_is_a_picture(tiny):
    before = [parameter.clone() for parameter in tiny.parameters()]
    reference = torch.randn(1, 3, 20, 20)
    result = invert.invert(tiny, tiny[1], reference, **SEED, epochs=3)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.parameters()))
    assert not any(parameter.requires_grad for parameter in tiny.parameters())
    assert result.images.shape == reference.shape and not result.images.requires_grad
    picture = invert.deprocess(result.images * 100)  # far outside [0, 1]: must be clamped
    assert picture.size == (20, 20) and picture.mode == "RGB"
    low, high = zip(*picture.getextrema())
    assert min(low) == 0 and max(high) == 255


def test_a_plateau_ends_the_run_after_a_last_stage_at_the_lower_rate(tiny):
    reference = torch.randn(1, 3, 16, 16)
    # a fall of less than 99 % over a window counts as a plateau: the first comparison ends the stage
    result = invert.invert(tiny, tiny[3], reference, objective="paper", epochs=500, plateau=0.99)
    window = invert.PLATEAU_WINDOW
    assert result.stopped == ["plateau"] and result.iterations == [2 * window + math.ceil(2 * window / 6)]
    exact = invert.invert(tiny, tiny[3], reference, objective="paper", epochs=37, plateau=0.0)
    assert exact.stopped == ["epochs"] and exact.iterations == [37]


def test_the_last_stage_runs_at_decay_factor_times_the_rate_whenever_it_starts():
    # SGD without momentum on ||x - t||^2 / ||t||^2: each step shrinks x - t by 1 - 2 lr / ||t||^2
    model, reference = identity_network(), torch.randn(1, 3, 8, 8)
    lr = 0.005 * reference.square().sum().item()  # a factor of 0.99 per step: the loss falls slowly
    errors = []
    result = invert.invert(model, model, reference, objective="seed", optimizer="sgd", momentum=0.0,
                           lambda_alpha=0.0, lambda_tv=0.0, lr=lr, plateau=0.5, epochs=100, decay_epochs=22,
                           callback=lambda step, losses, images: errors.append((images() - reference).norm()))
    # the plateau ends the first stage at its first comparison, iteration 20; the last stage is 4 long
    assert result.stopped == ["plateau"] and result.iterations == [24]
    shrink = [(after / before).item() for before, after in zip(errors, errors[1:])]  # iterations 2 to 24
    assert shrink[:19] == pytest.approx([0.99] * 19, abs=1e-4)
    # all four at 0.1 times the rate, although --decay_epochs 22 falls inside the last stage
    assert shrink[19:] == pytest.approx([0.999] * 4, abs=1e-5)


def test_ctrl_c_returns_the_images_so_far(tiny):
    def interrupt(step, losses, images):
        if step == 3:
            raise KeyboardInterrupt

    result = invert.invert(tiny, tiny[3], torch.randn(1, 3, 16, 16), **SEED, epochs=50, callback=interrupt)
    assert result.stopped == ["interrupted"] and result.iterations == [3] and result.images.shape == (1, 3, 16, 16)


def test_divergence_blames_the_learning_rate_only_when_it_is_the_cause(tiny):
    result = invert.invert(tiny, tiny[3], torch.randn(1, 3, 16, 16), **{**SEED, "lr": 1e30}, epochs=20)
    assert result.stopped == ["diverged"] and result.iterations[0] < 20
    assert torch.isfinite(result.images).all() and math.isfinite(result.losses[0]["feature_error"])
    # finite for the photo, infinite for anything optimised: wrong before the first step
    explodes = nn.Sequential(tiny, nn.Identity()).eval()
    explodes[1].register_forward_hook(lambda module, inputs, output: output * float("inf")
                                      if torch.is_grad_enabled() else None)
    with pytest.raises(invert.UsageError, match="before any step, so --lr is not the cause"):
        invert.invert(explodes, explodes[1], torch.randn(1, 3, 16, 16), epochs=5)
    broken = nn.Sequential(nn.Conv2d(3, 4, 1)).eval().requires_grad_(False)
    nn.init.constant_(broken[0].weight, float("nan"))
    with pytest.raises(invert.UsageError, match="not finite .* --lr is not the cause"):
        invert.invert(broken, broken[0], torch.randn(1, 3, 8, 8), epochs=2)


class Bomb(nn.Module):
    """Passes its input on, except that from optimisation step `after` + 1 its second row is infinite."""

    def __init__(self, after: int = 5):
        super().__init__()
        self.steps, self.after = 0, after

    def forward(self, x):
        if not torch.is_grad_enabled():
            return x
        self.steps += 1
        return x * torch.tensor([1.0] + [math.inf if self.steps > self.after else 1.0] * (len(x) - 1)).view(
            -1, 1, 1, 1)


def test_a_row_that_diverges_leaves_its_batch_mates_as_they_would_be_alone(tiny):
    model = nn.Sequential(tiny, Bomb()).eval()
    references = torch.randn(2, 3, 16, 16)
    together = invert.invert(model, model[1], references, epochs=12)
    # the second row's loss is infinite at iteration 6: it is returned as it was after iteration 4, its last
    # image with a finite loss (at iteration 5)
    assert together.stopped == ["epochs", "diverged"] and together.iterations == [12, 4]
    assert torch.isfinite(together.images).all()
    lonely = nn.Sequential(tiny, Bomb()).eval()
    alone = invert.invert(lonely, lonely[1], references[:1], epochs=12)
    assert torch.allclose(together.images[0], alone.images[0], atol=1e-5)


def test_a_row_that_diverges_where_it_also_stalls_is_diverged(tiny):
    # the plateau rule looks at iteration 20 too, where the second row's loss is first infinite
    model = nn.Sequential(tiny, Bomb(after=19)).eval()
    result = invert.invert(model, model[1], torch.randn(2, 3, 16, 16), epochs=40, plateau=0.99, lr=1e-9)
    assert result.stopped[1] == "diverged" and result.iterations[1] == 18


def test_divergence_at_the_final_evaluation_returns_the_last_finite_images(photo, tmp_path, cli):
    # the one update, after the one check, makes the loss infinite: only the final evaluation sees it
    output = tmp_path / "x.png"
    code, _, err = cli("--image_path", photo, *FAST, "--objective", "seed", "--lr", "1e30", "--epochs", "1",
                       "--output", output)
    assert code == 2 and "--lr 1e+30 is too large" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photo.png", "x.diverged.png", "x.json"]
    assert json.loads((tmp_path / "x.json").read_text())["status"] == "diverged"
    assert Image.open(tmp_path / "x.diverged.png").size == (64, 64)


def test_the_python_api_refuses_what_the_command_line_refuses(tiny):
    reference = torch.randn(2, 3, 16, 16)
    with pytest.raises(invert.UsageError, match="takes one layer, a module of the model: got a list"):
        invert.invert(tiny, [tiny[1], tiny[3]], reference, epochs=2)
    for keywords, flag in [({"momentum": 1.0}, "--momentum"), ({"alpha": 0.5}, "--alpha"),
                           ({"epochs": 2.5}, "--epochs"), ({"jitter": "big"}, "--jitter")]:
        with pytest.raises(invert.UsageError, match=flag):
            invert.invert(tiny, tiny[1], reference[:1], **{"epochs": 2, **keywords})


def test_all_zero_target_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval().requires_grad_(False)
    nn.init.zeros_(model[0].weight)
    nn.init.constant_(model[0].bias, -1.0)
    with pytest.raises(invert.UsageError, match="all zero"):
        invert.invert(model, model[1], torch.randn(1, 3, 8, 8), epochs=2)


# ---------------------------------------------------------------- surrogate gradients


def pooled_network() -> nn.Module:
    """Convolutions, in-place ReLUs and max-pools to a layer of stride 4, with fixed random weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True))
    return model.eval().requires_grad_(False)


# one plain step of SGD on the feature term alone: the image after it is the start less the gradient
ONE_STEP = dict(objective="seed", param="pixel", optimizer="sgd", momentum=0.0, epochs=1, lambda_alpha=0.0,
                lambda_tv=0.0, precision="fp32")  # exact values: fp32 on every CPU


def one_step(model, layers, reference, **keywords) -> tuple:
    """(The start, the gradient, each row's losses at step 1) of one step at rates 1 and 2."""
    images, losses = [], []
    for lr in (1.0, 2.0):
        result = invert.invert(model, layers, reference, **ONE_STEP, lr=lr, **keywords,
                               callback=lambda step, terms, _: losses.append(terms["rec_loss"]))
        images.append(result.images)
    return 2 * images[0] - images[1], images[0] - images[1], losses[0]


@pytest.mark.parametrize("name", ["pooled", "pool layer", "alexnet", "resnet18", "no pooling", "dense"])
def test_surrogate_gradients_keep_every_forward_value_and_each_row_gets_what_it_gets_alone(name, tiny):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    made = {"pooled": pooled_network(), "pool layer": pooled_network(), "no pooling": tiny,
            "dense": dense.eval().requires_grad_(False)}
    model = made.get(name) or torchvision.models.get_model(name).eval().requires_grad_(False)
    layer = {"pooled": lambda: model[7], "pool layer": lambda: model[5],  # a max-pool as the layer
             "alexnet": lambda: model.features[9],
             "resnet18": lambda: model.layer3[1].relu,  # a ReLU used twice a block
             "no pooling": lambda: model[3], "dense": lambda: model[4]}[name]()  # 2-D outputs
    reference = torch.randn(2, 3, 64, 64)
    inplace = [module.inplace for module in model.modules() if isinstance(module, nn.ReLU)]
    true, plain = one_step(model, layer, reference, surrogate="off")[1:]
    surrogate, losses = one_step(model, layer, reference, surrogate="on")[1:]
    assert torch.equal(losses, plain)  # the forward unchanged
    assert not torch.allclose(surrogate[0], true[0])  # the gradient passes a ReLU or pool below the layer
    for row in range(2):  # each row of the batch gets what it gets alone
        alone = one_step(model, layer, reference[row:row + 1], surrogate="on")[1][0]
        assert torch.allclose(surrogate[row], alone, rtol=1e-4, atol=1e-4 * alone.abs().max().item()), row
    assert not any(module._forward_hooks for module in model.modules())  # nothing left on the model
    assert inplace == [module.inplace for module in model.modules() if isinstance(module, nn.ReLU)]


def test_surrogate_gradients_are_the_leaky_relus_and_the_average_pools():
    model = nn.Sequential(nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Identity()).eval()
    smooth = nn.Sequential(nn.LeakyReLU(invert.SURROGATE_LEAK), nn.AvgPool2d(2))
    torch.manual_seed(0)
    reference = torch.randn(1, 3, 8, 8)
    start, gradient, _ = one_step(model, model[2], reference, surrogate="on")
    start.requires_grad_()
    target = model(reference.clone())  # its in-place ReLU would change the reference
    # the feature term's gradient at the true forward values, carried back through the smooth network
    weights = 2 * (model(start.detach().clone()) - target) / target.square().sum()
    expected, = torch.autograd.grad((smooth(start) * weights).sum(), start)
    true, = torch.autograd.grad(((model(start.clone()) - target).square().sum() / target.square().sum()), start)
    assert torch.allclose(gradient, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert not torch.allclose(gradient, true, rtol=1e-2)
    own = [one_step(model, model[0], reference, surrogate=on)[1] for on in ("on", "off")]
    assert torch.equal(*own)  # a layer's own ReLU gives the true gradient
    # and a layer's own max-pool its true gradient, below a ReLU that leaks
    start, gradient, _ = one_step(model, model[1], reference, surrogate="on")
    relu = nn.functional.relu(start).requires_grad_()
    target = model[1](nn.functional.relu(reference))
    pooled, = torch.autograd.grad((model[1](relu) - target).square().sum() / target.square().sum(), relu)
    expected = torch.where(start > 0, pooled, invert.SURROGATE_LEAK * pooled)
    assert torch.allclose(gradient, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_the_first_stage_takes_surrogate_gradients_and_the_last_the_true_ones():
    model = pooled_network()
    reference = torch.randn(1, 3, 32, 32)
    seen = []  # per iteration: the image the network saw, and the gradient that reached it

    def watch(module, inputs):
        if torch.is_grad_enabled() and inputs[0].requires_grad:  # the optimisation's forward passes
            seen.append([inputs[0].detach().clone(), None])
            inputs[0].register_hook(lambda gradient: seen[-1].__setitem__(1, gradient.clone()))

    handle = model.register_forward_pre_hook(watch)
    # no priors, so that the network's input gets the feature term's gradient alone
    result = invert.invert(model, model[7], reference, param="pixel", epochs=12, decay_epochs=8, plateau=0.0,
                           lambda_alpha=0.0, lambda_tv=0.0, precision="fp32")  # exact values: fp32 on every CPU
    handle.remove()
    assert result.layer_settings["surrogate"] and len(seen) == 12
    target = model(reference)
    for step, (image, gradient) in enumerate(seen, start=1):
        image.requires_grad_()
        error = result.layer_settings["C"] * (model(image) - target).square().sum() / target.square().sum()
        true, = torch.autograd.grad(error, image)
        assert torch.allclose(gradient, true, rtol=1e-4, atol=1e-6 * true.abs().max().item()) == (step > 8), step


def test_surrogate_off_and_the_seed_objective_keep_the_true_gradients(photo, tmp_path, cli):
    pictures = []
    for flags in (["--surrogate", "off"], ["--objective", "seed"], ["--objective", "seed", "--surrogate", "off"]):
        code, _, err = cli("--image_path", photo, *FAST, *flags, "--output_dir", tmp_path / flags[-1])
        assert code == 0, err
        record = json.loads((tmp_path / flags[-1] / "photo_squeezenet1_1_features_3.json").read_text())
        assert record["settings"]["surrogate"] == "off" and not record["layer_settings"]["surrogate"]
        pictures.append((tmp_path / flags[-1] / "photo_squeezenet1_1_features_3.png").read_bytes())
    assert pictures[1] == pictures[2]  # the seed's method is the seed's, surrogate or not


# ---------------------------------------------------------------- layers


def test_both_layer_name_forms_resolve_to_the_same_module():
    alexnet = torchvision.models.alexnet()
    for underscored, dotted in [("features_4", "features.4"), ("classifier_4", "classifier.4")]:
        assert invert.resolve_layer(alexnet, underscored) is invert.resolve_layer(alexnet, dotted) \
            is alexnet.get_submodule(dotted)
    assert invert.resolve_layer(alexnet, "avgpool") is alexnet.avgpool
    resnet = torchvision.models.resnet18()
    assert invert.resolve_layer(resnet, "layer3.1.conv2") is invert.resolve_layer(resnet, "layer3_1_conv2") \
        is resnet.layer3[1].conv2
    model = nn.Sequential()
    model.add_module("Conv2d_1a", nn.Sequential(nn.Conv2d(3, 3, 1)))  # underscores inside a name
    assert invert.resolve_layer(model, "Conv2d_1a") is model.Conv2d_1a
    assert invert.resolve_layer(model, "Conv2d_1a_0") is model.Conv2d_1a[0]
    with pytest.raises(invert.UsageError) as caught:
        invert.resolve_layer(alexnet, "features_99")
    assert "features_4" in str(caught.value) and "classifier_6" in str(caught.value)


def full_forward_activation(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output in a plain run of the whole model, classifier included."""
    recorded = []
    handle = layer.register_forward_hook(lambda module, inputs, output: recorded.append(output.clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return recorded[0]


@pytest.mark.parametrize("name", ["alexnet", "resnet18"])
def test_truncated_forward_matches_the_full_models_activations(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval().requires_grad_(False)
    modules = ([model.features[index] for index in (3, 0, 8)] if name == "alexnet"
               else [model.layer1[0].conv1, model.layer2, model.layer3[1].relu])
    x = torch.randn(2, 3, 64, 64)
    for module in modules:
        expected = full_forward_activation(model, module, x)
        with torch.no_grad():
            output = invert.layer_output(model, module, x)
        # alexnet's features_0 and features_3 are convolutions followed by in-place ReLUs
        assert output.shape == expected.shape and torch.allclose(output, expected, atol=1e-6)
        assert name == "resnet18" or output.min() < 0
    assert not any(module._forward_hooks for module in model.modules())  # the hooks are removed again


class Refuses(nn.Module):
    """A layer that fails whenever it runs."""

    def forward(self, x):
        raise RuntimeError("this layer must never run")


def test_nothing_after_the_chosen_layer_runs(tiny):
    model = nn.Sequential(*tiny, Refuses()).eval()  # e.g. a classifier head that refuses this input size
    result = invert.invert(model, model[3], torch.randn(2, 3, 16, 16), epochs=3)
    assert result.iterations == [3, 3] and torch.isfinite(result.images).all()


def test_list_layers(cli):
    code, out, _ = cli("--model", "alexnet", "--weights", "none", "--list_layers")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["features_4"][1:] == ["features.4", "ReLU", "192x27x27"]
    assert rows["avgpool"][-1] == "256x6x6" and rows["classifier_6"][-1] == "1000"
    assert len(rows) == len([name for name, _ in torchvision.models.alexnet().named_modules() if name])


@pytest.mark.slow
def test_list_layers_says_which_layers_do_not_run(cli):
    code, out, _ = cli("--model", "googlenet", "--weights", "none", "--list_layers")
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert code == 0 and rows["aux1"].endswith("not run in eval mode")  # googlenet's auxiliary heads
    assert rows["inception4a"].split()[-1] == "512x14x14"
    code, out, _ = cli("--model", "vit_b_32", "--weights", "none", "--list_layers")  # ViT asserts 224
    assert code == 0 and all(line.endswith("not reached: the model fails at --input_size 227")
                             for line in out.splitlines())


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_every_image_mode_becomes_rgb(mode, tmp_path):
    image = Image.new(mode, (20, 20))
    bright = {"L": 255, "LA": (255, 255), "RGBA": (255, 0, 0, 255), "CMYK": (0, 255, 255, 0),
              "I;16": 65535, "P": 1}[mode]
    image.paste(bright, (0, 0, 10, 20))
    save = {}
    if mode == "P":
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        save["transparency"] = 0
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path, **save)
    loaded = invert.load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 20)
    assert max(loaded.getpixel((2, 10))) >= 250  # the bright half stays bright: 16-bit is rescaled
    if mode in ("LA", "P"):
        assert loaded.getpixel((15, 10)) == (255, 255, 255)  # transparent pixels are laid on white


def test_pre_and_deprocessing_match_the_seeds_transforms_and_the_default_photo_ships():
    # the seed's own transform and detransform, as its design writes them
    mu, sigma = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    transforms = torchvision.transforms
    transform = transforms.Compose([transforms.Resize(size=227), transforms.CenterCrop(size=227),
                                    transforms.ToTensor(), transforms.Normalize(mu, sigma)])
    detransform = transforms.Compose([
        transforms.Normalize(mean=[-m / s for m, s in zip(mu, sigma)], std=[1 / s for s in sigma]),
        transforms.Lambda(lambda tensor: torch.clamp(tensor, 0, 1)), transforms.ToPILImage()])
    image = invert.load_image(invert.DEFAULT_IMAGE)
    tensor = invert.preprocess(image, 227)
    assert torch.equal(tensor[0], transform(image))
    ours, theirs = (torchvision.transforms.functional.pil_to_tensor(picture).int()
                    for picture in (invert.deprocess(tensor * 1.5), detransform(tensor[0] * 1.5)))
    assert (ours - theirs).abs().max() <= 1  # the same up to float rounding, clamped alike
    assert invert.parse_args([]).image_path is None
    assert invert.load_image(invert.DEFAULT_IMAGE).size[0] >= 227


# ---------------------------------------------------------------- the command line


def test_end_to_end_writes_png_and_json(photo, tmp_path, cli):
    out_dir = tmp_path / "new" / "outputs"
    code, out, err = cli("--image_path", photo, *FAST, "--objective", "seed", "--lr", "3", "--output_dir", out_dir)
    assert code == 0, err
    png = out_dir / "photo_squeezenet1_1_features_3.png"
    assert Image.open(png).size == (64, 64) and Image.open(png).mode == "RGB"
    record = json.loads(png.with_suffix(".json").read_text())
    # the record describes its own row: its photo (path and content), model, weights and input size
    assert {key: record[key] for key in ("status", "image_sha256", "model", "weights", "weights_id", "input_size",
                                         "png")} == {"status": "done", "image_sha256": hashlib.sha256(
                                             photo.read_bytes()).hexdigest(), "model": "squeezenet1_1",
                                             "weights": "none", "weights_id": "none", "input_size": 64,
                                             "png": png.name}
    assert record["settings"] == dataclasses.asdict(invert.resolve(
        invert.Settings(objective="seed", lr=3.0, epochs=5), torch.device("cpu")))
    assert record["layer_name"] == "features_3" and record["image_path"] == str(photo)
    assert record["layer_settings"] == {"jitter": 0, "C": 1.0, "plateau": 0.0, "surrogate": False, "lr": 3.0,
                                        "decay_epochs": 200}
    assert record["iterations"] == 5 and record["stopped"] == "epochs"
    # the command line is a thin shell over invert(): the same settings give the same result
    torch.manual_seed(2023)  # as the command line does, before it builds the random network
    model = invert.load_model("squeezenet1_1", "none")
    result = invert.invert(model, model.features[3], invert.preprocess(invert.load_image(photo), 64),
                           invert.settings_from_args(invert.parse_args(["--objective", "seed", "--lr", "3",
                                                                        "--epochs", "5"])))
    assert record["feature_error"] == result.losses[0]["feature_error"] > 0
    assert record["rec_loss"] == pytest.approx(record["settings"]["C"] * record["feature_error"])
    assert record["ms_per_iteration"] == pytest.approx(1000 * record["seconds"] / 5, abs=0.05)
    assert (record["device"], record["torch_version"], record["torchvision_version"]) == \
           ("cpu", torch.__version__, torchvision.__version__)
    assert sorted(path.name for path in out_dir.iterdir()) == ["index.csv", "index.csv.lock",
                                                               png.with_suffix(".json").name, png.name]
    # PyTorch's spelling of the layer names the same file
    assert cli("--image_path", photo, *FAST, "--layer_name", "features.3", "--output_dir", tmp_path / "dotted")[0] == 0
    assert [path.name for path in (tmp_path / "dotted").glob("*.png")] == [png.name]


def test_same_seed_gives_identical_png(photo, tmp_path, cli):
    outputs = []
    for seed, name in [(7, "a.png"), (7, "b.png"), (8, "c.png")]:
        assert cli("--image_path", photo, *FAST, "--seed", seed, "--output", tmp_path / name)[0] == 0
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1] != outputs[2]


def test_progress_lines_and_quiet(photo, tmp_path, cli):
    args = ["--image_path", photo, *[a for a in FAST if a != "--quiet"], "--output_dir", tmp_path]
    code, out, _ = cli(*args, "--stdout_epochs", "2")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("iteration")]
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"]
    assert all("rec_loss" in line and "alpha_loss" in line and "tv_loss" in line for line in lines)
    code, out, err = cli(*args, "--quiet")
    assert code == 0 and out == "" and "it/s" not in err


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs"), (["--epochs", "ten"], "--epochs"), (["--input_size", "0"], "--input_size"),
    (["--stdout_epochs", "0"], "--stdout_epochs"), (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--decay_epochs", "0"], "--decay_epochs"), (["--lambda_tv", "-1"], "--lambda_tv"),
    (["--jitter", "-2"], "--jitter"), (["--optimizer", "adagrad"], "--optimizer"),
    (["--model", "alexnt"], "alexnet"), (["--model", "vgg16_bm"], "vgg16_bn"),
    (["--layer_name", "features_99"], "features_3"),
    (["--weights", "IMAGENET9K"], "IMAGENET1K_V1"), (["--weights", "missing.pth"], "no such file"),
    (["--device", "banana"], "--device"),
    (["--output", "picture.jpg"], ".png"), (["--precision", "fp16"], "CUDA"),
    (["--layer_name", "features_3", "features_6", "--output", "x.png"], "--output_dir"),
    (["--model", "vit_b_32", "--layer_name", "encoder"], "--input_size"),  # ViT asserts 224x224
    # values torch or the method cannot take are refused by the flag's own type
    (["--momentum", "1"], "--momentum"), (["--optimizer", "sgd", "--momentum", "1.5"], "--momentum"),
    (["--alpha", "0.5"], "--alpha"), (["--alpha", "40"], "--alpha"), (["--beta", "13"], "--beta"),
    (["--decay_factor", "2"], "--decay_factor"), (["--plateau", "1"], "--plateau"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 64)], "--seed"), (["--C", "1e35"], "--C"),
    (["--lambda_alpha", "inf"], "--lambda_alpha"), (["--jitter", "1.5"], "--jitter"),
    # allocations that grow with a setting are estimated before they are made
    (["--jitter", "100000"], "GiB"), (["--save_every", "1", "--epochs", "100000000"], "--save_every"),
])
def test_bad_settings_fail_cleanly(flags, message, photo, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "fp16" in flags and torch.cuda.is_available():
        pytest.skip("this machine can run it")
    code, _, err = cli("--image_path", photo, *FAST, *flags)
    assert_clean_failure(code, err, tmp_path / "outputs")
    assert message in err
    assert list(tmp_path.rglob("*.png")) == [photo]


@pytest.mark.parametrize("blocked", ["png", "frames", "gif", "montage"])
def test_every_output_is_checked_before_the_work(blocked, photo, tmp_path, cli):
    out = tmp_path / "out"
    stem = "photo_squeezenet1_1_features_3"
    target = {"png": out / f"{stem}.png", "frames": out / f"{stem}_frames", "gif": out / f"{stem}.gif",
              "montage": out / "photo_squeezenet1_1_montage.png"}[blocked]
    out.mkdir()
    if blocked == "frames":
        target.touch()  # a file where the frames folder goes
    else:
        target.mkdir()  # a folder where a file goes
    layers = ["features_3", "features_6"] if blocked == "montage" else ["features_3"]
    code, _, err = cli("--image_path", photo, *FAST, "--layer_name", *layers, "--save_every", "2",
                       "--epochs", "1000", "--output_dir", out)  # would take minutes if it ran
    assert code == 2 and f"cannot write {target}" in err
    assert sorted(out.iterdir()) == [target]  # nothing else was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_fails_cleanly_and_auto_picks_what_is_there(photo, tmp_path, cli):
    code, _, err = cli("--image_path", photo, *FAST, "--device", "cuda", "--output_dir", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out")
    assert "CUDA" in err
    expected = "mps" if torch.backends.mps.is_available() else "cpu"
    assert invert.pick_device("auto").type == expected


# ---------------------------------------------------------------- weights


def block_network(monkeypatch):
    """Make every name lookup and connection fail, as on a machine with no network."""
    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_download_failure_says_what_to_do(photo, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    block_network(monkeypatch)
    code, _, err = cli("--image_path", photo, "--output_dir", tmp_path / "out", "--quiet")  # alexnet, DEFAULT
    assert_clean_failure(code, err, tmp_path / "out")
    message = err.strip().splitlines()[-1]
    assert "alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "--weights PATH" in message and "--weights none" in message


def test_weights_download_once_into_torch_home_and_then_work_offline(photo, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    downloads = []

    def fake_download(url, destination, hash_prefix=None, progress=True):
        downloads.append((url, hash_prefix))
        torch.save(torchvision.models.squeezenet1_1().state_dict(), destination)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    args = ["--image_path", photo, *FAST, "--weights", "DEFAULT", "--output_dir", tmp_path / "out"]
    code, _, err = cli(*args)
    assert code == 0, err
    block_network(monkeypatch)
    code, _, err = cli(*args)
    assert code == 0 and "warning" not in err, err
    assert downloads == [(weights.url, "b8a52dc0")]  # the second run loads the cached file
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / Path(weights.url).name).is_file()


def test_corrupt_cached_weights_fail_cleanly(photo, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    cached = cache / Path(torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url).name
    marker = tmp_path / "payload_ran"
    for damage in (b"half a file", pickle.dumps({"weight": Payload(str(marker))})):  # one would run code
        cached.write_bytes(damage)
        code, _, err = cli("--image_path", photo, *FAST, "--weights", "DEFAULT", "--output_dir", tmp_path / "out")
        assert_clean_failure(code, err, tmp_path / "out")
        assert "delete it to download again" in err and not marker.exists()


def test_a_state_dict_file_loads_frozen_and_random_weights_warn(photo, tmp_path, cli):
    torch.manual_seed(3)
    model = torchvision.models.squeezenet1_1()
    torch.save(model.state_dict(), tmp_path / "squeeze.pth")
    loaded = invert.load_model("squeezenet1_1", str(tmp_path / "squeeze.pth"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert not loaded.training and not any(parameter.requires_grad for parameter in loaded.parameters())
    code, _, err = cli("--image_path", photo, *FAST, "--output_dir", tmp_path)
    assert code == 0 and "warning: --weights none" in err


def test_unsound_weights_are_named_before_the_work(photo, tmp_path, cli):
    state = torchvision.models.squeezenet1_1().state_dict()
    state["features.0.weight"].fill_(float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    code, _, err = cli("--image_path", photo, *FAST, "--weights", tmp_path / "nan.pth",
                       "--output_dir", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out")
    assert "not finite" in err and "--lr is not the cause" in err


# ---------------------------------------------------------------- batches of layers and images


@pytest.mark.parametrize("settings", [dict(SEED, jitter="auto", epochs=3), dict(optimizer="sgd", lr=0.003, epochs=3),
                                      dict(optimizer="sgd", lr=0.0003, epochs=40, plateau=0.05)],
                         ids=["seed-pixel-auto-jitter", "paper-fft", "paper-fft-plateau"])
def test_batched_rows_match_single_calls(settings):
    torch.manual_seed(0)
    model = torchvision.models.get_model("squeezenet1_1").eval().requires_grad_(False)
    # a layer of stride 2, where the plateau rule applies; else one of stride 8, where auto jitter is 1
    layer = model.features[1] if "plateau" in settings else model.features[6]
    references = torch.randn(3, 3, 64, 64) * torch.tensor([0.7, 1.0, 2.0]).view(-1, 1, 1, 1)
    # SGD, whose step is linear in the gradient: Adam's first step is lr * sign(gradient), which
    # turns a rounding difference in a near-zero gradient into a full step; and rates at which this
    # random network's optimisation is stable, since an unstable one amplifies rounding differences
    settings = {**settings, "precision": "fp32"}  # exact values: fp32 on every CPU
    together = invert.invert(model, layer, references, **settings)
    for row in range(len(references)):
        alone = invert.invert(model, layer, references[row:row + 1], **settings)
        # a batched convolution or FFT adds in another order: equal to float rounding, not bit for bit
        # (at most 3.5e-4, a fiftieth of a grey level, on an AMX CPU: tests/README.md)
        assert torch.allclose(together.images[row], alone.images[0], atol=1e-3)
        assert together.losses[row]["feature_error"] == pytest.approx(alone.losses[0]["feature_error"], rel=1e-5)
        # each row's plateau ends its own first stage, whatever its batch-mates do
        assert (together.iterations[row], together.stopped[row]) == (alone.iterations[0], alone.stopped[0])
    assert together.layer_settings == alone.layer_settings
    assert together.layer_settings["jitter"] == (1 if settings.get("jitter") == "auto" else 0)
    if "plateau" in settings:  # rows that stop at different iterations (40, 35, 24): the first ones held still
        assert len(set(together.iterations)) == 3 and together.stopped.count("plateau") == 2


def test_a_rows_arithmetic_does_not_depend_on_its_batch():
    # no convolution, whose kernels may add in a batch-dependent order: what is left is invert's own
    model = nn.Sequential(nn.Identity()).eval()
    torch.manual_seed(0)
    references = torch.randn(3, 3, 160, 160)
    together = invert.invert(model, model[0], references, epochs=30)
    for row in range(3):
        alone = invert.invert(model, model[0], references[row:row + 1], epochs=30)
        assert torch.equal(together.images[row], alone.images[0])  # bit for bit
        assert together.losses[row] == alone.losses[0]


def test_layers_and_images_combine_with_a_montage_per_image(photo, tmp_path, cli):
    second = tmp_path / "second.png"
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second)
    out = tmp_path / "out"
    code, _, err = cli("--image_path", photo, second, *FAST, "--layer_name", "features_3", "features.6",
                       "--output_dir", out)
    assert code == 0, err
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted([f"{stem}_squeezenet1_1_{layer}.{suffix}" for stem in ("photo", "second")
                            for layer in ("features_3", "features_6") for suffix in ("png", "json")]
                           + ["photo_squeezenet1_1_montage.png", "second_squeezenet1_1_montage.png", "index.csv",
                              "index.csv.lock"])
    grid = Image.open(out / "photo_squeezenet1_1_montage.png")
    # three tiles (the original and two layers) in a 2x2 grid of 64-pixel tiles with 16-pixel labels
    assert grid.size == (2 * 64, 2 * (64 + 16))
    tiles = [grid.crop((left, top, left + 64, top + 64)) for top in (0, 80) for left in (0, 64)]
    assert tiles[0].tobytes() == invert.crop(invert.load_image(photo), 64).tobytes()  # the photo as the network sees it
    assert tiles[1].tobytes() == Image.open(out / "photo_squeezenet1_1_features_3.png").tobytes()
    assert tiles[2].tobytes() == Image.open(out / "photo_squeezenet1_1_features_6.png").tobytes()
    assert tiles[3].getextrema() == ((255, 255),) * 3  # the unused cell stays blank


def test_save_every_writes_frames_and_a_gif(photo, tmp_path, cli):
    code, _, err = cli("--image_path", photo, *FAST, "--epochs", 7, "--save_every", 3, "--output_dir", tmp_path)
    assert code == 0, err
    frames = sorted((tmp_path / "photo_squeezenet1_1_features_3_frames").iterdir())
    assert [frame.name for frame in frames] == ["iteration_00003.png", "iteration_00006.png"]
    assert Image.open(frames[0]).size == (64, 64)
    gif = Image.open(tmp_path / "photo_squeezenet1_1_features_3.gif")
    assert gif.n_frames == 3 and gif.size == (64, 64)  # the two frames and the final image


def test_precision_bf16_runs_close_to_fp32_and_is_recorded(photo, tmp_path, cli):
    errors = {}
    for precision in ("bf16", "fp32"):
        code, _, err = cli("--image_path", photo, *FAST, "--epochs", "20", "--precision", precision,
                           "--output_dir", tmp_path / precision)
        assert code == 0, err
        record = json.loads((tmp_path / precision / "photo_squeezenet1_1_features_3.json").read_text())
        assert record["settings"]["precision"] == precision
        errors[precision] = record["feature_error"]
    # bf16 keeps 8 bits of mantissa: the same optimisation, within a few percent
    assert errors["bf16"] == pytest.approx(errors["fp32"], rel=0.1) and errors["bf16"] != errors["fp32"]


# ---------------------------------------------------------------- the core's contract


def test_a_callback_may_keep_the_losses_it_is_given(tiny):
    kept = []
    invert.invert(tiny, tiny[3], torch.randn(1, 3, 16, 16), epochs=4, precision="fp32",
                  callback=lambda step, losses, images: kept.append(losses))
    assert len({losses["rec_loss"].item() for losses in kept}) == 4  # each iteration's own, not the last


class Tokens(nn.Module):
    """A ViT's layout: (N, 1 + 16, 8), a class token and a 4x4 grid of 8-pixel patches."""

    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, images):
        grid = self.patches(images).flatten(2).transpose(1, 2)
        return torch.cat([grid.mean(1, keepdim=True), grid], 1)


class Permute(nn.Module):
    """Channels last, as Swin's feature maps are."""

    def forward(self, maps):
        return maps.permute(0, 2, 3, 1)


def test_token_and_upsampling_layers_take_their_settings_from_their_grid():
    torch.manual_seed(0)
    tokens = nn.Sequential(Tokens()).eval().requires_grad_(False)
    result = invert.invert(tokens, tokens[0], torch.randn(1, 3, 32, 32), epochs=2, jitter="auto")
    # stride 8, as a 4x4 grid over 32 pixels: C = 100 (4 / 8)^2 and the authors' jitter round(8 / 4) - 1
    assert (result.layer_settings["C"], result.layer_settings["jitter"]) == (25.0, 1)
    channels_last = nn.Sequential(nn.Conv2d(3, 96, 4, stride=4), Permute()).eval().requires_grad_(False)
    result = invert.invert(channels_last, channels_last[1], torch.randn(1, 3, 32, 32), epochs=2)
    assert result.layer_settings["C"] == 100.0  # (N, 8, 8, 96), as Swin's: stride 4
    upsampling = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Upsample(scale_factor=2)).eval()
    result = invert.invert(upsampling.requires_grad_(False), upsampling[1], torch.randn(1, 3, 16, 16), epochs=2)
    assert result.layer_settings["C"] == 100.0 and result.iterations == [2]  # stride 1, not 0


def test_a_results_settings_passed_back_follow_the_new_keywords(tiny):
    reference = torch.randn(1, 3, 16, 16)
    first = invert.invert(tiny, tiny[3], reference, epochs=7, plateau=0.0)
    assert first.layer_settings["decay_epochs"] == 6  # the paper's first stage: six sevenths
    again = invert.invert(tiny, tiny[3], reference, first.settings, epochs=14)
    assert again.layer_settings["decay_epochs"] == 12 and again.settings.plateau == 0.0


def test_a_model_that_changes_its_input_in_place_sees_a_copy():
    pictures = []
    for inplace in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.ReLU(inplace=inplace), nn.Conv2d(3, 4, 3)).eval().requires_grad_(False)
        reference = torch.randn(2, 3, 16, 16)
        kept = reference.clone()
        for keywords in (dict(param="fft"), dict(objective="seed", jitter=2)):
            result = invert.invert(model, model[1], reference, epochs=3, precision="fp32", **keywords)
            pictures.append((result.images, [losses["alpha_loss"] for losses in result.losses]))
        assert torch.equal(reference, kept)  # the caller's photos too
    for (images, priors), (plain_images, plain_priors) in zip(pictures[:2], pictures[2:]):
        assert torch.equal(images, plain_images) and priors == plain_priors


# ---------------------------------------------------------------- the other pre-images


def test_each_tasks_data_term_is_its_formula_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU()).eval().requires_grad_(False)
    reference = torch.randn(2, 3, 10, 10)
    target = model(reference)  # 2 x 6 x 8 x 8
    fast = dict(param="pixel", C=3.0, epochs=3, lambda_alpha=0.0, lambda_tv=0.0, precision="fp32")  # fp32: exact
    inside = torch.zeros_like(target)
    inside[:, 2:5, 3:5, 3:5] = 1  # --window 2 --channels 2:5: the central 2x2 of the 8x8 grid
    result = invert.invert(model, model[1], reference, window=2, channels="2:5", **fast)
    features = model(result.images)
    error = ((features - target) * inside).square().flatten(1).sum(1) / (target * inside).square().flatten(1).sum(1)
    assert [losses["feature_error"] for losses in result.losses] == pytest.approx(error.tolist(), rel=1e-4)
    assert [losses["rec_loss"] for losses in result.losses] == pytest.approx((3 * error).tolist(), rel=1e-4)

    result = invert.invert(model, model[1], reference, task="caricature", **fast)
    features = model(result.images)
    dot = (features * target).flatten(1).sum(1)
    assert [losses["projection"] for losses in result.losses] == pytest.approx(
        (dot / target.square().flatten(1).sum(1)).tolist(), rel=1e-4)
    assert [losses["rec_loss"] for losses in result.losses] == pytest.approx(
        (-3 * dot / target.square().flatten(1).sum(1)).tolist(), rel=1e-4)
    assert all(losses["projection"] > 1 for losses in result.losses)  # from the photo's 1, pushed further
    assert [losses["cosine"] for losses in result.losses] == pytest.approx(
        nn.functional.cosine_similarity(features.flatten(1), target.flatten(1)).tolist(), rel=1e-4)

    for scope in invert.UNIT_SCOPES:
        result = invert.invert(model, model[1], reference, task="maximize", units=[4, 1], unit_scope=scope, **fast)
        features, rms = model(result.images), target.square().flatten(1).mean(1).sqrt()
        for row, unit in enumerate([4, 1]):
            reached, photo = (maps[row, unit, 4, 4] if scope == "neuron" else maps[row, unit].mean()
                              for maps in (features, target))
            losses = result.losses[row]
            assert (losses["unit_activation"], losses["photo_activation"]) == (
                pytest.approx(reached.item(), rel=1e-4), pytest.approx(photo.item(), rel=1e-4)), (scope, row)
            assert losses["rec_loss"] == pytest.approx(-3 * reached.item() / rms[row].item(), rel=1e-4)
            assert losses["photo_max"] == pytest.approx(target[row, unit].max().item(), rel=1e-4)
            assert reached > 0  # driven up from noise


def test_a_window_over_tokens_counts_the_central_tokens_of_their_grid():
    torch.manual_seed(0)
    tokens = nn.Sequential(Tokens()).eval().requires_grad_(False)
    reference = torch.randn(1, 3, 32, 32)
    result = invert.invert(tokens, tokens[0], reference, window=2, param="pixel", epochs=2, precision="fp32")
    features, target = tokens(result.images), tokens(reference)
    central = [1 + row * 4 + column for row in (1, 2) for column in (1, 2)]  # the class token first
    error = (features - target)[:, central].square().sum() / target[:, central].square().sum()
    assert result.losses[0]["feature_error"] == pytest.approx(error.item(), rel=1e-4)


@pytest.mark.parametrize("param", invert.PARAMS)
def test_a_caricature_starts_from_its_photo(param):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval().requires_grad_(False)
    reference = 0.3 * torch.randn(1, 3, 12, 12)  # inside the paper's box, which would shrink it
    images = []
    result = invert.invert(model, model[1], reference, task="caricature", param=param, epochs=1, lr=1e-9,
                           jitter=2, precision="fp32", callback=lambda step, losses, current: images.append(current()))
    # the photo, and the faint noise of a fresh start, so that samples differ
    assert (images[0] - reference).abs().mean() < 0.02 and (result.images - reference).abs().mean() < 0.02
    noise = invert.invert(model, model[1], reference, param=param, epochs=1, lr=1e-9, precision="fp32")
    assert (noise.images - reference).abs().mean() > 0.1
    samples = invert.invert(model, model[1], reference, task="caricature", param=param, epochs=1, samples=2)
    assert not torch.equal(samples.images[0], samples.images[1])


def test_activations_from_elsewhere_are_inverted_as_the_photos_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval().requires_grad_(False)
    reference = torch.randn(2, 3, 10, 10)
    fast = dict(epochs=3, precision="fp32")
    direct = invert.invert(model, model[1], reference, **fast)
    saved = invert.invert(model, model[1], torch.zeros_like(reference), features=model(reference), **fast)
    assert torch.equal(direct.images, saved.images)
    with pytest.raises(invert.UsageError, match="features: the saved activations are 4x7x7, but the layer gives 4x8x8"):
        invert.invert(model, model[1], reference, features=torch.zeros(2, 4, 7, 7))


def test_the_tasks_refuse_what_they_cannot_take():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval().requires_grad_(False)
    nn.init.zeros_(model[0].weight[2:])  # channels 2 and 3 are always 0 after the ReLU
    nn.init.constant_(model[0].bias[2:], -1.0)
    reference = torch.randn(1, 3, 10, 10)
    for keywords, message in [(dict(task="maximize"), "maximize needs --units"), (dict(units=[1]), "needs --units"),
                              (dict(task="maximize", units=[4]), "has 4 units"),
                              (dict(task="maximize", units=[1], window=2), "--window and --channels are for"),
                              (dict(window=9), "--window 9: the layer's grid is 8x8"),
                              (dict(channels="2:9"), "--channels 2:9: the layer has 4 channels"),
                              (dict(channels="3:2"), "--channels must be all or A:B"),
                              (dict(task="draw"), "--task must be one of invert, caricature, maximize, got 'draw'"),
                              (dict(channels="2:4", window=2), "for this photo are all zero in --window/--channels")]:
        with pytest.raises(invert.UsageError, match=message):
            invert.invert(model, model[1], reference, epochs=1, **keywords)


def test_a_part_of_a_channels_last_map_is_the_same_part():
    torch.manual_seed(0)
    first = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU()).eval().requires_grad_(False)
    last = nn.Sequential(*first, Permute()).eval().requires_grad_(False)  # as Swin's maps are
    reference = torch.randn(1, 3, 12, 12)
    errors = [invert.invert(model, layer, reference, window=4, channels="1:3", epochs=3, surrogate="off",
                            precision="fp32")
              .losses[0]["feature_error"] for model, layer in ((first, first[1]), (last, last[2]))]
    assert errors[0] == pytest.approx(errors[1], rel=1e-5)


# ---------------------------------------------------------------- the newest pre-images, held to the promise


def test_the_python_api_refuses_a_setting_that_does_not_apply_as_the_command_line_does():
    numpy = pytest.importorskip("numpy")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval().requires_grad_(False)
    reference = torch.randn(1, 3, 10, 10)
    for keywords, flag in [(dict(unit_scope="channel"), "--unit_scope is for --task maximize, not invert"),
                           (dict(task="caricature", unit_scope="channel"), "--unit_scope is for --task maximize"),
                           (dict(task="caricature", features=model(reference)), "--features work with --task invert"),
                           (dict(task="maximize", units=[0], features=model(reference)), "--features work with"),
                           (dict(task="caricature", units=[0]), "--task maximize needs --units, and only it"),
                           (dict(task="maximize", units=[0], channels="0:2"), "--window and --channels are for"),
                           (dict(colour=1), "takes Settings and their fields as keywords: got {'colour'}"),
                           (dict(settings="paper"), "takes Settings .*: got 'paper'"),
                           (dict(precision=None), "--precision must be one of"), (dict(task=None), "--task must"),
                           (dict(epochs=None), "--epochs must be a positive integer, got None"),
                           (dict(epochs=True), "--epochs must be"), (dict(lr="0.1"), "--lr must be"),
                           (dict(lr=torch.tensor(True)), "--lr must be"), (dict(epochs=torch.tensor([2])), "--epochs"),
                           (dict(lr=10 ** 400), "--lr must be"), (dict(settings=0), "takes Settings"),
                           (dict(task=numpy.array(["invert"])), "--task must be one of")]:
        with pytest.raises(invert.UsageError, match=flag):
            invert.invert(model, model[1], reference, **{"epochs": 1, **keywords})


def test_values_a_user_naturally_passes_are_taken_and_anything_else_refused():
    numpy = pytest.importorskip("numpy")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval().requires_grad_(False)
    reference = torch.randn(2, 3, 10, 10)
    fast = dict(task="maximize", epochs=2, precision="fp32")
    expected = invert.invert(model, model[1], reference, units=[2, 2], **fast).images
    for units in (2, numpy.int64(2), torch.tensor(2), torch.tensor([0.0, 0.5, 9.0]).argmax(), [numpy.int32(2)] * 2,
                  torch.tensor([2, 2]), (2, torch.tensor(2)), numpy.array([2, 2]), (unit for unit in (2, 2))):
        assert torch.equal(invert.invert(model, model[1], reference, units=units, **fast).images, expected), units
    for units in (2.0, "2", "22", {2: 2}, [True, 2], [-1, 2], torch.tensor(2.0), [[2], [2]], None):
        with pytest.raises(invert.UsageError, match="--units"):
            invert.invert(model, model[1], reference, units=units, **fast)
    pair = invert.invert(model, model[1], reference, units=[2, 3], **fast).images
    for units in (range(2, 4), {2: 0, 3: 0}.keys()):  # any sequence of them
        assert torch.equal(invert.invert(model, model[1], reference, units=units, **fast).images, pair)
    numbers = dict(epochs=numpy.int64(2), lr=numpy.float32(0.5), samples=torch.tensor(1), C=torch.tensor(1.0))
    assert torch.equal(invert.invert(model, model[1], reference, units=2, **{**fast, **numbers}).images,
                       invert.invert(model, model[1], reference, units=2, **fast, lr=0.5).images)


def test_saved_features_are_untrusted_input_checked_before_any_work():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval().requires_grad_(False)
    reference = torch.randn(1, 3, 10, 10)
    fast = dict(epochs=3, precision="fp32")
    plain = invert.invert(model, model[1], reference, features=model(reference), **fast).images
    with torch.enable_grad():  # a graph, as from a forward pass outside no_grad, or requires_grad=True
        traced = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
        traced.load_state_dict(model.state_dict())
        carried = traced(reference.requires_grad_())
    assert carried.grad_fn is not None
    assert torch.equal(invert.invert(model, model[1], reference.detach(), features=carried, **fast).images, plain)
    finite = model(reference)
    with pytest.raises(invert.RowError) as caught:  # the row that is all zero, and only it
        invert.invert(model, model[1], torch.cat([reference, reference]), features=torch.cat([finite, 0 * finite]),
                      **fast)
    assert list(caught.value.reasons) == [1]
    for features, message in [
            ([[1.0]], "features holds a list, not a tensor"),
            (finite.long(), "features holds a torch.int64 tensor"), (finite.to_sparse(), "torch.sparse_coo"),
            (finite.to(torch.complex64), "torch.complex64"), (finite.to("meta"), "holds a tensor on meta"),
            (torch.zeros_like(finite), "holds activations that are all zero"),
            (torch.zeros(1).expand(1, 10 ** 6, 10 ** 6), "the saved activations are 1x1000000x1000000, but the"),
            (torch.cat([finite, finite]), "holds 2 rows of activations, for 1 image"),
            (finite.masked_fill(finite > finite.mean(), float("nan")), "holds values that are not finite"),
            (finite.double() * 1e20, "holds values up to .*: their squares overflow")]:
        with pytest.raises(invert.UsageError, match=message):
            invert.invert(model, model[1], reference, features=features, **fast)


def test_a_channels_last_map_whose_sides_equal_its_channels_is_known_as_such():
    torch.manual_seed(0)
    first = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU()).eval().requires_grad_(False)
    last = nn.Sequential(*first, Permute()).eval().requires_grad_(False)  # 8x8x8 at 32 pixels, as Swin's 96^3
    reference = torch.randn(1, 3, 32, 32)
    fast = dict(epochs=3, surrogate="off", precision="fp32")
    for keywords in (dict(window=4, channels="1:3"), dict(task="maximize", units=[5], unit_scope="channel")):
        results = [invert.invert(model, layer, reference, **fast, **keywords).losses[0]
                   for model, layer in ((first, first[1]), (last, last[2]))]
        for measure in {"feature_error", "unit_activation", "photo_max"} & results[0].keys():
            assert results[0][measure] == pytest.approx(results[1][measure], rel=1e-5), keywords


def test_no_device_tensor_is_made_each_iteration_and_a_diverged_image_is_that_of_its_iteration(tiny, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Made(TorchDispatchMode):  # tensors built from Python values, which a GPU must be sent
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Made.count += func.__name__.startswith("lift_fresh")
            return func(*args, **(kwargs or {}))

    with Made():  # the plateau rule watches a layer of stride 2 all 40 iterations
        invert.invert(tiny, tiny[1], torch.randn(2, 3, 16, 16), epochs=40, plateau=0.001, lr=1e-9)
    assert Made.count < 10, Made.count
    monkeypatch.setitem(invert.CHECK_EVERY, "cpu", 5)  # a GPU's cadence: the loss read every 5th iteration
    model, seen = nn.Sequential(tiny, Bomb(after=7)).eval(), {}
    result = invert.invert(model, model[1], torch.randn(2, 3, 16, 16), epochs=12, precision="fp32",
                           callback=lambda step, losses, images: seen.setdefault(step, images()))
    # infinite from iteration 8, found at iteration 10: the image last found finite, at iteration 5
    assert result.stopped == ["epochs", "diverged"] and result.iterations == [12, 4]
    assert torch.equal(result.images[1], seen[4][1])


def test_ctrl_c_counts_the_updates_made(tiny, monkeypatch):
    plateau = invert.Schedule.plateau

    def interrupted(self, step, losses):  # after the update of iteration 3, before its bookkeeping ends
        if step == 3:
            raise KeyboardInterrupt
        plateau(self, step, losses)

    reference = torch.randn(1, 3, 16, 16)
    whole = invert.invert(tiny, tiny[3], reference, epochs=3, precision="fp32")
    monkeypatch.setattr(invert.Schedule, "plateau", interrupted)
    stopped = invert.invert(tiny, tiny[3], reference, epochs=50, precision="fp32")
    assert stopped.stopped == ["interrupted"] and stopped.iterations == [3]
    assert torch.equal(stopped.images, whole.images)
