"""The README's picture of the DAG, drawn from the compiled pipeline so that it cannot go stale.

Read from pipelines/ferpipe.yaml (what the Kubeflow UI runs), not from the
Python that builds it: tasks by the names the UI shows, edges from each task's
dependencies, each loop as a box (for each shard, for each fold), GPU tasks marked. Written as a Mermaid
flowchart between two markers in README.md; `make compile` redraws it and a
test fails while it differs from what the YAML says.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

START, END = "<!-- dag:start (drawn by `make compile` from pipelines/ferpipe.yaml) -->", "<!-- dag:end -->"


def _node(key: str) -> str:
    return key.replace("-", "_")


def _label(task: dict, executors: dict, components: dict) -> str:
    name = task["taskInfo"]["name"].replace("-", " ")
    executor = components.get(task["componentRef"]["name"], {}).get("executorLabel")
    resources = executors.get(executor, {}).get("container", {}).get("resources", {})
    return f"{name} (GPU)" if "accelerator" in resources else name


def _item(loop: dict) -> str:
    """What a loop iterates over, from the task that plans it: 'shard-plan' -> shard, 'fold-plan' -> fold."""
    items = loop["parameterIterator"]["items"].get("inputParameter", "")
    match = re.search(r"--([\w-]+?)-plan-Output$", items)
    return match.group(1).replace("-", " ") if match else "item"


def _ordered(tasks: dict) -> list[str]:
    """Task keys upstream first (ties by name), so the picture reads top to bottom as the run goes."""
    done: list[str] = []
    while len(done) < len(tasks):
        ready = sorted(k for k, t in tasks.items()
                       if k not in done and all(u in done for u in t.get("dependentTasks", ()) if u in tasks))
        done += ready[:1]
    return done


def _direct(tasks: dict, key: str) -> list[str]:
    """The upstream tasks of `key` that no other upstream of it already follows (no transitive edges)."""
    def ancestors(k: str) -> set[str]:
        found, stack = set(), list(tasks[k].get("dependentTasks", ()))
        while stack:
            u = stack.pop()
            if u not in found and u in tasks:
                found.add(u)
                stack += tasks[u].get("dependentTasks", ())
        return found

    upstream = set(tasks[key].get("dependentTasks", ()))
    return sorted(u for u in upstream if not any(u in ancestors(w) for w in upstream - {u}))


def mermaid(compiled: Path) -> str:
    ir = next(yaml.safe_load_all(compiled.read_text()))
    components, executors = ir["components"], ir["deploymentSpec"]["executors"]
    lines = ["flowchart TD"]

    def draw(tasks: dict, indent: str) -> None:
        for key in _ordered(tasks):
            task = tasks[key]
            if "parameterIterator" in task:
                body = components[task["componentRef"]["name"]]["dag"]["tasks"]
                lines.append(f'{indent}subgraph {_node(key)}["for each {_item(task)}"]')
                draw(body, indent + "  ")
                lines.append(f"{indent}end")
            else:
                lines.append(f'{indent}{_node(key)}["{_label(task, executors, components)}"]')
        for key in _ordered(tasks):
            for upstream in _direct(tasks, key):
                lines.append(f"{indent}{_node(upstream)} --> {_node(key)}")

    draw(ir["root"]["dag"]["tasks"], "  ")
    return "\n".join(lines)


def readme_with_diagram(readme: str, compiled: Path) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md has no place for the DAG's picture: add {START} and {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n```mermaid\n{mermaid(compiled)}\n```\n{END}{tail}"


def write_readme_diagram(compiled: Path, readme: Path) -> bool:
    """Redraw the picture in `readme`; True when it changed."""
    text = readme.read_text()
    new = readme_with_diagram(text, compiled)
    if new != text:
        readme.write_text(new)
    return new != text
