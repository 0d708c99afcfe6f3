"""The benchmarks' own arithmetic: the profile summary, merged ingest rounds, the A/B's CPU
ratio. A wrong figure here would mislead every optimisation measured with it."""

from __future__ import annotations

from pathlib import Path

from tests.bench import ab, profile
from tests.bench.ingest import merged
from tests.bench.wrk import WrkResult

SITE = "/srv/app/.venv/lib/python3.11/site-packages"
STDLIB = "/usr/lib/python3.11"


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "profile.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_summary_counts_own_cumulative_and_buckets(tmp_path: Path) -> None:
    task = f"apply_target ({SITE}/celery/concurrency/base.py:12)"
    deliver = "Delivery._deliver (/srv/app/relay/delivery/batch.py:170)"
    lines = [
        # a socket read inside redis-py: Redis, whatever stdlib frame is on top
        f"{task};{deliver};execute ({SITE}/redis/client.py:5);recv ({STDLIB}/socket.py:9) 6",
        # translation's own code
        f"{task};{deliver};track_command (/srv/app/relay/translate.py:40) 3",
        # aiohttp under the thread's event loop: HTTP
        f"{task};run_until_complete ({STDLIB}/asyncio/base_events.py:1);"
        f"post ({SITE}/aiohttp/client.py:3) 1",
    ]
    result = profile.summary(_write(tmp_path, lines)).as_dict()
    assert result["samples"] == 10
    assert result["buckets_pct"] == {
        "Redis round trips": 60.0,
        "translation / plan": 30.0,
        "HTTP send": 10.0,
    }
    assert result["top_own_pct"]["recv (socket.py)"] == 60.0
    assert result["top_cumulative_pct"]["apply_target (celery/concurrency/base.py)"] == 100.0
    assert result["top_cumulative_pct"]["Delivery._deliver (relay/delivery/batch.py)"] == 90.0


def test_a_frame_repeated_in_a_stack_counts_once_in_cumulative(tmp_path: Path) -> None:
    frame = "walk (/srv/app/relay/plan.py:7)"
    result = profile.summary(_write(tmp_path, [f"{frame};{frame};{frame} 4"])).as_dict()
    assert result["top_cumulative_pct"] == {"walk (relay/plan.py)": 100.0}


def test_a_c_call_is_bucketed_by_the_line_that_made_it(tmp_path: Path) -> None:
    # orjson and pydantic-core have no Python frames: their time shows on the caller's line.
    source = tmp_path / "relay" / "delivery" / "decode.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "import orjson\nitems = orjson.loads(body)\nevent = ADAPTER.validate_python(raw)\n"
    )
    lines = [f"decode ({source}:2) 3", f"decode ({source}:3) 1"]
    result = profile.summary(_write(tmp_path, lines)).as_dict()
    assert result["buckets_pct"] == {"JSON / decode": 75.0, "pydantic parsing": 25.0}


def test_within_keeps_only_the_stacks_through_that_function(tmp_path: Path) -> None:
    lines = [
        "thread (0x1);apply_target (/x/celery/concurrency/base.py:1);"
        "send (/srv/app/relay/delivery/churnzero.py:2) 2",
        f"thread (0x2);loop ({SITE}/kombu/asynchronous/hub.py:3) 8",
    ]
    result = profile.summary(_write(tmp_path, lines), within=profile.POOL_FRAME).as_dict()
    assert result["samples"] == 2
    assert result["buckets_pct"] == {"HTTP send": 100.0}


def test_lines_that_are_not_samples_are_ignored(tmp_path: Path) -> None:
    result = profile.summary(_write(tmp_path, ["", "garbage", "f (/a/b.py:1) x"])).as_dict()
    assert result["samples"] == 0


def _round(rps: float, p99: float) -> WrkResult:
    return WrkResult(
        requests=int(rps * 4), duration_s=4.0, rps=rps, non_2xx=0, socket_errors=0,
        p50_ms=1.0, p90_ms=2.0, p99_ms=p99, max_ms=p99, aof_delayed_fsync=1, redis_forks=0,
    )  # fmt: skip


def test_merged_rounds_give_the_median_round_not_the_total() -> None:
    # One starved round must not drag the figure down: the median round's rate is kept.
    rounds = [_round(600, 50), _round(100, 900), _round(620, 40)]
    result = merged(rounds)
    assert result.rps == 600
    assert result.rounds_rps == [600, 100, 620]
    assert result.p99_ms == 900
    assert result.aof_delayed_fsync == 3


def test_ab_cpu_ratio_counts_the_worker_and_redis() -> None:
    today = {"worker_cpu_us_per_event": 100.0, "redis_cpu_us_per_event": 28.0}
    before = {"worker_cpu_us_per_event": 80.0, "redis_cpu_us_per_event": 8.0}
    assert ab._cpu_ratio(today, before) == round(88 / 128, 3)
    assert ab._cpu_ratio(today, {**before, "redis_cpu_us_per_event": None}) is None
