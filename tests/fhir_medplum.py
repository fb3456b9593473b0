"""A real FHIR R4 server for the tests: Medplum's FhirRouter and MemoryRepository
(``tests/fhir_server/server.mjs``, pinned in its ``package-lock.json``) in a Node child
process, loaded with the official R4 examples of ``tests/data/fhir-r4``.

``medplum_server`` (session) starts ``node server.mjs`` once on a free port and waits until
it answers ``/metadata``; ``medplum`` (per test) empties it and hands the test a
``MedplumServer`` to load examples into, change resources with, and read back the requests
labsync sent. Without Node or without ``tests/fhir_server/node_modules`` (``npm ci --prefix
tests/fhir_server``) the tests skip, unless ``LABSYNC_REQUIRE_FHIR=1`` (CI), which turns the
skip into a failure.

The server is a FHIR implementation, not a fake: what it serves is Medplum's (ids, versionIds,
``meta.lastUpdated``, search matching, decimals normalised by JSON.parse, ``4.0`` → ``4``).
Byte-exact values and faults belong to the Python fake.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import requests

SERVER_DIR = Path(__file__).parent / "fhir_server"
EXAMPLES = Path(__file__).parent / "data" / "fhir-r4"
REQUIRE_FHIR = os.environ.get("LABSYNC_REQUIRE_FHIR") == "1"
ORDER_SYSTEM = "http://lab.example/orders"
FHIR_JSON = "application/fhir+json"
START_TIMEOUT = 30.0

Resource = dict[str, Any]


def _unavailable(reason: str) -> NoReturn:
    if REQUIRE_FHIR:
        pytest.fail(f"{reason} (LABSYNC_REQUIRE_FHIR=1)")
    pytest.skip(reason)


def example(name: str) -> Resource:
    """One of the R4 example files, parsed."""
    with open(EXAMPLES / name, encoding="utf-8") as handle:
        data: Resource = json.load(handle)
    return data


def example_resources(name: str) -> list[Resource]:
    """The resources of an example file: a collection Bundle's entries, or the one resource."""
    data = example(name)
    if data["resourceType"] == "Bundle":
        return [entry["resource"] for entry in data.get("entry", [])]
    return [data]


@dataclass
class Loaded:
    """What ``MedplumServer.load`` put on the server: the report (as stored, with its
    ``meta``), and every resource by its original example id."""

    report: Resource
    resources: dict[str, Resource] = field(default_factory=dict)

    @property
    def report_id(self) -> str:
        return str(self.report["id"])

    def id_of(self, example_id: str) -> str:
        """The server id of the resource that has ``example_id`` in the example file."""
        return str(self.resources[example_id]["id"])


