"""Transient payloads: delete a hand-over payload once its readers are done, restore it on demand.

A stage may declare payloads of its output to be hand-overs (``Stage.handovers``: fisher's boundary
gradient, which only the fisher partition of the layer below declares reading). With release on,
a payload goes as soon as every partition that declared reading it (``Stage.reads``) is done; the
producer stays *done* — its manifest, content digest and therefore every downstream key are
unchanged — and is marked released. Should a reader have to run again (a changed key, a corrupt
output, ``--force``), the producer runs again first (same key, same inputs, same bytes), and if the
producer itself reads a released payload, its producer before it: the chain is walked back to
the first payload still on disk. Nothing here ever deletes a payload that a partition about to
run, running, or waiting for a restore still reads.

**Early release (checkpointing).** A stage may also name, per payload, the readers that must be
done before it may go *early* (``Stage.early_release``: capture's next block, under a disk budget,
for the layers that are not checkpoints). Such a payload goes once those are done and no reader is
demanded, even though readers of later stages are still to come: they restore it (the chain back to
the nearest checkpoint runs again; the classic √L trade of compute for disk). A payload restored in
this run stays until every reader of a stage that has started is done, so one restore serves a
whole segment instead of being released and recomputed for each reader in turn.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Protocol

from stagepipe.engine.stage import PartitionRef
from stagepipe.engine.workspace import PartitionState


class _Entry(Protocol):
    ref: PartitionRef
    state: PartitionState
    inputs: dict[str, str] | None
    transient: dict[str, list[PartitionRef]]
    early: dict[str, list[PartitionRef]]


def released_inputs(entry: _Entry, by_ref: Mapping[PartitionRef, _Entry]) -> list[_Entry]:
    """The producers whose released payload ``entry`` reads."""
    found = []
    for text in entry.inputs or {}:
        producer = by_ref.get(PartitionRef.parse(text))
        if producer is not None and any(entry.ref in producer.transient.get(path, ()) for path in producer.state.released):
            found.append(producer)
    return found


def restore_order(wanted: Iterable[_Entry], by_ref: Mapping[PartitionRef, _Entry]) -> tuple[list[_Entry], set[PartitionRef]]:
    """(what can be submitted now, every partition that wants to run or must run to restore a payload).

    A wanted partition that reads a released payload waits; its producer is submitted instead
    (or, if the producer reads a released payload too, the producer's producer, and so on).
    """
    order = {ref: i for i, ref in enumerate(by_ref)}
    submit: dict[PartitionRef, _Entry] = {}
    demanded: set[PartitionRef] = set()
    stack = list(wanted)
    while stack:
        entry = stack.pop()
        if entry.ref in demanded:
            continue
        demanded.add(entry.ref)
        producers = released_inputs(entry, by_ref)
        if producers:
            stack.extend(producers)
        else:
            submit[entry.ref] = entry
    return sorted(submit.values(), key=lambda e: order.get(e.ref, 0)), demanded


def releasable(entries: Iterable[_Entry], by_ref: Mapping[PartitionRef, _Entry],
               demanded: set[PartitionRef], restored: Collection[PartitionRef] = ()) -> list[tuple[_Entry, str]]:
    """(done output, payload) pairs to delete now: no reader is demanded, and either every reader is
    done or the payload may go early (its ``early`` readers are done; restored in this run: also
    every reader of a started stage)."""
    entries = list(entries)
    started = {r.stage for r in demanded} | {e.ref.stage for e in entries if e.state.status == "done"}

    def done(refs: Iterable[PartitionRef]) -> bool:
        return all(r in by_ref and by_ref[r].state.status == "done" for r in refs)

    found = []
    for entry in entries:
        if entry.state.status != "done":
            continue
        for path, readers in entry.transient.items():
            if path in entry.state.released or not readers or any(r in demanded for r in readers):
                continue
            early = path in entry.early and done(entry.early[path]) and (
                entry.ref not in restored or done(r for r in readers if r.stage in started))
            if early or done(readers):
                found.append((entry, path))
    return found
