"""Cache keys: sha256 of canonical JSON ``{type, parent, instruction, inputs}`` (DESIGN.md).

Contract: a key depends only on what the step's result depends on — the parent step's key, the instruction after
expansion, and its inputs as content digests (context files, the source stage's key or the image digest, the
build args the step uses, mount definitions) — never on mtimes, paths of the checkout or the state directory, or
secret values. Bumping :data:`STEP_TYPE` invalidates every older key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

STEP_TYPE = "imgci.step.v1"


def _digest(doc: Any) -> str:
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def step_key(parent: str, instruction: str, inputs: dict[str, Any], platform: str) -> str:
    return _digest(
        {"type": STEP_TYPE, "parent": parent, "instruction": instruction, "inputs": inputs, "platform": platform}
    )


def base_key(image_digest: str, platform: str) -> str:
    """The key of a FROM: the base image's manifest digest (``""``: scratch)."""
    return _digest({"type": STEP_TYPE, "from": image_digest or "scratch", "platform": platform})
