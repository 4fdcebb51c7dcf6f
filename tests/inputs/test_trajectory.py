"""Trajectory discovery on real Trainer output_dirs and on folders of step-named files, and every error."""

import json
import shutil

import pytest

from geomaudit.errors import InputError, UsageError
from geomaudit.io.trajectory import discover, expand_runs


def _state_losses(checkpoint) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def _touch(folder, *names):
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}" if name.endswith("config.json") else "")


def test_trainer_output_dir(trainer_runs):
    for run in trainer_runs.values():
        traj = discover(run)
        assert traj.root == run
        assert [c.step for c in traj.checkpoints] == [2, 4, 6]
        assert [c.path for c in traj.checkpoints] == [run / f"checkpoint-{s}" for s in (2, 4, 6)]
        assert traj.describe() == {"root": str(run), "steps": [2, 4, 6], "loss_log": str(run / "trainer_state.json")}
        for c in traj.checkpoints:
            assert c.logged_loss == _state_losses(c.path)[c.step]
            assert (c.path / "tokenizer.json").is_file() and (c.path / "model.safetensors").is_file()


def test_adam_ends_below_sgd(trainer_runs):
    for seed in (0, 1):
        adam, sgd = (discover(trainer_runs[f"{opt}-{seed}"]).checkpoints for opt in ("adam", "sgd"))
        assert adam[0].logged_loss > adam[-1].logged_loss
        assert sgd[0].logged_loss > sgd[-1].logged_loss
        assert adam[-1].logged_loss < sgd[-1].logged_loss


def test_losses_from_latest_checkpoint_without_root_state(trainer_runs, tmp_path):
    run = shutil.copytree(trainer_runs["sgd-0"], tmp_path / "run")
    (run / "trainer_state.json").unlink()
    traj = discover(run)
    assert traj.loss_log == run / "checkpoint-6" / "trainer_state.json"
    assert [c.logged_loss for c in traj.checkpoints] == [_state_losses(run / "checkpoint-6")[s] for s in (2, 4, 6)]


def test_final_model_at_root_keeps_the_checkpoints(trainer_runs, tmp_path):
    """``trainer.save_model()`` writes config.json into the output_dir; the run is still its checkpoints."""
    run = shutil.copytree(trainer_runs["adam-0"], tmp_path / "run")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run / "checkpoint-6" / name, run / name)
    assert [c.step for c in discover(run).checkpoints] == [2, 4, 6]


def test_lone_checkpoint_directory(trainer_runs):
    checkpoint = trainer_runs["adam-1"] / "checkpoint-4"
    traj = discover(checkpoint)
    assert traj.root == checkpoint
    assert len(traj.checkpoints) == 1
    (ref,) = traj.checkpoints
    assert (ref.path, ref.step, ref.logged_loss) == (checkpoint, 4, _state_losses(checkpoint)[4])


def test_lone_file_without_step(tmp_path):
    _touch(tmp_path, "model.safetensors")
    traj = discover(tmp_path / "model.safetensors")
    assert traj.describe() == {"root": str(tmp_path / "model.safetensors"), "steps": [None], "loss_log": None}
    assert traj.checkpoints[0].logged_loss is None


def test_folder_of_step_named_files(tmp_path):
    _touch(tmp_path, "step_10.safetensors", "step_2.safetensors", "epoch3-step1200.ckpt", "notes.txt",
           "README.md", "optimizer.pt", "export_7/config.json", "logs_2024/events.out", "runs/x/events.out")
    traj = discover(tmp_path)
    assert [c.step for c in traj.checkpoints] == [2, 7, 10, 1200]
    assert [c.path.name for c in traj.checkpoints] == ["step_2.safetensors", "export_7", "step_10.safetensors",
                                                       "epoch3-step1200.ckpt"]
    assert traj.loss_log is None and all(c.logged_loss is None for c in traj.checkpoints)


@pytest.mark.parametrize(("steps", "every", "kept"), [([6, 2], None, [2, 6]), (None, 4, [4]), (None, 2, [2, 4, 6]),
                                                      (None, 1, [2, 4, 6])])
