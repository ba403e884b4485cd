"""The scheduler's bookkeeping: slots, the bounded queue, prefill chunks, decode batches."""

from __future__ import annotations

import pytest

from qmodel_runtime.engine.sampling import SamplingParams
from qmodel_runtime.engine.scheduler import QueueFull, Scheduler, Sequence


class _NoTokenizer:
    def decode(self, ids, **_):
        return ""


def seq(rid: str, prompt_len: int, arrival: float = 0.0) -> Sequence:
    from qmodel_runtime.engine.detok import Detokenizer

    prompt = list(range(prompt_len))
    return Sequence(
        rid,
        prompt,
        SamplingParams(max_tokens=4),
        lambda _: None,
        Detokenizer(_NoTokenizer(), prompt),
        arrival=arrival,
    )


def test_slots_are_given_lowest_first_and_reused():
    s = Scheduler(slots=3, max_len=64, max_queue=8, prefill_tokens=64)
    for i in range(4):
        s.add(seq(f"r{i}", 4, arrival=i))
    assert [q.slot for q in s.admit()] == [0, 1, 2]
    assert s.num_waiting == 1  # r3 waits for a slot
    s.remove("r1")
    assert [q.request_id for q in s.admit()] == ["r3"]
    assert s.running[1].request_id == "r3"


def test_the_queue_is_bounded():
    s = Scheduler(slots=1, max_len=64, max_queue=2, prefill_tokens=64)
    s.add(seq("a", 4))
    s.add(seq("b", 4))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        s.add(seq("c", 4))
    s.admit()  # a takes the slot: the queue has room again
    s.add(seq("c", 4))


def test_removing_a_waiting_request_takes_it_out_of_the_queue():
    s = Scheduler(slots=1, max_len=64, max_queue=4, prefill_tokens=64)
    s.add(seq("a", 4))
    s.add(seq("b", 4))
    s.admit()
    assert s.remove("b") is not None and s.num_waiting == 0
    assert s.remove("b") is None


def test_a_long_prompt_is_prefilled_in_chunks():
    s = Scheduler(slots=2, max_len=256, max_queue=4, prefill_tokens=32)
    s.add(seq("long", 80))
    s.admit()
    starts = []
    while items := s.prefill_batch():
        assert len(items) == 1 and len(items[0].tokens) <= 32
        starts.append(items[0].start)
        items[0].seq.prefilled += len(items[0].tokens)
    assert starts == [0, 32, 64]


def test_short_prompts_share_a_prefill_within_the_padded_budget():
    s = Scheduler(slots=4, max_len=256, max_queue=4, prefill_tokens=32)
    for i, n in enumerate([10, 6, 12, 4]):
        s.add(seq(f"r{i}", n, arrival=i))
    s.admit()
    items = s.prefill_batch()
    # 10 and 6 fit as 2 rows x 10; adding 12 would make 3 x 12 = 36 > 32
    assert [i.seq.request_id for i in items] == ["r0", "r1"]
    assert all(i.completes_prompt for i in items)


def test_decode_batch_holds_prefilled_requests_in_slot_order():
    s = Scheduler(slots=3, max_len=64, max_queue=4, prefill_tokens=64)
    for i in range(3):
        s.add(seq(f"r{i}", 4, arrival=i))
    s.admit()
    for q in (s.running[2], s.running[0]):
        q.prefilled = len(q.prompt_ids)
        q.output_ids.append(7)
    assert [q.slot for q in s.decode_batch()] == [0, 2]


def test_kv_usage_counts_live_tokens():
    s = Scheduler(slots=2, max_len=100, max_queue=4, prefill_tokens=64)
    s.add(seq("a", 30))
    s.add(seq("b", 20))
    s.admit()
    s.running[0].output_ids.extend([1] * 10)
    assert s.kv_usage() == pytest.approx((40 + 20) / 200)
