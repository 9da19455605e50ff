"""Smoke test of the README's first command (experiments.quickstart), shortened."""

import pytest

from experiments import quickstart


@pytest.mark.slow
def test_quickstart_trains_and_truncates(capsys):
    result = quickstart.main(["--steps", "400"])
    assert result["trained"]["validation"] >= 0.9
    rows = {(row["kept"], row["method"]): row for row in result["rows"]}
    assert len(rows) == 12
    # LSVT at 50% keeps 32 of 64 and 128 of 256 singular values; the head is left whole.
    lsvt = rows[(0.5, "LSVT")]
    assert lsvt["ranks"] == {"Dense_0/kernel": 32, "Dense_1/kernel": 128}
    assert lsvt["retained"] == 0.5
    # Half the singular values by global ranking keep a trained MLP's accuracy.
    assert rows[(0.5, "GSVT")]["validation"] >= result["trained"]["validation"] - 0.05
    assert "GSVT at 10% kept" in capsys.readouterr().out
    # The report counts the MLP by hand: 64*256 + 256 + 256*256 + 256 + 256*10 + 10 = 85,002.
    assert result["report"].params_before == 85_002
