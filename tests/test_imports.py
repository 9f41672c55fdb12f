"""The import structure of the repository (docs/design.md, "Packages"): no import cycle, and no
path from the training side of the house to inference code.

Imports are read with `ast`, those inside functions included, so an import deferred into a
function to break a cycle still counts as an edge.
"""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOTS = ('solq_jax', 'kernels', 'configs')
ENTRY_POINTS = ('train.py', 'eval.py', 'predict.py')
# Modules (and the packages below them) that must never reach `solq_jax.inference`.
NO_INFERENCE = ('solq_jax.models', 'solq_jax.ops', 'solq_jax.masks', 'solq_jax.data',
                'solq_jax.training', 'solq_jax.losses', 'solq_jax.matching', 'solq_jax.sharding',
                'solq_jax.weights', 'solq_jax.box_ops', 'kernels')


def module_names(root):
  """`{dotted module name: path}` of every `.py` file under the package roots of `root`."""
  names = {}
  for top in ROOTS:
    for path in sorted((root / top).rglob('*.py')):
      parts = list(path.relative_to(root).with_suffix('').parts)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      names['.'.join(parts)] = path
  for entry in ENTRY_POINTS:
    if (root / entry).exists():
      names[entry[:-3]] = root / entry
  return names


def _resolve(name, modules):
  """The longest known module that `name` names or lies in (None if outside the repository)."""
  parts = name.split('.')
  while parts:
    candidate = '.'.join(parts)
    if candidate in modules:
      return candidate
    parts.pop()
  return None


def import_graph(root):
  """`{module: set of repository modules it imports}`, every `import` statement counted."""
  modules = module_names(root)
  graph = {}
  for name, path in modules.items():
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:   # relative import
          anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
          base = '.'.join(anchor + ([base] if base else []))
        # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
        targets = [f'{base}.{alias.name}' for alias in node.names]
      for target in targets:
        resolved = _resolve(target, modules)
        if resolved is not None and resolved != name:
          edges.add(resolved)
    graph[name] = edges
  return graph


def find_cycle(graph):
  """One import cycle as a list of modules (first == last), or None."""
  state = {}   # module -> 1 while on the stack, 2 when done

  def visit(node, stack):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt, stack)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [])
      if found:
        return found
  return None


def reachable(graph, start):
  seen, todo = set(), [start]
  while todo:
    for nxt in graph.get(todo.pop(), ()):
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def _inside(name, prefixes):
  return any(name == p or name.startswith(p + '.') for p in prefixes)


def inference_paths(graph):
  """`[(module, inference module it reaches)]` for the modules of `NO_INFERENCE`."""
  return sorted((m, r) for m in graph if _inside(m, NO_INFERENCE)
                for r in reachable(graph, m) if _inside(r, ('solq_jax.inference',)))


@pytest.fixture(scope='module')
def graph():
  return import_graph(REPO)


def test_the_graph_sees_the_repository(graph):
  assert 'solq_jax.training.loop' in graph and 'solq_jax.inference.evaluate' in graph
  assert 'solq_jax.training.step' in graph['solq_jax.training.loop']
  assert 'solq_jax.inference.evaluate' in graph['train']   # the wiring lives in train.py


def test_no_import_cycle(graph):
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_training_side_never_reaches_inference(graph):
  assert inference_paths(graph) == []


def test_kernels_import_nothing_from_solq_jax(graph):
  offending = {m: sorted(e) for m, e in graph.items()
               if _inside(m, ('kernels',)) and any(_inside(x, ('solq_jax',)) for x in e)}
  assert offending == {}


def _write(root, files):
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_checks_fail_on_a_planted_cycle_and_inference_import(tmp_path):
  """The walk counts imports inside functions and relative imports."""
  _write(tmp_path, {
      'solq_jax/__init__.py': '',
      'solq_jax/losses.py': 'def f():\n  from solq_jax import matching\n',
      'solq_jax/matching.py': 'from . import losses\n',
      'solq_jax/training/__init__.py': '',
      'solq_jax/training/loop.py': 'import solq_jax.inference.evaluate as ev\n',
      'solq_jax/inference/__init__.py': '',
      'solq_jax/inference/evaluate.py': 'import numpy\n',
      'kernels/__init__.py': '', 'configs/__init__.py': '',
  })
  planted = import_graph(tmp_path)
  cycle = find_cycle(planted)
  assert cycle and set(cycle) == {'solq_jax.losses', 'solq_jax.matching'}
  assert inference_paths(planted) == [('solq_jax.training.loop', 'solq_jax.inference.evaluate')]
