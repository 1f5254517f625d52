"""Every GPU figure of docs/performance.md, each timed, into one folder; in one call or in parts.

The parts, in order: `benchmark` (the train step of each variant, with the five-model
ensemble's inference and integrated gradients: benchmark.py), `checkouts` (the default train
step in each of --checkouts, other checkouts of the project carried to the card, e.g. at the
commits before changes suspected of slowing the step), `profile` (the step by stage,
with a jax.profiler trace: profile_step.py), `peer` (the PyTorch peer, given by --peer),
`data` (the paper-scale phantom's patches, numpy backend: the card has no TensorFlow), then the
whole protocol, whose time is the target: `cross_validate` (the development lesions resident on
the device) and `explain` (every test lesion; it reads the workdir that cross_validate has just
written, so both go in one call). Writes <out>/<part>.log for each part and <out>/figures.json,
the seconds of each part so far, rewritten after each: a call stopped at its time limit keeps
what finished. docs/performance.md plans the parts into a card's device time.
  python3 experiments/gpu_figures.py --out OUT --peer bench/peer_bench.py     # on the card
  python3 experiments/gpu_figures.py --out OUT --parts=data,benchmark,peer --variants=s2d --peer bench/peer_bench.py
  python3 experiments/gpu_figures.py --out OUT --parts=cross_validate,explain  # the data kept from the call before
  python3 experiments/gpu_figures.py --out OUT --parts=checkouts --checkouts=.bisect/a,.bisect/b  # carried checkouts
  python experiments/gpu_figures.py --out OUT --scale tiny                    # every part at test sizes, on a CPU
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from fll_jax.errors import no_stray_arguments

flags.DEFINE_string("out", None, "Folder for the logs and figures.json.", required=True)
flags.DEFINE_enum("scale", "paper", ["paper", "tiny"], "paper: the paper's shapes and data; tiny: test sizes.")
flags.DEFINE_string("peer", None, "Path of the PyTorch peer's benchmark script (run with --variants torch_eager); "
                    "without it the peer part is skipped.")
PARTS = ("benchmark", "checkouts", "profile", "peer", "data", "cross_validate", "explain")
flags.DEFINE_list("parts", list(PARTS), f"The parts to run (always in this order): {', '.join(PARTS)}.")
flags.DEFINE_list("variants", ["s2d", "direct", "s2d_folded"], "benchmark.py's train-step variants.")
flags.DEFINE_list("checkouts", [], "Folders holding other checkouts of the project (prepared here, carried to "
                  "the card); the checkouts part times the default train step of each, into one log. Without "
                  "them it is skipped.")
flags.DEFINE_string("workdir", None, "The protocol's workdir (default: <out>/protocol); on the card, one outside "
                    "$OUT keeps the checkpoints (gigabytes) out of what comes back.")
FLAGS = flags.FLAGS

# Config and overrides per scale: the protocol keeps the development set on the device and saves
# the latest state every 10 epochs (the best model whenever it improves). The phantom is complete
# and the paper config drops no sequences, so batch norm takes every image, as the peer's does:
# the same statistics, without the mask's cost; the tiny scale passes the same override.
SCALES = {
    "paper": {"config": "configs/paper.py", "batch": "32", "steps": "20", "ig_lesions": "8", "inference_batch": "256",
              "overrides": ["--config.data.backend=numpy", "--config.data.workers=14",
                            "--config.model.batch_norm_statistics=all"]},
    "tiny": {"config": "configs/quick.py", "batch": "4", "steps": "1", "ig_lesions": "1", "inference_batch": "4",
             "overrides": ["--config.data.backend=numpy", "--config.model.batch_norm_statistics=all",
                           "--config.model.depth=10", "--config.model.width=2",
                           "--config.train.batch_size=4", "--config.train.eval_batch_size=4",
                           "--config.train.epochs=2", "--config.train.folds=(0,1)"]},
}
PROTOCOL = ["--config.train.resident_data=True", "--config.train.checkpoint_every=10"]


def _run(name: str, command: list[str], out: Path, log_name: str | None = None, checkout: Path | None = None) -> float:
    """Run a command with its output into out/<name>.log, or appended to out/<log_name>.log (one
    log for several runs: the device tool brings back few files), from `checkout` when given
    (its own fll_jax first on the path); its seconds."""
    log_path = out / f"{log_name or name}.log"
    env = None
    if checkout is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "a" if log_name else "w") as log:
        log.write(f"== {name}: {' '.join(command)}\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=checkout, env=env)
    seconds = time.perf_counter() - start
    print(f"   {seconds:.1f} s, exit status {code}", flush=True)
    if code:
        raise SystemExit(f"{name} failed (exit status {code}); see {log_path}")
    return seconds


def _commands(out: Path) -> dict[str, list[str]]:
    """Each part's command at --scale, in PARTS' order."""
    scale = SCALES[FLAGS.scale]
    py, config, overrides = sys.executable, scale["config"], scale["overrides"]
    model = [o for o in overrides if o.startswith("--config.model.")]
    workdir = Path(FLAGS.workdir).absolute() if FLAGS.workdir else out / "protocol"
    return {
        "benchmark": [py, "experiments/benchmark.py", f"--config={config}", *model, f"--batch={scale['batch']}",
                      f"--steps={scale['steps']}", f"--variants={','.join(FLAGS.variants)}", "--inference", "--saliency",
                      f"--inference_batch={scale['inference_batch']}", f"--ig_lesions={scale['ig_lesions']}"],
        # the default model of each checkout: older ones lack later settings
        "checkouts": [py, "experiments/benchmark.py", f"--config={config}",
                      *[o for o in model if "batch_norm_statistics" not in o], f"--batch={scale['batch']}",
                      f"--steps={scale['steps']}", "--variants=s2d"],
        "profile": [py, "experiments/profile_step.py", f"--config={config}", *model, f"--batch={scale['batch']}",
                    f"--trace={out / 'trace'}"],
        "peer": [py, str(FLAGS.peer), "--variants", "torch_eager", "--batch", scale["batch"]],
        "data": [py, "data_prep/preprocess.py", f"--config={config}", *overrides],
        "cross_validate": [py, "experiments/cross_validate.py", f"--config={config}", *overrides, *PROTOCOL,
                           f"--workdir={workdir}"],
        "explain": [py, "experiments/explain.py", f"--workdir={workdir}", "--num_per_class=0", "--split=test"],
    }


def main(argv):
    no_stray_arguments(argv)
    unknown = sorted(set(FLAGS.parts) - set(PARTS))
    if unknown:
        raise app.UsageError(f"--parts: unknown {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    if "explain" in FLAGS.parts and "cross_validate" not in FLAGS.parts:
        raise app.UsageError("--parts: explain reads the workdir that cross_validate writes; run both in one call")
    checkouts = [Path(c).absolute() for c in FLAGS.checkouts]
    for checkout in checkouts:
        if not (checkout / "experiments" / "benchmark.py").is_file():
            raise app.UsageError(f"--checkouts: {checkout} holds no experiments/benchmark.py (a checkout of "
                                 "this project)")
    out = Path(FLAGS.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, command in _commands(out).items():
        if name not in FLAGS.parts:
            continue
        if name == "peer" and not FLAGS.peer:
            print("== peer: skipped (no --peer)", flush=True)
            continue
        if name == "checkouts":
            if not checkouts:
                print("== checkouts: skipped (no --checkouts)", flush=True)
            for checkout in checkouts:
                figures[f"checkout {checkout.name}"] = _run(f"checkout {checkout.name}", command, out, "checkouts",
                                                            checkout)
        else:
            figures[name] = _run(name, command, out)
        if name == "profile":
            # one archive: the device tool brings back files at most two folders down
            shutil.make_archive(str(out / "trace"), "gztar", out / "trace")
            shutil.rmtree(out / "trace")
        if name == "explain":
            figures["protocol"] = figures["cross_validate"] + figures["explain"]
        (out / "figures.json").write_text(json.dumps({"scale": FLAGS.scale, "seconds": figures}, indent=1) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    app.run(main)
