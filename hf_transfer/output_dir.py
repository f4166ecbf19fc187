"""The output folder: who owns it, the run's lock on it, and publishing a finished model into it.

A folder belongs to hf-transfer once a run has claimed it (`run_config.json`); the files it owns there are those a run
writes (`owns`), and `--overwrite` deletes those and nothing else. The main process holds an `flock` on
`.hf_transfer.lock` for the whole run: the kernel drops it when the process ends, however it ends, so a killed run never
leaves the folder locked, and a second run into the folder is refused while the first one lives.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import re
import reprlib
import shutil
import socket
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import filelock

from .checkpoints import last_complete_checkpoint, no_complete_checkpoint
from .errors import HFTransferError
from .repo_files import CONFIG, LOCK_FILE, ONNX_DIR, RUN_CONFIG, RUN_OUTPUTS, STAGING, without_local_paths

if TYPE_CHECKING:
    from .options import RunArguments

# The options a run in the folder may change and still be the same run: `--resume` continues it with them, so each must
# leave what trains untouched (a resumed run under another `feature_cache` or `exclude_flagged` would mix two settings,
# and its card and recipe.yaml would describe only the second). Every other key of run_config.json must match.
SAME_RUN_CHANGES = {
    "run.resume", "run.overwrite",  # what to do with the folder, not how to train
    "training.output_dir", "training.logging_dir",  # the folder itself may have been moved
    # How often the loss is logged, and where: evaluations and checkpoints have their own options (eval_steps is
    # compared too, so a logging_steps that TrainingArguments copies into it is refused there).
    "training.logging_strategy", "training.logging_steps", "training.logging_first_step", "training.report_to",
    "training.run_name", "training.log_level", "training.log_level_replica", "training.log_on_each_node", "training.disable_tqdm",
    "training.push_to_hub", "training.hub_model_id", "training.hub_private_repo",  # pushed once, after the run (hub.py)
    "doctor.doctor_sheet_size",  # how many suspects the data doctor's contact sheet shows: a picture, not a decision
}
# A run's folders: Trainer's checkpoints, the staging folder, TensorBoard's default `runs/`, `hf-transfer export`'s graphs. Its
# files are repo_files.RUN_OUTPUTS: a new output file is named there, or --overwrite would refuse it as foreign.
OWNED_FOLDERS = re.compile(rf"checkpoint-\d+|runs|{re.escape(STAGING)}|{re.escape(ONNX_DIR)}")


class OutputDirError(HFTransferError, RuntimeError):
    """The output folder holds something this run must not overwrite, or cannot be written."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says how to continue. A KeyboardInterrupt still, so nothing swallows it."""


# ---- who owns the folder -------------------------------------------------------------------------------------------
def owns(entry: Path) -> bool:
    """Whether `entry`, in an output folder, is something a run wrote there. Links never are: they may lead anywhere."""
    if entry.is_symlink():
        return False
    if OWNED_FOLDERS.fullmatch(entry.name):
        return entry.is_dir()
    return entry.is_file() and any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in RUN_OUTPUTS)


def foreign_entries(output_dir: Path) -> list[str]:
    return sorted(entry.name for entry in output_dir.iterdir() if not owns(entry)) if output_dir.is_dir() else []


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_output_dir(output_dir: Path, run_config: dict, options: RunArguments) -> None:
    """Refuse, before any work, to mix two runs in one folder, or to write or delete where it would do harm."""
    check_place(output_dir, run_config, options.overwrite)
    config_file = output_dir / RUN_CONFIG
    if not config_file.is_file():
        held = sorted(name for name in os.listdir(output_dir) if name not in (LOCK_FILE, STAGING)) if output_dir.is_dir() else []
        if held:  # no run ever claimed it: even files named like ours (a downloaded model) are someone else's
            raise OutputDirError(f"{output_dir} is not empty and was not written by hf-transfer (it holds {_listing(held)}); "
                                 "`--overwrite` only replaces a folder that hf-transfer wrote. Choose another `--output_dir`.")
    elif options.overwrite:
        if others := foreign_entries(output_dir):
            raise OutputDirError(f"{output_dir} holds files that hf-transfer did not write: {_listing(others)}. `--overwrite` "
                                 "deletes only what an earlier run wrote there: move those files away, or choose another `--output_dir`.")
        return
    else:
        # Both as run_config.json records them (a folder written before it stopped recording absolute paths too).
        previous, now = (_flatten(without_local_paths(config)) for config in (_read_run_config(config_file), run_config))
        changed = sorted(k for k in set(previous) | set(now) if k not in SAME_RUN_CHANGES and previous.get(k) != now.get(k))
        if changed and options.resume:
            differences = "; ".join(f"{key}: {reprlib.repr(previous.get(key))} in the folder, {reprlib.repr(now.get(key))} now"
                                    for key in changed[:8])
            raise OutputDirError(f"`--resume` continues the run in {output_dir}, which was trained with other options ({differences}"
                                 f"{f' and {len(changed) - 8} more' if len(changed) > 8 else ''}). A resumed run keeps the run's "
                                 "options (only logging and reporting ones may change): pass them as before, or start again with "
                                 "`--overwrite`.")
        if changed:
            raise OutputDirError(f"{output_dir} already holds a different run (differs in: {', '.join(changed[:8])}). "
                                 "Pass `--overwrite` to replace it, or choose another `--output_dir`.")
    if options.resume and last_complete_checkpoint(output_dir) is None:
        raise OutputDirError(no_complete_checkpoint(output_dir))


