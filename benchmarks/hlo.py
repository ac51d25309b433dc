"""Reads compiled XLA HLO text: full-size passes, cross-device collectives, memory.

Batch norm is memory-bound, so its cost on CPU is the number of times the activations stream
through memory. This module counts that from what XLA actually compiled,
``jax.jit(f).lower(*args).compile().as_text()``, rather than from the jaxpr:

* a *pass* is one kernel of the entry computation (a fusion or an unfused op) that reads or writes
  an array with the activation's element count; its full-size reads (distinct operands) and writes
  (outputs, tuple elements counted one by one) are counted separately;
* a full-size operand that the kernel only gathers or slices from (XLA:CPU fuses the per-channel
  "first valid value" gather this way) is not a read;
* bitcasts, tuples, parameters and constants move no data and are never passes;
* control flow is followed into its computations: a ``while`` body and a ``call`` count once, and
  a ``conditional`` (``lax.cond``) counts its dearest branch by default (an upper bound on one
  execution) or its cheapest (``branches="min"``); fused computations are only inspected to
  classify their parameters.

Written against XLA:CPU in jax 0.10.2, whose HLO has ``kLoop`` fusions, ``kCustom`` "__ynn_fusion"
reductions, ``/*index=5*/`` comments in long operand lists and tuple-shaped multi-output fusions.

Examples:
  >>> compiled = jax.jit(lambda x: x * 2.0).lower(jnp.ones((4, 8))).compile()
  >>> count_passes(compiled.as_text(), 32).passes
  1
"""

from collections.abc import Iterable
import dataclasses
import math
import re
from typing import Any

COLLECTIVE_OPCODES = (
    "all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
    "ragged-all-to-all", "collective-broadcast",
)
# Ops that move no data (or only name data), so they are never counted as passes.
_FREE_OPCODES = frozenset({
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id",
    "replica-id", "opt-barrier", "add-dependency",
})
# Ops whose result is read from a small part of a large operand.
_PARTIAL_READ_OPCODES = frozenset({"gather", "slice", "dynamic-slice"})

_SHAPE_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<=?]*)\]")
_COMPUTATION_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION_RE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_NAME_RE = re.compile(r"%([\w.\-]+)")
_ATTR_COMPUTATION_RE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|"
                                  r"false_computation)=%?([\w.\-]+)")
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Shape:
  """One array shape from HLO text, e.g. ``f32[64,8,8,32]{3,2,1,0}``."""

  dtype: str
  dims: tuple[int, ...]

  @property
  def size(self) -> int:
    return math.prod(self.dims)


@dataclasses.dataclass
class Instruction:
  """One HLO instruction: ``%name = TYPE opcode(operands), attributes``."""

  name: str
  opcode: str
  shapes: list[Shape]  # the result; several for a tuple-shaped result.
  operands: list[str]
  attributes: str
  is_root: bool = False

  @property
  def parameter_number(self) -> int:
    """For a ``parameter(N)`` instruction, N (its operand list holds the literal text)."""
    return int(self.operands[0])

  def called(self, *attrs: str) -> list[str]:
    """Names of the computations this instruction calls through `attrs`."""
    names = [m.group(2) for m in _ATTR_COMPUTATION_RE.finditer(self.attributes)
             if m.group(1) in attrs]
    if "branch_computations" in attrs:
      for m in _BRANCHES_RE.finditer(self.attributes):
        names += _NAME_RE.findall(m.group(1)) or [s.strip() for s in m.group(1).split(",")]
    return names


@dataclasses.dataclass
class Computation:
  """A named list of instructions (the entry, a fused computation, a branch, a reducer...)."""

  name: str
  is_entry: bool
  instructions: list[Instruction]


@dataclasses.dataclass
class Module:
  """Every computation of an HLO module, by name, and the name of its entry."""

  computations: dict[str, Computation]
  entry: str


