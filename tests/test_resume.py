"""Resuming a run: N updates, a saved training state, then the rest equals the run that never
stopped, bit for bit, through the file; states that do not fit are refused by name."""

import dataclasses

import pytest
import torch

import sparse_core as sc


def stochastic_problem(seed=0):
    """Two layers fit noisy targets drawn from the problem's own generator (like a front end's
    batches and noise); ``loss.generator`` is that generator."""
    torch.manual_seed(seed)
    atoms = sc.build_atoms({"w": torch.randn(16, 12), "v": torch.randn(10, 8)}, 8, "svd")
    targets = {key: 0.3 * atoms[key].atoms[:3].T @ atoms[key].readouts[:3] for key in atoms}
    generator = torch.Generator().manual_seed(seed + 1)

    def loss(step):
        return sum((atoms.delta(key) - target - 0.05 * torch.randn(target.shape, generator=generator))
                   .pow(2).sum() for key, target in targets.items())

    loss.generator = generator
    return atoms, loss


def run(steps, resume=None, state_every=0, **fields):
    """Train the problem (from ``resume`` when given); returns (atoms, result, {step: state})."""
    atoms, loss = stochastic_problem()
    if resume is not None:
        atoms.layers = resume.atoms.clone().layers
        loss.generator.set_state(resume.extra["generator"])
    states = {}

    def keep(state):
        state.extra["generator"] = loss.generator.get_state()
        states[state.step] = state

    result = sc.train_atoms(atoms, loss, steps=steps, lr=0.05, resume=resume, state_every=state_every,
                            on_state=keep if state_every else None, **fields)
    return atoms, result, states


def assert_same_run(atoms, result, expected_atoms, expected):
    for key in expected_atoms:
        for name in ("coefficients", "atoms", "readouts"):
            assert torch.equal(getattr(atoms[key], name), getattr(expected_atoms[key], name)), (key, name)
    assert result.losses == expected.losses and result.learning_rates == expected.learning_rates
    assert result.parts == expected.parts and result.final_loss == expected.final_loss


def test_n_steps_then_resume_for_m_more_equals_n_plus_m_steps(tmp_path):
    _, _, states = run(12, state_every=12)
    sc.save_training_state(states[12], tmp_path / "state.safetensors")
    state = sc.load_training_state(tmp_path / "state.safetensors")
    assert state.step == 12 and len(state.history["losses"]) == 12
    atoms, result, _ = run(30, resume=state)
    expected_atoms, expected, _ = run(30)
    assert result.steps_done == 30 and result.stopped is None
    assert_same_run(atoms, result, expected_atoms, expected)


def test_a_saved_state_of_a_scheduled_budgeted_run_continues_it_exactly(tmp_path):
    fields = dict(budget=5, l1=0.2, lr_schedule="cosine", warmup_steps=4, weight_decay=0.1,
                  gradient_accumulation=2, gradient_clip=0.5)
    expected_atoms, expected, states = run(40, state_every=10, **fields)
    assert sorted(states) == [10, 20, 30, 40] and expected_atoms.n_active <= 5
    sc.save_training_state(states[20], tmp_path / "step20.safetensors")
    state = sc.load_training_state(tmp_path / "step20.safetensors")
    assert state.taylor is not None and set(state.taylor) == set(expected_atoms.layers)
    atoms, result, _ = run(40, resume=state, **fields)
    assert_same_run(atoms, result, expected_atoms, expected)


def test_a_state_holds_the_whole_dictionary_not_only_the_active_atoms(tmp_path):
    _, _, states = run(20, state_every=20, budget=3)
    state = states[20]
    assert state.atoms.n_atoms == 16 and state.atoms.n_active <= 3
    sc.save_training_state(state, tmp_path / "s.safetensors")
    assert sc.load_training_state(tmp_path / "s.safetensors").atoms.n_atoms == 16


@pytest.mark.parametrize("change, match", [
    (dict(lr=0.01), r"resume: the state was trained with lr=0.05, this run has lr=0.01; every "
                    r"setting but steps must match"),
    (dict(budget=4), r"trained with budget=None, this run has budget=4"),
    (dict(steps=10), r"resume: the state has done 10 updates; steps must be more than "
                      r"that to continue it \(got 10\)"),
])
def test_a_resume_that_does_not_continue_the_run_is_refused_by_name(change, match):
    _, _, states = run(10, state_every=10)
    atoms, loss = stochastic_problem()
    start = atoms.clone()
    with pytest.raises(ValueError, match=match):
        sc.train_atoms(atoms, loss, **{"steps": 20, "lr": 0.05, **change}, resume=states[10])
    assert torch.equal(atoms["w"].coefficients, start["w"].coefficients)


def test_other_atoms_or_a_non_state_are_refused():
    _, _, states = run(10, state_every=10)
    other = sc.build_atoms({"w": torch.randn(16, 12), "v": torch.randn(10, 8)}, 6, "svd")
    _, loss = stochastic_problem()
    with pytest.raises(ValueError, match="the atoms given are not the state's atoms"):
        sc.train_atoms(other, loss, steps=20, lr=0.05, resume=states[10])
    with pytest.raises(TypeError, match="resume must be a TrainingState, got dict"):
        sc.train_atoms(states[10].atoms, loss, steps=20, lr=0.05, resume={"step": 10})
    with pytest.raises(TypeError, match="state_every 5 needs on_state"):
        sc.train_atoms(states[10].atoms, loss, steps=20, lr=0.05, state_every=5)


def test_bad_state_files_are_named_and_never_overwritten(tmp_path):
    _, _, states = run(10, state_every=10)
    path = tmp_path / "state.safetensors"
    sc.save_training_state(states[10], path)
    with pytest.raises(FileExistsError):
        sc.save_training_state(states[10], path)
    atoms_file = tmp_path / "atoms.safetensors"
    sc.save_atoms(states[10].atoms, atoms_file)
    with pytest.raises(sc.AtomsFileError, match=r"atoms.safetensors: not a usable training state: .*"
                                                r"this is a Sparse Atoms file"):
        sc.load_training_state(atoms_file)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(sc.AtomsFileError, match="truncated.safetensors: not a usable training state"):
        sc.load_training_state(truncated)
    with pytest.raises(sc.AtomsFileError, match="cannot read"):
        sc.load_training_state(tmp_path / "missing.safetensors")
    damaged = dataclasses.replace(states[10], history={"losses": [1.0]})
    sc.save_training_state(damaged, tmp_path / "damaged.safetensors")
    with pytest.raises(sc.AtomsFileError, match="loss history does not have 10 finite losses"):
        sc.load_training_state(tmp_path / "damaged.safetensors")
