"""UNetSession's plan choice: `threads=None` times a small graph on every core, on one thread and (for a
batch of two or more) as one concurrent shard per core, and runs on the fastest, without changing any
output; explicit threads and slow graphs are left alone."""

import json

import numpy as np
import pytest

from qexport_runtime import session as session_module
from qexport_runtime.artifact import load_artifact
from qexport_runtime.session import AUTO_THREADS_CALLS, AUTO_THREADS_WARMUP, Plan, UNetSession, physical_cores


def decided_after(batch: int) -> int:
    """Calls until a batch size's plan is chosen: a warm-up, a size probe, then every candidate's trials."""
    candidates = 3 if batch > 1 else 2
    return 2 + candidates * (AUTO_THREADS_WARMUP + AUTO_THREADS_CALLS)


@pytest.fixture
def int_graph(tiny_artifact):
    return load_artifact(tiny_artifact).graph("int")


def test_auto_plan_chosen_per_batch_and_keeps_outputs(int_graph):
    if physical_cores() < 2:
        pytest.skip("one physical core: there is no thread count to choose")
    auto, one = UNetSession(int_graph), UNetSession(int_graph, threads=1)
    shape = auto.sample_dims[1:]
    cores = physical_cores()
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        ref = one(x, 500).copy()
        for i in range(decided_after(batch) + 1):
            np.testing.assert_allclose(auto(x, 500 - i), one(x, 500 - i), atol=1e-5)
        allowed = {Plan(cores), Plan(1)} | ({Plan(1, min(cores, batch))} if batch > 1 else set())
        assert auto.plans[batch] in allowed
        np.testing.assert_allclose(auto(x, 500), ref, atol=1e-5)
    assert set(auto._bound) == {1, cores} and len(auto._shard_bounds) == min(cores, 3) - 1


def test_every_shard_plan_gives_the_whole_batch_output(int_graph):
    """Forced to each plan, a batch split into shards (uneven ones too) gives the one-session output."""
    if physical_cores() < 2:
        pytest.skip("one physical core: there is nothing to shard across")
    one = UNetSession(int_graph, threads=1)
    for batch in (2, 5):
        x = np.random.default_rng(batch).standard_normal((batch, *one.sample_dims[1:])).astype(np.float32)
        ref = one(x, 321).copy()
        sharded = UNetSession(int_graph)
        sharded.plans[batch] = Plan(1, min(physical_cores(), batch))
        out = sharded(x, 321)
        assert len(sharded._shard_bounds) == min(physical_cores(), batch) - 1
        np.testing.assert_allclose(out, ref, atol=1e-5)
        assert np.abs(out).max() > 0.1   # every shard wrote its rows
        np.testing.assert_allclose(sharded(x[::-1].copy(), 321), ref[::-1], atol=1e-5)


def test_slow_graphs_and_explicit_threads_use_one_session(int_graph, monkeypatch):
    monkeypatch.setattr(session_module, "AUTO_THREADS_MAX_MS", 0.0)   # every call counts as slow
    auto, two = UNetSession(int_graph), UNetSession(int_graph, threads=2)
    x = np.random.default_rng(0).standard_normal((2, *auto.sample_dims[1:])).astype(np.float32)
    for i in range(decided_after(2) + 1):
        auto(x, 400)
        two(x, 400)
    assert auto.plans == {2: Plan(physical_cores())} and len(auto._bound) == 1 and not auto._shard_bounds
    assert two.plans == {2: Plan(2)} and len(two._bound) == 1 and not two._shard_bounds


def test_wait_policy_spins_only_when_asked_and_changes_no_output(int_graph, monkeypatch):
    """QEXPORT_WAIT_POLICY=active: threads spin during a call and stop when it returns; the default blocks."""
    from qexport_runtime.session import session_options

    x = np.random.default_rng(0).standard_normal((2, *UNetSession(int_graph).sample_dims[1:])).astype(np.float32)
    outputs = {}
    for policy, spin in (("passive", "0"), ("active", "1"), (" Active ", "1")):
        monkeypatch.setenv("QEXPORT_WAIT_POLICY", policy)
        so = session_options(2)
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == spin
        if spin == "1":
            assert so.get_session_config_entry("session.force_spinning_stop") == "1"
        outputs[policy] = UNetSession(int_graph, threads=2)(x, 321).copy()
    monkeypatch.delenv("QEXPORT_WAIT_POLICY")
    assert session_options(2).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    np.testing.assert_array_equal(outputs["passive"], outputs["active"])

    monkeypatch.setenv("QEXPORT_WAIT_POLICY", "busy")
    with pytest.raises(ValueError, match="QEXPORT_WAIT_POLICY='busy' is not one of passive, active"):
        session_options(2)


def test_cli_names_a_bad_wait_policy_in_one_line(tiny_artifact, monkeypatch, capsys):
    from qexport_runtime.__main__ import main

    monkeypatch.setenv("QEXPORT_WAIT_POLICY", "spin")
    assert main(["bench", str(tiny_artifact), "--steps", "2", "--no-memory"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "QEXPORT_WAIT_POLICY='spin'" in err[0] and "passive" in err[0]


def test_wait_policy_flag_reaches_every_session_and_the_reports(tiny_artifact, tmp_path, monkeypatch):
    """--wait-policy (runtime and qexport CLIs) outranks QEXPORT_WAIT_POLICY; bench and sample JSON name it."""
    from qexport_runtime.__main__ import main

    monkeypatch.setenv("QEXPORT_WAIT_POLICY", "passive")   # restored after the test
    assert main(["bench", str(tiny_artifact), "--steps", "2", "--no-memory", "--wait-policy", "active",
                 "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["machine"]["wait_policy"] == "active"
    monkeypatch.setenv("QEXPORT_WAIT_POLICY", "active")
    assert main(["sample", str(tiny_artifact), "--steps", "2", "--batch", "1", "-o", str(tmp_path / "s"),
                 "--wait-policy", "passive"]) == 0
    assert json.loads((tmp_path / "s" / "sample.json").read_text())["wait_policy"] == "passive"
    pytest.importorskip("torch", reason="the qexport CLI is the toolchain's")
    from qexport.cli.main import main as qexport_main

    assert qexport_main(["bench", str(tiny_artifact), "--steps", "2", "--no-memory", "--wait-policy", "active",
                         "--json", str(tmp_path / "q.json")]) == 0
    assert json.loads((tmp_path / "q.json").read_text())["machine"]["wait_policy"] == "active"


def test_sessions_run_without_a_memory_pattern_and_give_the_same_outputs(int_graph, monkeypatch):
    """The runtime's sessions plan no memory pattern (it kept each shape's activation block beside the
    arena: cifar config B=8 peak RSS 175 → 150 MB); outputs equal those of a session with one."""
    from qexport_runtime.session import session_options

    assert session_options(2).enable_mem_pattern is False
    x = np.random.default_rng(0).standard_normal((3, *UNetSession(int_graph).sample_dims[1:])).astype(np.float32)
    without = [UNetSession(int_graph, threads=2)(x, t).copy() for t in (999, 321)]
    original = session_module.session_options

    def with_pattern(*args, **kwargs):
        so = original(*args, **kwargs)
        so.enable_mem_pattern = True
        return so

    monkeypatch.setattr(session_module, "session_options", with_pattern)
    s = UNetSession(int_graph, threads=2)
    assert s.session.get_session_options().enable_mem_pattern is True
    for t, out in zip((999, 321), without):
        np.testing.assert_array_equal(s(x, t), out)
