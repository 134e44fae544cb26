"""The lnfree-interp command line (lnfree_interp.cli), run as a user would: a subprocess."""

import os
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "lnfree_interp.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_help_everywhere():
    for cmd in ([], ["info"], ["verify"], ["dla"], ["patch"], ["eval"], ["demo"], ["list"]):
        res = run(*cmd, "--help")
        assert res.returncode == 0 and "usage: lnfree-interp" in res.stdout and "``" not in res.stdout


def test_usage_error_exit_code_2():
    res = run("dla", "tiny-shakespeare-lnfree")  # missing --prompt/--answer
    assert res.returncode == 2 and "required" in res.stderr


def test_info_and_list():
    res = run("info", "tiny-shakespeare-lnfree")
    assert res.returncode == 0 and "schaeff (LN-free)" in res.stdout and "n_layers=4" in res.stdout
    res = run("list")
    assert res.returncode == 0 and "schaeff/gpt2-small_LNFree300" in res.stdout


def test_verify_every_backend(ckpt_dirs):
    res = run("verify", str(ckpt_dirs["apollo"]), "--dtype", "float64")
    assert res.returncode == 0, res.stderr
    assert "all backends within tolerance" in res.stdout and res.stdout.count(" ok") >= 4


@pytest.mark.parametrize("args, message", [
    (["info", "/no/such/checkpoint"], "not a directory"),
    (["verify", "tiny-shakespeare"], "pass --baseline"),  # an LN checkpoint without opt-in: the CLI's flag
    (["dla", "tiny-shakespeare-lnfree", "--prompt", "ROMEO:", "--answer", " Romeo and Juliet"], "tokens"),
    (["dla", "tiny-shakespeare-lnfree", "--prompt", "ROMEO:", "--answer", "id:x"], "id:N"),
    (["dla", "tiny-shakespeare-lnfree", "--prompt", "ROMEO:", "--answer", " be", "--out", __file__],
     "existing file"),  # checked before computing
])
def test_errors_are_one_line_with_exit_code_1(args, message):
    res = run(*args)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lnfree-interp: error:") and message in lines[0]
    assert "Traceback" not in res.stderr
    debug = run("--debug", *args)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_dla_writes_table_and_figures(tmp_path):
    res = run("dla", "tiny-shakespeare-lnfree", "--prompt", "ROMEO:\nI will not", "--answer", " be",
              "--wrong", " go", "--out", str(tmp_path), "--html")
    assert res.returncode == 0, res.stderr
    assert "exact: LN-free" in res.stdout and "component" in res.stdout
    assert "std" not in res.stdout.splitlines()[1]  # one prompt: no std column (it would be all zeros)
    assert (tmp_path / "dla.png").stat().st_size > 1000 and (tmp_path / "dla.html").exists()
    from transformers import AutoTokenizer

    from lnfree_interp.checkpoints import EMBEDDED_DIR

    tok = AutoTokenizer.from_pretrained(EMBEDDED_DIR / "tiny-shakespeare-lnfree")
    be, go = (tok(t, add_special_tokens=False)["input_ids"][0] for t in (" be", " go"))
    by_id = run("dla", "tiny-shakespeare-lnfree", "--prompt", "ROMEO:\nI will not", "--answer", f"id:{be}",
                "--wrong", f"id:{go}")
    assert by_id.returncode == 0 and by_id.stdout.splitlines()[0].split(": ", 1)[1] == \
        res.stdout.splitlines()[0].split(": ", 1)[1]  # the same numbers as the strings
    typed = run("dla", "tiny-shakespeare-lnfree", "--prompt", "ROMEO:\\nI will not", "--answer", " be",
                "--wrong", " go")  # a backslash-n typed in a shell (docs' example) is a newline
    assert typed.returncode == 0 and typed.stdout.splitlines()[0] == res.stdout.splitlines()[0]
    base = run("dla", "tiny-shakespeare-vanilla", "--baseline", "--prompt", "ROMEO:\nI will not", "--answer", " be")
    assert base.returncode == 0 and "approximate" in base.stdout


def test_patch_and_eval(tmp_path):
    res = run("patch", "tiny-shakespeare-lnfree", "--clean", "When Romeo and Juliet went, Juliet gave it to",
              "--corrupted", "When Romeo and Juliet went, Henry gave it to", "--answer", " Romeo", "--wrong",
              " Juliet", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "attribution patching vs activation patching" in res.stdout
    assert (tmp_path / "atp_vs_activation_patching.png").exists()
    res = run("eval", "tiny-shakespeare-lnfree", "--max-tokens", "3000")
    assert res.returncode == 0 and "median" in res.stdout and "99.9%" in res.stdout


def test_demo_runs_and_renders_figures(tmp_path):
    """The demo as a new user runs it; its PNG figures are non-empty images of the expected size."""
    import matplotlib.image as mpimg

    res = run("demo", "--out", str(tmp_path / "demo"))
    assert res.returncode == 0, res.stderr[-2000:]
    import re

    assert re.search(r"\[(\d+)/\1\] Summary", res.stdout) and "LN-free" in res.stdout
    pngs = sorted((tmp_path / "demo").glob("*.png"))
    assert len(pngs) >= 6 and {"dla_tiny-shakespeare-lnfree.png", "dla_tiny-shakespeare-vanilla.png"} <= {
        p.name for p in pngs}
    for png in pngs:
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] >= 250 and img.shape[1] >= 350, (png.name, img.shape)
        assert img[..., :3].std() > 0.05  # not a blank canvas
    # one self-contained interactive page with all the figures: a single copy of plotly.js, opens offline
    assert [p.name for p in (tmp_path / "demo").glob("*.html")] == ["figures.html"]
    assert not list((tmp_path / "demo").glob("*.js"))
    page = (tmp_path / "demo" / "figures.html").read_text()
    assert page.count("<script src=") == 0 and page.count('class="plotly-graph-div"') >= 6
    assert page.count("* plotly.js v") == 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_dtypes(dtype):
    """--dtype takes every dtype of the library's one table (lnfree_interp.builders.hf.DTYPES)."""
    res = run("dla", "tiny-shakespeare-lnfree", "--dtype", dtype, "--prompt", "ROMEO:\nI will not", "--answer",
              " be", "--wrong", " go", "--top", "3")
    assert res.returncode == 0, res.stderr
    assert "components + bias" in res.stdout and "exact" in res.stdout


def test_dtype_choices_come_from_the_one_table():
    from lnfree_interp.builders.hf import DTYPES

    for command in ("verify", "dla", "patch", "eval", "compare"):
        res = run(command, "--help")
        assert res.returncode == 0 and all(name in res.stdout for name in DTYPES), command
    import lnfree_interp.cli as cli

    assert not hasattr(cli, "_dtype") and not hasattr(cli, "_Step") and not hasattr(cli, "_Timer")


def test_patch_prints_one_consistent_figure_set():
    res = run("patch", "tiny-shakespeare-lnfree", "--clean", "When Romeo and Juliet went, Juliet gave it to",
              "--corrupted", "When Romeo and Juliet went, Henry gave it to", "--answer", " Romeo", "--wrong",
              " Juliet")
    assert res.returncode == 0, res.stderr
    assert "NMAE" in res.stdout and "% (no CI from one prompt) = 100 * mean|a - b| / mean|b|" in res.stdout
    assert "full-restoration effect" in res.stdout
    assert "normalised_mae" not in res.stdout and "nmae=" not in res.stdout
