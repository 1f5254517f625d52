"""Every GPU figure of docs/performance.md in one call, each timed, into one folder.

In order: the train step of each variant with the ensemble's inference and integrated
gradients (benchmark.py), the step's profile by stage (profile_step.py), the PyTorch peer
(--peer, if given), the paper-scale phantom's patches (numpy backend: the card has no
TensorFlow), then the whole protocol (cross_validate.py with the development lesions resident
on the device, and explain.py on every test lesion), whose time is the target. Writes
<out>/<name>.log for each command and <out>/figures.json (seconds of each, and the protocol's).
  python3 experiments/gpu_figures.py --out OUT --peer bench/peer_bench.py     # on the card
  python experiments/gpu_figures.py --out OUT --scale tiny                    # the same steps at
                                                                               # test sizes, on a CPU
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

flags.DEFINE_string("out", None, "Folder for the logs and figures.json.", required=True)
flags.DEFINE_enum("scale", "paper", ["paper", "tiny"], "paper: the paper's shapes and data; tiny: test sizes.")
flags.DEFINE_string("peer", None, "Path of the PyTorch peer's benchmark script (run with --variants torch_eager).")
FLAGS = flags.FLAGS

# Config and overrides per scale: the protocol keeps the development set on the device and saves
# the latest state every 10 epochs (the best model whenever it improves).
SCALES = {
    "paper": {"config": "configs/paper.py", "batch": "32", "steps": "20", "ig_lesions": "8", "inference_batch": "256",
              "overrides": ["--config.data.backend=numpy", "--config.data.workers=14"]},
    "tiny": {"config": "configs/quick.py", "batch": "4", "steps": "1", "ig_lesions": "1", "inference_batch": "4",
             "overrides": ["--config.data.backend=numpy", "--config.model.depth=10", "--config.model.width=2",
                           "--config.train.batch_size=4", "--config.train.eval_batch_size=4",
                           "--config.train.epochs=2", "--config.train.folds=(0,1)"]},
}
PROTOCOL = ["--config.train.resident_data=True", "--config.train.checkpoint_every=10"]


def _run(name: str, command: list[str], out: Path) -> float:
    """Run a command with its output into out/<name>.log; its seconds."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    print(f"   {seconds:.1f} s, exit status {code}", flush=True)
    if code:
        raise SystemExit(f"{name} failed (exit status {code}); see {out / f'{name}.log'}")
    return seconds


def main(argv):
    del argv
    out = Path(FLAGS.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    scale = SCALES[FLAGS.scale]
    py, config, overrides = sys.executable, scale["config"], scale["overrides"]
    model = [o for o in overrides if o.startswith("--config.model.")]
    figures = {}
    figures["benchmark"] = _run("benchmark", [
        py, "experiments/benchmark.py", f"--config={config}", *model, f"--batch={scale['batch']}",
        f"--steps={scale['steps']}", "--variants=s2d,direct,s2d_folded", "--inference", "--saliency",
        f"--inference_batch={scale['inference_batch']}", f"--ig_lesions={scale['ig_lesions']}"], out)
    figures["profile"] = _run("profile", [
        py, "experiments/profile_step.py", f"--config={config}", *model, f"--batch={scale['batch']}",
        f"--trace={out / 'trace'}"], out)
    # one archive: the device tool brings back files at most two folders down
    shutil.make_archive(str(out / "trace"), "gztar", out / "trace")
    shutil.rmtree(out / "trace")
    if FLAGS.peer:
        figures["peer"] = _run("peer", [py, FLAGS.peer, "--variants", "torch_eager", "--batch", scale["batch"]], out)
    figures["data"] = _run("data", [py, "data_prep/preprocess.py", f"--config={config}", *overrides], out)
    workdir = out / "protocol"
    figures["cross_validate"] = _run("cross_validate", [
        py, "experiments/cross_validate.py", f"--config={config}", *overrides, *PROTOCOL, f"--workdir={workdir}"], out)
    figures["explain"] = _run("explain", [
        py, "experiments/explain.py", f"--workdir={workdir}", "--num_per_class=0", "--split=test"], out)
    figures["protocol"] = figures["cross_validate"] + figures["explain"]
    (out / "figures.json").write_text(json.dumps({"scale": FLAGS.scale, "seconds": figures}, indent=1) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    app.run(main)
