"""The Colab demo notebook runs top to bottom on CPU and shows its images.

The notebook is executed for real with nbclient in a fresh kernel; only its parameter cell is
overridden (a tiny step count), the way CI and papermill-style runners do it.
"""

from __future__ import annotations

from pathlib import Path


try:
    import nbclient
    import nbformat
except ImportError as error:  # a missing test extra must fail, not skip
    raise ImportError(f"{error}: install the test extras (pip install -e '.[test]' brings nbclient and ipykernel)")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_tpu_demo.ipynb"


def test_notebook_is_valid_and_has_one_parameter_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("REPO_URL", "TRAIN_STEPS", "TIMING_STEPS", "SAMPLE_STEPS", "GUIDANCE", "WORKDIR", "COMPILATION_CACHE"):
        assert f"\n{name} = " in "\n" + tagged[0].source
    # Shipped without outputs: what a reader sees comes from their own run.
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_notebook_runs_on_cpu_and_shows_images(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    overrides = nbformat.v4.new_code_cell(
        "\n".join([
            "TRAIN_STEPS = 10",
            "TIMING_STEPS = 4",
            "SAMPLE_STEPS = 4",
            "QUALITY_REPORT = False",
            f"WORKDIR = {str(tmp_path / 'run')!r}",
            f"COMPILATION_CACHE = {str(tmp_path / 'jax_cache')!r}",
        ])
    )
    nb.cells.insert(index + 1, overrides)
    # The kernel inherits this environment: CPU only, whatever the machine has.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3, "expected the training grid and the grids without and with guidance"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "1 cpu device(s)" in text
    assert "guidance 1.0" in text and "guidance 2.0" in text
    assert text.count("ms/step") == 2 and "routed step time" in text
    assert (tmp_path / "run" / "samples" / "step_0000010.png").is_file()
