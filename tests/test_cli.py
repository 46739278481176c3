import subprocess
import sys

from checkpoints import diffusers_folder, original_file, original_state_dict
from sdlearn.cli import info, main
from sdlearn.configs import ModelConfig

TINY = ModelConfig.tiny()


def _row(text: str, name: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.startswith(name))


def test_info_counts_each_component(capsys):
    assert main(["info", str(original_file(TINY))]) == 0
    out = capsys.readouterr().out
    assert "original CompVis single file" in out
    sd = original_state_dict(TINY)
    for comp, prefix in [("unet", "model.diffusion_model."), ("vae", "first_stage_model."),
                         ("text_encoder", "cond_stage_model.transformer.")]:
        keys = [k for k in sd if k.startswith(prefix) and not k.endswith("position_ids")]
        row = _row(out, comp)
        assert int(row[1]) == len(keys)
        assert float(row[2]) == round(sum(sd[k].numel() for k in keys) / 1e6, 1)
        assert row[3] == "F32"
    assert "alphas_cumprod" in out


def test_info_on_a_diffusers_folder(capsys):
    assert main(["info", str(diffusers_folder(TINY))]) == 0
    assert "diffusers folder" in capsys.readouterr().out


def test_info_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlearn: error: junk.safetensors") and "\n" not in err


def test_python_dash_m_sdlearn_runs():
    out = subprocess.run([sys.executable, "-m", "sdlearn", "info", str(original_file(TINY))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == info(str(original_file(TINY))).strip()
