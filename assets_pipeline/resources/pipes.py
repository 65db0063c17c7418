"""The Pipes message reader the trainer's subprocess client uses.

Dagster's ``PipesTempFileMessageReader`` (dagster 1.13) tails the file the external process appends one JSON
message per line to, with ``readline``. At the end of a file that is still being written, ``readline`` returns
whatever part of a line is there, and a large append becomes visible to a concurrent reader page by page (the
kernel updates the file size per page). The trainer's final metadata carries its images (tens of KB), so the reader
could receive half a message. It then failed with ``JSONDecodeError``, its thread died, and every later message was
lost, including the materialization. Seen in this project's suite under load. This reader is the same protocol and
file, except that it joins the pieces until the line's newline arrives before it parses a message.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg


class WholeLineTempFileMessageReader(dg.PipesMessageReader):
    """Messages from a temporary file, one JSON message per line, each parsed once its whole line is there."""

    @contextmanager
    def read_messages(self, handler) -> Iterator[dict]:
        from dagster_pipes import PipesDefaultMessageWriter

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "messages")
            open(path, "w", encoding="utf-8").close()
            done = threading.Event()
            thread = threading.Thread(target=self._read, args=(path, handler, done), daemon=True)
            thread.start()
            try:
                yield {PipesDefaultMessageWriter.FILE_PATH_KEY: path,
                       PipesDefaultMessageWriter.INCLUDE_STDIO_IN_MESSAGES_KEY: False}
            finally:
                done.set()  # the process has ended: read what is left, then stop
                thread.join()

    @staticmethod
    def _read(path: str, handler, done: threading.Event) -> None:
        try:
            pending = b""
            with open(path, "rb") as f:  # bytes: a piece may end inside a UTF-8 sequence; a whole line cannot
                while True:
                    piece = f.readline()
                    if piece:
                        pending += piece
                        if pending.endswith(b"\n"):
                            handler.handle_message(json.loads(pending.decode("utf-8")))
                            pending = b""
                    elif done.is_set():
                        break
                    else:
                        time.sleep(0.01)
            if pending:  # the writer died halfway through a message: say so, do not guess its end
                raise ValueError(f"the last Pipes message in {path} is incomplete ({len(pending)} bytes, no "
                                 "newline): the external process ended while writing it")
        except Exception:
            handler.report_pipes_framework_exception(f"{WholeLineTempFileMessageReader.__name__} reader thread",
                                                     sys.exc_info())
            raise

    def no_messages_debug_text(self) -> str:
        return "Attempted to read messages from a local temporary file."
