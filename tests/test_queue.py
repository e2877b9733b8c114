"""WaitQueue: heap order by (prompt start, arrival), lazy deletion, live count."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.admission.queue import WaitQueue


@dataclass(eq=False)
class Item:
    name: str
    waiting: bool = True


def drain(queue: WaitQueue[Item]) -> list[str]:
    names = []
    while queue:
        names.append(queue.pop().name)
    return names


def kill(queue: WaitQueue[Item], item: Item) -> None:
    """What the limiter does when a waiter leaves: mark it, then account for it."""
    item.waiting = False
    queue.discard()


def test_pops_the_oldest_prompt_first_whatever_the_push_order() -> None:
    queue: WaitQueue[Item] = WaitQueue()
    for seq, (name, prompt) in enumerate([("c", 30.0), ("a", 10.0), ("d", 40.0), ("b", 20.0)]):
        queue.push(prompt, seq, Item(name))
    assert drain(queue) == ["a", "b", "c", "d"]


def test_equal_prompt_times_pop_in_seq_order() -> None:
    queue: WaitQueue[Item] = WaitQueue()
    queue.push(5.0, 3, Item("third"))
    queue.push(5.0, 1, Item("first"))
    queue.push(5.0, 2, Item("second"))
    assert drain(queue) == ["first", "second", "third"]


def test_len_counts_live_entries_only() -> None:
    queue: WaitQueue[Item] = WaitQueue()
    items = [Item(str(i)) for i in range(3)]
    for seq, item in enumerate(items):
        queue.push(float(seq), seq, item)
    assert len(queue) == 3
    kill(queue, items[1])
    assert len(queue) == 2
    kill(queue, items[0])
    kill(queue, items[2])
    assert len(queue) == 0
    assert not queue


def test_peek_and_pop_skip_dead_entries() -> None:
    queue: WaitQueue[Item] = WaitQueue()
    head, middle, tail = Item("head"), Item("middle"), Item("tail")
    for seq, item in enumerate([head, middle, tail]):
        queue.push(float(seq), seq, item)
    kill(queue, head)
    kill(queue, middle)
    assert queue.peek() is tail
    assert len(queue) == 1  # peeking past dead entries does not change the live count
    assert queue.pop() is tail
    assert len(queue) == 0
    assert queue.peek() is None


def test_peek_does_not_remove_the_live_head() -> None:
    queue: WaitQueue[Item] = WaitQueue()
    item = Item("only")
    queue.push(1.0, 0, item)
    assert queue.peek() is item
    assert queue.peek() is item
    assert len(queue) == 1


def test_peek_of_an_empty_queue_is_none() -> None:
    assert WaitQueue[Item]().peek() is None


def test_clear_dead_forgets_dead_entries_once_nothing_lives() -> None:
    queue: WaitQueue[Item] = WaitQueue()
    dead = Item("dead")
    queue.push(1.0, 0, dead)
    kill(queue, dead)
    queue.clear_dead()
    dead.waiting = True  # were the entry still in the heap, peek would now find it
    assert queue.peek() is None


def test_clear_dead_keeps_everything_while_an_entry_lives() -> None:
    queue: WaitQueue[Item] = WaitQueue()
    dead, live = Item("dead"), Item("live")
    queue.push(1.0, 0, dead)
    queue.push(2.0, 1, live)
    kill(queue, dead)
    queue.clear_dead()
    assert queue.peek() is live
    assert len(queue) == 1


@settings(max_examples=200, deadline=None, database=None)
@given(
    entries=st.lists(st.tuples(st.integers(0, 4), st.booleans()), max_size=30),
)
def test_pop_order_is_the_sorted_order_of_live_entries(
    entries: list[tuple[int, bool]],
) -> None:
    queue: WaitQueue[Item] = WaitQueue()
    items = []
    for seq, (prompt, _) in enumerate(entries):
        item = Item(f"{prompt}/{seq}")
        queue.push(float(prompt), seq, item)
        items.append(item)
    for item, (_, dies) in zip(items, entries, strict=True):
        if dies:
            kill(queue, item)
    expected = sorted(
        ((prompt, seq) for seq, (prompt, dies) in enumerate(entries) if not dies),
    )
    assert len(queue) == len(expected)
    assert drain(queue) == [f"{prompt}/{seq}" for prompt, seq in expected]
    assert queue.peek() is None


# --- a waiter's place in line (keepalive position, Retry-After) ---------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=0, max_size=60),
    st.integers(0, 21),
    st.integers(0, 70),
)
def test_ahead_counts_the_live_entries_that_sort_first(
    entries: list[tuple[int, bool]], prompt: int, seq: int
) -> None:
    queue: WaitQueue[Item] = WaitQueue()
    items = []
    for i, (at, _) in enumerate(entries):
        item = Item(str(i))
        queue.push(float(at), i, item)
        items.append(item)
    for item, (_, dead) in zip(items, entries, strict=True):
        if dead:
            kill(queue, item)
    expected = sum(
        1
        for i, ((at, dead), item) in enumerate(zip(entries, items, strict=True))
        if item.waiting and (at, i) < (prompt, seq)
    )
    assert queue.ahead(float(prompt), seq) == expected
    assert queue.ahead(float(prompt), seq, stop=3) == min(expected, 3)
    assert queue.ahead(float(prompt), seq, stop=0) == 0


def test_ahead_of_the_head_is_zero_and_of_the_tail_the_rest() -> None:
    queue: WaitQueue[Item] = WaitQueue()
    for seq in range(1000):
        queue.push(float(1000 - seq), seq, Item(str(seq)))
    assert queue.ahead(1.0, 999) == 0  # the oldest prompt, pushed last
    assert queue.ahead(1000.0, 0) == 999


def test_first_lists_live_entries_in_admission_order() -> None:
    queue: WaitQueue[Item] = WaitQueue()
    items = {name: Item(name) for name in "cadb"}
    for seq, (name, prompt) in enumerate([("c", 30.0), ("a", 10.0), ("d", 40.0), ("b", 20.0)]):
        queue.push(prompt, seq, items[name])
    kill(queue, items["b"])
    assert [item.name for item in queue.first(10)] == ["a", "c", "d"]
    assert [item.name for item in queue.first(2)] == ["a", "c"]


def test_place_agrees_with_ahead_before_and_after_it_sorts_and_after_changes() -> None:
    queue: WaitQueue[Item] = WaitQueue()
    items = [Item(str(i)) for i in range(50)]
    for seq, item in enumerate(items):
        queue.push(float((seq * 7) % 13), seq, item)

    def check() -> None:
        for seq, item in enumerate(items):
            if item.waiting:
                expected = queue.ahead(float((seq * 7) % 13), seq)
                assert queue.place(float((seq * 7) % 13), seq, item) == expected

    check()  # the first questions walk the heap, the rest read the sorted table
    check()
    kill(queue, items[3])
    check()
    queue.pop().waiting = False
    check()
    queue.push(0.0, 99, extra := Item("new"))
    assert queue.place(0.0, 99, extra) == queue.ahead(0.0, 99) == 3  # seqs 13, 26, 39
    check()
