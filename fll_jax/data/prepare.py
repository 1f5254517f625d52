"""From a config to a data source: make the phantom if absent, check the data, preprocess once.

Layout under config.data.root (default data/):
  phantom_<scale>_seed<k>/   the phantom's NIfTI files and manifest.csv (source 'phantom')
  file_digests.json          size and sha256 of every input file, cached by size and times
  records/<key>/             TFDS records (backend 'tfds')
  patches/<key>.npz          the same patches for the numpy backend (no TensorFlow needed)
  lesion_patches/<k>.npz     each lesion's patches, named after what they are made from
                             (fll_jax.data.lesion_cache), so that a changed data set
                             preprocesses only its changed lesions
  preprocessing_code.json    per PREPROCESS_VERSION, the digest of the preprocessing code that
                             last made patches here (an edit that kept the version is warned of)

Each process that makes or reads a source holds data.root shared, and caches no config uses are
deleted only with the folder alone (fll_jax.data.root_caches; data_prep/preprocess.py --prune).

<key> names the lesions' content (labels, mask values, metadata and the bytes of every image
and mask file), the patch size, the preprocessing version and the version of the data checks
(a lesion cached before a check was added is checked when it is made again), so changed images
are always preprocessed again and never reused, while a moved data set or other fold settings
reuse the same patches. Folds are assigned here, from the manifest, each time a source is made.
"""
from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Mapping

import ml_collections

from fll_jax.code_version import PREPROCESSING_FILES, preprocessing_code
from fll_jax.config_check import check_config
from fll_jax.constants import PATCH_SIZE
from fll_jax.data.checks import CHECKS_VERSION, duplicate_problems, parse_allow, problem_report
from fll_jax.data.digests import FileDigests
from fll_jax.data.fingerprint import content_key, file_digests, lesion_fingerprints, patch_key
from fll_jax.data.folds import TEST_FOLD, FoldError, assign_folds, given_fold_problems, given_folds
from fll_jax.data.lesion_cache import LesionCache
from fll_jax.data.manifest import ManifestError, read_manifest, scan_manifest
from fll_jax.data.numpy_source import NumpySource
from fll_jax.data.patchset import PatchSet
from fll_jax.data.preprocess import (
    PREPROCESS_VERSION, PreprocessOptions, lesion_problems, mask_claims, preprocess_manifest,
)
from fll_jax.data.root_caches import LESIONS_DIR, PATCHES_DIR, RECORDS_DIR, caches_in, hold_root, summary
from fll_jax.files import StateFileError, read_json, write_json

BACKENDS = ("tfds", "numpy")
SOURCES = ("phantom", "manifest")
FOLD_SOURCES = ("assigned", "manifest")
CODE_RECORD = "preprocessing_code.json"


class DataError(ValueError):
    """Input data that cannot be used; the message lists every problem with its file and lesion."""


def phantom_dir(config: ml_collections.ConfigDict) -> Path:
    """Where the phantom of a config's scale and seed lives."""
    return Path(config.data.root) / f"phantom_{config.data.scale}_seed{config.data.phantom_seed}"


def manifest_path(config: ml_collections.ConfigDict) -> Path:
    """The manifest a config reads; the phantom of its scale and seed is generated when absent."""
    data = config.data
    if data.source == "manifest":
        path = Path(data.manifest)
        if not path.is_file():
            raise DataError(f"config.data.manifest: {path} does not exist")
        return path
    if data.source != "phantom":
        raise ValueError(f"unknown config.data.source {data.source!r}; known: {', '.join(SOURCES)}")
    from fll_jax.data.phantom import MANIFEST_NAME, generate_phantom, phantom_differences

    out_dir = phantom_dir(config)
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        print(f"making the {data.scale} phantom in {out_dir}")
        generate_phantom(out_dir, scale=data.scale, seed=data.phantom_seed, workers=data.workers)
    differences = phantom_differences(out_dir, data.scale, data.phantom_seed)
    if differences:
        raise DataError(f"{out_dir} holds another phantom than config.data's (scale {data.scale!r}, phantom_seed "
                        f"{data.phantom_seed}):\n  " + "\n  ".join(differences) + "\nMove or delete that folder to "
                        "have this one made there (runs made from it keep their fingerprints and refuse other data), "
                        "or read it as data.source='manifest' with data.manifest pointing at its manifest.csv.")
    return path


def _digests(config: ml_collections.ConfigDict) -> FileDigests:
    return FileDigests(Path(config.data.root) / "file_digests.json")


