"""What a streamed reduction keeps on disk so that ``--resume`` can continue it after any interruption.

The output is built in ``.NAME.moemerge-partial`` beside ``--out``. Each finished decoder layer leaves its
final shard there, and in ``.moemerge-state/`` its statistics, original router and low-rank factors
(``layer-L.safetensors``) and the hidden states entering the next layer (``hidden-L.rankR.safetensors``).
``state.json`` names the next step to do (a step per decoder layer; with a non-uniform budget a first pass of
steps records each MoE layer's statistics, ``stats-L.safetensors``, before the merging pass); it is replaced
atomically only after everything of a step is written, so a run killed at any instant resumes from the last
step it recorded and redoes the rest.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from moemerge.distributed import is_writer, on_writer
from moemerge.errors import MoemergeError
from moemerge.grouping import SoftGroups
from moemerge.output_files import write_json
from moemerge.progress import log
from moemerge.registry import names, resolve
from moemerge.routing.grouped import KeptRouter
from moemerge.statistics import LayerStatistics

SCHEMA = "moemerge.stream-state/1"
STATE_DIR = ".moemerge-state"
# the statistics a finished layer's record keeps (registered as kept; see moemerge.statistics.expert_stats)
KEPT_STATS = tuple(name for name in names("statistic") if resolve("statistic", name).kept)


def partial_dir(out: Path) -> Path:
    """Where a streamed reduction into ``out`` is built."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.moemerge-partial"


class RunState:
    """The on-disk progress of one streamed reduction (see the module docstring); ``state`` is what
    ``state.json`` holds: the run's identity, the next layer to do and the finished layers' groups."""

    def __init__(self, partial: Path, state: dict):
        self.partial, self.dir = partial, partial / STATE_DIR
        self.file = self.dir / "state.json"
        self.state = state

    @classmethod
    def open(cls, partial: Path, run: dict, resume: bool, force: bool) -> RunState:
        """The state of a new run (refused while an unfinished one is there, unless ``force``) or, with
        ``resume``, of the unfinished run, whose identity (options, model fingerprint, calibration hash, process
        count) must equal ``run``. Rank 0 decides; every rank gets it."""
        return cls(partial, on_writer(lambda: _open(partial, run, resume, force)))

    @property
    def next_layer(self) -> int:
        return self.state["next_layer"]

    def hidden_file(self, layer: int, rank: int) -> Path:
        return self.dir / f"hidden-{layer}.rank{rank}.safetensors"

    def save_hidden(self, layer: int, rank: int, hidden: dict[int, torch.Tensor]) -> None:
        """The hidden states [1, T, H] entering decoder layer ``layer`` of this rank's sequences."""
        tmp = self.hidden_file(layer, rank).with_suffix(".tmp")
        save_file({f"seq.{s}": h.detach().contiguous().cpu() for s, h in hidden.items()}, tmp)
        tmp.replace(self.hidden_file(layer, rank))

    def load_hidden(self, layer: int, rank: int) -> dict[int, torch.Tensor]:
        tensors = _load(self.partial, self.hidden_file(layer, rank))
        return {int(name.split(".")[1]): h for name, h in tensors.items()}

    def save_statistics(self, layer: int, stats: LayerStatistics) -> None:
        """All of an MoE layer's statistics, from the first pass of a two-pass run (not yet committed)."""
        tensors = {f.name: getattr(stats, f.name) for f in fields(stats)}
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items() if isinstance(t, torch.Tensor)}
        save_file(tensors, self.dir / f"stats-{layer}.safetensors", metadata={"num_tokens": str(stats.num_tokens)})
        self.state.setdefault("statistics", []).append(layer)

    def load_statistics(self, layer: int, routing) -> LayerStatistics:
        """What :meth:`save_statistics` recorded of ``layer``, with the layer's routing rule."""
        tensors, num_tokens = self._read_statistics(layer, None)
        return LayerStatistics(layer=layer, num_tokens=num_tokens, routing=routing, **tensors)

    def load_statistic(self, layer: int, name: str) -> torch.Tensor:
        """The one statistic ``name`` (a field of LayerStatistics) :meth:`save_statistics` recorded of ``layer``."""
        return self._read_statistics(layer, name)[0][name]

    def _read_statistics(self, layer: int, only: str | None) -> tuple[dict[str, torch.Tensor], int]:
        """({name: tensor} of ``layer``'s statistics file, all or ``only`` that one; its token count)."""
        file = self.dir / f"stats-{layer}.safetensors"
        try:
            with safe_open(file, framework="pt") as f:
                names = [only] if only is not None else list(f.keys())
                return {name: f.get_tensor(name) for name in names}, int(f.metadata()["num_tokens"])
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as err:
            raise _damaged(self.partial, f"{file} cannot be read ({err})") from None

    def save_layer(
        self,
        layer: int,
        groups: list[list[int]],
        stats: LayerStatistics,
        router: KeptRouter,
        factors: dict[str, torch.Tensor],
        saved: int,
    ) -> None:
        """A finished MoE layer's groups, report statistics, original router and low-rank factors (not yet
        committed: :meth:`advance` does that)."""
        tensors = {f"stats.{f}": getattr(stats, f) for f in KEPT_STATS if getattr(stats, f) is not None}
        kept = zip(("router.weight", "router.bias", "router.novices"), router, strict=True)
        tensors |= {name: t for name, t in kept if t is not None}
        tensors |= {f"factors.{name}": t for name, t in factors.items()}
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, self.dir / f"layer-{layer}.safetensors"
        )
        record = {"groups": [list(g) for g in groups], "num_tokens": stats.num_tokens, "saved": saved}
        if isinstance(groups, SoftGroups):
            record["memberships"] = [u.tolist() for u in groups.memberships]
        self.state["layers"][str(layer)] = record

    def advance(self, next_layer: int) -> None:
        """Record that every layer before ``next_layer`` is done (atomically), then drop older hidden states."""
        self.state["next_layer"] = next_layer
        write_json(self.state, self.file, force=True)
        for old in self.dir.glob("hidden-*.safetensors"):
            if int(old.name.split("-")[1].split(".")[0]) < next_layer:
                old.unlink(missing_ok=True)

    def finished_layers(self, routing, layer_ids: list[int]):
        """(groups, statistics, original routers, low-rank factors, parameters saved) of every MoE layer done."""
        groups, stats, routers, factors, saved = {}, {}, {}, {}, 0
        for layer in layer_ids:
            record = self.state["layers"][str(layer)]
            tensors = _load(self.partial, self.dir / f"layer-{layer}.safetensors")
            kept = {f: tensors.get(f"stats.{f}") for f in KEPT_STATS}
            stats[layer] = LayerStatistics(layer=layer, num_tokens=record["num_tokens"], routing=routing, **kept)
            groups[layer] = record["groups"]
            if "memberships" in record:
                memberships = [torch.tensor(u, dtype=torch.float64) for u in record["memberships"]]
                groups[layer] = SoftGroups(record["groups"], memberships)
            routers[layer] = KeptRouter(
                tensors["router.weight"], tensors.get("router.bias"), tensors.get("router.novices")
            )
            factors |= {name[len("factors.") :]: t for name, t in tensors.items() if name.startswith("factors.")}
            saved += record["saved"]
        return groups, stats, routers, factors, saved

    @contextmanager
    def errors_say_what_stays(self) -> Iterator[None]:
        """A MoemergeError of the run (bad input found in a layer, disk full) leaves nothing when no layer was
        finished (the partial folder is removed); else it keeps the finished layers and says so, for --resume."""
        try:
            yield
        except MoemergeError as err:
            if not is_writer() or not self.partial.exists():
                raise
            if self.next_layer == 0:
                shutil.rmtree(self.partial, ignore_errors=True)
                raise
            raise MoemergeError(
                f"{err}; the run's first {self.next_layer} steps (a step per decoder layer and pass) stay in "
                f"{self.partial}: once this is fixed, rerun with --resume to continue from there"
            ) from None

    def discard(self) -> None:
        """Remove the state folder (the partial output is complete)."""
        shutil.rmtree(self.dir)


