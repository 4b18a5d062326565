"""Where invert.py's time goes, as ratios measured in one run: a script, not a test.

    python tests/benchmark_speed.py                                   # the CPU here: every table
    python tests/benchmark_speed.py --ssim          # with SSIM on the trained stand-in, fp32 against bf16
    python tests/benchmark_speed.py --device cuda --quick             # one GPU, in under 5 minutes

(1) batches: ms per iteration per image of N photos in one call, against a bare truncated forward
    and backward of a batch of N, with the process's peak memory (target: ratio <= 1.15)
(2) overhead: the default settings' ms per iteration (--plateau 0) against the bare step, at the benchmark layers
    (target: <= 1.15 where the bare step takes 5 ms or more, <= 1.5 below)
(3) precision: fp32 against bf16 ms per iteration, and with --ssim the SSIM of each on the trained
    stand-in (bf16 may be the default only where it costs no more than 0.01 SSIM)
(4) GPU only: cudnn.benchmark on against off
(5) whole runs: 200 default iterations of alexnet features_12 and of vgg16_bn features_32, and a
    batch of 16 photos against one (GPU targets: under 1 s, under 3 s, under 3x)
(0) ops: torch ops dispatched per iteration (on a GPU, each at least one kernel launch), ours against
    the bare step, counted by a TorchDispatchMode over 5 and over 25 iterations (the difference over
    20), fp32 (targets: ours <= bare + 60 at batch 1, <= bare + 70 at batch 8)
(7) fusing: ours eager against ours with the render, priors and feature term through torch.compile,
    and the bare step eager against the same step captured once in a CUDA graph and replayed (a GPU
    only): whether fusing the launches pays here; the tool adopts either only where it measures faster
(6) a job: --photos photos at vgg16_bn features_22 through the command line, in a process of its own:
    the batch size auto chose, the process's peak memory, and the time per image per iteration
    against the bare batched step at that batch size (target: <= 1.15); on a GPU also one torchrun
    over every GPU of the machine, in images per second

Random weights except for SSIM: speed does not depend on trained values. Run it alone: a second
torch process on the same cores slows both. A device that is not there is an error, never a
fallback to the CPU.
"""
import argparse
import contextlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import invert  # noqa: E402

# (model, layer index, input size): the layers the targets name
LAYERS = [("alexnet", 1, 227), ("alexnet", 4, 227), ("alexnet", 12, 227), ("vgg16_bn", 5, 224),
          ("vgg16_bn", 22, 224), ("vgg16_bn", 32, 224)]
SSIM_LAYERS = [5, 12, 22, 32]


def synchronize(device: torch.device) -> None:
    """Wait for the device, so that a clock reading covers the work queued before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def invert_ms(model, layer, references, steps: int, **settings) -> float:
    """invert's ms per iteration, from the end of its first iteration to the end of its last."""
    stamps = []

    def clock(step, losses, images):
        if step in (1, steps + 1):
            synchronize(references.device)
            stamps.append(time.perf_counter())

    invert.invert(model, layer, references, epochs=steps + 1, callback=clock, **{"plateau": 0.0, **settings})
    return 1000 * (stamps[1] - stamps[0]) / steps


def bare_ms(model, index: int, batch: int, size: int, steps: int, device, precision: str = "fp32",
            warm: bool = True) -> float:
    """A truncated forward and backward to a batch of images, nothing else: the floor for an iteration
    (after one untimed step, where `warm`)."""
    truncated = model.features[:index + 1]
    images = torch.randn(batch, 3, size, size, device=device, requires_grad=True)

    def step():
        images.grad = None
        with invert.autocast(precision, device):
            output = truncated(images)
        output.float().sum().backward()

    if warm:
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return 1000 * (time.perf_counter() - started) / steps


