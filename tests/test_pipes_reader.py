"""The trainer's Pipes message reader parses a message only once its whole line has arrived (resources/pipes.py):
Dagster's temp-file reader parsed a large message the trainer was still appending and lost the rest of the run's
messages."""

from __future__ import annotations

import json
import time

import pytest

from assets_pipeline.resources.pipes import WholeLineTempFileMessageReader


class Recorder:
    def __init__(self):
        self.messages, self.errors = [], []

    def handle_message(self, message):
        self.messages.append(message)

    def report_pipes_framework_exception(self, origin, exc_info):
        self.errors.append((origin, exc_info[1]))


def _wait(condition, seconds=5.0):
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_a_message_written_in_pieces_is_parsed_once_whole():
    from dagster_pipes import PipesDefaultMessageWriter

    handler = Recorder()
    big = {"__dagster_pipes_version": "0.1", "method": "report_asset_materialization",
           "params": {"metadata": {"preview": "![grid](data:image/jpeg;base64," + "é" * 40_000 + ")"}}}
    line = (json.dumps(big, ensure_ascii=False) + "\n").encode()
    with WholeLineTempFileMessageReader().read_messages(handler) as params:
        path = params[PipesDefaultMessageWriter.FILE_PATH_KEY]
        with open(path, "ab", buffering=0) as f:
            f.write(b'{"method": "log", "params": {"message": "one"}}\n')
            assert _wait(lambda: len(handler.messages) == 1)
            f.write(line[:20_001])  # cut inside a 2-byte UTF-8 character, as a page boundary may
            time.sleep(0.2)  # the reader polls every 10 ms: it has seen the piece by now
            assert len(handler.messages) == 1 and not handler.errors
            f.write(line[20_001:])
            assert _wait(lambda: len(handler.messages) == 2)
    assert handler.messages[1] == big and not handler.errors


def test_a_message_cut_off_by_a_dying_writer_is_reported_not_guessed():
    from dagster_pipes import PipesDefaultMessageWriter

    handler = Recorder()
    with pytest.raises(ValueError, match="incomplete"):
        with WholeLineTempFileMessageReader().read_messages(handler) as params:
            with open(params[PipesDefaultMessageWriter.FILE_PATH_KEY], "a", encoding="utf-8") as f:
                f.write('{"method": "log", "params": {"message": "cut')
            raise ValueError("incomplete: the run's own failure")  # the context exits; the thread reports its own
    assert not handler.messages
    assert len(handler.errors) == 1 and "incomplete" in str(handler.errors[0][1])
