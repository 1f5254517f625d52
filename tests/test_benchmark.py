"""The benchmark that a GPU session runs in one call, at tiny sizes on this CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import FEW
from tests.xla_flags import QUICK_COMPILE

REPO = Path(__file__).parent.parent


def test_benchmark_reports_the_step_inference_and_saliency_figures():
    env = {**os.environ, "XLA_FLAGS": QUICK_COMPILE}  # one device, as on one GPU
    command = [sys.executable, "experiments/benchmark.py", f"--config=configs/quick.py:folds=0+1,depth=10,width=2,sequences={FEW}",
               "--batch=4", "--steps=1", "--variants=s2d", "--stored=16", "--inference", "--inference_batch=4",
               "--saliency", "--ig_steps=4", "--ig_lesions=1"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    step, inference, saliency = lines
    assert step["variant"] == "s2d" and step["batch"] == 4 and step["samples_per_s"] > 0
    assert step["conv"] == "folded"  # the config's 'auto' on the CPU
    assert inference["figure"] == "ensemble_inference" and inference["models"] == 2 and inference["lesions_per_s"] > 0
    assert saliency["figure"] == "integrated_gradients" and saliency["steps"] == 4 and saliency["sequences"] == 3
    assert saliency["models"] == 2 and saliency["ms_per_lesion"] > 0


def test_gpu_figures_refuses_unknown_parts_explain_without_its_workdir_and_a_folder_that_is_no_checkout(tmp_path):
    for parts, expected in (("bench", "unknown bench; the parts are benchmark, checkouts, profile"),
                            ("data,explain", "run both in one call"),
                            (f"checkouts --checkouts={tmp_path}", f"--checkouts: {tmp_path} holds no experiments/benchmark.py")):
        command = [sys.executable, "experiments/gpu_figures.py", f"--out={tmp_path / 'out'}", *f"--parts={parts}".split()]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and expected in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # refused before anything ran or was written
