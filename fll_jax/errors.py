"""Errors that mean bad input or damaged state rather than a bug: entry points print them plainly.

Each of these names the file, setting or lesion at fault and what to do; a traceback would
only bury that. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path


def user_errors() -> tuple[type[BaseException], ...]:
    from fll_jax.ablation.points import SweepError
    from fll_jax.config_check import ConfigError
    from fll_jax.data.folds import FoldError
    from fll_jax.data.manifest import ManifestError
    from fll_jax.data.prepare import DataError
    from fll_jax.data.preprocess import PreprocessError
    from fll_jax.data.root_caches import PruneRefused
    from fll_jax.evaluation.predictions import PredictionsError
    from fll_jax.evaluation.readers import ReadersError
    from fll_jax.files import StateFileError

    errors = [SweepError, ConfigError, FoldError, ManifestError, DataError, PreprocessError, PruneRefused,
              PredictionsError, ReadersError, StateFileError, FileExistsError]
    try:  # DICOM support is an extra (pydicom)
        from fll_jax.data.dicom import DicomError

        errors.append(DicomError)
    except ImportError:
        pass
    try:  # the training modules need JAX; data tools run without it
        from fll_jax.evaluation.comparison import ComparisonError
        from fll_jax.inference import PredictionError
        from fll_jax.saliency.explain import ExplainError
        from fll_jax.train.checkpoints import CheckpointError
        from fll_jax.train.loop import NonFiniteLossError
    except ImportError:
        return tuple(errors)
    return (*errors, CheckpointError, ComparisonError, ExplainError, NonFiniteLossError, PredictionError)


@contextlib.contextmanager
def reported_as(program: str) -> Iterator[None]:
    """Exit with status 1 and the message of a user error (no traceback), prefixed by the program.

    SIGTERM (a scheduler's time limit or preemption, `kill`) ends the block like Ctrl-C does, by an
    exception, so that its cleanup runs: staging folders are removed and earlier outputs stay whole.
    Its default action ends the process at once, leaving them behind."""
    def stopped(signum: int, frame) -> None:
        signal.signal(signum, signal.SIG_IGN)  # a second one (a sweep driver passing it on) must not cut the cleanup
        raise SystemExit(f"{program}: stopped by {signal.Signals(signum).name}; rerun the same command to go on")

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, stopped) if main_thread else None
    try:
        yield
    except user_errors() as error:
        # The program ends here; reads that orbax abandoned on a damaged checkpoint would only add
        # "Event loop is closed" noise below the message as their threads are torn down.
        sys.unraisablehook = lambda unraisable: None
        raise SystemExit(f"{program}: {error}") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def no_stray_arguments(argv: list[str]) -> None:
    """Refuse words left after the flags: absl reads `--restart False` as --restart and a stray
    'False', so a boolean flag would silently mean true."""
    if len(argv) > 1:
        from absl import app

        raise app.UsageError(f"unexpected argument(s): {' '.join(argv[1:])} (a boolean flag is set as --flag=false or "
                             "--noflag, not with a separate word)")


def parse_config_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for a command with a `--config` file flag (app.run's flags_parser),
    with a config that cannot be read named in one line: ml_collections answers an override of
    no setting (`--config.model.fusoin`) and a missing config file with a traceback, and embeds
    one in its message when the file's get_config refuses its config string."""
    import ast

    from absl import flags

    def refuse(message: str):
        sys.stderr.write(f"{Path(argv[0]).stem}: {message}\n")
        sys.exit(1)

    try:
        args = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value
        if config is not None:
            config.to_dict  # ml_collections' stand-in for a file that failed to load raises when read
        return args
    except (KeyError, AttributeError) as error:  # an override of no setting
        text = str(error.args[0]) if error.args else ""
        while text[:1] in ("'", '"'):  # the message, quoted by KeyError and again by ml_collections
            try:
                text = ast.literal_eval(text)
            except (SyntaxError, ValueError):  # the key's own quotes, before a hint
                break
        name, *hint = text.splitlines() or [""]
        name = name.strip("'\"")
        named = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and name in a.split("=")[0].split(".")]
        if not named:
            raise  # the config file's own error: its traceback shows the line
        refuse(f"{', '.join(named)}: no such setting {name}" + "".join(f"; {line}" for line in hint))
    except OSError as error:
        refuse(f"--config: {str(error).splitlines()[-1].strip()}")
    except flags.Error as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if "Traceback (most recent call last):" in lines:  # the config file's own error, last
            lines = [lines[0].rstrip(":"), lines[-1]]
        refuse(": ".join(lines))
