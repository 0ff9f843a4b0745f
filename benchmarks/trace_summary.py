"""Summarises a jax.profiler trace of train steps: where the device's time goes, and whether the \
host keeps up.

  python benchmarks/trace_summary.py runs/cifar10/logs/teacher/plugins/profile/*/*.trace.json.gz \
      [--top=15]

Reads the `*.trace.json.gz` that `--config.profile.num_steps=N` (or `benchmarks/train_speed.py
--trace_steps=N`) writes. Prints, per traced step: wall time between step starts (host annotations
'train'), device kernels and their summed time, the device's busy fraction over the traced span, the
host's time inside the step's execute call, and the kernels grouped by kind (convolutions and
matmuls vs the rest) with the largest groups by name. Only device planes ('/device:...') count as
device time; without one (a CPU trace) it says so.

A CPU trace is read by benchmarks/cpu_profile.py with the functions below the divider (parse_hlo,
category, self_times): XLA:CPU's operations grouped by what their compiled HLO computes.
"""

import argparse
import collections
import gzip
import json
import re

MATMUL_PATTERN = re.compile(r'xmma|gemm|nvjet|cutlass|conv|dot', re.IGNORECASE)


def load_events(path: str) -> tuple[list, dict]:
  """Complete ('X') events and the process names of a Chrome-format trace."""
  with gzip.open(path, 'rt') if path.endswith('.gz') else open(path) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  names = {
      e['pid']: e['args']['name']
      for e in events
      if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  return [e for e in events if e.get('ph') == 'X'], names


def kernel_group(name: str) -> str:
  """'input_reduce_fusion.12' -> 'input_reduce_fusion'; library kernels keep their first 60
  characters."""
  return re.sub(r'[._]?\d+$', '', name.split('.')[0])[:60]


def busy_time(kernels: list) -> float:
  """Microseconds in which at least one kernel runs (the union of their intervals)."""
  total, end = 0.0, float('-inf')
  for e in sorted(kernels, key=lambda e: e['ts']):
    start, stop = max(e['ts'], end), e['ts'] + e['dur']
    total += max(stop - start, 0.0)
    end = max(end, stop)
  return total


def summarise(path: str, top: int) -> None:
  events, process_names = load_events(path)
  device_pids = {pid for pid, name in process_names.items() if name.startswith('/device:')}
  kernels = [e for e in events if e['pid'] in device_pids]
  steps = sorted((e for e in events if e['pid'] not in device_pids and e['name'] == 'train'),
                 key=lambda e: e['ts'])
  # host time inside each XLA program's launch ('jit_train_step:XLA GPU module')
  modules = collections.Counter()
  for e in events:
    if e['pid'] not in device_pids and e['name'].endswith(' module'):
      modules[e['name']] += e['dur']
  n = max(len(steps), 1)
  if len(steps) > 1:
    gaps = [b['ts'] - a['ts'] for a, b in zip(steps, steps[1:])]
    print(
        f'{len(steps)} steps; wall time between step starts: {sum(gaps) / len(gaps) / 1e3:.1f} ms')
  if not kernels:
    print('no device plane in this trace (a CPU run): host events only')
    return
  span = max(e['ts'] + e['dur'] for e in kernels) - min(e['ts'] for e in kernels)
  total = sum(e['dur'] for e in kernels)
  print(
      f'device: {len(kernels) / n:.0f} kernels and {total / n / 1e3:.2f} ms of kernel '
      f'time a step; busy {100 * busy_time(kernels) / span:.1f}% of the traced span '
      f'({span / 1e3:.1f} ms)')
  if modules:
    module, launch = modules.most_common(1)[0]
    print(
        f'host: {launch / n / 1e3:.2f} ms a step inside {module} (launching its kernels; '
        'the device idles when this and the rest of the loop exceed its kernel time)')
  time_by, count_by = collections.Counter(), collections.Counter()
  for e in kernels:
    time_by[kernel_group(e['name'])] += e['dur']
    count_by[kernel_group(e['name'])] += 1
  matmul = sum(t for g, t in time_by.items() if MATMUL_PATTERN.search(g))
  print(f'convolutions and matmuls: {matmul / n / 1e3:.2f} ms a step; everything else: '
        f'{(total - matmul) / n / 1e3:.2f} ms')
  print('| kernels (grouped by name) | a step | ms a step |')
  print('|---|---|---|')
  for group, t in time_by.most_common(top):
    print(f'| {group} | {count_by[group] / n:.0f} | {t / n / 1e3:.2f} |')


# ------------------------------------- a CPU trace: XLA:CPU's operations by kind (cpu_profile.py)

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')  # not indented
_CALLS = re.compile(r'(?:calls|to_apply)=\{?%?([\w.\-]+)')
_WRAPPERS = ('ThunkExecutor', 'PjitFunction', 'block_until_ready', 'train')


def parse_hlo(text: str) -> tuple[dict, dict]:
  """({instruction: (opcode, called computations, window)}, {computation: [instructions]})."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    match = _COMPUTATION.match(line)
    if match:  # a computation's header: unindented, ending in '{' (its body is indented)
      current = match.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if match:
      name, opcode, rest = match.groups()
      window = re.search(r'window=\{([^}]*)\}', rest)
      instructions[name] = (opcode, _CALLS.findall(rest), window.group(1) if window else '')
      computations[current].append(name)
  return instructions, computations


def category(name: str, instructions: dict, computations: dict) -> str:
  """The kind of work of one traced operation (the module docstring's groups)."""
  opcode, called, window = instructions[name]
  if opcode.startswith('all-reduce') or opcode.startswith('reduce-scatter'):
    return 'all-reduce'
  if opcode == 'while':
    return 'loop (own time)'
  inner = [(opcode, window)]
  if opcode != 'call':
    stack, seen = list(called), set()
    while stack:
      computation = stack.pop()
      if computation in seen:
        continue
      seen.add(computation)
      for member in computations.get(computation, ()):
        member_opcode, member_called, member_window = instructions[member]
        inner.append((member_opcode, member_window))
        stack.extend(member_called)
  opcodes = {op for op, _ in inner}
  if 'convolution' in opcodes:
    windows = [w for op, w in inner if op == 'convolution']
    return 'conv weight grad' if any(_is_weight_grad(w) for w in windows) else 'convolution'
  if 'dot' in opcodes:
    return 'dot'
  if opcodes & {'reduce', 'reduce-window'}:
    return 'reduce'
  if opcodes <= {'copy', 'transpose', 'bitcast', 'parameter'}:
    return 'copy / transpose'
  return 'elementwise'


def _is_weight_grad(window: str) -> bool:
  """A kernel's gradient is a convolution of the activations with the output's gradient: its window
  spans the activation (wider than the network's 3x3 and 1x1 kernels), dilated for a strided one."""
  size = re.search(r'size=([\dx]+)', window)
  return 'rhs_dilate' in window or bool(size and max(map(int, size.group(1).split('x'))) > 3)


def self_times(trace_path: str) -> collections.Counter:
  """{operation name: microseconds of self time} over the XLA threads of a Chrome trace."""
  with gzip.open(trace_path, 'rt') as f:
    events = json.load(f)['traceEvents']
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get('ph') == 'X' and not e['name'].startswith(_WRAPPERS):
      by_thread[(e['pid'], e['tid'])].append(e)
  totals = collections.Counter()
  for thread_events in by_thread.values():
    stack = []  # (end, name) of the enclosing events
    for e in sorted(thread_events, key=lambda e: (e['ts'], -e['dur'])):
      while stack and stack[-1][0] <= e['ts']:
        stack.pop()
      if stack:  # nested: its time is not its parent's own
        totals[stack[-1][1]] -= e['dur']
      totals[e['name']] += e['dur']
      stack.append((e['ts'] + e['dur'], e['name']))
  return totals


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('trace', help='a *.trace.json.gz written by jax.profiler')
  parser.add_argument('--top', type=int, default=15, help='kernel groups to list')
  args = parser.parse_args()
  summarise(args.trace, args.top)


if __name__ == '__main__':
  main()
