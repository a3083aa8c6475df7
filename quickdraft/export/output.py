"""The output folder of an export: checks made before any heavy work, the hidden staging
folder renamed into place at the end, the marker that says a folder is an export, and
cleanup on SIGINT, SIGTERM and failure."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from quickdraft.export import checks, gguf
from quickdraft.export.checks import ExportError, SourceInfo
from quickdraft.export.common import (
    ExportInto,
    ExportReport,
    ModelReport,
    Progress,
    emit,
    quiet,
)
from quickdraft.manifest import MANIFEST_NAME, load_manifest

__all__ = [
    "MARKER_NAME",
    "PAIR_ROLES",
    "ExportInterrupted",
    "is_export",
    "resolve_out",
    "check_destination",
    "remove_stale_partials",
    "interrupt_on_sigterm",
    "write_model",
    "write_pair",
    "run_model",
    "run_pair",
]

# written at the root of every export; --overwrite replaces only a folder that has it (or
# the manifest of an export made before the marker existed)
MARKER_NAME = "quickdraft-export.json"
MARKER_FORMAT = "quickdraft-export"
MARKER_VERSION = 1
# the model folders of a pair export, in the order they are exported (draft_draft optional)
PAIR_ROLES = ("target", "draft", "draft_draft")
_PARTIAL = ".{name}.partial-{pid}-"  # + mkdtemp's 8 random characters
_RANDOM = r"[a-z0-9_]{8}"

# precheck(sources) runs before the sources are loaded; prepare(infos) -> export step
Precheck = Callable[[Sequence[str]], None]
Prepare = Callable[[Sequence[SourceInfo]], ExportInto]


class ExportInterrupted(KeyboardInterrupt):
    """A signal (SIGTERM) stopped the export; raised like Ctrl-C so its cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = signum


# -- the destination, checked before anything heavy ----------------------------------------


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a quickdraft export (a pair or one model)."""
    marker = folder / MARKER_NAME
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("format") == MARKER_FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    # exports written before the marker: a model's manifest, or a pair's target manifest
    return (folder / MANIFEST_NAME).is_file() or (folder / "target" / MANIFEST_NAME).is_file()


def resolve_out(out: str | os.PathLike) -> Path:
    """The absolute output folder; refuses an empty ``out``."""
    text = os.fspath(out)
    if not text.strip():
        raise ExportError("--out is empty: give the folder to write the export to")
    return Path(text).expanduser().resolve()


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _local_folder(source: str | os.PathLike) -> Path | None:
    path = Path(os.fspath(source)).expanduser()
    return path.resolve() if path.is_dir() else None


def _writable_ancestor(out: Path) -> Path:
    """The folder that the export's staging folder is created in (or under)."""
    parent = out.parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    return parent


def check_destination(out: Path, sources: Sequence[str | os.PathLike] = (),
                      overwrite: bool = False) -> None:
    """Refuse an ``out`` whose replacement could destroy data, or that cannot be written.

    ``out`` (absolute) may not be the current directory or one of its parents, a home or
    root folder, nor hold a local source folder; an existing one must be an empty folder,
    or a previous export when ``overwrite`` is set; its parent must be writable.
    """
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if out.parent == out:
        raise ExportError(f"--out {out} is a root folder; give a new folder for the export")
    if _is_within(cwd, out):
        what = "the current directory" if out == cwd else "a parent of the current directory"
        raise ExportError(f"--out {out} is {what}; give a new folder for the export, "
                          "e.g. --out ./onnx-pair")
    if _is_within(home, out):
        raise ExportError(f"--out {out} is a home folder (or above one); give a new folder "
                          "inside it for the export")
    for source in sources:
        folder = _local_folder(source)
        if folder is not None and _is_within(folder, out):
            raise ExportError(f"--out {out} holds the source model {folder}; give a folder "
                              "outside the sources for the export")
        path = Path(os.fspath(source)).expanduser()
        if folder is None and path.is_file() and _is_within(path.resolve(), out):
            raise ExportError(f"--out {out} holds the source file {path.resolve()}; give a "
                              "folder outside the sources for the export")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ExportError(f"--out {out} exists and is not a folder; give a new folder")
        if any(out.iterdir()):
            if not is_export(out):
                raise ExportError(
                    f"--out {out} is a non-empty folder that is not a quickdraft export; give "
                    "a new or empty folder (--overwrite replaces only a previous export)"
                )
            if not overwrite:
                raise ExportError(f"--out {out} already exists (a previous export); add "
                                  "--overwrite to replace it, or give another folder")
    parent = _writable_ancestor(out)
    if not parent.is_dir():
        raise ExportError(f"cannot create --out {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write to {parent} (permission denied or a read-only file "
                          "system); give an --out in a folder you can write to")