def test_step_selection(trainer_runs, steps, every, kept):
    traj = discover(trainer_runs["adam-0"], steps=steps, every=every)
    assert [c.step for c in traj.checkpoints] == kept
    assert all(c.logged_loss is not None for c in traj.checkpoints)


@pytest.mark.parametrize(("steps", "every", "phrase"), [
    ([2, 3], None, "step 3 is not in the trajectory; available steps: 2, 4, 6"),
    (None, 0, "--every must be at least 1"),
    (None, 5, "keeps no checkpoint; available steps: 2, 4, 6"),
    ([], None, "keeps no checkpoint"),
    ([2], 2, "not both"),
])
def test_selection_errors(trainer_runs, steps, every, phrase):
    with pytest.raises(UsageError, match=phrase):
        discover(trainer_runs["adam-0"], steps=steps, every=every)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover(tmp_path / "nowhere")


def test_folder_without_checkpoints(tmp_path):
    _touch(tmp_path, "notes.txt", "trainer_state.json", "runs/x/events.out")
    with pytest.raises(InputError, match="holds no checkpoints: expected checkpoint-<step>/ directories"):
        discover(tmp_path)


def test_duplicate_steps(tmp_path):
    _touch(tmp_path, "step_2.pt", "model-2.safetensors")
    with pytest.raises(InputError, match="model-2.safetensors and .*step_2.pt both hold step 2"):
        discover(tmp_path)


@pytest.mark.parametrize("text", ["{oops", "[1, 2]", '{"log_history": 3}', '{"log_history": {"loss": 1}}',
                                  '{"log_history": [{"step": "x", "loss": 1}]}', '{"log_history": [3]}',
                                  '{"log_history": [{"step": 1.5, "loss": 1}]}',
                                  '{"log_history": [{"step": 1e999, "loss": 1}]}',
                                  '{"log_history": [{"step": 1, "loss": "abc"}]}',
                                  '{"log_history": [{"step": 1, "loss": true}]}', "[" * 100_000])
def test_corrupt_trainer_state(tmp_path, text):
    _touch(tmp_path, "checkpoint-1/config.json")
    (tmp_path / "trainer_state.json").write_text(text)
    with pytest.raises(InputError, match="trainer_state.json is not (a )?valid"):
        discover(tmp_path)


def test_a_diverged_step_is_refused_before_the_audit_only_where_picked(tmp_path):
    """The Trainer logs NaN for a diverged step; a report cannot hold it, so a picked step with one is refused."""
    _touch(tmp_path, "checkpoint-1/config.json", "checkpoint-2/config.json")
    (tmp_path / "trainer_state.json").write_text(
        '{"log_history": [{"step": 1, "loss": 2.5}, {"step": 2, "loss": NaN}]}')
    assert [r.logged_loss for r in discover(tmp_path, steps=[1]).checkpoints] == [2.5]
    with pytest.raises(InputError, match="logs a training loss of nan at step 2: the run diverged"):
        discover(tmp_path)


def test_a_device_or_a_link_to_one_is_not_a_checkpoint(tmp_path):
    """A run folder entry named like a checkpoint that points at /dev/zero is skipped, never read (it would hang)."""
    _touch(tmp_path, "step_1.pt")
    (tmp_path / "step_2.pt").symlink_to("/dev/zero")
    assert [r.step for r in discover(tmp_path).checkpoints] == [1]
    with pytest.raises(InputError, match="neither a regular file nor a folder"):
        discover("/dev/zero")


def test_expand_runs_order(trainer_runs):
    parent = trainer_runs["adam-0"].parent
    runs = expand_runs([str(parent / "sgd-*"), str(trainer_runs["adam-1"]), str(parent / "adam-*")])
    assert runs == [trainer_runs[k] for k in ("sgd-0", "sgd-1", "adam-1", "adam-0")]


def test_expand_runs_glob_matching_nothing(trainer_runs):
    pattern = str(trainer_runs["adam-0"].parent / "lion-*")
    with pytest.raises(InputError, match=r"run .*lion-\* matches no file or directory"):
        expand_runs([str(trainer_runs["adam-0"]), pattern])
