"""Where a step's time goes: its wall time split by kind of operation (`--profile`).

    matmul        weight matmuls and convolutions (dots without batch dimensions)
    attention     batched matmuls, with what XLA fused into them (the softmax)
    elementwise   elementwise work and reductions: LayerNorm, GELU, the optimizer update
    copies        transposes, copies, slices and fills
    outside ops   the step's wall time in which no operation ran (dispatch, waits)

vit_jax (XLA:CPU): a few steps run under `jax.profiler`; each event of the trace named
after an instruction of the step's optimised HLO is one operation, put in its category by
the instructions it contains (a fusion holding a batched dot is attention). XLA:CPU runs
independent operations at the same time, so an event's wall time is shared equally with
the operations running beside it: the categories then add up to the wall time and do not
count the same second twice. Loops and conditionals only hold other operations and are
not counted themselves. The breakdown needs XLA:CPU's per-operation events; on GPU and
TPU, read the trace in XProf instead.

timm (PyTorch eager): `torch.profiler`'s self CPU time of each `aten::` operation, in the
same categories; eager PyTorch runs one operation at a time (each on every core).

For vit_jax the same shared times are also summed by part of the model (`parts`): the
module path in each instruction's op_name (the blocks of a stack together) and the pass,
forward, recomputed under remat, or backward; the loss and the optimizer are outside the
model.
"""

import collections
import glob
import gzip
import json
import re
import tempfile
import time
from typing import Callable

import jax

CATEGORIES = ('matmul', 'attention', 'elementwise', 'copies')
OUTSIDE = 'outside ops'
TOP_OPS = 10

# HLO opcodes that only move or fill data. jax's remat marks the values it saves with a
# reduce-precision to their own precision, which leaves them as they are.
_COPY_OPCODES = frozenset({'reduce-precision',
    'parameter', 'constant', 'copy', 'transpose', 'bitcast', 'reshape', 'broadcast',
    'slice', 'dynamic-slice', 'dynamic-update-slice', 'concatenate', 'pad', 'iota',
    'tuple', 'get-tuple-element', 'copy-start', 'copy-done', 'reverse', 'gather'})
