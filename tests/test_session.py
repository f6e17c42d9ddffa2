"""UNetSession's thread choice: `threads=None` times a small graph on every core and on one thread and
runs on the faster, without changing any output; explicit threads and slow graphs are left alone."""

import numpy as np
import pytest

from qexport_runtime import session as session_module
from qexport_runtime.artifact import load_artifact
from qexport_runtime.session import AUTO_THREADS_CALLS, AUTO_THREADS_WARMUP, UNetSession, physical_cores

DECIDED_AFTER = 2 + 2 * (AUTO_THREADS_WARMUP + AUTO_THREADS_CALLS)


@pytest.fixture
def int_graph(tiny_artifact):
    return load_artifact(tiny_artifact).graph("int")



def test_auto_threads_choose_per_batch_and_keep_outputs(int_graph):
    if physical_cores() < 2:
        pytest.skip("one physical core: there is no thread count to choose")
    auto, one = UNetSession(int_graph), UNetSession(int_graph, threads=1)
    shape = auto.sample_dims[1:]
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        ref = one(x, 500).copy()
        for i in range(DECIDED_AFTER + 1):
            np.testing.assert_allclose(auto(x, 500 - i), one(x, 500 - i), atol=1e-5)
        assert batch in auto.threads_used and auto.threads_used[batch] in (1, physical_cores())
        np.testing.assert_allclose(auto(x, 500), ref, atol=1e-5)
    assert set(auto._bound) == {1, physical_cores()}


def test_slow_graphs_and_explicit_threads_use_one_session(int_graph, monkeypatch):
    monkeypatch.setattr(session_module, "AUTO_THREADS_MAX_MS", 0.0)   # every call counts as slow
    auto, two = UNetSession(int_graph), UNetSession(int_graph, threads=2)
    x = np.random.default_rng(0).standard_normal((2, *auto.sample_dims[1:])).astype(np.float32)
    for i in range(DECIDED_AFTER + 1):
        auto(x, 400)
        two(x, 400)
    assert auto.threads_used == {2: physical_cores()} and len(auto._bound) == 1
    assert two.threads_used == {2: 2} and len(two._bound) == 1
