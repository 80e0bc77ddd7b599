"""MLflow's ``gs://`` artifact repository, with bloodcell's storage client where the local store needs a token.

The local MLflow server keeps its artifacts in the local object store, whose front refuses requests without
the state directory's token (:mod:`bloodcell.local.store_front`); MLflow's own repository makes an anonymous
client for an emulator. Registered for the ``gs`` scheme through MLflow's plugin entry point
(``mlflow.artifact_repository`` in pyproject.toml), which MLflow reads after its built-in schemes. Without
``BLOODCELL_STORE_TOKEN`` (real GCS, a cluster) it is MLflow's repository unchanged.
"""

from __future__ import annotations

import os

from mlflow.store.artifact.gcs_artifact_repo import GCSArtifactRepository

from bloodcell import storage


class TokenGCSArtifactRepository(GCSArtifactRepository):
    def __init__(
        self,
        artifact_uri: str,
        client=None,
        credential_refresh_def=None,
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
    ) -> None:
        if client is None and os.environ.get(storage.STORE_TOKEN_ENV):
            client = storage.client()
        super().__init__(artifact_uri, client, credential_refresh_def, tracking_uri, registry_uri)
