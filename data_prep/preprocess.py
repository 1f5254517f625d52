"""Makes a config's data: the phantom when absent, then the preprocessed patch records.

  python data_prep/preprocess.py --config configs/quick.py          # quick phantom + TFDS records
  python data_prep/preprocess.py --config configs/paper.py          # paper-scale phantom + records
  python data_prep/preprocess.py --config configs/paper.py --config.data.source manifest \
      --config.data.manifest /path/to/manifest.csv                  # your own NIfTI data
  python data_prep/preprocess.py --config configs/quick.py --config.data.backend numpy   # .npz, no TF
  python data_prep/preprocess.py --config configs/paper.py --config.data.source manifest \
      --config.data.manifest /path/to/manifest.csv --check     # list every problem, build nothing
  python data_prep/preprocess.py --config configs/paper.py --prune   # delete the caches it does not use

Everything is built once under config.data.root and reused (keyed on the content of the data, so
changed images are preprocessed again); the training entry point calls the same code, so running
this first is optional. Caches of other data, settings or preprocessing versions stay under
config.data.root until --prune deletes them (it refuses while another command uses them); the
command says how many there are.
"""
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from fll_jax.data.prepare import check_data, prepare_source, unused_caches
from fll_jax.data.root_caches import root_alone, summary
from fll_jax.files import remove
from fll_jax.errors import no_stray_arguments, parse_config_flags, reported_as

config_flags.DEFINE_config_file("config", "configs/quick.py", "Experiment config (file[:config string]).")
flags.DEFINE_bool("check", False, "Check the whole data set and list every problem (manifest, folds, leaks, "
                  "unreadable, blank or inverted inputs) without preprocessing; exit status 1 if there are any.")
flags.DEFINE_bool("prune", False, "First delete the patch sets and lesions' patches under config.data.root that this "
                  "config's data does not use (other data, settings or preprocessing versions; made again when "
                  "needed). Refused while another command uses them.")


def main(argv):
    no_stray_arguments(argv)
    logging.set_verbosity(logging.ERROR)
    config = flags.FLAGS.config
    start = time.perf_counter()
    if flags.FLAGS.check:
        if flags.FLAGS.prune:
            raise app.UsageError("--check builds and deletes nothing; run --prune without it")
        with reported_as("preprocess --check"):
            problems = check_data(config)
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s) found in {time.perf_counter() - start:.0f} s")
        sys.exit(1 if problems else 0)
    if flags.FLAGS.prune:  # first: the space may be what building this config's patches needs
        with reported_as("preprocess --prune"), root_alone(config.data.root):
            unused = unused_caches(config, staging=True)
            text = summary(unused)
            remove(unused)
        print(f"deleted {text} under {config.data.root}/ that this config's data does not use")
    with reported_as("preprocess"):
        source = prepare_source(config, list_unused=not flags.FLAGS.prune)
    splits = [lesion["split"] for lesion in source.fingerprint["lesions"].values()]
    print(f"{splits.count('dev')} development lesions in {config.data.num_folds} folds, {splits.count('test')} test "
          f"lesions; ready in {time.perf_counter() - start:.0f} s under {config.data.root}/")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_config_flags)