def describe_data(config: ml_collections.ConfigDict, digests: FileDigests | None = None) -> tuple[list, list[int], dict]:
    """(manifest records, their folds, the data fingerprint) of a config; DataError listing every leak.

    The fingerprint holds 'patches' (the patch cache key), 'preprocessing' (its version and patch
    size) and 'lesions' (per lesion its manifest fields, fold and file digests): what results
    depend on in the data.
    """
    data = config.data
    digests = digests or _digests(config)
    records = read_manifest(manifest_path(config))
    files = file_digests(records, digests)
    digests.save()
    problems = duplicate_problems(records, files, parse_allow(data.allow))
    if problems:
        raise DataError(problem_report("the data leaks between lesions or patients:", problems))
    try:
        folds = _folds(config, records)
    except FoldError as error:
        if data.folds != "manifest":
            raise
        raise DataError(f"{manifest_path(config)}: fold column: {error}") from None
    lesions = lesion_fingerprints(records, folds, files)
    settings = preprocessing(config)
    return records, folds, {"patches": content_key(lesions, *settings.values()), "preprocessing": settings,
                            "lesions": lesions}


def _folds(config: ml_collections.ConfigDict, records: list) -> list[int]:
    """Each record's fold (TEST_FOLD for test rows), the manifest's or drawn; FoldError when they cannot be."""
    data = config.data
    if data.folds == "manifest":
        return given_folds([r.lesion_id for r in records], [r.patient_id for r in records],
                           [r.fold for r in records], [r.split for r in records], data.num_folds).tolist()
    return _assigned_folds(config, records)


def _assigned_folds(config: ml_collections.ConfigDict, records: list) -> list[int]:
    """The folds drawn from data.fold_seed (data.folds 'assigned'); FoldError when they cannot be.
    A warning when the manifest gives folds of its own, which these replace."""
    data = config.data
    if any(r.fold is not None for r in records):
        warnings.warn(f"{manifest_path(config)} gives folds (its fold column), but data.folds is 'assigned': folds "
                      "drawn from data.fold_seed replace them. A run trains on the manifest's folds (a data set's "
                      "official ones) with data.folds 'manifest' and data.num_folds their number.", stacklevel=2)
    return assign_folds([r.patient_id for r in records], [r.label for r in records], [r.split for r in records],
                        num_folds=data.num_folds, seed=data.fold_seed).tolist()


def _fold_problems(config: ml_collections.ConfigDict, path: Path, records: list) -> list[str]:
    """What describe_data would refuse in the folds of these records, one problem each."""
    data = config.data
    if data.folds == "manifest":
        found = given_fold_problems([r.lesion_id for r in records], [r.patient_id for r in records],
                                    [r.fold for r in records], [r.split for r in records], data.num_folds)
        return [f"{path}: fold column: {p}" for p in found]
    try:
        _assigned_folds(config, records)
    except FoldError as error:
        return [f"{path}: folds (data.folds 'assigned'): {error}"]
    return []


def fit_problems(config: ml_collections.ConfigDict, lesions: Mapping[str, Mapping]) -> list[str]:
    """What keeps a data set from training under a config, one problem each: no test split, a
    used sequence that no development lesion has, lesions with none of the sequences the model
    sees, a fold too small to fill one batch.

    lesions: the data fingerprint's lesion entries (fll_jax.data.fingerprint), each with its
    fold and, for data read from a manifest, its files.
    """
    folds = [int(entry["fold"]) for entry in lesions.values()]
    problems = []
    dev_files = [entry["files"] for entry in lesions.values() if entry["fold"] != TEST_FOLD and "files" in entry]
    unseen = [s for s in config.sequences if dev_files and not any(f"{s}_image" in files for files in dev_files)]
    if unseen:
        problems.append(f"no development lesion has {', '.join(unseen)}, which config.sequences uses: its branch "
                        "would learn from absent inputs only; leave it out of --config.sequences")
    # Such a lesion would be trained on and scored from its absent inputs alone (predict.py refuses it).
    seen = [s for s in config.sequences if s not in config.evaluation.hidden_sequences]
    blind = [lesion for lesion, entry in lesions.items()
             if "files" in entry and not any(f"{s}_image" in entry["files"] for s in seen)]
    if blind:
        problems.append(f"{len(blind)} lesion(s) have none of the sequences the model sees ({', '.join(seen)}): "
                        f"{', '.join(blind[:5])}{' ...' if len(blind) > 5 else ''}; leave them out of the manifest, "
                        "or use sequences each lesion has one of")
    if TEST_FOLD not in folds:
        problems.append("the data has no test split (no manifest row with split 'test'), "
                        "on which the fold models are ensembled")
    for fold in config.train.folds:
        train = sum(f not in (TEST_FOLD, fold) for f in folds)
        if train < config.train.batch_size:
            problems.append(f"fold {fold}: {train} training lesion(s) cannot fill one batch of "
                            f"train.batch_size = {config.train.batch_size}")
    return problems


