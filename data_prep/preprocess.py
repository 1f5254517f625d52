"""Makes a config's data: the phantom when absent, then the preprocessed patch records.

  python data_prep/preprocess.py --config configs/quick.py          # quick phantom + TFDS records
  python data_prep/preprocess.py --config configs/paper.py          # paper-scale phantom + records
  python data_prep/preprocess.py --config configs/paper.py --config.data.source manifest \
      --config.data.manifest /path/to/manifest.csv                  # your own NIfTI data
  python data_prep/preprocess.py --config configs/quick.py --config.data.backend numpy   # .npz, no TF

Everything is built once under config.data.root and reused; the training entry point calls the
same code, so running this first is optional.
"""
import time

from absl import app, flags, logging
from ml_collections import config_flags

from fll_jax.data.prepare import prepare_source

config_flags.DEFINE_config_file("config", "configs/quick.py", "Experiment config (file[:config string]).")


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    config = flags.FLAGS.config
    start = time.perf_counter()
    source = prepare_source(config)
    dev = source.num_examples(list(range(config.data.num_folds)))
    print(f"{dev} development lesions in {config.data.num_folds} folds, {source.num_examples('test')} test lesions; "
          f"ready in {time.perf_counter() - start:.0f} s under {config.data.root}/")


if __name__ == "__main__":
    app.run(main)