def graph_ms(model, index: int, batch: int, size: int, steps: int, device) -> float:
    """The bare step captured once in a CUDA graph and replayed: the floor without launch costs."""
    truncated = model.features[:index + 1]
    images = torch.randn(batch, 3, size, size, device=device, requires_grad=True)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(3):
            images.grad = None
            truncated(images).float().sum().backward()
    torch.cuda.current_stream(device).wait_stream(side)
    graph, images.grad = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):  # the gradient is assigned, not accumulated, at every replay
        truncated(images).float().sum().backward()
    graph.replay()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    synchronize(device)
    return 1000 * (time.perf_counter() - started) / steps


@contextlib.contextmanager
def compiled_parts():
    """invert's render, priors and feature term through torch.compile meanwhile."""
    originals = invert.FourierImage.render, invert.prior_terms, invert.data_term
    try:
        invert.FourierImage.render, invert.prior_terms, invert.data_term = map(torch.compile, originals)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="torch._dynamo")  # e.g. about the cached 1x3x1x1 scale
            yield
    finally:
        invert.FourierImage.render, invert.prior_terms, invert.data_term = originals
        torch._dynamo.reset()


def fusing_table(models: dict, references: dict, layers: list, steps: int, device) -> None:
    """Section (7): ours eager against compiled, the bare step eager against a CUDA graph (a GPU only)."""
    print("\n(7) fusing: default settings, fp32, ms per iteration")
    print("| layer | ours | ours compiled | ours / compiled | bare | bare in a CUDA graph | bare / graph |\n"
          "|---|---|---|---|---|---|---|")
    for name, index, size in layers:
        model, photos = models[name], references[size]
        ours = invert_ms(model, model.features[index], photos, steps, precision="fp32")
        try:
            with compiled_parts():
                invert_ms(model, model.features[index], photos, 2, precision="fp32")  # compiles, untimed
                fused_ms = invert_ms(model, model.features[index], photos, steps, precision="fp32")
                fused, ratio = f"{fused_ms:.2f}", f"{ours / fused_ms:.2f}"
        except Exception as error:  # no compiler, or a graph torch.compile cannot take
            fused, ratio = f"failed: {invert.one_line(error)[:60]}", "-"
        bare = bare_ms(model, index, 1, size, steps, device)
        graph = graph_ms(model, index, 1, size, steps, device) if device.type == "cuda" else None
        print(f"| {name} features_{index} | {ours:.2f} | {fused} | {ratio} | {bare:.2f} | "
              + (f"{graph:.2f} | {bare / graph:.2f} |" if graph is not None else "a GPU only | - |"), flush=True)


class OpCounter(TorchDispatchMode):
    """Counts the torch ops dispatched while it is active, and of them the views (a GPU launches no kernel)."""

    def __init__(self):
        super().__init__()
        self.count = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        alias = func._schema.returns[0].alias_info if func._schema.returns else None
        self.views += alias is not None and not alias.is_write  # slice, view, expand, detach...
        return func(*args, **(kwargs or {}))


def ops_per_step(run) -> tuple:
    """(Ops, views) one more iteration of run(iterations) dispatches: the counts at 25 less at 5, over 20."""
    counts = []
    for iterations in (5, 25):
        with OpCounter() as counter:
            run(iterations)
        counts.append((counter.count, counter.views))
    return tuple((late - early) / 20 for late, early in zip(counts[1], counts[0]))