def _split_type(text: str) -> tuple[str, str]:
  """Splits ``TYPE opcode(...)...`` into the type text and the rest (types may be tuples)."""
  text = text.lstrip()
  if text.startswith("("):
    depth = 0
    for i, ch in enumerate(text):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return text[:i + 1], text[i + 1:].lstrip()
    raise ValueError(f"unbalanced tuple type in HLO: {text[:80]!r}")
  head, _, rest = text.partition(" ")
  return head, rest.lstrip()


def _parse_shapes(type_text: str) -> list[Shape]:
  shapes = []
  for dtype, dims in _SHAPE_RE.findall(type_text):
    if dtype == "token":
      continue
    sizes = tuple(int(d.lstrip("<=")) for d in dims.split(",") if d.strip("<=?"))
    shapes.append(Shape(dtype, sizes))
  return shapes


def _split_operands(rest: str) -> tuple[str, list[str], str]:
  """``opcode(a, b), attrs`` -> (opcode, operand names, attrs)."""
  opcode, paren, tail = rest.partition("(")
  if not paren:
    return rest.split(",")[0].strip(), [], ""
  depth = 1
  for i, ch in enumerate(tail):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      break
  operand_text, attributes = tail[:i], tail[i + 1:]
  operand_text = re.sub(r"/\*.*?\*/", "", operand_text)
  if opcode.strip() in ("constant", "parameter"):  # `parameter(0)`: a number, not an operand.
    return opcode.strip(), [operand_text.strip()], attributes
  names = _NAME_RE.findall(operand_text)
  if not names and operand_text.strip():
    # Operands printed without '%' (some XLA versions): the last token of each comma item.
    names = [item.split()[-1] for item in operand_text.split(",") if item.strip()]
  return opcode.strip(), names, attributes


def parse(hlo_text: str) -> Module:
  """Parses the text of an HLO module (``compiled.as_text()``) into computations."""
  computations: dict[str, Computation] = {}
  entry = None
  current = None
  for line in hlo_text.splitlines():
    stripped = line.strip()
    if current is None:
      match = _COMPUTATION_RE.match(stripped)
      if match:
        current = Computation(match.group(2), bool(match.group(1)), [])
      continue
    if stripped == "}":
      computations[current.name] = current
      if current.is_entry:
        entry = current.name
      current = None
      continue
    match = _INSTRUCTION_RE.match(line)
    if not match:
      continue
    type_text, rest = _split_type(match.group(3))
    opcode, operands, attributes = _split_operands(rest)
    current.instructions.append(Instruction(
        name=match.group(2), opcode=opcode, shapes=_parse_shapes(type_text), operands=operands,
        attributes=attributes, is_root=bool(match.group(1))))
  if entry is None:
    raise ValueError("no ENTRY computation found in the HLO text; pass compiled.as_text().")
  return Module(computations, entry)


@dataclasses.dataclass
class Pass:
  """One kernel that touches full-size data."""

  name: str
  opcode: str
  reads: int
  writes: int


@dataclasses.dataclass
class PassCount:
  """Full-size traffic of a program: kernels touching the activations, reads and writes."""

  passes: int
  reads: int
  writes: int
  kernels: list[Pass]

  def summary(self) -> str:
    return f"{self.passes} passes ({self.reads} reads, {self.writes} writes)"


def _partially_read_parameters(fused: Computation) -> set[int]:
  """Parameter numbers of a fused computation that are only gathered or sliced from."""
  users: dict[str, list[Instruction]] = {}
  for inst in fused.instructions:
    for operand in inst.operands:
      users.setdefault(operand, []).append(inst)

  def only_partial(name: str, depth: int = 0) -> bool:
    uses = users.get(name, [])
    if not uses or depth > 8:
      return False
    for use in uses:
      if use.opcode in ("bitcast", "reshape"):
        if not only_partial(use.name, depth + 1):
          return False
      elif use.opcode not in _PARTIAL_READ_OPCODES or use.operands[0] != name:
        return False
    return True

  return {inst.parameter_number for inst in fused.instructions
          if inst.opcode == "parameter" and only_partial(inst.name)}


