"""Executes colab/01_reproduce_paper.ipynb (reduced setting); fails if any cell fails."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "01_reproduce_paper.ipynb"


def test_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("CPO_JAX_NOTEBOOK_OUT", str(tmp_path / "out"))
  monkeypatch.delenv("CPO_JAX_NOTEBOOK_FULL", raising=False)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # The kernel imports cpo_jax from this checkout (no pip install in tests).
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()                       # raises CellExecutionError on any failing cell
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 6                # the six figures are shown inline
  for stem in ("fig1_equivalence", "fig2_frac_in_U", "fig3_zombie", "fig4_prop51",
               "fig5_gamma", "fig6_audit"):
    assert (tmp_path / "out" / f"{stem}.png").stat().st_size > 0
  assert (tmp_path / "out" / "summary.json").exists()


def test_notebook_holds_no_training_logic():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  for forbidden in ("optax", "jax.grad", "value_and_grad", "softplus"):
    assert forbidden not in source, forbidden


if __name__ == "__main__":
  pytest.main([__file__, "-q"])
