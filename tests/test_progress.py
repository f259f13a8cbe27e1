"""Progress that fits where it runs (ganflow.progress, issue 35): a bar on a terminal, a few plain lines in a log,
nothing with --quiet; NUTS reports each chain; the linear-Gaussian demo's log stays short."""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch

import ganflow.progress as progress_module
from ganflow.posterior.nuts import NutsSettings, run_nuts
from ganflow.progress import Progress, progress_mode
from tests.conftest import run_cli_subprocess


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(text: str) -> list[str]:
    """Every line a log viewer shows: carriage returns (a bar's refresh) count as line breaks."""
    return [s for s in re.split(r"[\r\n]+", text) if s.strip()]


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", c)
    monkeypatch.delenv("GANFLOW_PROGRESS", raising=False)
    return c


def test_log_gets_a_line_every_tenth_with_eta_and_figure(clock):
    out = io.StringIO()
    bar = Progress(1000, "flow 1/2", stream=out)
    assert bar.mode == "lines"  # a StringIO is no terminal
    for i in range(1000):
        clock.t += 1.0  # 1 s a step: the 10 % rule (100 s) comes after the 30 s rule
        bar.set_postfix(elbo=f"{-i:.1f}")
        bar.update(1)
    bar.close()
    lines = _lines(out.getvalue())
    assert 30 <= len(lines) <= 35  # one every 30 s over 1,000 s, and the closing line
    assert lines[0].startswith("flow 1/2: 30/1000 (3 %), 30 s, ETA 970 s, elbo=")
    assert lines[-1] == "flow 1/2: 1000/1000 (100 %), 1000 s, done, elbo=-999.0"


def test_long_loop_announces_its_expected_time_once(clock):
    """``announce_after_s``: one line with the rate and the whole loop's expected time (4 steps/s, 2,000 steps:
    500 s = 8 min); none when quiet, none for a loop without a total."""
    out = io.StringIO()
    with Progress(2000, "train-prior", stream=out, unit="step", announce_after_s=10.0,
                  min_interval_s=1e9, max_interval_s=1e9) as bar:
        for _ in range(100):
            clock.t += 0.25
            bar.update(1)
    lines = [s for s in _lines(out.getvalue()) if "here" in s]
    assert lines == ["train-prior: 4 step/s here; 2000 steps take ~8 min (~8 min left)"]
    for kw in ({"enabled": False, "total": 2000}, {"total": None}):
        out = io.StringIO()
        total = kw.pop("total")
        with Progress(total, "x", stream=out, announce_after_s=1.0, **kw) as bar:
            for _ in range(10):
                clock.t += 1.0
                bar.update(1)
        assert "here" not in out.getvalue()


def test_fast_loop_writes_at_most_ten_lines_and_short_loop_none(clock):
    out = io.StringIO()
    with Progress(10_000, "train-prior", stream=out) as bar:
        for _ in range(10_000):
            clock.t += 0.01  # 100 s in all: the 10 % rule applies, 5 s apart at least
            bar.update(1)
    lines = _lines(out.getvalue())
    assert len(lines) == 10 and lines[4].startswith("train-prior: 5000/10000 (50 %)")
    short = io.StringIO()
    with Progress(100, "flow", stream=short) as bar:
        for _ in range(100):
            clock.t += 0.01  # 1 s: below the 5-s floor, nothing at all
            bar.update(1)
    assert short.getvalue() == ""


def test_terminal_bar_quiet_and_override(clock, monkeypatch):
    tty = _Tty()
    with Progress(50, "nuts chain 1/4", stream=tty) as bar:
        assert bar.mode == "bar"
        bar.update(50)
    assert "nuts chain 1/4" in tty.getvalue()  # tqdm drew its bar
    quiet = _Tty()
    with Progress(50, "flow", stream=quiet, enabled=False) as bar:
        for _ in range(50):
            clock.t += 100.0
            bar.update(1)
    assert quiet.getvalue() == ""
    monkeypatch.setenv("GANFLOW_PROGRESS", "lines")
    assert progress_mode(True, _Tty()) == "lines"
    monkeypatch.setenv("GANFLOW_PROGRESS", "off")
    assert progress_mode(True, io.StringIO()) == "off"


def test_nuts_reports_each_chain(monkeypatch):
    import ganflow.posterior.nuts as nuts
    from ganflow.posterior import LatentTarget
    from ganflow.problems.linear_gaussian import LinearGaussianProblem

    made = []

    class Recorder(Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mode": "off"})
            self.updates, self.postfixes = 0, []
            made.append(self)

        def update(self, n=1):
            self.updates += n

        def set_postfix(self, **figures):
            self.postfixes.append(figures)

    monkeypatch.setattr(nuts, "Progress", Recorder)
    p = LinearGaussianProblem(n=16, latent_dim=2)
    G, A = p.generator(), p.make_operator()
    target = LatentTarget(G, A, torch.zeros(A.obs_shape), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # so short a run may warn about R-hat
        fit = run_nuts(target, NutsSettings(num_chains=2, num_samples=12, warmup_steps=8, max_tree_depth=3),
                       torch.Generator().manual_seed(0))
    assert [r.desc for r in made] == ["nuts chain 1/2", "nuts chain 2/2"]
    for c, r in enumerate(made):
        assert r.total == 20 and r.updates == 20
        assert r.postfixes[0]["phase"] == "warm-up" and r.postfixes[7]["phase"] == "warm-up"
        last = r.postfixes[-1]
        assert last["phase"] == "sampling" and last["draws"] == 12
        assert last["divergences"] == int(fit.trace["diverging"][fit.trace["chain"] == c].sum())


def test_linear_gaussian_demo_log_is_short(tmp_path):
    # stderr to a pipe, as in `ganflow demo > log 2>&1`: fewer than 30 progress lines (issue 35)
    r = run_cli_subprocess("demo", "--problem", "linear_gaussian", "-o", tmp_path / "demo", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(_lines(r.stderr)) < 30, r.stderr[-2000:]
    assert "ganflow demo: linear-Gaussian" in r.stdout
