"""Requests generated from Firecracker's OpenAPI spec against moat's API
socket, with schemathesis (property-based: hypothesis builds the bodies).

    python spec_check.py SPEC SOCKET PHASE [EXAMPLES]

For every operation in the spec, EXAMPLES requests that follow the schema
and EXAMPLES that break it (wrong types, missing fields, extra fields).
Checked: no response is a 5xx; every response to a request that follows
the schema matches the spec (documented status, content type, body
schema); and after every request moat still answers GET /. PHASE names
the VM's state for the report (before or after InstanceStart).

PUT /logger and PUT /metrics are left out: their bodies name files moat
creates, and generated paths would scatter files over the host. The
curl test covers both.

Prints `SPEC-CHECK operation=N requests, M faults` per operation and, for
each problem, `SPEC-PROBLEM ...`; exits 1 if there was any.
"""

import sys
import urllib.parse

import hypothesis
import requests
import schemathesis
from requests_unixsocket.adapters import UnixAdapter, UnixHTTPConnectionPool
from schemathesis import DataGenerationMethod
from schemathesis.checks import content_type_conformance

SKIPPED = {("PUT", "/logger"), ("PUT", "/metrics")}


class SocketAdapter(UnixAdapter):
    """Sends every http://localhost request to one Unix socket, over one
    pool of kept-alive connections."""

    def __init__(self, sock):
        super().__init__(timeout=30)
        self.pool = UnixHTTPConnectionPool("http+unix://" + urllib.parse.quote(sock, safe=""), 30)

    def get_connection(self, url, proxies=None):
        return self.pool


def main():
    spec, sock, phase = sys.argv[1:4]
    examples = int(sys.argv[4]) if len(sys.argv) > 4 else 25
    base = "http://localhost"
    schema = schemathesis.from_path(
        spec,
        base_url=base,
        data_generation_methods=[DataGenerationMethod.positive, DataGenerationMethod.negative],
    )
    session = requests.Session()
    session.mount(base, SocketAdapter(sock))
    problems = 0

    def alive():
        try:
            return session.get(base + "/", timeout=10).status_code == 200
        except Exception:  # noqa: BLE001 - any failure means moat is gone
            return False

    for result in schema.get_all_operations():
        operation = result.ok()
        key = (operation.method.upper(), operation.path)
        if key in SKIPPED:
            continue
        counts = {"requests": 0, "faults": 0}
        seen = []

        for method in (DataGenerationMethod.positive, DataGenerationMethod.negative):

            @hypothesis.settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.generate],
                print_blob=False,
            )
            @hypothesis.given(case=operation.as_strategy(data_generation_method=method))
            def run(case):
                nonlocal problems
                response = case.call(session=session, timeout=30)
                counts["requests"] += 1
                if response.status_code >= 400:
                    counts["faults"] += 1
                where = f"{key[0]} {key[1]} ({method.name}, {phase})"
                if response.status_code >= 500:
                    problems += 1
                    seen.append(f"SPEC-PROBLEM {where}: {response.status_code} {response.text[:200]} for {case.body!r}")
                elif method == DataGenerationMethod.positive:
                    # A 204 has no content, so no content type to check.
                    excluded = (content_type_conformance,) if response.status_code == 204 else ()
                    try:
                        case.validate_response(response, excluded_checks=excluded)
                    except Exception as e:  # noqa: BLE001 - schemathesis' check failures
                        problems += 1
                        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                        seen.append(f"SPEC-PROBLEM {where}: {first} (status {response.status_code}, body {response.text[:200]!r}) for {case.body!r}")
                if not alive():
                    problems += 1
                    seen.append(f"SPEC-PROBLEM {where}: moat stopped answering after {case.body!r}")
                    raise SystemExit(1)

            try:
                run()
            except BaseException as e:  # noqa: BLE001 - schemathesis skips with a BaseException
                # GET / and others have nothing to break (no negative
                # cases); some path parameters leave nothing to generate.
                if not (
                    "not possible to generate negative" in str(e)
                    or isinstance(e, hypothesis.errors.Unsatisfiable)
                ):
                    raise
        print(f"SPEC-CHECK {key[0]} {key[1]}={counts['requests']} requests, {counts['faults']} faults", flush=True)
        for line in seen[:5]:
            print(line, flush=True)
    print(f"SPEC-PROBLEMS={problems}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
