"""benchmarks/step_profile.py's accounting: self times of nested trace events, and each HLO op's
part, pass and kind read from the HLO text."""

import pytest
from tiny import load_benchmark


@pytest.fixture(scope="module")
def sp():
    return load_benchmark("step_profile")


def _ev(tid, ts, dur, op=None, run="1"):
    args = {"hlo_module": "jit_train_step", "hlo_op": op, "run_id": run} if op else {}
    return {
        "ph": "X",
        "tid": tid,
        "ts": ts,
        "dur": dur,
        "name": op or "ThunkExecutor",
        "args": args,
    }


def test_self_times_subtract_nested_events_per_thread_and_run(sp):
    events = [
        _ev(1, 0.0, 100.0),  # the executor: not an op, only a parent
        _ev(1, 0.0, 50.0, "while.1"),
        _ev(1, 10.0, 20.0, "add.2"),
        _ev(1, 30.0, 5.0, "add.2"),
        _ev(1, 60.0, 10.0, "dot.3"),
        _ev(2, 5.0, 40.0, "dot.3"),  # another thread: not nested in while.1
        _ev(1, 200.0, 7.0, "dot.3", run="2"),
    ]
    out = sp.self_times(events)
    assert dict(out["1"]) == {"while.1": 25.0, "add.2": 25.0, "dot.3": 50.0}
    assert dict(out["2"]) == {"dot.3": 7.0}


def test_ops_are_read_from_hlo_text_and_classified(sp):
    hlo = "\n".join(
        [
            '  %ynn_fusion.7 = f32[4,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%f, metadata={op_name="jit(train_step)/transpose(jvp(BLSPKD))/BLSPKD.student/BLSPKD.speech/encoder/layers/layers_0/fc1/dot_general" stack_frame_id=3}',  # noqa: E501
            '  ROOT %add.1 = u32[9]{0} add(%x, %y), metadata={op_name="jit(train_step)/jvp(BLSPKD)/BLSPKD.student/llm/blocks/layers_2/mlp/down_proj/while/body/closed_call/add"}',  # noqa: E501
            "  %copy.5 = f32[8,8]{0,1} copy(%k)",
            '  %while.2 = (s32[]) while(%t), condition=%c, body=%b, metadata={op_name="jit(train_step)/jvp()/while"}',  # noqa: E501
            '  %dot.4 = f32[2,2]{1,0} dot(%p, %q), metadata={op_name="jit(train_step)/jvp(BLSPKD)/BLSPKD.teacher/llm/dot_general"}',  # noqa: E501
            '  %mul.9 = f32[2]{0} multiply(%p, %q), metadata={op_name="jit(train_step)/mul"}',
        ]
    )
    ops = sp.hlo_ops(hlo)
    assert ops["copy.5"] == ("copy", "") and ops["while.2"][0] == "while"
    assert sp.classify("ynn_fusion.7", *ops["ynn_fusion.7"]) == ("encoder backward", "matmul")
    assert sp.classify("add.1", *ops["add.1"]) == ("student LLM forward", "random bits")
    assert sp.classify("copy.5", *ops["copy.5"])[1] == "copy / transpose"
    assert sp.classify("dot.4", *ops["dot.4"]) == ("teacher LLM", "matmul")
    assert sp.classify("mul.9", *ops["mul.9"]) == ("clip + AdamW + metrics", "other")
    # Containers are left out: their bodies' ops are counted on their own.
    prof = {"ops": {"while.2": 5.0, "dot.4": 2.0, "add.1": 1.0}, "hlo": ops}
    parts, kinds, _ = sp.summarise(prof)
    assert parts == {"teacher LLM": 2.0, "student LLM forward": 1.0}
    assert kinds == {"matmul": 2.0, "random bits": 1.0}


def test_top_ops_sum_an_op_over_layers_and_list_single_ops(sp):
    path = "jit(train_step)/jvp(BLSPKD)/BLSPKD.student/llm/blocks/layers_{}/mlp/mul"
    hlo = "\n".join(
        [
            f'  %mul.{i} = f32[2]{{0}} multiply(%p, %q), metadata={{op_name="{path.format(i)}"}}'
            for i in (1, 2, 3)
        ]
        + ['  %while.9 = (s32[]) while(%t), condition=%c, body=%b, metadata={op_name="x"}']
    )
    prof = {
        "ops": {"mul.1": 1.0, "mul.2": 4.0, "mul.3": 2.0, "while.9": 50.0},
        "hlo": sp.hlo_ops(hlo),
    }
    summed, single = sp.top_ops(prof, 2)
    # The while loop is a container (its body's ops are counted on their own): left out.
    assert summed == [(7.0, 3, "student LLM forward", "other", path.format("#"))]
    assert single == [
        (4.0, "student LLM forward", "other", path.format(2)),
        (2.0, "student LLM forward", "other", path.format(3)),
    ]
    assert "| 7 | 3 | student LLM forward | other |" in sp.report_top("x", prof, 2)
