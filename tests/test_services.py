"""Local services: concurrent starts share one set of processes; stop ends only recorded ones."""

import json
from concurrent.futures import ThreadPoolExecutor

from bloodcell.services import LocalServices, free_port


def test_concurrent_starts_share_the_services_and_stop_cleans_stale_records(tmp_path):
    ports = (free_port(), free_port())
    starters = [LocalServices(tmp_path, "bucket", *ports) for _ in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(lambda s: s.start(), starters)
        assert first == second
        recorded = json.loads((tmp_path / "services.json").read_text())
        assert sorted(s["name"] for s in recorded) == ["gcs", "mlflow"]
    finally:
        stopped = starters[0].stop()
    assert len(stopped) == 2
    (tmp_path / "services.json").write_text(json.dumps([{**recorded[0], "pid": 999999}]))
    assert starters[1].stop() == []  # a stale pid is dropped, never signalled
    assert not (tmp_path / "services.json").exists()