# Opcodes that hold other operations, each traced on its own.
_CONTAINERS = frozenset({'while', 'conditional', 'call'})
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.+?)\s([a-z][\w\-]*)\((.*)$')
_SCALAR = re.compile(r'[a-z]\w*\[\]')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%([^\s(]+)\s.*\{\s*$')


def _parse_hlo(text: str) -> tuple[dict, dict]:
  """Instructions (name -> (opcode, rest of the line, whether the result is a scalar))
  and computations (name -> instruction names) of an optimised HLO module's text."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      name, shape, opcode, rest = m.groups()
      instructions[name] = (opcode, rest, bool(_SCALAR.fullmatch(shape)))
      computations[current].append(name)
  return instructions, computations


def _category(name: str, instructions: dict, computations: dict) -> str:
  opcodes, scalar_opcodes, batched, stack, seen = set(), set(), False, [name], set()
  while stack:
    opcode, rest, scalar = instructions[stack.pop()]
    # A fusion is what it calls; arithmetic on scalars (the index of a dynamic slice)
    # does not make a copy elementwise work.
    if opcode != 'fusion':
      (scalar_opcodes if scalar else opcodes).add(opcode)
    batched |= opcode == 'dot' and 'lhs_batch_dims' in rest
    for called in re.findall(r'calls=%([^\s,]+)', rest):
      if called not in seen:
        seen.add(called)
        stack.extend(computations.get(called, ()))
  opcodes = opcodes or scalar_opcodes  # only scalar work: a learning rate, a norm
  if batched:
    return 'attention'
  if opcodes & {'dot', 'convolution'}:
    return 'matmul'
  if opcodes <= _COPY_OPCODES:
    return 'copies'
  return 'elementwise'


def _source(rest: str) -> str:
  """The last three parts of the instruction's op_name: the model code it comes from."""
  m = re.search(r'op_name="([^"]*)"', rest)
  return '/'.join(m.group(1).split('/')[-3:]) if m else ''


OUTSIDE_MODEL = 'outside the model (loss, optimizer)'
NO_SOURCE = 'no op_name (added by XLA)'
SCAN_LOOP = ' (scan loop: layer slices, saved values, fills)'
DIRECTIONS = ('forward', 'recomputed', 'backward')
TOP_PARTS = 12
_MODEL = re.compile(r'^(?:transpose\()?jvp\(([A-Z]\w*)\)\)?$')
_MODULE = re.compile(r'^[A-Za-z_][\w\-]*$')  # a module's name (not a transform or method)
_NOT_MODULES = frozenset({'while', 'body', 'closed_call', 'checkpoint', 'rematted_computation',
                          'cond', 'remat', 'remat2', 'scan', 'custom_jvp_call',
                          'custom_vjp_call'})
# One of a stack: encoderblock_3, layers_0 (lowercase, '_', a number), and unit01, block1
# where they hold other modules; norm1 and norm2 (two layers of one block), Dense_1 and
# MlpBlock_0 stay as they are. A stack at the model's top level is a stack of stages
# (Swin's layers_2, ResNet's layer1, BiT's block1), which differ in width: its members
# stay apart.
_REPEATED = re.compile(r'^([a-z][a-z]*?)_\d+$')
_REPEATED_PARENT = re.compile(r'^([a-z][a-z]*?)\d+$')


def _part(rest: str) -> tuple[str, str]:
  """The part of the model an instruction comes from and the pass it belongs to, from its
  op_name.

  The part is the model's module path, at most three levels
  ('Transformer/encoderblock/MlpBlock_0'), with the blocks of a stack counted together
  (the stages of the model's top level stay apart: Swin's 'layers_2/blocks/mlp').
  The work of a scan over the blocks outside their modules (slicing each layer's
  parameters, writing the saved values, filling the stacked buffers) is the loop's
  module path plus `SCAN_LOOP`. The pass is 'forward', 'recomputed' (the forward ops
  that a remat policy recomputes, where XLA keeps them apart from the backward ops they
  feed) or 'backward'; it is '' for work outside the model's apply (`OUTSIDE_MODEL`) and
  for instructions without an op_name (`NO_SOURCE`).
  """
  m = re.search(r'op_name="([^"]*)"', rest)
  if not m:
    return NO_SOURCE, ''
  segments = m.group(1).split('/')
  models = [i for i, s in enumerate(segments) if _MODEL.match(s)]
  if not models and len(segments) > 2 and segments[0].startswith('jit(') and re.match(
      r'^[A-Z]\w*$', segments[1]):
    models = [1]  # inference: jit(f)/Model/... with no jvp
  if not models:
    return OUTSIDE_MODEL, ''
  backward = segments[models[0]].startswith('transpose(')
  direction = ('recomputed' if backward and 'rematted_computation' in segments
               else 'backward' if backward else 'forward')
  # Under remat the backward pass traces the model again: its path restarts after the
  # last 'jvp(Model)' ('.../transpose(jvp(M))/Transformer/jvp(M)/Transformer/...').
  path, in_loop = [], False
  for s in segments[models[-1] + 1:-1]:
    if s == 'while':
      in_loop = True
    if _MODULE.match(s) and s not in _NOT_MODULES and not re.match(r'^branch_\d+_fun$', s):
      if len(path) > 1:
        path[-1] = _REPEATED_PARENT.sub(r'\1', path[-1])  # it holds this module
      path.append(_REPEATED.sub(r'\1', s) if path else s)
      in_loop = False
  model = segments[models[-1]]
  name = '/'.join(path[:3]) or (_MODEL.match(model).group(1) if _MODEL.match(model) else model)
  return name + (SCAN_LOOP if in_loop else ''), direction


def _named_rest(name: str, instructions: dict, computations: dict) -> str:
  """The instruction's line, or for a fusion without an op_name of its own, the line of
  the last instruction it calls that has one (its root, where that has one)."""
  rest = instructions[name][1]
  if 'op_name="' in rest or instructions[name][0] != 'fusion':
    return rest
  for called in re.findall(r'calls=%([^\s,]+)', rest):
    for inner in reversed(computations.get(called, ())):
      if 'op_name="' in instructions[inner][1]:
        return instructions[inner][1]
  return rest


def _shared_wall_time(events: list[dict]) -> collections.Counter:
  """Per event name, its wall time with time shared equally among the events that run at
  once (a sweep over the events' starts and ends)."""
  points = sorted((t, kind, i) for i, e in enumerate(events)
                  for t, kind in ((e['ts'], 1), (e['ts'] + e['dur'], -1)))
  shared, active, last = collections.Counter(), set(), None
  for t, kind, i in points:
    if active:
      for j in active:
        shared[events[j]['name']] += (t - last) / len(active)
    last = t
    if kind == 1:
      active.add(i)
    else:
      active.discard(i)
  return shared


def _record(categories: dict, wall_s: float, steps: int, top: list,
            parts: dict | None = None) -> dict:
  per_step = {c: categories.get(c, 0.0) / steps for c in CATEGORIES}
  per_step[OUTSIDE] = max(wall_s - sum(per_step.values()), 0.0)
  record = {'steps': steps, 'wall_s': wall_s, 'seconds': per_step, 'top_ops': top}
  if parts is not None:
    # Seconds per step of each part of the model, by pass, longest first.
    # None for the passes of work outside the model, and for a pass the step has not
    # (an inference step's recomputed and backward passes showed 0.000 s).
    ran = {d for by_pass in parts.values() for d, t in by_pass.items() if t > 0}
    record['parts'] = [
        {'part': part, **{d: (by_pass.get(d, 0.0) / steps
                              if set(by_pass) - {''} and d in ran else None)
                          for d in DIRECTIONS},
         'seconds': sum(by_pass.values()) / steps}
        for part, by_pass in sorted(parts.items(), key=lambda kv: -sum(kv[1].values()))]
  return record


def xla_breakdown(step: Callable[[], None], hlo_text: str, steps: int = 2) -> dict:
  """Runs `step` (synchronised) `steps` times under jax.profiler; the per-step seconds of
  each category, and the operations that took longest."""
  if jax.default_backend() != 'cpu':
    raise ValueError(f'--profile reads XLA:CPU per-operation events; the backend is '
                     f'{jax.default_backend()!r}: open a jax.profiler trace in XProf instead')
  instructions, computations = _parse_hlo(hlo_text)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    try:
      for _ in range(steps):
        step()
    finally:
      wall_s = (time.perf_counter() - start) / steps
      jax.profiler.stop_trace()
    (path,) = glob.glob(f'{trace_dir}/**/perfetto_trace.json.gz', recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = [e for e in (trace['traceEvents'] if isinstance(trace, dict) else trace)
            if e.get('ph') == 'X' and e.get('name') in instructions
            and instructions[e['name']][0] not in _CONTAINERS]
  if not events:
    raise ValueError("the profiler's trace names none of the step's operations")
  shared = _shared_wall_time(events)
  calls = collections.Counter(e['name'] for e in events)
  categories = collections.Counter()
  parts = collections.defaultdict(collections.Counter)
  top = []
  for name, micros in shared.most_common():
    category = _category(name, instructions, computations)
    categories[category] += micros / 1e6
    part, direction = _part(_named_rest(name, instructions, computations))
    parts[part][direction] += micros / 1e6
    if len(top) < TOP_OPS:
      top.append({'op': name, 'category': category, 'seconds': micros / 1e6 / steps,
                  'calls': calls[name] // steps, 'source': _source(instructions[name][1])})
  return _record(categories, wall_s, steps, top, parts)


_TORCH_MATMUL = frozenset({
    'aten::mm', 'aten::addmm', 'aten::mkldnn_convolution', 'aten::convolution_backward',
    'aten::_convolution', 'aten::thnn_conv2d', 'aten::mkldnn_linear', 'aten::_mkl_linear'})
_TORCH_ATTENTION = frozenset({'aten::bmm', 'aten::baddbmm', 'aten::_softmax',
                              'aten::_softmax_backward_data'})
_TORCH_COPIES = frozenset({
    'aten::copy_', 'aten::fill_', 'aten::zero_', 'aten::cat', 'aten::clone', 'aten::stack',
    'aten::contiguous', 'aten::_to_copy', 'aten::index', 'aten::slice', 'aten::select',
    'aten::transpose', 'aten::t', 'aten::view', 'aten::reshape', 'aten::permute',
    'aten::as_strided', 'aten::expand', 'aten::empty', 'aten::empty_like', 'aten::zeros',
    'aten::unbind', 'aten::split', 'aten::detach', 'aten::_unsafe_view'})


def _torch_category(name: str) -> str:
  if name in _TORCH_MATMUL or 'conv' in name:
    # (every convolution kernel: bf16 autocast on a CPU runs PyTorch's own
    # aten::_slow_conv2d_forward/_backward, which counted as elementwise)
    return 'matmul'
  if name in _TORCH_ATTENTION or 'scaled_dot_product' in name:
    return 'attention'
  if name in _TORCH_COPIES:
    return 'copies'
  return 'elementwise'


def torch_breakdown(torch, step: Callable[[], None], steps: int = 2) -> dict:
  """The same record for a PyTorch eager step, from torch.profiler's self CPU times."""
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(steps):
      step()
    wall_s = (time.perf_counter() - start) / steps
  categories = collections.Counter()
  ops = []
  for row in prof.key_averages():
    if not row.key.startswith('aten::'):
      continue  # autograd and optimizer frames: time outside the operations
    seconds = row.self_cpu_time_total / 1e6
    categories[_torch_category(row.key)] += seconds
    ops.append((seconds, row.key, row.count))
  top = [{'op': key, 'category': _torch_category(key), 'seconds': s / steps,
          'calls': count // steps, 'source': ''}
         for s, key, count in sorted(ops, reverse=True)[:TOP_OPS]]
  return _record(categories, wall_s, steps, top)


def format_table(records: dict) -> list[str]:
  """Lines of a table: one column per framework (name -> record), seconds per step and
  the share of the profiled wall time."""
  names = list(records)
  w = max(22, *(len(n) + 2 for n in names))  # a column's width
  lines = ['  where a step goes (seconds per step, share of its wall time; '
           f"profiled over {records[names[0]]['steps']} steps):",
           '    ' + ' ' * 13 + ''.join(f'{n:>{w}}' for n in names)]
  for category in (*CATEGORIES, OUTSIDE):
    cells = ''.join(
        f"{r['seconds'][category]:>{w - 8}.3f} s "
        f"{100 * r['seconds'][category] / r['wall_s']:4.0f}%"
        for r in records.values())
    lines.append(f'    {category:<13}{cells}')
  lines.append('    ' + f"{'wall':<13}" + ''.join(f"{r['wall_s']:>{w - 8}.3f} s      "
                                                   for r in records.values()))
  for n, r in records.items():
    if r.get('parts'):
      lines.append(f'  {n}: by part of the model (seconds per step; blocks together)')
      pw = min(64, max(len(p['part']) for p in r['parts']) + 2)  # the part's column
      lines.append(f"    {'':<{pw}}" + ''.join(f'{d:>11}' for d in (*DIRECTIONS, 'total')))
      shown = r['parts'][:TOP_PARTS]
      rest = r['parts'][TOP_PARTS:]
      if len(rest) == 1:
        shown = r['parts']
      elif rest:
        shown = shown + [{'part': f'{len(rest)} more parts', **{
            k: (sum(p[k] for p in rest if p[k] is not None)
                if any(p[k] is not None for p in rest) else None)
            for k in (*DIRECTIONS, 'seconds')}}]
      for p in shown:
        lines.append(f"    {p['part'][:pw]:<{pw}}" + ''.join(
            f'{p[k]:>9.3f} s' if p[k] is not None else f"{'-':>11}"
            for k in (*DIRECTIONS, 'seconds')))
    lines.append(f'  {n}: longest operations')
    for op in r['top_ops'][:5]:
      lines.append(f"    {op['seconds'] * 1e3:8.1f} ms x{op['calls']:<3} {op['category']:<11} "
                   f"{op['op']}  {op['source']}".rstrip())
  return lines