def ops_table(models: dict, references: dict) -> None:
    """Section (0): ops per iteration, ours against the bare step, fp32."""
    print("\n(0) ops per iteration, fp32, default settings (--plateau 0) against a bare truncated forward "
          "and backward (targets: ours <= bare + 60 at batch 1, + 70 at batch 8)")
    print("| model, layer, batch | ours | bare | ours - bare | of which views (no GPU kernel), ours / bare |\n"
          "|---|---|---|---|---|")
    for name, index, size, batch in [("alexnet", 1, 227, 1), ("alexnet", 12, 227, 1), ("alexnet", 12, 227, 8),
                                     ("vgg16_bn", 22, 224, 1), ("vgg16_bn", 22, 224, 4), ("vgg16_bn", 22, 224, 8)]:
        model, photos = models[name], references[size].expand(batch, -1, -1, -1).contiguous()
        ours = ops_per_step(lambda steps: invert.invert(model, model.features[index], photos, epochs=steps,
                                                        plateau=0.0, precision="fp32"))
        bare = ops_per_step(lambda steps: bare_ms(model, index, batch, size, steps, photos.device, warm=False))
        print(f"| {name} features_{index}, {batch} | {ours[0]:.0f} | {bare[0]:.0f} | {ours[0] - bare[0]:+.0f} "
              f"| {ours[1]:.0f} / {bare[1]:.0f} |", flush=True)


def against_bare(model, index: int, references, steps: int) -> tuple:
    """(invert's, the bare step's) ms per iteration in fp32, for a batch of `references` at features[index]."""
    ours = invert_ms(model, model.features[index], references, steps, precision="fp32")
    count, size = len(references), references.shape[-1]
    return ours, bare_ms(model, index, count, size, steps, references.device)


def run_seconds(model, layer, references, **settings) -> float:
    """Wall time of a whole invert call of exactly --epochs iterations, set-up and final evaluation included."""
    synchronize(references.device)
    started = time.perf_counter()
    invert.invert(model, layer, references, **{"plateau": 0.0, **settings})
    synchronize(references.device)
    return time.perf_counter() - started


def peak_memory_gb(device: torch.device) -> float:
    """The device's peak memory so far: allocated GPU memory, or the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def photo_folder(folder: Path, count: int) -> Path:
    """`count` different photos: crops, flips and turns of the default one."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = invert.load_image(invert.DEFAULT_IMAGE)
    for index in range(count):
        left, top = 7 * (index % 8), 5 * (index // 8)
        picture = photo.crop((left, top, left + photo.width - 60, top + photo.height - 60)).rotate(90 * (index % 4))
        (picture.transpose(0) if index % 2 else picture).save(folder / f"photo_{index:03d}.png")
    return folder


def job(device: torch.device, photos: Path, epochs: int, out: Path, launcher: list) -> tuple:
    """Run invert.py on a folder at vgg16_bn features_22 in a process of its own (or under `launcher`);
    return (its JSON records, its wall seconds, the peak memory of its processes in GB)."""
    command = [*launcher, str(ROOT / "invert.py"), "--model", "vgg16_bn", "--weights", "none", "--input_size", "224",
               "--layer_name", "features_22", "--image_path", str(photos), "--epochs", str(epochs),
               "--plateau", "0", "--precision", "fp32", "--quiet", "--output_dir", str(out),
               *([] if launcher[1:] else ["--device", str(device)])]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    records = [json.loads(path.read_text()) for path in out.glob("*.json")]
    return records, seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


def job_table(device: torch.device, vgg, count: int, epochs: int) -> None:
    """Section (6): a job of `count` photos, auto batches; on a GPU also one torchrun over every GPU."""
    print(f"\n(6) a job of {count} photos, vgg16_bn features_22 at 224, fp32, {epochs} iterations each, "
          "--batch_size auto (target: ours / bare <= 1.15)")
    scratch = Path(tempfile.mkdtemp(prefix="invert-job-"))
    try:
        photos = photo_folder(scratch / "photos", count)
        records, seconds, peak = job(device, photos, epochs, scratch / "out", [sys.executable])
        batch = max(record["batch"] for record in records)
        ours = 1000 * sum(record["seconds"] for record in records) / (len(records) * epochs)
        bare = bare_ms(vgg, 22, batch, 224, 3, device) / batch
        print("| images | auto batch | ms per image per iteration | bare | ours / bare | peak memory (GB) | wall s |\n"
              "|---|---|---|---|---|---|---|")
        print(f"| {len(records)} | {batch} | {ours:.1f} | {bare:.1f} | {ours / bare:.3f} | {peak:.1f} "
              f"| {seconds:.0f} |")
        if device.type == "cuda":
            gpus = torch.cuda.device_count()
            torchrun = [shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun",
                        "--nproc_per_node", str(gpus), "--standalone"]
            records, seconds, _ = job(device, photos, epochs, scratch / "torchrun", torchrun)
            print(f"    torchrun over {gpus} GPU(s): {len(records)} images of {epochs} iterations in {seconds:.1f} s "
                  f"(set-up included): {len(records) / seconds:.2f} images per second")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def machine(device: torch.device) -> str:
    """What the figures were measured on."""
    cpu = (f"cpu capability {torch.backends.cpu.get_cpu_capability()}, "
           f"AVX512-BF16 {getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)()}, "
           f"AMX {getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)()}")
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}{gpu}; native bf16 on "
            f"{device}: {invert.native_bf16(device)}; --precision auto picks "
            f"{invert.resolve(invert.Settings(), device).precision}")


