"""The Dagster UI as `make ui` serves it: dagster-webserver bound to 127.0.0.1 on a fresh instance,
asked through its GraphQL API for the asset graph the browser draws."""

import importlib.util
import shutil
import socket
from pathlib import Path

import psutil
import pytest

from .test_definitions import BLOCKING, DATASET

REPO_ROOT = Path(__file__).resolve().parents[2]
# the webserver helper of the screenshot script (docs/), so the test starts the UI the same way
_spec = importlib.util.spec_from_file_location(
    "asset_graph_screenshot", REPO_ROOT / "docs" / "asset_graph_screenshot.py"
)
ui = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ui)

pytestmark = pytest.mark.slow  # the webserver takes 10-30 s to load the code location

ASSET_GRAPH_QUERY = """{ assetNodes {
  assetKey { path } dependencyKeys { path } groupName isPartitioned partitionDefinition { type name }
  assetChecksOrError { __typename ... on AssetChecks { checks { name blocking } } } } }"""

UPSTREAM = {
    "corpus_images": set(),
    "captions": {"corpus_images"},
    "panoptic_segments": {"corpus_images"},
    "noun_phrases": {"captions"},
    "subject_matches": {"corpus_images", "panoptic_segments", "noun_phrases"},
    "training_shards": {"corpus_images", "noun_phrases", "panoptic_segments", "subject_matches"},
    "fastcomposer_checkpoint": {"training_shards"},
    "evaluation_report": {"fastcomposer_checkpoint"},
}
CHECKS = {
    "corpus_images": {"readable_images"},
    "captions": {"caption_non_empty_rate"},
    "training_shards": {"shards_readable", "samples_with_subjects", "failure_rate"},
    "evaluation_report": {"identity_floor"},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The webserver on a free 127.0.0.1 port, a fresh DAGSTER_HOME with the repo's dagster.yaml
    and an empty data root; the whole process group is terminated afterwards."""
    tmp = tmp_path_factory.mktemp("ui")
    home = tmp / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    with ui.webserver(home, env={"FC_PIPELINE_DATA": str(tmp / "data")}, timeout=180) as running:
        yield running


@pytest.fixture(scope="module")
def graph(server) -> dict[str, dict]:
    """``{asset key: asset node}`` as the UI's GraphQL API returns them."""
    nodes = ui.graphql(server.url, ASSET_GRAPH_QUERY)["assetNodes"]
    return {"/".join(node["assetKey"]["path"]): node for node in nodes}


def test_graphql_serves_the_asset_graph(graph):
    upstream = {key: {"/".join(dep["path"]) for dep in node["dependencyKeys"]} for key, node in graph.items()}
    assert upstream == UPSTREAM
    groups = {key: node["groupName"] for key, node in graph.items()}
    assert groups == {
        **dict.fromkeys(DATASET, "dataset"),
        "fastcomposer_checkpoint": "training",
        "evaluation_report": "evaluation",
    }


def test_graphql_lists_the_asset_checks_and_which_block(graph):
    checks = {}
    for key, node in graph.items():
        assert node["assetChecksOrError"]["__typename"] == "AssetChecks"
        for check in node["assetChecksOrError"]["checks"]:
            checks[check["name"]] = (key, check["blocking"])
    assert {name: key for name, (key, _) in checks.items()} == {
        name: key for key, names in CHECKS.items() for name in names
    }
    assert {name for name, (_, blocking) in checks.items() if blocking} == BLOCKING


def test_dataset_assets_are_partitioned_by_corpus(graph):
    """Dataset assets: one dynamic partition per corpus; training and evaluation span every corpus."""
    for key in DATASET:
        assert graph[key]["isPartitioned"], key
        assert graph[key]["partitionDefinition"] == {"type": "DYNAMIC", "name": "corpus"}, key
    for key in ("fastcomposer_checkpoint", "evaluation_report"):
        assert not graph[key]["isPartitioned"], key


def test_webserver_listens_on_loopback_only(server):
    tree = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    listening = {
        (conn.laddr.ip, conn.laddr.port)
        for process in tree
        for conn in process.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }
    port = int(server.url.rsplit(":", 1)[1])
    assert ("127.0.0.1", port) in listening
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    # and nothing answers on the same port through this host's other addresses
    others = [
        address.address
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family == socket.AF_INET and not address.address.startswith("127.")
    ]
    for ip in others:
        with socket.socket() as sock:
            sock.settimeout(5)
            assert sock.connect_ex((ip, port)) != 0, f"the UI answers on {ip}:{port}"
