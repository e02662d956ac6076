"""Collective traffic of a compiled step, read from its optimized HLO text.

    text = jax.jit(step).lower(*abstract_args).compile().as_text()
    collective_bytes(text)   # {"all-gather": 1.2e9, "reduce-scatter": ...}: per step and device
    collective_ops(text)     # each collective instruction: shapes, bytes, executions per step

What is counted, per device and per step:
  * the bytes of each collective's result shape (all elements of a tuple result): for an
    all-gather the gathered array, for a reduce-scatter the scattered shard, for an all-reduce
    the reduced array, for an all-to-all / collective-permute what arrives;
  * asynchronous pairs once: `X-start` is skipped and `X-done` counted (its result is the
    collective's result); collectives wrapped in generic `async-start` computations are
    counted where they stand inside the wrapped computation;
  * instructions inside a while loop body times the loop's trip count (scanned layers,
    gradient accumulation, chunked loss; nested loops multiply): XLA:CPU's `known_trip_count`
    annotation, else (the TPU compiler's output has none) read from the loop itself, a
    condition `counter < constant` with the counter's start a constant of the init tuple, as
    lax.scan / fori_loop emit it. A loop matching neither is counted once and named in
    `unknown_trip_counts` of `collective_summary`;
  * of a conditional's branches only the heaviest (most collective bytes): one branch runs
    per execution, and the step's cond branches (the LM head on targets or on every
    position) move about the same data;
  * fusions, calls and async computations once per execution of their caller; except the
    TPU compiler's all-reduce-scatter fusions (a fusion calling a computation named
    `all-reduce-scatter*`: an all-reduce and the slice each device keeps, executed as a
    reduce-scatter), counted as one reduce-scatter of the fusion's result.

Backends differ in what they emit for the same reduction over fsdp. XLA:CPU forms no
reduce-scatter: it all-reduces the whole gradient and slices it. The TPU compiler (libtpu
with jax 0.10.2) fuses that pair into all-reduce-scatter fusions for large arrays (every 7B
weight gradient) and leaves small ones (the tiny test model's) as all-reduce + slice. GPU
pipelines form reduce-scatter instructions (XLA's ReduceScatterCreator; not checked here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Iterable

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                    "collective-permute")
# Bytes per element by HLO element type; sub-byte types round up per array (4-bit ints are
# packed two per byte on TPU, but no collective of ours carries them).
_ELEMENT_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                  "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
                  "f64": 8, "c64": 8, "c128": 16, "token": 0}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPERANDS = re.compile(r"%([\w.\-]+)")
_CONSTANT = re.compile(r"^\s*constant\((-?\d+)\)")
_GTE_INDEX = re.compile(r"\bindex=(\d+)")
_DIRECTION = re.compile(r"\bdirection=([A-Z]+)")
_OPCODE = re.compile(r"^\s*([a-z][a-z0-9\-]*)\(")
_METADATA = re.compile(r"metadata=\{[^{}]*\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_REDUCE_SCATTER_FUSION = "all-reduce-scatter"  # TPU: all-reduce + slice fused, a reduce-scatter
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_LISTED_GROUPS = re.compile(r"replica_groups=\{\{([\d,\s]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")


def _group_size(attributes: str) -> int | None:
    """Devices per replica group, from the three spellings XLA prints: mesh['a'=8,'b'=1]
    {'a'} (the named axes' sizes multiplied), {{0,1,2,3},{...}} and [2,4]<=[8] (last dim)."""
    mesh = _MESH_GROUPS.search(attributes)
    if mesh:
        sizes = dict((name.strip().strip("'"), int(size)) for name, size in
                     (item.split("=") for item in mesh.group(1).split(",") if "=" in item))
        names = [name.strip().strip("'") for name in mesh.group(2).split(",") if name.strip()]
        return math.prod(sizes.get(name, 1) for name in names)
    listed = _LISTED_GROUPS.search(attributes)
    if listed:
        return len([d for d in listed.group(1).split(",") if d.strip()])
    iota = _IOTA_GROUPS.search(attributes)
    if iota:
        return int(iota.group(1).split(",")[-1])
    return None


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective instruction of the compiled program."""

    kind: str  # one of COLLECTIVE_KINDS
    name: str  # the HLO instruction name, e.g. "all-gather.12" or "all-reduce-done.3"
    computation: str  # the HLO computation holding it
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # result element types and dims
    bytes: int  # result bytes of one execution
    executions: int  # per step (trip counts of the enclosing loops multiplied)
    op_name: str  # jax's metadata: which traced operation it came from
    group_size: int | None = None  # devices per replica group; None: not read from the HLO

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.executions

    @property
    def wire_bytes(self) -> float:
        """Bytes each device sends per step, estimated for bandwidth-optimal (ring)
        algorithms over `group_size` devices: result x (n-1)/n for all-gather / all-to-all,
        x (n-1) for reduce-scatter, x 2(n-1)/n for all-reduce, x 1 for collective-permute
        (and when n is unknown). Comparable across kinds, unlike result bytes: a TPU
        collective matmul that replaces a reduce-scatter by a ring of permutes shows as
        (n-1) shard-sized permutes."""
        n = self.group_size
        if self.kind == "collective-permute" or not n or n < 2:
            return float(self.total_bytes)
        factor = {"all-gather": (n - 1) / n, "all-to-all": (n - 1) / n,
                  "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n}[self.kind]
        return self.total_bytes * factor


def _split_type(rest: str) -> tuple[str, str]:
    """'(f32[2]{0}, s32[]) opcode(...)...' -> (type text, the text after it)."""
    rest = rest.lstrip()
    if not rest.startswith("("):
        head, _, tail = rest.partition(" ")
        return head, tail
    depth = 0
    for index, char in enumerate(rest):
        depth += char == "("
        depth -= char == ")"
        if depth == 0:
            return rest[:index + 1], rest[index + 1:]
    return rest, ""


def _shapes(type_text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
                 for dtype, dims in _SHAPE.findall(type_text) if dtype in _ELEMENT_BYTES)


def _nbytes(shapes) -> int:
    return sum(math.ceil(math.prod(dims) * _ELEMENT_BYTES[dtype]) for dtype, dims in shapes)


def _collective_kind(opcode: str) -> str | None:
    """The kind an opcode counts as, or None (not a collective, or the -start of a pair)."""
    base = opcode.removesuffix("-done")
    if opcode.endswith("-start") or opcode.endswith("-update"):
        return None
    return base if base in COLLECTIVE_KINDS else None


def _names(value: str) -> list[str]:
    return [name.lstrip("%") for name in re.findall(r"%?[^\s,{}]+", value)]


@dataclasses.dataclass
class _Computation:
    collectives: list  # [[kind, name, shapes, op_name, group size]]
    calls: list  # [(multiplier, [callee])]; several callees = conditional branches
    unknown_loops: list  # while instructions whose trip count could not be read
    instructions: dict  # name -> (opcode, text after the type); for trip counts
    root: str | None = None


def _logical_lines(hlo_text: str) -> Iterable[str]:
    """Lines of the module, an instruction's continuation lines (kernel metadata of a Pallas
    custom call spans several) joined to it: a line starting with "}" that is not the end of
    a computation must not end it."""
    pending = None
    for line in hlo_text.splitlines():
        starts = (line.rstrip() == "}" or _INSTRUCTION.match(line) is not None
                  or (not line.startswith((" ", "}")) and _HEADER.match(line) is not None)
                  or line.startswith("HloModule"))
        if starts:
            if pending is not None:
                yield pending
            pending = line
        elif pending is not None:
            pending += "\n" + line
    if pending is not None:
        yield pending


def _parse(hlo_text: str) -> tuple[dict[str, _Computation], str | None]:
    computations: dict[str, _Computation] = {}
    entry, current, loops = None, None, []
    for line in _logical_lines(hlo_text):
        if line.rstrip() == "}":
            current = None
            continue
        header = _HEADER.match(line) if not line.startswith(" ") else None
        if header:
            current = _Computation([], [], [], {})
            computations[header.group(2)] = current
            if header.group(1):
                entry = header.group(2)
            continue
        instruction = _INSTRUCTION.match(line) if current is not None else None
        if instruction is None:
            continue
        is_root, name, rest = instruction.groups()
        type_text, after = _split_type(rest)
        opcode = _OPCODE.match(after)
        if opcode is None:
            continue
        opcode = opcode.group(1)
        current.instructions[name] = (opcode, after)
        if is_root:
            current.root = name
        op_name = _OP_NAME.search(after)
        attributes = _METADATA.sub("", after)
        kind = _collective_kind(opcode)
        called = re.search(r"\bcalls=%?([^\s,]+)", attributes) if opcode == "fusion" else None
        if called and called.group(1).startswith(_REDUCE_SCATTER_FUSION):
            # Its group: the fused all-reduce's, read once every computation is parsed.
            current.collectives.append(["reduce-scatter", name, _shapes(type_text),
                                        op_name.group(1) if op_name else "", called.group(1)])
            continue  # not into the fused computation: its all-reduce is this reduce-scatter
        if kind is not None:
            current.collectives.append([kind, name, _shapes(type_text),
                                        op_name.group(1) if op_name else "",
                                        _group_size(attributes)])
        if opcode == "while":
            body = re.search(r"\bbody=%?([^\s,]+)", attributes)
            condition = re.search(r"\bcondition=%?([^\s,]+)", attributes)
            trips = _TRIP_COUNT.search(attributes)
            call = [int(trips.group(1)) if trips else None, [body.group(1)] if body else []]
            current.calls.append(call)
            if trips is None:  # resolved once every computation is read
                loops.append((current, name, call, condition.group(1) if condition else None,
                              attributes))
        elif opcode == "conditional":
            branches = re.search(r"\bbranch_computations=\{([^}]*)\}", attributes)
            names = (_names(branches.group(1)) if branches else
                     [m.group(1) for m in re.finditer(
                         r"\b(?:true|false)_computation=%?([^\s,]+)", attributes)])
            current.calls.append([1, names])
        else:
            # Fusions, calls, async wrappers, custom calls. `to_apply` (reduction functions)
            # and while conditions never hold collectives.
            for match in re.finditer(r"\b(?:calls|called_computations)=(\{[^}]*\}|%?[^\s,]+)",
                                     attributes):
                for callee in _names(match.group(1).strip("{}")):
                    current.calls.append([1, [callee]])
    for computation in computations.values():
        for entry_ in computation.collectives:
            if isinstance(entry_[4], str):  # an all-reduce-scatter fusion's computation
                fused = computations.get(entry_[4])
                groups = [c[4] for c in fused.collectives] if fused else []
                entry_[4] = groups[0] if groups and isinstance(groups[0], int) else None
    for computation, name, call, condition, attributes in loops:
        trips = _trip_count(computations, computation, condition, attributes)
        if trips is None:
            computation.unknown_loops.append(name)
        call[0] = 1 if trips is None else trips
    return computations, entry


def _constant(computation: _Computation, name: str, hops: int = 4) -> int | None:
    """The integer a scalar instruction holds: a constant, or a copy / bitcast of one (the
    TPU compiler copies a loop counter's start into place)."""
    opcode, after = computation.instructions.get(name, ("", ""))
    if opcode == "constant":
        match = _CONSTANT.match(after)
        return int(match.group(1)) if match else None
    if opcode in ("copy", "bitcast", "copy-start", "copy-done") and hops:
        operands = _OPERANDS.findall(after.split(")", 1)[0])
        return _constant(computation, operands[0], hops - 1) if len(operands) == 1 else None
    return None


def _trip_count(computations, caller: _Computation, condition: str | None,
                while_attributes: str) -> int | None:
    """Iterations of a loop whose condition is `gte(param, i) < constant` (or >, <=, >=
    with the constant first / second) and whose init tuple holds a constant at index i."""
    cond = computations.get(condition or "")
    if cond is None or cond.root is None:
        return None
    opcode, after = cond.instructions[cond.root]
    operands = _OPERANDS.findall(_METADATA.sub("", after).split(")", 1)[0])
    if opcode == "fusion":  # XLA:CPU wraps the compare in a one-op fusion
        called = re.search(r"\bcalls=%?([^\s,]+)", after)
        fused = computations.get(called.group(1)) if called else None
        if fused is None or fused.root is None:
            return None
        opcode, after = fused.instructions[fused.root]
        inner = _OPERANDS.findall(_METADATA.sub("", after).split(")", 1)[0])
        mapped = []
        for name in inner:
            kind, text = fused.instructions.get(name, ("", ""))
            number = re.match(r"\s*parameter\((\d+)\)", text) if kind == "parameter" else None
            if number is None or int(number.group(1)) >= len(operands):
                return None
            mapped.append(operands[int(number.group(1))])
        operands = mapped
    direction = _DIRECTION.search(after)
    if opcode != "compare" or direction is None or len(operands) != 2:
        return None
    bounds = [_constant(cond, operand) for operand in operands]
    counter_side = 0 if bounds[1] is not None else 1
    bound = bounds[1 - counter_side]
    counter_op, counter_after = cond.instructions.get(operands[counter_side], ("", ""))
    index = _GTE_INDEX.search(counter_after)
    if bound is None or counter_op != "get-tuple-element" or index is None:
        return None
    init_operands = _OPERANDS.findall(while_attributes.split(")", 1)[0])
    if len(init_operands) != 1:
        return None
    tuple_op, tuple_after = caller.instructions.get(init_operands[0], ("", ""))
    elements = _OPERANDS.findall(_METADATA.sub("", tuple_after).split(")", 1)[0])
    if tuple_op != "tuple" or int(index.group(1)) >= len(elements):
        return None
    start = _constant(caller, elements[int(index.group(1))])
    if start is None:
        return None
    # Normalise to `counter OP bound`.
    op = direction.group(1)
    if counter_side == 1:
        op = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(op, op)
    if op == "LT":
        return max(bound - start, 0)
    if op == "LE":
        return max(bound - start + 1, 0)
    return None  # counting down: not what lax emits


def collective_ops(hlo_text: str) -> list[CollectiveOp]:
    """Every collective executed by one run of the entry computation (see module docstring)."""
    return _summarize(hlo_text)[0]


def _summarize(hlo_text: str) -> tuple[list[CollectiveOp], list[str]]:
    computations, entry = _parse(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text (pass compiled.as_text()).")
    memo: dict[str, tuple[list, list]] = {}

    def visit(name: str, stack: tuple = ()) -> tuple[list, list]:
        """([(kind, op name, computation, shapes, op_name, group, executions)], unknown
        loops) for one execution of computation `name`."""
        if name in memo:
            return memo[name]
        computation = computations.get(name)
        if computation is None or name in stack:
            return [], []
        ops = [(kind, op, name, shapes, op_name, group, 1)
               for kind, op, shapes, op_name, group in computation.collectives]
        unknown = list(computation.unknown_loops)
        for multiplier, callees in computation.calls:
            if not callees:
                continue
            results = [visit(callee, stack + (name,)) for callee in callees]
            # One branch of a conditional runs: take the heaviest.
            chosen_ops, chosen_unknown = max(
                results, key=lambda r: sum(_nbytes(o[3]) * o[6] for o in r[0]))
            ops += [(*o[:6], o[6] * multiplier) for o in chosen_ops]
            unknown += chosen_unknown
        memo[name] = (ops, unknown)
        return memo[name]

    ops, unknown = visit(entry)
    return ([CollectiveOp(kind, op, comp, shapes, _nbytes(shapes), executions, op_name, group)
             for kind, op, comp, shapes, op_name, group, executions in ops], unknown)


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """{kind: result bytes per device per step} for every kind of COLLECTIVE_KINDS (0 if none)."""
    totals = dict.fromkeys(COLLECTIVE_KINDS, 0)
    for op in collective_ops(hlo_text):
        totals[op.kind] += op.total_bytes
    return totals


def collective_summary(hlo_text: str) -> dict:
    """collective_bytes plus counts: {"bytes": {kind: int}, "wire_bytes": {kind: int} (sent
    per device, ring estimate: CollectiveOp.wire_bytes), "executions": {kind: int},
    "unknown_trip_counts": [while instructions counted once]} (JSON-ready)."""
    ops, unknown = _summarize(hlo_text)
    totals = dict.fromkeys(COLLECTIVE_KINDS, 0)
    wire = dict.fromkeys(COLLECTIVE_KINDS, 0.0)
    executions = dict.fromkeys(COLLECTIVE_KINDS, 0)
    for op in ops:
        totals[op.kind] += op.total_bytes
        wire[op.kind] += op.wire_bytes
        executions[op.kind] += op.executions
    return {"bytes": totals, "wire_bytes": {k: int(v) for k, v in wire.items()},
            "executions": executions, "unknown_trip_counts": unknown}


def format_ops(ops: Iterable[CollectiveOp], limit: int = 20) -> str:
    """The heaviest collectives, one per line (for logs and failing tests)."""
    ops = sorted(ops, key=lambda op: -op.total_bytes)
    lines = [f"{op.kind:<18} {op.total_bytes:>14,d} B = {op.executions:>4d} x "
             f"{json.dumps([f'{t}{list(d)}' for t, d in op.shapes])}  {op.op_name[-90:]}"
             for op in ops[:limit]]
    return "\n".join(lines)
