"""A stand-in for `kubectl` and `kind` that records each call and answers like a cluster described in a
JSON state file ($FAKE_CLUSTER): its nodes and pods for `get`, and the ConfigMaps and ServiceAccounts that
`apply` and `delete` change, with kubectl's two apply semantics on a ConfigMap's data:

* client-side (`apply -k`/`apply -f` without --server-side): keys of the new config are set, keys of the
  last-applied config that the new one lacks are removed, other keys are left;
* server-side (`--server-side`): the given keys are set, nothing else changes.

`kustomize` runs the real kubectl ($REAL_KUBECTL). Anything else (wait, rollout status, config use-context,
create secret) succeeds silently. Used as `python tests/fake_cluster.py kubectl|kind ARGS...` through a
small wrapper script (tests/test_cluster_targets.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

TRACKED_KINDS = {"ConfigMap", "ServiceAccount", "Deployment", "Namespace", "Role", "RoleBinding", "StatefulSet"}


def load() -> tuple[Path, dict]:
    path = Path(os.environ["FAKE_CLUSTER"])
    state = json.loads(path.read_text())
    state.setdefault("objects", {})
    state.setdefault("calls", [])
    return path, state


def key(doc: dict) -> str:
    meta = doc["metadata"]
    return f"{doc['kind']}/{meta.get('namespace', '')}/{meta['name']}"


def selected(doc: dict, selector: str | None) -> bool:
    labels = doc["metadata"].get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            name, value = term.split("!=", 1)
            if labels.get(name) == value:
                return False
        else:
            name, value = term.split("=", 1)
            if labels.get(name) != value:
                return False
    return True


def option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def kustomize(directory: str) -> str:
    done = subprocess.run(
        [os.environ["REAL_KUBECTL"], "kustomize", directory], capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"fake kubectl: kustomize {directory}: {done.stderr}")
    return done.stdout


def documents(args: list[str]) -> list[dict]:
    if "-k" in args:
        text = kustomize(option(args, "-k") or "")
    elif option(args, "-f") == "-":
        text = sys.stdin.read()
    else:
        text = Path(option(args, "-f") or "").read_text()
    return [d for d in yaml.safe_load_all(text) if d and d.get("kind") in TRACKED_KINDS]


def apply(state: dict, args: list[str]) -> None:
    server_side = "--server-side" in args
    for doc in documents(args):
        if not selected(doc, option(args, "-l")):
            continue
        live = state["objects"].setdefault(key(doc), {"labels": {}, "annotations": {}, "data": {}})
        state["calls"].append(f"apply {'server-side' if server_side else 'client-side'} {key(doc)}")
        for field in ("labels", "annotations"):
            live[field].update(doc["metadata"].get(field) or {})
        new = doc.get("data") or {}
        if not server_side:
            for name in set(live.get("last_applied", {})) - set(new):
                live["data"].pop(name, None)
            live["last_applied"] = dict(new)
        live["data"].update(new)


def delete(state: dict, args: list[str]) -> None:
    for doc in documents(args):
        if selected(doc, option(args, "-l")) and state["objects"].pop(key(doc), None) is not None:
            state["calls"].append(f"delete {key(doc)}")


def kubectl(state: dict, args: list[str]) -> int:
    verb = args[0] if args else ""
    state["calls"].append("kubectl " + " ".join(a for a in args if a != "-"))
    if verb == "get" and args[1:2] == ["nodes"]:
        print(json.dumps({"items": state.get("nodes", [])}))
    elif verb == "get" and args[1:2] == ["pods"] and "--all-namespaces" in args:
        print(json.dumps({"items": state.get("pods", [])}))
    elif verb == "apply":
        apply(state, args)
    elif verb == "delete" and ("-f" in args or "-k" in args):
        delete(state, args)
    return 0


def kind(state: dict, args: list[str]) -> int:
    state["calls"].append("kind " + " ".join(args))
    if args[:2] == ["get", "clusters"]:
        print("\n".join(state.get("kind_clusters", [])))
    return 0


def main() -> int:
    tool, args = sys.argv[1], sys.argv[2:]
    if tool == "kubectl" and args[:1] == ["kustomize"]:  # reads no state: it runs beside `apply` in a pipe
        sys.stdout.write(kustomize(args[1]))
        return 0
    path, state = load()
    code = kubectl(state, args) if tool == "kubectl" else kind(state, args)
    path.write_text(json.dumps(state, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