def refuse_misfit(config: ml_collections.ConfigDict, lesions: Mapping[str, Mapping]) -> None:
    """DataError listing every fit_problems of the data under the config."""
    problems = fit_problems(config, lesions)
    if problems:
        raise DataError(problem_report("the data does not fit the config:", problems))


def preprocessing(config: ml_collections.ConfigDict) -> dict:
    """What a config's patches depend on beyond the lesions: a model trained on others is refused them."""
    options = PreprocessOptions.from_config(config.data)
    return {"version": PREPROCESS_VERSION, "patch_size": PATCH_SIZE, **dataclasses.asdict(options)}


def prepare_source(config: ml_collections.ConfigDict, fit: bool = False, list_unused: bool = False):
    """The training/evaluation source of a config (TFDSSource or NumpySource), with its `fingerprint`.

    fit: also refuse data that cannot train under the config (refuse_misfit) before any lesion
    is preprocessed, which on a real data set can take an hour.
    list_unused: also say how much of config.data.root the config's data does not use (unused_caches).

    Raises:
        ConfigError: the config cannot run (every bad field listed), before anything is made.
        DataError: the data cannot be used (or, with fit, cannot train under the config).
    """
    check_config(config)
    data = config.data
    root = Path(data.root)
    allow = parse_allow(data.allow)
    digests = _digests(config)
    records, folds, fingerprint = describe_data(config, digests)
    if fit:
        refuse_misfit(config, fingerprint["lesions"])
    hold_root(root)
    _note_preprocessing_code(root)
    key, lesion_keys = _cache_keys(config, records, fingerprint)
    unused = _unused(root, key, lesion_keys) if list_unused else []
    if unused:
        print(f"{root}/ also holds {summary(unused)} that this config's data does not use (other data, settings "
              "or preprocessing versions): data_prep/preprocess.py --prune deletes them")
    options = PreprocessOptions.from_config(data)
    fold_of = {r.lesion_id: f for r, f in zip(records, folds)}
    cache = LesionCache(root / LESIONS_DIR, lesion_keys)
    if data.backend == "tfds":
        from fll_jax.data.pipeline import TFDSSource
        from fll_jax.data.records import build_records

        path = build_records(records, root / RECORDS_DIR / key, digests, workers=data.workers, allow=allow,
                             options=options, cache=cache)
        digests.save()
        _check_inputs_unchanged(records, digests, cache, root / RECORDS_DIR / key)
        return TFDSSource(path, fold_of, fingerprint)
    npz = root / PATCHES_DIR / f"{key}.npz"
    patches = None
    if npz.is_file():
        try:
            patches = PatchSet.load_npz(npz)
        except StateFileError as error:
            print(f"rebuilding the patch cache: {error}")
    if patches is None:
        patches = preprocess_manifest(records, workers=data.workers, allow=allow, options=options, cache=cache)
        patches.save_npz(npz)
        _check_inputs_unchanged(records, digests, cache, npz)
    return NumpySource(patches, fold_of, fingerprint)


def _cache_keys(config: ml_collections.ConfigDict, records: list, fingerprint: dict) -> tuple[str, dict[str, str]]:
    """The key of the config's patch set, and each lesion's patch key (fll_jax.data.lesion_cache)."""
    allow = parse_allow(config.data.allow)
    # Patches made before this version's checks, or with checks switched off, are kept apart from
    # the others: reused by a run that keeps those checks, they would pass it lesions it refuses.
    checked = (f"checks{CHECKS_VERSION}",) + (("allow=" + "+".join(sorted(allow)),) if allow else ())
    settings = fingerprint["preprocessing"].values()
    # A lesion's checks also read which mask values its patient's lesions claim (a row dropped
    # leaves its value unclaimed), so its patches are kept under them too.
    claims = mask_claims(records)
    return "-".join((fingerprint["patches"], *checked)), {
        r.lesion_id: patch_key(fingerprint["lesions"][r.lesion_id], *settings, *checked, sorted(claims[r.patient_id]))
        for r in records}