BRANCH_POLICIES = ("max", "min", "all")


def _walk(module: Module, computation: Computation, visit, branches: str, depth: int = 0) -> list:
  """Applies `visit(instruction, shapes)` along one execution path of `computation`.

  `visit` returns a list of items for an instruction (kernels, collectives). A ``conditional``
  contributes the items of one branch: the one with the most items (``branches="max"``: an upper
  bound on one execution), the fewest (``"min"``: the cheapest path), or of every branch
  (``"all"``: a static count). A ``while`` body and condition, and a ``call``, count once.
  """
  if depth > 32:
    raise ValueError("HLO control flow nested deeper than 32 levels")
  shapes = {i.name: i.shapes for i in computation.instructions}
  items = []
  for inst in computation.instructions:
    if inst.opcode == "conditional":
      options = [_walk(module, module.computations[name], visit, branches, depth + 1)
                 for name in inst.called("branch_computations", "true_computation",
                                         "false_computation")
                 if name in module.computations]
      if branches == "all":
        items += [item for option in options for item in option]
      elif options:
        pick = max if branches == "max" else min
        items += pick(options, key=lambda option: (len(option), sum(map(_weight, option))))
    elif inst.opcode in ("while", "call", "async-start"):
      for name in inst.called("body", "condition", "to_apply", "calls"):
        if name in module.computations:
          items += _walk(module, module.computations[name], visit, branches, depth + 1)
    else:
      items += visit(inst, shapes)
  return items


def _weight(item) -> int:
  return item.reads + item.writes if isinstance(item, Pass) else 1


def count_passes(hlo_text: str, full_size: int | Iterable[int], *,
                 branches: str = "max") -> PassCount:
  """Counts the kernels of a compiled program that read or write a full-size array.

  Args:
    hlo_text: ``compiled.as_text()`` of a jitted program.
    full_size: the element count of the activations (e.g. ``x.size``), or several counts (a
      program mixing layouts); an array counts as full-size when its element count is one of them.
    branches: at a ``conditional`` (``lax.cond``), count the branch with the most passes
      (``"max"``, the default: an upper bound on one execution), the fewest (``"min"``: the
      cheapest path), or every branch (``"all"``).

  Returns:
    `PassCount`: the number of such kernels and their full-size reads and writes.
  """
  if branches not in BRANCH_POLICIES:
    raise ValueError(f"`branches` must be one of {BRANCH_POLICIES}; got {branches!r}.")
  sizes = {full_size} if isinstance(full_size, int) else set(full_size)
  module = parse(hlo_text)

  def visit(inst: Instruction, shapes: dict[str, list[Shape]]) -> list[Pass]:
    if inst.opcode in _FREE_OPCODES or inst.opcode.endswith("-done"):
      return []
    partial: set[int] = set()
    if inst.opcode == "fusion":
      for called in inst.called("calls"):
        if called in module.computations:
          partial = _partially_read_parameters(module.computations[called])
    reads = 0
    seen = set()
    for index, operand in enumerate(inst.operands):
      if operand in seen or index in partial:
        continue
      seen.add(operand)
      if any(s.size in sizes for s in shapes.get(operand, [])):
        reads += 1
    if inst.opcode in _PARTIAL_READ_OPCODES:
      reads = 0
    writes = sum(s.size in sizes for s in inst.shapes)
    return [Pass(inst.name, inst.opcode, reads, writes)] if reads or writes else []

  kernels = _walk(module, module.computations[module.entry], visit, branches)
  return PassCount(len(kernels), sum(k.reads for k in kernels), sum(k.writes for k in kernels),
                   kernels)