# -- staging and the final rename ----------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the staging folders of ``out`` that an export killed outright left behind
    (named ``.OUT.partial-PID-XXXXXXXX``, whose process is gone); return them."""
    pattern = re.compile(re.escape(f".{out.name}.partial-") + r"(\d+)-" + _RANDOM)
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        if _pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def removing_new_parents(out: Path):
    """While the block runs, note the folders above ``out`` that do not exist yet; if the
    block fails, remove those of them it created that are still empty (a failed export
    into a new nested --out leaves nothing behind)."""
    missing = []
    parent = out.parent
    while not parent.exists() and parent.parent != parent:
        missing.append(parent)  # deepest first
        parent = parent.parent
    try:
        yield
    except BaseException:
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:  # not made by the block, or not empty: keep it and above
                break
        raise


def _check_before_conversion(sources: Sequence[str | os.PathLike]) -> None:
    """Converting a GGUF file takes a while: first check the sources that are not GGUF
    files (config, tokenizer, weight headers), so a broken one is named at once."""
    if any(checks.is_gguf_source(s) for s in sources):
        with quiet():
            for source in sources:
                if not checks.is_gguf_source(source):
                    checks.check_model(source)


def _new_temp(final: Path) -> Path:
    """An empty folder next to ``final`` (same file system, so the last rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    prefix = _PARTIAL.format(name=final.name, pid=os.getpid())
    temp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    temp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    return temp


def _move_into_place(temp: Path, out: Path) -> None:
    """Replace ``out`` with ``temp``; an existing ``out`` is removed only once ``temp`` is in."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(out, old)
    try:
        os.replace(temp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_marker(folder: Path, layout: str, models: Mapping[str, ModelReport]) -> None:
    """Write the marker that makes ``folder`` a quickdraft export (``layout`` "pair" or
    "model"), naming each model's cache kind and source."""
    marker = {
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        # "pair": target/ and draft/ (and draft_draft/ when exported); "model": the model
        "layout": layout,
        "roles": list(models),
        "models": {role: {"kv_cache": r.manifest.kv_cache, "source": r.source}
                   for role, r in models.items()},
    }
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def interrupt_on_sigterm():
    """While the block runs, SIGTERM raises :class:`ExportInterrupted` (as Ctrl-C raises
    KeyboardInterrupt), so the cleanup of a failed export runs; the old handler returns
    after. Only the first SIGTERM raises: the cleanup itself is not interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def handler(signum, frame):
        if not raised:
            raised.append(signum)
            raise ExportInterrupted(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def write_model(info: SourceInfo, out: Path, export_into: ExportInto, role: str,
                start: float) -> ModelReport:
    """Run ``export_into`` in a staging folder next to ``out`` and rename it into place:
    a failed or interrupted export leaves nothing at ``out``."""
    temp = _new_temp(out)
    try:
        manifest = export_into(info, temp, label=role)
        if info.gguf is not None:
            gguf.write_report(temp, info.gguf)
        report = ModelReport(role, info.source, out, manifest,
                             round(time.perf_counter() - start, 3))
        write_marker(temp, "model", {role: report})
        _move_into_place(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    report.manifest = load_manifest(out)
    return report


def write_pair(infos: Mapping[str, SourceInfo], out_path: Path, export_into: ExportInto,
               progress: Progress | None, start: float) -> ExportReport:
    """Export ``infos["target"]``, ``infos["draft"]`` (and ``infos["draft_draft"]``, if
    given) into ``out_path/ROLE`` of a staging folder, renamed into place once all of them
    succeeded."""
    unknown = set(infos) - set(PAIR_ROLES)
    if unknown or not {"target", "draft"} <= set(infos):
        raise ValueError(f"a pair export needs roles target and draft (and optionally "
                         f"draft_draft), not {sorted(infos)}")
    temp = _new_temp(out_path)
    reports = {}
    try:
        for role in (r for r in PAIR_ROLES if r in infos):
            info = infos[role]
            t0 = time.perf_counter()
            folder = temp / role
            folder.mkdir()
            manifest = export_into(info, folder, label=role)
            if info.gguf is not None:
                gguf.write_report(folder, info.gguf)
            reports[role] = ModelReport(role, info.source, out_path / role, manifest,
                                        round(time.perf_counter() - t0, 3))
        write_marker(temp, "pair", reports)
        _move_into_place(temp, out_path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    emit(progress, f"done: {out_path}")
    return ExportReport(out_path, reports["target"], reports["draft"],
                        round(time.perf_counter() - start, 3),
                        draft_draft=reports.get("draft_draft"))


# -- the whole run -------------------------------------------------------------------------


def run_model(src: str | os.PathLike, out_dir: str | os.PathLike, *, prepare: Prepare,
              precheck: Precheck | None = None, overwrite: bool = False,
              progress: Progress | None = None, role: str = "model") -> ModelReport:
    """Check the destination and ``src``, then export it with ``prepare``'s export step."""
    start = time.perf_counter()
    out = resolve_out(out_dir)
    check_destination(out, [src], overwrite)
    with interrupt_on_sigterm(), removing_new_parents(out), \
            _local_sources([src], out, progress) as (local, converted):
        if precheck is not None:
            precheck(local)
        with quiet():
            info = checks.check_model(local[0])
        _mark_gguf([info], converted)
        export_into = prepare([info])
        return write_model(info, out, export_into, role, start)


@contextlib.contextmanager
def _local_sources(sources: Sequence[str | os.PathLike], out: Path, progress: Progress | None):
    """The sources with GGUF files replaced by converted Hugging Face folders (made in a
    staging folder next to ``out``, removed when the block ends)."""
    with gguf.converted_sources(sources, lambda: _new_temp(out), progress) as result:
        yield result


def _as_given(error: ExportError, converted: Mapping[int, gguf.GGUFSource]) -> ExportError:
    """``error`` with each converted folder it names replaced by the GGUF file given (the
    folder is temporary: gone when the user reads the message); itself if it names none."""
    message = str(error)
    for g in converted.values():
        message = message.replace(str(g.folder), g.source)
    return error if message == str(error) else type(error)(message)


def _mark_gguf(infos: Sequence[SourceInfo], converted: Mapping[int, gguf.GGUFSource]) -> None:
    """Name the GGUF file (not its converted folder) as the source of the converted ones."""
    for i, info in enumerate(infos):
        if i in converted:
            info.source = str(converted[i].path)
            info.gguf = converted[i].report


def run_pair(target: str | os.PathLike, draft: str | os.PathLike, out: str | os.PathLike, *,
             prepare: Prepare, precheck: Precheck | None = None, overwrite: bool = False,
             progress: Progress | None = None,
             draft_draft: str | os.PathLike | None = None) -> ExportReport:
    """Check the destination and the pair (with ``draft_draft``, the draft's own draft,
    when given: one vocabulary across all three), then export them with ``prepare``'s
    step."""
    start = time.perf_counter()
    out_path = resolve_out(out)
    sources = [target, draft] if draft_draft is None else [target, draft, draft_draft]
    check_destination(out_path, sources, overwrite)
    _check_before_conversion(sources)
    with interrupt_on_sigterm(), removing_new_parents(out_path), \
            _local_sources(sources, out_path, progress) as (local, converted):
        if precheck is not None:
            precheck(local)
        try:
            if draft_draft is None:
                emit(progress, "checking the pair")
                with quiet():
                    infos = dict(zip(("target", "draft"), checks.check_pair(*local)))
            else:
                emit(progress, "checking the pair and the draft's draft")
                with quiet():
                    infos = dict(zip(PAIR_ROLES, checks.check_three(*local)))
        except ExportError as e:
            named = _as_given(e, converted)
            if named is e:
                raise
            raise named from None
        _mark_gguf(list(infos.values()), converted)
        export_into = prepare(list(infos.values()))
        return write_pair(infos, out_path, export_into, progress, start)
