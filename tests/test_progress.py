"""Progress bars are bars on a terminal and plain lines in a log (atlas_server/progress.py).

QA found `atlas-eval run perplexity ... > log 2>&1` wrote 130 carriage-return frames into an
18-line log, and the tokenizer, prepare-data, DPO reference and ingest bars did the same,
while the training loop already printed plain lines there.
"""

from __future__ import annotations

import io

from atlas_server.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_into_a_log_each_refresh_is_a_line_and_the_last_state_is_kept():
    log = io.StringIO()
    with progress_bar(total=3, desc="reading", file=log, mininterval=0, leave=False) as bar:
        for _ in range(3):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("reading:   0%") and lines[-1].startswith("reading: 100%")
    assert "3/3" in lines[-1]  # kept though the bar asked to be cleared at the end


def test_into_a_log_refreshes_are_rate_limited():
    log = io.StringIO()
    for _ in progress_bar(range(10_000), desc="merging", file=log):
        pass
    assert "\r" not in log.getvalue()
    assert len(log.getvalue().splitlines()) <= 3  # the start, the end (a 30 s interval)


def test_on_a_terminal_it_is_tqdms_bar():
    tty = Terminal()
    with progress_bar(total=2, desc="reading", file=tty, mininterval=0) as bar:
        bar.update(2)
    assert "\r" in tty.getvalue()
