"""scripts/download.py: no network here, so the test checks that being offline is a clear one-line error."""

import os
import subprocess
import sys

from conftest import ROOT


def test_offline_download_is_a_one_line_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [
        sys.executable,
        "scripts/download.py",
        "--repo_id",
        "meta-llama/Llama-2-7b-chat-hf",
        "--out_root",
        str(tmp_path),
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.startswith("error: cannot reach the Hugging Face Hub") and p.stderr.count("\n") == 1
