"""pyrozoo.export's look-up of the pruned results in a run folder (the ``pyrozoo export`` command and the files it
writes are tested in test_cli.py, test_sweep_cli.py and nets/test_transformers.py)."""

import os

from clitools import cli

from pyrozoo.export import pruned_results
from pyrozoo.posteriors import POSTERIORS, make_source


def test_pruned_results_are_the_files_present_newest_first(tmp_path):
    assert pruned_results(tmp_path) == {}
    names = list(POSTERIORS)[:2]
    for age, name in enumerate(names):  # the first is the older
        path = tmp_path / make_source(name).file
        path.write_bytes(b"")
        os.utime(path, ns=(10**18 + age * 10**9, 10**18 + age * 10**9))
    assert list(pruned_results(tmp_path)) == names[::-1]
    assert pruned_results(tmp_path)[names[0]] == tmp_path / make_source(names[0]).file


def test_the_exported_program_holds_its_example_not_the_tensor_under_it(tmp_path):
    """A slice of a large test set is a view; the program stores only the slice it was traced on."""
    import torch
    from torch import nn

    from pyrozoo.export import save_net

    test_set = torch.randn(20_000, 64)  # 5 MB under the two rows traced
    save_net(nn.Linear(64, 3), test_set[:2], tmp_path / "s.pt", tmp_path / "w.pt", tmp_path / "p.pt2")
    assert (tmp_path / "p.pt2").stat().st_size < 1_000_000
    x = torch.randn(5, 64)
    assert torch.export.load(tmp_path / "p.pt2").module()(x).shape == (5, 3)


def test_exporting_the_trained_state_asked_for_does_not_tell_to_prune_first(capsys, map_run):
    """``export --pruned none`` (compress's documented path) says the net is the trained one, not to prune it."""
    code, out, _ = cli(capsys, "export", "map", "--pruned", "none", "--repeats", "1")
    assert code == 0 and "as --pruned none asked" in out and "prune RUN first" not in out
