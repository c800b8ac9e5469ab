"""Results files: ``/results/<technique>/<run>``, each run in its own file, added atomically.

``X.h5`` holds ``/meta`` and one external link, ``/results`` -> ``X.h5.d/index.h5:/results``;
the index holds a link ``/results/<technique>/<run>`` -> ``<technique>/<run>.h5:/result`` for
every run. Link paths are relative, and HDF5 resolves them from the folder of the file that
holds the link (not the working directory), so ``X.h5`` and ``X.h5.d`` move together. Readers
(``StoreReader``, h5py, the HDF5 C library) see ``/results/<technique>/<run>`` as before.

Adding runs costs the runs, not the file: each run is written to ``<run>.h5.partial``, flushed,
checked, fsynced and renamed (never over an existing file); then the index, a few hundred bytes
a run, is copied to ``index.h5.partial``, the links are added, and it is checked, fsynced and
renamed over the index. That rename is the commit: a failure, a full disk or a kill at any
point before it leaves the previous results as they were, and the new run files are removed
(after a kill they stay, unlinked and unseen). A file without the ``/results`` link (results
written inline by older versions, a capture) is rewritten once: its runs move to their own
files and everything else is copied into a new ``X.h5.partial``, renamed over ``X.h5`` last.
One process writes a results file at a time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import torch

from pyengine.errors import StoreError
from pyengine.store._h5 import (
    H5_ERRORS,
    cause,
    check_meta,
    checksum_filter,
    open_h5,
    partial_path,
    reading,
    remove_quietly,
    write_failure,
    write_meta,
    writing,
)
from pyengine.store.reader import StoreReader

INDEX = "index.h5"
RUN_GROUP = "/result"  # the group of a run file that holds the run's arrays and attributes


@dataclass(frozen=True)
class PendingResult:
    """One result to store at ``/results/<technique>/<run>``."""

    technique: str
    run: str
    arrays: Mapping[str, torch.Tensor]
    attrs: Mapping[str, Any]


def results_folder(path: str | os.PathLike[str]) -> Path:
    """The folder that holds the run files of the results file at ``path``: ``X.h5.d``."""
    target = Path(path)
    return target.with_name(target.name + ".d")


@dataclass
class _Target:
    """What a results file holds now: ``linked`` (its /results links to ``index``), ``inline``
    (runs stored in the file, or none: it is rewritten) or ``new`` (no file)."""

    kind: str
    index: Path
    taken: set[tuple[str, str]] = field(default_factory=set)
    inline: list[tuple[str, str]] = field(default_factory=list)


def write_results(path: str | os.PathLike[str], results: Sequence[PendingResult], *, meta: Mapping[str, Any]) -> None:
    """Add results to a results file atomically, at a cost proportional to the results added.

    Either every result lands or none does (see the module doc); an existing file must be a
    pyengine store. A write error leaves ``path`` and its results as they were, removes what
    this call wrote and raises one StoreError.
    """
    target = Path(path)
    what = f"results not written to {target} (it is unchanged)"
    names = [(pending.technique, pending.run) for pending in results]
    for technique, run in names:
        check_run_name(target, technique, run)
    state = _inspect(target)
    for name in names:
        if name in state.taken or names.count(name) > 1:
            raise StoreError(f"{target}: result {name[0]}/{name[1]} exists; choose another run name")
    created: list[Path] = []  # files this call renamed into place: removed unless the results landed
    folders = [
        folder for folder in (state.index.parent, *{state.index.parent / t for t, _ in names}) if not folder.exists()
    ]
    try:
        runs: dict[tuple[str, str], Path] = {}
        if state.inline:
            with open_h5(target, "r") as source:
                for technique, run in state.inline:
                    runs[technique, run] = _copy_run(source, technique, run, state.index.parent, what, created)
        for pending in results:
            runs[pending.technique, pending.run] = _write_run(pending, state.index.parent, what, created)
        index = _write_index(state, runs, what, created)  # for a linked file: the commit
        if state.kind != "linked":
            _write_main(target, state.kind == "inline", index, meta, list(runs), what, created)
    except BaseException:
        for leftover in created:
            remove_quietly(leftover)
        for folder in reversed(folders):  # the folders this call made, if it left them empty
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def check_run_name(target: Path, technique: str, run: str) -> None:
    """A technique and run name usable as HDF5 link names and file names."""
    for what, name in (("technique", technique), ("run", run)):
        if not name or "/" in name or "\0" in name or name in (".", "..") or name.endswith(".partial"):
            raise StoreError(
                f"{target}: {what} name {name!r} cannot name a result; expected a name without '/', "
                "not '.', '..' or ending in '.partial'"
            )


def _inspect(target: Path) -> _Target:
    """Where ``target`` keeps its results and which run names it has (reads only its links)."""
    default = results_folder(target) / INDEX
    if not target.exists():
        return _Target("new", default)
    with open_h5(target, "r") as file:
        check_meta(file, target)
        with reading(target, "/results"):
            link = file.get("results", getlink=True)
            if isinstance(link, h5py.ExternalLink):
                group = file.get("results")
                if group is None:
                    raise StoreError(
                        f"{target}: its results are in {link.filename}, which is missing or unreadable "
                        f"(relative to {target.parent}); the folder {results_folder(target).name} must stay "
                        "next to the file"
                    )
                taken = {(technique, run) for technique in group for run in group[technique]}
                return _Target("linked", target.parent / link.filename, taken)
            group = file.get("results")
            inline = [
                (technique, run)
                for technique in (group or {})
                for run in group[technique]
                if not run.endswith(".partial")
            ]
    return _Target("inline", default, set(inline), inline)


def _free(path: Path) -> Path:
    """``path``, or ``<stem>-2<suffix>``, ``-3``, ...: a name no file (nor its .partial) has."""
    candidate, k = path, 1
    while candidate.exists() or partial_path(candidate).exists():
        k += 1
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return candidate


def _run_path(folder: Path, technique: str, run: str, what: str) -> Path:
    try:
        (folder / technique).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreError(f"{what}: creating {folder / technique} failed: {cause(error)}") from None
    return _free(folder / technique / f"{run}.h5")


def _write_run(pending: PendingResult, folder: Path, what: str, created: list[Path]) -> Path:
    final = _run_path(folder, pending.technique, pending.run, what)
    staging = partial_path(final)
    shapes: dict[str, tuple[int, ...]] = {}
    # Datasets stay open until the flush: a dataset closed earlier writes its cached data
    # while h5py drops it, where a write error is only printed ("Exception ignored").
    kept: list[h5py.Dataset] = []
    with writing(staging, "w", what) as file:
        group = file.create_group(RUN_GROUP)
        for name, value in pending.arrays.items():
            data = value.detach().cpu()
            array = (data.float() if data.dtype == torch.bfloat16 else data).numpy()
            kept.append(group.create_dataset(name, data=array, **checksum_filter(array.shape)))
            shapes[name] = tuple(array.shape)
        for name, value in pending.attrs.items():
            group.attrs[name] = value
    _check(staging, what, lambda file: _run_problem(file, shapes))
    _commit(staging, final, what, created)
    return final


def _copy_run(source: h5py.File, technique: str, run: str, folder: Path, what: str, created: list[Path]) -> Path:
    """An inline run of an older results file, copied (HDF5's object copy) into its own file."""
    final = _run_path(folder, technique, run, what)
    staging = partial_path(final)
    with writing(staging, "w", what) as file:
        with reading(Path(source.filename), f"/results/{technique}/{run}"):
            original = source[f"results/{technique}/{run}"]
        source.copy(original, file, RUN_GROUP)
        shapes = _dataset_shapes(file[RUN_GROUP])
    _check(staging, what, lambda file: _run_problem(file, shapes))
    _commit(staging, final, what, created)
    return final


def _dataset_shapes(group: h5py.Group) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    group.visititems(lambda name, obj: shapes.update({name: obj.shape}) if isinstance(obj, h5py.Dataset) else None)
    return shapes


def _run_problem(file: h5py.File, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    group = file.get(RUN_GROUP)
    if not isinstance(group, h5py.Group):
        return f"lacks {RUN_GROUP}"
    found = _dataset_shapes(group)
    for name, shape in shapes.items():
        if found.get(name) != shape:
            return f"lacks array {name} of shape {shape}"
    return None


def _write_index(state: _Target, runs: Mapping[tuple[str, str], Path], what: str, created: list[Path]) -> Path:
    """The index with links to ``runs`` added: the linked one copied, else a new one."""
    final = state.index if state.kind == "linked" else _free(state.index)
    staging = partial_path(final)
    if state.kind == "linked":
        try:
            shutil.copyfile(final, staging)
        except OSError as error:
            remove_quietly(staging)
            raise write_failure(what, staging, error) from None
    with writing(staging, "a" if state.kind == "linked" else "w", what) as file:
        results = file.require_group("results")
        for (technique, run), path in runs.items():
            relative = path.relative_to(final.parent).as_posix()
            results.require_group(technique)[run] = h5py.ExternalLink(relative, RUN_GROUP)
    _check(staging, what, lambda file: _links_problem(file, runs))
    _commit(staging, final, what, created, commits=state.kind == "linked")
    return final


def _links_problem(file: h5py.File, names: Iterable[tuple[str, str]]) -> str | None:
    for technique, run in names:
        if file.get(f"results/{technique}/{run}") is None:
            return f"lacks result {technique}/{run} (or its file)"
    return None


def _write_main(
    target: Path,
    rewrite: bool,
    index: Path,
    meta: Mapping[str, Any],
    names: list[tuple[str, str]],
    what: str,
    created: list[Path],
) -> None:
    """``target`` with /results linked to ``index``: new, or everything else copied from the old one."""
    staging = partial_path(target)
    kept: list[str] = []
    with writing(staging, "w", what) as file:
        if rewrite:
            with open_h5(target, "r") as source, reading(target, "its contents"):
                for key, value in source.attrs.items():
                    file.attrs[key] = value
                for name in source:
                    if name == "results":
                        continue
                    link = source.get(name, getlink=True)
                    if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
                        file[name] = link
                    else:
                        source.copy(source[name], file, name)
                    kept.append(name)
        else:
            write_meta(file, meta, {})
        file["results"] = h5py.ExternalLink(os.path.relpath(index, target.parent), "/results")

    def problem(file: h5py.File) -> str | None:
        check_meta(file, staging)
        missing = [name for name in kept if name not in file]
        return f"lacks /{missing[0]}" if missing else _links_problem(file, names)

    _check(staging, what, problem)
    _commit(staging, target, what, created, commits=True)


def _check(path: Path, what: str, problem_of: Any) -> None:
    """Re-open the closed file at ``path``; a problem (what it lacks) removes it and raises."""
    try:
        with h5py.File(path, "r") as file:
            problem = problem_of(file)
    except (*H5_ERRORS, KeyError, ValueError, StoreError) as error:
        problem = f"does not re-open complete ({cause(error)})"
    if problem:
        remove_quietly(path)
        raise StoreError(f"{what}: {path} {problem}; removed it, as it cannot be trusted")


def _commit(staging: Path, final: Path, what: str, created: list[Path], *, commits: bool = False) -> None:
    """Rename ``staging`` to ``final`` once its bytes are on disk (a crash after the rename finds
    the whole file). ``final`` joins ``created``, the files removed if the write fails later;
    ``commits``: this rename lands the results, so ``created`` is emptied at once, keeping them."""
    try:
        descriptor = os.open(staging, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        if not commits:
            created.append(final)
        os.replace(staging, final)
        if commits:
            created.clear()
    except OSError as error:
        remove_quietly(staging)
        raise write_failure(what, staging, error) from None
    try:  # the rename itself on disk before what links to it; best effort (not every filesystem can)
        folder = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass


def reserve_run_name(path: str | os.PathLike[str], technique: str, run: str = "", taken: Set[str] = frozenset()) -> str:
    """Check a results target before any work: ``run`` if free, else the next ``run-NNN``.

    Raises StoreError if ``path`` is not a pyengine store, ``run`` cannot name a result or is
    already used there or in ``taken`` (names about to be written with it).
    """
    existing = set(taken)
    target = Path(path)
    check_run_name(target, technique, run or "run-001")
    if target.exists():
        with StoreReader(target) as reader:
            existing |= {name for t, name in reader.results() if t == technique}
    if run:
        if run in existing:
            raise StoreError(f"{target}: result {technique}/{run} exists; choose another run name")
        return run
    k = 1
    while f"run-{k:03d}" in existing:
        k += 1
    return f"run-{k:03d}"
