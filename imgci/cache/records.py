"""A cache record: what one step did to the image, keyed by its cache key.

Contract: :func:`delta` takes a step's parent and result states and keeps exactly what the step changed — the config
section after the step, the layers and history entries it added, top-level config fields it set (``author``) — and
:meth:`CacheRecord.apply` replays that onto the parent state, giving a state equal to the one the step produced.
``inputs`` is the step's cache input (for explaining a later miss); ``duration`` how long the step took.
Records round-trip through JSON (:meth:`CacheRecord.dumps` / :meth:`CacheRecord.loads`) unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from imgci.oci import Descriptor, Digest


@dataclass
class CacheRecord:
    key: str
    parent: str
    instruction: str  # the instruction as shown (for explanations)
    inputs: dict[str, Any]
    config: dict[str, Any]
    layers: list[tuple[Descriptor, Digest]] = field(default_factory=list)  # (blob, diff_id) added by the step
    history: list[dict[str, Any]] = field(default_factory=list)
    base_extra: dict[str, Any] = field(default_factory=dict)
    duration: float = 0.0
    created: float = 0.0

    @property
    def size(self) -> int:
        return sum(d.size for d, _ in self.layers)

    def dumps(self) -> str:
        doc = {
            "key": self.key,
            "parent": self.parent,
            "instruction": self.instruction,
            "inputs": self.inputs,
            "config": self.config,
            "layers": [{"descriptor": d.to_dict(), "diff_id": diff.value} for d, diff in self.layers],
            "history": self.history,
            "base_extra": self.base_extra,
            "duration": self.duration,
            "created": self.created,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def loads(cls, text: str | bytes) -> CacheRecord:
        doc = json.loads(text)
        return cls(
            key=str(doc["key"]),
            parent=str(doc["parent"]),
            instruction=str(doc.get("instruction", "")),
            inputs=dict(doc.get("inputs") or {}),
            config=dict(doc.get("config") or {}),
            layers=[(Descriptor.from_dict(x["descriptor"]), Digest(x["diff_id"])) for x in doc.get("layers", [])],
            history=list(doc.get("history") or []),
            base_extra=dict(doc.get("base_extra") or {}),
            duration=float(doc.get("duration", 0.0)),
            created=float(doc.get("created", 0.0)),
        )

    def apply(self, parent: Any) -> Any:
        """The state the step produced, from its parent state (an :class:`imgci.build.image.ImageState`)."""
        from imgci.build.image import Layer

        return parent.evolve(
            config=json.loads(json.dumps(self.config)),
            layers=(*parent.layers, *(Layer(d, diff) for d, diff in self.layers)),
            history=(*parent.history, *json.loads(json.dumps(self.history))),
            base_extra={**parent.base_extra, **self.base_extra} if self.base_extra else parent.base_extra,
        )


def delta(
    key: str, parent_key: str, instruction: str, inputs: dict[str, Any], parent: Any, result: Any, duration: float
) -> CacheRecord:
    """What the step that turned ``parent`` into ``result`` did (both ImageStates)."""
    import time

    added_layers = list(result.layers[len(parent.layers) :])
    added_history = list(result.history[len(parent.history) :])
    extra = {k: v for k, v in result.base_extra.items() if parent.base_extra.get(k) != v}
    return CacheRecord(
        key=key,
        parent=parent_key,
        instruction=instruction,
        inputs=inputs,
        config=json.loads(json.dumps(result.config)),
        layers=[(layer.descriptor, layer.diff_id) for layer in added_layers],
        history=json.loads(json.dumps(added_history)),
        base_extra=extra,
        duration=duration,
        created=time.time(),
    )
