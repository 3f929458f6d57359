"""What an outage writes to the log: a kind of failure's traceback once an hour, each failed attempt on one line."""

from __future__ import annotations

import io
import logging

from birdflow.flows.engine import RepeatsCounted, TracebackOncePerKind, one_line, quiet_run_logs


def failing_upload(url: str) -> None:
    raise ConnectionError(f"Could not connect to the endpoint URL:\n  {url}")


def logged(logger: logging.Logger, url: str) -> None:
    try:
        failing_upload(url)
    except ConnectionError:
        logger.error("Task run failed with exception - Retries are exhausted", exc_info=True)


def test_a_kind_of_failure_shows_its_traceback_once_an_hour_then_one_line_each():
    now = [0.0]
    stream = io.StringIO()
    logger = logging.getLogger("test.run_logs")
    logger.propagate = False
    logger.addHandler(logging.StreamHandler(stream))
    logger.addFilter(TracebackOncePerKind(every_s=3600, clock=lambda: now[0]))
    for number in range(20):
        logged(logger, f"http://127.0.0.1:9/bucket/{number}.flac")
    assert stream.getvalue().count("Traceback (most recent call last)") == 1
    assert len(stream.getvalue().splitlines()) < 20 + 12  # the first with its traceback, then a line each
    assert stream.getvalue().splitlines()[-1].endswith("(traceback shown earlier)")
    now[0] = 3600.0
    logged(logger, "http://127.0.0.1:9/bucket/later.flac")
    assert stream.getvalue().count("Traceback (most recent call last)") == 2  # an hour later, once more


def test_a_failure_repeated_every_second_is_one_line_in_five_minutes_then_one_with_its_count():
    now = [0.0]
    stream = io.StringIO()
    logger = logging.getLogger("test.repeats")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(logging.StreamHandler(stream))
    logger.addFilter(RepeatsCounted(every_s=300, clock=lambda: now[0]))
    for second in range(600):  # ten minutes of a scan failing every second
        now[0] = float(second)
        logged(logger, f"http://127.0.0.1:9/bucket/{second}.flac")
    logger.info("a line without an error passes")
    lines = stream.getvalue().splitlines()
    assert stream.getvalue().count("Traceback (most recent call last)") == 2  # at 0 s and at 300 s
    assert sum("Retries are exhausted" in line for line in lines) == 2
    assert "(and 299 like it since last shown)" in stream.getvalue()
    assert lines[-1] == "a line without an error passes"


def test_long_and_multi_line_messages_become_one_bounded_line():
    assert (
        one_line("ApiException: (503)\nReason: Service Unavailable\n\n")
        == "ApiException: (503) Reason: Service Unavailable"
    )
    assert len(one_line("x " * 1000)) == 400


def test_the_run_loggers_drop_routine_lines_and_a_failed_tasks_repeated_end():
    quiet_run_logs()
    stream = io.StringIO()
    logger = logging.getLogger("prefect.task_runs")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        logger.error("Task run failed with exception: OSError('down') - Retries are exhausted")
        logger.error("Finished in state Failed('Task run encountered an exception OSError: down')")
        logger.info("Finished in state Completed()")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["Task run failed with exception: OSError('down') - Retries are exhausted"]
