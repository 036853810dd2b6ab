"""Block swapping's schedule (library/models/swap_schedule.py) and its executor (lowvram.BlockSwapper) on the CPU.

The GPU's side stream is replaced by a recording fake whose copies are deferred until the compute stream waits for
them, as a real copy stream may lag: a block that ran without waiting for its copy would read a slot still full of
0xFF bytes (NaN), and the numbers would change. The log of copies, events and waits is then checked for the
properties the GPU relies on: every block is in a slot, copied, before it runs; never more than prefetch + 1 blocks
in the slots; a slot is overwritten only after an event recorded once its previous block had run; the backward
fetches blocks in reverse order; nothing synchronises the device."""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_inputs import flux_transformer_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import flux_lora_model  # noqa: E402
from library.models.lowvram import BlockSwapper  # noqa: E402
from library.models.swap_schedule import (CudaStreams, Evict, Fetch, InlineStreams, SwapPlan,  # noqa: E402
                                          expected_after)


# ------------------------------------------------------------------------------------------------ the pure plan
def _training_steps(n: int, steps: int = 2) -> list[tuple[int, str]]:
    """The pre-hook calls of `steps` checkpointed training steps: forward 0..n-1, then the recompute n-1..0."""
    one = [(i, "forward") for i in range(n)] + [(i, "backward") for i in range(n - 1, -1, -1)]
    return one * steps


def _simulate(plan: SwapPlan, calls: list[tuple[int, str]]) -> list[tuple[str, int, int, str]]:
    """Run the plan over `calls`; check its invariants at every call; return (kind, block, slot, phase) per move."""
    moves = []
    for block, phase in calls:
        slots_before = dict(plan.slot_of)
        got = plan.before(block, phase)
        evicted = [m for m in got if isinstance(m, Evict)]
        fetched = [m for m in got if isinstance(m, Fetch)]
        assert got == evicted + fetched  # slots are freed before they are filled
        assert all(slots_before[m.block] == m.slot for m in evicted)
        assert block not in {m.block for m in evicted}  # the block about to run is never the one evicted
        assert block in plan.slot_of  # resident (or its copy issued) before it runs
        assert len(plan.slot_of) <= plan.prefetch + 1
        assert len(set(plan.slot_of.values())) == len(plan.slot_of)  # one block per slot
        assert set(plan.slot_of.values()) <= set(range(plan.n_slots))
        moves += [("in" if isinstance(m, Fetch) else "out", m.block, m.slot, phase) for m in got]
    return moves


@pytest.mark.parametrize("n", [1, 2, 3, 6])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_plan_keeps_the_running_block_resident_within_the_bound(n, prefetch):
    plan = SwapPlan(n, prefetch)
    assert plan.n_slots == min(prefetch, n - 1) + 1
    _simulate(plan, _training_steps(n))
    _simulate(plan, [(i, "inference") for i in range(n)] * 3)
    # a guess gone wrong (a grad-enabled forward with no backward, a partial call) still brings the block in
    _simulate(plan, [(0, "forward"), (1 % n, "forward"), (0, "inference"), (n - 1, "backward"), (0, "forward")])
    plan.release_all()
    assert plan.slot_of == {}


def test_plan_fetches_one_block_ahead_in_forward_and_in_reverse_in_backward():
    plan = SwapPlan(4, prefetch=1)
    moves = _simulate(plan, _training_steps(4, steps=1))
    fetches = [(b, phase) for kind, b, _, phase in moves if kind == "in"]
    # forward: 0 (a miss: nothing was ahead of it), then 1 while 0 runs, 2 while 1 runs, 3 while 2 runs;
    # at the last forward block the backward comes next, which starts with 3 and then needs 2: 2 stays
    assert fetches == [(0, "forward"), (1, "forward"), (2, "forward"), (3, "forward"), (1, "backward"),
                       (0, "backward")]
    backward = [b for b, phase in fetches if phase == "backward"]
    assert backward == sorted(backward, reverse=True)
    # after the backward, block 0 (the next forward's first) and block 1 (its second) are already in
    assert set(plan.slot_of) == {0, 1}
    again = _simulate(plan, _training_steps(4, steps=1))
    # the next step: 2 and 3 come in during the forward, 1 and 0 during the backward; 4 copies for 4 blocks
    assert [b for k, b, _, _ in again if k == "in"] == [2, 3, 1, 0]


