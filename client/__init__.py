"""llm-loadtest's user side: the `llm-loadtest` commands and the Python SDK.

The SDK is what this package exports:

    from client import ControllerClient

    async with ControllerClient("127.0.0.1:50051", api_key) as controller:
        run = await controller.create_run(spec)

`ControllerClient` (client/sdk.py) calls one controller's RunService and KeyService, with a
deadline on every call; `ClientTls` says how it verifies the controller (and, for mutual TLS,
who it is). Messages are the generated ones in `common.proto.loadtest.v1`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client.sdk import ControllerClient
    from common.tls import ClientTls

__all__ = ["ClientTls", "ControllerClient"]

# Imported when first used, not with the package: every `llm-loadtest` command (the mock server
# too) starts from client.cli and should load only what that command needs.
_EXPORTS = {"ClientTls": "common.tls", "ControllerClient": "client.sdk"}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
