"""bench.profile's attribution of samples to components (pure logic)."""

from bench.profile import component, summarise


def test_samples_are_charged_to_the_innermost_named_component():
    assert component(["_run_module_as_main (runpy)", "data_received (gateway/server.py:120)",
                      "_decode_notify (gateway/spop/frames.py:336)", "0x7f (libc.so.6)"]) == "SPOP codec"
    assert component(["thread", "evaluate (wafsvc/engine.py:161)",
                      "modsecurity::RuleWithOperator::evaluate (libmodsecurity.so)"]) == "modsecurity engine"
    assert component(["thread", "epoll_wait (libc.so.6)"]) == "syscalls: epoll (waiting)"
    assert component(["thread", "0x1 (libc.so.6)"]) == "other (interpreter, libc)"


def test_summary_splits_threads_and_counts_every_sample(tmp_path):
    raw = tmp_path / "p.raw"
    raw.write_text("main;_run_module_as_main (runpy);_on_notify (gateway/server.py:159) 3\n"
                   "poller;epoll_wait (libc.so.6) 1\n")
    total, by_component, by_thread = summarise(raw)
    assert total == 4
    assert by_component == {"gateway mapping/server/pool": 3, "syscalls: epoll (waiting)": 1}
    assert by_thread == {"main thread (event loop)": 3, "gRPC poller thread": 1}
