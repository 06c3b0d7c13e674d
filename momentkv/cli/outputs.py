"""Output folders of the commands that write files: checked before any work, never emptied of others' files.

Every command that writes (``eval``, ``report``, ``tune``, ``bench``, ``eval --store``, ``lm-eval
--output_path``) calls :func:`check_output_folder` on its output path before it loads a model or runs
anything. The path is resolved first (``~``, ``.`` and ``..`` included), then refused, with a message naming
the path and what to do, when it is the filesystem root, an existing file, under a file, not writable, or a
folder that already holds files the command did not write (lm-eval's folders excepted: it only adds files).

A folder is the command's own when it holds the manifest :data:`MANIFEST` that the command wrote there, or
(folders written before the manifest existed) when every entry in it has a name the command writes.
:func:`publish` writes a run's files into a staging folder and moves them into place only once all are
written; it replaces the files of the previous run (listed in the manifest) and deletes only those of them
that this run no longer writes. Nothing else in the folder is touched.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

MANIFEST = ".momentkv-output.json"
PARTIAL = ".momentkv-partial-"  # staging folders; a run killed while publishing may leave one


@dataclass(frozen=True)
class Output:
    """What a command writes into its output folder.

    ``patterns``: the names it writes; a folder without a manifest is taken for a previous run of the command
    (written before manifests existed) when every entry matches them and one of ``marks`` is there, or when
    ``legacy`` accepts it.
    """

    command: str
    patterns: tuple[str, ...] = ()
    marks: tuple[str, ...] = ()
    legacy: Callable[[Path], bool] | None = None

    def is_legacy(self, folder: Path, entries: list[str]) -> bool:
        if self.legacy is not None and self.legacy(folder):
            return True
        return bool(self.patterns) and _names_match(entries, self.patterns) and any(m in entries for m in self.marks)


def _is_store(folder: Path) -> bool:
    """A folder of ``eval --store`` references: every entry is a reference folder."""
    inside = ("reference.json", "tokens.npy", "logprobs.npy", "passes")
    return all(entry.is_dir() and any((entry / n).exists() for n in inside)
               for entry in folder.iterdir() if entry.name != MANIFEST)


EVAL_FILES = ("results.md", "results.csv", "prompts.csv", "raw.pt", "kl_vs_budget.png", "kl_vs_total.png",
              "kl_vs_step_B*.png", "kl_vs_step_T*.png")
EVAL = Output("eval", EVAL_FILES, ("results.csv",))
REPORT = Output("report", EVAL_FILES + ("fidelity_vs_speed_B*.png",), ("results.csv",))
BENCH = Output("bench", ("bench.csv", "bench.png", "bench.md", "attention_heavy.md", "attention_heavy.json"),
               ("bench.csv", "attention_heavy.json"))
TUNE = Output("tune", ("study.db", "study.db-journal", "store", "best.yaml", "tune.md", "summary.json"),
              ("study.db", "store"))
STORE = Output("eval --store", legacy=_is_store)
# lm-eval adds timestamped result files under its --output_path and deletes none: any folder takes them.
LM_EVAL = Output("lm-eval", legacy=lambda folder: True)


class OutputPathError(Exception):
    """An output path that cannot take a command's output; the message names the path and what to do."""


def _names_match(names: Iterable[str], patterns: Iterable[str]) -> bool:
    patterns = tuple(patterns)
    return all(any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in names)


def _entries(folder: Path) -> list[str]:
    """What the folder holds, without our manifest and staging folders."""
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST and not p.name.startswith(PARTIAL))