def check_place(output_dir: Path, run_config: dict, overwrite: bool) -> None:
    """Folders that must never hold a run: a file, the dataset's own folder, the home folder; a link, for `--overwrite`."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"{output_dir} is a file, not a folder: choose another `--output_dir`.")
    place = output_dir.resolve()
    dataset = _local_dataset(run_config)
    if dataset is not None and (place == dataset or dataset in place.parents):
        raise OutputDirError(f"{output_dir} is inside the dataset folder {dataset}: its files would be read as part of the dataset "
                             "the next time it loads (an image folder takes the plots for images). Choose an `--output_dir` outside it.")
    if dataset is not None and place in dataset.parents:
        raise OutputDirError(f"{output_dir} holds the dataset {dataset}: choose an `--output_dir` outside it.")
    home = Path.home().resolve()
    if place == home:
        raise OutputDirError(f"{output_dir} is your home folder: choose another `--output_dir`.")
    if place in home.parents:
        raise OutputDirError(f"{output_dir} holds your home folder {home}: choose another `--output_dir`.")
    if overwrite and output_dir.is_symlink():
        raise OutputDirError(f"{output_dir} is a symbolic link (to {place}), and `--overwrite` does not delete through links: "
                             f"pass the folder itself, `--output_dir {place}`.")


def _local_dataset(run_config: dict) -> Path | None:
    name = str(run_config.get("data", {}).get("dataset") or "")
    path = Path(name).expanduser()
    return path.resolve() if name and path.exists() else None


def claim_output_dir(output_dir: Path, run_config: dict, overwrite: bool) -> None:
    """Record which run the folder holds, once data and model have loaded and training is about to start.

    With `--overwrite`, this is when the earlier run's files go: only those (`check_output_dir` refused any other)."""
    if overwrite and output_dir.is_dir():
        if others := [name for name in foreign_entries(output_dir) if name != LOCK_FILE]:  # added since the start of the run
            raise OutputDirError(f"{output_dir} holds files that hf-transfer did not write: {_listing(others)} (added since "
                                 "this run started). Move them away, then run the same command again.")
        # config.json first, as in `publish`: killed half-way, the folder loads nothing rather than half a model.
        for entry in sorted(output_dir.iterdir(), key=lambda path: path.name != CONFIG):
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.name != LOCK_FILE:
                entry.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_CONFIG).write_text(json.dumps(run_config, indent=2, default=str))


def _flatten(sections: dict) -> dict:
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


def _read_run_config(config_file: Path) -> dict:
    """The folder's run_config.json, sections of options (it comes from disk: anything else is refused)."""
    try:
        sections = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise OutputDirError(f"{config_file} is unreadable ({reprlib.repr(str(error))}), so which run the folder holds is "
                             "unknown. Restore it, or start again with `--overwrite`.") from None
    if not (isinstance(sections, dict) and all(isinstance(values, dict) for values in sections.values())):
        raise OutputDirError(f"{config_file} is not a run's options by section, so which run the folder holds is unknown. "
                             "Restore it, or start again with `--overwrite`.")
    return sections


# ---- publishing ----------------------------------------------------------------------------------------------------
def publish(staging: Path, output_dir: Path) -> None:
    """Move the staged files in; config.json goes last, so the folder never loads a mix of two models. Graphs exported from
    the weights this replaces go: they would no longer match them. A staged file that is the published one (a figure
    kept because it shows the same, `figures.draw`) stays as it is."""
    (output_dir / CONFIG).unlink(missing_ok=True)
    if (output_dir / ONNX_DIR).is_dir() and not (output_dir / ONNX_DIR).is_symlink():
        shutil.rmtree(output_dir / ONNX_DIR)
    files = sorted(staging.iterdir(), key=lambda path: path.name == CONFIG)
    for path in files:
        target = output_dir / path.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.is_file() and not target.is_symlink() and os.path.samefile(path, target):
            path.unlink()  # a figure kept from the model this replaces (figures.draw links it): already in place
            continue
        os.replace(path, target)
    staging.rmdir()


