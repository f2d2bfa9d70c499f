"""A run folder: its lock, config.json, the checkpoint, the committed metrics and the files derived from them.

A run folder is consistent or it is not finished. An epoch is committed by one atomic step, the rename of
``checkpoint.pt``, which holds the state after the epoch *and* the metrics rows up to it; ``metrics.csv`` is
written just before it, so it is never behind the checkpoint, and rows past the checkpoint's epoch (a run killed
between the two renames) belong to an epoch that will be redone: every reader takes "finished" and "resume from"
from the checkpoint only (:func:`committed_epoch`, :func:`committed_metrics`). A folder written before
checkpoints held the metrics (no ``history`` in ``checkpoint.pt``) is read the same way, its metrics rows from
``metrics.csv`` up to the checkpoint's epoch.

:class:`RunFolder` reads a folder; only one opened for writing (:meth:`RunFolder.for_writing`, which takes the
folder's lock) writes to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd

from pyrozoo.config import TrainConfig
from pyrozoo.errors import PyrozooError, reason
from pyrozoo.io import FolderLock, atomic_write, save_torch
from pyrozoo.torchfile import load_tensors

CONFIG, METRICS, CHECKPOINT, PRUNED, SCALES, BMR_LOG = (
    "config.json",
    "metrics.csv",
    "checkpoint.pt",
    "pruned.pt",
    "scales.csv",
    "bmr.csv",
)
CHECKPOINT_KEYS = ("epoch", "step", "seconds", "guide", "model", "optimizer", "batches", "rng")


def read_checkpoint(folder: str | os.PathLike, mmap: bool = False) -> dict:
    """The state in ``folder/checkpoint.pt``; a corrupt or truncated file is a PyrozooError saying what to do.
    ``mmap`` maps the tensors instead of reading them (to read the epoch of a large checkpoint)."""
    path = Path(folder) / CHECKPOINT
    try:
        # on the CPU: the random states must stay there; load_state_dict moves the rest to the model's device
        state = load_tensors(path, mmap=mmap)
    except FileNotFoundError:
        raise PyrozooError(f"{folder} has no {CHECKPOINT}: nothing was trained there yet") from None
    except PyrozooError:
        raise
    except Exception as e:  # a truncated zip, a bad pickle, random bytes: torch raises many kinds
        state = e
    if isinstance(state, BaseException) or not isinstance(state, dict) or set(CHECKPOINT_KEYS) - set(state):
        why = reason(state) if isinstance(state, BaseException) else "not a pyrozoo checkpoint"
        raise PyrozooError(
            f"{path} is corrupt or truncated ({why}); it holds the run's only trained state: restore it from a "
            f"backup, or delete {folder} and train again"
        )
    return state


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.csv; a corrupt file is a PyrozooError naming it."""
    path = Path(path)
    try:
        table = pd.read_csv(path)
        if "epoch" not in table or not pd.api.types.is_integer_dtype(table["epoch"]):
            raise ValueError("no whole-number epoch column")
    except FileNotFoundError:
        return []
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PyrozooError(
            f"{path} is corrupt ({reason(e)}): delete it, or restore it from a backup"
        ) from None
    return table.to_dict("records")


def committed_history(folder: Path, state: dict) -> list[dict]:
    """The metrics rows of the epochs ``state`` (a checkpoint) commits."""
    if "history" in state:
        return [dict(row) for row in state["history"]]
    # A folder from before checkpoints held the metrics: its metrics.csv up to the checkpoint's epoch (rows
    # past it belong to an epoch that will be redone).
    rows = [r for r in read_metrics(folder / METRICS) if r["epoch"] <= state["epoch"]]
    if [r["epoch"] for r in rows] != list(range(1, state["epoch"] + 1)):
        raise PyrozooError(
            f"{folder / METRICS} does not hold one row for each of the {state['epoch']} epochs that "
            f"{CHECKPOINT} has trained: restore it from a backup, or delete {folder} and train again"
        )
    return rows


def committed_bmr_log(folder: Path, state: dict) -> list[dict]:
    """The BMR log rows (one per pass and layer) of the epochs ``state`` (a checkpoint) commits."""
    if "bmr_log" in state:
        return [dict(row) for row in state["bmr_log"]]
    return [r for r in read_metrics(folder / BMR_LOG) if r["epoch"] <= state["epoch"]]  # an older folder


def committed_epoch(folder: str | os.PathLike) -> int:
    """The last epoch committed in ``folder`` (0 when it has no checkpoint)."""
    if not (Path(folder) / CHECKPOINT).exists():
        return 0
    return int(read_checkpoint(folder, mmap=True)["epoch"])


def committed_metrics(folder: str | os.PathLike) -> pd.DataFrame:
    """The metrics rows of the committed epochs of a run folder (a folder without a checkpoint, such as a
    baseline's, has only its metrics.csv)."""
    folder = Path(folder)
    if not (folder / CHECKPOINT).exists():
        return pd.DataFrame(read_metrics(folder / METRICS))
    return pd.DataFrame(committed_history(folder, read_checkpoint(folder, mmap=True)))


