"""Asynchronous decoding: a worker thread decodes latent chunk i while the DiT denoises chunk i + 1.

`AsyncDecoder(decode, sink, max_pending)` runs `sink(decode(latents))` for every submitted chunk, in submission
order, on one worker thread. On a GPU the worker issues its work on its own CUDA stream (optionally on another
device), after waiting for an event recorded where the latents were produced, so the two streams overlap
without a host sync. The queue is bounded: `submit` blocks once `max_pending` chunks wait, so memory stays flat
however long the video. An exception in the worker is raised again in the caller at the next `submit` or at
`close`; after a failure the remaining chunks are dropped. Without a device it is a plain ordered worker stage
(`generate` also encodes the MP4 on one, so encoding overlaps decoding).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import torch

_STOP = object()


class AsyncDecoder:
    def __init__(
        self,
        decode: Callable[[torch.Tensor], torch.Tensor],
        sink: Callable[[torch.Tensor], Any],
        *,
        max_pending: int = 2,
        device: torch.device | str | None = None,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._decode, self._sink = decode, sink
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._device = torch.device(device) if device is not None else None
        self._stream = None
        if self._device is not None and self._device.type == "cuda":
            self._stream = torch.cuda.Stream(device=self._device)
        self._thread = threading.Thread(target=self._work, name="longstream-decode", daemon=True)
        self._thread.start()
        self._closed = False

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain after a failure
            latents, ready = item
            try:
                if self._stream is None:
                    self._sink(self._decode(latents))
                    continue
                with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
                    self._stream.wait_event(ready)
                    # From another GPU, PyTorch orders the copy after the source device's current stream (the
                    # producer's), so the source needs no record_stream.
                    latents = latents.to(self._device)
                    frames = self._decode(latents)
                    self._sink(frames)
            except BaseException as exc:  # surfaced in the caller
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._closed = True
            self._queue.put(_STOP)
            raise error

    def submit(self, latents: torch.Tensor) -> None:
        """Queue a latent chunk (blocks while `max_pending` chunks wait)."""
        if self._closed:
            raise RuntimeError("submit() after close()")
        self._raise_if_failed()
        ready = None
        if self._stream is not None and latents.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latents.device))
            if latents.device == self._device:
                latents.record_stream(self._stream)  # keep the memory until the worker's stream is done with it
        elif self._stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self._device))
        self._queue.put((latents, ready))

    def close(self) -> None:
        """Wait for every queued chunk, stop the worker, re-raise a worker error."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()
        if self._stream is not None:
            self._stream.synchronize()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop as soon as possible, dropping queued chunks (used when the caller fails)."""
        self._error = self._error or RuntimeError("aborted")
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()
        self._error = None

    def __enter__(self) -> "AsyncDecoder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