# ---- the run's lock ------------------------------------------------------------------------------------------------
class OutputDirLock:
    """An exclusive lock on `output_dir/.hf_transfer.lock` (filelock's `flock`), which records its holder for the refusal
    message. The file is removed at release while still held: filelock retries an acquire that won the lock of a file
    removed meanwhile, so two runs never both hold the folder."""

    def __init__(self, output_dir: Path):
        self.dir, self.path = output_dir, output_dir / LOCK_FILE
        self.lock = filelock.FileLock(self.path, timeout=0, on_acquired=lambda fd: _record_holder(fd, self.path))
        self.created: list[Path] = []  # the folders this run made, removed again if it ends before claiming them

    @property
    def held(self) -> bool:
        return self.lock.is_locked

    def acquire(self) -> None:
        try:
            self._make_folders()
            self.lock.acquire()
        except BaseException as error:
            self.release()
            if isinstance(error, filelock.Timeout):
                raise OutputDirError(f"{self.dir} is in use by another hf-transfer run ({_describe_holder(self.path)}). Wait for "
                                     "it to finish, or choose another `--output_dir`.") from None
            if isinstance(error, OSError) and (disk := disk_error(error, self.dir, writing=True)) is not None:
                raise disk from error
            raise

    def _make_folders(self) -> None:
        missing = [folder for folder in (self.dir, *self.dir.parents) if not folder.exists()]
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:  # a broken link, or made meanwhile
                if not folder.is_dir():
                    raise OutputDirError(f"{folder} is a file, not a folder: choose another `--output_dir`.") from None
                continue
            except NotADirectoryError:
                raise OutputDirError(f"{folder.parent} is a file, not a folder: choose another `--output_dir`.") from None
            self.created.append(folder)

    def release(self) -> None:
        if self.lock.is_locked:
            self.path.unlink(missing_ok=True)  # while still held: see the class docstring
            self.lock.release()
        for folder in reversed(self.created):  # empty unless the run claimed the folder
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []


def _record_holder(fd: int, path: Path) -> None:
    """filelock's `on_acquired`: runs while the lock is held. On a full disk it removes the empty lock file again (still held,
    as in `release`) before filelock releases it, so a run refused for want of space leaves the folder as it found it."""
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
    except OSError:
        path.unlink(missing_ok=True)
        raise


def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_bytes()[:4096])
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started'].replace('T', ' ')}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "which has not recorded itself yet"


def disk_error(error: BaseException, output_dir: Path, writing: bool = False) -> OutputDirError | None:
    """The one-line error for a full or read-only disk (or, while the lock is taken, a folder we may not write); else None."""
    code = getattr(error, "errno", None)
    # Other libraries (safetensors) give only the text "(os error 28)".
    if not isinstance(error, OSError) and (match := re.search(r"\(os error (\d+)\)", str(error))):
        code = int(match[1])
    where = Path(getattr(error, "filename", None) or output_dir)
    if code == errno.EROFS or (writing and code in (errno.EACCES, errno.EPERM)):
        reason = "read-only file system" if code == errno.EROFS else "permission denied"
        return OutputDirError(f"Cannot write to {where}: {reason}. Make it writable, or choose a writable `--output_dir`.")
    if code in (errno.ENOSPC, errno.EDQUOT):
        staging = output_dir / STAGING
        what = f" (while saving the model to {staging})" if staging.is_dir() else ""
        checkpoint = last_complete_checkpoint(output_dir) if output_dir.is_dir() else None
        then = (f"run the same command with `--resume` to continue from the last complete checkpoint, {checkpoint}" if checkpoint
                else "run the same command again")
        return OutputDirError(f"No space left on the device holding {where}{what}. Free some space, then {then}.")
    return None


def _interrupted(output_dir: Path) -> RunInterrupted:
    checkpoint = last_complete_checkpoint(output_dir) if output_dir.is_dir() else None
    if checkpoint is None:
        return RunInterrupted("interrupted before the first checkpoint was saved; run the same command again to start over.")
    return RunInterrupted(f"interrupted; the last complete checkpoint, {checkpoint}, is kept: run the same command with "
                          "`--resume` to continue from it.")


@contextlib.contextmanager
def holding_output_dir(args, run_config: dict, overwrite: bool):
    """The run's output folder, locked from start to end by the process that writes it (`args.should_save`: the main
    process, or with node-local output folders on several machines each machine's main process; others only read it).
    `run_config`: the recipe with its local paths (`Recipe.to_dict(local_paths=True)`), to refuse harmful places.

    However the run ends, the lock is released and the staging folder removed; a full or read-only disk and Ctrl-C
    become one line that says what to do."""
    output_dir = Path(args.output_dir)
    lock = OutputDirLock(output_dir) if args.should_save else None
    finished = False
    try:
        if lock is not None:
            check_place(output_dir, run_config, overwrite)  # before anything is made there
            lock.acquire()
        yield
        finished = True
    except KeyboardInterrupt:
        raise _interrupted(output_dir) from None
    except Exception as error:
        if (disk := disk_error(error, output_dir)) is None:
            raise
        raise disk from error
    finally:
        if lock is not None:
            if lock.held and not finished:  # a half-staged model: never published, and it may have filled the disk
                shutil.rmtree(output_dir / STAGING, ignore_errors=True)
            lock.release()
