"""The atlas checkpoint: round trip, and refusals that name the problem."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from atlas_server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from atlas_server.cli import app
from atlas_server.model import Transformer, load_preset


@pytest.fixture
def ckpt(tmp_path, tiny_llama_checkpoint):
    return shutil.copytree(tiny_llama_checkpoint, tmp_path / "ckpt")


def test_round_trip_keeps_weights_config_and_tokenizer(tmp_path, byte_tokenizer):
    torch.manual_seed(3)
    model = Transformer(load_preset("llama-tiny", vocab_size=byte_tokenizer.vocab_size)).eval()
    save_checkpoint(tmp_path / "c", model, byte_tokenizer, {"step": 7})
    loaded = load_checkpoint(tmp_path / "c")
    ids = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), model(ids), rtol=0, atol=0)
    assert loaded.config == model.config
    assert loaded.tokenizer.encode("héllo") == byte_tokenizer.encode("héllo")
    assert loaded.provenance["step"] == 7


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_load_in_low_precision(tiny_checkpoint, dtype):
    model = load_checkpoint(tiny_checkpoint, dtype=dtype).model
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}


def _edit_config(ckpt, fn):
    path = ckpt / "config.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def test_newer_format_version_is_refused(ckpt):
    _edit_config(ckpt, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(ckpt)


def test_unknown_model_key_is_refused(ckpt):
    _edit_config(ckpt, lambda m: m["model"].update(n_experts=8))
    with pytest.raises(CheckpointError, match="n_experts"):
        load_checkpoint(ckpt)


def test_shape_mismatch_names_the_tensor(ckpt):
    _edit_config(ckpt, lambda m: m["model"].update(d_model=128))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(ckpt)


def test_missing_tensor_is_named(ckpt):
    weights = load_file(ckpt / "model.safetensors")
    del weights["blocks.1.mlp.w_out.weight"]
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.w_out\.weight"):
        load_checkpoint(ckpt)


def test_truncated_weights_are_refused(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(ckpt)


def _damage_one_weight(ckpt) -> None:
    """Flip one bit inside the tensor data: names, shapes and the header stay as they were."""
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_weights_file_changed_after_the_save_is_refused(ckpt):
    load_checkpoint(ckpt)
    _damage_one_weight(ckpt)
    with pytest.raises(CheckpointError, match="model.safetensors changed since the checkpoint"):
        load_checkpoint(ckpt)
    result = CliRunner().invoke(app, ["checkpoint", "inspect", str(ckpt)])
    assert result.exit_code == 1 and result.output.startswith("error:")
    assert "damaged or was replaced" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "weights", ["abc", {"sha256": 12}, {"sha256": "not-hex"}, {"sha256": "0" * 63}, ["x"]]
)
def test_a_malformed_weights_record_is_one_clear_error(ckpt, weights):
    _edit_config(ckpt, lambda m: m.update(weights=weights))
    with pytest.raises(CheckpointError, match='"weights" must be'):
        load_checkpoint(ckpt)
    result = CliRunner().invoke(app, ["checkpoint", "inspect", str(ckpt)])
    assert result.exit_code == 1 and result.output.startswith("error:")
    assert "Traceback" not in result.output


def test_a_version_2_checkpoint_loads_unchecked_and_migrates_to_a_recorded_hash(ckpt):
    _edit_config(ckpt, lambda m: (m.update(format_version=2), m.pop("weights")))
    _damage_one_weight(ckpt)  # nothing recorded to compare: a v2 checkpoint loads as it is
    load_checkpoint(ckpt)
    result = CliRunner().invoke(app, ["checkpoint", "migrate", str(ckpt)])
    assert result.exit_code == 0 and "v3" in result.output
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["weights"]["sha256"] == sha256_file(ckpt / "model.safetensors")
    load_checkpoint(ckpt)
    _damage_one_weight(ckpt)  # flips the bit back: another file again
    with pytest.raises(CheckpointError, match="changed since"):
        load_checkpoint(ckpt)


def test_migration_does_not_vouch_for_weights_that_do_not_fit_the_config(ckpt):
    _edit_config(ckpt, lambda m: (m.update(format_version=2), m.pop("weights")))
    weights = load_file(ckpt / "model.safetensors")
    del weights["blocks.0.attn.wo.weight"]
    save_file(weights, ckpt / "model.safetensors")
    before = (ckpt / "config.json").read_text()
    result = CliRunner().invoke(app, ["checkpoint", "migrate", str(ckpt)])
    assert result.exit_code == 1 and r"blocks.0.attn.wo.weight" in result.output
    assert (ckpt / "config.json").read_text() == before


def test_corrupt_tokenizer_is_refused(ckpt):
    (ckpt / "atlas_tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="atlas_tokenizer.json"):
        load_checkpoint(ckpt)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)


def test_failed_save_leaves_the_previous_checkpoint_whole(ckpt, byte_tokenizer, monkeypatch):
    before = (ckpt / "model.safetensors").read_bytes()
    model = Transformer(load_preset("llama-tiny", vocab_size=byte_tokenizer.vocab_size))

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", explode)  # fails as the new files are flushed
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ckpt, model, byte_tokenizer)
    assert (ckpt / "model.safetensors").read_bytes() == before
    assert [p.name for p in ckpt.parent.iterdir() if p.name.startswith(".")] == []
    load_checkpoint(ckpt)


def test_cli_init_then_inspect(tmp_path, byte_tokenizer):
    byte_tokenizer.save(tmp_path / "atlas_tokenizer.json")
    runner = CliRunner()
    out = tmp_path / "new"
    result = runner.invoke(
        app,
        [
            "checkpoint",
            "init",
            "--preset",
            "gpt2-tiny",
            "--tokenizer",
            str(tmp_path / "atlas_tokenizer.json"),
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out).config.vocab_size == byte_tokenizer.vocab_size
    result = runner.invoke(app, ["checkpoint", "inspect", str(out)])
    assert result.exit_code == 0 and "parameters:" in result.output
    # The sizes line up under the longest file name (QA: trainer_state.safetensors ran on).
    (out / "a_rather_long_file_name.safetensors").write_bytes(b"x" * 2**20)
    lines = runner.invoke(app, ["checkpoint", "inspect", str(out)]).output.splitlines()
    files = lines[lines.index("files:") + 1 :]
    assert len(files) >= 3 and len({line.index(" MiB") for line in files}) == 1, files
    bad = runner.invoke(
        app,
        [
            "checkpoint",
            "init",
            "--preset",
            "gpt9",
            "--tokenizer",
            str(tmp_path / "atlas_tokenizer.json"),
            "--output",
            str(tmp_path / "other"),
        ],
    )
    assert bad.exit_code == 1 and "no model preset 'gpt9'" in bad.output
    # A non-empty output is replaced only when asked (it was deleted silently), never an input.
    (out / "notes.txt").write_text("mine")
    init = ["checkpoint", "init", "--preset", "llama-tiny", "--tokenizer",
            str(tmp_path / "atlas_tokenizer.json"), "--output", str(out)]  # fmt: skip
    refused = runner.invoke(app, init)
    assert refused.exit_code == 1 and "is not empty; pass --overwrite" in refused.output
    assert (out / "notes.txt").read_text() == "mine" and load_checkpoint(
        out
    ).config.norm == "layernorm"
    assert runner.invoke(app, [*init, "--overwrite"]).exit_code == 0
    assert load_checkpoint(out).config.norm == "rmsnorm" and not (out / "notes.txt").exists()
    onto_itself = runner.invoke(app, ["checkpoint", "import-hf", str(out), str(out), "--overwrite"])
    assert onto_itself.exit_code == 1 and "is an input" in onto_itself.output
    assert load_checkpoint(out).config.norm == "rmsnorm"
    bad = runner.invoke(app, ["checkpoint", "inspect", str(tmp_path / "nowhere")])
    assert bad.exit_code == 1 and bad.output.startswith("error:")


def test_changed_tokenizer_is_refused_with_both_hashes(ckpt, byte_tokenizer):
    # A valid tokenizer file, but not the one the weights were saved with.
    data = json.loads((ckpt / "atlas_tokenizer.json").read_text())
    data["name"] = "edited"
    (ckpt / "atlas_tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="changed since the checkpoint was saved"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_llama_checkpoint"])
def test_loaded_model_prepared_for_inference_decodes_like_the_full_forward(fixture, request):
    loaded = load_checkpoint(request.getfixturevalue(fixture))
    model = loaded.model
    ids = torch.randint(
        0, loaded.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        full = model(ids)
        model.prepare_for_inference()
        # The tied head is read from a fast copy: oneDNN-packed, or contiguous [C, V].
        assert model._packed_head is not None or model.output_weight().is_contiguous()
        cache = model.new_cache(n_slots=1, max_len=16)
        prefill = model(ids[:, :6], torch.arange(6)[None], cache, torch.tensor([0]))
        steps = [
            model(ids[:, t : t + 1], torch.tensor([[t]]), cache, torch.tensor([0]))
            for t in range(6, 10)
        ]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "command", ["inspect", "init", "migrate", "import-hf", "export-hf", "export-gguf"]
)
def test_every_checkpoint_command_has_help_with_an_example(command):
    result = CliRunner().invoke(app, ["checkpoint", command, "--help"])
    assert result.exit_code == 0 and f"atlas checkpoint {command}" in result.output


def test_cli_inspect_of_a_changed_tokenizer_is_one_error_line(ckpt):
    tok = ckpt / "atlas_tokenizer.json"
    tok.write_text(tok.read_text() + "\n")
    result = CliRunner().invoke(app, ["checkpoint", "inspect", str(ckpt)])
    assert result.exit_code == 1
    assert result.output.startswith("error:") and "changed since" in result.output
    assert "Traceback" not in result.output


# --- layout version 2 (atlas_tokenizer.json) and the migration from version 1 -------------


def _write_v1_layout(ckpt, drop_file_key=False):
    """Rewrite a checkpoint exactly as format version 1 stored it: the Atlas tokenizer under
    the name tokenizer.json, config.json at version 1 naming that file."""
    (ckpt / "atlas_tokenizer.json").rename(ckpt / "tokenizer.json")
    meta = json.loads((ckpt / "config.json").read_text())
    meta["format_version"] = 1
    meta["tokenizer"]["file"] = "tokenizer.json"
    del meta["weights"]  # recorded since version 3
    if drop_file_key:  # hand-made v1 configs may leave the name to the default
        del meta["tokenizer"]["file"]
    (ckpt / "config.json").write_text(json.dumps(meta, indent=2))


def test_saved_checkpoint_has_no_file_named_tokenizer_json(tmp_path, byte_tokenizer):
    model = Transformer(load_preset("gpt2-tiny", vocab_size=byte_tokenizer.vocab_size))
    path = save_checkpoint(tmp_path / "c", model, byte_tokenizer)
    names = {p.name for p in path.iterdir()}
    assert "tokenizer.json" not in names and "atlas_tokenizer.json" in names
    meta = json.loads((path / "config.json").read_text())
    assert meta["format_version"] == 3 and meta["tokenizer"]["file"] == "atlas_tokenizer.json"


@pytest.mark.parametrize("drop_file_key", [False, True])
def test_version_1_checkpoint_loads_and_migrates(ckpt, drop_file_key):
    ids = torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = load_checkpoint(ckpt).model(ids)
    _write_v1_layout(ckpt, drop_file_key)
    old = load_checkpoint(ckpt)  # read as it is, nothing written
    assert (ckpt / "tokenizer.json").is_file() and not (ckpt / "atlas_tokenizer.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(old.model(ids), before, rtol=0, atol=0)

    runner = CliRunner()
    result = runner.invoke(app, ["checkpoint", "migrate", str(ckpt)])
    assert result.exit_code == 0 and "migrated" in result.output and "v3" in result.output
    assert not (ckpt / "tokenizer.json").exists()
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["format_version"] == 3 and meta["tokenizer"]["file"] == "atlas_tokenizer.json"
    assert meta["weights"]["sha256"] == sha256_file(ckpt / "model.safetensors")
    new = load_checkpoint(ckpt)  # the recorded sha256 still matches the renamed file
    assert new.tokenizer.encode("héllo") == old.tokenizer.encode("héllo")
    with torch.no_grad():
        torch.testing.assert_close(new.model(ids), before, rtol=0, atol=0)
    again = runner.invoke(app, ["checkpoint", "migrate", str(ckpt)])
    assert again.exit_code == 0 and "already current" in again.output


def test_migration_refuses_a_changed_tokenizer_and_changes_nothing(ckpt):
    _write_v1_layout(ckpt)
    (ckpt / "tokenizer.json").write_text((ckpt / "tokenizer.json").read_text() + " ")
    config_before = (ckpt / "config.json").read_text()
    result = CliRunner().invoke(app, ["checkpoint", "migrate", str(ckpt)])
    assert result.exit_code == 1 and "changed since" in result.output
    assert (ckpt / "config.json").read_text() == config_before
    assert not (ckpt / "atlas_tokenizer.json").exists()


def test_tokenizer_from_a_checkpoint_folder_reads_either_layout(ckpt, byte_tokenizer):
    from atlas_server.tokenizer import Tokenizer

    assert Tokenizer.from_file(ckpt).encode("abc") == byte_tokenizer.encode("abc")
    _write_v1_layout(ckpt)
    assert Tokenizer.from_file(ckpt).encode("abc") == byte_tokenizer.encode("abc")


def test_chat_template_is_saved_loaded_and_shown(tmp_path, byte_tokenizer):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    model = Transformer(load_preset("gpt2-tiny", vocab_size=byte_tokenizer.vocab_size))
    path = save_checkpoint(tmp_path / "c", model, byte_tokenizer, chat_template=template)
    assert (path / "chat_template.jinja").read_text() == template
    assert load_checkpoint(path).chat_template == template
    info = json.loads(
        CliRunner().invoke(app, ["checkpoint", "inspect", str(path), "--json"]).output
    )
    assert info["chat_template"] == "chat_template.jinja"
    plain = save_checkpoint(tmp_path / "d", model, byte_tokenizer)
    assert load_checkpoint(plain).chat_template is None


def test_a_chat_template_that_is_not_utf8_is_a_checkpoint_error(ckpt):
    (ckpt / "chat_template.jinja").write_bytes(b"{{ messages }}\xff\xfe")
    with pytest.raises(CheckpointError, match="chat_template.jinja is not UTF-8 text"):
        load_checkpoint(ckpt)


def test_init_never_replaces_a_file_with_a_checkpoint(tmp_path, byte_tokenizer):
    """Found by an audit: `--output notes.txt` turned the file into a checkpoint folder and
    left the file as a hidden `.notes.txt.old-PID` nobody was told about."""
    byte_tokenizer.save(tmp_path / "atlas_tokenizer.json")
    notes = tmp_path / "notes.txt"
    notes.write_text("precious notes")
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(app, ["checkpoint", "init", "--preset", "gpt2-tiny",
                                          "--tokenizer", str(tmp_path / "atlas_tokenizer.json"),
                                          "--output", str(notes), *extra])  # fmt: skip
        assert result.exit_code == 1 and "exists and is not a folder" in result.output
    assert notes.read_text() == "precious notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas_tokenizer.json", "notes.txt"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("tokenizer", None), ("provenance", "x"), ("provenance", None), ("model", None),
     ("model", "abc"), ("format_version", "3")],
)  # fmt: skip
def test_a_config_field_of_the_wrong_json_type_is_one_error_line(ckpt, key, value):
    """Found by an audit: `"tokenizer": null` or `"provenance": "x"` gave AttributeError
    tracebacks from inspect and export-hf."""
    path = ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    for command in (["inspect", str(ckpt)], ["export-hf", str(ckpt), str(ckpt.parent / "hf")]):
        result = CliRunner().invoke(app, ["checkpoint", *command])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("error: ") and len(result.output.splitlines()) == 1
        assert f'"{key}"' in result.output or "format version" in result.output


def test_migrate_of_a_current_checkpoint_checks_its_files(ckpt):
    """Found by an audit: `migrate` said "already current" of truncated weights."""
    assert CliRunner().invoke(app, ["checkpoint", "migrate", str(ckpt)]).exit_code == 0
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    result = CliRunner().invoke(app, ["checkpoint", "migrate", str(ckpt)])
    assert result.exit_code == 1 and "changed since the checkpoint was saved" in result.output