def read_manifest(folder: Path) -> dict | None:
    """The manifest a command wrote into ``folder``, or None."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("command"), str) else None


def written_by(folder: Path, output: Output) -> list[str] | None:
    """The names in ``folder`` that ``output.command`` wrote there, or None if the folder holds anything else.

    The folder is the command's when its manifest names the command (the names it lists are the command's;
    anything else a user put there is kept), or, without a manifest, when ``output`` recognises it (see
    :class:`Output`).
    """
    entries = _entries(folder)
    manifest = read_manifest(folder)
    if manifest is not None:
        if manifest["command"] != output.command:
            return None
        listed = {str(n) for n in manifest.get("files", [])}
        return [n for n in entries if n in listed]
    if not entries or output.is_legacy(folder, entries):
        return entries
    return None


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def resolve(path) -> Path:
    """``path`` with ``~`` expanded, absolute, ``.`` and ``..`` and links resolved."""
    text = os.fspath(path)
    if not str(text).strip():
        raise OutputPathError("the output path is empty: name a folder")
    return Path(os.path.expanduser(text)).resolve()


def _check_creatable(folder: Path, shown: str) -> None:
    """``folder`` (absent) can be created: its nearest existing ancestor is a writable folder."""
    ancestor = folder.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{shown}: cannot create it, {ancestor} is a file; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{shown}: cannot create it, {ancestor} is not writable; choose another path")


def check_output_folder(path, output: Output, option: str = "--out") -> Path:
    """Check that ``path`` can take ``output``'s files; return it resolved.

    Accepted: a folder that does not exist yet (under a writable folder), an empty folder, or a folder of a
    previous run of the same command (see :func:`written_by`). Raises :class:`OutputPathError` otherwise.
    """
    folder = resolve(path)
    shown = f"{option} {path}" + (f" ({folder})" if str(folder) != os.fspath(path) else "")
    if folder == folder.parent:
        raise OutputPathError(f"{shown} is the filesystem root; name a folder for the output")
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{shown} is a file, not a folder; name a folder for the output")
    if not folder.exists():
        _check_creatable(folder, shown)
        return folder
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{shown} is not writable; choose another folder")
    if written_by(folder, output) is None:
        entries = _entries(folder)
        raise OutputPathError(
            f"{shown} already holds files that momentkv {output.command} did not write ({_describe(entries)}); "
            "nothing there is replaced or deleted: choose a new or empty folder")
    return folder


def check_output_file(path, option: str) -> Path:
    """Check that a file can be written at ``path`` (not a folder, its folder writable or creatable)."""
    target = resolve(path)
    shown = f"{option} {path}" + (f" ({target})" if str(target) != os.fspath(path) else "")
    if target.is_dir():
        raise OutputPathError(f"{shown} is a folder; name a file")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputPathError(f"{shown} is not writable; choose another path")
    if target.parent.is_dir():
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise OutputPathError(f"{shown}: {target.parent} is not writable; choose another path")
    elif target.parent.exists():
        raise OutputPathError(f"{shown}: {target.parent} is a file; choose another path")
    else:
        _check_creatable(target.parent, shown)
    return target


def write_manifest(folder: Path, command: str, files: Iterable[str]) -> None:
    """Mark ``folder`` as ``command``'s output, listing the names it wrote there (atomically)."""
    from momentkv import __version__

    data = {"command": command, "files": sorted(set(files)), "momentkv": __version__,
            "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = Path(folder) / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, Path(folder) / MANIFEST)


def claim(folder: Path, output: Output, files: Iterable[str]) -> None:
    """Create ``folder`` if needed and mark it as ``command``'s (for a command that writes as it runs and
    resumes from what it wrote, such as ``tune``); files already listed stay listed."""
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, output.command, [*(written_by(folder, output) or []), *files])


def publish(folder: Path, output: Output, write: Callable[[Path], object]) -> list[str]:
    """Call ``write(staging)`` to write a run's files, then put them in ``folder``; return their names.

    ``folder`` must have passed :func:`check_output_folder`. A new folder is created whole (by renaming the
    staging folder); an existing one receives the new files, loses the previous run's files that this run
    did not write, and keeps everything else. If ``write`` fails, nothing in ``folder`` changes.
    """
    folder = Path(folder)
    existed = folder.is_dir()
    if existed:
        staging = Path(tempfile.mkdtemp(prefix=PARTIAL, dir=folder))
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}{PARTIAL}", dir=folder.parent))
    try:
        write(staging)
        names = sorted(p.name for p in staging.iterdir())
        dirs = [n for n in names if (staging / n).is_dir()]
        if dirs:
            raise RuntimeError(f"momentkv {output.command} staged folders ({', '.join(dirs)}); only files are "
                               "published")
        if not existed:
            write_manifest(staging, output.command, names)
            staging.rename(folder)
            return names
        previous = written_by(folder, output)
        if previous is None:
            raise OutputPathError(f"{folder} now holds files that momentkv {output.command} did not write; the new "
                                  f"output was not written there: rerun with another folder")
        foreign = [n for n in names if (folder / n).exists() and n not in previous]
        if foreign:
            raise OutputPathError(f"{folder} now holds {_describe(foreign)}, not written by momentkv "
                                  f"{output.command}; the new output was not written there: rerun with another folder")
        # Listed before they arrive, so that a run killed while moving them leaves a folder still its own.
        write_manifest(folder, output.command, [*previous, *names])
        for name in names:
            os.replace(staging / name, folder / name)
        for name in sorted(set(previous) - set(names)):
            if (folder / name).is_file():
                (folder / name).unlink()
        write_manifest(folder, output.command, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stale in folder.glob(f"{PARTIAL}*"):  # left by a run killed while publishing
        shutil.rmtree(stale, ignore_errors=True)
    return names
