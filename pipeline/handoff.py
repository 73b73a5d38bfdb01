"""DALI's GPU outputs handed to torch without a copy, and without DALI reusing memory torch still reads.

Two rules. DALI runs each iteration bound to the stream torch works on (`pipe.run(stream)`),
so its outputs are complete before torch's work on that stream starts. And a batch's outputs
stay referenced until torch's last use of them has *executed*, not merely been enqueued: the
dynamic executor reuses a buffer as soon as nothing references it, and freeing it when the
Python tensors die would let DALI overwrite an image a queued kernel has yet to read. So when
the consumer is done with a batch (`retire`), an event is recorded on torch's stream, and the
outputs are released once that event has completed. On the CPU none of this is needed.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch


class Handoff:
    def __init__(
        self,
        device: torch.device,
        *,
        stream: Callable[[], Any] | None = None,
        event: Callable[[], Any] | None = None,
    ) -> None:
        """`stream()` is the torch stream to bind DALI to (default: the device's current one) and
        `event()` makes an event (default: torch.cuda.Event); both are replaceable for tests."""
        self.cuda = device.type == "cuda"
        self._stream = stream or (lambda: torch.cuda.current_stream(device))
        self._event = event or torch.cuda.Event
        self._held: deque[tuple[Any, Any]] = deque()  # (event, outputs), oldest first

    def run(self, pipe: Any) -> tuple:
        """One iteration of `pipe`, on torch's stream; outputs whose use has finished are released first."""
        self._release_finished()
        return pipe.run(self._stream().cuda_stream) if self.cuda else pipe.run()

    def retire(self, outputs: Any) -> None:
        """The consumer has enqueued its last use of `outputs`: keep them until that work has run."""
        if not self.cuda:
            return
        done = self._event()
        done.record(self._stream())
        self._held.append((done, outputs))

    @property
    def held(self) -> int:
        return len(self._held)

    def _release_finished(self) -> None:
        # Events complete in recording order on one stream: stop at the first still pending.
        while self._held and self._held[0][0].query():
            self._held.popleft()

    def close(self) -> None:
        """Wait for every held batch's use to finish, then release them all (before the pipeline goes)."""
        while self._held:
            self._held.popleft()[0].synchronize()