def test_expected_order_per_phase():
    assert list(expected_after(1, "forward", 4)) == [2, 3, 0]  # then the backward: 3, 2, (1), 0
    assert list(expected_after(3, "forward", 4)) == [2, 1, 0]
    assert list(expected_after(2, "backward", 4)) == [1, 0, 3]  # then the next forward: 0, 1, (2), 3
    assert list(expected_after(3, "inference", 4)) == [0, 1, 2]  # the next call starts again at 0
    with pytest.raises(ValueError):
        list(expected_after(0, "sideways", 4))
    with pytest.raises(ValueError):
        SwapPlan(3, prefetch=-1)


def test_without_prefetch_a_block_is_copied_when_it_runs():
    plan = SwapPlan(3, prefetch=0)
    moves = _simulate(plan, _training_steps(3, steps=1))
    assert [(k, b) for k, b, _, _ in moves] == [("in", 0), ("out", 0), ("in", 1), ("out", 1), ("in", 2),
                                                ("out", 2), ("in", 1), ("out", 1), ("in", 0)]


# ---------------------------------------------------------------------------------------------- fake streams
class RecordingStreams:
    """A fake SwapStreams: logs every operation; a copy runs only when the compute stream waits for it (or a later
    copy), like a side stream that has not got to it yet."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.pending: list[tuple[tuple, list]] = []
        self.count = 0

    def _event(self, kind: str) -> tuple[str, int]:
        self.count += 1
        return (kind, self.count)

    def compute_event(self):
        event = self._event("compute")
        self.log.append(("record", event))
        return event

    def copy(self, after, pairs, label):
        event = self._event("copy")
        self.log.append(("copy", label, after, event))
        self.pending.append((event, list(pairs)))
        return event

    def _run_until(self, event) -> None:
        while self.pending:
            done, pairs = self.pending.pop(0)
            for dst, src in pairs:
                dst.copy_(src)
            if done == event:
                return

    def wait(self, event) -> None:
        self.log.append(("wait", event))
        self._run_until(event)

    def drain(self) -> None:
        self.log.append(("drain",))
        self._run_until(None)


@pytest.fixture(scope="module")
def tiny():
    from library.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(0)


def _inputs(tr, seed: int = 1) -> dict:
    return flux_transformer_inputs(tr, seed=seed)


def _step(tr, net, log: list | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    out = tr(**_inputs(tr)).sample
    if log is not None:
        log.append(("backward",))
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters() if p.requires_grad]


def _probe(swapper: BlockSwapper, streams: RecordingStreams, snapshot: list[dict]) -> list:
    """A pre-hook after the swapper's on every swapped block: log the run and check the block's weights are the
    right bytes, read from a slot."""
    slots = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in swapper._slots]

    def check(i: int):
        def hook(module, args):
            streams.log.append(("run", i))
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                assert any(lo <= t.data_ptr() < hi for lo, hi in slots), (i, name)
                assert torch.equal(t, snapshot[i][name]), (i, name)
        return hook

    return [block.register_forward_pre_hook(check(i)) for i, block in enumerate(swapper.blocks)]


def _check_log(log: list[tuple], n_slots: int) -> None:
    """A slot is overwritten only after an event recorded once its previous block last ran; each block waits for
    its latest copy before it runs."""
    occupant: dict[int, int] = {}  # slot -> block copied into it last
    last_run: dict[int, int] = {}  # block -> log position of its last run
    recorded: dict[tuple, int] = {}  # compute event -> log position
    latest_copy: dict[int, tuple] = {}  # block -> its latest copy's event
    waited: set = set()
    for pos, entry in enumerate(log):
        if entry[0] == "record":
            recorded[entry[1]] = pos
        elif entry[0] == "copy":
            (block, slot), after, event = entry[1], entry[2], entry[3]
            assert 0 <= slot < n_slots
            previous = occupant.get(slot)
            if previous is not None and previous in last_run:
                assert after is not None and recorded[after] > last_run[previous], (pos, entry)
            occupant[slot] = block
            latest_copy[block] = event
        elif entry[0] == "wait":
            waited.add(entry[1])
        elif entry[0] == "run":
            assert latest_copy[entry[1]] in waited, (pos, entry)
            last_run[entry[1]] = pos


@pytest.mark.parametrize("fp8", [False, True], ids=["full", "fp8"])
@pytest.mark.parametrize("prefetch", [0, 1])
def test_swapper_with_a_lagging_copy_stream_is_exact(tiny, monkeypatch, fp8, prefetch):
    def no_sync(*a, **k):
        raise AssertionError("block swapping must not synchronise the device")

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    tr, net = flux_lora_model(tiny, fp8)
    want_out, want_grads = _step(tr, net)
    with torch.no_grad():
        tr.eval()
        want_inference = tr(**_inputs(tr, seed=2)).sample
        tr.train()

    streams = RecordingStreams()
    swapper = BlockSwapper.attach(tr, 3, "cpu", record=True, prefetch=prefetch, streams=streams)
    blocks = swapper.blocks
    assert blocks == [tr.transformer_blocks[1], *tr.single_transformer_blocks]
    snapshot = [{n: t.clone() for n, t in list(b.named_parameters()) + list(b.named_buffers())} for b in blocks]
    if fp8:  # fp8 weights travel as fp8: one byte per weight in the host buffer that is copied
        linear = blocks[-1].proj_out
        store = swapper._stores[-1]
        entry = next(e for e in store.entries if e.module is linear and e.name == "weight")
        assert entry.dtype == linear.weight.dtype == torch.float8_e4m3fn
        assert entry.nbytes == linear.weight.numel()
        assert linear.weight.data_ptr() == store.host.data_ptr() + entry.offset
    probes = _probe(swapper, streams, snapshot)
    for _ in range(2):  # the second step starts with what the first one's backward left in the slots
        got_out, got_grads = _step(tr, net, streams.log)
        assert torch.equal(got_out, want_out)
        for g, w in zip(got_grads, want_grads, strict=True):
            assert torch.equal(g, w)
    with torch.no_grad():
        tr.eval()
        assert torch.equal(tr(**_inputs(tr, seed=2)).sample, want_inference)
    _check_log(streams.log, prefetch + 1)
    assert len(swapper._slots) == prefetch + 1 and len(swapper._resident) <= prefetch + 1
    runs = [e[1] for e in streams.log if e[0] == "run"]
    assert runs[:9] == [0, 1, 2, 2, 1, 0, 0, 1, 2]  # forward, backward's recomputes in reverse, next forward
    # the backward's copies go last to first
    first_backward = streams.log.index(("backward",))
    second_forward = next(p for p, e in enumerate(streams.log) if p > first_backward and e == ("run", 0))
    back = [e[1][0] for e in streams.log[first_backward:second_forward] if e[0] == "copy"]
    assert back == sorted(back, reverse=True) and back
    if prefetch:  # the copy of the next block is issued before the running block's compute starts
        forward = streams.log[:first_backward]
        assert forward.index(("run", 0)) > next(p for p, e in enumerate(forward) if e[0] == "copy" and e[1][0] == 1)

    for handle in probes:
        handle.remove()
    swapper.detach()  # back to ordinary per-block device tensors: no hooks, no slots
    assert swapper._slots == [] and ("drain",) in streams.log
    streams.log.clear()
    got_out, _ = _step(tr, net)
    assert torch.equal(got_out, want_out) and streams.log == []


def test_offload_all_points_the_blocks_back_at_their_host_buffers(tiny):
    tr = copy.deepcopy(tiny.transformer).requires_grad_(False)
    swapper = BlockSwapper.attach(tr, 2, "cpu", prefetch=1)
    with torch.no_grad():
        tr(**_inputs(tr))
    assert swapper._resident
    swapper.offload_all()
    assert swapper._resident == []
    for store, block in zip(swapper._stores, swapper.blocks, strict=True):
        lo, hi = store.host.data_ptr(), store.host.data_ptr() + store.host.numel()
        assert all(lo <= p.data_ptr() < hi for p in block.parameters())


# ------------------------------------------------------------------------------------------ the CUDA streams
class _FakeCuda:
    """Stands in for torch.cuda to check what CudaStreams asks of it: events and stream waits, no synchronize."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        fake = self

        class Stream:
            def __init__(self, name: str) -> None:
                self.name = name

            def wait_event(self, event) -> None:
                fake.calls.append(("wait_event", self.name, event.name))

            def wait_stream(self, other) -> None:
                fake.calls.append(("wait_stream", self.name, other.name))

            def synchronize(self) -> None:
                raise AssertionError("stream synchronize")

        class Event:
            def __init__(self) -> None:
                fake.count = getattr(fake, "count", 0) + 1
                self.name = f"e{fake.count}"

            def record(self, stream) -> None:
                fake.calls.append(("record", stream.name, self.name))

            def synchronize(self) -> None:
                raise AssertionError("event synchronize")

        class StreamContext:
            def __init__(self, stream) -> None:
                self.stream = stream

            def __enter__(self):
                fake.calls.append(("enter", self.stream.name))

            def __exit__(self, *exc):
                fake.calls.append(("exit", self.stream.name))

        self.compute = Stream("compute")
        self.cuda = SimpleNamespace(Event=Event, current_stream=lambda device=None: self.compute,
                                    stream=StreamContext, synchronize=lambda *a: (_ for _ in ()).throw(
                                        AssertionError("device synchronize")))
        self.copy_stream = Stream("copy")


