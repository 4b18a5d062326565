"""Where invert.py's time goes, as ratios measured in one run: a script, not a test.

    python tests/benchmark_speed.py                        # (a) to (d), and (e) without SSIM
    python tests/benchmark_speed.py --proxy /tmp/vgg16_bn_proxy.pth   # (e) with SSIM on the stand-in

(a) invert's ms per iteration / a bare truncated forward + backward loop (target <= 1.15)
(b) the seed's full-network-plus-hook loop / ours, alexnet features_4 (target >= 2)
(c) one call with 5 layers / 5 separate process calls, start-up included (target <= 0.5)
(d) the same for 4 images
(e) fp32 / bf16 ms per iteration, and the SSIM of each on the trained stand-in
(f) the defaults' ms per iteration / the seed objective's (SGD, pixels) at vgg16_bn's benchmark layers

Random weights (--weights none) except for SSIM: speed does not depend on trained values.
Run it alone: a second torch process on the same cores skews every figure.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import invert  # noqa: E402

SEED_CONFIG = dict(objective="seed")  # SGD on pixels, the original design


def invert_ms(model, layer, reference, steps: int, **settings) -> float:
    """invert's wall time per iteration, from the callback's clock, after a warm-up iteration."""
    stamps = []
    invert.invert(model, layer, reference, epochs=steps + 1,
                  callback=lambda step, losses, images: stamps.append(time.perf_counter()), **settings)
    return 1000 * (stamps[-1] - stamps[0]) / steps


def loop_ms(step, steps: int) -> float:
    """Wall time per call of step(), after one warm-up call."""
    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - started) / steps


def bare_step(truncated: torch.nn.Module, size: int):
    """One truncated forward and backward to the image, nothing else: the floor for an iteration."""
    image = torch.randn(1, 3, size, size, requires_grad=True)

    def step():
        image.grad = None
        truncated(image).square().sum().backward()
    return step


def seed_step(model, layer, reference):
    """The seed's design: the whole network runs every iteration, a hook keeps the layer's output."""
    captured = {}
    layer.register_forward_hook(lambda module, inputs, output: captured.update(out=output))
    with torch.no_grad():
        model(reference)
        target = captured["out"].clone()
    image = (1e-3 * torch.randn_like(reference)).requires_grad_()
    settings = invert.resolve(invert.Settings(objective="seed"), reference.device)
    optimizer = torch.optim.SGD([image], lr=settings.lr, momentum=settings.momentum)

    def step():
        optimizer.zero_grad()
        model(image)
        terms = invert.objective_terms(settings, captured["out"], target, target.square().sum(), image)
        sum(terms.values()).backward()
        optimizer.step()
    return step


def cli_seconds(args: list) -> float:
    """Wall time of one `python invert.py ...` process, start-up and model loading included."""
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "invert.py"), *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    """Measure and print (a) to (e)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", help="the trained vgg16_bn stand-in, for (e)'s SSIM")
    parser.add_argument("--steps", type=int, default=20, help="iterations timed per figure")
    parser.add_argument("--epochs", type=int, default=200, help="iterations of each call in (c) and (d)")
    options = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 here: {invert.native_bf16(torch.device('cpu'))}\n")
    photo = invert.load_image(invert.DEFAULT_IMAGE)
    alexnet = invert.load_model("alexnet", "none", progress=False)
    vgg = invert.load_model("vgg16_bn", "none", progress=False)
    cases = [("alexnet", alexnet, 12, 227), ("vgg16_bn", vgg, 22, 224)]

    print("(a) invert's ms per iteration / a bare truncated forward + backward (target <= 1.15)")
    for name, model, index, size in cases:
        reference = invert.preprocess(photo, size)
        bare = loop_ms(bare_step(model.features[:index + 1], size), options.steps)
        for label, settings in [("default", {}), ("seed", SEED_CONFIG)]:
            ours = invert_ms(model, model.features[index], reference, options.steps, **settings)
            print(f"    {name} features_{index}, {label:7s}: {ours:7.1f} / {bare:7.1f} ms = {ours / bare:.3f}")

    print("\n(b) the seed's full network + hook / ours, alexnet features_4, seed objective (target >= 2)")
    reference = invert.preprocess(photo, 227)
    full = loop_ms(seed_step(alexnet, alexnet.features[4], reference), options.steps)
    alexnet.features[4]._forward_hooks.clear()
    ours = invert_ms(alexnet, alexnet.features[4], reference, options.steps, **SEED_CONFIG)
    print(f"    {full:.1f} / {ours:.1f} ms = {full / ours:.2f}")

    with tempfile.TemporaryDirectory() as scratch:
        common = ["--model", "alexnet", "--weights", "none", "--epochs", str(options.epochs), "--quiet"]
        layers = ["features_1", "features_4", "features_7", "features_9", "features_11"]
        print(f"\n(c) one call with 5 layers / 5 separate calls, alexnet, {options.epochs} iterations each "
              "(target <= 0.5)")
        together = cli_seconds([*common, "--layer_name", *layers, "--output_dir", f"{scratch}/c1"])
        apart = sum(cli_seconds([*common, "--layer_name", layer, "--output_dir", f"{scratch}/c5"])
                    for layer in layers)
        print(f"    {together:.1f} / {apart:.1f} s = {together / apart:.2f}  ({', '.join(layers)})")

        images = []
        for index, transpose in enumerate([None, Image.Transpose.FLIP_LEFT_RIGHT,
                                           Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180]):
            path = Path(scratch) / f"photo{index}.png"
            (photo if transpose is None else photo.transpose(transpose)).save(path)
            images.append(str(path))
        print(f"\n(d) one call with 4 images / 4 separate calls, alexnet features_7, {options.epochs} iterations")
        together = cli_seconds([*common, "--layer_name", "features_7", "--image_path", *images,
                                "--output_dir", f"{scratch}/d1"])
        apart = sum(cli_seconds([*common, "--layer_name", "features_7", "--image_path", image,
                                 "--output_dir", f"{scratch}/d4"]) for image in images)
        print(f"    {together:.1f} / {apart:.1f} s = {together / apart:.2f}")

    print("\n(f) the defaults / the seed objective with SGD, ms per iteration, vgg16_bn at 224, "
          "each timed twice, alternating (target <= 1)")
    reference = invert.preprocess(photo, 224)
    for index in (5, 12, 22, 32):
        times = {"default": [], "seed": []}
        for _ in range(2):
            for label, settings in [("default", {}), ("seed", SEED_CONFIG)]:
                times[label].append(invert_ms(vgg, vgg.features[index], reference, options.steps, **settings))
        ours, seed = min(times["default"]), min(times["seed"])
        print(f"    features_{index}: {ours:.1f} / {seed:.1f} ms = {ours / seed:.3f}")

    print("\n(e) fp32 / bf16 ms per iteration, default settings (bf16 runs as autocast around the forward)")
    for name, model, index, size in cases:
        reference = invert.preprocess(photo, size)
        fp32 = invert_ms(model, model.features[index], reference, options.steps)
        # emulated bf16 (no AMX or AVX512-BF16) runs about 20 times slower: a few iterations tell
        bf16_steps = options.steps if invert.native_bf16(torch.device("cpu")) else 3
        bf16 = invert_ms(model, model.features[index], reference, bf16_steps, precision="bf16")
        print(f"    {name} features_{index}: {fp32:.1f} / {bf16:.1f} ms = {fp32 / bf16:.2f}")
    if options.proxy:
        from benchmark_quality import ssim
        trained = invert.load_model("vgg16_bn", options.proxy, progress=False)
        reference = invert.preprocess(photo, 224)
        print("    SSIM on the trained stand-in, 224, default settings, 200 iterations:")
        for index in (5, 12, 22, 32):
            scores = []
            for precision in ("fp32", "bf16"):
                started = time.perf_counter()
                result = invert.invert(trained, trained.features[index], reference, precision=precision)
                scores.append((ssim(result.images, reference), time.perf_counter() - started))
            (fp32_ssim, fp32_s), (bf16_ssim, bf16_s) = scores
            print(f"    vgg16_bn features_{index}: SSIM fp32 {fp32_ssim:.3f} ({fp32_s:.0f} s), "
                  f"bf16 {bf16_ssim:.3f} ({bf16_s:.0f} s), difference {bf16_ssim - fp32_ssim:+.3f}")


if __name__ == "__main__":
    main()