def count_collectives(hlo_text: str, *, branches: str = "max") -> dict[str, int]:
  """Counts cross-device collectives by kind (an async ``*-start``/``*-done`` pair counts once).

  Args:
    hlo_text: ``compiled.as_text()`` of a jitted (e.g. ``shard_map``) program.
    branches: how to count inside a ``conditional``, as in `count_passes`.

  Returns:
    A dict from collective opcode (``all-reduce``, ``all-gather``, ...) to its count, with only
    the kinds present; ``sum(d.values())`` is the total.
  """
  if branches not in BRANCH_POLICIES:
    raise ValueError(f"`branches` must be one of {BRANCH_POLICIES}; got {branches!r}.")
  module = parse(hlo_text)

  def visit(inst: Instruction, shapes: dict[str, list[Shape]]) -> list[str]:
    del shapes
    opcode = inst.opcode.removesuffix("-start")
    if opcode in COLLECTIVE_OPCODES and not inst.opcode.endswith("-done"):
      return [opcode]
    return []

  counts: dict[str, int] = {}
  for opcode in _walk(module, module.computations[module.entry], visit, branches):
    counts[opcode] = counts.get(opcode, 0) + 1
  return counts


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}


def collective_bytes(hlo_text: str, *, branches: str = "max") -> dict[str, int]:
  r"""Bytes each device receives from cross-device collectives, by kind: the size of each
  collective's result (for an all-reduce, the reduced payload; for an all-gather, everything
  gathered), summed along one execution path (`branches` as in `count_passes`).

  Examples:
    >>> text = "ENTRY %e (p: f32[4]) -> f32[4] {\n  %p = f32[4]{0} parameter(0)\n"
    >>> text += "  ROOT %a = f32[4]{0} all-reduce(%p), to_apply=%add\n}"
    >>> collective_bytes(text)
    {'all-reduce': 16}
  """
  if branches not in BRANCH_POLICIES:
    raise ValueError(f"`branches` must be one of {BRANCH_POLICIES}; got {branches!r}.")
  module = parse(hlo_text)

  def visit(inst: Instruction, shapes: dict[str, list[Shape]]) -> list[tuple[str, int]]:
    del shapes
    opcode = inst.opcode.removesuffix("-start")
    if opcode in COLLECTIVE_OPCODES and not inst.opcode.endswith("-done"):
      size = sum(s.size * _DTYPE_BYTES.get(s.dtype, 4) for s in inst.shapes)
      return [(opcode, size)]
    return []

  totals: dict[str, int] = {}
  for opcode, size in _walk(module, module.computations[module.entry], visit, branches):
    totals[opcode] = totals.get(opcode, 0) + size
  return totals


# Options that only make LLVM's code generation cheaper: the optimised HLO, its fusions and the
# buffer assignment behind `memory_analysis()` are the same, and compiling is 2-3x faster.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_for_analysis(lowered: Any) -> Any:
  """``lowered.compile()`` for reading the HLO and memory analysis, not for running fast."""
  return lowered.compile(FAST_COMPILE_OPTIONS)


def memory(compiled: Any) -> dict[str, int]:
  """Byte sizes from ``compiled.memory_analysis()``: temp, argument, output, alias, code.

  ``temp`` is XLA's peak of buffers that are neither arguments nor outputs: for a
  forward+backward program, what it keeps alive between the passes (saved activations included).
  """
  analysis = compiled.memory_analysis()
  fields = {"temp": "temp_size_in_bytes", "argument": "argument_size_in_bytes",
            "output": "output_size_in_bytes", "alias": "alias_size_in_bytes",
            "code": "generated_code_size_in_bytes"}
  if analysis is None:
    return {k: -1 for k in fields}
  return {k: int(getattr(analysis, v, -1)) for k, v in fields.items()}


def peak_temp_bytes(compiled: Any) -> int:
  """XLA's peak temporary allocation of a compiled program, in bytes."""
  return memory(compiled)["temp"]