def test_cuda_streams_order_copies_by_events_only():
    fake = _FakeCuda()
    streams = CudaStreams.__new__(CudaStreams)
    streams._torch, streams.device, streams.copy_stream = SimpleNamespace(cuda=fake.cuda), "cuda", fake.copy_stream
    copied = []

    class Dst:
        def copy_(self, src, non_blocking=False):
            copied.append((src, non_blocking))
            fake.calls.append(("copy", src))

    free = streams.compute_event()
    done = streams.copy(free, [(Dst(), "block0")], (0, 0))
    streams.wait(done)
    streams.drain()
    assert copied == [("block0", True)]  # asynchronous, from pinned memory
    assert fake.calls == [("record", "compute", "e1"),
                          ("enter", "copy"), ("wait_event", "copy", "e1"), ("copy", "block0"),
                          ("record", "copy", "e2"), ("exit", "copy"),
                          ("wait_event", "compute", "e2"),
                          ("wait_stream", "compute", "copy")]
    # a first use of a slot has nothing to wait for
    streams.copy(None, [(Dst(), "block1")], (1, 1))
    assert ("wait_event", "copy", None) not in fake.calls


def test_cpu_default_streams_copy_inline(tiny):
    tr = copy.deepcopy(tiny.transformer).requires_grad_(False)
    swapper = BlockSwapper.attach(tr, 1, "cpu")
    assert isinstance(swapper.streams, InlineStreams) and swapper.prefetch == 0  # one block: nothing to fetch ahead
    assert swapper.slot_bytes >= sum(p.numel() * p.element_size() for p in swapper.blocks[0].parameters())
    assert not any(s.host.is_pinned() for s in swapper._stores)  # pinning needs CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real side stream and pinned buffers need a CUDA GPU")
