"""bench/samplers_bench.py end to end on a tiny checkpoint: both parts run, the JSON and markdown are written with
the command, machine and date, ours and diffusers' ODE errors agree, and the checkpoint part's figures are
consistent (the reference is at distance 0 from itself, DPM-Solver++ 1 at DDIM's distance)."""
import datetime
import importlib.util
import json
import os
import sys

import pytest
from helpers import ROOT, tiny_checkpoint

sys.path.insert(0, os.path.join(ROOT, "bench"))
import samplers_bench  # noqa: E402

# diffusers 0.42 calls np.array(tensor, copy=False) in set_timesteps, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def test_both_parts_on_a_tiny_checkpoint(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "last.pt")  # T = 20
    samplers_bench.main(["--ckpt", ckpt, "--steps", "4,5", "--ode-n", "16", "--ckpt-steps", "2,4", "--n", "3",
                         "--out", str(tmp_path / "out")])
    stem = tmp_path / "out" / f"samplers-{datetime.date.today().isoformat()}"
    record = json.loads(stem.with_suffix(".json").read_text())
    assert record["machine"] and record["date"] and "--ckpt-steps 2,4" in record["command"]
    rows = {(r["impl"], r["sampler"], r["spacing"]): r["error"] for r in record["ode"]["rows"]}
    assert len([k for k in rows if k[0] == "ours"]) == 12  # DDIM and DPM-Solver++ 1-3, three spacings
    assert all(set(e) == {"4", "5"} and all(v > 0 for v in e.values()) for k, e in rows.items() if k[0] == "ours")
    if importlib.util.find_spec("diffusers"):  # (DDIMScheduler under trailing is our DDIM when steps divide T)
        for key in [("DPM-Solver++ 2M", "linspace"), ("DPM-Solver++ 3M", "trailing"), ("DDIM", "trailing")]:
            ours, theirs = rows[("ours", *key)], rows[("diffusers", *key)]
            assert ours == pytest.approx(theirs, rel=1e-3), key
    ckpt_rows = {(r["sampler"], r["spacing"], r["steps"]): r for r in record["ckpt"]["rows"]}
    assert ckpt_rows[("DDIM", "linspace", 20)]["distance"] == 0.0
    for steps in (2, 4):
        ddim, dpm1 = ckpt_rows[("DDIM", "linspace", steps)], ckpt_rows[("DPM-Solver++ 1", "linspace", steps)]
        assert dpm1["distance"] == pytest.approx(ddim["distance"], rel=1e-3) and ddim["distance"] > 0
        assert all(r["img_per_s"] > 0 for r in ckpt_rows.values())
    text = stem.with_suffix(".md").read_text()
    assert record["command"] in text and "| DPM-Solver++ 3M | logsnr | 4 |" in text


@pytest.mark.parametrize("argv, needle", [(["--parts", "ckpt"], "--ckpt"), (["--steps", "5,ten"], "--steps"),
                                          (["--parts", "ode,speed"], "unknown part")])
def test_bad_arguments(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        samplers_bench.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
