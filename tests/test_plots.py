"""The fields figure's title (ganflow.plots): it names the next step when PSIS k-hat says the flow is unreliable."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt

from ganflow.plots import KHAT_NEXT_STEP, _suptitle


def _result(khat: float):
    return SimpleNamespace(method="flow", metrics={"rel_l2_error": 0.1}, attrs={"psis_khat": khat, "is_ess_ratio": 0.2})


def test_unreliable_flow_title_names_the_next_step():
    title = _suptitle(_result(1.13))
    assert "k-hat 1.13 (UNRELIABLE)" in title
    last = title.splitlines()[-1]
    assert last == KHAT_NEXT_STEP
    for step in ("refine", "--method nuts", "predict --reweight"):
        assert step in last
    assert len(last) <= 90  # a few words: fits under a figure title


def test_reliable_flow_title_stays_short():
    for khat in (0.3, 0.7, float("nan")):
        title = _suptitle(_result(khat))
        assert "UNRELIABLE" not in title and KHAT_NEXT_STEP not in title


def test_next_step_fits_a_three_panel_fields_figure():
    fig, _ = plt.subplots(1, 3, figsize=(3.2 * 3, 3.2))  # the smallest fields.png: mean, std, one more panel
    text = fig.suptitle(KHAT_NEXT_STEP, fontsize=10)
    fig.canvas.draw()
    width = text.get_window_extent(fig.canvas.get_renderer()).width
    plt.close(fig)
    assert width < fig.get_figwidth() * fig.dpi
