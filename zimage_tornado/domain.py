"""Plain value objects passed between the layers; no I/O, no wire formats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PENDING = "pending"
PROCESSING = "processing"
COMPLETED = "completed"
FAILED = "failed"
FINAL_STATES = frozenset({COMPLETED, FAILED})


@dataclass(frozen=True)
class GenerationRequest:
    """One image-generation job, validated, in the gateway's own terms."""

    prompt: str
    negative_prompt: str = ""
    model: str = "base"  # the upstream model name
    batch_size: int = 1
    width: int = 1024
    height: int = 1024
    steps: int = 8
    cfg_scale: float = 7.0


@dataclass(frozen=True)
class Task:
    """What the upstream told us about a task, normalised; `raw` keeps every field it sent."""

    uuid: str
    status: str
    progress: float | None = None
    image_urls: tuple[str, ...] = ()
    error: str | None = None
    queue_position: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)  # the upstream's task object
    document: dict[str, Any] = field(default_factory=dict)  # the whole upstream answer

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATES
