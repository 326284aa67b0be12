"""Progress in a log file: plain lines every few seconds instead of tqdm's redraws, from one helper."""
import ast
import os

from helpers import ROOT

from ddpm import progress


def test_plain_lines_every_ten_seconds_and_one_at_the_end(monkeypatch, capsys):
    """Not a terminal (pytest captures stderr): 1,000 updates 0.1 s apart on a fake clock (100 s) give a line at
    10 s, 20 s, ..., 100 s and none at close, since the last one already showed the end; each line says where the
    loop is, how fast, what is left and the postfix."""
    now = [0.0]
    monkeypatch.setattr(progress, "monotonic", lambda: now[0])
    with progress.progress(1000, "sampling", "img") as bar:
        assert isinstance(bar, progress.PlainProgress)
        for i in range(1000):
            now[0] = (i + 1) / 10
            bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
            bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10, lines
    assert lines[0] == "sampling: 100/1000 img (10%), 0:10 elapsed, 10 img/s, 1:30 left, loss=0.0100"
    assert lines[-1] == "sampling: 1000/1000 img (100%), 1:40 elapsed, 10 img/s, loss=0.0010"


def test_close_shows_the_end_and_disabled_bars_show_nothing(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(progress, "monotonic", lambda: now[0])
    bar = progress.progress(700, "train", "step", initial=200)
    now[0] = 5.0
    bar.update(100)
    bar.close()
    assert capsys.readouterr().err == "train: 300/700 step (43%), 0:05 elapsed, 20 step/s, 0:20 left\n"
    bar.set_description("round 2/3")  # as tqdm's: the name of the next lines (distill.py's rounds)
    now[0] = 15.0
    bar.update(200)
    assert capsys.readouterr().err == "round 2/3: 500/700 step (71%), 0:15 elapsed, 20 step/s, 0:10 left\n"
    with progress.progress(10, "sampling", "img", disable=True) as bar:
        now[0] = 100.0
        bar.update(10)
    assert capsys.readouterr().err == ""


def test_only_the_helper_uses_tqdm():
    """Every progress bar of the commands and ddpm/ goes through ddpm/progress.py."""
    users = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
                names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
                if any(m.split(".")[0] == "tqdm" for m in names):
                    users.append(os.path.relpath(path, ROOT))
    assert users == [os.path.join("ddpm", "progress.py")]
