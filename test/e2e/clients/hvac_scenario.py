"""Run one Vault client scenario with hvac and print its outcome as one JSON document.

Usage: /usr/bin/python3 hvac_scenario.py SCENARIO SECRET_PATH

SCENARIO is `kv` (KV v2 round trip, token lookup, namespace, response wrapping, health) or
`redirect` (requests against a standby that responds with 307). SECRET_PATH is the KV v2 path under
the `secret/` mount, for example `e2e/hvac/app`. The client is configured the way a pod would
be: VAULT_ADDR, VAULT_CACERT and VAULT_TOKEN come from the environment. test_vault_clients.py
runs this script and node_vault_scenario.js with the same arguments and checks both outputs.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import hvac
import requests

NAMESPACE = "team-a/"
WRAP_TTL = "60s"
SECRET = {"username": "app", "password": "s3cr3t-from-hvac"}
TIMEOUT_S = 30


def make_client(namespace: str | None = None, allow_redirects: bool = True) -> hvac.Client:
    session = requests.Session()
    # Test traffic never goes through a proxy named in the environment.
    session.trust_env = False
    return hvac.Client(
        url=os.environ["VAULT_ADDR"],
        token=os.environ["VAULT_TOKEN"],
        verify=os.environ["VAULT_CACERT"],
        timeout=TIMEOUT_S,
        namespace=namespace,
        allow_redirects=allow_redirects,
        session=session,
    )


def describe(call: Callable[[], Any]) -> dict[str, Any]:
    """Run CALL and describe what the client returned or raised, without following anything."""
    try:
        result = call()
    except Exception as error:  # noqa: BLE001 - the exception type is the outcome under test
        return {"outcome": "error", "error": type(error).__name__, "message": str(error)[:300]}
    if isinstance(result, requests.Response):
        # hvac returns the requests.Response itself for any status other than 200.
        return {
            "outcome": "response",
            "status": result.status_code,
            "location": result.headers.get("Location"),
            "body": result.text[:300],
        }
    return {"outcome": "value", "value": result}


def run_kv(path: str) -> dict[str, Any]:
    client = make_client()
    kv = client.secrets.kv.v2
    folder, _, leaf = path.rpartition("/")
    output: dict[str, Any] = {}

    health = client.sys.read_health_status(standby_ok=True, method="GET")
    output["health"] = {key: health[key] for key in ("initialized", "sealed", "standby")}

    written = kv.create_or_update_secret(path=path, secret=SECRET, mount_point="secret")
    output["write_version"] = written["data"]["version"]
    output["read_data"] = kv.read_secret_version(path=path, mount_point="secret")["data"]["data"]
    output["list_keys"] = kv.list_secrets(path=folder, mount_point="secret")["data"]["keys"]
    output["list_leaf"] = leaf
    metadata = kv.read_secret_metadata(path=path, mount_point="secret")["data"]
    output["metadata_current_version"] = metadata["current_version"]
    output["metadata_versions"] = sorted(metadata["versions"])

    lookup = client.auth.token.lookup_self()["data"]
    output["lookup_self"] = {"id": lookup["id"], "policies": lookup["policies"]}

    namespaced = make_client(namespace=NAMESPACE)
    echo = namespaced.adapter.get("/v1/test/echo?client=hvac")
    output["namespace_echo"] = [
        value for name, value in echo["headers"] if name.lower() == "x-vault-namespace"
    ]

    wrapped = client.read(f"secret/data/{path}", wrap_ttl=WRAP_TTL)
    wrap_info = wrapped["wrap_info"]
    output["wrap_info"] = {
        "ttl": wrap_info["ttl"],
        "creation_path": wrap_info["creation_path"],
        "has_token": bool(wrap_info["token"]),
        "data": wrapped["data"],
    }
    unwrapped = client.sys.unwrap(token=wrap_info["token"])
    output["unwrapped_data"] = unwrapped["data"]["data"]

    deleted = kv.delete_latest_version_of_secret(path=path, mount_point="secret")
    output["delete_status"] = deleted.status_code
    after = describe(lambda: kv.read_secret_version(path=path, mount_point="secret"))
    output["read_after_delete"] = after.get("error") or after.get("status")
    return output


def run_redirect(path: str) -> dict[str, Any]:
    # hvac follows redirects by default (requests' allow_redirects). Following is turned off
    # here so that no request leaves for the host that the Location header names.
    client = make_client(allow_redirects=False)
    kv = client.secrets.kv.v2
    return {
        "health_standbyok": describe(
            lambda: client.sys.read_health_status(standby_ok=True, method="GET")
        ),
        "health": describe(lambda: client.sys.read_health_status(method="GET")),
        "read": describe(lambda: kv.read_secret_version(path=path, mount_point="secret")),
        "write": describe(
            lambda: kv.create_or_update_secret(path=path, secret=SECRET, mount_point="secret")
        ),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("kv", "redirect"):
        print(f"usage: {argv[0]} kv|redirect SECRET_PATH", file=sys.stderr)
        return 2
    scenario, path = argv[1], argv[2]
    output = run_kv(path) if scenario == "kv" else run_redirect(path)
    json.dump(output, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
