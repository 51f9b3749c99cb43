"""Stop strings held back across deltas."""

from kvfuse.serve.textstream import StopFilter


def feed(stops, deltas):
    stop_filter = StopFilter(tuple(stops))
    sent = [stop_filter.push(d) for d in deltas]
    if not stop_filter.stopped:
        sent.append(stop_filter.flush())
    return sent, stop_filter.stopped


def test_a_stop_string_split_over_deltas_never_leaks():
    sent, stopped = feed(["</s>"], ["Hello", " <", "/", "s>", " more"])
    assert "".join(sent) == "Hello " and stopped
    assert sent[1:3] == [" ", ""]  # "<" then "</" were held back, not sent


def test_a_false_start_is_released_when_it_cannot_become_a_stop():
    sent, stopped = feed(["STOP"], ["ab S", "T", "x", "y"])
    assert sent == ["ab ", "", "STx", "y", ""] and not stopped


def test_held_back_tail_is_flushed_at_the_end():
    sent, stopped = feed(["abc"], ["xx", "ab"])
    assert sent == ["xx", "", "ab"] and not stopped


def test_the_earliest_of_several_stops_wins():
    sent, stopped = feed(["world", "lo w"], ["hello", " world"])
    assert "".join(sent) == "hel" and stopped