def unused_caches(config: ml_collections.ConfigDict, staging: bool = False) -> list[Path]:
    """The patch sets and lesions' patches under config.data.root that the config's data does not
    use: those of other data, settings, preprocessing or check versions, made again when needed.
    staging: also what interrupted writes left (only with the folder alone, root_caches.root_alone)."""
    check_config(config)
    records, _, fingerprint = describe_data(config)
    return _unused(Path(config.data.root), *_cache_keys(config, records, fingerprint), staging)


def _unused(root: Path, key: str, lesion_keys: dict[str, str], staging: bool = False) -> list[Path]:
    used = {root / RECORDS_DIR / key, root / PATCHES_DIR / f"{key}.npz",
            *(root / LESIONS_DIR / f"{k}.npz" for k in lesion_keys.values())}
    return [p for p in caches_in(root, staging) if p not in used]


def _note_preprocessing_code(root: Path) -> None:
    """Warn when the preprocessing code differs from the code that last made patches under root
    with this PREPROCESS_VERSION: the caches are named by the version, not the code, so patches
    made before the edit are reused as they are. Then record this code."""
    path = root / CODE_RECORD
    try:
        made = read_json(path, "") if path.is_file() else {}
    except StateFileError:
        made = {}  # only a record for this warning: written again below
    earlier = made.get(str(PREPROCESS_VERSION))
    if earlier == preprocessing_code():
        return
    if earlier is not None:
        files = ", ".join(f"fll_jax/{name}" for name in PREPROCESSING_FILES)
        warnings.warn(f"the preprocessing code ({files}) is {preprocessing_code()}, but the patches cached under "
                      f"{root} with PREPROCESS_VERSION {PREPROCESS_VERSION} were made by {earlier}: they are reused "
                      "as they are. If your edit changes what preprocessing makes, raise PREPROCESS_VERSION in "
                      "fll_jax/data/preprocess.py so that every patch is made again.", stacklevel=2)
    write_json(path, {**made, str(PREPROCESS_VERSION): preprocessing_code()})


def _check_inputs_unchanged(records: list, digests: FileDigests, cache: LesionCache, built: Path) -> None:
    """DataError when input files were rewritten while their lesions were preprocessed: patches of
    the new bytes would stay under the old bytes' key. Those lesions' patches and the set built
    (`built`: the npz or the records folder) are deleted first."""
    files = {r.lesion_id: [Path(p).absolute() for p in (*r.images.values(), *r.masks.values())] for r in records}
    changed = set(digests.changed([p for paths in files.values() for p in paths]))
    if not changed:
        return
    lesions = [lesion for lesion, paths in files.items() if changed.intersection(paths)]
    for lesion in lesions:
        cache.discard(lesion)
    if built.is_dir():
        shutil.rmtree(built)
    built.unlink(missing_ok=True)
    raise DataError(problem_report(
        "input files changed while the data was being prepared, so the patches of lesions "
        f"{', '.join(lesions)} were discarded; run the command again once the files are final:",
        [f"{path}: rewritten, replaced or deleted during preprocessing" for path in sorted(changed)]))


def check_data(config: ml_collections.ConfigDict) -> list[str]:
    """Every problem of a config's data set at once (manifest, folds, leaks, files), without preprocessing.

    The checks are those that training would meet one at a time; an empty list means none.
    Folds are checked on the rows that can be read. A phantom not made yet is not made here.
    """
    check_config(config)
    if config.data.source == "phantom":
        from fll_jax.data.phantom import MANIFEST_NAME

        if not (phantom_dir(config) / MANIFEST_NAME).is_file():
            return [f"{phantom_dir(config)}: no phantom made yet, so nothing to check (the phantom is generated, "
                    "not read: preprocess without --check makes it)"]
    path = manifest_path(config)
    try:
        records, problems = scan_manifest(path)
    except ManifestError as error:
        return error.problems
    fold_problems = _fold_problems(config, path, records)
    allow = parse_allow(config.data.allow)
    digests = _digests(config)
    files = file_digests(records, digests)
    problems += fold_problems + duplicate_problems(records, files, allow)
    digests.save()
    if not fold_problems:
        problems += fit_problems(config, lesion_fingerprints(records, _folds(config, records), files))
    return problems + lesion_problems(records, workers=config.data.workers, allow=allow)