class MedplumServer:
    """The running server, as a test sees it (``base_url`` is the FHIR base)."""

    def __init__(self, process: subprocess.Popen[str], base_url: str, origin: str) -> None:
        self.process = process
        self.base_url = base_url
        self.origin = origin
        self.http = requests.Session()
        self.http.headers.update({"Accept": FHIR_JSON})

    # -- plumbing --------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def _json(self, response: requests.Response, *expected: int) -> Any:
        if response.status_code not in (expected or (200, 201)):
            raise AssertionError(f"{response.request.method} {response.url} -> "
                                 f"{response.status_code}: {response.text[:500]}")
        return response.json()

    def reset(self) -> None:
        """Empty the repository and the request log."""
        self._json(self.http.post(f"{self.origin}/__admin/reset", timeout=10))

    def requests(self) -> list[dict[str, Any]]:
        """The requests served since the last reset / ``clear_requests`` (method, absolute
        url as sent, accept), oldest first; those outside the FHIR base too."""
        data: list[dict[str, Any]] = self._json(
            self.http.get(f"{self.origin}/__admin/requests", timeout=10))
        return data

    def clear_requests(self) -> None:
        self._json(self.http.delete(f"{self.origin}/__admin/requests", timeout=10))

    # -- FHIR REST -------------------------------------------------------------------------

    def put(self, resource: Resource) -> Resource:
        """Create or update ``resource`` at its id (``PUT [base]/Type/id``); the stored
        version, with the server's ``meta.versionId`` and ``meta.lastUpdated``."""
        path = f"{resource['resourceType']}/{resource['id']}"
        stored: Resource = self._json(self.http.put(
            self.url(path), data=json.dumps(resource),
            headers={"Content-Type": FHIR_JSON}, timeout=10))
        return stored

    def create(self, resource: Resource) -> Resource:
        """``POST [base]/Type``. Medplum's MemoryRepository keeps an ``id`` and a
        ``meta.lastUpdated`` it is given (a real server would not): the way to have a
        resource that changed in the past."""
        stored: Resource = self._json(self.http.post(
            self.url(resource["resourceType"]), data=json.dumps(resource),
            headers={"Content-Type": FHIR_JSON}, timeout=10), 201)
        return stored

    def read(self, resource_type: str, resource_id: str) -> Resource:
        data: Resource = self._json(self.http.get(self.url(f"{resource_type}/{resource_id}"),
                                                  timeout=10))
        return data

    def update(self, resource_type: str, resource_id: str,
               change: Callable[[Resource], None]) -> Resource:
        """Read the resource, let ``change`` edit it in place, PUT it back: the new version."""
        resource = self.read(resource_type, resource_id)
        change(resource)
        return self.put(resource)

    def search(self, resource_type: str, **params: str) -> Resource:
        data: Resource = self._json(self.http.get(self.url(resource_type), params=params,
                                                  timeout=10))
        return data

    def transaction(self, resources: list[Resource], kind: str = "transaction") -> Resource:
        """PUT every resource in one ``transaction`` (or ``batch``) Bundle."""
        bundle = {"resourceType": "Bundle", "type": kind, "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources]}
        answer: Resource = self._json(self.http.post(
            self.base_url, data=json.dumps(bundle), headers={"Content-Type": FHIR_JSON},
            timeout=30))
        for entry in answer.get("entry", []):
            status = str(entry.get("response", {}).get("status", ""))
            if not status.startswith("2"):
                raise AssertionError(f"{kind} entry failed: {entry}")
        return answer

    def put_binary(self, binary_id: str, data: bytes,
                   content_type: str = "application/pdf") -> Resource:
        """Store raw bytes as ``Binary/{binary_id}`` (the server keeps them base64)."""
        stored: Resource = self._json(self.http.put(
            self.url(f"Binary/{binary_id}"), data=data, headers={"Content-Type": content_type},
            timeout=30))
        return stored

    # -- the examples ----------------------------------------------------------------------

    def load(self, name: str, order_id: str, *, extra: tuple[str, ...] = (),
             prefix: str | None = None, status: str | None = None,
             change: Callable[[Resource], None] | None = None) -> Loaded:
        """Load an example file (and ``extra`` files, e.g. the Observations a Bundle only
        references) as one order of the lab's.

        Every resource id gets ``prefix`` (default: a fresh one) so that the same example can
        be loaded as several orders; references between the loaded resources follow. The
        DiagnosticReport gets ``order_id`` as an identifier in ``ORDER_SYSTEM`` after the
        ones it already has, ``status`` when given, and ``change`` may edit it before the
        upload. Resources are PUT one by one, the report last (a report is only visible once
        its results are)."""
        prefix = prefix or f"t{secrets.token_hex(3)}"
        resources = [copy.deepcopy(r) for n in (name, *extra) for r in example_resources(n)]
        renamed = {f"{r['resourceType']}/{r['id']}": f"{r['resourceType']}/{prefix}-{r['id']}"
                   for r in resources}
        reports = [r for r in resources if r["resourceType"] == "DiagnosticReport"]
        if len(reports) != 1:
            raise ValueError(f"{name}: expected one DiagnosticReport, found {len(reports)}")
        report = reports[0]
        loaded = Loaded(report={})
        for resource in resources:
            original = resource["id"]
            _rename_references(resource, renamed)
            resource["id"] = f"{prefix}-{original}"
            loaded.resources[original] = resource
        report["identifier"] = [*report.get("identifier", []),
                                {"system": ORDER_SYSTEM, "value": order_id}]
        if status is not None:
            report["status"] = status
        if change is not None:
            change(report)
        for resource in resources:
            if resource is not report:
                loaded.resources[resource["id"].removeprefix(f"{prefix}-")] = self.put(resource)
        loaded.report = self.put(report)
        loaded.resources[loaded.report_id.removeprefix(f"{prefix}-")] = loaded.report
        return loaded

    def add_report(self, order_id: str, observations: list[Resource], *,
                   report_id: str | None = None, status: str = "final",
                   **fields: Any) -> Resource:
        """A small DiagnosticReport of our own with ``observations`` (each PUT first) as its
        results; ``fields`` are added to the report (e.g. ``presentedForm``)."""
        report_id = report_id or f"r-{secrets.token_hex(4)}"
        refs = []
        for obs in observations:
            stored = self.put(obs)
            refs.append({"reference": f"Observation/{stored['id']}"})
        report = {"resourceType": "DiagnosticReport", "id": report_id, "status": status,
                  "identifier": [{"system": ORDER_SYSTEM, "value": order_id}],
                  "code": {"coding": [{"system": "http://loinc.org", "code": "24331-1"}],
                           "text": "Lipid panel"},
                  "issued": "2026-11-20T09:30:00+03:00", "result": refs, **fields}
        return self.put(report)

    def stop(self) -> None:
        self.http.close()
        if self.process.stdin is not None:
            self.process.stdin.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def observation(obs_id: str, code: str, value: float | str, unit: str | None = None, *,
                status: str = "final", name: str | None = None) -> Resource:
    """A small Observation: a LOINC ``code`` with a ``valueQuantity`` (number) or a
    ``valueString`` (text)."""
    obs: Resource = {"resourceType": "Observation", "id": obs_id, "status": status,
                     "code": {"coding": [{"system": "http://loinc.org", "code": code}],
                              "text": name or code},
                     "effectiveDateTime": "2026-11-20T09:30:00+03:00"}
    if isinstance(value, str):
        obs["valueString"] = value
    else:
        obs["valueQuantity"] = {"value": value, **({"unit": unit} if unit else {})}
    return obs


def _rename_references(node: Any, renamed: dict[str, str]) -> None:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref in renamed:
            node["reference"] = renamed[ref]
        for value in node.values():
            _rename_references(value, renamed)
    elif isinstance(node, list):
        for value in node:
            _rename_references(value, renamed)


def _read_announcement(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The first stdout line of server.mjs (``{"listening": ...}``), or an error."""
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(f"server.mjs said nothing within {timeout} s") from None
    if not line:
        raise RuntimeError("server.mjs exited before listening")
    data: dict[str, Any] = json.loads(line)
    return data


def start_server(log_path: Path) -> MedplumServer:
    """Start ``node server.mjs`` on a free port and wait until it answers ``/metadata``."""
    node = shutil.which("node")
    if node is None:
        _unavailable("node is not installed: the Medplum FHIR server cannot run")
    if not (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        _unavailable("the FHIR server's packages are not installed "
                     "(npm ci --prefix tests/fhir_server --no-audit --no-fund)")
    with open(log_path, "w", encoding="utf-8") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [str(node), "server.mjs", "--port", "0", "--exit-with-stdin"], cwd=SERVER_DIR,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        announced = _read_announcement(process, START_TIMEOUT)
        server = MedplumServer(process, announced["listening"],
                               announced["listening"].split("/fhir/")[0])
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                meta = server.http.get(server.url("metadata"), timeout=5)
                if meta.status_code == 200 and meta.json().get("fhirVersion") == "4.0.1":
                    return server
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the FHIR server does not answer /metadata")
            time.sleep(0.1)
    except (RuntimeError, ValueError) as exc:
        process.kill()
        process.wait(timeout=10)
        errors = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        pytest.fail(f"the Medplum FHIR server did not start: {exc}\n{errors}")


@pytest.fixture(scope="session")
def medplum_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MedplumServer]:
    """The Medplum FHIR server of this test session."""
    server = start_server(tmp_path_factory.mktemp("medplum") / "server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def medplum(medplum_server: MedplumServer) -> MedplumServer:
    """The session's server, emptied for this test."""
    if medplum_server.process.poll() is not None:
        pytest.fail(f"the Medplum FHIR server died (exit {medplum_server.process.returncode})")
    medplum_server.reset()
    return medplum_server