def main() -> None:
    """Measure and print each table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer rows: one image against a batch of 16")
    parser.add_argument("--ssim", action="store_true", help="SSIM fp32 against bf16 on the trained stand-in "
                                                              "(tests/stand_in.py builds it once)")
    parser.add_argument("--steps", type=int, default=None, help="iterations timed per figure")
    parser.add_argument("--total", type=int, default=200, help="iterations of each whole run in (5)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes for (1)")
    parser.add_argument("--sections", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7], help="which tables")
    parser.add_argument("--photos", type=int, default=None, help="photos of the job in (6) (default: 64, quick: 8)")
    parser.add_argument("--job_epochs", type=int, default=20, help="iterations of each image of the job in (6)")
    options = parser.parse_args()
    try:
        device = invert.pick_device(options.device)
    except invert.UsageError as error:
        sys.exit(f"benchmark_speed.py: {error}")
    steps = options.steps or (20 if options.quick or device.type == "cuda" else 10)
    batches = options.batches or ([1, 16] if options.quick else [1, 2, 4, 8])
    torch.manual_seed(0)
    print(machine(device) + "\n")
    models = {name: invert.load_model(name, "none", progress=False).to(device) for name in ("alexnet", "vgg16_bn")}
    assert all(parameter.device.type == device.type for model in models.values() for parameter in model.parameters())
    photo = invert.load_image(invert.DEFAULT_IMAGE)
    references = {size: invert.preprocess(photo, size).to(device) for size in (224, 227)}
    vgg = models["vgg16_bn"]

    if 0 in options.sections:
        ops_table(models, references)

    if 1 in options.sections:
        print("(1) batches: vgg16_bn at 224, fp32, ms per iteration per image (target: ours / bare <= 1.15)")
        print("| layer | N | ours | bare | ours / bare | peak memory so far (GB) |\n|---|---|---|---|---|---|")
        for index in (22, 5):
            for count in batches:
                photos = torch.cat([references[224].flip(-1) if row % 2 else references[224] for row in range(count)])
                ours, bare = (ms / count for ms in against_bare(vgg, index, photos, steps))
                print(f"| features_{index} | {count} | {ours:.1f} | {bare:.1f} | {ours / bare:.3f} "
                      f"| {peak_memory_gb(device):.1f} |", flush=True)

    if 2 in options.sections:
        print("\n(2) overhead: default settings, fp32, ms per iteration "
              "(target: <= 1.15 where bare >= 5 ms, else <= 1.5)")
        print("| layer | ours | bare | ours / bare | target |\n|---|---|---|---|---|")
        for name, index, size in LAYERS:
            model = models[name]
            ours, bare = against_bare(model, index, references[size], steps)
            print(f"| {name} features_{index} | {ours:.2f} | {bare:.2f} | {ours / bare:.3f} "
                  f"| {1.15 if bare >= 5 else 1.5} |", flush=True)

    if 3 in options.sections:
        print("\n(3) precision: default settings, ms per iteration")
        print("| layer | fp32 | bf16 | fp32 / bf16 |\n|---|---|---|---|")
        for name, index, size in LAYERS:
            model = models[name]
            fp32 = invert_ms(model, model.features[index], references[size], steps, precision="fp32")
            # emulated bf16 (no AMX or AVX512-BF16) runs about 20 times slower: a few iterations tell
            bf16 = invert_ms(model, model.features[index], references[size],
                             steps if invert.native_bf16(device) else 2, precision="bf16")
            print(f"| {name} features_{index} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.2f} |", flush=True)
        if options.ssim:
            from benchmark_quality import ssim
            import stand_in
            trained = invert.load_model("vgg16_bn", str(stand_in.build()), progress=False).to(device)
            print(f"\nSSIM on the trained stand-in, 224, default settings, {options.total} iterations")
            print("| layer | SSIM fp32 | SSIM bf16 | bf16 - fp32 | seconds fp32 | seconds bf16 |\n"
                  "|---|---|---|---|---|---|")
            for index in SSIM_LAYERS:
                scores, seconds = [], []
                for precision in ("fp32", "bf16"):
                    started = time.perf_counter()
                    result = invert.invert(trained, trained.features[index], references[224], precision=precision,
                                           epochs=options.total)
                    seconds.append(time.perf_counter() - started)
                    scores.append(ssim(result.images.cpu(), references[224].cpu()))
                print(f"| features_{index} | {scores[0]:.4f} | {scores[1]:.4f} | {scores[1] - scores[0]:+.4f} "
                      f"| {seconds[0]:.0f} | {seconds[1]:.0f} |", flush=True)

    if 4 in options.sections and device.type == "cuda":
        print("\n(4) cudnn.benchmark, default settings, ms per iteration")
        print("| layer | off | on | off / on |\n|---|---|---|---|")
        for name, index, size in LAYERS:
            model = models[name]
            times = []
            for choice in (False, True):
                torch.backends.cudnn.benchmark = choice
                invert_ms(model, model.features[index], references[size], 3)  # let it choose its kernels
                times.append(invert_ms(model, model.features[index], references[size], steps))
            torch.backends.cudnn.benchmark = False
            print(f"| {name} features_{index} | {times[0]:.2f} | {times[1]:.2f} | {times[0] / times[1]:.2f} |")

    if 5 in options.sections:
        print(f"\n(5) whole runs, default settings, {options.total} iterations, set-up included")
        alexnet = models["alexnet"]
        run_seconds(alexnet, alexnet.features[12], references[227], epochs=3)  # warm-up
        alexnet_seconds = run_seconds(alexnet, alexnet.features[12], references[227], epochs=options.total)
        vgg_seconds = run_seconds(vgg, vgg.features[32], references[224], epochs=options.total)
        short = max(1, options.total // 10)
        one = run_seconds(vgg, vgg.features[22], references[224], epochs=short)
        many = run_seconds(vgg, vgg.features[22], references[224].expand(batches[-1], -1, -1, -1),
                           epochs=short)
        print(f"    alexnet features_12: {alexnet_seconds:.2f} s (GPU target < 1 s)")
        print(f"    vgg16_bn features_32: {vgg_seconds:.2f} s (GPU target < 3 s)")
        print(f"    vgg16_bn features_22, {short} iterations, a batch of {batches[-1]} / one image: "
              f"{many:.2f} / {one:.2f} s = {many / one:.2f} (GPU target < 3)")

    if 7 in options.sections:
        fusing_table(models, references, LAYERS[:3] if options.quick else LAYERS, steps, device)

    if 6 in options.sections:
        job_table(device, vgg, options.photos or (8 if options.quick else 64), options.job_epochs)

if __name__ == "__main__":
    main()
