"""Coders: linear exactness, lasso quality/sparsity, the lasso cache."""

import pytest
import torch
from torch import nn

from sdatom.atoms import AtomConfig, add_atoms, fit_report
from sdatom.atoms import decompose as dec


def _rows(n=512, kk=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, kk, generator=gen) * 0.05


def test_linear_atoms_are_orthonormal_and_exact_at_m_equal_k2():
    rows = _rows()
    atoms = dec.linear_atoms(rows, 9)
    torch.testing.assert_close(atoms @ atoms.T, torch.eye(9), atol=1e-5, rtol=0)
    coef = rows @ dec.projector(atoms)
    assert dec.fit_stats(rows, atoms, coef)["rel_error"] < 1e-5
    # deterministic (sign-fixed) across calls
    assert torch.equal(atoms, dec.linear_atoms(rows.clone(), 9))
    # m > k²: cyclic unit atoms, still exact
    over = dec.linear_atoms(rows, 12)
    assert dec.fit_stats(rows, over, rows @ dec.projector(over))["rel_error"] < 1e-5


def test_lasso_reports_error_and_sparsity():
    rows = _rows(2048)
    atoms, coef = dec._solve_lasso(rows, 9, lam=1e-3, dict_iters=5, iters=100, seed=0)
    torch.testing.assert_close(atoms.norm(dim=1), torch.ones(9), atol=1e-5, rtol=0)
    stats = dec.fit_stats(rows, atoms, coef)
    assert 0 < stats["rel_error"] < 0.2
    assert 0 < stats["sparsity"] < 1
    # a bigger λ gives sparser codes and a larger error
    _, coef_big = dec._solve_lasso(rows, 9, lam=2e-2, dict_iters=0, iters=100, seed=0)
    big = dec.fit_stats(rows, atoms, coef_big)
    assert big["sparsity"] > stats["sparsity"]


def test_fit_report_on_a_model(tmp_path):
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1))
    add_atoms(net, AtomConfig(coder="lasso", dict_iters=2), cache_dir=tmp_path)
    report = fit_report(net)
    assert set(report) == {"0", "1"}
    assert all(set(r) == {"rel_error", "sparsity"} for r in report.values())
    assert report["0"]["rel_error"] < 0.5


def test_lasso_cache_hit_skips_the_solve(tmp_path, monkeypatch):
    calls = []
    real = dec._solve_lasso

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dec, "_solve_lasso", counting)
    rows = _rows(300)
    kwargs = {"lam": 1e-3, "dict_iters": 1, "iters": 10, "seed": 0, "cache_dir": tmp_path}
    first = dec.lasso_decompose(rows, 9, **kwargs)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    second = dec.lasso_decompose(rows.clone(), 9, **kwargs)
    assert len(calls) == 1
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # other settings or other weights: a new solve
    dec.lasso_decompose(rows, 9, **{**kwargs, "lam": 2e-3})
    dec.lasso_decompose(rows + 1e-3, 9, **kwargs)
    assert len(calls) == 3


def test_lasso_cache_defaults_to_xdg_and_survives_a_corrupt_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("SDATOM_CACHE", str(tmp_path / "mine"))
    assert dec.default_cache_dir() == tmp_path / "mine" / "lasso"
    monkeypatch.delenv("SDATOM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dec.default_cache_dir() == tmp_path / "sdatom" / "lasso"
    rows = _rows(100)
    kwargs = {"lam": 1e-3, "dict_iters": 0, "iters": 5, "seed": 0}
    atoms, _ = dec.lasso_decompose(rows, 9, **kwargs)
    (entry,) = (tmp_path / "sdatom" / "lasso").glob("*.safetensors")
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable lasso cache"):
        again, _ = dec.lasso_decompose(rows, 9, **kwargs)
    assert torch.equal(atoms, again)
