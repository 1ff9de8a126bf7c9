"""Is a finished run the run a command would train? Its saved ``config.yaml`` against a resolved config."""

from __future__ import annotations

from pathlib import Path

import yaml

from fabric_tram.config import Config, ConfigError, _plain, to_dict

# keys that change how a run is shown or driven, not what it computes: a finished run that differs only in them
# is the same run
PRESENTATION_KEYS = {"trainer.resume", "trainer.progress_bar", "trainer.log_every", "trainer.data_workers",
                     "trainer.loggers"}  # fmt: skip
PRESENTATION_PREFIXES = ("trainer.wandb.", "trainer.mlflow.")  # where a run is tracked, not what it computes


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_differences(run_dir: str | Path, config: Config, only: tuple[str, ...] = ()) -> list[str]:
    """How the run saved in ``run_dir`` (its ``config.yaml``) differs from ``config``, one ``key: saved there,
    wanted here`` per setting, or ``[]`` when it is the same run (``PRESENTATION_KEYS`` aside; with ``only``, just
    the keys starting with one of those prefixes). A caller about to reuse a finished run checks this first, so a
    smoke or another setting never stands in for the run asked for."""
    saved_file = Path(run_dir) / "config.yaml"
    if not saved_file.is_file():
        return [f"{saved_file} is missing: the folder holds no fabric_tram run"]
    saved = _flat(yaml.safe_load(saved_file.read_text()) or {})
    wanted = _flat(_plain(to_dict(config)))
    ignored = set(PRESENTATION_KEYS)
    if wanted.get("trainer.micro_batch_size") == "auto":  # chosen at start from free memory: the global batch counts
        ignored |= {"trainer.micro_batch_size", "trainer.accumulate"}
    return [f"{key}: {saved.get(key, '(unset)')!r} there, {wanted.get(key, '(unset)')!r} here"
            for key in sorted(set(saved) & set(wanted))  # a key one side lacks is from another version
            if key not in ignored and not key.startswith(PRESENTATION_PREFIXES) and saved.get(key) != wanted.get(key)
            and (not only or key.startswith(only))]  # fmt: skip


def refuse_another_run(run_dir: str | Path, config: Config, only: tuple[str, ...] = ()) -> None:
    """Raise a ConfigError naming what differs when ``run_dir`` holds another run than ``config`` would train
    (``only``: as :func:`run_differences`)."""
    differences = run_differences(run_dir, config, only)
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise ConfigError(
            f"{run_dir} holds a finished run of other settings than this command's ({shown}): delete that folder "
            "to train it again, or choose another output folder (--out)"
        )
