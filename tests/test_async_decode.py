"""AsyncDecoder: order, equality with synchronous decoding, error propagation, bounded memory."""

import threading
import time

import pytest
import torch

from longstream.vae.async_decode import AsyncDecoder


def test_outputs_arrive_in_order_and_equal_sync():
    chunks = [torch.randn(1, 4, 2, 3, 3) for _ in range(6)]

    def decode(x):
        time.sleep(0.01 * (1 + int(x.abs().sum()) % 3))  # uneven work
        return x.cumsum(2) * 2

    got = []
    with AsyncDecoder(decode, got.append, max_pending=2) as dec:
        for c in chunks:
            dec.submit(c)
    assert len(got) == 6
    for g, c in zip(got, chunks):
        assert torch.equal(g, c.cumsum(2) * 2)


def test_worker_error_surfaces_in_the_caller_and_stops_output():
    seen = []

    def decode(x):
        if x.item() == 3:
            raise RuntimeError("decoder exploded at chunk 3")
        return x

    with pytest.raises(RuntimeError, match="chunk 3"):
        with AsyncDecoder(decode, seen.append, max_pending=1) as dec:
            for i in range(8):
                dec.submit(torch.tensor(float(i)))
                time.sleep(0.005)
    assert [int(s) for s in seen] == [0, 1, 2]


def test_queue_is_bounded():
    gate = threading.Event()
    started = []

    def decode(x):
        started.append(x)
        gate.wait(5)
        return x

    dec = AsyncDecoder(decode, lambda f: None, max_pending=2)
    submitted = []

    def producer():
        for i in range(10):
            dec.submit(torch.tensor(i))
            submitted.append(i)

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.3)
    # one chunk in the worker, two waiting, the producer blocked on the fourth
    assert len(submitted) == 3 and len(started) == 1
    gate.set()
    t.join(5)
    dec.close()
    assert len(submitted) == 10 and len(started) == 10


def test_caller_failure_aborts_without_hanging():
    gate = threading.Event()
    out = []
    with pytest.raises(KeyError):
        with AsyncDecoder(lambda x: (gate.wait(0.2), x)[1], out.append, max_pending=1) as dec:
            for i in range(3):
                dec.submit(torch.tensor(i))
            raise KeyError("caller failed")
    assert len(out) <= 3


def _gpu_decode_matches_sync(source: str, target: str) -> None:
    """Chunks produced on `source` and decoded on `target`'s worker stream equal a synchronous decode there."""
    weight = torch.randn(4, 4, device=target)

    def decode(x):
        return torch.einsum("bcfhw,cd->bdfhw", x.to(target), weight).cumsum(2)

    chunks, got = [], []
    with AsyncDecoder(decode, lambda y: got.append(y.cpu()), max_pending=2, device=target) as dec:
        for _ in range(5):
            x = torch.randn(1, 4, 2, 64, 64, device=source) * 3  # produced by the "DiT" stream
            x = x.sin()
            chunks.append(x.clone())
            dec.submit(x)
            del x  # the worker must keep what it needs
    assert len(got) == 5
    for g, c in zip(got, chunks):
        torch.testing.assert_close(g, decode(c).cpu())


@pytest.mark.gpu
def test_decode_on_the_worker_stream_of_the_same_gpu():
    _gpu_decode_matches_sync("cuda:0", "cuda:0")


@pytest.mark.gpu
def test_decode_on_a_second_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    _gpu_decode_matches_sync("cuda:0", "cuda:1")
