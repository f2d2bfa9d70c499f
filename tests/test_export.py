"""pyrozoo.export's look-up of the pruned results in a run folder (the ``pyrozoo export`` command and the files it
writes are tested in test_cli.py, test_sweep_cli.py and nets/test_transformers.py)."""

import os

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