def _open(partial: Path, run: dict, resume: bool, force: bool) -> dict:
    file = partial / STATE_DIR / "state.json"
    if resume and file.is_file():
        state = _read_state(file, partial)
        differ = [key for key in run if state["run"].get(key) != run[key]]
        if differ:
            raise MoemergeError(
                f"--resume: the unfinished run in {partial} used other {', '.join(differ)}; rerun with the same "
                f"model and options, or delete {partial} to start over"
            )
        _check_recorded_files(state, partial)
        return state
    if resume:  # killed before its first record (or never started)
        log.info("moemerge: nothing recorded in %s to resume; starting at layer 0", partial)
    elif partial.exists() and not force:
        raise MoemergeError(
            f"an unfinished run of this output is in {partial}; pass --resume to continue it, or --force to start over"
        )
    if partial.exists():
        shutil.rmtree(partial)
    state = {"schema": SCHEMA, "run": run, "next_layer": 0, "layers": {}}
    write_json(state, file, force=True)
    return state


def _read_state(file: Path, partial: Path) -> dict:
    """The recorded state, checked for its shape."""
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        shape_ok = (
            state.get("schema") == SCHEMA
            and isinstance(state.get("run"), dict)
            and isinstance(state.get("next_layer"), int)
            and isinstance(state.get("layers"), dict)
            and all(
                isinstance(r, dict) and {"groups", "num_tokens", "saved"} <= r.keys() for r in state["layers"].values()
            )
        )
    except (OSError, ValueError, AttributeError):
        shape_ok = False
    if not shape_ok:
        raise _damaged(partial, f"{file} is not a readable moemerge state file ({SCHEMA})")
    return state


def _check_recorded_files(state: dict, partial: Path) -> None:
    """Raise MoemergeError unless every file the state records as written is there (before any work).

    A run takes ``passes`` steps per decoder layer: with two, steps 0..L-1 record statistics (and hidden states),
    steps L..2L-1 merge; with one, each step does both."""
    done, folder, run = state["next_layer"], partial / STATE_DIR, state["run"]
    layers, passes = run["num_layers"], run["passes"]
    needed = [folder / f"layer-{layer}.safetensors" for layer in state["layers"]]
    if 0 < done < layers:  # the hidden states the next step runs through its layer
        needed += [folder / f"hidden-{done}.rank{r}.safetensors" for r in range(run["processes"])]
    needed += [folder / f"stats-{layer}.safetensors" for layer in state.get("statistics", [])]
    merged = done - (passes - 1) * layers
    missing = [path for path in needed if not path.is_file()]
    missing += [  # the shards of the finished decoder layers (named -of-TOTAL)
        partial / f"model-{i:05d}-of-*.safetensors"
        for i in range(1, merged + 1)
        if not any(partial.glob(f"model-{i:05d}-of-*.safetensors"))
    ]
    if missing:
        raise _damaged(partial, f"{missing[0]} is missing")


def _load(partial: Path, file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a recorded file of the unfinished run in ``partial``."""
    try:
        return load_file(file)
    except (OSError, SafetensorError) as err:
        raise _damaged(partial, f"{file} cannot be read ({err})") from None


def _damaged(partial: Path, what: str) -> MoemergeError:
    return MoemergeError(
        f"--resume: the unfinished run in {partial} is damaged: {what}; rerun with --force instead of --resume "
        "to start over"
    )