@pytest.mark.parametrize("fp8", [False, True], ids=["full", "fp8"])
def test_swapper_on_cuda_is_exact_with_pinned_buffers_and_a_side_stream(tiny, monkeypatch, fp8):
    def no_sync(*a, **k):
        raise AssertionError("block swapping must not synchronise the device")

    tr, net = flux_lora_model(tiny, fp8)
    tr.to("cuda")
    net.to("cuda")

    def step():
        net.zero_grad(set_to_none=True)
        out = tr(**{k: v.cuda() for k, v in _inputs(tr).items()}).sample
        out.square().mean().backward()
        return out.detach().cpu(), [p.grad.cpu() for p in net.parameters() if p.requires_grad]

    want_out, want_grads = step()
    before = torch.cuda.memory_allocated()
    swapper = BlockSwapper.attach(tr, 3, "cuda", prefetch=1)
    assert isinstance(swapper.streams, CudaStreams)
    assert all(s.host.is_pinned() for s in swapper._stores)
    # the swapped blocks left the device; two slots (each the size of the largest of them) took their place
    tensors = [e for s in swapper._stores for e in s.entries]
    swapped = sum(e.nbytes for e in tensors)
    assert torch.cuda.memory_allocated() <= before - swapped + 2 * swapper.slot_bytes + 512 * len(tensors)
    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    for _ in range(3):
        got_out, got_grads = step()
        assert torch.equal(got_out, want_out)
        for g, w in zip(got_grads, want_grads, strict=True):
            assert torch.equal(g, w)
    monkeypatch.undo()
    swapper.detach()
    assert all(p.device.type == "cuda" for p in tr.parameters())
