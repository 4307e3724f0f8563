"""Multi-host on one machine: two processes with 4 CPU devices each (jax.distributed over
127.0.0.1) train like one device, and their checkpoint restores into a one-process run.
"""

from __future__ import annotations

import subprocess

import jax
import numpy as np

import trainer_testlib as tl
from tread_jax import train

tl.enable_compilation_cache()
STEPS = 6


def test_two_processes_match_one_device_and_resume_in_one_process(tmp_path, caplog):
    data_dir = str(tmp_path / "tfds")
    single = tl.tiny_config(data_dir, num_train_steps=STEPS, checkpoint_every=3)
    train.train_and_evaluate(single, str(tmp_path / "one"))

    config = tl.tiny_config(
        data_dir, num_train_steps=STEPS, checkpoint_every=3, **{"mesh.data": 4, "mesh.fsdp": 2}
    )
    config_file = tl.write_config(config, tmp_path / "two.py")
    workdir = str(tmp_path / "two")
    port = tl.free_port()
    env = tl.subprocess_env()
    env["JAX_NUM_CPU_DEVICES"] = "4"
    procs = [
        subprocess.Popen(
            tl.main_command(config_file, workdir, f"--coordinator_address=127.0.0.1:{port}",
                            "--num_processes=2", f"--process_id={i}"),
            cwd=tl.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    assert "2 process(es), 8 cpu device(s), mesh {'data': 4, 'fsdp': 2}" in outputs[0][0]
    # Only process 0 prints progress (gloo itself announces its connections on every process,
    # from several threads, so its lines may interleave).
    assert "process(es)" not in outputs[1][0] and "step 1/" not in outputs[1][0]
    assert "step 1/" in outputs[0][0]

    one, two = tl.logged(str(tmp_path / "one")), tl.logged(workdir)
    assert sorted(two) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
    # Each process saved its own data iterator position next to the shared state.
    data_files = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / str(STEPS) / "data").glob("process_*"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        tl.load_state(workdir, STEPS)["params"], tl.load_state(str(tmp_path / "one"), STEPS)["params"],
    )

    # The two-process checkpoint (8 devices, FSDP) restores into this one-device process.
    single.num_train_steps = STEPS + 2
    with caplog.at_level("WARNING"):
        result = train.train_and_evaluate(single, workdir)
    assert result["step"] == STEPS + 2
    assert any("different number of processes" in r.getMessage() for r in caplog.records)
    assert sorted(tl.logged(workdir)) == list(range(1, STEPS + 3))
