"""Who may do what on an MLflow server with its basic-auth app: our users, and the names the pipeline owns.

With MLflow's workspaces off, any signed-in user may create experiments and registered models and then
manages them (MLflow's rule): a ``reader`` who created ``bloodcell-classifier`` first could register its
own versions and move the ``champion`` alias. So when a server is set up, the admin creates the
experiment and the registered model the pipeline uses, ``pipeline`` may edit the experiment and manage
the model (versions, the alias), and ``reader`` may only read them, whatever it held before. Other names
stay MLflow's rule: any signed-in user can still create experiments and models of their own.

    MLFLOW_AUTH_ADMIN_USERNAME=... MLFLOW_AUTH_ADMIN_PASSWORD=... python -m bloodcell.mlflow_access --url URL

(what ``manifests/mlflow-users.sh`` runs on a cluster; the local services call :func:`claim` directly).
"""

from __future__ import annotations

import argparse
import os

import requests

from bloodcell import config
from bloodcell.errors import BloodcellError

PIPELINE_USER, READER_USER = "pipeline", "reader"
ALREADY_EXISTS, DOES_NOT_EXIST = "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"


class Admin:
    """MLflow's REST API as its admin."""

    def __init__(self, url: str, username: str, password: str):
        self.url, self.auth = url.rstrip("/"), (username, password)

    def call(self, method: str, endpoint: str, body: dict | None = None, ok: tuple[str, ...] = ()) -> dict:
        """``endpoint`` (e.g. ``2.0/mlflow/users/create``); an error whose code is in ``ok`` counts as done."""
        json_body, params = (body, None) if method == "POST" else (None, body)
        response = requests.request(
            method, f"{self.url}/api/{endpoint}", json=json_body, params=params, auth=self.auth, timeout=30
        )
        if response.ok:
            return response.json() if response.content else {}
        if any(code in response.text for code in ok):
            return {}
        raise BloodcellError(
            f"MLflow at {self.url} refused {endpoint} as admin: HTTP {response.status_code} {response.text[:200]}"
        )

    def set_permission(self, username: str, resource_type: str, resource_id: str, permission: str) -> None:
        """``username`` holds exactly ``permission`` on the resource (a grant replaces what it held)."""
        where = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
        self.call("POST", "3.0/mlflow/users/permissions/revoke", where, ok=(DOES_NOT_EXIST,))
        self.call("POST", "3.0/mlflow/users/permissions/grant", {**where, "permission": permission})


def claim(
    admin: Admin, experiment: str = config.DEFAULT_EXPERIMENT, model: str = config.REGISTERED_MODEL
) -> dict[str, str]:
    """Create ``experiment`` and ``model`` as the admin when they do not exist; ``pipeline`` edits the
    experiment and manages the model, ``reader`` reads both. Returns their ids."""
    found = admin.call(
        "GET", "2.0/mlflow/experiments/get-by-name", {"experiment_name": experiment}, ok=(DOES_NOT_EXIST,)
    )
    experiment_id = found.get("experiment", {}).get("experiment_id")
    kind = [{"key": key, "value": value} for key, value in config.EXPERIMENT_KIND.items()]
    if experiment_id is None:
        created = admin.call("POST", "2.0/mlflow/experiments/create", {"name": experiment, "tags": kind})
        experiment_id = created["experiment_id"]
    admin.call("POST", "2.0/mlflow/registered-models/create", {"name": model}, ok=(ALREADY_EXISTS,))
    admin.set_permission(PIPELINE_USER, "experiment", experiment_id, "EDIT")
    admin.set_permission(PIPELINE_USER, "registered_model", model, "MANAGE")
    for resource_type, resource_id in (("experiment", experiment_id), ("registered_model", model)):
        admin.set_permission(READER_USER, resource_type, resource_id, "READ")
    return {"experiment_id": experiment_id, "registered_model": model}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the MLflow server")
    parser.add_argument("--experiment", default=config.DEFAULT_EXPERIMENT)
    args = parser.parse_args(argv)
    admin = Admin(args.url, os.environ["MLFLOW_AUTH_ADMIN_USERNAME"], os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"])
    claimed = claim(admin, args.experiment)
    names = (
        f"experiment {args.experiment!r} ({claimed['experiment_id']}), registered model {claimed['registered_model']!r}"
    )
    print(f"{names}: {PIPELINE_USER} edits and manages them, {READER_USER} reads them")


if __name__ == "__main__":
    main()