def read_config_record(folder: str | os.PathLike) -> dict:
    """The record in ``folder/config.json`` (``config``, ``data_source``, ...); a corrupt one is a PyrozooError."""
    path = Path(folder) / CONFIG
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise ValueError("no config table")
        TrainConfig.from_record(record["config"])
    except FileNotFoundError:
        raise PyrozooError(f"{folder} holds no run: it has no {CONFIG}") from None
    except (ValueError, UnicodeDecodeError, PyrozooError) as e:
        raise PyrozooError(
            f"{path} is corrupt ({reason(e)}): restore it from a backup, or delete {folder} and train again"
        ) from None
    return record


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunFolder:
    """The files of the run in ``path``. Read-only: :meth:`for_writing` opens one that writes, holding the
    folder's lock until :meth:`close` (one writer per run folder)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock: FolderLock | None = None

    @classmethod
    def for_writing(cls, path: str | os.PathLike, resume: bool, agree=lambda act: act()) -> "RunFolder":
        """The folder ``path``, locked for this process (made if new). Without ``resume`` it must hold no run.
        ``agree`` runs the locking (a data-parallel world's, so that every rank stops if rank 0 cannot)."""
        folder = cls(path)
        folder._lock = FolderLock(folder.path, instead=None if resume else "choose another --out")
        agree(folder._lock.acquire)
        if (folder.path / CHECKPOINT).exists() and not resume:
            folder.close()
            raise PyrozooError(
                f"{folder.path} already holds a run; pass --resume to continue it, or choose another --out"
            )
        return folder

    def close(self) -> None:
        """Give up the folder's lock (another process may then write to it)."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------------------------------------

    def record(self) -> dict:
        return read_config_record(self.path)

    def checkpoint(self, mmap: bool = False) -> dict:
        return read_checkpoint(self.path, mmap=mmap)

    def history(self, state: dict) -> list[dict]:
        """The metrics rows that checkpoint ``state`` commits."""
        return committed_history(self.path, state)

    def bmr_log(self, state: dict) -> list[dict]:
        """The BMR log rows that checkpoint ``state`` commits."""
        return committed_bmr_log(self.path, state)

    def epoch(self) -> int:
        return committed_epoch(self.path)

    def metrics(self) -> pd.DataFrame:
        return committed_metrics(self.path)

    def source(self, epoch: int, step: int) -> dict:
        """Which committed state a result comes from: its epoch, step and the checksum of checkpoint.pt."""
        return {"epoch": epoch, "step": step, "checkpoint_sha256": sha256(self.path / CHECKPOINT)}

    def pruned(self, source: dict) -> dict:
        """The post-hoc pruned state in pruned.pt, refused if it was made from another checkpoint than
        ``source`` (:meth:`source`: the run has been trained further since)."""
        path = self.path / PRUNED
        redo = f"prune again (pyrozoo prune {self.path}), or delete {path}"
        try:
            state = load_tensors(path, fix=redo)
            if not isinstance(state, dict) or not {"guide", "model", "metrics"} <= set(state):
                raise ValueError("not a pyrozoo pruned state")
        except FileNotFoundError:
            raise PyrozooError(f"{self.path} has no {PRUNED}: run pyrozoo prune {self.path} first") from None
        except PyrozooError:
            raise
        except Exception as e:
            raise PyrozooError(f"{path} is corrupt or truncated ({reason(e)}): {redo}") from None
        made = state.get("source", {"epoch": state.get("epoch")})  # before sources: the epoch alone
        stale = [k for k in ("epoch", "step", "checkpoint_sha256") if k in made and made[k] != source[k]]
        if stale:
            was = f"epoch {made.get('epoch')}" + (f", step {made['step']}" if "step" in made else "")
            why = (
                f"the run is now at epoch {source['epoch']}, step {source['step']}"
                if {"epoch", "step"} & set(stale)
                else "checkpoint.pt has been written again since"
            )
            raise PyrozooError(f"{path} was pruned from the checkpoint of {was}, but {why}: {redo}")
        state["redo"] = redo
        return state

    # --- writing (only when opened for writing) --------------------------------------------------------------

    def _writable(self) -> Path:
        if self._lock is None:
            raise PyrozooError(
                f"{self.path} was opened read-only: open it with RunFolder.for_writing to write"
            )
        return self.path

    def write_record(self, record: dict) -> None:
        atomic_write(self._writable() / CONFIG, lambda p: p.write_text(json.dumps(record, indent=2)))

    def write_table(self, name: str, rows: list[dict]) -> None:
        """A CSV of ``rows`` (metrics.csv, bmr.csv, scales.csv)."""
        table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
        atomic_write(self._writable() / name, lambda p: table.to_csv(p, index=False))

    def commit(self, state: dict) -> None:
        """Write checkpoint.pt: the epoch is done once this rename is."""
        atomic_write(self._writable() / CHECKPOINT, lambda p: save_torch(state, p))

    def save_pruned(self, state: dict) -> None:
        atomic_write(self._writable() / PRUNED, lambda p: save_torch(state, p))
