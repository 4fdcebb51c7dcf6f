"""The plan of an audit and the tracker of its progress, on a clock the test advances."""

from geomaudit.progress import Plan, PlannedLayer, Tracker, clock


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def plan(checkpoints: int = 2) -> Plan:
    layers = (PlannedLayer("a.weight", (4, 5), 10, 10, 4), PlannedLayer("a.bias", (5,), 5, 5, 4))
    return Plan(tuple(f"ckpt-{i}" for i in range(checkpoints)), layers, micro_batches=1)


def test_plan_counts_hvps_and_the_round_off_bound():
    p = plan()
    assert (p.hvps, p.checks, p.work) == (30, 8, 46)
    assert p.line() == ("plan: 2 checkpoints × 2 layers, 15 coordinates per checkpoint, 1 micro-batch: 46 HVPs in "
                        "all (30 for the coordinates, up to 16 to check round-off)")
    one = Plan(("c",), p.layers[:1], micro_batches=3, hessian=False)
    assert one.line() == "plan: 1 checkpoint × 1 layer, singular values only (no Hessian)"
    assert clock(42) == "0:42" and clock(190.4) == "3:10" and clock(3725) == "1:02:05"


def test_tracker_follows_cache_hits_and_the_real_round_off_count():
    now = Clock()
    t = Tracker(now=now)
    t.start(plan())
    assert t.left() is None and t.line() == "audited 0 of 46 HVPs, 0:00 elapsed"
    t.on_checkpoint(1, 2)
    t.on_layer(1, 2, "a.weight", 10)
    now.t += 10
    t.on_chunk(10)
    assert t.left() == (46 - 10) * 10 / 10
    assert t.line() == "audited 10 of 46 HVPs (checkpoint 1 of 2, layer 1 of 2), 0:10 elapsed, about 0:36 left"
    t.on_layer(2, 2, "a.bias", 5)  # served from the cache: no chunk
    t.on_layer(2, 2, "round-off check of 1 layers", 3)  # the bias's 5 HVPs and 8 - 3 checks leave the total
    assert t.total == 46 - 5 - 5
    assert t.line().startswith("audited 10 of 36 HVPs (checkpoint 1 of 2, round-off check of 1 layers)")
    t.on_chunk(3)
    t.on_checkpoint(2, 2)
    t.on_layer(1, 2, "a.weight", 10)
    t.on_chunk(10)
    t.on_layer(2, 2, "a.bias", 5)
    t.on_chunk(5)
    t.finish()  # the second checkpoint ran no round-off check (all cached): its bound of 8 leaves the total
    assert t.done == t.total == 28
    assert t.left() == 0


def test_estimate_is_the_elapsed_time_plus_the_time_left():
    now = Clock()
    t = Tracker(now=now)
    t.start(plan(checkpoints=1))
    assert t.estimate() is None
    t.on_checkpoint(1, 1)
    t.on_layer(1, 2, "a.weight", 10)
    now.t += 30
    t.on_chunk(10)
    assert t.estimate() == "estimate: about 1:09 in all (0:30 for the first 10 of 23 HVPs)"


def test_without_a_plan_the_line_names_the_phase():
    now = Clock()
    t = Tracker(now=now)
    t.on_layer(1, 4, "training adam on cpu", 40)
    now.t += 5
    t.on_chunk(12)
    assert t.line() == "training adam on cpu: 12 of 40 (1 of 4), 0:05 elapsed"
