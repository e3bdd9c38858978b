"""The KV-page directory's audit of its own bookkeeping (KvDirectory.check_invariants): every
index agrees with the exports, owners, workers, leases and moves it points at. Reads the directory's
internals under its lock; a non-empty answer is a bug in the directory, never a user error."""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.actors.kv_directory import KvDirectory


def invariant_problems(d: KvDirectory) -> list[str]:
    """What disagrees, in words; [] when the bookkeeping is consistent. Call with d's lock held."""
    problems = []
    for name, e in d._exports.items():
        worker = d._workers.get(e.worker_id)
        if e.name != name or d._by_id.get(e.export_id) is not e:
            problems.append(f"export {name!r} is indexed under another name or id")
        if worker is None or not worker.live:
            problems.append(f"export {name!r} is on worker {e.worker_id!r}, which is not live")
        if not e.persistent and e.owner not in d._owners:
            problems.append(f"non-persistent export {name!r} outlived its owner {e.owner!r}")
        if worker is not None and any(not 0 <= p < worker.num_pages for p in e.pages):
            problems.append(f"export {name!r} names pages outside worker {e.worker_id!r}")
        for lease_id in e.leases:
            lease = d._leases.get(lease_id)
            if lease is None or lease.export_id != e.export_id:
                problems.append(f"export {name!r} counts lease {lease_id}, which is not open on it")
        for h in e.hashes:
            if e.export_id not in d._blocks.get(h, ()):
                problems.append(f"export {name!r} is missing from the prefix index")
    if len(d._by_id) != len(d._exports):
        problems.append(f"{len(d._by_id)} exports by id but {len(d._exports)} by name")
    if {(o, i) for o, ids in d._by_owner.items() for i in ids} != {(e.owner, i) for i, e in d._by_id.items()}:
        problems.append("the exports by owner disagree with the exports")
    for h, ids in d._blocks.items():
        if not ids or any(i not in d._by_id or h not in d._by_id[i].hashes for i in ids):
            problems.append("the prefix index names an export that does not hold the block")
    running = collections.Counter(o.worker_id for o in d._owners.values())
    for w_id, w in d._workers.items():
        if w.running != running[w_id] or w.running < 0:
            problems.append(f"worker {w_id!r} counts {w.running} running inferlets; {running[w_id]} are placed")
    for o in d._owners.values():
        if o.worker_id not in d._workers or not d._workers[o.worker_id].live:
            problems.append(f"inferlet {o.instance_id!r} runs on worker {o.worker_id!r}, which is not live")
    for lease_id, lease in d._leases.items():
        plan = lease.plan
        if plan.importer not in d._owners:
            problems.append(f"lease {lease_id} copies to {plan.importer!r}, which has ended")
        for w_id in (plan.src_worker, plan.dst_worker):
            if w_id not in d._workers or not d._workers[w_id].live:
                problems.append(f"lease {lease_id} copies between workers that are not live ({w_id!r})")
        export = d._by_id.get(lease.export_id)
        if export is not None and lease_id not in export.leases:
            problems.append(f"lease {lease_id} is open but its export {export.name!r} does not count it")
    problems += _move_problems(d)
    return problems


def _move_problems(d: KvDirectory) -> list[str]:
    """Each move in flight and its export point at each other, the export still lives where the move
    copies from, and both workers are live."""
    problems = []
    for move_id, move in d._moves.items():
        plan, export = move.plan, d._by_id.get(move.export_id)
        if export is None or export.move != move_id:
            problems.append(f"move {move_id} of {plan.name!r} is open but its export does not point at it")
        elif (export.name, export.worker_id, export.pages) != (plan.name, plan.src_worker, plan.src_pages):
            problems.append(f"move {move_id} copies {plan.name!r} from where the export no longer is")
        if plan.src_worker == plan.dst_worker:
            problems.append(f"move {move_id} of {plan.name!r} moves it onto its own worker")
        for w_id in (plan.src_worker, plan.dst_worker):
            if w_id not in d._workers or not d._workers[w_id].live:
                problems.append(f"move {move_id} of {plan.name!r} involves a worker that is not live ({w_id!r})")
    for name, e in d._exports.items():
        if e.move is not None and (e.move not in d._moves or d._moves[e.move].export_id != e.export_id):
            problems.append(f"export {name!r} points at move {e.move}, which is not open on it")
        if e.move is not None and not e.persistent:
            problems.append(f"non-persistent export {name!r} is moving")
    return problems
