"""Progress output of the long loops when stderr is not a terminal (log files, CI): a plain line
at most every LOG_EVERY_S seconds with done/total, elapsed time and ETA — silence otherwise."""

from __future__ import annotations

from decoupleq_ref.model import progress


def test_plain_progress_lines(monkeypatch, capsys):
    clock = iter([0.0, 10.0, 61.0, 70.0, 125.0, 130.0])  # start, then one reading per advance
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    assert not progress.CONSOLE.is_terminal  # pytest captures stderr
    with progress.progress_bar("eval", 5) as advance:
        for i in range(5):
            advance(note=f"ppl {i}")
    lines = capsys.readouterr().err.strip().splitlines()
    # 61 s: first line (ETA = 61/2·3); 125 s: second; the last item ends with a closing line
    assert lines == ["eval 2/5, 1m01s elapsed, ETA 1m32s, ppl 1",
                     "eval 4/5, 2m05s elapsed, ETA 0m31s, ppl 3",
                     "eval 5/5, 2m10s elapsed, ETA 0m00s, ppl 4"]


def test_short_loops_stay_silent(monkeypatch, capsys):
    assert not progress.CONSOLE.is_terminal
    with progress.progress_bar("calibrate", 3) as advance:
        for _ in range(3):
            advance()
    assert capsys.readouterr().err == ""
